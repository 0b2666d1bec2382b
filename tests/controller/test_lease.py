"""The leader lease against a real redis-server (the `redis_port` fixture, or one of our own
that a test kills), the local lock file against the real kernel, and the keeper with injected
time. Real waits are a few tenths of a second, only where Redis's own expiry is the point."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest
from redis.asyncio import Redis

from reconciler.controller.lease import (
    LOCAL_TOKEN,
    Lease,
    LeaseKeeper,
    LocalLease,
    RedisLease,
)
from reconciler.model.errors import ConfigurationError, FencingError, TemporaryError
from reconciler.providers.redisconn import connect_redis
from reconciler.simulators import processes

_names = itertools.count()


@pytest.fixture
def name() -> str:
    # One lease name per test: the module's redis-server is shared.
    return f"t{next(_names)}-{os.getpid()}"


class FakeTime:
    """A clock and a sleep that moves it: the keeper's rounds without waiting. With `stop`
    set, the sleep that makes `rounds` sleeps in all cancels it, like a stopping service."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []
        self.rounds: int | None = None
        self.stop: anyio.CancelScope | None = None

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        if self.stop is not None and self.rounds is not None and len(self.sleeps) >= self.rounds:
            self.stop.cancel()
        await anyio.lowlevel.checkpoint()


@asynccontextmanager
async def clients(port: int, n: int) -> AsyncIterator[list[Redis]]:
    # One client per controller, as on separate machines.
    made = [connect_redis(f"redis://127.0.0.1:{port}/0", timeout=1.0) for _ in range(n)]
    try:
        yield made
    finally:
        for client in made:
            await client.aclose()


def run(fn: Callable[[], Awaitable[object]]) -> object:
    return anyio.run(fn)


@pytest.fixture
def own_redis() -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """A redis-server this test may kill, to see the lease with Redis gone."""
    try:
        server = processes.start_redis()
    except processes.PartMissing as exc:
        pytest.fail(str(exc))
    try:
        yield server.port, server.proc
    finally:
        server.proc.kill()
        server.stop()


# -- RedisLease --------------------------------------------------------------------------------


def test_of_many_contenders_exactly_one_acquires(redis_port: int, name: str) -> None:
    async def main() -> None:
        async with clients(redis_port, 5) as made:
            leases = [RedisLease(r, name=name, holder=f"c{i}", ttl=5) for i, r in enumerate(made)]
            won: dict[str, bool] = {}

            async def contend(lease: RedisLease) -> None:
                won[lease.holder] = await lease.acquire()

            async with anyio.create_task_group() as tg:
                for lease in leases:
                    tg.start_soon(contend, lease)
            winners = [h for h, ok in won.items() if ok]
            assert len(winners) == 1
            leader = next(x for x in leases if x.holder == winners[0])
            assert await leader.check() == leader.token
            for lease in leases:
                if lease is not leader:
                    assert lease.token is None
                    with pytest.raises(FencingError):
                        await lease.check()
            info = await leases[0].info()
            assert info is not None
            assert (info.holder, info.token) == (leader.holder, leader.token)
            assert 4 < (info.ttl or 0) <= 5

    run(main)


def test_renewal_keeps_the_token_and_each_new_term_takes_a_bigger_one(
    redis_port: int, name: str
) -> None:
    async def main() -> None:
        async with clients(redis_port, 3) as (a_r, b_r, admin):
            a = RedisLease(a_r, name=name, holder="a", ttl=2)
            b = RedisLease(b_r, name=name, holder="b", ttl=2)
            assert await a.acquire()
            first = a.token
            await admin.pexpire(a.lease_key, 100)  # let the key almost run out, then renew
            assert await a.acquire()
            assert a.token == first
            assert await admin.pttl(a.lease_key) > 1500
            await a.release()
            assert a.token is None
            assert await b.acquire()
            assert b.token is not None and first is not None and b.token > first
            second = b.token
            await b.release()
            assert await a.acquire()
            assert a.token is not None and a.token > second
            await a.release()

    run(main)


