# SPDX-License-Identifier: Apache-2.0
"""The model of what is wanted: an interface's settings and services, before they
become map entries (layout.py), and the parsing of what users type for them."""
from __future__ import annotations

import functools
import ipaddress
import re
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import abi
from .errors import NotFoundError, UsageError

if TYPE_CHECKING:
    from .health import CheckSpec

PROTOCOLS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}
PROTOCOL_NAMES = {v: k for k, v in PROTOCOLS.items()}
RING_SIZE_DEFAULT = 65537
RING_SIZE_MAX = abi.RING_SLOTS  # every ring map has this many slots
MAX_WEIGHT = 65535
MAX_UDP_TIMEOUT_S = 65535  # a flow keeps its service's udp_timeout in 16 bits


Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def host_text(addr: Address) -> str:
    """An address as it is written before ":PORT": IPv6 in brackets ([fd00::1]:80)."""
    return f"[{addr}]" if addr.version == 6 else str(addr)


@dataclass(frozen=True, order=True)
class Backend:
    addr: Address
    port: int
    weight: int = 1

    # Formatting an address is slow, and a plan asks thousands of times.
    @functools.cached_property
    def host(self) -> str:
        return str(self.addr)

    @functools.cached_property
    def endpoint(self) -> str:
        return f"{host_text(self.addr)}:{self.port}"


@dataclass
class Service:
    vip: Address
    port: int
    proto: str = "tcp"
    backends: list[Backend] = field(default_factory=list)
    clients: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = field(default_factory=list)  # empty: everyone
    ring_size: int = RING_SIZE_DEFAULT
    udp_timeout_s: int = 0  # a UDP service's idle timeout; 0: the interface's timeouts.udp
    not_allowed: str = "drop"  # clients outside `clients`: "drop" (counted) or "pass" to the kernel
    forward: str = "nat"  # how packets reach the backends: one of FORWARD_MODES

    @property
    def name(self) -> str:
        return f"{host_text(self.vip)}:{self.port}/{self.proto}"


@dataclass
class Settings:
    """Settings of one interface's data plane (xdplb_config)."""
    snat_addrs: list[ipaddress.IPv4Address]  # 1 to abi.MAX_SNAT_ADDRS
    snat_port_min: int = 10000
    snat_port_max: int = 32767
    hash_seed: int = 0x5eed
    tcp_timeout_s: int = 900
    tcp_closing_timeout_s: int = 120
    udp_timeout_s: int = 300
    tcp_syn_timeout_s: int = 5
    encap_source: ipaddress.IPv4Address | None = None  # outer source of IPIP packets; None: the SNAT address
    encap_source6: ipaddress.IPv6Address | None = None  # the same for IPv6 services (ip6ip6); None: none
    trace: bool = False  # read back only: a trace lease is live (see DataPlane.renew_trace)

    def timeouts(self) -> dict[str, int]:
        """The timeouts by their configuration key (the `timeouts` table)."""
        return {key: getattr(self, name) for key, name in TIMEOUT_FIELDS.items()}

    def with_timeouts(self, timeouts: dict[str, int]) -> "Settings":
        for key, value in timeouts.items():
            setattr(self, TIMEOUT_FIELDS[key], value)
        return self


# Configuration key of each timeout -> its Settings field (seconds; 0: never expire).
TIMEOUT_FIELDS = {"tcp": "tcp_timeout_s", "tcp_closing": "tcp_closing_timeout_s", "udp": "udp_timeout_s",
                  "tcp_syn": "tcp_syn_timeout_s"}

MODES = ("auto", "native", "generic")
# nat: full NAT (replies come back through the balancer); dsr: only the destination MAC
# changes; ipip: encapsulated towards the backend. In dsr and ipip replies bypass it.
FORWARD_MODES = ("nat", "dsr", "ipip")
FLOWS_DEFAULT = 1_048_576
FLOWS_MAX = 1 << 22  # 16M slots of 64 bytes: 1 GiB of flow table


