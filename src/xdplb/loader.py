# SPDX-License-Identifier: Apache-2.0
"""Loading, attaching and finding xdplb's program on an interface.

The interface is the source of truth for what is attached: its XDP program id (from
netlink) leads to the program and its maps, whether or not bpffs is mounted. Pins
under /sys/fs/bpf/xdplb/<netns>/<ifname>/ are a cache for other tools and upgrades;
stale ones are removed whenever they are noticed.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .netlink import NetlinkError

from . import abi, build, layout, namespaces, netlink
from .dataplane import DataPlane
from .errors import BpfError, UsageError, XdplbError
from .libbpf import MapInfo, ProgInfo, libbpf

PIN_ROOT = Path("/sys/fs/bpf/xdplb")
# Native XDP on a veth delivers correct frames only when two things hold that xdplb
# cannot see from here: the peer veth runs an XDP program (else XDP_TX frames are
# dropped), and no sender on the segment leaves checksums to offload (else native XDP sees
# partial L4 checksums, which an incremental rewrite turns into wrong ones).
VETH_NATIVE_WARNING = (
    "warning: native XDP on a veth delivers only if the peer veth has an XDP program too (a "
    "pass-through one is enough; `xdplb lab up` installs one) and the senders' checksum offload "
    "is off (ethtool -K DEV tx off); otherwise balanced traffic is dropped or gets wrong "
    "checksums: use --mode generic")
VETH_AUTO_NOTE = ("mode: generic (auto: {name} is a veth, where native XDP needs an XDP program on "
                  "the peer veth and senders without checksum offload; give --mode native where both "
                  "hold, as in `xdplb lab up`)")


@dataclass
class Attachment:
    link: netlink.Link
    prog_id: int
    mode: str
    dataplane: DataPlane


@dataclass
class ForeignProgram:
    prog_id: int
    name: str


def pin_dir(ifname: str) -> Path:
    return PIN_ROOT / namespaces.netns_name() / ifname


def _prog_name(prog_fd: int) -> str:
    return libbpf().obj_info(prog_fd, ProgInfo()).name.decode(errors="replace")


def open_attached(link: netlink.Link) -> Attachment | ForeignProgram | None:
    """What is attached to the interface: ours (with its maps), someone else's, or nothing."""
    if not link.xdp_prog_id:
        return None
    lib = libbpf()
    prog_fd = lib.bpf_prog_get_fd_by_id(link.xdp_prog_id)
    if prog_fd < 0:
        raise BpfError(f"cannot open XDP program {link.xdp_prog_id} on {link.name}: "
                       f"{os.strerror(-prog_fd)}; run as root", errno=-prog_fd)
    try:
        name = _prog_name(prog_fd)
        if name != abi.PROGRAM_NAME:
            return ForeignProgram(link.xdp_prog_id, name)
        fds = program_maps(prog_fd, set(abi.MAPS))
    finally:
        os.close(prog_fd)
    if "xdplb_config" not in fds:
        for fd in fds.values():
            os.close(fd)
        return ForeignProgram(link.xdp_prog_id, name)
    return Attachment(link, link.xdp_prog_id, link.xdp_mode, DataPlane(fds))


def program_maps(prog_fd: int, names: set[str]) -> dict[str, int]:
    """Open fds of the program's maps whose names are in `names` (the caller closes them)."""
    lib = libbpf()
    fds = {}
    for map_id in lib.prog_map_ids(prog_fd):
        fd = lib.bpf_map_get_fd_by_id(map_id)
        if fd < 0:
            continue
        name = lib.obj_info(fd, MapInfo()).name.decode()
        if name in names:
            fds[name] = fd
        else:
            os.close(fd)
    return fds


def find(ifname: str) -> Attachment | None:
    """xdplb's attachment on ifname, or None. Removes stale pins on the way."""
    link = netlink.get_link(ifname)
    found = open_attached(link)
    remove_stale_pins(ifname, found.prog_id if isinstance(found, Attachment) else 0)
    return found if isinstance(found, Attachment) else None


