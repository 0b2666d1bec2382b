"""Many simulated in-container agents (zlh-agent) in one process: tests, benchmarks, the demo.

The agent observer (`reconciler.providers.agent`) polls each game server's agent at
`http://<ip>:18888/status`. An `AgentFleet` stands in for a whole platform's worth of agents:
each simulated agent listens on its own loopback port (`fleet.endpoint(vmid)` gives the
`(ip, port)` to hand the observer in place of the guest's `(ip, 18888)`), and one dispatcher
thread serves every listening socket, so a thousand agents cost one thread plus one short-lived
thread per request in flight.

Wire contract (the platform's zlh-agent, as the platform API polls it):

    GET /health   always 200 {"ok": true}, token or not
    GET /status   200 {"state": "running", "processRunning": true, "ready": true,
                       "readySource": "query", "readyError": null,
                       "lastReadyAt": "2026-11-23T09:00:00Z", "installStep": null,
                       "crashCount": 0, "lastCrashAt": null, "lastCrashExitCode": null,
                       "lastCrashReason": null, "error": null,
                       "timestamp": "2026-11-23T09:00:05Z"}
                  401 {"error": "unauthorized"} when the fleet has a token and the request
                  lacks `Authorization: Bearer <token>`

Times are RFC 3339 UTC strings. The notes name the crash fields only as `lastCrash*`; the three
here (`lastCrashAt`, `lastCrashExitCode`, `lastCrashReason`) are our choice, and the observer
reads none of them, so a different spelling in the real agent changes nothing.

Driving an agent (from Python, or over the control endpoint below):

    installing(step)  state installing, no process, not ready, installStep set
    starting()        process up, not ready yet
    ready(source)     state running, ready, lastReadyAt now
    unready(error)    state running, process up, not ready, readyError set
    crash(...)        crashCount + 1, lastCrash* set, state error, not ready
    stop()            state stopped
    unreachable()     nothing listens on its port: connection refused
    hang()            accepts connections and never answers (until reachable() or stop)
    garbage()         answers 200 with a body that is not the agent's JSON
    overloaded()      answers 503 {"error": "overloaded"} (a proxy in front, or an agent
                      past its capacity)
    slow(seconds)     answers after a delay; slow(0) answers at once again
    trickle(interval) answers at once, then sends its body one byte per `interval` seconds
    reachable()       listens and answers normally again (same port)

Control endpoint (`fleet.control_url`, plain JSON, no token):

    GET    /agents                     every agent: vmid, name, url, mode, delay, status
    POST   /agents                     {"vmid": 1001, "name": "mc-lobby", "state": "ready"}
    POST   /agents/<vmid>/<action>     an action above; its arguments as a JSON object body
    DELETE /agents/<vmid>

Run standalone: `python -m reconciler.simulators.agent --vmid 1001 --vmid 1002` prints one JSON
line with the control URL and each agent's URL, then serves until interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import json
import os
import queue
import re
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

AGENT_PORT = 18888

T = TypeVar("T")


def rfc3339(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class AgentMode(enum.StrEnum):
    """How an agent's port behaves, apart from what its status says."""

    UP = "up"
    REFUSED = "refused"
    HANG = "hang"
    GARBAGE = "garbage"
    TRICKLE = "trickle"
    OVERLOADED = "overloaded"


@dataclass
class AgentStatus:
    """What `GET /status` reports, in our spelling; `to_wire` gives the agent's."""

    state: str = "running"
    process_running: bool = True
    ready: bool = True
    ready_source: str | None = "query"
    ready_error: str | None = None
    last_ready_at: str | None = None
    install_step: str | None = None
    crash_count: int = 0
    last_crash_at: str | None = None
    last_crash_exit_code: int | None = None
    last_crash_reason: str | None = None
    error: str | None = None

    def to_wire(self, now: float) -> dict[str, Any]:
        return {
            "state": self.state,
            "processRunning": self.process_running,
            "ready": self.ready,
            "readySource": self.ready_source,
            "readyError": self.ready_error,
            "lastReadyAt": self.last_ready_at,
            "installStep": self.install_step,
            "crashCount": self.crash_count,
            "lastCrashAt": self.last_crash_at,
            "lastCrashExitCode": self.last_crash_exit_code,
            "lastCrashReason": self.last_crash_reason,
            "error": self.error,
            "timestamp": rfc3339(now),
        }


