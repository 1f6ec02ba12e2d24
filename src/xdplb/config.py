# SPDX-License-Identifier: Apache-2.0
"""The declarative configuration file (TOML): reading and validating it into the model
(model.InterfaceConfig), and writing the running state back out as one.

    [interfaces.eth0]
    mode = "auto"                 # auto | native | generic
    flows = 1048576               # flow table capacity (fixed while attached)
    snat = "10.0.0.2"             # default: the interface's primary IPv4 address
    snat_ports = "10000-32767"
    # encap_source = "10.0.0.2"   # outer source of IPIP packets (default: the first SNAT address)
    seed = 24301
    timeouts = { tcp = 900, tcp_closing = 120, udp = 300, tcp_syn = 5 }

    [[interfaces.eth0.services]]
    vip = "10.0.0.2"
    port = 80
    proto = "tcp"
    forward = "nat"               # nat (full NAT) | dsr (direct server return) | ipip (encapsulation)
    clients = ["10.0.0.0/8"]      # default: every client
    # not_allowed = "pass"        # clients outside `clients`: "drop" (default, counted) or "pass" to the kernel
    # udp_timeout = 30            # UDP services only: their own idle timeout (seconds)
    backends = [
      { address = "10.0.0.11", port = 80, weight = 1 },
      { address = "10.0.0.12" },
    ]
    # Used by `xdplb serve` only: type tcp | http | udp | command.
    health = { type = "http", path = "/", expect_status = 200, interval = 2.0, timeout = 1.0, rise = 2, fall = 3 }
"""
from __future__ import annotations

import difflib
import tomllib
from pathlib import Path

from . import maglev, model
from .errors import UsageError, XdplbError
from .health import parse_check
from .model import FLOWS_DEFAULT, FLOWS_MAX, MODES, Backend, InterfaceConfig, Service  # noqa: F401 (re-exported)

INTERFACE_KEYS = {"mode", "flows", "snat", "snat_ports", "encap_source", "seed", "timeouts", "services"}
SERVICE_KEYS = {"vip", "port", "proto", "forward", "clients", "not_allowed", "backends", "ring_size", "udp_timeout",
                "health"}
BACKEND_KEYS = {"address", "port", "weight"}
TIMEOUT_KEYS = set(model.TIMEOUT_FIELDS)
MAX_TIMEOUT_S = 7 * 86400
# tcp and udp may be 0 (never expire). The other two bound how long a SNAT source stays
# held by a flow that will never send again, so "never" would leak sources; a closed
# flow must also be remembered as long as a Linux backend's TIME_WAIT (60 s), or its
# source is handed out again without the check that the backend will accept the SYN.
TIMEOUT_MIN_S = {"tcp": 0, "udp": 0, "tcp_syn": 1, "tcp_closing": 60}
TIMEOUT_TOO_SHORT = {
    "tcp_syn": "must be at least 1, not {value}: 0 (never expire) would hold the SNAT source of every "
               "handshake a client never completes for ever; give 5 (the default) or more",
    "tcp_closing": "must be at least 60, a Linux backend's TIME_WAIT, not {value}: a closed flow forgotten "
                   "sooner hands out its SNAT source blindly, and 0 (never expire) holds it for ever; "
                   "give 120 (the default) or at least 60",
}


class ConfigError(XdplbError):
    def __init__(self, path: str, problems: list[str]):
        self.problems = problems
        super().__init__(f"{path}: {len(problems)} problem{'s' if len(problems) > 1 else ''}, nothing applied:\n  "
                         + "\n  ".join(problems))


