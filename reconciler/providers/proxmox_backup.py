"""Backup jobs (`/cluster/backup`) and the backups on the storages they write to.

A provider like the guests' and the firewall's: it composes a `ProxmoxProvider` for every call
(one thread hop, one retry loop, one error translation). Called through the provider protocol
by every run (`applying.observing`, `applying.executor`).

Observe:
- every job (`GET /cluster/backup`, one call). A job is ours when its `comment` ends with our
  mark, `reconciler:v1 platform=P address=backup/NAME id=ID`, and the mark's `id` is the job's
  own: a job copied by hand (the copy gets another id) is foreign, reported and never touched.
  Our jobs' ids are `rc-<name>`, or the spec's `id` for a job that existed before and was
  adopted (`reconciler adopt` wrote the mark under its own id); either way a job is found again
  by its mark's address;
- the backups on the storages the spec's jobs write to, `GET /nodes/{node}/storage/{storage}/
  content?content=backup` once per storage and node that has it (once for a shared storage,
  such as PBS), into `seen.backups`: the freshness policy and restore read them. A listing that
  fails (or storages that cannot be seen) leaves `seen.backups` None with the reason in
  `seen.backup_errors`: unknown, not empty, so no guest is recreated empty in place of a
  backup that might exist.

Apply: create (under the spec's `id`, else `rc-<name>`), update (`delete=` for the options the
spec dropped) and delete a job, always by its id (an existing job's is the one observed), and an
update or delete only after reading the job again and finding our mark on it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from reconciler.model.errors import NotFoundError, PermanentError, ProviderError
from reconciler.model.observed import BackupVolume, ObservedResource
from reconciler.model.plans import Action, Change, refuse_blocked
from reconciler.model.resources import Kind, job_id
from reconciler.providers import Observation
from reconciler.providers.proxmox import MARK_PREFIX, ProxmoxProvider

# Options that may be left out (and so are deleted when the spec drops them).
_OPTIONAL = ("prune-backups", "notes-template", "comment", "compress", "mode")
_JOB_MARK = re.compile(
    rf"(?:^|\s){re.escape(MARK_PREFIX)} platform=(?P<platform>\S+) "
    r"address=(?P<address>backup/[a-z0-9-]+) id=(?P<id>[A-Za-z0-9_.-]+)\Z"
)


def job_comment(platform: str, address: str, description: str, ident: str | None = None) -> str:
    """The comment as sent: the spec's description, then our mark (one line: Proxmox keeps a
    job's comment on one line of jobs.cfg). The mark names the job's real id (`ident`, default
    `rc-<name>`), so a copy under another id claims nothing."""
    mark = f"{MARK_PREFIX} platform={platform} address={address} id={ident or job_id(address)}"
    return f"{description} {mark}" if description else mark


def change_job_id(change: Change) -> str:
    """The id a change acts on: the observed job's (an update or delete: ours by its mark,
    whatever its id), else the spec's `id` (a job adopted under the id it had), else
    `rc-<name>`."""
    observed = change.id.get("id")
    wanted = (change.after or {}).get("id")
    return str(observed or wanted or job_id(change.address))


class JobClaim(NamedTuple):
    """What a job's mark claims: the platform, and the address on it."""

    platform: str
    address: str


def read_job_mark(comment: str | None, job: str) -> tuple[JobClaim | None, str]:
    """A job's comment -> (what our mark claims, the description without it). None when there
    is no mark, or the mark names another id (a copy made by hand)."""
    text = (comment or "").strip()
    m = _JOB_MARK.search(text)
    if m is None:
        return None, text
    description = text[: m.start()].strip()
    if m["id"] != job:
        return None, description
    return JobClaim(m["platform"], m["address"]), description


