"""The agent observer against the agent simulator, over real HTTP on loopback: every state the
simulator can be driven into, and what the observer makes of it."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import anyio
import pytest

from reconciler.providers.agent import AgentHealth, AgentObserver, AgentTarget
from reconciler.providers.pacing import AdaptiveLimit
from reconciler.simulators.agent import AgentFleet, SimulatedAgent
from tests.waiting import wait_for

TOKEN = "agent-bearer-t0ken"


@pytest.fixture
def fleet() -> Iterator[AgentFleet]:
    fleet = AgentFleet(control=False)
    fleet.add(1001, name="mc-lobby")
    with fleet:
        yield fleet


def target(fleet: AgentFleet, vmid: int) -> AgentTarget:
    ip, port = fleet.endpoint(vmid)
    return AgentTarget(vmid=vmid, address=f"guest/{fleet[vmid].name}", ip=ip, port=port)


def observe_one(fleet: AgentFleet, observer: AgentObserver, vmid: int = 1001) -> AgentHealth:
    return anyio.run(observer.observe_one, target(fleet, vmid))


@pytest.mark.parametrize(
    ("drive", "state", "ready", "crashes", "error"),
    [
        (lambda a: a.ready(), "running", True, 0, None),
        (lambda a: a.installing("download"), "installing", False, 0, None),
        (lambda a: a.starting(), "starting", False, 0, None),
        (lambda a: a.unready("RCON not answering"), "running", False, 0, "RCON not answering"),
        (lambda a: a.crash(reason="exit 137"), "error", False, 1, "exit 137"),
        (lambda a: a.crash().crash().ready(), "running", True, 2, None),
        (lambda a: a.stop(), "stopped", False, 0, None),
    ],
    ids=["ready", "installing", "starting", "unready", "crashed", "recovered", "stopped"],
)
def test_each_state_as_the_observer_sees_it(
    fleet: AgentFleet,
    drive: Callable[[SimulatedAgent], object],
    state: str,
    ready: bool,
    crashes: int,
    error: str | None,
) -> None:
    drive(fleet[1001])
    health = observe_one(fleet, AgentObserver())
    assert health.reachable is True
    assert (health.state, health.ready, health.crash_count, health.last_error) == (
        state,
        ready,
        crashes,
        error,
    )
    assert health.vmid == 1001 and health.address == "guest/mc-lobby"


def test_unreachable_agent_is_connection_refused(fleet: AgentFleet) -> None:
    fleet[1001].unreachable()
    health = observe_one(fleet, AgentObserver())
    assert health.reachable is False and health.ready is False and health.state is None
    assert health.last_error is not None
    assert "guest/mc-lobby" in health.last_error
    assert "connection refused" in health.last_error


@pytest.mark.parametrize("how", ["slow", "hang", "trickle"])
def test_slow_or_hung_agent_times_out_within_the_timeout(fleet: AgentFleet, how: str) -> None:
    """Within connect + read timeout, even for an agent that keeps every read alive."""
    if how == "slow":
        fleet[1001].slow(3.0)
    elif how == "hang":
        fleet[1001].hang()
    else:
        fleet[1001].trickle(0.1)
    observer = AgentObserver(timeout=0.3, connect_timeout=0.3)
    started = time.monotonic()
    health = observe_one(fleet, observer)
    elapsed = time.monotonic() - started
    assert health.reachable is False
    assert health.last_error is not None and "timed out" in health.last_error
    assert 0.3 <= elapsed < 1.5


def test_slow_agent_within_the_timeout_is_fine(fleet: AgentFleet) -> None:
    fleet[1001].slow(0.2)
    health = observe_one(fleet, AgentObserver(timeout=1.0))
    assert health.reachable is True and health.ready is True


def test_garbage_answer_is_unreachable_with_a_clear_error(fleet: AgentFleet) -> None:
    fleet[1001].garbage()
    health = observe_one(fleet, AgentObserver())
    assert health.reachable is False
    assert health.last_error is not None and "not JSON" in health.last_error


def test_bearer_token_required() -> None:
    fleet = AgentFleet(token=TOKEN, control=False)
    fleet.add(1001, name="mc-lobby")
    with fleet:
        without = observe_one(fleet, AgentObserver())
        wrong = observe_one(fleet, AgentObserver(token="not-the-token"))
        right = observe_one(fleet, AgentObserver(token=TOKEN))
    assert without.reachable is False
    assert without.last_error is not None and "401" in without.last_error
    assert "none is configured" in without.last_error
    assert wrong.reachable is False
    assert wrong.last_error is not None and "was refused" in wrong.last_error
    assert "not-the-token" not in wrong.last_error
    assert right.reachable is True and right.ready is True


def test_token_stays_out_of_repr() -> None:
    assert TOKEN not in repr(AgentObserver(token=TOKEN))


def test_a_mixed_platform_in_one_call_never_raises(fleet: AgentFleet) -> None:
    for vmid in range(1002, 1008):
        fleet.add(vmid, name=f"mc-{vmid}")
    fleet[1002].crash()
    fleet[1003].unreachable()
    fleet[1004].hang()
    fleet[1005].garbage()
    fleet[1006].installing()
    targets = [target(fleet, v) for v in range(1001, 1008)]
    targets.append(AgentTarget(vmid=1999, address="guest/gone", ip="127.0.0.1", port=1))
    targets.append(AgentTarget(vmid=2000, address="guest/typo", ip="10.0.0.300:x", port=18888))
    observer = AgentObserver(timeout=0.3, connect_timeout=0.3)
    started = time.monotonic()
    seen = anyio.run(observer.observe, reversed(targets))
    assert time.monotonic() - started < 1.5  # concurrent: one timeout, not one per agent
    assert list(seen) == [t.address for t in targets]  # by vmid
    assert {a: (h.reachable, h.ready) for a, h in seen.items()} == {
        "guest/mc-lobby": (True, True),
        "guest/mc-1002": (True, False),
        "guest/mc-1003": (False, False),
        "guest/mc-1004": (False, False),
        "guest/mc-1005": (False, False),
        "guest/mc-1006": (True, False),
        "guest/mc-1007": (True, True),
        "guest/gone": (False, False),
        "guest/typo": (False, False),
    }
    assert all(h.last_error for h in seen.values() if not h.reachable)


def test_concurrency_is_bounded() -> None:
    fleet = AgentFleet(control=False)
    for vmid in range(3000, 3024):
        fleet.add(vmid).slow(0.05)
    with fleet:
        observer = AgentObserver(concurrency=4)
        seen = anyio.run(observer.observe, [target(fleet, v) for v in range(3000, 3024)])
    assert all(h.ready for h in seen.values())
    assert 1 < fleet.max_in_flight <= 4
    assert observer.requests == 24


@pytest.mark.parametrize("how", ["overloaded", "hang"])
def test_overloaded_or_silent_agents_halve_the_bound_and_answers_climb_it_back(how: str) -> None:
    """One bound for all agents (AIMD, as the Proxmox API has): 503s, or a burst of timeouts,
    halve it; once the hold is over, answers climb it back. Counted at the agents: never more
    in flight than the bound."""
    now = [0.0]
    pacing = AdaptiveLimit(8, clock=lambda: now[0], hold=5.0)
    vmids = range(3100, 3132)
    fleet = AgentFleet(control=False)
    for vmid in vmids:
        agent = fleet.add(vmid).slow(0.01)
        agent.overloaded() if how == "overloaded" else agent.hang()
    with fleet:
        observer = AgentObserver(pacing=pacing, timeout=0.3, connect_timeout=0.3)
        targets = [target(fleet, v) for v in vmids]
        seen = anyio.run(observer.observe, targets)
        assert not any(h.reachable for h in seen.values())
        # Halved once: the other answers of the same overload fall within the hold.
        assert (pacing.decreases, pacing.current_limit) == (1, 4)
        assert 1 < pacing.peak <= 8
        if how == "overloaded":  # a hung request stays in flight at the agent after we give up
            assert 1 < fleet.max_in_flight <= 8

        now[0] = 10.0  # the hold is over; the agents answer again
        for vmid in vmids:
            fleet[vmid].reachable()
        wait_for(lambda: fleet.in_flight == 0, "the hung requests to be dropped")
        with fleet.lock:
            fleet.max_in_flight = 0
        seen = anyio.run(observer.observe, targets)
        assert all(h.ready for h in seen.values())
        assert pacing.current_limit == 8  # 4 -> 8 takes 4 + 5 + 6 + 7 = 22 answers of 32
        assert pacing.increases == 4
        assert fleet.max_in_flight <= 8
        assert pacing.peak <= 8
