# SPDX-License-Identifier: Apache-2.0
"""systemd integration without systemd: the notification datagrams serve sends, and the
unit file as systemd-analyze reads it."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from tests.conftest import require
from xdplb import build
from xdplb.sdnotify import Notifier


def test_notifications_reach_the_socket_systemd_names(tmp_path):
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(path)
        listener.settimeout(2)
        n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())})
        n.notify("READY=1", "STATUS=serving 1 interfaces")
        assert listener.recv(100) == b"READY=1\nSTATUS=serving 1 interfaces"
        assert n.watchdog_interval_s == 15.0


def test_abstract_sockets_and_no_systemd():
    name = f"xdplb-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + name)
        listener.settimeout(2)
        Notifier({"NOTIFY_SOCKET": "@" + name}).notify("WATCHDOG=1")
        assert listener.recv(100) == b"WATCHDOG=1"
    quiet = Notifier({})
    quiet.notify("READY=1")  # no socket: nothing sent, nothing raised
    assert quiet.watchdog_interval_s is None
    # A watchdog meant for another process is not this one's to pet.
    assert Notifier({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}).watchdog_interval_s is None


def test_the_unit_file_verifies(tmp_path):
    require(shutil.which("systemd-analyze") is not None, "needs systemd-analyze (the systemd package)")
    xdplb = Path(sys.executable).parent / "xdplb"  # the command this environment installed
    unit = tmp_path / "xdplb.service"
    unit.write_text((Path(build.ROOT) / "contrib" / "xdplb.service").read_text()
                    .replace("/opt/xdplb/venv/bin/xdplb", str(xdplb)))
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert proc.returncode == 0 and "xdplb.service" not in proc.stderr, proc.stderr