def test_a_dead_leader_is_replaced_within_the_ttl_and_fenced_when_it_wakes(
    redis_port: int, name: str
) -> None:
    async def main() -> None:
        async with clients(redis_port, 2) as (a_r, b_r):
            # a's clock stands still: it was paused (GC, SIGSTOP) and believes its term is
            # fresh. Only Redis can tell it otherwise.
            a = RedisLease(a_r, name=name, holder="a", ttl=0.3, clock=lambda: 0.0)
            b = RedisLease(b_r, name=name, holder="b", ttl=0.3)
            assert await a.acquire()
            assert not await b.acquire()
            # What Redis says is left, no more (not timed here: on a busy machine the round
            # trips to Redis take what they take).
            assert b.expires_in is not None and 0 < b.expires_in <= 0.3
            # a dies: it just stops renewing. b waits what Redis said was left.
            await anyio.sleep(b.expires_in + 0.01)
            assert await b.acquire()
            assert a.token is not None  # a's own (frozen) clock still says leader...
            with pytest.raises(FencingError, match="lost the lease"):
                await a.check()  # ...Redis says no
            assert a.token is None
            assert not await a.acquire()
            assert await b.check() == b.token

    run(main)


def test_release_hands_the_lease_over_at_once(redis_port: int, name: str) -> None:
    async def main() -> None:
        async with clients(redis_port, 2) as (a_r, b_r):
            a = RedisLease(a_r, name=name, holder="a", ttl=30)
            b = RedisLease(b_r, name=name, holder="b", ttl=30)
            assert await a.acquire()
            assert not await b.acquire()
            await a.release()
            with pytest.raises(FencingError):
                await a.check()
            assert await b.acquire()
            await a.release()  # releasing again, or without holding, touches nothing
            assert await b.check() == b.token

    run(main)


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda r, key, token: r.delete(key), id="deleted"),
        pytest.param(lambda r, key, token: r.set(key, f"{token + 1}:b"), id="other-holder"),
        pytest.param(lambda r, key, token: r.set(key, f"{token + 1}:a"), id="same-holder-new-term"),
    ],
)
def test_check_asks_the_key_itself(
    redis_port: int,
    name: str,
    tamper: Callable[[Redis, str, int], Awaitable[object]],
) -> None:
    async def main() -> None:
        async with clients(redis_port, 2) as (a_r, admin):
            a = RedisLease(a_r, name=name, holder="a", ttl=30)
            assert await a.acquire()
            assert a.token is not None
            await tamper(admin, a.lease_key, a.token)
            with pytest.raises(FencingError):
                await a.check()
            assert a.token is None
            if await admin.exists(a.lease_key):
                assert not await a.acquire()  # someone else's term: wait it out

    run(main)


def test_a_term_runs_out_on_our_own_clock_even_if_redis_still_has_it(
    redis_port: int, name: str
) -> None:
    async def main() -> None:
        fake = FakeTime()
        async with clients(redis_port, 1) as (a_r,):
            a = RedisLease(a_r, name=name, holder="a", ttl=10, clock=fake.clock)
            assert await a.acquire()
            token = a.token
            await fake.sleep(9.99)
            assert await a.check() == a.token
            await fake.sleep(0.01)
            assert a.token is None
            with pytest.raises(FencingError, match="not the leader"):
                await a.check()
            # The key is still ours on the server: renewing continues the same term.
            assert await a.acquire()
            assert await a.check() == token

    run(main)


def test_redis_gone_means_temporary_errors_and_no_fencing_pass(
    own_redis: tuple[int, subprocess.Popen[bytes]], name: str
) -> None:
    port, proc = own_redis

    async def main() -> None:
        async with clients(port, 1) as (a_r,):
            a = RedisLease(a_r, name=name, holder="a", ttl=30)
            assert await a.acquire()
            proc.kill()
            proc.wait(5)
            with pytest.raises(TemporaryError, match="acquire"):
                await a.acquire()
            assert a.token is not None  # the term has not run out: still leader, but...
            with pytest.raises(FencingError, match="cannot confirm"):
                await a.check()  # ...unconfirmed is not enough to act
            with pytest.raises(TemporaryError):
                await a.info()
            await a.release()  # logs, never raises: the key runs out on its own

    run(main)


