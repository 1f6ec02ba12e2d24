# SPDX-License-Identifier: Apache-2.0
"""What the commands do, as a library: attach, detach, status. cli.py only parses and prints."""
from __future__ import annotations

import copy
import ipaddress
import time
from dataclasses import asdict, dataclass, field

from . import config, loader, maglev, model, netlink
from .dataplane import DataPlane, flow_slots
from .errors import NotAttachedError, UsageError, XdplbError
from .model import Backend, Service, Settings

DRAIN_POLL_S = 0.5


@dataclass
class AttachRequest:
    ifname: str
    backends: list
    vip: ipaddress.IPv4Address | None = None
    port: int = 80
    proto: str = "tcp"
    mode: str = "auto"
    clients: list = field(default_factory=list)
    not_allowed: str = "drop"  # clients outside `clients`: dropped, or "pass" to the kernel
    force: bool = False
    snat_addrs: list[ipaddress.IPv4Address] | None = None
    snat_ports: tuple[int, int] | None = None
    flows: int = config.FLOWS_DEFAULT
    seed: int | None = None


def _next_hops(services: list[Service], known: dict | None = None) -> dict:
    """The next hop of every backend, before anything is written: what the kernel knows
    now (so a change also carries a MAC that moved), else what the running program
    was given, else resolved now (an unreachable new backend stops the change before
    it starts)."""
    addrs = [str(b.addr) for s in services for b in s.backends]
    hops = dict(known or {})
    hops.update(netlink.next_hops_now(addrs))
    hops.update(netlink.resolve_next_hops([a for a in addrs if a not in hops]))
    return hops


def refresh_next_hops(ifname: str) -> list[str]:
    """Rewrites the next hop of every backend whose MAC or route the kernel now sees
    differently; returns a line per change."""
    found = _attached(ifname)
    try:
        dp = found.dataplane
        return [f"{ifname}: {line}" for line in dp.update_next_hops(netlink.next_hops_now(list(dp.next_hops())))]
    finally:
        found.dataplane.close()


def counter(ifname: str, name: str) -> int:
    """One of the data plane's counters (summed over CPUs)."""
    found = _attached(ifname)
    try:
        return found.dataplane.counters()[name]
    finally:
        found.dataplane.close()


def attach(req: AttachRequest) -> tuple[loader.Attachment, list[str], bool]:
    """Attaches xdplb (or updates the running one in place). Returns the attachment
    (the caller closes its dataplane), notes for the user, and whether a new program
    was loaded."""
    loader.ensure_root()
    if not req.backends:
        raise UsageError("no backends given: pass --backends ADDR[:PORT],...")
    _check_not_allowed(req.not_allowed, req.clients)
    link = netlink.get_link(req.ifname)
    if not link.up:
        raise UsageError(f"{req.ifname} is down; bring it up with: ip link set {req.ifname} up")
    addresses = netlink.ipv4_addresses(link.index)
    if not addresses and (req.vip is None or not req.snat_addrs):
        raise UsageError(f"{req.ifname} has no IPv4 address; give --vip and --snat, or add one (ip addr add)")
    vip = req.vip or addresses[0].ip
    service = Service(vip, req.port, req.proto, req.backends, req.clients, not_allowed=req.not_allowed)

    local = netlink.local_ipv4_addresses()
    snat_notes = [f"note: SNAT address {a} is not an address of this host: backends must route it here"
                  for a in req.snat_addrs or [] if a not in local]
    found = loader.open_attached(link)
    loader.remove_stale_pins(req.ifname, found.prog_id if isinstance(found, loader.Attachment) else 0)
    if isinstance(found, loader.Attachment):
        try:
            return _update(found, req, service), snat_notes, False
        except BaseException:
            found.dataplane.close()
            raise
    if isinstance(found, loader.ForeignProgram) and not req.force:
        raise XdplbError(f"{req.ifname} already has XDP program {found.prog_id} ({found.name or 'unnamed'}), "
                         "which is not xdplb's; detach it first or pass --force to replace it")

    settings = Settings(snat_addrs=req.snat_addrs or [addresses[0].ip if addresses else vip])
    if req.snat_ports:
        settings.snat_port_min, settings.snat_port_max = req.snat_ports
    if req.seed is not None:
        settings.hash_seed = req.seed
    loader.check_snat_range(settings.snat_port_min, settings.snat_port_max)
    hops = _next_hops([service])
    attachment, notes = loader.load_and_attach(link, req.mode, req.force, flow_slots(req.flows), settings,
                                               [service], hops)
    return attachment, snat_notes + notes, True


