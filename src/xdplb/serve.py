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
import ipaddress
import queue
import re
import signal
import threading
import time
import traceback

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, Info, PlatformCollector,
                               ProcessCollector, start_http_server)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from . import config, control, model, report
from .errors import NotAttachedError, UsageError, XdplbError
from .health import Checker
from .logs import log
from .sdnotify import Notifier

METRICS_DEFAULT = "127.0.0.1:9433"
# How often the backends' next hops are compared with the kernel's neighbour table (a
# netlink dump): a backend rebuilt with a new MAC is followed within this time.
NEXT_HOP_REFRESH_S = 2.0
# A check that keeps raising the same error is logged again only after this long (it is
# counted every time), so a short interval does not flood the log.
CHECK_ERROR_LOG_EVERY_S = 60.0
_HOST_NAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*")


def parse_metrics_address(text: str) -> tuple[str, int]:
    """--metrics HOST:PORT -> (host to bind, port). HOST is an IPv4 address, [IPv6], a
    host name, or empty for 127.0.0.1."""
    host, sep, port = text.rpartition(":")
    hint = f"like {METRICS_DEFAULT}, [::1]:9433 or localhost:9433"
    if not sep:
        raise UsageError(f"bad --metrics {text!r}: give HOST:PORT, {hint}")
    if not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        raise UsageError(f"bad --metrics {text!r}: the port must be a number from 1 to 65535, {hint}")
    if host.startswith("[") and host.endswith("]"):
        try:
            return str(ipaddress.IPv6Address(host[1:-1])), int(port)
        except ValueError:
            raise UsageError(f"bad --metrics {text!r}: {host} is not an IPv6 address; give HOST:PORT, {hint}") \
                from None
    if ":" in host:
        raise UsageError(f"bad --metrics {text!r}: put an IPv6 address in brackets, as [{host}]:{port}")
    if not host:
        return "127.0.0.1", int(port)
    try:
        return str(ipaddress.IPv4Address(host)), int(port)
    except ValueError:
        pass
    # A name made of numbers would be read as a shorthand address ("127.1").
    if not _HOST_NAME.fullmatch(host) or model.looks_numeric(host):
        raise UsageError(f"bad --metrics {text!r}: {host!r} is neither an IPv4 address in full (four decimal "
                         f"numbers) nor a host name; give HOST:PORT, {hint}")
    return host, int(port)


