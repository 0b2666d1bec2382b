"""Observing through the provider protocol alone: the order follows what each provider `needs`
(a provider owning no kind too), a failure costs only what an `optional` provider provides and
stops the observation otherwise, and the agents' health is a provider like the others, filling
`health` from the guests seen, against the agent simulator over real HTTP on loopback."""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import pytest

from reconciler.applying.observing import observation_order, observe_all
from reconciler.model.errors import PermanentError, TemporaryError
from reconciler.model.observed import GuestHealth, ObservedResource, ObservedState
from reconciler.model.plans import Change
from reconciler.model.resources import Kind
from reconciler.providers import Observation
from reconciler.providers.agent import AgentHealthProvider, AgentObserver
from reconciler.simulators.agent import AgentFleet
from tests.applying.fakes import GUEST, ROUTE, VELOCITY, Fake, FakeHealth, guest

# --- order --------------------------------------------------------------------------------


def test_a_provider_owning_no_kind_is_observed_after_the_kinds_it_needs() -> None:
    health = FakeHealth()
    guests = Fake(GUEST, found=[guest("a", 101), guest("b", 102)])
    routes = Fake(ROUTE)
    # Registered first, it still waits for the guests; what needs nothing keeps its place.
    assert observation_order([health, routes, guests]) == [routes, guests, health]
    state = anyio.run(lambda: observe_all([health, routes, guests], "p"))
    assert health.saw == ["guest/a", "guest/b"]
    assert set(state.health) == {"guest/a", "guest/b"}
    assert set(state.kinds or ()) == {Kind.GUEST, Kind.ROUTE}  # it adds no kind


def test_a_provider_owning_no_kind_serves_an_observation_of_some_kinds_only() -> None:
    """The edge poll: guests given, not looked at; the health is still asked, from them."""
    health = FakeHealth()
    guests = Fake(GUEST)
    velocity = Fake(VELOCITY)
    state = anyio.run(
        lambda: observe_all(
            [guests, velocity, health], "p", kinds={Kind.VELOCITY}, given=[guest("known", 7)]
        )
    )
    assert guests.saw is None  # never asked
    assert health.saw == ["guest/known"]
    assert state.health == {"guest/known": GuestHealth(running=True, reachable=True, ready=True)}
    assert state.kinds == (Kind.VELOCITY,)


# --- failures -------------------------------------------------------------------------------


# --- one concurrent graph ------------------------------------------------------------------


class Trickling:
    """Guests published one by one, each only once the test lets it (`next`)."""

    kinds = GUEST
    needs = frozenset[Kind]()
    streams = frozenset[Kind]()
    optional = False

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.let = anyio.Semaphore(0)
        self.done = False

    async def observe(self, seen: Observation) -> list[ObservedResource]:
        found = []
        for i, name in enumerate(self.names):
            await self.let.acquire()
            found.append(guest(name, 101 + i))
            seen.publish(found[-1])
        self.done = True
        return found

    async def apply(self, change: Change) -> None:  # pragma: no cover - never applied
        raise AssertionError(change)


class Streaming:
    """Needs the guests, takes them as they arrive: what the firewall does."""

    kinds = frozenset({Kind.FIREWALL_GUEST})
    needs = GUEST
    streams = GUEST
    optional = False

    def __init__(self, source: Trickling) -> None:
        self.source = source
        self.seen: list[tuple[str, bool]] = []  # (guest, whether the guests were all read)

    async def observe(self, seen: Observation) -> list[ObservedResource]:
        async for res in seen.arrive(Kind.GUEST):
            self.seen.append((res.address or "", self.source.done))
            self.source.let.release()  # the next guest only once this one was taken
        return []

    async def apply(self, change: Change) -> None:  # pragma: no cover - never applied
        raise AssertionError(change)


def test_a_streaming_provider_takes_each_guest_while_the_others_are_still_being_read() -> None:
    guests = Trickling(["a", "b", "c"])
    firewall = Streaming(guests)
    waiting = FakeHealth()  # needs the guests, does not stream: starts once they are all read
    late: list[bool] = []
    observe = waiting.observe

    async def observe_when_done(seen: Observation) -> list[ObservedResource]:
        late.append(guests.done)
        return await observe(seen)

    waiting.observe = observe_when_done  # type: ignore[method-assign]

    async def run() -> ObservedState:
        guests.let.release()  # the first guest
        # Provider after provider, this would never end: the guests wait for the firewall.
        with anyio.fail_after(10):
            return await observe_all([firewall, waiting, guests], "p")

    state = anyio.run(run)
    # Each guest was taken before the guest provider had finished, but the last.
    assert firewall.seen == [("guest/a", False), ("guest/b", False), ("guest/c", True)]
    assert late == [True]
    # Listed in the order of the providers' needs, whatever order they finished in.
    assert [r.address for r in state.resources] == ["guest/a", "guest/b", "guest/c"]


