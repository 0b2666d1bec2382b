"""Freshness is health: the service, in-process on fakepve with the example specs (whose
`backups.yaml` jobs write to the `backup` storage the `pve_api` fixture adds), reports each
selected guest's newest backup in /status and as gauges, and logs an event when a guest's
backup turns stale or missing and when it is fresh again, once per transition.

Backups are seeded on the fake's own event loop (`add_backup`), as vzdump would have written
them: one guest stale, one with none at all, the others fresh; then the stale one gets a fresh
backup.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from reconciler.controller.metrics import Metrics
from reconciler.controller.sources import DirectorySource
from reconciler.controller.status import StatusBoard
from reconciler.controller.timing import Trigger
from reconciler.model.plans import BackupFreshness, Freshness
from reconciler.model.spec import ProxmoxApi
from tests.conftest import SPECS
from tests.controller.test_service import Running
from tests.controller.test_service import run_service as run
from tests.fakepve_fixtures import BACKUP_STORAGE

# A full cycle often, so a backup seeded by hand is seen within a second.
QUICK = {Trigger.SOURCE: 0.2, Trigger.FULL: 0.3, Trigger.INVENTORY: 60.0, Trigger.EDGE: 60.0}
DAY = 86400
STALE, MISSING = "guest/mc-lobby", "guest/mc-survival"
WORLDS = "backup/game-worlds"  # selects the game servers; max_age 13h


def seed(pve: Any, vmid: int, age: float) -> str:
    """A backup of `vmid` written `age` seconds ago, added on the fake's loop (the service
    lists the storage meanwhile, from that loop's thread)."""

    async def add() -> str:
        volid: str = pve.add_backup(BACKUP_STORAGE, vmid, time.time() - age)
        return volid

    return asyncio.run_coroutine_threadsafe(add(), pve._bk_loop).result(10)


def entries(status: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(b["guest"], b["job"]): b for b in (status["backups"] or {}).get("guests", [])}


def gauges(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith(("reconciler_backup", "reconciler_backups"))
    }


def events(caplog: pytest.LogCaptureFixture, guest: str) -> list[tuple[str, Any]]:
    """(event, was) of each backup event logged for `guest`, in order."""
    return [
        (r.getMessage(), r.fields["was"])  # type: ignore[attr-defined]
        for r in caplog.records
        if r.getMessage().startswith("backup ")
        and getattr(r, "fields", {}).get("guest") == guest
        and r.fields["job"] == WORLDS  # type: ignore[attr-defined]
    ]


def test_backup_freshness_is_in_status_metrics_and_events(
    pve_api: ProxmoxApi, pve: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="reconciler.service")

    async def body(svc: Running) -> None:
        # The guests are created first; the next cycle finds none of them backed up.
        status = await svc.until(
            lambda s: (
                len(entries(s)) > 2
                and all(b["freshness"] == "missing" for b in entries(s).values())
            )
        )
        listed = entries(status)
        assert (STALE, WORLDS) in listed and (MISSING, WORLDS) in listed
        others = [key for key in listed if MISSING not in key and STALE not in key]
        for guest, _job in others:
            seed(pve, listed[(guest, _job)]["vmid"], 60)
        old = seed(pve, listed[(STALE, WORLDS)]["vmid"], 3 * DAY)

        status = await svc.until(lambda s: entries(s)[(STALE, WORLDS)]["freshness"] == "stale")
        assert status["backups"]["counts"] == {
            "fresh": len(others),
            "stale": 1,
            "missing": 1,
            "unknown": 0,
        }
        stale = entries(status)[(STALE, WORLDS)]
        assert stale["newest"] == old and stale["max_age"] == 13 * 3600
        assert 3 * DAY <= stale["age"] < 3 * DAY + 60
        assert entries(status)[(MISSING, WORLDS)] == {
            "guest": MISSING,
            "job": WORLDS,
            "vmid": 1001,
            "freshness": "missing",
            "max_age": 13 * 3600,
            "newest": None,
            "age": None,
        }
        metrics = gauges((await svc.get("/metrics")).text)
        lobby = (("guest", "mc-lobby"), ("job", "game-worlds"))
        survival = (("guest", "mc-survival"), ("job", "game-worlds"))
        assert metrics[("reconciler_backup_age_seconds", lobby)] == stale["age"]
        assert metrics[("reconciler_backup_max_age_seconds", lobby)] == 13 * 3600
        # A guest without any backup has no age series, but its limit and the count say so.
        assert ("reconciler_backup_age_seconds", survival) not in metrics
        assert metrics[("reconciler_backup_max_age_seconds", survival)] == 13 * 3600
        assert metrics[("reconciler_backups_stale", ())] == 2  # stale or missing
        assert metrics[("reconciler_backups_unknown", ())] == 0

        # Fresh again: a backup of the lobby now.
        seed(pve, stale["vmid"], 0)
        status = await svc.until(lambda s: entries(s)[(STALE, WORLDS)]["freshness"] == "fresh")
        assert status["backups"]["counts"]["stale"] == 0
        assert status["backups"]["counts"]["missing"] == 1
        metrics = gauges((await svc.get("/metrics")).text)
        assert metrics[("reconciler_backup_age_seconds", lobby)] < 60
        assert metrics[("reconciler_backups_stale", ())] == 1
        # One more cycle: no event repeats while nothing changes.
        cycles = len(svc.service.cycles)
        await svc.until(lambda s: len(svc.service.cycles) > cycles + 1)

    run(DirectorySource(SPECS), pve_api, tmp_path, body, intervals=QUICK)

    # Transitions only: missing at first sight, stale when the old backup appeared, fresh
    # again when a new one did; the guest without a backup is reported missing once.
    assert events(caplog, STALE) == [
        ("backup missing", None),
        ("backup stale", "missing"),
        ("backup fresh again", "stale"),
    ]
    assert events(caplog, MISSING) == [("backup missing", None)]
    levels = {
        r.getMessage(): r.levelno
        for r in caplog.records
        if r.getMessage() in ("backup stale", "backup fresh again")
    }
    assert levels == {"backup stale": logging.WARNING, "backup fresh again": logging.INFO}


