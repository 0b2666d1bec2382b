"""Placement checks against the live cluster (planning.placement), on hand-made observed states:
a node, storage or template the cluster does not have is a plan error naming the spec's line,
and nothing is planned for that guest; a node guests move onto must hold them."""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from reconciler.model.diagnostics import Diagnostic, Position, Severity
from reconciler.model.observed import (
    ClusterFacts,
    NodeFacts,
    ObservedResource,
    ObservedState,
    StorageFacts,
)
from reconciler.model.plans import Action, Plan
from reconciler.model.resources import DesiredGraph, Kind, Resource
from reconciler.planning.placement import check_placement
from reconciler.planning.planner import allocate_vmids, converged_state, make_plan
from tests.guest_helpers import load_copy

TEMPLATE = "local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst"
GIB = 1024**3
RUNTIME_GUESTS = {
    "guest/dev-alice",
    "guest/dev-bob",
    "guest/mc-creative",
    "guest/mc-lobby",
    "guest/mc-rlcraft",
    "guest/mc-skyblock",
    "guest/mc-survival",
    "guest/traefik-runtime",
    "guest/velocity",
}


def storages(templates: tuple[str, ...] | None = (TEMPLATE,)) -> dict[str, StorageFacts]:
    return {
        "local": StorageFacts(content=("backup", "iso", "vztmpl"), templates=templates),
        "local-lvm": StorageFacts(content=("images", "rootdir")),
    }


def node(maxmem_gib: int = 256, **kw: Any) -> NodeFacts:
    kw.setdefault("storages", storages())
    return NodeFacts(online=kw.pop("online", True), maxcpu=32, maxmem=maxmem_gib * GIB, **kw)


def cluster(**nodes: NodeFacts) -> ClusterFacts:
    base = {"pve-core": node(), "pve-runtime": node()}
    base.update({name.replace("_", "-"): facts for name, facts in nodes.items()})
    return ClusterFacts(nodes=base)


def observed(state: ObservedState, facts: ClusterFacts | None) -> ObservedState:
    return state.model_copy(update={"cluster": facts})


def moved(state: ObservedState, address: str, to: str) -> ObservedState:
    """The guest observed on node `to` (the spec wants it elsewhere)."""
    out = []
    for r in state.resources:
        if r.address == address:
            r = r.model_copy(
                update={"id": {**r.id, "node": to}, "attributes": {**r.attributes, "node": to}}
            )
        out.append(r)
    return state.model_copy(update={"resources": tuple(out)})


def without(state: ObservedState, *addresses: str) -> ObservedState:
    kept = tuple(r for r in state.resources if r.address not in addresses)
    return state.model_copy(update={"resources": kept})


def errors(plan: Plan, code: str) -> dict[str, Diagnostic]:
    return {
        d.address: d for d in plan.diagnostics if d.code == code and d.severity is Severity.ERROR
    }


def planned(plan: Plan) -> set[str]:
    return {c.address for c in plan.changes}


# --- a node the cluster does not have ------------------------------------------------------------


@pytest.fixture
def typo(tmp_path: Path) -> DesiredGraph:
    """The example platform with `hosts.pve-runtime.node: pve-2`: the node is `pve-runtime`."""
    return load_copy(
        tmp_path,
        {"platform.yaml": ("  pve-runtime:\n", "  pve-runtime:\n    node: pve-2\n")},
    )


