"""QEMU VMs end to end on fakepve, through the real client, next to an LXC container.

A small platform: two VMs and one container on the two nodes. A VM is created empty (no
template), with its disk as `scsi0`, virtio NICs and our mark in its description; its observed
NICs (`virtio=<generated MAC>,...`) and string memory must compare equal to the spec, or it
would drift forever. Assertions read Proxmox's state or fakepve's request log.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from reconciler.applying.converging import Convergence, converge
from reconciler.model.plans import Action, Change, Plan
from reconciler.model.resources import DesiredGraph
from reconciler.planning import normalize
from reconciler.providers.proxmox import ProxmoxProvider, guest_attributes
from tests.fakepve_fixtures import TEMPLATE, body_of, mutating_calls
from tests.guest_helpers import CORE_RANGE, load_edited, plan_now, platform_yaml

PLATFORM = platform_yaml(CORE_RANGE, "build: {first: 500, last: 599, layer: runtime}", control=True)

GUESTS = f"""
guests:
  db-vm:
    kind: qemu
    role: core
    host: pve-core
    vmid: 150
    cores: 2
    memory: 2G
    disk: {{size: 16G}}
    tags: [db]
    description: Postgres for the portal
    network:
      - {{bridge: vmbr0, tag: 10}}
  build-vm:
    kind: qemu
    role: build
    host: pve-runtime
    cores: 4
    memory: 4G
    disk: {{size: 32G}}
    onboot: false
    network:
      - {{bridge: vmbr0, tag: 20, firewall: false}}
      - {{name: eth1, bridge: vmbr1, mtu: 9000, hwaddr: "bc:24:11:aa:00:01"}}
  web-ct:
    role: core
    host: pve-core
    vmid: 110
    template: local:vztmpl/{TEMPLATE}
    memory: 1G
    network:
      - {{name: eth0, bridge: vmbr0, ip: 10.0.0.5/24, gw: 10.0.0.1}}
