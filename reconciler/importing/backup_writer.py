"""Backup jobs as Proxmox holds them (`/cluster/backup`) -> the spec's `backups:` section, which
`writer.render_specs` writes to `backups.yaml`. Pure: the jobs come in the `Estate`
(`estate.read_estate`, one `GET /cluster/backup`), the imported guests by vmid.

Each job, option by option:

    schedule                     schedule (an old `starttime` with `dow` as the same event)
    storage                      storage (none: vzdump's default, `local`, said in a note)
    mode, compress               mode, compress (written where they differ from the spec's
                                 defaults; a job without `compress` does not compress: "0")
    prune-backups                retention (`keep-all` cannot be said: a note)
    notes-template               notes ("" when the job has none)
    enabled                      enabled
    comment                      description (the controller's mark taken off)
    vmid=1,2                     select: {guests: [...]} with the imported guests' names
    all=1, exclude=..            select: {all: true, exclude: [...]}
    pool                         not imported: the spec cannot select a pool (a note)

A vmid the job names that is not an imported guest (a template, another platform's, one that
does not exist) cannot be selected by name: a note says the first apply after adoption leaves
it out. `all=1` becomes every guest of the spec, which apply writes as a vmid list: a note says
so. Options the spec has no word for (`node`, `mailto`, `bwlimit`, ...) are named in a note;
apply neither sets nor removes them, so they stay as they are.

Names: a job the controller already owns (its mark, for this platform and under its own id)
keeps its mark's name. Any other is named after its id made a DNS label (`rc-` taken off), or,
for an id Proxmox or its web UI generated (a UUID, `backup-1a2b3c4d-...`), after its comment;
`<name>-2` on a clash. The job's `id` is written whenever it is not `rc-<name>`: the
controller finds the job under it, and `adopt backup/NAME` marks it without recreating it.

Not imported, with a note: a job carrying another platform's mark, a job selecting a pool or
nothing the spec has, and one the spec model refuses as it is (an id the mark cannot carry, a
schedule it does not read): every job written is checked against the spec model, so the output
validates.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from reconciler.importing.yamltext import unique_name
from reconciler.model.resources import DesiredGraph, Kind, job_id
from reconciler.model.spec import BackupJobSpec
from reconciler.model.units import check_comment
from reconciler.planning import backups, diffing, normalize
from reconciler.providers.proxmox import MARK_PREFIX
from reconciler.providers.proxmox_backup import (
    job_attributes,
    read_job_mark,
)

BACKUPS_HEADER = [
    "Backup jobs as Proxmox holds them. A job that existed before keeps its `id`; until",
    "`reconciler adopt backup/NAME` marks it (its comment), the controller does not own it.",
]
# Options the spec says (or that say nothing about what a job does).
_KNOWN = frozenset(
    {
        "id",
        "type",
        "next-run",
        "schedule",
        "starttime",
        "dow",
        "storage",
        "mode",
        "compress",
        "prune-backups",
        "notes-template",
        "enabled",
        "comment",
        "vmid",
        "all",
        "exclude",
        "pool",
    }
)
# A job id Proxmox (a UUID) or its web UI (`backup-` and UUID parts) made up.
_GENERATED = re.compile(r"(?:backup-)?[0-9a-f]{8}(?:-[0-9a-f]{4,12})*", re.IGNORECASE)
_NOT_LABEL = re.compile(r"[^a-z0-9]+")
_KEEPS = ("last", "hourly", "daily", "weekly", "monthly", "yearly")
_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


@dataclass
class ImportedJobs:
    """The `backups:` section, and what it came from."""

    section: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> spec job
    ids: dict[str, str] = field(default_factory=dict)  # name -> the job's Proxmox id
    jobs: dict[str, Mapping[str, Any]] = field(default_factory=dict)  # name -> the job, raw
    notes: list[str] = field(default_factory=list)


def render_backups(
    jobs: Iterable[Mapping[str, Any]], guests: Mapping[int, str], platform: str
) -> ImportedJobs:
    """The spec jobs for `jobs` (as `GET /cluster/backup` lists them), selecting `guests`
    (vmid -> imported name), for `platform`. See the module docstring."""
    out = ImportedJobs()
    taken: set[str] = set()
    pending: list[tuple[str, Mapping[str, Any], str]] = []  # (id, job, description)
    for job in sorted(jobs, key=lambda j: str(j.get("id", ""))):
        ident = str(job.get("id") or "")
        claim, description = read_job_mark(job.get("comment"), ident)
        if claim is not None and claim.platform != platform:
            out.notes.append(
                f"skipped backup job {ident}: it carries the mark of platform {claim.platform!r}"
            )
        elif claim is not None:  # ours already: its name first, before any other takes it
            name = claim.address.removeprefix(f"{Kind.BACKUP_JOB.value}/")
            taken.add(name)
            _add(out, name, ident, job, description, guests)
        else:
            pending.append((ident, job, description))
    for ident, job, description in pending:
        _add(out, _name(ident, description, taken), ident, job, description, guests)
    out.section = dict(sorted(out.section.items()))
    return out


def _name(ident: str, description: str, taken: set[str]) -> str:
    """A name for an unmarked job: its id as a label, or its comment's first words for an id
    made up by Proxmox; made unique with `-2`, `-3`, ..."""
    if _GENERATED.fullmatch(ident):
        words = _label(description)
        if len(words) > 40:  # a few words, cut where one ends
            words = words[:41].rsplit("-", 1)[0]
        base = words or f"job-{ident.removeprefix('backup-')[:8].lower()}"
    else:
        base = _label(ident.removeprefix("rc-")) or "job"
    return unique_name(base, taken)


def _label(text: str) -> str:
    return _NOT_LABEL.sub("-", text.lower()).strip("-")[:63].rstrip("-")


def _add(
    out: ImportedJobs,
    name: str,
    ident: str,
    job: Mapping[str, Any],
    description: str,
    guests: Mapping[int, str],
) -> None:
    who = f"backup job {ident} ({name})"
    notes: list[str] = []
    select = _select(job, guests, notes, who)
    if select is None:
        out.notes.extend(notes)
        return
    entry: dict[str, Any] = {"schedule": _schedule(job)}
    storage = job.get("storage")
    if not storage:
        notes.append(f"{who}: no storage set, so vzdump's default `local` is written")
    entry["storage"] = str(storage or "local")
    if job.get("mode", "snapshot") != "snapshot":
        entry["mode"] = str(job["mode"])
    compress = str(job.get("compress", "0"))
    if compress != BackupJobSpec.model_fields["compress"].default:
        entry["compress"] = compress
    retention = _retention(job.get("prune-backups"), notes, who)
    if retention:
        entry["retention"] = retention
    entry["select"] = select
    template = job.get("notes-template")
    if template != BackupJobSpec.model_fields["notes"].default:
        entry["notes"] = str(template or "")
    if not int(job.get("enabled", 1)):
        entry["enabled"] = False
    text = _description(description, notes, who)
    if text:
        entry["description"] = text
    if ident != job_id(f"{Kind.BACKUP_JOB.value}/{name}"):
        entry["id"] = ident
    extra = sorted(set(job) - _KNOWN)
    if extra:
        notes.append(
            f"{who}: options the spec cannot hold, kept as they are (apply neither sets nor "
            f"removes them): {', '.join(extra)}"
        )
    try:
        BackupJobSpec.model_validate(entry)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        out.notes.append(f"skipped {who}: the spec cannot hold it as it is: {problems}")
        return
    out.section[name] = entry
    out.ids[name] = ident
    out.jobs[name] = job
    out.notes.extend(notes)


def _select(
    job: Mapping[str, Any], guests: Mapping[int, str], notes: list[str], who: str
) -> dict[str, Any] | None:
    """The job's selection in the spec's words; None (and why, in `notes`) when it has none."""
    if job.get("pool"):
        notes.append(
            f"skipped {who}: it selects pool {job['pool']!r}, which the spec cannot say; "
            "it stays as it is, not the controller's"
        )
        return None
    if int(job.get("all") or 0):
        excluded = _vmids(job.get("exclude"))
        names = sorted(guests[v] for v in excluded if v in guests)
        if not set(guests) - set(excluded):
            notes.append(f"skipped {who}: it selects no imported guest")
            return None
        notes.append(
            f"{who}: backs up every guest of the cluster (all=1); the spec's `all` is every "
            "guest of the spec, which the first apply after adoption writes as a vmid list, "
            "so a guest made by hand afterwards is not backed up by it"
        )
        return {"all": True, **({"exclude": names} if names else {})}
    vmids = _vmids(job.get("vmid"))
    names = sorted({guests[v] for v in vmids if v in guests})
    unknown = [v for v in vmids if v not in guests]
    if not names:
        notes.append(f"skipped {who}: it selects no imported guest (vmids {_listed(vmids)})")
        return None
    if unknown:
        notes.append(
            f"{who}: vmids {_listed(unknown)} are not imported guests, so the spec cannot "
            "select them: the first apply after adoption leaves them out of the job"
        )
    return {"guests": names}


def _vmids(value: Any) -> list[int]:
    return sorted({int(v) for v in str(value or "").split(",") if v.strip().isdigit()})


def _listed(vmids: Sequence[int]) -> str:
    return ", ".join(str(v) for v in vmids) or "none"


def _schedule(job: Mapping[str, Any]) -> str:
    """The job's calendar event; a job from before schedules (`starttime`, `dow`) as the
    same event."""
    if job.get("schedule"):
        return str(job["schedule"])
    days = [d for d in str(job.get("dow") or "").split(",") if d in _DAYS]
    when = str(job.get("starttime") or "00:00")
    return f"{','.join(days)} {when}" if days and len(days) < len(_DAYS) else when


def _retention(value: Any, notes: list[str], who: str) -> dict[str, int]:
    """`keep-last=3,keep-daily=7` (or Proxmox's dict of it) -> {keep_last: 3, ...}."""
    if not value:
        return {}
    if isinstance(value, Mapping):
        parts = {str(k): str(v) for k, v in value.items()}
    else:
        parts = dict(p.split("=", 1) for p in str(value).split(",") if "=" in p)
    if parts.get("keep-all") not in (None, "0"):
        notes.append(
            f"{who}: keeps every backup (keep-all), which the spec cannot say; written without "
            "a retention (the storage's own), which the first apply after adoption sends"
        )
        return {}
    return {f"keep_{k}": int(parts[f"keep-{k}"]) for k in _KEEPS if f"keep-{k}" in parts}


def _description(text: str, notes: list[str], who: str) -> str:
    """The comment (without our mark) as the spec holds a job's description: one line, with
    nothing that reads as the mark; any other is left out, named in a note, never reworded."""
    try:
        check_comment(text)
    except ValueError:
        notes.append(f"{who}: comment {text!r} left out: the spec holds one line of text")
        return ""
    if MARK_PREFIX in text:
        notes.append(
            f"{who}: comment {text!r} left out: it reads as the controller's ownership mark, "
            "which only the controller writes"
        )
        return ""
    return text


def job_drift(
    graph: DesiredGraph, imported: ImportedJobs, vmids: Mapping[str, int]
) -> dict[str, list[str]]:
    """Per job address, the fields the written spec and Proxmox disagree on once the job is
    adopted: what the first apply would change. `vmids`: guest address -> vmid."""
    drift: dict[str, list[str]] = {}
    for name, job in imported.jobs.items():
        address = f"{Kind.BACKUP_JOB.value}/{name}"
        res = graph.resources.get(address)
        if res is None:
            continue
        desired = {**res.attributes, "vmid": backups.job_vmids(res, vmids)}
        _claim, description = read_job_mark(job.get("comment"), imported.ids[name])
        want, have = normalize.pair(Kind.BACKUP_JOB, desired, job_attributes(job, description))
        fields = [f.path for f in diffing.diff(Kind.BACKUP_JOB, want, have)]
        if fields:
            drift[address] = fields
    return drift
