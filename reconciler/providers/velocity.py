"""Velocity registrations: observe and apply `velocity/<name>` resources through the platform's
bridge plugin (ZpackVelocityBridge), over httpx.

Called by the CLI and the controller like every provider (`reconciler.providers.Provider`).
The caller resolves the bridge's URL (`http://<velocity guest ip>:<bridge.port>`) and the
shared secret; only the secret's hex sha256 goes on the wire (`X-Zpack-Secret`), and neither the
secret nor its hash appears in an error message or a repr.

What it knows of the bridge and of Velocity (the simulator `reconciler.simulators.velocity_bridge`
speaks the contract in full; the README's "The edge" section describes it for an operator):
- `GET /zpack/list` -> `{"servers": [{"name", "address", "port"}, ...]}` is the whole registry;
  an entry whose `address` is "host:port" with no `port` is read as both;
- Velocity's registry is in memory, keyed by name: registering an identical name and address is
  a no-op, the same name with another address is refused (409, or a 500 carrying Velocity's
  "already registered"), `unregister` needs only the name and answers 404 once it is gone;
- so CREATE is register (a second apply of the same plan is harmless), UPDATE of `address` or
  `port` (and REPLACE) is unregister then register, DELETE is unregister and 404 means done.
  After a Velocity restart the registry is empty: the next observation shows every server
  missing and the plan registers them all again, with no resync of our own;
- the bridge has no notion of ownership. Every registration it lists is taken as the platform's
  (observed `owned=True`), because the plugin is the platform's own and nothing else registers
  through it. Names given as `unmanaged` (servers from velocity.toml, if the plugin lists them)
  are observed as foreign and never touched.

Compared fields: the bridge knows `server_name`, `address` and `port` only, so observed
attributes hold exactly those (`BRIDGE_FIELDS`). A desired resource's `forced_host` is not part
of the bridge contract and must be left out of the diff (planning: NOT_COMPARED for
Kind.VELOCITY); an UPDATE that changes only fields outside BRIDGE_FIELDS sends nothing.

Errors (reconciler.model.errors), as `classify` hands them out:

    ProviderError
    ├── TemporaryError      connection refused or reset, timeout, 5xx, 408, 429: retried with
    │                       jittered exponential backoff, `RetryPolicy.attempts` tries in all,
    │                       sleeping on the injected `sleep`
    └── PermanentError      401/403 (the secret is wrong), 400, a list that is not the bridge's
        ├── ConflictError   409, or "already registered": the name holds another address now;
        │                   re-observe and re-plan
        ├── NotFoundError   404, or "is not registered": on unregister, already done
        └── OwnershipError  raised by the provider itself: an `unmanaged` name
"""

from __future__ import annotations

import hashlib
import os
import ssl
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import anyio
import httpx

from reconciler.model.errors import (
    ConflictError,
    NotFoundError,
    OwnershipError,
    PermanentError,
    ProviderError,
    TemporaryError,
)
from reconciler.model.observed import ObservedResource
from reconciler.model.plans import Action, Change
from reconciler.model.resources import Kind
from reconciler.providers import Observation
from reconciler.providers.backoff import backoff

Sleep = Callable[[float], Awaitable[None]]

SECRET_HEADER = "X-Zpack-Secret"
# What the bridge knows of a server: the only attributes observed, and the only ones compared.
BRIDGE_FIELDS = ("server_name", "address", "port")


class BadAnswer(Exception):
    """The bridge answered 2xx with something that is not its contract."""


# --- errors ------------------------------------------------------------------------------------


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        body = response.text
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        body = body["error"]
    text = " ".join(str(body).split())
    return text[:200]


