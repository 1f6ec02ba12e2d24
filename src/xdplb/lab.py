# SPDX-License-Identifier: Apache-2.0
"""The built-in lab: the conference demo's containers, as network namespaces.

    <p>-client  <p>-client2 ...        <p>-lb          <p>-backend-a  <p>-backend-b ...
        eth0        eth0                eth0              eth0            eth0
          \\          |                   |                 |              /
           +---------------- br0 in <p>-bridge -------------------------+

Every host has one veth (eth0) on the bridge in 10.42.0.0/24. Each backend runs
xdplb.labserver: HTTP on port 80 and UDP echo on port 5353, answering with its name and
address. The bridge-side peer of the load balancer's veth carries a pass-through XDP
program so that native XDP_TX on the load balancer delivers.
"""
from __future__ import annotations

import ipaddress
import os
import signal
import socket
import string
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import netlink
from .errors import PrerequisiteError, UsageError, XdplbError
from .labserver import HTTP_PORT, UDP_PORT
from .libbpf import libbpf
from .namespaces import run_in_netns

DEFAULT_PREFIX = "xdplb"
SUBNET = ipaddress.IPv4Network("10.42.0.0/24")
# Every host also has a unique-local IPv6 address, host number for host number.
SUBNET6 = ipaddress.IPv6Network("fd42:42::/64")
LB_ADDR = SUBNET[2]
# The VIP of dsr and ipip services: the backends hold it on lo and ignore ARP requests
# from an address they hold, so it cannot be the balancer's own (primary) address.
BYPASS_VIP = SUBNET[3]
BYPASS_VIP6 = SUBNET6[3]  # its IPv6 twin, for IPv6 dsr and ipip services
CLIENT_BASE = 10
BACKEND_BASE = 101
STATE_DIR = Path("/run/xdplb/lab")
DEFAULT_BACKENDS = 2
DEFAULT_CLIENTS = 1
MAX_BACKENDS = 26
MAX_CLIENTS = 9
XDP_PASS = 2
# r0 = XDP_PASS; exit (raw instructions: no compiler needed)
PASS_INSNS = bytes([0xB7, 0, 0, 0, XDP_PASS, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0])
PASS_NAME = "xdplb_pass"


@dataclass
class Host:
    namespace: str
    role: str  # client, lb, backend
    address: str
    name: str
    pid: int | None = None

    @property
    def address6(self) -> str:
        """The IPv6 twin of address: same host number in SUBNET6."""
        return str(SUBNET6[int(ipaddress.IPv4Address(self.address)) - int(SUBNET.network_address)])


def hosts(prefix: str, backends: int, clients: int) -> list[Host]:
    out = []
    for i in range(clients):
        suffix = "" if i == 0 else str(i + 1)
        out.append(Host(f"{prefix}-client{suffix}", "client", str(SUBNET[CLIENT_BASE + i]), f"client{suffix}"))
    out.append(Host(f"{prefix}-lb", "lb", str(LB_ADDR), "lb"))
    for i in range(backends):
        letter = string.ascii_lowercase[i]
        out.append(Host(f"{prefix}-backend-{letter}", "backend", str(SUBNET[BACKEND_BASE + i]),
                        f"backend-{letter}"))
    return out


def _check_prefix(prefix: str) -> None:
    if not prefix.startswith("xdplb") or len(prefix) > 10 or not prefix.replace("-", "").isalnum():
        raise UsageError(f"bad lab prefix {prefix!r}: it must start with 'xdplb' and have at most 10 characters")


def _bridge_port(host: Host) -> str:
    return ("v-" + host.name)[:15]


def _pidfile(prefix: str, host: Host) -> Path:
    return STATE_DIR / prefix / f"{host.namespace}.pid"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"xdplb.labserver" in f.read()
    except OSError:
        return False


def _read_pid(prefix: str, host: Host) -> int | None:
    try:
        pid = int(_pidfile(prefix, host).read_text())
    except (OSError, ValueError):
        return None
    return pid if _alive(pid) else None


