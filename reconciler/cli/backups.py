"""`reconciler backup`, `reconciler backups` and `reconciler restore`: backups by hand, of the
guests the specs describe. `reconciler.cli.main` registers them with `add_backup_commands`.

    reconciler backup GUEST... [--storage S] [--dir SPECS] [connection flags]
    reconciler backups [GUEST...] [--storage S]... [--format table|json] [--dir SPECS] [...]
    reconciler restore GUEST [SPECS] [--latest | --from VOLID | --at TIME] [--storage S] [--yes]
        [--dry-run] [--dir SPECS] [connection flags]

The spec directory is `--dir SPECS` (`spec_dir_args`); `restore` also takes it after its GUEST.
`backup` and `backups` take a list of guests, which a directory could not be told apart from,
so only the flag. `--color` colors the specs' diagnostics, the listing's header and restore's
plan.

A GUEST is a spec guest's name. Each is acted on only while it exists and carries our mark
(`ProxmoxProvider`'s ownership rules); a name outside the spec, a vmid held by a guest without
our mark (or a copy's), a backup of another guest, an unknown volume or a time before any
backup is refused with one line naming why, exit 2, before anything is changed.

- `backup`: one `vzdump` per guest, on its node, waited for (`ProxmoxProvider.backup_now`, the
  same path as the final backup before a destroy), to the storage of the job that selects it
  (`--storage` overrides; neither: refused) with that job's mode, compression and notes. One
  line per guest as it starts, then done (the new volume and its size) or failed (the task's
  error). Exit 0 all made, 1 any failed.
- `backups`: the backups on the storages the spec's jobs use (one content listing per storage
  and node, once for a shared one: `BackupJobProvider.observe_backups`), named by the spec
  guest whose vmid they hold; newest first per guest. JSON documented in its `--help`.
- `restore`: one guest of ours overwritten in place by one of its backups: shown (the backup,
  its age, the disks it overwrites), confirmed (a terminal, or `--yes`), under the service's
  leader lease when Redis is configured (`live.holding_lease`: refused while another holds
  it), then `ProxmoxProvider.restore_in_place` (the mark checked again right before, stop,
  protection lifted, restore with `force=1`, the mark written back) and `converge` with the
  guest as the target, which puts the spec's config, firewall and protection back and starts
  it as the spec says. Exit 0 restored and converged, 1 failed.

The parsers cost only the standard library and the model's plain data; the Proxmox providers,
planning and the apply are imported when a command runs.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TextIO, TypeAlias

from reconciler.cli import render
from reconciler.cli.live import (
    EXIT_ERROR,
    EXIT_OK,
    Guard,
    SpecCommand,
    add_connection_args,
    color_arg,
    converge_live,
    endpoints_from,
    holding_lease,
    on_specs,
    repeatable,
    report_convergence,
    run_async,
    spec_dir_args,
    warn_insecure,
)
from reconciler.model.errors import OwnershipError, ProviderError, ReconcilerError
from reconciler.model.plans import Action, Change
from reconciler.model.resources import DesiredGraph, Kind, guest_address
from reconciler.model.units import format_seconds

if TYPE_CHECKING:
    from reconciler.applying.connecting import Connection
    from reconciler.applying.converging import Convergence
    from reconciler.model.observed import BackupVolume, ClusterFacts, ObservedResource
    from reconciler.model.spec import PlatformSpec
    from reconciler.providers.proxmox import ProxmoxProvider
    from reconciler.providers.proxmox_backup import BackupJobProvider

EXIT_REFUSED = 2
DEFAULT_NOTES = "{{guestname}}"  # a job's default, so a backup by hand reads like the job's

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


class Refused(ReconcilerError):
    """What a command will not do, found before anything is changed: one line, exit 2."""


def refusing(command: SpecCommand) -> SpecCommand:
    """A command whose refusals (`Refused`) are one line on stderr and exit 2."""

    @functools.wraps(command)
    def run(
        args: argparse.Namespace, spec: PlatformSpec, graph: DesiredGraph, out: TextIO, err: TextIO
    ) -> int:
        try:
            return command(args, spec, graph, out, err)
        except Refused as exc:
            err.write(f"refused: {exc}; nothing done\n")
            return EXIT_REFUSED

    return run


# --- which guest ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Owned:
    """A spec guest that exists and carries our mark: where it is, and what the spec wants."""

    name: str
    address: str
    vmid: int
    node: str
    kind: str
    observed: ObservedResource
    desired: Mapping[str, Any]

    def change(self) -> Change:
        """The guest as the provider's methods take it: where it is now (`id`), and the spec's
        guest at that vmid (`after`; an allocated vmid is the observed one)."""
        return Change(
            address=self.address,
            kind=Kind.GUEST,
            action=Action.UPDATE,
            wave=0,
            id={"vmid": self.vmid, "node": self.node},
            after={**self.desired, "vmid": self.vmid},
        )


def spec_guest(spec: PlatformSpec, name: str) -> str:
    """The address of a spec guest; refused for a name the spec does not have."""
    if name not in spec.guests:
        raise Refused(
            f"{name!r} is not a guest of the spec: the controller backs up and restores only "
            "the guests its specs describe (give a guest's name, e.g. mc-lobby)"
        )
    return guest_address(name)


def owned_guest(graph: DesiredGraph, observed: Iterable[ObservedResource], name: str) -> Owned:
    """The guest that carries our mark for `name`; refused when none does (it does not exist,
    or its vmid holds a guest that is not ours) or when two claim it (a copy made by hand)."""
    address = guest_address(name)
    desired = graph.resources[address].attributes
    seen = list(observed)
    claims = [r for r in seen if r.kind is Kind.GUEST and r.owned and r.address == address]
    if len(claims) > 1:
        vmids = " and ".join(str(r.id["vmid"]) for r in claims)
        raise Refused(
            f"{address} is claimed by vmids {vmids} (a copy made by hand carries its mark): "
            "remove the mark from the copy first"
        )
    if not claims:
        vmid = desired.get("vmid")
        held = [r for r in seen if r.kind is Kind.GUEST and r.id.get("vmid") == vmid]
        if vmid is not None and held:
            raise Refused(
                f"{address}: vmid {vmid} (on {held[0].id.get('node')}) holds a guest that does "
                "not carry our mark for it: not ours, it will not be touched"
            )
        raise Refused(
            f"{address} does not exist on the platform (no guest carries our mark for it): "
            "`reconciler apply` creates it, from its newest backup when a job selects it"
        )
    found = claims[0]
    return Owned(
        name=name,
        address=address,
        vmid=int(found.id["vmid"]),
        node=str(found.id["node"]),
        kind=str(found.attributes.get("type", "lxc")),
        observed=found,
        desired=desired,
    )


def guest_names(
    spec: PlatformSpec, graph: DesiredGraph, observed: Iterable[ObservedResource]
) -> dict[int, str]:
    """vmid -> the spec guest it is: the guests of ours observed, then the vmids the spec fixes
    (a guest that is gone still owns its backups)."""
    names: dict[int, str] = {}
    for r in observed:
        if r.kind is Kind.GUEST and r.owned and r.address:
            name = r.address.removeprefix("guest/")
            if name in spec.guests:
                names.setdefault(int(r.id["vmid"]), name)
    for name in sorted(spec.guests):
        vmid = graph.resources[guest_address(name)].attributes.get("vmid")
        if vmid is not None:
            names.setdefault(int(vmid), name)
    return names


def pve_of(conn: Connection) -> ProxmoxProvider:
    assert conn.guests is not None, "connect_platform always connects the guests' provider"
    return conn.guests


# --- backup --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackupSettings:
    """Where and how a guest is backed up by hand: as the job that selects it would."""

    storage: str
    mode: str = "snapshot"
    compress: str = "zstd"
    notes: str = DEFAULT_NOTES
    job: str = ""  # the job's address, for people; "" without one


def backup_settings(graph: DesiredGraph, address: str, storage: str | None) -> BackupSettings:
    """The job that selects the guest decides (`--storage` overrides its storage); without
    one, `--storage` is needed."""
    from reconciler.planning.backups import job_for

    found = job_for(graph, address, None, ())
    if found is None:
        if storage is None:
            raise Refused(
                f"{address}: no backup job of the spec selects it, so where it goes is "
                "unknown: give --storage S"
            )
        return BackupSettings(storage=storage)
    job, attrs = found
    return BackupSettings(
        storage=storage or str(attrs["storage"]),
        mode=str(attrs.get("mode") or "snapshot"),
        compress=str(attrs.get("compress") or "zstd"),
        notes=str(attrs.get("notes-template") or DEFAULT_NOTES),
        job=job,
    )


@on_specs
@refusing
def cmd_backup(
    args: argparse.Namespace, spec: PlatformSpec, graph: DesiredGraph, out: TextIO, err: TextIO
) -> int:
    from reconciler.applying.connecting import connect_platform

    names = list(dict.fromkeys(args.guests))
    settings = {n: backup_settings(graph, spec_guest(spec, n), args.storage) for n in names}
    warn_insecure(args, err)

    async def run() -> int:
        async with connect_platform(spec, endpoints_from(args)) as conn:
            pve = pve_of(conn)
            observed = await pve.observe()
            # Every guest checked before the first backup: a refusal leaves nothing half-done.
            owned = [owned_guest(graph, observed, n) for n in names]
            made = [await _back_up(pve, guest, settings[guest.name], out) for guest in owned]
        return EXIT_OK if all(m is not None for m in made) else EXIT_ERROR

    return run_async(run)


async def _back_up(
    pve: ProxmoxProvider, guest: Owned, how: BackupSettings, out: TextIO
) -> str | None:
    """One guest's backup, with its progress lines: the new volid ("" when it could not be
    listed), None when it failed."""
    from reconciler.providers.proxmox_backup import backup_volume

    job = f"job {how.job}, " if how.job else ""
    out.write(
        f"{guest.address} (vmid {guest.vmid} on {guest.node}): backing up to {how.storage} "
        f"({job}{how.mode}, compress {how.compress}) ...\n"
    )
    out.flush()
    started = time.monotonic()
    try:
        item = await pve.backup_now(
            guest.node,
            guest.vmid,
            how.storage,
            mode=how.mode,
            compress=how.compress,
            notes=how.notes,
            what=f"backup of {guest.address}",
        )
    except ProviderError as exc:
        out.write(f"{guest.address}: failed: {exc}\n")
        return None
    took = f"{time.monotonic() - started:.1f} s"
    made = backup_volume(item, how.storage, guest.node) if item is not None else None
    if made is None:
        out.write(f"{guest.address}: done in {took} (the new volume could not be listed)\n")
    else:
        out.write(f"{guest.address}: done: {made.volid}, {human_size(made.size)} ({took})\n")
    out.flush()
    return made.volid if made is not None else ""


# --- backups -------------------------------------------------------------------------------------

BACKUPS_JSON = """\
--format json prints one document, stable across releases of the same format_version:

  {"format": "reconciler/backups", "format_version": 1,
   "platform": NAME, "listed_at": ISO 8601 UTC, "storages": [STORAGE, ...],
   "backups": [
     {"guest": the spec guest whose vmid it holds, or null,
      "vmid": N, "volid": "STORAGE:backup/...", "storage": STORAGE,
      "node": the node of a local storage, or null for a shared one,
      "type": "lxc" | "qemu" | "" (unknown),
      "created": ISO 8601 UTC, "ctime": Unix seconds, "age_seconds": N,
      "size": bytes, "notes": the first line of its notes, "protected": true | false},
     ...]}

