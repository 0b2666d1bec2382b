"""Adoption: mark guests, firewall objects and backup jobs that exist already as the
controller's, so it manages them from then on. Called by `reconciler adopt ADDR...` once the
imported (or written) specs have been reviewed; until then the planner only reports such guests
(`adoption-pending`).

What adopting writes, and nothing else:
- a guest (`guest/<name>`): the owner tag added to its tags, and the mark line
  (`reconciler:v1 platform=.. address=.. vmid=.. template=.. adopted=<dir>`) appended to its
  description, whose text is kept. The template is the spec's, so planning sees no template
  change. `adopted` is the spec directory read (`--dir` as given, `os.path.normpath`ed;
  percent-encoded in the line, see `proxmox.mark_line`): a plan of another directory that
  lacks the guest names it and the merge that brings it there (planner `adopted-elsewhere`).
  It is provenance only: ownership stays platform, address and vmid. The config PUT
  carries the digest read during the checks: a guest edited in between is not overwritten
  (the adoption fails for it; run adopt again after a look);
- an alias, IP set or security group (`firewall/alias|ipset|group/<name>`): the comment mark
  `[reconciler:<platform>]` appended to its comment, with the list's digest;
- a backup job (`backup/<name>`): the job under the spec's `id` (default `rc-<name>`) gets the
  mark `reconciler:v1 platform=.. address=.. id=<its id>` at the end of its comment, whose text
  is kept (`PUT /cluster/backup/{id} comment=...`), and nothing else: the job is neither
  recreated nor renamed. Jobs have no digest: the job is read again just before, and written
  only if it is still as it was checked.

Refused, with nothing written for any address, when one address is not in the specs (the
refusal names the directory read: adopting from the wrong one is the usual cause), is not a
guest, a named firewall object or a backup job, names a vmid that is free or held by a
template, names a guest whose name, kind or node differs from the spec's (planning would
replace or rename it), which is locked, or which carries another platform's mark (or ours for
another address); or names a job id no job has, or a job whose address another job of ours
has already. A guest, object or job already ours is reported and left alone. A guest's own
firewall follows its guest: it is managed once the guest is adopted.
"""

from __future__ import annotations

import os.path
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from reconciler.model.errors import ConflictError, ProviderError
from reconciler.model.resources import DesiredGraph, Kind, job_id
from reconciler.planning import backups, diffing, normalize
from reconciler.planning.provenance import spec_directory
from reconciler.providers.firewall import (
    clean_rule,
    ipset_entry_of,
    read_comment_mark,
    with_comment_mark,
)
from reconciler.providers.proxmox import (
    ProxmoxProvider,
    claimed,
    guest_attributes,
    read_mark,
    with_mark,
)
from reconciler.providers.proxmox_backup import (
    JobClaim,
    job_attributes,
    job_comment,
    read_job_mark,
)

_NAMED = (Kind.FIREWALL_ALIAS, Kind.FIREWALL_IPSET, Kind.FIREWALL_GROUP)


@dataclass
class Adoption:
    """One address: what it is in Proxmox, what is (or would be) written, and how it went."""

    address: str
    target: str  # e.g. "lxc 1001 on pve-runtime", "alias api"
    writes: dict[str, str] = field(default_factory=dict)  # parameter -> new value
    status: str = "pending"  # adopted, would adopt, already owned, failed
    error: str = ""
    # Fields the first apply after adoption would change (the spec and Proxmox disagree).
    drift: list[str] = field(default_factory=list)
    _send: Callable[[], Awaitable[None]] | None = field(default=None, repr=False)


@dataclass
class AdoptionReport:
    adoptions: list[Adoption] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)  # address -> why

    @property
    def ok(self) -> bool:
        return not self.refused and all(a.status != "failed" for a in self.adoptions)


class _Refused(Exception):
    pass


