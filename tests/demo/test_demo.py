"""`reconciler demo` end to end: the lab started for real (fakepve, the simulators, two real
Traefik instances, Redis where installed, a real BIND named, a notification receiver), the story
told, everything stopped again.

named is required here as in the DNS provider's tests (a missing one fails, never skips:
deploy/dev test installs bind9); the demo without it is run on purpose, with `named_exe` saying
it is not installed."""

from __future__ import annotations

import argparse
import io
import json
import os
import time
from pathlib import Path

import pytest

from reconciler.demo.lab import NAMED_MISSING, PVE_PASSWORD_ENV
from reconciler.demo.script import DemoResult, cmd_demo_live, run_demo
from reconciler.simulators import named as named_module
from reconciler.simulators.named import NamedMissing, named_exe
from tests.conftest import SPECS

ENV = ("ZPACK_BRIDGE_SECRET", PVE_PASSWORD_ENV, "ZPACK_TSIG_SECRET", "ZPACK_NTFY_TOKEN")

# The seven ways the demo breaks the platform (`Break.key`).
BREAKS = {"velocity", "memory", "firewall", "foreign", "unready", "destroyed", "dns"}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is dead all the same.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(") ", 1)[-1][:1] != "Z"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[DemoResult, str, float]:
    try:
        named_exe()
    except NamedMissing as exc:
        pytest.fail(f"{exc} (deploy/dev test installs it)")
    state = tmp_path_factory.mktemp("demo-state")
    out = io.StringIO()
    env = {k: os.environ.get(k) for k in ENV}
    began = time.monotonic()
    result = run_demo(str(SPECS), out, color=False, state_dir=state)
    seconds = time.monotonic() - began
    assert {k: os.environ.get(k) for k in ENV} == env  # the lab put its variables back
    print(f"\n{out.getvalue()}\ndemo wall time: {seconds:.1f} s")
    return result, out.getvalue(), seconds


def test_the_demo_heals_everything_and_ends_with_an_empty_plan(
    demo: tuple[DemoResult, str, float],
) -> None:
    result, text, seconds = demo
    assert result.ok, text
    assert result.final_plan is not None
    assert not result.final_plan.has_changes
    assert not result.final_plan.errored
    # 67, and the 29 DNS record sets (21 guests' in internal.zpack.dev, 8 in play.zpack.dev).
    assert "No changes. 96 resources match the spec." in text
    assert seconds < 300  # a sanity bound: the issue asks under two minutes on two cores
    assert [s.title for s in result.steps] == [
        "an empty platform",
        "break it",
        "detect and heal",
        "move a game server",
    ]


def test_a_spec_edit_moves_a_game_server_by_migration_and_its_world_stays(
    demo: tuple[DemoResult, str, float],
) -> None:
    result, text, _ = demo
    move = result.steps[-1]
    assert move.ok, text
    migrations = [c for p in move.plans for c in p.actions if c.address == "guest/mc-survival"]
    assert [c.action.value for c in migrations] == ["migrate"]
    assert migrations[0].moves == ("pve-runtime", "pve-runtime-2")
    assert not any(c.destroys for p in move.plans for c in p.changes)
    assert "> guest/mc-survival  (vmid 1001 from pve-runtime to pve-runtime-2)" in text
    # The world's volume (mp0) and the root disk are the very same volumes after the move.
    assert "its disks are the same volumes (mp0 local-lvm:vm-1001-disk-1" in result.moved


def test_each_break_is_detected_by_the_plan_and_healed(
    demo: tuple[DemoResult, str, float],
) -> None:
    result, text, _ = demo
    plan = result.detect_plan
    assert plan is not None
    changes = {c.address: c.action.value for c in plan.actions}
    # Velocity forgot all five; three come back at once, the unready server's is withheld,
    # and so is the destroyed server's until it is back and its agent says ready.
    assert {a for a in changes if a.startswith("velocity/")} == {
        "velocity/lobby",
        "velocity/skyblock",
        "velocity/rlcraft",
    }
    assert changes["guest/mc-lobby"] == "update"
    memory = next(c for c in plan.actions if c.address == "guest/mc-lobby").fields
    assert [(f.path, f.before, f.after) for f in memory] == [("memory", 3072, 2048)]
    assert changes["firewall/group/agent"] == "update"
    assert changes["route/runtime/map-survival"] == "delete"
    assert changes["route/runtime/map-creative"] == "delete"  # its guest is gone: withheld
    withheld = {d.address for d in plan.diagnostics if d.code == "withheld"}
    assert withheld == {
        "velocity/survival",
        "route/runtime/map-survival",
        "velocity/creative",
        "route/runtime/map-creative",
    }
    # The server destroyed by hand comes back from its newest backup, not empty.
    restore = next(c for c in plan.actions if c.address == "guest/mc-creative")
    assert restore.action.value == "create" and restore.cause is not None
    assert restore.cause.value == "restore" and restore.after is not None
    assert restore.after["restore_from"]["volid"].startswith("backup:backup/vzdump-lxc-1002-")
    assert "+ guest/mc-creative  (vmid 1002 on pve-runtime)  (restored from its backup of" in text
    # The cloud-init template the bastion was cloned from is foreign too: read, never touched.
    assert [f["name"] for f in plan.foreign] == ["debian-12-cloudinit", "hand-made"]
    by_key = {b.key: b for b in result.breaks}
    assert set(by_key) == BREAKS
    for b in result.breaks:
        assert b.detected, b
        assert b.ok, b
        if b.key != "foreign":
            assert b.healed_at is not None and b.healed_at >= b.broken_at
    assert "~ guest/mc-lobby  (vmid 1000 on pve-runtime)" in text
    assert "? guest 'hand-made' vmid 1005 on pve-runtime in the game range" in text