@dataclass
class InterfaceConfig:
    """The wanted state of one interface: what a config file's [interfaces.NAME] table
    says, what export writes, and what every command hands to control.converge."""
    name: str
    mode: str = "auto"
    flows: int = FLOWS_DEFAULT
    snat: list[ipaddress.IPv4Address] | None = None  # None: the interface's primary address
    snat_ports: tuple[int, int] = (Settings.snat_port_min, Settings.snat_port_max)
    encap_source: ipaddress.IPv4Address | None = None  # IPIP outer source; None: the first SNAT address
    # Of IPv6 services (ip6ip6); None: the interface's first global IPv6 address.
    encap_source6: ipaddress.IPv6Address | None = None
    seed: int = Settings.hash_seed
    timeouts: dict = field(default_factory=lambda: Settings(snat_addrs=[]).timeouts())
    services: list[Service] = field(default_factory=list)
    health: dict[str, "CheckSpec"] = field(default_factory=dict)  # service name -> check (serve)

    def settings(self, default_snat: list[ipaddress.IPv4Address],
                 default_encap6: ipaddress.IPv6Address | None = None) -> Settings:
        return Settings(snat_addrs=list(self.snat or default_snat), snat_port_min=self.snat_ports[0],
                        snat_port_max=self.snat_ports[1], hash_seed=self.seed, encap_source=self.encap_source,
                        encap_source6=self.encap_source6 or default_encap6).with_timeouts(self.timeouts)

    def needs_encap6(self) -> bool:
        """Whether an IPv6 service encapsulates (and so needs an IPv6 outer source)."""
        return any(s.vip.version == 6 and s.forward == "ipip" for s in self.services)

    def service(self, name: str) -> Service | None:
        return next((s for s in self.services if s.name == name), None)


def parse_port(text: str, what: str = "port") -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise UsageError(f"bad {what} {text!r}: give a number from 1 to 65535")
    return port


def parse_encap_sources(text: str) -> tuple[ipaddress.IPv4Address | None, ipaddress.IPv6Address | None]:
    """ADDR[,ADDR]: the outer source of IPIP packets, at most one per family."""
    out: dict[int, Address] = {}
    for item in text.split(","):
        addr = parse_address(item.strip(), "encapsulation source")
        if addr.version in out:
            raise UsageError(f"bad encapsulation sources {text!r}: two IPv{addr.version} addresses; give at most "
                             "one per family, like 10.0.0.2,fd00::2")
        out[addr.version] = addr
    return out.get(4), out.get(6)


def parse_snat_addresses(text: str) -> list[Address]:
    """ADDR[,ADDR...]: the SNAT pool."""
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            raise UsageError(f"bad SNAT addresses {text!r}: empty entry; give ADDR[,ADDR...]")
        addr = parse_address(item, "SNAT address")
        if addr in out:
            raise UsageError(f"bad SNAT addresses {text!r}: {addr} listed twice")
        out.append(addr)
    if len(out) > abi.MAX_SNAT_ADDRS:
        raise UsageError(f"{len(out)} SNAT addresses: at most {abi.MAX_SNAT_ADDRS}")
    return out


_NUMERIC_PART = re.compile(r"0[xX][0-9a-fA-F]*|[0-9]+")


def looks_numeric(text: str) -> bool:
    """Whether the C library (inet_aton, so getaddrinfo) reads text as an address rather
    than a name: dotted parts in decimal, octal or hex ("127.1", "10", "010.0.0.1")."""
    return bool(text) and all(_NUMERIC_PART.fullmatch(part) for part in text.split("."))


