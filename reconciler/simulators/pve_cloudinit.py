"""A VM's cloud-init drive and its guest agent in the fake PVE: what qemu-server does with them,
and what a cloud image does at boot.

fakepve 0.5 answers `GET`/`PUT /nodes/{node}/qemu/{vmid}/cloudinit` from its schema, storing
nothing, and its guest agent answers only for a VM a test gave one (`vm.agent`). Two mixins,
added to `PlatformPve` (reconciler/simulators/pve.py), built the way fakepve builds its areas
(a `_routes_<area>` table whose handlers run after fakepve's schema and permission checks):

`CloudInitApi` follows qemu-server (`PVE/API2/Qemu.pm` cloudinit_pending and cloudinit_update,
`PVE/QemuServer/Cloudinit.pm`): the drive holds the cloud-init settings it was generated from
(`ciuser`, `cipassword`, `sshkeys`, `nameserver`, `searchdomain`, `cicustom`, `citype`,
`ciupgrade`, each `ipconfigN`, and `name`, the guest's host name). `PUT .../cloudinit`
regenerates it from the config (a locked VM: 500 "VM is locked (...)"; a VM without a
cloud-init drive: nothing happens), and so does every start (vm_start generates it before the
VM runs). `GET .../cloudinit` lists each setting as qemu-server does: `value` as the drive
holds it, `pending` when the config says otherwise, `delete: 1` when the config no longer has
it; a password shows as `**********`. fakepve keeps a running VM's changes in `pending`
(qemu-server applies cloud-init keys at once): the config the drive is compared with, and
generated from, is the config with its pending values.

Its drive's volume is named as qemu-server names it, `vm-N-cloudinit` (fakepve gives it the
next `vm-N-disk-K`), and a clone gets its own (fakepve's clone points at the template's).

`GuestAgentBoot` stands for a cloud image with qemu-guest-agent installed: when a VM whose
config enables the agent (`agent: 1`, `enabled=1,...`) is started, its agent runs, answering
with `agent_answers[vmid]` (fakepve's `vm.agent` overrides: `{"interfaces": [...]}`) or
fakepve's defaults. `agent_boots = False` (on the class or the instance) models an image
without one: the agent never answers. A VM given an agent by a test keeps it.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from fakepve.qemu import drives_of, is_cdrom, join_drive, split_drive, volume_ref
from fakepve.routing import StatefulRoutes

Handler = Callable[[dict[str, Any], str], Awaitable[Any]]

# qemu-server's cloud-init options (PVE::QemuServer `$confdesc_cloudinit`, and `name`).
_CLOUD_INIT = (
    "cicustom",
    "cipassword",
    "citype",
    "ciuser",
    "ciupgrade",
    "nameserver",
    "searchdomain",
    "sshkeys",
    "name",
)
_IPCONFIG = re.compile(r"ipconfig\d+")
_MASKED = "**********"
# qemu-server's drive_is_cloudinit: a volume named `cloudinit` or `vm-N-cloudinit`.
_CLOUDINIT = re.compile(r"[:/](?:vm-\d+-)?cloudinit(?:\.(?:raw|qcow2|vmdk))?\Z")
_CLOUD_INIT_SIZE = 4 * 1024 * 1024  # bytes, as qemu-server allocates the drive
_TRUE = ("1", "true", "yes", "on")


def _current(vm: Any) -> dict[str, Any]:
    """The VM's config with its pending values (see the module docstring)."""
    config = dict(vm.config)
    for key, value in vm.pending.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    return config


def _settings(config: Mapping[str, Any]) -> dict[str, str]:
    return {
        k: str(v)
        for k, v in config.items()
        if (k in _CLOUD_INIT or _IPCONFIG.fullmatch(k)) and v is not None
    }


def has_cloud_init_drive(config: Mapping[str, Any]) -> bool:
    """A drive whose volume is the VM's cloud-init image (`vm-N-cloudinit`, as a CD-ROM)."""
    return any(
        _CLOUDINIT.search(volume) is not None and is_cdrom(volume, props)
        for _key, volume, props in drives_of(config)
    )


