"""Guests moved to another node are migrated, never replaced: fakepve (PlatformPve, with QEMU
migration) and the real proxmoxer client.

A running container restarts on its new node, a running VM migrates online with its local
disks, a stopped one offline; each keeps its vmid and its disks' volume ids, nothing is
destroyed or created, and the next plan is empty. A migration whose `apply` was killed is
finished by Proxmox and picked up by the next run (one guest at that vmid, on the target). A
migration holds the per-node limit of both its nodes. Assertions read Proxmox's state, its task
list, or fakepve's request log; waits are on conditions.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import anyio
import pytest
from fakepve.model import PveError

from reconciler.applying.executor import Outcome, execute
from reconciler.cli.main import main
from reconciler.demo.lab import CLOUD_TEMPLATE_NAME, CLOUD_TEMPLATE_VMID
from reconciler.model.errors import TemporaryError
from reconciler.model.plans import Action, Plan
from reconciler.model.resources import DesiredGraph
from reconciler.model.spec import ProxmoxApi
from reconciler.providers.proxmox import ProxmoxProvider, RetryPolicy, connect
from reconciler.simulators.fakepve_process import FakePveProcess
from reconciler.simulators.pve import parse_storage_map
from tests.conftest import SPECS
from tests.fakepve_fixtures import TEMPLATE, body_of, mutating_calls
from tests.guest_helpers import load_copy, load_edited, plan_now, results, run
from tests.waiting import wait_for

NEW_NODE = "pve-runtime-2"


def moved(tmp_path: Path, *guests: str, edits: tuple[tuple[str, str], ...] = ()) -> DesiredGraph:
    """The example specs, `guests` (of game.yaml) moved to their second runtime node, and
    `edits` (old, new) made to game.yaml."""
    original = (SPECS / "game.yaml").read_text(encoding="utf-8")
    text = original
    for guest in guests:
        at = text.index("    host: pve-runtime\n", text.index(f"  {guest}:\n"))
        text = text[:at] + f"    host: {NEW_NODE}\n" + text[at + len("    host: pve-runtime\n") :]
    for old, new in edits:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    tmp_path.mkdir(parents=True, exist_ok=True)
    return load_copy(tmp_path, {"game.yaml": (original, text)})


def where(client: Any, vmid: int) -> list[dict[str, Any]]:
    """Every guest at `vmid` Proxmox lists (more than one would be a duplicate)."""
    return [g for g in client.cluster.resources.get(type="vm") if int(g["vmid"]) == vmid]


def config_of(client: Any, vmid: int) -> dict[str, Any]:
    (item,) = where(client, vmid)
    return dict(client.nodes(item["node"])(item["type"])(vmid).config.get())


def volume(value: str) -> str:
    return value.split(",", 1)[0]


def real_time_provider(api: ProxmoxApi) -> ProxmoxProvider:
    """A provider that really sleeps while it polls tasks and locks (tasks take time here)."""
    return ProxmoxProvider(
        client=connect(api),
        platform="zpack",
        source=api.url,
        retry=RetryPolicy(
            initial=0.0, maximum=0.0, lock_poll=0.05, task_poll=0.02, task_poll_max=0.1
        ),
    )


@pytest.fixture
def pve2(pve: Any) -> Any:
    pve.add_node(NEW_NODE)
    return pve


@pytest.fixture
def converged(graph: DesiredGraph, provider: ProxmoxProvider, pve2: Any) -> ProxmoxProvider:
    """The example platform, converged on fakepve (runtime guests on pve-runtime)."""
    assert run(graph, provider).ok
    pve2.requests.clear()
    return provider


# --- containers ----------------------------------------------------------------------------


def test_a_running_container_is_migrated_in_restart_mode_keeping_its_vmid_and_volume(
    converged: ProxmoxProvider, pve2: Any, tmp_path: Path
) -> None:
    client = converged.client
    before = config_of(client, 1001)
    graph = moved(tmp_path, "mc-survival")
    conv = run(graph, converged)

    plan = conv.rounds[0].plan
    assert [(c.address, c.action) for c in plan.actions] == [("guest/mc-survival", Action.MIGRATE)]
    assert plan.actions[0].moves == ("pve-runtime", NEW_NODE)
    assert conv.ok and results(conv, 0)["guest/mc-survival"].outcome is Outcome.DONE
    # Migrated, not replaced: one migrate call, no stop, destroy or create.
    assert mutating_calls(pve2) == [("POST", "/api2/json/nodes/pve-runtime/lxc/1001/migrate")]
    assert body_of(pve2, "POST", "/lxc/1001/migrate") == {"target": NEW_NODE, "restart": "1"}
    (item,) = where(client, 1001)
    assert (item["node"], item["status"], item.get("lock")) == (NEW_NODE, "running", None)
    after = config_of(client, 1001)
    assert volume(after["rootfs"]) == volume(before["rootfs"])
    assert after["hostname"] == "mc-survival"
    # Looked at again after the move (one more round), and nothing is left to do.
    assert len(conv.rounds) == 2 and not conv.rounds[1].plan.has_changes
    pve2.requests.clear()
    again = run(graph, converged)
    assert not again.rounds[0].plan.has_changes
    assert mutating_calls(pve2) == []


def test_a_move_with_other_changes_migrates_then_updates_on_the_new_node(
    converged: ProxmoxProvider, pve2: Any, tmp_path: Path
) -> None:
    bigger = ("    vmid: 1001\n", "    vmid: 1001\n    memory: 6G\n")
    conv = run(moved(tmp_path, "mc-survival", edits=(bigger,)), converged)
    (change,) = conv.rounds[0].plan.actions
    assert change.action is Action.MIGRATE
    assert {f.path for f in change.fields} == {"node", "memory"}
    assert conv.ok
    assert mutating_calls(pve2) == [
        ("POST", "/api2/json/nodes/pve-runtime/lxc/1001/migrate"),
        ("PUT", f"/api2/json/nodes/{NEW_NODE}/lxc/1001/config"),
    ]
    assert config_of(converged.client, 1001)["memory"] == 6144
    assert not conv.rounds[-1].plan.has_changes


def test_a_replace_destroys_the_guest_observed_not_the_vmid_wanted(
    converged: ProxmoxProvider, pve2: Any, tmp_path: Path
) -> None:
    """A new vmid cannot be migrated to: the guest is replaced (allowed here), and the destroy
    hits the vmid Proxmox has, never the one the spec asks for."""
    renumbered = moved(tmp_path, edits=(("    vmid: 1001\n", "    vmid: 1050\n"),))
    conv = run(renumbered, converged, allow_destroy=True)
    (change,) = conv.rounds[0].plan.actions
    assert change.action is Action.REPLACE and "vmid" in change.replace_because
    assert conv.ok
    assert ("DELETE", "/api2/json/nodes/pve-runtime/lxc/1001") in mutating_calls(pve2)
    assert where(converged.client, 1001) == []
    assert [g["name"] for g in where(converged.client, 1050)] == ["mc-survival"]


def test_a_migration_already_running_is_waited_out_and_not_started_again(
    converged: ProxmoxProvider, pve2: Any, pve_api: ProxmoxApi, tmp_path: Path
) -> None:
    """A run cut off after its migrate call: Proxmox goes on, holding lock `migrate`. The next
    run plans from what it sees (still on the old node, locked), waits for the lock, finds the
    guest on the target and calls nothing more."""
    pve2.time_scale = 0.01
    pve2.ct_secs["migrate"] = 100  # 1 s
    client = converged.client
    rootfs = volume(config_of(client, 1001)["rootfs"])
    client.nodes("pve-runtime").lxc(1001).migrate.post(target=NEW_NODE, restart=1)
    wait_for(lambda: where(client, 1001)[0].get("lock") == "migrate", "the migrate lock", 5)
    pve2.requests.clear()

    conv = run(moved(tmp_path, "mc-survival"), real_time_provider(pve_api))

    (change,) = conv.rounds[0].plan.actions
    assert change.action is Action.MIGRATE
    # Planned from a guest mid-move (stopped for its restart): only the move is acted on.
    assert {f.path for f in change.fields} == {"node", "state"}
    assert results(conv, 0)["guest/mc-survival"].outcome is Outcome.DONE
    assert conv.ok
    assert mutating_calls(pve2) == []
    (item,) = where(client, 1001)
    assert (item["node"], item["status"]) == (NEW_NODE, "running")
    assert volume(config_of(client, 1001)["rootfs"]) == rootfs
    assert not conv.rounds[-1].plan.has_changes


def test_a_migration_of_a_guest_that_is_not_ours_is_refused(
    converged: ProxmoxProvider, pve2: Any, tmp_path: Path
) -> None:
    client = converged.client
    plan = plan_now(moved(tmp_path, "mc-survival"), converged)
    (change,) = plan.actions
    # Someone rewrites the description (our mark) between the plan and the apply.
    client.nodes("pve-runtime").lxc(1001).config.put(description="hand made")
    pve2.requests.clear()
    report = anyio.run(lambda: execute(plan, [converged]))
    (result,) = report.results
    assert result.outcome is Outcome.FAILED and "does not carry our mark" in result.error
    assert mutating_calls(pve2) == []
    assert where(client, 1001)[0]["node"] == "pve-runtime"
    assert change.action is Action.MIGRATE


# --- VMs -----------------------------------------------------------------------------------

PLATFORM = """
platform: {name: zpack, owner_tag: reconciler, default_storage: local-lvm}
layers:
  apps: {}
