"""Volumes and protection end to end on fakepve, through the real client.

A small platform: a game server container with its world on a mount point, and a VM with an
extra disk. Volumes are created with their guest, added to it, grown and moved to another path
in place (the volume ids stay, the guest is never recreated); a shrink is stopped in the plan;
a volume dropped from the spec is detached only when pruning allows it. Protection is set on
create, healed when someone lifts it by hand, and lifted by the controller only inside a
delete or replace that pruning allows. Assertions read Proxmox's state (`pve.ct`, the config
through the client) and fakepve's request log.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from reconciler.applying.converging import Convergence, converge
from reconciler.model.plans import Action, Change, Plan
from reconciler.model.resources import DesiredGraph
from reconciler.providers.proxmox import ProxmoxProvider
from tests.fakepve_fixtures import TEMPLATE, mutating_calls
from tests.guest_helpers import CORE_RANGE, GAME_RANGE, load_edited, plan_now, platform_yaml

PLATFORM = platform_yaml(CORE_RANGE, GAME_RANGE, control=True, max_deletes=3)

GUESTS = f"""
profiles:
  game:
    template: local:vztmpl/{TEMPLATE}
    memory: 2G
    disk: {{size: 8G}}
    protection: false
    volumes:
      mp0: {{path: /srv/world, size: 4G, backup: true}}
guests:
  mc-survival:
    role: game
    vmid: 1001
    host: pve-runtime
    profile: game
    network:
      - {{name: eth0, bridge: vmbr0, ip: 10.20.0.11/24, gw: 10.20.0.1}}
  db-vm:
    kind: qemu
    role: core
    vmid: 150
    host: pve-core
    memory: 2G
    disk: {{size: 16G}}
    volumes:
      scsi1: {{size: 32G}}
"""

SURVIVAL = "guest/mc-survival"


def lab(*edits: tuple[str, str]) -> DesiredGraph:
    """The platform, with each (old, new) replaced once in the guests file."""
    return load_edited(PLATFORM, GUESTS, *edits)


def converge_to(
    graph: DesiredGraph, provider: ProxmoxProvider, *, allow_destroy: bool = False
) -> Convergence:
    return anyio.run(lambda: converge(graph, [provider], allow_destroy=allow_destroy))


def run(graph: DesiredGraph, provider: ProxmoxProvider, **kw: Any) -> Convergence:
    conv = converge_to(graph, provider, **kw)
    assert conv.ok, [(r.change.address, r.error) for r in conv.rounds[-1].report.results]
    return conv


def change_of(plan: Plan, address: str) -> Change:
    return next(c for c in plan.changes if c.address == address)


def config(provider: ProxmoxProvider, node: str, kind: str, vmid: int) -> dict[str, Any]:
    """The guest's config as Proxmox answers it (pending values merged in)."""
    out: dict[str, Any] = provider.client.nodes(node)(kind)(vmid).config.get()
    if kind == "qemu":
        for item in provider.client.nodes(node).qemu(vmid).pending.get():
            if "pending" in item:
                out[item["key"]] = item["pending"]
    return out


def ct(provider: ProxmoxProvider) -> dict[str, Any]:
    return config(provider, "pve-runtime", "lxc", 1001)


def props(value: str) -> dict[str, str]:
    first, *rest = value.split(",")
    return {"volume": first, **dict(p.split("=", 1) for p in rest)}


def finish(provider: ProxmoxProvider, upid: str) -> None:
    """Wait for a task started by hand to stop, successfully."""
    node = upid.split(":")[1]
    status: dict[str, Any] = {}
    for _ in range(1000):
        status = provider.client.nodes(node).tasks(upid).status.get()
        if status["status"] == "stopped":
            break
    assert status.get("exitstatus") == "OK", status


def assert_silent(graph: DesiredGraph, provider: ProxmoxProvider, pve: Any) -> None:
    """Converged: the next run plans nothing and writes nothing."""
    pve.requests.clear()
    again = run(graph, provider)
    assert not again.rounds[0].plan.has_changes, [
        (c.address, c.fields) for c in again.rounds[0].plan.actions
    ]
    assert mutating_calls(pve) == []


