"""The status listener: health, readiness, status, metrics and the observed snapshot over HTTP,
served by hypercorn on the service's own event loop.

Started by the controller service (`reconciler.controller.service`) in its task group with
`await tg.start(serve_status, board, metrics, ...)`, which returns the bound port (useful with
`port=0`). Bind it to loopback (the default) unless something outside the host must scrape it:
`/status` names resources and their errors, `/snapshot` is a map of the platform. Beyond
loopback give it a token (`--status-token-env`, `--status-token-file`); without one it warns at
start.

    GET /healthz    200 "ok" while the loop's heartbeat is younger than `heartbeat_max_age`,
                    else 503: the loop is stuck (for a liveness probe or systemd watchdog)
    GET /readyz     200 when a good revision is loaded and the last observe succeeded,
                    else 503 with the reason
    GET /status     StatusBoard.to_json(), application/json                      [token]
    GET /metrics    Prometheus text format                                        [token]
    GET /snapshot   the last published observed-state JSON, 404 until there is one [token]
    anything else   404; a method other than GET or HEAD: 405

[token]: with a token, the request must carry `Authorization: Bearer <token>` (compared in
constant time), else 401. The probes stay open: they say nothing but "alive" and "ready".
Every response says `Connection: close`: one request per connection, so a scraper's idle
connection never holds a descriptor between scrapes.

Why hypercorn rather than a server of our own (the one before was 240 lines on raw anyio
sockets). Measured with RLIMIT_NOFILE=256 and 400 connections that send nothing (the test
`test_a_connection_flood_under_a_descriptor_limit` is this experiment):

    accept() failing with EMFILE   the hand-made anyio listener raised it out of its task group
                                   and the service exited; asyncio's accept loop, which
                                   hypercorn serves from, logs it and tries again a second later
    a client that sends nothing,   dropped after `timeout` (hypercorn's keep-alive timeout runs
    or trickles its request head   from the connection's start until a whole head is in): the
                                   descriptors came back after 5 s, /healthz answered again
    a client that stops reading    hypercorn has no write timeout: TCP_USER_TIMEOUT on the
    a response                     listening socket gives up on it after `timeout` (asyncio
                                   then logs hypercorn's unhandled ETIMEDOUT, once)
    a head over max_header_bytes   431

On shutdown the responses in flight get `GRACE`, then the server is cut off: a client that
stopped reading would otherwise hold hypercorn's shutdown, and the service's, for good.

uvicorn was measured too and not taken: it sets no timeout before a connection's first
request, so a client that connects and sends nothing is held for good (still open after 30 s
with a 5 s keep-alive timeout), and its `limit_concurrency` answers 503 to requests beyond the
limit but still accepts, and holds, the connections. Neither caps the number of connections:
during a flood the listener can take every descriptor the process has for up to `timeout`
seconds, which fails the controller's own calls for that long (a failed cycle, retried), not
the controller. Give the service a descriptor limit well above what a flood can reach in
`timeout` seconds, and keep the listener on loopback or behind the firewall.

The listener never takes the controller down: `serve_status` binds once (a port that cannot be
bound at start is the caller's error to report, as before), then runs the server under a
supervisor that logs a crash and starts it again on the same port after a backoff (1 s,
doubling to 60 s; back to 1 s after a minute of good service). A restart from /healthz was the
other choice and is not one: a probe cannot reach a dead listener to ask, and a failing
liveness probe restarts the whole controller, which is what this avoids.

Routing (`route`) is a pure function of the board and the request, tested without sockets.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import NoReturn

import anyio
import anyio.abc
from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope

from reconciler.controller.metrics import Metrics
from reconciler.controller.status import StatusBoard
from reconciler.model.errors import ConfigurationError
from reconciler.model.spec import SecretRef
from reconciler.providers.secrets import read_secret

log = logging.getLogger(__name__)
# hypercorn's own messages: its errors, not its "Running on ... (CTRL + C to quit)".
server_log = logging.getLogger(f"{__name__}.hypercorn")
server_log.setLevel(logging.WARNING)

DEFAULT_PORT = 9180
MAX_HEADER_BYTES = 8 * 1024
TIMEOUT = 5.0
HEARTBEAT_MAX_AGE = 60.0
BACKLOG = 128
GRACE = 1.0
FIRST_RESTART = 1.0
MOST_RESTART = 60.0
MIN_TOKEN_LENGTH = 16

TEXT = "text/plain; charset=utf-8"
JSON = "application/json"

# With a token, these need it; /healthz and /readyz stay open for probes.
PROTECTED = frozenset({"/status", "/metrics", "/snapshot"})

Snapshot = Callable[[], bytes | None]
Sleep = Callable[[float], Awaitable[None]]


# --- requests, responses and routing ----------------------------------------------------------


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = TEXT
    headers: tuple[tuple[str, str], ...] = ()

    def head(self) -> list[tuple[bytes, bytes]]:
        """The header fields; Content-Length is the body's also for HEAD, which sends none."""
        fields = [
            ("Content-Type", self.content_type),
            ("Content-Length", str(len(self.body))),
            ("Cache-Control", "no-store"),
            ("Connection", "close"),
            *self.headers,
        ]
        return [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in fields]


