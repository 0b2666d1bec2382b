"""The agent simulator speaks the agent's wire contract, over real HTTP on loopback."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from reconciler.simulators.agent import AgentFleet, AgentMode, SimulatedAgent

STATUS_KEYS = {
    "state",
    "processRunning",
    "ready",
    "readySource",
    "readyError",
    "lastReadyAt",
    "installStep",
    "crashCount",
    "lastCrashAt",
    "lastCrashExitCode",
    "lastCrashReason",
    "error",
    "timestamp",
}


@pytest.fixture
def fleet() -> Iterator[AgentFleet]:
    fleet = AgentFleet(clock=lambda: 1_795_000_000.0)
    fleet.add(1001, name="mc-lobby")
    with fleet:
        yield fleet


def status(http: httpx.Client, fleet: AgentFleet, vmid: int, **kw: object) -> dict[str, object]:
    response = http.get(f"{fleet.url_of(vmid)}/status", timeout=2, **kw)  # type: ignore[arg-type]
    assert response.status_code == 200, response.text
    body: dict[str, object] = response.json()
    return body


def refused(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, int(port))) != 0


def test_status_has_exactly_the_documented_fields(fleet: AgentFleet, http: httpx.Client) -> None:
    body = status(http, fleet, 1001)
    assert set(body) == STATUS_KEYS
    assert body["state"] == "running" and body["ready"] is True
    assert body["processRunning"] is True
    assert body["timestamp"] == "2026-11-18T11:06:40Z"


@pytest.mark.parametrize(
    ("action", "expected"),
    [
        (
            lambda a: a.installing("extract"),
            {"state": "installing", "ready": False, "processRunning": False},
        ),
        (lambda a: a.starting(), {"state": "starting", "ready": False, "processRunning": True}),
        (
            lambda a: a.unready("query timed out"),
            {"state": "running", "ready": False, "readyError": "query timed out"},
        ),
        (lambda a: a.stop(), {"state": "stopped", "ready": False, "processRunning": False}),
        (
            lambda a: a.installing().ready("log"),
            {"state": "running", "ready": True, "readySource": "log", "installStep": None},
        ),
    ],
    ids=["installing", "starting", "unready", "stopped", "ready-after-install"],
)
def test_driven_states_show_in_status(
    fleet: AgentFleet,
    action: Callable[[SimulatedAgent], object],
    expected: dict[str, object],
    http: httpx.Client,
) -> None:
    action(fleet[1001])
    body = status(http, fleet, 1001)
    assert {k: body[k] for k in expected} == expected


def test_crash_counts_and_records_the_last_crash(fleet: AgentFleet, http: httpx.Client) -> None:
    agent = fleet[1001]
    agent.crash(exit_code=137, reason="killed by the OOM killer")
    agent.ready()
    agent.crash(exit_code=1, reason="java.lang.OutOfMemoryError")
    body = status(http, fleet, 1001)
    assert body["crashCount"] == 2
    assert body["lastCrashExitCode"] == 1
    assert body["lastCrashReason"] == "java.lang.OutOfMemoryError"
    assert body["lastCrashAt"] == "2026-11-18T11:06:40Z"
    assert body["state"] == "error" and body["ready"] is False


def test_health_is_200_whatever_the_state_and_without_token(http: httpx.Client) -> None:
    fleet = AgentFleet(token="t0ken")
    fleet.add(1001).crash()
    with fleet:
        response = http.get(f"{fleet.url_of(1001)}/health", timeout=2)
    assert response.status_code == 200


def test_bearer_token_is_required_on_status(http: httpx.Client) -> None:
    fleet = AgentFleet(token="t0ken")
    fleet.add(1001)
    with fleet:
        url = f"{fleet.url_of(1001)}/status"
        assert http.get(url, timeout=2).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert http.get(url, headers=wrong, timeout=2).status_code == 401
        right = {"Authorization": "Bearer t0ken"}
        assert http.get(url, headers=right, timeout=2).status_code == 200


def test_unreachable_refuses_connections_then_comes_back_on_the_same_port(
    fleet: AgentFleet, http: httpx.Client
) -> None:
    agent = fleet[1001]
    url = agent.url
    agent.unreachable()
    assert agent.mode is AgentMode.REFUSED
    assert refused(url)
    agent.reachable()
    assert agent.url == url
    assert status(http, fleet, 1001)["ready"] is True


def test_slow_answers_after_the_delay(fleet: AgentFleet, http: httpx.Client) -> None:
    fleet[1001].slow(0.3)
    started = time.monotonic()
    status(http, fleet, 1001)
    assert time.monotonic() - started >= 0.3
    fleet[1001].slow(0)
    started = time.monotonic()
    status(http, fleet, 1001)
    assert time.monotonic() - started < 0.25


def test_hang_accepts_and_never_answers_until_reachable(
    fleet: AgentFleet, http: httpx.Client
) -> None:
    fleet[1001].hang()
    with pytest.raises(httpx.ReadTimeout):
        http.get(f"{fleet.url_of(1001)}/status", timeout=0.3)
    fleet[1001].reachable()
    assert status(http, fleet, 1001)["ready"] is True


def test_trickle_sends_the_body_a_byte_at_a_time(fleet: AgentFleet, http: httpx.Client) -> None:
    fleet[1001].trickle(0.05)
    started = time.monotonic()
    with http.stream("GET", f"{fleet.url_of(1001)}/status") as response:
        assert response.status_code == 200
        received = b""
        for chunk in response.iter_raw():
            assert len(chunk) == 1
            received += chunk
            if len(received) == 4:
                break
    assert received == b'{"st'
    assert time.monotonic() - started >= 0.2
    fleet[1001].reachable()
    assert status(http, fleet, 1001)["ready"] is True


def test_garbage_is_not_json(fleet: AgentFleet, http: httpx.Client) -> None:
    fleet[1001].garbage()
    response = http.get(f"{fleet.url_of(1001)}/status", timeout=2)
    assert response.status_code == 200
    with pytest.raises(ValueError):
        response.json()


def test_control_endpoint_drives_agents(fleet: AgentFleet, http: httpx.Client) -> None:
    control = fleet.control_url
    created = http.post(
        f"{control}/agents", json={"vmid": 1002, "name": "mc-survival", "state": "installing"}
    )
    assert created.status_code == 201
    assert status(http, fleet, 1002)["state"] == "installing"

    crashed = http.post(f"{control}/agents/1002/crash", json={"reason": "segfault"})
    assert crashed.status_code == 200
    assert crashed.json()["status"]["crashCount"] == 1
    assert status(http, fleet, 1002)["lastCrashReason"] == "segfault"

    assert http.post(f"{control}/agents/1002/slow", json={"seconds": 0.2}).status_code == 200
    assert fleet[1002].delay == 0.2
    assert http.post(f"{control}/agents/1002/unreachable").status_code == 200
    assert refused(fleet.url_of(1002))

    listing = http.get(f"{control}/agents").json()["agents"]
    assert [(a["vmid"], a["name"], a["mode"]) for a in listing] == [
        (1001, "mc-lobby", "up"),
        (1002, "mc-survival", "refused"),
    ]
    assert http.post(f"{control}/agents/1002/explode").status_code == 400
    assert http.post(f"{control}/agents/1999/ready").status_code == 404
    assert http.delete(f"{control}/agents/1002").status_code == 204
    assert 1002 not in fleet


def test_many_agents_one_dispatcher_thread(http: httpx.Client) -> None:
    fleet = AgentFleet(control=False)
    vmids = list(range(2000, 2200))
    for vmid in vmids:
        fleet.add(vmid)
    with fleet:
        # One dispatcher for 200 listening sockets, not a serving thread per agent.
        assert [t.name for t in threading.enumerate()].count("agent-fleet") == 1
        assert threading.active_count() < 50
        ports = {fleet.endpoint(v)[1] for v in vmids}
        assert len(ports) == len(vmids)
        with httpx.Client(timeout=2) as client:
            states = {client.get(f"{fleet.url_of(v)}/status").json()["ready"] for v in vmids}
    assert states == {True}
    assert all(fleet[v].requests == 1 for v in vmids)


def test_stop_closes_every_port() -> None:
    fleet = AgentFleet()
    fleet.add(1001)
    with fleet:
        url, control = fleet.url_of(1001), fleet.control_url
    assert refused(url) and refused(control)
