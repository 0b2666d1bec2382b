"""`reconciler backup`, `backups` and `restore` through `main()`, against fakepve (extended with
backups: reconciler/simulators/pve_backup.py) and, for the lease, a real redis-server.

A small platform of its own (two protected-or-not game servers a job selects, a dev container
none does) is applied first; what the commands do is read back from Proxmox (volumes, configs,
firewall options) and from fakepve's request log: a refusal makes no mutating call at all.
"""

from __future__ import annotations

import datetime
import itertools
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from redis.asyncio import Redis

from reconciler.cli.main import main
from reconciler.controller.lease import RedisLease
from reconciler.model.errors import PermanentError
from reconciler.model.spec import ProxmoxApi
from tests.cli.test_live import flags
from tests.fakepve_fixtures import TEMPLATE, mutating_calls, request_bodies
from tests.guest_helpers import GAME_RANGE, platform_yaml
from tests.waiting import until

PLATFORM = platform_yaml(GAME_RANGE, "dev: {first: 1100, last: 1199, layer: runtime}")
GUESTS = f"""
profiles:
  game:
    template: local:vztmpl/{TEMPLATE}
    cores: 2
    memory: 2G
    disk: {{size: 8G}}
    volumes:
      mp0: {{path: /srv/world, size: 4G, backup: true}}
    firewall:
      enable: true
      policy_in: DROP
      rules:
        - {{type: in, action: ACCEPT, proto: tcp, dport: 25565, comment: players}}
guests:
  mc-lobby:
    role: game
    vmid: 1000
    host: pve-runtime
    profile: game
    protection: true
    network:
      - {{name: eth0, bridge: vmbr0, ip: 10.20.0.10/24, gw: 10.20.0.1}}
  mc-survival:
    role: game
    vmid: 1001
    host: pve-runtime
    profile: game
    network:
      - {{name: eth0, bridge: vmbr0, ip: 10.20.0.11/24, gw: 10.20.0.1}}
  dev-one:
    role: dev
    vmid: 1100
    host: pve-runtime
    template: local:vztmpl/{TEMPLATE}
    network:
      - {{name: eth0, bridge: vmbr0, ip: 10.20.0.20/24, gw: 10.20.0.1}}
  vm-build:
    kind: qemu
    role: dev
    vmid: 1101
    host: pve-runtime
    cores: 2
    memory: 2G
    disk: {{size: 16G}}
    network:
      - {{bridge: vmbr0}}
backups:
  worlds:
    schedule: "*-*-* 00/6:00"
    storage: backup
    select: {{roles: [game]}}
"""
NODE = "pve-runtime"
LEASE_KEY = "reconciler:reconciler:lease"  # RedisLease's key for the lease "reconciler"


@pytest.fixture
def specs(tmp_path: Path) -> Path:
    target = tmp_path / "specs"
    target.mkdir()
    (target / "platform.yaml").write_text(PLATFORM, encoding="utf-8")
    (target / "guests.yaml").write_text(GUESTS, encoding="utf-8")
    return target


@pytest.fixture
def cli(specs: Path, pve_api: ProxmoxApi, capsys: pytest.CaptureFixture[str]) -> Any:
    """Run a command against the applied platform: (exit code, stdout, stderr)."""

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main([*argv, *flags(pve_api)])
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def applied(cli: Any, specs: Path, pve: Any) -> Any:
    code, out, err = cli("apply", str(specs), "--auto-approve", "--color", "never")
    assert code == 0, out + err
    # Backups take time on a real cluster: each one here starts a minute after the last, so
    # two backups of a guest never share a name (vzdump names them by the second).
    ticks = itertools.count(int(time.time()), 60)
    pve.backup_clock = lambda: float(next(ticks))
    pve.requests.clear()
    return cli


def client_of(pve_api: ProxmoxApi) -> Any:
    from reconciler.providers.proxmox import connect

    return connect(pve_api)


def ct(client: Any, vmid: int) -> Any:
    return client.nodes(NODE).lxc(vmid)


def listed(client: Any, vmid: int | None = None) -> list[dict[str, Any]]:
    query: dict[str, Any] = {"content": "backup"}
    if vmid is not None:
        query["vmid"] = vmid
    return list(client.nodes(NODE).storage("backup").content.get(**query))


def mac_of(net: str) -> str:
    found = re.search(r"hwaddr=([0-9A-Fa-f:]{17})", net)
    assert found, net
    return found.group(1)


