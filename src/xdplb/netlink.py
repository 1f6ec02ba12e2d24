# SPDX-License-Identifier: Apache-2.0
"""Netlink through pyroute2: interfaces, XDP attach/detach/query, addresses, next hops,
and the namespaces, veths and bridges the lab is built of. The only module that uses
pyroute2.

Everything works in the process's current network namespace (namespaces.py moves the
process into the one the user asked for), except where a function takes netns: then in
the network namespace of that name (/run/netns/<netns>).

Failed requests raise NetlinkError (re-exported from pyroute2); its .code is the errno.
"""
from __future__ import annotations

import errno
import ipaddress
import socket
import time
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2 import netns as _netns
from pyroute2.netlink.exceptions import NetlinkError  # re-exported: callers catch netlink.NetlinkError
from pyroute2.netlink.rtnl.ifinfmsg import (XDP_FLAGS_DRV_MODE, XDP_FLAGS_REPLACE, XDP_FLAGS_SKB_MODE,
                                            XDP_FLAGS_UPDATE_IF_NOEXIST)

from .errors import NotFoundError, UsageError, XdplbError

MODES = {"native": XDP_FLAGS_DRV_MODE, "generic": XDP_FLAGS_SKB_MODE}
# IFLA_XDP_ATTACHED, as a number or as pyroute2's name for it
_ATTACHED_MODE = {1: "native", 2: "generic", 3: "offload",
                  "xdp": "native", "xdpgeneric": "generic", "xdpoffload": "offload"}

NUD_VALID = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80  # reachable stale delay probe noarp permanent
NEIGH_WAIT_S = 1.5


@dataclass
class Link:
    index: int
    name: str
    kind: str  # "veth", "bridge", ... or "" for a physical device
    mac: str
    up: bool
    xdp_prog_id: int  # 0 when nothing is attached
    xdp_mode: str  # "native", "generic", "offload" or ""


def _attr(msg, name, default=None):
    value = msg.get_attr(name)
    return default if value is None else value


def _ipr(netns: str | None = None) -> IPRoute:
    """A netlink socket in network namespace netns, or in the current one."""
    return IPRoute(netns=netns) if netns else IPRoute()


def get_link(name: str, netns: str | None = None) -> Link:
    with _ipr(netns) as ipr:
        try:
            msgs = ipr.link("get", ifname=name)
        except NetlinkError as exc:
            if exc.code in (errno.ENODEV, errno.ENOENT):
                where = f"ip -n {netns} link" if netns else "ip link"
                raise NotFoundError(f"no interface named {name!r} here; list them with: {where}") from exc
            raise
    msg = msgs[0]
    kind = ""
    info = msg.get_attr("IFLA_LINKINFO")
    if info is not None:
        kind = info.get_attr("IFLA_INFO_KIND") or ""
    prog_id, mode = 0, ""
    xdp = msg.get_attr("IFLA_XDP")
    if xdp is not None:
        mode = _ATTACHED_MODE.get(xdp.get_attr("IFLA_XDP_ATTACHED"), "")
        prog_id = xdp.get_attr("IFLA_XDP_PROG_ID") or 0
    return Link(index=msg["index"], name=name, kind=kind,
                mac=_attr(msg, "IFLA_ADDRESS", ""), up=bool(msg["flags"] & 1),
                xdp_prog_id=prog_id, xdp_mode=mode if prog_id else "")


def ipv4_addresses(index: int) -> list[ipaddress.IPv4Interface]:
    """The interface's IPv4 addresses, primary first."""
    with IPRoute() as ipr:
        msgs = ipr.get_addr(family=socket.AF_INET, index=index)
    out = []
    for m in sorted(msgs, key=lambda m: bool(m["flags"] & 0x01)):  # IFA_F_SECONDARY last
        out.append(ipaddress.IPv4Interface(f"{m.get_attr('IFA_ADDRESS')}/{m['prefixlen']}"))
    return out


