"""Waiting on a condition, never on a time: the one poll the tests share.

A busy two-core CI machine makes every duration a guess; a condition polled until a generous
deadline is not one. The pause between polls keeps a poll from starving what it waits for."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import anyio

T = TypeVar("T")


def wait_for(what: Callable[[], T], message: str = "", timeout: float = 30.0) -> T:
    """`what()` once it is truthy; AssertionError naming `message` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = what()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s: {message or what}")
        time.sleep(0.01)


def until(condition: Callable[[], Any], timeout: float = 30.0) -> None:
    """Wait for a condition (on a fake whose tasks may end after their request)."""
    wait_for(condition, "the condition", timeout)


async def eventually(what: Callable[[], T], message: str = "", timeout: float = 60.0) -> T:
    """`wait_for` inside an event loop: polls without blocking the loop (the service under
    test runs in it)."""
    with anyio.fail_after(timeout):
        while True:
            value = what()
            if value:
                return value
            await anyio.sleep(0.05)
    raise AssertionError(message)  # pragma: no cover - fail_after raises first