def test_an_optional_providers_failure_is_recorded_and_costs_only_its_kinds() -> None:
    guests = Fake(GUEST, found=[guest("a", 101)])
    velocity = Fake(VELOCITY, optional=True, fails=PermanentError("403: wrong secret"))
    routes = Fake(ROUTE)
    state = anyio.run(lambda: observe_all([guests, velocity, routes], "p"))
    assert state.errors == {"velocity": "403: wrong secret"}
    assert state.kinds == (Kind.GUEST, Kind.ROUTE)  # velocity not looked at: nothing planned
    assert {r.address for r in state.resources} == {"guest/a", "route/x"}
    assert routes.saw is not None  # the others went on


@pytest.mark.parametrize(
    "kinds",
    [
        pytest.param(GUEST, id="guests"),
        # An edge kind is no exception by itself: the provider's `optional` decides.
        pytest.param(VELOCITY, id="velocity, not declared optional"),
    ],
)
def test_a_failure_of_a_provider_that_is_not_optional_is_raised(kinds: frozenset[Kind]) -> None:
    failing = Fake(kinds, fails=TemporaryError("503: unavailable"))
    others = [Fake(GUEST), Fake(VELOCITY, optional=True), Fake(ROUTE, optional=True)]
    providers = [failing, *(p for p in others if p.kinds != kinds)]
    with pytest.raises(TemporaryError, match="503"):
        anyio.run(lambda: observe_all(providers, "p"))


def test_a_failing_provider_owning_no_kind_is_recorded_by_its_class() -> None:
    health = FakeHealth(fails=PermanentError("agents' cache refused"))
    state = anyio.run(lambda: observe_all([Fake(GUEST, found=[guest("a", 101)]), health], "p"))
    assert state.errors == {"FakeHealth": "agents' cache refused"}
    assert state.health == {}  # unknown: the planner takes agent layers' guests as not ready
    assert state.kinds == (Kind.GUEST,)


# --- the agents' health, against the agent simulator ---------------------------------------


@pytest.fixture
def fleet() -> Iterator[AgentFleet]:
    with AgentFleet(control=False) as fleet:
        yield fleet


def test_the_agents_provider_fills_health_from_the_guests_seen(fleet: AgentFleet) -> None:
    names = ["mc-lobby", "mc-survival", "mc-creative", "mc-skyblock", "mc-rlcraft"]
    agents = {name: fleet.add(vmid, name=name) for vmid, name in enumerate(names, start=1001)}
    agents["mc-survival"].unready("RCON not answering")
    agents["mc-creative"].unreachable()
    observer = AgentObserver(timeout=1.0, connect_timeout=1.0)
    provider = AgentHealthProvider(
        observer,
        {f"guest/{n}": fleet.endpoint(a.vmid) for n, a in agents.items()},
        layers=("runtime",),
    )
    guests = Fake(
        GUEST,
        found=[
            guest("mc-lobby", 1001),
            guest("mc-survival", 1002),
            guest("mc-creative", 1003),
            guest("mc-skyblock", 1004, state="stopped"),
            # mc-rlcraft: not observed, its agent not asked
        ],
    )
    state = anyio.run(lambda: observe_all([provider, guests], "p"))
    health = state.health
    assert list(health) == sorted(f"guest/{n}" for n in names)
    assert health["guest/mc-lobby"] == GuestHealth(
        running=True, reachable=True, ready=True, crashes=0
    )
    assert health["guest/mc-survival"] == GuestHealth(
        running=True, reachable=True, ready=False, error="RCON not answering", crashes=0
    )
    creative = health["guest/mc-creative"]
    assert (creative.running, creative.reachable, creative.ready) == (True, False, False)
    assert creative.error is not None and "cannot connect" in creative.error
    assert health["guest/mc-skyblock"] == GuestHealth(error="the guest is stopped")
    assert health["guest/mc-rlcraft"] == GuestHealth(error="the guest does not exist")
    assert observer.requests == 3  # only the running guests' agents were asked
    assert state.kinds == (Kind.GUEST,) and state.errors == {}
    assert [h.serving for h in health.values()] == [False, True, False, False, False]
