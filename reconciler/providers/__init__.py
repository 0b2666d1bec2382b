"""One module per outside system. Each observes into ObservedResources and applies Changes, and
wraps its client's errors in reconciler.model.errors. Providers do not import each other."""

from __future__ import annotations

from typing import Protocol

from reconciler.model.observed import ObservedResource
from reconciler.model.plans import Change
from reconciler.model.resources import Kind


class Provider(Protocol):
    kinds: frozenset[Kind]

    async def observe(self) -> list[ObservedResource]: ...

    async def apply(self, change: Change) -> None: ...
