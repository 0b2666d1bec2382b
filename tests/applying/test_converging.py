"""The one converge path with in-memory providers and the example platform's desired graph: on
some kinds only (the edge poll) it never observes, plans or applies another kind, given guests
included; and the agent layers it is passed gate the edge on the health the agents' provider
observed."""

from __future__ import annotations

import anyio

from reconciler.applying.converging import Convergence, converge
from reconciler.model.observed import ObservedResource
from reconciler.model.plans import Action
from reconciler.model.resources import DesiredGraph, Kind
from reconciler.providers import Provider
from tests.applying.fakes import GUEST, VELOCITY, Fake, FakeHealth, guest

SERVERS = ["creative", "lobby", "rlcraft", "skyblock", "survival"]  # the example's registrations


def registration(name: str) -> ObservedResource:
    return ObservedResource(
        kind=Kind.VELOCITY,
        owned=True,
        address=f"velocity/{name}",
        id={"server_name": name},
        attributes={"server_name": name, "address": "10.9.9.9", "port": 25565},
    )


def kinds_planned(result: Convergence) -> set[Kind]:
    return {c.kind for r in result.rounds for c in r.plan.changes}


def test_converging_some_kinds_never_touches_a_kind_not_looked_at(graph: DesiredGraph) -> None:
    orphan = guest("orphan", 999)  # ours, in no spec: a run that looks at guests deletes it
    guests = Fake(GUEST, found=[orphan])
    velocity = Fake(VELOCITY, optional=True, found=[registration("stray")])
    result = anyio.run(
        lambda: converge(
            graph,
            [guests, velocity],
            kinds={Kind.VELOCITY},
            given=[orphan],
            allow_destroy=True,
        )
    )
    assert result.ok
    assert guests.saw is None and guests.applied == []  # never asked, never applied
    assert kinds_planned(result) == {Kind.VELOCITY}
    observed = result.rounds[0].observed
    assert observed is not None and observed.kinds == (Kind.VELOCITY,)
    assert ("velocity/stray", Action.DELETE) in velocity.applied
    assert {a for a, x in velocity.applied if x is Action.CREATE} == {
        f"velocity/{s}" for s in SERVERS
    }


def test_converging_every_kind_does_delete_what_the_spec_no_longer_has(
    graph: DesiredGraph,
) -> None:
    """The contrast that gives the test above its meaning: looked at, the orphan goes."""
    guests = Fake(GUEST, found=[guest("orphan", 999)])
    velocity = Fake(VELOCITY, optional=True, found=[registration("stray")])
    anyio.run(lambda: converge(graph, [guests, velocity], allow_destroy=True, max_rounds=1))
    assert ("guest/orphan", Action.DELETE) in guests.applied
    assert ("velocity/stray", Action.DELETE) in velocity.applied


def test_the_agent_layers_gate_the_edge_on_the_observed_health(graph: DesiredGraph) -> None:
    running = [guest(f"mc-{s}", 1001 + i) for i, s in enumerate(SERVERS)]
    health = FakeHealth(unready=frozenset({"guest/mc-survival"}))

    def registered(layers: tuple[str, ...] = ()) -> set[str]:
        velocity = Fake(VELOCITY, optional=True, found=[])
        providers: list[Provider] = [Fake(GUEST), velocity, health]
        anyio.run(
            lambda: converge(
                graph, providers, kinds={Kind.VELOCITY}, given=running, agent_layers=layers
            )
        )
        return {a.removeprefix("velocity/") for a, x in velocity.applied if x is Action.CREATE}

    assert registered(("runtime",)) == set(SERVERS) - {"survival"}
    # Without agent layers only a recorded "not ready" withholds: the same here, since the
    # health provider did record survival's.
    assert registered() == set(SERVERS) - {"survival"}
    # A runtime guest the agents' provider says nothing of: withheld only when its layer is
    # gated on the agents.
    running.pop(SERVERS.index("lobby"))
    assert registered(("runtime",)) == set(SERVERS) - {"survival", "lobby"}
    assert registered() == set(SERVERS) - {"survival"}