class _Checker:
    """Collects every problem with its location instead of stopping at the first."""

    def __init__(self):
        self.problems: list[str] = []

    def fail(self, where: str, message: str) -> None:
        self.problems.append(f"{where}: {message}")

    def keys(self, where: str, table, allowed: set[str]) -> bool:
        if not isinstance(table, dict):
            self.fail(where, "must be a table")
            return False
        for key in table:
            if key not in allowed:
                hint = difflib.get_close_matches(key, sorted(allowed), n=1)
                self.fail(f"{where}.{key}", "unknown key" + (f" (did you mean {hint[0]!r}?)" if hint else
                                                             f"; allowed: {', '.join(sorted(allowed))}"))
        return True

    def parse(self, where: str, fn, *args):
        try:
            return fn(*args)
        except UsageError as exc:
            self.fail(where, str(exc))
            return None

    def integer(self, where: str, value, low: int, high: int):
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            self.fail(where, f"must be a whole number from {low} to {high}, not {value!r}")
            return None
        return value

    def string(self, where: str, value, example: str):
        """value if it is a string; TOML gives numbers as numbers, and str() of one would
        read as something else (vip = 10 is not the address "10")."""
        if not isinstance(value, str):
            self.fail(where, f"must be a string like {example}, not {value!r}")
            return None
        return value


def parse(text: str, path: str = "config") -> list[InterfaceConfig]:
    """Parses and validates a whole file; raises ConfigError listing every problem."""
    interfaces, problems = check(text)
    if problems:
        raise ConfigError(path, problems)
    return interfaces