def utc(epoch: int) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def strip_mark(client: Any, vmid: int, *, forged_for: int | None = None) -> None:
    """The guest's mark taken off (a guest handed back to people), or replaced by a copy's
    (a mark naming another vmid: claims nothing)."""
    config = ct(client, vmid).config
    if forged_for is None:
        config.put(delete="description")
    else:
        config.put(
            description=f"reconciler:v1 platform=zpack address=guest/mc-survival vmid={forged_for}"
        )


# --- backup -------------------------------------------------------------------------------


@pytest.fixture
def backup(applied: Any, specs: Path) -> Any:
    """`reconciler backup GUEST... --dir SPECS`."""

    def run(*argv: str) -> tuple[int, str, str]:
        result: tuple[int, str, str] = applied("backup", *argv, "--dir", str(specs))
        return result

    return run


def test_backup_makes_one_volume_per_guest_on_its_jobs_storage(
    backup: Any, pve_api: ProxmoxApi, pve: Any
) -> None:
    client = client_of(pve_api)
    assert listed(client) == []
    code, out, err = backup("mc-survival", "mc-lobby")
    assert code == 0, out + err
    volids = {int(b["vmid"]): b["volid"] for b in listed(client)}
    assert sorted(volids) == [1000, 1001]
    for vmid, address in ((1001, "guest/mc-survival"), (1000, "guest/mc-lobby")):
        assert f"{address} (vmid {vmid} on {NODE}): backing up to backup (job backup/worlds" in out
        assert f"{address}: done: {volids[vmid]}, " in out
    bodies = request_bodies(pve, "POST", f"/nodes/{NODE}/vzdump")
    assert [(b["vmid"], b["storage"], b["mode"], b["compress"]) for b in bodies] == [
        ("1001", "backup", "snapshot", "zstd"),
        ("1000", "backup", "snapshot", "zstd"),
    ]
    assert {b["notes-template"] for b in bodies} == {"{{guestname}}"}
    # The notes are the job's: the guest's name, as restore's checks read it.
    assert {b.get("notes") for b in listed(client)} == {"mc-survival", "mc-lobby"}


def test_backup_of_a_guest_no_job_selects_needs_a_storage(
    backup: Any, pve_api: ProxmoxApi, pve: Any
) -> None:
    code, _, err = backup("dev-one")
    assert code == 2
    assert "guest/dev-one: no backup job of the spec selects it" in err and "--storage" in err
    assert mutating_calls(pve) == []
    code, out, err = backup("dev-one", "--storage", "backup")
    assert code == 0, out + err
    assert [int(b["vmid"]) for b in listed(client_of(pve_api))] == [1100]


@pytest.mark.parametrize("forged", [False, True], ids=["no-mark", "a-copy's-mark"])
def test_backup_refuses_a_guest_that_is_not_ours_and_does_nothing(
    backup: Any, pve_api: ProxmoxApi, pve: Any, forged: bool
) -> None:
    client = client_of(pve_api)
    strip_mark(client, 1001, forged_for=1000 if forged else None)
    pve.requests.clear()
    # mc-lobby is ours, but nothing is backed up when any guest named is refused.
    code, _, err = backup("mc-lobby", "mc-survival")
    assert code == 2
    assert "guest/mc-survival: vmid 1001 (on pve-runtime) holds a guest that does not carry" in err
    assert "nothing done" in err
    assert mutating_calls(pve) == []
    assert listed(client) == []


def test_backup_refuses_a_name_outside_the_spec(backup: Any, pve: Any) -> None:
    code, _, err = backup("mc-lobby", "mc-nope")
    assert code == 2
    assert "'mc-nope' is not a guest of the spec" in err
    assert mutating_calls(pve) == []


def test_a_failed_backup_says_why_and_the_others_go_on(
    backup: Any, pve_api: ProxmoxApi, pve: Any
) -> None:
    client = client_of(pve_api)
    # Only root may set this; a locked guest fails its backup with vzdump's words.
    pve.ct(1001).lock = "mounted"
    code, out, _ = backup("mc-survival", "mc-lobby")
    pve.ct(1001).lock = None
    assert code == 1
    assert "guest/mc-survival: failed:" in out and "CT is locked (mounted)" in out
    assert "guest/mc-lobby: done: " in out
    assert [int(b["vmid"]) for b in listed(client)] == [1000]


# --- backups ------------------------------------------------------------------------------


