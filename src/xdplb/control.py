# SPDX-License-Identifier: Apache-2.0
"""What the commands do, as a library: every command that changes an interface builds
the wanted state of that interface (model.InterfaceConfig) and hands it to converge(),
the one road to the maps. cli.py and serve.py call only this module for xdplb's state."""
from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass, field

from . import abi, config, layout, loader, locking, maglev, model, namespaces, netlink, plan, report
from .errors import NotFoundError, UsageError, XdplbError
from .model import Backend, InterfaceConfig, Service

DRAIN_POLL_S = 0.5


@dataclass
class Outcome:
    """What converge did (or, in a dry run, would do)."""
    lines: list[str]  # the changes, for people
    notes: list[str] = field(default_factory=list)  # worth saying, not changes (mode chosen, warnings)
    program_id: int = 0
    mode: str = ""
    loaded: bool = False  # a new program was loaded and attached


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


def problems(wanted: InterfaceConfig, found, link: netlink.Link, where: str = "") -> list[str]:
    """What stops wanted from being applied to the interface as it is, each with the
    fix; checked for every interface before anything changes anywhere."""
    where = where or wanted.name
    out = []
    if isinstance(found, loader.ForeignProgram):
        return [f"{where}: {wanted.name} carries XDP program {found.prog_id} ({found.name or 'unnamed'}), which is "
                "not xdplb's; detach it first"]
    if isinstance(found, loader.Attachment):
        if wanted.mode != "auto" and wanted.mode != found.mode:
            out.append(f"{where}.mode: xdplb is attached to {wanted.name} in {found.mode} mode; changing the mode to "
                       f"{wanted.mode} needs xdplb detach {wanted.name} first (which drops established flows)")
        if layout.flow_slots(wanted.flows) != found.dataplane.flow_slot_count():
            out.append(f"{where}.flows: the running flow table holds {found.dataplane.flow_capacity()} flows; "
                       f"resizing needs xdplb detach {wanted.name} (which drops established flows)")
    elif not link.up:
        out.append(f"{where}: {wanted.name} is down; bring it up with: ip link set {wanted.name} up")
    families = family_problems(wanted)
    if families:  # the checks below assume IPv4 throughout
        return out + [f"{where}: {problem}" for problem in families]
    lo, hi = wanted.snat_ports
    for svc in wanted.services:
        if lo <= svc.port <= hi:
            out.append(f"{where}: service {svc.name}: port {svc.port} is inside the SNAT ports {lo}-{hi}, where the "
                       f"backends' replies arrive: give the service a port outside {lo}-{hi}, or other SNAT "
                       "ports (--snat-ports / snat_ports)")
        out += [f"{where}: {problem}" for problem in _forwarding_problems(svc, link)]
        if svc.ring_size < len(svc.backends):
            out.append(f"{where}: service {svc.name}: {len(svc.backends)} backends do not fit a ring of "
                       f"{svc.ring_size} slots (some would get no flows); give a larger prime --ring-size")
    return out


def family_problems(wanted: InterfaceConfig) -> list[str]:
    """What the data plane cannot do yet with IPv6, refused before anything changes: an
    IPv6 service forwards in dsr or ipip mode (no NAT66 yet); and a service's backends
    and client networks, and the SNAT sources, are of its address family."""
    out = []
    for svc in wanted.services:
        family = svc.vip.version
        out += [f"service {svc.name}: backend {b.endpoint} is IPv{b.addr.version} but the VIP is IPv{family}: "
                "a service's backends are of its address family" for b in svc.backends if b.addr.version != family]
        out += [f"service {svc.name}: client network {n} is IPv{n.version} but the VIP is IPv{family}: give "
                f"IPv{family} networks" for n in svc.clients if n.version != family]
        if family == 6 and svc.forward == "nat":
            out.append(f"service {svc.name}: IPv6 services forward with --forward dsr or ipip only so far (nat "
                       "is IPv4 only): give --forward dsr or ipip, or an IPv4 VIP")
    out += [f"SNAT address {a} is IPv6: the SNAT sources of IPv4 services are IPv4 addresses"
            for a in wanted.snat or [] if a.version != 4]
    return out


