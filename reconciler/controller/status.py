"""The service's live status: what the controller loop last did, as a plain mutable object the
loop writes and the status listener (`reconciler.controller.http`) reads.

The loop (`reconciler.controller.service`) owns one `StatusBoard` per service and records into
it as it goes: the spec revision it loaded (`set_revision`) or refused (`set_revision_error`;
the loop keeps converging to the last good revision and keeps reporting the bad one), the
leader lease (`set_lease`), each observe (`record_observe`), each plan's verdict on every
resource it looked at (`record_plan`: a full cycle lists every desired and owned resource, so a
resource the cycle had nothing to do for is shown converged, not left out), each change's
result (`record_result`, or `record_report` for a whole `ApplyReport`), each cycle
(`record_cycle`), and a heartbeat on every loop tick (`beat`).
The listener serves `to_json()` as `/status`, `heartbeat_age()` as `/healthz` and
`readiness()` as `/readyz`.

Everything runs on one event loop, so there is no lock: a reader never sees a half-made update
because no update awaits. Wall-clock time comes from the injected `clock` (default
`time.time`), so tests set the time instead of sleeping.

Secrets never go in: the board holds only error messages the providers already redact, spec
revision ids, the lease holder's name and fencing token, and of backups only addresses, ages
and volume ids (never a backup's notes).

`to_json()` shape (timestamps RFC 3339 UTC, null when unknown):

    {"platform": "zpack", "source": "git https://... (main)",
     "revision": {"id": "3f2a...", "fetched_at": "..."} | null,
     "revision_error": {"id": "9c1e...", "diagnostics": "specs/x.yaml:3: ...", "at": "..."}
                       | null,
     "lease": {"holder": "ctl-a", "token": 7, "is_leader": true, "changed_at": "..."},
     "last_cycle": {"kind": "full", "started_at": "...", "finished_at": "...",
                    "seconds": 1.2, "outcome": "changed", "done": 2, "failed": 0,
                    "skipped": 0, "error": "", "changes": []} | null,
     "drift": 2 | null,
     "held_back": [{"address": "guest/mc-x", "action": "replace",
                    "destroys": ["rootfs 8 GiB"], "reason": "...", "why": "..."}],
     "backups": {"at": "...",
                 "counts": {"fresh": 1, "stale": 1, "missing": 1, "unknown": 0},
                 "guests": [{"guest": "guest/mc-lobby", "job": "backup/game-worlds",
                             "vmid": 1000, "freshness": "stale", "age": 172800,
                             "max_age": 46800, "newest": "backup:backup/vzdump-lxc-..."}]}
                | null,
     "notifications": {"targets": {"ops": {"scheme": "ntfys", "sent": 3, "failed": 0,
                                           "suppressed": 0, "dropped": 0, "pending": 0,
                                           "failing": false, ...}},
                       "open": [{"event": "held-back", "subject": "guest/mc-x", ...}],
                       "recent": [{"at": "...", "event": "change-failed", "state": "opened",
                                   "targets": {"ops": "sent"}, ...}]} | null,
     "observe": {"ok": true, "at": "...", "error": ""} | null,
     "heartbeat": {"at": "...", "age_seconds": 0.4},
     "ready": {"ready": true, "reason": "", "revision": true, "observe": true},
     "summary": {"converged": 10, "pending": 0, "failed": 1, "backoff": 0, "withheld": 0,
                 "unknown": 0},
     "resources": {"guest/api": {"state": "failed", "last_error": "...", "attempts": 1,
                                 "next_retry_at": null, "last_change_at": null}, ...}}

`notifications` is what the notifier (`controller.notify`) told, or would have told, people:
each target's counts, the open incidents and the last messages, sent or not.
`drift` is how many changes the last full plan wanted (before applying them); `summary` counts
`resources` by state, so its counts add up to the number of resources listed. A cycle's
`changes` are what an inventory check saw differ (`vmid 1000: memory 2048 -> 3072`); `error`
is kept for errors.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from reconciler.applying.executor import ApplyReport, Outcome
from reconciler.model.observed import ObservedState
from reconciler.model.plans import Action, BackupFreshness, Change, Freshness, Plan
from reconciler.model.resources import DesiredGraph, Kind

Clock = Callable[[], float]


class CycleKind(enum.StrEnum):
    FULL = "full"  # observe everything, plan, apply
    INVENTORY = "inventory"  # observe Proxmox only (a periodic re-read)
    EDGE = "edge"  # routes and Velocity only (a guest's address changed)


class CycleOutcome(enum.StrEnum):
    CONVERGED = "converged"  # nothing to do
    CHANGED = "changed"  # changes applied, all done
    FAILED = "failed"  # some changes failed or were skipped
    ERRORED = "errored"  # the cycle itself broke (observe failed, plan errored)
    SKIPPED = "skipped"  # not run (not the leader, no good revision)


class ResourceState(enum.StrEnum):
    CONVERGED = "converged"  # the last change succeeded, or there was nothing to do
    PENDING = "pending"  # the last plan wants a change not applied yet
    FAILED = "failed"  # the last change failed; no retry scheduled
    BACKOFF = "backoff"  # the last change failed; retried after `next_retry_at`
    WITHHELD = "withheld"  # not applied on purpose: held back, not ready, or it needs what failed
    UNKNOWN = "unknown"  # its kind could not be observed in the last cycle


# Outcomes after which the platform is as the spec says (last_success_timestamp in metrics).
SUCCESSFUL = frozenset({CycleOutcome.CONVERGED, CycleOutcome.CHANGED})


def rfc3339(ts: float | None) -> str | None:
    """Epoch seconds -> `2024-05-01T12:00:00.000Z`; None stays None."""
    if ts is None:
        return None
    moment = datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")
    return moment.replace("+00:00", "Z")


@dataclass
class Revision:
    id: str
    fetched_at: float


@dataclass
class RevisionError:
    id: str
    diagnostics: str  # the loader's diagnostics, rendered as text, one per line
    at: float


@dataclass
class Lease:
    holder: str | None = None
    token: int | str | None = None  # the fencing token of the current holder
    is_leader: bool = False
    changed_at: float | None = None


@dataclass
class Cycle:
    kind: CycleKind
    outcome: CycleOutcome
    started_at: float
    finished_at: float
    done: int = 0
    failed: int = 0
    skipped: int = 0
    error: str = ""
    changes: tuple[str, ...] = ()  # what an inventory check saw differ; not errors

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "started_at": rfc3339(self.started_at),
            "finished_at": rfc3339(self.finished_at),
            "seconds": round(self.finished_at - self.started_at, 3),
            "outcome": self.outcome.value,
            "done": self.done,
            "failed": self.failed,
            "skipped": self.skipped,
            "error": self.error,
            "changes": list(self.changes),
        }


@dataclass(frozen=True)
class BackupTransition:
    """A guest's backup under one job turned stale or missing, or fresh again, since the last
    full cycle that could tell: an event for the log."""

    item: BackupFreshness
    was: Freshness | None  # None: not seen before (the service started, or the guest is new)


@dataclass
class Observe:
    ok: bool
    at: float
    error: str = ""


@dataclass
class ResourceStatus:
    state: ResourceState = ResourceState.CONVERGED
    last_error: str = ""
    attempts: int = 0  # failures in a row; 0 after a success
    next_retry_at: float | None = None
    last_change_at: float | None = None  # when a change to it last succeeded

    def to_json(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "last_error": self.last_error,
            "attempts": self.attempts,
            "next_retry_at": rfc3339(self.next_retry_at),
            "last_change_at": rfc3339(self.last_change_at),
        }


@dataclass(frozen=True)
class Readiness:
    ready: bool
    reason: str  # why not ready; "" when ready
    revision: bool  # a good revision is loaded
    observe: bool  # the last observe succeeded

    def to_json(self) -> dict[str, Any]:
        return {
            "ready": self.ready,
            "reason": self.reason,
            "revision": self.revision,
            "observe": self.observe,
        }


class StatusBoard:
    """The live status of one controller service. See the module docstring."""

    def __init__(self, platform: str, source: str = "", *, clock: Clock = time.time) -> None:
        self.platform = platform
        self.source = source
        self.clock = clock
        self.revision: Revision | None = None
        self.revision_error: RevisionError | None = None
        self.lease = Lease()
        self.last_cycle: Cycle | None = None
        self.drift: int | None = None
        # Destroys the last full plan held back (pruning is off), as shown in /status.
        self.held_back: list[dict[str, Any]] = []
        # The last full plan's backup freshness (None until one was made), and when.
        self.backups: list[BackupFreshness] | None = None
        self.backups_at: float | None = None
        # The last known freshness per (guest, job), for transitions: `unknown` (the storage
        # could not be listed) says nothing, so it does not overwrite what was known.
        self._freshness: dict[tuple[str, str], Freshness] = {}
        self.observe: Observe | None = None
        self.resources: dict[str, ResourceStatus] = {}
        # The notifier's view (`controller.notify.Notifier.to_json`), read when served.
        self.notifications: Callable[[], dict[str, Any]] | None = None
        # Counted from creation: a loop that never ticks goes unhealthy after the max age,
        # while a service still starting up is not reported dead at once.
        self.heartbeat: float = clock()

    # -- recording (the loop) ---------------------------------------------------------------

    def beat(self) -> None:
        """The loop is alive: call on every tick, idle ones included."""
        self.heartbeat = self.clock()

    def set_revision(self, revision_id: str, fetched_at: float | None = None) -> None:
        """A revision passed validation and is now the one converged to."""
        self.revision = Revision(revision_id, self.clock() if fetched_at is None else fetched_at)
        if self.revision_error is not None and self.revision_error.id == revision_id:
            self.revision_error = None

    def set_revision_error(self, revision_id: str, diagnostics: str) -> None:
        """A newer revision failed validation; the loop keeps the last good one."""
        self.revision_error = RevisionError(revision_id, diagnostics, self.clock())

    def clear_revision_error(self) -> None:
        self.revision_error = None

    def set_lease(self, holder: str | None, token: int | str | None, is_leader: bool) -> None:
        changed = (holder, token, is_leader) != (
            self.lease.holder,
            self.lease.token,
            self.lease.is_leader,
        )
        if changed:
            self.lease = Lease(holder, token, is_leader, self.clock())

    def record_observe(self, ok: bool, error: str = "") -> None:
        self.observe = Observe(ok, self.clock(), "" if ok else error)

    def record_plan(
        self,
        wanted: Iterable[str],
        *,
        in_sync: Iterable[str] = (),
        withheld: Mapping[str, str] | None = None,
        unseen: Mapping[str, str] | None = None,
        partial: bool = False,
    ) -> None:
        """A plan's verdict on every resource it looked at, recorded before its results:

            wanted    a change to make: pending, unless it failed or backs off (a failure
                      keeps its error and retry time until its next result)
            in_sync   nothing to do: converged (a past failure is over: it is as the spec says)
            withheld  address -> why no change is made to it (held back, not ready, claimed
                      twice, waiting for something that backs off): withheld
            unseen    address -> why it could not be looked at (its observer failed): unknown,
                      unless it failed or backs off (that is kept)

        A full cycle's plan (`partial` False): drift is the count of `wanted`, and the listing
        is complete, so a resource in none of them (no longer desired, nor owned) is
        forgotten. The edge poll's (`partial`, its kinds only) leaves drift and the other
        resources as they are."""
        addresses = list(wanted)
        withheld = dict(withheld or {})
        unseen = dict(unseen or {})
        synced = list(in_sync)
        if not partial:
            self.drift = len(addresses)
            self.retain([*addresses, *synced, *withheld, *unseen])
        for address in addresses:
            status = self.resources.setdefault(address, ResourceStatus())
            if status.state not in (ResourceState.FAILED, ResourceState.BACKOFF):
                status.state = ResourceState.PENDING
                status.last_error = ""
        for address in synced:
            status = self.resources.setdefault(address, ResourceStatus())
            status.state = ResourceState.CONVERGED
            status.last_error = ""
            status.attempts = 0
            status.next_retry_at = None
        for address, reason in withheld.items():
            self.withhold(address, reason)
        for address, reason in unseen.items():
            status = self.resources.setdefault(address, ResourceStatus())
            if status.state not in (ResourceState.FAILED, ResourceState.BACKOFF):
                status.state = ResourceState.UNKNOWN
                status.last_error = reason

    def set_drift(self, n: int) -> None:
        self.drift = n

    def record_held_back(self, changes: Iterable[Change]) -> None:
        """The last plan's blocked changes: each is listed, and its resource is withheld."""
        self.held_back = [
            {
                "address": c.address,
                "action": c.action.value,
                "destroys": list(c.destroys),
                "reason": c.reason,
                "why": c.blocked,
            }
            for c in changes
        ]
        for item in self.held_back:
            self.withhold(item["address"], f"held back: {item['why']}")

    def record_backups(self, items: Iterable[BackupFreshness]) -> list[BackupTransition]:
        """The last full plan's backup freshness (`Plan.backups`): kept for /status, and the
        transitions since the last one returned: into stale or missing (from anything else,
        first sight included) and back to fresh (from stale or missing). A guest that is no
        longer listed (it left the spec, or its job) is forgotten."""
        listed = sorted(items, key=lambda b: (b.guest, b.job))
        self.backups = listed
        self.backups_at = self.clock()
        bad = (Freshness.STALE, Freshness.MISSING)
        changes: list[BackupTransition] = []
        known: dict[tuple[str, str], Freshness] = {}
        for item in listed:
            key = (item.guest, item.job)
            was = self._freshness.get(key)
            now = item.freshness
            if now is Freshness.UNKNOWN:
                if was is not None:
                    known[key] = was
                continue
            known[key] = now
            turned_bad = now in bad and now is not was
            if turned_bad or (now is Freshness.FRESH and was in bad):
                changes.append(BackupTransition(item, was))
        self._freshness = known
        return changes

    def count_backups(self) -> dict[str, int]:
        """The last full plan's guests by freshness, one per (guest, job) as listed."""
        counts = dict.fromkeys((f.value for f in Freshness), 0)
        for item in self.backups or ():
            counts[item.freshness.value] += 1
        return counts

    def record_result(
        self,
        address: str,
        ok: bool,
        error: str = "",
        next_retry_at: float | None = None,
    ) -> None:
        """One change's result. A failure with `next_retry_at` is in backoff until then."""
        status = self.resources.setdefault(address, ResourceStatus())
        if ok:
            status.state = ResourceState.CONVERGED
            status.last_error = ""
            status.attempts = 0
            status.next_retry_at = None
            status.last_change_at = self.clock()
            return
        status.attempts += 1
        status.last_error = error
        status.next_retry_at = next_retry_at
        status.state = ResourceState.FAILED if next_retry_at is None else ResourceState.BACKOFF

    def withhold(self, address: str, reason: str) -> None:
        """Not applied on purpose: a dependency failed, or a policy holds it back."""
        status = self.resources.setdefault(address, ResourceStatus())
        status.state = ResourceState.WITHHELD
        status.last_error = reason

    def record_report(
        self, report: ApplyReport, next_retry_at: Mapping[str, float] | None = None
    ) -> None:
        """Every result of one apply; `next_retry_at` maps a failed address to its retry."""
        retries = next_retry_at or {}
        for result in report.results:
            address = result.change.address
            if result.outcome is Outcome.DONE:
                self.record_result(address, True)
            elif result.outcome is Outcome.FAILED:
                self.record_result(address, False, result.error, retries.get(address))
            elif result.outcome is Outcome.SKIPPED:
                self.withhold(address, result.error)
            # DRY_RUN changes nothing: the resource keeps its state

    def retain(self, addresses: Iterable[str]) -> None:
        """Forget resources no longer desired or owned (removed from the spec and deleted)."""
        keep = set(addresses)
        for address in [a for a in self.resources if a not in keep]:
            del self.resources[address]

    def record_cycle(
        self,
        kind: CycleKind | str,
        outcome: CycleOutcome | str,
        *,
        started_at: float,
        finished_at: float | None = None,
        done: int = 0,
        failed: int = 0,
        skipped: int = 0,
        error: str = "",
        changes: Iterable[str] = (),
    ) -> Cycle:
        """A cycle ended (`finished_at` defaults to now). Returns the record kept."""
        cycle = Cycle(
            CycleKind(kind),
            CycleOutcome(outcome),
            started_at,
            self.clock() if finished_at is None else finished_at,
            done,
            failed,
            skipped,
            error,
            tuple(changes),
        )
        self.last_cycle = cycle
        return cycle

    # -- reading (the listener) -------------------------------------------------------------

    def heartbeat_age(self) -> float:
        return max(0.0, self.clock() - self.heartbeat)

    def readiness(self) -> Readiness:
        """Ready when a good revision is loaded and the last observe succeeded. Leadership is
        not a condition: a standby replica is healthy and ready to take over."""
        has_revision = self.revision is not None
        observed = self.observe is not None and self.observe.ok
        reasons = []
        if not has_revision:
            if self.revision_error is not None:
                reasons.append(f"no good revision loaded ({self.revision_error.id} is invalid)")
            else:
                reasons.append("no revision loaded yet")
        if self.observe is None:
            reasons.append("nothing observed yet")
        elif not self.observe.ok:
            reasons.append(f"last observe failed: {self.observe.error}")
        return Readiness(has_revision and observed, "; ".join(reasons), has_revision, observed)

    @property
    def ready(self) -> bool:
        return self.readiness().ready

    def count_states(self) -> dict[str, int]:
        counts = dict.fromkeys((s.value for s in ResourceState), 0)
        for status in self.resources.values():
            counts[status.state.value] += 1
        return counts

    def to_json(self) -> dict[str, Any]:
        revision = self.revision
        bad = self.revision_error
        return {
            "platform": self.platform,
            "source": self.source,
            "revision": None
            if revision is None
            else {"id": revision.id, "fetched_at": rfc3339(revision.fetched_at)},
            "revision_error": None
            if bad is None
            else {"id": bad.id, "diagnostics": bad.diagnostics, "at": rfc3339(bad.at)},
            "lease": {
                "holder": self.lease.holder,
                "token": self.lease.token,
                "is_leader": self.lease.is_leader,
                "changed_at": rfc3339(self.lease.changed_at),
            },
            "last_cycle": None if self.last_cycle is None else self.last_cycle.to_json(),
            "drift": self.drift,
            "held_back": self.held_back,
            "backups": None
            if self.backups is None
            else {
                "at": rfc3339(self.backups_at),
                "counts": self.count_backups(),
                "guests": [b.to_json() for b in self.backups],  # no notes: nothing written by hand
            },
            "notifications": self.notifications() if self.notifications is not None else None,
            "observe": None
            if self.observe is None
            else {
                "ok": self.observe.ok,
                "at": rfc3339(self.observe.at),
                "error": self.observe.error,
            },
            "heartbeat": {
                "at": rfc3339(self.heartbeat),
                "age_seconds": round(self.heartbeat_age(), 3),
            },
            "ready": self.readiness().to_json(),
            "summary": self.count_states(),
            "resources": {a: self.resources[a].to_json() for a in sorted(self.resources)},
        }


