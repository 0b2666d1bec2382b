"""Make a Plan: pair desired resources with observed ones by address, allocate missing vmids,
diff, and order the changes.

Called by `reconciler plan` (offline against a snapshot, or live after observing) and by the
controller's cycle. Pure: the same graph and observed state always give the same plan.

Pairing (gitops-engine's reconcile): desired only -> create; observed only -> delete, and only
for what carries our mark; both -> diff, which gives no-op, update, migrate or replace. An
address that two observed resources claim (a guest copied by hand, with its mark) is a plan
error naming both, and nothing of it is planned, so neither is ever destroyed for the other.
A guest whose vmid changes is replaced: the observed vmid is destroyed, the new one created.
An owned guest missing from the spec whose mark names the template `reconciler import` writes
was adopted from an import's directory never merged into this one: the plan says so
(`adopted-elsewhere`, in place of `orphan`, and in the delete's reason) whether or not pruning
lets the delete through (planning.provenance).

Data safety. A guest whose only change that cannot be made in place is its node (and with it,
perhaps, its disks' storage) is migrated, never replaced. A change that destroys a disk (a
guest's replace or delete, an update that detaches a volume the spec dropped) says what it
destroys (`Change.destroys`) and needs pruning (`platform.prune` or `--allow-destroy`); without
it, it stays in the plan `blocked` and is never applied. Allowed ones count toward
`max_deletes_per_run`. A smaller disk is a plan error: Proxmox cannot shrink one, and the
planner never destroys one to get there; so is a volume's new storage (the controller never
moves a volume: Proxmox's move-volume does), but in a VM's migration, which carries its disks
to the storages the spec names when one `targetstorage` map can say it. Deletes of owned
firewall objects (aliases, IP sets, groups) need pruning too. A guest's firewall is never
deleted on its own: it goes with its guest, and a guest whose spec lost its firewall section
keeps what it has, unmanaged. The cluster options are never deleted. A guest's firewall is
addressed through its guest's allocation (node, vmid, type), so a recreated guest gets its
firewall back in the same apply. A declared template (`templates:`) is created (downloaded)
or left alone: a file carries no mark, so one that left the spec is never deleted, and one
missing with no url to download it from is a plan warning.

Pools and HA. A pool is deleted only with pruning (it may carry permissions); its members are
planned by planning.pools (only guests that exist: a new one joins in its own create). An HA
resource attached to a guest is recreated with it, goes with it when the guest leaves the spec,
and is removed without pruning when only `ha` left the guest (that destroys nothing). HA owns
the power of the guests it manages: their `state` is never planned as a start or stop, but
healed through their HA resource (planning.ha).

Readiness gate (`agent_layers`, and the observed state's per-guest `health`): a Velocity
registration, and a route whose `when_unready` is `withhold`, is planned only while its target
guest (the last of its `depends_on`, as the graph builds them) runs and its agent reports ready.
Otherwise it is withheld: not created, and deleted (unregistered) if it exists. A guest without
a health entry is taken as not ready when its layer runs agents (`agent_layers`): the platform
registers a game server only while its agent says ready, and an agent nobody asked has said
nothing. Guests of other layers have no agent to ask, so nothing to them is gated; with no
`agent_layers` (an offline plan from a snapshot without health) only recorded health gates.
Each withheld resource is a warning, and so is every running guest whose agent cannot be
reached, naming the guest and the agent's error. A route or registration to a VM with
`agent: true` and no static address goes to the address its agent reports, and is withheld
the same way while none is known (planning.backends). An observer that failed (`observed.errors`)
is a warning too: its kind is left out of the plan, and the rest of the platform is planned.

`observed_checks` run on the observed state after the changes are made and add diagnostics
(`planning.observed_policies`: the platform's isolation, checked on the live firewall).
"""

from __future__ import annotations

import datetime
import shlex
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from reconciler.model.diagnostics import Diagnostic, error, warning
from reconciler.model.disks import storage_map
from reconciler.model.observed import GuestHealth, ObservedResource, ObservedState
from reconciler.model.plans import (
    HOLD_START,
    RESTORE_FROM,
    START_GUEST,
    Action,
    BackupFreshness,
    Cause,
    Change,
    FieldChange,
    FinalBackup,
    Freshness,
    Plan,
)
from reconciler.model.resources import DesiredGraph, Kind, Resource, ha_sid, job_id, kind_of
from reconciler.model.units import format_seconds, parse_mib
from reconciler.planning import backends, backups, clones, diffing, ha, normalize, placement, pools
from reconciler.planning.provenance import (
    adopt_command,
    adopted_from_import,
    adopted_into,
    same_directory,
    spec_digest,
    spec_directory,
)

_ACTIVE = (Action.CREATE, Action.REPLACE)
# What may change along with a guest's node in one migration: its disks' target storage.
_MIGRATES = frozenset({"node", "rootfs.storage"})
NEEDS_PRUNE = "needs platform.prune or --allow-destroy"
BLOCKED_WHY = f"destroys data: {NEEDS_PRUNE}"
_NAMED_FIREWALL = (Kind.FIREWALL_ALIAS, Kind.FIREWALL_IPSET, Kind.FIREWALL_GROUP)

# A check of the observed state: (observed, addresses this plan changes) -> diagnostics.
ObservedCheck = Callable[[ObservedState, frozenset[str]], Iterable[Diagnostic]]


def allocate_vmids(
    graph: DesiredGraph, observed: ObservedState
) -> tuple[dict[str, int], list[Diagnostic]]:
    """Every desired guest's vmid: explicit in the spec; else the one it already holds (read back
    from our mark); else the lowest id of its role's range that nobody holds or wants."""
    owned = observed.owned()
    taken = {r.id.get("vmid") for r in observed.resources if r.kind is Kind.GUEST}
    guests = [r for r in graph.ordered() if r.kind is Kind.GUEST]
    result: dict[str, int] = {}
    for res in guests:
        vmid = res.attributes.get("vmid")
        if vmid is not None:
            result[res.address] = vmid
        elif res.address in owned and owned[res.address].id.get("vmid") is not None:
            result[res.address] = owned[res.address].id["vmid"]
    taken |= set(result.values())
    diags: list[Diagnostic] = []
    ranges: Mapping[str, Any] = graph.settings.get("ranges", {})
    for res in sorted(guests, key=lambda r: r.address):
        if res.address in result:
            continue
        rng = ranges.get(res.attributes.get("role", ""))
        if rng is None:
            continue
        vmid = next((v for v in range(rng["first"], rng["last"] + 1) if v not in taken), None)
        if vmid is None:
            diags.append(
                error(
                    "range-exhausted",
                    f"no free vmid left in range {res.attributes['role']!r} "
                    f"({rng['first']}-{rng['last']}) for {res.address}",
                    position=res.position,
                    address=res.address,
                )
            )
            continue
        result[res.address] = vmid
        taken.add(vmid)
    return result, diags


