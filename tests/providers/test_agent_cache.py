"""Agent health cached in a real Redis as `agent:<vmid>`, with a short expiry.

Needs `redis-server` on PATH (tests/redis_fixtures.py starts one on a free loopback port; a
missing server fails the tests, never skips them: `deploy/dev test` installs it).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from redis.asyncio import Redis

from reconciler.providers.agent import AgentObserver, AgentTarget, read_cached
from reconciler.simulators.agent import AgentFleet
from tests.redis_fixtures import free_port


@pytest.fixture
def fleet() -> Iterator[AgentFleet]:
    fleet = AgentFleet(control=False)
    fleet.add(1001, name="mc-lobby")
    fleet.add(1002, name="mc-survival").unreachable()
    with fleet:
        yield fleet


def targets(fleet: AgentFleet) -> list[AgentTarget]:
    out = []
    for agent in fleet.all():
        out.append(AgentTarget(agent.vmid, f"guest/{agent.name}", agent.host, agent.port))
    return out


def run_with_redis(port: int, fn: Any) -> Any:
    async def main() -> Any:
        redis = Redis(host="127.0.0.1", port=port, decode_responses=True)
        try:
            await redis.flushdb()
            return await fn(redis)
        finally:
            await redis.aclose()

    return anyio.run(main)


def test_results_are_cached_with_a_15_s_expiry(redis_port: int, fleet: AgentFleet) -> None:
    async def scenario(redis: Redis) -> tuple[Any, ...]:
        observer = AgentObserver(redis=redis, timeout=0.5, connect_timeout=0.5)
        seen = await observer.observe(targets(fleet))
        ready, down = await redis.get("agent:1001"), await redis.get("agent:1002")
        ttls = await redis.pttl("agent:1001"), await redis.pttl("agent:1002")
        back = await read_cached(redis, 1001, "guest/mc-lobby")
        return seen, ready, down, ttls, back

    seen, ready, down, ttls, back = run_with_redis(redis_port, scenario)
    ready, down = json.loads(ready), json.loads(down)
    # The agent's own status, as the platform API stores it, plus what we add.
    assert ready["state"] == "running" and ready["ready"] is True
    assert ready["processRunning"] is True and ready["crashCount"] == 0
    assert ready["reachable"] is True and ready["checkedAt"]
    assert down["reachable"] is False and down["ready"] is False
    assert "connection refused" in down["error"]
    assert all(13_000 < ttl <= 15_000 for ttl in ttls)
    assert back == seen["guest/mc-lobby"]


def test_entries_expire(redis_port: int, fleet: AgentFleet) -> None:
    async def scenario(redis: Redis) -> tuple[Any, Any]:
        await AgentObserver(redis=redis, cache_ttl=0.2, timeout=0.5).observe(targets(fleet))
        first = await redis.get("agent:1001")
        await anyio.sleep(0.35)
        return first, await redis.get("agent:1001")

    first, later = run_with_redis(redis_port, scenario)
    assert first is not None and later is None


def test_without_redis_nothing_is_cached(redis_port: int, fleet: AgentFleet) -> None:
    async def scenario(redis: Redis) -> list[str]:
        await AgentObserver(timeout=0.5).observe(targets(fleet))
        return [key async for key in redis.scan_iter("agent:*")]

    assert run_with_redis(redis_port, scenario) == []


def test_redis_down_costs_only_the_cache(fleet: AgentFleet) -> None:
    async def scenario() -> tuple[Any, int]:
        redis = Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.5)
        try:
            observer = AgentObserver(redis=redis, timeout=0.5, cache_timeout=0.3)
            started = time.monotonic()
            seen = await observer.observe(targets(fleet))
            assert time.monotonic() - started < 1.5  # bounded, whatever redis-py's retries
            return seen, observer.cache_errors
        finally:
            await redis.aclose()

    seen, errors = anyio.run(scenario)
    assert seen["guest/mc-lobby"].ready is True
    assert errors == 1
