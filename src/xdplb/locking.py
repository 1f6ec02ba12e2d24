# SPDX-License-Identifier: Apache-2.0
"""One lock per interface around every read-modify-write of its maps.

Two commands (or a command and serve) that each read the maps, plan and write would
otherwise plan from the same snapshot: both could take the same free backend id, and
one service's ring would name the other's backend. The lock is an flock(2) on a file
under /run, so it is shared by every process on the host and let go when its holder
dies, however it dies. Within one process it is re-entrant (a change that calls another
change on the same interface does not wait for itself).
"""
from __future__ import annotations

import errno
import fcntl
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from . import namespaces
from .errors import XdplbError

LOCK_DIR = Path("/run/xdplb/locks")
WAIT_S = 30.0
POLL_S = 0.05

_guard = threading.Lock()
_by_path: dict[Path, threading.RLock] = {}
_held: dict[Path, list] = {}  # path -> [fd, depth], while this process holds it


def lock_path(ifname: str) -> Path:
    return LOCK_DIR / f"{namespaces.netns_name()}.{ifname}.lock"


@contextmanager
def interface(ifname: str, wait_s: float = WAIT_S):
    """Holds the interface's lock; waits up to wait_s for another holder to finish."""
    path = lock_path(ifname)
    with _guard:
        local = _by_path.setdefault(path, threading.RLock())
    with local:
        if path in _held:
            _held[path][1] += 1
            try:
                yield
            finally:
                _held[path][1] -= 1
            return
        fd = _acquire(path, ifname, wait_s)
        _held[path] = [fd, 1]
        try:
            yield
        finally:
            del _held[path]
            os.close(fd)  # releases the flock


def _acquire(path: Path, ifname: str, wait_s: float) -> int:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN) or time.monotonic() >= deadline:
                holder = _holder(fd)
                os.close(fd)
                raise XdplbError(f"another xdplb process{holder} has been changing {ifname} for over {wait_s:.0f} s; "
                                 f"wait for it to finish and run this again") from None
            time.sleep(POLL_S)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _holder(fd: int) -> str:
    try:
        pid = os.pread(fd, 32, 0).decode().strip()
    except OSError:
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""