hosts:
  pve-core: {layers: [apps], capacity: {cores: 16, memory: 64G}}
  pve-runtime: {layers: [apps], capacity: {cores: 32, memory: 128G}}
ranges:
  apps: {first: 500, last: 599, layer: apps}
"""

GUESTS = """
guests:
  app-vm:
    kind: qemu
    role: apps
    host: pve-core
    vmid: 500
    cores: 2
    memory: 2G
    disk: {size: 16G}
    network:
      - {bridge: vmbr0, tag: 20}
  cold-vm:
    kind: qemu
    role: apps
    host: pve-core
    vmid: 501
    memory: 1G
    disk: {size: 8G}
    state: stopped
    network:
      - {bridge: vmbr0, tag: 20}
  side-vm:
    kind: qemu
    role: apps
    host: pve-runtime
    vmid: 502
    memory: 1G
    disk: {size: 8G}
    network:
      - {bridge: vmbr0, tag: 20}
"""


def vms(*edits: tuple[str, str]) -> DesiredGraph:
    return load_edited(PLATFORM, GUESTS, *edits)


def move_vm(name: str, old: str = "pve-core", new: str = "pve-runtime") -> tuple[str, str]:
    """The edit that moves a VM of GUESTS from `old` to `new`."""
    head = f"  {name}:\n    kind: qemu\n    role: apps\n"
    return (f"{head}    host: {old}\n", f"{head}    host: {new}\n")


@pytest.fixture
def vms_up(provider: ProxmoxProvider, pve: Any) -> ProxmoxProvider:
    assert run(vms(), provider).ok
    pve.requests.clear()
    return provider


def test_a_running_vm_migrates_online_with_its_local_disks(
    vms_up: ProxmoxProvider, pve: Any
) -> None:
    client = vms_up.client
    disk = volume(config_of(client, 500)["scsi0"])
    conv = run(vms(move_vm("app-vm")), vms_up)

    assert [(c.address, c.action) for c in conv.rounds[0].plan.actions] == [
        ("guest/app-vm", Action.MIGRATE)
    ]
    assert conv.ok
    assert mutating_calls(pve) == [("POST", "/api2/json/nodes/pve-core/qemu/500/migrate")]
    assert body_of(pve, "POST", "/qemu/500/migrate") == {
        "target": "pve-runtime",
        "online": "1",
        "with-local-disks": "1",
    }
    (item,) = where(client, 500)
    assert (item["node"], item["status"]) == ("pve-runtime", "running")
    assert volume(config_of(client, 500)["scsi0"]) == disk
    assert not plan_now(vms(move_vm("app-vm")), vms_up).has_changes


def test_a_stopped_vm_migrates_offline(vms_up: ProxmoxProvider, pve: Any) -> None:
    client = vms_up.client
    disk = volume(config_of(client, 501)["scsi0"])
    conv = run(vms(move_vm("cold-vm")), vms_up)
    assert conv.ok
    assert body_of(pve, "POST", "/qemu/501/migrate") == {"target": "pve-runtime"}
    (item,) = where(client, 501)
    assert (item["node"], item["status"]) == ("pve-runtime", "stopped")
    assert volume(config_of(client, 501)["scsi0"]) == disk
    assert not plan_now(vms(move_vm("cold-vm")), vms_up).has_changes


def test_a_vm_moved_with_its_disk_to_another_storage_migrates_there(
    vms_up: ProxmoxProvider, pve: Any
) -> None:
    pve.storages["fast"] = {
        "type": "lvmthin",
        "active": 1,
        "content": "images,rootdir",
        "files": set(),
        "vgname": "fast",
        "thinpool": "data",
    }
    old = volume(config_of(vms_up.client, 500)["scsi0"])
    edits = (move_vm("app-vm"), ("disk: {size: 16G}", "disk: {size: 16G, storage: fast}"))
    conv = run(vms(*edits), vms_up)
    (change,) = conv.rounds[0].plan.actions
    assert change.action is Action.MIGRATE
    assert {f.path for f in change.fields} == {"node", "volumes.scsi0.storage"}
    assert conv.ok
    assert body_of(pve, "POST", "/qemu/500/migrate")["targetstorage"] == "local-lvm:fast"
    assert volume(config_of(vms_up.client, 500)["scsi0"]) == "fast:vm-500-disk-0"
    assert old.split(":", 1)[1] not in pve.storages["local-lvm"].get("volumes", {})
    assert not plan_now(vms(*edits), vms_up).has_changes


# --- what the fake does the way PVE does ---------------------------------------------------


@pytest.mark.parametrize(
    ("params", "status", "message"),
    [
        ({"target": "pve-core"}, 400, "target is local node."),
        ({"target": "pve-nowhere"}, 500, "no such cluster node 'pve-nowhere'"),
        ({"target": "pve-runtime"}, 500, "can't migrate running VM without --online"),
    ],
)
def test_the_fake_refuses_a_vm_migration_as_pve_does(
    vms_up: ProxmoxProvider, params: dict[str, str], status: int, message: str
) -> None:
    from proxmoxer.core import ResourceException

    with pytest.raises(ResourceException) as caught:
        vms_up.client.nodes("pve-core").qemu(500).migrate.post(**params)
    assert caught.value.status_code == status
    assert message in str(caught.value.content) + str(caught.value.errors)


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("fast", ({}, "fast", False)),
        ("local-lvm:fast,local:slow", ({"local-lvm": "fast", "local": "slow"}, None, False)),
        ("1", ({}, None, True)),
        ("fast,slow", "default target ID can only be provided once"),
        ("a:b,a:c", "duplicate mapping for source 'a'"),
        ("1,fast", "identity mapping cannot be combined with other mappings"),
    ],
)
def test_the_fake_reads_a_target_storage_map_as_pve_does(text: str, parsed: Any) -> None:
    if isinstance(parsed, tuple):
        assert parse_storage_map(text) == parsed
        return
    with pytest.raises(PveError) as caught:
        parse_storage_map(text)
    assert caught.value.errors == {"targetstorage": f"failed to parse storage map: {parsed}"}


def test_the_fake_aborts_an_online_migration_of_local_disks_without_with_local_disks(
    vms_up: ProxmoxProvider, pve: Any
) -> None:
    client = vms_up.client
    upid = client.nodes("pve-core").qemu(500).migrate.post(target="pve-runtime", online=1)
    task = client.nodes("pve-core").tasks(upid)
    assert task.status.get()["exitstatus"] == "migration aborted"
    log = "\n".join(line["t"] for line in task.log.get())
    assert "can't live migrate attached local disks without with-local-disks option" in log
    (item,) = where(client, 500)
    assert (item["node"], item.get("lock")) == ("pve-core", None)


def test_an_ha_managed_vm_is_queued_with_the_ha_manager_and_waited_for(
    vms_up: ProxmoxProvider, pve: Any, pve_api: ProxmoxApi
) -> None:
    """The API answers an HA-managed VM's migration with a `hamigrate` task that only asks the
    HA manager, which moves the VM later: the provider waits until it shows on the target."""
    pve.vm(500).ha_state = "started"
    pve.time_scale = 0.01  # the HA manager acts 0.1 s later; the migration takes 0.1 s
    conv = run(vms(move_vm("app-vm")), real_time_provider(pve_api))
    assert conv.ok, [(r.change.address, r.error) for r in conv.rounds[0].report.results]
    kinds = [t["type"] for t in pve.tasklog if t["id"] == "500"]
    assert kinds[-2:] == ["hamigrate", "qmigrate"]
    (item,) = where(vms_up.client, 500)
    assert (item["node"], item["status"]) == ("pve-runtime", "running")
    assert not conv.rounds[-1].plan.has_changes


# --- per-node limits -----------------------------------------------------------------------


@dataclass
class Overlap:
    running: int = 0
    most: int = 0


def count_tasks(pve: Any, monkeypatch: pytest.MonkeyPatch, *kinds: str) -> Overlap:
    """Tasks of these kinds running at once, counted inside the fake while their bodies run."""
    seen = Overlap()
    task = pve.task

    async def counted(node: str, ttype: str, tid: Any, user: str, body: Any, **kw: Any) -> Any:
        if ttype not in kinds:
            return await task(node, ttype, tid, user, body, **kw)

        async def measured() -> Any:
            seen.running += 1
            seen.most = max(seen.most, seen.running)
            try:
                return await body()
            finally:
                seen.running -= 1

        return await task(node, ttype, tid, user, measured, **kw)

    monkeypatch.setattr(pve, "task", counted)
    return seen


def apply_with(plan: Plan, provider: ProxmoxProvider, per_host: int) -> Any:
    async def apply() -> Any:
        with anyio.fail_after(30):  # a deadlock fails the test instead of hanging it
            return await execute(plan, [provider], per_host=per_host)

    report = anyio.run(apply)
    assert report.ok, [(r.change.address, r.error) for r in report.results]
    return report


@pytest.mark.parametrize(("per_host", "overlap"), [(1, 1), (2, 2)])
def test_two_vms_swapping_nodes_share_both_limits_and_never_deadlock(
    per_host: int,
    overlap: int,
    vms_up: ProxmoxProvider,
    pve: Any,
    pve_api: ProxmoxApi,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One VM each way: with per_host=1 they need the same two nodes, so they run one after the
    other (taking the limits in one order keeps them from waiting on each other for ever);
    with 2 they overlap, which shows the count can see it."""
    pve.time_scale = 0.01
    pve.migrate_secs = 30  # 0.3 s each
    seen = count_tasks(pve, monkeypatch, "qmigrate")
    provider = real_time_provider(pve_api)
    plan = plan_now(vms(move_vm("app-vm"), move_vm("side-vm", "pve-runtime", "pve-core")), provider)
    assert sorted((c.address, c.moves) for c in plan.actions) == [
        ("guest/app-vm", ("pve-core", "pve-runtime")),
        ("guest/side-vm", ("pve-runtime", "pve-core")),
    ]
    apply_with(plan, provider, per_host)
    assert seen.most == overlap
    assert [g["node"] for g in where(provider.client, 500)] == ["pve-runtime"]
    assert [g["node"] for g in where(provider.client, 502)] == ["pve-core"]


