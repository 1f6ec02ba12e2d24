# SPDX-License-Identifier: Apache-2.0
"""The SNAT cursor memo: what a detach leaves for the next attach."""
from __future__ import annotations

import ipaddress

import pytest

from xdplb import snatmemo

BACKEND = ipaddress.IPv4Address("10.0.0.11")


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_recall_gives_back_what_was_remembered_until_the_horizon(tmp_path):
    clock = Clock()
    memo = snatmemo.Memo(tmp_path / "m.json", clock)
    k = snatmemo.key(10000, 32767, BACKEND, 80, "tcp")
    assert k == "10000-32767>10.0.0.11:80/tcp"
    assert memo.recall(k) is None
    memo.remember({k: 12345})
    clock.t += snatmemo.HORIZON_S - 1
    assert memo.recall(k) == 12345
    assert memo.recall(snatmemo.key(10000, 32767, BACKEND, 80, "udp")) is None
    assert memo.recall(snatmemo.key(5000, 5999, BACKEND, 80, "tcp")) is None
    clock.t += 2
    assert memo.recall(k) is None


def test_old_entries_are_pruned_and_new_ones_kept(tmp_path):
    clock = Clock()
    memo = snatmemo.Memo(tmp_path / "m.json", clock)
    memo.remember({"old": 10000})
    clock.t += snatmemo.HORIZON_S + 1
    memo.remember({"new": 20000})
    assert "old" not in (tmp_path / "m.json").read_text()
    assert memo.recall("new") == 20000
    memo.remember({"new": 20001})
    assert memo.recall("new") == 20001


def test_a_damaged_or_missing_file_means_no_memory(tmp_path):
    path = tmp_path / "sub" / "m.json"
    memo = snatmemo.Memo(path, Clock())
    assert memo.recall("k") is None
    path.parent.mkdir()
    for text in ("{not json", "[1, 2]", '{"k": 5}', '{"k": {"port": "x", "at": 1000}}',
                 '{"k": {"port": 70000, "at": 1000}}', '{"k": {"port": 10001, "at": "x"}}'):
        path.write_text(text)
        assert memo.recall("k") is None
    memo.remember({"k": 10001})  # and a damaged file does not stop a new note
    assert memo.recall("k") == 10001


def test_a_clock_that_went_back_means_no_memory(tmp_path):
    """CLOCK_BOOTTIME restarts at boot, and so does /run; a note from the future is not
    to be trusted."""
    clock = Clock(5000.0)
    memo = snatmemo.Memo(tmp_path / "m.json", clock)
    memo.remember({"k": 10001})
    clock.t = 10.0
    assert memo.recall("k") is None


def sources(cursor: int, addrs: int, lo: int, hi: int, n: int) -> list[tuple[int, int]]:
    """(address index, port) the data plane's next_snat_source hands out from cursor."""
    return [((c % addrs), lo + (c // addrs) % (hi - lo + 1)) for c in range(cursor, cursor + n)]


@pytest.mark.parametrize("addrs", [1, 2, 3, 16])
def test_a_cursor_restarted_at_the_noted_port_reuses_no_source(addrs):
    """Wherever the old cursor stopped (even partway through a port's turn), the new
    one's sources come after every source the old one handed out, for every address."""
    lo, hi = 10000, 10099
    for start in range(0, 3 * addrs * 7, 7):
        for used in (0, 1, addrs - 1, addrs, 5 * addrs + 1):
            old = sources(start, addrs, lo, hi, used)
            port = snatmemo.next_port(start + used, addrs, lo, hi)
            new = sources(snatmemo.cursor_at(port, addrs, lo), addrs, lo, hi, 20 * addrs)
            assert not set(old) & set(new)
            assert new[0] == (0, port)
    # A different pool size after the restart still starts on the noted port.
    assert sources(snatmemo.cursor_at(10050, 4, lo), 4, lo, hi, 1) == [(0, 10050)]
    assert snatmemo.next_port(2 * 100 * 3 - 1, 2, lo, hi) == lo  # wraps round the range
