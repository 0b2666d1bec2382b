"""The status board and the status listener, over real HTTP: health, readiness, /status after a
forced failure, /metrics as Prometheus text, errors, the bearer token, slow clients that must
be dropped, a connection flood under a file-descriptor limit, and a crash of the server that
must not stop the listener."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.abc
import httpx
import pytest
from hypercorn.config import Config
from prometheus_client.parser import text_string_to_metric_families

from reconciler.applying.executor import ApplyReport, Outcome, Result
from reconciler.controller.http import (
    Listener,
    Request,
    StatusApp,
    bind,
    hypercorn_config,
    read_token,
    restart_delay,
    route,
    serve_hypercorn,
    serve_status,
)
from reconciler.controller.metrics import Metrics
from reconciler.controller.status import ResourceState, StatusBoard
from reconciler.model.errors import ConfigurationError
from reconciler.model.plans import Action, Change
from reconciler.model.resources import Kind

T0 = 1_714_564_800.0  # 2024-05-01T12:00:00Z
TOKEN = "0123456789abcdef0123456789abcdef"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class FakeClock:
    now: float = T0

    def __call__(self) -> float:
        return self.now


@dataclass
class Service:
    board: StatusBoard
    metrics: Metrics
    clock: FakeClock
    client: httpx.AsyncClient
    port: int


@asynccontextmanager
async def running(
    snapshot: Callable[[], bytes | None] | None = None,
    timeout: float = 5.0,
    token: str | None = None,
    host: str = "127.0.0.1",
) -> AsyncIterator[Service]:
    clock = FakeClock()
    board = StatusBoard("zpack", "dir specs", clock=clock)
    metrics = Metrics(clock=clock)
    async with anyio.create_task_group() as tg:
        port = await tg.start(
            lambda task_status: serve_status(
                board,
                metrics,
                host=host,
                port=0,
                snapshot=snapshot,
                heartbeat_max_age=30.0,
                timeout=timeout,
                token=token,
                task_status=task_status,
            )
        )
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=10.0
        ) as client:
            yield Service(board, metrics, clock, client, port)
        tg.cancel_scope.cancel()


def change(address: str, kind: Kind, action: Action = Action.CREATE) -> Change:
    return Change(address=address, kind=kind, action=action, wave=0)


# -- over HTTP ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_status_reflects_a_forced_failure() -> None:
    async with running() as svc:
        board = svc.board
        board.set_revision("rev-1")
        board.record_observe(True)
        board.record_plan(["guest/api", "route/core/portal"])
        board.record_result("route/core/portal", True)
        board.record_result("guest/api", False, "clone failed: storage full")
        board.record_cycle("full", "failed", started_at=T0 - 2, done=1, failed=1)
        board.set_lease("ctl-a", 7, True)

        response = await svc.client.get("/status")
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        assert response.headers["connection"] == "close"
        doc = response.json()

    assert doc["platform"] == "zpack"
    assert doc["revision"] == {"id": "rev-1", "fetched_at": "2024-05-01T12:00:00.000Z"}
    assert doc["resources"]["guest/api"] == {
        "state": "failed",
        "last_error": "clone failed: storage full",
        "attempts": 1,
        "next_retry_at": None,
        "last_change_at": None,
    }
    assert doc["resources"]["route/core/portal"]["state"] == "converged"
    assert doc["last_cycle"]["outcome"] == "failed"
    assert doc["last_cycle"]["kind"] == "full"
    assert doc["last_cycle"]["seconds"] == 2.0
    assert (doc["last_cycle"]["done"], doc["last_cycle"]["failed"]) == (1, 1)
    assert doc["drift"] == 2
    assert doc["lease"]["holder"] == "ctl-a"
    assert doc["lease"]["is_leader"] is True
    assert doc["summary"]["failed"] == 1
    assert doc["summary"]["converged"] == 1


@pytest.mark.anyio
async def test_metrics_parse_as_prometheus_text() -> None:
    async with running() as svc:
        m = svc.metrics
        m.cycle("full", "changed", 1.5)
        m.cycle("inventory", "converged", 0.2)
        m.action("guest", "create", "done")
        m.action("firewall/guest", "update", "failed")
        m.set_drift(3)
        m.add_api_calls(12)
        m.set_revision("rev-1")
        response = await svc.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}

    cycles = [s for s in families["reconciler_cycles"].samples if s.name.endswith("_total")]
    assert sum(s.value for s in cycles) == 2
    failed = [
        s
        for s in families["reconciler_actions"].samples
        if s.name.endswith("_total") and s.labels["result"] == "failed"
    ]
    assert [(s.labels["kind"], s.value) for s in failed] == [("firewall/guest", 1.0)]
    assert families["reconciler_drift"].samples[0].value == 3
    assert families["reconciler_proxmox_api_calls"].samples[0].value == 12
    assert families["reconciler_revision_info"].samples[0].labels == {"revision": "rev-1"}


@pytest.mark.anyio
async def test_healthz_goes_stale_without_a_heartbeat() -> None:
    async with running() as svc:
        assert (await svc.client.get("/healthz")).status_code == 200
        svc.clock.now += 31  # the loop missed its ticks
        stale = await svc.client.get("/healthz")
        assert stale.status_code == 503
        assert "stale" in stale.text
        svc.board.beat()
        again = await svc.client.get("/healthz")
        assert (again.status_code, again.text) == (200, "ok\n")


@pytest.mark.anyio
async def test_readyz_waits_for_a_revision_and_an_observe() -> None:
    async with running() as svc:
        before = await svc.client.get("/readyz")
        assert before.status_code == 503
        assert "no revision loaded yet" in before.text
        svc.board.set_revision("rev-1")
        svc.board.record_observe(False, "proxmox: connection refused")
        failing = await svc.client.get("/readyz")
        assert failing.status_code == 503
        assert "connection refused" in failing.text
        svc.board.record_observe(True)
        assert (await svc.client.get("/readyz")).status_code == 200


@pytest.mark.anyio
async def test_snapshot_404_until_published() -> None:
    published: list[bytes] = []
    async with running(snapshot=lambda: published[-1] if published else None) as svc:
        assert (await svc.client.get("/snapshot")).status_code == 404
        published.append(b'{"guests": []}')
        response = await svc.client.get("/snapshot")
        assert response.status_code == 200
        assert response.json() == {"guests": []}


@pytest.mark.anyio
async def test_unknown_path_and_method() -> None:
    async with running() as svc:
        assert (await svc.client.get("/nope")).status_code == 404
        post = await svc.client.post("/status", content=b"x")
        assert post.status_code == 405
        assert post.headers["allow"] == "GET, HEAD"
        head = await svc.client.head("/status")
        assert head.status_code == 200
        assert head.content == b""
        assert int(head.headers["content-length"]) > 0


@pytest.mark.anyio
async def test_malformed_and_oversized_heads() -> None:
    async with running() as svc:
        async with await anyio.connect_tcp("127.0.0.1", svc.port) as raw:
            await raw.send(b"NONSENSE\r\n\r\n")
            assert (await receive_all(raw)).startswith(b"HTTP/1.1 400 ")
        async with await anyio.connect_tcp("127.0.0.1", svc.port) as raw:
            await raw.send(
                b"GET /status HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n"
            )
            assert (await receive_all(raw)).startswith(b"HTTP/1.1 431 ")
        async with await anyio.connect_tcp("127.0.0.1", svc.port) as raw:  # a head without end
            await raw.send(b"GET /status HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 90000)
            assert (await receive_all(raw)).startswith(b"HTTP/1.1 431 ")


@pytest.mark.anyio
async def test_a_silent_client_is_dropped_and_does_not_block_others() -> None:
    async with (
        running(timeout=0.5) as svc,
        await anyio.connect_tcp("127.0.0.1", svc.port) as silent,
    ):
        with anyio.fail_after(2):
            assert (await svc.client.get("/healthz")).status_code == 200
        # and the silent one is closed after the timeout, not held forever
        with anyio.fail_after(3):
            assert await receive_all(silent) == b""


@pytest.mark.anyio
async def test_a_trickling_client_is_dropped_after_the_timeout() -> None:
    """A head sent a byte at a time (slowloris) does not restart the timeout with each byte."""
    head = b"GET /status HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 200 + b"\r\n\r\n"
    async with (
        running(timeout=0.5) as svc,
        await anyio.connect_tcp("127.0.0.1", svc.port) as slow,
    ):
        sent = 0
        with anyio.fail_after(3):
            while sent < len(head):
                try:
                    await slow.send(head[sent : sent + 1])
                except (anyio.BrokenResourceError, OSError):
                    break
                sent += 1
                with anyio.move_on_after(0.05):  # the pace of the trickle, not a wait
                    try:
                        await slow.receive()
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        break
    assert sent < len(head)


async def receive_all(stream: anyio.abc.ByteStream) -> bytes:
    data = b""
    while True:
        try:
            data += await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            return data


# -- the token ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_the_token_guards_status_snapshot_and_metrics_not_the_probes() -> None:
    async with running(snapshot=lambda: b"{}", token=TOKEN) as svc:
        for path in ("/status", "/snapshot", "/metrics"):
            missing = await svc.client.get(path)
            assert missing.status_code == 401, path
            assert missing.headers["www-authenticate"].startswith("Bearer ")
            assert "zpack" not in missing.text
            for wrong in (f"Bearer {TOKEN[:-1]}", f"Bearer {TOKEN}x", f"Basic {TOKEN}", TOKEN):
                denied = await svc.client.get(path, headers={"Authorization": wrong})
                assert denied.status_code == 401, (path, wrong)
            allowed = await svc.client.get(path, headers={"Authorization": f"Bearer {TOKEN}"})
            assert allowed.status_code == 200, path
            assert (await svc.client.head(path)).status_code == 401
        assert (await svc.client.get("/healthz")).text == "ok\n"
        ready = await svc.client.get("/readyz")
        assert ready.status_code == 503
        assert ready.text.startswith("not ready: ")


@pytest.mark.anyio
async def test_beyond_loopback_without_a_token_warns_at_start(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="reconciler.controller.http")

    def warned() -> bool:
        return any(
            r.levelno == logging.WARNING and "has no token" in r.getMessage()
            for r in caplog.records
        )

    async with running(host="0.0.0.0") as svc:
        assert (await svc.client.get("/status")).status_code == 200
    assert warned()
    caplog.clear()
    async with running(host="0.0.0.0", token=TOKEN):
        pass
    async with running(host="127.0.0.1"):
        pass
    assert not warned()


def test_the_token_from_a_variable_or_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert read_token() is None
    monkeypatch.setenv("STATUS_TOKEN", TOKEN)
    assert read_token(env="STATUS_TOKEN") == TOKEN
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    assert read_token(file=str(path)) == TOKEN
    with pytest.raises(ConfigurationError, match="one of"):
        read_token(env="STATUS_TOKEN", file=str(path))
    with pytest.raises(ConfigurationError, match="NOT_SET"):
        read_token(env="NOT_SET")
    monkeypatch.setenv("STATUS_TOKEN", "short")
    with pytest.raises(ConfigurationError, match="at least 16"):
        read_token(env="STATUS_TOKEN")


def test_run_takes_the_token_flags_and_their_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    from reconciler.cli.main import parser

    args = parser().parse_args(["run", "--status-token-env", "STATUS_TOKEN"])
    assert (args.status_token_env, args.status_token_file) == ("STATUS_TOKEN", None)
    monkeypatch.setenv("RECONCILER_STATUS_TOKEN_FILE", "/run/credentials/x/status-token")
    args = parser().parse_args(["run"])
    assert args.status_token_file == "/run/credentials/x/status-token"


# -- a flood under a descriptor limit, and a crash of the server -----------------------------

LIMIT = 256
FLOOD = 400
EMFILE = "Too many open files"

# The listener in a process of its own, with a descriptor limit, beside a loop that beats.
LISTENER = textwrap.dedent(
    """
    import resource, sys
    import anyio

    limit, size = int(sys.argv[1]), int(sys.argv[2])
    if limit:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    data = b"[" + b"0," * size + b"0]"

    from reconciler.controller.http import serve_status
    from reconciler.controller.metrics import Metrics
    from reconciler.controller.status import StatusBoard

    async def main():
        board = StatusBoard("zpack", "dir specs")
        async with anyio.create_task_group() as tg:
            port = await tg.start(
                lambda task_status: serve_status(
                    board,
                    Metrics(),
                    port=0,
                    snapshot=lambda: data,
                    timeout=1.0,
                    heartbeat_max_age=5.0,
                    task_status=task_status,
                )
            )
            print(port, flush=True)
            while True:  # the controller's loop: /healthz is 200 only while it beats
                board.beat()
                await anyio.sleep(0.2)

    anyio.run(main)
    """
)


@dataclass
class Process:
    proc: subprocess.Popen[str]
    port: int
    stderr: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def died(self) -> str:
        tail = self.stderr.read_text()[-3000:]
        return f"the listener's process exited ({self.proc.returncode}):\n{tail}"

    def descriptors(self) -> int:
        try:
            return len(os.listdir(f"/proc/{self.proc.pid}/fd"))
        except OSError:  # the process is gone
            return 0

    def answers(self) -> bool:
        """/healthz is 200 (or the process died: nothing more to wait for)."""
        return not self.alive() or healthz(self.port) == 200


@contextmanager
def listener_process(tmp_path: Path, *, limit: int = 0, snapshot: int = 0) -> Iterator[Process]:
    """The listener in a process of its own (with a descriptor limit), beside a loop that beats;
    its /snapshot is `snapshot` * 2 bytes."""
    script = tmp_path / "listener.py"
    script.write_text(LISTENER)
    stderr = tmp_path / "stderr"
    path = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    with (
        stderr.open("w") as err,
        subprocess.Popen(
            [sys.executable, str(script), str(limit), str(snapshot)],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=env,
        ) as proc,
    ):
        try:
            assert proc.stdout is not None
            yield Process(proc, int(proc.stdout.readline()), stderr)
        finally:
            proc.kill()


def wait_until(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {seconds} s: {what}")
        time.sleep(0.05)  # polling interval


def healthz(port: int) -> int | None:
    try:
        response = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=0.5, trust_env=False)
        return response.status_code
    except httpx.TransportError:
        return None


@contextmanager
def connections(port: int, n: int) -> Iterator[list[socket.socket]]:
    """n connections that never send a byte (their connects complete in the background)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            socks.append(s)
        yield socks
    finally:
        for s in socks:
            s.close()


