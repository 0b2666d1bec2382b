"""The status listener: a tiny HTTP/1.1 server on anyio for health checks, status and metrics.

Started by the controller service (`reconciler.controller.service`) in its task group with
`await tg.start(serve_status, board, metrics, ...)`, which returns the bound port (useful with
`port=0`). Bind it to loopback (the default) unless something outside the host must scrape it:
`/status` names resources and their errors.

    GET /healthz    200 "ok" while the loop's heartbeat is younger than `heartbeat_max_age`,
                    else 503: the loop is stuck (for a liveness probe or systemd watchdog)
    GET /readyz     200 when a good revision is loaded and the last observe succeeded,
                    else 503 with the reason
    GET /status     StatusBoard.to_json(), application/json
    GET /metrics    Prometheus text format
    GET /snapshot   the last published observed-state JSON, 404 until there is one
    anything else   404; a method other than GET or HEAD: 405

One request per connection (`Connection: close`): no keep-alive, no pipelining, no request
body. The request head is limited to `max_header_bytes` (431 beyond) and the whole exchange to
`timeout` seconds, so a client that connects and sends nothing (or trickles) is dropped instead
of holding a slot. Each connection is its own task; a broken one never stops the listener.

No web framework: four read-only routes do not justify one, and this one is small enough to
read in full. Routing (`route`) is a pure function of the board, so it is tested without
sockets as well as over them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus

import anyio
import anyio.abc
from anyio.abc import SocketAttribute

from reconciler.controller.metrics import Metrics
from reconciler.controller.status import StatusBoard

log = logging.getLogger(__name__)

DEFAULT_PORT = 9180
MAX_HEADER_BYTES = 8 * 1024
TIMEOUT = 5.0
HEARTBEAT_MAX_AGE = 60.0

TEXT = "text/plain; charset=utf-8"
JSON = "application/json"

Snapshot = Callable[[], bytes | None]


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = TEXT
    headers: tuple[tuple[str, str], ...] = ()

    def encode(self, *, head_only: bool = False) -> bytes:
        reason = HTTPStatus(self.status).phrase
        lines = [
            f"HTTP/1.1 {self.status} {reason}",
            f"Content-Type: {self.content_type}",
            f"Content-Length: {len(self.body)}",
            "Cache-Control: no-store",
            "Connection: close",
            *(f"{name}: {value}" for name, value in self.headers),
        ]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return head if head_only else head + self.body


def text(status: int, message: str) -> Response:
    return Response(status, (message + "\n").encode())


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Request:
    method: str
    target: str
    headers: dict[str, str]

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


def parse_head(head: bytes) -> Request:
    """The request line and headers of one request (the bytes before the blank line)."""
    lines = head.decode("latin-1").split("\r\n")  # latin-1 decodes any byte
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[1].startswith("/"):
        raise BadRequest(400, "malformed request line")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise BadRequest(400, "malformed header line")
        headers[name.lower()] = value.strip()
    return Request(parts[0], parts[1], headers)


def route(
    board: StatusBoard,
    metrics: Metrics,
    request: Request,
    *,
    snapshot: Snapshot | None = None,
    heartbeat_max_age: float = HEARTBEAT_MAX_AGE,
) -> Response:
    """The response to one parsed request."""
    if request.method not in ("GET", "HEAD"):
        return Response(405, b"method not allowed\n", headers=(("Allow", "GET, HEAD"),))
    path = request.path
    if path == "/healthz":
        age = board.heartbeat_age()
        if age < heartbeat_max_age:
            return text(200, "ok")
        return text(503, f"stale: no loop tick for {age:.1f} s (max {heartbeat_max_age:g} s)")
    if path == "/readyz":
        readiness = board.readiness()
        if readiness.ready:
            return text(200, "ready")
        return text(503, f"not ready: {readiness.reason}")
    if path == "/status":
        body = json.dumps(board.to_json(), indent=2, sort_keys=False).encode() + b"\n"
        return Response(200, body, JSON)
    if path == "/metrics":
        return Response(200, metrics.render(), metrics.content_type)
    if path == "/snapshot":
        data = snapshot() if snapshot is not None else None
        if data is None:
            return text(404, "no snapshot published yet")
        return Response(200, data, JSON)
    return text(404, "not found")


async def read_head(stream: anyio.abc.ByteStream, limit: int) -> bytes | None:
    """Bytes up to the blank line ending the head; None if the client closed first."""
    buffer = b""
    while True:
        end = buffer.find(b"\r\n\r\n")
        if end >= 0:
            if end > limit:
                raise BadRequest(431, "request header too large")
            return buffer[:end]
        if len(buffer) > limit:
            raise BadRequest(431, "request header too large")
        try:
            chunk = await stream.receive(4096)
        except anyio.EndOfStream:
            return None
        buffer += chunk


async def handle(
    stream: anyio.abc.ByteStream,
    board: StatusBoard,
    metrics: Metrics,
    *,
    snapshot: Snapshot | None,
    heartbeat_max_age: float,
    timeout: float,
    max_header_bytes: int,
) -> None:
    """One connection: read one request, answer, close. Never raises."""
    try:
        async with stream:
            response: Response | None = None
            head_only = False
            with anyio.move_on_after(timeout) as reading:
                try:
                    head = await read_head(stream, max_header_bytes)
                    if head is None:
                        return
                    request = parse_head(head)
                    head_only = request.method == "HEAD"
                    response = route(
                        board,
                        metrics,
                        request,
                        snapshot=snapshot,
                        heartbeat_max_age=heartbeat_max_age,
                    )
                except BadRequest as exc:
                    response = text(exc.status, str(exc))
            if reading.cancelled_caught:
                response = text(408, "request timeout")
            assert response is not None
            # Sending gets its own deadline: a client that never reads must not hold us either.
            with anyio.move_on_after(timeout):
                await stream.send(response.encode(head_only=head_only))
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
        log.debug("status connection dropped: %s", exc)
    except Exception:  # a bug in a route: drop this connection, keep serving the others
        log.exception("status listener: request failed")


async def serve_status(
    board: StatusBoard,
    metrics: Metrics,
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    snapshot: Snapshot | None = None,
    heartbeat_max_age: float = HEARTBEAT_MAX_AGE,
    timeout: float = TIMEOUT,
    max_header_bytes: int = MAX_HEADER_BYTES,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled. Reports the bound port to `tg.start` once listening."""
    listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    async with listener:
        bound = listener.extra(SocketAttribute.local_port)
        log.info("status listener on %s:%d", host, bound)

        async def on_connect(stream: anyio.abc.SocketStream) -> None:
            await handle(
                stream,
                board,
                metrics,
                snapshot=snapshot,
                heartbeat_max_age=heartbeat_max_age,
                timeout=timeout,
                max_header_bytes=max_header_bytes,
            )

        task_status.started(bound)
        await listener.serve(on_connect)
