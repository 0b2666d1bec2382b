"""fakepve with the parts the platform needs and fakepve 0.5 lacks: QEMU migration and backups.

fakepve (PyPI, AGPL-3.0, a third party's fake Proxmox VE) is used unmodified: `PlatformPve`
stacks two more mixins on its `FakePve`, built the way fakepve builds its own areas (a
`_routes_<area>` table of `(method, schema path template, handler)`, registered in front of
its generic handler, which would otherwise answer `POST .../qemu/{vmid}/migrate` with a sample
UPID and move nothing): QEMU migration (here) and backups (`BackupApi` from
reconciler/simulators/pve_backup.py: jobs, vzdump, backup volumes, restore, the scheduler; see
its docstring), and template downloads that verify their checksum (`TemplateDownloadApi` from
reconciler/simulators/pve_templates.py), and VM disk resize (`QemuResizeApi` from
reconciler/simulators/pve_qemu_disks.py). Served by the tests' `fakepve` fixture
(tests/fakepve_fixtures.py) and, through `python -m reconciler.simulators.pve` (fakepve's own
CLI serving this class), by `FakePveProcess` for the demo, the benchmarks and the process
tests. Imported only where a fake runs: fakepve is a test and demo dependency.

`POST /nodes/{node}/qemu/{vmid}/migrate` follows qemu-server, `PVE/API2/Qemu.pm` (migrate_vm),
`PVE/QemuMigrate.pm` (prepare, scan_local_volumes, phase1) and pve-guest-common
`PVE/AbstractMigrate.pm` (migrate: the task's locks, log and exit status):

- before any task (HTTP errors): `target` equal to the node -> 400 "target is local node.";
  no quorum; an unknown target -> 500 "no such cluster node 'X'"; `force`, `migration_type`,
  `migration_network` from anyone but root@pam -> 400 "Only root may use this option."; no
  config on this node -> 500 "Configuration file ... does not exist"; a config lock -> 500
  "VM is locked (backup)"; a running VM without `online` -> 500 "can't migrate running VM
  without --online" (a stopped one migrates offline whatever `online` says); `targetstorage`
  (a storage map: `target`, `source:target,...`, or `1` for the same ids) whose targets are
  not enabled on the target node or do not take VM images -> 500; without a map, every disk's
  storage must be enabled on the target (check_storage_availability);
- an HA-managed VM gets a `hamigrate` task that only queues the request ("Requesting HA
  migration for VM N to node T") and ends; `ha_delay` PVE seconds later the HA manager runs
  the migration itself (pve-ha-manager `Resources/PVEVM.pm` migrate: `online` when running,
  `with-local-disks=1`, `force=1`);
- otherwise a `qmigrate` task on the source node that holds the config file lock for its
  whole run (AbstractMigrate takes lock_config around every phase, so config writes meanwhile
  fail with "can't lock file"), checks the config lock again (prepare: "migration aborted",
  the log saying "VM is locked (...)") and sets `lock: migrate` in the config (phase1). It scans the
  disks: a local one attached to a running VM needs `with-local-disks` ("can't live migrate
  attached local disks without with-local-disks option"); a local ISO ("local cdrom image"),
  a disk another VM owns, snapshots on storage that cannot carry them, or a storage type that
  cannot migrate abort it. An aborted scan ends the task "migration aborted", the log
  explaining why, the lock cleared and the VM where it was (phase1_cleanup);
- the migration takes `migrate_secs` PVE seconds (scaled by `time_scale`), then the VM lives
  on the target, running again if it ran (an online migration never stops it). Disks keep
  their volume ids: fakepve's storage is one for the whole cluster, so a local volume "copied"
  to the same storage id on the target is the same volume. A disk mapped to another storage
  moves there (allocated under the next free name, as storage_migrate does with renaming
  allowed) and its old volume is freed.

Containers: fakepve's own LXC migrate is kept; `PlatformPve` only gives its task the same
duration (`ct_secs['migrate']`). A known gap of fakepve's: it accepts `target-storage` and
ignores it (on PVE the container's volumes move to that storage, under new volume ids).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import fakepve.__main__ as fakepve_cli
from aiohttp import web
from fakepve.lxc import volume_owner
from fakepve.model import PveError, TaskError
from fakepve.qemu import drives_of, is_cdrom, join_drive, split_drive, volume_ref
from fakepve.routing import StatefulRoutes, die, param_error, split_list
from fakepve.server import FakePve
from fakepve.storage import _is_file

from reconciler.simulators.pve_backup import BACKUP_SECS, BackupApi
from reconciler.simulators.pve_cloudinit import CloudInitApi, GuestAgentBoot
from reconciler.simulators.pve_ha import HaApi
from reconciler.simulators.pve_notifications import NotificationApi
from reconciler.simulators.pve_qemu_disks import QemuResizeApi
from reconciler.simulators.pve_templates import TemplateDownloadApi

# PVE seconds a migration holds its lock: enough for a test to see it, nothing at time scale 0.
MIGRATE_SECS = 10.0
# Storage types whose local volumes QemuMigrate can move (scan_local_volumes).
_MIGRATABLE = ("dir", "btrfs", "zfspool", "lvmthin", "lvm")
_ROOT_ONLY = ("force", "migration_type", "migration_network")

Handler = Callable[[dict[str, Any], str], Awaitable[Any]]


def _stamp() -> str:
    """AbstractMigrate prefixes every log line with the local time."""
    return time.strftime("%Y-%m-%d %H:%M:%S")


def _duration(seconds: float) -> str:
    whole = int(seconds)
    return f"{whole // 3600:02d}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def _generated(volume: str, props: dict[str, str]) -> bool:
    """A cloud-init drive PVE generates (a CD-ROM named vm-N-cloudinit): migrated, not copied."""
    name = volume_ref(volume)[1]
    return is_cdrom(volume, props) and re.search(r"vm-\d+-cloudinit", name) is not None


def parse_storage_map(text: str) -> tuple[dict[str, str], str | None, bool]:
    """pve-common PVE::JSONSchema::parse_idmap for `targetstorage`: (source -> target entries,
    the default target, identity). `1` maps every storage to itself; a bare id is the default.
    Its errors come back as Qemu.pm's "failed to parse storage map"."""

    def fail(why: str) -> PveError:
        return param_error(targetstorage=f"failed to parse storage map: {why}")

    entries: dict[str, str] = {}
    default: str | None = None
    identity = False
    for item in split_list(text):
        if item == "1":
            identity = True
        elif ":" in item:
            source, _, target = item.partition(":")
            if source in entries:
                raise fail(f"duplicate mapping for source '{source}'")
            entries[source] = target
        elif default is not None:
            raise fail("default target ID can only be provided once")
        else:
            default = item
    if identity and (entries or default):
        raise fail("identity mapping cannot be combined with other mappings")
    return entries, default, identity


