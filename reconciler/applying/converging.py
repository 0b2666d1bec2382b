"""Converging: observe, plan, apply, and observe and plan again when what was seen changed
underneath (a conflict) or was moved on purpose (a migration).

The one path of every live run: the CLI's `apply [--target]`, the controller's full cycle and
edge poll, and the demo all call `converge`; only the set of addresses (`targets`) and of
kinds (`kinds`, `given`) differs. It reads the providers only through
`reconciler.providers.Provider`: `applying.observing.observe_all` asks them, the planner
(`planning.planner.make_plan`) decides, `applying.executor.execute` applies.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace

import anyio

from reconciler.applying.executor import ApplyReport, Outcome, Progress, execute
from reconciler.applying.observing import observe_all
from reconciler.model.observed import ObservedResource, ObservedState
from reconciler.model.plans import Cause, Plan
from reconciler.model.resources import DesiredGraph, Kind
from reconciler.planning.planner import ObservedCheck, make_plan
from reconciler.providers import Provider


@dataclass
class Round:
    plan: Plan
    report: ApplyReport | None = None
    observed: ObservedState | None = None  # what the plan was made from
    # Why another round followed: "conflict" (re-plan after a stale digest or a vmid race),
    # "migrated" (re-verify what follows a moved guest), "restored" (a guest came back from a
    # backup with the config it had then: converge it to the spec); "" when this was the last.
    again: str = ""


@dataclass
class Convergence:
    rounds: list[Round] = field(default_factory=list)

    def again(self) -> str:
        """For people: why it observed and planned more than once ("" when it did not)."""
        why = {
            "conflict": "after a conflict",
            "migrated": "to re-verify a migrated guest",
            "restored": "to converge a guest restored from its backup",
        }
        reasons = [why[r.again] for r in self.rounds if r.again]
        if not reasons:
            return ""
        times = "once" if len(reasons) == 1 else f"{len(reasons)} times"
        return f"observed and planned again {times}: " + ", ".join(dict.fromkeys(reasons))

    @property
    def ok(self) -> bool:
        if not self.rounds:
            return False
        last = self.rounds[-1]
        return not last.plan.errored and (last.report is None or last.report.ok)


async def converge(
    graph: DesiredGraph,
    providers: Iterable[Provider],
    *,
    source: str = "",
    allow_destroy: bool = False,
    targets: Iterable[str] = (),
    dry_run: bool = False,
    max_rounds: int = 3,
    approve: Callable[[Plan], bool] = lambda _plan: True,
    progress: Progress | None = None,
    observed_checks: Iterable[ObservedCheck] = (),
    agent_layers: Iterable[str] = (),
    guard: Callable[[], Awaitable[object]] | None = None,
    stop: anyio.Event | None = None,
    exclude: Callable[[Plan], Plan] | None = None,
    kinds: Iterable[Kind] | None = None,
    given: Iterable[ObservedResource] = (),
    final_backups: bool = True,
) -> Convergence:
    """Observe, plan, apply; when a change met a conflict (a stale digest, a vmid taken in a
    race), a guest was migrated (its firewall, Velocity registration and routes are
    re-verified on its new node) or restored from a backup (its config is the backup's),
    observe and plan again, up to `max_rounds` times. `final_backups`: see `make_plan`.
    `agent_layers`: the layers gated on the agents' health (`Connection.agent_layers`, see
    `make_plan`). `guard`, `stop`: see `applying.executor.execute`; `exclude` trims a plan
    before it is applied (the service leaves out resources waiting out a backoff).

    The full cycle, `apply [--target]` and the demo look at every kind; the edge poll passes
    `kinds` (only those are observed, planned and applied: a kind not looked at is never
    deleted) and `given` (what it already knows; see `observing.observe_all`)."""
    result = Convergence()
    registry = tuple(providers)
    targets, checks, layers = tuple(targets), tuple(observed_checks), tuple(agent_layers)
    only = frozenset(kinds) if kinds is not None else None
    known = tuple(given)
    for _ in range(max_rounds):
        observed = await observe_all(registry, graph.platform, source, kinds=only, given=known)
        plan = make_plan(
            graph,
            observed,
            allow_destroy=allow_destroy,
            targets=targets,
            observed_checks=checks,
            agent_layers=layers,
            final_backups=final_backups,
        )
        if only is not None:  # and whatever the plan holds besides: those kinds alone
            plan = replace(plan, changes=tuple(c for c in plan.changes if c.kind in only))
        round_ = Round(plan, observed=observed)
        result.rounds.append(round_)
        if exclude is not None:
            plan = exclude(plan)
        if plan.errored or not plan.has_changes or not approve(plan):
            break
        if stop is not None and stop.is_set():
            break
        round_.report = await execute(
            plan, registry, dry_run=dry_run, progress=progress, guard=guard, stop=stop
        )
        if dry_run:
            break
        if round_.report.needs_replan:
            round_.again = "conflict"
        elif _done(round_.report, Cause.MOVED):
            round_.again = "migrated"
        elif _done(round_.report, Cause.RESTORE):
            round_.again = "restored"
        else:
            break
    return result


def _done(report: ApplyReport, cause: Cause) -> bool:
    """Did a change of this cause happen? After a migration, what was observed before it
    (where a guest's firewall is, which address Velocity and the routes reach) is stale; after
    a restore, the guest has its backup's config: either way the caller looks again."""
    return any(r.outcome is Outcome.DONE and r.change.cause is cause for r in report.results)