@pytest.mark.parametrize("existing", [True, False], ids=["converged", "fresh"])
def test_a_node_name_typo_is_an_error_and_nothing_is_planned_for_those_guests(
    graph: DesiredGraph, typo: DesiredGraph, existing: bool
) -> None:
    # What exists is what the correct spec made (or nothing); a core guest drifted meanwhile.
    state = converged_state(graph) if existing else ObservedState()
    if existing:
        state = state.model_copy(
            update={
                "resources": tuple(
                    r.model_copy(update={"attributes": {**r.attributes, "memory": 1024}})
                    if r.address == "guest/zpack-db"
                    else r
                    for r in state.resources
                )
            }
        )
    plan = make_plan(typo, observed(state, cluster()))
    assert plan.errored and not plan.applyable
    found = errors(plan, "unknown-node")
    assert set(found) == RUNTIME_GUESTS
    lobby = found["guest/mc-lobby"]
    assert "hosts.pve-runtime.node is 'pve-2'; the cluster has pve-core, pve-runtime" in (
        lobby.message
    )
    assert lobby.position is not None and lobby.position.file.endswith("game.yaml")
    assert lobby.position.line > 0 and lobby.path == "hosts.pve-runtime.node"
    # Nothing for those guests, nor their firewalls: no migrate, no create, no replace.
    runtime_firewalls = {"firewall/guest/" + a.split("/")[1] for a in RUNTIME_GUESTS}
    assert planned(plan).isdisjoint(RUNTIME_GUESTS | runtime_firewalls)
    # The guests on the correctly named host are planned as without the typo.
    core = {c.address: c.action for c in plan.changes if c.kind is Kind.GUEST}
    if existing:
        assert core["guest/zpack-db"] is Action.UPDATE
        assert {c.address for c in plan.changes if c.action is not Action.NOOP} == {
            "guest/zpack-db"
        }
    else:
        assert set(core.values()) == {Action.CREATE} and "guest/zpack-db" in core


def test_without_cluster_facts_nothing_is_checked(typo: DesiredGraph) -> None:
    """An offline plan from a snapshot that has no cluster: the typo is not seen."""
    plan = make_plan(typo, ObservedState())
    assert not errors(plan, "unknown-node") and not plan.errored


def test_a_host_without_node_names_its_own_key(graph: DesiredGraph) -> None:
    facts = ClusterFacts(nodes={"pve-core": node(), "pve2": node()})
    plan = make_plan(graph, observed(ObservedState(), facts))
    message = errors(plan, "unknown-node")["guest/velocity"].message
    assert "host 'pve-runtime' names node 'pve-runtime'" in message
    assert "the cluster has pve-core, pve2" in message


# --- offline nodes -------------------------------------------------------------------------------


def test_guests_on_an_offline_node_get_nothing_and_the_rest_is_planned(graph: DesiredGraph) -> None:
    state = converged_state(graph)
    state = without(state, "guest/zpack-vpn")  # a core guest to create
    plan = make_plan(graph, observed(state, cluster(pve_runtime=node(online=False))))
    found = errors(plan, "node-offline")
    assert set(found) == RUNTIME_GUESTS
    assert (
        "node pve-runtime (the node its host names) is offline" in found["guest/velocity"].message
    )
    assert planned(plan).isdisjoint(RUNTIME_GUESTS)
    assert {c.address for c in plan.actions} == {"guest/zpack-vpn", "firewall/guest/zpack-vpn"}


def test_a_guest_moving_off_or_onto_an_offline_node_is_an_error(graph: DesiredGraph) -> None:
    base = moved(converged_state(graph), "guest/mc-survival", "pve-spare")
    spare_down = cluster(pve_spare=node(online=False))
    plan = make_plan(graph, observed(base, spare_down))
    assert set(errors(plan, "node-offline")) == {"guest/mc-survival"}
    assert "the node it is on now" in errors(plan, "node-offline")["guest/mc-survival"].message
    assert "guest/mc-survival" not in planned(plan)

    # Onto: the target is down.
    target_down = cluster(pve_spare=node(), pve_runtime=node(online=False))
    plan = make_plan(graph, observed(base, target_down))
    assert "guest/mc-survival" in errors(plan, "node-offline")
    assert "guest/mc-survival" not in planned(plan)

    # Both up: a migration.
    plan = make_plan(graph, observed(base, cluster(pve_spare=node())))
    assert not plan.errored
    assert {c.address: c.action for c in plan.actions} == {"guest/mc-survival": Action.MIGRATE}


