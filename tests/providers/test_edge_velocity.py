"""The example platform converged on fakepve with its edge: Velocity registrations through the
real provider against the bridge simulator, gated by agents' health from an agent fleet."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest

from reconciler.applying.connecting import (
    agent_health_provider,
    firewall_provider,
    velocity_provider,
)
from reconciler.applying.converging import Convergence, converge
from reconciler.applying.executor import Outcome
from reconciler.loading.loader import LoadResult, load_directory
from reconciler.model.errors import ConfigurationError
from reconciler.model.plans import Action
from reconciler.model.resources import DesiredGraph, Kind
from reconciler.model.spec import PlatformSpec
from reconciler.providers import Provider
from reconciler.providers.agent import AgentHealthProvider, AgentObserver
from reconciler.providers.proxmox import ProxmoxProvider
from reconciler.providers.velocity import RetryPolicy
from reconciler.simulators.agent import AgentFleet, SimulatedAgent
from reconciler.simulators.velocity_bridge import VelocityBridgeSimulator, secret_hash
from tests.fakepve_fixtures import no_sleep
from tests.guest_helpers import load_copy

SECRET = "bridge-secret-for-tests"
SERVERS = {
    "lobby": "mc-lobby",
    "survival": "mc-survival",
    "creative": "mc-creative",
    "skyblock": "mc-skyblock",
    "rlcraft": "mc-rlcraft",
}


@dataclass
class Edge:
    spec: PlatformSpec
    graph: DesiredGraph
    providers: list[Provider]
    watch: AgentHealthProvider
    bridge: VelocityBridgeSimulator
    agents: dict[str, SimulatedAgent]  # by guest name

    def converge(self) -> Convergence:
        providers = [*self.providers, self.watch]
        return anyio.run(lambda: converge(self.graph, providers, agent_layers=self.watch.layers))

    def registered(self) -> dict[str, tuple[str, int]]:
        return self.bridge.servers()

    def expected(self, *names: str) -> dict[str, tuple[str, int]]:
        out = {}
        for name in names or SERVERS:
            guest = self.spec.guests[SERVERS[name]]
            out[name] = (guest.network[0].ip.split("/")[0], 25565)
        return out


def spec_of(example: LoadResult) -> PlatformSpec:
    assert example.spec is not None
    return example.spec


def edge_providers(
    spec: PlatformSpec, provider: ProxmoxProvider, bridge: VelocityBridgeSimulator
) -> list[Provider]:
    firewall = firewall_provider(spec, provider)
    velocity = velocity_provider(
        spec, url=bridge.url, retry=RetryPolicy(attempts=2, initial=0.0), sleep=no_sleep
    )
    assert velocity is not None
    return [provider, firewall, velocity]


@pytest.fixture
def edge(
    example: LoadResult,
    graph: DesiredGraph,
    provider: ProxmoxProvider,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Edge]:
    spec = spec_of(example)
    monkeypatch.setenv("ZPACK_BRIDGE_SECRET", SECRET)
    with VelocityBridgeSimulator(SECRET) as bridge, AgentFleet(control=False) as fleet:
        watched = agent_health_provider(spec).endpoints  # the runtime guests, at their real IPs
        agents = {
            address.removeprefix("guest/"): fleet.add(i, name=address)
            for i, address in enumerate(sorted(watched), start=1)
        }
        endpoints = {f"guest/{name}": fleet.endpoint(a.vmid) for name, a in agents.items()}
        watch = agent_health_provider(
            spec,
            endpoints=endpoints,
            observer=AgentObserver(timeout=1.0, connect_timeout=1.0),
        )
        assert set(watch.endpoints) == set(watched)
        yield Edge(spec, graph, edge_providers(spec, provider, bridge), watch, bridge, agents)


def converged(edge: Edge) -> None:
    """Guests and firewalls first; the next cycle registers the servers that came up ready."""
    first = edge.converge()
    assert first.ok
    assert not any(c.kind is Kind.VELOCITY for c in first.rounds[0].plan.actions)
    second = edge.converge()
    assert second.ok, second.rounds[-1].report


def actions(result: Convergence) -> set[tuple[str, Action]]:
    return {(c.address, c.action) for c in result.rounds[0].plan.actions}


def test_ready_servers_are_registered_and_come_back_after_a_bridge_restart(edge: Edge) -> None:
    converged(edge)
    assert edge.registered() == edge.expected()
    assert not edge.converge().rounds[0].plan.has_changes

    edge.bridge.restart()  # Velocity forgot every registration
    again = edge.converge()
    assert again.ok
    assert actions(again) == {(f"velocity/{name}", Action.CREATE) for name in SERVERS}
    assert edge.registered() == edge.expected()


def test_a_server_whose_agent_turns_unready_is_unregistered_until_ready(edge: Edge) -> None:
    converged(edge)
    edge.agents["mc-lobby"].unready("query timed out")
    result = edge.converge()
    assert result.ok
    assert actions(result) == {("velocity/lobby", Action.DELETE)}
    assert "lobby" not in edge.registered()

    edge.agents["mc-lobby"].ready()
    result = edge.converge()
    assert actions(result) == {("velocity/lobby", Action.CREATE)}
    assert edge.registered() == edge.expected()


def test_an_unreachable_agent_is_a_warning_and_the_rest_converges(edge: Edge) -> None:
    edge.agents["mc-creative"].unreachable()
    converged(edge)
    others = [name for name in SERVERS if name != "creative"]
    assert edge.registered() == edge.expected(*others)
    plan = edge.converge().rounds[0].plan
    assert not plan.has_changes and not plan.errored
    (warning,) = [d for d in plan.diagnostics if d.code == "agent-unreachable"]
    assert warning.address == "guest/mc-creative"
    assert "cannot connect" in warning.message


def test_a_bridge_answering_500_fails_those_changes_only(edge: Edge) -> None:
    edge.bridge.fail(500, times=None, path="/zpack/register")
    first = edge.converge()
    assert first.ok  # guests and firewalls
    second = edge.converge()
    report = second.rounds[-1].report
    assert report is not None and not report.ok
    failed = [r for r in report.results if r.outcome is Outcome.FAILED]
    assert {r.change.address for r in failed} == {f"velocity/{name}" for name in SERVERS}
    assert all("500" in r.error and "register velocity/" in r.error for r in failed)
    assert {r.change.kind for r in report.results} == {Kind.VELOCITY}  # nothing else to do

    edge.bridge.clear_faults()
    assert edge.converge().ok
    assert edge.registered() == edge.expected()


def test_a_wrong_secret_is_a_clear_error_without_the_secret(
    edge: Edge, provider: ProxmoxProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong = "not-the-bridge-secret"
    monkeypatch.setenv("ZPACK_BRIDGE_SECRET", wrong)
    edge.providers = edge_providers(edge.spec, provider, edge.bridge)
    result = edge.converge()
    assert result.ok  # guests and firewalls converge
    plan = result.rounds[0].plan
    assert Kind.VELOCITY not in {c.kind for c in plan.actions}
    (problem,) = [d for d in plan.diagnostics if d.code == "observe-failed"]
    assert "403" in problem.message and "secret" in problem.message
    text = " ".join(d.message for d in plan.diagnostics)
    for leak in (wrong, secret_hash(wrong), SECRET, secret_hash(SECRET)):
        assert leak not in text
    assert edge.registered() == {}


def test_a_missing_secret_is_a_configuration_error(
    example: LoadResult, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ZPACK_BRIDGE_SECRET", raising=False)
    with pytest.raises(
        ConfigurationError, match=r"velocity\.bridge\.secret: .*ZPACK_BRIDGE_SECRET"
    ):
        velocity_provider(spec_of(example))


def test_the_bridge_url_comes_from_the_velocity_guest(
    example: LoadResult, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ZPACK_BRIDGE_SECRET", SECRET)
    velocity = velocity_provider(spec_of(example))
    assert velocity is not None and velocity.url == "http://10.30.0.21:8081"
    watch: Any = agent_health_provider(spec_of(example))
    assert watch.endpoints["guest/mc-lobby"][1] == 18888 and watch.layers == ("runtime",)


def test_unmanaged_registrations_are_reported_and_never_touched(
    edge: Edge, provider: ProxmoxProvider, tmp_path: Path
) -> None:
    converged(edge)
    edge.bridge.register("hub", "10.9.9.9", 25565)  # registered by someone else
    edge.bridge.register("stray", "10.9.9.8", 25565)  # nobody declared it
    graph = load_copy(
        tmp_path,
        {
            "edge.yaml": (
                "velocity:\n  guest: velocity\n",
                "velocity:\n  guest: velocity\n  unmanaged: [hub]\n",
            )
        },
    )
    loaded = load_directory(tmp_path / "specs")
    assert loaded.spec is not None and loaded.spec.velocity is not None
    edge.graph = graph
    edge.providers = edge_providers(loaded.spec, provider, edge.bridge)
    result = edge.converge()
    assert result.ok
    assert actions(result) == {("velocity/stray", Action.DELETE)}
    assert edge.registered()["hub"] == ("10.9.9.9", 25565)
    assert "stray" not in edge.registered()
    assert "velocity/hub" not in {c.address for c in result.rounds[0].plan.changes}
