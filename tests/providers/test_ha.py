"""HA resources end to end on fakepve (extended with HA: reconciler/simulators/pve_ha.py),
through the real client: a guest's HA resource created with our mark and updated, HA owning the
power of the guests it manages (a drifted state healed through the HA resource, never by a
start or stop of the guest; a resource made by hand on a guest of ours never fought), `ha`
removed from a guest without pruning, and a guest's `state` that disagrees with its `ha.state`
refused at its line. Assertions read what Proxmox holds and fakepve's request log.
"""

from __future__ import annotations

from typing import Any

import pytest

from reconciler.loading.loader import load_texts
from reconciler.model.plans import HOLD_START, Action, Plan
from reconciler.model.resources import DesiredGraph
from reconciler.providers.firewall import FirewallProvider
from reconciler.providers.proxmox import ProxmoxProvider
from reconciler.providers.proxmox_ha import HaProvider
from tests.fakepve_fixtures import TEMPLATE, mutating_calls, request_bodies
from tests.guest_helpers import GAME_RANGE, load_edited, ok, plan_now, platform_yaml, run
from tests.waiting import until

PLATFORM = platform_yaml(GAME_RANGE)
MARK = "reconciler:v1 platform=zpack address=ha/mc-lobby sid=ct:1000"

GUESTS = f"""
guests:
  mc-lobby:
    role: game
    vmid: 1000
    host: pve-runtime
    template: local:vztmpl/{TEMPLATE}
    ha: {{state: started, max_restart: 2}}
"""
POWER = ("/status/start", "/status/stop", "/status/shutdown")


def spec(*edits: tuple[str, str]) -> DesiredGraph:
    return load_edited(PLATFORM, GUESTS, *edits)


@pytest.fixture
def providers(provider: ProxmoxProvider) -> list[Any]:
    return [provider, HaProvider(pve=provider)]


def ha_of(client: Any) -> dict[str, dict[str, Any]]:
    return {r["sid"]: r for r in client.cluster.ha.resources.get()}


def power(client: Any) -> str:
    return str(client.nodes("pve-runtime").lxc(1000).status.current.get()["status"])


def power_calls(pve: Any) -> list[tuple[str, str]]:
    """Starts and stops sent to a guest's status API."""
    return [(m, p) for m, p in mutating_calls(pve) if p.endswith(POWER)]


def changed(plan: Plan) -> dict[str, Action]:
    return {c.address: c.action for c in plan.changes if c.action is not Action.NOOP}


def test_ha_resource_created_and_updated(
    pve: Any, provider: ProxmoxProvider, providers: list[Any]
) -> None:
    ok(run(spec(), providers))
    found = ha_of(provider.client)
    assert list(found) == ["ct:1000"]
    assert found["ct:1000"]["comment"] == MARK
    assert (found["ct:1000"]["state"], found["ct:1000"]["max_restart"]) == ("started", 2)
    assert power(provider.client) == "running"
    # After the guest (its create), never with the config digest (one for all of HA).
    calls = mutating_calls(pve)
    assert calls.index(("POST", "/api2/json/nodes/pve-runtime/lxc")) < calls.index(
        ("POST", "/api2/json/cluster/ha/resources")
    )
    assert changed(plan_now(spec(), providers)) == {}

    stopped = spec(
        ("ha: {state: started, max_restart: 2}", "ha: {state: stopped, max_relocate: 3}")
    )
    plan = plan_now(stopped, providers)
    assert changed(plan) == {"ha/mc-lobby": Action.UPDATE}  # the guest itself: no stop
    pve.requests.clear()
    ok(run(stopped, providers))
    put = request_bodies(pve, "PUT", "/cluster/ha/resources/ct:1000")
    assert put == [{"state": "stopped", "max_restart": "1", "max_relocate": "3"}]
    until(lambda: power(provider.client) == "stopped")  # HA stopped it
    assert power_calls(pve) == []
    assert changed(plan_now(stopped, providers)) == {}


def test_a_drifted_ha_state_heals_through_the_resource(
    pve: Any, provider: ProxmoxProvider, providers: list[Any]
) -> None:
    """Someone stops the guest through its status API: HA turns that into its requested state
    `stopped`. The plan heals the HA resource, never the guest's power."""
    ok(run(spec(), providers))
    provider.client.nodes("pve-runtime").lxc(1000).status.shutdown.post()
    until(lambda: power(provider.client) == "stopped")
    assert ha_of(provider.client)["ct:1000"]["state"] == "stopped"
    plan = plan_now(spec(), providers)
    assert changed(plan) == {"ha/mc-lobby": Action.UPDATE}
    guest = next(c for c in plan.changes if c.address == "guest/mc-lobby")
    assert guest.action is Action.NOOP and guest.fields == ()
    pve.requests.clear()
    ok(run(spec(), providers))
    until(lambda: power(provider.client) == "running")
    assert power_calls(pve) == []  # HA started it, on its resource's new state
    assert request_bodies(pve, "PUT", "/cluster/ha/resources/ct:1000") == [{"state": "started"}]