@pytest.fixture
def converged(provider: ProxmoxProvider, pve: Any) -> ProxmoxProvider:
    run(lab(), provider)
    pve.requests.clear()
    return provider


# --- volumes -----------------------------------------------------------------------------------


def test_volumes_are_created_with_their_guest_and_a_converged_platform_plans_empty(
    converged: ProxmoxProvider, pve: Any
) -> None:
    mp0 = props(ct(converged)["mp0"])
    assert mp0["mp"] == "/srv/world" and mp0["backup"] == "1" and mp0["size"] == "4G"
    assert mp0["volume"].startswith("local-lvm:vm-1001-disk-")
    assert mp0["volume"] != props(ct(converged)["rootfs"])["volume"]
    scsi1 = props(config(converged, "pve-core", "qemu", 150)["scsi1"])
    assert scsi1["volume"].startswith("local-lvm:") and scsi1["size"] == "32G"
    assert "backup" not in scsi1  # a VM disk is backed up unless backup=0
    assert_silent(lab(), converged, pve)


def test_a_volume_added_to_a_guest_is_allocated_in_place(
    converged: ProxmoxProvider, pve: Any
) -> None:
    before = ct(converged)
    graph = lab(
        (
            "      mp0: {path: /srv/world, size: 4G, backup: true}\n",
            "      mp0: {path: /srv/world, size: 4G, backup: true}\n"
            "      mp1:\n"
            "        {path: /srv/maps, size: 2G, options: {ro: true, mountoptions: [noatime]}}\n",
        ),
        (
            "      scsi1: {size: 32G}\n",
            "      scsi1: {size: 32G}\n      scsi2: {size: 8G, backup: false}\n",
        ),
    )
    conv = run(graph, converged)
    actions = {c.address: c.action for c in conv.rounds[0].plan.actions}
    assert actions == {SURVIVAL: Action.UPDATE, "guest/db-vm": Action.UPDATE}
    calls = mutating_calls(pve)
    assert not [c for c in calls if c[0] == "DELETE" or c[1].endswith(("/lxc", "/qemu"))], calls
    after = ct(converged)
    assert after["rootfs"] == before["rootfs"] and after["mp0"] == before["mp0"]
    mp1 = props(after["mp1"])
    assert mp1["mp"] == "/srv/maps" and mp1["ro"] == "1" and mp1["mountoptions"] == "noatime"
    assert mp1["volume"] not in (props(before["mp0"])["volume"], props(before["rootfs"])["volume"])
    scsi2 = props(config(converged, "pve-core", "qemu", 150)["scsi2"])
    assert scsi2["backup"] == "0"
    assert_silent(graph, converged, pve)


def test_a_grown_volume_is_resized_in_place(converged: ProxmoxProvider, pve: Any) -> None:
    volume = props(ct(converged)["mp0"])["volume"]
    graph = lab(("path: /srv/world, size: 4G", "path: /srv/world, size: 12G"))
    conv = run(graph, converged)
    [change] = conv.rounds[0].plan.actions
    assert [f.path for f in change.fields] == ["volumes.mp0.size"]
    assert mutating_calls(pve) == [("PUT", "/api2/json/nodes/pve-runtime/lxc/1001/resize")]
    mp0 = props(ct(converged)["mp0"])
    assert mp0["size"] == "12G" and mp0["volume"] == volume
    assert_silent(graph, converged, pve)


def test_a_new_mount_path_keeps_the_volume(converged: ProxmoxProvider, pve: Any) -> None:
    volume = props(ct(converged)["mp0"])["volume"]
    graph = lab(("path: /srv/world, size: 4G, backup: true", "path: /srv/mc, size: 4G"))
    run(graph, converged)
    mp0 = props(ct(converged)["mp0"])
    assert mp0["volume"] == volume and mp0["mp"] == "/srv/mc" and "backup" not in mp0
    assert mp0["size"] == "4G"
    assert not [c for c in mutating_calls(pve) if c[0] == "DELETE"]
    assert_silent(graph, converged, pve)