def test_backups_lists_newest_first_per_guest_as_a_table_and_as_json(
    applied: Any, specs: Path, pve: Any
) -> None:
    now = int(time.time())
    pve.add_backup("backup", 1001, now - 3 * 86400, notes="mc-survival")
    pve.add_backup("backup", 1000, now - 7200, notes="mc-lobby", protected=True)
    newest = pve.add_backup("backup", 1001, now - 600, notes="mc-survival", size=3 * 1024**3)
    pve.add_backup("backup", 1050, now - 60, kind="lxc", notes="gone")  # of no spec guest
    pve.requests.clear()

    code, out, err = applied("backups", "--dir", str(specs), "--format", "json")
    assert code == 0, out + err
    doc = json.loads(out)
    assert doc["format"] == "reconciler/backups" and doc["format_version"] == 1
    assert doc["platform"] == "zpack" and doc["storages"] == ["backup"]
    rows = doc["backups"]
    assert [(r["guest"], r["vmid"]) for r in rows] == [
        ("mc-lobby", 1000),
        ("mc-survival", 1001),
        ("mc-survival", 1001),
        (None, 1050),
    ]
    assert rows[1]["volid"] == newest and rows[1]["ctime"] == now - 600
    assert rows[1]["size"] == 3 * 1024**3 and rows[1]["created"] == utc(now - 600)
    assert rows[0]["protected"] is True and rows[1]["protected"] is False
    assert rows[0]["notes"] == "mc-lobby" and rows[0]["storage"] == "backup"
    assert rows[0]["node"] is None and rows[0]["type"] == "lxc"  # a shared storage
    assert 600 <= rows[1]["age_seconds"] < 3 * 86400 <= rows[2]["age_seconds"]
    # One listing of the shared storage, through one node; nothing changed.
    listings = [p for m, p, _ in pve.requests if m == "GET" and "/storage/backup/content" in p]
    assert len(listings) == 1
    assert mutating_calls(pve) == []

    code, out, _ = applied("backups", "mc-survival", "--dir", str(specs))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["GUEST", "VMID", "VOLID", "AGE", "SIZE", "PROTECTED", "NOTES"]
    assert len(lines) == 3 and all(line.startswith("mc-survival  1001") for line in lines[1:])
    assert newest in lines[1] and "3.0 GiB" in lines[1] and "  10m  " in lines[1]
    assert "  3d  " in lines[2]

    code, out, _ = applied("backups", "mc-lobby", "--dir", str(specs), "--format", "json")
    assert [r["vmid"] for r in json.loads(out)["backups"]] == [1000]
    code, _, err = applied("backups", "nobody", "--dir", str(specs))
    assert code == 2 and "'nobody' is not a guest of the spec" in err


def test_backups_with_none_says_so(applied: Any, specs: Path) -> None:
    code, out, _ = applied("backups", "--dir", str(specs))
    assert code == 0 and out == "No backups on backup.\n"


# --- restore ------------------------------------------------------------------------------


@pytest.fixture
def restore(applied: Any, specs: Path) -> Any:
    """`reconciler restore GUEST ... --dir SPECS`."""

    def run(*argv: str) -> tuple[int, str, str]:
        result: tuple[int, str, str] = applied("restore", *argv, "--dir", str(specs))
        return result

    return run


def firewall_enabled(client: Any, vmid: int) -> bool:
    return int(ct(client, vmid).firewall.options.get().get("enable", 0)) == 1


def test_restore_in_place_brings_the_backup_back_then_converges_it_to_the_spec(
    backup: Any, restore: Any, applied: Any, specs: Path, pve_api: ProxmoxApi, pve: Any
) -> None:
    client = client_of(pve_api)
    guest = ct(client, 1000)
    config = guest.config.get()
    mac = mac_of(config["net0"])
    assert int(config["protection"]) == 1 and config["cores"] == 2
    # Drift made by hand before the backup: it is in the backup, and the spec puts it right.
    guest.config.put(cores=3)
    guest.firewall.options.put(enable=0)
    code, out, err = backup("mc-lobby")
    assert code == 0, out + err
    (made,) = listed(client, 1000)
    # After the backup: a new NIC (a new MAC) and more memory, which the restore undoes.
    guest.config.put(memory=4096, net0="name=eth0,bridge=vmbr0,ip=10.20.0.99/24,gw=10.20.0.1")
    assert mac_of(guest.config.get()["net0"]) != mac
    pve.requests.clear()

    code, out, err = restore("mc-lobby", "--yes")
    assert code == 0, out + err
    assert "Restore guest/mc-lobby (vmid 1000, lxc, on pve-runtime) from" in out
    assert made["volid"] in out and "rootfs" in out and "mp0" in out
    assert (
        "First its current state is backed up to backup, then its protection is lifted, "
        "then it is stopped, then it is restored" in out
    )
    # What it overwrote was backed up first, to the same storage, and is still there.
    dumps = request_bodies(pve, "POST", f"/nodes/{NODE}/vzdump")
    assert len(dumps) == 1 and dumps[0]["vmid"] == "1000" and dumps[0]["storage"] == "backup"
    assert any("before restore" in str(b.get("notes", "")) for b in listed(client, 1000))
    posts = request_bodies(pve, "POST", f"/nodes/{NODE}/lxc")
    assert len(posts) == 1
    assert posts[0]["ostemplate"] == made["volid"] and posts[0]["vmid"] == "1000"
    assert (posts[0]["restore"], posts[0]["force"], posts[0]["storage"]) == ("1", "1", "local-lvm")

    config = guest.config.get()
    assert mac_of(config["net0"]) == mac and "ip=10.20.0.10/24" in config["net0"]
    assert int(config["memory"]) == 2048 and int(config["cores"]) == 2
    assert int(config["protection"]) == 1
    assert "reconciler:v1 platform=zpack address=guest/mc-lobby vmid=1000" in config["description"]
    assert firewall_enabled(client, 1000)
    assert guest.status.current.get()["status"] == "running"
    # Converged: a plan now has nothing to do.
    code, out, _ = applied("plan", str(specs), "--detailed-exitcode")
    assert code == 0, out


