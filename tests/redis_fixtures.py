"""A real redis-server for the tests that need one (a pytest plugin, loaded by tests/conftest.py).

Started on a free loopback port, with no persistence. Missing redis-server fails the test: the
tests never skip a real part.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from reconciler.simulators import processes
from reconciler.simulators.processes import free_port

__all__ = ["free_port", "redis_port", "sentinel_url"]


@pytest.fixture(scope="module")
def redis_port() -> Iterator[int]:
    try:
        server = processes.start_redis()
    except processes.PartMissing as exc:
        pytest.fail(f"{exc} (deploy/dev test installs it)")
    try:
        yield server.port
    finally:
        server.stop()


@pytest.fixture(scope="module")
def sentinel_url(redis_port: int) -> Iterator[str]:
    """`redis+sentinel://` URL of a real Sentinel monitoring the module's redis-server as
    `mymaster`."""
    try:
        sentinel = processes.start_sentinel(redis_port)
    except processes.PartMissing as exc:
        pytest.fail(f"{exc} (deploy/dev test installs it)")
    try:
        yield sentinel.url
    finally:
        sentinel.stop()