def global_ipv6_addresses(index: int) -> list[ipaddress.IPv6Address]:
    """The interface's usable IPv6 addresses of global scope (unique-local ones included):
    not deprecated (a VIP the host holds, see add_address), tentative or failed DAD."""
    with IPRoute() as ipr:
        msgs = ipr.get_addr(family=socket.AF_INET6, index=index)
    unusable = IFA_F_DADFAILED | IFA_F_DEPRECATED | IFA_F_TENTATIVE
    return [ipaddress.IPv6Address(m.get_attr("IFA_ADDRESS")) for m in msgs
            if m["scope"] == 0 and not (m.get_attr("IFA_FLAGS") or m["flags"]) & unusable]


def local_ipv4_addresses() -> set[ipaddress.IPv4Address]:
    """Every IPv4 address of this network namespace."""
    with IPRoute() as ipr:
        return {ipaddress.IPv4Address(m.get_attr("IFA_ADDRESS")) for m in ipr.get_addr(family=socket.AF_INET)}


def link_names(netns: str | None = None) -> list[str]:
    """The names of every interface of the namespace."""
    with _ipr(netns) as ipr:
        return [m.get_attr("IFLA_IFNAME") for m in ipr.get_links()]


def attach_xdp(index: int, prog_fd: int, mode: str, replace: bool, netns: str | None = None) -> None:
    """Attaches; unless replace is set, fails with EBUSY if any program is there."""
    flags = MODES[mode] | (0 if replace else XDP_FLAGS_UPDATE_IF_NOEXIST)
    with _ipr(netns) as ipr:
        ipr.link("set", index=index,
                 xdp={"attrs": [("IFLA_XDP_FD", prog_fd), ("IFLA_XDP_FLAGS", flags)]})


def replace_xdp(index: int, prog_fd: int, expected_fd: int, mode: str) -> None:
    """Swaps the attached program for another in one step, only if the attached one is
    still expected_fd's (XDP_FLAGS_REPLACE): no packet sees the interface without XDP."""
    with IPRoute() as ipr:
        ipr.link("set", index=index,
                 xdp={"attrs": [("IFLA_XDP_FD", prog_fd), ("IFLA_XDP_FLAGS", MODES[mode] | XDP_FLAGS_REPLACE),
                                ("IFLA_XDP_EXPECTED_FD", expected_fd)]})


def detach_xdp(index: int, mode: str) -> None:
    flags = MODES.get(mode, 0)
    with IPRoute() as ipr:
        ipr.link("set", index=index,
                 xdp={"attrs": [("IFLA_XDP_FD", -1), ("IFLA_XDP_FLAGS", flags)]})


# Building topologies (the lab, tests): namespaces, veths, bridges, addresses.

def netns_names() -> list[str]:
    """The named network namespaces (those under /run/netns)."""
    return _netns.listnetns()


def add_netns(name: str) -> None:
    _netns.create(name)


def remove_netns(name: str) -> None:
    _netns.remove(name)


def has_link(ifname: str, netns: str | None = None) -> bool:
    with _ipr(netns) as ipr:
        return bool(ipr.link_lookup(ifname=ifname))


def set_link_up(ifname: str, netns: str | None = None, master: str | None = None) -> None:
    """Brings the interface up, first making it a port of bridge `master` if given."""
    with _ipr(netns) as ipr:
        index = ipr.link_lookup(ifname=ifname)[0]
        if master is None:
            ipr.link("set", index=index, state="up")
        else:
            ipr.link("set", index=index, master=ipr.link_lookup(ifname=master)[0], state="up")


def add_bridge(name: str, netns: str | None = None) -> None:
    with _ipr(netns) as ipr:
        ipr.link("add", ifname=name, kind="bridge")


def add_veth(name: str, peer: str, netns: str | None = None, peer_netns: str | None = None) -> None:
    """A veth pair: `name` in netns, `peer` in peer_netns (or beside it when None)."""
    peer_spec = {"ifname": peer} if peer_netns is None else {"ifname": peer, "net_ns_fd": peer_netns}
    with _ipr(netns) as ipr:
        ipr.link("add", ifname=name, kind="veth", peer=peer_spec)


