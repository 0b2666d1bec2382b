"""The planner against the example platform and hand-made observed states."""

from __future__ import annotations

from typing import Any

from reconciler.loading.graph import build_graph
from reconciler.loading.loader import load_texts
from reconciler.model.observed import ObservedResource, ObservedState
from reconciler.model.plans import HOLD_START, START_GUEST, Action, Plan
from reconciler.model.resources import DesiredGraph, Kind
from reconciler.planning.planner import allocate_vmids, converged_state, make_plan


def _by_address(plan: Plan) -> dict[str, Any]:
    return {c.address: c for c in plan.changes}


def _with(
    state: ObservedState, *extra: ObservedResource, drop: tuple[str, ...] = ()
) -> ObservedState:
    kept = [r for r in state.resources if r.address not in drop]
    return state.model_copy(update={"resources": (*kept, *extra)})


def _edit(observed: ObservedState, address: str, **attrs: Any) -> ObservedState:
    out = []
    for r in observed.resources:
        if r.address == address:
            r = r.model_copy(update={"attributes": {**r.attributes, **attrs}})
        out.append(r)
    return observed.model_copy(update={"resources": tuple(out)})


def test_empty_cluster_creates_everything_in_dependency_order(graph: DesiredGraph) -> None:
    plan = make_plan(graph, ObservedState())
    assert not plan.errored
    assert {c.action for c in plan.changes} == {Action.CREATE}
    assert {c.address for c in plan.changes} == set(graph.resources)
    seen: set[str] = set()
    for change in plan.changes:
        missing = [d for d in change.depends_on if d not in seen]
        assert not missing, f"{change.address} planned before {missing}"
        seen.add(change.address)


def test_converged_state_plans_empty(graph: DesiredGraph) -> None:
    plan = make_plan(graph, converged_state(graph))
    assert not plan.has_changes
    assert plan.summary()["no-op"] == len(graph.resources)


def test_proxmox_spellings_are_not_drift(graph: DesiredGraph) -> None:
    state = _edit(
        converged_state(graph),
        "guest/zpack-db",
        tags="ZPACK;control;reconciler;MariaDB;control",
        rootfs="local-lvm:vm-103-disk-0,size=64G",
        net={
            "net0": "name=eth0,bridge=vmbr0,firewall=1,gw=10.10.0.1,hwaddr=bc:24:11:00:00:01,"
            "ip=10.10.0.13/24,tag=10,type=veth"
        },
        onboot=1,
        unprivileged="1",
        features="",
    )
    assert _by_address(make_plan(graph, state))["guest/zpack-db"].action is Action.NOOP


def test_memory_drift_is_an_update_of_that_field(graph: DesiredGraph) -> None:
    state = _edit(converged_state(graph), "guest/mc-survival", memory=6144)
    change = _by_address(make_plan(graph, state))["guest/mc-survival"]
    assert change.action is Action.UPDATE
    assert [(f.path, f.before, f.after) for f in change.fields] == [("memory", 6144, 4096)]


def test_a_different_template_on_an_existing_guest_is_not_a_change(graph: DesiredGraph) -> None:
    # Proxmox keeps no record of the template a container was made from (an imported guest
    # carries a placeholder): it decides nothing for a guest that exists.
    state = _edit(converged_state(graph), "guest/mc-creative", template="local:vztmpl/old.tar.zst")
    assert _by_address(make_plan(graph, state))["guest/mc-creative"].action is Action.NOOP


def test_replace_is_blocked_without_pruning_and_says_what_it_destroys(graph: DesiredGraph) -> None:
    state = _edit(converged_state(graph), "guest/mc-creative", unprivileged=False)
    plan = make_plan(graph, state)
    change = _by_address(plan)["guest/mc-creative"]
    assert change.action is Action.REPLACE and change.replace_because == ("unprivileged",)
    assert change.destroys == ("rootfs 16 GiB", "mp0 16 GiB")  # the world's volume too
    assert change.blocked and "platform.prune or --allow-destroy" in change.blocked
    assert change not in plan.actions and plan.blocked == (change,)
    # Its firewall is planned as it is (the guest stays), not recreated with it.
    assert _by_address(plan)["firewall/guest/mc-creative"].action is Action.NOOP
    [warn] = [d for d in plan.diagnostics if d.code == "destroy-blocked"]
    assert warn.position is not None and warn.position.file.endswith("game.yaml")
    assert "replace destroys rootfs 16 GiB" in warn.message
    assert not plan.has_changes and plan.drifted


