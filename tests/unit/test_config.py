# SPDX-License-Identifier: Apache-2.0
"""The config file: validation with locations, export/parse round trip, diffs."""
from __future__ import annotations

import ipaddress

import pytest

from xdplb import config
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
    assert config.diff_services("eth0", old, new) == [
        "eth0: - service 10.0.0.2:81/tcp",
        "eth0: + service 10.0.0.2:53/udp -> 10.0.0.11:53 weight 1",
        "eth0: service 10.0.0.2:80/tcp: - backend 10.0.0.12:80",
        "eth0: service 10.0.0.2:80/tcp: + backend 10.0.0.13:80 weight 1",
        "eth0: service 10.0.0.2:80/tcp: ~ backend 10.0.0.11:80 weight 1 -> 0",
    ]
    assert config.diff_services("eth0", new, new) == []


def test_settings_diff_lines():
    a = Settings(snat_addrs=[ip("10.0.0.2")])
    b = Settings(snat_addrs=[ip("10.0.0.2")], udp_timeout_s=30, hash_seed=1)
    assert config.diff_settings("eth0", a, b) == ["eth0: ~ seed 24301 -> 1", "eth0: ~ timeouts.udp 300 -> 30"]
    c = Settings(snat_addrs=[ip("10.0.0.2"), ip("10.0.0.3")])
    assert config.diff_settings("eth0", a, c) == ["eth0: ~ snat 10.0.0.2 -> 10.0.0.2,10.0.0.3"]


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
    assert config.diff_services("eth0", [old], [new]) == [
        "eth0: service 10.0.0.2:53/udp: ~ udp_timeout the interface's -> 20 s"]
