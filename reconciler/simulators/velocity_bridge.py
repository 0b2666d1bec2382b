"""A simulated Velocity proxy with the platform's bridge plugin (ZpackVelocityBridge), for tests,
benchmarks and the demo. The Velocity provider (`reconciler.providers.velocity`) talks to it
exactly as to the real plugin.

Wire contract (the platform's Velocity bridge plugin):

    POST /zpack/register    {"server_name": "mc-lobby", "address": "10.60.0.11", "port": 25565}
        200 {"ok": true, "server_name": ..., "changed": true}   registered
        200 {"ok": true, "server_name": ..., "changed": false}  the same name and address were
                                                                registered already: a no-op
        409 {"error": "Server with name mc-lobby already registered"}
                                                                the name is registered with
                                                                another address
        400 {"error": ...}                                      a field missing or malformed
    POST /zpack/unregister  {"server_name": "mc-lobby"}
        200 {"ok": true, "server_name": ...}
        404 {"error": "Server with name mc-lobby is not registered!"}
    GET  /zpack/list
        200 {"servers": [{"name": "mc-lobby", "address": "10.60.0.11", "port": 25565}, ...]}

    Every request carries `X-Zpack-Secret: <hex sha256 of the shared secret>`:
        401 {"error": "missing X-Zpack-Secret"}   header absent
        403 {"error": "invalid X-Zpack-Secret"}   header present, wrong value

Where this comes from, and what we chose:
- The plugin's own source is not public (a search of the stored public code found none). The
  platform API's client for it (`src/services/velocityClient.js`) shows the paths, the bodies,
  the header, that a 404 on unregister means "already gone", and that `/zpack/list` answers an
  object whose `servers` array holds objects with a `name`. The `address` and `port` of each
  list entry are our choice (the provider also accepts `address` as "host:port").
- That client calls `/zpack/list` without the header. Whether the real plugin checks it there is
  unknown: `list_requires_secret` (default True) chooses; the provider always sends it.
- Velocity's registry (`ServerMap` in PaperMC/Velocity) is case-insensitive on names; registering
  an identical `ServerInfo` returns the existing one, another address under the same name throws
  IllegalArgumentException "Server with name X already registered". The simulator answers that
  with 409 and Velocity's own message. A plugin that let the exception surface as a 500 would
  carry the same message, and the provider classifies either as a conflict.
- Registrations live in memory: `restart()` (or `stop()` then `start()`) loses them all, as a
  Velocity restart does.

Fault switches for tests: `fail(status, times, path)` answers the next `times` requests (to
`path`, or any) with `status`; `hang(times, path)` accepts them and never answers until
`release()` or `stop()`; `clear_faults()`. `requests` logs (method, path, status) of every
request. The same switches are reachable over HTTP for a simulator in another process (no
secret needed; never expose a simulator beyond loopback):

    POST /_sim/restart     POST /_sim/release     POST /_sim/clear
    POST /_sim/fail  {"status": 500, "times": 1, "path": "/zpack/register"}
    POST /_sim/hang  {"times": 1, "path": null}
    GET  /_sim/state  -> {"servers": [...], "restarts": n, "requests": [...]}

Run standalone: `python -m reconciler.simulators.velocity_bridge --secret-env ZPACK_SECRET
[--port 8081]` prints its URL, then serves until interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import json
import os
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def secret_hash(secret: str) -> str:
    """The header value the plugin expects: hex sha256 of the shared secret."""
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class Registration:
    name: str
    address: str
    port: int

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "address": self.address, "port": self.port}


@dataclass
class _Fault:
    kind: str  # "fail" or "hang"
    times: int | None  # None: every request until cleared
    path: str | None
    status: int = 500


class _BridgeServer(ThreadingHTTPServer):
    def __init__(self, address: tuple[str, int], bridge: VelocityBridgeSimulator) -> None:
        self.bridge = bridge
        super().__init__(address, _BridgeHandler)


class _BridgeHandler(BaseHTTPRequestHandler):
    server: _BridgeServer
    server_version = "zpack-velocity-bridge-sim"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def send_json(self, status: int, body: Any) -> None:
        # Logged before answering: a client that has its answer finds the request in the log.
        self.server.bridge.log(self.command, self.path, status)
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def read_json(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(length)) if length else None

    def do_GET(self) -> None:
        self.handle_any()

    def do_POST(self) -> None:
        self.handle_any()

    def handle_any(self) -> None:
        bridge = self.server.bridge
        path = self.path.split("?", 1)[0]
        if path.startswith("/_sim/"):
            self.send_json(*bridge.control(self.command, path, self.read_json()))
            return
        fault = bridge.take_fault(path)
        if fault is not None and fault.kind == "hang":
            bridge.log(self.command, path, None)
            bridge.released.wait()
            self.close_connection = True
            return
        if fault is not None:
            self.send_json(fault.status, {"error": f"simulated failure ({fault.status})"})
            return
        routes = {
            ("GET", "/zpack/list"): bridge.list_servers,
            ("POST", "/zpack/register"): bridge.handle_register,
            ("POST", "/zpack/unregister"): bridge.handle_unregister,
        }
        route = routes.get((self.command, path))
        if route is None:
            self.send_json(404, {"error": "not found"})
            return
        if path != "/zpack/list" or bridge.list_requires_secret:
            given = self.headers.get("X-Zpack-Secret")
            if given is None:
                self.send_json(401, {"error": "missing X-Zpack-Secret"})
                return
            if not hmac.compare_digest(given.lower(), bridge.expected):
                self.send_json(403, {"error": "invalid X-Zpack-Secret"})
                return
        try:
            body = self.read_json()
        except (ValueError, UnicodeDecodeError):
            self.send_json(400, {"error": "the body is not JSON"})
            return
        self.send_json(*route(body))


class VelocityBridgeSimulator:
    """The plugin's HTTP API over an in-memory registry with Velocity's semantics."""

    def __init__(
        self,
        secret: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        list_requires_secret: bool = True,
    ) -> None:
        self.expected = secret_hash(secret)
        self.host = host
        self.port = port
        self.list_requires_secret = list_requires_secret
        self.restarts = 0
        self.requests: list[tuple[str, str, int | None]] = []  # status None: left hanging
        self.released = threading.Event()
        self._lock = threading.Lock()
        self._servers: dict[str, Registration] = {}  # by lower-cased name, as Velocity keys them
        self._faults: list[_Fault] = []
        self._server: _BridgeServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> VelocityBridgeSimulator:
        """Listen (on the same port as before, after a stop) with no registrations."""
        if self._server is not None:
            return self
        with self._lock:
            self._servers.clear()
        self.released.clear()
        self._server = _BridgeServer((self.host, self.port), self)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening: connections are refused until `start()`."""
        self.released.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def restart(self) -> None:
        """A Velocity restart: every registration is gone (the port stays open here; use
        `stop()` and `start()` to also refuse connections in between)."""
        with self._lock:
            self._servers.clear()
            self.restarts += 1

    def __enter__(self) -> VelocityBridgeSimulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- the registry, as tests see it -------------------------------------------------

    def servers(self) -> dict[str, tuple[str, int]]:
        """name -> (address, port)."""
        with self._lock:
            return {r.name: (r.address, r.port) for r in self._servers.values()}

    def register(self, name: str, address: str, port: int) -> bool:
        """Velocity's `registerServer`: True when added, False when the identical server was
        there already; ValueError when the name is taken by another address."""
        with self._lock:
            existing = self._servers.get(name.lower())
            wanted = Registration(name, address, port)
            if existing is None:
                self._servers[name.lower()] = wanted
                return True
            if (existing.name, existing.address, existing.port) == (name, address, port):
                return False
            raise ValueError(f"Server with name {name} already registered")

    def unregister(self, name: str) -> bool:
        with self._lock:
            return self._servers.pop(name.lower(), None) is not None

    # --- faults ------------------------------------------------------------------------

    def fail(self, status: int = 500, times: int | None = 1, path: str | None = None) -> None:
        with self._lock:
            self._faults.append(_Fault("fail", times, path, status))

    def hang(self, times: int | None = None, path: str | None = None) -> None:
        with self._lock:
            self.released.clear()
            self._faults.append(_Fault("hang", times, path))

    def release(self) -> None:
        """Let every hanging request go (its connection is dropped without an answer)."""
        with self._lock:
            self._faults = [f for f in self._faults if f.kind != "hang"]
        self.released.set()

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()
        self.released.set()

    def take_fault(self, path: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.path is None or fault.path == path:
                    if fault.times is not None:
                        fault.times -= 1
                        if fault.times <= 0:
                            self._faults.remove(fault)
                    return fault
        return None

    def log(self, method: str, path: str, status: int | None) -> None:
        with self._lock:
            self.requests.append((method, path, status))

    # --- handlers ----------------------------------------------------------------------

    def list_servers(self, _body: Any) -> tuple[int, Any]:
        with self._lock:
            entries = [self._servers[k].to_wire() for k in sorted(self._servers)]
        return 200, {"servers": entries}

    def handle_register(self, body: Any) -> tuple[int, Any]:
        if not isinstance(body, dict):
            return 400, {"error": "expected {server_name, address, port}"}
        name, address, port = body.get("server_name"), body.get("address"), body.get("port")
        if not isinstance(name, str) or not name:
            return 400, {"error": "server_name is required"}
        if not isinstance(address, str) or not address:
            return 400, {"error": "address is required"}
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            return 400, {"error": "port must be an integer between 1 and 65535"}
        try:
            changed = self.register(name, address, port)
        except ValueError as exc:
            return 409, {"error": str(exc)}
        return 200, {"ok": True, "server_name": name, "changed": changed}

    def handle_unregister(self, body: Any) -> tuple[int, Any]:
        name = body.get("server_name") if isinstance(body, dict) else None
        if not isinstance(name, str) or not name:
            return 400, {"error": "server_name is required"}
        if not self.unregister(name):
            return 404, {"error": f"Server with name {name} is not registered!"}
        return 200, {"ok": True, "server_name": name}

    def control(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        args = body if isinstance(body, dict) else {}
        try:
            if (method, path) == ("GET", "/_sim/state"):
                with self._lock:
                    requests = [list(r) for r in self.requests]
                return 200, {
                    "servers": self.list_servers(None)[1]["servers"],
                    "restarts": self.restarts,
                    "requests": requests,
                }
            actions = {
                "/_sim/restart": lambda: self.restart(),
                "/_sim/release": lambda: self.release(),
                "/_sim/clear": lambda: self.clear_faults(),
                "/_sim/fail": lambda: self.fail(**args),
                "/_sim/hang": lambda: self.hang(**args),
            }
            if method != "POST" or path not in actions:
                return 404, {"error": "not found"}
            actions[path]()
        except TypeError as exc:
            return 400, {"error": str(exc)}
        return 200, {"ok": True}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--secret-env", required=True, help="variable holding the shared secret")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    args = parser.parse_args(argv)
    secret = os.environ.get(args.secret_env)
    if secret is None:
        parser.error(f"environment variable {args.secret_env} is not set")
    with VelocityBridgeSimulator(secret, host=args.host, port=args.port) as bridge:
        print(json.dumps({"url": bridge.url}), flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


if __name__ == "__main__":
    main()
