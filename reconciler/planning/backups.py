"""Backups in planning: a job's selection as vmids, each selected guest's freshness, and the
backup a missing guest is restored from.

Called by the planner (`planning.planner.make_plan`). Pure: what Proxmox holds comes in the
observed state (`ObservedState.backups`, listed by `providers.proxmox_backup`), the time as
an argument.

Freshness: for each guest a job selects, its newest backup on that job's storage; older than
the job's `max_age` (default: twice the longest gap between the schedule's runs) is stale, none
at all is missing. A guest not created yet is neither (it has had no chance to be backed up).

Restore: a spec guest that is missing, that a job selects and whose `restore_missing` is not
`never`, is recreated from its newest backup of its own vmid on a job's storage. Only a vmid
fixed in the spec counts: a guest whose vmid the planner allocates might get the vmid of a
guest that was deleted, and must never get that guest's data.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping
from typing import Any

from reconciler.model.calendar import CalendarEvent
from reconciler.model.observed import BackupVolume, ObservedResource
from reconciler.model.plans import BackupFreshness, Freshness
from reconciler.model.resources import DesiredGraph, Kind, Resource


def max_age(job: Resource) -> int:
    """The job's `max_age`, or twice the longest gap between its schedule's runs."""
    given = job.attributes.get("max_age")
    if given:
        return int(given)
    return int(2 * CalendarEvent.parse(str(job.attributes["schedule"])).interval())


def job_vmids(job: Resource, vmids: Mapping[str, int]) -> list[int]:
    """The vmids of the guests a job selects (a guest without one is left out)."""
    return sorted({vmids[g] for g in job.attributes.get("guests", ()) if g in vmids})


def jobs_of(graph: DesiredGraph) -> list[Resource]:
    return [r for r in graph.ordered() if r.kind is Kind.BACKUP_JOB]


def newest_backups(
    backups: Iterable[BackupVolume], storage: str | None = None
) -> dict[int, BackupVolume]:
    """The newest backup of each vmid (on `storage` when given)."""
    newest: dict[int, BackupVolume] = {}
    for b in backups:
        if storage is not None and b.storage != storage:
            continue
        held = newest.get(b.vmid)
        if held is None or (b.ctime, b.volid) > (held.ctime, held.volid):
            newest[b.vmid] = b
    return newest


def freshness(
    graph: DesiredGraph,
    vmids: Mapping[str, int],
    existing: Iterable[str],
    backups: Iterable[BackupVolume] | None,
    now: datetime.datetime,
) -> list[BackupFreshness]:
    """Every existing guest each enabled job selects, with its newest backup there."""
    there = set(existing)
    listed = tuple(backups) if backups is not None else None
    out: list[BackupFreshness] = []
    for job in jobs_of(graph):
        if not job.attributes.get("enabled", 1):
            continue
        limit = max_age(job)
        newest = newest_backups(listed or (), str(job.attributes["storage"]))
        for guest in job.attributes.get("guests", ()):
            if guest not in there or guest not in vmids:
                continue
            vmid = vmids[guest]
            if listed is None:
                out.append(BackupFreshness(guest, job.address, vmid, Freshness.UNKNOWN, limit))
                continue
            found = newest.get(vmid)
            if found is None:
                out.append(BackupFreshness(guest, job.address, vmid, Freshness.MISSING, limit))
                continue
            age = max(0, int(now.timestamp()) - found.ctime)
            state = Freshness.STALE if age > limit else Freshness.FRESH
            out.append(BackupFreshness(guest, job.address, vmid, state, limit, found.volid, age))
    return out


def job_for(
    graph: DesiredGraph, guest: str, vmid: int | None, observed_jobs: Iterable[ObservedResource]
) -> tuple[str, Mapping[str, Any]] | None:
    """The job that backs `guest` up, as (address, attributes): the first enabled job of the
    spec (by address) that selects it, else a disabled one; for a guest that left the spec,
    the first job of ours Proxmox holds with its vmid (the spec's version of that job when it
    has one)."""
    jobs = [j for j in jobs_of(graph) if guest in j.attributes.get("guests", ())]
    enabled = [j for j in jobs if j.attributes.get("enabled", 1)]
    chosen = enabled or jobs
    if chosen:
        return chosen[0].address, chosen[0].attributes
    for job in sorted(observed_jobs, key=lambda r: str(r.address)):
        if vmid is not None and vmid in job.attributes.get("vmid", ()) and job.address:
            desired = graph.resources.get(job.address)
            return job.address, desired.attributes if desired else job.attributes
    return None


def restore_point(
    graph: DesiredGraph,
    guest: Resource,
    vmid: int,
    backups: Iterable[BackupVolume] | None,
) -> tuple[BackupVolume | None, str]:
    """The backup a missing guest (to be created as `vmid`) is restored from, or None and why
    not: "" when there is nothing to say (no job selects it, `restore_missing: never`, no
    backup of it), else the reason it is not created at all (its backups could not be listed).

    A backup is the guest's own when it is of `vmid`, on a storage of a job that selects the
    guest, of the guest's type; and, when the spec does not fix the vmid (the planner allocated
    it, and a deleted guest may have held it), when its notes name the guest (the jobs' notes
    default to `{{guestname}}`)."""
    if guest.attributes.get("restore_missing") == "never":
        return None, ""
    jobs = [j for j in jobs_of(graph) if guest.address in j.attributes.get("guests", ())]
    if not jobs:
        return None, ""
    if backups is None:
        return None, "its backups could not be listed"
    storages = {str(j.attributes["storage"]) for j in jobs}
    kind = guest.attributes.get("type", "lxc")
    candidates = [
        b
        for b in backups
        if b.vmid == vmid and b.storage in storages and (not b.subtype or b.subtype == kind)
    ]
    if guest.attributes.get("vmid") is None:
        name = str(guest.attributes.get("name", ""))
        candidates = [b for b in candidates if b.notes.strip().split("\n")[0] == name]
    if not candidates:
        return None, ""
    return max(candidates, key=lambda b: (b.ctime, b.volid)), ""