# --- a plan's verdicts, as the service records them -----------------------------------------


@dataclass(frozen=True)
class Verdicts:
    """A plan's verdict on each resource of the kinds it looked at: `StatusBoard.record_plan`'s
    arguments (see there)."""

    wanted: list[str]
    in_sync: list[str]
    withheld: dict[str, str]
    unseen: dict[str, str]


def plan_verdicts(
    graph: DesiredGraph,
    plan: Plan,
    observed: ObservedState | None,
    kinds: Iterable[Kind],
    *,
    left_out: Mapping[str, str] | None = None,
) -> Verdicts:
    """Every resource of `kinds` the plan looked at, desired or owned: a change to make, in
    sync, withheld (held back, or no change planned: the plan's diagnostic about it says why,
    not ready, claimed twice, not placeable; `left_out`: address -> why the caller left its
    change out), or unseen when its kind could not be observed."""
    scope = frozenset(kinds)
    kind_of: dict[str, Kind] = {a: r.kind for a, r in graph.resources.items() if r.kind in scope}
    if observed is not None:
        kind_of |= {a: r.kind for a, r in observed.owned().items() if r.kind in scope}
    changes = {c.address: c for c in plan.changes if c.kind in scope}
    kind_of |= {a: c.kind for a, c in changes.items()}
    wanted = [c.address for c in plan.actions if c.kind in scope]
    in_sync = [a for a, c in changes.items() if c.action is Action.NOOP and not c.blocked]
    withheld = {c.address: f"held back: {c.blocked}" for c in plan.blocked if c.kind in scope}
    withheld |= {a: why for a, why in (left_out or {}).items() if a in changes}
    looked = set(scope if observed is None or observed.kinds is None else observed.kinds)
    errors = observed.errors if observed is not None else {}
    said: dict[str, str] = {}
    for d in plan.diagnostics:
        if d.address:
            said.setdefault(d.address, d.message)
    unseen: dict[str, str] = {}
    for address, kind in kind_of.items():
        if address in changes:
            continue
        if kind not in looked:
            unseen[address] = errors.get(kind.value, f"{kind.value} was not observed")
        else:
            withheld[address] = said.get(address, "no change planned (see the plan)")
    return Verdicts(wanted, in_sync, withheld, unseen)


def cycle_outcome(plan: Plan, reports: Iterable[ApplyReport]) -> CycleOutcome:
    """A full cycle's outcome from its last plan and what it applied."""
    done = list(reports)
    if plan.errored:
        return CycleOutcome.ERRORED
    if any(r.count(Outcome.FAILED) or r.count(Outcome.SKIPPED) for r in done):
        return CycleOutcome.FAILED
    return CycleOutcome.CHANGED if done else CycleOutcome.CONVERGED
