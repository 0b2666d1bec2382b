"""Backup jobs in import and adopt, on fakepve through the real client: the estate's hand-made
jobs are written to `backups.yaml` (ids kept, selections as the imported guests' names, what
the spec cannot say as notes); adopting a job writes our mark into its comment and nothing
else, so the plan against the same cluster is empty afterwards; a job not adopted is left as
it is.

Assertions read the jobs fakepve holds (`pve.backup_jobs`) and its request log.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml

from reconciler.applying.converging import converge
from reconciler.applying.observing import observe_all
from reconciler.importing.estate import Estate, read_estate
from reconciler.importing.writer import ImportResult, render_specs
from reconciler.loading.graph import build_graph
from reconciler.loading.loader import load_directory
from reconciler.model.plans import Action, Plan
from reconciler.model.resources import DesiredGraph, Kind
from reconciler.model.spec import ProxmoxApi
from reconciler.planning.planner import make_plan
from reconciler.providers import Provider
from reconciler.providers.firewall import FirewallProvider
from reconciler.providers.proxmox import ProxmoxProvider
from reconciler.providers.proxmox_backup import BackupJobProvider
from tests.cli.test_live import flags
from tests.fakepve_fixtures import BACKUP_STORAGE, mutating_calls
from tests.importing.test_import_adopt import (
    base,
    build_estate,
    do_adopt,
    import_specs,
    read_fresh,
    run_cli,
)

WORLDS_ID = "backup-1a2b3c4d-5e6f"  # an id as the web UI makes them
# id -> the job as an operator made it by hand; all of them can be adopted as they are.
JOBS: dict[str, dict[str, Any]] = {
    WORLDS_ID: {
        "schedule": "*-*-* 00/6:00",
        "storage": BACKUP_STORAGE,
        "compress": "zstd",
        "prune-backups": "keep-last=4,keep-daily=7",
        "notes-template": "{{guestname}}",
        "vmid": "1000,1001",
        "comment": "game worlds every six hours",
    },
    "nightly": {
        "schedule": "02:30",
        "storage": BACKUP_STORAGE,
        "mode": "stop",
        "vmid": "101,102",
        "enabled": 0,
        "mailto": "ops@example.invalid",
    },
    "rc-dev": {"schedule": "sat 03:30", "storage": BACKUP_STORAGE, "vmid": "1100"},
}
WORLDS, NIGHTLY, DEV = "backup/game-worlds-every-six-hours", "backup/nightly", "backup/dev"


def add_jobs(pve: Any, provider: ProxmoxProvider, jobs: dict[str, dict[str, Any]]) -> None:
    for ident, options in jobs.items():
        provider.client.cluster.backup.post(id=ident, **options)
    pve.requests.clear()


def comments(pve: Any) -> dict[str, str | None]:
    return {ident: job.get("comment") for ident, job in pve.backup_jobs.items()}


def providers_of(provider: ProxmoxProvider, graph: DesiredGraph) -> list[Provider]:
    storages = frozenset(
        str(r.attributes["storage"]) for r in graph.resources.values() if r.kind is Kind.BACKUP_JOB
    )
    firewall = FirewallProvider(pve=provider, manage_cluster="firewall/cluster" in graph.resources)
    return [provider, firewall, BackupJobProvider(pve=provider, storages=storages)]


def plan_now(graph: DesiredGraph, provider: ProxmoxProvider) -> Plan:
    observed = anyio.run(lambda: observe_all(providers_of(provider, graph), graph.platform))
    return make_plan(graph, observed)


@pytest.fixture
def estate(pve: Any, provider: ProxmoxProvider) -> Estate:
    build_estate(pve, provider)
    add_jobs(pve, provider, JOBS)
    return read_fresh(pve, provider)


@pytest.fixture
def imported(estate: Estate, tmp_path: Path) -> ImportResult:
    return import_specs(estate, tmp_path)


# --- import -----------------------------------------------------------------------------------


def test_jobs_are_imported_into_backups_yaml_that_validates(
    estate: Estate, imported: ImportResult, graph: DesiredGraph, pve: Any
) -> None:
    assert [j["id"] for j in estate.backup_jobs] == sorted(JOBS)
    assert imported.ok
    assert imported.backup_jobs == {
        "dev": "rc-dev",
        "game-worlds-every-six-hours": WORLDS_ID,
        "nightly": "nightly",
    }
    written = yaml.safe_load(imported.files["backups.yaml"])["backups"]
    assert written == {
        # Named after its comment (the id is made up); the id kept; defaults left out.
        "game-worlds-every-six-hours": {
            "schedule": "*-*-* 00/6:00",
            "storage": "backup",
            "retention": {"keep_last": 4, "keep_daily": 7},
            "select": {"guests": ["mc-lobby", "mc-survival"]},
            "description": "game worlds every six hours",
            "id": WORLDS_ID,
        },
        # No compress and no notes-template in Proxmox: written, since the spec's differ.
        "nightly": {
            "schedule": "02:30",
            "storage": "backup",
            "mode": "stop",
            "compress": "0",
            "select": {"guests": ["zpack-api", "zpack-db"]},
            "notes": "",
            "enabled": False,
            "id": "nightly",
        },
        # `rc-dev` is what the controller would call backup/dev: no id needed.
        "dev": {
            "schedule": "sat 03:30",
            "storage": "backup",
            "compress": "0",
            "select": {"guests": ["dev-alice"]},
            "notes": "",
        },
    }
    assert graph.resources[WORLDS].attributes["id"] == WORLDS_ID
    assert "id" not in graph.resources[DEV].attributes
    assert imported.drift == {}
    assert any("nightly" in n and "mailto" in n and "kept as they are" in n for n in imported.notes)
    assert imported.files["backups.yaml"].startswith("# Imported by `reconciler import` from")
    assert mutating_calls(pve) == []


def test_what_the_spec_cannot_say_is_a_note(
    pve: Any, provider: ProxmoxProvider, tmp_path: Path
) -> None:
    build_estate(pve, provider)
    provider.client.pools.post(poolid="games")
    add_jobs(
        pve,
        provider,
        {
            # A vmid list with guests that are not imported: a template and none at all.
            "partly": {"schedule": "01:00", "storage": "backup", "vmid": "1000,200,1150"},
            "everything": {"schedule": "sun 04:00", "storage": "backup", "exclude": "1100,999"},
            "by-pool": {"schedule": "05:00", "storage": "backup", "pool": "games"},
            "theirs": {
                "schedule": "06:00",
                "storage": "backup",
                "vmid": "1001",
                "comment": "reconciler:v1 platform=other address=backup/x id=theirs",
            },
            "keep-all": {
                "schedule": "07:00",
                "storage": "backup",
                "vmid": "1001",
                "prune-backups": "keep-all=1",
            },
        },
    )
    result = render_specs(anyio.run(read_estate, provider), base())
    assert result.ok, result.load.diagnostics if result.load else None
    written = yaml.safe_load(result.files["backups.yaml"])["backups"]
    assert sorted(written) == ["everything", "keep-all", "partly"]
    assert written["partly"]["select"] == {"guests": ["mc-lobby"]}
    assert written["everything"]["select"] == {"all": True, "exclude": ["dev-alice"]}
    assert "retention" not in written["keep-all"]
    notes = "\n".join(result.notes)
    assert "partly (partly): vmids 200, 1150 are not imported guests" in notes
    assert "everything (everything): backs up every guest of the cluster (all=1)" in notes
    assert "skipped backup job by-pool (by-pool): it selects pool 'games'" in notes
    assert "skipped backup job theirs: it carries the mark of platform 'other'" in notes
    assert "keep-all (keep-all): keeps every backup (keep-all)" in notes
    # Once adopted, the first apply writes the selection as the spec's vmids, and the storage's
    # own retention: said per job as drift.
    assert result.drift == {
        "backup/everything": ["vmid"],
        "backup/keep-all": ["prune-backups"],
        "backup/partly": ["vmid"],
    }
    assert mutating_calls(pve) == []


# --- adopt ----------------------------------------------------------------------------------------


def test_adopting_marks_the_jobs_comment_and_the_plan_is_empty_afterwards(
    graph: DesiredGraph, provider: ProxmoxProvider, pve: Any
) -> None:
    before = {ident: dict(job) for ident, job in pve.backup_jobs.items()}
    report = do_adopt(graph, provider, WORLDS, NIGHTLY, DEV)
    assert report.ok, report
    assert [(a.address, a.target, a.status, a.drift) for a in report.adoptions] == [
        (WORLDS, f"backup job {WORLDS_ID}", "adopted", []),
        (NIGHTLY, "backup job nightly", "adopted", []),
        (DEV, "backup job rc-dev", "adopted", []),
    ]
    # One PUT per job, of its comment only: the description kept, our mark after it.
    assert mutating_calls(pve) == [
        ("PUT", f"/api2/json/cluster/backup/{WORLDS_ID}"),
        ("PUT", "/api2/json/cluster/backup/nightly"),
        ("PUT", "/api2/json/cluster/backup/rc-dev"),
    ]
    assert comments(pve) == {
        WORLDS_ID: "game worlds every six hours reconciler:v1 platform=zpack "
        f"address={WORLDS} id={WORLDS_ID}",
        "nightly": f"reconciler:v1 platform=zpack address={NIGHTLY} id=nightly",
        "rc-dev": f"reconciler:v1 platform=zpack address={DEV} id=rc-dev",
    }
    after = {i: {k: v for k, v in j.items() if k != "comment"} for i, j in pve.backup_jobs.items()}
    assert after == {i: {k: v for k, v in j.items() if k != "comment"} for i, j in before.items()}
    # Ours now, each under its own id: nothing to change, nothing created.
    pve.requests.clear()
    conv = anyio.run(lambda: converge(graph, providers_of(provider, graph)))
    plan = conv.rounds[0].plan
    jobs = {c.address: (c.action, c.id) for c in plan.changes if c.kind is Kind.BACKUP_JOB}
    assert jobs == {
        WORLDS: (Action.NOOP, {"id": WORLDS_ID}),
        NIGHTLY: (Action.NOOP, {"id": "nightly"}),
        DEV: (Action.NOOP, {"id": "rc-dev"}),
    }
    assert not any(c.address.startswith("backup/") for c in plan.actions)
    assert [m for m in mutating_calls(pve) if "/cluster/backup" in m[1]] == []
    assert sorted(pve.backup_jobs) == sorted(JOBS)
    # Adopting again: already ours, nothing written.
    again = do_adopt(graph, provider, WORLDS)
    assert [a.status for a in again.adoptions] == ["already owned"]
    assert [m for m in mutating_calls(pve) if "/cluster/backup" in m[1]] == []


def test_a_job_not_adopted_stays_foreign_and_untouched(
    graph: DesiredGraph, provider: ProxmoxProvider, pve: Any
) -> None:
    before = comments(pve)
    assert do_adopt(graph, provider, WORLDS).ok
    assert mutating_calls(pve) == [("PUT", f"/api2/json/cluster/backup/{WORLDS_ID}")]
    assert {i: c for i, c in comments(pve).items() if i != WORLDS_ID} == {
        i: c for i, c in before.items() if i != WORLDS_ID
    }
    observed = anyio.run(lambda: observe_all(providers_of(provider, graph), graph.platform))
    owned = {str(r.id["id"]): r.owned for r in observed.resources if r.kind is Kind.BACKUP_JOB}
    assert owned == {WORLDS_ID: True, "nightly": False, "rc-dev": False}
    plan = make_plan(graph, observed)
    assert [c.action for c in plan.changes if c.address == WORLDS] == [Action.NOOP]
    # The others are only reported: nothing is created beside them.
    assert [c.address for c in plan.changes if c.kind is Kind.BACKUP_JOB] == [WORLDS]
    pending = {d.address for d in plan.diagnostics if d.code == "adoption-pending"}
    assert {NIGHTLY, DEV} <= pending
    conv = anyio.run(lambda: converge(graph, providers_of(provider, graph)))
    assert not conv.rounds[-1].plan.has_changes
    assert mutating_calls(pve) == [("PUT", f"/api2/json/cluster/backup/{WORLDS_ID}")]


def test_a_job_the_controller_changes_after_adoption_keeps_its_id(
    graph: DesiredGraph, provider: ProxmoxProvider, pve: Any, tmp_path: Path
) -> None:
    """The spec now keeps more backups: the update goes to the adopted job, under its id."""
    assert do_adopt(graph, provider, WORLDS).ok
    path = tmp_path / "imported" / "backups.yaml"
    path.write_text(path.read_text().replace("keep_last: 4", "keep_last: 6"))
    loaded = load_directory(tmp_path / "imported")
    assert loaded.spec is not None
    edited = build_graph(loaded.spec, loaded.source)
    pve.requests.clear()
    providers = providers_of(provider, edited)
    plan = make_plan(edited, anyio.run(lambda: observe_all(providers, edited.platform)))
    [change] = [c for c in plan.actions if c.address == WORLDS]
    assert change.action is Action.UPDATE and change.id == {"id": WORLDS_ID}
    anyio.run(providers[2].apply, change)
    assert [m for m in mutating_calls(pve) if m[0] != "GET"] == [
        ("PUT", f"/api2/json/cluster/backup/{WORLDS_ID}")
    ]
    job = provider.client.cluster.backup(WORLDS_ID).get()
    assert {k: int(v) for k, v in job["prune-backups"].items()} == {"keep-last": 6, "keep-daily": 7}
    assert job["comment"].endswith(f"address={WORLDS} id={WORLDS_ID}")
    assert sorted(pve.backup_jobs) == sorted(JOBS)


@pytest.mark.parametrize(
    ("address", "setup", "why"),
    [
        (NIGHTLY, None, "no backup job nightly exists; apply creates it"),
        (
            NIGHTLY,
            {"comment": "reconciler:v1 platform=other address=backup/x id=nightly"},
            "carries the mark of platform 'other'",
        ),
        (
            NIGHTLY,
            {"comment": "reconciler:v1 platform=zpack address=backup/dev id=nightly"},
            "already this platform's, as backup/dev",
        ),
        (
            NIGHTLY,
            {"rc-dev": "reconciler:v1 platform=zpack address=backup/nightly id=rc-dev"},
            "backup job rc-dev is this platform's backup/nightly already",
        ),
    ],
    ids=["no-such-job", "other-platform", "ours-for-another-address", "another-job-is-it"],
)
def test_a_refused_job_writes_nothing(
    address: str,
    setup: dict[str, str] | None,
    why: str,
    graph: DesiredGraph,
    provider: ProxmoxProvider,
    pve: Any,
) -> None:
    if setup is None:
        del pve.backup_jobs["nightly"]
    elif "rc-dev" in setup:
        pve.backup_jobs["rc-dev"]["comment"] = setup["rc-dev"]
    else:
        pve.backup_jobs["nightly"].update(setup)
    before = comments(pve)
    report = do_adopt(graph, provider, WORLDS, address)
    assert not report.ok and why in report.refused[address], report.refused
    assert [(a.address, a.status) for a in report.adoptions] == [(WORLDS, "not adopted")]
    assert mutating_calls(pve) == []
    assert comments(pve) == before


def test_the_commands_import_and_adopt_a_job(
    estate: Estate, pve_api: ProxmoxApi, tmp_path: Path, pve: Any
) -> None:
    out = tmp_path / "out"
    code, text, err = run_cli(["import", "--out", str(out), "--platform", "zpack", *flags(pve_api)])
    assert code == 0, err
    assert "7 guests, 3 backup jobs imported" in text
    assert (out / "backups.yaml").exists()
    argv = ["adopt", NIGHTLY, "--dir", str(out), "--auto-approve", *flags(pve_api)]
    code, text, err = run_cli(argv)
    assert code == 0, err
    assert f"adopted      {NIGHTLY} (backup job nightly)" in text
    assert f"comment = reconciler:v1 platform=zpack address={NIGHTLY} id=nightly" in text
    assert mutating_calls(pve) == [("PUT", "/api2/json/cluster/backup/nightly")]
