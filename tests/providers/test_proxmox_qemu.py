"""QEMU VMs end to end on fakepve, through the real client, next to an LXC container.

A small platform: two VMs and one container on the two nodes. A VM is created empty (no
template), with its disk as `scsi0`, virtio NICs and our mark in its description; its observed
NICs (`virtio=<generated MAC>,...`) and string memory must compare equal to the spec, or it
would drift forever. Assertions read Proxmox's state or fakepve's request log.

A VM's disks are its volumes by drive key on any bus, the boot disk among them (`disk: {bus:
virtio}` is `virtio0`; `disk: none`, no disk), read back with size and storage; CD-ROMs, the
cloud-init drive and `unusedN` are none of them; the disk it boots from is its boot order's
first. A disk grows in place (`resize`, which PlatformPve models), never shrinks or moves.
"""

from __future__ import annotations

import re
from typing import Any

import anyio
import pytest

from reconciler.applying.converging import Convergence, converge
from reconciler.loading.loader import load_texts
from reconciler.model.plans import Action, Change, Plan
from reconciler.model.resources import DesiredGraph
from reconciler.planning import normalize
from reconciler.providers.proxmox import ProxmoxProvider, disks_to_grow, guest_attributes
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
    assert "rootfs" not in vm
    assert vm["volumes"] == {"scsi0": {"storage": "local-lvm", "size": "16G", "backup": True}}
    assert vm["boot_disk"] == "scsi0"
    assert vm["net"] == {"net0": "virtio,bridge=vmbr0,firewall=1,tag=10"}
    assert desired.resources["guest/build-vm"].attributes["net"] == {
        "net0": "virtio,bridge=vmbr0,firewall=0,tag=20",
        "net1": "virtio=BC:24:11:AA:00:01,bridge=vmbr1,firewall=1,mtu=9000",
    }
    ct = desired.resources["guest/web-ct"].attributes
    assert ct["template"] == f"local:vztmpl/{TEMPLATE}" and ct["unprivileged"] is True


# (edit of the guests file, a part of the error's message, the line it is reported at)
DISK_MISTAKES = [
    (
        ("disk: {size: 16G}", "disk: {size: 16G, bus: virtio}\n    volumes: {virtio0: {size: 1G}}"),
        "virtio0 is a VM's boot disk (disk.bus virtio)",
        "volumes: {virtio0",
    ),
    (
        ("disk: {size: 16G}", "volumes: {scsi0: {size: 1G}}"),
        "scsi0 is a VM's boot disk (disk.bus scsi)",
        "volumes: {scsi0",
    ),
    (
        ("    memory: 1G\n", "    memory: 1G\n    disk: none\n"),
        "a container's root disk is its rootfs: it cannot be none",
        "disk: none",
    ),
    (
        ("    memory: 1G\n", "    memory: 1G\n    disk: {bus: virtio}\n"),
        "a container's root disk is its rootfs: it has no bus",
        "disk: {bus: virtio}",
    ),
    (
        ("disk: {size: 16G}", "disk: {bus: none, size: 16G}"),
        "a VM without a disk has no size: write `disk: none`",
        "disk: {bus: none",
    ),
    (
        ("disk: {size: 16G}", "disk: {size: 16G, bus: nvme}"),
        "Input should be 'scsi', 'virtio', 'sata', 'ide' or 'none'",
        "bus: nvme",
    ),
    (
        ("disk: {size: 16G}", "volumes: {virtio16: {size: 1G}}"),
        "'virtio16' is not a volume key",
        "volumes: {virtio16",
    ),
]


@pytest.mark.parametrize(
    ("edit", "message", "marker"), DISK_MISTAKES, ids=[m[1][:40] for m in DISK_MISTAKES]
)
def test_a_disk_mistake_is_reported_at_its_line(
    edit: tuple[str, str], message: str, marker: str
) -> None:
    old, new = edit
    text = GUESTS.replace(old, new, 1)
    loaded = load_texts({"platform.yaml": PLATFORM, "guests.yaml": text})
    found = [d for d in loaded.diagnostics if message in d.message]
    assert not loaded.ok and found, [str(d) for d in loaded.diagnostics]
    assert found[0].position is not None and found[0].position.file == "guests.yaml"
    line = next(i for i, t in enumerate(text.split("\n"), 1) if marker in t)
    assert found[0].position.line == line