def text(status: int, message: str) -> Response:
    return Response(status, (message + "\n").encode())


@dataclass(frozen=True)
class Request:
    method: str
    target: str
    headers: dict[str, str]  # names in lower case

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


def authorized(request: Request, token: str) -> bool:
    """Whether the request carries `Authorization: Bearer <token>`. Both sides are hashed
    first, so the comparison takes the same time whatever the length of what was sent."""
    scheme, _, presented = request.headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(
        hashlib.sha256(presented.strip().encode()).digest(),
        hashlib.sha256(token.encode()).digest(),
    )


def route(
    board: StatusBoard,
    metrics: Metrics,
    request: Request,
    *,
    snapshot: Snapshot | None = None,
    heartbeat_max_age: float = HEARTBEAT_MAX_AGE,
    token: str | None = None,
) -> Response:
    """The response to one request."""
    if request.method not in ("GET", "HEAD"):
        return Response(405, b"method not allowed\n", headers=(("Allow", "GET, HEAD"),))
    path = request.path
    if path in PROTECTED and token is not None and not authorized(request, token):
        return Response(
            401,
            b"unauthorized: send Authorization: Bearer <the status token>\n",
            headers=(("WWW-Authenticate", 'Bearer realm="reconciler"'),),
        )
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


class StatusApp:
    """The ASGI application: each request answered by `route`, no request body read."""

    def __init__(
        self,
        board: StatusBoard,
        metrics: Metrics,
        *,
        snapshot: Snapshot | None = None,
        heartbeat_max_age: float = HEARTBEAT_MAX_AGE,
        token: str | None = None,
        max_header_bytes: int = MAX_HEADER_BYTES,
    ) -> None:
        self.board = board
        self.metrics = metrics
        self.snapshot = snapshot
        self.heartbeat_max_age = heartbeat_max_age
        self.token = token
        self.max_header_bytes = max_header_bytes

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return  # a websocket: refused (hypercorn closes it)
        headers = {
            name.decode("latin-1").lower(): value.decode("latin-1")
            for name, value in scope["headers"]
        }
        request = Request(scope["method"], scope["path"], headers)
        # h11 refuses a head that is still incomplete beyond the limit; one that arrived whole
        # in a single read is measured here.
        size = sum(len(name) + len(value) + 4 for name, value in scope["headers"])
        try:
            if size > self.max_header_bytes:
                response = text(431, "request header too large")
            else:
                response = route(
                    self.board,
                    self.metrics,
                    request,
                    snapshot=self.snapshot,
                    heartbeat_max_age=self.heartbeat_max_age,
                    token=self.token,
                )
        except Exception:  # a bug in a route: answer 500, keep serving the others
            log.exception("status listener: request failed")
            response = text(500, "internal error")
        body = b"" if request.method == "HEAD" else response.body
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status,
                    "headers": response.head(),
                }
            )
            await send({"type": "http.response.body", "body": body, "more_body": False})
        except OSError as exc:  # the client went away, or stopped reading (TCP_USER_TIMEOUT)
            log.debug("status connection dropped: %s", exc)


# --- the server and its supervisor -------------------------------------------------------------