async def adopt(
    graph: DesiredGraph,
    provider: ProxmoxProvider,
    addresses: Iterable[str],
    *,
    dry_run: bool = False,
    spec_dir: str | None = None,
) -> AdoptionReport:
    """Check every address, then (unless one is refused, or `dry_run`) write each one's
    marks. Only the named addresses are touched. `spec_dir`: the directory the graph was read
    from, as the refusals name it (default: found from the graph's positions)."""
    report = AdoptionReport()
    where = spec_dir or spec_directory(graph)
    # The mark's `adopted`: the directory as given, `specs/` and `./specs` alike as `specs`.
    adopted = os.path.normpath(where) if where else None
    wanted = list(dict.fromkeys(a.strip().rstrip("/") for a in addresses))
    inventory = {int(i["vmid"]): i for i in (await provider.inventory()).guests}
    for address in wanted:
        try:
            report.adoptions.append(
                await _check(graph, provider, inventory, address, where, adopted)
            )
        except _Refused as exc:
            report.refused[address] = str(exc)
        except ProviderError as exc:
            report.refused[address] = f"cannot read it: {exc}"
    if report.refused or dry_run:
        for a in report.adoptions:
            if a.status == "pending":
                a.status = "would adopt" if not report.refused else "not adopted"
        return report
    for a in report.adoptions:
        if a._send is None:
            continue
        try:
            await a._send()
            a.status = "adopted"
        except ConflictError:
            a.status, a.error = "failed", "changed since it was read; look again, then re-run"
        except ProviderError as exc:
            a.status, a.error = "failed", str(exc)
    return report


async def _check(
    graph: DesiredGraph,
    provider: ProxmoxProvider,
    inventory: Mapping[int, Mapping[str, Any]],
    address: str,
    spec_dir: str | None = None,
    adopted: str | None = None,
) -> Adoption:
    res = graph.resources.get(address)
    if res is None:
        raise _Refused(_not_in_specs(graph, address, spec_dir))
    if res.kind is Kind.GUEST:
        return await _check_guest(graph, provider, inventory, address, adopted)
    if res.kind in _NAMED:
        adoption = await _check_named(provider, graph.platform, res.kind, res.name, address)
        if adoption.status != "already owned":
            adoption.drift = await _named_drift(provider, res.kind, res.name, dict(res.attributes))
        return adoption
    if res.kind is Kind.BACKUP_JOB:
        return await _check_job(graph, provider, address)
    if res.kind is Kind.FIREWALL_GUEST:
        raise _Refused(f"a guest's firewall follows its guest: adopt guest/{res.name}")
    raise _Refused(f"a {res.kind.value} is not adopted: apply writes it")


def _not_in_specs(graph: DesiredGraph, address: str, spec_dir: str | None) -> str:
    """Why an address cannot be adopted from these specs, naming the directory read (`adopt`
    reads `--dir`, `specs` by default; the guests `import` wrote are in its `--out`)."""
    where = f" in {spec_dir}" if spec_dir else ""
    kind = address.split("/", 1)[0]
    same = sum(1 for r in graph.resources.values() if r.address.split("/", 1)[0] == kind)
    return (
        f"not in the specs{where} ({same} {kind} entries there); adopt reads the directory "
        "--dir names: pass the one that defines it (the `import --out` directory, or the "
        "specs it was merged into)"
    )