def test_a_connection_flood_under_a_descriptor_limit(tmp_path: Path) -> None:
    """400 silent connections against a listener limited to 256 descriptors: accept() fails
    with EMFILE while they hold every descriptor, and the listener lives through it, drops them
    after its timeout and answers /healthz again, with the loop beside it still beating."""
    with listener_process(tmp_path, limit=LIMIT) as listener:
        with connections(listener.port, FLOOD):
            wait_until(
                lambda: not listener.alive() or EMFILE in listener.stderr.read_text(),
                10,
                "the flood takes every descriptor: accept() fails with EMFILE",
            )
            # still holding them: the listener drops them itself, after its timeout
            wait_until(listener.answers, 20, "/healthz answers during the flood")
            assert listener.alive(), listener.died()
        wait_until(listener.answers, 10, "/healthz answers once they closed")
        assert listener.alive(), listener.died()
        wait_until(lambda: listener.descriptors() < 32, 10, "the descriptors come back")


def tcp_connection(local_port: int, remote_port: int) -> bool:
    """Whether the kernel has this TCP connection over IPv4 loopback (seen from the side on
    `local_port`), in whatever state."""
    wanted = (f"0100007F:{local_port:04X}", f"0100007F:{remote_port:04X}")
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return any(tuple(line.split()[1:3]) == wanted for line in lines)