def test_restore_of_a_vm_in_place_sends_the_archive_with_force(
    backup: Any,
    restore: Any,
    pve_api: ProxmoxApi,
    pve: Any,
) -> None:
    client = client_of(pve_api)
    vm = client.nodes(NODE).qemu(1101)
    mac = vm.config.get()["net0"].split(",")[0].split("=")[1]
    # Stopped, so what is changed by hand is the config, not pending until a restart.
    vm.status.stop.post()
    until(lambda: vm.status.current.get()["status"] == "stopped")
    vm.config.put(cores=4)  # drift in the backup
    code, out, err = backup("vm-build", "--storage", "backup")
    assert code == 0, out + err
    (made,) = listed(client, 1101)
    vm.config.put(net0="virtio,bridge=vmbr0")  # a new NIC after it: a new MAC
    assert mac not in vm.config.get()["net0"]
    pve.requests.clear()

    code, out, err = restore("vm-build", "--storage", "backup", "--yes")
    assert code == 0, out + err
    assert "Restore guest/vm-build (vmid 1101, qemu, on pve-runtime) from" in out
    posts = request_bodies(pve, "POST", f"/nodes/{NODE}/qemu")
    assert len(posts) == 1 and (posts[0]["archive"], posts[0]["force"]) == (made["volid"], "1")
    config = vm.config.get()
    assert f"virtio={mac}" in config["net0"] and int(config["cores"]) == 2
    assert "address=guest/vm-build vmid=1101" in config["description"]
    assert vm.status.current.get()["status"] == "running"


def test_a_vzdump_that_selects_no_guest_is_no_backup(
    applied: Any, provider: Any, pve_api: ProxmoxApi
) -> None:
    # vzdump on a node the guest is not on answers "OK" without a task: nothing was made.
    with pytest.raises(PermanentError, match="vzdump made no backup"):
        anyio.run(lambda: provider.backup_now("pve-core", 1000, "backup"))
    assert listed(client_of(pve_api)) == []


def test_restore_at_a_time_takes_the_newest_backup_by_then(
    restore: Any, pve_api: ProxmoxApi, pve: Any
) -> None:
    older = pve.add_backup("backup", 1001, 1_900_000_000, notes="mc-survival")
    newer = pve.add_backup("backup", 1001, 1_900_086_400, notes="mc-survival")
    pve.requests.clear()
    code, out, _ = restore("mc-survival", "--at", "2030-03-18 12:00", "--dry-run")
    assert code == 0 and older in out and newer not in out and "Dry run: nothing done." in out
    code, out, _ = restore("mc-survival", "--at", "2030-03-18T17:46:40+00:00", "--dry-run")
    assert code == 0 and newer in out
    code, out, _ = restore("mc-survival", "--dry-run")  # --latest
    assert code == 0 and newer in out
    assert mutating_calls(pve) == []


