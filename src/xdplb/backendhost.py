# SPDX-License-Identifier: Apache-2.0
"""What lets a backend of dsr and ipip services accept a VIP's packets without claiming
the VIP on the network: the VIP on lo, and (for IPv4 VIPs) two ARP sysctls. An IPv6
address on lo needs no sysctl: Linux answers neighbour solicitations only for the
addresses of the interface they arrive on.

Every change is written down (write-ahead) in a record under /run/xdplb/decap/, so that
undoing restores exactly what was there: only VIPs this module added leave lo, and a
sysctl goes back to its earlier value unless someone changed it since. Both lo and the
sysctls belong to the network namespace, so its decapsulating interfaces share one record
and what they changed stays until the last one that wants it lets go.
"""
from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path

from . import model, namespaces, netlink
from .errors import UsageError, XdplbError

RECORD_DIR = Path("/run/xdplb/decap")
LOOPBACK = "lo"
PROC_SYS = Path("/proc/sys")
# The kernel applies the larger of conf/all and conf/<interface> for both settings, so
# conf/all covers every interface and no interface's own value changes (lo does no ARP).
# arp_ignore 1: answer ARP only for addresses of the interface asked on, not lo's VIPs;
# 2 is stricter still and is left alone. arp_announce 2: ARP requests of this host carry
# the outgoing interface's address as sender, never a VIP.
ARP_SYSCTLS = {
    "net.ipv4.conf.all.arp_ignore": ("1", {"1", "2"}),
    "net.ipv4.conf.all.arp_announce": ("2", {"2"}),
}