def test_the_foreign_container_is_reported_and_never_touched(
    demo: tuple[DemoResult, str, float],
) -> None:
    result, text, _ = demo
    assert result.foreign_untouched
    assert result.final_plan is not None
    assert [f["vmid"] for f in result.final_plan.foreign] == [200, 1005]
    assert "never touched" in text


def test_the_first_apply_builds_the_bastion_from_the_cloud_init_template(
    demo: tuple[DemoResult, str, float],
) -> None:
    """specs/control.yaml's bastion: cloned from template 200 (made in the lab as an operator
    makes one), configured by cloud-init, its disk grown, in its pool, its agent answering;
    what the demo read back from Proxmox after the first apply, and what it observed last."""
    result, text, _ = demo
    first = result.steps[0].plans[0]
    create = next(c for c in first.actions if c.address == "guest/bastion")
    assert create.action.value == "create"
    assert create.after is not None and create.after["clone"]["vmid"] == 200
    (vm,) = result.vms
    assert (vm.name, vm.vmid, vm.node, vm.template, vm.template_name) == (
        "bastion",
        109,
        "pve-core",
        200,
        "debian-12-cloudinit",
    )
    assert (vm.user, vm.ssh_keys) == ("ops", 1)
    assert sorted(vm.ipconfig0.split(",")) == ["gw=10.10.0.1", "ip=10.10.0.19/24"]
    assert (vm.template_disk, vm.disk) == ("2G", "16G")
    assert vm.running and vm.agent and vm.ok
    assert (
        "+ bastion (vmid 109 on pve-core) is a VM cloned from template 200 "
        "'debian-12-cloudinit', configured by cloud-init" in " ".join(text.split())
    )
    assert "its guest agent answered" in " ".join(text.split())
    observed = json.loads((result.state_dir / "observed.json").read_text())
    bastion = next(r for r in observed["resources"] if r["address"] == "guest/bastion")
    attrs = bastion["attributes"]
    assert attrs["type"] == "qemu" and attrs["agent"] is True and attrs["addresses"]
    assert attrs["cloud_init"]["user"] == "ops"
    assert attrs["volumes"]["scsi0"].endswith("size=16G")
    template = next(r for r in observed["resources"] if r["id"].get("vmid") == 200)
    assert not template["owned"] and template["attributes"]["template"] is True


def test_every_process_started_is_gone_and_the_state_is_kept(
    demo: tuple[DemoResult, str, float],
) -> None:
    result, text, _ = demo
    assert {"fakepve", "traefik-core", "traefik-runtime", "named"} <= set(result.pids)
    assert not [name for name, pid in result.pids.items() if alive(pid)]
    state = result.state_dir
    assert f"State and logs: {state}" in text
    events = [
        json.loads(line) for line in (state / "logs" / "events.jsonl").read_text().splitlines()
    ]
    assert events[-1]["event"] == "finished" and events[-1]["ok"] is True
    assert {e["key"] for e in events if e["event"] == "broke"} == BREAKS
    assert (state / "logs" / "traefik-core.log").exists()
    assert (state / "named" / "named.conf").exists()
    assert (state / "logs" / "fakepve.log").exists()
    snapshot = json.loads((state / "observed.json").read_text())
    assert snapshot["platform"] == "zpack"
    assert (state / "plans").is_dir()


