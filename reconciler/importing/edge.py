"""Read what the edge holds, for `reconciler import`: Velocity's registrations and what each
Traefik instance serves. The CLI builds the sources (`edge_sources`, from the `--dir` spec and
the `--velocity-*` / `--traefik-*` flags), `read_edge` reads them, and `edge_writer` turns the
result into the `velocity:` and `traefik:` sections of `edge.yaml`.

It reads only. Velocity: one `GET /zpack/list` through `VelocityProvider.observe`. Traefik:
`/api/{http,tcp}/routers` and `/api/{http,tcp}/services` (every page), the services giving each
router's load-balancer servers. A part that cannot be read (unreachable, a secret not set) is
a note, and nothing is written for it: the guests are imported all the same.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx

from reconciler.loading.graph import guest_ip
from reconciler.model.errors import ConfigurationError, ProviderError, TemporaryError
from reconciler.model.spec import PlatformSpec, SecretRef
from reconciler.model.units import check_label
from reconciler.providers.backoff import backoff
from reconciler.providers.secrets import read_secret
from reconciler.providers.traefik import classify, list_api
from reconciler.providers.velocity import VelocityProvider

Sleep = Callable[[float], Awaitable[None]]
PROTOCOLS = ("http", "tcp")


@dataclass(frozen=True)
class VelocitySource:
    """Where the bridge is and what the spec will say about it."""

    url: str
    secret: SecretRef  # written as this reference; only read to talk to the bridge
    port: int  # the bridge port the spec writes
    guest: str | None = None  # the --dir spec's velocity guest
    guest_ip: str | None = None  # its static IP there
    servers: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # the spec's servers


@dataclass(frozen=True)
class TraefikSource:
    """One Traefik instance to read, and what the `--dir` spec says of it (if anything)."""

    instance: str
    api_url: str  # where it is read
    written_api_url: str  # what the spec writes as api_url
    guest: str | None = None
    guest_ip: str | None = None
    feed: Mapping[str, Any] | None = None
    routes_to: tuple[str, ...] = ()
    when_unready: str | None = None
    routes: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # the spec's routes


@dataclass(frozen=True)
class EdgeSources:
    velocity: VelocitySource | None = None
    traefik: tuple[TraefikSource, ...] = ()
    notes: tuple[str, ...] = ()  # configured parts that cannot be read, and why


@dataclass(frozen=True)
class Router:
    """One router as Traefik's API lists it, with its service's servers."""

    name: str  # as Traefik names it: portal@file
    protocol: str
    rule: str
    entrypoints: tuple[str, ...]
    tls: Mapping[str, Any] | None
    middlewares: tuple[str, ...]
    servers: tuple[str, ...]  # http: urls; tcp: host:port addresses
    status: str
    service: str

    @property
    def provider(self) -> str:
        return self.name.rpartition("@")[2] if "@" in self.name else ""

    @property
    def bare_name(self) -> str:
        return self.name.rpartition("@")[0] if "@" in self.name else self.name


@dataclass(frozen=True)
class VelocityRead:
    source: VelocitySource
    registrations: tuple[Mapping[str, Any], ...]  # {server_name, address, port}


@dataclass(frozen=True)
class TraefikRead:
    source: TraefikSource
    routers: tuple[Router, ...]


@dataclass(frozen=True)
class EdgeEstate:
    velocity: VelocityRead | None = None
    traefik: tuple[TraefikRead, ...] = ()
    notes: tuple[str, ...] = ()


def host_of(url: str) -> str | None:
    try:
        return urlsplit(url if "://" in url else f"//{url}").hostname
    except ValueError:
        return None


def edge_sources(
    spec: PlatformSpec | None,
    *,
    velocity_url: str | None = None,
    velocity_secret_env: str | None = None,
    traefik_apis: Mapping[str, str] | None = None,
    traefik_guests: Mapping[str, str] | None = None,
) -> EdgeSources:
    """What to read: the `--dir` spec's velocity and Traefik instances (with `api_url`), and
    the ones the flags add. Raises ConfigurationError for flags that cannot work together, and
    for an instance the flags name with no DNS label (the spec would refuse its key)."""
    notes: list[str] = []
    velocity = _velocity_source(spec, velocity_url, velocity_secret_env, notes)
    traefik = _traefik_sources(spec, dict(traefik_apis or {}), dict(traefik_guests or {}), notes)
    return EdgeSources(velocity, traefik, tuple(notes))


def _velocity_source(
    spec: PlatformSpec | None,
    velocity_url: str | None,
    velocity_secret_env: str | None,
    notes: list[str],
) -> VelocitySource | None:
    """The spec's bridge (the flags may say where it is and which secret to read), else the
    one the flags name; None, with a note, for a spec's bridge with no address."""
    if spec is not None and spec.velocity is not None:
        v = spec.velocity
        vguest = spec.guests.get(v.guest)
        ip = guest_ip(vguest) if vguest is not None else None
        url = velocity_url or (f"http://{ip}:{v.bridge.port}" if ip else None)
        secret = SecretRef(env=velocity_secret_env) if velocity_secret_env else v.bridge.secret
        if url is None:
            notes.append(
                f"velocity: guest {v.guest!r} has no static IP in {spec.platform.name}'s spec, "
                "so the bridge cannot be found; pass --velocity-url"
            )
            return None
        return VelocitySource(
            url,
            secret,
            v.bridge.port,
            guest=v.guest,
            guest_ip=ip,
            servers={n: s.model_dump(mode="json") for n, s in v.servers.items()},
        )
    if velocity_url:
        if not velocity_secret_env:
            raise ConfigurationError("--velocity-url needs --velocity-secret-env VAR")
        return VelocitySource(
            velocity_url, SecretRef(env=velocity_secret_env), urlsplit(velocity_url).port or 8081
        )
    if velocity_secret_env:
        raise ConfigurationError("--velocity-secret-env needs --velocity-url (or a spec velocity)")
    return None


