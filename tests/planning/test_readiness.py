"""The planner's readiness gate, offline: Velocity registrations and `when_unready: withhold`
routes follow their target guest's health; their deletes are soft state."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import pytest

from reconciler.model.diagnostics import Severity
from reconciler.model.observed import GuestHealth, ObservedState
from reconciler.model.plans import Action, Plan
from reconciler.model.resources import DesiredGraph, Kind
from reconciler.planning.planner import converged_state, make_plan

RUNTIME = ("runtime",)
SERVING = GuestHealth(running=True, reachable=True, ready=True)


def runtime_guests(graph: DesiredGraph) -> list[str]:
    ranges = graph.settings["ranges"]
    return [
        a
        for a, r in graph.resources.items()
        if r.kind is Kind.GUEST and ranges[r.attributes["role"]]["layer"] == "runtime"
    ]


def state(
    graph: DesiredGraph,
    changed: Mapping[str, GuestHealth | None] | None = None,
    *,
    health: dict[str, GuestHealth] | None = None,
    without: tuple[str, ...] = (),
) -> ObservedState:
    """The converged platform, every runtime guest serving unless `changed` (guest name ->
    health, None for no entry), less the resources in `without`."""
    base = converged_state(graph)
    seen = {a: SERVING for a in runtime_guests(graph)} if health is None else dict(health)
    for name, value in (changed or {}).items():
        seen.pop(f"guest/{name}", None)
        if value is not None:
            seen[f"guest/{name}"] = value
    kept = tuple(r for r in base.resources if r.address not in without)
    return base.model_copy(update={"resources": kept, "health": seen})


def by_address(plan: Plan) -> dict[str, Any]:
    return {c.address: c for c in plan.actions}


def codes(plan: Plan) -> list[tuple[str, str | None]]:
    return [(d.code, d.address) for d in plan.diagnostics]


def test_all_ready_is_no_change(graph: DesiredGraph) -> None:
    plan = make_plan(graph, state(graph), agent_layers=RUNTIME)
    assert not plan.has_changes and not plan.diagnostics


UNREADY: dict[str, GuestHealth | None] = {
    "stopped": GuestHealth(running=False, error="the guest is stopped"),
    "unreachable": GuestHealth(running=True, reachable=False, error="cannot connect"),
    "not-ready": GuestHealth(running=True, reachable=True, ready=False, error="query timed out"),
    "no-health": None,
}


@pytest.mark.parametrize("case", sorted(UNREADY))
def test_a_registered_server_turning_unready_is_unregistered_without_pruning(
    graph: DesiredGraph, case: str
) -> None:
    plan = make_plan(graph, state(graph, {"mc-lobby": UNREADY[case]}), agent_layers=RUNTIME)
    assert not plan.errored
    changes = by_address(plan)
    assert set(changes) == {"velocity/lobby"}  # prune is off and nothing else is touched
    delete = changes["velocity/lobby"]
    assert delete.action is Action.DELETE
    assert delete.reason.startswith("withheld: guest/mc-lobby ")
    assert ("withheld", "velocity/lobby") in codes(plan)


@pytest.mark.parametrize("case", sorted(UNREADY))
def test_an_unready_server_is_not_registered(graph: DesiredGraph, case: str) -> None:
    observed = state(graph, {"mc-lobby": UNREADY[case]}, without=("velocity/lobby",))
    plan = make_plan(graph, observed, agent_layers=RUNTIME)
    assert not plan.has_changes
    assert ("withheld", "velocity/lobby") in codes(plan)


def test_it_is_registered_again_once_ready(graph: DesiredGraph) -> None:
    plan = make_plan(graph, state(graph, without=("velocity/lobby",)), agent_layers=RUNTIME)
    assert [(c.address, c.action) for c in plan.actions] == [("velocity/lobby", Action.CREATE)]
    assert not plan.diagnostics


def test_a_new_guest_waits_for_its_agent(graph: DesiredGraph) -> None:
    # Nothing observed yet: the guests are created, their registrations wait for readiness.
    plan = make_plan(graph, ObservedState(), agent_layers=RUNTIME)
    kinds = {c.kind for c in plan.actions}
    assert Kind.GUEST in kinds and Kind.VELOCITY not in kinds
    assert sum(1 for code, _ in codes(plan) if code == "withheld") == 5 + 5  # servers, routes


def test_without_agent_layers_only_recorded_health_gates(graph: DesiredGraph) -> None:
    # An offline plan from a snapshot without health: nothing is withheld.
    observed = state(graph, health={}, without=("velocity/lobby",))
    plan = make_plan(graph, observed)
    assert [(c.address, c.action) for c in plan.actions] == [("velocity/lobby", Action.CREATE)]
    # ... but recorded health still does.
    observed = state(graph, health={"guest/mc-lobby": GuestHealth(running=False)})
    assert by_address(make_plan(graph, observed))["velocity/lobby"].action is Action.DELETE


def test_soft_deletes_do_not_count_against_the_delete_limit(graph: DesiredGraph) -> None:
    down = {name: UNREADY["stopped"] for name in ("mc-lobby", "mc-survival", "mc-creative")}
    down |= {"mc-skyblock": UNREADY["stopped"], "mc-rlcraft": UNREADY["stopped"]}
    plan = make_plan(graph, state(graph, down), agent_layers=RUNTIME)
    deletes = [c for c in plan.actions if c.action is Action.DELETE]
    assert len(deletes) == 5 + 3  # every server; the routes to mc-survival, -creative, -skyblock
    assert graph.settings["max_deletes_per_run"] < len(deletes)
    assert not plan.errored


def test_an_unreachable_agent_is_a_warning_naming_the_guest_and_its_error(
    graph: DesiredGraph,
) -> None:
    plan = make_plan(
        graph, state(graph, {"mc-creative": UNREADY["unreachable"]}), agent_layers=RUNTIME
    )
    warnings = [d for d in plan.diagnostics if d.code == "agent-unreachable"]
    assert [(d.severity, d.address) for d in warnings] == [(Severity.WARNING, "guest/mc-creative")]
    assert "cannot connect" in warnings[0].message
    assert not plan.errored


def test_routes_follow_when_unready(graph: DesiredGraph) -> None:
    # The runtime instance withholds; the core instance (zpack-api is not watched) keeps.
    observed = state(
        graph,
        {"dev-alice": UNREADY["not-ready"], "zpack-api": UNREADY["stopped"]},
    )
    plan = make_plan(graph, observed, agent_layers=RUNTIME)
    assert {c.address: c.action for c in plan.actions} == {"route/runtime/ide-alice": Action.DELETE}


def test_a_failed_observer_is_a_warning_and_the_rest_is_planned(graph: DesiredGraph) -> None:
    observed = state(graph, without=("guest/mc-lobby",)).model_copy(
        update={
            "kinds": tuple(k for k in Kind if k is not Kind.VELOCITY),
            "errors": {"velocity": "403: the Velocity bridge refused our X-Zpack-Secret"},
        }
    )
    plan = make_plan(graph, observed, agent_layers=RUNTIME)
    assert not plan.errored
    assert {c.kind for c in plan.actions} == {Kind.GUEST, Kind.FIREWALL_GUEST}
    (failed,) = [d for d in plan.diagnostics if d.code == "observe-failed"]
    assert "velocity" in failed.message and "refused" in failed.message


def test_health_round_trips_and_version_1_snapshots_still_read(graph: DesiredGraph) -> None:
    observed = state(graph, {"mc-lobby": UNREADY["unreachable"]})
    doc = json.loads(observed.model_dump_json())
    assert doc["format_version"] == 2
    assert doc["health"]["guest/mc-lobby"] == {
        "running": True,
        "reachable": False,
        "ready": False,
        "error": "cannot connect",
        "crashes": None,  # the agent's crash count: unknown for one it cannot reach
    }
    again = ObservedState.model_validate(doc)
    assert again == observed and again.digest() == observed.digest()
    old = {k: v for k, v in doc.items() if k not in ("health", "errors")} | {"format_version": 1}
    v1 = ObservedState.model_validate(old)
    assert v1.health == {} and v1.format_version == 1
    # Without health the digest is what version 1 computed; health changes it.
    assert v1.digest() == v1.model_copy(update={"format_version": 2}).digest()
    assert v1.digest() != observed.digest()
