"""Traefik routes: observe and apply `route/<instance>/<name>` resources for ONE Traefik instance,
through its dynamic-configuration feed (Redis KV or a watched YAML file), and read back what
Traefik actually serves through its API.

Called by the CLI and the controller like every provider (`reconciler.providers.Provider`); the
caller builds one provider per instance, with its feed (`RedisFeedClient`: a redis.asyncio client
and the instance's root key; `FileFeedPath`: the instance's dynamic-config file) and optionally
the instance's API URL (the README's "The edge" section shows both feeds and the Traefik static
configuration each needs). Build the Redis client with redis-py's own retries off
(`retry=Retry(NoBackoff(), 0)`): they sleep for real, outside the provider's RetryPolicy and its
injected sleep.

Naming and ownership: the route `route/<instance>/<name>` becomes a router and a service both
named `rc-<name>` (ROUTER_PREFIX). Only routers and services carrying that prefix are read or
touched; everything else under the root key, or in a file without our header, is someone else's.

What is written where: names become parts of keys, so a route's name must be a DNS label to be
written (a '/' would reach into another router's keys, a '.' splits a name in Traefik's KV
reading), the instance a DNS label (it is in the file's header comment), entrypoints and the
certificate resolver simple names, and `tls` holds only `certresolver` and `passthrough`;
anything else is refused (PermanentError) before a key is touched. The rule is written as the
graph built it (reconciler.loading.graph.route_rule quotes every value). The file is serialized
by the YAML library, never by joining text.

Redis layout, under the instance's root key (one root per instance):

    <root>/http/routers/rc-<name>/rule                         Host(`a.example`) && ...
    <root>/http/routers/rc-<name>/entrypoints/<i>              web
    <root>/http/routers/rc-<name>/service                      rc-<name>
    <root>/http/routers/rc-<name>/tls/certresolver             le       (tls with a resolver)
    <root>/http/routers/rc-<name>/tls                          true     (tls, no options)
    <root>/http/services/rc-<name>/loadbalancer/servers/0/url  http://10.0.0.5:8080
    <root>/tcp/routers/rc-<name>/rule                          HostSNI(`a.example`)
    <root>/tcp/routers/rc-<name>/tls/passthrough               true
    <root>/tcp/services/rc-<name>/loadbalancer/servers/0/address  10.0.0.5:25565
    <root>/http/middlewares/rc-placeholder/headers/customrequestheaders/X-Reconciler  keep

Each route is written in one MULTI/EXEC transaction that deletes the route's old keys (both
protocols, router and service) and sets the new ones, so Traefik never reads a half-written
route. (The old keys are found by SCAN just before MULTI: only this controller writes `rc-`
keys, so nothing adds one in between.) The placeholder (PLACEHOLDER_KEY, a harmless unused
middleware, valid configuration) is written with every change and never deleted: Traefik keeps
serving the last routes when every key under its root disappears (traefik #8092, #11864).

File layout: one YAML file per instance, the whole dynamic configuration of the controller's
routes, starting with FILE_HEADER. It is replaced atomically (a temporary file in the same
directory, then os.replace) and read back to observe. A file that exists without the header is
not ours: observe sees nothing, apply refuses (OwnershipError).

Observed attributes have the desired route's shape (instance, feed, protocol, rule, entrypoints,
tls, server), except `when_unready`, which is the controller's policy and not written anywhere:
planning must not compare it.

What Traefik serves: `served()` reads `/api/http/routers` and `/api/tcp/routers` and reports,
per route the controller wrote, whether Traefik serves it (`rc-<name>@redis` / `@file` listed
with status enabled or warning), its status, and its error texts. The caller turns a route that
is written but not served, or served with errors, into plan diagnostics.

Errors (reconciler.model.errors), as `classify` hands them out:

    ProviderError
    ├── TemporaryError      Redis connection refused, reset or timed out, Traefik's API
    │                       unreachable or answering 5xx: retried, `RetryPolicy.attempts` tries
    │                       in all, sleeping on the injected `sleep`
    └── PermanentError      other Redis errors (wrong type, auth, read-only replica), a file we
        │                   may not read or write (permissions, read-only file system), an API
        │                   answer that is not Traefik's, a change for another instance
        └── OwnershipError  raised by the provider itself: the file lacks our header
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import anyio
import httpx
import yaml
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from reconciler.model.errors import (
    ConfigurationError,
    OwnershipError,
    PermanentError,
    ProviderError,
    TemporaryError,
)
from reconciler.model.observed import ObservedResource, RouteServing
from reconciler.model.plans import Action, Change
from reconciler.model.resources import Kind
from reconciler.model.units import check_identifier, check_key_path, check_label
from reconciler.providers import Observation
from reconciler.providers.backoff import backoff

Sleep = Callable[[float], Awaitable[None]]
T = TypeVar("T")

ROUTER_PREFIX = "rc-"
PLACEHOLDER = "rc-placeholder"
# A valid, unused middleware: Traefik decodes every key under the root, so an unknown key would
# break the whole configuration; an unreferenced middleware changes nothing.
PLACEHOLDER_KEY = f"http/middlewares/{PLACEHOLDER}/headers/customrequestheaders/X-Reconciler"
PLACEHOLDER_VALUE = "keep"
FILE_HEADER = "# Managed by reconciler: routes of Traefik instance {instance}. Edits are lost.\n"
FILE_MARK = "# Managed by reconciler"
PROTOCOLS = ("http", "tcp")
TLS_KEYS = ("certresolver", "passthrough")
# What Traefik's API reports for a router it serves; "disabled" means it is not served.
SERVED_STATUSES = frozenset({"enabled", "warning"})


@dataclass(frozen=True)
class RedisFeedClient:
    """The Redis provider of one instance: a client and the instance's own root key."""

    redis: Redis
    root_key: str