def _unexpected(exc: BaseException) -> dict:
    """Log fields for an error that is a bug of ours: what and where, on one line."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}" if frames else "?"
    return {"reason": f"unexpected {type(exc).__name__}: {exc}".replace("\n", " "), "at": where}


# The data plane's counters (abi.Counter) split so that sums mean something: the actions
# sum to every packet; a reason says why, beside its action; flow events are not packets.
COUNTER_KINDS = {**{name: "actions" for name in ("pass", "tx", "redirect", "drop")},
                 **{name: "flow_events" for name in ("new_flow", "evicted", "snat_reused", "recovered")}}


# A service's metrics carry its name and, for selecting and grouping, its parts.
SERVICE_LABELS = ["interface", "service", "vip", "port", "proto"]
BACKEND_LABELS = SERVICE_LABELS + ["backend"]


class Metrics:
    """A Prometheus collector that reads the maps at scrape time. docs/metrics.md lists
    every metric."""

    def __init__(self, server: "Server"):
        self.server = server
        self.registry = CollectorRegistry()
        self.check_seconds = Histogram("xdplb_health_check_duration_seconds", "Duration of health checks",
                                       ["interface", "service", "backend", "result"], registry=self.registry,
                                       buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
        self.check_errors = Counter("xdplb_health_check_errors", "Health checks that raised an unexpected "
                                    "error (a bug: see the log), counted neither up nor down",
                                    ["interface", "service", "backend"], registry=self.registry)
        self.errors = Counter("xdplb_serve_errors", "Unexpected errors (bugs: see the log) while handling an "
                              "event; serve carried on", ["during"], registry=self.registry)
        self.reloads = Counter("xdplb_reloads", "Reloads of the file (SIGHUP): applied, or failed and refused",
                               ["result"], registry=self.registry)
        for result in ("applied", "failed"):
            self.reloads.labels(result)
        self.last_reload = Gauge("xdplb_last_reload_timestamp_seconds", "When the file was last applied by a "
                                 "reload (0: never)", registry=self.registry)
        self.build_info = Info("xdplb_build", "Versions of this xdplb", registry=self.registry)
        self.build_info.info({k: v for k, v in report.versions().items() if k in ("version", "abi", "libbpf",
                                                                                      "kernel")})
        ProcessCollector(registry=self.registry)  # process_cpu_seconds_total, process_resident_memory_bytes...
        PlatformCollector(registry=self.registry)
        self.registry.register(self)

    def collect(self):
        fam = {
            "svc_packets": CounterMetricFamily("xdplb_service_packets", "Packets of a service, both directions",
                                               labels=SERVICE_LABELS),
            "svc_bytes": CounterMetricFamily("xdplb_service_bytes", "Bytes of a service, both directions",
                                             labels=SERVICE_LABELS),
            "svc_flows": CounterMetricFamily("xdplb_service_flows", "Flows created for a service",
                                             labels=SERVICE_LABELS),
            "svc_active": GaugeMetricFamily("xdplb_service_active_flows", "Live flows of a service",
                                            labels=SERVICE_LABELS),
            "be_packets": CounterMetricFamily("xdplb_backend_packets", "Packets of a backend, both directions",
                                              labels=BACKEND_LABELS),
            "be_bytes": CounterMetricFamily("xdplb_backend_bytes", "Bytes of a backend, both directions",
                                            labels=BACKEND_LABELS),
            "be_flows": CounterMetricFamily("xdplb_backend_flows", "Flows sent to a backend",
                                            labels=BACKEND_LABELS),
            "be_active": GaugeMetricFamily("xdplb_backend_active_flows", "Live flows of a backend",
                                           labels=BACKEND_LABELS),
            "be_weight": GaugeMetricFamily("xdplb_backend_weight", "Weight in the ring (0 while down or drained)",
                                           labels=BACKEND_LABELS),
            "be_up": GaugeMetricFamily("xdplb_backend_up", "Health: 1 up, 0 down",
                                       labels=BACKEND_LABELS),
            "actions": CounterMetricFamily("xdplb_actions", "Packets by what was done with them (they sum to "
                                           "every packet seen)", labels=["interface", "action"]),
            "reasons": CounterMetricFamily("xdplb_packet_reasons", "Packets by why (each also counted under "
                                           "its action)", labels=["interface", "reason"]),
            "flow_events": CounterMetricFamily("xdplb_flow_events", "Flows created, evicted, recovered; SNAT "
                                               "sources reused", labels=["interface", "event"]),
            "flow_entries": GaugeMetricFamily("xdplb_flow_table_entries", "Entries in the flow table, expired ones "
                                              "included (full NAT: two per flow)", labels=["interface"]),
            "flow_capacity": GaugeMetricFamily("xdplb_flow_table_capacity", "Flows the table is sized for",
                                               labels=["interface"]),
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
                svc = [ifname, s["name"], s["vip"], str(s["port"]), s["proto"]]
                fam["svc_packets"].add_metric(svc, s["packets"])
                fam["svc_bytes"].add_metric(svc, s["bytes"])
                fam["svc_flows"].add_metric(svc, s["new_flows"])
                fam["svc_active"].add_metric(svc, s["active_flows"])
                for b in s["backends"]:
                    endpoint = b["endpoint"]
                    labels = svc + [endpoint]
                    fam["be_packets"].add_metric(labels, b["packets"])
                    fam["be_bytes"].add_metric(labels, b["bytes"])
                    fam["be_flows"].add_metric(labels, b["new_flows"])
                    fam["be_active"].add_metric(labels, b["active_flows"])
                    fam["be_weight"].add_metric(labels, b["weight"])
                    fam["be_up"].add_metric(labels, 1 if self.server.checker.is_up((ifname, s["name"], endpoint)) else 0)
            for name, value in entry["counters"].items():
                kind = COUNTER_KINDS.get(name, "reasons")
                fam[kind].add_metric([ifname, name], value)
            fam["flow_entries"].add_metric([ifname], entry["flow_table"]["entries"])
            fam["flow_capacity"].add_metric([ifname], entry["flow_table"]["capacity"])
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
        self.metrics_bind = parse_metrics_address(metrics)
        self.detach_on_exit = detach_on_exit
        self.events: queue.Queue = queue.Queue()
        self.desired: list[config.InterfaceConfig] = []
        self.metrics = Metrics(self)
        self.checker = Checker(self._on_health, self._observe, self._check_failed)
        self.check_errors_logged: dict[tuple, tuple[float, str]] = {}  # target -> (when, reason) last logged
        self.lock = threading.Lock()  # maps are changed by one thread at a time
        self.snat_exhausted: dict[str, int] = {}  # interface -> counter value last logged
        self.applied: dict[str, config.InterfaceConfig] = {}  # interface -> the state last made to hold
        self.readers = report.Readers()  # scrapes' attachments, kept open between scrapes
        self.systemd = Notifier()

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
        """Makes every interface match the file (with health applied). serve owns the
        interfaces in its file: a change made meanwhile by hand (xdplb backend ...) is
        logged as overridden and undone, so the file stays the one truth."""
        with self.lock:
            effective = self.effective()
            for iface in effective:
                for line in report.drift(iface.name, self.applied.get(iface.name)):
                    log("external_change_overridden", level="warning", detail=line)
            for line in control.reconcile(effective, False, self.path):
                log("change", detail=line)
            self.applied = {iface.name: iface for iface in effective}

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
        """What a scrape shows. Reads the maps without the lock: a flow-table scan must
        not hold up a health change or a reload, and every map is readable while one is
        being written (a reader sees the old value or the new one)."""
        names = [iface.name for iface in self.desired]
        return [e for e in report.stats(None, self.readers) if e["interface"] in names]

    # ---- events --------------------------------------------------------------------
    def _on_health(self, key, up: bool, reason: str) -> None:
        self.events.put(("health", key, up, reason))

    def _observe(self, key, seconds: float, ok: bool) -> None:
        ifname, service, backend = key
        self.metrics.check_seconds.labels(ifname, service, backend, "ok" if ok else "fail").observe(seconds)

    def _check_failed(self, key, exc: Exception) -> None:
        """A check raised something unexpected (from a checker thread): counted every
        time, logged once a minute per backend and reason. The backend stays as it was
        and is checked again at the next interval."""
        ifname, service, backend = key
        self.metrics.check_errors.labels(ifname, service, backend).inc()
        fields = _unexpected(exc)
        now = time.monotonic()
        last = self.check_errors_logged.get(key)
        if last is None or last[1] != fields["reason"] or now - last[0] >= CHECK_ERROR_LOG_EVERY_S:
            self.check_errors_logged[key] = (now, fields["reason"])
            log("health_check_error", level="error", interface=ifname, service=service, backend=backend,
                **fields)

    def _health_changed(self, key, up: bool, reason: str) -> None:
        ifname, service, backend = key
        log("backend_up" if up else "backend_down", level="info" if up else "warning",
            interface=ifname, service=service, backend=backend, reason=reason)
        self.reconcile()
        if not up:
            with self.lock:
                try:
                    reset = report.reset_flows(ifname, service, backend)
                except NotAttachedError:
                    return
                if reset is not None:
                    log("flows_reset", interface=ifname, service=service, backend=backend, flows=reset)

    def _reload(self) -> None:
        """Applies the file again; a file that cannot be applied is refused with every
        problem listed and the running state kept."""
        try:
            desired = self._read()
        except XdplbError as exc:
            self.metrics.reloads.labels("failed").inc()
            log("reload_failed", level="error", reason=str(exc).replace("\n", " "))
            return
        except Exception as exc:  # a bug in reading it: refused like a bad file
            self.metrics.errors.labels("reload").inc()
            self.metrics.reloads.labels("failed").inc()
            log("reload_failed", level="error", **_unexpected(exc))
            return
        previous = self.desired
        self.desired = desired
        try:
            self.reconcile()
        except Exception as exc:
            self.desired = previous
            fields = {"reason": str(exc).replace("\n", " ")}
            if not isinstance(exc, XdplbError):
                self.metrics.errors.labels("reload").inc()
                fields = _unexpected(exc)
            self.metrics.reloads.labels("failed").inc()
            log("reload_failed", level="error", **fields)
            self._restore()
            return
        self.checker.set_targets(self.targets())
        self.metrics.reloads.labels("applied").inc()
        self.metrics.last_reload.set_to_current_time()
        log("reloaded", path=self.path)

    def _restore(self) -> None:
        """After a reload failed part way: puts back what it changed (nothing, when it
        failed before the first write, as reconcile checks everything first)."""
        try:
            self.reconcile()
        except Exception as exc:
            fields = {"reason": str(exc).replace("\n", " ")} if isinstance(exc, XdplbError) else _unexpected(exc)
            log("error", level="error", during="restore", **fields)

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
                    dropped = report.counter(iface.name, "snat_exhausted")
                except NotAttachedError:
                    continue
                seen = self.snat_exhausted.setdefault(iface.name, dropped)
                if dropped > seen:
                    log("snat_exhausted", level="warning", interface=iface.name, dropped=dropped - seen,
                        remedy=report.SNAT_EXHAUSTED_REMEDY)
                    self.snat_exhausted[iface.name] = dropped

    def _upgrade_running(self) -> None:
        """Takes over the data planes already running on the file's interfaces with the
        program built last (flows kept)."""
        for iface in self.desired:
            upgraded = control.upgrade_running(iface.name)
            if upgraded:
                log("upgraded", interface=iface.name, old_program=upgraded[0], new_program=upgraded[1])

    def _serve_metrics(self) -> None:
        host, port = self.metrics_bind
        try:
            start_http_server(port, addr=host, registry=self.metrics.registry)
        except OSError as exc:
            raise XdplbError(f"cannot serve metrics on {self.metrics_addr}: {exc.strerror or exc}; "
                             "give another --metrics HOST:PORT") from None

    # ---- main loop -----------------------------------------------------------------
    def run(self) -> None:
        control.ensure_root()
        # First: a port another process holds is refused before anything changes.
        self._serve_metrics()
        self.desired = self._read()
        self._upgrade_running()
        self.reconcile()
        self.checker.set_targets(self.targets())
        log("started", path=self.path, metrics=self.metrics_addr,
            interfaces=",".join(i.name for i in self.desired))
        self.systemd.notify("READY=1", f"STATUS=serving {len(self.desired)} interfaces")
        signal.signal(signal.SIGHUP, lambda *_: self.events.put(("reload",)))
        signal.signal(signal.SIGTERM, lambda *_: self.events.put(("stop",)))
        signal.signal(signal.SIGINT, lambda *_: self.events.put(("stop",)))
        refresh_at = time.monotonic() + NEXT_HOP_REFRESH_S
        watchdog = self.systemd.watchdog_interval_s
        pet_at = time.monotonic()
        while True:
            if watchdog is not None and time.monotonic() >= pet_at:
                self.systemd.notify("WATCHDOG=1")  # the loop turns: events are being handled
                pet_at = time.monotonic() + watchdog
            wake = min(refresh_at, pet_at) if watchdog is not None else refresh_at
            try:
                event = self.events.get(timeout=max(0.0, wake - time.monotonic()))
            except queue.Empty:
                if time.monotonic() < refresh_at:
                    continue
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
            except Exception as exc:  # a bug must not stop serve; the next event is handled as usual
                self.metrics.errors.labels(event[0]).inc()
                log("error", level="error", during=event[0], **_unexpected(exc))
        self.systemd.notify("STOPPING=1")
        self.checker.stop()
        self.readers.close()
        if self.detach_on_exit:
            for iface in self.desired:
                try:
                    log("detached", interface=iface.name, detail=control.detach(iface.name))
                except XdplbError as exc:
                    log("error", level="error", reason=str(exc))
        log("stopped", forwarding="no" if self.detach_on_exit else "yes")


