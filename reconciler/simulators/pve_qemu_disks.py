"""VM disk resize in the fake PVE: `PUT /nodes/{node}/qemu/{vmid}/resize`.

fakepve 0.5 checks the request against PVE's schema and answers with a sample UPID, but grows
nothing, so a grown disk would read back at its old size and plan again forever.
`QemuResizeApi`, mixed into `PlatformPve` (reconciler/simulators/pve.py), models it the way
fakepve builds its own areas (a `_routes_<area>` table whose handler runs after fakepve's
schema and permission checks: `VM.Config.Disk` on the VM).

It follows qemu-server `PVE/API2/Qemu.pm` (resize_vm): before the task, only `skiplock` from
anyone but root@pam (400 "Only root may use this option.") and a VM not on this node (500
"Configuration file ... does not exist"); everything else happens in a `resize` task, under
the VM's config lock, and fails the task with PVE's words: a stale `digest` ("checksum
mismatch (file change by other user?)"), a config lock ("VM is locked (backup)"), a drive the
config does not have ("disk 'scsi3' does not exist"), a drive without a volume ("disk 'ide2'
has no associated volume"), a CD-ROM ("you can't resize a cdrom"), no `Datastore.AllocateSpace`
on the volume's storage, and a smaller size ("shrinking disks is not supported"). A size with
`+` is added to the current one; the same size succeeds and changes nothing. Otherwise the
drive's `size=` becomes the new size (in PVE's spelling, `24G`) and so does its volume's in the
storage (its `avail`, where the storage has one, less the growth: no room is the storage's
"No space left on device"). A running VM's disk grows at once (PVE resizes the block device
live), not at the next start: the config is written, not the pending config.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

from fakepve.lxc import SIZE_UNITS, format_size
from fakepve.model import PveError, TaskError
from fakepve.qemu import is_cdrom, join_drive, split_drive, volume_ref
from fakepve.routing import StatefulRoutes, param_error

Handler = Callable[[dict[str, Any], str], Awaitable[Any]]

_SIZE = re.compile(r"^(\+)?(\d+(?:\.\d+)?)([KMGT])?\Z")


class QemuResizeApi(StatefulRoutes):  # type: ignore[misc]  # fakepve ships no types
    """Mixin for FakePve: a VM disk's resize (see the module docstring)."""

    def _routes_qemu_resize(self) -> list[tuple[str, str, Handler]]:
        return [("PUT", "/nodes/{node}/qemu/{vmid}/resize", self._qm_resize)]

    async def _qm_resize(self, v: dict[str, Any], user: str) -> Any:
        if v.get("skiplock") and user != "root@pam":
            raise param_error(skiplock="Only root may use this option.")
        vm = self.find(v["node"], int(v["vmid"]))
        disk, text, digest = str(v["disk"]), str(v["size"]), v.get("digest")

        async def body() -> None:
            try:
                self._rs_grow(vm, user, disk, text, digest, bool(v.get("skiplock")))
            except PveError as exc:
                raise TaskError(str(exc.message)) from exc

        return await self.task(vm.node, "resize", vm.vmid, user, body, vm=vm)

    def _rs_grow(
        self, vm: Any, user: str, disk: str, text: str, digest: Any, skiplock: bool
    ) -> None:
        """The worker's update (resize_vm's `$updatefn`), each refusal a PveError."""
        if digest and digest != vm.digest():
            raise PveError(500, "checksum mismatch (file change by other user?)")
        if not skiplock:
            self._check_lock(vm)
        value = vm.config.get(disk)
        if not value:
            raise PveError(500, f"disk '{disk}' does not exist")
        volume, props = split_drive(value)
        if not volume or volume == "none":
            raise PveError(500, f"disk '{disk}' has no associated volume")
        if is_cdrom(volume, props):
            raise PveError(500, "you can't resize a cdrom")
        sid, name = volume_ref(volume)
        self.require(user, f"/storage/{sid}", "Datastore.AllocateSpace")
        stored = self._volumes(sid).get(name) if sid else None
        size = int((stored or {}).get("size") or _bytes(props.get("size", "0")))
        found = _SIZE.match(text)
        if found is None:
            raise PveError(500, "internal error")
        new = int(float(found[2]) * SIZE_UNITS.get(found[3] or "", 1))
        if found[1]:
            new += size
        if new < size:
            raise PveError(500, "shrinking disks is not supported")
        if new == size:
            return
        store = self.storages.get(sid) or {}
        if "avail" in store:
            if new - size > store["avail"]:
                raise PveError(500, f"unable to write to storage '{sid}': No space left on device")
            store["avail"] -= new - size
        if stored is not None:
            stored["size"] = new
        props["size"] = format_size(new)
        vm.config[disk] = join_drive(volume, props)


def _bytes(text: str) -> int:
    found = _SIZE.match(text)
    if found is None:
        return 0
    return int(float(found[2]) * SIZE_UNITS.get(found[3] or "", 1))
