# SPDX-License-Identifier: Apache-2.0
"""backendhost: VIPs on lo and the ARP sysctls, on a fake host (lo's addresses in a set,
/proc/sys in a temporary directory): undoing restores exactly what was there."""
from __future__ import annotations

import ipaddress

import pytest

from xdplb import backendhost
from xdplb.errors import UsageError, XdplbError


class FakeHost:
    def __init__(self, tmp_path, monkeypatch, lo=(), eth0=("10.0.0.101/24",), arp_ignore="0", arp_announce="0"):
        self.lo = {"127.0.0.1/8", *lo}
        self.eth0 = list(eth0)
        self.fail_on: str | None = None
        self.proc = tmp_path / "proc-sys"
        for name, value in (("arp_ignore", arp_ignore), ("arp_announce", arp_announce)):
            path = self.proc / "net/ipv4/conf/all" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(value + "\n")
        monkeypatch.setattr(backendhost, "PROC_SYS", self.proc)
        monkeypatch.setattr(backendhost, "RECORD_DIR", tmp_path / "run")
        monkeypatch.setattr(backendhost.namespaces, "netns_name", lambda: "test")
        monkeypatch.setattr(backendhost.netlink, "addresses_by_link", self.addresses)
        monkeypatch.setattr(backendhost.netlink, "add_address", self.add)
        monkeypatch.setattr(backendhost.netlink, "remove_address", self.remove)

    def addresses(self):
        return {"lo": [ipaddress.ip_interface(a) for a in sorted(self.lo)],
                "eth0": [ipaddress.ip_interface(a) for a in self.eth0]}

    def add(self, ifname, address, prefixlen, vip=False):
        assert vip
        assert ifname == "lo"
        if address == self.fail_on:
            raise OSError(17, "File exists")
        self.lo.add(f"{address}/{prefixlen}")

    def remove(self, ifname, address, prefixlen):
        assert ifname == "lo"
        self.lo.remove(f"{address}/{prefixlen}")

    def sysctls(self):
        return {name: (self.proc / "net/ipv4/conf/all" / name).read_text().strip()
                for name in ("arp_ignore", "arp_announce")}

    def state(self):
        return sorted(self.lo), self.sysctls()


@pytest.fixture
def host(tmp_path, monkeypatch):
    return FakeHost(tmp_path, monkeypatch)


def test_attach_adds_the_vips_and_sets_both_sysctls_and_detach_restores_all(host):
    before = host.state()
    lines = backendhost.converge("eth0", ["10.0.0.2", "10.0.0.3"])
    assert lines == ["added 10.0.0.2/32 to lo", "added 10.0.0.3/32 to lo",
                     "net.ipv4.conf.all.arp_ignore: 0 -> 1", "net.ipv4.conf.all.arp_announce: 0 -> 2"]
    assert host.lo == {"127.0.0.1/8", "10.0.0.2/32", "10.0.0.3/32"}
    assert host.sysctls() == {"arp_ignore": "1", "arp_announce": "2"}
    assert backendhost.managed("eth0") == ["10.0.0.2", "10.0.0.3"]
    lines = backendhost.converge("eth0", None)
    assert lines == ["removed 10.0.0.2/32 from lo", "removed 10.0.0.3/32 from lo",
                     "net.ipv4.conf.all.arp_ignore: 1 -> 0 (restored)",
                     "net.ipv4.conf.all.arp_announce: 2 -> 0 (restored)"]
    assert host.state() == before
    assert not backendhost.record_path().exists()


def test_an_ipv6_vip_goes_on_lo_as_a_host_address_without_arp_sysctls(host):
    before = host.state()
    assert backendhost.parse_vips("fd42:42::3") == [ipaddress.IPv6Address("fd42:42::3")]
    assert backendhost.converge("eth0", ["fd42:42::3"]) == ["added fd42:42::3/128 to lo"]
    assert host.sysctls() == {"arp_ignore": "0", "arp_announce": "0"}
    # With an IPv4 VIP too, the sysctls follow the IPv4 one, and go back with it.
    assert backendhost.converge("eth0", ["fd42:42::3", "10.0.0.2"])[-2:] == [
        "net.ipv4.conf.all.arp_ignore: 0 -> 1", "net.ipv4.conf.all.arp_announce: 0 -> 2"]
    backendhost.converge("eth0", None)
    assert host.state() == before


def test_a_vip_already_on_lo_stays_there(tmp_path, monkeypatch):
    host = FakeHost(tmp_path, monkeypatch, lo=("10.0.0.2/32",))
    before = host.state()
    assert "10.0.0.2 is on lo already: left there, also after detach" in backendhost.converge("eth0", ["10.0.0.2"])
    assert "10.0.0.2 stays on lo: it was there before attach" in backendhost.converge("eth0", None)
    assert host.state() == before


