"""One HTTP client for the simulator tests: a client's TLS setup costs ~50 ms, a request on
loopback well under one."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest


@pytest.fixture(scope="session")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=2) as client:
        yield client