def test_a_shrink_is_stopped_in_the_plan_with_zero_mutating_calls(
    converged: ProxmoxProvider, pve: Any
) -> None:
    graph = lab(("path: /srv/world, size: 4G", "path: /srv/world, size: 2G"))
    conv = converge_to(graph, converged)
    plan = conv.rounds[0].plan
    assert plan.errored and not plan.applyable
    [err] = [d for d in plan.diagnostics if d.code == "disk-shrink"]
    assert "volumes.mp0 4G -> 2G" in err.message
    assert err.position is not None and err.position.file == "guests.yaml"
    assert err.position.line == GUESTS.splitlines().index("  mc-survival:") + 1
    assert mutating_calls(pve) == []
    assert props(ct(converged)["mp0"])["size"] == "4G"


def test_a_dropped_volume_is_held_back_then_detached_only_with_pruning(
    converged: ProxmoxProvider, pve: Any
) -> None:
    volume = props(ct(converged)["mp0"])["volume"]
    graph = lab(("      mp0: {path: /srv/world, size: 4G, backup: true}\n", "      {}\n"))
    held = converge_to(graph, converged)
    plan = held.rounds[0].plan
    change = change_of(plan, SURVIVAL)
    assert change.blocked and change.destroys == ("mp0 4 GiB",) and plan.actions == ()
    assert any(d.code == "destroy-blocked" for d in plan.diagnostics)
    assert mutating_calls(pve) == [] and props(ct(converged)["mp0"])["volume"] == volume

    run(graph, converged, allow_destroy=True)
    after = ct(converged)
    assert "mp0" not in after
    calls = mutating_calls(pve)
    assert calls == [("PUT", "/api2/json/nodes/pve-runtime/lxc/1001/config")], calls
    # The container runs: Proxmox detaches at its next start, and keeps the volume as
    # unusedN (its data stays on the storage).
    assert pve.ct(1001).pending == {"mp0": None}
    node = converged.client.nodes("pve-runtime")
    finish(converged, node.lxc(1001).status.stop.post())
    finish(converged, node.lxc(1001).status.start.post())
    unused = [v for k, v in ct(converged).items() if k.startswith("unused")]
    assert unused == [volume]


# --- protection -------------------------------------------------------------------------------


def protected() -> DesiredGraph:
    return lab(("    protection: false\n", "    protection: true\n"))


def test_protection_is_set_on_create_and_healed_after_a_hand_lifts_it(
    provider: ProxmoxProvider, pve: Any
) -> None:
    graph = protected()
    run(graph, provider)
    assert pve.ct(1001).config.get("protection") == 1
    provider.client.nodes("pve-runtime").lxc(1001).config.put(protection=0)
    assert pve.ct(1001).config.get("protection") == 0
    conv = run(graph, provider)
    [change] = conv.rounds[0].plan.actions
    assert change.address == SURVIVAL and [f.path for f in change.fields] == ["protection"]
    assert pve.ct(1001).config.get("protection") == 1
    assert_silent(graph, provider, pve)


def test_a_protected_guest_is_destroyed_only_by_an_allowed_delete(
    provider: ProxmoxProvider, pve: Any
) -> None:
    run(protected(), provider)
    pve.requests.clear()
    gone = lab(
        ("    protection: false\n", "    protection: true\n"),
        ("  mc-survival:\n    role: game\n", "  mc-other:\n    role: game\n"),
        ("    vmid: 1001\n", "    vmid: 1002\n"),
        ("ip: 10.20.0.11/24", "ip: 10.20.0.12/24"),
    )
    held = converge_to(gone, provider)
    delete = change_of(held.rounds[0].plan, SURVIVAL)
    assert delete.action is Action.DELETE and delete.blocked
    assert delete.destroys == ("rootfs 8 GiB", "mp0 4 GiB")
    assert not [c for c in mutating_calls(pve) if "/1001" in c[1]], mutating_calls(pve)
    assert pve.ct(1001).config.get("protection") == 1

    pve.requests.clear()
    run(gone, provider, allow_destroy=True)
    assert pve.ct(1001) is None
    mine = [c for c in mutating_calls(pve) if "/lxc/1001" in c[1]]
    assert mine[0] == ("PUT", "/api2/json/nodes/pve-runtime/lxc/1001/config")  # lifted first
    assert mine[-1] == ("DELETE", "/api2/json/nodes/pve-runtime/lxc/1001")