def _ethtool_offloads_off(namespace: str) -> None:
    """Software checksums on the lab's veths: XDP on a real NIC sees complete checksums,
    while veth would hand it partial ones from a local sender."""
    try:
        subprocess.run(["ip", "netns", "exec", namespace, "ethtool", "-K", "eth0", "tx", "off",
                        "tso", "off", "gso", "off"], check=True, capture_output=True)
    except FileNotFoundError:
        raise PrerequisiteError("ethtool not found; install it with: apt-get install ethtool") from None
    except subprocess.CalledProcessError as exc:
        raise XdplbError(f"ethtool failed in {namespace}: {exc.stderr.decode().strip()}") from None


def _ensure_namespace(name: str) -> None:
    if name not in netlink.netns_names():
        netlink.add_netns(name)
    netlink.set_link_up("lo", netns=name)


def _ensure_host(bridge_ns: str, host: Host) -> None:
    _ensure_namespace(host.namespace)
    if not netlink.has_link("eth0", netns=host.namespace):
        port = _bridge_port(host)
        netlink.add_veth(port, "eth0", netns=bridge_ns, peer_netns=host.namespace)
        netlink.set_link_up(port, netns=bridge_ns, master="br0")
        netlink.add_address("eth0", host.address, SUBNET.prefixlen, netns=host.namespace)
        netlink.add_address("eth0", host.address6, SUBNET6.prefixlen, netns=host.namespace)
        netlink.set_link_up("eth0", netns=host.namespace)
        _ethtool_offloads_off(host.namespace)


def load_pass_program() -> int:
    """Loads the pass-through XDP program (r0 = XDP_PASS; exit); returns its fd."""
    return libbpf().load_xdp_insns(PASS_NAME, PASS_INSNS, "load pass-through XDP program")


def attach_pass_program(namespace: str, ifname: str) -> None:
    """Attaches the pass-through program (native mode) unless something is there."""
    link = netlink.get_link(ifname, netns=namespace)
    if link.xdp_prog_id:
        return
    fd = load_pass_program()
    try:
        netlink.attach_xdp(link.index, fd, "native", replace=True, netns=namespace)
    finally:
        os.close(fd)


def _start_server(prefix: str, host: Host) -> int:
    pid = _read_pid(prefix, host)
    if pid:
        return pid
    log_dir = STATE_DIR / prefix
    log_dir.mkdir(parents=True, exist_ok=True)
    log = open(log_dir / f"{host.namespace}.log", "ab")
    src = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{host.namespace}", sys.executable, "-m", "xdplb.labserver",
         "--name", host.name, "--address", host.address, "--http-port", str(HTTP_PORT),
         "--udp-port", str(UDP_PORT)],
        stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True, env=env)
    log.close()
    _pidfile(prefix, host).write_text(str(proc.pid))
    return proc.pid


