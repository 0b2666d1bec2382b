"""What `reconciler import` writes about the templates a VM was made from: a linked clone's
disks name its template's base volume, so it gets `clone: {from: <template>, full: false}`; a
full clone's disks are copies, and Proxmox records nothing else, so it gets no `clone`. Then
import, adopt and plan round-trip: no change, and an apply changes nothing.

On fakepve through the commands: a cloud-init template on a directory storage (qcow2, where
fakepve names a linked clone's overlay as PVE does), a linked and a full clone of it made by
hand. The volume names of the other storages are checked offline, as PVE writes them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from reconciler.importing.template_writer import clone_of, linked_template
from reconciler.model.spec import ProxmoxApi
from reconciler.providers.proxmox import ProxmoxProvider
from tests.cli.test_live import flags
from tests.importing.test_import_vm_disks import assert_round_trip, run, written
from tests.providers.vm_provisioning import NODE, TEMPLATE_VMID, make_template

LINKED, FULL = 1101, 1102


def clone_by_hand(provider: ProxmoxProvider, newid: int, name: str, full: bool) -> None:
    """`qm clone 9000 NEWID --name NAME --full 0|1`, as an operator runs it."""
    client = provider.client
    upid = client.nodes(NODE).qemu(TEMPLATE_VMID).clone.post(newid=newid, name=name, full=int(full))
    assert client.nodes(NODE).tasks(upid).status.get()["exitstatus"] == "OK"


@pytest.fixture
def imported(
    pve: Any,
    provider: ProxmoxProvider,
    pve_api: ProxmoxApi,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> Path:
    client = provider.client
    client.storage.post(storage="vmdir", type="dir", path="/mnt/vmdir", content="images")
    make_template(client, "vmdir", "qcow2")  # 9000 `debian-12-ci`, its disk base-9000-disk-0
    clone_by_hand(provider, LINKED, "dev-linked", full=False)
    clone_by_hand(provider, FULL, "dev-full", full=True)
    assert "base-9000-disk-0" in pve.vm(LINKED).config["scsi0"]
    assert "base-" not in pve.vm(FULL).config["scsi0"]
    out = tmp_path / "imported"
    code, _, err = run(capsys, "import", "--out", str(out), "--platform", "zpack", *flags(pve_api))
    assert code == 0, err
    pve.requests.clear()
    return out


def test_a_linked_clone_names_its_template_and_a_full_clone_nothing(imported: Path) -> None:
    guests, _ = written(imported)
    assert guests["dev-linked"]["clone"] == {"from": "debian-12-ci", "full": False}
    assert "clone" not in guests["dev-full"]
    text = (imported / "dev.yaml").read_text(encoding="utf-8")
    # Written where a guest's `template` goes: after its profile, before its state.
    linked = text[text.index("dev-linked:") :]
    assert linked.index("profile:") < linked.index("clone:") < linked.index("state:")
    # A VM template is a guest, not a file: no `templates:` entry for it.
    assert "templates:" not in (imported / "platform.yaml").read_text(encoding="utf-8")


def test_clones_import_adopt_and_then_plan_and_apply_nothing(
    imported: Path, pve_api: ProxmoxApi, pve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    addresses = ["guest/dev-full", "guest/dev-linked"]
    code, out, err = run(
        capsys, "adopt", *addresses, "--dir", str(imported), "--auto-approve", *flags(pve_api)
    )
    assert code == 0, err + out
    assert_round_trip(capsys, imported, addresses, pve, pve_api)


@pytest.mark.parametrize(
    ("volume", "template"),
    [
        ("local-lvm:base-9000-disk-0/vm-500-disk-0,size=16G", 9000),  # LVM-thin
        ("local-zfs:base-9000-disk-0/vm-500-disk-0,size=16G", 9000),  # ZFS
        ("ceph:base-9123-disk-1/vm-500-disk-1,size=16G", 9123),  # RBD
        ("local:9000/base-9000-disk-0.qcow2/500/vm-500-disk-0.qcow2,size=16G", 9000),  # dir
        ("local-lvm:vm-500-disk-0,size=16G", None),  # a full clone's copy, or no clone
        ("local-lvm:base-9000-disk-0,size=2G", None),  # a template's own base volume
        ("local:iso/base-9000-disk-0/x.iso,media=cdrom", None),  # a CD-ROM names nothing
    ],
)
def test_the_template_is_read_from_the_volume_names_pve_writes(
    volume: str, template: int | None
) -> None:
    assert linked_template({"scsi0": volume}) == template


def test_a_template_name_the_spec_cannot_use_is_written_as_its_vmid() -> None:
    config = {"scsi0": "local-lvm:base-9000-disk-0/vm-500-disk-0"}
    one = [{"vmid": 9000, "name": "debian-12-ci"}]
    two = [*one, {"vmid": 9001, "name": "debian-12-ci"}]  # two templates share the name
    assert clone_of("qemu", config, one) == {"from": "debian-12-ci", "full": False}
    assert clone_of("qemu", config, two) == {"from": 9000, "full": False}
    assert clone_of("qemu", config, []) == {"from": 9000, "full": False}  # not listed
    assert clone_of("lxc", {"rootfs": "local-lvm:base-9000-disk-0/vm-500-disk-0"}, one) is None