@dataclass(frozen=True)
class FileFeedPath:
    """The file provider of one instance: the dynamic-configuration file Traefik watches."""

    path: Path


Feed = RedisFeedClient | FileFeedPath


@dataclass
class RetryPolicy:
    attempts: int = 5  # tries of one operation that meets temporary errors
    initial: float = 0.2  # backoff: a random delay up to initial * 2**n, capped at maximum
    maximum: float = 5.0


@dataclass(frozen=True)
class Served:
    """What Traefik does with one route the controller wrote."""

    address: str
    router: str  # as Traefik names it: rc-<name>@redis
    served: bool
    status: str | None  # enabled | warning | disabled; None when Traefik does not list it
    errors: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "router": self.router,
            "served": self.served,
            "status": self.status,
            "errors": list(self.errors),
        }


class BadAnswer(Exception):
    """Traefik's API answered 2xx with something that is not its contract."""


# --- errors ------------------------------------------------------------------------------------


def classify(exc: BaseException, context: str = "") -> ProviderError:
    """Turn a Redis, file-system or httpx exception into ours."""
    if isinstance(exc, ProviderError):
        return exc
    prefix = f"{context}: " if context else ""
    if isinstance(exc, (RedisConnectionError, RedisTimeoutError)):
        return TemporaryError(f"{prefix}cannot reach Redis ({_short(exc)})")
    if isinstance(exc, RedisError):
        return PermanentError(f"{prefix}Redis refused: {_short(exc)}")
    if isinstance(exc, httpx.HTTPStatusError):
        status = exc.response.status_code
        message = f"{prefix}Traefik's API answered {status}"
        if status >= 500 or status in (408, 429):
            return TemporaryError(message, status=status)
        return PermanentError(message, status=status)
    if isinstance(exc, httpx.TimeoutException):
        return TemporaryError(f"{prefix}Traefik's API did not answer in time")
    if isinstance(exc, httpx.TransportError):
        return TemporaryError(f"{prefix}cannot reach Traefik's API ({_short(exc)})")
    if isinstance(exc, PermissionError):
        return PermanentError(f"{prefix}permission denied: {exc.filename or exc}")
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return TemporaryError(f"{prefix}{_short(exc)}")
    if isinstance(exc, OSError):
        return PermanentError(f"{prefix}{exc.strerror or type(exc).__name__}: {exc.filename}")
    if isinstance(exc, (BadAnswer, yaml.YAMLError)):
        return PermanentError(f"{prefix}{_short(exc)}")
    return PermanentError(f"{prefix}{type(exc).__name__}: {_short(exc)}")


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]