# --- storages and templates, on hand-made graphs -------------------------------------------------

WHERE = Position("specs/game.yaml", 12, 3)


def guest(name: str, **attrs: Any) -> Resource:
    base: dict[str, Any] = {
        "name": name,
        "vmid": attrs.pop("vmid", 1000),
        "node": "pve-runtime",
        "type": "lxc",
        "template": TEMPLATE,
        "memory": 4096,
        "rootfs": {"storage": "local-lvm", "size": "16G"},
        "volumes": {},
    }
    base.update(attrs)
    return Resource(f"guest/{name}", Kind.GUEST, base, position=WHERE)


def graph_of(*resources: Resource, overcommit: float = 1.0) -> DesiredGraph:
    return DesiredGraph(
        platform="zpack",
        resources=MappingProxyType({r.address: r for r in resources}),
        waves=MappingProxyType({r.address: 0 for r in resources}),
        settings=MappingProxyType(
            {
                "hosts": {
                    "pve-core": {"node": "pve-core", "node_set": False},
                    "pve-runtime": {"node": "pve-runtime", "node_set": False},
                },
                "memory_overcommit": overcommit,
            }
        ),
    )


def seen(res: Resource, **attrs: Any) -> ObservedResource:
    """The guest as Proxmox shows it (raw spellings), ours."""
    a: dict[str, Any] = {**res.attributes, **attrs}
    a["rootfs"] = f"{a['rootfs']['storage']}:vm-{a['vmid']}-disk-0,size=16G"
    a["volumes"] = {
        k: f"{v['storage']}:vm-{a['vmid']}-disk-1,mp=/data,size=50G"
        for k, v in (a.get("volumes") or {}).items()
    }
    del a["template"]  # Proxmox keeps no record of it
    return ObservedResource(
        address=res.address,
        kind=Kind.GUEST,
        owned=True,
        id={"vmid": a["vmid"], "node": a["node"]},
        attributes=a,
    )


def check(graph: DesiredGraph, *resources: ObservedResource, facts: ClusterFacts) -> list[str]:
    state = ObservedState(resources=resources, cluster=facts)
    vmids, _ = allocate_vmids(graph, state)
    found = check_placement(graph, state, vmids)
    assert set(found.unplaced) == {d.address for d in found.diagnostics}
    assert all(d.severity is Severity.ERROR and d.position == WHERE for d in found.diagnostics)
    return [f"{d.code}: {d.message}" for d in found.diagnostics]


@pytest.mark.parametrize(
    ("storage", "problem"),
    [
        (
            "local-zfs",
            "rootfs.storage 'local-zfs': node pve-runtime has no such storage "
            "(it has local, local-lvm)",
        ),
        ("local", "rootfs.storage 'local': does not take rootdir on node pve-runtime"),
    ],
)
def test_a_new_guest_on_a_storage_the_node_lacks_is_an_error(storage: str, problem: str) -> None:
    g = graph_of(guest("mc-new", rootfs={"storage": storage, "size": "16G"}))
    found = check(g, facts=cluster())
    assert len(found) == 1 and found[0].startswith("storage-unusable: guest/mc-new: " + problem)


def test_a_vm_needs_a_storage_for_images() -> None:
    only_rootdir = {"ct-only": StorageFacts(content=("rootdir",))}
    g = graph_of(guest("vm-new", type="qemu", rootfs={"storage": "ct-only", "size": "16G"}))
    found = check(g, facts=cluster(pve_runtime=node(storages=only_rootdir)))
    assert found and "does not take images" in found[0]


def test_a_volume_storage_is_checked_and_an_inactive_storage_too() -> None:
    facts = cluster(
        pve_runtime=node(
            storages={**storages(), "tank": StorageFacts(content=("rootdir",), active=False)}
        )
    )
    g = graph_of(guest("mc-new", volumes={"mp0": {"storage": "tank", "size": "50G"}}))
    found = check(g, facts=facts)
    assert len(found) == 1
    assert "volumes.mp0.storage 'tank': not active on node pve-runtime" in found[0]


