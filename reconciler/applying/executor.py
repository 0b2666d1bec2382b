"""The executor: runs a plan's changes wave by wave, concurrently within a wave, at most
`per_host` at a time on one Proxmox node (a migration counts on both its nodes), and reports
each change's outcome.

Called by `applying.converging.converge` and by `reconciler apply --plan` (a saved plan,
planned again). A failed change never stops the others; what depends on it is skipped and
reported, and the next run converges. Dry-run walks the very same path and only skips the
provider call.

Retries live in the providers (they know which errors are temporary); here a change is done or
failed. A failure with a ConflictError is marked `conflict`, which asks the caller
(`applying.converging.converge`) to observe and plan again. A failed task's log lines travel
with its result. A bug in a provider (an exception outside our hierarchy) fails its change
only, reported as an internal error, so one bad change never hides the outcome of the others.

The service passes two more things. `guard` is awaited right before every provider call that
changes something: the leader lease's fencing check. When it raises FencingError this change
and every one not yet started are skipped; changes already running finish (a Proxmox task
cannot be taken back). `stop` is set on shutdown: changes not yet started are skipped, the
ones in flight are awaited (the caller bounds how long).

A plan with errors is refused with PlanError before anything runs; every caller checks
`plan.errored` first, so meeting it is a caller's bug, reported as one line by the CLI. The
providers come as the connection's registry (`applying.connecting.Connection.providers`); two
of them claiming one kind is a ConfigurationError, also before anything runs.
"""

from __future__ import annotations

import contextlib
import enum
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field

import anyio

from reconciler.model.errors import (
    ConfigurationError,
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


def providers_by_kind(providers: Iterable[Provider]) -> dict[Kind, Provider]:
    """Which provider applies each kind. A provider owning no kind (the agents' health) has
    nothing to apply and is not in it; two providers claiming one kind is a configuration
    error, caught before anything is applied."""
    by_kind: dict[Kind, Provider] = {}
    for provider in providers:
        for kind in provider.kinds:
            if by_kind.setdefault(kind, provider) is not provider:
                raise ConfigurationError(
                    f"two providers apply {kind.value}: {type(by_kind[kind]).__name__} and "
                    f"{type(provider).__name__}"
                )
    return by_kind


async def execute(
    plan: Plan,
    providers: Iterable[Provider],
    *,
    dry_run: bool = False,
    per_host: int = 4,
    progress: Progress | None = None,
    guard: Callable[[], Awaitable[object]] | None = None,
    stop: anyio.Event | None = None,
) -> ApplyReport:
    """Apply `plan`'s actions wave by wave, each wave's changes concurrently (see the module
    docstring); returns every change's outcome."""
    if plan.errored:
        raise PlanError("refusing to apply a plan with errors")
    run = _Execution(
        providers=providers_by_kind(providers),
        total=len(plan.actions),
        per_host=per_host,
        dry_run=dry_run,
        progress=progress,
        guard=guard,
        stop=stop,
    )
    waves: dict[int, list[Change]] = defaultdict(list)
    for change in plan.actions:
        waves[change.wave].append(change)
    for wave in sorted(waves):
        async with anyio.create_task_group() as tg:
            for change in waves[wave]:
                tg.start_soon(run.apply, change)
    return run.report


@dataclass(kw_only=True)
class _Execution:
    """One `execute`: what has failed so far (what depends on it is skipped), whether the lease
    was lost (nothing more starts), and each node's limit."""

    providers: Mapping[Kind, Provider]
    total: int
    per_host: int
    dry_run: bool
    progress: Progress | None
    guard: Callable[[], Awaitable[object]] | None
    stop: anyio.Event | None
    report: ApplyReport = field(default_factory=ApplyReport)
    failed: set[str] = field(default_factory=set)
    fenced: list[str] = field(default_factory=list)  # why it may no longer act, once it may not
    limits: dict[str, anyio.CapacityLimiter] = field(init=False)

    def __post_init__(self) -> None:
        self.limits = defaultdict(lambda: anyio.CapacityLimiter(self.per_host))

    def record(self, result: Result) -> None:
        self.report.results.append(result)
        if result.outcome in (Outcome.FAILED, Outcome.SKIPPED):
            self.failed.add(result.change.address)
        if self.progress:
            self.progress(result, len(self.report.results), self.total)

    async def apply(self, change: Change) -> None:
        """One change: refused, skipped or applied, and its result recorded."""
        blocked = [d for d in change.depends_on if d in self.failed]
        if blocked:
            self.record(Result(change, Outcome.SKIPPED, f"not applied: {blocked[0]} failed"))
            return
        provider = self.providers.get(change.kind)
        if provider is None:
            self.record(Result(change, Outcome.FAILED, f"no provider for {change.kind.value}"))
            return
        started = time.monotonic()  # its seconds count the wait for its nodes too
        async with contextlib.AsyncExitStack() as held:
            for node in nodes_of(change):  # in sorted order: opposite moves cannot deadlock
                await held.enter_async_context(self.limits[node])
            result = await self.held_back(change) or await self.call(provider, change, started)
        self.record(result)

    async def held_back(self, change: Change) -> Result | None:
        """Why this change does not reach its provider now that its turn has come: a dry run,
        a lost lease, a shutdown; None when it goes ahead."""
        if self.dry_run:
            return Result(change, Outcome.DRY_RUN)
        if self.fenced:
            return Result(change, Outcome.SKIPPED, f"not applied: {self.fenced[0]}")
        if self.stop is not None and self.stop.is_set():
            return Result(change, Outcome.SKIPPED, "not started: shutting down")
        if self.guard is not None:
            try:
                await self.guard()
            except Exception as exc:  # a lease that cannot say yes says no
                why = str(exc) if isinstance(exc, FencingError) else f"lease check: {exc}"
                self.fenced.append(why)
                return Result(change, Outcome.SKIPPED, f"not applied: {why}")
        return None

    @staticmethod
    async def call(provider: Provider, change: Change, started: float) -> Result:
        """The provider's apply; its failure becomes the change's result."""
        try:
            await provider.apply(change)
        except ProviderError as exc:
            return Result(
                change,
                Outcome.FAILED,
                str(exc),
                time.monotonic() - started,
                conflict=isinstance(exc, ConflictError),
                log=exc.log_tail if isinstance(exc, TaskFailedError) else (),
                temporary=isinstance(exc, TemporaryError),
            )
        except Exception as exc:  # a bug: fail this change, keep the others going
            message = f"internal error: {type(exc).__name__}: {exc}"
            return Result(change, Outcome.FAILED, message, time.monotonic() - started)
        return Result(change, Outcome.DONE, seconds=time.monotonic() - started)
