"""One module per outside system. Each observes into ObservedResources and applies Changes, and
wraps its client's errors in reconciler.model.errors. This module holds the protocols the
planner, the executor and the controller see them through.

Providers of different systems do not import each other: `velocity`, `traefik` and `agent`
know nothing of Proxmox or of one another. Any of them may import this module, which imports
none of them. What they share, and why:

- the Proxmox modules build on `proxmox`, because they talk to the same API and must agree on
  it. `firewall` composes a `ProxmoxProvider` for every call (one thread hop, one retry loop,
  one error translation in `proxmox.classify`) and reads a guest's ownership mark with
  `proxmox.read_mark` and `claimed`, so a guest's firewall is ours exactly when the guest is;
  `proxmox_access` asks for privileges through a `ProxmoxProvider`, and finds the storage a
  template lives on with `proxmox.template_storage`; `proxmox_inventory` compares an
  observation with the `proxmox.Inventory` the guest provider reads;
- `backoff` is the one delay between tries that `proxmox`, `traefik` and `velocity` wait by,
  so every provider backs off alike;
- `redisconn` turns the operator's Redis URL into a client; the callers use it, and hand the
  client to the providers that write to Redis (`traefik`, `agent`), which never import it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from reconciler.model.observed import (
    BackupVolume,
    ClusterFacts,
    GuestHealth,
    ObservedResource,
    RouteServing,
)
from reconciler.model.plans import Change
from reconciler.model.resources import Kind


@dataclass
class Observation:
    """What one observation has seen so far: handed to every provider's `observe` in turn, in
    the order of their `needs`, and what it adds besides resources (its extra outputs). The
    edge poll starts one with the guests it already knows; the full cycle starts it empty."""

    resources: list[ObservedResource] = field(default_factory=list)
    cluster: ClusterFacts | None = None  # the guest provider's nodes, storages, templates
    serving: dict[str, RouteServing] = field(default_factory=dict)  # by route address
    health: dict[str, GuestHealth] = field(default_factory=dict)  # by guest address, agents'
    # The backups on the spec's backup storages (the backup-job provider); None: not listed.
    backups: tuple[BackupVolume, ...] | None = None
    backup_errors: dict[str, str] = field(default_factory=dict)  # why they could not be listed

    def of(self, kind: Kind) -> list[ObservedResource]:
        return [r for r in self.resources if r.kind is kind]


class Provider(Protocol):
    """One outside system's kinds. `needs`: the kinds observed before this provider, which its
    `observe` reads from `seen` (the firewall needs the guests); `observe` returns its kinds'
    resources and may fill `seen`'s extra outputs (the guest provider its cluster facts,
    Traefik what its routes serve, the agents' provider the guests' health). `apply` carries
    out one change of its kinds.

    `optional`: its failure to observe costs only what it provides: its kinds are recorded in
    `ObservedState.errors` and left out of the plan, and the rest converges (the edge is told
    about guests, so the guests must converge while it is down). A provider that is not
    optional stops the observation: nothing is planned from half a platform.

    A provider may own no kind (`kinds` empty: the agents' health): it is never applied, and
    it takes part in every observation, since what it adds is what the others are planned by.

    Adding a kind is writing one such provider and registering it in
    `applying.connecting.connect_platform`; nothing else branches on a provider's class."""

    kinds: frozenset[Kind]
    needs: frozenset[Kind]
    optional: bool

    async def observe(self, seen: Observation) -> list[ObservedResource]: ...

    async def apply(self, change: Change) -> None: ...
