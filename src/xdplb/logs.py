# SPDX-License-Identifier: Apache-2.0
"""serve's log: one line per event on stderr, logfmt (the default) or JSON, filtered by
level. In logfmt a value is quoted when it must be (a space, an =, a quote, a backslash,
a control character, or nothing at all) with JSON's escapes, which logfmt readers accept:
a reason holding a quote or a newline stays on its line and parses back to itself."""
from __future__ import annotations

import datetime
import json
import re
import sys

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("logfmt", "json")

_settings = {"level": "info", "format": "logfmt"}
_BARE = re.compile(r'[^\s="\\\x00-\x1f\x7f]+')


def configure(level: str = "info", fmt: str = "logfmt") -> None:
    if level not in LEVELS or fmt not in FORMATS:
        raise ValueError(f"log level {level!r} or format {fmt!r} unknown")
    _settings.update(level=level, format=fmt)


def logfmt_value(value) -> str:
    text = str(value)
    return text if _BARE.fullmatch(text) else json.dumps(text, ensure_ascii=False)


def line(event: str, level: str, fields: dict, now: datetime.datetime) -> str:
    stamp = now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    if _settings["format"] == "json":
        values = {k: v if isinstance(v, (int, float, bool)) or v is None else str(v) for k, v in fields.items()}
        return json.dumps({"time": stamp, "level": level, "event": event, **values}, ensure_ascii=False)
    return " ".join([f"time={stamp}", f"level={level}", f"event={logfmt_value(event)}",
                     *(f"{key}={logfmt_value(value)}" for key, value in fields.items())])


def log(event: str, level: str = "info", **fields) -> None:
    """One line for an event, unless its level is below the configured one."""
    if LEVELS.index(level) < LEVELS.index(_settings["level"]):
        return
    print(line(event, level, fields, datetime.datetime.now(datetime.timezone.utc)), file=sys.stderr, flush=True)