def _forwarding_problems(svc: Service, link: netlink.Link) -> list[str]:
    """dsr and ipip leave the packet's destination (VIP:port) as it is, so a backend must
    listen on the service's port; dsr changes only the MAC, so a backend must be on a
    segment of this very interface."""
    if svc.forward == "nat":
        return []
    out = [f"service {svc.name}: backend {b.endpoint}: with --forward {svc.forward} a backend must use the "
           f"service's port {svc.port} (the packet keeps its destination); give {model.host_text(b.addr)}:{svc.port}"
           for b in svc.backends if b.port != svc.port]
    on_link = [b for b in svc.backends if netlink.on_link_ifindex(str(b.addr)) == link.index]
    if svc.forward == "dsr":
        for b in svc.backends:
            if b not in on_link:
                out.append(f"service {svc.name}: backend {b.addr} is not on a segment directly connected to "
                           f"{link.name}, which --forward dsr needs (only the MAC changes); use --forward ipip "
                           "for routed backends")
    primary = netlink.ipv4_addresses(link.index)[:1] if svc.vip.version == 4 else []
    if on_link and primary and primary[0].ip == svc.vip:
        out.append(f"service {svc.name}: with --forward {svc.forward} the VIP must not be {link.name}'s primary "
                   f"address: this host's ARP requests come from it, and backends, which hold the VIP, ignore "
                   f"them; add the VIP as another address (ip addr add {svc.vip}/32 dev {link.name}) and use "
                   "the primary one for the balancer itself")
    return out


def converge(wanted: InterfaceConfig, dry_run: bool = False, force: bool = False) -> Outcome:
    """Makes one interface's maps hold `wanted`: reads what they hold, plans the writes
    (plan.py) and carries them out, loading and attaching a program first if none is
    there. Holds the interface's lock throughout, so concurrent changes follow each
    other instead of planning from the same snapshot."""
    loader.ensure_root()
    link = netlink.get_link(wanted.name)
    with locking.interface(wanted.name):
        found = loader.open_attached(link)
        try:
            if isinstance(found, loader.ForeignProgram) and force:
                found = None
            trouble = problems(wanted, found, link)
            if trouble:
                raise UsageError("; ".join(p.split(": ", 1)[1] if p.startswith(wanted.name) else p
                                           for p in trouble))
            loader.remove_stale_pins(wanted.name, found.prog_id if isinstance(found, loader.Attachment) else 0)
            if isinstance(found, loader.Attachment):
                return _converge_running(wanted, found, dry_run)
            return _attach_new(wanted, link, dry_run, replace=force)
        finally:
            if isinstance(found, loader.Attachment):
                found.dataplane.close()


def _converge_running(wanted: InterfaceConfig, found: loader.Attachment, dry_run: bool) -> Outcome:
    dp = found.dataplane
    running = dp.read_settings()  # no snat given: keep the running one; the same for IPv6's outer source
    settings = wanted.settings(running.snat_addrs, _encap6_default(wanted, found.link, running.encap_source6))
    _check_snat_range(settings)
    hops = _next_hops(wanted.services, dp.next_hops())
    p = dp.sync(plan.Wanted(settings, wanted.services, hops), wanted.name, dry_run)
    return Outcome(p.lines, program_id=found.prog_id, mode=found.mode)


