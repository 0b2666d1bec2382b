"""Redis URLs to clients: against the real redis-server of the `redis_port` fixture and a real
Sentinel started here (`redis-server <conf> --sentinel`) that monitors it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from redis.asyncio.connection import UnixDomainSocketConnection
from redis.exceptions import AuthenticationError, ConnectionError

from reconciler.controller.lease import RedisLease
from reconciler.model.errors import ConfigurationError
from reconciler.providers.redisconn import connect_redis, describe_redis_url
from tests.redis_fixtures import free_port

SECRET = "s3cret"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        (SECRET, "<not a URL>"),
        (f"redis://:{SECRET}@h:6379/0", "redis://:***@h:6379/0"),
        (f"redis://user:{SECRET}@h/1", "redis://user:***@h/1"),
        ("redis://user@h/1", "redis://user@h/1"),
        (f"rediss://u:{SECRET}@h:6380", "rediss://u:***@h:6380"),
        (f"unix://u:{SECRET}@/run/redis.sock?db=2", "unix://u:***@/run/redis.sock?db=2"),
        (f"redis://h/0?password={SECRET}&db=1", "redis://h/0?password=***&db=1"),
        ("redis://u:p%40ss%3Aw@h/0", "redis://u:***@h/0"),
        (
            f"redis+sentinel://:{SECRET}@s1:26379,s2/mymaster/0",
            "redis+sentinel://:***@s1:26379,s2/mymaster/0",
        ),
    ],
)
def test_describe_hides_the_password(url: str, shown: str) -> None:
    assert describe_redis_url(url) == shown


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (f"http://:{SECRET}@h:6379", "scheme must be one of"),
        (f"{SECRET}", "scheme must be one of"),
        (f"redis://:{SECRET}@h:notaport/0", "bad port"),
        (f"redis://:{SECRET}@h:6379/0?db=zero", "Invalid value for 'db'"),
        (f"redis+sentinel://:{SECRET}@s1:26379", "name the master"),
        (f"redis+sentinel://:{SECRET}@s1:26379/", "name the master"),
        (f"redis+sentinel://:{SECRET}@s1:26379,/m", "empty sentinel address"),
        (f"redis+sentinel://:{SECRET}@s1:99999/m", "bad sentinel port"),
        (f"redis+sentinel://:{SECRET}@:26379/m", "without a host"),
        (f"redis+sentinel://:{SECRET}@s1/m/zero", "only a db number"),
        (f"redis+sentinel://:{SECRET}@s1/m/0/x", "only a db number"),
        (f"redis+sentinel://:{SECRET}@s1/m?socket_timeout=1", "take no options"),
    ],
)
def test_bad_urls_are_configuration_errors_that_never_echo_the_password(
    url: str, message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message) as caught:
        connect_redis(url)
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize(
    "url", [f"redis://:{SECRET}@h/0", f"redis+sentinel://:{SECRET}@s1/m"], ids=["plain", "sentinel"]
)
def test_a_password_in_the_url_and_as_an_argument_is_refused(url: str) -> None:
    with pytest.raises(ConfigurationError, match="both in the URL and given") as caught:
        connect_redis(url, password="other")
    assert SECRET not in str(caught.value)


def test_clients_have_short_timeouts_and_no_retries_of_their_own(redis_port: int) -> None:
    async def main() -> None:
        client = connect_redis(f"redis://127.0.0.1:{redis_port}/0", timeout=0.5)
        try:
            assert await client.ping()
            kwargs = client.connection_pool.connection_kwargs
            assert kwargs["socket_timeout"] == kwargs["socket_connect_timeout"] == 0.5
            assert kwargs["retry"].get_retries() == 0
        finally:
            await client.aclose()

    anyio.run(main)


def test_a_unix_socket_url_builds_a_socket_client() -> None:
    async def main() -> None:
        client = connect_redis("unix:///run/redis/redis.sock?db=3")
        try:
            pool = client.connection_pool
            assert pool.connection_class is UnixDomainSocketConnection
            assert pool.connection_kwargs["path"] == "/run/redis/redis.sock"
            assert pool.connection_kwargs["db"] == 3
        finally:
            await client.aclose()

    anyio.run(main)


def test_nothing_listening_fails_at_once(redis_port: int) -> None:
    async def main() -> None:
        client = connect_redis(f"redis://127.0.0.1:{free_port()}/0", timeout=0.5)
        try:
            started = time.monotonic()
            with pytest.raises(ConnectionError):
                await client.ping()
            assert time.monotonic() - started < 0.5  # no retries, no backoff sleeps
        finally:
            await client.aclose()

    anyio.run(main)


def test_passwords_from_the_url_or_the_argument(redis_port: int) -> None:
    async def main() -> None:
        admin = connect_redis(f"redis://127.0.0.1:{redis_port}/0")
        user = "lease-user"
        await admin.acl_setuser(
            user, enabled=True, passwords=[f"+{SECRET}"], keys=["*"], commands=["+@all"]
        )
        try:
            for client in (
                connect_redis(f"redis://{user}:{SECRET}@127.0.0.1:{redis_port}/0"),
                connect_redis(f"redis://{user}@127.0.0.1:{redis_port}/0", password=SECRET),
            ):
                try:
                    assert await client.acl_whoami() == user
                finally:
                    await client.aclose()
            wrong = connect_redis(f"redis://{user}:wrong@127.0.0.1:{redis_port}/0")
            try:
                with pytest.raises(AuthenticationError):
                    await wrong.ping()
            finally:
                await wrong.aclose()
        finally:
            await admin.acl_deluser(user)
            await admin.aclose()

    anyio.run(main)


# -- Sentinel ----------------------------------------------------------------------------------


def test_sentinel_url_reaches_the_master_and_a_lease_works_through_it(
    redis_port: int, sentinel_url: str
) -> None:
    async def main() -> None:
        via_sentinel = connect_redis(sentinel_url)
        direct = connect_redis(f"redis://127.0.0.1:{redis_port}/0")
        try:
            await via_sentinel.set("sentinel-probe", "through the sentinel")
            assert await direct.get("sentinel-probe") == b"through the sentinel"
            pool = via_sentinel.connection_pool
            assert pool.connection_kwargs["retry"].get_retries() == 0
            for sentinel in pool.sentinel_manager.sentinels:
                kwargs = sentinel.connection_pool.connection_kwargs
                assert kwargs["retry"].get_retries() == 0 and kwargs.get("password") is None

            a = RedisLease(via_sentinel, name="sentinel", holder="a", ttl=5)
            b = RedisLease(direct, name="sentinel", holder="b", ttl=5)
            assert await a.acquire()
            assert not await b.acquire()  # the same lease: the sentinel led to this master
            assert await a.check() == a.token
            info = await b.info()
            assert info is not None and info.holder == "a"
            await a.release()
            assert await b.acquire()
            await b.release()
        finally:
            await via_sentinel.aclose()  # closes the sentinel clients too
            await direct.aclose()

    anyio.run(main)


def test_sentinel_url_with_several_sentinels_and_a_db(sentinel_url: str) -> None:
    async def main() -> None:
        # The first sentinel does not answer; the client asks the next.
        sentinel = sentinel_url.removeprefix("redis+sentinel://").removesuffix("/mymaster/0")
        url = f"redis+sentinel://127.0.0.1:{free_port()},{sentinel}/mymaster/2"
        client = connect_redis(url, timeout=0.5)
        try:
            assert await client.ping()
            assert client.connection_pool.connection_kwargs["db"] == 2
            await client.set("db-probe", "2")
            assert await client.execute_command("CLIENT", "INFO")  # a live master connection
        finally:
            await client.aclose()

    anyio.run(main)


def test_sentinel_parses_ipv6_and_default_ports() -> None:
    async def main() -> None:
        client = connect_redis(f"redis+sentinel://u:{SECRET}@[::1]:26380,sentinel-b/main")
        try:
            pool = client.connection_pool
            addresses = [
                (
                    s.connection_pool.connection_kwargs["host"],
                    s.connection_pool.connection_kwargs["port"],
                )
                for s in pool.sentinel_manager.sentinels
            ]
            assert addresses == [("::1", 26380), ("sentinel-b", 26379)]
            assert pool.service_name == "main"
            assert pool.connection_kwargs["username"] == "u"
            assert pool.connection_kwargs["password"] == SECRET
        finally:
            await client.aclose()

    anyio.run(main)


def test_an_unknown_master_name_is_a_connection_error(sentinel_url: str) -> None:
    async def main() -> None:
        client = connect_redis(sentinel_url.replace("/mymaster/0", "/nosuchmaster"))
        try:
            with pytest.raises(ConnectionError, match="No master found"):
                await client.ping()
        finally:
            await client.aclose()

    anyio.run(main)


def test_the_whole_service_runs_on_a_sentinel_url(
    sentinel_url: str, pve_api: Any, pve: Any, tmp_path: Path
) -> None:
    """The lease and every cycle's connection come from one builder: a Sentinel URL that the
    lease accepts must not fail the cycles (it did: the cycle built its own client, which
    refused `redis+sentinel://`)."""
    from reconciler.applying.connecting import Endpoints
    from reconciler.controller.service import Service, Settings
    from reconciler.controller.sources import DirectorySource
    from reconciler.controller.status import CycleOutcome
    from reconciler.controller.timing import Trigger
    from tests.conftest import SPECS

    url = sentinel_url
    lease_client = connect_redis(url)
    service = Service(
        DirectorySource(SPECS),
        RedisLease(lease_client, name="sentinel-service", holder="ctl-a", ttl=3),
        Endpoints(proxmox=pve_api, edge=False, redis_url=url),
        Settings(
            intervals={
                Trigger.SOURCE: 0.2,
                Trigger.FULL: 60.0,
                Trigger.INVENTORY: 60.0,
                Trigger.EDGE: 60.0,
            },
            state_dir=tmp_path / "state",
            listen=None,
            lease_interval=0.5,
        ),
    )

    async def main() -> None:
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(service.run)
                with anyio.fail_after(60):
                    while not any(t is Trigger.FULL for t, _ in service.cycles):
                        await anyio.sleep(0.05)
                service.stop()
        finally:
            await lease_client.aclose()

    anyio.run(main)
    first = next(outcome for t, outcome in service.cycles if t is Trigger.FULL)
    assert first in (CycleOutcome.CHANGED, CycleOutcome.CONVERGED), service.board.to_json()
    assert len([r for r in pve.requests if r[0] == "POST" and r[1].endswith("/lxc")]) == 20