def test_a_lease_and_its_keeper_need_sensible_times(redis_port: int, tmp_path: Path) -> None:
    async def main() -> None:
        async with clients(redis_port, 1) as (r,):
            with pytest.raises(ConfigurationError, match="too short"):
                RedisLease(r, name="x", ttl=0)
        with pytest.raises(ConfigurationError, match="must be positive"):
            LeaseKeeper(LocalLease(tmp_path / "lock"), interval=0)

    run(main)


# -- LocalLease --------------------------------------------------------------------------------


def test_local_lease_refuses_a_second_holder(tmp_path: Path) -> None:
    path = tmp_path / "controller.lock"

    async def main() -> None:
        # Two open() calls are two open file descriptions: flock makes them conflict, just as
        # two processes would.
        a = LocalLease(path, holder="a")
        b = LocalLease(path, holder="b")
        assert await b.info() is None
        assert await a.acquire()
        assert await a.acquire()  # staying leader
        assert not await b.acquire()
        assert await a.check() == LOCAL_TOKEN
        with pytest.raises(FencingError):
            await b.check()
        info = await b.info()
        assert info is not None and (info.holder, info.ttl) == ("a", None)
        await a.release()
        assert await b.info() is None
        assert await b.acquire()
        assert b.token == LOCAL_TOKEN and a.token is None
        await b.release()

    run(main)