def _attach_new(wanted: InterfaceConfig, link: netlink.Link, dry_run: bool, replace: bool) -> Outcome:
    addresses = netlink.ipv4_addresses(link.index)
    if not wanted.snat and not addresses:
        raise UsageError(f"{link.name} has no IPv4 address to use as SNAT source; give --snat (snat = \"ADDR\") "
                         "or add one (ip addr add)")
    settings = wanted.settings([addresses[0].ip] if addresses else [], _encap6_default(wanted, link))
    _check_snat_range(settings)
    local = netlink.local_ipv4_addresses()
    notes = [f"note: SNAT address {a} is not an address of this host: backends must route it here"
             for a in wanted.snat or [] if a not in local]
    lines = [f"{link.name}: attach ({wanted.mode} mode, {len(wanted.services)} services)"] + \
        plan.diff_services(link.name, [], wanted.services)
    hops = _next_hops(wanted.services)
    if dry_run:
        return Outcome(lines, notes)
    attachment, attach_notes = loader.load_and_attach(
        link, wanted.mode, replace, layout.flow_slots(wanted.flows),
        lambda dp: dp.sync(plan.Wanted(settings, wanted.services, hops), link.name))
    attachment.dataplane.close()
    return Outcome(lines, notes + attach_notes, attachment.prog_id, attachment.mode, loaded=True)


def _check_snat_range(settings: model.Settings) -> None:
    loader.check_snat_range(settings.snat_port_min, settings.snat_port_max)


def change(ifname: str, edit) -> list[str]:
    """Applies edit(wanted) (which changes the running wanted state in place) through
    converge. Returns the lines describing what changed (empty: nothing to do)."""
    with locking.interface(ifname):
        found = report.attached(ifname)
        try:
            wanted = report.running_config(ifname, found)
        finally:
            found.dataplane.close()
        edit(wanted)
        return converge(wanted).lines


# ---- attach and detach -------------------------------------------------------------------

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
    flows: int | None = None  # None: the running table's, or the default
    seed: int | None = None
    forward: str = "nat"
    encap_sources: tuple = (None, None)  # IPv4, IPv6 (model.parse_encap_sources)


def attach(req: AttachRequest) -> tuple[Outcome, Service]:
    """Attaches xdplb, or updates the running one in place: the options given are merged
    over the running state, the service VIP:PORT/PROTO is set to these backends."""
    loader.ensure_root()
    if not req.backends:
        raise UsageError("no backends given: pass --backends ADDR[:PORT],...")
    _check_not_allowed(req.not_allowed, req.clients)
    link = netlink.get_link(req.ifname)
    with locking.interface(req.ifname):
        found = loader.open_attached(link)
        try:
            if isinstance(found, loader.ForeignProgram) and not req.force:
                raise XdplbError(f"{req.ifname} already has XDP program {found.prog_id} ({found.name or 'unnamed'}), "
                                 "which is not xdplb's; detach it first or pass --force to replace it")
            if isinstance(found, loader.Attachment):
                wanted = report.running_config(req.ifname, found)
                if req.mode != "auto":
                    wanted.mode = req.mode
            else:
                if not link.up:
                    raise UsageError(f"{req.ifname} is down; bring it up with: ip link set {req.ifname} up")
                wanted = InterfaceConfig(req.ifname, mode=req.mode)
        finally:
            if isinstance(found, loader.Attachment):
                found.dataplane.close()
        vip = req.vip or _primary_address(link, req)
        service = Service(vip, req.port, req.proto, req.backends, req.clients, not_allowed=req.not_allowed,
                          forward=req.forward)
        old = wanted.service(service.name)
        if old is not None:  # the options attach has no flag for stay as they are
            service.ring_size, service.udp_timeout_s = old.ring_size, old.udp_timeout_s
        wanted.services = [s for s in wanted.services if s.name != service.name] + [service]
        if req.snat_addrs:
            wanted.snat = req.snat_addrs
        if req.snat_ports:
            wanted.snat_ports = req.snat_ports
        if req.seed is not None:
            wanted.seed = req.seed
        if req.encap_sources[0] is not None:
            wanted.encap_source = req.encap_sources[0]
        if req.encap_sources[1] is not None:
            wanted.encap_source6 = req.encap_sources[1]
        if req.flows is not None:
            wanted.flows = req.flows
        return converge(wanted, force=req.force), service


