# SPDX-License-Identifier: Apache-2.0
"""The backend's side of ipip mode: xdplb's decapsulator (bpf/decap.bpf.c) on an
interface, with the VIPs it serves prepared by backendhost.py.

As for the data plane, the interface is the source of truth: its XDP program id leads
to the program (recognised by name) and its maps. Pins under
/sys/fs/bpf/xdplb/<netns>/<ifname>:decap/ are a cache for other tools.
"""
from __future__ import annotations

import ctypes
import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from . import abi, backendhost, build, decap_abi, layout, loader, locking, namespaces, netlink
from .errors import NotFoundError, UsageError, XdplbError
from .libbpf import MapInfo, ProgInfo, libbpf

LOCK_NAME = "decap"  # one lock for every interface: they share backendhost's record


@dataclass
class Decap:
    """Our decapsulator on an interface, with its maps open."""
    link: netlink.Link
    prog_id: int
    mode: str
    fds: dict[str, int] = field(default_factory=dict)
    # Built before local addresses were 16 bytes (IPv6, IPv4 mapped): its map cannot
    # take today's keys, so attach replaces the program instead of updating it.
    outdated: bool = False

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}


def pin_dir(ifname: str) -> Path:
    # ':' is never part of an interface name: these pins cannot meet xdplb's own.
    return loader.PIN_ROOT / namespaces.netns_name() / f"{ifname}:decap"


def open_attached(link: netlink.Link) -> Decap | loader.ForeignProgram | None:
    """What is attached to the interface: our decapsulator, another program, or nothing."""
    if not link.xdp_prog_id:
        return None
    lib = libbpf()
    prog_fd = lib.bpf_prog_get_fd_by_id(link.xdp_prog_id)
    lib.check(prog_fd, f"open XDP program {link.xdp_prog_id} on {link.name} (run as root)")
    try:
        name = lib.obj_info(prog_fd, ProgInfo()).name.decode(errors="replace")
        if name != decap_abi.PROGRAM_NAME:
            return loader.ForeignProgram(link.xdp_prog_id, name)
        found = Decap(link, link.xdp_prog_id, link.xdp_mode)
        found.fds.update(loader.program_maps(prog_fd, set(decap_abi.MAPS)))
    finally:
        os.close(prog_fd)
    if set(found.fds) != set(decap_abi.MAPS):
        found.close()
        return loader.ForeignProgram(link.xdp_prog_id, name)
    key_size = lib.obj_info(found.fds[decap_abi.LOCAL_MAP], MapInfo()).key_size
    found.outdated = key_size != ctypes.sizeof(abi.be32 * 4)
    return found


def local_addresses() -> list:
    """What an outer header may be addressed to: every address of this namespace, both
    families, as for the kernel's own tunnels, except loopback ones, which never arrive
    from outside, and IPv6 link-local ones, which the balancer never sends to (it
    addresses a backend as configured). IPv4 first, then IPv6."""
    addrs = {a.ip for addrs in netlink.addresses_by_link().values() for a in addrs
             if not a.ip.is_loopback and not a.ip.is_link_local}
    if len(addrs) > decap_abi.MAX_LOCAL:
        raise XdplbError(f"this host has {len(addrs)} addresses; the decapsulator holds up to "
                         f"{decap_abi.MAX_LOCAL} (XDPLB_DC_MAX_LOCAL in bpf/decap_abi.h)")
    return sorted(addrs, key=lambda a: (a.version, a))


def _key(addr):
    return layout.addr_words(addr)  # struct xdplb_dc_addr: IPv4 mapped, as the data plane's backends


def read_local(fd: int) -> list:
    keys = libbpf().keys(fd, abi.be32 * 4)
    return sorted((layout.from_words(k) for k in keys), key=lambda a: (a.version, a))


def write_local(fd: int, addrs: list) -> None:
    """Adds before it removes: an address kept is never missing meanwhile."""
    lib = libbpf()
    for addr in addrs:
        lib.update(fd, _key(addr), ctypes.c_uint8(1))
    for addr in set(read_local(fd)) - set(addrs):
        lib.delete(fd, _key(addr))