def _traefik_sources(
    spec: PlatformSpec | None,
    apis: Mapping[str, str],
    guests: Mapping[str, str],
    notes: list[str],
) -> tuple[TraefikSource, ...]:
    """The spec's instances (read where the flags or their `api_url` say; one with neither is
    a note), then those only the flags name."""
    traefik: list[TraefikSource] = []
    known = dict(spec.traefik) if spec is not None else {}
    for name, inst in sorted(known.items()):
        api = apis.get(name, inst.api_url)
        if api is None:
            notes.append(
                f"traefik {name}: no api_url (nor --traefik-api {name}=URL); "
                "what it serves is not read, and the instance is not written"
            )
            continue
        assert spec is not None
        tguest = spec.guests.get(inst.guest)
        traefik.append(
            TraefikSource(
                name,
                api,
                inst.api_url or api,
                guest=guests.get(name, inst.guest),
                guest_ip=guest_ip(tguest) if tguest is not None else None,
                feed=inst.feed.model_dump(mode="json", exclude_none=True),
                routes_to=inst.routes_to,
                when_unready=inst.when_unready if inst.when_unready != "keep" else None,
                routes={
                    r: route.model_dump(mode="json", exclude_defaults=True) | {"type": route.type}
                    for r, route in inst.routes.items()
                },
            )
        )
    for name, api in sorted(apis.items()):
        if name not in known:
            try:
                check_label(name)  # the instance's key in the spec written
            except ValueError as exc:
                raise ConfigurationError(f"--traefik-api INSTANCE=URL: instance {exc}") from None
            traefik.append(TraefikSource(name, api, api, guest=guests.get(name)))
    stray = sorted(set(guests) - set(apis) - set(known))
    if stray:
        raise ConfigurationError(
            "--traefik-guest " + ", ".join(stray) + ": give the instance's API too "
            "(--traefik-api INSTANCE=URL)"
        )
    return tuple(traefik)