def _encap6_default(wanted: InterfaceConfig, link: netlink.Link,
                    running: ipaddress.IPv6Address | None = None) -> ipaddress.IPv6Address | None:
    """The outer source of IPv6 ipip packets when none is given: the running one, else the
    interface's first global IPv6 address; None while no IPv6 service encapsulates."""
    if wanted.encap_source6 is not None or not wanted.needs_encap6():
        return None
    if running is not None:
        return running
    addresses = netlink.global_ipv6_addresses(link.index)
    if not addresses:
        raise UsageError(f"{link.name} has no global IPv6 address for the outer header of IPv6 ipip services; "
                         "give one with --encap-source (encap_source), or add one (ip -6 addr add)")
    return addresses[0]


def _primary_address(link: netlink.Link, req: AttachRequest) -> ipaddress.IPv4Address:
    addresses = netlink.ipv4_addresses(link.index)
    if not addresses:
        raise UsageError(f"{req.ifname} has no IPv4 address; give --vip and --snat, or add one (ip addr add)")
    return addresses[0].ip


def detach(ifname: str, force: bool = False) -> str:
    loader.ensure_root()
    link = netlink.get_link(ifname)
    with locking.interface(ifname):
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


ensure_root = loader.ensure_root


# ---- runtime changes: services and backends ------------------------------------------

def refresh_next_hops(ifname: str) -> list[str]:
    """Rewrites the next hop of every backend whose MAC or route the kernel now sees
    differently; returns a line per change."""
    return change(ifname, lambda wanted: None)


def _check_not_allowed(action: str, clients: list) -> None:
    if action == "pass" and not clients:
        raise UsageError("--not-allowed pass needs an allow-list: add --clients CIDR,... or drop the option")


def service_add(ifname: str, spec: str, clients: list, ring_size: int, udp_timeout: int = 0,
                not_allowed: str = "drop", forward: str = "nat") -> list[str]:
    vip, port, proto = model.parse_service(spec)
    _check_not_allowed(not_allowed, clients)
    if not maglev.is_prime(ring_size) or ring_size > model.RING_SIZE_MAX:
        raise UsageError(f"--ring-size {ring_size}: give a prime of at most {model.RING_SIZE_MAX}, like 65537")
    if udp_timeout and proto != "udp":
        raise UsageError(f"--udp-timeout applies to UDP services only; {spec} is {proto}: drop the option")
    if not 0 <= udp_timeout <= model.MAX_UDP_TIMEOUT_S:
        raise UsageError(f"--udp-timeout {udp_timeout}: give seconds from 1 to {model.MAX_UDP_TIMEOUT_S}")

    def edit(wanted):
        if any((s.vip, s.port, s.proto) == (vip, port, proto) for s in wanted.services):
            raise UsageError(f"service {model.host_text(vip)}:{port}/{proto} already exists; change its backends with: xdplb backend")
        wanted.services.append(Service(vip, port, proto, [], clients, ring_size, udp_timeout, not_allowed, forward))
    return change(ifname, edit)


def service_del(ifname: str, spec: str) -> list[str]:
    def edit(wanted):
        gone = model.find_service(wanted.services, spec)
        wanted.services = [s for s in wanted.services if s.name != gone.name]
    return change(ifname, edit)


def backend_add(ifname: str, spec: str, backend_text: str, weight: int) -> list[str]:
    def edit(wanted):
        svc = model.find_service(wanted.services, spec)
        b = model.parse_backend(backend_text, svc.port, weight)
        if any(x.endpoint == b.endpoint for x in svc.backends):
            raise UsageError(f"backend {b.endpoint} is already in {svc.name}; change it with: xdplb backend set")
        svc.backends.append(b)
    return change(ifname, edit)


