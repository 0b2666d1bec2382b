"""Faults Proxmox really produces, injected into fakepve, and what a converge does with them.

Temporary errors (file locks, 502/503 bursts, lost quorum, "got no worker upid") are retried and
counted; config locks are waited out; slow tasks are polled, and one that outlives the task
timeout fails its own guest only; a permanent error stops only its guest and what depends on it;
a task that ends in error is reported with its log's last lines.

Every assertion reads Proxmox's state or fakepve's request log. Time is injected: `VirtualTime`
is the provider's clock and sleep, and runs test hooks (clear a lock, regain quorum) at chosen
sleeps.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from reconciler.applying.executor import Outcome
from reconciler.applying.observing import observe_all
from reconciler.model.errors import TemporaryError
from reconciler.model.resources import DesiredGraph, Kind
from reconciler.model.spec import ProxmoxApi
from reconciler.planning.planner import make_plan
from reconciler.providers.proxmox import ProxmoxProvider, RetryPolicy, connect
from tests.fakepve_fixtures import mutating_calls
from tests.guest_helpers import load_copy, marks, results, run

SPECS = Path(__file__).resolve().parents[2] / "specs"


class VirtualTime:
    """The provider's clock and sleep: sleeping advances the clock; hooks run at given sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []
        self.hooks: dict[int, Callable[[], None]] = {}

    def __call__(self) -> float:
        return self.now

    def at(self, n: int, hook: Callable[[], None]) -> None:
        self.hooks[n] = hook

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        hook = self.hooks.pop(len(self.sleeps), None)
        if hook is not None:
            hook()
        await anyio.lowlevel.checkpoint()


def make_provider(
    api: ProxmoxApi, time_: VirtualTime | None = None, **retry: Any
) -> ProxmoxProvider:
    time_ = time_ or VirtualTime()
    retry.setdefault("initial", 0.1)
    retry.setdefault("maximum", 1.0)
    return ProxmoxProvider(
        client=connect(api),
        platform="zpack",
        source=api.url,
        retry=RetryPolicy(**retry),
        sleep=time_.sleep,
        clock=time_,
    )


def fresh_plan_changes(graph: DesiredGraph, provider: ProxmoxProvider) -> list[str]:
    observed = anyio.run(lambda: observe_all([provider], graph.platform))
    return [c.address for c in make_plan(graph, observed).actions]


def assert_converged(graph: DesiredGraph, provider: ProxmoxProvider) -> None:
    assert fresh_plan_changes(graph, provider) == []
    found = marks(provider)
    wanted = {a for a, r in graph.resources.items() if r.kind is Kind.GUEST}
    assert set(found) == wanted
    assert all(len(v) == 1 for v in found.values()), found


def config(provider: ProxmoxProvider, vmid: int, node: str = "pve-runtime") -> dict[str, Any]:
    cfg: dict[str, Any] = provider.client.nodes(node).lxc(vmid).config.get()
    return cfg


def status(provider: ProxmoxProvider, vmid: int, node: str = "pve-runtime") -> str:
    return str(provider.client.nodes(node).lxc(vmid).status.current.get()["status"])


def drift(provider: ProxmoxProvider) -> None:
    """Out-of-band changes that need one update (1001), one start (1002) and one create (1100)."""
    node = provider.client.nodes("pve-runtime")
    node.lxc(1001).config.put(memory=1024)
    node.lxc(1002).status.stop.post()
    node.lxc(1100).status.stop.post()
    node.lxc(1100).delete(purge=1)


def assert_drift_corrected(provider: ProxmoxProvider) -> None:
    assert config(provider, 1001)["memory"] == 4096
    assert status(provider, 1002) == "running"
    assert status(provider, 1100) == "running"


def requests_to(pve: Any, method: str, suffix: str) -> list[bytes]:
    return [b for m, p, b in pve.requests if m == method and p.endswith(suffix)]


@pytest.fixture
def converged(graph: DesiredGraph, pve_api: ProxmoxApi, pve: Any) -> ProxmoxProvider:
    """The example platform converged on fakepve; requests and counters start from zero."""
    provider = make_provider(pve_api)
    assert run(graph, provider).ok
    provider.retries = provider.waits = 0
    pve.requests.clear()
    return provider


# --- 1. temporary faults are retried -----------------------------------------------------------