def bind(host: str, port: int, timeout: float = TIMEOUT) -> socket.socket:
    """A listening socket on the first address `host` resolves to. Its connections give up on
    a client that leaves a response unacknowledged for `timeout` seconds (TCP_USER_TIMEOUT,
    inherited from this socket, counts a client that stopped reading too): hypercorn has no
    write timeout of its own."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "TCP_USER_TIMEOUT"):  # Linux
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(timeout * 1000))
        sock.bind(address)
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


def hypercorn_config(timeout: float, max_header_bytes: int) -> Config:
    config = Config()
    # From a connection's start until its request head is whole, and between requests.
    config.keep_alive_timeout = timeout
    config.graceful_timeout = GRACE  # on shutdown, for the responses in flight
    config.h11_max_incomplete_size = max_header_bytes  # beyond: 431
    config.backlog = BACKLOG
    config.include_server_header = False
    config.accesslog = None
    config.errorlog = server_log  # through the service's logging (JSON lines)
    return config


async def serve_hypercorn(app: StatusApp, sock: socket.socket, config: Config) -> None:
    """Serve on `sock`, which hypercorn takes over and closes. Returns only if hypercorn stops
    on its own; a cancel shuts it down gracefully (open connections get `graceful_timeout`)."""
    config.bind = [f"fd://{sock.detach()}"]
    stop = anyio.Event()
    done = anyio.Event()
    serving = anyio.CancelScope(shield=True)  # stopped by `stop`: a graceful shutdown

    async def run() -> None:
        try:
            with serving:
                await hypercorn_serve(app, config, shutdown_trigger=stop.wait, mode="asgi")
        finally:
            done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        try:
            await done.wait()
        finally:
            stop.set()
            with anyio.CancelScope(shield=True), anyio.move_on_after(config.graceful_timeout + 1):
                await done.wait()
            # A connection that never closes (a client that stopped reading a response) would
            # hold the shutdown, and so the service's, for good: cut it off.
            serving.cancel()


Server = Callable[[StatusApp, socket.socket, Config], Awaitable[None]]


def restart_delay(previous: float | None, ran: float) -> float:
    """How long to wait before starting a server that stopped after running `ran` seconds."""
    if previous is None or ran >= MOST_RESTART:
        return FIRST_RESTART
    return min(previous * 2, MOST_RESTART)


@dataclass
class Listener:
    """Runs the server on a bound socket and keeps it running: every way it can stop (a crash,
    or hypercorn returning) is logged and followed by a restart on the same port. Time is
    injectable for the tests."""

    app: StatusApp
    host: str
    port: int
    config: Config
    server: Server = serve_hypercorn
    sleep: Sleep = anyio.sleep
    clock: Callable[[], float] = time.monotonic
    restarts: int = 0

    async def run(self, sock: socket.socket) -> NoReturn:
        delay: float | None = None
        while True:
            started = self.clock()
            try:
                await self.server(self.app, sock, self.config)
                problem = "stopped"
            except Exception as exc:  # a crash of the listener, never of the controller
                log.error(
                    "status listener crashed", exc_info=exc, extra={"fields": {"port": self.port}}
                )
                problem = "crashed"
            finally:
                sock.close()  # hypercorn's own once it took it over; else ours
            delay = restart_delay(delay, self.clock() - started)
            while True:
                log.warning(
                    "status listener %s, restarting in %g s",
                    problem,
                    delay,
                    extra={"fields": {"port": self.port}},
                )
                await self.sleep(delay)
                try:
                    sock = bind(self.host, self.port, self.config.keep_alive_timeout)
                    break
                except OSError as exc:
                    problem = f"cannot bind ({exc.strerror})"
                    delay = restart_delay(delay, 0.0)
            self.restarts += 1
            log.info("status listener restarted", extra={"fields": {"port": self.port}})


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_token(env: str | None = None, file: str | None = None) -> str | None:
    """The status token named by `--status-token-env` or `--status-token-file`, if either."""
    if env is None and file is None:
        return None
    if env is not None and file is not None:
        raise ConfigurationError("give one of --status-token-env and --status-token-file")
    token = read_secret(SecretRef(env=env, file=file))
    if len(token) < MIN_TOKEN_LENGTH or any(c.isspace() for c in token):
        raise ConfigurationError(
            f"the status token must be at least {MIN_TOKEN_LENGTH} characters without spaces "
            "(openssl rand -hex 32 makes one)"
        )
    return token


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
    token: str | None = None,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled. Reports the bound port to `tg.start` once listening; a port that
    cannot be bound raises from `tg.start`, a later failure only restarts the listener."""
    sock = bind(host, port, timeout)
    bound = int(sock.getsockname()[1])
    log.info("status listener on %s:%d", host, bound)
    if token is None and not is_loopback(host):
        log.warning(
            # (no "token:" in the text: the log redactor would mask what follows it)
            "status listener on %s has no token, so /status, /snapshot and /metrics are open to "
            "anyone who reaches it (give --status-token-env or --status-token-file)",
            host,
            extra={"fields": {"address": f"{host}:{bound}"}},
        )
    app = StatusApp(
        board,
        metrics,
        snapshot=snapshot,
        heartbeat_max_age=heartbeat_max_age,
        token=token,
        max_header_bytes=max_header_bytes,
    )
    listener = Listener(app, host, bound, hypercorn_config(timeout, max_header_bytes))
    task_status.started(bound)
    await listener.run(sock)
