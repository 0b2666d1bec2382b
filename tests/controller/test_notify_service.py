"""Notifications from the running service, in-process on fakepve, to receivers the tests start
(tests/controller/test_notify.py): a memory changed by hand is one "drift healed" summary, a
destroy held back is told once over many cycles and "resolved" once when the spec takes the
guest back, a change that fails is told with its error and resolved when it succeeds; and a
target that never answers leaves every cycle as quick as it was.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from reconciler.controller.sources import DirectorySource
from reconciler.controller.timing import Trigger
from reconciler.model.spec import ProxmoxApi
from reconciler.providers.proxmox import connect
from tests.controller.test_notify import HttpReceiver, Silent
from tests.controller.test_service import Running
from tests.controller.test_service import run_service as run
from tests.fakepve_fixtures import TEMPLATE
from tests.guest_helpers import GAME_RANGE, LOBBY, SURVIVAL, platform_yaml

# A full cycle often; the source is looked at often, so an edited spec is a new revision soon.
QUICK = {Trigger.SOURCE: 0.2, Trigger.FULL: 0.3, Trigger.INVENTORY: 60.0, Trigger.EDGE: 60.0}

GUESTS = (
    f"""
profiles:
  game:
    template: local:vztmpl/{TEMPLATE}
    memory: 2G
    disk: {{size: 8G}}
guests:"""
    + LOBBY
    + SURVIVAL
)


def specs(tmp_path: Path, url: str, *, extra: str = "") -> Path:
    where = tmp_path / "specs"
    where.mkdir()
    (where / "platform.yaml").write_text(platform_yaml(GAME_RANGE))
    (where / "guests.yaml").write_text(GUESTS)
    (where / "notifications.yaml").write_text(
        f"notifications:\n  targets:\n    ops:\n      url: '{url}'\n{extra}"
    )
    return where


def messages(http: HttpReceiver, start: str) -> list[dict[str, Any]]:
    return [body for _path, _headers, body in http.got if body["title"].startswith(start)]


def converged(status: dict[str, Any]) -> bool:
    cycle = status["last_cycle"]
    return (
        bool(cycle and cycle["kind"] == "full" and cycle["outcome"] == "converged")
        and status["summary"]["converged"] >= 2
    )


def go(
    where: Path, api: ProxmoxApi, tmp_path: Path, body: Callable[[Running], Awaitable[None]]
) -> None:
    run(DirectorySource(str(where)), api, tmp_path, body, intervals=QUICK)


def test_drift_held_back_destroys_and_failed_changes_are_told_once_and_resolved(
    pve_api: ProxmoxApi, pve: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    http = HttpReceiver()
    where = specs(tmp_path, f"json://127.0.0.1:{http.port}/ops", extra="      min_severity: info\n")
    client = connect(pve_api)
    lobby = client.nodes("pve-runtime").lxc(1000)

    async def body(svc: Running) -> None:
        await svc.until(converged)
        assert messages(http, "[zpack] leader")  # info: this target wants it

        # Drift: the lobby's memory changed by hand; the next full cycle puts it back.
        lobby.config.put(memory=4096)
        await svc.until(lambda s: bool(messages(http, "[zpack] drift healed")))
        [drift] = messages(http, "[zpack] drift healed")
        assert drift["title"] == "[zpack] drift healed: 1 resource put back as the spec says"
        assert drift["message"] == "~ guest/mc-lobby: memory 4096 -> 2048"
        assert drift["type"] == "warning"

        # A destroy held back (pruning is off): told once however many cycles see it.
        (where / "guests.yaml").write_text(GUESTS.replace(SURVIVAL, ""))
        await svc.until(lambda s: bool(s["held_back"]))
        cycles = len(svc.service.cycles)
        await svc.until(lambda s: len(svc.service.cycles) > cycles + 3)
        assert len(messages(http, "[zpack] guest/mc-survival: delete held back")) == 1
        status = await svc.status()
        [open_] = status["notifications"]["open"]
        assert (open_["event"], open_["subject"]) == ("held-back", "guest/mc-survival")
        # Back in the spec: resolved, once.
        (where / "guests.yaml").write_text(GUESTS)
        resolved = "[zpack] resolved: guest/mc-survival: delete held back"
        await svc.until(lambda s: bool(messages(http, resolved)) and not s["held_back"])

        # A change that fails: told with its error; it succeeds after a new revision.
        pve.fail("POST", "/nodes/pve-runtime/lxc", status=500, message="storage is offline")
        creative = SURVIVAL.replace("mc-survival", "mc-creative").replace("1001", "1002")
        (where / "guests.yaml").write_text(GUESTS + creative.replace(".11/24", ".12/24"))
        failed = "[zpack] guest/mc-creative: its change failed"
        await svc.until(lambda s: bool(messages(http, failed)))
        assert "storage is offline" in messages(http, failed)[0]["message"]
        assert messages(http, failed)[0]["type"] == "failure"
        pve.failures.clear()
        (where / "guests.yaml").write_text(
            GUESTS + creative.replace(".11/24", ".12/24") + "\n# a new revision: retried at once\n"
        )
        await svc.until(lambda s: bool(messages(http, f"[zpack] resolved: {failed[8:]}")))
        status = await svc.status()
        assert status["notifications"]["open"] == []
        assert status["notifications"]["targets"]["ops"]["failed"] == 0

    try:
        go(where, pve_api, tmp_path, body)
    finally:
        http.close()
    titles = http.titles()
    # Each once: opened and resolved, nothing repeated across the many cycles.
    assert len(titles) == len(set(titles)), titles


def test_a_target_that_never_answers_does_not_slow_a_cycle(
    pve_api: ProxmoxApi, pve: Any, tmp_path: Path
) -> None:
    silent = Silent()
    # Our timeout and Apprise's read timeout both far beyond a cycle's time.
    where = specs(
        tmp_path,
        f"json://127.0.0.1:{silent.port}/?rto=60",
        extra="      min_severity: info\n      timeout: 60s\n",
    )

    async def body(svc: Running) -> None:
        status = await svc.until(converged)
        stuck = svc.service.notifier.targets["ops"]
        # The leader message is on its way and will never be answered.
        await svc.until(lambda s: bool(silent.held) and stuck.pending >= 1)
        before = len(svc.service.cycles)
        status = await svc.until(lambda s: len(svc.service.cycles) >= before + 3)
        # Cycles went on while the delivery hangs, each as quick as without a target.
        assert stuck.pending >= 1 and svc.service.notifier.inflight >= 1
        target = status["notifications"]["targets"]["ops"]
        assert (target["sent"], target["failed"]) == (0, 0)
        # A cycle that waited for the target would last its 60 s timeout; the bound is that,
        # not a guess at how fast a busy machine runs a cycle.
        assert status["last_cycle"]["seconds"] < 60
        assert json.dumps(status).count("rto=60") == 0  # the URL is never shown

    try:
        go(where, pve_api, tmp_path, body)
    finally:
        silent.close()