def test_disk_none_and_a_bus_are_read_into_the_vms_volumes() -> None:
    graph = lab(("disk: {size: 32G}", "disk: none\n    volumes: {sata0: {size: 2G}}"))
    build = graph.resources["guest/build-vm"].attributes
    assert build["volumes"] == {"sata0": {"storage": "local-lvm", "size": "2G", "backup": True}}
    assert build["boot_disk"] is None
    graph = lab(("disk: {size: 32G}", "disk: {size: 32G, bus: sata}"))
    build = graph.resources["guest/build-vm"].attributes
    assert build["volumes"] == {"sata0": {"storage": "local-lvm", "size": "32G", "backup": True}}
    assert build["boot_disk"] == "sata0"


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
    assert attrs["volumes"] == {"scsi0": "local-lvm:vm-150-disk-0,size=16G"}
    assert attrs["boot_disk"] == "scsi0"  # no boot order: the first disk (legacy `cdn`)
    assert not {"template", "swap", "features", "unprivileged", "rootfs"} & set(attrs)


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
        "boot": "order=scsi0;net0",
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
    guests = [r for r in client.cluster.resources.get(type="vm") if not r.get("template")]
    states = {r["name"]: r["status"] for r in guests}  # the fixture's VM template aside
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


def test_a_new_boot_disk_storage_is_a_plan_error_never_a_replace(
    converged: ProxmoxProvider, pve: Any
) -> None:
    """A VM's boot disk is one of its volumes: the controller never moves it, nor destroys the
    VM to get it elsewhere (Proxmox's move-volume does, with the data)."""
    missing = plan_now(lab(("disk: {size: 16G}", "disk: {size: 16G, storage: ceph-vm}")), converged)
    assert missing.errored and "ceph-vm" in " ".join(d.message for d in missing.diagnostics)
    pve.add_ceph_storage("ceph-vm")
    edited = lab(("disk: {size: 16G}", "disk: {size: 16G, storage: ceph-vm}"))
    plan = plan_now(edited, converged)
    assert plan.errored and not plan.blocked
    (error,) = [d for d in plan.diagnostics if d.address == "guest/db-vm"]
    assert error.code == "volume-storage"
    assert "volumes.scsi0 local-lvm -> ceph-vm" in error.message
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
    assert [(f.path, f.before, f.after) for f in change.fields] == [
        ("volumes.scsi0.size", "16G", "24G")
    ]
    pve.requests.clear()
    run(grown, converged)
    assert mutating_calls(pve) == [("PUT", "/api2/json/nodes/pve-core/qemu/150/resize")]
    assert body_of(pve, "PUT", "/qemu/150/resize") == {"disk": "scsi0", "size": "24G"}
    scsi0 = converged.client.nodes("pve-core").qemu(150).config.get()["scsi0"]
    assert scsi0 == "local-lvm:vm-150-disk-0,size=24G"  # the same volume, grown
    assert_silent(grown, converged, pve)


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


# --- a VM's disks as Proxmox has them --------------------------------------------------------

ITEM = {"vmid": 160, "node": "pve-core", "type": "qemu", "status": "stopped"}
DISK = "local-lvm:vm-160-disk-{n},size={size}"

# config -> (the volumes observed, the disk it boots from)
OBSERVED: dict[str, tuple[dict[str, str], set[str], str | None]] = {
    "no disk, network boot": ({"boot": "order=net0"}, set(), None),
    "virtio0": (
        {"virtio0": DISK.format(n=0, size="16G"), "boot": "order=virtio0;net0"},
        {"virtio0"},
        "virtio0",
    ),
    "scsi0 and scsi1, a CD-ROM, cloud-init, unused, EFI": (
        {
            "scsi0": DISK.format(n=0, size="32G"),
            "scsi1": DISK.format(n=1, size="100G") + ",iothread=1",
            "ide0": "local:iso/debian-12.iso,media=cdrom",
            "ide2": "local-lvm:vm-160-cloudinit,media=cdrom",
            "sata1": "none,media=cdrom",
            "unused0": "local-lvm:vm-160-disk-2",
            "efidisk0": "local-lvm:vm-160-disk-3,efitype=4m,size=4M",
            "boot": "order=ide0;scsi0;net0",
        },
        {"scsi0", "scsi1"},
        "scsi0",
    ),
    "the order names the second disk first": (
        {
            "scsi0": DISK.format(n=0, size="8G"),
            "scsi1": DISK.format(n=1, size="8G"),
            "boot": "order=net0;scsi1;scsi0",
        },
        {"scsi0", "scsi1"},
        "scsi1",
    ),
    "the order names no disk": (
        {"sata0": DISK.format(n=0, size="8G"), "boot": "order=net0"},
        {"sata0"},
        None,
    ),
    "legacy letters with bootdisk": (
        {
            "scsi0": DISK.format(n=0, size="8G"),
            "virtio1": DISK.format(n=1, size="8G"),
            "boot": "cdn",
            "bootdisk": "virtio1",
        },
        {"scsi0", "virtio1"},
        "virtio1",
    ),
    "legacy letters without a disk": (
        {"scsi0": DISK.format(n=0, size="8G"), "boot": "n"},
        {"scsi0"},
        None,
    ),
    "no boot at all: the first disk in bus order": (
        {"virtio0": DISK.format(n=0, size="8G"), "sata1": DISK.format(n=1, size="8G")},
        {"virtio0", "sata1"},
        "sata1",
    ),
}


