# SPDX-License-Identifier: Apache-2.0
"""Reading an interface's state for people and for serve: status, stats, export, the
wanted state the maps hold now, and trace sessions. Changes go through control.py."""
from __future__ import annotations

import threading
import time
from dataclasses import asdict

from . import config, loader, locking, model, netlink, plan
from .dataplane import DataPlane
from .errors import NotAttachedError, NotFoundError, UsageError, XdplbError
from .model import InterfaceConfig


def attached(ifname: str) -> loader.Attachment:
    """xdplb's attachment on ifname (the caller closes its maps), or a one-line error."""
    loader.ensure_root()
    found = loader.find(ifname)
    if found is None:
        raise NotAttachedError(f"xdplb is not attached to {ifname}; attach it first: "
                               f"xdplb attach {ifname} --backends ADDR,...")
    return found


def _each_attached(ifname: str | None):
    """(name, attachment) for the named interface, or for every one carrying xdplb; each
    attachment's maps are closed once the caller moves on."""
    loader.ensure_root()
    for name in [ifname] if ifname else loader.attached_interfaces():
        found = attached(name)
        try:
            yield name, found
        finally:
            found.dataplane.close()


class Readers:
    """Attachments kept open from one read to the next, for a long-lived reader (serve's
    scrapes): the flow table stays mapped, so a scan reads memory instead of first
    faulting in every page of it. An interface's attachment is opened again when its
    program changes (an upgrade, a detach and attach). One read at a time."""

    def __init__(self):
        self._open: dict[str, loader.Attachment] = {}
        self._lock = threading.Lock()

    def _get(self, name: str) -> loader.Attachment:
        found = self._open.get(name)
        if found is not None and netlink.get_link(name).xdp_prog_id == found.prog_id:
            return found
        self._drop(name)
        found = self._open[name] = attached(name)
        return found

    def _drop(self, name: str) -> None:
        found = self._open.pop(name, None)
        if found is not None:
            found.dataplane.close()

    def each(self, ifname: str | None):
        """As _each_attached, the attachments left open."""
        with self._lock:
            names = [ifname] if ifname else loader.attached_interfaces()
            for name in set(self._open) - set(names):
                self._drop(name)
            for name in names:
                try:
                    yield name, self._get(name)
                except BaseException:
                    self._drop(name)  # a half-read attachment is not kept
                    raise

    def close(self) -> None:
        with self._lock:
            for name in list(self._open):
                self._drop(name)


def versions() -> dict[str, str]:
    """What is running, for `xdplb --version` and xdplb_build_info: each part found
    without root; libbpf says why when it cannot be loaded."""
    import platform

    from . import __version__, abi
    from .libbpf import libbpf
    try:
        lib = libbpf()
        library, path = lib.version, lib.path
    except XdplbError as exc:
        library, path = f"not loadable: {exc}", ""
    return {"version": __version__, "abi": str(abi.ABI_VERSION), "libbpf": library, "libbpf_path": path,
            "kernel": platform.release(), "python": platform.python_version()}


def describe(ifname: str, attachment: loader.Attachment) -> dict:
    """Everything status shows about one interface, as plain data."""
    dp: DataPlane = attachment.dataplane
    settings = dp.read_settings()
    svc_ids = dp.service_ids()
    be_ids = dp.backend_ids()
    services = []
    for s in dp.services():
        sid = svc_ids[s.name]
        backends = []
        for b in s.backends:
            bid = be_ids[(sid, b.endpoint)]
            backends.append({"address": str(b.addr), "port": b.port, "endpoint": b.endpoint, "weight": b.weight, "id": bid,
                             **asdict(dp.traffic("backend", bid))})
        services.append({"name": s.name, "vip": str(s.vip), "port": s.port, "proto": s.proto, "id": sid,
                         "clients": [str(n) for n in s.clients] or ["any"], "not_allowed": s.not_allowed, "forward": s.forward,
                         "ring_size": s.ring_size, "udp_timeout": s.udp_timeout_s,
                         **asdict(dp.traffic("service", sid)),
                         "backends": backends})
    return {
        "interface": ifname, "program_id": attachment.prog_id, "mode": attachment.mode,
        "snat": {"addresses": [str(a) for a in settings.snat_addrs],
                 "ports": f"{settings.snat_port_min}-{settings.snat_port_max}"},
        "timeouts": settings.timeouts(),
        "hash_seed": settings.hash_seed, "trace": settings.trace,
        "services": services, "counters": dp.counters(),
    }


def status(ifname: str | None) -> list[dict]:
    loader.ensure_root()
    names = [ifname] if ifname else loader.attached_interfaces()
    out = []
    for name in names:
        attachment = loader.find(name)
        if attachment is None:
            out.append({"interface": name, "program_id": None})
            continue
        try:
            out.append(describe(name, attachment))
        finally:
            attachment.dataplane.close()
    return out


def counter(ifname: str, name: str) -> int:
    """One of the data plane's counters (summed over CPUs)."""
    found = attached(ifname)
    try:
        return found.dataplane.counters()[name]
    finally:
        found.dataplane.close()


SNAT_EXHAUSTED_REMEDY = ("snat_exhausted counts SYNs dropped for want of a free SNAT source towards their "
                         "backend: add SNAT addresses (--snat A,B / snat = [...]) or widen the port range "
                         "(--snat-ports / snat_ports)")