@dataclass(eq=False)
class SimulatedAgent:
    """One guest's agent. Its methods change what the next request sees, at once."""

    fleet: AgentFleet = field(repr=False)
    vmid: int
    name: str
    port: int = 0
    status: AgentStatus = field(default_factory=AgentStatus)
    mode: AgentMode = AgentMode.UP
    delay: float = 0.0
    requests: int = 0  # requests received on its port (any path)
    _server: _AgentServer | None = field(default=None, repr=False)

    @property
    def host(self) -> str:
        return self.fleet.host

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # --- what the agent reports ----------------------------------------------------------

    def installing(self, step: str = "download") -> SimulatedAgent:
        with self.fleet.lock:
            s = self.status
            s.state, s.process_running, s.ready = "installing", False, False
            s.install_step, s.ready_source, s.ready_error, s.error = step, None, None, None
        return self

    def starting(self) -> SimulatedAgent:
        with self.fleet.lock:
            s = self.status
            s.state, s.process_running, s.ready = "starting", True, False
            s.install_step, s.ready_source, s.ready_error, s.error = None, None, None, None
        return self

    def ready(self, source: str = "query") -> SimulatedAgent:
        with self.fleet.lock:
            s = self.status
            s.state, s.process_running, s.ready = "running", True, True
            s.install_step, s.ready_source, s.ready_error, s.error = None, source, None, None
            s.last_ready_at = rfc3339(self.fleet.clock())
        return self

    def unready(self, error: str = "query timed out") -> SimulatedAgent:
        with self.fleet.lock:
            s = self.status
            s.state, s.process_running, s.ready = "running", True, False
            s.ready_source, s.ready_error = None, error
        return self

    def crash(
        self, exit_code: int = 1, reason: str = "process exited with status 1"
    ) -> SimulatedAgent:
        with self.fleet.lock:
            s = self.status
            s.crash_count += 1
            s.last_crash_at = rfc3339(self.fleet.clock())
            s.last_crash_exit_code, s.last_crash_reason = exit_code, reason
            s.state, s.process_running, s.ready = "error", False, False
            s.ready_source, s.error = None, reason
        return self

    def stop(self) -> SimulatedAgent:
        with self.fleet.lock:
            s = self.status
            s.state, s.process_running, s.ready = "stopped", False, False
            s.ready_source, s.ready_error, s.error = None, None, None
        return self

    # --- how its port behaves ------------------------------------------------------------

    def unreachable(self) -> SimulatedAgent:
        self.fleet.set_mode(self, AgentMode.REFUSED)
        return self

    def hang(self) -> SimulatedAgent:
        self.fleet.set_mode(self, AgentMode.HANG)
        return self

    def garbage(self) -> SimulatedAgent:
        self.fleet.set_mode(self, AgentMode.GARBAGE)
        return self

    def trickle(self, interval: float = 0.1) -> SimulatedAgent:
        with self.fleet.lock:
            self.delay = max(0.0, float(interval))
        self.fleet.set_mode(self, AgentMode.TRICKLE)
        return self

    def slow(self, seconds: float) -> SimulatedAgent:
        with self.fleet.lock:
            self.delay = max(0.0, float(seconds))
        return self

    def overloaded(self) -> SimulatedAgent:
        self.fleet.set_mode(self, AgentMode.OVERLOADED)
        return self

    def reachable(self) -> SimulatedAgent:
        self.fleet.set_mode(self, AgentMode.UP)
        return self

    def describe(self) -> dict[str, Any]:
        with self.fleet.lock:
            return {
                "vmid": self.vmid,
                "name": self.name,
                "url": self.url,
                "mode": self.mode.value,
                "delay": self.delay,
                "requests": self.requests,
                "status": self.status.to_wire(self.fleet.clock()),
            }