@dataclass
class _Planning:
    """What planning one graph against one observation works from, and what it has made so far."""

    graph: DesiredGraph
    observed: ObservedState
    vmids: dict[str, int]
    prune: bool
    final_backups: bool
    diags: list[Diagnostic] = field(default_factory=list)
    changes: dict[str, Change] = field(default_factory=dict)
    unplaced: frozenset[str] = frozenset()
    withheld: Mapping[str, str] = field(default_factory=dict)
    # Routes and registrations to a DHCP VM, at its agent's address (planning.backends).
    backends: Mapping[str, dict[str, Any]] = field(default_factory=dict)
    contested: frozenset[str] = frozenset()
    owned: dict[str, ObservedResource] = field(default_factory=dict)
    foreign_vmids: dict[int, ObservedResource] = field(default_factory=dict)
    foreign_ha: dict[str, ObservedResource] = field(default_factory=dict)  # by sid
    owned_by_vmid: dict[int, ObservedResource] = field(default_factory=dict)
    observed_kinds: set[Kind] | None = None
    spec_dir: str | None = None  # where the specs were read from, for the hints' commands


def make_plan(
    graph: DesiredGraph,
    observed: ObservedState,
    *,
    allow_destroy: bool = False,
    targets: Iterable[str] = (),
    observed_checks: Iterable[ObservedCheck] = (),
    agent_layers: Iterable[str] = (),
    final_backups: bool = True,
    now: datetime.datetime | None = None,
) -> Plan:
    """The plan for `graph` against `observed`. `final_backups` off (`--no-final-backup`):
    destroys go without the backup a job would take first. `now`: when backup ages are
    measured from (default: when the state was observed)."""
    p = _start(graph, observed, allow_destroy, frozenset(agent_layers), final_backups)
    for res in graph.ordered():
        change = _plan_resource(p, res)
        if change is not None:
            p.changes[res.address] = change
    _firewall_first(p.changes, graph)
    ordered = _with_deletes(p, allow_destroy)
    if targets:
        ordered = _only_targets(ordered, graph, set(targets))
    freshness = _backup_freshness(p, now)
    foreign = tuple(_foreign_summary(r, graph) for r in observed.foreign() if r.kind is Kind.GUEST)
    changing = frozenset(
        c.address for c in ordered if c.action is not Action.NOOP and not c.blocked
    )
    for check in observed_checks:
        p.diags.extend(check(observed, changing))
    return Plan(
        platform=graph.platform,
        changes=tuple(ordered),
        observed_digest=observed.digest(),
        observed_at=observed.observed_at,
        observed_source=observed.source,
        foreign=tuple(sorted(foreign, key=lambda f: (f.get("vmid") or 0, str(f.get("name"))))),
        diagnostics=tuple(p.diags),
        # What it was made from, so that a saved plan can be planned again (README "Plans").
        spec_digest=spec_digest(graph),
        allow_destroy=allow_destroy,
        targets=tuple(sorted(set(targets))),
        final_backups=final_backups,
        backups=tuple(freshness),
    )


def _start(
    graph: DesiredGraph,
    observed: ObservedState,
    allow_destroy: bool,
    agent_layers: frozenset[str],
    final_backups: bool,
) -> _Planning:
    """Everything decided before any resource is planned: vmids, placement, what an observer
    could not see, the readiness gate, and addresses that two resources claim."""
    vmids, diags = allocate_vmids(graph, observed)
    p = _Planning(
        graph,
        observed,
        vmids,
        prune=allow_destroy or bool(graph.settings.get("prune")),
        final_backups=final_backups,
        diags=diags,
        spec_dir=spec_directory(graph),
    )
    # Against the live cluster: a guest that cannot go where the spec says gets nothing.
    placed = placement.check_placement(graph, observed, vmids)
    p.diags.extend(placed.diagnostics)
    p.unplaced = frozenset(placed.unplaced)
    for kind, message in sorted(observed.errors.items()):
        p.diags.append(
            warning(
                "observe-failed",
                f"{kind} could not be observed, so it is left out of this plan: {message}",
            )
        )
    p.withheld, more = _readiness(graph, observed, agent_layers)
    p.diags.extend(more)
    p.backends, p.withheld, more = _dhcp_backends(graph, observed, p.withheld)
    p.diags.extend(more)
    p.diags.extend(_serving(graph, observed))
    p.contested, more = _contested(graph, observed)
    p.diags.extend(more)
    p.owned = observed.owned()
    p.foreign_vmids = {
        r.id["vmid"]: r for r in observed.foreign() if r.kind is Kind.GUEST and "vmid" in r.id
    }
    p.foreign_ha = ha.foreign_index(observed)
    p.owned_by_vmid = {
        r.id["vmid"]: r
        for r in observed.resources
        if r.owned and r.address and r.kind is Kind.GUEST and "vmid" in r.id
    }
    p.observed_kinds = set(observed.kinds) if observed.kinds is not None else None
    return p


def _skipped(p: _Planning, res: Resource) -> bool:
    """A resource planned elsewhere or not at all (each reason is reported where it is found)."""
    if p.observed_kinds is not None and res.kind not in p.observed_kinds:
        return True  # nobody looked: planning it would create it again on every run
    if res.address in p.contested or res.attached_to in p.contested:
        return True  # two guests claim it: reported by _contested, neither is touched
    if res.address in p.withheld:
        return True  # not ready: deleted by _deletes if it exists
    # Its node, storage or template is not there: reported by placement.
    return res.address in p.unplaced or res.attached_to in p.unplaced


def _plan_resource(p: _Planning, res: Resource) -> Change | None:
    """One desired resource's change, or None when it gets none (said in a diagnostic)."""
    if _skipped(p, res):
        return None
    allocated = _with_vmid(res, p.vmids)
    if allocated is None:
        return None  # a guest without a vmid (its range is full): reported by allocate_vmids
    desired, ident = allocated
    if res.address in p.backends:
        desired = dict(p.backends[res.address])  # a DHCP VM's, at its agent's address
    if res.kind is Kind.FIREWALL_GUEST:
        home = _guest_home(p.graph, res, p.vmids, p.changes, p.observed_kinds)
        if home is None:
            return None  # its guest is not planned (a vmid problem): nothing to address
        ident = home
    if res.kind is Kind.HA and _guest_unplanned(p, res):
        return None  # its guest is not planned (a vmid problem): no sid to address
    if res.kind is Kind.POOL:
        desired = _pool_members_now(p, res, desired)
    obs = p.owned.get(res.address)
    if obs is not None and res.kind is Kind.HA and _guests_observed(p):
        # Its sid must be its guest's, or the update would start or stop another guest.
        mismatch = ha.sid_mismatch(obs, p.owned.get(str(res.attributes["guest"])), res.position)
        if mismatch is not None:
            p.diags.append(mismatch)
            return None
    wave = p.graph.waves[res.address]
    if obs is None:
        change = _create(p, res, desired, ident, wave)
    else:
        change = _update(p, res, desired, ident, obs, wave)
    if change is None:
        return None
    if res.kind is Kind.GUEST:
        wrong = [d for d in (_shrinks(res, change), _moves_volumes(res, change)) if d]
        if wrong:
            p.diags.extend(wrong)
            return None
        owner = ha.power_owner(p.graph, p.foreign_ha, res, desired)
        if owner is not None:  # HA owns its power: no start or stop of ours (planning.ha)
            change, said = ha.leave_power_to_ha(change, owner, p.observed, res, p.graph.platform)
            p.diags.extend(said)
    parent = p.changes.get(res.attached_to) if res.attached_to else None
    if (
        parent is not None
        and parent.action in _ACTIVE
        and not parent.blocked
        and change.action not in _ACTIVE
    ):
        change = replace(
            _creation(res, desired, ident, wave, f"{parent.address} is {parent.action.value}d"),
            before=change.before,
            fields=change.fields,
            cause=Cause.WITH_PARENT,
        )
    return change