IFA_F_NODAD = 0x02
IFA_F_DADFAILED = 0x08
IFA_F_DEPRECATED = 0x20
IFA_F_TENTATIVE = 0x40


def add_address(ifname: str, address: str, prefixlen: int, netns: str | None = None, vip: bool = False) -> None:
    """An IPv4 or IPv6 address on ifname. IPv6 ones skip duplicate address detection:
    usable at once, not a second or two later (every address given here is one we chose).
    A VIP (vip=True) of IPv6 is deprecated from the start (preferred lifetime 0, valid for
    ever): it still takes packets and answers from itself, but the kernel never picks it
    as the source of a connection of its own (RFC 6724, rule 3), where IPv4 has the
    route's preferred source to keep a VIP out of the way."""
    with _ipr(netns) as ipr:
        extra = {"flags": IFA_F_NODAD} if ":" in address else {}
        if vip and ":" in address:
            extra |= {"preferred_lft": 0, "valid_lft": 0xFFFFFFFF}
        ipr.addr("add", index=ipr.link_lookup(ifname=ifname)[0], address=address, prefixlen=prefixlen, **extra)


@dataclass
class NextHop:
    ifindex: int
    dmac: str
    smac: str


def _neighbours(ipr) -> dict[tuple[int, str], str]:
    """(ifindex, address) -> MAC for every usable neighbour entry, ARP's (IPv4) and
    neighbour discovery's (IPv6; addresses in the compressed form str() of an address
    gives)."""
    out = {}
    for family in (socket.AF_INET, socket.AF_INET6):
        for n in ipr.get_neighbours(family=family):
            mac = n.get_attr("NDA_LLADDR")
            if mac and n["state"] & NUD_VALID:
                out[(n["ifindex"], str(ipaddress.ip_address(n.get_attr("NDA_DST"))))] = mac
    return out


def _provoke_resolution(addr: str) -> None:
    """Makes the kernel resolve addr's MAC (ARP or neighbour discovery): a datagram to
    the discard port needs it."""
    with socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.sendto(b"", (addr, 9))
        except OSError:
            pass


def _interface_mac(ipr, index: int) -> str:
    return ipr.link("get", index=index)[0].get_attr("IFLA_ADDRESS")


def _path(ipr, addr: str) -> tuple[int, str, bool] | None:
    """(egress ifindex, next hop address, whether addr is this host's own) towards addr;
    None without a route."""
    try:
        route = ipr.route("get", dst=addr, family=socket.AF_INET6 if ":" in addr else socket.AF_INET)[0]
    except NetlinkError:
        return None
    gateway = route.get_attr("RTA_GATEWAY")
    hop = str(ipaddress.ip_address(gateway)) if gateway else addr
    return route.get_attr("RTA_OIF"), hop, route["type"] == 2  # RTN_LOCAL


def _next_hop(ipr, macs: dict[int, str], known: dict, oif: int, hop: str) -> NextHop:
    """The next hop out of oif to hop, whose MAC the neighbour table knows; macs caches
    the interfaces' own MACs."""
    if oif not in macs:
        macs[oif] = _interface_mac(ipr, oif)
    return NextHop(ifindex=oif, dmac=known[(oif, hop)], smac=macs[oif])


def next_hops_now(addrs: list[str]) -> dict[str, NextHop]:
    """What the kernel's route and neighbour tables say now about each address, for
    those it knows; never waits and never fails (a refresh keeps what it cannot see)."""
    with IPRoute() as ipr:
        known = _neighbours(ipr)
        macs: dict[int, str] = {}
        out = {}
        for addr in dict.fromkeys(addrs):
            path = _path(ipr, addr)
            if path is None or path[2] or path[:2] not in known:
                continue
            out[addr] = _next_hop(ipr, macs, known, *path[:2])
        return out


