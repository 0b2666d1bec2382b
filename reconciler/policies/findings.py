"""What a policy rule finds, in terms neither input owns, and the phrases adapters word it with.

The rules in `reconciler.policies.design` and `reconciler.policies.reach` return these values;
`reconciler.loading.policies` turns them into error diagnostics at the spec's file:line, and
`reconciler.planning.observed_policies` into plan warnings naming live objects. Nothing here
knows about files, positions or plans.

A `Place` is where a finding points: a path into the spec, such as
`("guests", "mc-x", "firewall", "rules", 0, "source")`, or a live object's address and a path
inside it, such as `firewall/guest/mc-x` and `("rules", 0)`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from reconciler.policies.reachability import Address

Path = tuple[str | int, ...]


@dataclass(frozen=True)
class Place:
    """A spec path (`address` empty), or a live object's address and a path inside it."""

    path: Path = ()
    address: str = ""


@dataclass(frozen=True)
class Finding:
    """A rule the spec breaks: its stable code and message, the spec path of the field to
    change, the resource address it concerns, and other spec paths worth showing with it."""

    code: str
    message: str
    path: Path
    address: str = ""
    related: tuple[Path, ...] = ()


def unknown_layers(known: Mapping[str, object], names: Sequence[str], path: Path) -> list[Finding]:
    """A policy's layer list names only layers the spec defines."""
    return [
        Finding("unknown-reference", f"layer {name!r} is not defined", (*path, i))
        for i, name in enumerate(names)
        if name not in known
    ]


# --- phrases ---------------------------------------------------------------------------------


def quoted(names: Sequence[str], *, limit: int = 3) -> str:
    """'a', 'b', 'c' and 4 more."""
    shown = ", ".join(f"'{n}'" for n in names[:limit])
    more = len(names) - limit
    return f"{shown} and {more} more" if more > 0 else shown


def guests_phrase(layer: str, names: Sequence[str]) -> str:
    """runtime guest 'a' / runtime guests 'a', 'b', 'c' and 4 more."""
    if len(names) == 1:
        return f"{layer} guest '{names[0]}'"
    return f"{layer} guests {quoted(names)}"


def senders_phrase(layer: str, sources: Mapping[str, str]) -> str:
    """Who gets in, by one example: "runtime guest 'a' (10.20.0.10)" or "7 runtime guests, e.g.
    'a' (10.20.0.10),"."""
    example, ips = next(iter(sources.items()))
    if len(sources) == 1:
        return f"{layer} guest '{example}' ({ips})"
    return f"{len(sources)} {layer} guests, e.g. '{example}' ({ips}),"


def ip_text(ips: Sequence[Address]) -> str:
    return ", ".join(str(ip) for ip in ips) if ips else "dhcp"


_FLAGS = (
    ("-i", "iface"),
    ("-source", "source"),
    ("-dest", "dest"),
    ("-p", "proto"),
    ("-dport", "dport"),
    ("-sport", "sport"),
)


def fw_line(fields: Mapping[str, Any]) -> str:
    """A rule, given by its Proxmox fields, as Proxmox's .fw files spell it:
    `IN ACCEPT -source api -p tcp -dport 18888`."""
    action = str(fields.get("action", "?"))
    if fields.get("macro"):
        action = f"{fields['macro']}({action})"
    parts = [str(fields.get("type", "?")).upper(), action]
    for flag, key in _FLAGS:
        if fields.get(key):
            parts += [flag, str(fields[key])]
    return " ".join(parts)
