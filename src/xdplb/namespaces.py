# SPDX-License-Identifier: Apache-2.0
"""Moving the process between namespaces with setns(2).

`xdplb -n NS` enters the network namespace only, so the host's bpffs and tracefs stay
visible. Under `ip netns exec NS xdplb`, /sys has been remounted without them; the tool
then joins the mount namespace of the caller that ran `ip netns exec` (keeping its
network namespace) so that pins are the same wherever the command runs.
"""
from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path

from .errors import PrerequisiteError, UsageError

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = Path("/run/netns")
BPFFS = Path("/sys/fs/bpf")

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(path: str, nstype: int) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, nstype) != 0:
            err = ctypes.get_errno()
            raise PrerequisiteError(f"cannot enter namespace {path}: {os.strerror(err)}; run as root")
    finally:
        os.close(fd)


def enter_netns(name: str) -> None:
    path = NETNS_RUN_DIR / name
    if not path.exists():
        raise UsageError(f"no network namespace named {name!r}; list them with: ip netns list")
    _setns(str(path), CLONE_NEWNET)


def run_in_netns(name: str, fn):
    """Runs fn() in a thread that has entered network namespace `name` (setns changes
    only the calling thread), and returns its result or raises its exception."""
    result: dict = {}

    def body():
        try:
            enter_netns(name)
            result["value"] = fn()
        except BaseException as exc:  # handed to the caller
            result["error"] = exc

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def _ns_id(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def netns_name() -> str:
    """The name of the current network namespace: its /run/netns name, "host" for
    PID 1's, or "ns-<inode>" for an unnamed one. Used in pin paths."""
    me = _ns_id("/proc/thread-self/ns/net")  # a thread may have entered another than the process's
    try:
        if _ns_id("/proc/1/ns/net") == me:
            return "host"
    except OSError:
        pass
    if NETNS_RUN_DIR.is_dir():
        for entry in sorted(NETNS_RUN_DIR.iterdir()):
            try:
                if _ns_id(str(entry)) == me:
                    return entry.name
            except OSError:
                continue
    return f"ns-{me[1]}"


def is_bpffs(path: Path) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == str(path) and line.split()[2] == "bpf" for line in f)


def _ancestors() -> list[int]:
    pids, pid = [], os.getppid()
    while pid > 1:
        pids.append(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids + [1]


def join_host_mounts() -> None:
    """Joins the mount namespace of the nearest ancestor that sees bpffs, when ours
    does not (ip netns exec remounts /sys); the network namespace stays as it is."""
    if is_bpffs(BPFFS):
        return
    mine = _ns_id("/proc/self/ns/mnt")
    cwd = os.getcwd()
    original = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    try:
        for pid in _ancestors():
            path = f"/proc/{pid}/ns/mnt"
            try:
                if _ns_id(path) == mine:
                    continue
                _setns(path, CLONE_NEWNS)
            except (OSError, PrerequisiteError):
                continue
            if is_bpffs(BPFFS):
                break
            _libc.setns(original, CLONE_NEWNS)
    finally:
        os.close(original)
    try:
        os.chdir(cwd)
    except OSError:
        pass


def ensure_bpffs() -> Path:
    """Mounts bpffs at /sys/fs/bpf if nothing is mounted there (fresh machines)."""
    if is_bpffs(BPFFS):
        return BPFFS
    BPFFS.mkdir(parents=True, exist_ok=True)
    rc = _libc.mount(b"bpf", str(BPFFS).encode(), b"bpf", 0, None)
    if rc != 0:
        err = ctypes.get_errno()
        raise PrerequisiteError(f"cannot mount bpffs on {BPFFS}: {os.strerror(err)}; "
                                f"mount it with: mount -t bpf bpf {BPFFS}")
    return BPFFS