def _os_reason(exc: BaseException) -> str:
    """The operating system's reason under httpx's wrapping: connection refused, ..."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return os.strerror(seen.errno).lower()
        seen = seen.__cause__ or seen.__context__
    return type(exc).__name__


def classify(exc: BaseException, context: str = "", redact: Iterable[str] = ()) -> ProviderError:
    """Turn any httpx exception (an HTTPStatusError for a non-2xx answer) or a malformed
    answer into ours. `redact`: strings that must never appear in the message (the secret and
    its hash), in case a server ever echoes them back."""
    if isinstance(exc, ProviderError):
        return exc
    prefix = f"{context}: " if context else ""
    error: ProviderError
    if isinstance(exc, httpx.HTTPStatusError):
        status = exc.response.status_code
        detail = _detail(exc.response)
        message = f"{prefix}{status} {detail}".rstrip()
        lowered = detail.lower()
        if status in (401, 403):
            error = PermanentError(
                f"{prefix}{status}: the Velocity bridge refused our {SECRET_HEADER}; the shared "
                "secret (velocity.bridge.secret) does not match the plugin's",
                status=status,
            )
        elif status == 409 or "already registered" in lowered:
            error = ConflictError(message, status=status)
        elif status == 404 or "is not registered" in lowered:
            error = NotFoundError(message, status=status)
        elif status >= 500 or status in (408, 429):
            error = TemporaryError(message, status=status)
        else:
            error = PermanentError(message, status=status)
    elif isinstance(exc, httpx.TimeoutException):
        error = TemporaryError(
            f"{prefix}the Velocity bridge did not answer in time ({type(exc).__name__})"
        )
    elif isinstance(exc, (httpx.TransportError, ConnectionError, TimeoutError)):
        error = TemporaryError(f"{prefix}cannot reach the Velocity bridge ({_os_reason(exc)})")
    elif isinstance(exc, BadAnswer):
        error = PermanentError(f"{prefix}{exc}")
    else:
        error = PermanentError(f"{prefix}{type(exc).__name__}: {exc}")
    text = str(error)
    for secret in redact:
        if secret and secret in text:
            text = text.replace(secret, "***")
            error = type(error)(text, status=error.status)
    return error


# --- the provider ------------------------------------------------------------------------------


@dataclass
class RetryPolicy:
    attempts: int = 5  # tries of one request that meets temporary errors
    initial: float = 0.2  # backoff: a random delay up to initial * 2**n, capped at maximum
    maximum: float = 5.0


def parse_list(body: Any) -> list[dict[str, Any]]:
    """`/zpack/list` -> [{server_name, address, port}], sorted by name."""
    servers = body.get("servers") if isinstance(body, dict) else None
    if not isinstance(servers, list):
        raise BadAnswer("GET /zpack/list answered without a `servers` list")
    out: list[dict[str, Any]] = []
    for entry in servers:
        if not isinstance(entry, dict):
            raise BadAnswer(f"GET /zpack/list: an entry is not an object: {entry!r:.80}")
        name = entry.get("name", entry.get("server_name"))
        address: Any = entry.get("address")
        raw_port: Any = entry.get("port")
        if raw_port is None and isinstance(address, str) and address.count(":") == 1:
            address, _, raw_port = address.partition(":")
        try:
            port = int(raw_port)
        except (TypeError, ValueError):
            raise BadAnswer(f"GET /zpack/list: {name!r} has no valid port") from None
        if not isinstance(name, str) or not name or not isinstance(address, str):
            raise BadAnswer(f"GET /zpack/list: an entry lacks a name or address: {entry!r:.80}")
        out.append({"server_name": name, "address": address, "port": port})
    return sorted(out, key=lambda s: s["server_name"])


class VelocityProvider:
    """Registrations on one Velocity proxy's bridge plugin."""

    kinds = frozenset({Kind.VELOCITY})
    needs = frozenset[Kind]()
    streams = frozenset[Kind]()
    optional = True  # the bridge down costs the registrations only: the guests converge

    def __init__(
        self,
        url: str,
        secret: str,
        *,
        timeout: float = 5.0,
        retry: RetryPolicy | None = None,
        sleep: Sleep = anyio.sleep,
        unmanaged: Iterable[str] = (),
    ) -> None:
        self.url = url.rstrip("/")
        self._secret = secret
        self._hash = hashlib.sha256(secret.encode()).hexdigest()
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.sleep = sleep
        self.unmanaged = frozenset(n.lower() for n in unmanaged)
        self.calls = 0  # HTTP requests sent
        self.retries = 0  # requests repeated after a temporary error
        self._tls: ssl.SSLContext | None = None

    def __repr__(self) -> str:
        return f"VelocityProvider(url={self.url!r}, timeout={self.timeout})"

    def _client(self) -> httpx.AsyncClient:
        # A client per observe or apply: a handful of requests each, and no pooled connection
        # outlives the event loop that opened it. The TLS context (most of a client's cost,
        # ~50 ms) is built once.
        if self._tls is None:
            self._tls = httpx.create_ssl_context()
        return httpx.AsyncClient(
            verify=self._tls,
            base_url=self.url,
            timeout=httpx.Timeout(self.timeout),
            headers={SECRET_HEADER: self._hash, "Accept": "application/json"},
            trust_env=False,
        )

    # --- requests ----------------------------------------------------------------------

    async def _send(
        self, client: httpx.AsyncClient, method: str, path: str, body: Any, what: str
    ) -> Any:
        self.calls += 1
        try:
            response = await client.request(method, path, json=body)
            response.raise_for_status()
            try:
                return response.json() if response.content else None
            except ValueError:
                raise BadAnswer(f"{method} {path} answered something that is not JSON") from None
        except Exception as exc:
            raise classify(exc, what, redact=(self._secret, self._hash)) from None

    async def _request(
        self, client: httpx.AsyncClient, method: str, path: str, what: str, body: Any = None
    ) -> Any:
        """One request under the retry policy: temporary errors are retried with backoff."""
        tries = 0
        while True:
            try:
                return await self._send(client, method, path, body, what)
            except TemporaryError:
                tries += 1
                if tries >= self.retry.attempts:
                    raise
                self.retries += 1
                await self.sleep(self._backoff(tries))

    def _backoff(self, attempt: int) -> float:
        return backoff(attempt, initial=self.retry.initial, maximum=self.retry.maximum)

    # --- observe -----------------------------------------------------------------------

    async def list_servers(self) -> list[dict[str, Any]]:
        async with self._client() as client:
            body = await self._request(
                client, "GET", "/zpack/list", f"list servers on the Velocity bridge {self.url}"
            )
        try:
            return parse_list(body)
        except BadAnswer as exc:
            raise classify(exc, f"Velocity bridge {self.url}") from None

    async def observe(self, seen: Observation | None = None) -> list[ObservedResource]:
        out: list[ObservedResource] = []
        for server in await self.list_servers():
            name = server["server_name"]
            ours = name.lower() not in self.unmanaged
            out.append(
                ObservedResource(
                    address=f"{Kind.VELOCITY.value}/{name}" if ours else None,
                    kind=Kind.VELOCITY,
                    owned=ours,
                    id={"server_name": name},
                    attributes=server if ours else {"name": name, **server},
                )
            )
        return out

    # --- apply -------------------------------------------------------------------------

    async def apply(self, change: Change) -> None:
        if change.kind is not Kind.VELOCITY:
            raise PermanentError(f"{change.address}: no provider for kind {change.kind.value}")
        if change.action is Action.NOOP:
            return
        name = self._name(change)
        if name.lower() in self.unmanaged:
            raise OwnershipError(
                f"{change.address}: {name!r} is listed as unmanaged; it will not be touched"
            )
        async with self._client() as client:
            match change.action:
                case Action.CREATE:
                    await self._register(client, change)
                case Action.UPDATE:
                    if self._bridge_fields_change(change):
                        await self._unregister(client, change, name)
                        await self._register(client, change)
                case Action.REPLACE:
                    await self._unregister(client, change, name)
                    await self._register(client, change)
                case Action.DELETE:
                    await self._unregister(client, change, name)

    @staticmethod
    def _name(change: Change) -> str:
        for source in (change.id, change.before or {}, change.after or {}):
            if source.get("server_name"):
                return str(source["server_name"])
        return change.address.removeprefix(f"{Kind.VELOCITY.value}/")

    @staticmethod
    def _bridge_fields_change(change: Change) -> bool:
        if change.fields:
            return any(f.path.split(".", 1)[0] in BRIDGE_FIELDS for f in change.fields)
        before, after = change.before or {}, change.after or {}
        return any(before.get(k) != after.get(k) for k in BRIDGE_FIELDS)

    async def _register(self, client: httpx.AsyncClient, change: Change) -> None:
        assert change.after is not None
        want = change.after
        body = {
            "server_name": str(want.get("server_name") or self._name(change)),
            "address": str(want["address"]),
            "port": int(want["port"]),
        }
        await self._request(
            client, "POST", "/zpack/register", f"register {change.address}", body=body
        )

    async def _unregister(self, client: httpx.AsyncClient, change: Change, name: str) -> None:
        try:
            await self._request(
                client,
                "POST",
                "/zpack/unregister",
                f"unregister {change.address}",
                body={"server_name": name},
            )
        except NotFoundError:
            return  # already gone: a re-run, or Velocity restarted since the plan