def backend_set(ifname: str, spec: str, backend_text: str, weight: int) -> list[str]:
    def edit(wanted):
        svc = model.find_service(wanted.services, spec)
        old = model.find_backend(svc, backend_text)
        svc.backends = [Backend(x.addr, x.port, weight) if x == old else x for x in svc.backends]
    return change(ifname, edit)


def backend_del(ifname: str, spec: str, backend_text: str) -> list[str]:
    def edit(wanted):
        svc = model.find_service(wanted.services, spec)
        old = model.find_backend(svc, backend_text)
        svc.backends = [x for x in svc.backends if x != old]
    return change(ifname, edit)


def drain(ifname: str, spec: str, backend_text: str, timeout: float, progress=lambda n: None) -> tuple[list[str], int]:
    """Weight 0, then waits until the backend's flows are gone (or timeout), then removes
    it. Returns the change lines and how many flows were still active at removal. The
    interface is locked for each change, not while waiting."""
    lines = backend_set(ifname, spec, backend_text, 0)
    deadline = time.monotonic() + timeout
    left = report.active_flows(ifname, spec, backend_text)
    while left and time.monotonic() < deadline:
        progress(left)
        time.sleep(DRAIN_POLL_S)
        left = report.active_flows(ifname, spec, backend_text)
    return lines + backend_del(ifname, spec, backend_text), left


# ---- declarative configuration --------------------------------------------------------

def apply_config(path: str, dry_run: bool) -> list[str]:
    """Reconciles the running state with a config file: validates everything first,
    then changes only what differs. Returns the lines describing the changes."""
    loader.ensure_root()
    desired, trouble = config.check(config.read(path))
    return reconcile(desired, dry_run, path, trouble)


def reconcile(desired: list[InterfaceConfig], dry_run: bool, path: str = "config",
              trouble: list[str] | None = None) -> list[str]:
    """Makes the running state match `desired`: checks every interface first (adding to
    `trouble`), then converges each one."""
    trouble = list(trouble or [])
    for iface in desired:
        where = f"interfaces.{iface.name}"
        try:
            link = netlink.get_link(iface.name)
        except NotFoundError as exc:
            trouble.append(f"{where}: {exc}")
            continue
        found = loader.open_attached(link)
        try:
            trouble += problems(iface, found, link, where)
        finally:
            if isinstance(found, loader.Attachment):
                found.dataplane.close()
    if trouble:
        raise config.ConfigError(path, trouble)
    lines = []
    for iface in desired:
        outcome = converge(iface, dry_run)
        lines += outcome.lines + outcome.notes
    return lines


def upgrade_running(ifname: str) -> tuple[int, int] | None:
    """serve's start: the program built last takes over a data plane already running on
    the interface (flows kept). Returns the old and new program ids, None if nothing
    runs there."""
    with locking.interface(ifname):
        found = loader.find(ifname)
        if found is None:
            return None
        try:
            running = found.dataplane.read_abi_version()
            if running != abi.ABI_VERSION:
                netns = namespaces.netns_name()
                detach = f"xdplb{'' if netns == 'host' or netns.startswith('ns-') else f' -n {netns}'} " \
                         f"detach {ifname}"
                raise XdplbError(f"{ifname} runs an xdplb data plane of ABI {running} and this xdplb "
                                 f"speaks ABI {abi.ABI_VERSION}: its state cannot be taken over, by serve or "
                                 f"by xdplb upgrade; detach it ({detach}, which drops its flows) and start "
                                 "serve again: it attaches anew")
            try:
                old, new, _ = loader.upgrade(found)
            except XdplbError as exc:
                raise XdplbError(f"{ifname}: {exc}") from None
            return old, new
        finally:
            found.dataplane.close()


def upgrade(ifname: str) -> str:
    with locking.interface(ifname):
        found = report.attached(ifname)
        try:
            old, new, warning = loader.upgrade(found)
        finally:
            found.dataplane.close()
    return f"upgraded xdplb on {ifname}: program {old} -> {new}, flows and configuration kept" + \
        (f"\n{warning}" if warning else "")
