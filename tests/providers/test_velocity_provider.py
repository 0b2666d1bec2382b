"""The Velocity provider against the bridge simulator, over real HTTP on loopback: registering,
observing, address changes, deletes, a Velocity restart."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anyio
import pytest

from reconciler.model.errors import ConflictError, OwnershipError
from reconciler.model.observed import ObservedResource
from reconciler.model.plans import Action, Change, FieldChange
from reconciler.model.resources import DesiredGraph, Kind
from reconciler.providers import Provider
from reconciler.providers.velocity import BRIDGE_FIELDS, VelocityProvider
from reconciler.simulators.velocity_bridge import VelocityBridgeSimulator

SECRET = "zpack-bridge-secret"


@pytest.fixture
def bridge() -> Iterator[VelocityBridgeSimulator]:
    with VelocityBridgeSimulator(SECRET) as bridge:
        yield bridge


@pytest.fixture
def provider(bridge: VelocityBridgeSimulator) -> VelocityProvider:
    return VelocityProvider(bridge.url, SECRET, timeout=2.0)


def observe(provider: VelocityProvider) -> list[ObservedResource]:
    return anyio.run(provider.observe)


def apply(provider: VelocityProvider, *changes: Change) -> None:
    async def run() -> None:
        for change in changes:
            await provider.apply(change)

    anyio.run(run)


def create(name: str, address: str, port: int = 25565, **extra: Any) -> Change:
    after = {"server_name": name, "address": address, "port": port, **extra}
    return Change(f"velocity/{name}", Kind.VELOCITY, Action.CREATE, 1, after=after)


def delete(name: str) -> Change:
    return Change(f"velocity/{name}", Kind.VELOCITY, Action.DELETE, 1, id={"server_name": name})


def update(before: dict[str, Any], after: dict[str, Any]) -> Change:
    fields = tuple(
        FieldChange(k, before.get(k), after.get(k))
        for k in sorted(set(before) | set(after))
        if before.get(k) != after.get(k)
    )
    name = after["server_name"]
    return Change(
        f"velocity/{name}",
        Kind.VELOCITY,
        Action.UPDATE,
        1,
        id={"server_name": name},
        before=before,
        after=after,
        fields=fields,
    )


@pytest.fixture
def creates(graph: DesiredGraph) -> list[Change]:
    """CREATE for every velocity/<name> of the example platform, as a plan from empty has."""
    return [
        Change(r.address, r.kind, Action.CREATE, 1, after=dict(r.attributes))
        for r in graph.ordered()
        if r.kind is Kind.VELOCITY
    ]


def test_register_then_observe(provider: VelocityProvider, bridge: VelocityBridgeSimulator) -> None:
    as_provider: Provider = provider  # the executor's protocol, checked by mypy
    assert as_provider.kinds == {Kind.VELOCITY}
    apply(provider, create("lobby", "10.20.0.10"))
    assert bridge.servers() == {"lobby": ("10.20.0.10", 25565)}
    [seen] = observe(provider)
    assert seen.address == "velocity/lobby" and seen.kind is Kind.VELOCITY
    assert seen.owned is True  # every registration on the platform's bridge is the platform's
    assert seen.id == {"server_name": "lobby"}
    assert seen.attributes == {"server_name": "lobby", "address": "10.20.0.10", "port": 25565}


def test_the_example_platform_registers_and_observes_without_forced_host(
    provider: VelocityProvider, creates: list[Change]
) -> None:
    assert len(creates) == 5
    apply(provider, *creates)
    seen = {r.address: r.attributes for r in observe(provider)}
    assert set(seen) == {c.address for c in creates}
    for change in creates:
        assert change.after is not None
        assert seen[change.address] == {k: change.after[k] for k in BRIDGE_FIELDS}
        assert "forced_host" not in seen[change.address]


def test_create_twice_is_harmless(
    provider: VelocityProvider, bridge: VelocityBridgeSimulator
) -> None:
    apply(provider, create("lobby", "10.20.0.10"), create("lobby", "10.20.0.10"))
    assert bridge.servers() == {"lobby": ("10.20.0.10", 25565)}


def test_address_change_is_unregister_then_register(
    provider: VelocityProvider, bridge: VelocityBridgeSimulator
) -> None:
    before = {"server_name": "lobby", "address": "10.20.0.10", "port": 25565}
    apply(provider, create("lobby", "10.20.0.10"))
    bridge.requests.clear()
    apply(provider, update(before, {**before, "address": "10.20.0.50", "port": 25570}))
    assert [(m, p, s) for m, p, s in bridge.requests] == [
        ("POST", "/zpack/unregister", 200),
        ("POST", "/zpack/register", 200),
    ]
    assert bridge.servers() == {"lobby": ("10.20.0.50", 25570)}


def test_forced_host_only_change_sends_nothing(
    provider: VelocityProvider, bridge: VelocityBridgeSimulator
) -> None:
    before = {"server_name": "survival", "address": "10.20.0.11", "port": 25565}
    apply(provider, create("survival", "10.20.0.11"))
    bridge.requests.clear()
    after = {**before, "forced_host": "survival.play.zpack.dev"}
    apply(provider, update({**before, "forced_host": None}, after))
    assert bridge.requests == []
    assert bridge.servers() == {"survival": ("10.20.0.11", 25565)}


def test_delete_unregisters_and_a_404_is_done(
    provider: VelocityProvider, bridge: VelocityBridgeSimulator
) -> None:
    apply(provider, create("lobby", "10.20.0.10"))
    apply(provider, delete("lobby"))
    assert bridge.servers() == {}
    apply(provider, delete("lobby"))  # already gone: 404, done
    assert [s for _, p, s in bridge.requests if p == "/zpack/unregister"] == [200, 404]
    assert observe(provider) == []


def test_restart_loses_everything_and_the_same_plan_restores_it(
    provider: VelocityProvider, bridge: VelocityBridgeSimulator, creates: list[Change]
) -> None:
    apply(provider, *creates)
    registered = bridge.servers()
    assert len(registered) == 5
    bridge.restart()
    assert observe(provider) == []
    apply(provider, *creates)
    assert bridge.servers() == registered
    assert {r.address for r in observe(provider)} == {c.address for c in creates}


def test_restart_between_plan_and_apply_of_an_address_change(
    provider: VelocityProvider, bridge: VelocityBridgeSimulator
) -> None:
    """The unregister meets a 404 (Velocity restarted since the plan): done, then register."""
    before = {"server_name": "lobby", "address": "10.20.0.10", "port": 25565}
    apply(provider, create("lobby", "10.20.0.10"))
    bridge.restart()
    apply(provider, update(before, {**before, "address": "10.20.0.50"}))
    assert bridge.servers() == {"lobby": ("10.20.0.50", 25565)}


def test_name_taken_by_another_address_is_a_conflict(
    provider: VelocityProvider, bridge: VelocityBridgeSimulator
) -> None:
    bridge.register("lobby", "10.99.0.1", 25565)  # registered by hand since the plan was made
    with pytest.raises(ConflictError, match=r"register velocity/lobby: 409 .*already registered"):
        apply(provider, create("lobby", "10.20.0.10"))
    assert bridge.servers() == {"lobby": ("10.99.0.1", 25565)}


def test_unmanaged_names_are_foreign_and_never_touched(bridge: VelocityBridgeSimulator) -> None:
    bridge.register("fallback", "10.20.0.2", 25565)  # from velocity.toml, say
    bridge.register("lobby", "10.20.0.10", 25565)
    provider = VelocityProvider(bridge.url, SECRET, unmanaged=["Fallback"])
    by_name = {r.id["server_name"]: r for r in observe(provider)}
    assert by_name["fallback"].owned is False and by_name["fallback"].address is None
    assert by_name["lobby"].owned is True
    with pytest.raises(OwnershipError):
        apply(provider, delete("fallback"))
    assert "fallback" in bridge.servers()


def test_an_open_list_works_too() -> None:
    with VelocityBridgeSimulator(SECRET, list_requires_secret=False) as bridge:
        provider = VelocityProvider(bridge.url, SECRET)
        apply(provider, create("lobby", "10.20.0.10"))
        assert [r.address for r in observe(provider)] == ["velocity/lobby"]
