"""Invariants of planning, over generated platforms and observed states (hypothesis).

- planning is deterministic, whatever order the observer listed things in;
- a snapshot equal to the desired state plans empty;
- applying a plan (simulated in memory, at our own boundary) and planning again plans empty;
- a plan never deletes, updates or replaces what the controller does not own.
"""

from __future__ import annotations

from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reconciler.loading.graph import build_graph
from reconciler.loading.loader import load_texts
from reconciler.model.observed import ObservedResource, ObservedState
from reconciler.model.plans import Action, Plan
from reconciler.model.resources import DesiredGraph, Kind
from reconciler.planning.planner import converged_state, make_plan

NAMES = [f"g{i}" for i in range(12)]
ROLES = {"core": (100, 199, "control"), "game": (1000, 1099, "runtime")}


@st.composite
def platforms(draw: st.DrawFn) -> DesiredGraph:
    names = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=8, unique=True))
    guests: dict[str, Any] = {}
    used: set[int] = set()
    for i, name in enumerate(names):
        role = draw(st.sampled_from(sorted(ROLES)))
        first, _last, _ = ROLES[role]
        guest: dict[str, Any] = {
            "role": role,
            "host": "h",
            "template": "local:vztmpl/t.tar.zst",
            "cores": draw(st.integers(1, 4)),
            "memory": draw(st.sampled_from([512, 1024, "2G", "4G"])),
            "tags": draw(st.lists(st.sampled_from(["a", "b", "c"]), unique=True)),
            "state": draw(st.sampled_from(["running", "stopped"])),
        }
        if draw(st.booleans()):
            vmid = draw(st.integers(first, first + 20).filter(lambda v: v not in used))
            used.add(vmid)
            guest["vmid"] = vmid
        deps = draw(st.lists(st.sampled_from(names[:i]), unique=True)) if i else []
        if deps:
            guest["depends_on"] = deps
        if draw(st.booleans()):
            guest["firewall"] = {"rules": [{"type": "in", "action": "ACCEPT", "dport": 22}]}
        guests[name] = guest
    doc = {
        "platform": {"name": "prop", "max_deletes_per_run": 100},
        "layers": {"control": {}, "runtime": {"may_depend_on": ["control"]}},
        "hosts": {
            "h": {"layers": ["control", "runtime"], "capacity": {"cores": 999, "memory": "1T"}}
        },
        "ranges": {r: {"first": a, "last": b, "layer": lay} for r, (a, b, lay) in ROLES.items()},
        "guests": guests,
    }
    result = load_texts({"p.yaml": yaml.safe_dump(doc)})
    assert result.ok and result.spec is not None, [str(d) for d in result.diagnostics]
    return build_graph(result.spec)


@st.composite
def observed_for(draw: st.DrawFn, graph: DesiredGraph) -> ObservedState:
    """Start converged, then: drop some, drift some, add foreign and orphan guests, shuffle."""
    base = list(converged_state(graph).resources)
    out: list[ObservedResource] = []
    for r in base:
        choice = draw(st.sampled_from(["keep", "keep", "drop", "drift"]))
        if choice == "drop":
            continue
        if choice == "drift" and r.kind is Kind.GUEST:
            r = r.model_copy(
                update={
                    "attributes": {
                        **r.attributes,
                        "memory": draw(st.sampled_from([256, 512, 8192])),
                        "state": draw(st.sampled_from(["running", "stopped"])),
                        "tags": draw(st.lists(st.sampled_from(["a", "B", "reconciler"]))),
                    }
                }
            )
        out.append(r)
    taken = {r.id.get("vmid") for r in out}
    for vmid in draw(
        st.lists(st.integers(100, 130) | st.integers(1000, 1030), max_size=4, unique=True)
    ):
        if vmid in taken:
            continue
        taken.add(vmid)
        owned = draw(st.booleans())
        out.append(
            ObservedResource(
                address=f"guest/orphan-{vmid}" if owned else None,
                kind=Kind.GUEST,
                owned=owned,
                id={"vmid": vmid, "node": "h"},
                attributes={"name": f"x{vmid}", "memory": 512},
            )
        )
    order = draw(st.permutations(out))
    return ObservedState(resources=tuple(order))


def simulate_apply(plan: Plan, observed: ObservedState) -> ObservedState:
    """An in-memory Proxmox: what a successful apply of `plan` leaves behind."""
    resources = {(r.address or f"foreign/{r.id}"): r for r in observed.resources}
    for change in plan.actions:
        if change.action is Action.DELETE:
            resources.pop(change.address, None)
            continue
        assert change.after is not None
        resources[change.address] = ObservedResource(
            address=change.address,
            kind=change.kind,
            owned=True,
            id=dict(change.id),
            attributes=dict(change.after),
        )
    return ObservedState(resources=tuple(resources.values()))


PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPS
@given(data=st.data())
def test_planning_is_deterministic(data: st.DataObject) -> None:
    graph = data.draw(platforms())
    observed = data.draw(observed_for(graph))
    reordered = observed.model_copy(update={"resources": tuple(reversed(observed.resources))})
    first, second = make_plan(graph, observed), make_plan(graph, reordered)
    assert first.to_json() == second.to_json()


@PROPS
@given(graph=platforms())
def test_desired_equal_snapshot_plans_empty(graph: DesiredGraph) -> None:
    plan = make_plan(graph, converged_state(graph))
    assert not plan.has_changes
    assert not plan.errored


@PROPS
@given(data=st.data())
def test_apply_then_plan_is_empty(data: st.DataObject) -> None:
    graph = data.draw(platforms())
    observed = data.draw(observed_for(graph))
    allow = data.draw(st.booleans())
    plan = make_plan(graph, observed, allow_destroy=allow)
    if plan.errored:
        return  # e.g. a foreign guest holds a wanted vmid: nothing is applied
    after = simulate_apply(plan, observed)
    again = make_plan(graph, after, allow_destroy=allow)
    assert not again.has_changes, [(c.address, c.action, c.fields) for c in again.actions]


@PROPS
@given(data=st.data())
def test_never_touches_what_it_does_not_own(data: st.DataObject) -> None:
    graph = data.draw(platforms())
    observed = data.draw(observed_for(graph))
    plan = make_plan(graph, observed, allow_destroy=True)
    owned = observed.owned()
    foreign_vmids = {r.id.get("vmid") for r in observed.foreign()}
    for change in plan.actions:
        if change.action in (Action.DELETE, Action.UPDATE, Action.REPLACE):
            assert change.address in owned
        if change.kind is Kind.GUEST:
            assert change.id.get("vmid") not in foreign_vmids
