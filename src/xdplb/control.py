# SPDX-License-Identifier: Apache-2.0
"""What the commands do, as a library: attach, detach, status. cli.py only parses and prints."""
from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass, field

from . import loader, netlink
from .dataplane import DataPlane
from .errors import UsageError, XdplbError
from .model import Service, Settings

FLOWS_DEFAULT = 1_048_576


@dataclass
class AttachRequest:
    ifname: str
    backends: list
    vip: ipaddress.IPv4Address | None = None
    port: int = 80
    proto: str = "tcp"
    mode: str = "auto"
    clients: list = field(default_factory=list)
    force: bool = False
    snat_addr: ipaddress.IPv4Address | None = None
    snat_ports: tuple[int, int] | None = None
    flows: int = FLOWS_DEFAULT
    seed: int | None = None


def _next_hops(services: list[Service]) -> dict:
    """Resolves every backend's next hop before anything is written."""
    return {str(b.addr): netlink.resolve_next_hop(str(b.addr))
            for s in services for b in s.backends}


def attach(req: AttachRequest) -> tuple[loader.Attachment, list[str], bool]:
    """Attaches xdplb (or updates the running one in place). Returns the attachment
    (the caller closes its dataplane), notes for the user, and whether a new program
    was loaded."""
    loader.ensure_root()
    if not req.backends:
        raise UsageError("no backends given: pass --backends ADDR[:PORT],...")
    link = netlink.get_link(req.ifname)
    if not link.up:
        raise UsageError(f"{req.ifname} is down; bring it up with: ip link set {req.ifname} up")
    addresses = netlink.ipv4_addresses(link.index)
    if not addresses and (req.vip is None or req.snat_addr is None):
        raise UsageError(f"{req.ifname} has no IPv4 address; give --vip and --snat, or add one (ip addr add)")
    vip = req.vip or addresses[0].ip
    service = Service(vip, req.port, req.proto, req.backends, req.clients)

    found = loader.open_attached(link)
    loader.remove_stale_pins(req.ifname, found.prog_id if isinstance(found, loader.Attachment) else 0)
    if isinstance(found, loader.Attachment):
        try:
            return _update(found, req, service), [], False
        except BaseException:
            found.dataplane.close()
            raise
    if isinstance(found, loader.ForeignProgram) and not req.force:
        raise XdplbError(f"{req.ifname} already has XDP program {found.prog_id} ({found.name or 'unnamed'}), "
                         "which is not xdplb's; detach it first or pass --force to replace it")

    settings = Settings(snat_addr=req.snat_addr or (addresses[0].ip if addresses else vip))
    if req.snat_ports:
        settings.snat_port_min, settings.snat_port_max = req.snat_ports
    if req.seed is not None:
        settings.hash_seed = req.seed
    loader.check_snat_range(settings.snat_port_min, settings.snat_port_max)
    hops = _next_hops([service])
    attachment, notes = loader.load_and_attach(link, req.mode, req.force, 2 * req.flows, settings,
                                               [service], hops)
    return attachment, notes, True


def _update(found: loader.Attachment, req: AttachRequest, service: Service) -> loader.Attachment:
    if req.mode != "auto" and req.mode != found.mode:
        raise UsageError(f"xdplb is attached to {req.ifname} in {found.mode} mode; "
                         f"detach it first to change the mode to {req.mode}")
    dp = found.dataplane
    settings = dp.read_settings()
    if req.snat_addr:
        settings.snat_addr = req.snat_addr
    if req.snat_ports:
        settings.snat_port_min, settings.snat_port_max = req.snat_ports
        loader.check_snat_range(*req.snat_ports)
    if req.seed is not None:
        settings.hash_seed = req.seed
    services = [s for s in dp.services() if s.name != service.name] + [service]
    hops = _next_hops(services)
    dp.write_settings(settings)
    dp.apply(services, hops, settings.hash_seed, (settings.snat_port_min, settings.snat_port_max))
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
                         "clients": [str(n) for n in s.clients] or ["any"],
                         "ring_size": s.ring_size, **asdict(dp.traffic("service", sid)),
                         "backends": backends})
    return {
        "interface": ifname, "program_id": attachment.prog_id, "mode": attachment.mode,
        "snat": {"address": str(settings.snat_addr),
                 "ports": f"{settings.snat_port_min}-{settings.snat_port_max}"},
        "timeouts": {"tcp": settings.tcp_timeout_s, "tcp_closing": settings.tcp_closing_timeout_s,
                     "udp": settings.udp_timeout_s},
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
