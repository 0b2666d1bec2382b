"""What decides a guest's inbound traffic, in terms both inputs share, and how chains compile.

The rules in `reconciler.policies.reach` ask one `Firewalls` about each guest: its layer, its
addresses and its `Inbound` (the switches that void every rule, the default policy, the chain in
order). `reconciler.policies.spec_firewall` answers from the spec, and
`reconciler.policies.live_firewall` from the observed state. Both hand their rules over as
Proxmox writes them (`type`, `action`, `macro`, `source`, `dest`, `proto`, `dport`, `sport`,
`iface`, `enable`) and compile them through one `RuleBook`, so a rule reads the same whichever
side wrote it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from reconciler.policies.findings import Place
from reconciler.policies.reachability import (
    Address,
    AddressBook,
    GroupRef,
    Rule,
    compile_rule,
    expand_groups,
)


@dataclass(frozen=True)
class Origin:
    """A rule or security group reference: where it is written, the place a finding about it
    points at (`blame`: a spec rule's `source`, which is what to narrow, or a live rule as a
    whole), and its Proxmox fields as written."""

    at: Place
    blame: Place
    fields: Mapping[str, Any] = field(compare=False)


@dataclass(frozen=True)
class Void:
    """A firewall switch that is off, so that no rule of the guest applies: where, and why."""

    place: Place
    reason: str


@dataclass(frozen=True)
class Inbound:
    """What decides inbound traffic to one guest, or why nothing does (`void`)."""

    void: tuple[Void, ...]
    policy: str
    policy_place: Place
    chain: tuple[Rule[Origin], ...]


class Firewalls(Protocol):
    """One input of the reach rules: the guests to look at, and their firewalls."""

    def names(self) -> Sequence[str]:
        """The guests whose firewall is looked at, in the order findings name them."""
        ...

    def layer(self, name: str) -> str | None: ...

    def ips(self, name: str) -> list[Address]:
        """The guest's static addresses (empty: none known, e.g. DHCP)."""
        ...

    def inbound(self, name: str) -> Inbound | None:
        """None when the guest's firewall is not known (not observed)."""
        ...


def interface_ips(texts: Iterable[str]) -> list[Address]:
    """The addresses of `ip=` values such as `10.10.0.11/24`; `dhcp` and `manual` have none."""
    return [ipaddress.ip_interface(t).ip for t in texts if "/" in t]


def enabled(fields: Mapping[str, Any]) -> bool:
    # The API returns `enable` as 0/1, the spec as a bool; a rule without it is off.
    return bool(int(fields.get("enable", 0)))


def _text(fields: Mapping[str, Any], key: str) -> str | None:
    value = fields.get(key)
    return None if value is None else str(value)


class RuleBook:
    """The names rules may use (aliases, IP sets) and the security groups, compiled once."""

    def __init__(self, book: AddressBook, groups: Mapping[str, Sequence[Origin]]) -> None:
        self.book = book
        self.groups: dict[str, list[Rule[Origin]]] = {
            # Proxmox does not nest security groups: a group entry inside one is skipped.
            name: [
                rule
                for origin in entries
                if origin.fields.get("type") != "group"
                for rule in self.compile(origin)
            ]
            for name, entries in groups.items()
        }

    def compile(self, origin: Origin) -> tuple[Rule[Origin], ...]:
        """One rule -> resolved rules. Names nobody defines are left out here: the spec's
        structural checks report them (`loading.checks.check_references`)."""
        fields = origin.fields
        return compile_rule(
            origin,
            direction=str(fields.get("type", "in")),
            action=str(fields.get("action", "")),
            book=self.book,
            source=_text(fields, "source"),
            dest=_text(fields, "dest"),
            proto=_text(fields, "proto"),
            dport=_text(fields, "dport"),
            sport=_text(fields, "sport"),
            macro=_text(fields, "macro"),
            iface=_text(fields, "iface"),
            enabled=enabled(fields),
        ).rules

    def chain(self, entries: Iterable[Origin]) -> tuple[Rule[Origin], ...]:
        """A guest's rules in order, each group reference replaced by its group's rules."""
        found: list[Rule[Origin] | GroupRef[Origin]] = []
        for origin in entries:
            fields = origin.fields
            if fields.get("type") == "group":
                name = str(fields["action"])
                found.append(GroupRef(origin=origin, name=name, enabled=enabled(fields)))
            else:
                found.extend(self.compile(origin))
        return tuple(expand_groups(found, self.groups))