def parse_address(text: str, what: str = "address", family: int | None = None) -> Address:
    """An IPv4 or IPv6 address (IPv6 bare or in brackets), or a host name resolved to
    one: of `family` (4 or 6) when given, else IPv4 if the name has an IPv4 address."""
    literal = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        addr = ipaddress.ip_address(literal)
    except ValueError:
        addr = None
    if addr is not None:
        if addr.version == 6 and addr.scope_id:
            raise UsageError(f"bad {what} {text!r}: an address with a zone (%{addr.scope_id}) is link-local to "
                             "one interface; give a global or unique-local IPv6 address")
        if addr.version == 6 and addr.ipv4_mapped:
            # The maps keep IPv4 addresses in that very form (layout.addr_words).
            raise UsageError(f"bad {what} {text!r}: an IPv4-mapped IPv6 address; give the IPv4 address, "
                             f"{addr.ipv4_mapped}")
        return addr
    if literal != text or ":" in text:
        raise UsageError(f"bad {what} {text!r}: not an IPv6 address (give it like fd00::1 or [fd00::1])")
    # getaddrinfo would turn these into surprising addresses ("10" is 0.0.0.10, "010.0.0.1"
    # is 8.0.0.1) instead of failing: only the four-decimal form above is an address.
    if looks_numeric(text):
        try:
            meant = socket.inet_ntoa(socket.inet_aton(text))
        except OSError:
            raise UsageError(f"bad {what} {text!r}: give an IPv4 address as four numbers from 0 to 255, "
                             "like 10.0.0.1") from None
        raise UsageError(f"bad {what} {text!r}: write the IPv4 address in full, as four decimal numbers "
                         f"(this shorthand means {meant})")
    af = {4: socket.AF_INET, 6: socket.AF_INET6}.get(family, socket.AF_UNSPEC)
    try:
        infos = socket.getaddrinfo(text, None, af, socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        kind = {4: "an IPv4 address or a name with one", 6: "an IPv6 address or a name with one"}.get(
            family, "an address or a resolvable name")
        raise UsageError(f"bad {what} {text!r}: give {kind}") from None
    found = [a for a in (ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos)
             if not (a.version == 6 and a.ipv4_mapped)]
    if not found:
        raise UsageError(f"bad {what} {text!r}: it resolves to IPv4-mapped IPv6 addresses only; give the IPv4 address")
    return next((a for a in found if a.version == 4), found[0])


def split_host_port(text: str, what: str) -> tuple[str, str | None]:
    """ADDR, NAME, ADDR:PORT, NAME:PORT, [IPV6] or [IPV6]:PORT -> (host, port or None).
    A bare IPv6 address takes no port; one whose last group could be a port is refused
    as ambiguous (fd00::1:80 is an address, not fd00::1 port 80)."""
    if text.startswith("["):
        host, sep, rest = text.partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise UsageError(f"bad {what} {text!r}: write an IPv6 address with a port as [ADDR]:PORT, "
                             "like [fd00::1]:80")
        return host + "]", rest[1:] if rest else None
    if text.count(":") > 1:
        head, _, last = text.rpartition(":")
        if last.isdigit() and 1 <= int(last) <= 65535 and _is_ipv6(head) and _is_ipv6(text):
            raise UsageError(f"bad {what} {text!r}: ambiguous: it reads as the IPv6 address {text}; for port "
                             f"{last} write [{head}]:{last}, for the address alone [{text}]")
        return text, None
    host, sep, port = text.rpartition(":")
    return (host, port) if sep else (text, None)


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
        return True
    except ValueError:
        return False


def parse_weight(text: str) -> int:
    try:
        weight = int(text)
    except ValueError:
        weight = -1
    if not 0 <= weight <= MAX_WEIGHT:
        raise UsageError(f"bad weight {text!r}: give a number from 0 (no new flows) to {MAX_WEIGHT}")
    return weight


def parse_backend(text: str, default_port: int, weight: int = 1) -> Backend:
    """ADDR or NAME, optionally :PORT, optionally =WEIGHT."""
    text = text.strip()
    if not text:
        raise UsageError("empty backend in the list: give ADDR[:PORT][=WEIGHT] separated by commas")
    text, sep, w = text.partition("=")
    if sep:
        weight = parse_weight(w)
    host, port = split_host_port(text, "backend")
    return Backend(parse_address(host, "backend"), parse_port(port or str(default_port), "backend port"), weight)


def parse_backends(text: str, default_port: int) -> list[Backend]:
    backends = [parse_backend(part, default_port) for part in text.split(",")]
    seen = set()
    for b in backends:
        if b.endpoint in seen:
            raise UsageError(f"backend {b.endpoint} is listed twice; list each backend once")
        seen.add(b.endpoint)
    return backends


NOT_ALLOWED_ACTIONS = ("drop", "pass")


def parse_not_allowed(text: str) -> str:
    action = text.lower()
    if action not in NOT_ALLOWED_ACTIONS:
        raise UsageError(f"bad not-allowed action {text!r}: use drop (the default) or pass")
    return action


def parse_forward(text: str) -> str:
    mode = text.lower()
    if mode not in FORWARD_MODES:
        raise UsageError(f"bad forwarding mode {text!r}: use nat (full NAT, the default), dsr (direct server "
                         "return) or ipip (encapsulation)")
    return mode


def parse_proto(text: str) -> str:
    proto = text.lower()
    if proto not in PROTOCOLS:
        raise UsageError(f"bad protocol {text!r}: use tcp or udp")
    return proto


_V4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def parse_networks(text: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    out = []
    for part in text.split(","):
        try:
            network = ipaddress.ip_network(part.strip())
        except ValueError:
            network = None
        if network is not None:
            if network.version == 6 and network.subnet_of(_V4_MAPPED):
                raise UsageError(f"bad client network {part!r}: IPv4-mapped IPv6 addresses (::ffff:0:0/96); "
                                 "give IPv4 networks for IPv4 clients")
            out.append(network)
            continue
        # 10.0.0.1/8 most likely means 10.0.0.0/8, but it may be a typo for 10.0.0.1/32:
        # say which network it is rather than guess.
        try:
            network = ipaddress.ip_network(part.strip(), strict=False)
        except ValueError:
            raise UsageError(f"bad client network {part!r}: give CIDRs like 10.0.0.0/24 or fd00::/64") from None
        raise UsageError(f"bad client network {part!r}: it has host bits set; write the network, {network}")
    return out


def parse_port_range(text: str) -> tuple[int, int]:
    low, sep, high = text.partition("-")
    lo, hi = parse_port(low, "SNAT port"), parse_port(high if sep else low, "SNAT port")
    if hi - lo < 255:
        raise UsageError(f"SNAT port range {text!r} is too small: give at least 256 ports, like 10000-32767")
    return lo, hi


def parse_service(text: str) -> tuple[Address, int, str]:
    """VIP:PORT[/tcp|udp], an IPv6 VIP in brackets ([fd00::1]:80/tcp)."""
    spec, _, proto = text.partition("/")
    if not spec.startswith("[") and spec.count(":") > 1:
        head, _, last = spec.rpartition(":")
        hint = f"[{head}]:{last}" if last.isdigit() and _is_ipv6(head) else "[VIP]:PORT"
        raise UsageError(f"bad service {text!r}: write an IPv6 VIP in brackets, like {hint}/{proto or 'tcp'}")
    host, port = split_host_port(spec, "service")
    if port is None:
        raise UsageError(f"bad service {text!r}: give VIP:PORT[/tcp|udp], like 10.0.0.2:80/tcp or [fd00::1]:80/tcp")
    return parse_address(host, "VIP"), parse_port(port), parse_proto(proto or "tcp")


def find_service(services: list[Service], spec: str) -> Service:
    vip, port, proto = parse_service(spec)
    for s in services:
        if (s.vip, s.port, s.proto) == (vip, port, proto):
            return s
    names = ", ".join(s.name for s in services) or "none"
    raise NotFoundError(f"no service {host_text(vip)}:{port}/{proto} here (services: {names}); add it with: "
                     "xdplb service add")


def find_backend(svc: Service, backend_text: str) -> Backend:
    b = parse_backend(backend_text, svc.port)
    for x in svc.backends:
        if x.endpoint == b.endpoint:
            return x
    raise NotFoundError(f"no backend {b.endpoint} in {svc.name} (backends: "
                     f"{', '.join(x.endpoint for x in svc.backends) or 'none'})")
