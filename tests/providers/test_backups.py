"""Backups end to end on fakepve (extended with backups: reconciler/simulators/pve_backup.py),
through the real client: backup jobs created, drifted and healed, foreign and forged jobs left
alone, the selection following a new guest, freshness from stale and missing backups, a guest
deleted by hand restored from its newest backup (not recreated empty), the final backup before
an allowed destroy and a failed one stopping it, and a restore held back when the backups
cannot be listed. Assertions read what Proxmox holds (jobs, volumes, configs) and fakepve's
request log.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from reconciler.model.plans import RESTORE_FROM, Action, Cause, Freshness
from reconciler.model.resources import DesiredGraph
from reconciler.providers.proxmox import ProxmoxProvider
from reconciler.providers.proxmox_backup import BackupJobProvider
from tests.fakepve_fixtures import TEMPLATE, mutating_calls, request_bodies
from tests.guest_helpers import (
    GAME_RANGE,
    LOBBY,
    SURVIVAL,
    load_edited,
    ok,
    plan_now,
    platform_yaml,
    run,
)
from tests.waiting import until, wait_for

PLATFORM = platform_yaml(GAME_RANGE, max_deletes=3)

PROFILE = f"""
profiles:
  game:
    template: local:vztmpl/{TEMPLATE}
    memory: 2G
    disk: {{size: 8G}}
    volumes:
      mp0: {{path: /srv/world, size: 4G, backup: true}}
guests:
"""
JOBS = """
backups:
  worlds:
    schedule: "*-*-* 00/6:00"
    storage: backup
    retention: {keep_last: 3}
    select: {roles: [game]}
    max_age: 13h
"""
GUESTS = PROFILE + LOBBY + SURVIVAL + JOBS
WITHOUT_LOBBY = PROFILE + SURVIVAL + JOBS


def spec(*edits: tuple[str, str]) -> DesiredGraph:
    return load_edited(PLATFORM, GUESTS, *edits)


@pytest.fixture
def providers(provider: ProxmoxProvider) -> list[Any]:
    return [provider, BackupJobProvider(pve=provider, storages=frozenset({"backup"}))]


def jobs(client: Any) -> dict[str, dict[str, Any]]:
    return {j["id"]: j for j in client.cluster.backup.get()}


def backups_of(client: Any, vmid: int) -> list[dict[str, Any]]:
    items = client.nodes("pve-runtime").storage("backup").content.get(content="backup", vmid=vmid)
    return sorted(items, key=lambda b: b["ctime"])


def back_up(pve: Any, client: Any, vmid: int) -> str:
    """A backup of `vmid` now, as the job's schedule would make it; its volid."""
    upid = client.nodes("pve-runtime").vzdump.post(vmid=vmid, storage="backup", mode="snapshot")
    task = client.nodes("pve-runtime").tasks(upid)
    status = wait_for(lambda: (s := task.status.get())["status"] == "stopped" and s, "vzdump")
    assert status.get("exitstatus") == "OK", status
    return str(backups_of(client, vmid)[-1]["volid"])


def destroy_by_hand(client: Any, vmid: int) -> None:
    ct = client.nodes("pve-runtime").lxc(vmid)
    if ct.status.current.get()["status"] == "running":
        ct.status.stop.post()
    until(lambda: ct.status.current.get()["status"] == "stopped")
    ct.delete(purge=1)
    until(lambda: all(int(g["vmid"]) != vmid for g in client.cluster.resources.get(type="vm")))


def test_jobs_are_created_with_the_selection_as_vmids_then_silent(
    providers: list[Any], provider: ProxmoxProvider, pve: Any
) -> None:
    first = run(spec(), providers)
    ok(first)
    job = jobs(provider.client)["rc-worlds"]
    assert job["vmid"] == "1000,1001" and job["storage"] == "backup"
    assert job["schedule"] == "*-*-* 00/6:00" and job["enabled"] == 1
    assert "reconciler:v1 platform=zpack address=backup/worlds id=rc-worlds" in job["comment"]
    assert plan_now(spec(), providers).has_changes is False