def parse_vips(text: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """VIP[,VIP...], each an address a service could be reached at."""
    out: list = []
    for item in text.split(","):
        if not item.strip():
            raise UsageError(f"bad --vip {text!r}: an empty item; give addresses separated by commas, "
                             "like 10.0.0.2,10.0.0.3")
        vip = model.parse_address(item.strip(), "VIP", family=4)
        if vip.is_unspecified or vip.is_loopback or vip.is_multicast or vip.is_reserved:
            raise UsageError(f"bad VIP {item.strip()!r}: not an address a service can have "
                             "(unspecified, loopback, multicast or reserved); give the service's VIP")
        if vip not in out:
            out.append(vip)
    return out


def record_path() -> Path:
    return RECORD_DIR / f"{namespaces.netns_name()}.json"


def load() -> dict:
    """The record: interfaces -> VIPs each wants, VIPs added to lo, sysctls changed."""
    try:
        data = json.loads(record_path().read_text())
    except FileNotFoundError:
        data = {}
    except (OSError, ValueError) as exc:
        raise XdplbError(f"cannot read {record_path()} ({exc}); remove it after checking lo's addresses "
                         "(ip addr show lo) and the ARP sysctls by hand") from None
    return {"interfaces": data.get("interfaces", {}), "added": data.get("added", []),
            "sysctls": data.get("sysctls", {})}


def _save(record: dict) -> None:
    path = record_path()
    if not (record["interfaces"] or record["added"] or record["sysctls"]):
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def managed(ifname: str) -> list[str] | None:
    """The VIPs the record holds for ifname, or None when it holds nothing for it."""
    return load()["interfaces"].get(ifname)


def check_vips(vips: list) -> None:
    """A VIP that is another interface's address would stop that address answering ARP."""
    for name, addrs in netlink.addresses_by_link().items():
        if name == LOOPBACK:
            continue
        for a in addrs:
            if a.ip in vips:
                raise UsageError(f"VIP {a.ip} is an address of {name}: a VIP belongs on lo, and arp_ignore would "
                                 f"stop {name} answering ARP for it; give the service's VIP, not the backend's address")


def _read(name: str) -> str:
    return (PROC_SYS / name.replace(".", "/")).read_text().strip()


def _write(name: str, value: str) -> None:
    (PROC_SYS / name.replace(".", "/")).write_text(value + "\n")


def _on_lo() -> set[str]:
    return {str(a.ip) for a in netlink.addresses_by_link().get(LOOPBACK, [])}


def _host_prefix(vip: str) -> int:
    return 128 if ":" in vip else 32


def converge(ifname: str, vips: list[str] | None) -> list[str]:
    """Makes ifname want these VIPs (None: want nothing and leave the record) and brings
    lo and the sysctls in line with what all interfaces want. All or nothing: a failure
    undoes this call's changes. Returns what changed, for people."""
    before = load()
    record = json.loads(json.dumps(before))
    if vips is None:
        record["interfaces"].pop(ifname, None)
    else:
        record["interfaces"][ifname] = list(vips)
    wanted = list(dict.fromkeys(v for vs in record["interfaces"].values() for v in vs))
    previous = before["interfaces"].get(ifname, [])
    on_lo = _on_lo()
    lines: list[str] = []
    undo: list = []
    try:
        for vip in wanted:
            if vip in on_lo:
                if vip not in record["added"] and vip in (vips or []) and vip not in previous:
                    lines.append(f"{vip} is on lo already: left there, also after detach")
                continue
            if vip not in record["added"]:  # a record outliving its lo (a namespace made again) has it
                record["added"].append(vip)
            _save(record)
            netlink.add_address(LOOPBACK, vip, _host_prefix(vip), vip=True)
            undo.append(lambda vip=vip: netlink.remove_address(LOOPBACK, vip, _host_prefix(vip)))
            lines.append(f"added {vip}/{_host_prefix(vip)} to lo")
        for vip in [v for v in record["added"] if v not in wanted]:
            if vip in on_lo:
                netlink.remove_address(LOOPBACK, vip, _host_prefix(vip))
                undo.append(lambda vip=vip: netlink.add_address(LOOPBACK, vip, _host_prefix(vip), vip=True))
                lines.append(f"removed {vip}/{_host_prefix(vip)} from lo")
            record["added"].remove(vip)
            _save(record)
        for vip in [v for v in previous if v not in (vips or [])]:
            users = [i for i, vs in record["interfaces"].items() if vip in vs]
            if users:
                lines.append(f"{vip} stays on lo: decap on {', '.join(users)} wants it")
            elif vip not in record["added"] and vip in on_lo and vip not in before["added"]:
                lines.append(f"{vip} stays on lo: it was there before attach")
        lines += _converge_sysctls(record, any(":" not in v for v in wanted), undo)
    except BaseException as exc:
        for step in reversed(undo):
            try:
                step()
            except (OSError, netlink.NetlinkError):
                pass
        _save(before)
        if isinstance(exc, (OSError, netlink.NetlinkError)):
            raise XdplbError(f"cannot prepare this host for its VIPs ({exc}); nothing was changed") from None
        raise
    _save(record)
    return lines


def _converge_sysctls(record: dict, needed: bool, undo: list) -> list[str]:
    lines = []
    for name, (value, accepted) in ARP_SYSCTLS.items():
        current = _read(name)
        if needed and current not in accepted:
            record["sysctls"].setdefault(name, {"before": current, "set": value})
            _save(record)
            _write(name, value)
            undo.append(lambda name=name, current=current: _write(name, current))
            lines.append(f"{name}: {current} -> {value}")
        elif not needed and name in record["sysctls"]:
            was = record["sysctls"].pop(name)
            if current == was["set"]:
                _write(name, was["before"])
                undo.append(lambda name=name, current=current: _write(name, current))
                lines.append(f"{name}: {current} -> {was['before']} (restored)")
            else:
                lines.append(f"{name} left at {current}: changed since attach set it to {was['set']} "
                             f"(it was {was['before']} before)")
            _save(record)
    return lines


def sysctls() -> dict[str, str]:
    """The ARP sysctls as they are now."""
    return {name: _read(name) for name in ARP_SYSCTLS}