def _update(found: loader.Attachment, req: AttachRequest, service: Service) -> loader.Attachment:
    if req.mode != "auto" and req.mode != found.mode:
        raise UsageError(f"xdplb is attached to {req.ifname} in {found.mode} mode; "
                         f"detach it first to change the mode to {req.mode}")
    dp = found.dataplane
    settings = dp.read_settings()
    if req.snat_addrs:
        settings.snat_addrs = req.snat_addrs
    if req.snat_ports:
        settings.snat_port_min, settings.snat_port_max = req.snat_ports
        loader.check_snat_range(*req.snat_ports)
    old_seed = settings.hash_seed
    if req.seed is not None:
        settings.hash_seed = req.seed
    services = [s for s in dp.services() if s.name != service.name] + [service]
    hops = _next_hops(services, dp.next_hops())
    dp.write_settings(settings)
    dp.apply(services, hops, settings.hash_seed, (settings.snat_port_min, settings.snat_port_max),
             rebuild_rings=settings.hash_seed != old_seed)
    return found


def detach(ifname: str, force: bool = False) -> str:
    loader.ensure_root()
    link = netlink.get_link(ifname)
    found = loader.open_attached(link)
    if found is None:
        loader.remove_pins(ifname)
        return f"nothing attached to {ifname}"
    if isinstance(found, loader.ForeignProgram):
        if not force:
            raise XdplbError(f"{ifname} carries XDP program {found.prog_id} ({found.name or 'unnamed'}), "
                             "which is not xdplb's; leaving it (pass --force to remove it anyway)")
        loader.detach(link)
        return f"detached foreign XDP program {found.prog_id} from {ifname}"
    try:
        found.dataplane.remember_snat_ports()
    except XdplbError:
        pass  # an aid for the next attach; the detach matters more
    finally:
        found.dataplane.close()
    loader.detach(link)
    return f"detached xdplb (program {found.prog_id}, {found.mode} mode) from {ifname}"


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
            backends.append({"address": str(b.addr), "port": b.port, "weight": b.weight, "id": bid,
                             **asdict(dp.traffic("backend", bid))})
        services.append({"vip": str(s.vip), "port": s.port, "proto": s.proto, "id": sid,
                         "clients": [str(n) for n in s.clients] or ["any"], "not_allowed": s.not_allowed,
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


# ---- runtime changes: services and backends ------------------------------------------

def _attached(ifname: str) -> loader.Attachment:
    loader.ensure_root()
    found = loader.find(ifname)
    if found is None:
        raise NotAttachedError(f"xdplb is not attached to {ifname}; attach it first: "
                               f"xdplb attach {ifname} --backends ADDR,...")
    return found


def change_services(ifname: str, change) -> list[str]:
    """Applies change(services) -> services to the running data plane, in place.
    Returns the lines describing what changed (empty: nothing to do)."""
    found = _attached(ifname)
    dp = found.dataplane
    try:
        running = dp.services()
        wanted = change([copy.deepcopy(s) for s in running])
        lines = config.diff_services(ifname, running, wanted)
        if lines:
            settings = dp.read_settings()
            hops = _next_hops(wanted, dp.next_hops())
            dp.apply(wanted, hops, settings.hash_seed, (settings.snat_port_min, settings.snat_port_max))
        return lines
    finally:
        dp.close()


def parse_service(text: str) -> tuple[ipaddress.IPv4Address, int, str]:
    """VIP:PORT[/tcp|udp]."""
    spec, _, proto = text.partition("/")
    host, sep, port = spec.rpartition(":")
    if not sep:
        raise UsageError(f"bad service {text!r}: give VIP:PORT[/tcp|udp], like 10.0.0.2:80/tcp")
    return model.parse_address(host, "VIP"), model.parse_port(port), model.parse_proto(proto or "tcp")


def _find_service(services: list[Service], spec: str) -> Service:
    vip, port, proto = parse_service(spec)
    for s in services:
        if (s.vip, s.port, s.proto) == (vip, port, proto):
            return s
    names = ", ".join(s.name for s in services) or "none"
    raise UsageError(f"no service {vip}:{port}/{proto} here (services: {names}); add it with: xdplb service add")


def _check_not_allowed(action: str, clients: list) -> None:
    if action == "pass" and not clients:
        raise UsageError("--not-allowed pass needs an allow-list: add --clients CIDR,... or drop the option")


def service_add(ifname: str, spec: str, clients: list, ring_size: int, udp_timeout: int = 0,
                not_allowed: str = "drop") -> list[str]:
    vip, port, proto = parse_service(spec)
    _check_not_allowed(not_allowed, clients)
    if not maglev.is_prime(ring_size) or ring_size > model.RING_SIZE_MAX:
        raise UsageError(f"--ring-size {ring_size}: give a prime of at most {model.RING_SIZE_MAX}, like 65537")
    if udp_timeout and proto != "udp":
        raise UsageError(f"--udp-timeout applies to UDP services only; {spec} is {proto}: drop the option")
    if not 0 <= udp_timeout <= model.MAX_UDP_TIMEOUT_S:
        raise UsageError(f"--udp-timeout {udp_timeout}: give seconds from 1 to {model.MAX_UDP_TIMEOUT_S}")

    def change(services):
        if any((s.vip, s.port, s.proto) == (vip, port, proto) for s in services):
            raise UsageError(f"service {vip}:{port}/{proto} already exists; change its backends with: xdplb backend")
        return services + [Service(vip, port, proto, [], clients, ring_size, udp_timeout, not_allowed)]
    return change_services(ifname, change)


def service_del(ifname: str, spec: str) -> list[str]:
    def change(services):
        gone = _find_service(services, spec)
        return [s for s in services if s.name != gone.name]
    return change_services(ifname, change)


def backend_add(ifname: str, spec: str, backend_text: str, weight: int) -> list[str]:
    def change(services):
        svc = _find_service(services, spec)
        b = model.parse_backend(backend_text, svc.port, weight)
        if any(x.endpoint == b.endpoint for x in svc.backends):
            raise UsageError(f"backend {b.endpoint} is already in {svc.name}; change it with: xdplb backend set")
        svc.backends.append(b)
        return services
    return change_services(ifname, change)


def _member(svc: Service, backend_text: str) -> Backend:
    b = model.parse_backend(backend_text, svc.port)
    for x in svc.backends:
        if x.endpoint == b.endpoint:
            return x
    raise UsageError(f"no backend {b.endpoint} in {svc.name} (backends: "
                     f"{', '.join(x.endpoint for x in svc.backends) or 'none'})")


def backend_set(ifname: str, spec: str, backend_text: str, weight: int) -> list[str]:
    def change(services):
        svc = _find_service(services, spec)
        old = _member(svc, backend_text)
        svc.backends = [Backend(x.addr, x.port, weight) if x == old else x for x in svc.backends]
        return services
    return change_services(ifname, change)


def backend_del(ifname: str, spec: str, backend_text: str) -> list[str]:
    def change(services):
        svc = _find_service(services, spec)
        old = _member(svc, backend_text)
        svc.backends = [x for x in svc.backends if x != old]
        return services
    return change_services(ifname, change)


def active_flows(ifname: str, spec: str, backend_text: str) -> int:
    found = _attached(ifname)
    try:
        dp = found.dataplane
        svc = _find_service(dp.services(), spec)
        b = _member(svc, backend_text)
        be_id = dp.backend_ids()[(dp.service_ids()[svc.name], b.endpoint)]
        return dp.active_flows().get(be_id, 0)
    finally:
        found.dataplane.close()


def drain(ifname: str, spec: str, backend_text: str, timeout: float, progress=lambda n: None) -> tuple[list[str], int]:
    """Weight 0, then waits until the backend's flows are gone (or timeout), then removes
    it. Returns the change lines and how many flows were still active at removal."""
    lines = backend_set(ifname, spec, backend_text, 0)
    deadline = time.monotonic() + timeout
    left = active_flows(ifname, spec, backend_text)
    while left and time.monotonic() < deadline:
        progress(left)
        time.sleep(DRAIN_POLL_S)
        left = active_flows(ifname, spec, backend_text)
    return lines + backend_del(ifname, spec, backend_text), left


def _each_attached(ifname: str | None):
    """(name, attachment) for the named interface, or for every one carrying xdplb; each
    attachment's maps are closed once the caller moves on."""
    loader.ensure_root()
    for name in [ifname] if ifname else loader.attached_interfaces():
        found = _attached(name)
        try:
            yield name, found
        finally:
            found.dataplane.close()


SNAT_EXHAUSTED_REMEDY = ("snat_exhausted counts SYNs dropped for want of a free SNAT source towards their "
                         "backend: add SNAT addresses (--snat A,B / snat = [...]) or widen the port range "
                         "(--snat-ports / snat_ports)")


def stats(ifname: str | None) -> list[dict]:
    """status() plus the number of active flows per service and backend, and the SNAT
    sources held towards each backend (of `capacity` per SNAT address)."""
    out = []
    for name, found in _each_attached(ifname):
        entry = describe(name, found)
        active = found.dataplane.active_flows()
        for s in entry["services"]:
            for b in s["backends"]:
                b["active_flows"] = active.get(b["id"], 0)
            s["active_flows"] = sum(b["active_flows"] for b in s["backends"])
        settings = found.dataplane.read_settings()
        capacity = settings.snat_port_max - settings.snat_port_min + 1
        entry["snat_sources"] = [{**asdict(use), "capacity": capacity} for use in found.dataplane.snat_usage()]
        entry["sampled_at"] = time.monotonic()
        out.append(entry)
    return out


# ---- declarative configuration --------------------------------------------------------

def export(ifname: str | None) -> str:
    interfaces = []
    for name, found in _each_attached(ifname):
        dp = found.dataplane
        s = dp.read_settings()
        interfaces.append(config.InterfaceConfig(
            name=name, mode=found.mode, flows=dp.flow_capacity(), snat=s.snat_addrs,
            snat_ports=(s.snat_port_min, s.snat_port_max), seed=s.hash_seed,
            timeouts=s.timeouts(),
            services=dp.services()))
    return config.dump(interfaces)


def apply_config(path: str, dry_run: bool) -> list[str]:
    """Reconciles the running state with a config file: validates everything first,
    then changes only what differs. Returns the lines describing the changes."""
    loader.ensure_root()
    desired, problems = config.check(config.read(path))
    return reconcile(desired, dry_run, path, problems)


def reconcile(desired: list[config.InterfaceConfig], dry_run: bool, path: str = "config",
              problems: list[str] | None = None) -> list[str]:
    """Makes the running state match `desired`: checks every interface first (adding to
    `problems`), then changes only what differs."""
    problems = list(problems or [])
    plans = []
    for iface in desired:
        where = f"interfaces.{iface.name}"
        try:
            link = netlink.get_link(iface.name)
        except UsageError as exc:
            problems.append(f"{where}: {exc}")
            continue
        found = loader.open_attached(link)
        if isinstance(found, loader.ForeignProgram):
            problems.append(f"{where}: {iface.name} carries XDP program {found.prog_id}, which is not xdplb's; "
                            "detach it first")
            continue
        if isinstance(found, loader.Attachment):
            if iface.mode != "auto" and iface.mode != found.mode:
                problems.append(f"{where}.mode: attached in {found.mode} mode; changing the mode needs "
                                f"xdplb detach {iface.name} (which drops established flows)")
            if flow_slots(iface.flows) != found.dataplane.flow_slot_count():
                problems.append(f"{where}.flows: the running flow table holds {found.dataplane.flow_capacity()} "
                                f"flows; resizing needs xdplb detach {iface.name} (which drops established flows)")
        elif not link.up:
            problems.append(f"{where}: {iface.name} is down; bring it up with: ip link set {iface.name} up")
        plans.append((iface, link, found))
    if problems:
        for _, _, found in plans:
            if isinstance(found, loader.Attachment):
                found.dataplane.close()
        raise config.ConfigError(path, problems)

    lines = []
    try:
        # Resolve every next hop before changing anything anywhere.
        hops = {}
        for iface, link, found in plans:
            known = found.dataplane.next_hops() if isinstance(found, loader.Attachment) else {}
            hops[iface.name] = _next_hops(iface.services, known)
        for iface, link, found in plans:
            addresses = netlink.ipv4_addresses(link.index)
            default_snat = addresses[0].ip if addresses else None
            if isinstance(found, loader.Attachment):
                dp = found.dataplane
                old = dp.read_settings()
                new = iface.settings(iface.snat or old.snat_addrs)  # a trace lease is kept
                change = config.diff_settings(iface.name, old, new) + \
                    config.diff_services(iface.name, dp.services(), iface.services)
                lines += change
                if change and not dry_run:
                    loader.check_snat_range(new.snat_port_min, new.snat_port_max)
                    dp.write_settings(new)
                    dp.apply(iface.services, hops[iface.name], new.hash_seed,
                             (new.snat_port_min, new.snat_port_max), rebuild_rings=new.hash_seed != old.hash_seed)
            else:
                if default_snat is None and iface.snat is None:
                    raise UsageError(f"interfaces.{iface.name}: no IPv4 address to use as SNAT source; "
                                     "set snat = \"ADDR\"")
                new = iface.settings(iface.snat or [default_snat])
                lines.append(f"{iface.name}: attach ({iface.mode} mode, {len(iface.services)} services)")
                lines += config.diff_services(iface.name, [], iface.services)
                if not dry_run:
                    loader.check_snat_range(new.snat_port_min, new.snat_port_max)
                    attachment, notes = loader.load_and_attach(link, iface.mode, False, flow_slots(iface.flows), new,
                                                               iface.services, hops[iface.name])
                    attachment.dataplane.close()
                    lines += notes
    finally:
        for _, _, found in plans:
            if isinstance(found, loader.Attachment):
                found.dataplane.close()
    return lines


def upgrade(ifname: str) -> str:
    found = _attached(ifname)
    try:
        old, new, warning = loader.upgrade(found)
    finally:
        found.dataplane.close()
    return f"upgraded xdplb on {ifname}: program {old} -> {new}, flows and configuration kept" + \
        (f"\n{warning}" if warning else "")
