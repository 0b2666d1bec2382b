"""Backups in the fake PVE (reconciler/simulators/pve_backup.py), through the real proxmoxer
client against PlatformPve: backup jobs and their next run, vzdump writing volumes under PVE's
names with notes and holding the guest's backup lock, retention, the content API, restore, the
not-backed-up list and the scheduler. The clock backups see is fixed per test; tasks finish
at once or within milliseconds, and waits are on conditions.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from proxmoxer import ProxmoxAPI
from proxmoxer.core import ResourceException

from reconciler.model.spec import ProxmoxApi
from reconciler.providers.proxmox import connect
from reconciler.simulators.pve_backup import (
    CalendarError,
    parse_calendar_event,
    parse_prune_backups,
    prune_mark_backup_group,
)
from tests.fakepve_fixtures import TEMPLATE
from tests.waiting import wait_for

CORE, RUNTIME = "pve-core", "pve-runtime"
GIB = 1024**3
MARK = "reconciler:v1 platform=zpack address=guest/mc-survival vmid=1001"


def local(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> int:
    return int(time.mktime((year, month, day, hour, minute, 0, 0, 0, -1)))


T0 = local(2026, 3, 10, 12)  # a Tuesday, local noon
DAY = 86400


# --- helpers -------------------------------------------------------------------------------


@pytest.fixture
def client(pve_api: ProxmoxApi) -> ProxmoxAPI:
    return connect(pve_api)


@pytest.fixture
def clock(pve: Any) -> list[float]:
    """The time backups and the scheduler see: clock[0], set by the test."""
    now = [float(T0)]
    pve.backup_clock = lambda: now[0]
    return now


def finished(client: ProxmoxAPI, upid: str, node: str = CORE) -> dict[str, Any]:
    """The task's status once it stopped."""
    tasks = client.nodes(node).tasks(upid)
    status: dict[str, Any] = wait_for(
        lambda: (s := tasks.status.get())["status"] == "stopped" and s, f"task {upid}"
    )
    return status


def log_of(client: ProxmoxAPI, upid: str, node: str = CORE) -> list[str]:
    return [line["t"] for line in client.nodes(node).tasks(upid).log.get(limit=1000)]


def refused(call: Callable[[], Any]) -> ResourceException:
    with pytest.raises(ResourceException) as caught:
        call()
    return caught.value


def make_ct(client: ProxmoxAPI, vmid: int, node: str = CORE, **extra: Any) -> None:
    """A container as the platform makes them: rootfs, a backed-up and a scratch mount point."""
    params: dict[str, Any] = {
        "vmid": vmid,
        "ostemplate": f"local:vztmpl/{TEMPLATE}",
        "hostname": f"ct{vmid}",
        "cores": 2,
        "memory": 1024,
        "rootfs": "local-lvm:8",
        "mp0": "local-lvm:4,mp=/data,backup=1",
        "mp1": "local-lvm:2,mp=/scratch",
        "net0": "name=eth0,bridge=vmbr0,ip=dhcp",
        **extra,
    }
    upid = client.nodes(node).lxc.post(**params)
    assert finished(client, upid, node)["exitstatus"] == "OK"


def make_vm(client: ProxmoxAPI, vmid: int, node: str = CORE) -> None:
    upid = client.nodes(node).qemu.post(
        vmid=vmid,
        name=f"vm{vmid}",
        memory=2048,
        scsi0="local-lvm:4",
        scsi1="local-lvm:2,backup=0",
        net0="virtio,bridge=vmbr0",
        description="vm mark",
    )
    assert finished(client, upid, node)["exitstatus"] == "OK"


def vzdump(client: ProxmoxAPI, node: str = CORE, **params: Any) -> tuple[str, dict[str, Any]]:
    upid = client.nodes(node).vzdump.post(**params)
    return upid, finished(client, upid, node)


def backups(client: ProxmoxAPI, storage: str = "local", **query: Any) -> list[dict[str, Any]]:
    listed: list[dict[str, Any]] = (
        client.nodes(CORE).storage(storage).content.get(content="backup", **query)
    )
    return listed


def volids(client: ProxmoxAPI, storage: str = "local", **query: Any) -> list[str]:
    return [item["volid"] for item in backups(client, storage, **query)]


def dir_volid(kind: str, vmid: int, when: float, ext: str = "tar.zst") -> str:
    stamp = time.strftime("%Y_%m_%d-%H_%M_%S", time.localtime(when))
    return f"local:backup/vzdump-{kind}-{vmid}-{stamp}.{ext}"


