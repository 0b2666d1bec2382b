"""The service's timing, on plain numbers: the schedule of its triggers and each resource's
backoff (no sleeping; `now` is whatever the test says)."""

from __future__ import annotations

from reconciler.controller.timing import Backoffs, Schedule, Trigger, handler_for
from reconciler.model.plans import Action, Change
from reconciler.model.resources import Kind

INTERVALS = {Trigger.SOURCE: 60.0, Trigger.FULL: 300.0, Trigger.INVENTORY: 30.0, Trigger.EDGE: 10.0}


def change(
    address: str = "guest/mc-lobby", kind: Kind = Kind.GUEST, action: Action = Action.UPDATE
) -> Change:
    return Change(address, kind, action, 0, {}, None, None)


def test_everything_is_due_at_start_and_a_full_cycle_hides_what_it_covers() -> None:
    s = Schedule.starting(INTERVALS, now=1000.0)
    assert s.due(1000.0) == [Trigger.SOURCE, Trigger.FULL]
    s.ran(Trigger.SOURCE, 1000.0)
    s.ran(Trigger.FULL, 1001.0)
    # the full cycle pushed the inventory check and the edge poll back by their intervals
    assert s.due(1010.5) == []
    assert s.due(1011.0) == [Trigger.EDGE]
    assert s.due(1031.0) == [Trigger.INVENTORY, Trigger.EDGE]
    assert s.next_wake() == 1011.0


def test_intervals_repeat_from_when_a_trigger_ran() -> None:
    s = Schedule.starting(INTERVALS, now=0.0)
    for t in s.due(0.0):
        s.ran(t, 0.0)
    ran = []
    now = 0.0
    while now < 300.0:
        now = s.next_wake()
        for t in s.due(now):
            ran.append((now, t))
            s.ran(t, now)
    edge = [t for t, trig in ran if trig is Trigger.EDGE]
    assert edge[:3] == [10.0, 20.0, 30.0]
    assert [t for t, trig in ran if trig is Trigger.INVENTORY] == [
        30.0,
        60.0,
        90.0,
        120.0,
        150.0,
        180.0,
        210.0,
        240.0,
        270.0,
    ]  # at 300 the full cycle covers it
    assert [t for t, trig in ran if trig is Trigger.SOURCE] == [60.0, 120.0, 180.0, 240.0, 300.0]
    assert [t for t, trig in ran if trig is Trigger.FULL] == [300.0]


def test_a_request_makes_a_trigger_due_earlier_never_later() -> None:
    s = Schedule.starting(INTERVALS, now=0.0)
    for t in s.due(0.0):
        s.ran(t, 0.0)
    s.request(Trigger.FULL, 42.0)  # a new revision at t=42
    assert Trigger.FULL in s.due(42.0)
    s.request(Trigger.FULL, 500.0)  # a later request does not postpone it
    assert Trigger.FULL in s.due(42.0)


def test_temporary_failures_back_off_exponentially_up_to_the_kinds_maximum() -> None:
    b = Backoffs()
    guest = handler_for(change())
    waits = []
    now = 0.0
    for _ in range(8):
        until = b.failed(change(), now, temporary=True, error="lock timeout")
        waits.append(until - now)
        assert "guest/mc-lobby" in b.blocked(now)
        assert "guest/mc-lobby" not in b.blocked(until)
        now = until
    assert waits[:4] == [guest.initial, guest.initial * 2, guest.initial * 4, guest.initial * 8]
    assert max(waits) == guest.maximum
    b.succeeded("guest/mc-lobby")
    assert b.failed(change(), now, temporary=True) - now == guest.initial


def test_the_edge_retries_sooner_than_guests() -> None:
    route = change("route/runtime/ide-alice", Kind.ROUTE, Action.CREATE)
    assert handler_for(route).initial < handler_for(change()).initial


def test_a_permanent_failure_waits_long_or_until_a_new_revision() -> None:
    b = Backoffs()
    until = b.failed(change(), 0.0, temporary=False, error="400 bad parameter")
    assert until == handler_for(change()).permanent
    b.failed(change("route/core/api", Kind.ROUTE), 0.0, temporary=True)
    assert b.blocked(1.0) == {"guest/mc-lobby", "route/core/api"}
    b.new_revision()
    assert "guest/mc-lobby" not in b.blocked(1.0)  # the new specs may be its fix
    assert "route/core/api" in b.blocked(1.0)  # a temporary wait is kept


def test_one_failing_resource_blocks_only_itself() -> None:
    b = Backoffs()
    b.failed(change("guest/mc-lobby"), 0.0, temporary=True)
    assert b.blocked(1.0) == {"guest/mc-lobby"}