def test_a_client_that_stops_reading_is_dropped(tmp_path: Path) -> None:
    """A response the client never reads (more than the sockets buffer) does not hold the
    connection for good: the listening socket's TCP_USER_TIMEOUT gives up on it."""
    with listener_process(tmp_path, snapshot=10_000_000) as listener, socket.socket() as stalled:
        wait_until(listener.answers, 10, "/healthz answers")
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect(("127.0.0.1", listener.port))
        stalled.sendall(b"GET /snapshot HTTP/1.1\r\nHost: x\r\n\r\n")
        server_side = (listener.port, stalled.getsockname()[1])
        assert tcp_connection(*server_side)
        wait_until(lambda: not tcp_connection(*server_side), 10, "the listener gives up on it")
        assert listener.alive(), listener.died()
        assert healthz(listener.port) == 200


@pytest.mark.parametrize(
    ("previous", "ran", "delay"),
    [(None, 0.0, 1.0), (1.0, 0.5, 2.0), (32.0, 3.0, 60.0), (60.0, 0.0, 60.0), (16.0, 61.0, 1.0)],
)
def test_restart_delay(previous: float | None, ran: float, delay: float) -> None:
    assert restart_delay(previous, ran) == delay


@pytest.mark.anyio
async def test_a_crashed_server_restarts_on_its_port(caplog: pytest.LogCaptureFixture) -> None:
    """The server crashes while serving; the first restart finds its port taken by another
    socket and waits longer; then it serves on the same port again. Nothing escapes."""
    crash = anyio.Event()
    calls = 0

    async def crashing(app: StatusApp, sock: socket.socket, config: Config) -> None:
        nonlocal calls
        calls += 1
        if calls > 1:
            await serve_hypercorn(app, sock, config)
            return
        async with anyio.create_task_group() as tg:
            tg.start_soon(serve_hypercorn, app, sock, config)
            await crash.wait()
            raise RuntimeError("boom")

    sock = bind("127.0.0.1", 0)
    port = int(sock.getsockname()[1])
    squatter: list[socket.socket] = []
    delays: list[float] = []

    async def sleep(seconds: float) -> None:  # no time passes; the port is taken, then freed
        delays.append(seconds)
        if len(delays) == 1:
            squatter.append(bind("127.0.0.1", port))
        else:
            squatter.pop().close()
        await anyio.lowlevel.checkpoint()

    board = StatusBoard("zpack", clock=FakeClock())
    app = StatusApp(board, Metrics(), heartbeat_max_age=30.0)
    listener = Listener(app, "127.0.0.1", port, hypercorn_config(5.0, 8192), crashing, sleep)
    async with (
        anyio.create_task_group() as tg,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False) as client,
    ):
        tg.start_soon(listener.run, sock)
        assert (await client.get("/healthz")).status_code == 200
        crash.set()
        with anyio.fail_after(10):
            while listener.restarts == 0:
                await anyio.sleep(0.01)  # polling interval
        assert (await client.get("/healthz")).status_code == 200
        tg.cancel_scope.cancel()
    assert (calls, delays, listener.restarts) == (2, [1.0, 2.0], 1)
    crashed = [r for r in caplog.records if r.getMessage() == "status listener crashed"]
    assert len(crashed) == 1 and crashed[0].exc_info is not None
    assert any("cannot bind" in r.getMessage() for r in caplog.records)