# --- calendar events and retention (the pure parts) ----------------------------------------


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ("02:00", local(2026, 3, 11, 2)),
        ("sat 03:30", local(2026, 3, 14, 3, 30)),
        ("*-*-* 00/6:00", local(2026, 3, 10, 18)),
        ("daily", local(2026, 3, 11)),
        ("hourly", local(2026, 3, 10, 13)),
        ("weekly", local(2026, 3, 16)),
        ("mon..fri 02:00", local(2026, 3, 11, 2)),
        ("fri..mon 02:00", local(2026, 3, 13, 2)),
        ("sun,wed 23:15", local(2026, 3, 11, 23, 15)),
        ("*-3-1 00:00", local(2027, 3, 1)),
        ("monthly", local(2026, 4, 1)),
        ("12:00", local(2026, 3, 11, 12)),  # strictly after: not the same second
    ],
)
def test_next_run_follows_proxmox_calendar_events(schedule: str, expected: int) -> None:
    assert parse_calendar_event(schedule).next_after(T0) == expected


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        ("bogus", "unable to parse calendar event at 'bogus' - Context(\"weekday\")"),
        ("61", "unable to parse calendar event at '61' - Context(\"date or time specification\")"),
        ("0..80", "unable to parse calendar event at '..80' - Nom(Eof)"),
        ("", "unable to parse calendar event - event is empty"),
    ],
)
def test_calendar_events_pve_refuses(schedule: str, message: str) -> None:
    with pytest.raises(CalendarError) as caught:
        parse_calendar_event(schedule)
    assert str(caught.value) == message


def test_keep_last_then_daily_marks_like_pve() -> None:
    # Newest first. keep-last takes the newest; its day counts as covered, so keep-daily's two
    # are the newest of the next two days with an unmarked backup (the protected one is
    # neither kept nor counted); everything else goes.
    entries = [
        {"ctime": local(2026, 3, 10, 12)},
        {"ctime": local(2026, 3, 10, 9)},
        {"ctime": local(2026, 3, 9, 18)},
        {"ctime": local(2026, 3, 9, 9)},
        {"ctime": local(2026, 3, 8, 9), "mark": "protected"},
        {"ctime": local(2026, 3, 7, 9)},
        {"ctime": local(2026, 3, 6, 9)},
    ]
    prune_mark_backup_group(entries, parse_prune_backups("keep-last=1,keep-daily=2"))
    marks = [e["mark"] for e in entries]
    assert marks == ["keep", "remove", "keep", "remove", "protected", "keep", "remove"]
    assert parse_prune_backups("keep-last=0") == {"keep-all": 1}


# --- jobs ----------------------------------------------------------------------------------


def test_jobs_are_stored_listed_updated_and_deleted(client: ProxmoxAPI, clock: list[float]) -> None:
    jobs = client.cluster.backup
    jobs.post(
        id="nightly",
        schedule="02:00",
        storage="local",
        mode="snapshot",
        compress="zstd",
        vmid="1001,1002",
        **{"prune-backups": "keep-last=3,keep-daily=7", "notes-template": "{{guestname}}"},
        fleecing="1,storage=local-lvm",
        comment="game servers",
    )
    (listed,) = jobs.get()
    assert listed == {
        "id": "nightly",
        "type": "vzdump",
        "schedule": "02:00",
        "storage": "local",
        "mode": "snapshot",
        "compress": "zstd",
        "vmid": "1001,1002",
        "prune-backups": {"keep-daily": 7, "keep-last": 3},
        "fleecing": {"enabled": 1, "storage": "local-lvm"},
        "notes-template": "{{guestname}}",
        "comment": "game servers",
        "enabled": 1,
        "next-run": local(2026, 3, 11, 2),
    }
    assert jobs("nightly").get() == {k: v for k, v in listed.items() if k != "next-run"}

    jobs("nightly").put(all=1, exclude="1002", delete="comment")
    job = jobs("nightly").get()
    assert (job["all"], job["exclude"], "vmid" in job, "comment" in job) == (
        1,
        "1002",
        False,
        False,
    )
    jobs("nightly").put(vmid="1003", enabled=0)
    job = jobs("nightly").get()
    assert (job["vmid"], job["enabled"], "all" in job, "exclude" in job) == (
        "1003",
        0,
        False,
        False,
    )

    jobs.post(schedule="sat 03:30", all=1)  # no id: Backup.pm makes one (a UUID)
    ids = [j["id"] for j in jobs.get()]
    assert ids[0] == "nightly" and len(ids[1]) == 36
    jobs("nightly").delete()
    assert [j["id"] for j in jobs.get()] == ids[1:]