def test_a_guest_ha_manages_is_not_started_by_the_plan(
    pve: Any, provider: ProxmoxProvider, providers: list[Any]
) -> None:
    """An HA resource made by hand (no mark) on a guest of ours owns its power: the spec's
    `state` is not enforced against it, and the resource is never changed."""
    graph = spec(("    ha: {state: started, max_restart: 2}\n", ""))
    ok(run(graph, providers))
    provider.client.cluster.ha.resources.post(sid="ct:1000", state="stopped", comment="ops")
    until(lambda: power(provider.client) == "stopped")
    plan = plan_now(graph, providers)
    assert changed(plan) == {}
    warned = [d for d in plan.diagnostics if d.code == "ha-owns-power"]
    assert [d.address for d in warned] == ["guest/mc-lobby"]
    assert "ct:1000" in warned[0].message and MARK in warned[0].message
    pve.requests.clear()
    ok(run(graph, providers))
    assert power_calls(pve) == [] and power(provider.client) == "stopped"
    # The spec asks for HA itself: the resource made by hand is reported, not taken over.
    plan = plan_now(spec(), providers)
    assert [d.code for d in plan.diagnostics if d.address == "ha/mc-lobby"] == [
        "ha-held-by-foreign"
    ]
    assert changed(plan) == {}
    assert ha_of(provider.client)["ct:1000"]["comment"] == "ops"


def test_ha_removed_without_pruning_and_kept_with_its_guest(
    pve: Any, provider: ProxmoxProvider, providers: list[Any]
) -> None:
    ok(run(spec(), providers))
    # The guest leaves the spec: without pruning, neither it nor its HA resource goes.
    gone = load_edited(PLATFORM, "guests: {}\n")
    plan = plan_now(gone, providers)
    assert "ha/mc-lobby" not in changed(plan)
    assert next(c for c in plan.changes if c.address == "guest/mc-lobby").blocked
    # Only `ha` leaves the guest: its HA resource is removed (nothing is destroyed), the
    # guest runs on, as the API's now.
    without = spec(("    ha: {state: started, max_restart: 2}\n", ""))
    plan = plan_now(without, providers)
    delete = next(c for c in plan.changes if c.address == "ha/mc-lobby")
    assert delete.action is Action.DELETE and not delete.blocked and not delete.destroys
    ok(run(without, providers))
    assert ha_of(provider.client) == {}
    assert power(provider.client) == "running"
    assert changed(plan_now(without, providers)) == {}


def test_state_and_ha_state_must_agree() -> None:
    text = GUESTS.replace("    ha:", "    state: stopped\n    ha:")
    loaded = load_texts({"platform.yaml": PLATFORM, "guests.yaml": text})
    found = [d for d in loaded.diagnostics if d.code == "ha-state-conflict"]
    assert len(found) == 1 and found[0].position is not None
    assert (found[0].position.file, found[0].position.line) == ("guests.yaml", 8)
    assert "ha.state 'started'" in found[0].message
    # Left out, `state` follows ha.state.
    stopped = GUESTS.replace("state: started", "state: disabled")
    loaded = load_texts({"platform.yaml": PLATFORM, "guests.yaml": stopped})
    assert loaded.ok and loaded.spec is not None


def test_ha_comes_after_the_guest_and_its_firewall() -> None:
    """HA starts what it manages: its resource is created after the guest's firewall, so the
    guest never runs before its rules (and is recreated with its guest: attached to it)."""
    graph = spec(("    ha:", "    firewall: {rules: []}\n    ha:"))
    ha = graph.resources["ha/mc-lobby"]
    assert ha.depends_on == ("guest/mc-lobby", "firewall/guest/mc-lobby")
    assert ha.attached_to == "guest/mc-lobby"
    assert graph.waves["ha/mc-lobby"] > graph.waves["firewall/guest/mc-lobby"]


def test_a_guest_with_a_firewall_and_ha_converges(
    pve: Any, provider: ProxmoxProvider, providers: list[Any]
) -> None:
    """Firewall first still holds with HA (the guest's HA resource is attached to it too)."""
    both = [*providers, FirewallProvider(pve=provider)]
    graph = spec(("    ha:", "    firewall: {rules: []}\n    ha:"))
    plan = plan_now(graph, both)
    create = next(c for c in plan.changes if c.address == "guest/mc-lobby")
    assert create.after is not None and create.after.get(HOLD_START)
    ok(run(graph, both))
    assert power(provider.client) == "running"
    assert ha_of(provider.client)["ct:1000"]["state"] == "started"
    assert changed(plan_now(graph, both)) == {}