def _guest_unplanned(p: _Planning, res: Resource) -> bool:
    """A resource attached to a guest that was observed but got no change (a vmid or name
    problem, said where it was found): nothing of it can be addressed."""
    return _guests_observed(p) and res.attached_to not in p.changes


def _guests_observed(p: _Planning) -> bool:
    return p.observed_kinds is None or Kind.GUEST in p.observed_kinds


def _pool_members_now(p: _Planning, res: Resource, desired: dict[str, Any]) -> dict[str, Any]:
    """A pool's members reconciled in this plan (planning.pools.present_members), at the
    vmids of the owned guests observed (never the desired ones: another guest may hold it)."""
    existing = {
        a: int(r.id["vmid"]) for a, r in p.owned.items() if r.kind is Kind.GUEST and "vmid" in r.id
    }
    positions = {a: r.position for a, r in p.graph.resources.items() if r.kind is Kind.GUEST}
    homes = pools.foreign_homes(p.observed)
    desired, said = pools.present_members(res, desired, existing, homes, positions)
    p.diags.extend(said)
    return desired


def _creation(
    res: Resource, desired: dict[str, Any], ident: dict[str, Any], wave: int, reason: str
) -> Change:
    return Change(
        res.address,
        res.kind,
        Action.CREATE,
        wave,
        ident,
        None,
        desired,
        depends_on=res.depends_on,
        reason=reason,
        cause=Cause.MISSING,
    )


def _create(
    p: _Planning, res: Resource, desired: dict[str, Any], ident: dict[str, Any], wave: int
) -> Change | None:
    """Desired, nothing observed: create it; a guest a backup job selects, from its newest
    backup. None when its vmid or name is taken (an error says so)."""
    problem = _vmid_conflict(
        res, desired, p.foreign_vmids, p.owned_by_vmid, p.spec_dir
    ) or _name_conflict(res, p.observed, p.graph.platform, p.spec_dir)
    if res.kind is Kind.POOL:
        problem = problem or pools.held_by_foreign(res, p.observed.resources, p.graph.platform)
    elif res.kind is Kind.HA:
        problem = problem or ha.held_by_foreign(res, ident["sid"], p.foreign_ha, p.graph.platform)
    if problem:
        p.diags.append(problem)
        return None
    if res.kind is Kind.TEMPLATE and not desired.get("url"):
        p.diags.append(_undownloadable(res))
        return None
    if res.kind is Kind.GUEST and desired.get("clone"):
        # The template it is cloned from is there, and is one (planning.clones).
        source, problem = clones.clone_source(res, desired, p.observed)
        if problem:
            p.diags.append(problem)
            return None
        if source is not None:
            desired = {**desired, "clone": source}
    change = _creation(res, desired, ident, wave, "not found")
    return _restored(p, res, change) if res.kind is Kind.GUEST else change


def _undownloadable(res: Resource) -> Diagnostic:
    """A declared template missing from its node, with no url to download it from (`import`
    writes templates so): nothing can put it there. A warning: the guests already there do not
    need it; one to be created from it is a placement error of its own."""
    a = res.attributes
    return warning(
        "template-missing",
        f"{res.address}: {a['volid']} is not on node {a['node']}, and the template has no url "
        "to download it from: set its url and checksum, or put the file there",
        position=res.position,
        address=res.address,
    )


def _restored(p: _Planning, res: Resource, change: Change) -> Change:
    """A missing guest's create from its newest backup, when a job selects it (see
    planning.backups.restore_point); held back when its backups could not be listed: it is
    never created empty over a world that may have a backup."""
    assert change.after is not None
    if p.observed.backups is None and not p.observed.backup_errors:
        return change  # nobody looked at backups (no jobs, an older snapshot)
    vmid = int(change.after["vmid"])
    point, why = backups.restore_point(p.graph, res, vmid, p.observed.backups)
    if point is not None:
        after = {
            **change.after,
            RESTORE_FROM: {"volid": point.volid, "storage": point.storage, "ctime": point.ctime},
        }
        when = datetime.datetime.fromtimestamp(point.ctime, datetime.UTC)
        age = max(0, int(_observed_time(p.observed).timestamp()) - point.ctime)
        return replace(
            change,
            after=after,
            cause=Cause.RESTORE,
            reason=f"restored from its backup of {when:%Y-%m-%d %H:%M} UTC, "
            f"{format_seconds(age)} old",
        )
    if why:
        p.diags.append(
            warning(
                "restore-unknown",
                f"{res.address} is missing and not created: {why}; it may have a backup to be "
                "restored from (set restore_missing: never to create it empty)",
                position=res.position,
                address=res.address,
            )
        )
        return replace(change, blocked=f"not created empty: {why}")
    return change


def _update(
    p: _Planning,
    res: Resource,
    desired: dict[str, Any],
    ident: dict[str, Any],
    obs: ObservedResource,
    wave: int,
) -> Change | None:
    """Desired and observed: compare. A destroy (a guest's replace, a volume's detach) is
    blocked without pruning. None when a renumbered guest's new vmid is taken."""
    if res.kind is Kind.GUEST and desired["vmid"] != obs.id.get("vmid"):
        # Renumbered: the new vmid must be free, or the replace would destroy the old guest
        # and then fail to create the new one.
        problem = _vmid_conflict(res, desired, p.foreign_vmids, p.owned_by_vmid, p.spec_dir)
        if problem:
            p.diags.append(problem)
            return None
    change = _compare(res, desired, obs, wave)
    if ident and res.kind is Kind.FIREWALL_GUEST:
        change = replace(change, id=ident)
    # A guest's replace destroys it whole, whatever disks were seen (none listed: a config
    # read without them is no reason to let it through).
    replaces = change.action is Action.REPLACE
    if replaces and (change.destroys or res.kind is Kind.GUEST):
        change = _final_backup(p, change)
        if not p.prune:
            change = replace(change, blocked=BLOCKED_WHY)
            p.diags.append(_blocked_replace(res, change))
    elif res.kind is Kind.GUEST and (gone := _detached(change)):
        change = replace(change, destroys=gone)
        if not p.prune:
            change = replace(change, blocked=BLOCKED_WHY)
            p.diags.append(_blocked_detach(res, change))
    elif res.kind is Kind.BACKUP_JOB and (fewer := _fewer_kept(change)):
        # Proxmox prunes by the new retention at the job's next run: backups are destroyed.
        change = replace(change, destroys=(fewer,))
        if not p.prune:
            change = replace(change, blocked=BLOCKED_WHY)
            p.diags.append(
                warning(
                    "destroy-blocked",
                    f"{res.address}: {fewer}; held back: {BLOCKED_WHY}",
                    position=res.position,
                    address=res.address,
                )
            )
    return change