def test_starttime_and_dow_become_a_schedule(client: ProxmoxAPI) -> None:
    client.cluster.backup.post(id="old", starttime="02:30", dow="mon,wed", vmid="1001")
    client.cluster.backup.post(
        id="every", starttime="04:00", dow="mon,tue,wed,thu,fri,sat,sun", all=1
    )
    schedules = {j["id"]: j["schedule"] for j in client.cluster.backup.get()}
    assert schedules == {"old": "mon,wed 02:30", "every": "04:00"}


PARAM_ERROR = "Parameter verification failed."
# Raised inside Backup.pm's cfs lock and re-raised with `die "$@"`: Perl stringifies the
# exception, so the client gets a 500 whose first line is "400 Parameter verification failed.".
STRINGIFIED = "400 Parameter verification failed."


@pytest.mark.parametrize(
    ("call", "status", "reason", "errors"),
    [
        pytest.param(
            lambda b: b.post(id="nightly", schedule="03:00", all=1),
            500,
            "Job 'nightly' already exists",
            None,
            id="duplicate-id",
        ),
        pytest.param(
            lambda b: b.post(schedule="bogus", all=1),
            400,
            PARAM_ERROR,
            {
                "schedule": "invalid format - invalid calendar event 'bogus' - unable to parse "
                "calendar event at 'bogus' - Context(\"weekday\")\n"
            },
            id="bad-schedule",
        ),
        pytest.param(
            lambda b: b.post(all=1),
            400,
            PARAM_ERROR,
            {"schedule": "neither 'starttime' nor 'schedule' were set"},
            id="no-schedule",
        ),
        pytest.param(
            lambda b: b.post(schedule="02:00", **{"prune-backups": "keep-all=1,keep-last=2"}),
            400,
            PARAM_ERROR,
            {
                "prune-backups": "invalid format - keep-all cannot be set together with other "
                "options.\n"
            },
            id="bad-retention",
        ),
        pytest.param(
            lambda b: b.post(schedule="02:00", vmid="1001", all=1),
            500,
            STRINGIFIED,
            None,
            id="vmid-and-all",
        ),
        pytest.param(lambda b: b.post(schedule="02:00"), 500, STRINGIFIED, None, id="no-guests"),
        pytest.param(
            lambda b: b("nope").get(),
            400,
            PARAM_ERROR,
            {"id": "No such job 'nope'"},
            id="read-unknown",
        ),
        pytest.param(
            lambda b: b("nope").put(comment="x"),
            500,
            "no such vzdump job",
            None,
            id="update-unknown",
        ),
        pytest.param(
            lambda b: b("nightly").put(), 500, "no options specified", None, id="update-nothing"
        ),
        pytest.param(
            lambda b: b("nightly").put(delete="schedule"),
            500,
            STRINGIFIED,
            None,
            id="delete-schedule",
        ),
        pytest.param(lambda b: b("nope").delete(), 500, STRINGIFIED, None, id="delete-unknown"),
    ],
)
def test_job_requests_are_refused_with_pves_words(
    client: ProxmoxAPI, call: Any, status: int, reason: str, errors: dict[str, str] | None
) -> None:
    client.cluster.backup.post(id="nightly", schedule="02:00", vmid="1001")
    error = refused(lambda: call(client.cluster.backup))
    assert (error.status_code, error.content, error.errors) == (status, reason, errors)


@pytest.mark.parametrize(
    ("method", "path", "data", "field"),
    [
        ("POST", "/cluster/backup", {"schedule": "02:00"}, "vmid: property is missing"),
        (
            "POST",
            "/cluster/backup",
            {"schedule": "02:00", "all": 1, "storage": "local", "notes-template": "{{foo}} \\x"},
            "notes-template: found unknown: escape sequence '\\x' at char 8, variable 'foo' at "
            "char 4",  # Perl's pos() - length: as VZDump.pm counts
        ),
        (
            "PUT",
            "/cluster/backup/nightly",
            {"delete": "schedule"},
            "delete: unknown option 'schedule'",
        ),
        ("DELETE", "/cluster/backup/nope", {}, "id: No such job 'nope'"),
    ],
)
def test_errors_inside_pves_cfs_lock_reach_the_client_as_text(
    client: ProxmoxAPI,
    pve_api: ProxmoxApi,
    method: str,
    path: str,
    data: dict[str, Any],
    field: str,
) -> None:
    client.cluster.backup.post(id="nightly", schedule="02:00", vmid="1001")
    assert message_of(pve_api, method, path, data) == f"{STRINGIFIED}\n{field}\n"