# -- the board and routing, without sockets -------------------------------------------------


def test_backoff_then_success_clears_the_error() -> None:
    clock = FakeClock()
    board = StatusBoard("zpack", clock=clock)
    board.record_result("guest/api", False, "locked (backup)", next_retry_at=T0 + 60)
    board.record_result("guest/api", False, "locked (backup)", next_retry_at=T0 + 120)
    status = board.resources["guest/api"]
    assert (status.state, status.attempts) == (ResourceState.BACKOFF, 2)
    assert status.to_json()["next_retry_at"] == "2024-05-01T12:02:00.000Z"
    clock.now += 200
    board.record_result("guest/api", True)
    assert status.to_json() == {
        "state": "converged",
        "last_error": "",
        "attempts": 0,
        "next_retry_at": None,
        "last_change_at": "2024-05-01T12:03:20.000Z",
    }


def test_report_results_become_resource_states() -> None:
    board = StatusBoard("zpack", clock=FakeClock())
    report = ApplyReport(
        [
            Result(change("guest/db", Kind.GUEST), Outcome.FAILED, "no space"),
            Result(
                change("firewall/guest/db", Kind.FIREWALL_GUEST),
                Outcome.SKIPPED,
                "not applied: guest/db failed",
            ),
            Result(change("route/core/web", Kind.ROUTE), Outcome.DONE),
        ]
    )
    board.record_report(report, next_retry_at={"guest/db": T0 + 30})
    states = {a: s.state for a, s in board.resources.items()}
    assert states == {
        "guest/db": ResourceState.BACKOFF,
        "firewall/guest/db": ResourceState.WITHHELD,
        "route/core/web": ResourceState.CONVERGED,
    }
    board.record_plan(["route/core/web"])
    assert board.resources["route/core/web"].state is ResourceState.PENDING
    board.retain(["route/core/web"])
    assert list(board.resources) == ["route/core/web"]


