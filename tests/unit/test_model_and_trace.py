# SPDX-License-Identifier: Apache-2.0
import ipaddress

import pytest

from xdplb import abi, hashing, model, trace
from xdplb.errors import UsageError


def test_backends_parse_with_default_and_explicit_ports():
    got = model.parse_backends("10.0.0.1, 10.0.0.2:8080", 80)
    assert got == [model.Backend(ipaddress.IPv4Address("10.0.0.1"), 80),
                   model.Backend(ipaddress.IPv4Address("10.0.0.2"), 8080)]


def test_backend_weights():
    got = model.parse_backends("10.0.0.1=3,10.0.0.2:8080=0", 80)
    assert [(b.port, b.weight) for b in got] == [(80, 3), (8080, 0)]
    with pytest.raises(UsageError, match="bad weight"):
        model.parse_backends("10.0.0.1=x", 80)


def test_backend_names_resolve():
    assert model.parse_backend("localhost", 80).addr == ipaddress.IPv4Address("127.0.0.1")


@pytest.mark.parametrize("text,message", [
    ("10.0.0.300", "bad backend '10.0.0.300'"),
    ("10.0.0.1:0", "bad backend port '0'"),
    ("10.0.0.1,", "empty backend"),
    ("10.0.0.1,10.0.0.1", "listed twice"),
])
def test_bad_backends_name_the_problem(text, message):
    with pytest.raises(UsageError, match=message):
        model.parse_backends(text, 80)


def test_snat_addresses():
    assert model.parse_snat_addresses("10.0.0.2, 10.0.0.3") == [ipaddress.IPv4Address("10.0.0.2"),
                                                               ipaddress.IPv4Address("10.0.0.3")]
    for text, message in (("10.0.0.2,", "empty entry"), ("10.0.0.2,10.0.0.2", "listed twice"),
                          (",".join(f"10.0.1.{i}" for i in range(17)), "17 SNAT addresses: at most 16")):
        with pytest.raises(UsageError, match=message):
            model.parse_snat_addresses(text)


def test_port_range_and_networks():
    assert model.parse_port_range("10000-20000") == (10000, 20000)
    with pytest.raises(UsageError, match="too small"):
        model.parse_port_range("10000-10010")
    assert model.parse_networks("10.0.0.0/8,192.168.1.0/24") == [
        ipaddress.IPv4Network("10.0.0.0/8"), ipaddress.IPv4Network("192.168.1.0/24")]
    with pytest.raises(UsageError, match="host bits set.*192.168.1.0/24"):
        model.parse_networks("192.168.1.7/24")
    with pytest.raises(UsageError, match="bad client network"):
        model.parse_networks("10.0.0.0/33")


def test_mix64_is_splitmix64s_finalizer():
    """Published outputs of splitmix64 seeded with 0 (Vigna's splitmix64.c): the state
    advances by the golden gamma and each output is the finalizer of the state."""
    gamma = 0x9E3779B97F4A7C15
    assert hashing.mix64(gamma) == 0xE220A8397B1DCDAF
    assert hashing.mix64((2 * gamma) % (1 << 64)) == 0x6E789E6AA1B965F4


def test_flow_hash_folds_the_tuple_into_two_words():
    addrs = int(ipaddress.IPv4Address("10.0.0.1")) << 32 | int(ipaddress.IPv4Address("10.0.0.2"))
    rest = 1000 << 32 | 80 << 16 | 6
    folded = addrs ^ (((rest + 77) * 0x9E3779B97F4A7C15) % (1 << 64))
    assert hashing.flow_hash("10.0.0.1", 1000, "10.0.0.2", 80, 6, 77) == hashing.mix64(folded) >> 32


def test_flow_hash_spreads_neighbouring_clients_evenly():
    """Consecutive source ports and addresses (what real clients look like) land evenly on
    flow table slots, and distinct tuples keep distinct hashes."""
    buckets = [0] * 64
    for n in range(64 * 200):
        h = hashing.flow_hash(f"10.1.{n // 250}.{n % 250}", 40000 + n % 7, "10.0.0.2", 80, 6, 1)
        buckets[h & 63] += 1
    assert min(buckets) > 200 * 0.7 and max(buckets) < 200 * 1.3
    assert len({hashing.flow_hash("10.1.0.1", p, "10.0.0.2", 80, 6, 1) for p in range(1024, 65536)}) > 64000