FILE_LOCK = "can't lock file '/run/lock/lxc/pve-config-{}.lock' - got timeout"
TEMPORARY_FAULTS = {
    "file-lock-on-update": (
        "PUT",
        "/nodes/{node}/lxc/{vmid}/config",
        500,
        FILE_LOCK.format(1001),
        2,
    ),
    "file-lock-on-start": (
        "POST",
        "/nodes/{node}/lxc/{vmid}/status/start",
        500,
        FILE_LOCK.format(1002),
        2,
    ),
    "inventory-503": ("GET", "/cluster/resources", 503, "Service Unavailable", 3),
    "inventory-502": ("GET", "/cluster/resources", 502, "Bad Gateway", 3),
    "create-503": ("POST", "/nodes/{node}/lxc", 503, "Service Unavailable", 3),
    "create-502": ("POST", "/nodes/{node}/lxc", 502, "Bad Gateway", 3),
    "no-worker-upid": (
        "POST",
        "/nodes/{node}/lxc",
        500,
        "got no worker upid - start worker failed",
        2,
    ),
    "config-read-595": ("GET", "/nodes/{node}/lxc/{vmid}/config", 595, "No route to host", 3),
}


@pytest.mark.parametrize("fault", TEMPORARY_FAULTS.values(), ids=TEMPORARY_FAULTS.keys())
def test_temporary_faults_are_retried_and_counted(
    fault: tuple[str, str, int, str, int],
    graph: DesiredGraph,
    converged: ProxmoxProvider,
    pve: Any,
) -> None:
    method, path, code, message, times = fault
    drift(converged)
    pve.fail(method, path, status=code, message=message, times=times)
    conv = run(graph, converged)
    assert conv.ok, [(r.change.address, r.error) for r in results(conv).values()]
    assert len(conv.rounds) == 1
    assert (method, path) not in pve.failures  # every injected failure was met
    assert converged.retries == times
    assert_drift_corrected(converged)
    assert_converged(graph, converged)


def test_html_502_from_a_proxy_is_retried(
    graph: DesiredGraph, converged: ProxmoxProvider, pve: Any
) -> None:
    drift(converged)
    pve.fail("POST", "/nodes/{node}/lxc", status=502, message="Bad Gateway", html=True, times=2)
    assert run(graph, converged).ok
    assert converged.retries == 2
    assert_drift_corrected(converged)


def test_lost_quorum_is_retried_until_it_returns(
    graph: DesiredGraph, pve_api: ProxmoxApi, converged: ProxmoxProvider, pve: Any
) -> None:
    time_ = VirtualTime()
    provider = make_provider(pve_api, time_)
    drift(provider)
    pve.lose_quorum()
    time_.at(3, pve.regain_quorum)
    conv = run(graph, provider)
    assert pve.quorate
    assert conv.ok, [(r.change.address, r.error) for r in results(conv).values()]
    assert provider.retries >= 3
    assert_drift_corrected(provider)
    assert_converged(graph, provider)


def test_quorum_that_never_returns_fails_the_writes_and_a_later_run_finishes(
    graph: DesiredGraph, converged: ProxmoxProvider, pve: Any
) -> None:
    drift(converged)
    pve.requests.clear()
    pve.lose_quorum()
    conv = run(graph, converged)
    assert not conv.ok
    by = results(conv)
    assert {a for a, r in by.items() if r.outcome is Outcome.FAILED} == {
        "guest/mc-survival",
        "guest/mc-creative",
        "guest/dev-alice",
    }
    assert all("no quorum" in r.error for r in by.values())
    attempts = RetryPolicy().attempts
    assert len(requests_to(pve, "PUT", "/lxc/1001/config")) == attempts
    pve.regain_quorum()
    assert run(graph, converged).ok
    assert_drift_corrected(converged)


# --- 2. config locks are waited out -----------------------------------------------------------


def test_a_backup_lock_on_a_drifted_guest_is_waited_out(
    graph: DesiredGraph, pve_api: ProxmoxApi, converged: ProxmoxProvider, pve: Any
) -> None:
    time_ = VirtualTime()
    provider = make_provider(pve_api, time_)
    provider.client.nodes("pve-runtime").lxc(1001).config.put(memory=1024)
    pve.ct(1001).lock = "backup"
    time_.at(4, lambda: pve.unlock(1001))
    conv = run(graph, provider)
    assert conv.ok, [(r.change.address, r.error) for r in results(conv).values()]
    assert len(conv.rounds) == 1  # waited, not failed and re-planned
    assert results(conv)["guest/mc-survival"].outcome is Outcome.DONE
    assert provider.waits >= 4
    cfg = config(provider, 1001)
    assert cfg["memory"] == 4096 and "lock" not in cfg
    assert_converged(graph, provider)


def test_a_lock_taken_after_the_plan_is_waited_out(
    graph: DesiredGraph, pve_api: ProxmoxApi, converged: ProxmoxProvider, pve: Any
) -> None:
    """The plan saw no lock; a backup starts before the update and ends while we wait."""
    time_ = VirtualTime()
    provider = make_provider(pve_api, time_)
    provider.client.nodes("pve-runtime").lxc(1001).config.put(memory=1024)

    def backup_starts(_plan: Any) -> bool:
        pve.ct(1001).lock = "backup"
        time_.at(len(time_.sleeps) + 2, lambda: pve.unlock(1001))
        return True

    conv = run(graph, provider, approve=backup_starts)
    assert len(conv.rounds) == 1 and conv.ok
    assert config(provider, 1001)["memory"] == 4096


