# SPDX-License-Identifier: Apache-2.0
"""`xdplb demo`: the conference demo, end to end, on the built-in lab.

It types the same commands a user would (printed with a `$`), sends HTTP requests from
the client namespace through the VIP, counts which backend answered each, shows a few
decoded trace lines, and removes everything again.
"""
from __future__ import annotations

import collections
import http.client
import subprocess
import sys
import time

import click

from . import lab
from .namespaces import run_in_netns

REQUESTS = 200


def _run(args: list[str], capture: bool = False) -> str:
    cmd = [sys.executable, "-m", "xdplb", *args]
    click.echo(click.style("$ xdplb " + " ".join(args), bold=True))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise click.ClickException(f"xdplb {' '.join(args)} failed: {proc.stderr.strip()}")
    if not capture:
        click.echo(proc.stdout.rstrip())
    return proc.stdout


def fetch(vip: str, port: int, count: int) -> collections.Counter:
    """count requests, one new connection each; returns answers per (backend, the client
    address the backend saw)."""
    def work():
        seen: collections.Counter = collections.Counter()
        for _ in range(count):
            conn = http.client.HTTPConnection(vip, port, timeout=5)
            conn.request("GET", "/")
            resp = conn.getresponse()
            seen[(resp.getheader("X-Backend") or "?", resp.getheader("X-Client") or "?")] += 1
            resp.read()
            conn.close()
        return seen
    return run_in_netns(f"{lab.DEFAULT_PREFIX}-client", work)


def _send(vip: str, shown: str) -> None:
    click.echo(f"\nsending {REQUESTS} HTTP requests from {lab.DEFAULT_PREFIX}-client to "
               f"http://{shown}/ (a new connection each)")
    start = time.monotonic()
    seen = fetch(vip, lab.HTTP_PORT, REQUESTS)
    elapsed = time.monotonic() - start
    for (name, client), n in sorted(seen.items()):
        click.echo(f"  {name}: {n} requests (it saw them come from {client})")
    click.echo(f"  {sum(seen.values())}/{REQUESTS} answered in {elapsed:.1f}s\n")


def run_demo(backends: int = lab.DEFAULT_BACKENDS, forward: str = "nat") -> None:
    lb_ns = f"{lab.DEFAULT_PREFIX}-lb"
    hosts = [h for h in lab.hosts(lab.DEFAULT_PREFIX, backends, 1) if h.role == "backend"]
    addresses = [h.address for h in hosts]
    try:
        _run(["lab", "up", "--backends", str(backends), "--forward", forward])
        vip = str(lab.LB_ADDR if forward == "nat" else lab.BYPASS_VIP)
        _run(["-n", lb_ns, "attach", "eth0", "--mode", "native", "--backends", ",".join(addresses),
              "--flows", "65536", "--forward", forward, "--vip", vip])
        _send(vip, vip)

        # IPv6 beside it, on the same interface: a dsr service (the backends hold its VIP on lo).
        vip6 = str(lab.BYPASS_VIP6)
        service6 = f"[{vip6}]:{lab.HTTP_PORT}/tcp"
        click.echo()
        _run(["-n", lb_ns, "service", "add", "eth0", service6, "--forward", "dsr"])
        for host in hosts:
            _run(["-n", lb_ns, "backend", "add", "eth0", service6, host.address6])
        _send(vip6, f"[{vip6}]")

        click.echo(click.style(f"$ xdplb -n {lb_ns} trace eth0   # while the client sends 2 requests",
                               bold=True))
        tracer = subprocess.Popen([sys.executable, "-m", "xdplb", "-n", lb_ns, "trace", "eth0",
                                   "--duration", "3"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                  text=True)
        time.sleep(1.0)
        fetch(vip, lab.HTTP_PORT, 2)
        out, _ = tracer.communicate(timeout=10)
        lines = out.splitlines()
        for line in lines[:8]:
            click.echo("  " + line)
        if len(lines) > 8:
            click.echo(f"  ... {len(lines) - 8} more")
        click.echo()
        _run(["-n", lb_ns, "status"])
    finally:
        _clean_up(lb_ns)


def _clean_up(lb_ns: str) -> None:
    """Detaches and removes the lab even when a step failed or the output is gone (a
    closed pipe, as in `xdplb demo | head`): then each command runs without its echo."""
    for args in (["-n", lb_ns, "detach", "eth0"], ["lab", "down"]):
        try:
            _run(args)
        except (click.ClickException, OSError):  # a closed stdout raises BrokenPipeError
            subprocess.run([sys.executable, "-m", "xdplb", *args], capture_output=True)