# --- the pieces: transitions on the board, series on the registry ------------------------------


def item(guest: str, freshness: str, age: int | None = None) -> BackupFreshness:
    newest = None if age is None else f"backup:backup/{guest}"
    return BackupFreshness(
        f"guest/{guest}", WORLDS, 1000, Freshness(freshness), 13 * 3600, newest, age
    )


def test_transitions_ignore_unknown_and_forget_guests_that_left() -> None:
    board = StatusBoard("zpack")
    assert board.to_json()["backups"] is None  # no full plan yet

    def record(*items: BackupFreshness) -> list[tuple[str, str, str | None]]:
        return [
            (t.item.guest, t.item.freshness.value, t.was and t.was.value)
            for t in board.record_backups(items)
        ]

    assert record(item("a", "fresh", 5), item("b", "stale", DAY)) == [("guest/b", "stale", None)]
    # The storage could not be listed: nothing is known, so nothing changed.
    assert record(item("a", "unknown"), item("b", "unknown")) == []
    assert board.to_json()["backups"]["counts"] == {
        "fresh": 0,
        "stale": 0,
        "missing": 0,
        "unknown": 2,
    }
    assert record(item("a", "fresh", 5), item("b", "stale", DAY)) == []
    assert record(item("a", "missing"), item("b", "fresh", 5)) == [
        ("guest/a", "missing", "fresh"),
        ("guest/b", "fresh", "stale"),
    ]
    # b left the spec, then came back stale: first sight again.
    assert record(item("a", "missing")) == []
    assert record(item("a", "missing"), item("b", "stale", DAY)) == [("guest/b", "stale", None)]


def test_gauges_of_guests_that_left_or_lost_their_backup_are_removed() -> None:
    m = Metrics()
    m.set_backups([item("a", "fresh", 5), item("b", "stale", DAY), item("c", "unknown")])
    text = gauges(m.render().decode())
    assert text[("reconciler_backup_age_seconds", (("guest", "b"), ("job", "game-worlds")))] == DAY
    assert ("reconciler_backup_age_seconds", (("guest", "c"), ("job", "game-worlds"))) not in text
    assert text[("reconciler_backups_stale", ())] == 1
    assert text[("reconciler_backups_unknown", ())] == 1
    m.set_backups([item("a", "missing")])
    text = gauges(m.render().decode())
    assert [k for k in text if k[0] == "reconciler_backup_age_seconds"] == []
    assert [k[1] for k in text if k[0] == "reconciler_backup_max_age_seconds"] == [
        (("guest", "a"), ("job", "game-worlds"))
    ]
    assert text[("reconciler_backups_stale", ())] == 1
    assert text[("reconciler_backups_unknown", ())] == 0
