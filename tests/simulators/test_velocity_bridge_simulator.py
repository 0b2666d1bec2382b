"""The bridge simulator keeps Velocity's registry semantics behind the plugin's HTTP contract."""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Iterator

import httpx
import pytest

from reconciler.simulators.velocity_bridge import VelocityBridgeSimulator, secret_hash

SECRET = "bridge-shared-secret"
AUTH = {"X-Zpack-Secret": hashlib.sha256(SECRET.encode()).hexdigest()}


@pytest.fixture
def bridge() -> Iterator[VelocityBridgeSimulator]:
    with VelocityBridgeSimulator(SECRET) as bridge:
        yield bridge


@pytest.fixture
def client(bridge: VelocityBridgeSimulator) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=bridge.url, headers=AUTH, timeout=2) as client:
        yield client


def register(client: httpx.Client, name: str, address: str, port: int = 25565) -> httpx.Response:
    return client.post(
        "/zpack/register", json={"server_name": name, "address": address, "port": port}
    )


def test_header_is_the_hex_sha256_of_the_secret() -> None:
    assert secret_hash(SECRET) == AUTH["X-Zpack-Secret"]


def test_register_list_unregister(client: httpx.Client) -> None:
    assert register(client, "lobby", "10.20.0.10").json()["changed"] is True
    assert client.get("/zpack/list").json() == {
        "servers": [{"name": "lobby", "address": "10.20.0.10", "port": 25565}]
    }
    assert client.post("/zpack/unregister", json={"server_name": "lobby"}).status_code == 200
    assert client.get("/zpack/list").json() == {"servers": []}


def test_identical_register_is_a_no_op(client: httpx.Client) -> None:
    register(client, "lobby", "10.20.0.10")
    again = register(client, "lobby", "10.20.0.10")
    assert again.status_code == 200 and again.json()["changed"] is False


@pytest.mark.parametrize(
    ("name", "address", "port"),
    [("lobby", "10.20.0.99", 25565), ("lobby", "10.20.0.10", 25566), ("LOBBY", "10.20.0.10", 1)],
)
def test_same_name_other_address_is_a_409(
    client: httpx.Client, bridge: VelocityBridgeSimulator, name: str, address: str, port: int
) -> None:
    register(client, "lobby", "10.20.0.10")
    refused = register(client, name, address, port)
    assert refused.status_code == 409
    assert "already registered" in refused.json()["error"]
    assert bridge.servers() == {"lobby": ("10.20.0.10", 25565)}


def test_unregister_unknown_is_404_and_names_are_case_insensitive(client: httpx.Client) -> None:
    assert client.post("/zpack/unregister", json={"server_name": "ghost"}).status_code == 404
    register(client, "Lobby", "10.20.0.10")
    assert client.post("/zpack/unregister", json={"server_name": "lobby"}).status_code == 200


@pytest.mark.parametrize(
    "body",
    [{}, {"server_name": "x", "address": "a"}, {"server_name": "x", "address": "a", "port": "1"}],
)
def test_malformed_register_is_400(client: httpx.Client, body: dict[str, object]) -> None:
    assert client.post("/zpack/register", json=body).status_code == 400


def test_secret_missing_is_401_wrong_is_403(
    bridge: VelocityBridgeSimulator, http: httpx.Client
) -> None:
    body = {"server_name": "lobby", "address": "10.20.0.10", "port": 25565}
    assert http.post(f"{bridge.url}/zpack/register", json=body).status_code == 401
    wrong = {"X-Zpack-Secret": hashlib.sha256(b"other").hexdigest()}
    assert http.post(f"{bridge.url}/zpack/register", json=body, headers=wrong).status_code == 403
    assert http.get(f"{bridge.url}/zpack/list").status_code == 401
    assert bridge.servers() == {}


def test_list_can_be_open_like_the_platform_api_assumes(http: httpx.Client) -> None:
    with VelocityBridgeSimulator(SECRET, list_requires_secret=False) as bridge:
        assert http.get(f"{bridge.url}/zpack/list").status_code == 200
        body = {"server_name": "lobby", "address": "10.20.0.10", "port": 25565}
        assert http.post(f"{bridge.url}/zpack/register", json=body).status_code == 401


def test_restart_loses_every_registration(
    client: httpx.Client, bridge: VelocityBridgeSimulator
) -> None:
    register(client, "lobby", "10.20.0.10")
    register(client, "survival", "10.20.0.11")
    bridge.restart()
    assert client.get("/zpack/list").json() == {"servers": []}
    assert bridge.restarts == 1


def test_stop_refuses_and_start_comes_back_empty_on_the_same_port(
    client: httpx.Client, bridge: VelocityBridgeSimulator
) -> None:
    register(client, "lobby", "10.20.0.10")
    port = bridge.port
    bridge.stop()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
    bridge.start()
    assert bridge.port == port
    assert client.get("/zpack/list").json() == {"servers": []}


def test_fail_switch_answers_the_status_then_recovers(
    client: httpx.Client, bridge: VelocityBridgeSimulator
) -> None:
    bridge.fail(500, times=2, path="/zpack/register")
    assert client.get("/zpack/list").status_code == 200  # another path: untouched
    assert register(client, "lobby", "10.20.0.10").status_code == 500
    assert register(client, "lobby", "10.20.0.10").status_code == 500
    assert register(client, "lobby", "10.20.0.10").status_code == 200
    statuses = [s for m, p, s in bridge.requests if p == "/zpack/register"]
    assert statuses == [500, 500, 200]


def test_hang_switch_never_answers_until_released(
    client: httpx.Client, bridge: VelocityBridgeSimulator, http: httpx.Client
) -> None:
    bridge.hang(times=1)
    with pytest.raises(httpx.ReadTimeout):
        client.get("/zpack/list", timeout=0.3)
    bridge.release()
    assert client.get("/zpack/list").status_code == 200


def test_control_endpoint(
    client: httpx.Client, bridge: VelocityBridgeSimulator, http: httpx.Client
) -> None:
    register(client, "lobby", "10.20.0.10")
    assert http.post(f"{bridge.url}/_sim/fail", json={"status": 503}).status_code == 200
    assert client.get("/zpack/list").status_code == 503
    assert http.post(f"{bridge.url}/_sim/restart").status_code == 200
    state = http.get(f"{bridge.url}/_sim/state").json()
    assert state["servers"] == [] and state["restarts"] == 1
    assert http.post(f"{bridge.url}/_sim/fail", json={"nope": 1}).status_code == 400
