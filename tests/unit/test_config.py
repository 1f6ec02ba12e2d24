# SPDX-License-Identifier: Apache-2.0
"""The config file: validation with locations, export/parse round trip, diffs."""
from __future__ import annotations

import ipaddress

import pytest

from xdplb import config, plan
from xdplb.model import Backend, Service, Settings

GOOD = """
[interfaces.eth0]
mode = "native"
flows = 65536
snat = "10.0.0.2"
snat_ports = "40000-50000"
seed = 7
timeouts = { tcp = 600, udp = 30 }

[[interfaces.eth0.services]]
vip = "10.0.0.2"
port = 80
backends = [ { address = "10.0.0.11" }, { address = "10.0.0.12", port = 8080, weight = 3 } ]

[[interfaces.eth0.services]]
vip = "10.0.0.2"
port = 53
proto = "udp"
clients = ["10.0.0.0/8"]
ring_size = 251
backends = []
"""


def ip(a):
    return ipaddress.IPv4Address(a)


def test_a_good_file_becomes_the_model():
    (iface,) = config.parse(GOOD)
    assert (iface.name, iface.mode, iface.flows, iface.snat, iface.snat_ports, iface.seed) == \
        ("eth0", "native", 65536, [ip("10.0.0.2")], (40000, 50000), 7)
    assert iface.timeouts == {"tcp": 600, "tcp_closing": 120, "udp": 30, "tcp_syn": 5}
    web, dns = iface.services
    assert web.backends == [Backend(ip("10.0.0.11"), 80, 1), Backend(ip("10.0.0.12"), 8080, 3)]
    assert (dns.proto, dns.ring_size, dns.clients) == ("udp", 251, [ipaddress.IPv4Network("10.0.0.0/8")])


def test_every_problem_is_reported_with_its_location():
    text = GOOD.replace('mode = "native"', 'mode = "turbo"').replace("weight = 3", "weight = -3") \
        .replace("ring_size = 251", "ring_size = 250").replace('vip = "10.0.0.2"\nport = 53', 'vip = "10.0.0.2"\nportt = 53')
    with pytest.raises(config.ConfigError) as err:
        config.parse(text, "lb.toml")
    assert err.value.problems == [
        "interfaces.eth0.mode: must be one of auto, native, generic, not 'turbo'",
        "interfaces.eth0.services[0].backends[1].weight: must be a whole number from 0 to 65535, not -3",
        "interfaces.eth0.services[1].portt: unknown key (did you mean 'port'?)",
        "interfaces.eth0.services[1]: missing key 'port'",
        "interfaces.eth0.services[1].ring_size: 250 is not prime (Maglev needs a prime table size, like 65537)",
    ]
    assert str(err.value).startswith("lb.toml: 5 problems, nothing applied:")


def test_toml_syntax_errors_say_where():
    with pytest.raises(config.ConfigError, match=r"not valid TOML: .*line 2"):
        config.parse("[interfaces.eth0]\nmode = \n")


def test_duplicates_are_refused():
    text = GOOD.replace('port = 53\nproto = "udp"', 'port = 80\nproto = "tcp"')
    with pytest.raises(config.ConfigError, match=r"services\[1\]: service 10.0.0.2:80/tcp is listed twice"):
        config.parse(text)


def test_dump_then_parse_round_trips():
    (iface,) = config.parse(GOOD)
    (again,) = config.parse(config.dump([iface]))
    assert again == iface


