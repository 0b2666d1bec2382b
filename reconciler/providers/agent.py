"""The in-container agents' health: `GET /status` on every runtime guest's agent (zlh-agent,
port 18888, management network only), as the planner needs it to route only to ready servers.

`AgentHealthProvider` is how an observation asks: a provider like the others
(`reconciler.providers.Provider`), registered by `applying.connecting.connect_platform`, which
resolves which guests run an agent and at which management IP, and the optional bearer token
(a value, never logged here). It owns no kind (there is nothing to apply to an agent, and its
health is no resource of the spec); it needs the guests, and fills the observation's `health`:
running from the guests seen, ready from their agents.

`AgentObserver.observe(targets)` asks every agent at once, at most `concurrency` at a time,
each with short timeouts, and hands back one `AgentHealth` per guest. The bound is one
`pacing.AdaptiveLimit` for all agents, kept from cycle to cycle, as the Proxmox API has one: a
503 or 429 (a proxy in front of the agents, or agents past their capacity) or a burst of
timeouts halves it for a while, and answers climb it back. It never raises for an
agent: refused, timed out, slow, 401, a non-200 or a body that is not the agent's status all
come back as `reachable=False` with a `last_error` that says which.

`reachable` means "we got a valid status from it": the network may be fine and the token wrong,
but either way nothing is known about the game server, and it is not routed.

With a Redis client (`redis.asyncio.Redis`), each result is also written as `agent:<vmid>`
with a short expiry (15 s by default), where the platform API already reads it. The value is
the agent's own `/status` object (camelCase, as the platform API's poller stores it) plus
`reachable` and `checkedAt`; for an agent without a valid status it is
`{"reachable": false, "ready": false, "error": ..., "checkedAt": ...}`. `read_cached` reads it
back. Redis being down costs the cache only: the failure is counted in `cache_errors` and
logged, and observation goes on.

Errors: none leave `observe`; a result's `last_error` is the message. The provider is
`optional` all the same: were it to fail, the health would be missing, which the planner reads
as "not ready" for every guest of an agent layer (fail closed), and the rest converges.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import anyio
import httpx
from pydantic import BaseModel, ConfigDict, ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from reconciler.model.errors import PermanentError
from reconciler.model.observed import GuestHealth, ObservedResource, agent_ip
from reconciler.model.plans import Change
from reconciler.model.resources import Kind
from reconciler.providers import Observation
from reconciler.providers.pacing import AdaptiveLimit

AGENT_PORT = 18888
CACHE_PREFIX = "agent:"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AgentTarget:
    """Where one guest's agent listens: its management IP and the agent port."""

    vmid: int
    address: str  # the guest's resource address, e.g. guest/mc-lobby
    ip: str
    port: int = AGENT_PORT

    @property
    def url(self) -> str:
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"http://{host}:{self.port}"