def test_a_job_changed_by_hand_is_healed_and_foreign_and_forged_jobs_are_left_alone(
    providers: list[Any], provider: ProxmoxProvider, pve: Any
) -> None:
    ok(run(spec(), providers))
    client = provider.client
    client.cluster.backup("rc-worlds").put(schedule="sun 01:00", vmid="1000")
    client.cluster.backup.post(id="ops-nightly", schedule="03:00", storage="local", all=1)
    mark = jobs(client)["rc-worlds"]["comment"]
    client.cluster.backup.post(
        id="copy", schedule="04:00", storage="backup", vmid="1000", comment=mark
    )
    plan = plan_now(spec(), providers)
    assert {c.address: c.action for c in plan.actions} == {"backup/worlds": Action.UPDATE}
    ok(run(spec(), providers))
    after = jobs(client)
    assert after["rc-worlds"]["schedule"] == "*-*-* 00/6:00"
    assert after["rc-worlds"]["vmid"] == "1000,1001"
    assert after["ops-nightly"]["schedule"] == "03:00" and after["copy"]["vmid"] == "1000"


def test_a_new_guest_joins_its_job_in_the_apply_that_creates_it(
    providers: list[Any], provider: ProxmoxProvider, pve: Any
) -> None:
    ok(run(spec(), providers))
    grown = spec(
        (
            "backups:",
            "  mc-creative:\n    role: game\n    host: pve-runtime\n    profile: game\nbackups:",
        )
    )
    plan = plan_now(grown, providers)
    job = next(c for c in plan.actions if c.address == "backup/worlds")
    assert job.after is not None and job.after["vmid"] == [1000, 1001, 1002]
    ok(run(grown, providers))
    assert jobs(provider.client)["rc-worlds"]["vmid"] == "1000,1001,1002"


def test_freshness_from_a_stale_and_a_missing_backup(
    providers: list[Any], provider: ProxmoxProvider, pve: Any
) -> None:
    ok(run(spec(), providers))
    now = time.time()
    pve.add_backup("backup", 1000, now - 3600)  # fresh
    pve.add_backup("backup", 1001, now - 3 * 86400)  # stale
    plan = plan_now(spec(), providers)
    fresh = {b.guest: b for b in plan.backups}
    assert fresh["guest/mc-lobby"].freshness is Freshness.FRESH
    assert fresh["guest/mc-survival"].freshness is Freshness.STALE
    assert fresh["guest/mc-survival"].max_age == 13 * 3600
    codes = {(d.code, d.address) for d in plan.diagnostics}
    assert ("backup-stale", "guest/mc-survival") in codes
    assert not any(d.address == "guest/mc-lobby" for d in plan.diagnostics)
    pve.add_backup("backup", 1001, now - 60)
    assert all(b.freshness is Freshness.FRESH for b in plan_now(spec(), providers).backups)


def test_a_guest_without_any_backup_is_missing(
    providers: list[Any], provider: ProxmoxProvider, pve: Any
) -> None:
    ok(run(spec(), providers))
    plan = plan_now(spec(), providers)
    assert {b.freshness for b in plan.backups} == {Freshness.MISSING}
    missing = [d for d in plan.diagnostics if d.code == "backup-missing"]
    assert len(plan.diagnostics) == 1 and "mc-lobby, mc-survival" in missing[0].message


def test_a_guest_deleted_by_hand_comes_back_from_its_newest_backup(
    providers: list[Any], provider: ProxmoxProvider, pve: Any
) -> None:
    ok(run(spec(), providers))
    client = provider.client
    ct = client.nodes("pve-runtime").lxc(1001)
    mac = ct.config.get()["net0"].split("hwaddr=")[1].split(",")[0]
    back_up(pve, client, 1001)
    newest = back_up(pve, client, 1001)
    destroy_by_hand(client, 1001)

    plan = plan_now(spec(), providers)
    create = next(c for c in plan.actions if c.address == "guest/mc-survival")
    assert create.cause is Cause.RESTORE and create.after is not None
    assert create.after[RESTORE_FROM]["volid"] == newest
    pve.requests.clear()
    conv = run(spec(), providers)
    ok(conv)
    posts = request_bodies(pve, "POST", "/lxc")
    assert len(posts) == 1 and posts[0]["ostemplate"] == newest and int(posts[0]["restore"]) == 1
    config = ct.config.get()
    # The backup's guest, not an empty one: its MAC address came back with it.
    assert f"hwaddr={mac}" in config["net0"]
    assert "address=guest/mc-survival vmid=1001" in config["description"]
    assert config.get("mp0", "").startswith("local-lvm:")
    assert plan_now(spec(), providers).has_changes is False