_ACTIONS: dict[str, Callable[..., SimulatedAgent]] = {
    "installing": SimulatedAgent.installing,
    "starting": SimulatedAgent.starting,
    "ready": SimulatedAgent.ready,
    "unready": SimulatedAgent.unready,
    "crash": SimulatedAgent.crash,
    "stop": SimulatedAgent.stop,
    "unreachable": SimulatedAgent.unreachable,
    "hang": SimulatedAgent.hang,
    "garbage": SimulatedAgent.garbage,
    "slow": SimulatedAgent.slow,
    "trickle": SimulatedAgent.trickle,
    "overloaded": SimulatedAgent.overloaded,
    "reachable": SimulatedAgent.reachable,
}
_INITIAL = {"installing", "starting", "ready", "unready", "crash", "stop"}


class _AgentServer(ThreadingHTTPServer):
    timeout = 0  # handle_request never waits: the dispatcher calls it only when a client waits

    def __init__(self, address: tuple[str, int], agent: SimulatedAgent) -> None:
        self.agent = agent
        super().__init__(address, _AgentHandler)


class _ControlServer(ThreadingHTTPServer):
    timeout = 0

    def __init__(self, address: tuple[str, int], fleet: AgentFleet) -> None:
        self.fleet = fleet
        super().__init__(address, _ControlHandler)