async def read_edge(
    sources: EdgeSources, *, timeout: float = 5.0, sleep: Sleep = anyio.sleep
) -> EdgeEstate:
    """Read every source; one that cannot be read becomes a note."""
    notes = list(sources.notes)
    velocity: VelocityRead | None = None
    if sources.velocity is not None:
        vsrc = sources.velocity
        try:
            secret = read_secret(vsrc.secret)
            provider = VelocityProvider(vsrc.url, secret, timeout=timeout, sleep=sleep)
            observed = await provider.observe()
            velocity = VelocityRead(
                vsrc,
                tuple(
                    {k: r.attributes[k] for k in ("server_name", "address", "port")}
                    for r in observed
                ),
            )
        except (ConfigurationError, ProviderError) as exc:
            notes.append(f"velocity: not read, so not written: {exc}")
    traefik: list[TraefikRead] = []
    for src in sources.traefik:
        try:
            routers = await read_routers(src.api_url, timeout=timeout, sleep=sleep)
        except ProviderError as exc:
            notes.append(f"traefik {src.instance}: not read, so not written: {exc}")
            continue
        traefik.append(TraefikRead(src, routers))
    return EdgeEstate(velocity, tuple(traefik), tuple(notes))


async def read_routers(
    api_url: str, *, timeout: float = 5.0, sleep: Sleep = anyio.sleep, attempts: int = 3
) -> tuple[Router, ...]:
    """Every http and tcp router Traefik lists, with its service's servers, sorted by name."""
    async with httpx.AsyncClient(
        base_url=api_url.rstrip("/"), timeout=httpx.Timeout(timeout), trust_env=False
    ) as client:

        async def listing(path: str) -> list[dict[str, Any]]:
            tries = 0
            while True:
                try:
                    return await list_api(client, path)
                except Exception as exc:
                    error = classify(exc, f"Traefik {api_url} {path}")
                    tries += 1
                    if not isinstance(error, TemporaryError) or tries >= attempts:
                        raise error from None
                    await sleep(backoff(tries, initial=0.2, maximum=2.0))

        out: list[Router] = []
        for protocol in PROTOCOLS:
            services = {str(s.get("name")): s for s in await listing(f"/api/{protocol}/services")}
            for r in await listing(f"/api/{protocol}/routers"):
                name = str(r.get("name") or "")
                provider = str(r.get("provider") or name.rpartition("@")[2])
                service = str(r.get("service") or "")
                if service and "@" not in service:
                    service = f"{service}@{provider}"
                lb = (services.get(service) or {}).get("loadBalancer") or {}
                key = "url" if protocol == "http" else "address"
                tls = r.get("tls")
                out.append(
                    Router(
                        name=name,
                        protocol=protocol,
                        rule=str(r.get("rule") or ""),
                        entrypoints=tuple(str(e) for e in r.get("entryPoints") or ()),
                        tls=dict(tls) if isinstance(tls, Mapping) else None,
                        middlewares=tuple(str(m) for m in r.get("middlewares") or ()),
                        servers=tuple(
                            str(s.get(key)) for s in lb.get("servers") or () if s.get(key)
                        ),
                        status=str(r.get("status") or ""),
                        service=service,
                    )
                )
    return tuple(sorted(out, key=lambda x: (x.protocol, x.name)))


def resolve_guest(
    name: str | None,
    ip: str | None,
    url: str | None,
    by_ip: Mapping[str, str],
    names: Sequence[str],
) -> str | None:
    """The imported guest a proxy runs in: the spec's name if imported, else the imported guest
    holding the spec guest's IP, else the one holding the URL's host."""
    if name is not None and name in names:
        return name
    for candidate in (ip, host_of(url) if url else None):
        if candidate and candidate in by_ip:
            return by_ip[candidate]
    return None