def message_of(api: ProxmoxApi, method: str, path: str, data: dict[str, Any]) -> str:
    """The whole message of an error answer (proxmoxer keeps only its first line)."""
    base, verify = api.url + "/api2/json", api.ca_file
    with requests.Session() as http:
        credentials = {"username": "root@pam", "password": "secret"}
        login = http.post(base + "/access/ticket", data=credentials, verify=verify).json()
        http.cookies.set("PVEAuthCookie", login["data"]["ticket"])
        http.headers["CSRFPreventionToken"] = login["data"]["CSRFPreventionToken"]
        answer = http.request(method, base + path, data=data, verify=verify)
        assert answer.status_code == 500
        message: str = answer.json()["message"]
        return message


def test_not_backed_up_lists_the_guests_no_job_selects(
    pve: Any, client: ProxmoxAPI, clock: list[float]
) -> None:
    pve.add_ct(1001, "mc-survival", node=CORE)
    pve.add_ct(1002, "mc-creative", node=RUNTIME)
    pve.add_vm(2001, "build", node=CORE)
    backup = client.cluster.backup
    backup.post(id="games", schedule="02:00", vmid="1001")
    # Like PVE (BackupInfo.pm), a disabled job still counts as selecting its guests.
    backup.post(id="rest", schedule="03:00", all=1, exclude="1001,1002", enabled=0)
    not_backed_up = client.cluster("backup-info")("not-backed-up")
    assert not_backed_up.get() == [{"vmid": 1002, "type": "lxc", "name": "mc-creative"}]
    backup("rest").delete()
    # 200: the VM template the pve_api fixture makes (a template is a guest to PVE here too).
    assert [g["vmid"] for g in not_backed_up.get()] == [200, 1002, 2001]


# --- vzdump --------------------------------------------------------------------------------


def test_vzdump_writes_a_volume_with_pves_name_size_and_notes(
    client: ProxmoxAPI, clock: list[float]
) -> None:
    make_ct(client, 1001, description=MARK)
    template = "{{guestname}} ({{vmid}}) on {{node}} in {{cluster}}\\nsecond line"
    upid, status = vzdump(
        client, vmid="1001", storage="local", compress="zstd", **{"notes-template": template}
    )
    assert (status["exitstatus"], status["type"], status["id"]) == ("OK", "vzdump", "1001")
    volid = dir_volid("lxc", 1001, T0)
    (item,) = backups(client)
    assert item == {
        "volid": volid,
        "content": "backup",
        "format": "tar.zst",
        "size": (8 + 4) * GIB // 16,  # rootfs and the backed-up mp0, an eighth, compressed
        "ctime": T0,
        "vmid": 1001,
        "subtype": "lxc",
        "notes": "ct1001 (1001) on pve-core in fakecluster",  # the listing shows the first line
    }
    info = client.nodes(CORE).storage("local").content(volid).get()
    assert info["notes"] == "ct1001 (1001) on pve-core in fakecluster\nsecond line"
    log = log_of(client, upid)
    for line in (
        "INFO: Starting Backup of VM 1001 (lxc)",
        "INFO: including mount point rootfs ('/') in backup",
        "INFO: including mount point mp0 ('/data') in backup",
        "INFO: excluding volume mount point mp1 ('/scratch') from backup (disabled)",
        "INFO: backup mode: stop",
        "INFO: creating vzdump archive '/var/lib/vz/dump/" + volid.split("/", 1)[1] + "'",
        "INFO: Backup job finished successfully",
        "TASK OK",
    ):
        assert line in log
    assert "lock" not in client.nodes(CORE).lxc(1001).config.get()


@pytest.mark.parametrize(
    ("kind", "compress", "ext"),
    [
        ("lxc", "0", "tar"),
        ("lxc", "gzip", "tar.gz"),
        ("lxc", "1", "tar.lzo"),
        ("lxc", "lzo", "tar.lzo"),
        ("qemu", "zstd", "vma.zst"),
        ("qemu", "0", "vma"),
    ],
)
def test_compress_decides_the_archive_name(
    pve: Any, client: ProxmoxAPI, clock: list[float], kind: str, compress: str, ext: str
) -> None:
    if kind == "lxc":
        pve.add_ct(1001, "ct", node=CORE)
    else:
        pve.add_vm(1001, "vm", node=CORE, config={"scsi0": "local-lvm:vm-1001-disk-0,size=8G"})
    _upid, status = vzdump(client, vmid="1001", compress=compress)
    assert status["exitstatus"] == "OK"
    (item,) = backups(client)
    assert (item["volid"], item["format"], item["subtype"]) == (
        dir_volid(kind, 1001, T0, ext),
        ext,
        kind,
    )