class _Quiet(BaseHTTPRequestHandler):
    server_version = "zlh-agent-sim"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # tests read state, not logs

    def send_json(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class _AgentHandler(_Quiet):
    server: _AgentServer

    def do_GET(self) -> None:
        fleet = self.server.agent.fleet
        with fleet.lock:
            fleet.in_flight += 1
            fleet.max_in_flight = max(fleet.max_in_flight, fleet.in_flight)
        try:
            self.answer()
        finally:
            with fleet.lock:
                fleet.in_flight -= 1

    def answer(self) -> None:
        agent = self.server.agent
        fleet = agent.fleet
        with fleet.lock:
            agent.requests += 1
            mode, delay = agent.mode, agent.delay
        if mode is AgentMode.HANG:
            # Hold the connection without a byte until the agent is set otherwise or the fleet
            # stops, then drop it: what a wedged agent looks like to a client.
            while agent.mode is AgentMode.HANG and not fleet.stopping.wait(0.02):
                pass
            self.close_connection = True
            return
        if delay and mode is not AgentMode.TRICKLE and fleet.stopping.wait(delay):
            return
        path = self.path.split("?", 1)[0]
        if path == "/health":
            self.send_json(200, {"ok": True})
            return
        if path != "/status":
            self.send_json(404, {"error": "not found"})
            return
        if fleet.token is not None and self.headers.get("Authorization") != (
            f"Bearer {fleet.token}"
        ):
            self.send_json(401, {"error": "unauthorized"})
            return
        if mode is AgentMode.OVERLOADED:
            self.send_json(503, {"error": "overloaded"})
            return
        if mode is AgentMode.GARBAGE:
            data = b"<html>502 Bad Gateway</html>"
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        with fleet.lock:
            body = agent.status.to_wire(fleet.clock())
        if mode is AgentMode.TRICKLE:
            # Each byte well within a client's read timeout, the whole far beyond it.
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.flush()
            for i in range(len(data)):
                if fleet.stopping.wait(delay):
                    return
                try:
                    self.wfile.write(data[i : i + 1])
                    self.wfile.flush()
                except OSError:
                    return  # the client gave up
            return
        self.send_json(200, body)


_AGENT_PATH = re.compile(r"^/agents/(?P<vmid>\d+)(?:/(?P<action>[a-z]+))?$")


class _ControlHandler(_Quiet):
    server: _ControlServer

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        if not length:
            return {}
        value = json.loads(self.rfile.read(length))
        if not isinstance(value, dict):
            raise ValueError("the body must be a JSON object")
        return value

    def do_GET(self) -> None:
        fleet = self.server.fleet
        if self.path == "/agents":
            self.send_json(200, {"agents": [a.describe() for a in fleet.all()]})
            return
        m = _AGENT_PATH.match(self.path)
        if m and not m["action"] and int(m["vmid"]) in fleet:
            self.send_json(200, fleet[int(m["vmid"])].describe())
            return
        self.send_json(404, {"error": "not found"})

    def do_POST(self) -> None:
        fleet = self.server.fleet
        try:
            body = self._body()
            if self.path == "/agents":
                agent = fleet.add(
                    int(body["vmid"]), name=body.get("name"), state=body.get("state", "ready")
                )
                self.send_json(201, agent.describe())
                return
            m = _AGENT_PATH.match(self.path)
            if not m or not m["action"]:
                self.send_json(404, {"error": "not found"})
                return
            if int(m["vmid"]) not in fleet:
                self.send_json(404, {"error": f"no agent {m['vmid']}"})
                return
            action = _ACTIONS.get(m["action"])
            if action is None:
                self.send_json(400, {"error": f"unknown action {m['action']!r}"})
                return
            agent = action(fleet[int(m["vmid"])], **body)
            self.send_json(200, agent.describe())
        except (KeyError, TypeError, ValueError) as exc:
            self.send_json(400, {"error": f"{type(exc).__name__}: {exc}"})

    def do_DELETE(self) -> None:
        fleet = self.server.fleet
        m = _AGENT_PATH.match(self.path)
        if not m or m["action"] or int(m["vmid"]) not in fleet:
            self.send_json(404, {"error": "not found"})
            return
        fleet.remove(int(m["vmid"]))
        self.send_response(204)
        self.end_headers()


class AgentFleet:
    """Every simulated agent of a platform, served by one dispatcher thread.

    Sockets are opened and closed only on the dispatcher thread (commands reach it through a
    queue and a wake-up socket), so a socket is never closed under a `select` that is watching it.
    Calls that change sockets return once the change is made: after `agent.unreachable()`
    the next connection is refused.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        token: str | None = None,
        control: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.host = host
        self.token = token
        self.clock = clock
        self.lock = threading.RLock()
        self.stopping = threading.Event()
        self.control_url = ""
        self.in_flight = 0  # requests being answered across all agents now
        self.max_in_flight = 0  # the most at once since start (a benchmark's concurrency)
        self._control = control
        self._agents: dict[int, SimulatedAgent] = {}
        self._selector: selectors.BaseSelector | None = None
        self._commands: queue.SimpleQueue[tuple[Callable[[], Any], _Reply]] = queue.SimpleQueue()
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._control_server: _ControlServer | None = None

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> AgentFleet:
        if self._thread is not None:
            return self
        self.stopping.clear()
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        for agent in self._agents.values():
            if agent.mode is not AgentMode.REFUSED:
                self._listen(agent)
        if self._control:
            self._control_server = _ControlServer((self.host, 0), self)
            self._selector.register(
                self._control_server, selectors.EVENT_READ, self._control_server
            )
            self.control_url = f"http://{self.host}:{self._control_server.server_address[1]}"
        self._thread = threading.Thread(target=self._serve, name="agent-fleet", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        self.stopping.set()
        self._wake()
        self._thread.join(5)
        self._thread = None

    def __enter__(self) -> AgentFleet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- agents ------------------------------------------------------------------------

    def add(self, vmid: int, *, name: str | None = None, state: str = "ready") -> SimulatedAgent:
        """A new agent on a fresh port, reporting `state` (an action without arguments)."""
        if state not in _INITIAL:
            raise ValueError(f"initial state must be one of {sorted(_INITIAL)}, not {state!r}")
        with self.lock:
            if vmid in self._agents:
                raise ValueError(f"agent {vmid} already exists")
            agent = SimulatedAgent(fleet=self, vmid=vmid, name=name or f"guest-{vmid}")
            self._agents[vmid] = agent
        _ACTIONS[state](agent)
        if self._thread is not None:
            self._on_dispatcher(lambda: self._listen(agent))
        return agent

    def remove(self, vmid: int) -> None:
        with self.lock:
            agent = self._agents.pop(vmid)
        self._on_dispatcher(lambda: self._close(agent))

    def __getitem__(self, vmid: int) -> SimulatedAgent:
        with self.lock:
            return self._agents[vmid]

    def __contains__(self, vmid: object) -> bool:
        with self.lock:
            return vmid in self._agents

    def all(self) -> list[SimulatedAgent]:
        with self.lock:
            return [self._agents[v] for v in sorted(self._agents)]

    def endpoint(self, vmid: int) -> tuple[str, int]:
        """Where the observer reaches this guest's agent: (ip, port), standing in for
        (the guest's management IP, 18888)."""
        agent = self[vmid]
        return agent.host, agent.port

    def url_of(self, vmid: int) -> str:
        return self[vmid].url

    def set_mode(self, agent: SimulatedAgent, mode: AgentMode) -> None:
        def apply() -> None:
            with self.lock:
                agent.mode = mode
            if mode is AgentMode.REFUSED:
                self._close(agent)
            elif agent._server is None and self._thread is not None:
                self._listen(agent)

        if self._thread is None:
            with self.lock:
                agent.mode = mode
            return
        self._on_dispatcher(apply)

    # --- the dispatcher ----------------------------------------------------------------

    def _listen(self, agent: SimulatedAgent) -> None:
        assert self._selector is not None
        # The same port as before once it has one: the guest's address does not change when
        # its agent restarts. ThreadingHTTPServer sets SO_REUSEADDR, so rebinding is immediate.
        server = _AgentServer((self.host, agent.port), agent)
        agent.port = server.server_address[1]
        agent._server = server
        self._selector.register(server, selectors.EVENT_READ, server)

    def _close(self, agent: SimulatedAgent) -> None:
        server, agent._server = agent._server, None
        if server is not None:
            assert self._selector is not None
            self._selector.unregister(server)
            server.server_close()

    def _wake(self) -> None:
        if self._wake_w is not None:
            with contextlib.suppress(OSError):
                self._wake_w.send(b"\0")

    def _on_dispatcher(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the dispatcher thread and return its result (or raise its error)."""
        if self._thread is None or threading.current_thread() is self._thread:
            return fn()
        reply: _Reply = _Reply()
        self._commands.put((fn, reply))
        self._wake()
        if not reply.done.wait(10):
            raise TimeoutError("the agent fleet's dispatcher did not answer")
        if reply.error is not None:
            raise reply.error
        value: T = reply.value
        return value

    def _serve(self) -> None:
        assert self._selector is not None and self._wake_r is not None
        try:
            while not self.stopping.is_set():
                for key, _ in self._selector.select():
                    if key.data is None:
                        with contextlib.suppress(BlockingIOError):
                            self._wake_r.recv(4096)
                        self._run_commands()
                    else:
                        key.data.handle_request()
        finally:
            self._run_commands()
            for agent in list(self._agents.values()):
                self._close(agent)
            if self._control_server is not None:
                self._selector.unregister(self._control_server)
                self._control_server.server_close()
                self._control_server = None
            self._selector.close()
            self._wake_r.close()
            if self._wake_w is not None:
                self._wake_w.close()
            self._wake_r = self._wake_w = None

    def _run_commands(self) -> None:
        while True:
            try:
                fn, reply = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                reply.value = fn()
            except BaseException as exc:  # handed to the caller's thread
                reply.error = exc
            reply.done.set()


@dataclass
class _Reply:
    done: threading.Event = field(default_factory=threading.Event)
    value: Any = None
    error: BaseException | None = None


@contextlib.contextmanager
def running_fleet(vmids: list[int], **kwargs: Any) -> Iterator[AgentFleet]:
    """A started fleet with a ready agent per vmid."""
    fleet = AgentFleet(**kwargs)
    for vmid in vmids:
        fleet.add(vmid)
    with fleet:
        yield fleet


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--vmid", type=int, action="append", default=[])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--token-env", help="environment variable holding the bearer token")
    args = parser.parse_args(argv)
    token = os.environ.get(args.token_env) if args.token_env else None
    with running_fleet(args.vmid, host=args.host, token=token) as fleet:
        agents = {a.vmid: a.url for a in fleet.all()}
        print(json.dumps({"control": fleet.control_url, "agents": agents}), flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            fleet.stopping.wait()


if __name__ == "__main__":
    main()
