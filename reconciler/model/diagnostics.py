"""Diagnostics: every problem found in specs, observed state or plans, with where it is.

Loading, policy checks and planning all collect problems as `Diagnostic` values instead of
raising on the first one, so a person (or CI) sees every mistake in one run. Renderers in
`reconciler.cli` turn them into text, JSON or Markdown; every one of them shows a diagnostic's
`related` places (the first definition of a duplicate, the rule a finding goes through).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


class Severity(enum.StrEnum):
    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True, order=True)
class Position:
    """A place in a spec file. Lines and columns are 1-based, as editors show them."""

    file: str
    line: int = 0
    column: int = 0

    def __str__(self) -> str:
        if self.line:
            return f"{self.file}:{self.line}:{self.column}"
        return self.file

    def to_json(self) -> dict[str, object]:
        """As a diagnostic's JSON holds its own place: `file`, `line`, `column` (null: none)."""
        return {"file": self.file, "line": self.line or None, "column": self.column or None}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Position:
        return cls(str(doc["file"]), int(doc.get("line") or 0), int(doc.get("column") or 0))


@dataclass(frozen=True)
class Diagnostic:
    severity: Severity
    code: str
    message: str
    position: Position | None = None
    path: str = ""
    address: str = ""
    related: tuple[Position, ...] = field(default=())

    def sort_key(self) -> tuple[str, int, int, str, str]:
        pos = self.position or Position("")
        return (pos.file, pos.line, pos.column, self.code, self.message)

    def to_json(self) -> dict[str, object]:
        pos = self.position
        out: dict[str, object] = {
            "severity": self.severity.value,
            "code": self.code,
            "message": self.message,
            "file": pos.file if pos else None,
            "line": pos.line if pos else None,
            "column": pos.column if pos else None,
            "path": self.path or None,
            "address": self.address or None,
        }
        # Only when there are any: a document without them reads as before.
        if self.related:
            out["related"] = [p.to_json() for p in self.related]
        return out

    def __str__(self) -> str:
        where = f"{self.position}: " if self.position else ""
        field_path = f" [{self.path}]" if self.path else ""
        return f"{where}{self.severity.value}: {self.message}{field_path} ({self.code})"


def error(code: str, message: str, **kw: object) -> Diagnostic:
    return Diagnostic(Severity.ERROR, code, message, **kw)  # type: ignore[arg-type]


def warning(code: str, message: str, **kw: object) -> Diagnostic:
    return Diagnostic(Severity.WARNING, code, message, **kw)  # type: ignore[arg-type]


def has_errors(diags: Iterable[Diagnostic]) -> bool:
    return any(d.severity is Severity.ERROR for d in diags)


def sorted_unique(diags: Iterable[Diagnostic]) -> list[Diagnostic]:
    """Sort by place and drop exact repeats (a profile error shows once, not once per guest)."""
    seen: set[tuple[object, ...]] = set()
    out: list[Diagnostic] = []
    for d in sorted(diags, key=Diagnostic.sort_key):
        key = (d.position, d.code, d.message, d.path)
        if key not in seen:
            seen.add(key)
            out.append(d)
    return out