class QemuMigrateApi(StatefulRoutes):  # type: ignore[misc]  # fakepve ships no types
    """Mixin for FakePve: `POST /nodes/{node}/qemu/{vmid}/migrate` (see the module docstring)."""

    migrate_secs = MIGRATE_SECS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._mg_jobs: set[asyncio.Future[None]] = set()

    def _routes_qemu_migrate(self) -> list[tuple[str, str, Handler]]:
        return [("POST", "/nodes/{node}/qemu/{vmid}/migrate", self._qm_migrate)]

    # --------------------------------------------------------------- checks

    def _mg_node_ip(self, node: str) -> str:
        """The address /cluster/status gives the node in fakepve."""
        return f"192.0.2.{10 + sorted(self.nodes).index(node) + 1}"

    def _mg_storage_access(self, user: str, sid: str, target: str) -> None:
        """Qemu.pm check_storage_access_migrate: enabled on the target, the user may allocate
        there, and it takes VM images."""
        store = self._check_enabled(sid, target)
        self.require(user, "/storage/" + sid, "Datastore.AllocateSpace")
        if "images" not in split_list(store.get("content")):
            raise die(f"storage '{sid}' does not support vm images")

    def _mg_storage_available(self, vm: Any, target: str) -> None:
        """QemuServer::check_storage_availability: every disk's storage is enabled here and on
        the target, and takes the disk's content."""
        for _key, volume, props in drives_of(vm.config):
            sid, _name = volume_ref(volume)
            if sid is None:
                continue
            store = self._check_enabled(sid, vm.node)
            self._check_enabled(sid, target)
            vtype = "iso" if is_cdrom(volume, props) else "images"
            if vtype not in split_list(store.get("content")):
                raise die(f"{volume}: content type '{vtype}' is not available on storage '{sid}'")

    def _mg_target_sid(self, sid: str, storemap: tuple[dict[str, str], str | None, bool]) -> str:
        """PVE::JSONSchema::map_id: where a local volume of `sid` goes."""
        entries, default, _identity = storemap
        return entries.get(sid) or default or sid

    def _mg_scan(
        self, vm: Any, target: str, running: bool, local_disks: bool, storemap: Any
    ) -> tuple[dict[str, str], list[str], list[str]]:
        """QemuMigrate::scan_local_volumes: (local volume -> its storage on the target, info
        lines, errors). Volumes on shared storage stay as they are."""
        moves: dict[str, str] = {}
        info: list[str] = []
        errors: list[str] = []
        in_snapshots = {v for snap in vm.snapshots.values() for _k, v, _p in drives_of(snap)}
        for key, volume, props in self._mg_drives(vm):
            if volume in ("none", ""):
                continue
            placed = self._mg_placement(volume, props, target, storemap)
            if isinstance(placed, str):
                errors.append(placed)
                continue
            store, dest = placed
            if store.get("shared"):
                continue
            if _generated(volume, props):
                info.append(f"found generated disk '{volume}' (in current VM config)")
                moves[volume] = dest
                continue
            attached = not key.startswith("unused")
            live_attached = attached and running and not local_disks
            problem = self._mg_local_problem(
                vm, volume, props, store, running, live_attached, in_snapshots
            )
            if problem:
                errors.append(problem)
                continue
            info.append(f"found local disk '{volume}' ({'attached' if attached else 'unused'})")
            moves[volume] = dest
        return moves, info, errors

    @staticmethod
    def _mg_drives(vm: Any) -> list[tuple[str, str, dict[str, str]]]:
        """The VM's drives, then its unused volumes."""
        drives = list(drives_of(vm.config))
        drives += [
            (k, split_drive(vm.config[k])[0], {})
            for k in sorted(vm.config)
            if re.fullmatch(r"unused\d+", k)
        ]
        return drives

    def _mg_placement(
        self, volume: str, props: dict[str, str], target: str, storemap: Any
    ) -> tuple[dict[str, Any], str] | str:
        """Where a drive's volume goes: (its storage's config, the storage id on the target),
        or the error that stops the migration (not a storage volume, a storage missing or not
        enabled on the target, or one that does not take the volume's content)."""
        if volume == "cdrom":
            return "can't migrate local cdrom drive"
        refuse = f"can't migrate local disk '{volume}': "
        sid, _name = volume_ref(volume)
        if sid is None:
            return refuse + "local file/device"
        store: dict[str, Any] | None = self.storages.get(sid)
        if store is None:
            return refuse + f"storage '{sid}' does not exist"
        dest = self._mg_target_sid(sid, storemap) if storemap and not store.get("shared") else sid
        cdrom = is_cdrom(volume, props)
        vtype = "iso" if cdrom and not _generated(volume, props) else "images"
        try:
            dest_store = self._check_enabled(dest, target)
        except PveError as exc:
            return refuse + str(exc.message)
        if vtype not in split_list(dest_store.get("content")):
            return refuse + f"{volume}: content type '{vtype}' is not available on storage '{dest}'"
        return store, dest

    def _mg_local_problem(
        self,
        vm: Any,
        volume: str,
        props: dict[str, str],
        store: dict[str, Any],
        running: bool,
        live_attached: bool,
        in_snapshots: set[str],
    ) -> str | None:
        """Why a local volume (not on shared storage, not generated) cannot move, or None:
        a local ISO, another VM's disk, snapshots the storage cannot carry, an attached disk of
        a running VM without `with-local-disks` (`live_attached`), a storage type that cannot
        migrate."""
        refuse = f"can't migrate local disk '{volume}': "
        _sid, name = volume_ref(volume)
        if is_cdrom(volume, props):
            return refuse + "local cdrom image"
        owner = volume_owner(name)
        if owner != vm.vmid:
            return refuse + f"owned by other VM (owner = VM {owner})"
        if volume in in_snapshots:
            if running:
                return refuse + (
                    "online storage migration not possible if non-replicated snapshot exists"
                )
            if store.get("type") != "zfspool" and not name.endswith(".qcow2"):
                return refuse + "non-migratable snapshot exists"
        if live_attached:
            return (
                refuse + "can't live migrate attached local disks without with-local-disks option"
            )
        if store.get("type") not in _MIGRATABLE:
            return f"can't migrate '{volume}' - storage type '{store.get('type')}' not supported"
        return None

    # ---------------------------------------------------------------- route

    async def _qm_migrate(self, v: dict[str, Any], user: str) -> Any:
        node, target, vmid = v["node"], v["target"], int(v["vmid"])
        if target == node:
            raise param_error(target="target is local node.")
        self.need_quorum()
        if target not in self.nodes:
            raise die(f"no such cluster node '{target}'")
        for option in _ROOT_ONLY:
            if v.get(option) and user != "root@pam":
                raise param_error(**{option: "Only root may use this option."})
        vm = self.find(node, vmid)
        self._check_lock(vm)
        online = bool(v.get("online"))
        if vm.status == "running" and not online:
            raise die("can't migrate running VM without --online")
        if vm.status != "running":
            online = False  # "VM isn't running. Doing offline migration instead."
        storemap = None
        if v.get("targetstorage"):
            storemap = parse_storage_map(str(v["targetstorage"]))
            entries, default, identity = storemap
            if not identity:
                self._qm_perm(user, vmid, None, "VM.Config.Disk")
            for sid in sorted({*entries.values(), *([default] if default else [])}):
                self._mg_storage_access(user, sid, target)
            if identity:
                self._mg_storage_available(vm, target)
        else:
            self._mg_storage_available(vm, target)
        if vm.ha_managed:
            return await self._mg_ha_request(vm, target, user)
        return await self._mg_start(
            vm, target, user, online, bool(v.get("with-local-disks")), storemap
        )

    async def _mg_ha_request(self, vm: Any, target: str, user: str) -> Any:
        """The API only queues the request with the HA manager; its LRM migrates later, online
        when the VM runs, with its local disks."""

        async def request() -> None:
            async def later() -> None:
                await self.pause(self.ha_delay)
                try:
                    self._check_lock(vm)
                    await self._mg_start(vm, target, "root@pam", vm.status == "running", True, None)
                except PveError:
                    pass  # the HA manager logs it and tries again; the fake gives up

            if self.time_scale:
                job = asyncio.ensure_future(later())
                self._mg_jobs.add(job)  # held until done: the loop keeps only a weak reference
                job.add_done_callback(self._mg_jobs.discard)
            else:
                await later()

        return await self.task(
            vm.node,
            "hamigrate",
            vm.vmid,
            user,
            request,
            lock=False,
            log=[f"Requesting HA migration for VM {vm.vmid} to node {target}"],
        )

    def _mg_log(self, vmid: int) -> list[str]:
        """The log of the VM's running qmigrate task: one runs at a time (the config lock)."""
        for record in reversed(self.tasklog):
            if (record["type"], record["id"], record["status"]) == (
                "qmigrate",
                str(vmid),
                "running",
            ):
                log: list[str] = record["log"]
                return log
        return []

    async def _mg_start(
        self, vm: Any, target: str, user: str, online: bool, local_disks: bool, storemap: Any
    ) -> Any:
        """The qmigrate task (AbstractMigrate::migrate): prepare, phase1 with its volume scan,
        the transfer, then the VM lives on the target."""
        source = vm.node
        running = vm.status == "running" and online
        started = time.monotonic()

        async def body() -> str:
            log = self._mg_log(vm.vmid)

            def say(line: str, error: bool = False) -> None:
                log.append(f"{_stamp()} {'ERROR: ' if error else ''}{line}")

            def abort(why: str) -> TaskError:
                took = _duration(time.monotonic() - started)
                say(f"migration aborted (duration {took}): {why}", error=True)
                return TaskError("migration aborted")

            if vm.lock:  # prepare: check_lock
                raise abort(f"VM is locked ({vm.lock})")
            say(
                f"starting migration of VM {vm.vmid} to node '{target}' "
                f"({self._mg_node_ip(target)})"
            )
            self._qm_lock(vm, "migrate")  # phase1
            try:
                moves, info, errors = self._mg_scan(vm, target, running, local_disks, storemap)
                for line in info + errors:
                    say(line)
                if errors:
                    why = "Problem found while scanning volumes - can't migrate VM - check log"
                    say(why, error=True)  # phase1 fails; phase1_cleanup clears the lock
                    raise abort(why)
                await self.pause(self.migrate_secs)
                for key, volume, props in drives_of(vm.config):
                    if volume in moves:
                        vm.config[key] = join_drive(self._mg_move(vm, volume, moves[volume]), props)
                for key in sorted(vm.config):
                    if re.fullmatch(r"unused\d+", key):
                        volume = split_drive(vm.config[key])[0]
                        if volume in moves:
                            vm.config[key] = self._mg_move(vm, volume, moves[volume])
                vm.node = target
                if running:
                    vm.started_at = time.time()
            finally:
                self._qm_lock(vm, None)
            took = _duration(time.monotonic() - started)
            return f"{_stamp()} migration finished successfully (duration {took})"

        return await self.task(source, "qmigrate", vm.vmid, user, body, vm=vm)

    def _mg_move(self, vm: Any, volume: str, dest: str) -> str:
        """A local volume on the target: the same one when its storage id stays (fakepve's
        storage spans the cluster), else allocated on `dest` and the old one freed."""
        sid, name = volume_ref(volume)
        if sid == dest:
            return volume
        vol = self._volumes(sid).get(name) or {}
        fmt = vol.get("format") if _is_file(self.storages[dest]) else None
        new, _fmt = self._qm_alloc(dest, vm.vmid, fmt, int(vol.get("size") or 0))
        self._qm_free(volume)
        return str(new)


