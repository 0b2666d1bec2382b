"""The Velocity provider when the bridge misbehaves: 5xx retried with backoff on an injected sleep,
a bridge down or hung, a wrong secret; and `classify` over every status the bridge may answer."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator

import anyio
import httpx
import pytest

from reconciler.model.errors import (
    ConflictError,
    NotFoundError,
    PermanentError,
    ProviderError,
    TemporaryError,
)
from reconciler.model.plans import Action, Change
from reconciler.model.resources import Kind
from reconciler.providers.velocity import (
    BadAnswer,
    RetryPolicy,
    VelocityProvider,
    classify,
    parse_list,
)
from reconciler.simulators.velocity_bridge import VelocityBridgeSimulator

SECRET = "zpack-bridge-secret"
LOBBY = Change(
    "velocity/lobby",
    Kind.VELOCITY,
    Action.CREATE,
    1,
    after={"server_name": "lobby", "address": "10.20.0.10", "port": 25565, "forced_host": None},
)


class Sleeps:
    """An injected sleep: records the delays, sleeps none of them."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


@pytest.fixture
def bridge() -> Iterator[VelocityBridgeSimulator]:
    with VelocityBridgeSimulator(SECRET) as bridge:
        yield bridge


def provider_for(
    bridge: VelocityBridgeSimulator, sleeps: Sleeps, *, secret: str = SECRET, **kw: float
) -> VelocityProvider:
    return VelocityProvider(
        bridge.url,
        secret,
        retry=RetryPolicy(attempts=4, initial=0.2, maximum=1.0),
        sleep=sleeps,
        timeout=kw.get("timeout", 2.0),
    )


def test_a_500_is_retried_then_succeeds(bridge: VelocityBridgeSimulator) -> None:
    sleeps = Sleeps()
    provider = provider_for(bridge, sleeps)
    bridge.fail(500, times=2, path="/zpack/register")
    anyio.run(provider.apply, LOBBY)
    assert bridge.servers() == {"lobby": ("10.20.0.10", 25565)}
    assert [s for _, p, s in bridge.requests if p == "/zpack/register"] == [500, 500, 200]
    assert provider.retries == 2 and len(sleeps.delays) == 2
    assert all(0 <= d <= 1.0 for d in sleeps.delays)


def test_5xx_that_persists_gives_up_after_the_policy_with_a_temporary_error(
    bridge: VelocityBridgeSimulator,
) -> None:
    sleeps = Sleeps()
    provider = provider_for(bridge, sleeps)
    bridge.fail(503, times=None)
    with pytest.raises(TemporaryError, match=r"list servers on the Velocity bridge .*: 503"):
        anyio.run(provider.observe)
    assert len(bridge.requests) == 4 and len(sleeps.delays) == 3


def test_bridge_down_is_temporary(bridge: VelocityBridgeSimulator) -> None:
    sleeps = Sleeps()
    provider = provider_for(bridge, sleeps)
    bridge.stop()
    with pytest.raises(
        TemporaryError, match=r"cannot reach the Velocity bridge \(connection refused\)"
    ):
        anyio.run(provider.observe)
    assert provider.calls == 4


def test_bridge_back_after_a_restart_mid_retry(bridge: VelocityBridgeSimulator) -> None:
    """Down on the first try, up (and empty) by the second: the register goes through."""

    class RestartOnFirstSleep(Sleeps):
        async def __call__(self, seconds: float) -> None:
            await super().__call__(seconds)
            bridge.start()

    provider = provider_for(bridge, RestartOnFirstSleep())
    bridge.stop()
    anyio.run(provider.apply, LOBBY)
    assert bridge.servers() == {"lobby": ("10.20.0.10", 25565)}


def test_hung_bridge_times_out_within_the_bound(bridge: VelocityBridgeSimulator) -> None:
    sleeps = Sleeps()
    provider = VelocityProvider(
        bridge.url, SECRET, timeout=0.2, retry=RetryPolicy(attempts=2), sleep=sleeps
    )
    bridge.hang()
    started = time.monotonic()
    with pytest.raises(TemporaryError, match="did not answer in time"):
        anyio.run(provider.apply, LOBBY)
    assert time.monotonic() - started < 1.5
    bridge.release()


@pytest.mark.parametrize("path", ["/zpack/list", "/zpack/register"])
def test_wrong_secret_is_permanent_clear_and_never_shows_the_secret(
    bridge: VelocityBridgeSimulator, path: str
) -> None:
    wrong = "the-wrong-shared-secret"
    sleeps = Sleeps()
    provider = provider_for(bridge, sleeps, secret=wrong)
    with pytest.raises(PermanentError) as info:
        if path == "/zpack/list":
            anyio.run(provider.observe)
        else:
            anyio.run(provider.apply, LOBBY)
    error = info.value
    assert not isinstance(error, TemporaryError) and error.status == 403
    message = str(error)
    assert "shared secret" in message and "does not match" in message
    for secret in (wrong, SECRET, hashlib.sha256(wrong.encode()).hexdigest()):
        assert secret not in message
        assert secret not in repr(provider)
    assert sleeps.delays == [] and provider.calls == 1  # not retried


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (500, {"error": "boom"}, TemporaryError),
        (502, "Bad Gateway", TemporaryError),
        (429, "", TemporaryError),
        (
            500,
            {"error": "java.lang.IllegalArgumentException: Server with name x already registered"},
            ConflictError,
        ),
        (409, {"error": "Server with name x already registered"}, ConflictError),
        (404, {"error": "Server with name x is not registered!"}, NotFoundError),
        (500, {"error": "Server with name x is not registered!"}, NotFoundError),
        (401, {"error": "missing X-Zpack-Secret"}, PermanentError),
        (400, {"error": "port must be an integer"}, PermanentError),
    ],
)
def test_classify_statuses(status: int, body: object, expected: type[ProviderError]) -> None:
    request = httpx.Request("POST", "http://velocity:8081/zpack/register")
    response = (
        httpx.Response(status, json=body, request=request)
        if isinstance(body, dict)
        else httpx.Response(status, text=str(body), request=request)
    )
    exc = httpx.HTTPStatusError("x", request=request, response=response)
    error = classify(exc, "register velocity/x")
    assert type(error) is expected
    assert error.status == status
    assert str(error).startswith(f"register velocity/x: {status}")


def test_classify_redacts_an_echoed_secret() -> None:
    request = httpx.Request("POST", "http://velocity:8081/zpack/register")
    response = httpx.Response(400, text="bad header value s3cr3t-hash", request=request)
    error = classify(
        httpx.HTTPStatusError("x", request=request, response=response), "", ["s3cr3t-hash"]
    )
    assert "s3cr3t-hash" not in str(error) and "***" in str(error)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"servers": []}, []),
        (
            {
                "servers": [
                    {"name": "b", "address": "10.0.0.2", "port": 1},
                    {"name": "a", "address": "10.0.0.1:25565"},
                ]
            },
            [
                {"server_name": "a", "address": "10.0.0.1", "port": 25565},
                {"server_name": "b", "address": "10.0.0.2", "port": 1},
            ],
        ),
    ],
)
def test_parse_list(body: object, expected: list[dict[str, object]]) -> None:
    assert parse_list(body) == expected


@pytest.mark.parametrize(
    "body", [None, [], {"servers": None}, {"servers": ["x"]}, {"servers": [{"name": "a"}]}]
)
def test_parse_list_rejects_what_is_not_the_bridge(body: object) -> None:
    with pytest.raises(BadAnswer, match="zpack/list"):
        parse_list(body)