def resolve_next_hops(addrs: list[str]) -> dict[str, NextHop]:
    """Egress interface and MACs towards each address, from the kernel's route and
    neighbour tables, resolving neighbours the kernel does not know yet (all at once)."""
    with IPRoute() as ipr:
        routes = {}
        for addr in dict.fromkeys(addrs):
            path = _path(ipr, addr)
            if path is None:
                raise XdplbError(f"no route to backend {addr}; add one (ip route) or fix the address")
            if path[2]:
                raise UsageError(f"backend {addr} is an address of this host; give the backends' addresses")
            routes[addr] = path[:2]
        known = _neighbours(ipr)
        missing = {hop for oif, hop in routes.values() if (oif, hop) not in known}
        deadline = time.monotonic() + NEIGH_WAIT_S
        while missing and time.monotonic() < deadline:
            for hop in missing:
                _provoke_resolution(hop)
            time.sleep(0.05)
            known = _neighbours(ipr)
            missing = {hop for oif, hop in routes.values() if (oif, hop) not in known}
        out: dict[str, NextHop] = {}
        macs: dict[int, str] = {}
        for addr, (oif, hop) in routes.items():
            if (oif, hop) not in known:
                name = ipr.link("get", index=oif)[0].get_attr("IFLA_IFNAME")
                protocol = "neighbour discovery" if ":" in hop else "ARP"
                raise XdplbError(f"backend {addr}: no {protocol} answer from {hop} on {name}; "
                                 f"check that it is up and reachable (ping {hop})")
            out[addr] = _next_hop(ipr, macs, known, oif, hop)
        return out


def on_link_ifindex(addr: str) -> int | None:
    """The interface addr is directly reachable on (a route without a gateway), or None
    (routed through a gateway, this host's own, or no route)."""
    with IPRoute() as ipr:
        path = _path(ipr, addr)
    if path is None or path[2] or path[1] != addr:
        return None
    return path[0]


# A backend of ipip services (decap.py, backendhost.py): its addresses, the VIPs on lo.

def ipv4_addresses_by_link() -> dict[str, list[ipaddress.IPv4Interface]]:
    """Every interface's IPv4 addresses (the local end of a point-to-point one), by name."""
    with IPRoute() as ipr:
        names = {m["index"]: m.get_attr("IFLA_IFNAME") for m in ipr.get_links()}
        out: dict[str, list[ipaddress.IPv4Interface]] = {name: [] for name in names.values()}
        for m in ipr.get_addr(family=socket.AF_INET):
            local = m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS")
            out.setdefault(names.get(m["index"], str(m["index"])), []).append(
                ipaddress.IPv4Interface(f"{local}/{m['prefixlen']}"))
    return out


def addresses_by_link() -> dict[str, list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]]:
    """Every interface's IPv4 and IPv6 addresses, by name."""
    out: dict[str, list] = dict(ipv4_addresses_by_link())
    with IPRoute() as ipr:
        names = {m["index"]: m.get_attr("IFLA_IFNAME") for m in ipr.get_links()}
        for m in ipr.get_addr(family=socket.AF_INET6):
            out.setdefault(names.get(m["index"], str(m["index"])), []).append(
                ipaddress.IPv6Interface(f"{m.get_attr('IFA_ADDRESS')}/{m['prefixlen']}"))
    return out


def remove_address(ifname: str, address: str, prefixlen: int) -> None:
    with IPRoute() as ipr:
        ipr.addr("del", index=ipr.link_lookup(ifname=ifname)[0], address=address, prefixlen=prefixlen)


def addresses_in(ifname: str, netns: str | None = None) -> list:
    """ifname's IPv4 and IPv6 addresses, in a namespace given by name."""
    with _ipr(netns) as ipr:
        index = ipr.link_lookup(ifname=ifname)[0]
        return [ipaddress.ip_interface(f"{m.get_attr('IFA_LOCAL') or m.get_attr('IFA_ADDRESS')}/{m['prefixlen']}")
                for m in ipr.get_addr(index=index)]


