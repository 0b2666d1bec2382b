"""The Traefik provider's feeds without Traefik: the Redis layout and ownership (a real
redis-server), the owned file, and errors through `classify` with retries on an injected sleep."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pytest
import yaml
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from reconciler.model.errors import OwnershipError, PermanentError, TemporaryError
from reconciler.model.plans import Action, Change
from reconciler.model.resources import Kind
from reconciler.providers.traefik import (
    FILE_HEADER,
    PLACEHOLDER_KEY,
    FileFeedPath,
    RedisFeedClient,
    RetryPolicy,
    TraefikProvider,
    classify,
)
from tests.redis_fixtures import free_port

T = TypeVar("T")
ROOT = "core"


def with_redis(port: int, step: Callable[[Redis], Awaitable[T]]) -> T:
    async def main() -> T:
        redis = Redis(host="127.0.0.1", port=port, decode_responses=True)
        try:
            await redis.flushdb()
            return await step(redis)
        finally:
            await redis.aclose()

    return anyio.run(main)


def route(name: str, action: Action, **attrs: Any) -> Change:
    after = None
    if action is not Action.DELETE:
        after = {
            "instance": "core",
            "feed": "redis",
            "protocol": "http",
            "rule": f"Host(`{name}.example`)",
            "entrypoints": ["web", "websecure"],
            "tls": {"certresolver": "le"},
            "server": "http://10.0.0.5:8080",
            "when_unready": "keep",
            **attrs,
        }
    return Change(address=f"route/core/{name}", kind=Kind.ROUTE, action=action, wave=0, after=after)


async def keys(redis: Redis) -> dict[str, str]:
    found = sorted([k async for k in redis.scan_iter(match="*")])
    values = await redis.mget(found) if found else []
    return {k: str(v) for k, v in zip(found, values, strict=True)}


def test_redis_layout_of_an_http_route(redis_port: int) -> None:
    async def step(redis: Redis) -> dict[str, str]:
        await TraefikProvider("core", RedisFeedClient(redis, ROOT)).apply(
            route("portal", Action.CREATE)
        )
        return await keys(redis)

    assert with_redis(redis_port, step) == {
        f"{ROOT}/{PLACEHOLDER_KEY}": "keep",
        "core/http/routers/rc-portal/rule": "Host(`portal.example`)",
        "core/http/routers/rc-portal/entrypoints/0": "web",
        "core/http/routers/rc-portal/entrypoints/1": "websecure",
        "core/http/routers/rc-portal/service": "rc-portal",
        "core/http/routers/rc-portal/tls/certresolver": "le",
        "core/http/services/rc-portal/loadbalancer/servers/0/url": "http://10.0.0.5:8080",
    }


def test_an_update_leaves_no_stale_key_and_a_protocol_change_moves_the_route(
    redis_port: int,
) -> None:
    async def step(redis: Redis) -> tuple[dict[str, str], dict[str, str], list[Any]]:
        provider = TraefikProvider("core", RedisFeedClient(redis, ROOT))
        await provider.apply(route("ide", Action.CREATE))
        await provider.apply(route("ide", Action.UPDATE, entrypoints=["web"], tls=None))
        narrowed = await keys(redis)
        await provider.apply(
            route(
                "ide",
                Action.UPDATE,
                protocol="tcp",
                rule="HostSNI(`ide.example`)",
                tls={"passthrough": True},
                server="10.0.0.5:8443",
            )
        )
        return narrowed, await keys(redis), await provider.observe()

    narrowed, moved, observed = with_redis(redis_port, step)
    assert "core/http/routers/rc-ide/entrypoints/1" not in narrowed
    assert not any("/tls" in k for k in narrowed)
    assert not any(k.startswith("core/http/") and "rc-ide" in k for k in moved)
    assert moved["core/tcp/routers/rc-ide/tls/passthrough"] == "true"
    assert moved["core/tcp/services/rc-ide/loadbalancer/servers/0/address"] == "10.0.0.5:8443"
    assert [o.attributes for o in observed] == [
        {
            "instance": "core",
            "feed": "redis",
            "protocol": "tcp",
            "rule": "HostSNI(`ide.example`)",
            "entrypoints": ["web", "websecure"],
            "tls": {"passthrough": True},
            "server": "10.0.0.5:8443",
        }
    ]


def test_keys_the_controller_did_not_write_are_neither_observed_nor_touched(
    redis_port: int,
) -> None:
    foreign = {
        "core/http/routers/legacy/rule": "Host(`old.example`)",
        "core/http/routers/legacy/service": "legacy",
        "core/http/services/legacy/loadbalancer/servers/0/url": "http://10.0.0.9",
        "other-root/http/routers/rc-portal/rule": "Host(`elsewhere`)",
    }

    async def step(redis: Redis) -> tuple[list[Any], dict[str, str]]:
        await redis.mset(foreign)
        provider = TraefikProvider("core", RedisFeedClient(redis, ROOT))
        await provider.apply(route("portal", Action.CREATE))
        seen = await provider.observe()
        await provider.apply(route("portal", Action.DELETE))
        return seen, await keys(redis)

    seen, left = with_redis(redis_port, step)
    assert [o.address for o in seen] == ["route/core/portal"]
    assert left == {**foreign, f"{ROOT}/{PLACEHOLDER_KEY}": "keep"}


def test_a_change_for_another_instance_is_refused(redis_port: int) -> None:
    async def step(redis: Redis) -> None:
        provider = TraefikProvider("runtime", RedisFeedClient(redis, "runtime"))
        await provider.apply(route("portal", Action.CREATE))

    with pytest.raises(PermanentError, match="not a route of Traefik instance 'runtime'"):
        with_redis(redis_port, step)


def test_unreachable_redis_is_temporary_and_retried_on_the_injected_sleep() -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    async def main() -> None:
        # redis-py's own retries (with real sleeps) are off: the provider's policy retries.
        redis = Redis(
            host="127.0.0.1",
            port=free_port(),
            socket_connect_timeout=0.5,
            retry=Retry(NoBackoff(), 0),
        )
        try:
            provider = TraefikProvider(
                "core",
                RedisFeedClient(redis, ROOT),
                retry=RetryPolicy(attempts=3),
                sleep=sleep,
            )
            await provider.apply(route("portal", Action.CREATE))
        finally:
            await redis.aclose()

    with pytest.raises(TemporaryError, match="cannot reach Redis"):
        anyio.run(main)
    assert len(slept) == 2


# --- the file feed ------------------------------------------------------------------------------


def run_file(path: Path, *changes: Change) -> list[Any]:
    async def main() -> list[Any]:
        provider = TraefikProvider("core", FileFeedPath(path))
        for c in changes:
            await provider.apply(c)
        return await provider.observe()

    return anyio.run(main)


def test_the_file_holds_every_route_under_the_header(tmp_path: Path) -> None:
    path = tmp_path / "core.yaml"
    observed = run_file(
        path,
        route("a", Action.CREATE, feed="file"),
        route("b", Action.CREATE, feed="file", tls=None),
        route("a", Action.DELETE),
    )
    text = path.read_text()
    assert text.startswith(FILE_HEADER.format(instance="core"))
    config = yaml.safe_load(text)
    assert list(config["http"]["routers"]) == ["rc-b"]
    assert config["http"]["services"]["rc-b"] == {
        "loadBalancer": {"servers": [{"url": "http://10.0.0.5:8080"}]}
    }
    assert [o.address for o in observed] == ["route/core/b"]
    assert observed[0].attributes["tls"] is None
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
    run_file(path, route("b", Action.DELETE))
    assert path.read_text() == FILE_HEADER.format(instance="core")


def test_a_file_without_the_header_is_not_ours(tmp_path: Path) -> None:
    path = tmp_path / "core.yaml"
    hand_written = "http:\n  routers:\n    rc-a:\n      rule: Host(`a`)\n      service: x\n"
    path.write_text(hand_written)
    assert run_file(path) == []
    with pytest.raises(OwnershipError, match="without the controller's header"):
        run_file(path, route("a", Action.CREATE, feed="file"))
    assert path.read_text() == hand_written


def test_an_unwritable_file_is_a_permanent_error_and_not_retried(tmp_path: Path) -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    async def main() -> None:
        feed = FileFeedPath(tmp_path / "missing-dir" / "core.yaml")
        provider = TraefikProvider("core", feed, sleep=sleep)
        await provider.apply(route("a", Action.CREATE, feed="file"))

    with pytest.raises(PermanentError, match="No such file or directory"):
        anyio.run(main)
    assert slept == []


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (PermissionError(13, "Permission denied", "/etc/traefik/core.yaml"), PermanentError),
        (OSError(30, "Read-only file system", "/etc/traefik/core.yaml"), PermanentError),
        (ConnectionRefusedError(111, "Connection refused"), TemporaryError),
        (TimeoutError(), TemporaryError),
    ],
)
def test_classify(exc: BaseException, kind: type[Exception]) -> None:
    error = classify(exc, "apply route/core/a")
    assert type(error) is kind
    assert str(error).startswith("apply route/core/a: ")


def test_classify_permission_names_the_file() -> None:
    error = classify(PermissionError(13, "Permission denied", "/etc/traefik/core.yaml"))
    assert str(error) == "permission denied: /etc/traefik/core.yaml"
