"""The service in-process, on fakepve: a git source with a broken then a fixed commit, a forced
failure in /status, /metrics as Prometheus text, and the fencing check before every change."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from reconciler.applying.connecting import Endpoints, agent_health_provider
from reconciler.controller.lease import LocalLease
from reconciler.controller.service import Service, Settings, without
from reconciler.controller.sources import DirectorySource, GitSource, Revision, SpecSource
from reconciler.controller.status import CycleOutcome
from reconciler.controller.timing import Trigger
from reconciler.loading.loader import LoadResult
from reconciler.model.errors import FencingError
from reconciler.model.observed import ObservedState
from reconciler.model.resources import DesiredGraph
from reconciler.model.spec import ProxmoxApi
from reconciler.planning.planner import make_plan
from reconciler.simulators.agent import AgentFleet
from reconciler.simulators.velocity_bridge import VelocityBridgeSimulator
from tests.conftest import SPECS
from tests.fakepve_fixtures import mutating_calls

FAST = {Trigger.SOURCE: 0.2, Trigger.FULL: 60.0, Trigger.INVENTORY: 60.0, Trigger.EDGE: 60.0}


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


def make_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "platform"
    shutil.copytree(SPECS, repo / "specs")
    git(repo.parent, "init", "-q", "-b", "main", str(repo))
    git(repo, "config", "user.email", "ops@example.invalid")
    git(repo, "config", "user.name", "ops")
    commit(repo, "the platform")
    return repo


def commit(repo: Path, message: str) -> str:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


def edit(repo: Path, file: str, old: str, new: str) -> None:
    path = repo / "specs" / file
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


class Running:
    def __init__(self, service: Service) -> None:
        self.service = service

    async def status(self) -> dict[str, Any]:
        async with httpx.AsyncClient(trust_env=False, timeout=5) as client:
            r = await client.get(f"http://127.0.0.1:{self.service.port}/status")
            r.raise_for_status()
            result: dict[str, Any] = r.json()
            return result

    async def get(self, path: str) -> httpx.Response:
        async with httpx.AsyncClient(trust_env=False, timeout=5) as client:
            return await client.get(f"http://127.0.0.1:{self.service.port}{path}")

    async def until(
        self, what: Callable[[dict[str, Any]], bool], timeout: float = 30
    ) -> dict[str, Any]:
        status: dict[str, Any] = {}
        try:
            with anyio.fail_after(timeout):
                while True:
                    status = await self.status()
                    if what(status):
                        return status
                    await anyio.sleep(0.05)
        except TimeoutError:
            raise AssertionError(f"timed out; last status: {status}") from None


def run_service(
    source: SpecSource,
    api: ProxmoxApi,
    tmp_path: Path,
    body: Callable[[Running], Awaitable[None]],
    intervals: dict[Trigger, float] = FAST,
) -> Service:
    service = Service(
        source,
        LocalLease(tmp_path / "lock"),
        Endpoints(proxmox=api, edge=False),
        Settings(
            intervals=intervals,
            state_dir=tmp_path / "state",
            listen=("127.0.0.1", 0),
            lease_interval=0.2,
        ),
    )

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(service.run)
            try:
                await body(Running(service))
            finally:
                service.stop()

    anyio.run(main)
    return service


def full_cycle_done(status: dict[str, Any], revision: str | None = None) -> bool:
    """A full cycle that started after the revision was fetched applied all it wanted."""
    cycle = status["last_cycle"]
    rev = status["revision"] or {}
    return (
        cycle is not None
        and cycle["kind"] == "full"
        and cycle["outcome"] in ("converged", "changed")
        and cycle["started_at"] >= rev.get("fetched_at", "")
        and (revision is None or rev.get("id") == revision)
    )


def test_a_broken_revision_is_reported_and_never_applied_the_fixed_one_is(
    pve_api: ProxmoxApi, pve: Any, tmp_path: Path
) -> None:
    repo = make_repo(tmp_path)
    first = git(repo, "rev-parse", "HEAD")

    class Counted(GitSource):
        fetches = 0

        async def fetch(self) -> Revision:
            try:
                return await super().fetch()
            finally:
                Counted.fetches += 1

    source = Counted(str(repo), branch="main", subdir="specs", workdir=tmp_path / "git")
    lobby = 1000  # mc-lobby's vmid in the example

    async def body(svc: Running) -> None:
        await svc.until(lambda s: full_cycle_done(s, first))
        memory = pve.ct(lobby).config["memory"]
        # A valid change and a broken one in one commit: nothing of it may be applied.
        edit(repo, "game.yaml", "cores: 1\n    memory: 2G", "cores: 1\n    memory: 3G")
        edit(repo, "game.yaml", "    cores: 1\n", "    corez: 1\n")
        bad = commit(repo, "bigger lobby, and a typo")
        status = await svc.until(lambda s: (s["revision_error"] or {}).get("id") == bad)
        assert "corez" in status["revision_error"]["diagnostics"]
        assert "game.yaml" in status["revision_error"]["diagnostics"]
        assert status["revision"]["id"] == first  # still converging to the last good one
        # A few more source polls (and whatever cycle the first asked for, which the worker
        # runs before the third): still nothing applied.
        seen = Counted.fetches
        with anyio.fail_after(30):
            while Counted.fetches < seen + 3:
                await anyio.sleep(0.05)  # polling interval
        assert pve.ct(lobby).config["memory"] == memory
        edit(repo, "game.yaml", "    corez: 1\n", "    cores: 1\n")
        fixed = commit(repo, "fix the typo")
        status = await svc.until(lambda s: full_cycle_done(s, fixed))
        assert status["revision_error"] is None
        assert pve.ct(lobby).config["memory"] == 3072
        # The snapshot CI plans against: served, and written to the state directory.
        served = (await svc.get("/snapshot")).json()
        assert served["format"] == "reconciler/observed-state"
        on_disk = json.loads((tmp_path / "state" / "observed.json").read_text())
        assert on_disk == served
        owned = [r for r in served["resources"] if r["owned"] and r["kind"] == "guest"]
        assert len(owned) == 21

    run_service(source, pve_api, tmp_path, body)


def test_status_shows_a_forced_failure_and_metrics_parse(
    pve_api: ProxmoxApi, pve: Any, tmp_path: Path
) -> None:
    # Every create of mc-survival's vmid fails with a permanent error from Proxmox.
    pve.fail(
        "POST", "/nodes/{node}/lxc", status=400, message="storage 'local-lvm' is full", times=None
    )

    async def body(svc: Running) -> None:
        status = await svc.until(lambda s: (s["last_cycle"] or {}).get("kind") == "full")
        assert status["last_cycle"]["outcome"] == "failed"
        guest = status["resources"]["guest/mc-survival"]
        assert guest["state"] == "backoff"
        assert "storage 'local-lvm' is full" in guest["last_error"]
        assert guest["next_retry_at"] is not None
        guests = {a: r for a, r in status["resources"].items() if a.startswith("guest/")}
        assert len(guests) == 21
        # The bastion is a VM, cloned (not created by POST .../lxc): it converged.
        assert guests.pop("guest/bastion")["state"] == "converged"
        # each container failed (and waits out its backoff) or was not tried because what it
        # depends on failed
        assert {r["state"] for r in guests.values()} == {"backoff", "withheld"}
        # what depends on a failed guest is reported, not hidden
        assert status["resources"]["firewall/guest/mc-survival"]["state"] == "withheld"
        # the cluster-wide firewall objects did not depend on the guests: they converged
        assert status["resources"]["firewall/group/agent"]["state"] == "converged"
        metrics = (await svc.get("/metrics")).text
        families = {f.name: f for f in text_string_to_metric_families(metrics)}
        cycles = {
            (s.labels["kind"], s.labels["outcome"]): s.value
            for s in families["reconciler_cycles"].samples
            if s.name == "reconciler_cycles_total"
        }
        assert cycles[("full", "failed")] >= 1
        actions = {
            (s.labels["kind"], s.labels["action"], s.labels["result"]): s.value
            for s in families["reconciler_actions"].samples
            if s.name == "reconciler_actions_total"
        }
        failed = actions[("guest", "create", "failed")]
        assert failed == sum(1 for r in guests.values() if r["state"] == "backoff")
        assert actions[("firewall/group", "create", "done")] == 3
        calls = [
            s.value
            for s in families["reconciler_proxmox_api_calls"].samples
            if s.name.endswith("_total")
        ]
        assert calls and calls[0] > 20
        assert (await svc.get("/readyz")).status_code == 200
        assert (await svc.get("/healthz")).status_code == 200

    run_service(DirectorySource(SPECS), pve_api, tmp_path, body)


def test_every_change_passes_the_fencing_check_first(
    pve_api: ProxmoxApi, pve: Any, tmp_path: Path
) -> None:
    """A lease that says no (this replica lost it): the service plans but changes nothing."""

    class Lost(LocalLease):
        async def check(self) -> int:
            raise FencingError("the lease was taken over by ctl-b (token 8)")

    service = Service(
        DirectorySource(SPECS),
        Lost(tmp_path / "lock"),
        Endpoints(proxmox=pve_api, edge=False),
        Settings(intervals=FAST, state_dir=tmp_path / "state", listen=None, lease_interval=0.2),
    )

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(service.run)
            with anyio.fail_after(30):
                while not any(t is Trigger.FULL for t, _ in service.cycles):
                    await anyio.sleep(0.05)
            service.stop()

    anyio.run(main)
    assert mutating_calls(pve) == []
    assert service.board.last_cycle is not None and service.board.last_cycle.skipped > 0


class CycleLog(list[tuple[Trigger, CycleOutcome]]):
    """`service.cycles`, noting as each cycle ends the Proxmox calls made so far and the
    service's clock: counters read at a cycle boundary, never whenever the test looks (when a
    poll may be halfway through)."""

    def __init__(self, service: Service) -> None:
        super().__init__()
        self.service = service
        self.calls: list[int] = []
        self.at: list[float] = []

    def append(self, cycle: tuple[Trigger, CycleOutcome]) -> None:
        guests = self.service._guests()
        self.calls.append(guests.calls if guests is not None else 0)
        self.at.append(self.service.clock())
        super().append(cycle)

    def count(self, trigger: Trigger, since: int = 0) -> int:  # type: ignore[override]
        return sum(1 for t, _ in self[since:] if t is trigger)


def test_the_edge_poll_heals_a_velocity_restart_and_follows_readiness_between_full_cycles(
    pve_api: ProxmoxApi,
    pve: Any,
    tmp_path: Path,
    traefik_factory: Any,
    example: LoadResult,
    graph: DesiredGraph,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert example.spec is not None
    monkeypatch.setenv("ZPACK_BRIDGE_SECRET", "bridge-secret")
    feeds = tmp_path / "feeds"
    feeds.mkdir()
    traefik = traefik_factory([f"--providers.file.directory={feeds}"])
    intervals = {
        Trigger.SOURCE: 60.0,
        Trigger.FULL: 60.0,
        Trigger.INVENTORY: 0.5,  # due often, but the edge poll's inventory read covers it
        Trigger.EDGE: 0.3,
    }
    with VelocityBridgeSimulator("bridge-secret") as bridge, AgentFleet(control=False) as fleet:
        agents = {}
        for i, address in enumerate(sorted(agent_health_provider(example.spec).endpoints), start=1):
            agents[address.removeprefix("guest/")] = fleet.add(i, name=address)
        endpoints = Endpoints(
            proxmox=pve_api,
            velocity_url=bridge.url,
            agents={name: fleet.endpoint(a.vmid) for name, a in agents.items()},
            traefik_files={"core": feeds / "core.yml", "runtime": feeds / "runtime.yml"},
            traefik_apis={"core": traefik.api_url, "runtime": traefik.api_url},
        )
        service = Service(
            DirectorySource(SPECS),
            LocalLease(tmp_path / "lock"),
            endpoints,
            Settings(
                intervals=intervals, state_dir=tmp_path / "state", listen=None, lease_interval=0.2
            ),
        )

        log = service.cycles = CycleLog(service)
        opened: list[int] = []

        async def until(what: Callable[[], bool], timeout: float = 30) -> None:
            with anyio.fail_after(timeout):
                while not what():
                    await anyio.sleep(0.05)  # polling interval

        async def main() -> None:
            async with anyio.create_task_group() as tg:
                await tg.start(service.run)
                await until(lambda: len(bridge.servers()) == 5)
                # settled: the full cycle that follows the first apply found nothing to do
                await until(lambda: (Trigger.FULL, CycleOutcome.CONVERGED) in log)
                fulls = log.count(Trigger.FULL)

                bridge.restart()  # Velocity forgot every registration
                await until(lambda: len(bridge.servers()) == 5)
                # (the registrations are back before the poll that made them has ended)
                await until(lambda: (Trigger.EDGE, CycleOutcome.CHANGED) in log)
                agents["mc-lobby"].unready("world is loading")
                await until(lambda: "lobby" not in bridge.servers())
                agents["mc-lobby"].ready()
                await until(lambda: len(bridge.servers()) == 5)
                # all of it by the edge poll: no full cycle ran meanwhile
                assert log.count(Trigger.FULL) == fulls
                # A window of edge polls, closed by stopping the service (the poll in flight
                # finishes first): the counts below are all read at the end of a cycle.
                opened.append(len(log))
                await until(lambda: log.count(Trigger.EDGE, since=opened[0]) >= 6)
                service.stop()

        anyio.run(main)
    # One Proxmox call per edge poll (its inventory read, which also serves as the drift
    # check): no separate inventory call on top. Counted from the end of the window's first
    # edge poll to the end of its last.
    edges = [i for i in range(opened[0], len(log)) if log[i][0] is Trigger.EDGE]
    first, last = edges[0], edges[-1]
    assert all(t in (Trigger.EDGE, Trigger.INVENTORY) for t, _ in log[first:last]), log
    # An edge poll logs its inventory check, then itself: an inventory check not followed by
    # an edge poll ran on its own, with a call of its own...
    alone = [
        i
        for i in range(first + 1, last)
        if log[i][0] is Trigger.INVENTORY and log[i + 1][0] is not Trigger.EDGE
    ]
    assert log.calls[last] - log.calls[first] == len(edges) - 1 + len(alone), (log, log.calls)
    # ...and only once the last inventory read was an interval old: each edge poll's read
    # pushes it back (so under load, a poll that outlasts the interval may see one).
    for i in alone:
        read = max(j for j in range(i) if log[j][0] is Trigger.INVENTORY)
        assert log.at[i] - log.at[read] >= intervals[Trigger.INVENTORY], (log, log.at)
    assert (feeds / "runtime.yml").read_text().count("rc-") >= 4
    # /status: each edge poll's verdict keeps its kinds' states current, the rest as they were.
    states = {a: s.state.value for a, s in service.board.resources.items()}
    velocity = {a: s for a, s in states.items() if a.startswith("velocity/")}
    assert len(velocity) == 5 and set(velocity.values()) == {"converged"}, states
    assert len(states) == len(graph.resources), states


def test_a_bug_in_one_cycle_is_reported_and_the_service_keeps_serving(
    pve_api: ProxmoxApi, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class Flaky(DirectorySource):
        """A source with a bug that shows once: not one of our errors."""

        calls = 0

        async def fetch(self) -> Revision:
            Flaky.calls += 1
            if Flaky.calls == 1:
                raise KeyError("a bug")
            return await super().fetch()

    async def body(svc: Running) -> None:
        status = await svc.until(lambda s: full_cycle_done(s))
        assert status["revision"]["id"].startswith("dir-")
        assert (await svc.get("/healthz")).status_code == 200

    run_service(Flaky(SPECS), pve_api, tmp_path, body)
    assert Flaky.calls >= 2
    assert any(r.getMessage() == "cycle failed" and r.exc_info for r in caplog.records)


def test_leaving_a_resource_out_leaves_out_what_needs_it(graph: DesiredGraph) -> None:
    """A guest waiting out a backoff takes its firewall change with it, which would otherwise
    start the guest without the guest's own change."""
    plan = make_plan(graph, ObservedState())
    trimmed = without(plan, {"guest/mc-lobby"})
    left = {c.address for c in trimmed.changes}
    assert "guest/mc-lobby" not in left and "firewall/guest/mc-lobby" not in left
    assert "velocity/lobby" not in left  # registered only once its guest is there
    assert "guest/mc-survival" in left and "firewall/guest/mc-survival" in left