def _fewer_kept(change: Change) -> str:
    """A backup job's retention that keeps fewer backups than it did (a keep-* count lowered or
    dropped): what the next run prunes, for people; "" when it keeps as many or more."""
    field = next((f for f in change.fields if f.path == "prune-backups"), None)
    if field is None or not field.before:
        return ""  # the storage's retention before: not ours to judge

    def keeps(text: Any) -> dict[str, int]:
        pairs = (part.split("=", 1) for part in str(text or "").split(",") if "=" in part)
        return {k: int(v) for k, v in pairs if v.isdigit()}

    before, after = keeps(field.before), keeps(field.after)
    if after.get("keep-all"):
        return ""
    lowered = [k for k, n in before.items() if after.get(k, 0) < n]
    if not lowered:
        return ""
    return f"backups beyond the new retention ({field.after or 'the storage default'})"


def _final_backup(p: _Planning, change: Change) -> Change:
    """A guest's replace or delete, with the backup a job that selects it takes first; with
    `--no-final-backup`, a warning that it goes without one."""
    if change.kind is not Kind.GUEST:
        return change
    vmid = (change.before or {}).get("vmid") or change.id.get("vmid")
    jobs = [r for r in p.owned.values() if r.kind is Kind.BACKUP_JOB]
    found = backups.job_for(p.graph, change.address, vmid, jobs)
    if found is None:
        return change
    job, attributes = found
    if not p.final_backups:
        p.diags.append(
            warning(
                "final-backup-skipped",
                f"{change.address} is {change.action.value}d without a final backup "
                f"(--no-final-backup; {job} backs it up)",
                address=change.address,
            )
        )
        return change
    final = FinalBackup(
        storage=str(attributes["storage"]),
        mode=str(attributes.get("mode", "snapshot")),
        compress=str(attributes.get("compress", "zstd")),
        job=job,
    )
    return replace(change, final_backup=final)


def _with_deletes(p: _Planning, allow_destroy: bool) -> list[Change]:
    """The changes in order, with the deletes of what is owned and no longer desired last,
    dependents first (routes and proxies before the guests they point at)."""
    # Only what was observed can be found gone: a partial observation (the service's edge
    # poll, an observer that failed) never deletes anything of the kinds it did not look at.
    seen = {
        a: r
        for a, r in p.owned.items()
        if (p.observed_kinds is None or r.kind in p.observed_kinds) and a not in p.contested
    }
    deletes, more = _deletes(p.graph, seen, allow_destroy, p.withheld)
    deletes = [_final_backup(p, c) for c in deletes]
    p.diags.extend(more)
    p.diags.extend(_count_destroys([*p.changes.values(), *deletes], p.graph))
    ordered = list(p.changes.values())
    last_wave = max((c.wave for c in ordered), default=-1)
    for change in sorted(deletes, key=lambda c: (-c.kind.rank, c.address)):
        ordered.append(replace(change, wave=last_wave + 1 + (len(Kind) - change.kind.rank)))
    ordered.sort(
        key=lambda c: (c.wave, c.kind.rank if c.action is not Action.DELETE else 0, c.address)
    )
    return ordered


def _backup_freshness(p: _Planning, now: datetime.datetime | None) -> list[BackupFreshness]:
    """Every existing guest a job selects, with its newest backup; a warning for each that
    has none, an old one, or could not be listed (the `backup_freshness` policy)."""
    if p.observed.backups is None and not p.observed.backup_errors:
        return []  # backups were not looked at (the edge poll, an older snapshot)
    if now is None:
        now = _observed_time(p.observed)
    existing = {a for a, r in p.owned.items() if r.kind is Kind.GUEST}
    found = backups.freshness(p.graph, p.vmids, existing, p.observed.backups, now)
    if not p.graph.settings.get("backup_freshness", True):
        return found
    positions = {r.address: r.position for r in p.graph.resources.values()}
    # Per job, the guests without a backup (a new platform has none: one line, not one each)
    # and those whose backups could not be listed; per guest, a stale backup.
    missing: dict[str, list[str]] = {}
    unknown: dict[str, int] = {}
    for f in found:
        if f.freshness is Freshness.UNKNOWN:
            unknown[f.job] = unknown.get(f.job, 0) + 1
        elif f.freshness is Freshness.MISSING:
            missing.setdefault(f.job, []).append(f.guest.removeprefix("guest/"))
        elif f.freshness is Freshness.STALE:
            storage = p.graph.resources[f.job].attributes["storage"]
            text = (
                f"{f.guest}: its newest backup on {storage} is {format_seconds(f.age or 0)} old, "
                f"older than {format_seconds(f.max_age)} ({f.job})"
            )
            p.diags.append(
                warning("backup-stale", text, position=positions.get(f.job), address=f.guest)
            )
    for job, names in sorted(missing.items()):
        storage = p.graph.resources[job].attributes["storage"]
        p.diags.append(
            warning(
                "backup-missing",
                f"{job}: {len(names)} guest(s) it selects have no backup on {storage}: "
                + ", ".join(names),
                position=positions.get(job),
                address=job,
            )
        )
    for job, count in sorted(unknown.items()):
        storage = p.graph.resources[job].attributes["storage"]
        p.diags.append(
            warning(
                "backup-unknown",
                f"{job}: the backups on {storage} could not be listed, so the freshness of "
                f"the {count} guest(s) it selects is unknown",
                position=positions.get(job),
                address=job,
            )
        )
    return found


def _observed_time(observed: ObservedState) -> datetime.datetime:
    """When the state was observed (a snapshot's own time), or now."""
    if observed.observed_at:
        try:
            return datetime.datetime.fromisoformat(observed.observed_at.replace("Z", "+00:00"))
        except ValueError:
            pass
    return datetime.datetime.now(datetime.UTC)


def _contested(
    graph: DesiredGraph, observed: ObservedState
) -> tuple[frozenset[str], list[Diagnostic]]:
    """Addresses that more than one observed resource claims, and an error for each: a copy of
    a guest made by hand carries its mark. Which one is the controller's cannot be told, so
    nothing is planned for the address (nor its guest's firewall), and neither is deleted as
    an orphan. A guest's firewall is claimed twice along with its guest: one error says it."""
    dups = observed.duplicates()
    diags: list[Diagnostic] = []
    for address, claims in dups.items():
        if address.startswith("firewall/guest/") and "guest/" + address.split("/", 2)[2] in dups:
            continue
        by_vmid = sorted(claims, key=lambda r: (len(str(r.id.get("vmid"))), str(r.id)))
        who = [_claimant(r) for r in by_vmid]
        named = ", ".join(who[:-1]) + f" and {who[-1]}"
        if claims[0].kind is Kind.GUEST:
            fix = (
                "a copy carries the controller's mark; remove the mark from the copy (its "
                "description's last line) or delete it"
            )
        else:
            fix = "only one may carry the controller's mark; remove it from the others"
        res = graph.resources.get(address)
        diags.append(
            error(
                "duplicate-owner",
                f"{address} is claimed by {named}: {fix}. Nothing of it is planned until then",
                position=res.position if res is not None else None,
                address=address,
            )
        )
    return frozenset(dups), diags


def _claimant(r: ObservedResource) -> str:
    if "vmid" in r.id:
        return f"vmid {r.id['vmid']} on {r.id.get('node', '?')}"
    return ", ".join(f"{k} {v}" for k, v in sorted(r.id.items())) or "an unnamed resource"


