"""The status board and the status listener, over real HTTP: health, readiness, /status after a
forced failure, /metrics as Prometheus text, errors, and a slow client that must not block."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from reconciler.applying.executor import ApplyReport, Outcome, Result
from reconciler.controller.http import Request, parse_head, route, serve_status
from reconciler.controller.metrics import Metrics
from reconciler.controller.status import ResourceState, StatusBoard
from reconciler.model.plans import Action, Change
from reconciler.model.resources import Kind

T0 = 1_714_564_800.0  # 2024-05-01T12:00:00Z


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
    snapshot: Callable[[], bytes | None] | None = None, timeout: float = 5.0
) -> AsyncIterator[Service]:
    clock = FakeClock()
    board = StatusBoard("zpack", "dir specs", clock=clock)
    metrics = Metrics(clock=clock)
    async with anyio.create_task_group() as tg:
        port = await tg.start(
            lambda task_status: serve_status(
                board,
                metrics,
                port=0,
                snapshot=snapshot,
                heartbeat_max_age=30.0,
                timeout=timeout,
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
            await raw.send(b"GET /status HTTP/1.1\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n")
            assert (await receive_all(raw)).startswith(b"HTTP/1.1 431 ")


@pytest.mark.anyio
async def test_a_silent_client_does_not_block_others() -> None:
    async with (
        running(timeout=0.5) as svc,
        await anyio.connect_tcp("127.0.0.1", svc.port) as silent,
    ):
        with anyio.fail_after(2):
            assert (await svc.client.get("/healthz")).status_code == 200
        # and the silent one is dropped after the timeout, not held forever
        with anyio.fail_after(3):
            assert (await receive_all(silent)).startswith(b"HTTP/1.1 408 ")


async def receive_all(stream: anyio.abc.ByteStream) -> bytes:
    data = b""
    while True:
        try:
            data += await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            return data


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


@pytest.mark.parametrize(
    ("head", "method", "path"),
    [
        (b"GET /status HTTP/1.1\r\nHost: x", "GET", "/status"),
        (b"HEAD /metrics?x=1 HTTP/1.0", "HEAD", "/metrics"),
    ],
)
def test_parse_head(head: bytes, method: str, path: str) -> None:
    request = parse_head(head)
    assert (request.method, request.path) == (method, path)


def test_route_without_sockets() -> None:
    board = StatusBoard("zpack", clock=FakeClock())
    response = route(board, Metrics(), Request("DELETE", "/status", {}))
    assert response.status == 405
