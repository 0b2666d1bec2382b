"""Planning volumes and protection: Proxmox's spellings of a converged guest plan nothing, a
volume is added and grown in place, a smaller or moved volume is a plan error at the spec's
line (never a replace), a volume the spec dropped is a destroying update: held back without
pruning, counted toward max_deletes_per_run with it. Protection drift is an update.

The graph is the example platform plus a VM with extra disks and a mount point with options.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from reconciler.loading.graph import build_graph
from reconciler.model.diagnostics import Severity
from reconciler.model.observed import ObservedState
from reconciler.model.plans import Action, Change, Plan
from reconciler.model.resources import DesiredGraph
from reconciler.planning import normalize
from reconciler.planning.planner import converged_state, make_plan
from tests.loading.test_loader_merge import load_with

EXTRA = """guests:
  vm-build:
    role: network
    vmid: 350
    host: pve-runtime
    kind: qemu
    cores: 2
    memory: 2G
    disk: {size: 32G}
    volumes:
      scsi1: {size: 100G}
      scsi2: {size: 1T, backup: false, storage: tank}
  mc-hub:
    role: game
    vmid: 1010
    host: pve-runtime
    profile: game-vanilla
    network:
      - {name: eth0, bridge: vmbr0, ip: 10.20.0.30/24, gw: 10.20.0.1, tag: 20}
    volumes:
      mp1:
        path: /srv/maps
        size: 4G
        options: {acl: true, ro: true, replicate: false, mountoptions: [nodev, noatime]}
"""

# The Proxmox config values of the guests above once converged, as Proxmox writes them.
RAW = {
    "guest/vm-build": {
        "rootfs": "local-lvm:vm-350-disk-0,iothread=1,size=32G",
        "volumes": {
            "scsi1": "local-lvm:vm-350-disk-1,iothread=1,size=100G",
            "scsi2": "tank:vm-350-disk-2,backup=0,size=1T",
        },
        "protection": False,
    },
    "guest/mc-hub": {
        "rootfs": "local-lvm:vm-1010-disk-0,size=16G",
        "volumes": {
            "mp0": "local-lvm:vm-1010-disk-1,backup=1,mp=/srv/world,size=16G",
            "mp1": "local-lvm:vm-1010-disk-2,acl=1,mountoptions=noatime;nodev,"
            "mp=/srv/maps,replicate=0,ro=1,size=4G",
        },
        "protection": 0,
    },
}


@pytest.fixture(scope="module")
def graph() -> DesiredGraph:
    result, _ = load_with({"extra.yaml": EXTRA})
    assert result.ok and result.spec is not None, [str(d) for d in result.diagnostics]
    return build_graph(result.spec, result.source)


def edit(state: ObservedState, address: str, **attrs: Any) -> ObservedState:
    out = []
    for r in state.resources:
        if r.address == address:
            r = r.model_copy(update={"attributes": {**r.attributes, **attrs}})
        out.append(r)
    return state.model_copy(update={"resources": tuple(out)})


def proxmox_state(graph: DesiredGraph) -> ObservedState:
    """The converged platform, the two guests above in Proxmox's own spellings."""
    state = converged_state(graph)
    for address, attrs in RAW.items():
        state = edit(state, address, **attrs)
    return state


def change_of(plan: Plan, address: str) -> Change:
    return next(c for c in plan.changes if c.address == address)


def volumes_of(state: ObservedState, address: str) -> dict[str, Any]:
    return dict(next(r for r in state.resources if r.address == address).attributes["volumes"])


def test_proxmox_spellings_of_converged_volumes_plan_nothing(graph: DesiredGraph) -> None:
    plan = make_plan(graph, proxmox_state(graph))
    assert not plan.has_changes, [(c.address, c.fields) for c in plan.actions]
    assert not plan.errored