"""


def lab(*edits: tuple[str, str]) -> DesiredGraph:
    """The platform, with each (old, new) replaced once in the guests file."""
    return load_edited(PLATFORM, GUESTS, *edits)


def run(graph: DesiredGraph, provider: ProxmoxProvider, **kw: Any) -> Convergence:
    conv = anyio.run(lambda: converge(graph, [provider], **kw))
    assert conv.ok, [(r.change.address, r.error) for r in conv.rounds[-1].report.results]
    return conv


def by_address(plan: Plan) -> dict[str, Change]:
    return {c.address: c for c in plan.actions}


def assert_silent(graph: DesiredGraph, provider: ProxmoxProvider, pve: Any) -> None:
    """Converged: the next run plans nothing and writes nothing."""
    pve.requests.clear()
    again = run(graph, provider)
    assert not again.rounds[0].plan.has_changes, [
        (c.address, c.fields) for c in again.rounds[0].plan.actions
    ]
    assert mutating_calls(pve) == []


@pytest.fixture
def desired() -> DesiredGraph:
    return lab()


@pytest.fixture
def converged(desired: DesiredGraph, provider: ProxmoxProvider, pve: Any) -> ProxmoxProvider:
    run(desired, provider)
    pve.requests.clear()
    return provider


# --- the desired side ------------------------------------------------------------------------


def test_vm_attributes_have_no_lxc_fields_and_qemu_nics(desired: DesiredGraph) -> None:
    vm = desired.resources["guest/db-vm"].attributes
    assert vm["type"] == "qemu"
    for key in ("template", "swap", "features", "unprivileged"):
        assert key not in vm
    assert vm["rootfs"] == {"storage": "local-lvm", "size": "16G"}
    assert vm["net"] == {"net0": "virtio,bridge=vmbr0,firewall=1,tag=10"}
    assert desired.resources["guest/build-vm"].attributes["net"] == {
        "net0": "virtio,bridge=vmbr0,firewall=0,tag=20",
        "net1": "virtio=BC:24:11:AA:00:01,bridge=vmbr1,firewall=1,mtu=9000",
    }
    ct = desired.resources["guest/web-ct"].attributes
    assert ct["template"] == f"local:vztmpl/{TEMPLATE}" and ct["unprivileged"] is True


# --- normalization of what Proxmox answers ---------------------------------------------------


@pytest.mark.parametrize(
    ("observed", "pinned", "expected"),
    [
        (
            "virtio=BC:24:11:EF:09:9B,bridge=vmbr0,firewall=1,tag=10",
            False,
            "virtio,bridge=vmbr0,firewall=1,tag=10",
        ),
        ("virtio=BC:24:11:EF:09:9B,bridge=vmbr0", False, "virtio,bridge=vmbr0,firewall=0"),
        (
            "tag=10,virtio=bc:24:11:ef:09:9b,bridge=vmbr0",
            False,
            "virtio,bridge=vmbr0,firewall=0,tag=10",
        ),
        (
            "model=virtio,macaddr=bc:24:11:aa:00:01,bridge=vmbr1",
            True,
            "virtio=BC:24:11:AA:00:01,bridge=vmbr1,firewall=0",
        ),
        (
            "virtio=BC:24:11:AA:00:01,bridge=vmbr1,firewall=1,mtu=9000",
            True,
            "virtio=BC:24:11:AA:00:01,bridge=vmbr1,firewall=1,mtu=9000",
        ),
        ("virtio,bridge=vmbr0,firewall=1", False, "virtio,bridge=vmbr0,firewall=1"),
    ],
)
def test_vm_nic_is_normalized_to_model_first_and_the_mac_only_when_pinned(
    observed: str, pinned: bool, expected: str
) -> None:
    keep = frozenset({"hwaddr"}) if pinned else frozenset()
    assert normalize.qemu_net(observed, keep) == expected


@pytest.mark.parametrize("answer", ["2048", "current=2048", 2048])
def test_vm_memory_reads_as_mib(answer: Any) -> None:
    attrs = guest_attributes(
        {"vmid": 150, "node": "pve-core", "type": "qemu", "status": "running"},
        {"name": "db-vm", "memory": answer, "scsi0": "local-lvm:vm-150-disk-0,size=16G"},
    )
    assert attrs["memory"] == 2048
    assert normalize.guest({"type": "qemu", "memory": answer})["memory"] == 2048
    assert attrs["rootfs"] == "local-lvm:vm-150-disk-0,size=16G"
    assert not {"template", "swap", "features", "unprivileged"} & set(attrs)


# --- converging --------------------------------------------------------------------------------


def test_converges_from_empty_then_second_apply_is_silent(
    desired: DesiredGraph, provider: ProxmoxProvider, pve: Any
) -> None:
    first = run(desired, provider)
    plan = first.rounds[0].plan
    assert {(c.address, c.action) for c in plan.actions} == {
        ("guest/db-vm", Action.CREATE),
        ("guest/build-vm", Action.CREATE),
        ("guest/web-ct", Action.CREATE),
    }
    assert len(first.rounds) == 1

    create = body_of(pve, "POST", "/nodes/pve-core/qemu")
    assert create == {
        "vmid": "150",
        "name": "db-vm",
        "cores": "2",
        "memory": "2048",
        "onboot": "1",
        "tags": "db;reconciler",
        "description": "Postgres for the portal\n\n"
        "reconciler:v1 platform=zpack address=guest/db-vm vmid=150",
        "start": "1",
        "scsi0": "local-lvm:16",
        "scsihw": "virtio-scsi-single",
        "ostype": "l26",
        "net0": "virtio,bridge=vmbr0,firewall=1,tag=10",
    }

    client = provider.client
    db = client.nodes("pve-core").qemu(150).config.get()
    assert db["name"] == "db-vm" and db["memory"] == "2048" and db["cores"] == 2
    assert db["scsi0"] == "local-lvm:vm-150-disk-0,size=16G"
    assert db["net0"].startswith("virtio=BC:24:11:") and db["net0"].endswith(
        ",bridge=vmbr0,firewall=1,tag=10"
    )
    build_vmid = next(
        r["vmid"] for r in client.cluster.resources.get(type="vm") if r["name"] == "build-vm"
    )
    assert build_vmid == 500
    build = client.nodes("pve-runtime").qemu(500).config.get()
    assert build["net1"] == "virtio=BC:24:11:AA:00:01,bridge=vmbr1,firewall=1,mtu=9000"
    assert build["onboot"] == 0 and build["memory"] == "4096"
    states = {r["name"]: r["status"] for r in client.cluster.resources.get(type="vm")}
    assert states == {"db-vm": "running", "build-vm": "running", "web-ct": "running"}
    assert client.nodes("pve-core").lxc(110).config.get()["hostname"] == "web-ct"

    assert_silent(desired, provider, pve)


# Each out-of-band change, made through the API as an operator would, is planned as exactly that
# field and corrected. On a running VM Proxmox keeps cores and memory changes pending until the
# next start (fakepve NIC changes too); the controller reads and writes that pending config.
OUT_OF_BAND = {
    "memory": (
        "guest/db-vm",
        lambda n, mac: n("pve-core").qemu(150).config.put(memory=1024),
        [("memory", 1024, 2048)],
    ),
    "cores": (
        "guest/db-vm",
        lambda n, mac: n("pve-core").qemu(150).config.put(cores=1),
        [("cores", 1, 2)],
    ),
    "stopped": (
        "guest/build-vm",
        lambda n, mac: n("pve-runtime").qemu(500).status.stop.post(),
        [("state", "stopped", "running")],
    ),
    "vlan": (
        "guest/db-vm",
        lambda n, mac: (
            n("pve-core").qemu(150).config.put(net0=f"virtio={mac},bridge=vmbr0,firewall=1,tag=30")
        ),
        [
            (
                "net.net0",
                "virtio,bridge=vmbr0,firewall=1,tag=30",
                "virtio,bridge=vmbr0,firewall=1,tag=10",
            )
        ],
    ),
}


@pytest.mark.parametrize("case", sorted(OUT_OF_BAND))
def test_out_of_band_change_is_planned_field_by_field_and_corrected(
    case: str, desired: DesiredGraph, converged: ProxmoxProvider, pve: Any
) -> None:
    address, change, expected = OUT_OF_BAND[case]
    nodes = converged.client.nodes
    mac = nodes("pve-core").qemu(150).config.get()["net0"].split(",")[0].split("=")[1]
    change(nodes, mac)

    conv = run(desired, converged)
    plan = conv.rounds[0].plan
    assert [(c.address, c.action) for c in plan.actions] == [(address, Action.UPDATE)]
    assert [(f.path, f.before, f.after) for f in plan.actions[0].fields] == expected
    assert not any(f.forces_replace for f in plan.actions[0].fields)
    assert len(conv.rounds) == 1

    db = {
        i["key"]: i.get("pending", i.get("value"))
        for i in nodes("pve-core").qemu(150).pending.get()
    }
    assert (int(db["memory"]), int(db["cores"])) == (2048, 2)
    assert db["net0"] == f"virtio={mac},bridge=vmbr0,firewall=1,tag=10"  # the MAC is kept
    assert nodes("pve-runtime").qemu(500).status.current.get()["status"] == "running"
    assert_silent(desired, converged, pve)


def test_several_out_of_band_changes_are_one_update_per_guest(
    desired: DesiredGraph, converged: ProxmoxProvider, pve: Any
) -> None:
    nodes = converged.client.nodes
    mac = nodes("pve-core").qemu(150).config.get()["net0"].split(",")[0].split("=")[1]
    nodes("pve-core").qemu(150).config.put(
        memory=1024, cores=1, net0=f"virtio={mac},bridge=vmbr0,firewall=1,tag=30"
    )
    nodes("pve-runtime").qemu(500).status.stop.post()

    conv = run(desired, converged)
    by = by_address(conv.rounds[0].plan)
    assert set(by) == {"guest/db-vm", "guest/build-vm"}
    assert [f.path for f in by["guest/db-vm"].fields] == ["cores", "memory", "net.net0"]
    assert [f.path for f in by["guest/build-vm"].fields] == ["state"]
    put = body_of(pve, "PUT", "/nodes/pve-core/qemu/150/config")
    assert put.pop("digest")
    assert put == {
        "cores": "2",
        "memory": "2048",
        "net0": f"virtio={mac},bridge=vmbr0,firewall=1,tag=10",
    }
    assert_silent(desired, converged, pve)


# --- disks -----------------------------------------------------------------------------------


def test_a_new_disk_storage_plans_a_blocked_replace_naming_the_field(
    converged: ProxmoxProvider, pve: Any
) -> None:
    missing = plan_now(lab(("disk: {size: 16G}", "disk: {size: 16G, storage: ceph-vm}")), converged)
    assert missing.errored and "ceph-vm" in " ".join(d.message for d in missing.diagnostics)
    pve.add_ceph_storage("ceph-vm")
    edited = lab(("disk: {size: 16G}", "disk: {size: 16G, storage: ceph-vm}"))
    plan = plan_now(edited, converged)
    assert not plan.actions and not plan.errored
    (change,) = plan.blocked
    assert (change.address, change.action) == ("guest/db-vm", Action.REPLACE)
    assert [(f.path, f.forces_replace) for f in change.fields] == [("rootfs.storage", True)]
    assert change.reason == "cannot change in place: rootfs.storage"
    assert change.destroys == ("rootfs 16 GiB",)
    pve.requests.clear()
    anyio.run(lambda: converge(edited, [converged]))
    assert mutating_calls(pve) == []


def test_a_smaller_vm_disk_is_a_plan_error_and_nothing_is_touched(
    converged: ProxmoxProvider, pve: Any
) -> None:
    plan = plan_now(lab(("disk: {size: 16G}", "disk: {size: 8G}")), converged)
    assert plan.errored and [d.code for d in plan.diagnostics] == ["disk-shrink"]
    assert plan.diagnostics[0].position is not None


def test_disk_growth_resizes_scsi0_in_place(converged: ProxmoxProvider, pve: Any) -> None:
    grown = lab(("disk: {size: 16G}", "disk: {size: 24G}"))
    plan = plan_now(grown, converged)
    (change,) = plan.actions
    assert change.action is Action.UPDATE
    assert [(f.path, f.before, f.after) for f in change.fields] == [("rootfs.size", "16G", "24G")]
    pve.requests.clear()
    run(grown, converged)
    # fakepve answers a VM resize (schema-checked) without modelling it, so the disk itself
    # cannot be read back: the request is what there is to check.
    assert mutating_calls(pve) == [("PUT", "/api2/json/nodes/pve-core/qemu/150/resize")]
    assert body_of(pve, "PUT", "/qemu/150/resize") == {"disk": "scsi0", "size": "24G"}


# --- replace across kinds and nodes ----------------------------------------------------------


def test_a_container_turned_vm_is_destroyed_as_a_container_and_created_as_a_vm(
    converged: ProxmoxProvider, pve: Any
) -> None:
    as_vm = lab(("  web-ct:\n    role: core", "  web-ct:\n    kind: qemu\n    role: core"))
    conv = run(as_vm, converged, allow_destroy=True)
    (change,) = conv.rounds[0].plan.actions
    assert (change.address, change.action) == ("guest/web-ct", Action.REPLACE)
    assert "type" in change.reason
    assert mutating_calls(pve) == [
        ("POST", "/api2/json/nodes/pve-core/lxc/110/status/stop"),
        ("DELETE", "/api2/json/nodes/pve-core/lxc/110"),
        ("POST", "/api2/json/nodes/pve-core/qemu"),
    ]
    create = body_of(pve, "POST", "/nodes/pve-core/qemu")
    assert not {"ostemplate", "hostname", "swap", "unprivileged", "rootfs"} & set(create)
    assert "template=" not in create["description"]
    assert_silent(as_vm, converged, pve)


def test_a_vm_moved_to_another_node_is_migrated_not_destroyed(
    converged: ProxmoxProvider, pve: Any
) -> None:
    moved = lab(("    role: build\n    host: pve-runtime", "    role: build\n    host: pve-core"))
    conv = run(moved, converged)
    (change,) = conv.rounds[0].plan.actions
    assert (change.address, change.action) == ("guest/build-vm", Action.MIGRATE)
    assert [c for c in mutating_calls(pve) if c[0] == "DELETE"] == []
    assert ("POST", "/api2/json/nodes/pve-runtime/qemu/500/migrate") in mutating_calls(pve)
    assert_silent(moved, converged, pve)
