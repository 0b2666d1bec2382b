"""Identity is checked, not assumed: an address two observed guests claim (a hand-made copy
carries the original's mark) is a plan error naming both, and nothing of it is planned; a guest
whose spec vmid changes is replaced, destroying the vmid observed and creating the new one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from reconciler.cli.render import render_markdown, render_text
from reconciler.model.observed import ObservedResource, ObservedState
from reconciler.model.plans import Action, Change, Plan
from reconciler.model.resources import DesiredGraph, Kind
from reconciler.planning.planner import converged_state, make_plan
from tests.guest_helpers import load_copy

LOBBY = "guest/mc-lobby"
LOBBY_FW = "firewall/guest/mc-lobby"


def _copy(
    state: ObservedState, address: str, vmid: int, node: str | None = None
) -> ObservedResource:
    """A copy of an observed resource at another vmid, carrying its mark (owned, same address)."""
    [original] = [r for r in state.resources if r.address == address]
    where = {"vmid": vmid, "node": node or original.attributes.get("node", "pve-runtime")}
    attributes = {**original.attributes, **where} if "vmid" in original.attributes else None
    return original.model_copy(
        update={"id": {**original.id, **where}, "attributes": attributes or original.attributes}
    )


def _with(state: ObservedState, *extra: ObservedResource, first: bool = False) -> ObservedState:
    resources = (*extra, *state.resources) if first else (*state.resources, *extra)
    return state.model_copy(update={"resources": resources})


def _touching(plan: Plan, *vmids: int) -> list[Change]:
    return [c for c in plan.changes if c.id.get("vmid") in vmids or c.address in (LOBBY, LOBBY_FW)]


def _errors(plan: Plan, code: str) -> list[Any]:
    return [d for d in plan.diagnostics if d.code == code]


# --- two guests claim one address ------------------------------------------------------------


def test_duplicates_lists_every_claimant(graph: DesiredGraph) -> None:
    state = converged_state(graph)
    copy = _copy(state, LOBBY, 1050)
    dups = _with(state, copy).duplicates()
    assert list(dups) == [LOBBY]
    assert [r.id["vmid"] for r in dups[LOBBY]] == [1000, 1050]
    assert state.duplicates() == {}


@pytest.mark.parametrize("first", [False, True], ids=["copy-last", "copy-first"])
@pytest.mark.parametrize("allow_destroy", [False, True], ids=["no-prune", "allow-destroy"])
def test_a_copy_carrying_the_mark_errors_the_plan_and_nothing_of_it_is_planned(
    graph: DesiredGraph, first: bool, allow_destroy: bool
) -> None:
    state = converged_state(graph)
    # The copy has changed since (more memory, stopped): a diff against either would be a change.
    copy = _copy(state, LOBBY, 1050)
    copy = copy.model_copy(
        update={"attributes": {**copy.attributes, "memory": 8192, "state": "stopped"}}
    )
    fw_copy = _copy(state, LOBBY_FW, 1050)
    plan = make_plan(graph, _with(state, copy, fw_copy, first=first), allow_destroy=allow_destroy)

    assert plan.errored and not plan.applyable
    [dup] = _errors(plan, "duplicate-owner")  # one error: the firewall follows its guest
    assert dup.address == LOBBY
    assert dup.message.startswith(
        "guest/mc-lobby is claimed by vmid 1000 on pve-runtime and vmid 1050 on pve-runtime: "
        "a copy carries the controller's mark; remove the mark from the copy (its "
        "description's last line) or delete it"
    )
    assert dup.position is not None and dup.position.file.endswith("game.yaml")
    assert _touching(plan, 1000, 1050) == []
    # Everything else is planned as ever.
    others = {c.address for c in plan.changes}
    assert others == set(graph.resources) - {LOBBY, LOBBY_FW}


def test_a_copy_on_another_node_is_named_with_its_node(graph: DesiredGraph) -> None:
    state = converged_state(graph)
    plan = make_plan(graph, _with(state, _copy(state, LOBBY, 120, node="pve-core")))
    [dup] = _errors(plan, "duplicate-owner")
    assert "claimed by vmid 120 on pve-core and vmid 1000 on pve-runtime:" in dup.message
    assert _touching(plan, 120, 1000) == []


def test_three_claimants_are_all_named(graph: DesiredGraph) -> None:
    state = converged_state(graph)
    plan = make_plan(graph, _with(state, _copy(state, LOBBY, 1051), _copy(state, LOBBY, 1050)))
    [dup] = _errors(plan, "duplicate-owner")
    assert (
        "vmid 1000 on pve-runtime, vmid 1050 on pve-runtime and vmid 1051 on pve-runtime"
        in dup.message
    )


def test_an_orphan_claimed_twice_is_deleted_neither_way(graph: DesiredGraph) -> None:
    # Both claim an address the spec no longer has: pruning would delete "the orphan", and
    # which guest that is cannot be told.
    state = converged_state(graph)
    old = _copy(state, LOBBY, 1060).model_copy(update={"address": "guest/mc-old"})
    twin = _copy(state, LOBBY, 1061).model_copy(update={"address": "guest/mc-old"})
    plan = make_plan(graph, _with(state, old, twin), allow_destroy=True)
    [dup] = _errors(plan, "duplicate-owner")
    assert dup.address == "guest/mc-old" and dup.position is None
    assert "vmid 1060 on pve-runtime and vmid 1061 on pve-runtime" in dup.message
    assert not [c for c in plan.changes if c.action is Action.DELETE]


def test_a_named_firewall_object_claimed_twice_is_left_alone(graph: DesiredGraph) -> None:
    state = converged_state(graph)
    [alias] = [r for r in state.resources if r.address == "firewall/alias/api"]
    state = state.model_copy(
        update={
            "resources": tuple(
                r.model_copy(update={"id": {"name": "api"}}) if r is alias else r
                for r in state.resources
            )
        }
    )
    twin = alias.model_copy(update={"id": {"name": "API"}})
    plan = make_plan(graph, _with(state, twin), allow_destroy=True)
    [dup] = _errors(plan, "duplicate-owner")
    assert dup.message.startswith("firewall/alias/api is claimed by name API and name api:")
    assert "firewall/alias/api" not in {c.address for c in plan.changes}


def test_renumbering_onto_a_copy_names_its_holder_whichever_comes_last(
    graph: DesiredGraph, tmp_path: Path
) -> None:
    # mc-survival is moved to vmid 1050, where a copy of mc-lobby sits: the vmid is held by
    # the copy, whether the observed state lists it before or after the original.
    moved = load_copy(tmp_path, {"game.yaml": ("    vmid: 1001\n", "    vmid: 1050\n")})
    state = converged_state(graph)
    for first in (False, True):
        plan = make_plan(moved, _with(state, _copy(state, LOBBY, 1050), first=first))
        [held] = _errors(plan, "vmid-held-by-other")
        assert held.address == "guest/mc-survival" and "held by guest/mc-lobby" in held.message
        assert "guest/mc-survival" not in {c.address for c in plan.changes}


# --- a vmid changed in the spec ------------------------------------------------------------------


def _renumbered(tmp_path: Path) -> DesiredGraph:
    """The example specs with mc-lobby's vmid 1000 changed to 1050."""
    return load_copy(tmp_path, {"game.yaml": ("    vmid: 1000\n", "    vmid: 1050\n")})


