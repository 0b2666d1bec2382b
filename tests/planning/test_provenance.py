"""What a plan was made from (`planning.provenance`): the spec digest, and the comparison of a
saved plan with a fresh one that `apply --plan` makes. Pure: the example platform against the
shipped sample snapshot, which holds one of each kind of change."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from reconciler.cli import render
from reconciler.cli.main import _load_observed
from reconciler.model.plans import Action, Plan, plan_from_json
from reconciler.model.resources import DesiredGraph
from reconciler.planning.planner import make_plan
from reconciler.planning.provenance import first_difference, spec_digest
from tests.guest_helpers import load_copy


@pytest.fixture(scope="module")
def sample_plan(graph: DesiredGraph) -> Plan:
    return make_plan(graph, _load_observed("sample"), targets=["guest/", "route/"])


def saved(plan: Plan) -> Plan:
    """The plan as `plan --out` writes it and `apply --plan` reads it back."""
    return plan_from_json(json.loads(render.render_json(plan)))


def test_a_plan_records_its_spec_and_options_and_reads_them_back(
    graph: DesiredGraph, sample_plan: Plan
) -> None:
    assert sample_plan.spec_digest == spec_digest(graph)
    assert sample_plan.spec_digest.startswith("sha256:")
    back = saved(sample_plan)
    assert (back.spec_digest, back.allow_destroy, back.targets) == (
        sample_plan.spec_digest,
        False,
        ("guest/", "route/"),
    )
    assert first_difference(back, sample_plan) is None, "through JSON, still the same plan"


def test_a_plan_saved_without_a_spec_digest_reads_with_none() -> None:
    doc = json.loads(render.render_json(Plan(platform="zpack", changes=(), observed_digest="x")))
    del doc["spec"], doc["options"]
    old = plan_from_json(doc)
    assert (old.spec_digest, old.allow_destroy, old.targets) == ("", False, ())


def test_the_spec_digest_is_the_desired_graph_not_where_it_was_written(
    graph: DesiredGraph, tmp_path: Path
) -> None:
    moved = load_copy(tmp_path, {"control.yaml": ("guests:\n", "# a comment\nguests:\n")})
    assert spec_digest(moved) == spec_digest(graph)


@pytest.mark.parametrize(
    ("file", "old", "new"),
    [
        ("control.yaml", "    memory: 4G\n", "    memory: 5G\n"),
        (
            "control.yaml",
            "    depends_on: [zpack-db, zpack-redis]\n",
            "    depends_on: [zpack-db]\n",
        ),
        ("platform.yaml", "prune: false", "prune: true"),
        ("platform.yaml", "max_deletes_per_run: 3", "max_deletes_per_run: 30"),
    ],
    ids=["attribute", "depends_on", "prune", "max_deletes_per_run"],
)
def test_the_spec_digest_changes_with_what_the_plan_is_made_from(
    file: str, old: str, new: str, graph: DesiredGraph, tmp_path: Path
) -> None:
    edited = load_copy(tmp_path, {file: (old, new)})
    assert spec_digest(edited) != spec_digest(graph)


def test_the_first_difference_is_named_in_the_fresh_plans_order(sample_plan: Plan) -> None:
    noop = next(c for c in sample_plan.changes if c.action is Action.NOOP)
    blocked = next(c for c in sample_plan.changes if c.blocked)
    update = next(c for c in sample_plan.changes if c.action is Action.UPDATE and c.fields)

    def edited(address: str, **kw: object) -> Plan:
        return replace(
            sample_plan,
            changes=tuple(
                replace(c, **kw) if c.address == address else c  # type: ignore[arg-type]
                for c in sample_plan.changes
            ),
        )

    def differs(plan: Plan) -> str | None:
        return first_difference(saved(plan), sample_plan)

    assert differs(edited(noop.address, action=Action.DELETE)) == (
        f"{noop.address}: the file says delete, a fresh plan says no-op"
    )
    why = differs(edited(blocked.address, blocked=None))
    assert why is not None and why.startswith(
        f"{blocked.address}: the file lets it run, a fresh plan holds it back (destroys data"
    )
    assert differs(edited(blocked.address, destroys=())) == (
        f"{blocked.address}: the file says it destroys nothing, a fresh plan says it destroys "
        + ", ".join(blocked.destroys)
    )
    first = update.fields[0]
    bigger = (replace(first, after="64G"), *update.fields[1:])
    assert differs(edited(update.address, fields=bigger)) == (
        f'{update.address}: {first.path}: the file says "64G", a fresh plan says '
        + json.dumps(first.after, sort_keys=True)
    )
    assert update.version is None  # the sample snapshot records none
    assert differs(edited(update.address, version="d1ge57")) == (
        f'{update.address}: its version: the file says "d1ge57", a fresh plan null'
    )
    ghost = replace(noop, address="guest/mc-ghost", action=Action.CREATE)
    extra = replace(sample_plan, changes=(*sample_plan.changes, ghost))
    assert differs(extra) == "guest/mc-ghost: the file says create, a fresh plan has nothing for it"
    twice = replace(sample_plan, changes=(*sample_plan.changes, noop))
    assert differs(twice) == f"{noop.address}: the file has 2 changes for it, a fresh plan has 1"
    fewer = replace(sample_plan, changes=sample_plan.changes[1:])
    gone = sample_plan.changes[0]
    assert differs(fewer) == (
        f"{gone.address}: a fresh plan says {gone.action.value}, the file has nothing"
    )