class QemuConfigView:
    """`GET /nodes/{node}/qemu/{vmid}/config` as qemu-server answers it: the config with its
    pending changes applied (a value pending, a key pending deletion gone), what the VM runs
    with after its next start; `current=1` for the values it runs with now. fakepve answers the
    current values only, so a client would need a second read (`/pending`) per VM that a real
    cluster never asks for."""

    async def _config_get(self, request: Any) -> Any:
        answer = await super()._config_get(request)  # type: ignore[misc]
        if request.query.get("current") in ("1", "true") or answer.status != 200:
            return answer
        vm = self._vm(request, "VM.Audit")  # type: ignore[attr-defined]
        config = json.loads(answer.text)["data"]
        for key, value in vm.pending.items():
            if value is None:
                config.pop(key, None)
            else:
                config[key] = str(value) if key == "memory" else value
        return web.json_response({"data": config})


class PlatformPve(  # fakepve ships no types
    GuestAgentBoot,
    CloudInitApi,
    TemplateDownloadApi,
    BackupApi,
    HaApi,
    NotificationApi,
    QemuMigrateApi,
    QemuResizeApi,
    QemuConfigView,
    FakePve,  # type: ignore[misc]
):
    """fakepve's FakePve plus backups and QEMU migration; container migrations take as long."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ct_secs["migrate"] = self.migrate_secs

    def check_password(self, user: str, password: str) -> bool:
        """As PVE's `POST /access/ticket` (PVE::API2::AccessControl, create_ticket): a valid,
        unexpired ticket of the same user is accepted as the password, which is how a client
        renews its ticket before the two hours run out (proxmoxer does after one)."""
        session = self.tickets.get(password) if str(password).startswith("PVE:") else None
        if session is not None and session["user"] == user:
            return bool(session["expires"] > time.time())
        return bool(super().check_password(user, password))


def main(argv: Sequence[str] | None = None) -> None:
    """fakepve's own CLI serving PlatformPve. Options of ours: `--migrate-secs` (PVE seconds a
    migration takes), `--backup-secs` (PVE seconds one guest's backup takes),
    `--backup-scheduler` (run due backup jobs while serving, as pvescheduler does; off by
    default); everything else is fakepve's."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--migrate-secs", type=float, default=MIGRATE_SECS)
    parser.add_argument("--backup-secs", type=float, default=BACKUP_SECS)
    parser.add_argument("--backup-scheduler", action="store_true")
    ours, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)

    class Served(PlatformPve):
        migrate_secs = ours.migrate_secs
        backup_secs = ours.backup_secs
        backup_scheduler = ours.backup_scheduler

    fakepve_cli.FakePve = Served
    sys.argv = [f"{sys.argv[0]} (reconciler.simulators.pve)", *rest]
    fakepve_cli.main()


if __name__ == "__main__":
    main()
