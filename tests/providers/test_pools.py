"""Pools end to end on fakepve, through the real client: a declared pool created with our mark,
guests created into it (`pool=`), existing guests moved in and out, a member that is not ours
left where it is, a pool made by hand under the spec's name never taken over, a guest of ours
in someone else's pool not moved out of it, and a pool that left the spec deleted only with
pruning. Assertions read what Proxmox holds (pools, members) and fakepve's request log.
"""

from __future__ import annotations

from typing import Any

import pytest

from reconciler.model.plans import Action
from reconciler.model.resources import DesiredGraph
from reconciler.providers.proxmox import ProxmoxProvider
from reconciler.providers.proxmox_pools import PoolProvider
from tests.fakepve_fixtures import TEMPLATE, mutating_calls, request_bodies
from tests.guest_helpers import GAME_RANGE, changed, load_edited, ok, plan_now, platform_yaml, run

PLATFORM = platform_yaml(GAME_RANGE)
MARK = "reconciler:v1 platform=zpack address=pool/games"

GUESTS = f"""
pools:
  games: {{comment: Minecraft servers}}
profiles:
  game:
    template: local:vztmpl/{TEMPLATE}
    memory: 1G
    pool: games
guests:
  mc-lobby:
    role: game
    vmid: 1000
    host: pve-runtime
    profile: game
  mc-survival:
    role: game
    vmid: 1001
    host: pve-runtime
    profile: game
"""


def spec(*edits: tuple[str, str]) -> DesiredGraph:
    return load_edited(PLATFORM, GUESTS, *edits)


@pytest.fixture
def providers(provider: ProxmoxProvider) -> list[Any]:
    return [provider, PoolProvider(pve=provider)]


def pool(client: Any, name: str) -> dict[str, Any]:
    """The pool as Proxmox has it: comment and member vmids."""
    found = client.pools.get(poolid=name)[0]
    return {
        "comment": found.get("comment"),
        "members": sorted(m["vmid"] for m in found.get("members", []) if "vmid" in m),
    }


def test_pool_created_and_guests_created_into_it(
    pve: Any, provider: ProxmoxProvider, providers: list[Any]
) -> None:
    ok(run(spec(), providers))
    assert pool(provider.client, "games") == {
        "comment": f"Minecraft servers {MARK}",
        "members": [1000, 1001],
    }
    # The pool first, then each guest created into it: no membership call of its own.
    creates = request_bodies(pve, "POST", "/lxc")
    assert sorted(b["pool"] for b in creates) == ["games", "games"]
    calls = mutating_calls(pve)
    assert calls.index(("POST", "/api2/json/pools")) < calls.index(
        ("POST", "/api2/json/nodes/pve-runtime/lxc")
    )
    assert not request_bodies(pve, "PUT", "/pools")
    assert changed(plan_now(spec(), providers)) == {}


def test_members_reconciled_and_a_foreign_member_untouched(
    pve: Any, provider: ProxmoxProvider, providers: list[Any]
) -> None:
    ok(run(spec(), providers))
    # Someone puts a guest of their own into our pool by hand.
    pve.add_ct(1050, "ops-tools", node="pve-runtime", status="running")
    provider.client.pools.put(poolid="games", vms=1050)
    # mc-survival leaves the pool; the comment changes.
    graph = spec(
        ("    profile: game\n  mc-survival:", "    profile: game\n  mc-survival:\n    pool: null"),
        ("comment: Minecraft servers", "comment: Game servers"),
    )
    plan = plan_now(graph, providers)
    assert changed(plan) == {"pool/games": Action.UPDATE}
    fields = {f.path: (f.before, f.after) for f in plan.changes[0].fields}
    assert fields["members"] == (["guest/mc-lobby", "guest/mc-survival"], ["guest/mc-lobby"])
    pve.requests.clear()
    ok(run(graph, providers))
    assert pool(provider.client, "games") == {
        "comment": f"Game servers {MARK}",
        "members": [1000, 1050],  # the foreign member stays
    }
    bodies = request_bodies(pve, "PUT", "/pools")
    assert {"poolid": "games", "vms": "1001", "delete": "1"} in bodies
    assert all(b.get("vms") != "1050" for b in bodies)
    assert changed(plan_now(graph, providers)) == {}