def test_a_proxmox_backup_server_storage_names_backups_by_group_and_utc_time(
    pve: Any, client: ProxmoxAPI, clock: list[float]
) -> None:
    client.storage.post(
        storage="pbs", type="pbs", server="192.0.2.50", datastore="zpack", content="backup"
    )
    make_vm(client, 2001)
    _upid, status = vzdump(client, vmid="2001", storage="pbs", compress="zstd")
    assert status["exitstatus"] == "OK"
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(T0))
    (item,) = backups(client, "pbs")
    assert (item["volid"], item["format"], item["subtype"], item["ctime"]) == (
        f"pbs:backup/vm/2001/{stamp}",
        "pbs-vm",
        "qemu",
        T0,
    )
    # Notes and protection work on PBS too.
    client.nodes(CORE).storage("pbs").content(item["volid"]).put(
        notes="before upgrade", protected=1
    )
    (item,) = backups(client, "pbs")
    assert (item["notes"], item["protected"]) == ("before upgrade", 1)


def test_a_backup_holds_the_guest_lock_while_it_runs(
    pve: Any, client: ProxmoxAPI, clock: list[float]
) -> None:
    make_ct(client, 1001)
    pve.time_scale = 0.001
    pve.hold_backups()
    upid = client.nodes(CORE).vzdump.post(vmid="1001")
    config = client.nodes(CORE).lxc(1001).config
    wait_for(lambda: config.get().get("lock") == "backup", "the backup lock")
    (item,) = [g for g in client.cluster.resources.get(type="vm") if g["vmid"] == 1001]
    assert item["lock"] == "backup"
    error = refused(lambda: config.put(cores=4))
    assert (error.status_code, error.content) == (500, "CT is locked (backup)")
    assert client.nodes(CORE).tasks(upid).status.get()["status"] == "running"
    pve.release_backups()
    assert finished(client, upid)["exitstatus"] == "OK"
    assert "lock" not in config.get()
    config.put(cores=4)
    assert config.get()["cores"] == 4


def test_a_running_guest_backed_up_in_stop_mode_is_stopped_and_started_again(
    pve: Any, client: ProxmoxAPI, clock: list[float]
) -> None:
    pve.add_ct(1001, "ct", node=CORE, status="running")
    pve.time_scale = 0.001
    pve.hold_backups()
    upid = client.nodes(CORE).vzdump.post(vmid="1001", mode="stop")
    status = client.nodes(CORE).lxc(1001).status.current
    wait_for(lambda: status.get()["status"] == "stopped", "the guest stopped for the backup")
    pve.release_backups()
    assert finished(client, upid)["exitstatus"] == "OK"
    assert status.get()["status"] == "running"
    assert "INFO: stopping virtual guest" in log_of(client, upid)


def test_a_failing_guest_does_not_stop_the_others_and_the_job_ends_in_error(
    pve: Any, client: ProxmoxAPI, clock: list[float]
) -> None:
    pve.add_ct(1001, "one", node=CORE)
    pve.add_ct(1002, "two", node=CORE)
    pve.add_ct(1003, "three", node=CORE, lock="snapshot")
    upid, status = vzdump(client, vmid="999,1001,1002,1003")
    assert status["exitstatus"] == "job errors"
    log = log_of(client, upid)
    assert "ERROR: Backup of VM 999 failed - unable to find VM '999'" in log
    assert "ERROR: Backup of VM 1003 failed - CT is locked (snapshot)" in log
    assert "INFO: Backup job finished with errors" in log
    assert volids(client) == [dir_volid("lxc", 1001, T0, "tar"), dir_volid("lxc", 1002, T0, "tar")]


def test_a_storage_that_takes_no_backups_fails_the_job(
    pve: Any, client: ProxmoxAPI, clock: list[float]
) -> None:
    pve.add_ct(1001, "ct", node=CORE)
    _upid, status = vzdump(client, vmid="1001", storage="local-lvm")
    assert status["exitstatus"] == (
        "could not get storage information for 'local-lvm': can't use storage 'local-lvm' for "
        "backups - wrong content type"
    )
    assert volids(client) == []


def test_without_remove_the_retention_is_a_limit(
    pve: Any, client: ProxmoxAPI, clock: list[float]
) -> None:
    pve.add_ct(1001, "ct", node=CORE)
    old = pve.add_backup("local", 1001, T0 - DAY)
    upid, status = vzdump(client, vmid="1001", remove=0, **{"prune-backups": "keep-last=1"})
    assert status["exitstatus"] == "job errors"
    assert (
        "ERROR: Backup of VM 1001 failed - There is a max backup limit of 1 enforced by the "
        "target storage or the vzdump parameters. Either increase the limit or delete old "
        "backups." in log_of(client, upid)
    )
    assert volids(client) == [old]