def test_a_protected_vm_is_deleted_only_by_an_allowed_delete(
    provider: ProxmoxProvider, pve: Any
) -> None:
    disk = "    disk: {size: 16G}\n"
    run(lab((disk, disk + "    protection: true\n")), provider)
    assert str(pve.vm(150).config.get("protection")) == "1"
    gone = lab((GUESTS[GUESTS.index("  db-vm:\n") :], ""))
    held = converge_to(gone, provider)
    delete = change_of(held.rounds[0].plan, "guest/db-vm")
    assert delete.blocked and delete.destroys == ("scsi0 16 GiB", "scsi1 32 GiB")
    assert pve.vm(150) is not None

    pve.requests.clear()
    run(gone, provider, allow_destroy=True)
    assert pve.vm(150) is None
    mine = [c for c in mutating_calls(pve) if "/qemu/150" in c[1]]
    assert mine[0] == ("PUT", "/api2/json/nodes/pve-core/qemu/150/config")  # lifted first
    assert mine[-1] == ("DELETE", "/api2/json/nodes/pve-core/qemu/150")


def test_a_protected_guest_is_replaced_only_with_pruning_and_comes_back_protected(
    provider: ProxmoxProvider, pve: Any
) -> None:
    run(protected(), provider)
    replaced = lab(
        ("    protection: false\n", "    protection: true\n"),
        ("    disk: {size: 8G}\n", "    disk: {size: 8G}\n    unprivileged: false\n"),
    )
    held = converge_to(replaced, provider)
    change = change_of(held.rounds[0].plan, SURVIVAL)
    assert change.action is Action.REPLACE and change.blocked
    assert pve.ct(1001).config.get("unprivileged") == 1

    run(replaced, provider, allow_destroy=True)
    assert not pve.ct(1001).config.get("unprivileged")
    assert pve.ct(1001).config.get("protection") == 1


def test_a_protected_containers_volumes_change_only_when_the_spec_lifts_protection(
    provider: ProxmoxProvider, pve: Any
) -> None:
    run(protected(), provider)
    pve.requests.clear()
    more = (
        "      mp0: {path: /srv/world, size: 4G, backup: true}\n",
        "      mp0: {path: /srv/world, size: 4G, backup: true}\n"
        "      mp1: {path: /srv/maps, size: 2G}\n",
    )
    refused = converge_to(
        lab(("    protection: false\n", "    protection: true\n"), more), provider
    )
    [result] = [r for r in refused.rounds[-1].report.results if r.change.address == SURVIVAL]
    assert result.error is not None and "protected guest" in str(result.error)
    assert "protection: false" in str(result.error)
    assert mutating_calls(pve) == [] and "mp1" not in pve.ct(1001).config

    run(lab(more), provider)  # the spec lifts it for this change
    assert props(pve.ct(1001).config["mp1"])["mp"] == "/srv/maps"
    assert pve.ct(1001).config.get("protection") == 0


def test_a_blocked_change_is_refused_by_the_provider_itself(
    converged: ProxmoxProvider, pve: Any
) -> None:
    plan = plan_now(
        lab(("ip: 10.20.0.11/24", "ip: 10.20.0.21/24"), ("vmid: 1001", "vmid: 1009")), converged
    )
    change = change_of(plan, SURVIVAL)
    assert change.blocked, change
    with pytest.raises(Exception, match="held back"):
        anyio.run(lambda: converged.destroy_guest(change))
    assert mutating_calls(pve) == []
