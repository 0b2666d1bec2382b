"""Disks as Proxmox names them: a container's mount points, a VM's drives and its boot disk.

Pure rules shared by the spec (which volume keys a spec may write, `reconciler.model.spec`),
the Proxmox provider (which config keys of a VM are disks, which one it boots from, where a
migration puts them) and the planner (whether a migration can carry a VM's disks to the
storages the spec names).

A VM's drives (qemu-server `PVE/QemuServer/Drive.pm`, `valid_drive_names`) are `ide0`..`ide3`,
`sata0`..`sata5`, `scsi0`..`scsi30` and `virtio0`..`virtio15`, besides `efidisk0` and
`tpmstate0`, which hold firmware state and are no disk a spec describes. Not every drive is a
disk: a CD-ROM (`media=cdrom`, or the volume `cdrom` or `none`) and the cloud-init drive (a
volume named `vm-N-cloudinit`, attached as a CD-ROM) are not (`is_vm_disk`).

Which disk a VM boots from (qemu-server `PVE/QemuServer.pm`, `get_boot_order`): with
`boot: order=a;b;c` (PVE 6.3 and later), the first entry that is a disk; with the legacy
letters (`boot: cdn`, or no `boot` at all, which means `cdn`), when `c` is among them,
`bootdisk` or else the first disk in bus order ide, sata, scsi, virtio (`resolve_first_disk`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from reconciler.model.units import parse_kv

# A VM's drive buses, each with its first and last unit, in the order PVE looks for a disk.
VM_BUSES: Mapping[str, tuple[int, int]] = {
    "ide": (0, 3),
    "sata": (0, 5),
    "scsi": (0, 30),
    "virtio": (0, 15),
}
# A container's mount points, `mp0`..`mp255`.
MOUNT_POINTS = (0, 255)
DEFAULT_BUS = "scsi"

_KEY = re.compile(r"(?P<bus>[a-z]+)(?P<n>0|[1-9][0-9]{0,2})\Z")
_CLOUDINIT = re.compile(r"(?:^|[:/])(?:vm|base)-\d+-cloudinit(?:\.\w+)?\Z")


def split_key(key: str) -> tuple[str, int] | None:
    """`virtio1` -> ("virtio", 1); None for a key that is no drive or mount point."""
    m = _KEY.match(key)
    if m is None:
        return None
    bus, n = m["bus"], int(m["n"])
    first, last = MOUNT_POINTS if bus == "mp" else VM_BUSES.get(bus, (1, 0))
    return (bus, n) if first <= n <= last else None


def is_vm_drive_key(key: str) -> bool:
    """`scsi0`, `virtio15`, `sata5`, `ide3`: a VM drive a disk may sit on."""
    found = split_key(key)
    return found is not None and found[0] != "mp"


def boot_key(bus: str | None) -> str:
    """The drive a VM's boot disk is attached as: unit 0 of its bus (`scsi0` by default)."""
    return f"{bus or DEFAULT_BUS}0"


def is_vm_disk(value: Any) -> bool:
    """A VM drive's config value holds a disk: not a CD-ROM, not the cloud-init drive, not
    empty."""
    kv = parse_kv(str(value or ""))
    volume = kv.get("volume") or kv.get("file") or ""
    if not volume or volume in ("none", "cdrom") or kv.get("media") == "cdrom":
        return False
    return _CLOUDINIT.search(volume) is None and not volume.endswith(":cloudinit")


def vm_disks(config: Mapping[str, Any]) -> dict[str, str]:
    """A VM config's disks by drive key, in bus order (`ide0`, ..., `scsi0`, `scsi1`, ...)."""
    order = list(VM_BUSES)
    found: list[tuple[int, int, str, str]] = []
    for key, value in config.items():
        parts = split_key(key)
        if parts is None or parts[0] == "mp" or not is_vm_disk(value):
            continue
        found.append((order.index(parts[0]), parts[1], key, str(value)))
    return {key: value for _, _, key, value in sorted(found)}


def default_boot_entries(config: Mapping[str, Any]) -> list[str]:
    """The order PVE gives a VM created without one (`get_default_bootdevices`): its first
    disk, its first CD-ROM, its first NIC."""
    disks = vm_disks(config)
    order = list(VM_BUSES)
    drives = sorted(
        (order.index(parts[0]), parts[1], key)
        for key in config
        if (parts := split_key(key)) is not None and parts[0] != "mp"
    )
    cdrom = next((k for _, _, k in drives if k not in disks and _is_cdrom(config[k])), None)
    nics = sorted((int(k[3:]), k) for k in config if re.fullmatch(r"net\d+", k))
    found = [next(iter(disks), None), cdrom, nics[0][1] if nics else None]
    return [d for d in found if d]


def _is_cdrom(value: Any) -> bool:
    kv = parse_kv(str(value or ""))
    return kv.get("media") == "cdrom" or kv.get("volume") == "cdrom"


def boot_entries(config: Mapping[str, Any]) -> list[str] | None:
    """The devices of `boot: order=...`, in order; None when the config has no such list (the
    legacy letters, or no `boot`)."""
    boot = str(config.get("boot") or "")
    kv = parse_kv(boot)
    if "order" not in kv:
        return None
    return [d for d in kv["order"].split(";") if d]


def boot_disk(config: Mapping[str, Any]) -> str | None:
    """The disk a VM boots from, by drive key, or None (it boots from no disk: a network or
    CD-ROM boot, or it has no disk). See the module docstring."""
    disks = vm_disks(config)
    entries = boot_entries(config)
    if entries is not None:
        return next((d for d in entries if d in disks), None)
    kv = parse_kv(str(config.get("boot") or ""))
    letters = kv.get("legacy") or kv.get("volume") or "cdn"
    if "c" not in letters:
        return None
    named = str(config.get("bootdisk") or "")
    if named in disks:
        return named
    return next(iter(disks), None)


def with_boot_disk(config: Mapping[str, Any], disk: str | None) -> str:
    """The `boot` value that makes `disk` the disk the VM boots from (None: no disk), keeping
    what else the order lists (a CD-ROM, a NIC, other disks) where it is, less a device the
    config does not have (PVE refuses an order naming one). A config without an order starts
    from PVE's default one."""
    disks = vm_disks(config)
    entries = boot_entries(config)
    if entries is None:
        entries = default_boot_entries(config)
    entries = [d for d in entries if d in config]
    first = next((i for i, d in enumerate(entries) if d in disks), len(entries))
    rest = [d for d in entries if d != disk and not (disk is None and d in disks)]
    if disk is not None:
        rest.insert(min(first, len(rest)), disk)
    return "order=" + ";".join(rest)


def storage_map(moves: Iterable[tuple[str, str]]) -> dict[str, str] | None:
    """Where a migration puts a VM's disks, as Proxmox's `targetstorage` says it: a map from
    storage to storage, not from disk to storage. `moves`: each disk's (storage now, storage
    wanted), those that stay included. The map of the storages that change, or None when
    one storage's disks are wanted in two places (one to move, one to stay, or two targets):
    no one migration can do that."""
    targets: dict[str, set[str]] = {}
    for source, target in moves:
        targets.setdefault(source, set()).add(target)
    if any(len(t) > 1 for t in targets.values()):
        return None
    return {s: next(iter(t)) for s, t in sorted(targets.items()) if t != {s}}