def test_restore_missing_never_creates_it_empty(
    providers: list[Any], provider: ProxmoxProvider, pve: Any
) -> None:
    ok(run(spec(), providers))
    back_up(pve, provider.client, 1001)
    destroy_by_hand(provider.client, 1001)
    never = spec(("    vmid: 1001\n", "    vmid: 1001\n    restore_missing: never\n"))
    create = next(c for c in plan_now(never, providers).actions if c.address == "guest/mc-survival")
    assert create.cause is Cause.MISSING and create.after is not None
    assert RESTORE_FROM not in create.after


def test_a_missing_guest_is_not_created_empty_when_its_backups_cannot_be_listed(
    providers: list[Any], provider: ProxmoxProvider, pve: Any
) -> None:
    ok(run(spec(), providers))
    back_up(pve, provider.client, 1001)
    destroy_by_hand(provider.client, 1001)
    # A shared storage is listed once, through any node.
    pve.fail("GET", "/storage/backup/content", status=500, message="boom", times=50)
    plan = plan_now(spec(), providers)
    held = next(c for c in plan.changes if c.address == "guest/mc-survival")
    assert held.blocked and "could not be listed" in held.blocked
    assert "restore-unknown" in {d.code for d in plan.diagnostics}
    pve.requests.clear()
    run(spec(), providers)
    assert not [c for c in mutating_calls(pve) if c[1].endswith("/lxc")]


def test_an_allowed_destroy_takes_a_final_backup_first(
    providers: list[Any], provider: ProxmoxProvider, pve: Any
) -> None:
    ok(run(spec(), providers))
    without = load_edited(PLATFORM, WITHOUT_LOBBY)
    plan = plan_now(without, providers, allow_destroy=True)
    delete = next(c for c in plan.actions if c.address == "guest/mc-lobby")
    assert delete.final_backup is not None and delete.final_backup.storage == "backup"
    assert backups_of(provider.client, 1000) == []
    ok(run(without, providers, allow_destroy=True))
    made = backups_of(provider.client, 1000)
    assert len(made) == 1 and "final backup before delete" in made[0].get("notes", "")
    assert all(int(g["vmid"]) != 1000 for g in provider.client.cluster.resources.get(type="vm"))


@pytest.mark.parametrize(
    "listed", [{"vmid": "1000"}, {"all": 1, "exclude": "1000,1001"}], ids=["vmid", "exclude"]
)
def test_a_destroy_that_would_take_a_guest_out_of_an_operators_job_is_refused(
    providers: list[Any], provider: ProxmoxProvider, pve: Any, listed: dict[str, Any]
) -> None:
    """PVE's purge takes the vmid out of every backup job that lists it (and deletes a job left
    empty): an operator's own job is never changed so. The destroy is refused, naming the job;
    the guest, its backups and the job stay as they were."""
    ok(run(spec(), providers))
    client = provider.client
    client.cluster.backup.post(id="ops-lobby", schedule="02:00", storage="local", **listed)
    without = load_edited(PLATFORM, WITHOUT_LOBBY)
    conv = run(without, providers, allow_destroy=True)
    report = conv.rounds[-1].report
    assert report is not None and not report.ok
    failed = next(r for r in report.results if r.change.address == "guest/mc-lobby")
    assert "backup job(s) ops-lobby, not this platform's" in str(failed.error)
    assert "Nothing destroyed" in str(failed.error)
    assert any(int(g["vmid"]) == 1000 for g in client.cluster.resources.get(type="vm"))
    field = "vmid" if "vmid" in listed else "exclude"
    assert jobs(client)["ops-lobby"][field] == listed[field]