@pytest.mark.parametrize(("per_host", "overlap"), [(1, 1), (2, 2)])
def test_a_migration_holds_the_limit_of_the_node_it_leaves(
    per_host: int,
    overlap: int,
    vms_up: ProxmoxProvider,
    pve: Any,
    pve_api: ProxmoxApi,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A VM leaving pve-core and another started on pve-core: with per_host=1 the start waits
    for the migration (the source node works for the whole move)."""
    pve.time_scale = 0.01
    pve.migrate_secs = 30
    pve.vm(501).start_secs = 30
    seen = count_tasks(pve, monkeypatch, "qmigrate", "qmstart")
    provider = real_time_provider(pve_api)
    plan = plan_now(vms(move_vm("app-vm"), ("    state: stopped\n", "")), provider)
    assert sorted((c.address, c.action) for c in plan.actions) == [
        ("guest/app-vm", Action.MIGRATE),
        ("guest/cold-vm", Action.UPDATE),
    ]
    apply_with(plan, provider, per_host)
    assert seen.most == overlap
    assert [g["status"] for g in where(provider.client, 501)] == ["running"]


# --- a migration cut off by SIGKILL --------------------------------------------------------


@pytest.fixture
def pve_process() -> Iterator[FakePveProcess]:
    """fakepve (PlatformPve) in its own process: a migration takes 5 s of real time, long
    enough for the next `apply` to start while it runs."""
    with FakePveProcess(
        nodes=("pve-core", "pve-runtime", NEW_NODE), time_scale=0.1, migrate_secs=50
    ) as fake:
        fake.seed_template(TEMPLATE)
        fake.seed_vm_template(CLOUD_TEMPLATE_VMID, CLOUD_TEMPLATE_NAME, "pve-core")  # the bastion's
        yield fake


def cli(fake: FakePveProcess, *args: str) -> list[str]:
    return [
        *args,
        "--no-edge",
        "--proxmox-url",
        fake.url,
        "--proxmox-user",
        "root@pam",
        "--proxmox-password-env",
        "FAKEPVE_PASSWORD",
        "--ca-file",
        fake.cafile,
    ]


def test_a_migration_cut_off_by_sigkill_is_picked_up_by_the_next_apply(
    pve_process: FakePveProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKEPVE_PASSWORD", pve_process.password)
    assert main(cli(pve_process, "apply", str(SPECS), "--auto-approve")) == 0
    client = pve_process.client()
    rootfs = volume(config_of(client, 1001)["rootfs"])
    moved(tmp_path, "mc-survival")
    specs = tmp_path / "specs"

    env = {**os.environ, "FAKEPVE_PASSWORD": pve_process.password, "PYTHONUNBUFFERED": "1"}
    args = [
        sys.executable,
        "-m",
        "reconciler.cli.main",
        *cli(pve_process, "apply", str(specs), "--auto-approve"),
    ]
    first = subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        wait_for(lambda: where(client, 1001)[0].get("lock") == "migrate", "the migrate lock", 60)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
        if first.stdout is not None:
            first.stdout.close()
    assert first.returncode == -signal.SIGKILL
    assert where(client, 1001)[0]["node"] == "pve-runtime"  # still moving

    second = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stdout + second.stderr
    # It saw the guest still on its old node, under the lock (stopped: a container migrates in
    # restart mode), waited for Proxmox to finish, and found it on the target.
    assert "> guest/mc-survival" in second.stdout
    assert "> guest/mc-survival: done" in second.stderr

    (item,) = where(client, 1001)
    assert (item["node"], item["status"], item.get("lock")) == (NEW_NODE, "running", None)
    assert [
        g["vmid"] for g in client.cluster.resources.get(type="vm") if g["name"] == "mc-survival"
    ] == [1001]
    assert volume(config_of(client, 1001)["rootfs"]) == rootfs
    tasks = [
        t["type"]
        for node in ("pve-core", "pve-runtime", NEW_NODE)
        for t in client.nodes(node).tasks.get(vmid=1001, limit=500)
    ]
    assert tasks.count("vzmigrate") == 1, tasks
    assert "vzdestroy" not in tasks and tasks.count("vzcreate") == 1, tasks
    again = subprocess.run(
        [
            sys.executable,
            "-m",
            "reconciler.cli.main",
            *cli(pve_process, "plan", str(specs), "--detailed-exitcode"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 0, again.stdout + again.stderr


def test_a_destroy_planned_on_a_node_the_guest_left_is_not_reported_done(
    converged: ProxmoxProvider, pve2: Any, graph: DesiredGraph
) -> None:
    """HA (or someone) moved the guest after the plan: the destroy finds nothing at the planned
    node. It is not "already gone": the guest stands elsewhere, so the change is not done and
    nothing is destroyed; the next plan sees where it is."""
    client = converged.client
    plan = plan_now(graph, converged)
    item = where(client, 1001)[0]
    change = next(c for c in plan.changes if c.address == "guest/mc-survival")
    doomed = replace(
        change,
        action=Action.DELETE,
        before=change.after,
        after=None,
        id={"vmid": 1001, "node": item["node"]},
        fields=(),
    )
    client.nodes(item["node"]).lxc(1001).migrate.post(target=NEW_NODE, restart=1)
    wait_for(lambda: where(client, 1001)[0]["node"] == NEW_NODE, "the migration ends")
    with pytest.raises(TemporaryError, match=f"vmid 1001 is on {NEW_NODE} now"):
        anyio.run(converged.apply, doomed)
    assert [g["node"] for g in where(client, 1001)] == [NEW_NODE]
