# SPDX-License-Identifier: Apache-2.0
"""serve's log of a SNAT pool that ran dry: one line per growth of the counter, with
the remedy, and nothing while it stays put."""
from __future__ import annotations

from xdplb import config, control, report, serve
from xdplb.errors import NotAttachedError


def test_a_dry_snat_pool_is_logged_when_its_counter_grows(monkeypatch, capsys, tmp_path):
    readings = iter([4, 4, 9, 9])
    monkeypatch.setattr(report, "counter", lambda ifname, name: next(readings))
    server = serve.Server(str(tmp_path / "lb.toml"))
    server.desired = [config.InterfaceConfig(name="eth0")]
    for _ in range(4):
        server._watch_snat()
    lines = [line for line in capsys.readouterr().err.splitlines() if "event=snat_exhausted" in line]
    # The first reading is the baseline (dropped before serve started): only 4 -> 9 is news.
    assert len(lines) == 1
    assert "level=warning" in lines[0] and "interface=eth0" in lines[0] and "dropped=5" in lines[0]
    assert "add SNAT addresses" in lines[0]


def test_an_interface_detached_by_hand_is_skipped(monkeypatch, capsys, tmp_path):
    def detached(ifname, name):
        raise NotAttachedError("xdplb is not attached to eth0")
    monkeypatch.setattr(report, "counter", detached)
    server = serve.Server(str(tmp_path / "lb.toml"))
    server.desired = [config.InterfaceConfig(name="eth0")]
    server._watch_snat()
    assert "snat_exhausted" not in capsys.readouterr().err


def test_a_change_made_by_hand_is_logged_before_serve_puts_the_file_back(monkeypatch, capsys, tmp_path):
    """serve owns its interfaces: at its next change it reports each difference between
    what it last applied and what the interface holds, then converges to the file."""
    import ipaddress

    from xdplb.model import Backend, InterfaceConfig, Service
    vip = ipaddress.IPv4Address("10.0.0.2")
    backend = Backend(ipaddress.IPv4Address("10.0.0.11"), 80, 1)
    applied = InterfaceConfig("eth0", snat=[vip], services=[Service(vip, 80, "tcp", [backend])])
    by_hand = InterfaceConfig("eth0", snat=[vip], services=[Service(vip, 80, "tcp", [Backend(backend.addr, 80, 5)])])
    found = type("Found", (), {"dataplane": type("DP", (), {"close": lambda self: None})()})()
    monkeypatch.setattr("xdplb.loader.find", lambda ifname: found)
    monkeypatch.setattr(report, "running_config", lambda ifname, f: by_hand)
    converged = []
    monkeypatch.setattr(control, "reconcile", lambda desired, dry_run, path: converged.append(desired) or [])
    server = serve.Server(str(tmp_path / "lb.toml"))
    server.desired = [applied]
    server.applied = {"eth0": applied}
    server.reconcile()
    lines = [line for line in capsys.readouterr().err.splitlines() if "external_change_overridden" in line]
    assert len(lines) == 1 and "level=warning" in lines[0]
    assert "eth0: service 10.0.0.2:80/tcp: ~ backend 10.0.0.11:80 weight 1 -> 5" in lines[0]
    assert converged and converged[0][0].services == applied.services
    # Nothing was changed by hand since: nothing to report.
    monkeypatch.setattr(report, "running_config", lambda ifname, f: applied)
    server.reconcile()
    assert "external_change_overridden" not in capsys.readouterr().err