def test_only_the_nodes_own_guests_are_backed_up_and_none_means_no_task(
    pve: Any, client: ProxmoxAPI, clock: list[float]
) -> None:
    pve.add_ct(1001, "here", node=CORE)
    pve.add_ct(1002, "there", node=RUNTIME)
    assert client.nodes(CORE).vzdump.post(vmid="1002") == "OK"
    upid, status = vzdump(client, vmid="1001,1002")
    assert (status["exitstatus"], status["id"]) == ("OK", "1001")  # one guest here
    assert f"INFO: starting new backup job: vzdump 1001 1002 --node {CORE}" in log_of(client, upid)
    assert [item["vmid"] for item in backups(client)] == [1001]


def test_injected_failures_apply_to_vzdump(
    pve: Any, client: ProxmoxAPI, clock: list[float]
) -> None:
    pve.add_ct(1001, "ct", node=CORE)
    pve.fail("POST", f"/nodes/{CORE}/vzdump", error="interrupted_signal", times=1)
    _upid, status = vzdump(client, vmid="1001")
    assert (status["type"], status["exitstatus"]) == ("vzdump", "interrupted by signal")
    assert volids(client) == []
    pve.fail("POST", f"/nodes/{CORE}/vzdump", 500, "backup storage offline", times=1)
    error = refused(lambda: client.nodes(CORE).vzdump.post(vmid="1001"))
    assert (error.status_code, error.content) == (500, "backup storage offline")


# --- retention -----------------------------------------------------------------------------


def test_keep_last_prunes_the_oldest_and_never_a_protected_backup(
    pve: Any, client: ProxmoxAPI, clock: list[float]
) -> None:
    pve.add_ct(1001, "ct", node=CORE)
    pve.add_ct(1002, "other", node=CORE)
    protected = pve.add_backup("local", 1001, T0 - 3 * DAY, protected=True)
    old = pve.add_backup("local", 1001, T0 - 2 * DAY)
    kept = pve.add_backup("local", 1001, T0 - DAY)
    others = pve.add_backup("local", 1002, T0 - 5 * DAY)
    upid, status = vzdump(client, vmid="1001", compress="zstd", **{"prune-backups": "keep-last=2"})
    assert status["exitstatus"] == "OK"
    assert sorted(volids(client)) == sorted([protected, kept, dir_volid("lxc", 1001, T0), others])
    log = log_of(client, upid)
    assert "INFO: prune older backups with retention: keep-last=2" in log
    assert f"INFO: removing backup '{old}'" in log
    assert "INFO: pruned 1 backup(s) not covered by keep-retention policy" in log


def test_keep_daily_keeps_the_newest_backup_of_each_day(
    pve: Any, client: ProxmoxAPI, clock: list[float]
) -> None:
    pve.add_ct(1001, "ct", node=CORE)
    yesterday_late = pve.add_backup("local", 1001, T0 - DAY + 6 * 3600)
    for when in (T0 - DAY - 3 * 3600, T0 - 2 * DAY, T0 - 3 * DAY, T0 - 2 * 3600):
        pve.add_backup("local", 1001, when)
    _upid, status = vzdump(
        client, vmid="1001", compress="zstd", **{"prune-backups": "keep-daily=2"}
    )
    assert status["exitstatus"] == "OK"
    assert sorted(volids(client)) == sorted([dir_volid("lxc", 1001, T0), yesterday_late])


def test_the_storages_retention_applies_when_the_job_has_none(
    pve: Any, client: ProxmoxAPI, clock: list[float]
) -> None:
    pve.add_ct(1001, "ct", node=CORE)
    pve.add_backup("local", 1001, T0 - DAY)
    client.storage("local").put(**{"prune-backups": "keep-last=1"})
    _upid, status = vzdump(client, vmid="1001", compress="zstd")
    assert status["exitstatus"] == "OK"
    assert volids(client) == [dir_volid("lxc", 1001, T0)]


# --- content -------------------------------------------------------------------------------


def test_the_content_api_lists_filters_shows_updates_and_deletes_backups(
    pve: Any, client: ProxmoxAPI, clock: list[float]
) -> None:
    pve.add_ct(1001, "one", node=CORE)
    pve.add_ct(1002, "two", node=CORE)
    first = pve.add_backup("local", 1001, T0 - DAY, notes="first\nmore")
    second = pve.add_backup("local", 1002, T0 - DAY, protected=True)
    content = client.nodes(CORE).storage("local").content
    assert volids(client) == sorted([first, second])
    assert volids(client, vmid=1002) == [second]
    assert [i["volid"] for i in content.get(content="vztmpl")] == [f"local:vztmpl/{TEMPLATE}"]
    assert [(i["notes"], i.get("protected")) for i in backups(client, vmid=1001)] == [
        ("first", None)
    ]

    assert content(second).get()["protected"] == 1
    upid = content(second).delete()
    assert finished(client, upid)["exitstatus"] == (
        f"cannot remove protected volume '{second.split(':', 1)[1]}' on 'local'"
    )
    content(second).put(protected=0, notes="unprotected")
    assert (content(second).get()["notes"], content(second).get()["protected"]) == (
        "unprotected",
        0,
    )
    assert finished(client, content(second).delete())["exitstatus"] == "OK"
    assert finished(client, content(first).delete())["exitstatus"] == "OK"
    assert volids(client) == []