class AgentHealth(BaseModel):
    """What one agent said, or why it said nothing."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vmid: int
    address: str
    reachable: bool
    state: str | None = None
    ready: bool = False
    crash_count: int | None = None
    last_error: str | None = None
    checked_at: str  # RFC 3339 UTC


class _Status(BaseModel):
    """The fields of the agent's `/status` we rely on; the agent may send more."""

    model_config = ConfigDict(extra="allow")

    state: str
    ready: bool
    processRunning: bool | None = None
    readyError: str | None = None
    crashCount: int = 0
    error: str | None = None


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _short(value: Any, limit: int = 120) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _os_reason(exc: BaseException) -> str:
    """The operating system's reason under httpx's wrapping ("All connection attempts
    failed"): connection refused, no route to host, ..."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return os.strerror(seen.errno).lower()
        seen = seen.__cause__ or seen.__context__
    return _short(exc) or "connection failed"


class _NoStatus(Exception):
    """The agent gave no valid status; the message says why."""


class AgentObserver:
    """Polls agents' `/status`. One instance serves many cycles; it holds no connection."""

    def __init__(
        self,
        *,
        token: str | None = None,
        timeout: float = 2.0,
        connect_timeout: float = 2.0,
        concurrency: int = 32,
        redis: Redis | None = None,
        cache_ttl: float = 15.0,
        cache_timeout: float = 1.0,
        clock: Callable[[], str] = _now,
        pacing: AdaptiveLimit | None = None,
    ) -> None:
        self._token = token
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.concurrency = concurrency
        self.redis = redis
        self.cache_ttl = cache_ttl
        self.cache_timeout = cache_timeout
        self.clock = clock
        self.requests = 0  # status requests sent
        self.cache_errors = 0  # Redis writes that failed
        self._tls: ssl.SSLContext | None = None  # built once: most of a client's cost
        # Every agent's request holds a slot; 429/503 and bursts of timeouts halve it (AIMD).
        self.pacing = pacing if pacing is not None else AdaptiveLimit(max(1, concurrency))

    def __repr__(self) -> str:  # the token stays out of every repr and log line
        return (
            f"AgentObserver(timeout={self.timeout}, connect_timeout={self.connect_timeout}, "
            f"concurrency={self.concurrency}, token={'set' if self._token else 'none'}, "
            f"redis={'set' if self.redis is not None else 'none'})"
        )

    async def observe(self, targets: Iterable[AgentTarget]) -> dict[str, AgentHealth]:
        """Every target's health, by guest address, ordered by vmid."""
        ordered = sorted(targets, key=lambda t: t.vmid)
        results: dict[str, tuple[AgentHealth, dict[str, Any] | None]] = {}
        async with self._client() as client:

            async def one(target: AgentTarget) -> None:
                # A slot, released without counting as a success: `_fetch` tells the bound
                # what the agent answered.
                await self.pacing.acquire()
                try:
                    results[target.address] = await self._observe(client, target)
                finally:
                    self.pacing.release()

            async with anyio.create_task_group() as tg:
                for target in ordered:
                    tg.start_soon(one, target)
        await self._cache(results.values())
        return {t.address: results[t.address][0] for t in ordered}

    async def observe_one(self, target: AgentTarget) -> AgentHealth:
        """One agent's health (not cached); never raises for what the agent or network does."""
        async with self._client() as client:
            health, _ = await self._observe(client, target)
        return health

    def _client(self) -> httpx.AsyncClient:
        headers = {"Accept": "application/json"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        # trust_env=False: an HTTP(S)_PROXY set for the controller's outbound traffic must not
        # carry calls meant for the management network.
        if self._tls is None:
            self._tls = httpx.create_ssl_context()
        return httpx.AsyncClient(
            verify=self._tls,
            timeout=httpx.Timeout(self.timeout, connect=self.connect_timeout),
            headers=headers,
            # The limiter bounds concurrency, not the pool: a request queued for a pooled
            # connection spends its pool timeout waiting, and would come back "unreachable".
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=0),
            trust_env=False,
        )

    async def _observe(
        self, client: httpx.AsyncClient, target: AgentTarget
    ) -> tuple[AgentHealth, dict[str, Any] | None]:
        self.requests += 1
        try:
            status, raw = await self._fetch(client, target)
        except _NoStatus as exc:
            health = AgentHealth(
                vmid=target.vmid,
                address=target.address,
                reachable=False,
                last_error=str(exc),
                checked_at=self.clock(),
            )
            return health, None
        health = AgentHealth(
            vmid=target.vmid,
            address=target.address,
            reachable=True,
            state=status.state,
            ready=status.ready,
            crash_count=status.crashCount,
            last_error=status.error or (None if status.ready else status.readyError),
            checked_at=self.clock(),
        )
        return health, raw

    async def _fetch(
        self, client: httpx.AsyncClient, target: AgentTarget
    ) -> tuple[_Status, dict[str, Any]]:
        where = f"agent of {target.address} at {target.ip}:{target.port}"
        # httpx's timeouts are per phase; a server that trickles bytes could stretch a read
        # forever, so the whole exchange also has one deadline.
        deadline = self.connect_timeout + self.timeout
        started = time.monotonic()
        try:
            with anyio.fail_after(deadline):
                response = await client.get(f"{target.url}/status")
        except (TimeoutError, httpx.TimeoutException):
            self.pacing.timed_out()
            waited = time.monotonic() - started
            raise _NoStatus(
                f"{where}: no complete answer within {waited:.1f} s (timed out)"
            ) from None
        except httpx.ConnectError as exc:
            raise _NoStatus(f"{where}: cannot connect ({_os_reason(exc)})") from None
        except (httpx.HTTPError, httpx.InvalidURL, OSError) as exc:
            # InvalidURL: an address that is no IP; none of it may leave observe.
            raise _NoStatus(f"{where}: {type(exc).__name__}: {_short(exc)}") from None
        if response.status_code in (401, 403):
            has = "was refused" if self._token else "is required and none is configured"
            raise _NoStatus(f"{where}: {response.status_code}: the bearer token {has}")
        if response.status_code in (429, 503):
            self.pacing.overloaded()
        if response.status_code != 200:
            raise _NoStatus(f"{where}: answered {response.status_code} to GET /status")
        self.pacing.succeeded()
        try:
            raw = response.json()
        except ValueError:
            raise _NoStatus(
                f"{where}: answered something that is not JSON: {_short(response.text, 60)!r}"
            ) from None
        if not isinstance(raw, dict):
            raise _NoStatus(f"{where}: answered JSON that is not an object")
        try:
            return _Status.model_validate(raw), raw
        except ValidationError as exc:
            fields = ", ".join(".".join(map(str, e["loc"])) or "?" for e in exc.errors())
            raise _NoStatus(f"{where}: its status is malformed ({fields})") from None

    # --- the Redis cache ---------------------------------------------------------------

    async def _cache(self, results: Iterable[tuple[AgentHealth, dict[str, Any] | None]]) -> None:
        if self.redis is None:
            return
        expiry = max(1, round(self.cache_ttl * 1000))
        try:
            # redis-py retries a refused connection with backoff for seconds; the cache is
            # not worth delaying a cycle for.
            with anyio.fail_after(self.cache_timeout):
                await self._write(self.redis, results, expiry)
        except (RedisError, OSError, TimeoutError) as exc:
            self.cache_errors += 1
            log.warning("could not cache agent health in Redis: %s", _short(exc) or "timed out")

    @staticmethod
    async def _write(
        redis: Redis,
        results: Iterable[tuple[AgentHealth, dict[str, Any] | None]],
        expiry: int,
    ) -> None:
        async with redis.pipeline(transaction=False) as pipe:
            for health, raw in results:
                pipe.set(
                    f"{CACHE_PREFIX}{health.vmid}", json.dumps(cache_value(health, raw)), px=expiry
                )
            await pipe.execute()