@pytest.mark.parametrize("case", sorted(OBSERVED))
def test_a_vms_disks_and_boot_disk_are_read_as_proxmox_has_them(case: str) -> None:
    config, disks, boot = OBSERVED[case]
    attrs = guest_attributes(ITEM, {"name": "vm", "net0": "virtio=BC:24:11:00:00:01", **config})
    assert set(attrs["volumes"]) == disks
    assert attrs["boot_disk"] == boot
    assert "rootfs" not in attrs
    if case.startswith("scsi0 and scsi1"):  # size and storage read back like any volume
        assert normalize.volume("qemu", attrs["volumes"]["scsi1"]) == {
            "storage": "local-lvm",
            "size": "100G",
            "backup": True,
        }


ROUTER = """  router-vm:
    kind: qemu
    role: core
    host: pve-core
    vmid: 160
    disk: {size: 8G, bus: virtio}
    volumes:
      scsi1: {size: 4G}
    network:
      - {bridge: vmbr0}
  web-ct:
"""
PXE = """  pxe-vm:
    kind: qemu
    role: core
    host: pve-core
    vmid: 161
    disk: none
    network:
      - {bridge: vmbr0}
  web-ct:
"""


def test_a_vm_is_created_with_its_boot_disk_on_its_bus_and_boots_from_it(
    converged: ProxmoxProvider, pve: Any
) -> None:
    graph = lab(("  web-ct:\n", ROUTER))
    run(graph, converged)
    create = body_of(pve, "POST", "/nodes/pve-core/qemu")
    assert (create["virtio0"], create["scsi1"]) == ("local-lvm:8", "local-lvm:4")
    assert create["boot"] == "order=virtio0;net0"  # PVE's default would boot scsi1 first
    assert "scsi0" not in create
    config = converged.client.nodes("pve-core").qemu(160).config.get()
    assert re.fullmatch(r"local-lvm:vm-160-disk-\d,size=8G", config["virtio0"])
    assert re.fullmatch(r"local-lvm:vm-160-disk-\d,size=4G", config["scsi1"])
    virtio0 = config["virtio0"]
    assert_silent(graph, converged, pve)

    grown = lab(("  web-ct:\n", ROUTER.replace("size: 8G, bus", "size: 12G, bus")))
    (change,) = plan_now(grown, converged).actions
    assert [(f.path, f.before, f.after) for f in change.fields] == [
        ("volumes.virtio0.size", "8G", "12G")
    ]
    pve.requests.clear()
    run(grown, converged)
    assert body_of(pve, "PUT", "/qemu/160/resize") == {"disk": "virtio0", "size": "12G"}
    assert pve.vm(160).config["virtio0"] == virtio0.replace("size=8G", "size=12G")
    assert_silent(grown, converged, pve)


def test_a_vm_without_a_disk_is_created_without_one_and_stays_so(
    converged: ProxmoxProvider, pve: Any
) -> None:
    graph = lab(("  web-ct:\n", PXE))
    assert graph.resources["guest/pxe-vm"].attributes["volumes"] == {}
    run(graph, converged)
    create = body_of(pve, "POST", "/nodes/pve-core/qemu")
    assert create["boot"] == "order=net0"
    assert not [k for k in create if k.startswith(("scsi0", "virtio", "sata", "ide"))]
    config = pve.vm(161).config
    assert not [k for k in config if re.fullmatch(r"(scsi|virtio|sata|ide)\d+", k)]
    assert_silent(graph, converged, pve)


