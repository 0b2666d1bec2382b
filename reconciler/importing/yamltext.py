"""A small YAML writer for the imported specs: block mappings, flow items, trailing comments,
and plain scalars only where YAML reads them back as the same string. Used by `writer` and
`edge_writer`; `dump` checks that the text loads back as its data. `unique_name` is the
writers' one way to keep the names they make distinct."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml


@dataclass(frozen=True)
class Commented:
    """A scalar written with a trailing comment."""

    value: Any
    comment: str


def _plain(value: Any) -> Any:
    """The data without comments: what the YAML must load back as."""
    if isinstance(value, Commented):
        return _plain(value.value)
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# Plain scalars: no indicator at the start, nothing that ends a scalar in flow context, no
# `: ` or ` #`; and in the end only what YAML reads back as this very string.
_SAFE_PLAIN = re.compile(r"^[A-Za-z0-9_./+(][A-Za-z0-9 _./+@:()'-]*\Z")


def scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if _SAFE_PLAIN.match(text) and ": " not in text and not text.endswith((":", " ")):
        try:
            if yaml.safe_load(text) == text:
                return text
        except yaml.YAMLError:
            pass
    return json.dumps(text, ensure_ascii=False)  # a JSON string is a YAML double-quoted one


def _flow(value: Any) -> str:
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{scalar(k)}: {_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    return scalar(value)


def _block(value: Any) -> bool:
    return isinstance(value, Mapping) and bool(value)


def _emit(data: Mapping[str, Any], indent: int = 0, *, gap_at: int = -1) -> list[str]:
    """Block mappings; lists of mappings as `- {flow}` items; other lists and scalars in flow
    style. A blank line between top-level sections, and between entries at `gap_at` that
    span several lines (guests, profiles)."""
    pad = " " * indent
    lines: list[str] = []
    previous: Any = None
    for i, (key, value) in enumerate(data.items()):
        if i and (indent == 0 or (indent == gap_at and _block(previous) and _block(value))):
            lines.append("")
        previous = value
        head = f"{pad}{scalar(key)}:"
        if isinstance(value, Commented):
            lines.append(f"{head} {_flow(value.value)}  # {value.comment}")
        elif _block(value):
            lines.append(head)
            lines.extend(_emit(value, indent + 2, gap_at=gap_at))
        elif isinstance(value, (list, tuple)) and any(isinstance(v, Mapping) for v in value):
            lines.append(head)
            lines.extend(f"{pad}  - {_flow(v)}" for v in value)
        else:
            lines.append(f"{head} {_flow(value)}")
    return lines


def dump(data: Mapping[str, Any], header: Sequence[str], *, gap_at: int = 2) -> str:
    """YAML for `data` under a comment header; checked to load back as the same data."""
    text = "\n".join([*(f"# {h}".rstrip() for h in header), "", *_emit(data, gap_at=gap_at), ""])
    if yaml.safe_load(text) != _plain(data):
        raise ValueError("internal error: the YAML written does not load back as its data")
    return text


def unique_name(base: str, taken: set[str]) -> str:
    """`base`, or `base-2`, `base-3`... (its first 60 characters, so a label stays within 63)
    when taken; the name returned is added to `taken`."""
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base[:60]}-{n}"
    taken.add(name)
    return name
