"""The controller as a service (`reconciler run`): keeps the platform converged with the last
good revision of its specs, as one of possibly several replicas of which exactly one acts.

An anyio reactor in the style of kopf's: one task group holding

    the lease keeper   gains and keeps the leader lease (controller.lease); a change of
                       leadership wakes the worker (a new leader starts with a full cycle: the
                       resume, which finishes whatever a previous leader left half-done)
    the worker         the only task that observes and applies: it runs the due triggers of
                       `controller.timing.Schedule` one after the other, so nothing runs twice
                       at once and triggers coalesce
    the listener       /healthz /readyz /status /metrics /snapshot (controller.http)
    the notifier       sends what the loop tells it (controller.notify: failed changes and
                       cycles, drift healed, held-back destroys, isolation, unready guests,
                       leadership, stale backups), each target within its timeout, never
                       holding a cycle
    the signal watch   SIGTERM/SIGINT: stop starting changes, await those in flight up to
                       the grace period, release the lease (an info line, not the warning
                       a lost lease gives), exit
    the spec watch     a directory source only (`sources.WatchedSource`): its files' stat
                       every `watch_interval` s (1); a change that held still for one look
                       asks for a SOURCE poll at once, instead of waiting out its interval

The worker's triggers:

    SOURCE     poll the specs' source (controller.sources): a new revision is validated; a bad
               one is reported (status, log) and never applied, not even in part; a good one
               replaces the graph and asks for a FULL at once
    FULL       observe everything, plan, apply (applying.converging.converge); resources
               waiting out a backoff are left out of the plan; the observed state is published
               (file `<state dir>/observed.json`, the Redis key `reconciler:<platform>:observed`,
               and /snapshot) for CI to plan against; after changes, another FULL soon, which
               sees their effect (and registers what became ready); the plan's verdict on
               every resource it looked at goes to /status (converged, pending, withheld,
               unknown; then each change's result); the plan's backup freshness goes to
               /status and the gauges, and a guest whose backup turns stale or missing, or
               fresh again, is an event in the log
    INVENTORY  one Proxmox call (`/cluster/resources`) compared with the baseline: what the
               last FULL observed or, when it changed guests, one inventory read after its
               apply (so the controller's own changes are not taken for drift); any drift
               asks for a FULL at once, and is logged under `changes`, never `error`
    EDGE       Velocity, Traefik and the agents, with the guests' power state from one
               inventory call (which also serves as the INVENTORY check): the same
               `applying.converging.converge`, on the edge's kinds only and with the last
               snapshot's guests given; registrations and routes follow readiness within
               seconds

Every mutating action passes the lease's `check()` first (the executor's `guard`): a replica
that lost the lease, or never had it, changes nothing. A standby runs SOURCE only and reports.

Failures: a change that fails waits out a backoff per resource and kind (`timing.Backoffs`,
`timing.HANDLERS`): temporary errors retry with a growing delay, permanent ones wait long (or
for a new revision); one failing resource never blocks the others. An observer that fails
(Proxmox unreachable) fails the cycle, which the next interval retries; it is reported in
/status and /readyz.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from reconciler.applying.connecting import Connection, Endpoints, connect_platform
from reconciler.applying.converging import converge
from reconciler.applying.executor import ApplyReport, Outcome, Result
from reconciler.controller.http import read_token, serve_status
from reconciler.controller.lease import Lease, LeaseKeeper, LocalLease, RedisLease
from reconciler.controller.logs import Redactor
from reconciler.controller.metrics import Metrics
from reconciler.controller.notify import Notifier
from reconciler.controller.sources import (
    DirectorySource,
    GitSource,
    RevisionTracker,
    SpecSource,
    WatchedSource,
    poll,
)
from reconciler.controller.status import (
    CycleKind,
    CycleOutcome,
    StatusBoard,
    cycle_outcome,
    plan_verdicts,
)
from reconciler.controller.timing import Backoffs, Schedule, Trigger
from reconciler.loading.graph import build_graph
from reconciler.model.errors import ConfigurationError, ReconcilerError, first_error
from reconciler.model.observed import ObservedResource, ObservedState
from reconciler.model.plans import Freshness, Plan
from reconciler.model.resources import DesiredGraph, Kind
from reconciler.model.spec import PlatformSpec, SecretRef
from reconciler.planning.observed_policies import live_isolation
from reconciler.providers.proxmox import Inventory, ProxmoxProvider
from reconciler.providers.proxmox_inventory import inventory_drift
from reconciler.providers.redisconn import connect_redis
from reconciler.providers.secrets import read_secret

log = logging.getLogger("reconciler.service")

EDGE_KINDS = frozenset({Kind.VELOCITY, Kind.ROUTE})
# A follow-up FULL after changes were applied: soon, to see their effect, but not at once.
FOLLOW_UP = 5.0
_MIB = 1024 * 1024


@dataclass(frozen=True)
class Settings:
    intervals: Mapping[Trigger, float] = field(
        default_factory=lambda: {
            Trigger.SOURCE: 60.0,
            Trigger.FULL: 300.0,
            Trigger.INVENTORY: 30.0,
            Trigger.EDGE: 10.0,
        }
    )
    state_dir: Path = Path("/var/lib/reconciler")
    listen: tuple[str, int] | None = ("127.0.0.1", 9180)
    status_token: str | None = None  # required by /status, /snapshot, /metrics when set
    lease_interval: float = 5.0  # ttl / 3
    shutdown_grace: float = 60.0
    once: bool = False  # one SOURCE and one FULL, then stop
    # A directory source's files are looked at (stat only) this often; None: not watched.
    watch_interval: float | None = 1.0


def fields(**kw: Any) -> dict[str, Any]:
    return {"fields": kw}


def without(plan: Plan, leave_out: set[str]) -> Plan:
    """The plan without these resources, and without every change that needs one of them: it
    would fail, or (a guest's firewall change, which starts a guest held for it) act on a
    guest whose own change did not run. A held guest whose firewall change is left out stays
    stopped: fail closed."""
    out = set(leave_out)
    grew = True
    while grew:
        grew = False
        for c in plan.changes:
            if c.address not in out and any(d in out for d in c.depends_on):
                out.add(c.address)
                grew = True
    return replace(plan, changes=tuple(c for c in plan.changes if c.address not in out))


def inventory_baseline(inventory: Inventory) -> ObservedState:
    """What the inventory check compares a later inventory with, read from an inventory:
    every guest with what the check sees of it (node, name, power state, cores, memory in
    MiB, tags), in the units `inventory_drift` reads from a snapshot. Taken right after an
    apply that touched guests, so the controller's own changes are not reported as drift.
    For the check alone: never published, it holds no ownership nor config."""
    guests = [
        ObservedResource(
            kind=Kind.GUEST,
            id={"vmid": int(item["vmid"]), "node": item.get("node")},
            attributes={
                "name": item.get("name"),
                "state": "running" if item.get("status") == "running" else "stopped",
                "cores": int(item.get("maxcpu", 0)),
                "memory": int(item.get("maxmem", 0)) // _MIB,
                "tags": sorted({t for t in str(item.get("tags") or "").split(";") if t}),
            },
        )
        for item in inventory.guests
    ]
    return ObservedState(resources=tuple(guests))


class Service:
    """One replica of the controller. `run()` until cancelled or stopped."""

    def __init__(
        self,
        source: SpecSource,
        lease: Lease,
        endpoints: Endpoints,
        settings: Settings,
        *,
        board: StatusBoard | None = None,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        redactor: Redactor | None = None,
    ) -> None:
        self.source = source
        self.redactor = redactor
        self.lease = lease
        self.endpoints = endpoints
        self.settings = settings
        self.clock = clock
        self.wall = wall
        self.board = board or StatusBoard("", source.describe())
        self.metrics = metrics or Metrics()
        # What people hear: fed below where each event is recorded (controller.notify).
        self.notifier = Notifier(
            self.board, self.metrics, redactor=redactor, clock=clock, wall=wall
        )
        self.tracker = RevisionTracker(source.describe())
        self.schedule = Schedule.starting(settings.intervals, clock())
        self.backoffs = Backoffs()
        self.keeper = LeaseKeeper(
            lease, interval=settings.lease_interval, on_change=self._leadership
        )
        self.stopping = anyio.Event()
        self.port: int | None = None  # the listener's, once bound
        self.cycles: list[tuple[Trigger, CycleOutcome]] = []  # for --once and the tests
        self._wake = anyio.Event()
        self._spec: PlatformSpec | None = None
        self._graph: DesiredGraph | None = None
        self._revision: str | None = None
        self._conn: Connection | None = None
        self._conn_stack = contextlib.AsyncExitStack()
        self._snapshot: ObservedState | None = None
        self._snapshot_bytes: bytes | None = None
        # What the inventory check compares with: the snapshot, or the inventory read after
        # an apply that touched guests (`inventory_baseline`).
        self._baseline: ObservedState | None = None
        # The last plan's changes `_exclude` left out because what they need backs off.
        self._left_out: dict[str, str] = {}
        self._closing = False  # the lease is released because the service stops
        self._calls_seen = 0
        self._retries_seen: dict[str, int] = {}

    # --- the reactor ------------------------------------------------------------------------

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        self.settings.state_dir.mkdir(parents=True, exist_ok=True)
        async with anyio.create_task_group() as tg:
            if self.settings.listen is not None:
                host, port = self.settings.listen
                self.port = await tg.start(
                    lambda task_status: serve_status(
                        self.board,
                        self.metrics,
                        host=host,
                        port=port,
                        snapshot=lambda: self._snapshot_bytes,
                        token=self.settings.status_token,
                        task_status=task_status,
                    )
                )
                log.info("listening", extra=fields(address=f"{host}:{self.port}"))
            await tg.start(self.notifier.run)
            tg.start_soon(self.keeper.run)
            tg.start_soon(self._signals)
            every = self.settings.watch_interval
            if every and isinstance(self.source, WatchedSource) and not self.settings.once:
                tg.start_soon(self._watch, self.source, every)
            task_status.started()
            try:
                await self._work()
                await self.notifier.drain(min(5.0, self.settings.shutdown_grace))
            finally:
                self._closing = True  # the keeper releases the lease: not a lost one
                await self._conn_stack.aclose()
                tg.cancel_scope.cancel()
        log.info("stopped")

    def stop(self) -> None:
        self.stopping.set()
        self._wake.set()

    async def _signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info(
                    "shutting down",
                    extra=fields(
                        signal=signal.Signals(signum).name, grace=self.settings.shutdown_grace
                    ),
                )
                self.stop()
                return

    async def _watch(self, source: WatchedSource, every: float) -> None:
        """Look at a directory source's files every `every` s (stat only, in a worker thread)
        and ask for a SOURCE poll at once when they changed and then held still for one look:
        an editor's save (or a `git pull`) is several writes, and a half-written file would
        be reported as a bad revision. The poll itself reads the content; an edit the stat
        misses (the same size within the file system's time resolution) waits for the
        source interval, as before."""

        async def look() -> str:
            try:
                return await anyio.to_thread.run_sync(source.stamp)
            except Exception as exc:  # a bug here must not stop the service: the poll remains
                log.warning("specs not watched", extra=fields(error=f"{type(exc).__name__}: {exc}"))
                raise

        try:
            last = await look()
        except Exception:
            return
        seen = last
        while True:
            await anyio.sleep(every)
            try:
                now = await look()
            except Exception:
                return
            if now != last and now == seen:
                last = now
                log.info("specs changed", extra=fields(source=source.describe()))
                self.schedule.request(Trigger.SOURCE, self.clock())
                self._wake.set()
            seen = now

    def _leadership(self, is_leader: bool) -> None:
        self.metrics.set_leader(is_leader)
        self.notifier.leadership(is_leader, self.lease.holder, closing=self._closing)
        self.board.set_lease(self.lease.holder, self.lease.token, is_leader)
        if is_leader:
            log.info("leader", extra=fields(holder=self.lease.holder, token=self.lease.token))
            self.schedule.request(Trigger.FULL, self.clock())  # the resume
        elif self._closing:
            log.info("lease released", extra=fields(holder=self.lease.holder))
        else:
            log.warning("not the leader", extra=fields(holder=self.lease.holder))
        self._wake.set()

    async def _work(self) -> None:
        while not self.stopping.is_set():
            self.board.beat()
            now = self.clock()
            due = self.schedule.due(now)
            if not due:
                delay = max(0.0, self.schedule.next_wake() - now)
                with anyio.move_on_after(min(delay, 5.0)):  # 5 s: the heartbeat
                    await self._wake.wait()
                self._wake = anyio.Event()
                continue
            for trigger in due:
                if self.stopping.is_set():
                    break
                await self._run(trigger)
                if trigger is Trigger.SOURCE:
                    break  # a new revision asks for a full cycle first: look again
            if self.settings.once and any(t is Trigger.FULL for t, _ in self.cycles):
                break

    async def _run(self, trigger: Trigger) -> None:
        # Scheduled from its start, so that a request made while it runs (a follow-up, drift
        # seen) is kept.
        self.schedule.ran(trigger, self.clock())
        with anyio.CancelScope() as scope:
            # On shutdown, what is in flight gets the grace period, then is cancelled.
            async def bound() -> None:
                await self.stopping.wait()
                scope.deadline = anyio.current_time() + self.settings.shutdown_grace

            async with anyio.create_task_group() as tg:
                tg.start_soon(bound)
                try:
                    await self._dispatch(trigger)
                except Exception as exc:  # a bug or an unwrapped error: report, keep serving
                    log.exception("cycle failed", extra=fields(cycle=trigger.value))
                    kind = CycleKind(trigger.value) if trigger is not Trigger.SOURCE else None
                    if kind is not None:
                        message = f"internal error: {type(exc).__name__}: {exc}"
                        self._cycle_done(kind, CycleOutcome.ERRORED, self.wall(), 0.0, message)
                finally:
                    tg.cancel_scope.cancel()
        if scope.cancelled_caught:
            log.warning("cut short at the end of the grace period", extra=fields(cycle=trigger))

    async def _dispatch(self, trigger: Trigger) -> None:
        match trigger:
            case Trigger.SOURCE:
                await self._source()
            case Trigger.FULL:
                await self._full()
            case Trigger.INVENTORY:
                await self._inventory()
            case Trigger.EDGE:
                await self._edge()

    # --- SOURCE ------------------------------------------------------------------------------

    async def _source(self) -> None:
        before_bad = self.tracker.bad.revision.id if self.tracker.bad else None
        try:
            target = await poll(self.source, self.tracker)
        except ReconcilerError as exc:
            log.error(
                "specs fetch failed", extra=fields(source=self.source.describe(), error=str(exc))
            )
            return
        status = self.tracker.status()
        if status.bad_id and status.bad_id != before_bad:
            self.board.set_revision_error(status.bad_id, status.bad_diagnostics)
            log.error(
                "revision does not validate; not applied",
                extra=fields(
                    revision=status.bad_id,
                    converging_to=status.good_id,
                    diagnostics=status.bad_diagnostics,
                ),
            )
        if target is None or target.id == self._revision:
            return
        result = self.tracker.good_result
        assert result is not None and result.spec is not None
        spec = result.spec
        self._spec, self._graph = spec, build_graph(spec, result.source)
        self._revision = target.id
        self.board.platform = spec.platform.name
        self.board.set_revision(target.id)
        self.notifier.configure(spec)
        if status.bad_id is None:
            self.board.clear_revision_error()
        self.metrics.set_revision(target.id)
        if self.redactor is not None:
            redact_spec_secrets(self.redactor, spec)
        self.backoffs.new_revision()
        await self._reconnect(spec)
        log.info("revision", extra=fields(revision=target.id, summary=target.summary))
        self.schedule.request(Trigger.FULL, self.clock())

    async def _reconnect(self, spec: PlatformSpec) -> None:
        await self._conn_stack.aclose()
        self._conn_stack = contextlib.AsyncExitStack()
        self._conn = None
        try:
            self._conn = await self._conn_stack.enter_async_context(
                connect_platform(spec, self.endpoints)
            )
        except ReconcilerError as exc:
            self.board.record_observe(False, str(exc))
            log.error("cannot connect", extra=fields(error=str(exc)))

    # --- FULL --------------------------------------------------------------------------------

    def _may_act(self, kind: CycleKind) -> bool:
        if self._graph is None or self._spec is None:
            return False
        if self.keeper.is_leader:
            return True
        now = self.wall()
        self.board.record_cycle(
            kind, CycleOutcome.SKIPPED, started_at=now, finished_at=now, error="standby"
        )
        return False

    async def _full(self) -> None:
        if not self._may_act(CycleKind.FULL):
            return
        assert self._graph is not None and self._spec is not None
        if self._conn is None:
            await self._reconnect(self._spec)
            if self._conn is None:
                self._cycle_done(
                    CycleKind.FULL, CycleOutcome.ERRORED, self.wall(), 0.0, "no connection"
                )
                return
        conn, graph, spec = self._conn, self._graph, self._spec
        started, t0 = self.wall(), self.clock()
        self._left_out = {}
        try:
            result = await converge(
                graph,
                conn.providers,
                source=conn.source,
                # Unattended, a disk is destroyed only when the spec itself says prune: no
                # flag or environment variable of the service can allow it.
                allow_destroy=False,
                observed_checks=[live_isolation(spec)],
                agent_layers=conn.agent_layers,
                guard=self.lease.check,
                stop=self.stopping,
                exclude=self._exclude,
                progress=self._progress,
            )
        except (ReconcilerError, ExceptionGroup) as caught:
            # Concurrent observation fails with a group: ours is reported like one error.
            exc = first_error(caught)
            if exc is None:
                raise
            self.board.record_observe(False, str(exc))
            self._cycle_done(CycleKind.FULL, CycleOutcome.ERRORED, started, t0, str(exc))
            return
        finally:
            self._count_calls()
        self.board.record_observe(True)
        last = result.rounds[-1]
        if last.observed is not None:
            await self._publish(last.observed)
            self._baseline = last.observed
        reports = [r.report for r in result.rounds if r.report is not None]
        outcome = self._record(last.plan, last.observed, conn.kinds, reports)
        self.notifier.planned(last.plan, last.observed, reports, revision=self._revision, full=True)
        if _touched_guests(reports) and not self.stopping.is_set():
            await self._rebase(conn)
        error = "; ".join(d.message for d in last.plan.diagnostics if d.severity.value == "error")
        self._cycle_done(
            CycleKind.FULL, outcome, started, t0, error, reports, drift=len(last.plan.actions)
        )
        if any(r.count(Outcome.DONE) for r in reports):
            self.schedule.request(Trigger.FULL, self.clock() + FOLLOW_UP)

    async def _rebase(self, conn: Connection) -> None:
        """After an apply that touched guests, what the last observation saw of them is stale:
        the inventory check would report the controller's own changes as drift (and ask for
        a full cycle it does not need). One inventory read becomes its baseline until the
        next full cycle observes again. If it fails, the snapshot stays the baseline (the
        follow-up full cycle is due in seconds anyway)."""
        if conn.guests is None:
            return
        try:
            inventory = await conn.guests.inventory()
        except ReconcilerError as exc:
            log.warning("inventory not read after the apply", extra=fields(error=str(exc)))
            return
        finally:
            self._count_calls()
        self._baseline = inventory_baseline(inventory)

    def _exclude(self, plan: Plan) -> Plan:
        """Leave out the resources waiting out a backoff; they are retried when it ends. The
        changes left out with them (they need one of them) are remembered for /status."""
        blocked = self.backoffs.blocked(self.clock())
        self._left_out = {}
        if not blocked:
            return plan
        trimmed = without(plan, blocked)
        kept = {c.address for c in trimmed.changes}
        out = {c.address for c in plan.changes if c.address not in kept}
        for c in plan.actions:
            if c.address in out and c.address not in blocked:
                needs = ", ".join(d for d in c.depends_on if d in out) or "?"
                self._left_out[c.address] = f"not applied: needs {needs}, which waits (backoff)"
        return trimmed

    def _progress(self, result: Result, done: int, total: int) -> None:
        c = result.change
        extra = fields(
            address=c.address,
            action=c.action.value,
            outcome=result.outcome.value,
            seconds=round(result.seconds, 3),
            step=f"{done}/{total}",
            **({"error": result.error} if result.error else {}),
        )
        level = (
            logging.WARNING if result.outcome in (Outcome.FAILED, Outcome.SKIPPED) else logging.INFO
        )
        log.log(level, "change", extra=extra)

    def _record_states(
        self,
        plan: Plan,
        observed: ObservedState | None,
        kinds: Iterable[Kind],
        *,
        partial: bool,
    ) -> None:
        """The plan's verdict on every resource of `kinds` it looked at, desired or owned,
        into /status (`StatusBoard.record_plan`), before the results of its changes: a
        resource the cycle had nothing to do for is listed as converged. One with no change
        in the plan is withheld (the plan's diagnostic about it says why: not ready, claimed
        twice, not placeable) or, when its kind could not be observed, unknown."""
        assert self._graph is not None
        v = plan_verdicts(self._graph, plan, observed, kinds, left_out=self._left_out)
        for address in v.in_sync:
            self.backoffs.succeeded(address)  # as the spec says: nothing to retry
        self.board.record_plan(
            v.wanted, in_sync=v.in_sync, withheld=v.withheld, unseen=v.unseen, partial=partial
        )

    def _record(
        self,
        plan: Plan,
        observed: ObservedState | None,
        kinds: Iterable[Kind],
        reports: list[ApplyReport],
    ) -> CycleOutcome:
        """Results into backoffs, status and metrics; the cycle's outcome."""
        self._record_states(plan, observed, kinds, partial=False)
        self.metrics.set_drift(len(plan.actions))
        self._held_back(plan)
        self._backups(plan)
        self._record_results(reports)
        return cycle_outcome(plan, reports)

    def _held_back(self, plan: Plan) -> None:
        """Destroys the plan holds back (pruning is off): in /status, a gauge, and a warning
        in the log for each, every cycle, until someone decides."""
        held = plan.blocked
        self.board.record_held_back(held)
        self.metrics.set_held_back(len(held))
        for change in held:
            log.warning(
                "held back",
                extra=fields(
                    address=change.address,
                    action=change.action.value,
                    destroys=list(change.destroys),
                    reason=change.reason,
                    why=change.blocked,
                ),
            )

    def _backups(self, plan: Plan) -> None:
        """Backup freshness: in /status and the gauges every cycle, and in the log when a
        guest's backup turns stale or missing (first seen so included) or fresh again: the
        transitions only, so the log says when it happened (the state is in /status and the
        gauges) instead of repeating it every five minutes."""
        for change in self.board.record_backups(plan.backups):
            b = change.item
            extra = fields(
                guest=b.guest,
                job=b.job,
                vmid=b.vmid,
                freshness=b.freshness.value,
                was=change.was.value if change.was is not None else None,
                age=b.age,
                max_age=b.max_age,
                newest=b.newest,
            )
            if b.freshness is Freshness.FRESH:
                log.info("backup fresh again", extra=extra)
            else:
                log.warning(f"backup {b.freshness.value}", extra=extra)
        self.metrics.set_backups(plan.backups)

    def _cycle_done(
        self,
        kind: CycleKind,
        outcome: CycleOutcome,
        started: float,
        t0: float,
        error: str = "",
        reports: list[ApplyReport] | None = None,
        *,
        drift: int | None = None,
        changes: Sequence[str] = (),
    ) -> None:
        """Record and log a cycle's end. `drift`: how many changes it wanted (a plan's, or
        the differences an inventory check saw), `changes`: those differences; neither is an
        error, so the log line has them under their own keys and `error` only for errors."""
        reports = reports or []
        seconds = max(0.0, self.clock() - t0) if t0 else 0.0

        def count(which: Outcome) -> int:
            return sum(r.count(which) for r in reports)

        self.board.record_cycle(
            kind,
            outcome,
            started_at=started,
            finished_at=self.wall(),
            done=count(Outcome.DONE),
            failed=count(Outcome.FAILED),
            skipped=count(Outcome.SKIPPED),
            error=error,
            changes=changes[:20],
        )
        self.metrics.cycle(kind.value, outcome.value, seconds)
        self.cycles.append((Trigger(kind.value), outcome))
        self.notifier.cycle(kind, outcome, error)
        level = (
            logging.INFO
            if outcome in (CycleOutcome.CONVERGED, CycleOutcome.CHANGED)
            else logging.WARNING
        )
        log.log(
            level,
            "cycle",
            extra=fields(
                kind=kind.value,
                outcome=outcome.value,
                seconds=round(seconds, 3),
                revision=self._revision,
                **({"drift": drift} if drift is not None else {}),
                **({"changes": list(changes[:20])} if changes else {}),
                **({"error": error} if error else {}),
            ),
        )

    def _count_calls(self) -> None:
        if self._conn is None:
            return
        providers = self._conn.providers  # each once: the connection's registry
        calls = sum(int(getattr(p, "calls", 0)) for p in providers)
        if calls >= self._calls_seen:
            self.metrics.add_api_calls(calls - self._calls_seen)
        self._calls_seen = calls
        for p in providers:
            name = type(p).__name__
            retries = int(getattr(p, "retries", 0))
            before = self._retries_seen.get(name, 0)
            if retries > before:
                self.metrics.add_retries(name, retries - before)
            self._retries_seen[name] = retries

    async def _publish(self, observed: ObservedState) -> None:
        """The snapshot for CI: a file (atomically replaced), /snapshot, and a Redis key."""
        self._snapshot = observed
        data = (observed.model_dump_json(indent=1) + "\n").encode()
        self._snapshot_bytes = data
        path = self.settings.state_dir / "observed.json"
        try:
            fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".observed.", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                os.replace(temp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temp)
                raise
        except OSError as exc:  # /snapshot and Redis still have it
            log.warning("snapshot not written", extra=fields(path=str(path), error=str(exc)))
        if self._conn is not None and self._conn.redis is not None and self._spec is not None:
            key = f"reconciler:{self._spec.platform.name}:observed"
            try:
                await self._conn.redis.set(key, data)
            except Exception as exc:  # the file and /snapshot still have it
                log.warning("snapshot not published to Redis", extra=fields(error=str(exc)))

    # --- INVENTORY ---------------------------------------------------------------------------

    def _guests(self) -> ProxmoxProvider | None:
        return self._conn.guests if self._conn is not None else None

    async def _inventory(self) -> None:
        guests = self._guests()
        if not self._may_act(CycleKind.INVENTORY) or guests is None:
            return
        if self._snapshot is None:
            self.schedule.request(Trigger.FULL, self.clock())
            return
        started, t0 = self.wall(), self.clock()
        try:
            inventory = await guests.inventory()
        except ReconcilerError as exc:
            self._cycle_done(CycleKind.INVENTORY, CycleOutcome.ERRORED, started, t0, str(exc))
            return
        finally:
            self._count_calls()
        self._inventory_checked(inventory, started, t0)

    def _inventory_checked(self, inventory: Inventory, started: float, t0: float) -> None:
        """Compare a fresh inventory with the baseline (the last snapshot, or the inventory
        read after the last apply); drift asks for a full cycle. The edge poll reads the
        inventory anyway and checks it here too, so the separate inventory check is pushed
        back instead of asking Proxmox again."""
        baseline = self._baseline or self._snapshot
        assert baseline is not None
        drift = inventory_drift(baseline, inventory)
        if drift:
            log.info("inventory drift", extra=fields(drift=len(drift), changes=drift[:20]))
            self.schedule.request(Trigger.FULL, self.clock())
        outcome = CycleOutcome.CHANGED if drift else CycleOutcome.CONVERGED
        self._cycle_done(CycleKind.INVENTORY, outcome, started, t0, drift=len(drift), changes=drift)
        self.schedule.ran(Trigger.INVENTORY, self.clock())

    # --- EDGE --------------------------------------------------------------------------------

    async def _edge(self) -> None:
        guests = self._guests()
        conn = self._conn
        if not self._may_act(CycleKind.EDGE) or guests is None or conn is None:
            return
        if not conn.kinds & EDGE_KINDS or self._snapshot is None:
            return
        assert self._graph is not None
        started, t0 = self.wall(), self.clock()
        self._left_out = {}
        try:
            inventory = await guests.inventory()
            self._inventory_checked(inventory, started, t0)
            power = {
                int(i["vmid"]): "running" if i.get("status") == "running" else "stopped"
                for i in inventory.guests
            }
            known = [
                r.model_copy(
                    update={
                        "attributes": {
                            **r.attributes,
                            "state": power.get(int(r.id["vmid"]), "gone"),
                        }
                    }
                )
                for r in self._snapshot.resources
                if r.kind is Kind.GUEST and r.owned and r.id.get("vmid") in power
            ]
            # The one converge path, on the edge's kinds only: the guests are given (not looked
            # at, so nothing of them is planned); guests and their firewall are the full
            # cycle's, with its fresh observation and its checks.
            result = await converge(
                self._graph,
                conn.providers,
                source=conn.source,
                kinds=EDGE_KINDS,
                given=known,
                max_rounds=1,  # a conflict is met again by the next poll, seconds away
                agent_layers=conn.agent_layers,
                guard=self.lease.check,
                stop=self.stopping,
                exclude=self._exclude,
                progress=self._progress,
            )
            plan, observed = result.rounds[-1].plan, result.rounds[-1].observed
            reports = [r.report for r in result.rounds if r.report is not None]
        except (ReconcilerError, ExceptionGroup) as caught:
            exc = first_error(caught)
            if exc is None:
                raise
            self._cycle_done(CycleKind.EDGE, CycleOutcome.ERRORED, started, t0, str(exc))
            return
        finally:
            self._count_calls()
        self._record_states(plan, observed, conn.kinds & EDGE_KINDS, partial=True)
        outcome = self._record_edge(plan, reports)
        self.notifier.planned(plan, observed, reports, revision=self._revision, full=False)
        self._cycle_done(CycleKind.EDGE, outcome, started, t0, "", reports, drift=len(plan.actions))

    def _record_results(self, reports: list[ApplyReport]) -> None:
        now, wall = self.clock(), self.wall()
        retry_at: dict[str, float] = {}
        for report in reports:
            for r in report.results:
                if r.outcome is Outcome.DONE:
                    self.backoffs.succeeded(r.change.address)
                elif r.outcome is Outcome.FAILED:
                    until = self.backoffs.failed(
                        r.change, now, temporary=r.temporary, error=r.error
                    )
                    retry_at[r.change.address] = wall + (until - now)
            self.board.record_report(report, retry_at)
            self.metrics.record_report(report)
        self.metrics.set_backoff(len(self.backoffs.blocked(now)))

    def _record_edge(self, plan: Plan, reports: list[ApplyReport]) -> CycleOutcome:
        self._record_results(reports)
        if any(r.count(Outcome.FAILED) or r.count(Outcome.SKIPPED) for r in reports):
            return CycleOutcome.FAILED
        return CycleOutcome.CHANGED if reports else CycleOutcome.CONVERGED


# --- the command --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServiceOptions:
    """How to build a service: what `reconciler run`'s flags say (`cli.service.options_from`),
    typed, so the controller never sees the command line's namespace."""

    dir: str = "specs"
    git_url: str | None = None
    git_branch: str = "main"
    git_subdir: str = ""
    state_dir: Path = Path("/var/lib/reconciler")
    lease_name: str | None = None
    holder: str | None = None
    lease_ttl: float = 15.0
    listen: str = "127.0.0.1:9180"
    status_token_env: str | None = None
    status_token_file: str | None = None
    source_interval: float = 60.0
    interval: float = 300.0
    inventory_interval: float = 30.0
    edge_interval: float = 10.0
    shutdown_grace: float = 60.0
    once: bool = False
    watch_interval: float = 1.0  # a directory source's stat look; 0: not watched


def build_service(
    options: ServiceOptions,
    *,
    endpoints: Endpoints,
    board: StatusBoard | None = None,
    redactor: Redactor | None = None,
) -> tuple[Service, Callable[[], Awaitable[None]]]:
    """The service the options describe, and how to close what it opened."""
    state_dir = Path(options.state_dir)
    source: SpecSource
    if options.git_url:
        source = GitSource(
            options.git_url,
            branch=options.git_branch,
            subdir=options.git_subdir,
            workdir=state_dir / "git",
        )
    else:
        source = DirectorySource(options.dir)
    redis = None
    lease: Lease
    if endpoints.redis_url:
        password = read_secret(endpoints.redis_password) if endpoints.redis_password else None
        redis = connect_redis(endpoints.redis_url, password=password)
        lease = RedisLease(
            redis,
            name=options.lease_name or "reconciler",
            holder=options.holder,
            ttl=options.lease_ttl,
        )
    else:
        state_dir.mkdir(parents=True, exist_ok=True)
        lease = LocalLease(state_dir / "reconciler.lock", holder=options.holder)
    host, _, port = str(options.listen).rpartition(":")
    if not host or not port.isdigit():
        raise ConfigurationError(f"--listen {options.listen!r}: expected HOST:PORT")
    settings = Settings(
        intervals={
            Trigger.SOURCE: options.source_interval,
            Trigger.FULL: options.interval,
            Trigger.INVENTORY: options.inventory_interval,
            Trigger.EDGE: options.edge_interval,
        },
        state_dir=state_dir,
        listen=(host.strip("[]"), int(port)),
        status_token=read_token(options.status_token_env, options.status_token_file),
        lease_interval=options.lease_ttl / 3,
        shutdown_grace=options.shutdown_grace,
        once=options.once,
        watch_interval=options.watch_interval or None,
    )
    service = Service(source, lease, endpoints, settings, board=board, redactor=redactor)

    async def close() -> None:
        if redis is not None:
            await redis.aclose()

    return service, close


def _touched_guests(reports: Iterable[ApplyReport]) -> bool:
    """Did an apply change (or try to change) a guest? Then what was observed of the guests
    before it is stale for the inventory check."""
    return any(
        r.change.kind is Kind.GUEST and r.outcome in (Outcome.DONE, Outcome.FAILED)
        for report in reports
        for r in report.results
    )


def redact_spec_secrets(redactor: Redactor, spec: PlatformSpec) -> None:
    """The secrets a spec references (Proxmox credentials, the bridge secret) are masked in
    every log line from the moment the spec is loaded."""
    apis = [h.api for h in spec.hosts.values() if h.api is not None]
    if spec.proxmox is not None:
        apis.append(spec.proxmox)
    refs = [r for api in apis for r in (api.password, api.token_secret) if r is not None]
    if spec.velocity is not None:
        refs.append(spec.velocity.bridge.secret)
    for r in refs:
        with contextlib.suppress(ReconcilerError):
            redactor.add(read_secret(r))


def redact_secrets(redactor: Redactor, endpoints: Endpoints) -> None:
    """Known secrets never reach a log line, whatever message carries them."""
    refs: list[SecretRef] = []
    if endpoints.proxmox is not None:
        refs += [r for r in (endpoints.proxmox.password, endpoints.proxmox.token_secret) if r]
    refs += [r for r in (endpoints.agent_token, endpoints.redis_password) if r is not None]
    for r in refs:
        with contextlib.suppress(ReconcilerError):
            redactor.add(read_secret(r))
