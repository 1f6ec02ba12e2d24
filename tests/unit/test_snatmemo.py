# SPDX-License-Identifier: Apache-2.0
"""The SNAT cursor memo: what a detach leaves for the next attach."""
from __future__ import annotations

import ipaddress

from xdplb import snatmemo

SNAT = ipaddress.IPv4Address("10.0.0.2")
BACKEND = ipaddress.IPv4Address("10.0.0.11")


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_recall_gives_back_what_was_remembered_until_the_horizon(tmp_path):
    clock = Clock()
    memo = snatmemo.Memo(tmp_path / "m.json", clock)
    k = snatmemo.key([SNAT], 10000, 32767, BACKEND, 80, "tcp")
    assert k == "10.0.0.2:10000-32767>10.0.0.11:80/tcp"
    pool = snatmemo.key([SNAT, ipaddress.IPv4Address("10.0.0.3")], 10000, 32767, BACKEND, 80, "tcp")
    assert pool == "10.0.0.2,10.0.0.3:10000-32767>10.0.0.11:80/tcp"
    assert memo.recall(k) is None
    memo.remember({k: 12345})
    clock.t += snatmemo.HORIZON_S - 1
    assert memo.recall(k) == 12345
    assert memo.recall(snatmemo.key([SNAT], 10000, 32767, BACKEND, 80, "udp")) is None
    assert memo.recall(snatmemo.key([SNAT], 5000, 5999, BACKEND, 80, "tcp")) is None
    assert memo.recall(pool) is None
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
    for text in ("{not json", "[1, 2]", '{"k": 5}', '{"k": {"place": "x", "at": 1000}}',
                 '{"k": {"place": -1, "at": 1000}}', '{"k": {"place": 3, "at": "x"}}'):
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