def test_cdroms_cloud_init_unused_and_efi_drives_are_never_diffed_nor_touched(
    desired: DesiredGraph, converged: ProxmoxProvider, pve: Any
) -> None:
    vm = pve.vm(150)
    vm.config.update(
        {
            "ide0": "local:iso/debian-12.iso,media=cdrom",
            "ide2": "local-lvm:vm-150-cloudinit,media=cdrom",
            "unused0": "local-lvm:vm-150-disk-7",
            "efidisk0": "local-lvm:vm-150-disk-8,efitype=4m,size=4M",
            "boot": "order=ide0;scsi0;net0",  # the installer CD first: still boots scsi0
        }
    )
    plan = plan_now(desired, converged)
    assert not plan.actions and not plan.blocked, [(c.address, c.fields) for c in plan.blocked]
    assert_silent(desired, converged, pve)
    assert vm.config["ide2"] == "local-lvm:vm-150-cloudinit,media=cdrom"


def test_a_boot_order_naming_another_disk_first_is_put_back(
    converged: ProxmoxProvider, pve: Any
) -> None:
    graph = lab(("disk: {size: 16G}", "disk: {size: 16G}\n    volumes: {scsi1: {size: 2G}}"))
    run(graph, converged)
    nodes = converged.client.nodes
    nodes("pve-core").qemu(150).config.put(boot="order=scsi1;scsi0;net0")
    (change,) = plan_now(graph, converged).actions
    assert [(f.path, f.before, f.after) for f in change.fields] == [("boot_disk", "scsi1", "scsi0")]
    pve.requests.clear()
    run(graph, converged)
    put = body_of(pve, "PUT", "/qemu/150/config")
    assert put["boot"] == "order=scsi0;scsi1;net0"  # the disk first, the rest as it was
    assert_silent(graph, converged, pve)


@pytest.mark.parametrize(
    ("disk", "fields"),
    [
        (
            "disk: {size: 16G, bus: virtio}",
            ["boot_disk", "volumes.scsi0", "volumes.virtio0"],
        ),
        ("disk: none", ["boot_disk", "volumes.scsi0"]),
    ],
)
def test_a_boot_disk_the_spec_moves_or_drops_is_a_blocked_destroy(
    disk: str, fields: list[str], converged: ProxmoxProvider, pve: Any
) -> None:
    """Another bus is another disk: the one there would be detached (Proxmox keeps it as
    unusedN), which destroys data: held back without pruning, like a dropped volume."""
    edited = lab(("disk: {size: 16G}", disk))
    plan = plan_now(edited, converged)
    assert not plan.actions
    (change,) = plan.blocked
    assert (change.address, change.action) == ("guest/db-vm", Action.UPDATE)
    assert [f.path for f in change.fields] == fields
    assert change.destroys == ("scsi0 16 GiB",)
    pve.requests.clear()
    anyio.run(lambda: converge(edited, [converged]))
    assert mutating_calls(pve) == []
    assert pve.vm(150).config["scsi0"] == "local-lvm:vm-150-disk-0,size=16G"


def test_a_volume_on_a_cd_rom_drive_is_refused_and_the_drive_kept(
    converged: ProxmoxProvider, pve: Any
) -> None:
    pve.vm(150).config["ide2"] = "local:iso/debian-12.iso,media=cdrom"
    graph = lab(("disk: {size: 16G}", "disk: {size: 16G}\n    volumes: {ide2: {size: 4G}}"))
    conv = anyio.run(lambda: converge(graph, [converged]))
    assert not conv.ok
    (result,) = [r for r in conv.rounds[-1].report.results if r.change.address == "guest/db-vm"]
    assert "ide2 holds 'local:iso/debian-12.iso', a CD-ROM or cloud-init drive" in str(result.error)
    assert pve.vm(150).config["ide2"] == "local:iso/debian-12.iso,media=cdrom"


def test_a_vm_migration_moves_its_disks_only_where_one_storage_map_can_say_it(
    provider: ProxmoxProvider, pve: Any
) -> None:
    """`targetstorage` maps storage to storage: the boot disk can move to `fast` with the VM
    only if its other disk on the same storage goes there too."""
    pve.storages["fast"] = {
        "type": "lvmthin",
        "active": 1,
        "content": "images,rootdir",
        "files": set(),
        "vgname": "fast",
        "thinpool": "data",
    }
    base = ("    disk: {size: 32G}\n", "    disk: {size: 32G}\n    volumes: {scsi1: {size: 2G}}\n")
    run(lab(base), provider)  # created with both disks (fakepve allocates none on a PUT)
    move = ("    role: build\n    host: pve-runtime", "    role: build\n    host: pve-core")
    fast = ("disk: {size: 32G}", "disk: {size: 32G, storage: fast}")
    plan = plan_now(lab(base, move, fast), provider)
    assert plan.errored and not plan.actions
    assert [d.code for d in plan.diagnostics] == ["volume-storage"]

    both = lab((base[0], base[1].replace("{size: 2G}", "{size: 2G, storage: fast}")), move, fast)
    (change,) = plan_now(both, provider).actions
    assert change.action is Action.MIGRATE
    assert {f.path for f in change.fields} == {
        "node",
        "volumes.scsi0.storage",
        "volumes.scsi1.storage",
    }
    pve.requests.clear()
    run(both, provider)
    assert body_of(pve, "POST", "/qemu/500/migrate")["targetstorage"] == "local-lvm:fast"
    config = pve.vm(500).config
    assert config["scsi0"].startswith("fast:") and config["scsi1"].startswith("fast:")
    assert_silent(both, provider, pve)