def stop_process(proc: subprocess.Popen, timeout: float = 5) -> None:
    """Ends a process we started: SIGTERM, then SIGKILL if it lingers."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _wait_listening(host: Host, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        def probe():
            with socket.create_connection((host.address, HTTP_PORT), timeout=0.5):
                return True
        try:
            if run_in_netns(host.namespace, probe):
                return
        except OSError:
            time.sleep(0.05)
    raise XdplbError(f"the lab server in {host.namespace} did not start; see "
                     f"{STATE_DIR}/*/{host.namespace}.log")


def up(backends: int = DEFAULT_BACKENDS, clients: int = DEFAULT_CLIENTS, prefix: str = DEFAULT_PREFIX,
       forward: str = "nat") -> list[Host]:
    """Creates what is missing of the lab (idempotent) and returns its hosts. With forward
    dsr or ipip the backends are prepared for it: the VIP on lo with the ARP settings
    (dsr, ipip) and the decapsulator on their eth0 (ipip); in every mode they hold the
    IPv6 bypass VIP on lo, for IPv6 dsr services beside IPv4 ones of any mode."""
    _check_prefix(prefix)
    if not 1 <= backends <= MAX_BACKENDS:
        raise UsageError(f"--backends {backends}: give 1 to {MAX_BACKENDS}")
    if not 1 <= clients <= MAX_CLIENTS:
        raise UsageError(f"--clients {clients}: give 1 to {MAX_CLIENTS}")
    if os.geteuid() != 0:
        raise XdplbError("the lab needs root to create namespaces; run it with sudo")
    bridge_ns = f"{prefix}-bridge"
    lab = hosts(prefix, backends, clients)
    try:
        _ensure_namespace(bridge_ns)
        if not netlink.has_link("br0", netns=bridge_ns):
            netlink.add_bridge("br0", netns=bridge_ns)
        netlink.set_link_up("br0", netns=bridge_ns)
        for host in lab:
            _ensure_host(bridge_ns, host)
        lb = next(h for h in lab if h.role == "lb")
        attach_pass_program(bridge_ns, _bridge_port(lb))
        have = {str(a.ip) for a in netlink.addresses_in("eth0", lb.namespace)}
        for vip, prefixlen in ((BYPASS_VIP, 32), (BYPASS_VIP6, 128)):
            if str(vip) not in have:
                netlink.add_address("eth0", str(vip), prefixlen, netns=lb.namespace, vip=True)
        for host in lab:
            if host.role == "backend":
                host.pid = _start_server(prefix, host)
        for host in lab:
            if host.role == "backend":
                _wait_listening(host)
                prepare_backend(host, forward)
    except (netlink.NetlinkError, OSError) as exc:
        raise XdplbError(f"lab setup failed: {exc}; clean up with: xdplb lab down") from exc
    return lab


def prepare_backend(host: Host, forward: str | None) -> None:
    """What a backend of a dsr or ipip service needs (xdplb decap, run in its namespace);
    for nat, undoes it, so that the lab can be switched between modes. The IPv6 bypass VIP
    stays on lo in every mode, so that an IPv6 dsr service works whatever the IPv4 ones
    do (an IPv6 address on lo changes nothing for IPv4: no ARP sysctl); IPv6 ipip needs
    the decapsulator, which only forward ipip attaches. forward None undoes everything
    (the lab going down), records included."""
    from . import backendhost, decap

    def work():
        if forward == "ipip":
            decap.attach("eth0", [BYPASS_VIP, BYPASS_VIP6], mode="generic")
            return
        if any(e["program_id"] for e in decap.status("eth0")["interfaces"]):
            decap.detach("eth0")
        vips = {"dsr": [str(BYPASS_VIP), str(BYPASS_VIP6)], "nat": [str(BYPASS_VIP6)], None: None}[forward]
        backendhost.converge("eth0", vips)
    run_in_netns(host.namespace, work)


def existing_hosts(prefix: str = DEFAULT_PREFIX) -> list[Host]:
    names = set(netlink.netns_names())
    out = []
    for host in hosts(prefix, MAX_BACKENDS, MAX_CLIENTS):
        if host.namespace in names:
            host.pid = _read_pid(prefix, host) if host.role == "backend" else None
            out.append(host)
    return out


def down(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Stops the lab's servers (by their recorded PIDs) and removes its namespaces."""
    _check_prefix(prefix)
    removed = []
    for host in existing_hosts(prefix):
        if host.role == "backend":
            prepare_backend(host, None)  # drops the decapsulator's pins and records
        pid = _read_pid(prefix, host)
        if pid:
            os.killpg(pid, signal.SIGTERM)
        _pidfile(prefix, host).unlink(missing_ok=True)
    for name in sorted(netlink.netns_names()):
        if name == f"{prefix}-bridge" or any(name == h.namespace for h in hosts(prefix, MAX_BACKENDS, MAX_CLIENTS)):
            netlink.remove_netns(name)
            removed.append(name)
    state = STATE_DIR / prefix
    if state.exists():
        for f in state.iterdir():
            f.unlink()
        state.rmdir()
    return removed


def status(prefix: str = DEFAULT_PREFIX) -> dict:
    lab = existing_hosts(prefix)
    return {"prefix": prefix, "up": bool(lab), "vip": str(LB_ADDR), "bypass_vip": str(BYPASS_VIP),
            "bypass_vip6": str(BYPASS_VIP6), "http_port": HTTP_PORT,
            "udp_port": UDP_PORT, "hosts": [asdict(h) | {"address6": h.address6} for h in lab]}

