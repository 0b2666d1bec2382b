"""In-memory providers for the applying tests: they speak `reconciler.providers.Provider` and
nothing else, so what they show holds for every provider."""

from __future__ import annotations

from dataclasses import dataclass, field

from reconciler.model.observed import GuestHealth, ObservedResource
from reconciler.model.plans import Action, Change
from reconciler.model.resources import Kind
from reconciler.providers import Observation

GUEST = frozenset({Kind.GUEST})
VELOCITY = frozenset({Kind.VELOCITY})
ROUTE = frozenset({Kind.ROUTE})


def guest(name: str, vmid: int, state: str = "running") -> ObservedResource:
    return ObservedResource(
        kind=Kind.GUEST,
        owned=True,
        address=f"guest/{name}",
        id={"vmid": vmid, "node": "pve1"},
        attributes={"state": state},
    )


@dataclass(eq=False)
class Fake:
    """A provider that returns `found` (one resource of its first kind by default), or raises
    `fails`; it records the addresses it was shown and the changes it applied."""

    kinds: frozenset[Kind]
    needs: frozenset[Kind] = frozenset()
    streams: frozenset[Kind] = frozenset()
    optional: bool = False
    fails: Exception | None = None
    found: list[ObservedResource] | None = None
    saw: list[str] | None = None  # None: never asked
    applied: list[tuple[str, Action]] = field(default_factory=list)

    async def observe(self, seen: Observation) -> list[ObservedResource]:
        self.saw = [r.address or "" for r in seen.resources]
        if self.fails is not None:
            raise self.fails
        if self.found is not None:
            return list(self.found)
        kind = sorted(self.kinds, key=lambda k: k.rank)[0]
        return [ObservedResource(kind=kind, owned=True, address=f"{kind.value}/x", id={"n": 1})]

    async def apply(self, change: Change) -> None:
        self.applied.append((change.address, change.action))


@dataclass(eq=False)
class FakeHealth:
    """Owns no kind, needs the guests, and marks every guest it is shown as running, and as
    ready unless `unready` names it: the shape of the agents' provider without its network."""

    kinds: frozenset[Kind] = frozenset()
    needs: frozenset[Kind] = GUEST
    streams: frozenset[Kind] = frozenset()
    optional: bool = True
    fails: Exception | None = None
    unready: frozenset[str] = frozenset()  # guest addresses
    saw: list[str] | None = None

    async def observe(self, seen: Observation) -> list[ObservedResource]:
        self.saw = [r.address or "" for r in seen.of(Kind.GUEST)]
        if self.fails is not None:
            raise self.fails
        for address in self.saw:
            ready = address not in self.unready
            seen.health[address] = GuestHealth(running=True, reachable=True, ready=ready)
        return []

    async def apply(self, change: Change) -> None:  # pragma: no cover - owns no kind
        raise AssertionError(change)