def stats(ifname: str | None, readers: Readers | None = None) -> list[dict]:
    """status() plus the number of active flows per service and backend, and the SNAT
    sources held towards each backend (of `capacity` per SNAT address). readers: keeps
    the attachments open for the next call."""
    out = []
    for name, found in readers.each(ifname) if readers else _each_attached(ifname):
        entry = describe(name, found)
        active, entries = found.dataplane.flow_census()
        for s in entry["services"]:
            for b in s["backends"]:
                b["active_flows"] = active.get(b["id"], 0)
            s["active_flows"] = sum(b["active_flows"] for b in s["backends"])
        settings = found.dataplane.read_settings()
        capacity = settings.snat_port_max - settings.snat_port_min + 1
        entry["snat_sources"] = [{**asdict(use), "capacity": capacity} for use in found.dataplane.snat_usage()]
        entry["flow_table"] = {"entries": entries, "capacity": found.dataplane.flow_capacity()}
        entry["sampled_at"] = time.time()  # wall clock (seconds since the epoch), as a reader expects
        entry["_monotonic"] = time.monotonic()  # what rates are computed from: the wall clock may jump
        out.append(entry)
    return out


def export(ifname: str | None) -> str:
    return config.dump([running_config(name, found) for name, found in _each_attached(ifname)])


def flows(ifname: str | None, service: str | None = None, backend: str | None = None,
          limit: int = 0) -> list[dict]:
    """The open connections of each interface (or one): client, VIP, backend, SNAT source
    or mode, state and idle time, most recently seen first, at most `limit` (0: all) per
    interface, with how many there are in all."""
    out = []
    for name, found in _each_attached(ifname):
        dp = found.dataplane
        services = dp.services()
        wanted = [model.find_service(services, service)] if service else services
        svc_ids = {dp.service_ids()[s.name] for s in wanted}
        be_ids = None
        if backend:
            if not service:
                raise UsageError("--backend needs --service: a backend is named within its service")
            svc = wanted[0]
            be_ids = {dp.backend_ids()[(dp.service_ids()[svc.name], model.find_backend(svc, backend).endpoint)]}
        conns, total = dp.connections(svc_ids if service else None, be_ids, limit)
        out.append({"interface": name, "total": total, "shown": len(conns),
                    "connections": [asdict(c) for c in conns]})
    return out


def backend_list(ifname: str, spec: str) -> list[dict]:
    """The backends of one service with their traffic and active flows."""
    vip, port, proto = model.parse_service(spec)
    (entry,) = stats(ifname)
    for s in entry["services"]:
        if (s["vip"], s["port"], s["proto"]) == (str(vip), port, proto):
            return s["backends"]
    raise NotFoundError(f"no service {model.host_text(vip)}:{port}/{proto} on {ifname}; list them with: "
                        f"xdplb service list {ifname}")


def active_flows(ifname: str, spec: str, backend_text: str) -> int:
    found = attached(ifname)
    try:
        dp = found.dataplane
        svc = model.find_service(dp.services(), spec)
        b = model.find_backend(svc, backend_text)
        be_id = dp.backend_ids()[(dp.service_ids()[svc.name], b.endpoint)]
        return dp.active_flows().get(be_id, 0)
    finally:
        found.dataplane.close()


def reset_flows(ifname: str, service: str, backend: str) -> int | None:
    """Forgets the flows of one backend of a service (see DataPlane.reset_flows), so its
    clients get a reset at once; None if the backend is not there."""
    found = attached(ifname)
    try:
        dp = found.dataplane
        be_id = dp.backend_ids().get((dp.service_ids().get(service), backend))
        return None if be_id is None else dp.reset_flows(be_id)
    finally:
        found.dataplane.close()


def running_config(ifname: str, found: loader.Attachment) -> InterfaceConfig:
    """The wanted state that the interface's maps hold now."""
    dp = found.dataplane
    s = dp.read_settings()
    return InterfaceConfig(name=ifname, mode=found.mode, flows=dp.flow_capacity(), snat=s.snat_addrs,
                           snat_ports=(s.snat_port_min, s.snat_port_max), encap_source=s.encap_source,
                           encap_source6=s.encap_source6, seed=s.hash_seed,
                           timeouts=s.timeouts(), services=dp.services())


def drift(ifname: str, applied: InterfaceConfig | None) -> list[str]:
    """What changed on the interface since it was made to hold `applied` (by another
    command), as change lines from applied to now."""
    if applied is None:
        return []
    found = loader.find(ifname)
    if found is None:
        return []
    try:
        now = running_config(ifname, found)
    finally:
        found.dataplane.close()
    return plan.diff_settings(ifname, applied.settings(now.snat), now.settings(now.snat)) + \
        plan.diff_services(ifname, applied.services, now.services)


# ---- tracing -----------------------------------------------------------------------------

class TraceSession:
    """Tracing on some interfaces while the trace command reads: a lease it renews
    (renew(), under each interface's lock) and ends when it stops."""

    def __init__(self, ifname: str | None):
        loader.ensure_root()
        self.names = [ifname] if ifname else loader.attached_interfaces()
        if not self.names:
            raise XdplbError("xdplb is not attached to any interface here; attach it first")
        self.attachments = []
        try:
            for name in self.names:
                found = loader.find(name)
                if found is None:
                    raise XdplbError(f"xdplb is not attached to {name}; attach it first")
                self.attachments.append(found)
        except BaseException:
            self.close()
            raise
        self.ifindex = self.attachments[0].link.index if len(self.attachments) == 1 else None

    def renew(self) -> None:
        for a in self.attachments:
            with locking.interface(a.link.name):
                a.dataplane.renew_trace()

    def close(self) -> None:
        for a in self.attachments:
            try:
                with locking.interface(a.link.name):
                    a.dataplane.end_trace()
            finally:
                a.dataplane.close()
        self.attachments = []