def test_existing_guests_move_in_and_a_pool_made_by_hand_is_not_taken(
    pve: Any, provider: ProxmoxProvider, providers: list[Any]
) -> None:
    without = spec(("    pool: games\n", ""))
    ok(run(without, providers))  # the pool is created empty: no guest names it
    assert pool(provider.client, "games")["members"] == []
    ok(run(spec(), providers))
    assert pool(provider.client, "games")["members"] == [1000, 1001]
    bodies = request_bodies(pve, "PUT", "/pools")
    assert {b["vms"] for b in bodies} == {"1000", "1001"}
    assert all(b["allow-move"] == "1" for b in bodies)

    # The spec renames its pool `ops`, a name a pool made by hand holds.
    provider.client.pools.post(poolid="ops", comment="the operators' own")
    graph = spec(
        ("  games: {comment: Minecraft servers}", "  ops: {}"), ("pool: games", "pool: ops")
    )
    plan = plan_now(graph, providers)
    assert plan.errored
    held = [d for d in plan.diagnostics if d.code == "pool-held-by-foreign"]
    assert held and "reconciler:v1 platform=zpack address=pool/ops" in held[0].message
    assert held[0].position is not None and held[0].position.line > 0
    assert "pool/ops" not in changed(plan)


def test_a_guest_in_a_foreign_pool_stays_there(
    pve: Any, provider: ProxmoxProvider, providers: list[Any]
) -> None:
    ok(run(spec(("    pool: games\n", "")), providers))
    provider.client.pools.post(poolid="ops", comment="by hand")
    provider.client.pools.put(poolid="ops", vms=1001)
    plan = plan_now(spec(), providers)
    warned = [d for d in plan.diagnostics if d.code == "pool-foreign-member"]
    assert [d.address for d in warned] == ["guest/mc-survival"]
    assert "'ops'" in warned[0].message
    ok(run(spec(), providers))
    assert pool(provider.client, "games")["members"] == [1000]
    assert pool(provider.client, "ops")["members"] == [1001]


def test_a_pool_that_left_the_spec_goes_only_with_pruning(
    pve: Any, provider: ProxmoxProvider, providers: list[Any]
) -> None:
    ok(run(spec(), providers))
    graph = spec(("pools:\n  games: {comment: Minecraft servers}\n", ""), ("    pool: games\n", ""))
    plan = plan_now(graph, providers)
    delete = next(c for c in plan.changes if c.address == "pool/games")
    assert delete.action is Action.DELETE and delete.blocked
    ok(run(graph, providers))
    assert pool(provider.client, "games")["members"] == [1000, 1001]  # nothing changed
    # Someone else's guest in it: Proxmox refuses to delete the pool, which stays.
    pve.add_ct(1050, "ops-tools", node="pve-runtime")
    provider.client.pools.put(poolid="games", vms=1050)
    refused = run(graph, providers, allow_destroy=True)
    failed = {r.change.address: r.error for r in refused.rounds[-1].report.results if r.error}
    assert "not the controller's" in failed["pool/games"]
    assert pool(provider.client, "games")["members"] == [1050]
    # Our guests were taken out first (Proxmox refuses to delete a pool that has members);
    # the other one never.
    removed = [b["vms"] for b in request_bodies(pve, "PUT", "/pools") if b.get("delete")]
    assert sorted(removed) == ["1000", "1001"]
    provider.client.pools.put(poolid="games", vms=1050, delete=1)
    ok(run(graph, providers, allow_destroy=True))
    assert [p["poolid"] for p in provider.client.pools.get()] == []


def test_a_foreign_guest_at_a_members_desired_vmid_is_not_moved_in(
    pve: Any, provider: ProxmoxProvider, providers: list[Any]
) -> None:
    """mc-lobby is renumbered to 1002, where someone else's guest of the same name sits (only
    a warning: an adoption pending). The pool gets the guest that carries our mark, 1000; the
    other one stays in its own pool."""
    ok(run(spec(("    pool: games\n", "")), providers))  # the pool, empty
    pve.add_ct(1002, "mc-lobby", node="pve-runtime")
    provider.client.pools.post(poolid="ops", comment="by hand")
    provider.client.pools.put(poolid="ops", vms=1002)
    graph = spec(("    vmid: 1000\n", "    vmid: 1002\n"))
    plan = plan_now(graph, providers)
    update = next(c for c in plan.changes if c.address == "pool/games")
    assert update.after is not None
    assert update.after["vmids"] == {"guest/mc-lobby": 1000, "guest/mc-survival": 1001}
    pve.requests.clear()
    ok(run(graph, providers))
    assert {b["vms"] for b in request_bodies(pve, "PUT", "/pools")} == {"1000", "1001"}
    assert pool(provider.client, "games")["members"] == [1000, 1001]
    assert pool(provider.client, "ops")["members"] == [1002]
