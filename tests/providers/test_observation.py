"""One observation for every provider: the order follows each provider's declared `needs`,
what a provider sees is what was observed before it, and the caller's `given` resources are
seen but not looked at (the edge poll's guests). No provider class is special."""

from __future__ import annotations

from dataclasses import dataclass, field

import anyio
import pytest

from reconciler.applying.observing import observation_order, observe_all
from reconciler.model.errors import ConfigurationError, TemporaryError
from reconciler.model.observed import ObservedResource
from reconciler.model.plans import Change
from reconciler.model.resources import Kind
from reconciler.providers import Observation


@dataclass(eq=False)
class Fake:
    kinds: frozenset[Kind]
    needs: frozenset[Kind] = frozenset()
    streams: frozenset[Kind] = frozenset()
    fails: bool = False
    optional: bool = False
    saw: list[str] = field(default_factory=list)  # addresses seen when observed

    async def observe(self, seen: Observation) -> list[ObservedResource]:
        self.saw = [r.address or "" for r in seen.resources]
        if self.fails:
            raise TemporaryError("down")
        kind = sorted(self.kinds, key=lambda k: k.rank)[0]
        return [ObservedResource(kind=kind, owned=True, address=f"{kind.value}/x", id={"n": 1})]

    async def apply(self, change: Change) -> None:  # pragma: no cover - not applied here
        raise AssertionError


def test_a_provider_is_observed_after_the_kinds_it_needs() -> None:
    guests = Fake(frozenset({Kind.GUEST}))
    firewall = Fake(frozenset({Kind.FIREWALL_GUEST}), needs=frozenset({Kind.GUEST}))
    routes = Fake(frozenset({Kind.ROUTE}))
    # Registered in an order that would be wrong: the firewall still comes after the guests.
    order = observation_order([firewall, routes, guests])
    assert order == [routes, guests, firewall]
    state = anyio.run(lambda: observe_all([firewall, routes, guests], "p"))
    assert "guest/x" in firewall.saw
    assert set(state.kinds or ()) == {Kind.GUEST, Kind.FIREWALL_GUEST, Kind.ROUTE}


def test_given_resources_are_seen_but_their_kinds_not_looked_at() -> None:
    guests = Fake(frozenset({Kind.GUEST}))
    firewall = Fake(frozenset({Kind.FIREWALL_GUEST}), needs=frozenset({Kind.GUEST}))
    known = ObservedResource(kind=Kind.GUEST, owned=True, address="guest/known", id={"vmid": 1})
    state = anyio.run(
        lambda: observe_all(
            [guests, firewall],
            "p",
            kinds={Kind.FIREWALL_GUEST},
            given=[known],
        )
    )
    assert guests.saw == []  # never asked
    assert firewall.saw == ["guest/known"]
    assert state.kinds == (Kind.FIREWALL_GUEST,)  # guests not looked at: none planned


def test_a_failing_edge_provider_costs_its_kind_only() -> None:
    guests = Fake(frozenset({Kind.GUEST}))
    velocity = Fake(frozenset({Kind.VELOCITY}), fails=True, optional=True)
    state = anyio.run(lambda: observe_all([guests, velocity], "p"))
    assert state.kinds == (Kind.GUEST,)
    assert "velocity" in state.errors


def test_providers_that_need_each_other_are_a_configuration_error() -> None:
    a = Fake(frozenset({Kind.GUEST}), needs=frozenset({Kind.ROUTE}))
    b = Fake(frozenset({Kind.ROUTE}), needs=frozenset({Kind.GUEST}))
    with pytest.raises(ConfigurationError):
        observation_order([a, b])