class CloudInitApi(StatefulRoutes):  # type: ignore[misc]  # fakepve ships no types
    """Mixin for FakePve: a VM's cloud-init drive (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # vmid -> the settings the VM's cloud-init drive was last generated from.
        self.cloud_init_images: dict[int, dict[str, str]] = {}

    def _routes_qemu_cloudinit(self) -> list[tuple[str, str, Handler]]:
        one = "/nodes/{node}/qemu/{vmid}/cloudinit"
        return [("GET", one, self._ci_pending), ("PUT", one, self._ci_update)]

    def generate_cloud_init(self, vm: Any) -> bool:
        """Write the VM's cloud-init drive from its config; False without a drive."""
        config = _current(vm)
        if not has_cloud_init_drive(config):
            return False
        self.cloud_init_images[vm.vmid] = _settings(config)
        return True

    async def _ci_update(self, v: dict[str, Any], user: str) -> None:
        vm = self.find(v["node"], int(v["vmid"]))
        self._check_lock(vm)
        self.generate_cloud_init(vm)
        return None

    async def _ci_pending(self, v: dict[str, Any], user: str) -> list[dict[str, Any]]:
        vm = self.find(v["node"], int(v["vmid"]))
        config = _current(vm)
        now = _settings(config)
        if not has_cloud_init_drive(config):
            image = dict(now)  # nothing generated, nothing pending: as PVE lists it
        else:
            image = self.cloud_init_images.get(vm.vmid, {})

        def shown(key: str, value: str) -> str:
            return _MASKED if key == "cipassword" else value

        out: list[dict[str, Any]] = []
        for key in sorted(set(now) | set(image)):
            if key in now and key not in image:
                out.append({"key": key, "pending": shown(key, now[key])})
            elif key not in now:
                out.append({"key": key, "delete": 1})
            elif now[key] != image[key]:
                out.append(
                    {"key": key, "value": shown(key, image[key]), "pending": shown(key, now[key])}
                )
            else:
                out.append({"key": key, "value": shown(key, now[key])})
        return out

    # --- the drive's volume, as qemu-server names it ----------------------------------------

    def _ci_rename(self, volid: str, vmid: int) -> str:
        """A volume just allocated, renamed as qemu-server names a cloud-init drive's:
        `vm-N-cloudinit` (on a file storage in the VM's directory, with its extension)."""
        sid, _, name = volid.partition(":")
        volumes = self.storages[sid].setdefault("volumes", {})
        head, _, file = name.rpartition("/")
        ext = file.rsplit(".", 1)[1] if "." in file else ""
        new = f"vm-{vmid}-cloudinit" + (f".{ext}" if ext else "")
        new = f"{head}/{new}" if head else new
        volumes[new] = volumes.pop(name)
        return f"{sid}:{new}"

    def _qm_new_drive(
        self, vmid: int, key: str, value: str, default: str | None
    ) -> tuple[str, list[str]]:
        out, made = super()._qm_new_drive(vmid, key, value, default)
        if split_drive(value)[0].endswith(":cloudinit") and made:
            volid = self._ci_rename(made[0], vmid)
            return str(out).replace(made[0], volid, 1), [volid]
        return out, made

    async def _qm_clone(self, v: dict[str, Any], user: str) -> Any:
        """A clone gets a cloud-init drive of its own (qemu-server's clone_disk makes a new
        `vm-N-cloudinit`), not the template's: destroying the clone must not free that."""
        upid = await super()._qm_clone(v, user)
        new = self.vm(int(v["newid"]))
        for key, volume, props in drives_of(new.config) if new is not None else ():
            if not (is_cdrom(volume, props) and _CLOUDINIT.search(volume)):
                continue
            sid = volume_ref(volume)[0]
            if sid is None or f"vm-{new.vmid}-cloudinit" in volume:
                continue
            volid, _fmt = self._qm_alloc(sid, new.vmid, None, _CLOUD_INIT_SIZE)
            new.config[key] = join_drive(self._ci_rename(volid, new.vmid), props)
        return upid

    async def _do_start(self, vm: Any, user: str, p: dict[str, Any]) -> Any:
        # vm_start generates the drive before QEMU runs; a failed start leaves it generated.
        if not vm.template and vm.status != "running":
            self.generate_cloud_init(vm)
        return await super()._do_start(vm, user, p)


def agent_enabled(config: Mapping[str, Any]) -> bool:
    """`agent: 1` or `enabled=1,...`."""
    first, *rest = str(config.get("agent") or "0").split(",")
    props = dict(part.split("=", 1) for part in rest if "=" in part)
    enabled = first.split("=", 1)[1] if first.startswith("enabled=") else first
    return str(props.get("enabled", enabled)).lower() in _TRUE


class GuestAgentBoot:
    """Mixin for FakePve: a started VM with the agent enabled runs one (see the module
    docstring)."""

    agent_boots = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # vmid -> the answers its agent gives (fakepve's `vm.agent` overrides).
        self.agent_answers: dict[int, dict[str, Any]] = {}

    async def _do_start(self, vm: Any, user: str, p: dict[str, Any]) -> Any:
        upid = await super()._do_start(vm, user, p)  # type: ignore[misc]
        if self.agent_boots and vm.agent is None and agent_enabled(_current(vm)):
            answers = dict(self.agent_answers.get(vm.vmid, {}))
            interfaces = configured_interfaces(_current(vm))
            if interfaces and "interfaces" not in answers:
                answers["interfaces"] = interfaces  # what cloud-init configured, as booted
            vm.agent = answers
        return upid


def configured_interfaces(config: dict[str, Any]) -> list[dict[str, Any]]:
    """`network-get-interfaces` of a cloud image that booted with this config: loopback, then
    one interface per `netN` with the static address its `ipconfigN` gave (none for dhcp:
    what a DHCP server would hand out is not the fake's to invent)."""
    found: list[dict[str, Any]] = []
    for key in sorted(k for k in config if k.startswith("ipconfig") and k[8:].isdigit()):
        n = key[8:]
        fields = dict(part.split("=", 1) for part in str(config[key]).split(",") if "=" in part)
        ip = fields.get("ip", "")
        if "/" not in ip:
            continue
        address, prefix = ip.split("/", 1)
        mac = next(
            (
                v.split("=", 1)[1]
                for v in str(config.get(f"net{n}", "")).split(",")
                if "=" in v and ":" in v.split("=", 1)[1]
            ),
            "bc:24:11:00:00:01",
        )
        found.append(
            {
                "name": f"eth{n}",
                "hardware-address": mac.lower(),
                "ip-addresses": [
                    {"ip-address": address, "ip-address-type": "ipv4", "prefix": int(prefix)}
                ],
            }
        )
    if not found:
        return []
    loopback = {
        "name": "lo",
        "hardware-address": "00:00:00:00:00:00",
        "ip-addresses": [{"ip-address": "127.0.0.1", "ip-address-type": "ipv4", "prefix": 8}],
    }
    return [loopback, *found]
