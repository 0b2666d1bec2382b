"""A real redis-server for the tests that need one (a pytest plugin, loaded by tests/conftest.py).

Started on a free loopback port, with no persistence. Missing redis-server fails the test: the
tests never skip a real part.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def redis_port() -> Iterator[int]:
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail(
            "redis-server is not on PATH: apt-get install redis-server "
            "(deploy/dev test installs it)"
        )
    workdir = tempfile.mkdtemp(prefix="redis-")
    for _ in range(3):  # another process may take the free port between probe and bind
        port = free_port()
        args = ["--port", str(port), "--bind", "127.0.0.1", "--dir", workdir]
        proc = subprocess.Popen(
            [exe, *args, "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and proc.poll() is None:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.02)
        if proc.poll() is None:
            break
    else:
        pytest.fail("redis-server did not start")
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait(5)
        shutil.rmtree(workdir, ignore_errors=True)
