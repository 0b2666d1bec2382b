"""The executor: runs a plan's changes wave by wave, concurrently within a wave, at most
`per_host` at a time on one Proxmox node (a migration counts on both its nodes), and reports
each change's outcome.

Called by `reconciler apply` and the controller. A failed change never stops the others; what
depends on it is skipped and reported, and the next run converges. Dry-run walks the very same
path and only skips the provider call.

Retries live in the providers (they know which errors are temporary); here a change is done or
failed. A failure with a ConflictError is marked `conflict`, which asks the caller
(`applying.live.converge`) to observe and plan again. A failed task's log lines travel with its
result. A bug in a provider (an exception outside our hierarchy) fails its change only, reported
as an internal error, so one bad change never hides the outcome of the others.

The service passes two more things. `guard` is awaited right before every provider call that
changes something: the leader lease's fencing check. When it raises FencingError this change
and every one not yet started are skipped; changes already running finish (a Proxmox task
cannot be taken back). `stop` is set on shutdown: changes not yet started are skipped, the
ones in flight are awaited (the caller bounds how long).

A plan with errors is refused with PlanError before anything runs; every caller checks
`plan.errored` first, so meeting it is a caller's bug, reported as one line by the CLI.
"""

from __future__ import annotations

import contextlib
import enum
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import anyio

from reconciler.model.errors import (
    ConflictError,
    FencingError,
    PlanError,
    ProviderError,
    TaskFailedError,
    TemporaryError,
)
from reconciler.model.plans import Change, Plan
from reconciler.model.resources import Kind
from reconciler.providers import Provider


class Outcome(enum.StrEnum):
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"
    DRY_RUN = "dry-run"


@dataclass(frozen=True)
class Result:
    change: Change
    outcome: Outcome
    error: str = ""
    seconds: float = 0.0
    conflict: bool = False
    log: tuple[str, ...] = ()  # a failed task's last log lines
    temporary: bool = False  # failed with a TemporaryError: worth retrying soon


@dataclass
class ApplyReport:
    results: list[Result] = field(default_factory=list)

    def count(self, outcome: Outcome) -> int:
        return sum(1 for r in self.results if r.outcome is outcome)

    @property
    def ok(self) -> bool:
        return not any(r.outcome in (Outcome.FAILED, Outcome.SKIPPED) for r in self.results)

    @property
    def needs_replan(self) -> bool:
        return any(r.conflict for r in self.results)


Progress = Callable[[Result, int, int], None]


def nodes_of(change: Change) -> list[str]:
    """The Proxmox nodes whose `per_host` limit a change counts toward, sorted: its node, and for
    a migration the node it leaves too (both work for the whole move)."""
    nodes = {str(change.id.get("node", "-"))}
    if change.moves is not None:
        nodes.add(change.moves[0])
    return sorted(nodes)


async def execute(
    plan: Plan,
    providers: Mapping[Kind, Provider],
    *,
    dry_run: bool = False,
    per_host: int = 4,
    progress: Progress | None = None,
    guard: Callable[[], Awaitable[object]] | None = None,
    stop: anyio.Event | None = None,
) -> ApplyReport:
    if plan.errored:
        raise PlanError("refusing to apply a plan with errors")
    report = ApplyReport()
    changes = list(plan.actions)
    total = len(changes)
    failed: set[str] = set()
    fenced: list[str] = []  # why this executor may no longer act, once it may not
    limits: dict[str, anyio.CapacityLimiter] = defaultdict(lambda: anyio.CapacityLimiter(per_host))
    waves: dict[int, list[Change]] = defaultdict(list)
    for change in changes:
        waves[change.wave].append(change)

    def record(result: Result) -> None:
        report.results.append(result)
        if result.outcome in (Outcome.FAILED, Outcome.SKIPPED):
            failed.add(result.change.address)
        if progress:
            progress(result, len(report.results), total)

    async def run(change: Change) -> None:
        blocked = [d for d in change.depends_on if d in failed]
        if blocked:
            record(Result(change, Outcome.SKIPPED, f"not applied: {blocked[0]} failed"))
            return
        provider = providers.get(change.kind)
        if provider is None:
            record(Result(change, Outcome.FAILED, f"no provider for {change.kind.value}"))
            return
        started = time.monotonic()
        async with contextlib.AsyncExitStack() as held:
            for node in nodes_of(change):  # in sorted order: opposite moves cannot deadlock
                await held.enter_async_context(limits[node])
            if dry_run:
                record(Result(change, Outcome.DRY_RUN))
                return
            if fenced:
                record(Result(change, Outcome.SKIPPED, f"not applied: {fenced[0]}"))
                return
            if stop is not None and stop.is_set():
                record(Result(change, Outcome.SKIPPED, "not started: shutting down"))
                return
            if guard is not None:
                try:
                    await guard()
                except Exception as exc:  # a lease that cannot say yes says no
                    why = str(exc) if isinstance(exc, FencingError) else f"lease check: {exc}"
                    fenced.append(why)
                    record(Result(change, Outcome.SKIPPED, f"not applied: {why}"))
                    return
            try:
                await provider.apply(change)
            except ProviderError as exc:
                record(
                    Result(
                        change,
                        Outcome.FAILED,
                        str(exc),
                        time.monotonic() - started,
                        conflict=isinstance(exc, ConflictError),
                        log=exc.log_tail if isinstance(exc, TaskFailedError) else (),
                        temporary=isinstance(exc, TemporaryError),
                    )
                )
                return
            except Exception as exc:  # a bug: fail this change, keep the others going
                message = f"internal error: {type(exc).__name__}: {exc}"
                record(Result(change, Outcome.FAILED, message, time.monotonic() - started))
                return
        record(Result(change, Outcome.DONE, seconds=time.monotonic() - started))

    for wave in sorted(waves):
        async with anyio.create_task_group() as tg:
            for change in waves[wave]:
                tg.start_soon(run, change)
    return report