def test_an_observation_without_volumes_or_protection_saw_none(graph: DesiredGraph) -> None:
    state = converged_state(graph)
    bare = {**next(r for r in state.resources if r.address == "guest/zpack-api").attributes}
    del bare["volumes"], bare["protection"]
    resources = tuple(
        r.model_copy(update={"attributes": bare}) if r.address == "guest/zpack-api" else r
        for r in state.resources
    )
    state = state.model_copy(update={"resources": resources})
    assert change_of(make_plan(graph, state), "guest/zpack-api").action is Action.NOOP
    # mc-survival has a world volume: an observation without it plans adding it.
    state = edit(state, "guest/mc-survival", volumes=None)
    change = change_of(make_plan(graph, state), "guest/mc-survival")
    assert change.action is Action.UPDATE and [f.path for f in change.fields] == ["volumes.mp0"]
    assert change.destroys == () and change.blocked is None


@pytest.mark.parametrize(
    ("kind", "raw", "normalized"),
    [
        (
            "lxc",
            "local-lvm:vm-1001-disk-1,mp=/data,backup=1,size=50G",
            {"storage": "local-lvm", "size": "50G", "path": "/data", "backup": True},
        ),
        (
            "lxc",
            "local-lvm:50,mp=/data",
            {"storage": "local-lvm", "size": "50G", "path": "/data", "backup": False},
        ),
        (
            "lxc",
            "zfs:subvol-1001-disk-1,mp=/d,quota=0,acl=0,replicate=1,idmap=passthrough,size=512M",
            {"storage": "zfs", "size": "512M", "path": "/d", "backup": False, "acl": False},
        ),
        (
            "qemu",
            "local-lvm:vm-1-disk-1,size=8G",
            {"storage": "local-lvm", "size": "8G", "backup": True},
        ),
        ("qemu", "local-lvm:16,backup=0", {"storage": "local-lvm", "size": "16G", "backup": False}),
    ],
)
def test_proxmox_volume_strings_normalize_to_the_graph_shape(
    kind: str, raw: str, normalized: dict[str, Any]
) -> None:
    assert normalize.volume(kind, raw) == normalized
    assert normalize.volume(kind, normalized) == normalized


def test_a_grown_volume_is_an_update_in_place(graph: DesiredGraph) -> None:
    state = proxmox_state(graph)
    vols = volumes_of(state, "guest/mc-hub")
    vols["mp0"] = vols["mp0"].replace("size=16G", "size=8G")
    change = change_of(make_plan(graph, edit(state, "guest/mc-hub", volumes=vols)), "guest/mc-hub")
    assert change.action is Action.UPDATE
    assert [(f.path, f.before, f.after) for f in change.fields] == [
        ("volumes.mp0.size", "8G", "16G")
    ]
    assert change.destroys == () and change.blocked is None


def test_a_new_volume_and_a_new_path_are_updates_in_place(graph: DesiredGraph) -> None:
    state = proxmox_state(graph)
    vols = volumes_of(state, "guest/mc-hub")
    del vols["mp1"]
    vols["mp0"] = vols["mp0"].replace("mp=/srv/world", "mp=/srv/old")
    change = change_of(make_plan(graph, edit(state, "guest/mc-hub", volumes=vols)), "guest/mc-hub")
    assert change.action is Action.UPDATE
    assert [f.path for f in change.fields] == ["volumes.mp0.path", "volumes.mp1"]
    assert change.destroys == ()


def test_a_smaller_volume_is_a_plan_error_at_the_guest_and_nothing_is_planned_for_it(
    graph: DesiredGraph,
) -> None:
    state = proxmox_state(graph)
    vols = volumes_of(state, "guest/vm-build")
    vols["scsi1"] = vols["scsi1"].replace("size=100G", "size=200G")
    plan = make_plan(graph, edit(state, "guest/vm-build", volumes=vols))
    assert plan.errored and not plan.applyable
    [err] = [d for d in plan.diagnostics if d.code == "disk-shrink"]
    assert "scsi1 200G -> 100G" in err.message.replace("volumes.", "")
    assert err.position is not None and err.position.file == "specs/extra.yaml"
    assert err.position.line == 2  # where vm-build is written
    assert all(c.address != "guest/vm-build" for c in plan.changes)