def test_disks_to_grow_names_the_disks_smaller_than_wanted(desired: DesiredGraph) -> None:
    """What a clone's disks grow to: the template's 2G disk to the spec's 16G, never down."""
    want = desired.resources["guest/db-vm"].attributes
    config = {"scsi0": "local-lvm:vm-150-disk-0,size=2G", "ide2": "local-lvm:vm-150-cloudinit"}
    assert disks_to_grow("qemu", want, config) == ["scsi0"]
    assert disks_to_grow("qemu", want, {"scsi0": "local-lvm:vm-150-disk-0,size=32G"}) == []
    assert disks_to_grow("qemu", want, {}) == []


@pytest.mark.parametrize(
    ("disk", "size", "message"),
    [
        ("scsi0", "8G", "shrinking disks is not supported"),
        ("ide2", "8G", "you can't resize a cdrom"),
        ("scsi5", "8G", "disk 'scsi5' does not exist"),
    ],
)
def test_the_fake_refuses_a_resize_as_pve_does(
    converged: ProxmoxProvider, pve: Any, disk: str, size: str, message: str
) -> None:
    pve.vm(150).config["ide2"] = "local:iso/debian-12.iso,media=cdrom"
    node = converged.client.nodes("pve-core")
    upid = node.qemu(150).resize.put(disk=disk, size=size)
    assert node.tasks(upid).status.get()["exitstatus"] == message
    assert pve.vm(150).config["scsi0"] == "local-lvm:vm-150-disk-0,size=16G"
    node.tasks(node.qemu(150).resize.put(disk="scsi0", size="+2G")).status.get()
    assert pve.vm(150).config["scsi0"] == "local-lvm:vm-150-disk-0,size=18G"


def test_a_destroy_leaves_a_volume_its_config_does_not_name(
    converged: ProxmoxProvider, pve: Any
) -> None:
    """A volume named for the vmid but in no config (a disk kept from an earlier guest of that
    vmid, another cluster's on a shared storage) was never observed, listed in `destroys` nor
    proven ours: a pruned destroy of the guest leaves it (no `destroy-unreferenced-disks`)."""
    storage = converged.client.nodes("pve-core").storage("local-lvm")
    storage.content.post(vmid=150, filename="vm-150-disk-7", size="1G")
    head, rest = GUESTS.split("  db-vm:")
    gone = load_edited(PLATFORM, head + "  build-vm:" + rest.split("  build-vm:")[1])
    conv = run(gone, converged, allow_destroy=True)
    report = conv.rounds[0].report
    assert report is not None
    deleted = [r.change.address for r in report.results if r.change.action is Action.DELETE]
    assert deleted == ["guest/db-vm"]
    volumes = {v["volid"] for v in storage.content.get()}
    assert "local-lvm:vm-150-disk-7" in volumes
    assert "local-lvm:vm-150-disk-0" not in volumes  # its own disk went with it, as announced


def test_a_vms_config_is_read_as_proxmox_answers_it_with_its_pending_changes_in_one_read(
    desired: DesiredGraph, converged: ProxmoxProvider, pve: Any
) -> None:
    """Proxmox's config view applies a running VM's pending changes (`current=1` gives the
    values it runs with now; the simulator answers as qemu-server does): the observation reads
    one config per VM, never `/pending`, and still sees the change made by hand."""
    vm = converged.client.nodes("pve-core").qemu(150)
    vm.config.put(memory=1024)  # running: pending until its next start
    assert (str(vm.config.get()["memory"]), str(vm.config.get(current=1)["memory"])) == (
        "1024",
        "2048",
    )
    pve.requests.clear()
    plan = plan_now(desired, converged)
    assert [(f.path, f.before, f.after) for c in plan.actions for f in c.fields] == [
        ("memory", 1024, 2048)
    ]
    reads = [p for m, p, _ in pve.requests if m == "GET"]
    assert not [p for p in reads if p.endswith("/pending")]
    assert len([p for p in reads if p.endswith("/qemu/150/config")]) == 1