# --- restore -------------------------------------------------------------------------------


def test_a_container_restored_from_its_backup_gets_its_config_back(
    pve: Any, client: ProxmoxAPI, clock: list[float]
) -> None:
    make_ct(client, 1001, description=MARK, tags="game;survival")
    config = client.nodes(CORE).lxc(1001).config
    rules = client.nodes(CORE).lxc(1001).firewall.rules
    rules.post(type="in", action="ACCEPT", proto="tcp", dport="25565", enable=1)
    before = config.get()
    _upid, status = vzdump(client, vmid="1001", compress="zstd")
    assert status["exitstatus"] == "OK"
    volid = dir_volid("lxc", 1001, T0)
    config.put(hostname="changed", cores=8, delete="description")
    rules(0).delete()

    restore = client.nodes(CORE).lxc.post
    params = {"vmid": 1001, "ostemplate": volid, "restore": 1, "storage": "local-lvm"}
    error = refused(lambda: restore(**params))
    assert (error.status_code, error.content) == (500, f"CT 1001 already exists on node '{CORE}'")
    upid = restore(**params, force=1)
    status = finished(client, upid)
    assert (status["type"], status["exitstatus"]) == ("vzrestore", "OK")

    after = config.get()
    same = ("hostname", "cores", "memory", "swap", "description", "tags", "net0", "ostype", "arch")
    assert {k: after.get(k) for k in same} == {k: before.get(k) for k in same}
    assert after["description"] == MARK
    assert [(r["action"], r["dport"]) for r in rules.get()] == [("ACCEPT", "25565")]
    for key, size, options in (
        ("rootfs", "8G", ""),
        ("mp0", "4G", "backup=1,mp=/data,"),
        ("mp1", "2G", "mp=/scratch,"),
    ):
        volume, _, rest = after[key].partition(",")
        assert rest == f"{options}size={size}"
        # New volumes are made before the old ones go: the names move on.
        assert volume != before[key].split(",", 1)[0]
    assert "lock" not in after


def test_a_destroyed_container_comes_back_from_its_backup(
    pve: Any, client: ProxmoxAPI, clock: list[float]
) -> None:
    make_ct(client, 1001, description=MARK)
    vzdump(client, vmid="1001")
    volid = dir_volid("lxc", 1001, T0, "tar")
    assert finished(client, client.nodes(CORE).lxc(1001).delete())["exitstatus"] == "OK"
    upid = client.nodes(CORE).lxc.post(vmid=1001, ostemplate=volid, restore=1, storage="local-lvm")
    assert finished(client, upid)["exitstatus"] == "OK"
    after = client.nodes(CORE).lxc(1001).config.get()
    assert (after["hostname"], after["description"], after["cores"]) == ("ct1001", MARK, 2)


def test_a_running_container_is_not_overwritten(
    pve: Any, client: ProxmoxAPI, clock: list[float]
) -> None:
    pve.add_ct(1001, "ct", node=CORE, status="running")
    volid = pve.add_backup("local", 1001, T0 - DAY)
    error = refused(
        lambda: client.nodes(CORE).lxc.post(
            vmid=1001, ostemplate=volid, restore=1, force=1, storage="local-lvm"
        )
    )
    assert (error.status_code, error.content) == (500, "can't overwrite running container")


def test_a_restore_from_a_missing_backup_fails_in_its_task(
    pve: Any, client: ProxmoxAPI, clock: list[float]
) -> None:
    volid = dir_volid("lxc", 1001, T0)
    upid = client.nodes(CORE).lxc.post(vmid=1001, ostemplate=volid, restore=1, storage="local-lvm")
    status = finished(client, upid)
    assert status["exitstatus"] == f"unable to restore CT 1001 - can't find file '{volid}'"
    assert pve.ct(1001) is None