def test_a_volume_on_another_storage_is_a_plan_error_never_a_replace(graph: DesiredGraph) -> None:
    state = proxmox_state(graph)
    vols = volumes_of(state, "guest/vm-build")
    vols["scsi2"] = vols["scsi2"].replace("tank:", "local-lvm:")
    plan = make_plan(graph, edit(state, "guest/vm-build", volumes=vols), allow_destroy=True)
    [err] = [d for d in plan.diagnostics if d.code == "volume-storage"]
    assert err.severity is Severity.ERROR and "move-volume" in err.message
    assert "volumes.scsi2 local-lvm -> tank" in err.message
    assert err.position is not None and err.position.file == "specs/extra.yaml"
    assert all(c.address != "guest/vm-build" for c in plan.changes)
    assert not any(c.action is Action.REPLACE for c in plan.changes)


def test_a_volume_dropped_from_the_spec_is_held_back_without_pruning(graph: DesiredGraph) -> None:
    state = proxmox_state(graph)
    vols = volumes_of(state, "guest/mc-hub")
    vols["mp7"] = "local-lvm:vm-1010-disk-7,mp=/srv/old,size=50G"
    state = edit(state, "guest/mc-hub", volumes=vols, memory=1024)
    plan = make_plan(graph, state)
    change = change_of(plan, "guest/mc-hub")
    assert change.action is Action.UPDATE
    assert change.destroys == ("mp7 50 GiB",)
    assert change.blocked and "platform.prune or --allow-destroy" in change.blocked
    assert change not in plan.actions and plan.blocked == (change,)
    [warn] = [d for d in plan.diagnostics if d.code == "destroy-blocked"]
    assert warn.severity is Severity.WARNING and "mp7 50 GiB" in warn.message
    assert warn.position is not None and warn.position.file == "specs/extra.yaml"
    assert not plan.errored and not plan.has_changes and plan.drifted


def test_a_dropped_volume_is_detached_with_pruning_and_counts_as_a_destroy(
    graph: DesiredGraph,
) -> None:
    state = proxmox_state(graph)
    vols = volumes_of(state, "guest/mc-hub")
    vols["mp7"] = "local-lvm:vm-1010-disk-7,mp=/srv/old,size=50G"
    state = edit(state, "guest/mc-hub", volumes=vols)
    plan = make_plan(graph, state, allow_destroy=True)
    change = change_of(plan, "guest/mc-hub")
    assert change.action is Action.UPDATE and change.blocked is None
    assert change.destroys == ("mp7 50 GiB",) and change in plan.actions
    assert [(f.path, f.after) for f in change.fields] == [("volumes.mp7", None)]
    assert not any(d.code == "too-many-deletes" for d in plan.diagnostics)

    strict = dataclasses.replace(graph, settings={**graph.settings, "max_deletes_per_run": 0})
    plan = make_plan(strict, state, allow_destroy=True)
    assert plan.errored
    [err] = [d for d in plan.diagnostics if d.code == "too-many-deletes"]
    assert "destroy data on 1 guests" in err.message


def test_protection_drift_is_an_update_of_that_field(graph: DesiredGraph) -> None:
    state = edit(proxmox_state(graph), "guest/mc-hub", protection=1)
    change = change_of(make_plan(graph, state), "guest/mc-hub")
    assert change.action is Action.UPDATE
    assert [(f.path, f.before, f.after) for f in change.fields] == [("protection", True, False)]
    assert change.destroys == ()


def test_a_replace_says_it_destroys_the_volumes_too(graph: DesiredGraph) -> None:
    state = edit(proxmox_state(graph), "guest/mc-hub", unprivileged=False)
    change = change_of(make_plan(graph, state), "guest/mc-hub")
    assert change.action is Action.REPLACE and change.blocked
    assert change.destroys == ("rootfs 16 GiB", "mp0 16 GiB", "mp1 4 GiB")