async def _check_guest(
    graph: DesiredGraph,
    provider: ProxmoxProvider,
    inventory: Mapping[int, Mapping[str, Any]],
    address: str,
    adopted: str | None = None,
) -> Adoption:
    """A guest: checked against the spec, then its tag and mark (`adopted`: the directory the
    mark names, see the module docstring) to write."""
    want = graph.resources[address].attributes
    vmid = want.get("vmid")
    if vmid is None:
        raise _Refused("the spec gives it no vmid, so no existing guest is meant")
    item = inventory.get(int(vmid))
    if item is None:
        raise _Refused(f"no guest holds vmid {vmid}; apply creates it")
    kind, node = str(item.get("type")), str(item.get("node"))
    target = f"{kind} {vmid} on {node}"
    if item.get("template"):
        raise _Refused(f"{target} is a template: templates are never managed")
    if kind != want.get("type", "lxc"):
        raise _Refused(f"{target} is a {kind}; the spec says {want.get('type')}")
    if node != want.get("node"):
        raise _Refused(f"{target} runs on node {node}; the spec says {want.get('node')}")
    api = provider.client.nodes(node)(kind)(int(vmid))
    config: dict[str, Any] = await provider.retrying(
        f"read config of {vmid}", lambda: api.config.get()
    )
    name = config.get("hostname") or config.get("name") or item.get("name")
    if name != want.get("name"):
        raise _Refused(f"{target} is named {name!r}; the spec says {want.get('name')!r}")
    if config.get("lock"):
        raise _Refused(f"{target} is locked ({config['lock']}); try again when it clears")
    mark, description = read_mark(config.get("description"))
    platform, owner_tag = graph.platform, str(graph.settings.get("owner_tag", "reconciler"))
    if mark.get("platform") not in (None, platform):
        raise _Refused(f"{target} carries the mark of platform {mark.get('platform')!r}")
    if mark and claimed(mark, platform, int(item["vmid"])) is None:
        raise _Refused(
            f"{target} carries a mark written for vmid {mark.get('vmid')} (a copy made by hand?); "
            "remove its description's last line before adopting it"
        )
    if mark.get("platform") == platform and mark.get("address") != address:
        raise _Refused(f"{target} is already this platform's, as {mark.get('address')}")
    tags = sorted({t for t in str(config.get("tags") or "").split(";") if t})
    writes: dict[str, str] = {}
    if owner_tag not in tags:
        writes["tags"] = ";".join(sorted({*tags, owner_tag}))
    if not mark:
        writes["description"] = with_mark(
            description, platform, address, want.get("template"), int(item["vmid"]), adopted
        )
    after = {**config, **writes}
    adoption = Adoption(address, target, writes, drift=_guest_drift(want, item, after))
    if not writes:
        adoption.status = "already owned"
        return adoption
    params = {**writes, "digest": config.get("digest")}

    async def send() -> None:
        await provider.run_task(f"adopt {address}", node, lambda: api.config.put(**params))

    adoption._send = send
    return adoption


def _guest_drift(
    want: Mapping[str, Any], item: Mapping[str, Any], config: Mapping[str, Any]
) -> list[str]:
    """The fields the next plan would change once the guest carries the mark."""
    have = guest_attributes(item, config)
    desired, observed = normalize.pair(Kind.GUEST, dict(want), have)
    return [f.path for f in diffing.diff(Kind.GUEST, desired, observed)]


async def _named_drift(
    provider: ProxmoxProvider, kind: Kind, name: str, want: dict[str, Any]
) -> list[str]:
    """The fields the next plan would change once the alias, IP set or group is ours (its
    comment aside: the mark goes there)."""
    fw = provider.client.cluster.firewall
    have: dict[str, Any]
    if kind is Kind.FIREWALL_ALIAS:
        items = await provider.retrying("read firewall aliases", lambda: fw.aliases.get())
        item: Mapping[str, Any] = next(
            (i for i in items if str(i["name"]).lower() == name.lower()), {}
        )
        have = {"cidr": item.get("cidr")}
    elif kind is Kind.FIREWALL_IPSET:
        raw = await provider.retrying(f"read IP set {name}", lambda: fw.ipset(name).get())
        have = {"entries": sorted(ipset_entry_of(e) for e in raw)}
    else:
        raw = await provider.retrying(f"read security group {name}", lambda: fw.groups(name).get())
        have = {"rules": [clean_rule(r) for r in raw]}
    desired, observed = normalize.pair(kind, {k: v for k, v in want.items() if k in have}, have)
    return [f.path for f in diffing.diff(kind, desired, observed)]


