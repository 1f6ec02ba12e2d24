# SPDX-License-Identifier: Apache-2.0
"""`python -m bench [--smoke] [--json] [--only SECTION] [--seconds S]`: runs the benchmarks and
writes docs/benchmarks.md."""
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

from . import controlplane, e2e, live, perpacket, sustained

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "docs" / "benchmarks.md"
RESULTS = ROOT / "bench" / "results"


def code_version() -> str:
    """The commit measured, and whether the code under test (bpf/, src/) differs from it:
    a report is only comparable with another of the same code."""
    git = ["git", "--no-optional-locks", "-C", str(ROOT)]  # no index refresh: others may be using the repo
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--", "bpf", "src"], capture_output=True,
                           text=True).stdout.strip()
    return (head or "unknown") + (" with uncommitted changes to bpf/ or src/" if dirty else "")


def machine() -> dict:
    clang = subprocess.run(["clang", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    from xdplb.libbpf import libbpf
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "kernel": platform.release(), "cpu": cpu, "cpus": os.cpu_count(), "clang": clang,
            "libbpf": libbpf().version, "python": platform.python_version(), "code": code_version()}


def perpacket_table(res: perpacket.Results) -> list[str]:
    lines = [f"repeat = {res.repeat:,} per run, median of {res.runs} runs, pinned to CPU {res.cpu}; "
             "every figure includes the reset harness. A ratio divides by the median of the floor's "
             "runs made in alternation with that case's runs (one before each).", "",
             "| case | median ns | min-max ns | ratio to floor | checked |", "| --- | ---: | ---: | ---: | --- |"]
    for f in res.figures + res.fill:
        lines.append(f"| {f.name} | {f.median:.0f} | {min(f.runs_ns):.0f}-{max(f.runs_ns):.0f} | "
                     f"{f.ratio:.2f}x | {f.checked} |")
    return lines


SECTIONS = ["perpacket", "controlplane", "live", "e2e", "sustained"]  # in the order they run


def _run_sections(args, want: set[str]) -> dict:
    """Runs the sections asked for; returns their results by section name."""
    smoke = args.smoke
    out = {}
    if "perpacket" in want:
        repeat, runs, fills = (1000, 2, [1000]) if smoke else (100_000, 5, [1_000, 100_000, 1_000_000])
        out["perpacket"] = perpacket.run(repeat, runs, fills)
    if "controlplane" in want:
        out["controlplane"] = (controlplane.ring_swaps([10, 100] if smoke else [10, 100, 1000], 2 if smoke else 5)
                               + controlplane.seed_change(16 if smoke else 512, 8, 1 if smoke else 3)
                               + controlplane.flow_scans(1 if smoke else 5, 10_000 if smoke else 1_000_000)
                               + controlplane.end_to_end(1 if smoke else 3))
    if "live" in want:
        out["live"] = live.run(10_000 if smoke else 2_000_000, 1 if smoke else 5)
    if "e2e" in want:
        out["e2e"] = e2e.run(1 if smoke else 5, 1 if smoke else 3)
    if "sustained" in want:
        out["sustained"] = sustained.run(args.seconds or (5 if smoke else 120))
    return out


def _trial(args) -> str | None:
    """None for a run at the standard sizes, which goes into docs/; else the name that
    keeps a smoke or shortened run's files apart in bench/results/."""
    return "smoke" if args.smoke else "trial" if args.seconds is not None else None


def _figure(name: str, trial: str | None) -> Path:
    """Where a section's plot goes: beside the report, or with a trial's results."""
    return RESULTS / f"{trial}-{name}.png" if trial else REPORT.parent / f"benchmarks-{name}.png"


def _data(res: dict) -> dict:
    data = {}
    if "perpacket" in res:
        data["per_packet"] = [f.as_dict() for f in res["perpacket"].figures]
        data["flow_table_fill"] = [f.as_dict() for f in res["perpacket"].fill]
    if "controlplane" in res:
        data["control_plane"] = [t.as_dict() for t in res["controlplane"]]
    if "live" in res:
        data["live_frames"] = [r.as_dict() for r in res["live"]]
    if "e2e" in res:
        data["end_to_end"] = {f"{mode}/{test}": [asdict(s) for s in samples]
                              for (mode, test), samples in res["e2e"].samples.items()}
    if "sustained" in res:
        data["sustained"] = res["sustained"].as_dict()
    return data


HEADINGS = {"perpacket": "## Per-packet cost (BPF_PROG_TEST_RUN)",
            "live": "## Live throughput (BPF_F_TEST_XDP_LIVE_FRAMES into a veth)",
            "e2e": "## End to end in the lab",
            "sustained": "## Sustained new connections (request rate over time)",
            "controlplane": "## Control plane"}  # in the report's order


def _perpacket_lines(pp: perpacket.Results, trial: str | None) -> list[str]:
    return [*perpacket_table(pp), "",
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
            "IPv6 flows live in an LRU hash map (bpf/maps.h, xdplb_flows6): each packet pays the map's "
            "helper call and a hash of its 40-byte key, and each new flow an insertion into the map, "
            "where IPv4's open-addressing table is inlined code. Compare an IPv6 row with the IPv4 row "
            "of the same mode in the same run; the target is 1.1x.", ""]


def _live_lines(rates, trial: str | None) -> list[str]:
    return ["Frames sent out of a veth with XDP_TX by BPF_PROG_TEST_RUN in live-frames mode (batch 64), "
            "counted by an XDP program on the peer; one CPU. Median of the runs.", "",
            "| program | Mpps | min-max | delivered | ratio to floor |", "| --- | ---: | ---: | ---: | ---: |",
            *[f"| {r.name} | {r.median:.2f} | {min(r.mpps):.2f}-{max(r.mpps):.2f} | {r.delivered:.1%} | "
              f"{r.median / rates[0].median:.2f}x |" for r in rates], ""]


def _e2e_lines(ends: e2e.Results, trial: str | None) -> list[str]:
    plotted = e2e.plot(ends, _figure("e2e", trial))
    return [*e2e.table(ends), "", *(["![end-to-end comparison](benchmarks-e2e.png)", ""] if plotted else [])]


def _sustained_lines(res: sustained.Results, trial: str | None) -> list[str]:
    plotted = sustained.plot(res, _figure("sustained", trial))
    return [*sustained.table(res), "",
            *(["![request rate over time, per mode](benchmarks-sustained.png)", ""] if plotted else [])]


def _controlplane_lines(times, trial: str | None) -> list[str]:
    return ["| operation | median ms | min-max ms |", "| --- | ---: | ---: |",
            *[f"| {t.name} | {t.median * 1000:.1f} | {min(t.runs_s) * 1000:.1f}-{max(t.runs_s) * 1000:.1f} |"
              for t in times], ""]


def _sections(res: dict, trial: str | None) -> dict[str, list[str]]:
    """Each section's part of the report, heading first (its plot drawn on the way), in
    the report's order."""
    makers = {"perpacket": _perpacket_lines, "live": _live_lines, "e2e": _e2e_lines,
              "sustained": _sustained_lines, "controlplane": _controlplane_lines}
    return {name: [HEADINGS[name], "", *makers[name](res[name], trial)] for name in HEADINGS if name in res}


def _splice(report: str, section: list[str], later: list[str]) -> str:
    """The report with the section of the same heading replaced by `section`, or, if it
    has none, with `section` inserted before the first of the headings `later` present."""
    lines = report.splitlines()
    if section[0] in lines:
        at = lines.index(section[0])
        end = next((j for j in range(at + 1, len(lines)) if lines[j].startswith("## ")), len(lines))
    else:
        at = end = next((lines.index(h) for h in later if h in lines), len(lines))
    return "\n".join(lines[:at] + section + lines[end:]) + "\n"


def _update_report(parts: dict[str, list[str]], info: dict) -> None:
    """--only: puts the sections run into the existing report, each saying when it was
    measured (the report's header dates the others)."""
    report = REPORT.read_text() if REPORT.exists() else "# xdplb benchmarks\n"
    names = list(HEADINGS)
    for name, (heading, blank, *body) in parts.items():
        note = (f"This section: measured {info['date']}, kernel {info['kernel']}, xdplb {info['code']}, "
                f"with `python -m bench --only {name}`.")
        later = [HEADINGS[n] for n in names[names.index(name) + 1:]]
        report = _splice(report, [heading, blank, note, "", *body], later)
    REPORT.write_text(report)


def _write_json(data: dict, trial: str | None, only: bool) -> None:
    """Raw figures: a full run replaces latest.json, an --only run updates its keys in it."""
    path = RESULTS / f"{trial or 'latest'}.json"
    if only and not trial and path.exists():
        data = json.loads(path.read_text()) | data
    path.write_text(json.dumps(data, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that everything runs")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--only", action="append", choices=SECTIONS, metavar="SECTION",
                        help=f"run only this section (repeatable; one of {', '.join(SECTIONS)}); its part of "
                             "docs/benchmarks.md, its plot and its key in latest.json are replaced, the rest kept")
    parser.add_argument("--seconds", type=int, metavar="S",
                        help="length of each sustained new-connection run [default: 120, 5 with --smoke]; "
                             "a run given this is a trial: its files go to bench/results/trial*, not to docs/")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("the benchmarks need root (BPF_PROG_TEST_RUN, namespaces); run them with sudo")

    info, trial = machine(), _trial(args)
    res = _run_sections(args, set(args.only or SECTIONS))
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = {"machine": info, **_data(res), "smoke": args.smoke}
    _write_json(data, trial, bool(args.only))
    parts = _sections(res, trial)
    lines = ["# xdplb benchmarks", "",
             f"Measured {info['date']} on {info['cpus']} x {info['cpu']}, kernel {info['kernel']}, "
             f"{info['clang']}, libbpf {info['libbpf']}, Python {info['python']}; xdplb {info['code']}.",
             "Command: `make bench` (as root). Raw figures: `bench/results/latest.json`.", "",
             *(line for part in parts.values() for line in part)]
    if not trial:
        REPORT.parent.mkdir(parents=True, exist_ok=True)
        if args.only:
            _update_report(parts, info)
        else:
            REPORT.write_text("\n".join(lines))
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print("\n".join(lines))


if __name__ == "__main__":
    main()