REFUSALS = {
    "another guest's backup": (
        ["mc-lobby", "--from", "{survival}"],
        "is a backup of vmid 1001 (guest/mc-survival), not of guest/mc-lobby (vmid 1000)",
    ),
    "a guest outside the spec": (["mc-nope"], "'mc-nope' is not a guest of the spec"),
    "an unknown volid": (
        ["mc-lobby", "--from", "backup:backup/vzdump-lxc-1000-2001_01_01-00_00_00.tar.zst"],
        "there is no backup backup:backup/vzdump-lxc-1000-2001_01_01-00_00_00.tar.zst",
    ),
    "a time before any backup": (
        ["mc-lobby", "--at", "2001-01-01 00:00"],
        "guest/mc-lobby: no backup at or before 2001-01-01 00:00:00 UTC on backup",
    ),
    "no backup at all": (["mc-survival"], "guest/mc-survival: no backup of vmid 1001 on backup"),
    "no confirmation": (
        ["mc-lobby", "--latest"],
        "restore needs confirmation: run it in a terminal or pass --yes",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_restore_refuses_and_changes_nothing(
    restore: Any, pve_api: ProxmoxApi, pve: Any, case: str
) -> None:
    client = client_of(pve_api)
    survival = None
    if case != "no backup at all":
        survival = pve.add_backup("backup", 1001, 1_900_000_000, notes="mc-survival")
    pve.add_backup("backup", 1000, 1_900_000_000, notes="mc-lobby")
    before = ct(client, 1000).config.get()
    pve.requests.clear()
    argv, message = REFUSALS[case]
    argv = [a.format(survival=survival) for a in argv]
    if case != "no confirmation":
        argv.append("--yes")
    code, out, err = restore(*argv)
    assert code == 2, out + err
    assert message in err and "nothing done" in err
    assert mutating_calls(pve) == []
    assert ct(client, 1000).config.get() == before


@pytest.mark.parametrize("forged", [False, True], ids=["no-mark", "a-copy's-mark"])
def test_restore_refuses_a_vmid_held_by_a_guest_that_is_not_ours(
    restore: Any, pve_api: ProxmoxApi, pve: Any, forged: bool
) -> None:
    client = client_of(pve_api)
    volid = pve.add_backup("backup", 1001, 1_900_000_000, notes="mc-survival")
    strip_mark(client, 1001, forged_for=1000 if forged else None)
    pve.requests.clear()
    code, _, err = restore("mc-survival", "--from", volid, "--yes")
    assert code == 2
    assert "guest/mc-survival: vmid 1001 (on pve-runtime) holds a guest that does not" in err
    assert mutating_calls(pve) == []


@pytest.fixture
def lease_held(redis_port: int) -> Iterator[str]:
    """The leader lease taken by another holder (a running service), released afterwards."""
    url = f"redis://127.0.0.1:{redis_port}/0"

    async def take() -> None:
        redis = Redis.from_url(url)
        try:
            lease = RedisLease(redis, name="reconciler", holder="service-on-ops-1", ttl=300)
            assert await lease.acquire()
        finally:
            await redis.aclose()

    anyio.run(take)
    yield url
    anyio.run(lambda: lease_key(url, delete=True))


def test_restore_is_refused_while_another_holds_the_lease(
    restore: Any, lease_held: str, pve_api: ProxmoxApi, pve: Any
) -> None:
    pve.add_backup("backup", 1000, 1_900_000_000, notes="mc-lobby")
    pve.requests.clear()
    code, out, err = restore("mc-lobby", "--yes", "--redis-url", lease_held)
    assert code == 2, out + err
    assert "the leader lease 'reconciler' is held by service-on-ops-1" in err
    assert mutating_calls(pve) == []
    assert ct(client_of(pve_api), 1000).status.current.get()["status"] == "running"

    # The holder gone, the restore takes the lease, and releases it when done.
    anyio.run(lambda: lease_key(lease_held, delete=True))
    code, out, err = restore("mc-lobby", "--yes", "--redis-url", lease_held)
    assert code == 0, out + err
    assert request_bodies(pve, "POST", f"/nodes/{NODE}/lxc")[0]["restore"] == "1"
    assert anyio.run(lambda: lease_key(lease_held)) == 0


async def lease_key(url: str, *, delete: bool = False) -> int:
    """Whether the service's lease key exists (deleted first with `delete`)."""
    redis = Redis.from_url(url)
    try:
        if delete:
            await redis.delete(LEASE_KEY)
        return int(await redis.exists(LEASE_KEY))
    finally:
        await redis.aclose()


def test_restore_without_a_final_backup_takes_none(
    backup: Any, restore: Any, pve_api: ProxmoxApi, pve: Any
) -> None:
    code, out, err = backup("mc-lobby")
    assert code == 0, out + err
    pve.requests.clear()
    code, out, err = restore("mc-lobby", "--yes", "--no-final-backup")
    assert code == 0, out + err
    assert "backed up to" not in out
    assert request_bodies(pve, "POST", f"/nodes/{NODE}/vzdump") == []
    assert len(request_bodies(pve, "POST", f"/nodes/{NODE}/lxc")) == 1
