# SPDX-License-Identifier: Apache-2.0
"""serve's log of a SNAT pool that ran dry: one line per growth of the counter, with
the remedy, and nothing while it stays put."""
from __future__ import annotations

from xdplb import config, control, serve
from xdplb.errors import NotAttachedError


def test_a_dry_snat_pool_is_logged_when_its_counter_grows(monkeypatch, capsys, tmp_path):
    readings = iter([4, 4, 9, 9])
    monkeypatch.setattr(control, "counter", lambda ifname, name: next(readings))
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
    monkeypatch.setattr(control, "counter", detached)
    server = serve.Server(str(tmp_path / "lb.toml"))
    server.desired = [config.InterfaceConfig(name="eth0")]
    server._watch_snat()
    assert "snat_exhausted" not in capsys.readouterr().err