def test_a_snat_pool_is_a_list_and_round_trips():
    (iface,) = config.parse(GOOD.replace('snat = "10.0.0.2"', 'snat = ["10.0.0.2", "10.0.0.3"]'))
    assert iface.snat == [ip("10.0.0.2"), ip("10.0.0.3")]
    assert 'snat = ["10.0.0.2", "10.0.0.3"]' in config.dump([iface])
    (again,) = config.parse(config.dump([iface]))
    assert again == iface
    assert iface.settings([ip("10.9.9.9")]).snat_addrs == [ip("10.0.0.2"), ip("10.0.0.3")]
    for bad, problem in (('snat = ["10.0.0.2", "10.0.0.2"]', "10.0.0.2 listed twice"),
                         ("snat = 7", "must be an address or a list of them"),
                         ("snat = [1, 2]", "must be an address or a list of them"),
                         ("snat = []", "empty entry")):
        with pytest.raises(config.ConfigError, match=problem):
            config.parse(GOOD.replace('snat = "10.0.0.2"', bad))


def test_service_diff_lines():
    old = [Service(ip("10.0.0.2"), 80, "tcp", [Backend(ip("10.0.0.11"), 80, 1), Backend(ip("10.0.0.12"), 80, 1)]),
           Service(ip("10.0.0.2"), 81, "tcp", [])]
    new = [Service(ip("10.0.0.2"), 80, "tcp", [Backend(ip("10.0.0.11"), 80, 0), Backend(ip("10.0.0.13"), 80, 1)]),
           Service(ip("10.0.0.2"), 53, "udp", [Backend(ip("10.0.0.11"), 53, 1)])]
    assert plan.diff_services("eth0", old, new) == [
        "eth0: - service 10.0.0.2:81/tcp",
        "eth0: + service 10.0.0.2:53/udp -> 10.0.0.11:53 weight 1",
        "eth0: service 10.0.0.2:80/tcp: - backend 10.0.0.12:80",
        "eth0: service 10.0.0.2:80/tcp: + backend 10.0.0.13:80 weight 1",
        "eth0: service 10.0.0.2:80/tcp: ~ backend 10.0.0.11:80 weight 1 -> 0",
    ]
    assert plan.diff_services("eth0", new, new) == []


def test_settings_diff_lines():
    a = Settings(snat_addrs=[ip("10.0.0.2")])
    b = Settings(snat_addrs=[ip("10.0.0.2")], udp_timeout_s=30, hash_seed=1)
    assert plan.diff_settings("eth0", a, b) == ["eth0: ~ seed 24301 -> 1", "eth0: ~ timeouts.udp 300 -> 30"]
    c = Settings(snat_addrs=[ip("10.0.0.2"), ip("10.0.0.3")])
    assert plan.diff_settings("eth0", a, c) == ["eth0: ~ snat 10.0.0.2 -> 10.0.0.2,10.0.0.3"]


def test_a_udp_service_may_have_its_own_timeout_and_it_round_trips():
    text = GOOD.replace("ring_size = 251", "ring_size = 251\nudp_timeout = 30").replace(
        "timeouts = { tcp = 600, udp = 30 }", "timeouts = { tcp = 600, udp = 300, tcp_syn = 8 }")
    (iface,) = config.parse(text)
    assert [s.udp_timeout_s for s in iface.services] == [0, 30]
    assert iface.timeouts["tcp_syn"] == 8 and iface.settings([ip("10.0.0.2")]).tcp_syn_timeout_s == 8
    dumped = config.dump([iface])
    assert "udp_timeout = 30" in dumped and "tcp_syn = 8" in dumped
    assert config.parse(dumped) == [iface]


def test_a_udp_timeout_on_a_tcp_service_is_refused_with_its_location():
    text = GOOD.replace("port = 80\n", "port = 80\nudp_timeout = 30\n")
    with pytest.raises(config.ConfigError) as err:
        config.parse(text)
    assert err.value.problems == [
        'interfaces.eth0.services[0].udp_timeout: applies to UDP services only: remove it, or set proto = "udp"']


def test_a_changed_udp_timeout_is_a_difference():
    old = Service(ip("10.0.0.2"), 53, "udp")
    new = Service(ip("10.0.0.2"), 53, "udp", udp_timeout_s=20)
    assert plan.diff_services("eth0", [old], [new]) == [
        "eth0: service 10.0.0.2:53/udp: ~ udp_timeout the interface's -> 20 s"]


