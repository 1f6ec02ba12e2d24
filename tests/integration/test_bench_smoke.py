# SPDX-License-Identifier: Apache-2.0
"""`make bench-smoke`: every benchmark section runs (tiny sizes). Benchmarks are never
run as tests; this only checks that `make bench` would work on this machine."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

from tests.conftest import require
from xdplb import build


def test_bench_smoke_runs_every_section(bpf_object):
    for tool in ("wrk", "iperf3", "nginx", "haproxy", "nft"):
        require(shutil.which(tool) is not None, f"needs {tool} (make bench-deps)")
    proc = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--json"], cwd=build.ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(proc.stdout[proc.stdout.index("{"):])
    names = [f["name"] for f in data["per_packet"]]
    assert any("floor" in n for n in names) and any("new flow" in n for n in names)
    assert all(f["checked"] for f in data["per_packet"])
    assert all(0.99 <= r["delivered"] <= 1.01 for r in data["live_frames"]), data["live_frames"]
    for mode in ("dsr", "ipip"):
        assert any(n.endswith(f"), {mode}") for n in names) and any(f"{mode}, table" in n for n in names)
    assert [r["name"].split("established flow, ", 1)[-1] for r in data["live_frames"][1:]] == [
        "nat", "dsr", "ipip", "dsr, IPv6", "ipip, IPv6"]
    assert {k.split("/")[0] for k in data["end_to_end"]} == {"direct", "xdplb", "xdplb-dsr", "xdplb-ipip",
                                                              "direct-ipv6", "xdplb-dsr-ipv6", "nftables", "haproxy"}
    assert all(s[0]["value"] > 0 for s in data["end_to_end"].values())
    assert any(t["name"].startswith("seed change") for t in data["control_plane"])
    assert any(t["name"].startswith("active-flow count") for t in data["control_plane"])
    runs = data["sustained"]["runs"]
    assert [r["mode"] for r in runs] == ["direct", "xdplb", "xdplb-dsr", "nftables"]
    assert all(len(r["per_second"]) == data["sustained"]["seconds"] and r["mean_rps"] > 0 for r in runs), runs
    assert all("TcpExtTCPSynRetrans" in r["client_tcp"] for r in runs)
    assert "new_flow" in runs[1]["counters"] and runs[2]["counters"]["new_flow"] > 0
