"""The executor against in-memory providers: wave order, skipping what depends on a failure,
per-node limits (a migration holds both its nodes), dry-run, fencing, and refusing an errored
plan.

A held fake parks every apply until the test releases it. The test releases only after a change
has started and every task is blocked (`anyio.wait_all_tasks_blocked`), so each release sees
exactly the changes the executor lets run at once: no sleeps, and a wrong limit or order shows as
a wrong set.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable, Mapping

import anyio
import pytest

from reconciler.applying.executor import ApplyReport, Outcome, execute, providers_by_kind
from reconciler.model.diagnostics import error
from reconciler.model.errors import ConfigurationError, FencingError, PermanentError, PlanError
from reconciler.model.observed import ObservedResource
from reconciler.model.plans import Action, Change, Plan
from reconciler.model.resources import Kind
from reconciler.providers import Observation, Provider


class FakeGuests:
    """A guest provider that records every apply. Held, each apply waits for its own release;
    `fail` maps an address to the error its apply raises."""

    kinds: frozenset[Kind] = frozenset({Kind.GUEST})
    needs: frozenset[Kind] = frozenset()
    streams: frozenset[Kind] = frozenset()
    optional: bool = False

    def __init__(self, *, held: bool = False, fail: Mapping[str, Exception] | None = None) -> None:
        self.held = held
        self.fail = dict(fail or {})
        self.calls: list[str] = []
        self.running: dict[str, tuple[Change, anyio.Event]] = {}
        self.moved = anyio.Event()  # set when a change starts (and by `run` when all are done)

    async def observe(self, seen: Observation) -> list[ObservedResource]:
        return []

    async def apply(self, change: Change) -> None:
        self.calls.append(change.address)
        if self.held:
            release = anyio.Event()
            self.running[change.address] = (change, release)
            self.moved.set()
            try:
                await release.wait()
            finally:
                del self.running[change.address]
        if change.address in self.fail:
            raise self.fail[change.address]


def busy_nodes(changes: list[Change]) -> Counter[str]:
    """How many of these changes work on each node, counted from the change itself: its node,
    and for a migration the node it leaves too."""
    count: Counter[str] = Counter()
    for c in changes:
        count.update({str(c.id["node"]), str(c.id.get("from", c.id["node"]))})
    return count


def guest(
    name: str,
    *,
    wave: int = 0,
    node: str = "pve1",
    depends_on: tuple[str, ...] = (),
    moves_from: str | None = None,
) -> Change:
    ident: dict[str, object] = {"node": node}
    if moves_from is not None:
        ident["from"] = moves_from
    return Change(
        address=f"guest/{name}",
        kind=Kind.GUEST,
        action=Action.CREATE if moves_from is None else Action.MIGRATE,
        wave=wave,
        id=ident,
        depends_on=depends_on,
    )


def plan_of(*changes: Change, errored: bool = False) -> Plan:
    diags = (error("test-error", "a spec mistake"),) if errored else ()
    return Plan(platform="lab", changes=changes, observed_digest="sha256:0", diagnostics=diags)


def run(
    plan: Plan,
    fake: FakeGuests,
    *,
    per_host: int = 4,
    dry_run: bool = False,
    guard: Callable[[], Awaitable[None]] | None = None,
) -> tuple[ApplyReport, list[frozenset[str]]]:
    """Apply `plan` with `fake`; when it is held, release the running changes each time every
    task is blocked, and return what ran together at each release."""
    together: list[frozenset[str]] = []

    async def main() -> ApplyReport:
        providers: list[Provider] = [fake]
        report: list[ApplyReport] = []
        done = anyio.Event()

        async def apply() -> None:
            report.append(
                await execute(plan, providers, per_host=per_host, dry_run=dry_run, guard=guard)
            )
            done.set()
            fake.moved.set()

        with anyio.fail_after(10):  # a deadlock fails the test instead of hanging it
            async with anyio.create_task_group() as tg:
                tg.start_soon(apply)
                while fake.held:
                    # Something happened (a start, or the end), then the rest caught up: a task
                    # just finished may still be completing, which the blocked check alone misses.
                    await fake.moved.wait()
                    await anyio.wait_all_tasks_blocked()
                    if done.is_set():
                        break
                    assert fake.running, ("all blocked, nothing running: a deadlock", together)
                    together.append(frozenset(fake.running))
                    busy = busy_nodes([c for c, _ in fake.running.values()])
                    assert max(busy.values()) <= per_host, busy
                    fake.moved = anyio.Event()
                    for _, release in list(fake.running.values()):
                        release.set()
        return report[0]

    return anyio.run(main), together


def outcomes(report: ApplyReport) -> dict[str, tuple[Outcome, str]]:
    return {r.change.address: (r.outcome, r.error) for r in report.results}


def test_waves_run_in_order_and_each_wave_concurrently() -> None:
    fake = FakeGuests(held=True)
    plan = plan_of(
        guest("e", wave=2),  # out of order on purpose: the wave decides, not the position
        guest("c", wave=1),
        guest("a", wave=0),
        guest("d", wave=1),
        guest("b", wave=0, node="pve2"),
    )
    report, together = run(plan, fake)
    assert together == [
        {"guest/a", "guest/b"},
        {"guest/c", "guest/d"},
        {"guest/e"},
    ]
    assert report.ok and report.count(Outcome.DONE) == 5


def test_a_failure_skips_what_depends_on_it_and_nothing_else() -> None:
    fake = FakeGuests(fail={"guest/a": PermanentError("disk full")})
    plan = plan_of(
        guest("a", wave=0),
        guest("b", wave=0),
        guest("c", wave=1, depends_on=("guest/a",)),
        guest("d", wave=1, depends_on=("guest/b",)),
        guest("e", wave=2, depends_on=("guest/c",)),  # skipped because what it needs was
    )
    report, _ = run(plan, fake)
    assert outcomes(report) == {
        "guest/a": (Outcome.FAILED, "disk full"),
        "guest/b": (Outcome.DONE, ""),
        "guest/c": (Outcome.SKIPPED, "not applied: guest/a failed"),
        "guest/d": (Outcome.DONE, ""),
        "guest/e": (Outcome.SKIPPED, "not applied: guest/c failed"),
    }
    assert sorted(fake.calls) == ["guest/a", "guest/b", "guest/d"]
    assert not report.ok


def test_a_provider_bug_fails_its_change_only() -> None:
    fake = FakeGuests(fail={"guest/a": KeyError("vmid")})
    report, _ = run(plan_of(guest("a"), guest("b")), fake)
    assert outcomes(report) == {
        "guest/a": (Outcome.FAILED, "internal error: KeyError: 'vmid'"),
        "guest/b": (Outcome.DONE, ""),
    }


@pytest.mark.parametrize("per_host", [1, 2, 3])
def test_per_node_limit(per_host: int) -> None:
    fake = FakeGuests(held=True)
    on_one = [guest(f"a{i}", node="pve1") for i in range(4)]
    on_two = [guest(f"b{i}", node="pve2") for i in range(2)]
    report, together = run(plan_of(*on_one, *on_two), fake, per_host=per_host)
    first = busy_nodes([c for c in (*on_one, *on_two) if c.address in together[0]])
    # the limit is reached (the work does run concurrently); `run` checks it is never passed
    assert first == {"pve1": min(per_host, 4), "pve2": min(per_host, 2)}
    assert len(together) == -(-4 // per_host)  # pve1's four changes, per_host at a time
    assert report.ok and sorted(fake.calls) == sorted(c.address for c in (*on_one, *on_two))


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param(
            [
                guest("m", node="pve2", moves_from="pve1"),
                guest("x", node="pve1"),
                guest("y", node="pve2"),
                guest("z", node="pve3"),
            ],
            id="a move holds both its nodes",
        ),
        pytest.param(
            [
                guest("m1", node="pve2", moves_from="pve1"),
                guest("m2", node="pve1", moves_from="pve2"),
            ],
            id="opposite moves take turns, no deadlock",
        ),
    ],
)
def test_a_migration_counts_on_both_nodes(changes: list[Change]) -> None:
    fake = FakeGuests(held=True)
    report, together = run(plan_of(*changes), fake, per_host=1)
    by_address = {c.address: c for c in changes}
    for step in together:  # `run` checks the limit too; this says what it means for a move
        for address in step:
            change = by_address[address]
            if change.moves is None:
                continue
            others = busy_nodes([by_address[a] for a in step - {address}])
            assert not others.keys() & set(change.moves), (address, step)
    assert report.ok and sorted(fake.calls) == sorted(by_address)


def test_dry_run_calls_nothing() -> None:
    fake = FakeGuests()
    asked: list[str] = []

    async def guard() -> None:
        asked.append("lease")

    plan = plan_of(guest("a"), guest("b", wave=1, depends_on=("guest/a",)))
    report, _ = run(plan, fake, dry_run=True, guard=guard)
    assert fake.calls == [] and asked == []
    assert [r.outcome for r in report.results] == [Outcome.DRY_RUN, Outcome.DRY_RUN]


def lease_lost_after(allowed: int) -> tuple[Callable[[], Awaitable[None]], list[int]]:
    """A guard that says yes `allowed` times, then raises FencingError; and its call count."""
    calls = [0]

    async def guard() -> None:
        calls[0] += 1
        if calls[0] > allowed:
            raise FencingError("lease held by other-1")

    return guard, calls


def test_fencing_stops_every_change_not_yet_started() -> None:
    fake = FakeGuests(held=True)
    guard, asked = lease_lost_after(1)
    plan = plan_of(
        guest("a"),
        guest("b"),  # same node, per_host=1: waits for a, then meets the lost lease
        guest("c"),  # waits too: never asks again once fenced
        guest("d", wave=1, node="pve2"),
    )
    report, together = run(plan, fake, per_host=1, guard=guard)
    assert together == [{"guest/a"}]  # the change in flight finishes
    assert outcomes(report) == {
        "guest/a": (Outcome.DONE, ""),
        "guest/b": (Outcome.SKIPPED, "not applied: lease held by other-1"),
        "guest/c": (Outcome.SKIPPED, "not applied: lease held by other-1"),
        "guest/d": (Outcome.SKIPPED, "not applied: lease held by other-1"),
    }
    assert fake.calls == ["guest/a"]
    assert asked == [2]


def test_an_errored_plan_is_refused_with_our_error() -> None:
    fake = FakeGuests()
    plan = plan_of(guest("a"), errored=True)
    with pytest.raises(PlanError, match="refusing to apply a plan with errors"):
        anyio.run(lambda: execute(plan, [fake]))
    assert fake.calls == []


def test_two_providers_of_one_kind_are_refused_before_anything_runs() -> None:
    first, second = FakeGuests(), FakeGuests()
    with pytest.raises(ConfigurationError, match="two providers apply guest"):
        anyio.run(lambda: execute(plan_of(guest("a")), [first, second]))
    assert first.calls == [] and second.calls == []


def test_a_provider_owning_no_kind_applies_nothing() -> None:
    watcher = FakeGuests()
    watcher.kinds = frozenset()  # like the agents' health: observed, never applied
    assert providers_by_kind([FakeGuests(), watcher]).keys() == {Kind.GUEST}
    report = anyio.run(lambda: execute(plan_of(guest("a")), [watcher]))
    assert outcomes(report) == {"guest/a": (Outcome.FAILED, "no provider for guest")}