def _compare(res: Resource, desired: dict[str, Any], obs: ObservedResource, wave: int) -> Change:
    want, have = normalize.pair(res.kind, desired, obs.attributes)
    fields = tuple(diffing.diff(res.kind, want, have))
    ident = (
        dict(obs.id)
        if res.kind is not Kind.GUEST
        else {"vmid": desired["vmid"], "node": desired["node"]}
    )
    forced = {f.path for f in fields if f.forces_replace}
    if not fields:
        action, cause, reason = Action.NOOP, Cause.IN_SYNC, ""
    elif "node" in forced and forced <= _MIGRATES:
        # Only its place changes: Proxmox moves it, disks and all (the world stays).
        action, cause = Action.MIGRATE, Cause.MOVED
        ident = {"vmid": obs.id.get("vmid"), "node": desired["node"], "from": obs.id.get("node")}
        reason = f"moves from {obs.id.get('node')} to {desired['node']}"
    elif forced:
        action = Action.REPLACE
        cause = Cause.RENUMBERED if "vmid" in forced else Cause.IMMUTABLE
        reason = "cannot change in place: " + ", ".join(sorted(forced))
        if "vmid" in forced:
            reason += f" (destroys vmid {obs.id.get('vmid')}, creates vmid {desired['vmid']})"
    else:
        action, cause, reason = Action.UPDATE, Cause.DRIFTED, ""
    return Change(
        res.address,
        res.kind,
        action,
        wave,
        ident,
        have,
        want,
        fields,
        res.depends_on,
        reason,
        obs.version,
        destroys=disks(have) if action is Action.REPLACE else (),
        cause=cause,
    )


def disks(attrs: Mapping[str, Any] | None) -> tuple[str, ...]:
    """What destroying a guest destroys, for people: `("rootfs 8 GiB", "mp0 50 GiB")`. Reads
    observed attributes, raw or normalized."""
    if not attrs:
        return ()
    out: list[str] = []
    rootfs = attrs.get("rootfs")
    if rootfs:
        out.append(f"rootfs {_size(normalize.rootfs(rootfs).get('size'))}")
    volumes = attrs.get("volumes") or {}
    for key in sorted(volumes, key=_natural):
        vol = volumes[key]
        size = vol.get("size") if isinstance(vol, Mapping) else normalize.rootfs(vol).get("size")
        out.append(f"{key} {_size(size)}")
    unused = attrs.get("unused") or {}
    for key in sorted(unused, key=_natural):
        out.append(f"{key} {unused[key]} (detached)")
    return tuple(out)


def _natural(key: str) -> tuple[str, int]:
    head = key.rstrip("0123456789")
    return head, int(key[len(head) :] or 0)


def _size(value: Any) -> str:
    if value in (None, ""):
        return "(size unknown)"
    mib = parse_mib(value, bare_unit="G")
    return f"{mib / 1024:g} GiB" if mib >= 1024 else f"{mib} MiB"


def _refused(
    res: Resource,
    change: Change,
    pick: Callable[[FieldChange], bool],
    suffix: str,
    code: str,
    why: str,
) -> Diagnostic | None:
    """An error at the spec's line naming the fields `pick` finds (`mp0 50G -> 20G: why`); the
    guest is left as it is. None when there are none."""
    found = [f for f in change.fields if pick(f)]
    if not found:
        return None
    what = ", ".join(f"{f.path.removesuffix(suffix)} {f.before} -> {f.after}" for f in found)
    return error(code, f"{res.address}: {what}: {why}", position=res.position, address=res.address)


def _shrinks(res: Resource, change: Change) -> Diagnostic | None:
    """A disk made smaller."""
    return _refused(
        res,
        change,
        lambda f: diffing.shrinks(res.kind, f),
        ".size",
        "disk-shrink",
        "a disk can grow but never shrink (Proxmox cannot, and the controller never destroys a "
        "disk to make it smaller). Keep the size, or move the data to a new guest yourself",
    )


def _moves_volumes(res: Resource, change: Change) -> Diagnostic | None:
    """A volume whose storage changed. The controller never moves a volume (nor recreates one
    elsewhere): Proxmox's move-volume does, with the data. Except a VM's disks in its
    migration, when `targetstorage` can say where each goes (a map from storage to storage)."""
    if change.action is Action.MIGRATE and _vm_disks_migrate(change):
        return None
    return _refused(
        res,
        change,
        lambda f: (
            f.path.startswith("volumes.")
            and f.path.endswith(".storage")
            and bool(f.before)
            and bool(f.after)
        ),
        ".storage",
        "volume-storage",
        "the controller never moves a volume to another storage. Move it with Proxmox (`pct "
        "move-volume VMID mpN STORAGE`, or Disk Action > Move Storage for a VM disk), or keep "
        "the storage in the spec",
    )


def _vm_disks_migrate(change: Change) -> bool:
    """A VM's migration can carry its disks to the storages the spec names: no storage's
    disks are wanted in two places (model.disks.storage_map)."""
    if (change.after or {}).get("type") != "qemu":
        return False
    before = (change.before or {}).get("volumes") or {}
    after = (change.after or {}).get("volumes") or {}
    moves = [
        (str(before[k].get("storage")), str(after[k].get("storage")))
        for k in sorted(set(before) & set(after))
    ]
    return storage_map(moves) is not None


def _detached(change: Change) -> tuple[str, ...]:
    """What an update (or migration) destroys by detaching volumes the spec no longer has:
    `("mp0 50 GiB",)`."""
    gone = {
        f.path.split(".")[1]: f.before
        for f in change.fields
        if f.path.count(".") == 1 and f.path.startswith("volumes.") and f.after is None
    }
    return disks({"volumes": gone}) if gone else ()


def _blocked_detach(res: Resource, change: Change) -> Diagnostic:
    return warning(
        "destroy-blocked",
        f"{res.address}: detaching {', '.join(change.destroys)} (no longer in the spec) "
        f"destroys data; held back, with the rest of this guest's changes: {BLOCKED_WHY}",
        position=res.position,
        address=res.address,
    )


def _blocked_replace(res: Resource, change: Change) -> Diagnostic:
    return warning(
        "destroy-blocked",
        f"{res.address}: replace destroys {', '.join(change.destroys) or 'the guest'} "
        f"({change.reason}); "
        f"held back: {BLOCKED_WHY}",
        position=res.position,
        address=res.address,
    )


def _count_destroys(changes: Iterable[Change], graph: DesiredGraph) -> list[Diagnostic]:
    """Allowed destroys of guests (replaces, deletes, and updates that detach volumes) count
    toward max_deletes_per_run."""
    limit = int(graph.settings.get("max_deletes_per_run", 3))
    n = sum(
        1
        for c in changes
        if c.kind is Kind.GUEST
        and not c.blocked
        and (c.action in (Action.REPLACE, Action.DELETE) or c.destroys)
    )
    if n <= limit:
        return []
    return [
        error(
            "too-many-deletes",
            f"this plan would destroy data on {n} guests (replaces, deletes, detached "
            f"volumes); "
            f"platform.max_deletes_per_run is {limit}. A spec file may be missing, or a typo "
            "may have changed what guests are; if the destroys are meant, raise the limit",
        )
    ]


def _guest_home(
    graph: DesiredGraph,
    res: Resource,
    vmids: Mapping[str, int],
    changes: Mapping[str, Change],
    observed_kinds: set[Kind] | None,
) -> dict[str, Any] | None:
    """Where a guest's firewall lives: its guest's node, vmid and type, as planned."""
    parent = graph.resources.get(res.attached_to or "")
    if parent is None or parent.address not in vmids:
        return None
    guest_observed = observed_kinds is None or Kind.GUEST in observed_kinds
    if guest_observed and parent.address not in changes:
        return None  # the guest itself could not be planned
    return {
        "vmid": vmids[parent.address],
        "node": parent.attributes.get("node"),
        "type": parent.attributes.get("type", "lxc"),
    }