def test_allowed_replace_recreates_the_firewall_too(graph: DesiredGraph) -> None:
    state = _edit(converged_state(graph), "guest/mc-creative", unprivileged=False)
    changes = _by_address(make_plan(graph, state, allow_destroy=True))
    assert changes["guest/mc-creative"].action is Action.REPLACE
    assert not changes["guest/mc-creative"].blocked
    assert changes["firewall/guest/mc-creative"].action is Action.CREATE


def test_replaces_count_toward_max_deletes_per_run(graph: DesiredGraph) -> None:
    state = converged_state(graph)
    for name in ("mc-lobby", "mc-survival", "mc-creative", "mc-skyblock"):
        state = _edit(state, f"guest/{name}", unprivileged=False)
    blocked = make_plan(graph, state)
    assert not blocked.errored and len(blocked.blocked) == 4
    allowed = make_plan(graph, state, allow_destroy=True)
    assert allowed.errored
    assert [d.code for d in allowed.diagnostics if d.severity.value == "error"] == [
        "too-many-deletes"
    ]


def test_a_node_change_is_a_migration_not_a_replace(graph: DesiredGraph) -> None:
    state = _edit(converged_state(graph), "guest/mc-survival", node="pve-core", memory=6144)
    state = state.model_copy(
        update={
            "resources": tuple(
                r.model_copy(update={"id": {**r.id, "node": "pve-core"}})
                if r.address == "guest/mc-survival"
                else r
                for r in state.resources
            )
        }
    )
    plan = make_plan(graph, state)
    change = _by_address(plan)["guest/mc-survival"]
    assert change.action is Action.MIGRATE and not change.destroys and not change.blocked
    assert change.moves == ("pve-core", "pve-runtime")
    assert change.id["vmid"] == 1001
    assert {f.path for f in change.fields} == {"node", "memory"}
    assert change in plan.actions and not plan.errored


def test_a_storage_change_with_the_node_migrates_to_that_storage(graph: DesiredGraph) -> None:
    state = _edit(
        converged_state(graph),
        "guest/mc-survival",
        node="pve-core",
        rootfs={"storage": "local-zfs", "size": "16G"},
    )
    change = _by_address(make_plan(graph, state))["guest/mc-survival"]
    assert change.action is Action.MIGRATE
    state = _edit(converged_state(graph), "guest/mc-survival", rootfs="local-zfs:vm-1001-disk-0")
    change = _by_address(make_plan(graph, state))["guest/mc-survival"]
    assert change.action is Action.REPLACE and change.blocked  # same node: no migration


def test_disk_growth_is_an_update_and_a_shrink_is_a_plan_error(graph: DesiredGraph) -> None:
    base = converged_state(graph)
    smaller_seen = _edit(base, "guest/mc-lobby", rootfs={"storage": "local-lvm", "size": "8G"})
    bigger_seen = _edit(base, "guest/mc-lobby", rootfs={"storage": "local-lvm", "size": "32G"})
    grow = make_plan(graph, smaller_seen)
    assert _by_address(grow)["guest/mc-lobby"].action is Action.UPDATE
    shrink = make_plan(graph, bigger_seen)
    assert shrink.errored and "guest/mc-lobby" not in _by_address(shrink)
    [err] = [d for d in shrink.diagnostics if d.code == "disk-shrink"]
    assert err.position is not None and err.position.file.endswith("game.yaml")
    assert "rootfs 32G -> 16G" in err.message


def test_foreign_guest_holding_a_desired_vmid_is_a_plan_error(graph: DesiredGraph) -> None:
    intruder = ObservedResource(
        kind=Kind.GUEST,
        owned=False,
        id={"vmid": 1001, "node": "pve-runtime"},
        attributes={"name": "someone-else"},
    )
    state = _with(converged_state(graph), intruder, drop=("guest/mc-survival",))
    plan = make_plan(graph, state)
    assert plan.errored and not plan.applyable
    assert [d.code for d in plan.diagnostics] == ["vmid-held-by-foreign"]
    assert "guest/mc-survival" not in {c.address for c in plan.actions}
    assert plan.foreign[0]["vmid"] == 1001


