# SPDX-License-Identifier: Apache-2.0
"""systemd's notification protocol (sd_notify(3)), which a Type=notify service speaks:
READY=1 once serve has converged, WATCHDOG=1 while its loop runs, STOPPING=1 on the way
out. A datagram to $NOTIFY_SOCKET; nothing at all when serve does not run under systemd."""
from __future__ import annotations

import os
import socket


class Notifier:
    def __init__(self, environ=os.environ):
        path = environ.get("NOTIFY_SOCKET", "")
        # An abstract socket is written with a leading @, which stands for a zero byte.
        self.address = "\0" + path[1:] if path.startswith("@") else path
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        watched = usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid()))
        # Half the period, as sd_watchdog_enabled(3) advises.
        self.watchdog_interval_s = int(usec) / 2e6 if watched and self.address else None

    def notify(self, *fields: str) -> None:
        if not self.address:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            try:
                s.sendto("\n".join(fields).encode(), self.address)
            except OSError:
                pass  # systemd gone or the socket unwritable: nothing serve can do about it