def test_bad_revision_is_reported_while_the_good_one_stays() -> None:
    board = StatusBoard("zpack", clock=FakeClock())
    board.set_revision_error("rev-0", "specs/x.yaml:3: unknown field")
    assert "rev-0 is invalid" in board.readiness().reason
    board.set_revision("rev-1")
    board.set_revision_error("rev-2", "specs/x.yaml:4: duplicate name")
    doc = board.to_json()
    assert doc["revision"]["id"] == "rev-1"
    assert doc["revision_error"]["id"] == "rev-2"
    assert doc["revision_error"]["diagnostics"] == "specs/x.yaml:4: duplicate name"
    json.dumps(doc)  # serializable as is


def test_route_without_sockets() -> None:
    board = StatusBoard("zpack", clock=FakeClock())
    response = route(board, Metrics(), Request("DELETE", "/status", {}))
    assert response.status == 405


@pytest.mark.parametrize(
    ("path", "authorization", "status"),
    [
        ("/status", None, 401),
        ("/status", f"Bearer {TOKEN}", 200),
        ("/status", f"bearer  {TOKEN} ", 200),
        ("/snapshot", "Bearer nope", 401),
        ("/metrics", f"Basic {TOKEN}", 401),
        ("/healthz", None, 200),
        ("/readyz", None, 503),
        ("/nope", None, 404),
    ],
)
def test_route_checks_the_token(path: str, authorization: str | None, status: int) -> None:
    board = StatusBoard("zpack", clock=FakeClock())
    headers = {"authorization": authorization} if authorization else {}
    response = route(
        board, Metrics(), Request("GET", path, headers), snapshot=lambda: b"{}", token=TOKEN
    )
    assert response.status == status