def counters(fd: int) -> dict[str, int]:
    lib = libbpf()
    ncpus = lib.libbpf_num_possible_cpus()
    out = {}
    for index, name in enumerate(decap_abi.COUNTERS):
        per_cpu = (ctypes.c_uint64 * ncpus)()
        lib.lookup(fd, ctypes.c_uint32(index), per_cpu)
        out[name] = sum(per_cpu)
    return out


def _attach_with_mode(link: netlink.Link, prog_fd: int, mode: str, replace: bool) -> tuple[str, str]:
    """Attaches; auto prefers native and falls back to generic. The decapsulator only
    passes packets, so native XDP on a veth needs nothing of the peer (unlike xdplb's
    XDP_TX). Returns the mode and a note on the choice."""
    last = None
    for m in (["native", "generic"] if mode == "auto" else [mode]):
        try:
            netlink.attach_xdp(link.index, prog_fd, m, replace)
        except netlink.NetlinkError as exc:
            last = exc
            continue
        if mode != "auto":
            return m, ""
        return m, f"mode: {m} (auto: {'the driver supports native XDP' if m == 'native' else 'no native XDP here'})"
    raise XdplbError(f"cannot attach XDP to {link.name} in {mode} mode: {os.strerror(last.code)}"
                     + ("; try --mode generic" if mode != "generic" else ""))


def remove_pins(ifname: str) -> None:
    loader.remove_pin_dir(pin_dir(ifname))


def _usable(link: netlink.Link, found, mode: str, force: bool) -> None:
    if not link.up:
        raise UsageError(f"{link.name} is down; bring it up with: ip link set {link.name} up")
    if isinstance(found, loader.ForeignProgram) and not force:
        raise XdplbError(f"{link.name} carries XDP program {found.prog_id} ({found.name or 'unnamed'}), which is not "
                         f"xdplb's decapsulator; detach it first, or pass --force to replace it")
    if isinstance(found, Decap) and mode not in ("auto", found.mode):
        raise UsageError(f"the decapsulator runs on {link.name} in {found.mode} mode; to change to {mode}, first: "
                         f"xdplb decap detach {link.name}")


def attach(ifname: str, vips: list[ipaddress.IPv4Address] | None, mode: str = "auto",
           force: bool = False) -> list[str]:
    """Attaches the decapsulator to ifname, or updates the one there (its local addresses,
    its VIPs; vips None keeps them). All or nothing. Returns lines for people."""
    loader.ensure_root()
    with locking.interface(LOCK_NAME):
        link = netlink.get_link(ifname)
        found = open_attached(link)
        try:
            _usable(link, found, mode, force)
            if vips is not None:
                backendhost.check_vips(vips)
            wanted_vips = [str(v) for v in vips] if vips is not None else (backendhost.managed(ifname) or [])
            if isinstance(found, Decap) and not found.outdated:
                lines = backendhost.converge(ifname, wanted_vips)
                local = local_addresses()
                write_local(found.fds[decap_abi.LOCAL_MAP], local)
                return lines + [_summary("updated on", found.prog_id, found.mode, ifname, local, wanted_vips)]
            if isinstance(found, Decap):  # outdated: replaced in the mode it runs in
                mode = found.mode
            return _load_and_attach(link, mode, found is not None, wanted_vips)
        finally:
            if isinstance(found, Decap):
                found.close()


