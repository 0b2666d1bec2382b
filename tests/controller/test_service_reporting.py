"""What the service reports is true (issue 17): /status lists every resource it manages, the
controller's own changes are not drift, drift is logged as changes and not as an error, and an
edit to a directory source is loaded within seconds. In-process on fakepve; the clean SIGTERM
is checked on the real process in test_service_processes.py."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest

from reconciler.applying.connecting import Endpoints
from reconciler.cli.main import parser
from reconciler.cli.service import options_from
from reconciler.controller.lease import LocalLease
from reconciler.controller.service import Service, Settings, build_service, inventory_baseline
from reconciler.controller.sources import DirectorySource, directory_id
from reconciler.controller.status import CycleOutcome, ResourceState, StatusBoard
from reconciler.controller.timing import Trigger
from reconciler.model.resources import DesiredGraph, Kind
from reconciler.model.spec import ProxmoxApi
from reconciler.providers.proxmox import Inventory, connect
from reconciler.providers.proxmox_inventory import inventory_drift
from tests.conftest import SPECS
from tests.controller.test_service import Running, run_service
from tests.waiting import eventually, wait_for

QUIET = {Trigger.SOURCE: 600.0, Trigger.FULL: 600.0, Trigger.INVENTORY: 600.0, Trigger.EDGE: 600.0}
LOBBY = 1000  # mc-lobby's vmid in the example


def managed(graph: DesiredGraph) -> set[str]:
    """The example's addresses a service without the edge manages."""
    return {a for a, r in graph.resources.items() if r.kind not in (Kind.ROUTE, Kind.VELOCITY)}


def converged_once(service: Service) -> bool:
    return (Trigger.FULL, CycleOutcome.CONVERGED) in service.cycles


# --- /status resources ---------------------------------------------------------------------


def test_a_clean_start_on_a_converged_platform_lists_every_resource_as_converged(
    pve_api: ProxmoxApi, tmp_path: Path, graph: DesiredGraph
) -> None:
    async def settle(svc: Running) -> None:
        await eventually(lambda: converged_once(svc.service), "a converged full cycle")

    run_service(DirectorySource(SPECS), pve_api, tmp_path / "a", settle, QUIET)

    # A second start: its first full cycle finds nothing to do, and still lists everything.
    async def look(svc: Running) -> None:
        status = await svc.until(lambda s: (s["last_cycle"] or {}).get("kind") == "full")
        assert status["last_cycle"]["outcome"] == "converged", status["last_cycle"]
        resources = status["resources"]
        assert set(resources) == managed(graph)
        # The spec's DNS server is not in this lab (nor its key): its records alone are unknown.
        dns = {a for a in resources if a.startswith("dns/")}
        assert len(dns) == 29 and {resources[a]["state"] for a in dns} == {"unknown"}
        assert {r["state"] for a, r in resources.items() if a not in dns} == {"converged"}
        # The counts agree with the listing.
        assert status["summary"]["converged"] == len(resources) - len(dns)
        assert sum(status["summary"].values()) == len(resources)
        assert status["drift"] == 0

    run_service(DirectorySource(SPECS), pve_api, tmp_path / "b", look, QUIET)


def test_the_plans_verdict_replaces_stale_states_and_forgets_what_is_gone() -> None:
    board = StatusBoard("zpack")
    board.record_result("guest/a", False, "storage full", next_retry_at=10.0)
    board.record_result("guest/b", False, "locked", next_retry_at=10.0)
    board.record_result("guest/gone", True)
    board.record_plan(
        ["guest/c"],
        in_sync=["guest/a", "firewall/group/x"],
        withheld={"velocity/lobby": "mc-lobby is not ready"},
        unseen={"guest/b": "proxmox unreachable", "backup/daily": "proxmox unreachable"},
    )
    states = {a: (s.state, s.last_error) for a, s in board.resources.items()}
    assert states == {
        "guest/a": (ResourceState.CONVERGED, ""),  # in sync now: the failure is over
        "guest/b": (ResourceState.BACKOFF, "locked"),  # not seen: its backoff is kept
        "guest/c": (ResourceState.PENDING, ""),
        "firewall/group/x": (ResourceState.CONVERGED, ""),
        "velocity/lobby": (ResourceState.WITHHELD, "mc-lobby is not ready"),
        "backup/daily": (ResourceState.UNKNOWN, "proxmox unreachable"),
    }  # guest/gone: neither desired nor owned any more
    assert board.drift == 1
    doc = board.to_json()
    assert sum(doc["summary"].values()) == len(doc["resources"]) == 6
    # The edge poll's verdict covers its kinds only: drift and the rest stay.
    board.record_plan(["velocity/lobby"], partial=True)
    assert board.drift == 1 and len(board.resources) == 6
    assert board.resources["velocity/lobby"].state is ResourceState.PENDING