def test_an_existing_guest_is_checked_only_for_disks_new_to_it() -> None:
    res = guest("mc-old", volumes={"mp0": {"storage": "tank", "size": "50G"}})
    have = seen(res)
    facts = cluster(pve_runtime=node(storages={"local": storages()["local"]}))
    # Its rootfs and mp0 are where they were, even if the node no longer lists those storages.
    assert check(graph_of(res), have, facts=facts) == []
    # A volume added on a storage the node lacks: an error.
    more = guest(
        "mc-old",
        volumes={
            "mp0": {"storage": "tank", "size": "50G"},
            "mp1": {"storage": "gone", "size": "10G"},
        },
    )
    found = check(graph_of(more), have, facts=facts)
    assert len(found) == 1
    assert "volumes.mp1.storage 'gone': node pve-runtime has no such storage" in found[0]


def test_unknown_storages_are_not_failures() -> None:
    g = graph_of(guest("mc-new", rootfs={"storage": "anything", "size": "16G"}))
    assert check(g, facts=cluster(pve_runtime=node(storages=None))) == []


def test_a_missing_template_is_an_error_for_a_guest_to_be_created_only() -> None:
    other = "local:vztmpl/debian-13-standard_13.1-1_amd64.tar.zst"
    new, old = guest("mc-new", template=other), guest("mc-old", vmid=1001, template=other)
    found = check(graph_of(new, old), seen(old), facts=cluster())
    assert len(found) == 1
    assert found[0].startswith(
        f"template-missing: guest/mc-new: template '{other}' is not on node pve-runtime"
    )
    assert f"its storage 'local' has {TEMPLATE})" in found[0]
    # Not listed (nobody asked): not checked.
    unlisted = cluster(pve_runtime=node(storages=storages(templates=None)))
    assert check(graph_of(new), facts=unlisted) == []


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        ("nfs:vztmpl/x.tar.zst", "node pve-runtime has no storage 'nfs' (it has local, local-lvm)"),
        (
            "local-lvm:vztmpl/x.tar.zst",
            "storage 'local-lvm' on node pve-runtime does not hold container templates",
        ),
    ],
)
def test_a_template_storage_the_node_lacks_is_an_error(template: str, problem: str) -> None:
    found = check(graph_of(guest("mc-new", template=template)), facts=cluster())
    assert len(found) == 1 and problem in found[0]


def test_a_guest_whose_vmid_someone_else_holds_is_left_to_the_vmid_checks() -> None:
    """Not created (an adoption is pending, or a conflict): no template or storage check."""
    new = guest("mc-new", template="unknown:vztmpl/debian-imported.tar.zst")
    holder = ObservedResource(
        kind=Kind.GUEST,
        id={"vmid": 1000, "node": "pve-runtime"},
        attributes={"name": "mc-new", "vmid": 1000, "node": "pve-runtime"},
    )
    assert check(graph_of(new), holder, facts=cluster()) == []


# --- the memory of the nodes guests move onto ----------------------------------------------------


def foreign(vmid: int, memory: int, node_: str = "pve-runtime", **attrs: Any) -> ObservedResource:
    return ObservedResource(
        kind=Kind.GUEST,
        id={"vmid": vmid, "node": node_},
        attributes={"name": f"ct{vmid}", "vmid": vmid, "node": node_, "memory": memory, **attrs},
    )