# --- routes as Traefik configuration -----------------------------------------------------------


def router_name(route: str) -> str:
    return f"{ROUTER_PREFIX}{route}"


def _checked(check: Callable[[str], str], value: object, what: str) -> str:
    try:
        return check(str(value))
    except ValueError as exc:
        raise PermanentError(f"{what}: {exc}") from None


def route_config(name: str, attrs: Mapping[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """A route's attributes -> (protocol, router, service), in Traefik's dynamic-config shape.
    Refuses (PermanentError) a name, entrypoint, TLS key or resolver that is not a plain name:
    each becomes part of a Redis key or a YAML key."""
    _checked(check_label, name, "route name")
    protocol = str(attrs.get("protocol") or "http")
    if protocol not in PROTOCOLS:
        raise PermanentError(f"route {name!r}: unknown protocol {protocol!r}")
    router: dict[str, Any] = {
        "rule": str(attrs["rule"]),
        "entryPoints": [
            _checked(check_identifier, e, f"route {name!r}: entrypoint")
            for e in attrs.get("entrypoints") or ()
        ],
        "service": router_name(name),
    }
    tls = attrs.get("tls")
    if tls is not None:
        router["tls"] = {k: v for k, v in dict(tls).items() if v not in (None, False)}
        unknown = sorted(repr(k) for k in router["tls"] if k not in TLS_KEYS)
        if unknown:
            raise PermanentError(f"route {name!r}: unknown tls option(s) {', '.join(unknown)}")
        if "certresolver" in router["tls"]:
            router["tls"]["certresolver"] = _checked(
                check_identifier, router["tls"]["certresolver"], f"route {name!r}: certresolver"
            )
    server_key = "url" if protocol == "http" else "address"
    service = {"loadBalancer": {"servers": [{server_key: str(attrs["server"])}]}}
    return protocol, router, service


def route_attributes(
    instance: str, feed: str, protocol: str, router: Mapping[str, Any], service: Mapping[str, Any]
) -> dict[str, Any]:
    """The inverse of route_config: Traefik's shape -> the desired route's attribute shape."""
    tls = router.get("tls")
    servers = (service.get("loadBalancer") or {}).get("servers") or [{}]
    server = servers[0].get("url" if protocol == "http" else "address")
    return {
        "instance": instance,
        "feed": feed,
        "protocol": protocol,
        "rule": router.get("rule"),
        "entrypoints": list(router.get("entryPoints") or ()),
        "tls": dict(tls) if isinstance(tls, Mapping) else ({} if tls else None),
        "server": server,
    }


def _kv_pairs(
    protocol: str, name: str, router: Mapping[str, Any], service: Mapping[str, Any]
) -> dict[str, str]:
    """Relative Redis keys (under the root) of one route."""
    base = f"{protocol}/routers/{name}"
    out = {f"{base}/rule": router["rule"], f"{base}/service": router["service"]}
    for i, entrypoint in enumerate(router["entryPoints"]):
        out[f"{base}/entrypoints/{i}"] = entrypoint
    tls = router.get("tls")
    if tls is not None:
        if not tls:
            out[f"{base}/tls"] = "true"
        for key, value in sorted(tls.items()):
            out[f"{base}/tls/{key.lower()}"] = "true" if value is True else str(value)
    server = service["loadBalancer"]["servers"][0]
    for key, value in server.items():
        out[f"{protocol}/services/{name}/loadbalancer/servers/0/{key}"] = value
    return out


def _kv_routes(
    pairs: Mapping[str, str],
) -> dict[tuple[str, str], tuple[dict[str, Any], dict[str, Any]]]:
    """Relative keys -> {(protocol, router name): (router, service)} for our routers only."""
    routers: dict[tuple[str, str], dict[str, Any]] = {}
    services: dict[tuple[str, str], dict[str, Any]] = {}
    for key, value in pairs.items():
        parts = key.split("/")
        if len(parts) < 4 or parts[0] not in PROTOCOLS or not parts[2].startswith(ROUTER_PREFIX):
            continue
        protocol, section, name, rest = parts[0], parts[1], parts[2], [p.lower() for p in parts[3:]]
        if section == "routers":
            router = routers.setdefault((protocol, name), {})
            if rest == ["rule"]:
                router["rule"] = value
            elif rest == ["service"]:
                router["service"] = value
            elif rest[0] == "entrypoints" and len(rest) == 2 and rest[1].isdigit():
                router.setdefault("_entrypoints", {})[int(rest[1])] = value
            elif rest == ["tls"]:
                router.setdefault("tls", {})
            elif rest[0] == "tls" and len(rest) == 2:
                tls = router.setdefault("tls", {})
                tls["certresolver" if rest[1] == "certresolver" else rest[1]] = (
                    value == "true" if rest[1] == "passthrough" else value
                )
        elif (
            section == "services"
            and rest[:3] == ["loadbalancer", "servers", "0"]
            and len(rest) == 4
        ):
            server_key = "url" if rest[3] == "url" else "address"
            services[(protocol, name)] = {"loadBalancer": {"servers": [{server_key: value}]}}
    out: dict[tuple[str, str], tuple[dict[str, Any], dict[str, Any]]] = {}
    for (protocol, name), router in routers.items():
        entrypoints = router.pop("_entrypoints", {})
        router["entryPoints"] = [entrypoints[i] for i in sorted(entrypoints)]
        service_name = router.get("service", name)
        out[(protocol, name)] = (router, services.get((protocol, service_name), {}))
    return out


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def list_api(client: httpx.AsyncClient, path: str) -> list[dict[str, Any]]:
    """Every entry of one of Traefik's API lists (`/api/http/routers`, ...), page by page
    (`X-Next-Page`)."""
    entries: list[dict[str, Any]] = []
    page = 1
    while True:
        response = await client.get(path, params={"per_page": 500, "page": page})
        response.raise_for_status()
        try:
            body = response.json()
        except ValueError:
            raise BadAnswer(f"{path} answered something not JSON") from None
        if not isinstance(body, list):
            raise BadAnswer(f"{path} answered without a list")
        entries += [e for e in body if isinstance(e, dict)]
        following = response.headers.get("X-Next-Page", "1")
        if not following.isdigit() or int(following) <= page:
            return entries
        page = int(following)


# --- the provider ------------------------------------------------------------------------------


class TraefikProvider:
    """The controller's routes on one Traefik instance."""

    kinds = frozenset({Kind.ROUTE})

    def __init__(
        self,
        instance: str,
        feed: Feed,
        *,
        api_url: str | None = None,
        timeout: float = 5.0,
        retry: RetryPolicy | None = None,
        sleep: Sleep = anyio.sleep,
    ) -> None:
        # The instance is in every address and in the file's header line; the root key is the
        # prefix of every key written.
        try:
            check_label(instance)
            if isinstance(feed, RedisFeedClient):
                check_key_path(feed.root_key)
        except ValueError as exc:
            raise ConfigurationError(f"Traefik instance {instance!r}: {exc}") from None
        self.instance = instance
        self.feed = feed
        self.api_url = api_url.rstrip("/") if api_url else None
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.sleep = sleep
        self.retries = 0  # operations repeated after a temporary error
        self._lock = anyio.Lock()  # the file is read-modify-write: one change at a time

    def __repr__(self) -> str:
        where = (
            f"redis root {self.feed.root_key!r}"
            if isinstance(self.feed, RedisFeedClient)
            else f"file {str(self.feed.path)!r}"
        )
        return f"TraefikProvider({self.instance!r}, {where}, api_url={self.api_url!r})"

    @property
    def feed_type(self) -> str:
        return "redis" if isinstance(self.feed, RedisFeedClient) else "file"

    @property
    def provider_suffix(self) -> str:
        """How Traefik names the provider our routers come from: rc-x@redis."""
        return self.feed_type

    def address(self, route: str) -> str:
        return f"{Kind.ROUTE.value}/{self.instance}/{route}"

    # --- retries -----------------------------------------------------------------------

    async def _retrying(self, operation: Callable[[], Awaitable[T]], what: str) -> T:
        tries = 0
        while True:
            try:
                return await operation()
            except Exception as exc:
                error = classify(exc, what)
                if not isinstance(error, TemporaryError):
                    raise error from None
                tries += 1
                if tries >= self.retry.attempts:
                    raise error from None
                self.retries += 1
                await self.sleep(self._backoff(tries))

    def _backoff(self, attempt: int) -> float:
        return backoff(attempt, initial=self.retry.initial, maximum=self.retry.maximum)

    # --- observe -----------------------------------------------------------------------

    async def observe(self) -> list[ObservedResource]:
        routes = await self._read_routes()
        out: list[ObservedResource] = []
        for (protocol, router_key), (router, service) in sorted(routes.items()):
            name = router_key.removeprefix(ROUTER_PREFIX)
            attrs = route_attributes(self.instance, self.feed_type, protocol, router, service)
            out.append(
                ObservedResource(
                    address=self.address(name),
                    kind=Kind.ROUTE,
                    owned=True,
                    id={"instance": self.instance, "router": router_key, "protocol": protocol},
                    attributes=attrs,
                )
            )
        return out

    async def _read_routes(
        self,
    ) -> dict[tuple[str, str], tuple[dict[str, Any], dict[str, Any]]]:
        if isinstance(self.feed, RedisFeedClient):
            feed = self.feed
            pairs = await self._retrying(
                lambda: self._read_kv(feed), f"read routes of Traefik {self.instance!r}"
            )
            return _kv_routes(pairs)
        config = await self._retrying(self._read_file, f"read {self.feed.path}")
        if config is None:
            return {}
        out: dict[tuple[str, str], tuple[dict[str, Any], dict[str, Any]]] = {}
        for protocol in PROTOCOLS:
            section = config.get(protocol) or {}
            services = section.get("services") or {}
            for name, router in (section.get("routers") or {}).items():
                if str(name).startswith(ROUTER_PREFIX) and isinstance(router, dict):
                    service = services.get(router.get("service"), {})
                    out[(protocol, str(name))] = (router, service)
        return out

    @staticmethod
    async def _read_kv(feed: RedisFeedClient) -> dict[str, str]:
        root = feed.root_key.rstrip("/") + "/"
        keys: list[str] = []
        for protocol in PROTOCOLS:
            for section in ("routers", "services"):
                pattern = f"{_glob_escape(root)}{protocol}/{section}/{ROUTER_PREFIX}*"
                keys += [_text(k) async for k in feed.redis.scan_iter(match=pattern, count=500)]
        keys = sorted(set(keys))
        pairs: dict[str, str] = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            values = await feed.redis.mget(chunk)
            for key, value in zip(chunk, values, strict=True):
                if value is not None:
                    pairs[key.removeprefix(root)] = _text(value)
        return pairs

    async def _read_file(self) -> dict[str, Any] | None:
        """The file's configuration; None when it does not exist or is not ours."""
        assert isinstance(self.feed, FileFeedPath)
        try:
            text = await anyio.Path(self.feed.path).read_text()
        except FileNotFoundError:
            return None
        if not text.startswith(FILE_MARK):
            return None
        loaded = yaml.safe_load(text)
        if loaded is None:
            return {}
        if not isinstance(loaded, dict):
            raise BadAnswer(f"{self.feed.path} does not hold a Traefik dynamic configuration")
        return loaded

    # --- what Traefik serves -----------------------------------------------------------

    async def served(self, observed: list[ObservedResource] | None = None) -> dict[str, Served]:
        """Per route the controller wrote (`observed`, else observed now): does Traefik serve it?"""
        if self.api_url is None:
            raise PermanentError(
                f"Traefik {self.instance!r}: no api_url, cannot see what it serves"
            )
        if observed is None:
            observed = await self.observe()
        listed: dict[str, dict[str, Any]] = {}
        async with httpx.AsyncClient(
            base_url=self.api_url, timeout=httpx.Timeout(self.timeout), trust_env=False
        ) as client:
            for protocol in PROTOCOLS:
                for entry in await self._retrying(
                    functools.partial(self._list_routers, client, protocol),
                    f"list {protocol} routers of Traefik {self.instance!r}",
                ):
                    listed[f"{protocol}:{entry.get('name')}"] = entry
        out: dict[str, Served] = {}
        for resource in observed:
            if resource.address is None or not resource.owned:
                continue
            router = f"{resource.id['router']}@{self.provider_suffix}"
            found = listed.get(f"{resource.id['protocol']}:{router}")
            if found is None:
                out[resource.address] = Served(
                    resource.address, router, False, None, ("Traefik does not list this router",)
                )
                continue
            status = str(found.get("status") or "")
            errors = found.get("error") or ()
            if isinstance(errors, str):
                errors = (errors,)
            out[resource.address] = Served(
                resource.address,
                router,
                status in SERVED_STATUSES,
                status or None,
                tuple(str(e) for e in errors),
            )
        return out

    @staticmethod
    async def _list_routers(client: httpx.AsyncClient, protocol: str) -> list[dict[str, Any]]:
        return await list_api(client, f"/api/{protocol}/routers")

    # --- apply -------------------------------------------------------------------------

    def _route_name(self, change: Change) -> str:
        prefix = f"{Kind.ROUTE.value}/{self.instance}/"
        if not change.address.startswith(prefix):
            raise PermanentError(
                f"{change.address}: not a route of Traefik instance {self.instance!r}"
            )
        name = change.address.removeprefix(prefix)
        if not name or "/" in name or "@" in name:
            raise PermanentError(f"{change.address}: {name!r} cannot name a Traefik router")
        return name

    async def apply(self, change: Change) -> None:
        if change.kind is not Kind.ROUTE:
            raise PermanentError(f"{change.address}: no provider for kind {change.kind.value}")
        if change.action is Action.NOOP:
            return
        name = self._route_name(change)
        want: tuple[str, dict[str, Any], dict[str, Any]] | None = None
        if change.action is not Action.DELETE:
            if change.after is None:
                raise PermanentError(f"{change.address}: {change.action.value} without `after`")
            want = route_config(name, change.after)
        what = f"{change.action.value} {change.address}"
        if isinstance(self.feed, RedisFeedClient):
            feed = self.feed
            await self._retrying(lambda: self._write_kv(feed, name, want), what)
        else:
            async with self._lock:
                await self._retrying(lambda: self._write_file(name, want), what)

    @staticmethod
    async def _write_kv(
        feed: RedisFeedClient, name: str, want: tuple[str, dict[str, Any], dict[str, Any]] | None
    ) -> None:
        root = feed.root_key.rstrip("/") + "/"
        router = router_name(name)
        old: list[str] = []
        for protocol in PROTOCOLS:
            for section in ("routers", "services"):
                pattern = f"{_glob_escape(root)}{protocol}/{section}/{_glob_escape(router)}/*"
                old += [_text(k) async for k in feed.redis.scan_iter(match=pattern, count=500)]
        new: dict[str, str] = {}
        if want is not None:
            protocol, config, service = want
            new = {root + k: v for k, v in _kv_pairs(protocol, router, config, service).items()}
        # One transaction: Traefik reads the tree after EXEC, never a half-written route.
        async with feed.redis.pipeline(transaction=True) as pipe:
            stale = sorted(set(old) - set(new))
            if stale:
                pipe.delete(*stale)
            pipe.set(root + PLACEHOLDER_KEY, PLACEHOLDER_VALUE)
            if new:
                pipe.mset(new)
            await pipe.execute()

    async def _write_file(
        self, name: str, want: tuple[str, dict[str, Any], dict[str, Any]] | None
    ) -> None:
        assert isinstance(self.feed, FileFeedPath)
        path = self.feed.path
        if path.exists():
            head = path.read_text()[: len(FILE_MARK)]
            if head != FILE_MARK:
                raise OwnershipError(
                    f"{path} exists without the controller's header; it will not be touched"
                )
        config = await self._read_file() or {}
        router = router_name(name)
        for protocol in PROTOCOLS:
            section = config.get(protocol) or {}
            for part in ("routers", "services"):
                (section.get(part) or {}).pop(router, None)
        if want is not None:
            protocol, router_config, service = want
            section = config.setdefault(protocol, {})
            section.setdefault("routers", {})[router] = router_config
            section.setdefault("services", {})[router] = service
        config = _without_empty(config)
        text = FILE_HEADER.format(instance=self.instance)
        if config:
            text += yaml.safe_dump(config, sort_keys=True, default_flow_style=False)
        _replace_file(path, text)


def _without_empty(config: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for protocol, section in config.items():
        if not isinstance(section, dict):
            out[protocol] = section
            continue
        kept = {k: v for k, v in section.items() if v}
        if kept:
            out[protocol] = kept
    return out


def _replace_file(path: Path, text: str) -> None:
    """Write a temporary file beside `path`, then rename it over: a watcher sees the old file or
    the new one, never a partial write. The suffix keeps Traefik's directory provider off it."""
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp, 0o644)  # Traefik may run as another user; mkstemp makes 0600
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


# --- every instance of a platform ----------------------------------------------------------------


class TraefikRoutes:
    """The platform's routes on all its Traefik instances: one provider per instance, chosen by
    the instance in a route's address (`route/<instance>/<name>`).

    `unavailable` names instances that cannot be reached as configured (a Redis feed with no
    Redis given): observing then fails for the whole kind, with that reason, rather than
    planning their routes as missing."""

    kinds = frozenset({Kind.ROUTE})
    needs = frozenset[Kind]()
    streams = frozenset[Kind]()
    optional = True  # an instance down costs the routes only: the guests converge

    def __init__(
        self,
        instances: Mapping[str, TraefikProvider],
        unavailable: Mapping[str, str] | None = None,
    ) -> None:
        self.instances = dict(instances)
        self.unavailable = dict(unavailable or {})

    def __repr__(self) -> str:
        return f"TraefikRoutes({sorted(self.instances)}, unavailable={sorted(self.unavailable)})"

    @property
    def retries(self) -> int:
        return sum(p.retries for p in self.instances.values())

    async def observe(self, seen: Observation | None = None) -> list[ObservedResource]:
        """Every instance's routes; with `seen`, also what each route serves (`seen.serving`)."""
        if self.unavailable:
            raise PermanentError(
                "; ".join(f"Traefik {i!r}: {why}" for i, why in sorted(self.unavailable.items()))
            )
        out: list[ObservedResource] = []
        for _, provider in sorted(self.instances.items()):
            out += await provider.observe()
        if seen is not None:
            for address, served in (await self.served(out)).items():
                if isinstance(served, ProviderError):
                    seen.serving[address] = RouteServing(served=None, errors=(str(served),))
                else:
                    seen.serving[address] = RouteServing(
                        served=served.served, status=served.status, errors=served.errors
                    )
        return out

    async def served(self, observed: list[ObservedResource]) -> dict[str, Served | ProviderError]:
        """Per route written (by address), what its instance serves; an instance whose API
        failed gives its error under `route/<instance>`. Instances without an API are skipped."""
        out: dict[str, Served | ProviderError] = {}
        for instance, provider in sorted(self.instances.items()):
            if provider.api_url is None:
                continue
            mine = [r for r in observed if r.id.get("instance") == instance]
            try:
                out.update(await provider.served(mine))
            except ProviderError as exc:
                out[f"{Kind.ROUTE.value}/{instance}"] = exc
        return out

    async def apply(self, change: Change) -> None:
        instance = change.address.removeprefix(f"{Kind.ROUTE.value}/").partition("/")[0]
        provider = self.instances.get(instance)
        if provider is None:
            why = self.unavailable.get(instance, "no such Traefik instance")
            raise PermanentError(f"{change.address}: {why}")
        await provider.apply(change)