def test_foreign_guest_with_the_desired_name_and_vmid_awaits_adoption(graph: DesiredGraph) -> None:
    unadopted = ObservedResource(
        kind=Kind.GUEST,
        owned=False,
        id={"vmid": 1001, "node": "pve-runtime"},
        attributes={"name": "mc-survival"},
    )
    state = _with(converged_state(graph), unadopted, drop=("guest/mc-survival",))
    plan = make_plan(graph, state)
    assert not plan.errored
    assert [(d.code, d.severity.value) for d in plan.diagnostics] == [
        ("adoption-pending", "warning")
    ]
    assert "reconciler adopt guest/mc-survival" in plan.diagnostics[0].message
    assert "guest/mc-survival" not in {c.address for c in plan.actions}


def test_foreign_guests_are_never_deleted_even_when_destroy_is_allowed(graph: DesiredGraph) -> None:
    foreign = ObservedResource(
        kind=Kind.GUEST,
        owned=False,
        id={"vmid": 1050, "node": "pve-runtime"},
        attributes={"name": "legacy"},
    )
    plan = make_plan(graph, _with(converged_state(graph), foreign), allow_destroy=True)
    assert not plan.has_changes
    assert plan.foreign == (
        {
            "kind": "guest",
            "name": "legacy",
            "vmid": 1050,
            "node": "pve-runtime",
            "in_range": "game",
            "template": False,
        },
    )


def test_orphans_are_kept_unless_destroy_is_allowed(graph: DesiredGraph) -> None:
    orphan = ObservedResource(
        address="guest/mc-old",
        kind=Kind.GUEST,
        owned=True,
        id={"vmid": 1040, "node": "pve-runtime"},
        attributes={"name": "mc-old"},
    )
    state = _with(converged_state(graph), orphan)
    kept = make_plan(graph, state)
    assert not kept.has_changes and [d.code for d in kept.diagnostics] == ["orphan"]
    pruned = make_plan(graph, state, allow_destroy=True)
    assert [(c.address, c.action) for c in pruned.actions] == [("guest/mc-old", Action.DELETE)]


def test_too_many_deletes_errors_the_plan(graph: DesiredGraph) -> None:
    orphans = [
        ObservedResource(
            address=f"guest/old-{i}",
            kind=Kind.GUEST,
            owned=True,
            id={"vmid": 1050 + i, "node": "pve-runtime"},
            attributes={},
        )
        for i in range(4)
    ]
    plan = make_plan(graph, _with(converged_state(graph), *orphans), allow_destroy=True)
    assert plan.errored
    assert any(d.code == "too-many-deletes" for d in plan.diagnostics)


def test_omitted_vmid_is_the_lowest_free_and_then_kept(graph: DesiredGraph) -> None:
    vmids, diags = allocate_vmids(graph, ObservedState())
    assert not diags
    # mc-rlcraft has no vmid: 1000-1003 are taken by explicit ids.
    assert vmids["guest/mc-rlcraft"] == 1004
    foreign = ObservedResource(
        kind=Kind.GUEST, owned=False, id={"vmid": 1004, "node": "pve-runtime"}
    )
    vmids, _ = allocate_vmids(graph, ObservedState(resources=(foreign,)))
    assert vmids["guest/mc-rlcraft"] == 1005
    held = ObservedResource(
        address="guest/mc-rlcraft",
        kind=Kind.GUEST,
        owned=True,
        id={"vmid": 1042, "node": "pve-runtime"},
    )
    vmids, _ = allocate_vmids(graph, ObservedState(resources=(held,)))
    assert vmids["guest/mc-rlcraft"] == 1042


def test_exhausted_range_is_a_plan_error() -> None:
    texts = {
        "p.yaml": """
platform: {name: tiny}
layers: {runtime: {}}
hosts: {h: {layers: [runtime], capacity: {cores: 64, memory: 64G}}}
ranges: {game: {first: 1000, last: 1001, layer: runtime}}
guests:
  a: {role: game, host: h, template: t}
  b: {role: game, host: h, template: t}
  c: {role: game, host: h, template: t}
"""
    }
    result = load_texts(texts)
    assert result.ok and result.spec is not None
    plan = make_plan(build_graph(result.spec), ObservedState())
    assert [d.code for d in plan.diagnostics] == ["range-exhausted"]
    assert "guest/c" not in {c.address for c in plan.changes}