def check(text: str) -> tuple[list[InterfaceConfig], list[str]]:
    """What the file describes (as far as it could be read) and every problem in it."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return [], [f"not valid TOML: {exc}"]
    c = _Checker()
    c.keys("(top level)", data, {"interfaces"})
    interfaces = data.get("interfaces", {})
    if not isinstance(interfaces, dict) or not interfaces:
        c.fail("interfaces", "give at least one [interfaces.NAME] table")
        return [], c.problems
    out = []
    for name, table in interfaces.items():
        where = f"interfaces.{name}"
        if not c.keys(where, table, INTERFACE_KEYS):
            continue
        iface = InterfaceConfig(name)
        mode = table.get("mode", "auto")
        if mode not in MODES:
            c.fail(f"{where}.mode", f"must be one of {', '.join(MODES)}, not {mode!r}")
        iface.mode = mode
        iface.flows = c.integer(f"{where}.flows", table.get("flows", FLOWS_DEFAULT), 1024, FLOWS_MAX) or FLOWS_DEFAULT
        if "snat" in table:
            snat = table["snat"]
            if isinstance(snat, list) and all(isinstance(a, str) for a in snat):
                snat = ",".join(snat)
            if not isinstance(snat, str):
                c.fail(f"{where}.snat", 'must be an address or a list of them, as "10.0.0.2" or ["10.0.0.2", "10.0.0.3"]')
            else:
                iface.snat = c.parse(f"{where}.snat", model.parse_snat_addresses, snat)
        snat_ports_known = True  # false: a bad snat_ports, already reported
        if "snat_ports" in table:
            text = c.string(f"{where}.snat_ports", table["snat_ports"], '"10000-32767"')
            parsed = c.parse(f"{where}.snat_ports", model.parse_port_range, text) if text is not None else None
            snat_ports_known = parsed is not None
            iface.snat_ports = parsed or iface.snat_ports
        if "encap_source" in table:
            value = table["encap_source"]
            text = ",".join(value) if isinstance(value, list) and all(isinstance(v, str) for v in value) else value
            if c.string(f"{where}.encap_source", text, '"10.0.0.2" or ["10.0.0.2", "fd00::2"]'):
                parsed = c.parse(f"{where}.encap_source", model.parse_encap_sources, text)
                if parsed is not None:
                    iface.encap_source, iface.encap_source6 = parsed
        iface.seed = c.integer(f"{where}.seed", table.get("seed", iface.seed), 0, 0xFFFFFFFF) or 0
        timeouts = table.get("timeouts", {})
        if c.keys(f"{where}.timeouts", timeouts, TIMEOUT_KEYS):
            for key, value in timeouts.items():
                if key in TIMEOUT_KEYS:
                    iface.timeouts[key] = _timeout(c, f"{where}.timeouts.{key}", key, value)
        services = table.get("services", [])
        if not isinstance(services, list):
            c.fail(f"{where}.services", "must be an array of tables ([[interfaces.NAME.services]])")
            services = []
        seen = set()
        for i, entry in enumerate(services):
            svc = _service(c, f"{where}.services[{i}]", entry)
            health = None
            if isinstance(entry, dict) and "health" in entry:  # checked even if the service is not
                health = parse_check(f"{where}.services[{i}].health", entry["health"], c.fail)
            if svc is None:
                continue
            if health is not None:
                iface.health[svc.name] = health
            if svc.name in seen:
                c.fail(f"{where}.services[{i}]", f"service {svc.name} is listed twice")
            seen.add(svc.name)
            if snat_ports_known:
                _check_port_outside_snat(c, f"{where}.services[{i}].port", svc.port, iface.snat_ports,
                                         "snat_ports" in table)
            iface.services.append(svc)
        out.append(iface)
    return out, c.problems


def _timeout(c: _Checker, where: str, key: str, value) -> int:
    seconds = c.integer(where, value, 0, MAX_TIMEOUT_S)
    if seconds is None:
        return 0
    if seconds < TIMEOUT_MIN_S[key]:
        c.fail(where, TIMEOUT_TOO_SHORT[key].format(value=seconds))
    return seconds


def _check_port_outside_snat(c: _Checker, where: str, port: int, snat_ports: tuple[int, int], given: bool) -> None:
    """The data plane tells a backend's reply (to a SNAT port) from a client's packet
    (to a service port) by the destination port alone: the two ranges must not meet."""
    lo, hi = snat_ports
    if lo <= port <= hi:
        c.fail(where, f"{port} is inside snat_ports {lo}-{hi}{'' if given else ' (the default)'}, where the "
                      f"backends' replies arrive: give a service port outside {lo}-{hi}, or set snat_ports "
                      "to a range without it")


def _service(c: _Checker, where: str, entry) -> Service | None:
    if not c.keys(where, entry, SERVICE_KEYS):
        return None
    for required in ("vip", "port", "backends"):
        if required not in entry:
            c.fail(where, f"missing key {required!r}")
    vip = None
    if "vip" in entry and c.string(f"{where}.vip", entry["vip"], '"10.0.0.2"') is not None:
        vip = c.parse(f"{where}.vip", model.parse_address, entry["vip"], "VIP")
    port = c.integer(f"{where}.port", entry["port"], 1, 65535) if "port" in entry else None
    proto = None
    if c.string(f"{where}.proto", entry.get("proto", "tcp"), '"tcp" or "udp"') is not None:
        proto = c.parse(f"{where}.proto", model.parse_proto, entry.get("proto", "tcp"))
    clients = []
    raw_clients = entry.get("clients", [])
    if not isinstance(raw_clients, list):
        c.fail(f"{where}.clients", f'must be an array of CIDR strings like ["10.0.0.0/8"], not {raw_clients!r}')
        raw_clients = None
    for j, net in enumerate(raw_clients or []):
        if c.string(f"{where}.clients[{j}]", net, '"10.0.0.0/8"') is not None:
            clients.extend(c.parse(f"{where}.clients[{j}]", model.parse_networks, net) or [])
    forward = None
    if c.string(f"{where}.forward", entry.get("forward", "nat"), '"nat", "dsr" or "ipip"') is not None:
        forward = c.parse(f"{where}.forward", model.parse_forward, entry.get("forward", "nat"))
    not_allowed = None
    if c.string(f"{where}.not_allowed", entry.get("not_allowed", "drop"), '"drop" or "pass"') is not None:
        not_allowed = c.parse(f"{where}.not_allowed", model.parse_not_allowed, entry.get("not_allowed", "drop"))
    if not_allowed == "pass" and not clients and raw_clients is not None:
        c.fail(f"{where}.not_allowed", "\"pass\" needs an allow-list: set clients, or remove not_allowed")
    ring_size = c.integer(f"{where}.ring_size", entry.get("ring_size", model.RING_SIZE_DEFAULT), 3,
                          model.RING_SIZE_MAX)
    if ring_size and not maglev.is_prime(ring_size):
        c.fail(f"{where}.ring_size", f"{ring_size} is not prime (Maglev needs a prime table size, like 65537)")
    udp_timeout = 0
    if "udp_timeout" in entry:
        udp_timeout = c.integer(f"{where}.udp_timeout", entry["udp_timeout"], 1, model.MAX_UDP_TIMEOUT_S) or 0
        if proto is not None and proto != "udp":  # a bad proto is reported already
            c.fail(f"{where}.udp_timeout", "applies to UDP services only: remove it, or set proto = \"udp\"")
    backends, endpoints = [], set()
    raw = entry.get("backends", [])
    if not isinstance(raw, list):
        c.fail(f"{where}.backends", "must be an array of { address = ..., port = ..., weight = ... }")
        raw = []
    for j, b in enumerate(raw):
        bw = f"{where}.backends[{j}]"
        if not c.keys(bw, b, BACKEND_KEYS):
            continue
        if "address" not in b:
            c.fail(bw, "missing key 'address'")
            continue
        addr = None
        if c.string(f"{bw}.address", b["address"], '"10.0.0.11"') is not None:
            addr = c.parse(f"{bw}.address", model.parse_address, b["address"], "backend")
        bport = c.integer(f"{bw}.port", b.get("port", port or 1), 1, 65535)
        weight = c.integer(f"{bw}.weight", b.get("weight", 1), 0, model.MAX_WEIGHT)
        if addr is None or bport is None or weight is None:
            continue
        backend = Backend(addr, bport, weight)
        if backend.endpoint in endpoints:
            c.fail(bw, f"backend {backend.endpoint} is listed twice")
        endpoints.add(backend.endpoint)
        backends.append(backend)
    if ring_size and maglev.is_prime(ring_size) and ring_size < len(backends):
        least = next(n for n in range(len(backends), model.RING_SIZE_MAX + 1) if maglev.is_prime(n))
        c.fail(f"{where}.ring_size", f"{ring_size} slots are fewer than the {len(backends)} backends, so some "
                                     f"would get no flows (Maglev wants a table about 100 times the backend "
                                     f"count): give a prime of at least {least}, like {model.RING_SIZE_DEFAULT}")
    if vip is None or port is None or proto is None or ring_size is None:
        return None
    return Service(vip, port, proto, backends, clients, ring_size, udp_timeout, not_allowed or "drop",
                   forward or "nat")


def read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise XdplbError(f"cannot read {path}: {exc.strerror}; give the path of a TOML file") from None


# ---- writing -------------------------------------------------------------------------

def _toml_value(value) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    return str(value)


def dump(interfaces: list[InterfaceConfig]) -> str:
    lines = ["# xdplb configuration (xdplb export); apply it with: xdplb apply FILE", ""]
    for iface in interfaces:
        lines.append(f"[interfaces.{iface.name}]")
        lines.append(f"mode = {_toml_value(iface.mode)}")
        lines.append(f"flows = {iface.flows}")
        if iface.snat:
            addrs = [str(a) for a in iface.snat]
            lines.append(f"snat = {_toml_value(addrs[0] if len(addrs) == 1 else addrs)}")
        lines.append(f"snat_ports = {_toml_value(f'{iface.snat_ports[0]}-{iface.snat_ports[1]}')}")
        sources = [str(a) for a in (iface.encap_source, iface.encap_source6) if a]
        if sources:
            lines.append(f"encap_source = {_toml_value(sources[0] if len(sources) == 1 else sources)}")
        lines.append(f"seed = {iface.seed}")
        lines.append(f"timeouts = {_toml_value(iface.timeouts)}")
        for svc in iface.services:
            lines += ["", f"[[interfaces.{iface.name}.services]]",
                      f"vip = {_toml_value(str(svc.vip))}", f"port = {svc.port}",
                      f"proto = {_toml_value(svc.proto)}"]
            if svc.clients:
                lines.append(f"clients = {_toml_value([str(n) for n in svc.clients])}")
            if svc.forward != "nat":
                lines.append(f"forward = {_toml_value(svc.forward)}")
            if svc.not_allowed != "drop":
                lines.append(f"not_allowed = {_toml_value(svc.not_allowed)}")
            if svc.ring_size != model.RING_SIZE_DEFAULT:
                lines.append(f"ring_size = {svc.ring_size}")
            if svc.udp_timeout_s:
                lines.append(f"udp_timeout = {svc.udp_timeout_s}")
            lines.append("backends = [")
            for b in svc.backends:
                lines.append(f"  {_toml_value({'address': str(b.addr), 'port': b.port, 'weight': b.weight})},")
            lines.append("]")
        lines.append("")
    return "\n".join(lines)