def test_trace_line_decodes():
    line = ("curl-123 [001] ..s21 100.0: bpf_trace_printk: xdplb1 3 6 2 a2a000a 40346 a2a0002 80 "
            "a2a0066 80 1 0 3")
    rec = trace.decode(line)
    assert rec.saddr == "10.42.0.10" and rec.daddr == "10.42.0.2" and rec.out_daddr == "10.42.0.102"
    assert str(rec) == "10.42.0.10:40346 -> 10.42.0.2:80 tcp [S] new backend 1 -> 10.42.0.102:80 TX"


def test_an_ipv6_trace_line_decodes():
    line = ("curl-123 [001] ..s21 100.0: bpf_trace_printk: xdplb6 3 6 2 fd42:0042:0000:0000:0000:0000:0000:000a "
            "40346 fd42:0042:0000:0000:0000:0000:0000:0003 80 fd42:0042:0000:0000:0000:0000:0000:0066 80 1 0 4")
    rec = trace.decode(line)
    assert (rec.saddr, rec.daddr, rec.out_daddr) == ("fd42:42::a", "fd42:42::3", "fd42:42::66")
    assert str(rec) == "[fd42:42::a]:40346 -> [fd42:42::3]:80 tcp [S] new backend 1 -> [fd42:42::66]:80 REDIRECT"
    none = trace.decode(line.replace("fd42:0042:0000:0000:0000:0000:0000:0066 80 1 0 4",
                                     "0000:0000:0000:0000:0000:0000:0000:0000 0 65535 3 2"))
    assert str(none) == "[fd42:42::a]:40346 -> [fd42:42::3]:80 tcp [S] no-backend no backend PASS"


def test_trace_ignores_foreign_lines():
    assert trace.decode("sshd-1 [000] bpf_trace_printk: hello 1 2 3") is None
    assert trace.decode(f"x: {abi.TRACE_TAG} 1 2") is None


# ---- IPv6 syntax (the data plane is IPv4-only so far: control.problems refuses them) ----

V6 = ipaddress.IPv6Address


@pytest.mark.parametrize("text,addr,port,weight", [
    ("fd00::1", "fd00::1", 80, 1),
    ("[fd00::1]", "fd00::1", 80, 1),
    ("[fd00::1]:8080", "fd00::1", 8080, 1),
    ("[fd00::1]:8080=3", "fd00::1", 8080, 3),
    ("fd00::1=0", "fd00::1", 80, 0),
    ("2001:db8:0:0:0:0:1:80", "2001:db8::1:80", 80, 1),  # eight groups: no room for a port
    ("[fd00::1:80]", "fd00::1:80", 80, 1),
])
def test_ipv6_backends(text, addr, port, weight):
    b = model.parse_backend(text, 80)
    assert (b.addr, b.port, b.weight) == (V6(addr), port, weight)
    assert b.endpoint == f"[{V6(addr)}]:{port}"


@pytest.mark.parametrize("text,message", [
    ("fd00::1:80", r"ambiguous: it reads as the IPv6 address fd00::1:80; for port 80 write \[fd00::1\]:80, "
                   r"for the address alone \[fd00::1:80\]"),
    ("[fd00::1", r"write an IPv6 address with a port as \[ADDR\]:PORT"),
    ("[fd00::1]80", r"write an IPv6 address with a port as \[ADDR\]:PORT"),
    ("[fd00::1]:0", "bad backend port '0'"),
    ("[10.0.0.1x]", "not an IPv6 address"),
    ("fe80::1%eth0", "with a zone"),
    ("fd00::g", "not an IPv6 address"),
    # The maps hold IPv4 addresses in this form: one would read back as IPv4.
    ("[::ffff:10.0.0.1]:80", r"an IPv4-mapped IPv6 address; give the IPv4 address, 10.0.0.1"),
])
def test_bad_ipv6_backends_name_the_problem(text, message):
    with pytest.raises(UsageError, match=message):
        model.parse_backend(text, 80)


def test_ipv4_mapped_client_networks_are_refused_but_any_ipv6_client_is_not():
    with pytest.raises(UsageError, match=r"IPv4-mapped IPv6 addresses \(::ffff:0:0/96\); give IPv4 networks"):
        model.parse_networks("::ffff:10.0.0.0/104")
    assert model.parse_networks("::/0") == [ipaddress.IPv6Network("::/0")]