def test_a_lock_that_never_clears_fails_that_guest_only(
    graph: DesiredGraph, pve_api: ProxmoxApi, converged: ProxmoxProvider, pve: Any
) -> None:
    provider = make_provider(pve_api, lock_timeout=60.0, lock_poll=5.0)
    node = provider.client.nodes("pve-runtime")
    node.lxc(1001).config.put(memory=1024)
    node.lxc(1003).config.put(memory=1024)
    pve.ct(1001).lock = "backup"
    pve.requests.clear()
    conv = run(graph, provider)
    by = results(conv)
    assert by["guest/mc-survival"].outcome is Outcome.FAILED
    assert "locked (backup)" in by["guest/mc-survival"].error
    assert by["guest/mc-skyblock"].outcome is Outcome.DONE
    assert config(provider, 1003)["memory"] == 8192
    assert config(provider, 1001)["memory"] == 1024  # never written while locked
    assert requests_to(pve, "PUT", "/lxc/1001/config") == []


def test_a_clone_still_running_after_the_wait_stops_the_guests_plan(
    graph: DesiredGraph, pve_api: ProxmoxApi, converged: ProxmoxProvider, pve: Any
) -> None:
    """A VM being cloned has a temporary config (in PVE: no name, no description): taken for a
    foreign guest it would be cloned again. Past the lock wait, nothing is planned for the
    guests, and the plan says which guest is still being cloned."""
    provider = make_provider(pve_api, lock_timeout=60.0, lock_poll=5.0)
    provider.client.nodes("pve-runtime").qemu.post(vmid=1090, name="being-cloned")
    pve.vm(1090).lock = "clone"
    pve.requests.clear()
    with pytest.raises(TemporaryError, match=r"guest 1090 on pve-runtime is still being cloned"):
        anyio.run(lambda: observe_all([provider], "zpack"))
    with pytest.raises(TemporaryError):
        run(graph, provider)
    assert mutating_calls(pve) == []
    pve.unlock(1090)  # the clone ended: planned again
    assert anyio.run(lambda: observe_all([provider], "zpack")).resources


def test_a_start_task_that_meets_a_lock_is_started_again(
    graph: DesiredGraph, converged: ProxmoxProvider, pve: Any
) -> None:
    converged.client.nodes("pve-runtime").lxc(1002).status.stop.post()
    pve.fail("POST", "/nodes/{node}/lxc/{vmid}/status/start", error="locked", times=2)
    conv = run(graph, converged)
    assert conv.ok, [(r.change.address, r.error) for r in results(conv).values()]
    assert status(converged, 1002) == "running"
    assert len(requests_to(pve, "POST", "/lxc/1002/status/start")) == 3


# --- 3. slow tasks ---------------------------------------------------------------------------


def _slow_create(pve: Any, provider: ProxmoxProvider) -> None:
    node = provider.client.nodes("pve-runtime")
    node.lxc(1100).status.stop.post()
    node.lxc(1100).delete(purge=1)
    pve.time_scale = 0.01
    pve.ct_secs["create"] = 30  # 0.3 s


def test_a_slow_create_is_polled_until_done(
    graph: DesiredGraph, pve_api: ProxmoxApi, converged: ProxmoxProvider, pve: Any
) -> None:
    _slow_create(pve, converged)
    provider = ProxmoxProvider(
        client=connect(pve_api),
        platform="zpack",
        retry=RetryPolicy(task_poll=0.02, task_poll_max=0.05),
    )
    started = time.monotonic()
    conv = run(graph, provider)
    assert conv.ok
    assert time.monotonic() - started >= 0.25
    polls = [p for m, p, _ in pve.requests if m == "GET" and ":vzcreate:1100:" in p]
    assert len(polls) >= 3
    assert status(provider, 1100) == "running"


def test_a_task_past_its_timeout_fails_that_guest_only(
    graph: DesiredGraph, pve_api: ProxmoxApi, converged: ProxmoxProvider, pve: Any
) -> None:
    converged.client.nodes("pve-runtime").lxc(1001).config.put(memory=1024)
    _slow_create(pve, converged)
    provider = ProxmoxProvider(
        client=connect(pve_api),
        platform="zpack",
        retry=RetryPolicy(task_timeout=0.08, task_poll=0.02, task_poll_max=0.02, lock_poll=0.02),
    )
    conv = run(graph, provider)
    by = results(conv)
    assert by["guest/dev-alice"].outcome is Outcome.FAILED
    assert "still running after" in by["guest/dev-alice"].error
    assert by["guest/mc-survival"].outcome is Outcome.DONE
    # The create goes on in Proxmox; the next run waits for it instead of doubling it.
    pve.ct_secs["create"] = 0
    assert run(graph, provider).ok
    assert_converged(graph, provider)