def test_clients_outside_the_allow_list_are_dropped_unless_the_service_says_pass():
    (iface,) = config.parse(GOOD)
    assert [s.not_allowed for s in iface.services] == ["drop", "drop"]
    assert "not_allowed" not in config.dump([iface])  # the default is not written out
    (iface,) = config.parse(GOOD.replace('clients = ["10.0.0.0/8"]', 'clients = ["10.0.0.0/8"]\nnot_allowed = "pass"'))
    assert [s.not_allowed for s in iface.services] == ["drop", "pass"]
    dumped = config.dump([iface])
    assert 'clients = ["10.0.0.0/8"]\nnot_allowed = "pass"\n' in dumped
    assert config.parse(dumped) == [iface]


def test_a_bad_not_allowed_is_refused_with_its_location():
    text = GOOD.replace("port = 80\n", 'port = 80\nnot_allowed = "pass"\n').replace(
        'clients = ["10.0.0.0/8"]', 'clients = ["10.0.0.0/8"]\nnot_allowed = "reject"')
    with pytest.raises(config.ConfigError) as err:
        config.parse(text)
    assert err.value.problems == [
        'interfaces.eth0.services[0].not_allowed: "pass" needs an allow-list: set clients, or remove not_allowed',
        "interfaces.eth0.services[1].not_allowed: bad not-allowed action 'reject': use drop (the default) or pass"]


def test_a_changed_not_allowed_is_a_difference():
    nets = [ipaddress.IPv4Network("10.0.0.0/8")]
    old = Service(ip("10.0.0.2"), 80, "tcp", clients=nets)
    new = Service(ip("10.0.0.2"), 80, "tcp", clients=nets, not_allowed="pass")
    assert plan.diff_services("eth0", [old], [new]) == ["eth0: service 10.0.0.2:80/tcp: ~ not_allowed drop -> pass"]
    assert plan.diff_services("eth0", [new], [new]) == []


# ---- values of the wrong type or that would be read as something else (issue 13) ----

ONE_SERVICE = """
[interfaces.eth0]
{interface}
[[interfaces.eth0.services]]
vip = {vip}
port = {port}
clients = {clients}
backends = [ {{ address = {address} }}, {{ address = "10.0.0.12" }} ]
{extra}
"""


def problems(interface="", vip='"10.0.0.2"', port="80", clients='["10.0.0.0/8"]', address='"10.0.0.11"',
             extra="") -> list[str]:
    _, found = config.check(ONE_SERVICE.format(interface=interface, vip=vip, port=port, clients=clients,
                                               address=address, extra=extra))
    return found


def test_the_sample_of_one_service_is_good():
    assert problems() == []


def test_every_value_of_the_wrong_type_is_refused_with_its_location():
    health = 'health = { type = "udp", port = 80.5, rise = 2.0, path = 5 }'
    assert problems(vip="10", clients="10", address="11", interface="snat_ports = 40000",
                    extra=f"proto = 6\nnot_allowed = 1\n{health}") == [
        'interfaces.eth0.snat_ports: must be a string like "10000-32767", not 40000',
        'interfaces.eth0.services[0].vip: must be a string like "10.0.0.2", not 10',
        'interfaces.eth0.services[0].proto: must be a string like "tcp" or "udp", not 6',
        'interfaces.eth0.services[0].clients: must be an array of CIDR strings like ["10.0.0.0/8"], not 10',
        'interfaces.eth0.services[0].not_allowed: must be a string like "drop" or "pass", not 1',
        'interfaces.eth0.services[0].backends[0].address: must be a string like "10.0.0.11", not 11',
        "interfaces.eth0.services[0].health.rise: must be a whole number from 1 to 100, not 2.0",
        "interfaces.eth0.services[0].health.port: must be a whole number from 1 to 65535, not 80.5",
        'interfaces.eth0.services[0].health.path: must be a string like "/healthz", not 5',
    ]
    assert problems(clients='["10.0.0.0/8", 7]') == [
        'interfaces.eth0.services[0].clients[1]: must be a string like "10.0.0.0/8", not 7']