def test_a_vmid_change_replaces_the_observed_guest_and_says_both_vmids(
    graph: DesiredGraph, tmp_path: Path
) -> None:
    renumbered = _renumbered(tmp_path)
    state = converged_state(graph)

    plan = make_plan(renumbered, state)
    change = {c.address: c for c in plan.changes}[LOBBY]
    assert change.action is Action.REPLACE
    assert change.id == {"vmid": 1050, "node": "pve-runtime"}  # created
    assert change.before is not None and change.before["vmid"] == 1000  # destroyed
    assert ("vmid", 1000, 1050) in {(f.path, f.before, f.after) for f in change.fields}
    assert change.blocked and change.destroys == ("rootfs 16 GiB", "mp0 16 GiB")
    assert "destroys vmid 1000, creates vmid 1050" in change.reason
    assert not plan.errored  # blocked, not an error: the old guest keeps running, reported
    [held] = [d for d in plan.diagnostics if d.code == "destroy-blocked"]
    assert "vmid 1000" in held.message and held.address == LOBBY

    text = render_text(plan)
    assert "-/+ guest/mc-lobby  (vmid 1000 -> 1050 on pve-runtime)  BLOCKED" in text
    assert "guest/mc-lobby  (vmid 1000 -> 1050 on pve-runtime)" in render_markdown(plan)

    allowed = make_plan(renumbered, state, allow_destroy=True)
    change = {c.address: c for c in allowed.changes}[LOBBY]
    assert change.action is Action.REPLACE and not change.blocked
    fw = {c.address: c for c in allowed.changes}[LOBBY_FW]
    assert fw.action is Action.CREATE and fw.id["vmid"] == 1050
    # An allowed one is a destroy like any other: it counts toward max_deletes_per_run.
    (tmp_path / "limited").mkdir()
    limited = load_copy(
        tmp_path / "limited",
        {
            "game.yaml": ("    vmid: 1000\n", "    vmid: 1050\n"),
            "platform.yaml": ("  max_deletes_per_run: 3\n", "  max_deletes_per_run: 0\n"),
        },
    )
    assert _errors(make_plan(limited, state, allow_destroy=True), "too-many-deletes")


def test_a_vmid_change_onto_a_foreign_guest_destroys_nothing(
    graph: DesiredGraph, tmp_path: Path
) -> None:
    # The new vmid is taken by a guest the controller does not own: the replace would destroy
    # 1000 and then fail to create 1050. It is refused before anything is planned for it.
    renumbered = _renumbered(tmp_path)
    state = converged_state(graph)
    foreign = ObservedResource(
        kind=Kind.GUEST,
        owned=False,
        id={"vmid": 1050, "node": "pve-runtime"},
        attributes={"name": "scratch", "vmid": 1050, "node": "pve-runtime", "template": False},
    )
    plan = make_plan(renumbered, _with(state, foreign), allow_destroy=True)
    assert plan.errored
    [held] = _errors(plan, "vmid-held-by-foreign")
    assert held.address == LOBBY and "vmid 1050" in held.message
    assert _touching(plan, 1000, 1050) == []