def _load_and_attach(link: netlink.Link, mode: str, replace: bool, vips: list[str]) -> list[str]:
    """Attaching comes last, after the VIPs (a packet decapsulated for a VIP the host
    lacks is lost) and the pins: after it nothing is left that could fail. The local
    addresses are read after the VIPs are on lo: they are this host's too."""
    lib = libbpf()
    obj = lib.load_object(str(build.require_object(build.DECAP_OBJECT)), {})
    previous = backendhost.managed(link.name)
    host_changed = False
    try:
        fds = {name: lib.map_fd(obj, name) for name in decap_abi.MAPS}
        prog_fd = lib.prog_fd(obj, decap_abi.PROGRAM_NAME)
        prog_id = lib.obj_info(prog_fd, ProgInfo()).id
        lines = backendhost.converge(link.name, vips)
        host_changed = True
        local = local_addresses()
        write_local(fds[decap_abi.LOCAL_MAP], local)
        warning = loader.pin_into(pin_dir(link.name), prog_fd, fds)
        chosen, note = _attach_with_mode(link, prog_fd, mode, replace)
        return [*lines, *(x for x in (warning, note) if x),
                _summary("attached to", prog_id, chosen, link.name, local, vips)]
    except BaseException:
        remove_pins(link.name)
        if host_changed:
            backendhost.converge(link.name, previous)
        raise
    finally:
        lib.bpf_object__close(obj)


def _summary(verb: str, prog_id: int, mode: str, ifname: str, local: list[ipaddress.IPv4Address],
             vips: list[str]) -> str:
    return (f"decap {verb} {ifname} (program {prog_id}, {mode} mode): IPIP to "
            f"{', '.join(map(str, local)) or 'no address of this host yet'} is decapsulated"
            + (f"; VIPs on lo: {', '.join(vips)}" if vips else ""))


def detach(ifname: str, force: bool = False) -> list[str]:
    """Removes the decapsulator from ifname and undoes what attaching it changed."""
    loader.ensure_root()
    with locking.interface(LOCK_NAME):
        lines = []
        try:
            link = netlink.get_link(ifname)
        except NotFoundError:
            if backendhost.managed(ifname) is None:
                raise
            link = None
            lines.append(f"{ifname} is gone")
        found = open_attached(link) if link else None
        if isinstance(found, loader.ForeignProgram):
            if not force:
                raise XdplbError(f"{ifname} carries XDP program {found.prog_id} ({found.name or 'unnamed'}), which "
                                 "is not xdplb's decapsulator; leaving it (pass --force to remove it anyway)")
            netlink.detach_xdp(link.index, link.xdp_mode)
            lines.append(f"detached foreign XDP program {found.prog_id} from {ifname}")
        elif isinstance(found, Decap):
            found.close()
            netlink.detach_xdp(link.index, link.xdp_mode)
            lines.append(f"detached the decapsulator (program {found.prog_id}, {found.mode} mode) from {ifname}")
        elif link:
            lines.append(f"no decapsulator on {ifname}")
        remove_pins(ifname)
        return lines + backendhost.converge(ifname, None)


def status(ifname: str | None = None) -> dict:
    """The interfaces with the decapsulator (and those the record still holds VIPs for),
    and what backendhost changed on this host."""
    loader.ensure_root()
    record = backendhost.load()
    names = [ifname] if ifname else list(dict.fromkeys(netlink.link_names() + list(record["interfaces"])))
    local_now = local_addresses()
    interfaces = []
    for name in names:
        try:
            link = netlink.get_link(name)
        except NotFoundError:
            if ifname and name not in record["interfaces"]:
                raise
            link = None
        found = open_attached(link) if link else None
        if not isinstance(found, Decap) and not ifname and name not in record["interfaces"]:
            continue
        entry = {"interface": name, "program_id": None, "mode": None, "local_addresses": [], "counters": {},
                 "vips": record["interfaces"].get(name, []), "addresses_changed": False, "foreign_program": None}
        if isinstance(found, Decap):
            try:
                local = [] if found.outdated else read_local(found.fds[decap_abi.LOCAL_MAP])
                entry.update(program_id=found.prog_id, mode=found.mode, local_addresses=[str(a) for a in local],
                             counters=counters(found.fds[decap_abi.STATS_MAP]), addresses_changed=local != local_now,
                             outdated=found.outdated)
            finally:
                found.close()
        elif isinstance(found, loader.ForeignProgram):
            entry["foreign_program"] = {"id": found.prog_id, "name": found.name}
        interfaces.append(entry)
    return {"interfaces": interfaces,
            "host": {"vips_added_to_lo": record["added"], "sysctls": backendhost.sysctls(),
                     "sysctls_changed": record["sysctls"]}}