# --- drift: the controller's own changes are not drift; a hand change is, logged as such ---


def test_the_controllers_own_changes_are_not_drift_and_a_hand_change_is(
    pve_api: ProxmoxApi, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="reconciler.service")
    intervals = {**QUIET, Trigger.INVENTORY: 0.2}
    client = connect(pve_api)

    def lobby_node() -> str:
        found = [r for r in client.cluster.resources.get(type="vm") if r["vmid"] == LOBBY]
        return str(found[0]["node"])

    async def body(svc: Running) -> None:
        cycles = svc.service.cycles
        await eventually(lambda: (Trigger.FULL, CycleOutcome.CHANGED) in cycles, "a change")
        first = cycles.index((Trigger.FULL, CycleOutcome.CHANGED))
        # Inventory checks every 0.2 s until the follow-up full cycle (5 s later).
        await eventually(
            lambda: sum(1 for t, _ in cycles[first + 1 :] if t is Trigger.INVENTORY) >= 3,
            "three inventory checks",
        )
        after = cycles[first + 1 :]
        until_next_full = after[
            : next((i for i, (t, _) in enumerate(after) if t is Trigger.FULL), None)
        ]
        checks = [o for t, o in until_next_full if t is Trigger.INVENTORY]
        # What the first cycle created is not drift: no check saw any, none asked for a cycle.
        assert len(checks) >= 3, after
        assert set(checks) == {CycleOutcome.CONVERGED}, after

        # A hand change is drift: seen by the next check, which asks for a full cycle.
        node = await anyio.to_thread.run_sync(lobby_node)
        mark = len(cycles)
        await anyio.to_thread.run_sync(
            lambda: client.nodes(node).lxc(LOBBY).config.put(memory=4096)
        )
        await eventually(
            lambda: (Trigger.INVENTORY, CycleOutcome.CHANGED) in cycles[mark:], "drift seen"
        )
        # The full cycle it asks for puts it back.
        await eventually(lambda: (Trigger.FULL, CycleOutcome.CHANGED) in cycles[mark:], "healed")

    run_service(DirectorySource(SPECS), pve_api, tmp_path, body, intervals)

    drifted = [
        r.fields  # type: ignore[attr-defined]
        for r in caplog.records
        if r.getMessage() == "cycle"
        and r.fields.get("kind") == "inventory"  # type: ignore[attr-defined]
        and r.fields.get("outcome") == "changed"  # type: ignore[attr-defined]
    ]
    assert drifted, "no inventory check saw the hand change"
    line = drifted[0]
    # Drift is not an error: its own keys, `error` left for errors.
    assert "error" not in line, line
    assert line["drift"] >= 1
    assert any(c.startswith(f"vmid {LOBBY}: memory") for c in line["changes"]), line
    seen = [r for r in caplog.records if r.getMessage() == "inventory drift"]
    assert seen and "error" not in seen[0].fields  # type: ignore[attr-defined]
    assert any(str(LOBBY) in c for c in seen[0].fields["changes"])  # type: ignore[attr-defined]