def test_sysctls_already_strict_enough_are_not_touched(tmp_path, monkeypatch):
    host = FakeHost(tmp_path, monkeypatch, arp_ignore="2", arp_announce="2")
    assert backendhost.converge("eth0", ["10.0.0.2"]) == ["added 10.0.0.2/32 to lo"]
    assert backendhost.load()["sysctls"] == {}
    backendhost.converge("eth0", None)
    assert host.sysctls() == {"arp_ignore": "2", "arp_announce": "2"}


def test_interfaces_share_what_they_changed_until_the_last_lets_go(host):
    before = host.state()
    backendhost.converge("eth0", ["10.0.0.2"])
    assert backendhost.converge("eth1", ["10.0.0.2", "10.0.0.3"]) == ["added 10.0.0.3/32 to lo"]
    lines = backendhost.converge("eth0", None)
    assert lines == ["10.0.0.2 stays on lo: decap on eth1 wants it"]
    assert host.sysctls() == {"arp_ignore": "1", "arp_announce": "2"}
    backendhost.converge("eth1", None)
    assert host.state() == before


def test_attach_again_with_fewer_vips_removes_the_others(host):
    backendhost.converge("eth0", ["10.0.0.2", "10.0.0.3"])
    assert backendhost.converge("eth0", ["10.0.0.3"]) == ["removed 10.0.0.2/32 from lo"]
    assert backendhost.load()["added"] == ["10.0.0.3"]


def test_a_sysctl_changed_since_attach_is_left_as_it_is(host):
    backendhost.converge("eth0", ["10.0.0.2"])
    (host.proc / "net/ipv4/conf/all/arp_ignore").write_text("2\n")
    lines = backendhost.converge("eth0", None)
    assert "net.ipv4.conf.all.arp_ignore left at 2: changed since attach set it to 1 (it was 0 before)" in lines
    assert host.sysctls() == {"arp_ignore": "2", "arp_announce": "0"}


def test_a_failure_midway_undoes_this_call(host):
    before = host.state()
    host.fail_on = "10.0.0.3"
    with pytest.raises(XdplbError, match="nothing was changed"):
        backendhost.converge("eth0", ["10.0.0.2", "10.0.0.3"])
    assert host.state() == before
    assert not backendhost.record_path().exists()


@pytest.mark.parametrize("text,message", [
    ("10.0.0.300", "bad VIP '10.0.0.300'"),
    ("10.0.0.2,", "an empty item"),
    ("127.0.0.1", "not an address a service can have"),
    ("224.0.0.5", "not an address a service can have"),
    ("0.0.0.0", "not an address a service can have"),
    ("255.255.255.255", "not an address a service can have"),
])
def test_bad_vips_are_refused(text, message):
    with pytest.raises(UsageError, match=message):
        backendhost.parse_vips(text)


def test_vips_are_deduplicated_in_order():
    assert backendhost.parse_vips("10.0.0.3, 10.0.0.2,10.0.0.3") == [ipaddress.IPv4Address("10.0.0.3"),
                                                                     ipaddress.IPv4Address("10.0.0.2")]


def test_a_vip_that_is_an_interface_address_is_refused(host):
    with pytest.raises(UsageError, match="VIP 10.0.0.101 is an address of eth0"):
        backendhost.check_vips([ipaddress.IPv4Address("10.0.0.101")])
    backendhost.check_vips([ipaddress.IPv4Address("10.0.0.2")])


# ---- the commands, as a user sees them ---------------------------------------------------

def run(*args):
    from click.testing import CliRunner
    from xdplb import cli
    return CliRunner().invoke(cli.main, list(args))


@pytest.mark.parametrize("vip,message", [("10.0.0.300", "bad VIP '10.0.0.300'"), ("10.0.0.2,,10.0.0.3", "an empty item"),
                                         ("224.0.0.5", "not an address a service can have")])
def test_decap_attach_refuses_a_bad_vip_in_one_line_before_anything(monkeypatch, vip, message):
    monkeypatch.setattr("xdplb.decap.attach", lambda *a, **k: pytest.fail("attach must not run"))
    result = run("decap", "attach", "eth0", "--vip", vip)
    assert result.exit_code == 2
    assert message in result.output and len(result.output.strip().splitlines()) == 1




def test_a_record_outliving_its_namespace_does_not_list_a_vip_twice(host):
    """A namespace removed without detaching and made again under its name: its record
    says the VIP was added, lo does not have it. Adding it again lists it once, and
    detaching removes it once."""
    backendhost.converge("eth0", ["fd42:42::3"])
    host.lo.discard("fd42:42::3/128")  # the new namespace's lo
    assert backendhost.converge("eth0", ["fd42:42::3"]) == ["added fd42:42::3/128 to lo"]
    assert backendhost.load()["added"] == ["fd42:42::3"]
    assert backendhost.converge("eth0", None) == ["removed fd42:42::3/128 from lo"]
    assert host.lo == {"127.0.0.1/8"}
