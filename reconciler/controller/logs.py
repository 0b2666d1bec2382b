"""Structured logs for the controller service: one JSON object per line (for Loki and friends)
or plain text for people, both passed through a `Redactor` so secrets never reach the output.

Called once at startup by `reconciler run` (`setup_logging`), which then registers the secret
values it read (the Proxmox password or token secret, the Velocity bridge secret) on the
returned `Redactor`. Code everywhere logs through the standard `logging` module and attaches
structured fields as `extra={"fields": {...}}` (or `extra=fields(cycle="full", n=3)`).

A JSON line:

    {"ts": "2024-05-01T12:00:00.123Z", "level": "info", "logger": "reconciler.controller",
     "event": "cycle done", "kind": "full", "outcome": "changed", "seconds": 1.4}

`ts` is RFC 3339 UTC, `event` the formatted message, the fields merged at the top level (a field
named like a fixed key is kept under "fields" instead of overwriting it), and `exc` the
traceback of a logged exception as one string, so a traceback stays on its line.

Redaction, in both formats, over the event, every string field value, and the traceback:

- registered secret values (and their percent-encoded forms, as they appear in URLs) -> ***
- `password=...`, `token=...`, `secret=...` (also `:` and quoted forms, and api_key,
  passwd, Authorization schemes such as `Bearer x` or `PVEAPIToken=x`) -> the value masked
- a URL's userinfo password, `redis://user:pw@host` -> `redis://user:***@host`
- a field whose name says secret (password, token, secret, api_key, ...) -> ***
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal, TextIO
from urllib.parse import quote

MASK = "***"

Format = Literal["json", "text"]

# Keys whose value is a secret (`password=hunter2`, `"token": "abc"`, `secret: x`).
SECRET_KEYS = r"(?:password|passwd|pwd|token|secret|api[_-]?key|apikey|client[_-]?secret)"
KEY_VALUE = re.compile(
    rf"(?i)(\b[\w.-]*{SECRET_KEYS}[\"']?\s*[=:]\s*[\"']?)([^\s\"'&,;)}}\]]+)",
)
AUTH_SCHEME = re.compile(r"(?i)\b(Bearer|Basic|PVEAPIToken)([ =])([^\s\"',;]+)")
URL_USERINFO = re.compile(r"([a-zA-Z][\w+.-]*://[^/\s:@]*:)([^@\s/]+)(@)")
SECRET_FIELD = re.compile(rf"(?i)^(?:[\w.-]*[_.-])?{SECRET_KEYS}$")

RESERVED = ("ts", "level", "logger", "event", "exc", "fields")


class Redactor:
    """Masks registered secret values and secret-looking patterns in text and fields."""

    def __init__(self, secrets: tuple[str, ...] = ()) -> None:
        self._secrets: list[str] = []
        self._lock = threading.Lock()  # `add` may run while another thread logs
        for secret in secrets:
            self.add(secret)

    def add(self, secret: str | None) -> None:
        """Register a value that must never appear in a log line. Empty values are ignored."""
        if not secret:
            return
        with self._lock:
            for form in {secret, quote(secret, safe="")}:
                if form not in self._secrets:
                    self._secrets.append(form)
            # Longest first: a secret containing another is masked whole.
            self._secrets.sort(key=len, reverse=True)

    def text(self, value: str) -> str:
        for secret in self._secrets:
            if secret in value:
                value = value.replace(secret, MASK)
        value = URL_USERINFO.sub(rf"\1{MASK}\3", value)
        value = AUTH_SCHEME.sub(rf"\1\2{MASK}", value)
        return KEY_VALUE.sub(rf"\1{MASK}", value)

    def value(self, value: Any, key: str = "") -> Any:
        """A field value, recursively; a secret-named key masks its whole value."""
        if key and SECRET_FIELD.match(key) and value not in (None, ""):
            return MASK
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, Mapping):
            return {str(k): self.value(v, str(k)) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [self.value(v) for v in value]
        if isinstance(value, int | float | bool) or value is None:
            return value
        return self.text(str(value))


def fields(**values: Any) -> dict[str, Any]:
    """`log.info("cycle done", extra=fields(kind="full"))`."""
    return {"fields": values}


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def record_fields(record: logging.LogRecord) -> Mapping[str, Any]:
    found = getattr(record, "fields", None)
    return found if isinstance(found, Mapping) else {}


class JsonFormatter(logging.Formatter):
    """One JSON object per line. See the module docstring."""

    def __init__(self, redactor: Redactor | None = None) -> None:
        super().__init__()
        self.redactor = redactor or Redactor()

    def format(self, record: logging.LogRecord) -> str:
        r = self.redactor
        out: dict[str, Any] = {
            "ts": rfc3339(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": r.text(record.getMessage()),
        }
        clashing: dict[str, Any] = {}
        for key, value in record_fields(record).items():
            masked = r.value(value, str(key))
            if key in RESERVED:
                clashing[str(key)] = masked
            else:
                out[str(key)] = masked
        if clashing:
            out["fields"] = clashing
        if record.exc_info:
            out["exc"] = r.text(self.formatException(record.exc_info))
        elif record.exc_text:
            out["exc"] = r.text(record.exc_text)
        if record.stack_info:
            out["stack"] = r.text(self.formatStack(record.stack_info))
        # default=str: a field that is not JSON (a Path, an enum) is logged as its text, never
        # dropped, and a bad field never costs the line. Redaction ran before, on the text.
        return json.dumps(out, ensure_ascii=False, default=lambda v: r.text(str(v)))


class TextFormatter(logging.Formatter):
    """`2024-05-01T12:00:00.123Z info reconciler.controller: cycle done kind=full n=3`."""

    def __init__(self, redactor: Redactor | None = None) -> None:
        super().__init__()
        self.redactor = redactor or Redactor()

    def format(self, record: logging.LogRecord) -> str:
        r = self.redactor
        line = (
            f"{rfc3339(record.created)} {record.levelname.lower()} {record.name}: "
            f"{r.text(record.getMessage())}"
        )
        pairs = [
            f"{key}={json.dumps(r.value(value, str(key)), ensure_ascii=False, default=str)}"
            for key, value in record_fields(record).items()
        ]
        if pairs:
            line += " " + " ".join(pairs)
        if record.exc_info:
            line += "\n" + r.text(self.formatException(record.exc_info))
        if record.stack_info:
            line += "\n" + r.text(self.formatStack(record.stack_info))
        return line


class _Handler(logging.StreamHandler[TextIO]):
    """Ours, so a second `setup_logging` replaces it instead of doubling every line."""


def setup_logging(
    fmt: Format = "json",
    level: str = "info",
    stream: TextIO | None = None,
    *,
    redactor: Redactor | None = None,
) -> Redactor:
    """Route every logger (ours and libraries') to `stream` in `fmt`; returns the redactor on
    which the caller registers the secrets it reads."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    if fmt not in ("json", "text"):
        raise ValueError(f"unknown log format {fmt!r} (json or text)")
    redactor = redactor or Redactor()
    handler = _Handler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter(redactor) if fmt == "json" else TextFormatter(redactor))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    return redactor
