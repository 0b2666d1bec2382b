"""Desired resources: what the specs ask for, one value per address.

An address names a resource stably across runs (`guest/zpack-api`, `route/core/portal`,
`firewall/guest/mc-lobby`). Attributes are plain JSON-able values in the same shape the
observers report, so planning compares like with like. Built by `reconciler.loading.graph`.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from reconciler.model.diagnostics import Position


class Kind(enum.StrEnum):
    """Resource kinds, in the order they are created within one wave."""

    FIREWALL_CLUSTER = "firewall/cluster"
    FIREWALL_ALIAS = "firewall/alias"
    FIREWALL_IPSET = "firewall/ipset"
    FIREWALL_GROUP = "firewall/group"
    TEMPLATE = "template"
    POOL = "pool"  # before the guests created into it
    GUEST = "guest"
    FIREWALL_GUEST = "firewall/guest"
    HA = "ha"  # a guest's HA resource: after the guest, and after its firewall
    ROUTE = "route"
    VELOCITY = "velocity"
    BACKUP_JOB = "backup"
    DNS = "dns"  # a record set (name and type) in a zone: after what it names
    # PVE's own notification endpoints (sendmail, smtp, gotify, webhook), then the matchers
    # that route to them.
    NOTIFICATION_ENDPOINT = "notification/endpoint"
    NOTIFICATION_MATCHER = "notification/matcher"

    @property
    def rank(self) -> int:
        return list(Kind).index(self)


def kind_of(address: str) -> Kind:
    """`firewall/alias/api` -> Kind.FIREWALL_ALIAS. Longest prefix wins."""
    for kind in sorted(Kind, key=lambda k: -len(k.value)):
        if address == kind.value or address.startswith(kind.value + "/"):
            return kind
    raise ValueError(f"unknown resource address {address!r}")


def guest_address(name: str) -> str:
    return f"{Kind.GUEST}/{name}"


def ha_sid(guest_type: str, vmid: int) -> str:
    """A guest's HA resource id, as Proxmox names it: `ct:1000` (a container), `vm:100`."""
    return f"{'vm' if guest_type == 'qemu' else 'ct'}:{vmid}"


def template_address(name: str, node: str) -> str:
    """`template/debian-12/pve-core`: a declared template on one node. Per node, because each
    node downloads its own copy (one task each, failing alone), and a guest depends on the copy
    on its own node; the name first, so `--target template/debian-12` takes every node's."""
    return f"{Kind.TEMPLATE}/{name}/{node}"


def job_id(address: str) -> str:
    """`backup/game-worlds` -> `rc-game-worlds`: the id Proxmox keeps our backup job under
    unless the spec names one (an adopted job keeps its own)."""
    return "rc-" + address.removeprefix(f"{Kind.BACKUP_JOB.value}/")


def dns_address(name: str, rtype: str) -> str:
    """`dns/survival.play.zpack.dev/A`: one record set, by its name (lowercase, no final dot)
    and type; the planner pairs the spec's and the zone's by it."""
    return f"{Kind.DNS.value}/{name}/{rtype}"


@dataclass(frozen=True)
class Resource:
    address: str
    kind: Kind
    attributes: Mapping[str, Any]
    depends_on: tuple[str, ...] = ()
    # A resource that lives inside another and is recreated with it (a guest's firewall).
    attached_to: str | None = None
    position: Position | None = field(default=None, compare=False)

    @property
    def name(self) -> str:
        return self.address.removeprefix(self.kind.value + "/")


@dataclass(frozen=True)
class DesiredGraph:
    """Every desired resource, with dependency waves computed once."""

    platform: str
    resources: Mapping[str, Resource]
    waves: Mapping[str, int]
    settings: Mapping[str, Any] = field(default_factory=dict)

    def ordered(self) -> list[Resource]:
        """Deterministic order: wave, then kind, then address."""
        return sorted(
            self.resources.values(),
            key=lambda r: (self.waves[r.address], r.kind.rank, r.address),
        )