def _name_conflict(
    res: Resource, observed: ObservedState, platform: str, spec_dir: str | None = None
) -> Diagnostic | None:
    """A firewall object we would create whose name an unmarked one holds (Proxmox names are
    cluster-wide; alias and IP set names ignore case), or a backup job's id."""
    if res.kind is Kind.BACKUP_JOB:
        return _job_id_conflict(res, observed, spec_dir)
    if res.kind is Kind.DNS:
        return _dns_name_held(res, observed)
    if res.kind not in _NAMED_FIREWALL:
        return None
    for r in observed.foreign():
        if r.kind is res.kind and str(r.attributes.get("name", "")).lower() == res.name.lower():
            what = res.kind.value.removeprefix("firewall/")
            if _same_content(res.kind, dict(res.attributes), dict(r.attributes)):
                return warning(
                    "adoption-pending",
                    f"{res.address} matches the {what} {r.attributes.get('name')!r}, which the "
                    "controller does not own yet: it is only reported. Review it, then "
                    f"`{adopt_command(res.address, spec_dir)}` to manage it",
                    position=res.position,
                    address=res.address,
                )
            return error(
                "firewall-name-held-by-foreign",
                f"{res.address}: a {what} named {r.attributes.get('name')!r} exists without the "
                "controller's mark; it will not be overwritten. Rename it in the spec, or adopt "
                f"it by ending its comment with [reconciler:{platform}]",
                position=res.position,
                address=res.address,
            )
    return None


def _job_id_conflict(
    res: Resource, observed: ObservedState, spec_dir: str | None = None
) -> Diagnostic | None:
    """A backup job we would create under an id a job without our mark holds (Proxmox keeps
    one job per id): the job `import` wrote for it, reported until `adopt` marks it."""
    ident = str(res.attributes.get("id") or job_id(res.address))
    for r in observed.foreign():
        if r.kind is Kind.BACKUP_JOB and r.id.get("id") == ident:
            return warning(
                "adoption-pending",
                f"{res.address} matches backup job {ident}, which the controller does not own "
                f"yet: it is only reported. Review it, then "
                f"`{adopt_command(res.address, spec_dir)}` to manage it",
                position=res.position,
                address=res.address,
            )
    return None


def _dns_name_held(res: Resource, observed: ObservedState) -> Diagnostic | None:
    """A record set we would create where records without our ownership record are: of its
    name and type, or a CNAME at its name, or anything at all where it is a CNAME (a CNAME
    stands alone). They are never changed, so it is not created: a warning says what holds it."""
    name, rtype = res.attributes.get("name"), res.attributes.get("type")
    for r in observed.foreign():
        a = r.attributes
        if r.kind is not Kind.DNS or a.get("name") != name:
            continue
        if a.get("type") == rtype or "CNAME" in (a.get("type"), rtype):
            values = ", ".join(str(v) for v in a.get("values") or ())
            return warning(
                "dns-name-held-by-foreign",
                f"{res.address}: {name} already holds {a.get('type')} {values} without the "
                "controller's ownership record; it is never changed, so this record is not "
                "created. Remove that record by hand, or drop this one from the spec",
                position=res.position,
                address=res.address,
            )
    return None


def _same_content(kind: Kind, desired: dict[str, Any], seen: dict[str, Any]) -> bool:
    """A foreign firewall object that is what the spec wants (the comment aside, which is where
    the mark goes): an adoption candidate, not a conflict. IP set entries and group rules are
    read only for what we own (or what our rules name), so a foreign one whose content was not
    read never matches: it stays a conflict."""
    have = {k: v for k, v in seen.items() if k != "name"}
    if set(desired) - {"comment"} - set(have):
        return False  # its entries or rules were not read: nothing to compare, not a match
    want, have = normalize.pair(kind, dict(desired), have)
    return all(c.path.split(".")[0] == "comment" for c in diffing.diff(kind, want, have))


def _vmid_conflict(
    res: Resource,
    desired: dict[str, Any],
    foreign: dict[int, ObservedResource],
    owned_by_vmid: dict[int, ObservedResource],
    spec_dir: str | None = None,
) -> Diagnostic | None:
    if res.kind is not Kind.GUEST:
        return None
    vmid = desired["vmid"]
    if vmid in foreign:
        holder = foreign[vmid]
        template = holder.attributes.get("template") is True
        if not template and holder.attributes.get("name") == res.attributes.get("name", res.name):
            return warning(
                "adoption-pending",
                f"{res.address} matches guest {vmid} ({holder.attributes.get('name')!r} on node "
                f"{holder.id.get('node', '?')}), which the controller does not own yet: it is "
                "only reported. Review it, then "
                f"`{adopt_command(res.address, spec_dir)}` to manage it",
                position=res.position,
                address=res.address,
            )
        return error(
            "vmid-held-by-foreign",
            f"vmid {vmid} wanted by {res.address} is held by "
            f"{'template' if template else 'guest'} "
            f"{holder.attributes.get('name', '?')!r} on node {holder.id.get('node', '?')}, which "
            "the controller does not own; it will not be overwritten. Free the id, choose "
            "another" + ("" if template else ", or adopt that guest"),
            position=res.position,
            address=res.address,
        )
    if vmid in owned_by_vmid and owned_by_vmid[vmid].address != res.address:
        holder = owned_by_vmid[vmid]
        return error(
            "vmid-held-by-other",
            f"vmid {vmid} wanted by {res.address} is held by {holder.address}, a guest the "
            "controller owns under another name; remove or renumber one of them",
            position=res.position,
            address=res.address,
        )
    return None


def _target_guest(res: Resource) -> str | None:
    """The guest a registration or route sends players to: the last of its dependencies
    (loading.graph puts the proxy's own guest first, the target last)."""
    return res.depends_on[-1] if res.depends_on else None


def _gated(res: Resource) -> bool:
    if res.kind is Kind.VELOCITY:
        return True
    return res.kind is Kind.ROUTE and res.attributes.get("when_unready") == "withhold"


def _serving(graph: DesiredGraph, observed: ObservedState) -> list[Diagnostic]:
    """What Traefik does with the routes we wrote: one written but not served, or served with
    errors, is a warning (the feed holds it, so no change would fix it; the cause is in the
    rule, the TLS options or Traefik itself)."""
    out: list[Diagnostic] = []
    for address, seen in sorted(observed.serving.items()):
        res = graph.resources.get(address)
        position = res.position if res is not None else None
        detail = "; ".join(seen.errors)
        if seen.served is None:
            out.append(
                warning(
                    "traefik-api-failed",
                    f"{address}: cannot see what Traefik serves: {detail or 'no answer'}",
                    address=address,
                )
            )
        elif res is None:
            continue  # a route on its way out
        elif not seen.served:
            status = f"status {seen.status}" if seen.status else "not listed"
            out.append(
                warning(
                    "route-not-served",
                    f"{address} is written to Traefik's feed but not served ({status})"
                    + (f": {detail}" if detail else ""),
                    position=position,
                    address=address,
                )
            )
        elif seen.errors:
            out.append(
                warning(
                    "route-served-with-errors",
                    f"{address} is served with errors (status {seen.status}): {detail}",
                    position=position,
                    address=address,
                )
            )
    return out