def test_a_vm_restored_from_its_backup_gets_its_config_back(
    pve: Any, client: ProxmoxAPI, clock: list[float]
) -> None:
    make_vm(client, 2001)
    config = client.nodes(CORE).qemu(2001).config
    before = config.get()
    vzdump(client, vmid="2001", compress="zstd")
    volid = dir_volid("qemu", 2001, T0, "vma.zst")
    config.put(name="changed", memory=4096)

    restore = client.nodes(CORE).qemu.post
    error = refused(lambda: restore(vmid=2001, archive=volid))
    assert (error.status_code, error.content) == (
        500,
        f"unable to restore VM 2001 - VM 2001 already exists on node '{CORE}'",
    )
    assert finished(client, restore(vmid=2001, archive=volid, force=1))["exitstatus"] == "OK"
    after = config.get()
    assert (after["name"], after["memory"], after["net0"]) == (
        "vm2001",
        before["memory"],
        before["net0"],
    )
    assert after["scsi0"] == before["scsi0"]  # freed, then allocated again under its name
    # A disk excluded from the backup: its config line is commented out, which PVE's parser
    # reads as part of the description; the old disk stays, unused.
    assert "scsi1" not in after
    assert after["description"] == f"vm mark\nscsi1: {before['scsi1']}"
    assert after["unused0"] == before["scsi1"].split(",", 1)[0]
    assert after["vmgenid"] != before["vmgenid"]


# --- scheduler -----------------------------------------------------------------------------


def test_due_jobs_run_as_pvescheduler_runs_them(
    pve: Any, client: ProxmoxAPI, clock: list[float]
) -> None:
    pve.add_ct(1001, "here", node=CORE)
    pve.add_ct(1002, "there", node=RUNTIME)
    client.cluster.backup.post(id="nightly", schedule="02:00", vmid="1001,1002", storage="local")
    client.cluster.backup.post(id="off", schedule="02:00", all=1, enabled=0)
    assert pve.run_due_jobs() == []
    assert pve.run_due_jobs(local(2026, 3, 11, 1, 59)) == []

    clock[0] = local(2026, 3, 11, 2)
    started = pve.run_due_jobs()
    assert [upid.split(":")[1] for upid in started] == [CORE, RUNTIME]
    for upid in started:
        assert finished(client, upid, upid.split(":")[1])["exitstatus"] == "OK"
    # The scheduler runs vzdump without `node`: each node logs the guests it leaves to others.
    assert "INFO: skip external VMs: 1002" in log_of(client, started[0])
    assert [item["ctime"] for item in backups(client)] == [clock[0], clock[0]]
    assert pve.run_due_jobs() == []  # ran at 02:00 today: next at 02:00 tomorrow

    clock[0] = local(2026, 3, 12, 2, 0) + 30
    assert len(pve.run_due_jobs()) == 2


def test_a_job_whose_last_run_still_runs_is_not_started_again(
    pve: Any, client: ProxmoxAPI, clock: list[float]
) -> None:
    pve.add_ct(1001, "ct", node=CORE)
    client.cluster.backup.post(id="often", schedule="*:0/15", vmid="1001")
    pve.time_scale = 0.001
    pve.hold_backups()
    clock[0] = T0 + 15 * 60
    (upid,) = pve.run_due_jobs()
    clock[0] = T0 + 30 * 60
    assert pve.run_due_jobs() == []
    pve.release_backups()
    assert finished(client, upid)["exitstatus"] == "OK"
    (again,) = pve.run_due_jobs()
    assert finished(client, again)["exitstatus"] == "OK"


@pytest.fixture
def served(tmp_path: Path) -> Iterator[ProxmoxAPI]:
    """`python -m reconciler.simulators.pve --backup-scheduler`, as the demo runs it."""
    from fakepve.certs import make_cert

    cert, key, _ = make_cert(str(tmp_path), hosts=("127.0.0.1",))
    guests = tmp_path / "guests.json"
    guests.write_text(json.dumps({"guests": [{"type": "lxc", "vmid": 1001, "name": "ct"}]}))
    options = (
        f"--backup-scheduler --host 127.0.0.1 --port 0 --time-scale 0 --cert {cert} --key {key}"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "reconciler.simulators.pve", str(guests), *options.split()],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening on" in line, line
        port = int(line.strip().rsplit(":", 1)[-1])
        yield ProxmoxAPI(
            "127.0.0.1", port=port, user="root@pam", password="secret", verify_ssl=cert
        )
    finally:
        proc.terminate()
        proc.wait(5)
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()


def test_the_served_fake_runs_due_jobs_with_the_scheduler_option(served: ProxmoxAPI) -> None:
    served.cluster.backup.post(id="each-second", schedule="*:*:*", vmid="1001", storage="local")
    content = served.nodes("pve1").storage("local").content
    (item, *_) = wait_for(lambda: content.get(content="backup"), "a scheduled backup")
    assert item["volid"].startswith("local:backup/vzdump-lxc-1001-")
