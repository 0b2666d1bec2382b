"""Import, adopt and plan round-trip every kind of guest's disks, on fakepve through the
commands: a VM without a disk (network boot), a VM booting from `virtio0`, a VM with `scsi0`
and `scsi1` beside a CD-ROM, a cloud-init drive and a detached `unused0`, two VMs of a role of
their own on virtio (the bus goes into the role's profile), two disk-less VMs (so does `none`),
and a container. `reconciler import` writes specs that validate and describe each disk where
Proxmox has it; `adopt` marks every guest; the plan then shows no change, and an apply makes
no call that changes anything.

Before VMs were read by drive key, the disk-less VM, once adopted, planned `rootfs (none) ->
8G on local-lvm`, and the virtio VM a new `scsi0`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from reconciler.cli.main import main
from reconciler.importing.writer import Base, render_specs
from reconciler.model.spec import ProxmoxApi
from reconciler.providers.proxmox import ProxmoxProvider
from tests.cli.test_live import flags
from tests.fakepve_fixtures import mutating_calls
from tests.importing.test_writer import estate, guests_of, vm

NET = "virtio=BC:24:11:00:{n:02X}:01,bridge=vmbr0,firewall=1"
CT_NET = "name=eth0,bridge=vmbr0,firewall=1,ip=10.20.0.{n}/24,gw=10.20.0.1,type=veth"


def disk(vmid: int, n: int, size: str, *more: str) -> str:
    return ",".join([f"local-lvm:vm-{vmid}-disk-{n}", *more, f"size={size}"])


# vmid -> (name, config): the VMs of the estate, as Proxmox holds them.
VMS: dict[int, tuple[str, dict[str, Any]]] = {
    1150: ("pxe-boot", {"boot": "order=net0", "net0": NET.format(n=0x50)}),
    1151: (
        "router",
        {"virtio0": disk(1151, 0, "16G"), "boot": "order=virtio0;net0", "net0": NET.format(n=0x51)},
    ),
    1152: (
        "build",
        {
            "scsihw": "virtio-scsi-single",
            "scsi0": disk(1152, 0, "32G", "iothread=1"),
            "scsi1": disk(1152, 1, "100G", "backup=0"),
            "ide0": "local:iso/debian-12.iso,media=cdrom",
            "ide2": "local-lvm:vm-1152-cloudinit,media=cdrom",
            "unused0": "local-lvm:vm-1152-disk-2",
            "boot": "order=scsi0;ide0;net0",
            "net0": NET.format(n=0x52),
        },
    ),
    300: (
        "edge-a",
        {"virtio0": disk(300, 0, "16G"), "boot": "order=virtio0", "net0": NET.format(n=3)},
    ),
    301: (
        "edge-b",
        {"virtio0": disk(301, 0, "16G"), "boot": "order=virtio0", "net0": NET.format(n=4)},
    ),
    2000: ("pxe-a", {"boot": "order=net0", "net0": NET.format(n=0x20)}),
    2001: ("pxe-b", {"boot": "order=net0", "net0": NET.format(n=0x21)}),
}
CT = (1153, "dev-ct")
NAMES = [name for name, _ in VMS.values()] + [CT[1]]


def build_estate(pve: Any) -> None:
    for vmid, (name, config) in VMS.items():
        pve.add_vm(
            vmid,
            name,
            node="pve-runtime",
            status="stopped",
            config={"cores": 2, "memory": "2048", "ostype": "l26", **config},
        )
    pve.add_ct(
        CT[0],
        CT[1],
        node="pve-runtime",
        status="stopped",
        config={
            "memory": 1024,
            "ostype": "debian",
            "unprivileged": 1,
            "rootfs": f"local-lvm:vm-{CT[0]}-disk-0,size=8G",
            "net0": CT_NET.format(n=53),
        },
    )
    pve.requests.clear()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_round_trip(
    capsys: pytest.CaptureFixture[str],
    imported: Path,
    addresses: list[str],
    pve: Any,
    api: ProxmoxApi,
) -> None:
    """Once adopted: the plan of `imported` changes none of `addresses` and has no error, and
    an apply sends Proxmox no write."""
    pve.requests.clear()
    code, out, err = run(capsys, "plan", str(imported), "--format", "json", *flags(api))
    assert code == 0, err
    plan = json.loads(out)
    changes = {c["address"]: c for c in plan["changes"] if c["address"] in addresses}
    assert {a: c["action"] for a, c in changes.items()} == dict.fromkeys(addresses, "no-op"), [
        (a, c.get("fields")) for a, c in changes.items() if c["action"] != "no-op"
    ]
    assert not [d for d in plan["diagnostics"] if d["severity"] == "error"], plan["diagnostics"]
    code, out, err = run(
        capsys, "apply", str(imported), "--auto-approve", "--color", "never", *flags(api)
    )
    assert code == 0, err + out
    assert mutating_calls(pve) == []


@pytest.fixture
def imported(
    pve: Any,
    provider: ProxmoxProvider,
    pve_api: ProxmoxApi,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> Path:
    build_estate(pve)
    out = tmp_path / "imported"
    code, _, err = run(capsys, "import", "--out", str(out), "--platform", "zpack", *flags(pve_api))
    assert code == 0, err
    pve.requests.clear()
    return out


def written(directory: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The guests and the profiles the import wrote."""
    files = {p.name: p.read_text(encoding="utf-8") for p in directory.glob("*.yaml")}
    profiles = yaml.safe_load(files.get("profiles.yaml", "{}")) or {}
    return guests_of(files), profiles.get("profiles", {})