def attached_interfaces() -> list[str]:
    """Interfaces of this namespace that carry xdplb's program."""
    out = []
    for name in netlink.link_names():
        try:
            found = open_attached(netlink.get_link(name))
        except XdplbError:
            continue
        if isinstance(found, Attachment):
            found.dataplane.close()
            out.append(name)
    return out


def remove_stale_pins(ifname: str, prog_id: int) -> None:
    directory = pin_dir(ifname)
    if not directory.exists():
        return
    pinned = libbpf().bpf_obj_get(str(directory / "prog").encode())
    if pinned >= 0:
        try:
            if libbpf().obj_info(pinned, ProgInfo()).id == prog_id:
                return
        finally:
            os.close(pinned)
    remove_pins(ifname)


def remove_pins(ifname: str) -> None:
    remove_pin_dir(pin_dir(ifname))


def remove_pin_dir(directory: Path) -> None:
    if directory.exists():
        shutil.rmtree(directory, ignore_errors=True)
    # Drop the now empty namespace level so nothing of ours lingers.
    for level in (directory.parent, PIN_ROOT):
        try:
            level.rmdir()
        except OSError:
            break


def _pin(ifname: str, prog_fd: int, map_fds: dict[str, int]) -> str | None:
    return pin_into(pin_dir(ifname), prog_fd, map_fds)


def pin_into(directory: Path, prog_fd: int, map_fds: dict[str, int]) -> str | None:
    """Pins program and maps (replacing what the directory held); returns a warning
    instead of failing without bpffs."""
    try:
        namespaces.ensure_bpffs()
    except XdplbError as exc:
        return f"warning: maps not pinned ({exc})"
    remove_pin_dir(directory)
    directory.mkdir(parents=True, mode=0o700)
    lib = libbpf()
    lib.check(lib.bpf_obj_pin(prog_fd, str(directory / "prog").encode()), "pin program")
    for name, fd in map_fds.items():
        lib.check(lib.bpf_obj_pin(fd, str(directory / name).encode()), f"pin {name}")
    return None


def check_snat_range(lo: int, hi: int) -> None:
    """SNAT ports must not be ones the kernel hands to this host's own connections."""
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        eph_lo, eph_hi = int(text[0]), int(text[1])
    except (OSError, ValueError, IndexError):
        return
    if lo <= eph_hi and eph_lo <= hi:
        raise UsageError(f"SNAT ports {lo}-{hi} overlap this host's ephemeral ports {eph_lo}-{eph_hi} "
                         "(net.ipv4.ip_local_port_range); pick another range with --snat-ports")


def _attach_with_mode(link: netlink.Link, prog_fd: int, mode: str, replace: bool) -> tuple[str, list[str]]:
    notes = []
    if mode == "auto" and replace and link.xdp_mode in ("native", "generic"):
        # A program is replaced where it runs: the kernel holds one mode per interface.
        modes, notes = [link.xdp_mode], [f"mode: {link.xdp_mode} (auto: the program it replaces runs so)"]
    elif mode == "auto" and link.kind == "veth":
        modes, notes = ["generic"], [VETH_AUTO_NOTE.format(name=link.name)]
    else:
        modes = ["native", "generic"] if mode == "auto" else [mode]
    last = None
    for m in modes:
        try:
            netlink.attach_xdp(link.index, prog_fd, m, replace)
        except NetlinkError as exc:
            last = exc
            if exc.code == 16:  # EBUSY: something appeared meanwhile, or a mode clash
                break
            continue
        if mode == "auto" and not notes:
            notes.append(f"mode: {m} (auto: {'the driver supports native XDP' if m == 'native' else 'no native XDP in this driver'})")
        if m == "native" and link.kind == "veth":
            notes.append(VETH_NATIVE_WARNING)
        return m, notes
    raise XdplbError(f"cannot attach XDP to {link.name} in {mode} mode: {os.strerror(last.code)}; "
                     f"try --mode generic" if mode != "generic" else
                     f"cannot attach XDP to {link.name}: {os.strerror(last.code)}")


