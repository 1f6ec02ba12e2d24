# SPDX-License-Identifier: Apache-2.0
"""`xdplb demo` (what `make demo` runs) leaves nothing behind, even when its reader goes
away half-way (`xdplb demo | head`)."""
from __future__ import annotations

import subprocess
import sys

from xdplb import lab, netlink

from .conftest import xdplb


def _demo_namespaces() -> list[str]:
    return [n for n in netlink.netns_names() if n.startswith(f"{lab.DEFAULT_PREFIX}-")
            and not n.startswith("xdplb-t")]


def test_demo_cleans_up_after_a_reader_that_left(testlab):
    assert not _demo_namespaces(), "a lab with the demo's names exists already"
    proc = subprocess.Popen([sys.executable, "-m", "xdplb", "demo"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    left = ["not run"]
    try:
        first = proc.stdout.readline()
        proc.stdout.close()  # the reader leaves: every later echo meets a closed pipe
        proc.wait(timeout=120)
        left = _demo_namespaces()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if _demo_namespaces():  # the test's own cleanup, after what the demo left was noted
            xdplb("lab", "down", check=False)
    assert first.startswith(b"$ xdplb lab up")
    assert left == []


def test_the_demo_balances_both_families_and_leaves_nothing(testlab):
    assert not _demo_namespaces(), "a lab with the demo's names exists already"
    try:
        proc = subprocess.run([sys.executable, "-m", "xdplb", "demo"], capture_output=True, text=True, timeout=300)
    finally:
        left = _demo_namespaces()
        if left:
            xdplb("lab", "down", check=False)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    v6 = f"http://[{lab.BYPASS_VIP6}]/"
    assert f"http://{lab.LB_ADDR}/" in out and v6 in out
    assert out.count("200/200 answered") == 2, out
    client6 = next(h for h in lab.hosts(lab.DEFAULT_PREFIX, 2, 1) if h.role == "client").address6
    v6_part = out.split(v6)[1]
    for name in ("backend-a", "backend-b"):
        assert f"{name}: " in v6_part and f"it saw them come from {client6})" in v6_part, out
    assert left == []
