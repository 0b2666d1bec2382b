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

from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import anyio

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
    """What one observation has seen so far, shared by every provider's `observe`, and what it
    adds besides resources (its extra outputs). The edge poll starts one with the guests it
    already knows; the full cycle starts it empty.

    `applying.observing.observe_all` runs the providers at once: `pending` holds the kinds
    still being observed; a provider starts once the kinds it `needs` are done (`complete`),
    except those it `streams`, which it takes one by one as they `arrive` (the firewall reads
    a guest's rules as soon as the guest is known to be ours). A provider called on its own,
    with nothing pending, finds every kind done."""

    resources: list[ObservedResource] = field(default_factory=list)
    cluster: ClusterFacts | None = None  # the guest provider's nodes, storages, templates
    serving: dict[str, RouteServing] = field(default_factory=dict)  # by route address
    health: dict[str, GuestHealth] = field(default_factory=dict)  # by guest address, agents'
    # The backups on the spec's backup storages (the backup-job provider); None: not listed.
    backups: tuple[BackupVolume, ...] | None = None
    backup_errors: dict[str, str] = field(default_factory=dict)  # why they could not be listed
    pending: set[Kind] = field(default_factory=set)  # kinds whose provider has not finished
    _early: dict[Kind, list[ObservedResource]] = field(default_factory=dict)
    _event: anyio.Event | None = None  # set (and dropped) at every publish and finish

    def of(self, kind: Kind) -> list[ObservedResource]:
        return [r for r in self.resources if r.kind is kind]

    def publish(self, resource: ObservedResource) -> None:
        """A resource its provider will return, announced now for the providers that stream
        its kind."""
        self._early.setdefault(resource.kind, []).append(resource)
        self._wake()

    def finish(self, kinds: Iterable[Kind], found: Iterable[ObservedResource] = ()) -> None:
        """`kinds` are done: `found` is what their provider returned (nothing if it failed)."""
        self.resources.extend(found)
        self.pending.difference_update(kinds)
        self._wake()

    async def complete(self, kinds: Iterable[Kind]) -> None:
        """Wait until none of `kinds` is pending."""
        wanted = set(kinds)
        while wanted & self.pending:
            await self._changed()

    async def arrive(self, kind: Kind) -> AsyncIterator[ObservedResource]:
        """Each resource of `kind`, once, as it is published or, at the latest, when its
        provider has finished; ends then."""
        sent: set[int] = set()
        while True:
            for resource in list(self._early.get(kind, ())):
                if id(resource) not in sent:
                    sent.add(id(resource))
                    yield resource
            if kind not in self.pending:
                break
            await self._changed()
        for resource in self.of(kind):
            if id(resource) not in sent:
                sent.add(id(resource))
                yield resource

    async def _changed(self) -> None:
        if self._event is None:
            self._event = anyio.Event()
        await self._event.wait()

    def _wake(self) -> None:
        event, self._event = self._event, None
        if event is not None:
            event.set()


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

    `streams`: the kinds of `needs` it takes one by one as they are seen
    (`Observation.arrive`), starting before they are all done; the others it reads, complete,
    from `seen` (`Observation.of`).

    A provider may own no kind (`kinds` empty: the agents' health): it is never applied, and
    it takes part in every observation, since what it adds is what the others are planned by.

    Adding a kind is writing one such provider and registering it in
    `applying.connecting.connect_platform`; nothing else branches on a provider's class."""

    kinds: frozenset[Kind]
    needs: frozenset[Kind]
    streams: frozenset[Kind]  # of `needs`: taken as they arrive (`Observation.arrive`)
    optional: bool

    async def observe(self, seen: Observation) -> list[ObservedResource]: ...

    async def apply(self, change: Change) -> None: ...