def cache_value(health: AgentHealth, raw: dict[str, Any] | None) -> dict[str, Any]:
    """The `agent:<vmid>` value: the agent's own status plus `reachable` and `checkedAt`."""
    if health.reachable and raw is not None:
        return {**raw, "reachable": True, "checkedAt": health.checked_at}
    return {
        "reachable": False,
        "ready": False,
        "error": health.last_error,
        "checkedAt": health.checked_at,
    }


async def read_cached(redis: Redis, vmid: int, address: str = "") -> AgentHealth | None:
    """The cached health of one guest's agent, or None when absent or expired."""
    value = await redis.get(f"{CACHE_PREFIX}{vmid}")
    if value is None:
        return None
    data = json.loads(value)
    reachable = bool(data.get("reachable", True))
    return AgentHealth(
        vmid=vmid,
        address=address,
        reachable=reachable,
        state=data.get("state") if reachable else None,
        ready=bool(data.get("ready")) and reachable,
        crash_count=data.get("crashCount") if reachable else None,
        last_error=data.get("error") or (None if data.get("ready") else data.get("readyError")),
        checked_at=str(data.get("checkedAt", "")),
    )


# --- the provider --------------------------------------------------------------------------


def _observed_ip(guest: ObservedResource) -> str:
    """A VM's address as its QEMU guest agent reports it (`addresses`, observed by the Proxmox
    provider; `agent_ip` picks the one the edge uses too), for a guest without a static IP;
    "" when none is known."""
    ip = agent_ip(guest.attributes.get("addresses") or ())
    return "" if ip is None else str(ip)


@dataclass
class AgentHealthProvider:
    """The agents of the guests in `endpoints` (guest address -> (ip, port); ip "": the
    address the guest's QEMU guest agent reports, a DHCP VM's), asked through `observer`.
    `layers`: the layers whose guests run agents, the planner's readiness gate (a guest of
    those layers without an entry in `health` is not ready)."""

    observer: AgentObserver
    endpoints: Mapping[str, tuple[str, int]] = field(default_factory=dict)
    layers: tuple[str, ...] = ()

    kinds = frozenset[Kind]()  # nothing to apply: it only adds `health` to an observation
    needs = frozenset({Kind.GUEST})  # running from the guests seen; only their agents are asked
    streams = frozenset[Kind]()
    optional = True

    async def observe(self, seen: Observation) -> list[ObservedResource]:
        """Every watched guest's health into `seen.health`: running from the guests seen,
        ready from its agent. Only running guests' agents are asked."""
        guests = {r.address: r for r in seen.of(Kind.GUEST) if r.owned and r.address}
        health: dict[str, GuestHealth] = {}
        targets: list[AgentTarget] = []
        for address, (ip, port) in sorted(self.endpoints.items()):
            guest = guests.get(address)
            if guest is None or "vmid" not in guest.id:
                health[address] = GuestHealth(error="the guest does not exist")
            elif guest.attributes.get("state") != "running":
                health[address] = GuestHealth(error="the guest is stopped")
            elif not (ip := ip or _observed_ip(guest)):
                health[address] = GuestHealth(
                    running=True, error="no static IP, and its guest agent reports no address"
                )
            else:
                vmid = guest.id["vmid"]
                targets.append(AgentTarget(vmid=vmid, address=address, ip=ip, port=port))
        for address, answer in (await self.observer.observe(targets)).items():
            health[address] = GuestHealth(
                running=True,
                reachable=answer.reachable,
                ready=answer.ready,
                error=answer.last_error,
                crashes=answer.crash_count,
            )
        seen.health.update(sorted(health.items()))
        return []

    async def apply(self, change: Change) -> None:
        # It owns no kind, so no plan holds a change for it: reaching here is a caller's bug.
        raise PermanentError(f"{change.address}: agents' health is observed, never applied")