def load_and_attach(link: netlink.Link, mode: str, replace: bool, flow_slots: int,
                    fill) -> tuple[Attachment, list[str]]:
    """Loads a fresh program, fills its maps (fill(dataplane), before any packet can
    see them), attaches it and pins it. On any failure nothing stays behind: not the
    program on the interface, not a pin."""
    lib = libbpf()
    obj = lib.load_object(str(build.require_object()), {"xdplb_flows": flow_slots, "xdplb_flow_ends": flow_slots,
                                                          "xdplb_flows6": layout.flow_capacity6(flow_slots)})
    attached = ""
    fds: dict[str, int] = {}
    try:
        for name in abi.MAPS:
            fds[name] = os.dup(lib.map_fd(obj, name))
        dataplane = DataPlane(fds)
        fill(dataplane)
        prog_fd = lib.prog_fd(obj, abi.PROGRAM_NAME)
        chosen, notes = _attach_with_mode(link, prog_fd, mode, replace)
        attached = chosen
        warning = _pin(link.name, prog_fd, fds)
        if warning:
            notes.append(warning)
        prog_id = lib.obj_info(prog_fd, ProgInfo()).id
        return Attachment(link, prog_id, chosen, dataplane), notes
    except BaseException:
        if attached:
            netlink.detach_xdp(link.index, attached)
        remove_pins(link.name)
        for fd in fds.values():
            os.close(fd)
        raise
    finally:
        lib.bpf_object__close(obj)


def upgrade(attachment: Attachment) -> tuple[int, int, str | None]:
    """Loads the built object into the running program's maps (flow table, services,
    rings, counters all carry over) and swaps it in atomically. Refuses, changing
    nothing, when the new object's maps do not fit the running ones. Returns the old
    and new program ids, and a warning if the pins could not be renewed."""
    lib = libbpf()
    link = attachment.link
    dp = attachment.dataplane
    running_abi = dp.read_abi_version()
    if running_abi != abi.ABI_VERSION:
        raise XdplbError(f"the running data plane speaks ABI {running_abi}, this xdplb ABI {abi.ABI_VERSION}: "
                         f"the state cannot be carried over; detach and attach instead (drops flows)")
    obj = lib.open_object(str(build.require_object()))
    try:
        problems = []
        for name, fd in dp.fds.items():
            m = lib.bpf_object__find_map_by_name(obj, name.encode())
            info = lib.obj_info(fd, MapInfo())
            if not m:
                problems.append(f"{name} is gone")
                continue
            new = (lib.bpf_map__type(m), lib.bpf_map__key_size(m), lib.bpf_map__value_size(m))
            old = (info.type, info.key_size, info.value_size)
            if new != old:
                problems.append(f"{name} changed (type, key size, value size) {old} -> {new}")
        missing = [name for name in abi.MAPS if name not in dp.fds]
        if missing or problems:
            raise XdplbError("the new program's maps do not fit the running ones ("
                             + "; ".join(problems + [f"{n} is new" for n in missing])
                             + "); nothing changed. Detach and attach instead (drops flows)")
        for name, fd in dp.fds.items():
            m = lib.bpf_object__find_map_by_name(obj, name.encode())
            lib.check(lib.bpf_map__reuse_fd(m, fd), f"reuse map {name}")
    except BaseException:
        lib.bpf_object__close(obj)
        raise
    lib.load_opened(obj)
    try:
        prog_fd = lib.prog_fd(obj, abi.PROGRAM_NAME)
        old_fd = lib.bpf_prog_get_fd_by_id(attachment.prog_id)
        lib.check(old_fd, "open the running program")
        try:
            netlink.replace_xdp(link.index, prog_fd, old_fd, attachment.mode)
        except NetlinkError as exc:
            raise XdplbError(f"cannot replace the program on {link.name}: {os.strerror(exc.code)}; "
                             "it changed meanwhile? check with: xdplb status") from None
        finally:
            os.close(old_fd)
        new_id = lib.obj_info(prog_fd, ProgInfo()).id
        return attachment.prog_id, new_id, _pin(link.name, prog_fd, dp.fds)
    finally:
        lib.bpf_object__close(obj)


def detach(link: netlink.Link) -> None:
    netlink.detach_xdp(link.index, link.xdp_mode)
    remove_pins(link.name)


def ensure_root() -> None:
    if os.geteuid() != 0:
        raise XdplbError("xdplb needs root (CAP_BPF and CAP_NET_ADMIN) for this; run it with sudo")