def test_the_dns_records_are_created_and_the_one_changed_by_hand_is_healed(
    demo: tuple[DemoResult, str, float],
) -> None:
    """What named answered (real DNS queries, made by the demo) after step one, and the record
    pointed elsewhere with an operator's key: seen in the plan, put back, answered again."""
    result, text, _ = demo
    assert (result.dns_records, result.dns_answered) == (29, 29)
    flat = " ".join(text.split())
    assert (
        "DNS: named answers 29 of the 29 record sets the spec derives and lists (21 in "
        "internal.zpack.dev, 8 in play.zpack.dev)" in flat
    )
    first = result.steps[0].plans[0]
    created = {c.address for c in first.actions if c.kind.value == "dns"}
    assert "dns/mc-lobby.internal.zpack.dev/A" in created and len(created) == 29
    broken = next(b for b in result.breaks if b.key == "dns")
    assert broken.expect == ("dns/play.zpack.dev/A",)
    assert broken.detected == ["~ dns/play.zpack.dev A 203.0.113.10 (was 198.51.100.7)"]
    assert broken.ok and broken.healed_at is not None, broken
    assert "named answers the spec's value" in broken.healed
    assert result.detect_plan is not None
    update = next(c for c in result.detect_plan.actions if c.address == "dns/play.zpack.dev/A")
    assert update.action.value == "update"
    assert "~ dns/play.zpack.dev A 203.0.113.10" in text


def test_the_notifications_the_breaks_produced_reach_the_receiver_and_are_printed(
    demo: tuple[DemoResult, str, float],
) -> None:
    """The notifier, fed as the service feeds it, told the spec's target `ops` three times:
    what the heal cycle put back (the restored guest, the memory, the firewall rule, Velocity's
    registrations, the DNS record), the game server that crashed (at once, not after
    `unready_after`), and that it came back. Delivered by Apprise to the lab's receiver, with
    the token the spec's URL references."""
    result, text, _ = demo
    assert [(r.path, r.authorized, r.type) for r in result.received] == [
        ("/ops", True, "warning"),
        ("/ops", True, "failure"),
        ("/ops", True, "success"),
    ]
    crashed, back = result.received[1:]
    assert crashed.title == "[zpack] guest/mc-survival: crashed (1 since its agent started)"
    assert "killed by the kernel: out of memory" in crashed.body["message"]
    assert back.title == "[zpack] resolved: guest/mc-survival: crashed (1 since its agent started)"
    message = result.received[0]
    assert message.title.startswith("[zpack] drift healed: ")
    said = message.body["message"].splitlines()
    assert "~ guest/mc-lobby: memory 3072 -> 2048" in said
    assert "+ guest/mc-creative: gone; restored from its backup" in said
    put_back = '~ dns/play.zpack.dev A 203.0.113.10: values ["198.51.100.7"] -> ["203.0.113.10"]'
    assert put_back in said
    assert {"+ velocity/lobby: not found", "+ velocity/skyblock: not found"} <= set(said)
    # The withheld routes that came back are the readiness gate at work, not drift.
    assert not [line for line in said if "route/" in line]
    assert [(n["event"], n["severity"], n["targets"]) for n in result.notifications] == [
        ("drift-healed", "warning", {"ops": "sent"}),
        ("guest-unready", "error", {"ops": "sent"}),
        ("guest-unready", "info", {"ops": "sent"}),
    ]
    title = message.title.removeprefix("[zpack] ")
    assert f"drift-healed  warning  {title}" in text
    assert "~ guest/mc-lobby: memory 3072 -> 2048" in text


def test_without_redis_or_named_the_demo_says_so_and_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def missing() -> str:
        raise NamedMissing("BIND's named is not installed: apt-get install bind9")

    monkeypatch.setattr(named_module, "named_exe", missing)
    out = io.StringIO()
    result = run_demo(str(SPECS), out, state_dir=tmp_path, use_redis=False)
    text = out.getvalue()
    assert result.ok, text
    assert "redis" not in result.pids and "named" not in result.pids
    assert "the spec says Redis; this lab runs none" in text
    assert (tmp_path / "traefik-runtime" / "runtime.yml").exists()
    assert text.count(NAMED_MISSING) == 1
    assert "No changes. 67 resources match the spec." in text  # the DNS records left out
    assert "dns" not in {b.key for b in result.breaks}
    assert {r.path for r in result.received} == {"/ops"}  # notifications go on
    assert not [name for name, pid in result.pids.items() if alive(pid)]


def test_offline_mode_validates_and_plans_against_the_sample() -> None:
    out, err = io.StringIO(), io.StringIO()
    args = argparse.Namespace(dir=str(SPECS), color="never", offline=True)
    assert cmd_demo_live(args, out, err) == 0, err.getvalue()
    text = out.getvalue()
    assert ": valid (" in text
    assert "against the sample observed state" in text
    assert "Plan for platform zpack" in text
