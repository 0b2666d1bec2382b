"""One module per outside system. Each observes into ObservedResources and applies Changes, and
wraps its client's errors in reconciler.model.errors. Providers do not import each other."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, runtime_checkable

from reconciler.model.observed import ClusterFacts, ObservedResource
from reconciler.model.plans import Change
from reconciler.model.resources import Kind


class Provider(Protocol):
    kinds: frozenset[Kind]

    async def observe(self) -> list[ObservedResource]: ...

    async def apply(self, change: Change) -> None: ...


@runtime_checkable
class ClusterObserver(Protocol):
    """A guest provider that also sees the cluster its guests live on (nodes, storages,
    templates), for the planner's placement checks. `seen` is what its `observe` returned."""

    async def observe_cluster(
        self, seen: Iterable[ObservedResource] = ()
    ) -> ClusterFacts | None: ...