def test_ipv6_services_take_brackets():
    assert model.parse_service("[fd00::1]:443/udp") == (V6("fd00::1"), 443, "udp")
    assert model.parse_service("[fd00::1]:443") == (V6("fd00::1"), 443, "tcp")
    with pytest.raises(UsageError, match=r"write an IPv6 VIP in brackets, like \[fd00::1\]:80/tcp"):
        model.parse_service("fd00::1:80/tcp")
    with pytest.raises(UsageError, match=r"like \[VIP\]:PORT/udp"):
        model.parse_service("fd00::1/udp")
    with pytest.raises(UsageError, match="give VIP:PORT"):
        model.parse_service("[fd00::1]/tcp")
    svc = model.Service(V6("fd00::1"), 80, "tcp", [model.Backend(V6("fd00::2"), 80)])
    assert svc.name == "[fd00::1]:80/tcp"
    assert model.find_service([svc], "[fd00::1]:80/tcp") is svc
    assert model.find_backend(svc, "[fd00::2]:80") is svc.backends[0]


def test_ipv6_networks_and_names():
    assert model.parse_networks("fd00::/64, 10.0.0.0/8") == [ipaddress.IPv6Network("fd00::/64"),
                                                             ipaddress.IPv4Network("10.0.0.0/8")]
    with pytest.raises(UsageError, match="host bits set.*fd00::/64"):
        model.parse_networks("fd00::1/64")
    assert model.parse_address("localhost").version == 4


def test_names_resolve_to_either_family(monkeypatch):
    """A name with both families gives its IPv4 address unless IPv6 is asked for; a name
    with AAAA records only gives IPv6. (This host's resolver has no IPv6 names: the
    resolver's answers are given here.)"""
    records = {"both.example": ["fd00::5", "10.0.0.5"], "six.example": ["fd00::6"]}
    asked = []

    def getaddrinfo(host, port, family, kind):
        asked.append(family)
        found = [a for a in records.get(host, [])
                 if family == model.socket.AF_UNSPEC or (family == model.socket.AF_INET6) == (":" in a)]
        if not found:
            raise model.socket.gaierror("not found")
        return [(model.socket.AF_INET6 if ":" in a else model.socket.AF_INET, kind, 6, "", (a, 0)) for a in found]
    monkeypatch.setattr(model.socket, "getaddrinfo", getaddrinfo)
    assert model.parse_address("both.example") == ipaddress.IPv4Address("10.0.0.5")
    assert model.parse_address("both.example", family=6) == V6("fd00::5")
    assert model.parse_backend("six.example:8080", 80).addr == V6("fd00::6")
    assert asked == [model.socket.AF_UNSPEC, model.socket.AF_INET6, model.socket.AF_UNSPEC]
    with pytest.raises(UsageError, match="bad VIP 'six.example': give an IPv4 address or a name with one"):
        model.parse_address("six.example", "VIP", family=4)


def test_nat66_and_mixed_families_are_refused_before_anything_changes():
    from xdplb import control, netlink
    link = netlink.Link(index=7, name="eth0", kind="veth", mac="02:00:00:00:00:01", up=True, xdp_prog_id=0,
                        xdp_mode="")
    v6 = model.Service(V6("fd00::1"), 80, "tcp", [model.Backend(V6("fd00::2"), 80)])
    v6_listed = model.Service(V6("fd00::1"), 81, "tcp", [model.Backend(ipaddress.IPv4Address("10.0.0.3"), 81)],
                              clients=[ipaddress.IPv4Network("10.0.0.0/8"), ipaddress.IPv6Network("fd00::/64")],
                              forward="dsr")
    mixed = model.Service(ipaddress.IPv4Address("10.0.0.2"), 80, "tcp", [model.Backend(V6("fd00::2"), 80)],
                          clients=[ipaddress.IPv6Network("fd00::/64")])
    wanted = model.InterfaceConfig(name="eth0", services=[v6, v6_listed, mixed], snat=[V6("fd00::9")])
    assert control.problems(wanted, None, link) == [
        "eth0: service [fd00::1]:80/tcp: IPv6 services forward with --forward dsr or ipip only so far (nat is "
        "IPv4 only): give --forward dsr or ipip, or an IPv4 VIP",
        "eth0: service [fd00::1]:81/tcp: backend 10.0.0.3:81 is IPv4 but the VIP is IPv6: a service's backends "
        "are of its address family",
        "eth0: service [fd00::1]:81/tcp: client network 10.0.0.0/8 is IPv4 but the VIP is IPv6: give IPv6 networks",
        "eth0: service 10.0.0.2:80/tcp: backend [fd00::2]:80 is IPv6 but the VIP is IPv4: a service's backends "
        "are of its address family",
        "eth0: service 10.0.0.2:80/tcp: client network fd00::/64 is IPv6 but the VIP is IPv4: give IPv4 networks",
        "eth0: SNAT address fd00::9 is IPv6: the SNAT sources of IPv4 services are IPv4 addresses",
    ]