def test_shorthand_addresses_and_host_bits_are_refused_with_what_to_write():
    assert problems(vip='"127.1"', address='"010.0.0.1"', clients='["10.0.0.1/8"]') == [
        "interfaces.eth0.services[0].vip: bad VIP '127.1': write the IPv4 address in full, as four decimal "
        "numbers (this shorthand means 127.0.0.1)",
        "interfaces.eth0.services[0].clients[0]: bad client network '10.0.0.1/8': it has host bits set; "
        "write the network, 10.0.0.0/8",
        "interfaces.eth0.services[0].backends[0].address: bad backend '010.0.0.1': write the IPv4 address in "
        "full, as four decimal numbers (this shorthand means 8.0.0.1)",
    ]


def test_a_service_port_inside_the_snat_range_is_refused():
    assert problems(port="20000") == [
        "interfaces.eth0.services[0].port: 20000 is inside snat_ports 10000-32767 (the default), where the "
        "backends' replies arrive: give a service port outside 10000-32767, or set snat_ports to a range "
        "without it"]
    assert problems(port="45000", interface='snat_ports = "40000-50000"') == [
        "interfaces.eth0.services[0].port: 45000 is inside snat_ports 40000-50000, where the backends' replies "
        "arrive: give a service port outside 40000-50000, or set snat_ports to a range without it"]
    assert problems(port="20000", interface='snat_ports = "40000-50000"') == []
    # A bad range is reported once, not again for every service.
    assert problems(port="20000", interface='snat_ports = "bad"') == [
        "interfaces.eth0.snat_ports: bad SNAT port 'bad': give a number from 1 to 65535"]


def test_a_ring_smaller_than_the_backend_count_is_refused():
    text = ONE_SERVICE.format(interface="", vip='"10.0.0.2"', port=80, clients="[]", address='"10.0.0.11"',
                              extra="ring_size = 3").replace(
        '{ address = "10.0.0.12" }', '{ address = "10.0.0.12" }, { address = "10.0.0.13" }, { address = "10.0.0.14" }')
    with pytest.raises(config.ConfigError) as err:
        config.parse(text)
    assert err.value.problems == [
        "interfaces.eth0.services[0].ring_size: 3 slots are fewer than the 4 backends, so some would get no "
        "flows (Maglev wants a table about 100 times the backend count): give a prime of at least 5, like 65537"]
    assert problems(extra="ring_size = 3") == []  # two backends: small, but each has slots


def test_timeouts_that_would_leak_snat_sources_are_refused():
    assert problems(interface="timeouts = { tcp_closing = 0, tcp_syn = 0 }") == [
        "interfaces.eth0.timeouts.tcp_closing: must be at least 60, a Linux backend's TIME_WAIT, not 0: a closed "
        "flow forgotten sooner hands out its SNAT source blindly, and 0 (never expire) holds it for ever; give "
        "120 (the default) or at least 60",
        "interfaces.eth0.timeouts.tcp_syn: must be at least 1, not 0: 0 (never expire) would hold the SNAT "
        "source of every handshake a client never completes for ever; give 5 (the default) or more",
    ]
    assert problems(interface="timeouts = { tcp_closing = 59 }") == [
        "interfaces.eth0.timeouts.tcp_closing: must be at least 60, a Linux backend's TIME_WAIT, not 59: a closed "
        "flow forgotten sooner hands out its SNAT source blindly, and 0 (never expire) holds it for ever; give "
        "120 (the default) or at least 60"]
    # tcp and udp may still be 0: never expire, as documented.
    assert problems(interface="timeouts = { tcp = 0, udp = 0, tcp_closing = 60, tcp_syn = 1 }") == []


