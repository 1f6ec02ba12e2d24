# SPDX-License-Identifier: Apache-2.0
"""The control plane's view of the data plane's clock (a BPF program, so root)."""
from __future__ import annotations

import time

from xdplb import clock


def test_clock_ticks_advance_with_the_kernel():
    jiffy = clock.jiffy_ns()
    before = clock.now_ticks(0)
    time.sleep(5 * jiffy / 1e9)
    assert clock.ticks_since(clock.now_ticks(0), before) >= 4