def test_local_lease_held_by_another_process_is_freed_when_it_dies(tmp_path: Path) -> None:
    path = tmp_path / "controller.lock"
    holder = (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(path)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
        "os.write(fd, b'other-copy\\n')\n"
        "print('locked', flush=True)\n"
        "time.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"locked\n"

        async def while_alive() -> None:
            ours = LocalLease(path, holder="us")
            assert not await ours.acquire()
            info = await ours.info()
            assert info is not None and info.holder == "other-copy"

        run(while_alive)
    finally:
        child.kill()
        child.wait(5)
        assert child.stdout is not None
        child.stdout.close()

    async def after_death() -> None:
        ours = LocalLease(path, holder="us")
        assert await ours.acquire()  # the kernel dropped the dead process's lock
        assert path.read_text() == "us\n"
        await ours.release()

    run(after_death)


def test_local_lease_notices_its_lock_file_replaced(tmp_path: Path) -> None:
    path = tmp_path / "controller.lock"

    async def main() -> None:
        a = LocalLease(path, holder="a")
        b = LocalLease(path, holder="b")
        assert await a.acquire()
        path.unlink()  # someone cleaned the state directory
        assert await b.acquire()  # a new file, a new lock: two copies could now run...
        with pytest.raises(FencingError, match="replaced"):
            await a.check()  # ...but the old one no longer passes
        assert not await a.acquire()
        await a.release()
        await b.release()

    run(main)


def test_local_lease_without_its_directory_is_a_configuration_error(tmp_path: Path) -> None:
    async def main() -> None:
        with pytest.raises(ConfigurationError, match="lock file"):
            await LocalLease(tmp_path / "missing" / "controller.lock").acquire()

    run(main)


# -- LeaseKeeper -------------------------------------------------------------------------------


async def run_keeper(keeper: LeaseKeeper, fake: FakeTime, rounds: int) -> None:
    """keeper.run() (built with fake.sleep) for `rounds` more sleeps, then cancelled."""
    fake.rounds = len(fake.sleeps) + rounds
    with anyio.CancelScope() as scope:
        fake.stop = scope
        await keeper.run()
    fake.stop = None


def test_keeper_renews_every_interval_and_releases_on_shutdown(redis_port: int, name: str) -> None:
    async def main() -> None:
        fake = FakeTime()
        seen: list[tuple[float, bool]] = []
        async with clients(redis_port, 2) as (a_r, admin):
            lease = RedisLease(a_r, name=name, holder="a", ttl=3, clock=fake.clock)
            keeper = LeaseKeeper(
                lease,
                interval=1,
                on_change=lambda lead: seen.append((fake.now, lead)),
                sleep=fake.sleep,
            )
            await run_keeper(keeper, fake, rounds=5)
            assert fake.sleeps == [1, 1, 1, 1, 1]
            assert seen == [(1000.0, True), (1005.0, False)]
            assert keeper.changes == 2 and not keeper.is_leader
            assert not await admin.exists(lease.lease_key)  # released: a standby goes at once
            assert await admin.get(lease.fence_key) == b"1"  # one term, renewed, not re-won

    run(main)


def test_keeper_steps_down_when_redis_fails_for_a_ttl(
    own_redis: tuple[int, subprocess.Popen[bytes]], name: str
) -> None:
    port, proc = own_redis

    async def main() -> None:
        fake = FakeTime()
        seen: list[tuple[float, bool]] = []
        async with clients(port, 1) as (a_r,):
            lease = RedisLease(a_r, name=name, holder="a", ttl=3, clock=fake.clock)
            keeper = LeaseKeeper(
                lease, interval=1, on_change=lambda lead: seen.append((fake.now, lead))
            )
            assert await keeper.step()
            proc.kill()
            proc.wait(5)
            leading: list[bool] = []
            for _ in range(4):
                await fake.sleep(keeper.interval)
                leading.append(await keeper.step())
                assert isinstance(keeper.last_error, TemporaryError)
            # Renewals failed at 1, 2 and 3 s; the term sent at 0 s ran out at 3 s.
            assert leading == [True, True, False, False]
            assert seen == [(1000.0, True), (1003.0, False)]
            with pytest.raises(FencingError):
                await lease.check()

    run(main)


def test_a_standby_keeper_takes_over_within_the_ttl(redis_port: int, name: str) -> None:
    async def main() -> None:
        ttl = 0.3
        # What the standby slept, and what its lease said was left of the term then.
        sleeps: list[tuple[float, float | None]] = []
        before: list[int] = []  # how many sleeps came before it took over

        async def sleep(seconds: float) -> None:
            sleeps.append((seconds, standby.lease.expires_in))
            await anyio.sleep(seconds)

        def on_change(lead: bool) -> None:
            if lead and not before:
                before.append(len(sleeps))
            took_over.set()

        async with clients(redis_port, 2) as (a_r, b_r):
            leader = LeaseKeeper(RedisLease(a_r, name=name, holder="a", ttl=ttl), interval=ttl / 3)
            took_over = anyio.Event()
            standby = LeaseKeeper(
                RedisLease(b_r, name=name, holder="b", ttl=ttl),
                interval=ttl / 3,
                on_change=on_change,
                sleep=sleep,
            )
            assert await leader.step()  # then the leader dies: no more rounds
            await anyio.sleep(ttl / 6)  # the standby starts half an interval out of phase
            async with anyio.create_task_group() as tg:
                tg.start_soon(standby.run)
                with anyio.fail_after(5):
                    await took_over.wait()
                tg.cancel_scope.cancel()
            assert standby.changes == 2  # became leader, then stepped down at shutdown
            # Within the ttl, counted in what the standby slept rather than on the wall clock
            # (which a busy machine stretches): each sleep is at most what Redis said was left
            # of the term, so together they are at most the ttl (plus the margin, and the
            # millisecond Redis rounds to).
            assert before and sum(s for s, _ in sleeps[: before[0]]) <= ttl + 0.005 + 0.002
            # The standby slept an interval, and less when the lease was running out: what was
            # left (and a margin), as the lease told it at the time.
            assert all(left is not None for _, left in sleeps[: before[0]]), sleeps
            for slept, left in sleeps:
                expected = ttl / 3 if left is None else min(ttl / 3, left + 0.005)
                assert slept == pytest.approx(expected), sleeps

    run(main)


def test_keeper_on_a_local_lease(tmp_path: Path) -> None:
    async def main() -> None:
        fake = FakeTime()
        first: Lease = LocalLease(tmp_path / "lock", holder="a")
        second: Lease = LocalLease(tmp_path / "lock", holder="b")
        a = LeaseKeeper(first, interval=5, sleep=fake.sleep)
        b = LeaseKeeper(second, interval=5, sleep=fake.sleep)
        assert await a.step()
        assert not await b.step()
        await run_keeper(a, fake, rounds=1)  # a shuts down and releases
        assert await b.step()
        assert (a.changes, b.changes) == (2, 1)
        await second.release()

    run(main)