# --- 4. a permanent error stops one guest and its dependents ------------------------------------


def test_a_permanent_error_stops_only_its_guest_and_dependents(
    tmp_path: Path, pve_api: ProxmoxApi, pve: Any
) -> None:
    # A template that is not in storage: the create task fails. (A missing storage, or a
    # template the plan can see is missing, is a plan error now: planning.placement. This
    # provider lists no templates, so only the create finds out.)
    graph = load_copy(
        tmp_path,
        {
            "control.yaml": (
                "disk: {size: 64G}",
                f"disk: {{size: 64G}}\n    template: {_DB_TEMPLATE}",
            )
        },
    )
    provider = make_provider(pve_api)
    conv = run(graph, provider)
    assert not conv.ok
    by = results(conv)
    assert by["guest/zpack-db"].outcome is Outcome.FAILED
    assert f"volume '{_DB_TEMPLATE}' does not exist" in by["guest/zpack-db"].error
    dependents = {"guest/zpack-api", "guest/zpack-portal", "guest/zpack-backup"}
    assert {a for a, r in by.items() if r.outcome is Outcome.SKIPPED} == dependents
    assert {a for a, r in by.items() if r.outcome is Outcome.DONE} == set(by) - dependents - {
        "guest/zpack-db"
    }
    assert provider.retries == 0  # nothing to retry in a permanent error
    creates = requests_to(pve, "POST", "/nodes/pve-core/lxc")
    assert sum(1 for b in creates if b"vmid=103&" in b or b.endswith(b"vmid=103")) == 1
    guests = provider.client.cluster.resources.get(type="vm")
    existing = {int(i["vmid"]) for i in guests if not i.get("template")}  # the VM template aside
    assert existing.isdisjoint({101, 102, 103, 107})
    assert len(existing) == len(by) - 4

    name = _DB_TEMPLATE.split("/", 1)[1]
    local = provider.client.nodes("pve-core").storage("local")
    local("download-url").post(
        url=f"http://example.invalid/{name}", content="vztmpl", filename=name
    )
    assert run(graph, provider).ok
    assert_converged(graph, provider)


_DB_TEMPLATE = "local:vztmpl/zpack-db-custom_1.0_amd64.tar.zst"


# --- 5. a failed task is its action's error, with the log's last lines ----------------------------

FAILED_TASKS = {
    "start": ("/nodes/{node}/lxc/{vmid}/status/start", "failed_open_writing", "guest/mc-creative"),
    "create": ("/nodes/{node}/lxc", "no_lock_found_trying_remove", "guest/dev-alice"),
}


@pytest.mark.parametrize("case", FAILED_TASKS.values(), ids=FAILED_TASKS.keys())
def test_a_failed_task_is_reported_with_its_log(
    case: tuple[str, str, str], graph: DesiredGraph, converged: ProxmoxProvider, pve: Any
) -> None:
    path, error, address = case
    node = converged.client.nodes("pve-runtime")
    node.lxc(1002).status.stop.post()
    node.lxc(1100).status.stop.post()
    node.lxc(1100).delete(purge=1)
    pve.fail("POST", path, error=error)
    conv = run(graph, converged)
    by = results(conv)
    failed = by[address]
    assert failed.outcome is Outcome.FAILED
    tasks = [t for t in pve.tasks.values() if t.get("exitstatus") not in (None, "OK")]
    assert len(tasks) == 1  # started once: a task error is not retried
    exit_status = tasks[0]["exitstatus"]
    assert exit_status in failed.error
    assert f"TASK ERROR: {exit_status}" in failed.error  # the log's last line
    assert failed.log and failed.log[-1] == f"TASK ERROR: {exit_status}"
    others = {a for a, r in by.items() if a != address}
    assert all(by[a].outcome is Outcome.DONE for a in others)
    pve.failures.clear()
    assert run(graph, converged).ok
    assert_converged(graph, converged)


def test_mutating_calls_helper_sees_every_write(
    graph: DesiredGraph, converged: ProxmoxProvider, pve: Any
) -> None:
    """The request log is what the other tests count on: a converged platform writes nothing."""
    assert run(graph, converged).rounds[0].plan.has_changes is False
    assert mutating_calls(pve) == []
    drift(converged)
    pve.requests.clear()
    assert run(graph, converged).ok
    assert len(mutating_calls(pve)) == 3