def test_a_node_that_cannot_hold_the_guests_moving_onto_it_is_an_error() -> None:
    a = guest("mc-a", vmid=1000, memory=4096)
    b = guest("mc-b", vmid=1001, memory=4096, node="pve-core")  # moves out of pve-runtime
    c = guest("mc-c", vmid=1002, memory=2048)
    observed_ = (
        seen(a, node="pve-core"),  # moves in: 4 GiB
        seen(b, node="pve-runtime"),
        seen(c),  # 2 GiB there
        foreign(500, 2048),  # someone else's, 2 GiB
        foreign(900, 1024, template=True),  # a template, 1 GiB: it still has a config
    )
    g = graph_of(a, b, c, guest("mc-d", vmid=1003, memory=65536))  # a create: not counted
    # 2 + 2 + 1 there (mc-b leaves), 4 in: 9 GiB on 8 GiB.
    found = check(g, *observed_, facts=cluster(pve_runtime=node(maxmem_gib=8)))
    assert found == [
        "node-memory: guest/mc-a: node pve-runtime cannot take it: 9 GiB of guest memory would "
        "be on it (5 GiB there, 4 GiB moving in: guest/mc-a 4 GiB); it has 8 GiB x "
        "memory_overcommit 1 = 8 GiB. Nothing is planned for this guest"
    ]
    # The overcommit the spec allows makes it fit; so does a bigger node.
    g2 = graph_of(*g.resources.values(), overcommit=1.5)
    assert check(g2, *observed_, facts=cluster(pve_runtime=node(maxmem_gib=8))) == []
    assert check(g, *observed_, facts=cluster(pve_runtime=node(maxmem_gib=9))) == []


def test_a_guest_that_cannot_move_out_still_counts_where_it_is() -> None:
    a = guest("mc-a", vmid=1000, memory=4096)
    b = guest("mc-b", vmid=1001, memory=4096, node="pve-gone")  # a typo: it stays
    observed_ = (seen(a, node="pve-core"), seen(b, node="pve-runtime"))
    found = check(graph_of(a, b), *observed_, facts=cluster(pve_runtime=node(maxmem_gib=6)))
    assert [f.split(":")[0] for f in found] == ["unknown-node", "node-memory"]
    assert "guest/mc-a" in found[1] and "8 GiB of guest memory" in found[1]


def test_a_refused_migration_plans_nothing_for_the_guest_and_its_firewall(
    graph: DesiredGraph,
) -> None:
    state = moved(converged_state(graph), "guest/mc-survival", "pve-spare")
    small = cluster(pve_spare=node(), pve_runtime=node(maxmem_gib=16))
    plan = make_plan(graph, observed(state, small))
    found = errors(plan, "node-memory")
    assert set(found) == {"guest/mc-survival"}
    assert "node pve-runtime cannot take it" in found["guest/mc-survival"].message
    assert planned(plan).isdisjoint({"guest/mc-survival", "firewall/guest/mc-survival"})


# --- templates take their vmids, and stay foreign ------------------------------------------------


def test_a_template_in_the_range_takes_its_vmid_and_shows_as_foreign(graph: DesiredGraph) -> None:
    state = without(converged_state(graph), "guest/mc-rlcraft", "firewall/guest/mc-rlcraft")
    template = foreign(1004, 512, name="debian-tmpl", template=True)
    plan = make_plan(graph, state.model_copy(update={"resources": (*state.resources, template)}))
    creates = {c.address: c for c in plan.actions}
    assert creates["guest/mc-rlcraft"].id["vmid"] == 1005
    assert plan.foreign == (
        {
            "kind": "guest",
            "name": "debian-tmpl",
            "vmid": 1004,
            "node": "pve-runtime",
            "in_range": "game",
            "template": True,
        },
    )


def test_a_template_holding_a_wanted_vmid_is_never_an_adoption(graph: DesiredGraph) -> None:
    """Even with the guest's own name: a template is not a guest to adopt."""
    state = without(converged_state(graph), "guest/mc-lobby", "firewall/guest/mc-lobby")
    template = foreign(1000, 512, name="mc-lobby", template=True)
    plan = make_plan(graph, state.model_copy(update={"resources": (*state.resources, template)}))
    assert plan.errored
    (found,) = [d for d in plan.diagnostics if d.address == "guest/mc-lobby"]
    assert found.code == "vmid-held-by-foreign" and "held by template 'mc-lobby'" in found.message
    assert "adopt" not in found.message