def job_attributes(job: Mapping[str, Any], description: str) -> dict[str, Any]:
    """A job as Proxmox gives it -> the attributes the planner compares."""
    vmids = sorted(int(v) for v in str(job.get("vmid") or "").split(",") if v.strip().isdigit())
    return {
        "schedule": str(job.get("schedule", "")),
        "storage": job.get("storage"),
        "mode": job.get("mode", "snapshot"),
        "compress": str(job.get("compress", "0")),
        "prune-backups": _prune_text(job.get("prune-backups")),
        "notes-template": job.get("notes-template"),
        "enabled": int(job.get("enabled", 1)),
        "vmid": vmids,
        "description": description,
    }


def _prune_text(value: Any) -> str | None:
    """Proxmox answers `prune-backups` as a string or as a dict of keeps: one spelling."""
    if value is None or value == "":
        return None
    if isinstance(value, Mapping):
        parts = {str(k): str(v) for k, v in value.items()}
    else:
        parts = dict(p.split("=", 1) for p in str(value).split(",") if "=" in p)
    order = (
        "keep-all",
        "keep-last",
        "keep-hourly",
        "keep-daily",
        "keep-weekly",
        "keep-monthly",
        "keep-yearly",
    )
    return ",".join(f"{k}={parts[k]}" for k in order if k in parts) or None


def job_params(
    platform: str, address: str, want: Mapping[str, Any], ident: str | None = None
) -> dict[str, Any]:
    """The desired attributes -> the options of a create or update of job `ident`."""
    params: dict[str, Any] = {
        "schedule": want["schedule"],
        "storage": want["storage"],
        "mode": want["mode"],
        "compress": want["compress"],
        "enabled": int(want["enabled"]),
        "all": 0,
        "vmid": ",".join(str(v) for v in want["vmid"]),
        "comment": job_comment(platform, address, want.get("description", ""), ident),
    }
    if want.get("prune-backups"):
        params["prune-backups"] = want["prune-backups"]
    if want.get("notes-template"):
        params["notes-template"] = want["notes-template"]
    return params


def backup_volume(item: Mapping[str, Any], storage: str, node: str | None) -> BackupVolume | None:
    """One item of a storage's backup listing; None for one that names no guest."""
    try:
        vmid = int(item["vmid"])
    except (KeyError, TypeError, ValueError):
        return None
    return BackupVolume(
        volid=str(item.get("volid", "")),
        storage=storage,
        node=node,
        vmid=vmid,
        ctime=int(item.get("ctime") or 0),
        size=int(item.get("size") or 0),
        notes=str(item.get("notes") or ""),
        protected=bool(int(item.get("protected") or 0)),
        subtype=str(item.get("subtype") or ""),
    )