Backups are ordered by guest (the spec's guests by name, then vmids of no spec guest), newest
first for each."""


def backup_rows(
    backups: Iterable[BackupVolume], names: Mapping[int, str], now: float
) -> list[dict[str, Any]]:
    """The listing's rows, as the JSON document has them, in its order."""
    rows: list[dict[str, Any]] = [
        {
            "guest": names.get(b.vmid),
            "vmid": b.vmid,
            "volid": b.volid,
            "storage": b.storage,
            "node": b.node,
            "type": b.subtype,
            "created": utc_text(b.ctime, iso=True),
            "ctime": b.ctime,
            "age_seconds": max(0, int(now) - b.ctime),
            "size": b.size,
            "notes": b.notes.split("\n", 1)[0],
            "protected": b.protected,
        }
        for b in backups
    ]
    rows.sort(key=lambda r: (r["guest"] is None, r["guest"] or "", r["vmid"], -r["ctime"]))
    return rows


@on_specs
@refusing
def cmd_backups(
    args: argparse.Namespace, spec: PlatformSpec, graph: DesiredGraph, out: TextIO, err: TextIO
) -> int:
    from reconciler.applying.connecting import connect_platform
    from reconciler.providers import Observation
    from reconciler.providers.proxmox_backup import BackupJobProvider

    wanted = {n: spec_guest(spec, n) for n in args.guests}
    storages = sorted(set(args.storage) or {j.storage for j in spec.backups.values()})
    if not storages:
        raise Refused("the spec has no backup job, so no backup storage is known: give --storage")
    warn_insecure(args, err)

    async def run() -> tuple[list[ObservedResource], tuple[BackupVolume, ...] | None]:
        async with connect_platform(spec, endpoints_from(args)) as conn:
            pve = pve_of(conn)
            seen = Observation()
            observed = await pve.observe(seen)
            listing = BackupJobProvider(pve=pve, storages=frozenset(storages))
            return observed, await listing.observe_backups(seen)

    observed, backups = run_async(run)
    if backups is None:
        err.write(
            f"error: the backups on {', '.join(storages)} could not be listed (a listing "
            "failed, or the token may not read the cluster's nodes and storages: Sys.Audit, "
            "Datastore.Audit)\n"
        )
        return EXIT_ERROR
    now = time.time()
    rows = backup_rows(backups, guest_names(spec, graph, observed), now)
    if wanted:
        rows = [r for r in rows if r["guest"] in wanted]
    if args.format == "json":
        doc = {
            "format": "reconciler/backups",
            "format_version": 1,
            "platform": spec.platform.name,
            "listed_at": utc_text(now, iso=True),
            "storages": storages,
            "backups": rows,
        }
        out.write(json.dumps(doc, indent=2) + "\n")
    else:
        out.write(backups_table(rows, storages, color=render.use_color(args.color, out)))
    return EXIT_OK


def backups_table(rows: list[dict[str, Any]], storages: list[str], *, color: bool = False) -> str:
    if not rows:
        return f"No backups on {', '.join(storages)}.\n"
    header = ("GUEST", "VMID", "VOLID", "AGE", "SIZE", "PROTECTED", "NOTES")
    cells = [
        (
            r["guest"] or "-",
            str(r["vmid"]),
            r["volid"],
            format_seconds(r["age_seconds"]),
            human_size(r["size"]),
            "yes" if r["protected"] else "no",
            r["notes"],
        )
        for r in rows
    ]
    widths = [max(len(c[i]) for c in (header, *cells)) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()

    return "\n".join([render.bold(line(header), color), *map(line, cells)]) + "\n"


# --- restore -------------------------------------------------------------------------------------


def restore_storages(spec: PlatformSpec, graph: DesiredGraph, address: str) -> list[str]:
    """Where a guest's backups are looked for: the storages of the jobs that select it, else
    of every job of the spec."""
    from reconciler.planning.backups import jobs_of

    jobs = jobs_of(graph)
    mine = {str(j.attributes["storage"]) for j in jobs if address in j.attributes.get("guests", ())}
    return sorted(mine or {j.storage for j in spec.backups.values()})


def _check_storage(cluster: ClusterFacts | None, node: str, storage: str) -> None:
    """A storage the guest's node does not have holds none of its backups (a restore runs
    there): refused, without a listing that could only fail."""
    if cluster is None or node not in cluster.nodes:
        return
    storages = cluster.nodes[node].storages
    if storages is not None and storage not in storages:
        raise Refused(f"node {node} has no storage {storage!r}, so no backup there is restored")


async def choose_backup(
    listing: BackupJobProvider,
    guest: Owned,
    args: argparse.Namespace,
    storages: list[str],
    cluster: ClusterFacts | None,
    names: Mapping[int, str],
) -> BackupVolume:
    """The backup to restore: the one named (`--from`), or the guest's newest (at or before
    `--at`) on `storages`, as its node lists them. Refused: a backup of another guest, one
    that is not there, none at all, none by then."""
    if args.from_volid:
        return await _named_backup(listing, guest, args.from_volid, cluster, names)
    if not storages:
        raise Refused(
            f"{guest.address}: the spec has no backup job, so where its backups are is "
            "unknown: give --storage S or --from VOLID"
        )
    found: list[BackupVolume] = []
    for storage in storages:
        _check_storage(cluster, guest.node, storage)
        found += await listing.list_backups(guest.node, storage, shared=False, vmid=guest.vmid)
    candidates = [
        b for b in found if b.vmid == guest.vmid and (not b.subtype or b.subtype == guest.kind)
    ]
    if guest.desired.get("vmid") is None:
        # An allocated vmid may have been a deleted guest's: only backups whose notes name
        # this guest are its own (as for a missing guest's restore, `planning.backups`).
        name = str(guest.desired.get("name", ""))
        candidates = [b for b in candidates if b.notes.strip().split("\n")[0] == name]
    where = ", ".join(storages)
    if not candidates:
        raise Refused(f"{guest.address}: no backup of vmid {guest.vmid} on {where}")
    if args.at is not None:
        by_then = [b for b in candidates if b.ctime <= args.at]
        if not by_then:
            oldest = min(candidates, key=lambda b: (b.ctime, b.volid))
            raise Refused(
                f"{guest.address}: no backup at or before {utc_text(args.at)} on {where}; "
                f"its oldest is {oldest.volid}, made {utc_text(oldest.ctime)}"
            )
        candidates = by_then
    return max(candidates, key=lambda b: (b.ctime, b.volid))


async def _named_backup(
    listing: BackupJobProvider,
    guest: Owned,
    volid: str,
    cluster: ClusterFacts | None,
    names: Mapping[int, str],
) -> BackupVolume:
    storage, sep, _ = volid.partition(":")
    if not sep or not storage:
        raise Refused(f"{volid!r} is not a backup's volume id (STORAGE:backup/...)")
    _check_storage(cluster, guest.node, storage)
    listed = await listing.list_backups(guest.node, storage, shared=False)
    found = next((b for b in listed if b.volid == volid), None)
    if found is None:
        raise Refused(f"there is no backup {volid} (storage {storage}, as {guest.node} lists it)")
    if found.vmid != guest.vmid:
        whose = f" ({guest_address(names[found.vmid])})" if found.vmid in names else ""
        raise Refused(
            f"{volid} is a backup of vmid {found.vmid}{whose}, not of {guest.address} "
            f"(vmid {guest.vmid})"
        )
    if found.subtype and found.subtype != guest.kind:
        raise Refused(
            f"{volid} is a backup of a {found.subtype} guest; {guest.address} is a {guest.kind}"
        )
    return found


def describe_restore(
    guest: Owned, backup: BackupVolume, now: float, *, backup_first: bool = True
) -> str:
    """What a restore will do, for the confirmation: the guest, the backup, what it overwrites
    and what follows."""
    attrs = guest.observed.attributes
    age = format_seconds(max(0, int(now) - backup.ctime))
    notes = backup.notes.split("\n", 1)[0]
    lines = [
        f"Restore {guest.address} (vmid {guest.vmid}, {guest.kind}, on {guest.node}) from",
        f"  {backup.volid}",
        f"  made {utc_text(backup.ctime)} ({age} ago), {human_size(backup.size)}"
        + (f", notes: {notes}" if notes else ""),
        "It overwrites the guest's current disks (what was written to them since is lost):",
    ]
    disks = {"rootfs": attrs.get("rootfs"), **(attrs.get("volumes") or {})}
    disks.update(attrs.get("unused") or {})
    width = max(len(k) for k in disks)
    lines += [f"  {key.ljust(width)}  {value}" for key, value in disks.items() if value]
    steps: list[str] = []
    if backup_first:
        steps.append(f"its current state is backed up to {backup.storage}")
    if attrs.get("protection"):
        steps.append("its protection is lifted")
    if attrs.get("state") == "running":
        steps.append("it is stopped")
    steps.append("it is restored and marked ours again")
    state = guest.desired.get("state", "running")
    lines += [
        "First " + ", then ".join(steps) + ";",
        "then the spec's config, firewall and protection are put back"
        + (" and it is started." if state == "running" else f" (state: {state})."),
    ]
    return "\n".join(lines) + "\n"


def _confirmed(guest: Owned, args: argparse.Namespace, err: TextIO) -> None:
    """`--yes`, or 'yes' typed in a terminal; refused otherwise (no terminal: say how)."""
    if args.yes:
        return
    if not sys.stdin.isatty():
        raise Refused("restore needs confirmation: run it in a terminal or pass --yes")
    err.write(f"Overwrite {guest.address} with this backup? Only 'yes' is accepted: ")
    err.flush()
    if sys.stdin.readline().strip() != "yes":
        raise Refused("not confirmed")


async def _take_lease(
    stack: contextlib.AsyncExitStack, conn: Connection, args: argparse.Namespace
) -> Guard | None:
    """The leader lease, as a manual apply takes it; held by another: refused."""
    try:
        return await stack.enter_async_context(holding_lease(conn.redis, args))
    except ProviderError:
        raise  # Redis did not answer: an error, not a refusal
    except ReconcilerError as exc:
        raise Refused(str(exc)) from None


@on_specs
@refusing
def cmd_restore(
    args: argparse.Namespace, spec: PlatformSpec, graph: DesiredGraph, out: TextIO, err: TextIO
) -> int:
    from reconciler.applying.connecting import connect_platform
    from reconciler.providers import Observation
    from reconciler.providers.proxmox_backup import BackupJobProvider

    address = spec_guest(spec, args.guest)
    storages = [args.storage] if args.storage else restore_storages(spec, graph, address)
    warn_insecure(args, err)

    async def run() -> Convergence | int:
        async with connect_platform(spec, endpoints_from(args)) as conn:
            pve = pve_of(conn)
            seen = Observation()
            observed = await pve.observe(seen)
            guest = owned_guest(graph, observed, args.guest)
            names = guest_names(spec, graph, observed)
            backup = await choose_backup(
                BackupJobProvider(pve=pve), guest, args, storages, seen.cluster, names
            )
            first = not args.no_final_backup
            out.write(describe_restore(guest, backup, time.time(), backup_first=first))
            out.flush()
            if args.dry_run:
                out.write("Dry run: nothing done.\n")
                return EXIT_OK
            _confirmed(guest, args, err)
            async with contextlib.AsyncExitStack() as stack:
                guard = await _take_lease(stack, conn, args)
                if guard is not None:
                    await guard()
                if not args.no_final_backup:
                    # What is overwritten is backed up first, next to the backup restored: a
                    # restore of the wrong backup can itself be undone.
                    how = replace(
                        backup_settings(graph, address, backup.storage),
                        notes="{{guestname}} before restore",
                    )
                    before = await _back_up(pve, guest, how, out)
                    # A backup that failed, or one written over the backup to restore (the
                    # same guest and second): nothing is overwritten.
                    if before is None or before == backup.volid:
                        err.write(
                            f"{address}: not restored: its current state could not be "
                            "backed up first (--no-final-backup restores without)\n"
                        )
                        return EXIT_ERROR
                try:
                    await pve.restore_in_place(guest.change(), backup.volid)
                except OwnershipError as exc:
                    # Checked before anything is done: it changed hands since it was observed.
                    raise Refused(str(exc)) from None
                except ProviderError as exc:
                    err.write(
                        f"error: {exc}\nthe restore of {address} did not finish; it may be "
                        f"left stopped and unprotected: `reconciler apply --target {address}` "
                        "puts it back as the spec says\n"
                    )
                    return EXIT_ERROR
                out.write(f"{address}: restored from {backup.volid}; converging it to the spec\n")
                out.flush()
                return await converge_live(graph, spec, conn, err, guard, targets=[address])

    result = run_async(run)
    if isinstance(result, int):
        return result
    why = f"{address}: restored, but not converged: its plan has errors (above)"
    color = render.use_color(args.color, out)
    return report_convergence(result, out, err, color=color, errored=why)


# --- helpers and parsers -------------------------------------------------------------------------


def utc_text(epoch: float, *, iso: bool = False) -> str:
    moment = datetime.datetime.fromtimestamp(int(epoch), tz=datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ" if iso else "%Y-%m-%d %H:%M:%S UTC")


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def parse_at(text: str) -> int:
    """`--at`: ISO 8601 (`2026-12-04T22:00:00Z`, with an offset or without: UTC) or
    `YYYY-MM-DD HH:MM` (UTC) -> Unix seconds."""
    try:
        moment = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a time: give ISO 8601 (2026-12-04T22:00:00Z) or "
            "'YYYY-MM-DD HH:MM' (UTC)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return int(moment.timestamp())


def _dir_opt(p: argparse.ArgumentParser, *, positional: bool = False) -> None:
    spec_dir_args(p, positional=positional)
    color_arg(p)


def add_backup_commands(sub: Subparsers) -> None:
    """`backup`, `backups` and `restore`, each with the live commands' connection flags."""
    b = sub.add_parser(
        "backup",
        help="back up spec guests now (exit 0 all made, 1 any failed, 2 refused)",
        description="Back up guests of the spec now, each to the storage of the backup job "
        "that selects it, with that job's mode, compression and notes.",
    )
    b.add_argument("guests", nargs="+", metavar="GUEST", help="a spec guest's name")
    b.add_argument("--storage", metavar="S", help="back up to this storage instead")
    _dir_opt(b)
    add_connection_args(b)
    b.set_defaults(func=cmd_backup)

    ls = sub.add_parser(
        "backups",
        help="list the backups on the spec's backup storages",
        description="List the backups on the storages the spec's backup jobs write to, by "
        "guest, newest first.",
        epilog=BACKUPS_JSON,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ls.add_argument("guests", nargs="*", metavar="GUEST", help="only these spec guests")
    repeatable(ls, "--storage", "S", "list this storage instead of the jobs' (repeat)")
    ls.add_argument("--format", choices=["table", "json"], default="table")
    _dir_opt(ls)
    add_connection_args(ls)
    ls.set_defaults(func=cmd_backups)

    r = sub.add_parser(
        "restore",
        help="overwrite a spec guest with one of its backups, then converge it",
        description="Restore a guest of ours in place from one of its backups (its newest by "
        "default), then put the spec's config, firewall and protection back and start it as "
        "the spec says. Exit 0 restored, 1 failed, 2 refused (nothing done).",
    )
    r.add_argument("guest", metavar="GUEST", help="a spec guest's name")
    r.add_argument(
        "--no-final-backup",
        action="store_true",
        help="overwrite it without backing up its current state first",
    )
    which = r.add_mutually_exclusive_group()
    which.add_argument("--latest", action="store_true", help="its newest backup (the default)")
    which.add_argument("--from", dest="from_volid", metavar="VOLID", help="this backup")
    which.add_argument(
        "--at",
        type=parse_at,
        metavar="TIME",
        help="its newest backup made at or before TIME: ISO 8601 or 'YYYY-MM-DD HH:MM' (UTC)",
    )
    r.add_argument(
        "--storage", metavar="S", help="look for its backups here (default: its jobs' storages)"
    )
    r.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    r.add_argument("--dry-run", action="store_true", help="show what it would do; do nothing")
    _dir_opt(r, positional=True)
    add_connection_args(r)
    r.set_defaults(func=cmd_restore)