async def _check_named(
    provider: ProxmoxProvider, platform: str, kind: Kind, name: str, address: str
) -> Adoption:
    fw = provider.client.cluster.firewall
    what = kind.value.removeprefix("firewall/")
    target = f"{'IP set' if kind is Kind.FIREWALL_IPSET else what} {name}"
    key = "group" if kind is Kind.FIREWALL_GROUP else "name"
    endpoint = {
        Kind.FIREWALL_ALIAS: fw.aliases,
        Kind.FIREWALL_IPSET: fw.ipset,
        Kind.FIREWALL_GROUP: fw.groups,
    }[kind]

    async def find() -> Mapping[str, Any] | None:
        items: Sequence[Mapping[str, Any]] = await provider.retrying(
            f"read firewall {what}s", lambda: endpoint.get()
        )
        return next((i for i in items if str(i[key]).lower() == name.lower()), None)

    item = await find()
    if item is None:
        raise _Refused(f"no {target} exists; apply creates it")
    marked, comment = read_comment_mark(item.get("comment"))
    if marked not in (None, platform):
        raise _Refused(f"{target} carries the mark of platform {marked!r}")
    adoption = Adoption(address, target)
    if marked == platform:
        adoption.status = "already owned"
        return adoption
    new = with_comment_mark(comment, platform)
    adoption.writes = {"comment": new}
    real = str(item[key])
    seen = {k: v for k, v in item.items() if k != "digest"}

    async def send() -> None:
        # One digest covers the whole list, and adopting its other items changes it: read it
        # again, and write only if this item is still as it was checked.
        now = await find()
        if now is None or {k: v for k, v in now.items() if k != "digest"} != seen:
            raise ConflictError(f"{target} changed since it was read")
        digest = now.get("digest")
        if kind is Kind.FIREWALL_ALIAS:
            cidr = now.get("cidr")
            call: Callable[[], Any] = lambda: fw.aliases(real).put(  # noqa: E731
                cidr=cidr, comment=new, digest=digest
            )
        elif kind is Kind.FIREWALL_IPSET:
            call = lambda: fw.ipset.post(  # noqa: E731
                name=real, rename=real, comment=new, digest=digest
            )
        else:
            call = lambda: fw.groups.post(  # noqa: E731
                group=real, rename=real, comment=new, digest=digest
            )
        await provider.retrying(f"adopt {address}", call)

    adoption._send = send
    return adoption


async def _check_job(graph: DesiredGraph, provider: ProxmoxProvider, address: str) -> Adoption:
    """A backup job: the one under the spec's id, unmarked (or already ours for `address`),
    and no other job of ours for the same address."""
    want = graph.resources[address].attributes
    ident = str(want.get("id") or job_id(address))
    target = f"backup job {ident}"
    api = provider.client.cluster.backup
    listed = await provider.retrying("list backup jobs", lambda: api.get(), read=True)
    jobs = {str(j["id"]): j for j in listed if j.get("id")}
    job = jobs.get(ident)
    if job is None:
        hint = "" if "id" in want else " (to adopt one that exists, give the spec's job its id)"
        raise _Refused(f"no backup job {ident} exists; apply creates it{hint}")
    ours = JobClaim(graph.platform, address)
    for other, j in sorted(jobs.items()):
        if other != ident and read_job_mark(j.get("comment"), other)[0] == ours:
            raise _Refused(f"backup job {other} is this platform's {address} already")
    claim, description = read_job_mark(job.get("comment"), ident)
    if claim == ours:
        return Adoption(address, target, status="already owned")
    if claim is not None:
        if claim.platform != graph.platform:
            raise _Refused(f"{target} carries the mark of platform {claim.platform!r}")
        raise _Refused(f"{target} is already this platform's, as {claim.address}")
    comment = job_comment(graph.platform, address, description, ident)
    adoption = Adoption(
        address,
        target,
        {"comment": comment},
        drift=_job_drift(graph, address, job_attributes(job, description)),
    )
    seen = _job_as_read(job)

    async def send() -> None:
        now = await provider.retrying(f"read {target}", lambda: api(ident).get(), read=True)
        if _job_as_read(now) != seen:
            raise ConflictError(f"{target} changed since it was read")
        await provider.retrying(f"adopt {address}", lambda: api(ident).put(comment=comment))

    adoption._send = send
    return adoption


def _job_as_read(job: Mapping[str, Any]) -> dict[str, Any]:
    """A job's options, to compare two reads: `next-run` is computed from the time (and only
    the list has it)."""
    return {k: v for k, v in job.items() if k != "next-run"}


def _job_drift(graph: DesiredGraph, address: str, have: dict[str, Any]) -> list[str]:
    """The fields the next plan would change once the job carries the mark: its selection as
    the vmids the spec gives its guests (a guest without one in the spec is left out)."""
    res = graph.resources[address]
    vmids = {
        a: int(r.attributes["vmid"])
        for a, r in graph.resources.items()
        if r.kind is Kind.GUEST and r.attributes.get("vmid") is not None
    }
    desired = {**res.attributes, "vmid": backups.job_vmids(res, vmids)}
    want, observed = normalize.pair(Kind.BACKUP_JOB, desired, have)
    return [f.path for f in diffing.diff(Kind.BACKUP_JOB, want, observed)]