def _why_not(health: GuestHealth) -> str:
    if not health.running:
        return "is not running"
    if not health.reachable:
        return f"has no reachable agent ({health.error or 'no answer'})"
    return "has an agent that is not ready" + (f" ({health.error})" if health.error else "")


def _readiness(
    graph: DesiredGraph, observed: ObservedState, agent_layers: frozenset[str]
) -> tuple[dict[str, str], list[Diagnostic]]:
    """The gated resources to withhold (address -> why) and the warnings that say so."""
    ranges: Mapping[str, Any] = graph.settings.get("ranges", {})
    diags: list[Diagnostic] = []
    for address, seen in sorted(observed.health.items()):
        if seen.running and not seen.reachable:
            diags.append(
                warning(
                    "agent-unreachable",
                    f"{address}: its agent cannot be reached: {seen.error or 'no answer'}; "
                    "what depends on its readiness is withheld",
                    address=address,
                )
            )
    withheld: dict[str, str] = {}
    for res in graph.ordered():
        target = _target_guest(res) if _gated(res) else None
        if target is None or (observed.kinds is not None and res.kind not in observed.kinds):
            continue  # not gated, or not planned at all (nobody looked)
        health = observed.health.get(target)
        if health is None:
            guest = graph.resources.get(target)
            role = guest.attributes.get("role", "") if guest else ""
            if ranges.get(role, {}).get("layer") not in agent_layers:
                continue  # no agent runs there: nothing to wait for
            why = f"{target} has no observed agent health"
        elif health.serving:
            continue
        else:
            why = f"{target} {_why_not(health)}"
        withheld[res.address] = why
        diags.append(
            warning(
                "withheld",
                f"{res.address} is withheld: {why}",
                position=res.position,
                address=res.address,
            )
        )
    return withheld, diags


def _dhcp_backends(
    graph: DesiredGraph, observed: ObservedState, withheld: Mapping[str, str]
) -> tuple[dict[str, dict[str, Any]], dict[str, str], list[Diagnostic]]:
    """Routes and registrations to a VM without a static address, at the address its agent
    reports (planning.backends); those whose address is not known join the withheld, each with
    a warning like the readiness gate's."""
    found = backends.resolve(graph, observed, skip=withheld)
    diags = [
        warning(
            "withheld",
            f"{address} is withheld: {why}",
            position=graph.resources[address].position,
            address=address,
        )
        for address, why in found.withheld.items()
    ]
    diags += [
        warning("backend-kept", why, position=graph.resources[address].position, address=address)
        for address, why in found.kept.items()
    ]
    return found.attributes, {**withheld, **found.withheld}, diags


def _deletes(
    graph: DesiredGraph,
    owned: dict[str, ObservedResource],
    allow_destroy: bool,
    withheld: Mapping[str, str],
) -> tuple[list[Change], list[Diagnostic]]:
    prune = allow_destroy or bool(graph.settings.get("prune"))
    gone = [r for a, r in sorted(owned.items()) if a not in graph.resources or a in withheld]
    changes: list[Change] = []
    diags: list[Diagnostic] = []
    for r in gone:
        assert r.address is not None
        if r.kind in (Kind.FIREWALL_GUEST, Kind.FIREWALL_CLUSTER, Kind.TEMPLATE):
            # A guest's firewall goes with its guest; the cluster options are only ever left
            # alone, and so is a template file that left the spec (a file carries no mark:
            # nothing says it is ours to delete, and a guest made by hand may need it).
            continue
        if r.kind is Kind.HA and ha.guest_of(r.address) not in graph.resources:
            # An HA resource whose guest left the spec goes with its guest (a destroy with
            # purge removes it), never on its own: without pruning, both stay. One whose guest
            # is still in the spec, without `ha`, is removed: that destroys nothing (the guest
            # runs on; HA only stops managing it), so it needs no pruning.
            continue
        if r.kind is Kind.HA:
            # Only when its sid is its guest's: another guest's HA is not ours to release.
            wrong = ha.sid_mismatch(r, owned.get(ha.guest_of(r.address)), None)
            if wrong is not None:
                diags.append(wrong)
                continue
        # Velocity registrations and routes are soft state: what the edge is told about guests,
        # rebuilt from the spec at any time (a Velocity restart forgets every registration
        # anyway). Deleting one loses nothing, so it needs neither pruning nor --allow-destroy,
        # and does not count against max_deletes_per_run.
        blocked = None
        # Most likely not gone: adopted from another spec directory (an import's) never
        # merged into this one. Said whether or not pruning lets the delete through, and in
        # its reason.
        elsewhere = _adopted_elsewhere(r, graph, prune) if r.kind is Kind.GUEST else None
        if elsewhere is not None:
            diags.append(elsewhere[0])
        # A DNS record destroys no data, but resolvers cache its absence (the zone's negative
        # TTL), so a wrong delete (a spec file gone missing) outlasts its fix: it waits for
        # pruning like a firewall object, and is no destroy (max_deletes_per_run counts data).
        # So does a PVE notification endpoint or matcher: deleted by mistake, the next vzdump
        # failure or fencing reaches nobody, and nobody hears that it did not.
        if not prune and r.kind in (
            Kind.GUEST,
            Kind.BACKUP_JOB,
            Kind.POOL,
            Kind.DNS,
            Kind.NOTIFICATION_ENDPOINT,
            Kind.NOTIFICATION_MATCHER,
            *_NAMED_FIREWALL,
        ):
            if elsewhere is None:
                which = f" (vmid {r.id.get('vmid')})" if r.kind is Kind.GUEST else ""
                diags.append(
                    warning(
                        "orphan",
                        f"{r.address}{which} is owned by the controller but no "
                        "longer in the spec; kept because pruning is off "
                        "(platform.prune or --allow-destroy)",
                        address=r.address,
                    )
                )
            blocked = BLOCKED_WHY if r.kind is Kind.GUEST else NEEDS_PRUNE
        changes.append(
            Change(
                r.address,
                r.kind,
                Action.DELETE,
                0,
                dict(r.id),
                dict(r.attributes),
                None,
                reason=f"withheld: {withheld[r.address]}"
                if r.address in withheld
                else "not in the spec" + (f"; {elsewhere[1]}" if elsewhere else ""),
                cause=Cause.WITHHELD if r.address in withheld else Cause.NOT_IN_SPEC,
                version=r.version,
                destroys=disks(r.attributes) if r.kind is Kind.GUEST else (),
                blocked=blocked,
            )
        )
    return changes, diags