def test_a_forwarding_mode_and_an_encapsulation_source_round_trip():
    text = GOOD.replace('snat_ports = "40000-50000"', 'snat_ports = "40000-50000"\nencap_source = "10.0.0.9"') \
        .replace('port = 53\nproto = "udp"', 'port = 53\nproto = "udp"\nforward = "ipip"')
    (iface,) = config.parse(text)
    assert iface.encap_source == ipaddress.IPv4Address("10.0.0.9")
    assert [s.forward for s in iface.services] == ["nat", "ipip"]
    (again,) = config.parse(config.dump([iface]))
    assert again == iface
    assert "forward" not in config.dump([config.parse(GOOD)[0]])  # the default is not written out
    dsr = Service(ipaddress.IPv4Address("10.0.0.2"), 80, "tcp", forward="dsr")
    assert plan.diff_services("eth0", [Service(dsr.vip, 80, "tcp")], [dsr]) == [
        "eth0: service 10.0.0.2:80/tcp: ~ forward nat -> dsr"]


def test_a_bad_forwarding_mode_is_refused_with_its_location():
    _, problems = config.check(GOOD.replace('port = 53\nproto = "udp"', 'port = 53\nproto = "udp"\nforward = "tunnel"'))
    assert problems == ["interfaces.eth0.services[1].forward: bad forwarding mode 'tunnel': use nat (full NAT, the "
                        "default), dsr (direct server return) or ipip (encapsulation)"]


def test_dsr_and_ipip_backends_must_use_the_service_port():
    from types import SimpleNamespace

    from xdplb import control
    from xdplb.model import InterfaceConfig
    svc = Service(ipaddress.IPv4Address("10.0.0.2"), 80, "tcp",
                  [Backend(ipaddress.IPv4Address("10.0.0.11"), 8080)], forward="ipip")
    link = SimpleNamespace(up=True, index=2, name="eth0")
    assert control.problems(InterfaceConfig("eth0", services=[svc]), None, link) == [
        "eth0: service 10.0.0.2:80/tcp: backend 10.0.0.11:8080: with --forward ipip a backend must use the "
        "service's port 80 (the packet keeps its destination); give 10.0.0.11:80"]


def test_an_outer_source_per_family_round_trips_and_two_of_one_family_are_refused():
    text = GOOD.replace('snat_ports = "40000-50000"', 'snat_ports = "40000-50000"\nencap_source = ["10.0.0.9", "fd00::9"]')
    (iface,) = config.parse(text)
    assert (iface.encap_source, iface.encap_source6) == (ipaddress.IPv4Address("10.0.0.9"),
                                                         ipaddress.IPv6Address("fd00::9"))
    assert 'encap_source = ["10.0.0.9", "fd00::9"]' in config.dump([iface])
    (again,) = config.parse(config.dump([iface]))
    assert again == iface
    (only6,) = config.parse(GOOD.replace('snat_ports = "40000-50000"', 'snat_ports = "40000-50000"\nencap_source = "fd00::9"'))
    assert (only6.encap_source, only6.encap_source6) == (None, ipaddress.IPv6Address("fd00::9"))
    _, problems = config.check(GOOD.replace('snat_ports = "40000-50000"',
                                            'snat_ports = "40000-50000"\nencap_source = "10.0.0.9,10.0.0.8"'))
    assert problems == ["interfaces.eth0.encap_source: bad encapsulation sources '10.0.0.9,10.0.0.8': two IPv4 "
                        "addresses; give at most one per family, like 10.0.0.2,fd00::2"]
    s = Settings(snat_addrs=[ipaddress.IPv4Address("10.0.0.2")])
    assert plan.diff_settings("eth0", s, Settings(snat_addrs=s.snat_addrs, encap_source6=ipaddress.IPv6Address("fd00::9"))) \
        == ["eth0: ~ encap_source (IPv6) none -> fd00::9"]
