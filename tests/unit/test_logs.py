# SPDX-License-Identifier: Apache-2.0
"""serve's log lines: logfmt that parses back to what was logged whatever the values hold,
JSON lines, and the level filter."""
from __future__ import annotations

import json
import re

import pytest

from xdplb import logs

PAIR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|[^\s"]+)(?: |$)')


def parse_logfmt(line: str) -> dict:
    """A logfmt reader: bare values as they are, quoted ones with their escapes undone."""
    pairs = PAIR.findall(line)
    assert " ".join(f"{k}={v}" for k, v in pairs) == line, f"not logfmt: {line!r}"
    return {k: json.loads(v) if v.startswith('"') else v for k, v in pairs}


@pytest.fixture(autouse=True)
def default_settings():
    yield
    logs.configure()


AWKWARD = {"reason": 'bad "quoted" value', "detail": "two\nlines", "path": "C:\\dir", "eq": "a=b", "empty": "",
           "tab": "a\tb", "unicode": "grüße", "number": 42, "plain": "eth0"}


def test_logfmt_values_parse_back_to_themselves_on_one_line(capsys):
    logs.log("reload_failed", level="error", **AWKWARD)
    out = capsys.readouterr().err
    assert out.count("\n") == 1
    parsed = parse_logfmt(out.rstrip("\n"))
    assert parsed.pop("level") == "error" and parsed.pop("event") == "reload_failed" and parsed.pop("time")
    assert parsed == {k: str(v) for k, v in AWKWARD.items()}
    assert " number=42 plain=eth0" in out  # plain values stay bare


def test_json_lines_keep_numbers_and_text(capsys):
    logs.configure(fmt="json")
    logs.log("snat_exhausted", level="warning", **AWKWARD)
    out = capsys.readouterr().err
    assert out.count("\n") == 1
    record = json.loads(out)
    assert record.pop("level") == "warning" and record.pop("event") == "snat_exhausted" and record.pop("time")
    assert record == AWKWARD


def test_events_below_the_level_are_left_out(capsys):
    logs.configure(level="warning")
    logs.log("change", detail="x")
    logs.log("backend_down", level="warning", backend="10.0.0.1:80")
    logs.log("error", level="error", reason="r")
    events = [parse_logfmt(l)["event"] for l in capsys.readouterr().err.splitlines()]
    assert events == ["backend_down", "error"]
    with pytest.raises(ValueError):
        logs.configure(level="verbose")