def _adopted_elsewhere(
    r: ObservedResource, graph: DesiredGraph, prune: bool
) -> tuple[Diagnostic, str] | None:
    """An owned guest missing from the spec that was adopted from another spec directory: its
    mark names it (`adopted=imported`, planning.provenance.adopted_into), and it is not the
    one this plan read (`same_directory`). Not gone from the platform: the warning
    (`adopted-elsewhere`) names that directory and the merge that brings the guest here, and
    so does the delete's reason, which the destroy banner shows. A mark naming this directory
    makes it an ordinary orphan (None). A mark written before it named its directory falls
    back to the template heuristic (`_adopted_from_an_import`). None for any other guest."""
    source = adopted_into(r.attributes)
    if source is None:
        return _adopted_from_an_import(r, graph, prune)
    here = spec_directory(graph)
    if here is not None and same_directory(source, here):
        return None
    shown, target = (f"{here}/", shlex.quote(here)) if here else ("this spec", "DIR")
    merge = f"reconciler merge {shlex.quote(source)} {target}"
    diag = warning(
        "adopted-elsewhere",
        f"{r.address} (vmid {r.id.get('vmid')}) was adopted from the specs in "
        f"{source.rstrip('/')}/, not from {shown} (its mark says adopted={source}), so it most "
        f"likely lives there: merge it into {shown} with `{merge}`; {_fate(prune)}",
        address=r.address,
    )
    return diag, f"adopted from {source}: merge it in first ({merge})"


def _adopted_from_an_import(
    r: ObservedResource, graph: DesiredGraph, prune: bool
) -> tuple[Diagnostic, str] | None:
    """The fallback for a mark without `adopted=`: its template is the import's placeholder
    (planning.provenance.adopted_from_import), so it was adopted from specs `reconciler import`
    wrote, most likely in their own directory, which was never merged into this one; which
    directory cannot be told (IMPORT_DIR in the hint). A VM's mark names no template: None."""
    if not adopted_from_import(r.attributes):
        return None
    here = spec_directory(graph)
    shown, target = (f"{here}/", shlex.quote(here)) if here else ("this spec", "DIR")
    merge = f"reconciler merge IMPORT_DIR {target}"
    diag = warning(
        "adopted-elsewhere",
        f"{r.address} (vmid {r.id.get('vmid')}) was adopted from imported specs, not from "
        f"{shown} (its mark names the import's template {r.attributes.get('template')}), so "
        f"it most likely lives in an import's directory (such as imported/): merge it into {shown} "
        f"with `{merge}` (or `reconciler import --into {target}`); {_fate(prune)}",
        address=r.address,
    )
    return diag, f"adopted from imported specs: merge them in first ({merge})"


def _fate(prune: bool) -> str:
    """What this plan does with a guest adopted elsewhere: delete it, or keep it."""
    if prune:
        return "this plan DELETES it (pruning is on): merge first unless that is meant"
    return "kept because pruning is off (platform.prune or --allow-destroy)"


def _firewall_first(changes: dict[str, Change], graph: DesiredGraph) -> None:
    """A guest that this plan starts, and whose firewall it also changes, starts only once its
    rules are in place: see HOLD_START in reconciler.model.plans."""
    firewall_of = {
        r.attached_to: r.address
        for r in graph.resources.values()
        if r.attached_to is not None and r.kind is Kind.FIREWALL_GUEST
    }
    for address, change in list(changes.items()):
        after = change.after
        if change.kind is not Kind.GUEST or after is None or after.get("state") != "running":
            continue
        if change.blocked:
            continue
        starts = change.action in _ACTIVE or (
            change.action is Action.UPDATE and any(f.path == "state" for f in change.fields)
        )
        fw = changes.get(firewall_of.get(address, ""))
        if not starts or fw is None or fw.after is None or fw.action is Action.NOOP:
            continue
        held = replace(change, after={**after, HOLD_START: True})
        if change.action is Action.UPDATE and {f.path for f in change.fields} == {"state"}:
            # Starting was all it would do, and the firewall change does that now.
            held = replace(held, action=Action.NOOP, fields=(), reason="", cause=Cause.IN_SYNC)
        changes[address] = held
        changes[fw.address] = replace(fw, after={**fw.after, START_GUEST: True})


def _only_targets(changes: list[Change], graph: DesiredGraph, targets: set[str]) -> list[Change]:
    """Keep the targeted resources (an address or a prefix like `guest/`), what they need, and
    what is attached to any guest kept (its firewall: a guest never goes without it)."""

    def hit(address: str) -> bool:
        return any(address == t or address.startswith(t.rstrip("/") + "/") for t in targets)

    attached: dict[str, list[str]] = {}
    for r in graph.resources.values():
        if r.attached_to is not None:
            attached.setdefault(r.attached_to, []).append(r.address)
    keep = {c.address for c in changes if hit(c.address)}
    frontier = list(keep)
    while frontier:
        address = frontier.pop()
        found = graph.resources.get(address)
        for more in [*(found.depends_on if found else ()), *attached.get(address, ())]:
            if more not in keep:
                keep.add(more)
                frontier.append(more)
    return [c for c in changes if c.address in keep]


def _foreign_summary(r: ObservedResource, graph: DesiredGraph) -> dict[str, Any]:
    vmid = r.id.get("vmid")
    role = None
    for name, rng in graph.settings.get("ranges", {}).items():
        if isinstance(vmid, int) and rng["first"] <= vmid <= rng["last"]:
            role = name
    return {
        "kind": r.kind.value,
        "name": r.attributes.get("name"),
        "vmid": vmid,
        "node": r.id.get("node"),
        "in_range": role,
        "template": r.attributes.get("template") is True,
    }


def _with_vmid(
    res: Resource, vmids: Mapping[str, int]
) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """A resource's attributes and identity; a guest gets its allocated vmid (None: it has none)."""
    attrs = dict(res.attributes)
    ident: dict[str, Any] = {}
    if res.kind is Kind.GUEST:
        if res.address not in vmids:
            return None
        attrs["vmid"] = ident["vmid"] = vmids[res.address]
        ident["node"] = attrs["node"]
    elif res.kind is Kind.BACKUP_JOB:
        # The selection as vmids: a guest created in this run is in its job from the start.
        attrs["vmid"] = backups.job_vmids(res, vmids)
    elif res.kind is Kind.TEMPLATE:
        ident["node"] = attrs["node"]  # the node that downloads it
    elif res.kind is Kind.POOL:
        attrs["vmids"] = pools.member_vmids(res, vmids)  # what apply sends, by member
    elif res.kind is Kind.HA:
        guest = str(attrs["guest"])
        if guest not in vmids:
            return None  # its guest has no vmid: reported by allocate_vmids
        ident["sid"] = ha_sid("qemu" if attrs.get("type") == "vm" else "lxc", vmids[guest])
    return attrs, ident


def converged_state(graph: DesiredGraph, observed: ObservedState | None = None) -> ObservedState:
    """The observed state a perfect apply would leave: every desired resource, owned, as desired.
    Used by `plan --base` (the base revision taken as applied) and by the property tests."""
    observed = observed or ObservedState()
    vmids, _ = allocate_vmids(graph, observed)
    # A DHCP VM's route or registration is at the address its agent reported; with none known
    # (`plan --base`: nothing observed), at the graph's host name, a stand-in the next plan
    # keeps while the agent is not asked, so a change to the route's other fields still shows.
    found = backends.resolve(graph, observed)
    resources = []
    for res in graph.ordered():
        allocated = _with_vmid(res, vmids)
        if allocated is None:
            continue
        attrs, ident = allocated
        attrs = dict(found.attributes.get(res.address, attrs))
        resources.append(
            ObservedResource(
                address=res.address,
                kind=kind_of(res.address),
                owned=True,
                id=ident,
                attributes=attrs,
            )
        )
    return ObservedState(platform=graph.platform, source="converged", resources=tuple(resources))
