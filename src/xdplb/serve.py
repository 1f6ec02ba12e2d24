# SPDX-License-Identifier: Apache-2.0
"""`xdplb serve CONFIG.toml`: the long-running control plane.

It applies the config, health-checks every backend (a failed backend leaves the ring
and its flows are reset, so its clients get a TCP reset at once instead of a timeout),
serves Prometheus metrics, reloads on SIGHUP (a bad file is refused and the running
state kept) and exits on SIGTERM leaving the data plane forwarding. Everything it
knows is in the maps, so a restart picks up where the last one stopped.
"""
from __future__ import annotations

import copy
import datetime
import queue
import signal
import sys
import threading
import time

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from . import config, control, loader
from .errors import NotAttachedError, XdplbError
from .health import Checker

METRICS_DEFAULT = "127.0.0.1:9433"
# How often the backends' next hops are compared with the kernel's neighbour table (a
# netlink dump): a backend rebuilt with a new MAC is followed within this time.
NEXT_HOP_REFRESH_S = 2.0


def log(event: str, level: str = "info", **fields) -> None:
    """One logfmt line per event on stderr."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    parts = [f"time={now}", f"level={level}", f"event={event}"]
    for key, value in fields.items():
        text = str(value)
        parts.append(f'{key}="{text}"' if (" " in text or "=" in text or not text) else f"{key}={text}")
    print(" ".join(parts), file=sys.stderr, flush=True)


class Metrics:
    """A Prometheus collector that reads the maps at scrape time."""

    def __init__(self, server: "Server"):
        self.server = server
        self.registry = CollectorRegistry()
        self.check_seconds = Histogram("xdplb_health_check_duration_seconds", "Duration of health checks",
                                       ["interface", "service", "backend", "result"], registry=self.registry,
                                       buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
        self.registry.register(self)

    def collect(self):
        fam = {
            "svc_packets": CounterMetricFamily("xdplb_service_packets", "Packets of a service, both directions",
                                               labels=["interface", "service"]),
            "svc_bytes": CounterMetricFamily("xdplb_service_bytes", "Bytes of a service, both directions",
                                             labels=["interface", "service"]),
            "svc_flows": CounterMetricFamily("xdplb_service_flows", "Flows created for a service",
                                             labels=["interface", "service"]),
            "svc_active": GaugeMetricFamily("xdplb_service_active_flows", "Live flows of a service",
                                            labels=["interface", "service"]),
            "be_packets": CounterMetricFamily("xdplb_backend_packets", "Packets of a backend, both directions",
                                              labels=["interface", "service", "backend"]),
            "be_bytes": CounterMetricFamily("xdplb_backend_bytes", "Bytes of a backend, both directions",
                                            labels=["interface", "service", "backend"]),
            "be_flows": CounterMetricFamily("xdplb_backend_flows", "Flows sent to a backend",
                                            labels=["interface", "service", "backend"]),
            "be_active": GaugeMetricFamily("xdplb_backend_active_flows", "Live flows of a backend",
                                           labels=["interface", "service", "backend"]),
            "be_weight": GaugeMetricFamily("xdplb_backend_weight", "Weight in the ring (0 while down or drained)",
                                           labels=["interface", "service", "backend"]),
            "be_up": GaugeMetricFamily("xdplb_backend_up", "Health: 1 up, 0 down",
                                       labels=["interface", "service", "backend"]),
            "packets": CounterMetricFamily("xdplb_packets", "Packets by action or reason",
                                           labels=["interface", "reason"]),
            "snat_exhausted": CounterMetricFamily("xdplb_snat_exhausted", "SYNs dropped: no free SNAT source",
                                                  labels=["interface"]),
            "snat_in_use": GaugeMetricFamily("xdplb_snat_ports_in_use",
                                             "SNAT sources held by open flows, per SNAT address and backend",
                                             labels=["interface", "snat", "backend"]),
            "snat_time_wait": GaugeMetricFamily("xdplb_snat_ports_time_wait",
                                                "SNAT sources of closed flows (reusable by a newer SYN)",
                                                labels=["interface", "snat", "backend"]),
            "snat_capacity": GaugeMetricFamily("xdplb_snat_ports_capacity", "SNAT ports per SNAT address",
                                               labels=["interface"]),
        }
        for entry in self.server.snapshot():
            ifname = entry["interface"]
            for s in entry["services"]:
                name = f"{s['vip']}:{s['port']}/{s['proto']}"
                fam["svc_packets"].add_metric([ifname, name], s["packets"])
                fam["svc_bytes"].add_metric([ifname, name], s["bytes"])
                fam["svc_flows"].add_metric([ifname, name], s["new_flows"])
                fam["svc_active"].add_metric([ifname, name], s["active_flows"])
                for b in s["backends"]:
                    labels = [ifname, name, f"{b['address']}:{b['port']}"]
                    fam["be_packets"].add_metric(labels, b["packets"])
                    fam["be_bytes"].add_metric(labels, b["bytes"])
                    fam["be_flows"].add_metric(labels, b["new_flows"])
                    fam["be_active"].add_metric(labels, b["active_flows"])
                    fam["be_weight"].add_metric(labels, b["weight"])
                    fam["be_up"].add_metric(labels, 1 if self.server.checker.is_up((ifname, name, labels[2])) else 0)
            for reason, value in entry["counters"].items():
                fam["packets"].add_metric([ifname, reason], value)
            fam["snat_exhausted"].add_metric([ifname], entry["counters"].get("snat_exhausted", 0))
            snat = entry.get("snat", {}).get("ports", "0-0").split("-")
            fam["snat_capacity"].add_metric([ifname], int(snat[1]) - int(snat[0]) + 1)
            for use in entry.get("snat_sources", []):
                fam["snat_in_use"].add_metric([ifname, use["snat"], use["backend"]], use["open"])
                fam["snat_time_wait"].add_metric([ifname, use["snat"], use["backend"]], use["time_wait"])
        yield from fam.values()


class Server:
    def __init__(self, path: str, metrics: str = METRICS_DEFAULT, detach_on_exit: bool = False):
        self.path = path
        self.metrics_addr = metrics
        self.detach_on_exit = detach_on_exit
        self.events: queue.Queue = queue.Queue()
        self.desired: list[config.InterfaceConfig] = []
        self.metrics = Metrics(self)
        self.checker = Checker(self._on_health, self._observe)
        self.lock = threading.Lock()  # maps are changed by one thread at a time
        self.snat_exhausted: dict[str, int] = {}  # interface -> counter value last logged

    # ---- state ---------------------------------------------------------------------
    def _read(self) -> list[config.InterfaceConfig]:
        desired, problems = config.check(config.read(self.path))
        if problems:
            raise config.ConfigError(self.path, problems)
        return desired

    def effective(self) -> list[config.InterfaceConfig]:
        """The config with every backend that is down given weight 0."""
        out = copy.deepcopy(self.desired)
        for iface in out:
            for svc in iface.services:
                svc.backends = [type(b)(b.addr, b.port, b.weight if self.checker.is_up((iface.name, svc.name, b.endpoint))
                                        else 0) for b in svc.backends]
        return out

    def reconcile(self) -> None:
        with self.lock:
            for line in control.reconcile(self.effective(), False, self.path):
                log("change", detail=line)

    def targets(self) -> dict:
        out = {}
        for iface in self.desired:
            for svc in iface.services:
                spec = iface.health.get(svc.name)
                if spec is None:
                    continue
                for b in svc.backends:
                    out[(iface.name, svc.name, b.endpoint)] = (spec, str(b.addr), b.port)
        return out

    def snapshot(self) -> list[dict]:
        with self.lock:
            names = [iface.name for iface in self.desired]
            return [e for e in control.stats(None) if e["interface"] in names]

    # ---- events --------------------------------------------------------------------
    def _on_health(self, key, up: bool, reason: str) -> None:
        self.events.put(("health", key, up, reason))

    def _observe(self, key, seconds: float, ok: bool) -> None:
        ifname, service, backend = key
        self.metrics.check_seconds.labels(ifname, service, backend, "ok" if ok else "fail").observe(seconds)

    def _health_changed(self, key, up: bool, reason: str) -> None:
        ifname, service, backend = key
        log("backend_up" if up else "backend_down", level="info" if up else "warning",
            interface=ifname, service=service, backend=backend, reason=reason)
        self.reconcile()
        if not up:
            with self.lock:
                found = loader.find(ifname)
                if found is None:
                    return
                try:
                    dp = found.dataplane
                    svc_id = dp.service_ids().get(service)
                    be_id = dp.backend_ids().get((svc_id, backend))
                    if be_id is not None:
                        reset = dp.reset_flows(be_id)
                        log("flows_reset", interface=ifname, service=service, backend=backend, flows=reset)
                finally:
                    found.dataplane.close()

    def _reload(self) -> None:
        try:
            desired = self._read()
        except XdplbError as exc:
            log("reload_failed", level="error", reason=str(exc).replace("\n", " "))
            return
        previous = self.desired
        self.desired = desired
        self.checker.set_targets(self.targets())
        try:
            self.reconcile()
        except XdplbError as exc:
            self.desired = previous
            self.checker.set_targets(self.targets())
            log("reload_failed", level="error", reason=str(exc).replace("\n", " "))
            return
        log("reloaded", path=self.path)

    def _refresh_next_hops(self) -> None:
        with self.lock:
            for iface in self.desired:
                try:
                    lines = control.refresh_next_hops(iface.name)
                except NotAttachedError:
                    continue  # detached by hand: nothing to follow
                for line in lines:
                    log("next_hop_changed", detail=line)

    def _watch_snat(self) -> None:
        """Logs, once per refresh at most, SYNs dropped because a SNAT pool ran dry."""
        with self.lock:
            for iface in self.desired:
                try:
                    dropped = control.counter(iface.name, "snat_exhausted")
                except NotAttachedError:
                    continue
                seen = self.snat_exhausted.setdefault(iface.name, dropped)
                if dropped > seen:
                    log("snat_exhausted", level="warning", interface=iface.name, dropped=dropped - seen,
                        remedy=control.SNAT_EXHAUSTED_REMEDY)
                    self.snat_exhausted[iface.name] = dropped

    def _upgrade_running(self) -> None:
        for iface in self.desired:
            found = loader.find(iface.name)
            if found is None:
                continue
            try:
                old, new, _ = loader.upgrade(found)
                log("upgraded", interface=iface.name, old_program=old, new_program=new)
            finally:
                found.dataplane.close()

    # ---- main loop -----------------------------------------------------------------
    def run(self) -> None:
        loader.ensure_root()
        self.desired = self._read()
        self._upgrade_running()
        self.reconcile()
        host, _, port = self.metrics_addr.rpartition(":")
        start_http_server(int(port), addr=host or "127.0.0.1", registry=self.metrics.registry)
        self.checker.set_targets(self.targets())
        log("started", path=self.path, metrics=self.metrics_addr,
            interfaces=",".join(i.name for i in self.desired))
        signal.signal(signal.SIGHUP, lambda *_: self.events.put(("reload",)))
        signal.signal(signal.SIGTERM, lambda *_: self.events.put(("stop",)))
        signal.signal(signal.SIGINT, lambda *_: self.events.put(("stop",)))
        refresh_at = time.monotonic() + NEXT_HOP_REFRESH_S
        while True:
            try:
                event = self.events.get(timeout=max(0.0, refresh_at - time.monotonic()))
            except queue.Empty:
                event = ("refresh",)
            try:
                if event[0] == "stop":
                    break
                if event[0] == "reload":
                    self._reload()
                elif event[0] == "health":
                    self._health_changed(*event[1:])
                elif event[0] == "refresh":
                    refresh_at = time.monotonic() + NEXT_HOP_REFRESH_S
                    self._refresh_next_hops()
                    self._watch_snat()
            except XdplbError as exc:
                log("error", level="error", reason=str(exc).replace("\n", " "))
        self.checker.stop()
        if self.detach_on_exit:
            for iface in self.desired:
                try:
                    log("detached", interface=iface.name, detail=control.detach(iface.name))
                except XdplbError as exc:
                    log("error", level="error", reason=str(exc))
        log("stopped", forwarding="no" if self.detach_on_exit else "yes")