def test_a_failed_final_backup_stops_the_destroy(
    providers: list[Any], provider: ProxmoxProvider, pve: Any
) -> None:
    ok(run(spec(), providers))
    without = load_edited(PLATFORM, WITHOUT_LOBBY)
    pve.fail("POST", "/nodes/pve-runtime/vzdump", status=500, message="storage offline", times=50)
    conv = run(without, providers, allow_destroy=True)
    report = conv.rounds[-1].report
    assert report is not None and not report.ok
    failed = next(r for r in report.results if r.change.address == "guest/mc-lobby")
    assert "final backup" in str(failed.error) and "nothing was destroyed" in str(failed.error)
    assert any(int(g["vmid"]) == 1000 for g in provider.client.cluster.resources.get(type="vm"))


def test_no_final_backup_skips_it_and_the_plan_says_so(
    providers: list[Any], provider: ProxmoxProvider, pve: Any
) -> None:
    ok(run(spec(), providers))
    without = load_edited(PLATFORM, WITHOUT_LOBBY)
    plan = plan_now(without, providers, allow_destroy=True, final_backups=False)
    delete = next(c for c in plan.actions if c.address == "guest/mc-lobby")
    assert delete.final_backup is None
    assert "final-backup-skipped" in {d.code for d in plan.diagnostics}
    ok(run(without, providers, allow_destroy=True, final_backups=False))
    assert backups_of(provider.client, 1000) == []


def test_a_job_on_a_storage_that_takes_no_backups_is_a_warning(
    providers: list[Any], provider: ProxmoxProvider, pve: Any
) -> None:
    wrong = spec(("    storage: backup\n", "    storage: local-lvm\n"))
    plan = plan_now(wrong, providers)
    found = [d for d in plan.diagnostics if d.code == "backup-storage"]
    assert len(found) == 1 and "does not take backups" in found[0].message
    nowhere = spec(("    storage: backup\n", "    storage: nas\n"))
    assert any("on no online node" in d.message for d in plan_now(nowhere, providers).diagnostics)
    assert not any(d.code == "backup-storage" for d in plan_now(spec(), providers).diagnostics)


def test_freshness_costs_one_listing_per_shared_storage_not_one_per_guest(
    providers: list[Any], provider: ProxmoxProvider, pve: Any
) -> None:
    ok(run(spec(), providers))
    for vmid in (1000, 1001):
        pve.add_backup("backup", vmid, time.time() - 60)
    pve.requests.clear()
    plan = plan_now(spec(), providers)
    assert len(plan.backups) == 2
    reads = [p for m, p, _ in pve.requests if m == "GET" and "/content" in p]
    jobs_read = [p for m, p, _ in pve.requests if m == "GET" and p.endswith("/cluster/backup")]
    assert len(reads) == 1 and len(jobs_read) == 1, (reads, jobs_read)


def test_a_retention_that_keeps_fewer_backups_is_a_destroy_held_back_without_pruning(
    providers: list[Any], provider: ProxmoxProvider, pve: Any
) -> None:
    ok(run(spec(), providers))
    fewer = spec(("    retention: {keep_last: 3}\n", "    retention: {keep_last: 1}\n"))
    held = next(c for c in plan_now(fewer, providers).changes if c.address == "backup/worlds")
    assert held.blocked and held.destroys == ("backups beyond the new retention (keep-last=1)",)
    pve.requests.clear()
    ok(run(fewer, providers))
    assert not mutating_calls(pve)
    assert jobs(provider.client)["rc-worlds"]["prune-backups"] in ("keep-last=3", {"keep-last": 3})
    ok(run(fewer, providers, allow_destroy=True))
    assert jobs(provider.client)["rc-worlds"]["prune-backups"] in ("keep-last=1", {"keep-last": 1})
    more = spec(("    retention: {keep_last: 3}\n", "    retention: {keep_last: 5}\n"))
    grown = next(c for c in plan_now(more, providers).changes if c.address == "backup/worlds")
    assert grown.action is Action.UPDATE and not grown.blocked and not grown.destroys