def test_target_keeps_what_the_target_needs(graph: DesiredGraph) -> None:
    plan = make_plan(graph, ObservedState(), targets=["route/core/portal"])
    addresses = {c.address for c in plan.changes}
    guests = {"traefik-core", "zpack-portal", "zpack-api", "zpack-db", "zpack-redis"}
    assert {a for a in addresses if not a.startswith("firewall/")} == {
        "route/core/portal",
        *(f"guest/{g}" for g in guests),
    }
    # a guest is never created without its firewall, nor a firewall without what it refers to
    assert {a for a in addresses if a.startswith("firewall/guest/")} == {
        f"firewall/guest/{g}" for g in guests
    }
    for change in plan.changes:
        assert set(change.depends_on) <= addresses, change.address


def test_deletes_come_after_everything_else(graph: DesiredGraph) -> None:
    gone = ObservedResource(address="route/core/old", kind=Kind.ROUTE, owned=True, attributes={})
    state = _with(converged_state(graph), gone, drop=("guest/dev-bob",))
    plan = make_plan(graph, state, allow_destroy=True)
    assert [c.action for c in plan.actions][-1] is Action.DELETE


# --- review findings: partial observations, unread foreign objects, firewall first ----------------


def test_a_partial_observation_never_deletes_what_it_did_not_look_at(graph: DesiredGraph) -> None:
    """The service's edge poll observes Velocity and routes only, with the guests it already
    knew: a guest gone from the spec is the full cycle's business, never the poll's."""
    leftover = ObservedResource(
        address="guest/old-one",
        kind=Kind.GUEST,
        owned=True,
        id={"vmid": 1090, "node": "pve-runtime"},
        attributes={"name": "old-one", "state": "running"},
    )
    state = _with(converged_state(graph), leftover)
    partial = state.model_copy(update={"kinds": (Kind.VELOCITY, Kind.ROUTE)})
    plan = make_plan(graph, partial, allow_destroy=True)
    assert "guest/old-one" not in {c.address for c in plan.actions}
    full = make_plan(graph, state, allow_destroy=True)
    assert _by_address(full)["guest/old-one"].action is Action.DELETE


def test_a_foreign_group_whose_rules_were_not_read_stays_a_conflict(graph: DesiredGraph) -> None:
    handmade = ObservedResource(
        kind=Kind.FIREWALL_GROUP,
        owned=False,
        id={"name": "ssh-admin"},
        attributes={"name": "ssh-admin", "comment": "made by hand"},
    )
    state = _with(converged_state(graph), handmade, drop=("firewall/group/ssh-admin",))
    plan = make_plan(graph, state)
    assert plan.errored
    assert [(d.code, d.address) for d in plan.diagnostics if d.severity.value == "error"] == [
        ("firewall-name-held-by-foreign", "firewall/group/ssh-admin")
    ]


def test_a_stopped_guest_is_started_by_its_firewall_change_when_both_change(
    graph: DesiredGraph,
) -> None:
    base = converged_state(graph)
    state = _edit(base, "guest/mc-lobby", state="stopped")
    rules = next(r for r in base.resources if r.address == "firewall/guest/mc-lobby").attributes
    state = _edit(state, "firewall/guest/mc-lobby", rules=rules["rules"][:-1])
    plan = _by_address(make_plan(graph, state))
    guest, fw = plan["guest/mc-lobby"], plan["firewall/guest/mc-lobby"]
    # starting was all the guest change would do: the firewall change does it, rules first
    assert guest.action is Action.NOOP
    assert fw.action is Action.UPDATE and fw.after[START_GUEST] is True
    # a guest with only its power to change starts on its own when its firewall is in place
    alone = _by_address(make_plan(graph, _edit(base, "guest/mc-lobby", state="stopped")))
    assert alone["guest/mc-lobby"].action is Action.UPDATE
    assert HOLD_START not in (alone["guest/mc-lobby"].after or {})


def test_destroys_name_detached_volumes_too() -> None:
    # A purge destroys a guest's `unusedN` volumes with it: a detached world is data too.
    from reconciler.planning.planner import disks

    observed = {
        "rootfs": "local-lvm:vm-1001-disk-0,size=16G",
        "volumes": {"mp0": "local-lvm:vm-1001-disk-2,mp=/srv/world,size=50G"},
        "unused": {"unused0": "local-lvm:vm-1001-disk-1"},
    }
    assert disks(observed) == (
        "rootfs 16 GiB",
        "mp0 50 GiB",
        "unused0 local-lvm:vm-1001-disk-1 (detached)",
    )
