# SPDX-License-Identifier: Apache-2.0
"""`python -m bench [--smoke] [--json]`: runs the benchmarks and writes docs/benchmarks.md."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from . import controlplane, e2e, live, perpacket

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "docs" / "benchmarks.md"
RESULTS = ROOT / "bench" / "results"


def machine() -> dict:
    clang = subprocess.run(["clang", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    from xdplb.libbpf import libbpf
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "kernel": platform.release(), "cpu": cpu, "cpus": os.cpu_count(), "clang": clang,
            "libbpf": libbpf().version, "python": platform.python_version()}


def perpacket_table(res: perpacket.Results) -> list[str]:
    lines = [f"repeat = {res.repeat:,} per run, median of {res.runs} runs, pinned to CPU {res.cpu}; "
             "every figure includes the reset harness. A ratio divides by the median of the floor's "
             "runs made in alternation with that case's runs (one before each).", "",
             "| case | median ns | min-max ns | ratio to floor | checked |", "| --- | ---: | ---: | ---: | --- |"]
    for f in res.figures + res.fill:
        lines.append(f"| {f.name} | {f.median:.0f} | {min(f.runs_ns):.0f}-{max(f.runs_ns):.0f} | "
                     f"{f.ratio:.2f}x | {f.checked} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that everything runs")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("the benchmarks need root (BPF_PROG_TEST_RUN, namespaces); run them with sudo")

    repeat, runs, fills = (1000, 2, [1000]) if args.smoke else (100_000, 5, [1_000, 100_000, 1_000_000])
    info = machine()
    pp = perpacket.run(repeat, runs, fills)
    rings = controlplane.ring_swaps([10, 100] if args.smoke else [10, 100, 1000], 2 if args.smoke else 5)
    cli = controlplane.end_to_end(1 if args.smoke else 3)
    rates = live.run(10_000 if args.smoke else 2_000_000, 1 if args.smoke else 5)
    ends = e2e.run(1 if args.smoke else 5, 1 if args.smoke else 3)
    RESULTS.mkdir(parents=True, exist_ok=True)
    plotted = e2e.plot(ends, RESULTS / "smoke.png" if args.smoke else REPORT.parent / "benchmarks-e2e.png")
    data = {"machine": info, "per_packet": [f.as_dict() for f in pp.figures],
            "flow_table_fill": [f.as_dict() for f in pp.fill],
            "control_plane": [t.as_dict() for t in rings + cli],
            "live_frames": [r.as_dict() for r in rates],
            "end_to_end": {f"{mode}/{test}": [asdict(s) for s in samples]
                           for (mode, test), samples in ends.samples.items()},
            "smoke": args.smoke}
    (RESULTS / ("smoke.json" if args.smoke else "latest.json")).write_text(json.dumps(data, indent=2))
    lines = ["# xdplb benchmarks", "",
             f"Measured {info['date']} on {info['cpus']} x {info['cpu']}, kernel {info['kernel']}, "
             f"{info['clang']}, libbpf {info['libbpf']}, Python {info['python']}.",
             "Command: `make bench` (as root). Raw figures: `bench/results/latest.json`.", "",
             "## Per-packet cost (BPF_PROG_TEST_RUN)", "", *perpacket_table(pp), "",
             "A new flow's cost depends on where the flow table lives. In a table that fits in the caches "
             "and is full of live flows (so a SYN scans its whole probe window and evicts the least "
             "recently seen flow, as a full LRU map would: the worst case for the probe logic), it is the "
             "cost of the code. In a "
             "table larger than the caches a new flow reads at least one random cache line from memory "
             "(xdplb makes its two reads overlap); the row *floor + one random read* measures that read "
             "alone, in the same run, as a lower bound for any design. This is a shared virtual machine: "
             "a row whose min-max range is far wider than its neighbours' had runs disturbed by another "
             "tenant. Its ratio holds if the floor runs next to them were disturbed alike; its minimum "
             "is the better estimate of the time.", "",
             "## Live throughput (BPF_F_TEST_XDP_LIVE_FRAMES into a veth)", "",
             "Frames sent out of a veth with XDP_TX by BPF_PROG_TEST_RUN in live-frames mode (batch 64), "
             "counted by an XDP program on the peer; one CPU. Median of the runs.", "",
             "| program | Mpps | min-max | delivered | ratio to floor |", "| --- | ---: | ---: | ---: | ---: |",
             *[f"| {r.name} | {r.median:.2f} | {min(r.mpps):.2f}-{max(r.mpps):.2f} | {r.delivered:.1%} | "
               f"{r.median / rates[0].median:.2f}x |" for r in rates], "",
             "## End to end in the lab", "", *e2e.table(ends), "",
             *(["![end-to-end comparison](benchmarks-e2e.png)", ""] if plotted else []),
             "## Control plane", "", "| operation | median ms | min-max ms |", "| --- | ---: | ---: |",
             *[f"| {t.name} | {t.median * 1000:.1f} | {min(t.runs_s) * 1000:.1f}-{max(t.runs_s) * 1000:.1f} |"
               for t in rings + cli], ""]
    if not args.smoke:
        REPORT.parent.mkdir(parents=True, exist_ok=True)
        REPORT.write_text("\n".join(lines))
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print("\n".join(lines))


if __name__ == "__main__":
    main()