@dataclass
class BackupJobProvider:
    """The spec's backup jobs; `storages`: where the spec's jobs write, listed for backups."""

    pve: ProxmoxProvider
    storages: frozenset[str] = frozenset()
    calls_listing: int = 0
    _foreign_ids: set[str] = field(default_factory=set)

    kinds = frozenset({Kind.BACKUP_JOB})
    needs = frozenset({Kind.GUEST})  # the cluster's storages, seen with the guests
    streams = frozenset[Kind]()
    optional = False  # a job unknown: nothing about backups is planned

    @property
    def platform(self) -> str:
        return self.pve.platform

    # --- observe -------------------------------------------------------------------------

    async def observe(self, seen: Observation) -> list[ObservedResource]:
        async with self.pve.reading():
            jobs = await self.pve.get("list backup jobs", self.pve.client.cluster.backup)
            out = [self._job(job) for job in jobs if job.get("id")]
            seen.backups = await self.observe_backups(seen)
        return sorted(out, key=lambda r: str(r.id.get("id")))

    def _job(self, job: Mapping[str, Any]) -> ObservedResource:
        ident = str(job["id"])
        claim, description = read_job_mark(job.get("comment"), ident)
        owned = claim is not None and claim.platform == self.platform
        return ObservedResource(
            address=claim.address if claim is not None and owned else None,
            kind=Kind.BACKUP_JOB,
            owned=owned,
            id={"id": ident},
            attributes=job_attributes(job, description),
        )

    async def observe_backups(self, seen: Observation) -> tuple[BackupVolume, ...] | None:
        """Every backup on the spec's backup storages: one listing per storage and node (one
        for a shared storage). None when a listing fails or the storages are not known."""
        cluster = seen.cluster
        if cluster is None or any(n.storages is None for n in (cluster.nodes or {}).values()):
            seen.backup_errors["cluster"] = "the cluster's storages could not be seen"
            return None
        where: list[tuple[str, str, bool]] = []
        shared_done: set[str] = set()
        for node, facts in sorted(cluster.nodes.items()):
            if not facts.online or facts.storages is None:
                continue
            for storage in sorted(self.storages):
                st = facts.storages.get(storage)
                if st is None or not st.active or "backup" not in st.content:
                    continue
                if st.shared:
                    if storage in shared_done:
                        continue
                    shared_done.add(storage)
                where.append((node, storage, st.shared))
        found: list[BackupVolume] = []
        for node, storage, shared in where:
            try:
                found.extend(await self.list_backups(node, storage, shared=shared))
            except ProviderError as exc:
                seen.backup_errors[storage] = str(exc)
        if seen.backup_errors:
            return None
        return tuple(sorted(found, key=lambda b: (b.vmid, b.ctime, b.volid)))

    async def list_backups(
        self, node: str, storage: str, *, shared: bool, vmid: int | None = None
    ) -> list[BackupVolume]:
        """One `GET .../storage/{storage}/content?content=backup[&vmid=N]`, under the retry
        policy."""
        content = self.pve.client.nodes(node).storage(storage).content
        query: dict[str, Any] = {"content": "backup"}
        if vmid is not None:
            query["vmid"] = vmid
        self.calls_listing += 1
        items = await self.pve.get(f"list backups on {node}/{storage}", content, **query)
        volumes = (backup_volume(i, storage, None if shared else node) for i in items)
        return [v for v in volumes if v is not None]

    # --- apply -----------------------------------------------------------------------------

    async def apply(self, change: Change) -> None:
        if change.kind is not Kind.BACKUP_JOB:
            raise PermanentError(f"{change.address}: no provider for kind {change.kind.value}")
        refuse_blocked(change)
        ident = change_job_id(change)
        jobs = self.pve.client.cluster.backup
        match change.action:
            case Action.CREATE:
                assert change.after is not None
                params = job_params(self.platform, change.address, change.after, ident)
                await self.pve.retrying(
                    f"create {change.address}", lambda: jobs.post(id=ident, **params)
                )
            case Action.UPDATE | Action.REPLACE:
                assert change.after is not None
                await self._require_ours(change, ident)
                params = job_params(self.platform, change.address, change.after, ident)
                dropped = [k for k in _OPTIONAL if k not in params]
                if dropped:
                    params["delete"] = ",".join(dropped)
                await self.pve.retrying(
                    f"update {change.address}", lambda: jobs(ident).put(**params)
                )
            case Action.DELETE:
                try:
                    await self._require_ours(change, ident)
                except NotFoundError:
                    return  # already gone
                await self.pve.retrying(f"delete {change.address}", lambda: jobs(ident).delete())
            case _:
                raise PermanentError(f"{change.address}: cannot {change.action.value} a job")

    async def _require_ours(self, change: Change, ident: str) -> None:
        """Read the job again and find our mark for this address on it: a job someone else
        put under our id in between is never changed or deleted."""
        job = await self.pve.get(f"read {change.address}", self.pve.client.cluster.backup(ident))
        claim, _ = read_job_mark(job.get("comment"), ident)
        if claim != JobClaim(self.platform, change.address):
            raise PermanentError(
                f"{change.address}: job {ident} does not carry this platform's mark for it; "
                "left alone"
            )
