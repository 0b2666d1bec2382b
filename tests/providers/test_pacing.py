"""One bound on the calls in flight to a Proxmox API, halved when it says it is overloaded.

The limiter (`reconciler.providers.pacing.AdaptiveLimit`) on its own, on a fake clock: it never
lets more holders in than its current limit, halves on a 429/503 or a burst of timeouts (not
below 1, once per hold), and climbs back by one per window of successes, never past the limit
configured. Then through the real client against fakepve, counting the requests in flight at
the fake itself (a middleware of our own in front of its handlers): an observation of many
guests never has more in flight than `proxmox.max_concurrency`, and 503s injected into the
reads halve the bound while the run still converges.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.lowlevel
import pydantic
import pytest
from aiohttp import web
from proxmoxer.core import ResourceException

from reconciler.applying.connecting import proxmox_provider
from reconciler.applying.converging import converge
from reconciler.cli.live import add_connection_args, endpoints_from
from reconciler.loading.loader import LoadResult
from reconciler.model.errors import PermanentError, TemporaryError
from reconciler.model.resources import DesiredGraph
from reconciler.model.spec import ProxmoxApi
from reconciler.providers.firewall import FirewallProvider
from reconciler.providers.pacing import DEFAULT_LIMIT, AdaptiveLimit
from reconciler.providers.proxmox import ProxmoxProvider, RetryPolicy, classify, mark_line
from reconciler.simulators.pve import PlatformPve
from tests import fakepve_fixtures
from tests.fakepve_fixtures import no_sleep

HOLD = 5.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def until(condition: Callable[[], bool]) -> None:
    """Let the other tasks run until `condition` holds (no time passes on any clock)."""
    while not condition():
        await anyio.lowlevel.checkpoint()


def limit_on(clock: FakeClock, limit: int = 16) -> AdaptiveLimit:
    return AdaptiveLimit(limit, clock=clock, hold=HOLD, timeout_burst=3, timeout_window=10.0)


# --- the limiter ---------------------------------------------------------------------------------


def test_never_more_holders_than_the_limit_and_all_get_through() -> None:
    limit = AdaptiveLimit(3)
    done = 0
    most = 0
    release = anyio.Event()

    async def hold() -> None:
        nonlocal done, most
        async with limit:
            most = max(most, limit.in_flight)
            await release.wait()
            done += 1

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(hold)
            await until(lambda: limit.in_flight == 3 and limit.waiting == 17)
            release.set()

    anyio.run(main)
    assert (done, most, limit.peak, limit.in_flight) == (20, 3, 3, 0)


def test_halving_once_per_hold_down_to_one() -> None:
    clock = FakeClock()
    limit = limit_on(clock)
    limit.overloaded()
    assert (limit.current_limit, limit.decreases) == (8, 1)
    limit.overloaded()  # the same overload, answered to the other calls under way
    assert (limit.current_limit, limit.decreases) == (8, 1)
    seen = []
    for _ in range(6):
        clock.now += HOLD
        limit.overloaded()
        seen.append(limit.current_limit)
    assert seen == [4, 2, 1, 1, 1, 1]
    assert limit.decreases == 4


def test_a_burst_of_timeouts_halves_scattered_ones_do_not() -> None:
    clock = FakeClock()
    limit = limit_on(clock)
    for _ in range(5):
        limit.timed_out()
        clock.now += 6.0  # never three within 10 s
    assert (limit.current_limit, limit.decreases) == (16, 0)
    for _ in range(3):
        limit.timed_out()
    assert (limit.current_limit, limit.decreases) == (8, 1)


def test_climbs_back_by_one_per_window_never_past_the_limit() -> None:
    clock = FakeClock()
    limit = limit_on(clock)
    limit.overloaded()
    for _ in range(100):
        limit.succeeded()  # within the hold: no climbing yet
    assert limit.current_limit == 8
    clock.now += HOLD
    steps = []
    for _ in range(200):
        limit.succeeded()
        steps.append(limit.current_limit)
    # 8 answers at 8, then 9 at 9, ..., 15 at 15: back to 16 after 92, and never past it.
    assert steps.index(9) == 7 and steps.index(16) == sum(range(8, 16)) - 1
    assert max(steps) == 16 and limit.current_limit == 16 and limit.increases == 8


def test_a_lowered_limit_admits_no_one_until_enough_have_left() -> None:
    clock = FakeClock()
    limit = limit_on(clock, 4)
    leave = [anyio.Event() for _ in range(4)]
    admitted: list[int] = []

    async def hold(i: int) -> None:
        async with limit:
            admitted.append(i)
            if i < 4:
                await leave[i].wait()

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            for i in range(4):
                tg.start_soon(hold, i)
            await until(lambda: limit.in_flight == 4)
            limit.overloaded()  # 4 -> 2, with 4 still in flight
            tg.start_soon(hold, 4)
            await until(lambda: limit.waiting == 1)
            leave[0].set()
            await until(lambda: limit.in_flight == 3)
            leave[1].set()
            await until(lambda: limit.in_flight == 2)
            assert sorted(admitted) == [0, 1, 2, 3]  # 2 in flight: none more at a limit of 2
            leave[2].set()
            await until(lambda: 4 in admitted)
            leave[3].set()

    anyio.run(main)
    assert limit.peak == 4 and limit.in_flight == 0 and limit.current_limit == 2


def test_a_waiter_cancelled_leaves_the_counts_right() -> None:
    limit = AdaptiveLimit(1)

    async def main() -> None:
        async with limit:
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:

                    async def wait() -> None:
                        async with limit:
                            raise AssertionError("never admitted")

                    tg.start_soon(wait)
                    await until(lambda: limit.waiting == 1)
                    scope.cancel()
        assert limit.in_flight == 0 and not limit.waiting
        async with limit:
            assert limit.in_flight == 1

    anyio.run(main)


@pytest.mark.parametrize("value", [0, 257, "8", 8.0])
def test_the_spec_bound_is_a_strict_int_from_1_to_256(value: object) -> None:
    with pytest.raises(pydantic.ValidationError, match="max_concurrency"):
        ProxmoxApi(
            url="https://pve:8006", user="u@pve", password={"env": "X"}, max_concurrency=value
        )  # type: ignore[arg-type]


def test_the_spec_default_is_the_limiters() -> None:
    api = ProxmoxApi(url="https://pve:8006", user="u@pve", password={"env": "X"})  # type: ignore[arg-type]
    assert api.max_concurrency == DEFAULT_LIMIT == 16


def test_the_flag_reaches_the_endpoints() -> None:
    p = argparse.ArgumentParser()
    add_connection_args(p)
    assert endpoints_from(p.parse_args([])).proxmox_max_concurrency is None
    args = p.parse_args(["--proxmox-max-concurrency", "3"])
    assert endpoints_from(args).proxmox_max_concurrency == 3
    for bad in ("0", "257", "x"):
        with pytest.raises(SystemExit):
            p.parse_args(["--proxmox-max-concurrency", bad])


@pytest.mark.parametrize(("status", "read"), [(429, True), (429, False), (503, True), (503, False)])
def test_429_and_503_are_temporary(status: int, read: bool) -> None:
    error = classify(ResourceException(status, "Too Many Requests", ""), "read x", read=read)
    assert isinstance(error, TemporaryError) and error.status == status
    assert isinstance(classify(ResourceException(428, "", ""), "x"), PermanentError)


# --- against fakepve -----------------------------------------------------------------------------


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class CountingPve(PlatformPve):  # type: ignore[misc]
    """PlatformPve with a middleware in front of all of fakepve's own: the requests in flight
    at the server (`in_flight`, `peak`). With `gate` set, a config read is held until `gate`
    requests are in flight at once, so the bound is shown reached, not merely respected."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.in_flight = 0
        self.peak = 0
        self.gate: int | None = None
        self._gate_open: asyncio.Event | None = None

    def _build_app(self) -> web.Application:
        app: web.Application = super()._build_app()
        app.middlewares.insert(0, self._count)
        return app

    @web.middleware
    async def _count(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            if self.gate is not None and request.path.endswith("/config"):
                if self._gate_open is None:
                    self._gate_open = asyncio.Event()
                if self.in_flight >= self.gate:
                    self._gate_open.set()
                # A guard, not a pace: a client that never reaches the bound fails the test.
                await asyncio.wait_for(self._gate_open.wait(), 60)
            return await handler(request)
        finally:
            self.in_flight -= 1


@pytest.fixture
def _platform_pve(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fakepve_fixtures.fakepve_plugin, "FakePve", CountingPve)


GUESTS = 48
BOUND = 4


def seed_guests(pve: Any) -> None:
    for vmid in range(2000, 2000 + GUESTS):
        config = {"tags": "reconciler", "description": mark_line("zpack", f"guest/g{vmid}", None)}
        pve.add_ct(vmid, f"g{vmid}", node="pve-runtime", status="running", config=config)


def bounded_provider(example: LoadResult, api: ProxmoxApi, **kwargs: Any) -> ProxmoxProvider:
    assert example.spec is not None
    provider = proxmox_provider(example.spec, api, **kwargs)
    provider.retry = RetryPolicy(initial=0.0, maximum=0.0)
    provider.sleep = no_sleep
    return provider


def owned(observed: list[Any]) -> set[str]:
    return {str(r.address) for r in observed if r.owned}


def test_an_observation_never_has_more_in_flight_than_the_bound(
    example: LoadResult, pve: CountingPve, pve_api: ProxmoxApi
) -> None:
    seed_guests(pve)
    provider = bounded_provider(example, pve_api.model_copy(update={"max_concurrency": BOUND}))
    assert provider.concurrency == BOUND
    # Every answer 20 ms late (fakepve's network latency, in PVE seconds scaled to real ones):
    # requests overlap, so a client that sent more than the bound would be seen doing it.
    pve.time_scale = 0.001
    pve.slow_network(20.0)
    pve.peak = 0
    pve.gate = BOUND
    first = anyio.run(provider.observe)
    assert len(owned(first)) == GUESTS
    assert pve.peak == BOUND  # never passed, and reached: the gate held reads until it was
    assert provider.pacing.peak == BOUND and provider.pacing.decreases == 0

    # Proxmox overloaded: 503 to config reads. The bound halves, every read is retried.
    pve.gate = None
    pve.peak = 0
    pve.fail("GET", "/config", status=503, message="Service Unavailable", times=4)
    again = anyio.run(provider.observe)
    assert owned(again) == owned(first)
    assert provider.pacing.decreases >= 1 and provider.retries >= 4
    assert pve.peak <= BOUND and provider.pacing.peak == BOUND


def test_the_flag_overrides_the_spec_and_a_run_converges_through_503s(
    example: LoadResult, graph: DesiredGraph, pve: CountingPve, pve_api: ProxmoxApi
) -> None:
    provider = bounded_provider(example, pve_api, max_concurrency=2)
    assert (pve_api.max_concurrency, provider.concurrency) == (DEFAULT_LIMIT, 2)
    pve.peak = 0
    pve.fail("GET", "/cluster/resources", status=503, message="Service Unavailable", times=2)
    providers = [provider, FirewallProvider(pve=provider, manage_cluster=True)]
    conv = anyio.run(lambda: converge(graph, providers))
    assert conv.ok
    assert provider.pacing.decreases >= 1 and provider.retries >= 2
    assert pve.peak <= 2 and provider.pacing.peak <= 2