def test_the_baseline_read_from_an_inventory_agrees_with_that_inventory() -> None:
    mib = 1024 * 1024
    guests: list[dict[str, Any]] = [
        {"vmid": 1000, "type": "lxc", "node": "pve-runtime", "name": "mc-lobby",
         "status": "running", "maxcpu": 2, "maxmem": 2048 * mib, "tags": "zpack;game"},
        {"vmid": 9000, "type": "lxc", "node": "pve-core", "name": "tpl", "status": "stopped",
         "maxcpu": 1, "maxmem": 512 * mib, "template": 1},
    ]  # fmt: skip
    inventory = Inventory(guests=guests)
    baseline = inventory_baseline(inventory)
    assert inventory_drift(baseline, inventory) == []
    for key, value, seen in (
        ("maxmem", 4096 * mib, "memory"),
        ("maxcpu", 4, "cores"),
        ("status", "stopped", "state"),
        ("tags", "zpack", "tags"),
        ("node", "pve-core", "node"),
        ("name", "mc-hub", "name"),
    ):
        changed = Inventory(guests=[{**guests[0], key: value}, guests[1]])
        assert [d.split(":")[0] for d in inventory_drift(baseline, changed)] == ["vmid 1000"]
        assert seen in inventory_drift(baseline, changed)[0]
    assert inventory_drift(baseline, Inventory(guests=guests[1:])) == ["vmid 1000: disappeared"]


# --- a directory source is watched ---------------------------------------------------------


def test_an_edit_to_a_directory_source_is_loaded_within_seconds(
    pve_api: ProxmoxApi, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="reconciler.service")
    specs = tmp_path / "specs"
    shutil.copytree(SPECS, specs)
    service = Service(
        DirectorySource(specs),
        LocalLease(tmp_path / "lock"),
        Endpoints(proxmox=pve_api, edge=False),
        Settings(
            intervals=QUIET,  # the source is polled every 600 s: only the watch can be this quick
            state_dir=tmp_path / "state",
            listen=None,
            lease_interval=0.2,
            watch_interval=0.2,
        ),
    )

    def loaded(revision: str) -> bool:
        return service.board.revision is not None and service.board.revision.id == revision

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(service.run)
            first = directory_id(specs)
            await anyio.to_thread.run_sync(lambda: wait_for(lambda: loaded(first), "loaded"))
            game = specs / "game.yaml"
            game.write_text(game.read_text().replace("memory: 2G", "memory: 3G", 1))
            edited = directory_id(specs)
            assert edited != first
            await anyio.to_thread.run_sync(
                lambda: wait_for(lambda: loaded(edited), "the edit loaded", timeout=10.0)
            )
            service.stop()

    anyio.run(main)
    assert any(r.getMessage() == "specs changed" for r in caplog.records)


def test_a_directory_stamp_changes_with_an_edit_an_added_and_a_removed_file(
    tmp_path: Path,
) -> None:
    specs = tmp_path / "specs"
    shutil.copytree(SPECS, specs)
    source = DirectorySource(specs)
    stamps = [source.stamp()]
    assert source.stamp() == stamps[-1]  # untouched: the same
    game = specs / "game.yaml"
    game.write_text(game.read_text().replace("memory: 2G", "memory: 4G", 1))  # same size
    stamps.append(source.stamp())
    (specs / "extra.yaml").write_text("{}\n")
    stamps.append(source.stamp())
    (specs / "extra.yaml").unlink()
    stamps.append(source.stamp())
    (specs / ".hidden.yaml").write_text("{}\n")  # not a spec file: not read, not watched
    (specs / "notes.txt").write_text("x\n")
    stamps.append(source.stamp())
    edited, added, removed, ignored = stamps[1:]
    assert stamps[0] != edited != added != removed == ignored, stamps
    assert DirectorySource(tmp_path / "nowhere").stamp()  # a missing folder: no exception


@pytest.mark.parametrize(
    ("argv", "env", "watch"),
    [([], None, 1.0), (["--watch-interval", "0.5"], None, 0.5), ([], "0", None)],
)
def test_the_watch_interval_flag(
    argv: list[str],
    env: str | None,
    watch: float | None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if env is not None:
        monkeypatch.setenv("RECONCILER_WATCH_INTERVAL", env)
    args = parser().parse_args(["run", str(SPECS), "--state-dir", str(tmp_path), *argv])
    service, _close = build_service(options_from(args), endpoints=Endpoints())
    assert service.settings.watch_interval == watch


def test_a_negative_watch_interval_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parser().parse_args(["run", "--watch-interval", "-1"])
    assert "--watch-interval" in capsys.readouterr().err
