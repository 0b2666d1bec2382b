"""The plan as a value: every change the planner makes says why it exists as data (`cause`),
and the plan JSON keeps it, reading plans saved before it was recorded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from reconciler.cli import render
from reconciler.cli.main import _load_observed
from reconciler.model.diagnostics import Position, error
from reconciler.model.observed import GuestHealth, ObservedState
from reconciler.model.plans import Action, Cause, Change, Plan, plan_from_json
from reconciler.model.resources import DesiredGraph, Kind
from reconciler.planning.planner import converged_state, make_plan
from tests.guest_helpers import load_copy

# The causes each action may have: a cause never contradicts its action.
CAUSES = {
    Action.NOOP: {Cause.IN_SYNC},
    Action.CREATE: {Cause.MISSING, Cause.WITH_PARENT},
    Action.UPDATE: {Cause.DRIFTED},
    Action.MIGRATE: {Cause.MOVED},
    Action.REPLACE: {Cause.IMMUTABLE, Cause.RENUMBERED},
    Action.DELETE: {Cause.NOT_IN_SPEC, Cause.WITHHELD},
}
LOBBY = "guest/mc-lobby"


def causes(plan: Plan) -> dict[str, Cause | None]:
    return {c.address: c.cause for c in plan.changes}


def without(state: ObservedState, address: str) -> ObservedState:
    kept = tuple(r for r in state.resources if r.address != address)
    return state.model_copy(update={"resources": kept})


@pytest.fixture(scope="module")
def sample_plan(graph: DesiredGraph) -> Plan:
    return make_plan(graph, _load_observed("sample"))


def test_every_change_of_the_sample_has_a_cause_that_fits_its_action(sample_plan: Plan) -> None:
    for change in sample_plan.changes:
        assert change.cause in CAUSES[change.action], change
    found = {c.cause for c in sample_plan.changes}
    assert {Cause.MISSING, Cause.DRIFTED, Cause.MOVED, Cause.IMMUTABLE} <= found
    assert {Cause.NOT_IN_SPEC, Cause.IN_SYNC} <= found


def test_a_firewall_whose_guest_is_created_again_is_created_with_it(graph: DesiredGraph) -> None:
    plan = make_plan(graph, without(converged_state(graph), LOBBY))
    found = causes(plan)
    assert found[LOBBY] is Cause.MISSING
    assert found["firewall/guest/mc-lobby"] is Cause.WITH_PARENT
    lines = render.render_text(plan).splitlines()
    # Only the create for another's sake says why; a missing one is simply created.
    fw = "  + firewall/guest/mc-lobby  (vmid 1000 on pve-runtime)"
    assert f"{fw}  (guest/mc-lobby is created)  (then starts the guest)" in lines
    guest = "  + guest/mc-lobby  (vmid 1000 on pve-runtime)"
    assert f"{guest}  (starts once its firewall is in place)" in lines


def test_a_vmid_change_is_a_renumbering(graph: DesiredGraph, tmp_path: Path) -> None:
    renumbered = load_copy(tmp_path, {"game.yaml": ("    vmid: 1000\n", "    vmid: 1050\n")})
    plan = make_plan(renumbered, converged_state(graph))
    assert causes(plan)[LOBBY] is Cause.RENUMBERED


def test_an_unready_guests_registration_is_withheld(graph: DesiredGraph) -> None:
    state = converged_state(graph).model_copy(
        update={"health": {LOBBY: GuestHealth(running=True, reachable=True, ready=False)}}
    )
    plan = make_plan(graph, state, agent_layers=("runtime",))
    delete = next(c for c in plan.changes if c.address == "velocity/lobby")
    assert (delete.action, delete.cause) == (Action.DELETE, Cause.WITHHELD)


def test_rendering_decides_on_the_cause_never_on_the_wording_of_the_reason() -> None:
    def create(cause: Cause, reason: str) -> list[str]:
        change = Change("route/a/b", Kind.ROUTE, Action.CREATE, 0, reason=reason, cause=cause)
        return render.render_change(change)

    assert create(Cause.MISSING, "anything at all")[0] == "+ route/a/b"
    assert create(Cause.WITH_PARENT, "guest/x is replaced")[0] == (
        "+ route/a/b  (guest/x is replaced)"
    )


def test_the_cause_round_trips_through_the_plan_json(sample_plan: Plan) -> None:
    doc = json.loads(render.render_json(sample_plan))
    assert {c["cause"] for c in doc["changes"]} <= {c.value for c in Cause}
    again = plan_from_json(doc)
    assert again.changes == sample_plan.changes


def _saved(sample_plan: Plan) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(render.render_json(sample_plan))
    return doc


def test_a_plan_saved_before_causes_were_recorded_still_reads(sample_plan: Plan) -> None:
    doc = _saved(sample_plan)
    for change in doc["changes"]:
        del change["cause"]
    old = plan_from_json(doc)
    assert all(c.cause is None for c in old.changes)
    assert [c.action for c in old.changes] == [c.action for c in sample_plan.changes]
    doc["format_version"] = 1
    assert plan_from_json(doc).changes == old.changes


def test_a_cause_that_is_not_one_is_refused(sample_plan: Plan) -> None:
    doc = _saved(sample_plan)
    doc["changes"][0]["cause"] = "because I said so"
    with pytest.raises(ValueError):
        plan_from_json(doc)


def test_a_diagnostics_related_places_are_kept_in_the_json_only_when_there_are_any() -> None:
    related = (Position("specs/a.yaml", 12, 3), Position("specs/c.yaml"))
    with_places = error(
        "duplicate-vmid", "m", position=Position("specs/b.yaml", 3), related=related
    )
    plain = error("duplicate-vmid", "m")
    plan = Plan("lab", (), "sha256:0", diagnostics=(with_places, plain))
    doc = json.loads(render.render_json(plan))
    assert doc["diagnostics"][0]["related"] == [
        {"file": "specs/a.yaml", "line": 12, "column": 3},
        {"file": "specs/c.yaml", "line": None, "column": None},
    ]
    assert "related" not in doc["diagnostics"][1]
    assert plan_from_json(doc).diagnostics == (with_places, plain)