def test_each_vms_disks_are_written_where_proxmox_has_them(imported: Path) -> None:
    guests, profiles = written(imported)
    assert guests["pxe-boot"]["disk"] == "none"
    assert "volumes" not in guests["pxe-boot"]
    # What differs from the defaults (8G on the default storage, local-lvm; scsi).
    assert guests["router"]["disk"] == {"size": "16G", "bus": "virtio"}
    build = guests["build"]
    assert build["disk"] == {"size": "32G"}  # scsi0: no bus written
    # Only the second disk is a volume: no CD-ROM, cloud-init drive or unused volume.
    assert build["volumes"] == {"scsi1": {"storage": "local-lvm", "size": "100G", "backup": False}}
    # A role of VMs only: its shared bus (or none) goes into its profile.
    assert profiles["network"]["disk"] == {"size": "16G", "bus": "virtio"}
    assert "disk" not in guests["edge-a"] and "disk" not in guests["edge-b"]
    assert profiles["monitoring"]["disk"] == "none"
    # The role that has a container too keeps each VM's bus with its VM.
    assert "disk" not in profiles.get("dev", {}) or "bus" not in profiles["dev"]["disk"]
    assert guests["dev-ct"].get("disk", {}).get("bus") is None


def test_every_guest_imports_adopts_and_then_plans_and_applies_nothing(
    imported: Path, pve_api: ProxmoxApi, pve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    addresses = [f"guest/{n}" for n in NAMES]
    adopt = ["adopt", *addresses, "--dir", str(imported), "--auto-approve"]
    code, out, err = run(capsys, *adopt, *flags(pve_api))
    assert code == 0, err + out
    for vmid in [*VMS, CT[0]]:
        config = (pve.vm(vmid) or pve.ct(vmid)).config
        assert "reconciler:v1 platform=zpack" in config["description"]
    code, out, err = run(capsys, "plan", str(imported), "--format", "json", *flags(pve_api))
    assert code == 0, err
    guests = {c["address"] for c in json.loads(out)["changes"] if c["address"].startswith("guest/")}
    assert guests == set(addresses)
    assert_round_trip(capsys, imported, addresses, pve, pve_api)
    # Nothing was added, detached or resized: every drive as it was.
    for vmid, (_, config) in VMS.items():
        have = pve.vm(vmid).config
        assert {k: have.get(k) for k in config if k != "description"} == {
            k: v for k, v in config.items() if k != "description"
        }


def test_a_vm_booting_from_a_disk_the_spec_cannot_name_is_a_note_and_drift() -> None:
    """A boot disk is unit 0 of its bus in the spec: a VM booting from scsi1 is written with
    disk: none and both disks as volumes, said in a note; its boot order is the drift an apply
    after adoption would change."""
    odd = vm(
        1160,
        "odd",
        scsi1="local-lvm:vm-1160-disk-1,size=8G",
        boot="order=scsi1;scsi0",
    )
    result = render_specs(estate(odd), Base.default("zpack"))
    assert result.ok, [str(d) for d in result.load.diagnostics] if result.load else None
    guest = guests_of(result.files)["odd"]
    assert guest["disk"] == "none"
    assert set(guest["volumes"]) == {"scsi0", "scsi1"}
    assert any("boots from scsi1, which the spec cannot name" in n for n in result.notes)
    assert result.drift == {"guest/odd": ["boot_disk"]}
