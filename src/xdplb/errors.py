# SPDX-License-Identifier: Apache-2.0
"""Errors of the xdplb library. Each message names the problem and the fix; cli.py
turns them into one-line click errors (exit 1, or 2 for usage mistakes; a VerifierError
adds the verifier's last lines). README's "Exit codes" lists them."""
from __future__ import annotations

import re


class XdplbError(Exception):
    """A problem the user can fix; the message says how."""


class UsageError(XdplbError):
    """Bad command-line input (exit status 2)."""


class PrerequisiteError(XdplbError):
    """Something the machine lacks: a package, root, a mount."""


class BpfError(XdplbError):
    def __init__(self, message: str, errno: int = 0):
        super().__init__(message)
        self.errno = errno


class VerifierError(BpfError):
    """The kernel refused the program; carries the relevant tail of the verifier log."""

    TAIL_LINES = 20

    def __init__(self, message: str, errno: int, log: list[str]):
        super().__init__(message, errno)
        self.log = log

    @classmethod
    def from_log(cls, errno: int, libbpf_log: list[str]) -> "VerifierError":
        text = "".join(libbpf_log)
        match = re.search(r"-- BEGIN PROG LOAD LOG --\n(.*?)-- END PROG LOAD LOG --", text, re.S)
        lines = (match.group(1) if match else text).rstrip("\n").splitlines()
        tail = [l for l in lines if l.strip()][-cls.TAIL_LINES:]
        first = f"the kernel's verifier rejected the XDP program (errno {errno})"
        if not match:
            first = f"loading the XDP program failed (errno {errno})"
        return cls(first + "; fix bpf/ and rebuild with: xdplb build", errno, tail)

    def __str__(self) -> str:
        if not self.log:
            return self.args[0]
        return self.args[0] + "\n  " + "\n  ".join(self.log)


class NotFoundError(XdplbError):
    """Something named does not exist: an interface, a service, a backend (exit 1, not
    2: the command was well formed)."""


class NotAttachedError(NotFoundError):
    """xdplb is not on the interface named."""
