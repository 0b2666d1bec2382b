"""HA resources end to end on fakepve (extended with HA: reconciler/simulators/pve_ha.py),
through the real client: a guest's HA resource created with our mark and updated, HA owning the
power of the guests it manages (a drifted state healed through the HA resource, never by a
start or stop of the guest; a resource made by hand on a guest of ours never fought), `ha`
removed from a guest without pruning, and a guest's `state` that disagrees with its `ha.state`
refused at its line. Assertions read what Proxmox holds and fakepve's request log.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import anyio
import pytest

from reconciler.loading.loader import load_texts
from reconciler.model.errors import PermanentError
from reconciler.model.plans import HOLD_START, Action, Change, FieldChange
from reconciler.model.resources import DesiredGraph, Kind
from reconciler.providers.firewall import FirewallProvider
from reconciler.providers.proxmox import ProxmoxProvider
from reconciler.providers.proxmox_ha import HaProvider
from tests.fakepve_fixtures import TEMPLATE, mutating_calls, request_bodies
from tests.guest_helpers import GAME_RANGE, changed, load_edited, ok, plan_now, platform_yaml, run
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


def _foreign_ha_with_our_mark(pve: Any, provider: ProxmoxProvider) -> None:
    """The reviewer's case: a container the controller does not own (1001), whose HA resource
    carries our mark for ha/mc-lobby, naming its own sid."""
    pve.add_ct(1001, "ops-tools", node="pve-runtime", status="stopped")
    provider.client.cluster.ha.resources.post(
        sid="ct:1001",
        state="stopped",
        comment="reconciler:v1 platform=zpack address=ha/mc-lobby sid=ct:1001",
    )


def ha_calls(pve: Any) -> list[tuple[str, str]]:
    return [(m, p) for m, p in mutating_calls(pve) if "/cluster/ha/resources" in p]


def test_an_ha_resource_of_ours_on_another_guest_is_a_conflict(
    pve: Any, provider: ProxmoxProvider, providers: list[Any]
) -> None:
    without = spec(("    ha: {state: started, max_restart: 2}\n", ""))
    ok(run(without, providers))  # mc-lobby is vmid 1000, with no HA resource
    _foreign_ha_with_our_mark(pve, provider)
    for graph in (spec(), without):  # an update to `started`; the delete of a dropped `ha`
        plan = plan_now(graph, providers, allow_destroy=True)
        assert plan.errored
        wrong = [d for d in plan.diagnostics if d.code == "ha-sid-mismatch"]
        assert [d.address for d in wrong] == ["ha/mc-lobby"]
        assert "ct:1001" in wrong[0].message and "ct:1000" in wrong[0].message
        assert "ha/mc-lobby" not in changed(plan)
        pve.requests.clear()
        run(graph, providers, allow_destroy=True)
        assert ha_calls(pve) == [] and power_calls(pve) == []
    assert ha_of(provider.client)["ct:1001"]["state"] == "stopped"
    assert str(provider.client.nodes("pve-runtime").lxc(1001).status.current.get()["status"]) == (
        "stopped"
    )


def test_the_provider_refuses_an_ha_change_for_another_guest(
    pve: Any, provider: ProxmoxProvider, providers: list[Any]
) -> None:
    """A change (a saved plan, a forged one) that addresses another guest's HA resource for
    ours: refused before any write, naming it."""
    ok(run(spec(("    ha: {state: started, max_restart: 2}\n", "")), providers))
    _foreign_ha_with_our_mark(pve, provider)
    ha_provider = HaProvider(pve=provider)
    after = {"guest": "guest/mc-lobby", "state": "started", "max_restart": 1, "max_relocate": 1}
    update = Change(
        "ha/mc-lobby",
        Kind.HA,
        Action.UPDATE,
        0,
        id={"sid": "ct:1001"},
        before={**after, "state": "stopped"},
        after=after,
        fields=(FieldChange("state", "stopped", "started"),),
    )
    delete = replace(update, action=Action.DELETE, after=None, fields=())
    create = replace(update, action=Action.CREATE, before=None, fields=())
    pve.requests.clear()
    for change in (update, delete, create):
        with pytest.raises(PermanentError, match=r"ct:1001 is not on guest/mc-lobby"):
            anyio.run(ha_provider.apply, change)
    assert ha_calls(pve) == []
    assert ha_of(provider.client)["ct:1001"]["state"] == "stopped"
