"""Sharing a Proxmox cluster: other writers and interrupted runs, and the destructive actions.

Foreign guests are never touched; a config changed between observe and apply is re-observed,
never overwritten; two runs racing for vmids end with every guest exactly once; a run cancelled
midway (even with creates still running in Proxmox) is finished by the next one; deletes and
replaces happen only to what we own, stop first, and only when allowed.

Assertions read Proxmox's state or fakepve's request log (`pve.requests`: method, path without
the query string, body).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import anyio
import pytest

from reconciler.applying.converging import Convergence, converge
from reconciler.applying.executor import Outcome, Result, execute
from reconciler.model.plans import Action, Plan
from reconciler.model.resources import DesiredGraph, Kind
from reconciler.model.spec import ProxmoxApi
from reconciler.providers.proxmox import ProxmoxProvider, RetryPolicy, connect, create_params
from tests.fakepve_fixtures import mutating_calls, no_sleep
from tests.guest_helpers import load_copy, marks, plan_now, results, run

SPECS = Path(__file__).resolve().parents[2] / "specs"


def make_provider(api: ProxmoxApi, *, real_sleep: bool = False) -> ProxmoxProvider:
    return ProxmoxProvider(
        client=connect(api),
        platform="zpack",
        source=api.url,
        retry=RetryPolicy(initial=0.0, maximum=0.0, lock_poll=0.02, task_poll=0.02),
        sleep=anyio.sleep if real_sleep else no_sleep,
    )


def guests_of(graph: DesiredGraph) -> set[str]:
    return {a for a, r in graph.resources.items() if r.kind is Kind.GUEST}


def assert_every_guest_once(graph: DesiredGraph, provider: ProxmoxProvider) -> dict[str, int]:
    vmids = [int(i["vmid"]) for i in provider.client.cluster.resources.get(type="vm")]
    assert len(vmids) == len(set(vmids))
    found = marks(provider)
    assert set(found) == guests_of(graph), "orphans or missing guests"
    assert all(len(v) == 1 for v in found.values()), found
    return {a: v[0] for a, v in found.items()}


def assert_converged(graph: DesiredGraph, provider: ProxmoxProvider, pve: Any) -> None:
    assert_every_guest_once(graph, provider)
    assert not plan_now(graph, provider).has_changes
    pve.requests.clear()
    again = run(graph, provider)
    assert again.ok and not again.rounds[0].plan.has_changes
    assert mutating_calls(pve) == []


def touching(pve: Any, vmid: int) -> list[tuple[str, str]]:
    """Requests other than reads whose path names this vmid."""
    return [(m, p) for m, p, _ in pve.requests if m != "GET" and re.search(rf"/{vmid}(/|$)", p)]


@pytest.fixture
def converged(graph: DesiredGraph, pve_api: ProxmoxApi, pve: Any) -> ProxmoxProvider:
    provider = make_provider(pve_api)
    assert run(graph, provider).ok
    pve.requests.clear()
    return provider


# --- 6. foreign guests -------------------------------------------------------------------------

FOREIGN = {
    1050: {"tags": "other"},
    1051: {"tags": "reconciler", "description": "copied by hand"},  # our tag, no mark
    1052: {"tags": "reconciler", "description": "reconciler:v1 platform=other address=guest/x"},
}


def test_foreign_guests_in_our_range_are_never_touched(
    graph: DesiredGraph, pve_api: ProxmoxApi, pve: Any
) -> None:
    for vmid, cfg in FOREIGN.items():
        pve.add_ct(vmid, f"squatter-{vmid}", node="pve-runtime", status="running", config=cfg)
    before = {v: dict(pve.ct(v).config) for v in FOREIGN}
    provider = make_provider(pve_api)
    conv = run(graph, provider, allow_destroy=True)
    assert conv.ok
    plan = conv.rounds[0].plan
    # The squatters, and the example's cloud-init template (in its template range).
    assert {f["vmid"]: f["in_range"] for f in plan.foreign} == {
        **dict.fromkeys(FOREIGN, "game"),
        200: "template",
    }
    assert all(c.id.get("vmid") not in FOREIGN for c in plan.actions)
    assert run(graph, provider, allow_destroy=True).ok
    for vmid in FOREIGN:
        assert touching(pve, vmid) == []
        assert pve.ct(vmid).config == before[vmid]
        assert pve.ct(vmid).status == "running"
    assert_every_guest_once(graph, provider)


@pytest.mark.parametrize("cfg", [{}, {"tags": "reconciler"}], ids=["untagged", "tag-without-mark"])
def test_a_foreign_guest_on_a_desired_vmid_errors_the_plan(
    cfg: dict[str, str], graph: DesiredGraph, pve_api: ProxmoxApi, pve: Any
) -> None:
    pve.add_ct(1001, "squatter", node="pve-runtime", status="running", config=cfg)
    before = dict(pve.ct(1001).config)
    conv = run(graph, make_provider(pve_api))
    plan = conv.rounds[0].plan
    assert plan.errored and conv.rounds[0].report is None
    assert [(d.code, d.address) for d in plan.diagnostics if d.severity.value == "error"] == [
        ("vmid-held-by-foreign", "guest/mc-survival")
    ]
    assert mutating_calls(pve) == []
    assert pve.ct(1001).config == before


# --- 7. a config changed between observe and apply ------------------------------------------------


def test_a_config_changed_after_the_plan_is_re_observed_not_overwritten(
    graph: DesiredGraph, converged: ProxmoxProvider, pve: Any
) -> None:
    node = converged.client.nodes("pve-runtime")
    node.lxc(1001).config.put(memory=1024)
    seen: list[Plan] = []

    def someone_else_edits(plan: Plan) -> bool:
        if not seen:
            node.lxc(1001).config.put(cores=3)
            pve.requests.clear()
        seen.append(plan)
        return True

    conv = run(graph, converged, approve=someone_else_edits)
    assert conv.ok and len(conv.rounds) == 2
    first = results(conv, 0)["guest/mc-survival"]
    assert first.outcome is Outcome.FAILED and first.conflict
    fields = {c.address: {f.path for f in c.fields} for c in conv.rounds[1].plan.actions}
    assert fields == {"guest/mc-survival": {"cores", "memory"}}
    # One write, made after re-observing: the first round sent nothing against a stale config.
    assert [p for m, p in mutating_calls(pve)] == ["/api2/json/nodes/pve-runtime/lxc/1001/config"]
    cfg = node.lxc(1001).config.get()
    assert (cfg["memory"], cfg["cores"]) == (4096, 2)


def test_a_stale_digest_refused_by_proxmox_is_re_planned(
    graph: DesiredGraph, converged: ProxmoxProvider, pve: Any
) -> None:
    """The race inside the window between our digest check and the PUT: Proxmox refuses it."""
    node = converged.client.nodes("pve-runtime")
    node.lxc(1001).config.put(memory=1024)
    pve.fail(
        "PUT",
        "/nodes/pve-runtime/lxc/1001/config",
        status=500,
        message="detected modified configuration - file changed by other user? Try again.",
        times=1,
    )
    conv = run(graph, converged)
    assert conv.ok and len(conv.rounds) == 2
    assert results(conv, 0)["guest/mc-survival"].conflict
    assert converged.retries == 0  # a conflict is re-planned, never retried blindly
    assert node.lxc(1001).config.get()["memory"] == 4096


# --- 8. vmid races ----------------------------------------------------------------------------


def test_two_runs_racing_create_every_guest_once(
    graph: DesiredGraph, pve_api: ProxmoxApi, pve: Any
) -> None:
    runs: list[Convergence] = []

    async def both() -> None:
        async def one(provider: ProxmoxProvider) -> None:
            runs.append(await converge(graph, [provider]))

        async with anyio.create_task_group() as tg:
            for _ in range(2):
                tg.start_soon(one, make_provider(pve_api))

    anyio.run(both)
    assert all(r.ok for r in runs), [
        (x.change.address, x.error) for r in runs for x in results(r).values() if x.error
    ]
    creates = [b for m, p, b in pve.requests if m == "POST" and p.endswith("/lxc")]
    assert len(creates) > len(guests_of(graph))  # they did race
    assert_converged(graph, make_provider(pve_api), pve)


def test_a_vmid_taken_between_plan_and_apply_is_re_planned(
    graph: DesiredGraph, pve_api: ProxmoxApi, pve: Any
) -> None:
    taken: dict[int, str] = {}

    def squat(plan: Plan) -> bool:
        if not taken:
            for c in plan.actions:
                if c.address in ("guest/mc-rlcraft", "guest/dev-bob"):
                    vmid = c.id["vmid"]
                    pve.add_ct(vmid, f"squatter-{vmid}", node="pve-runtime", status="running")
                    taken[vmid] = c.address
        return True

    provider = make_provider(pve_api)
    conv = run(graph, provider, approve=squat)
    assert sorted(taken) == [1004, 1101]
    assert conv.ok and len(conv.rounds) == 2
    first = results(conv, 0)
    assert {a for a, r in first.items() if r.conflict} == set(taken.values())
    where = assert_every_guest_once(graph, provider)
    assert (where["guest/mc-rlcraft"], where["guest/dev-bob"]) == (1005, 1102)
    for vmid in taken:
        assert touching(pve, vmid) == []
        assert pve.ct(vmid).config["hostname"] == f"squatter-{vmid}"
    assert_converged(graph, provider, pve)


# --- 9. a run cancelled midway --------------------------------------------------------------------


def _cancel_after(graph: DesiredGraph, provider: ProxmoxProvider, k: int) -> list[Result]:
    done: list[Result] = []

    async def main() -> None:
        with anyio.CancelScope() as scope:

            def progress(result: Result, _n: int, _total: int) -> None:
                done.append(result)
                if len(done) >= k:
                    scope.cancel()

            await converge(graph, [provider], progress=progress)

    anyio.run(main)
    return done


def test_a_cancelled_run_is_finished_by_the_next(
    graph: DesiredGraph, pve_api: ProxmoxApi, pve: Any
) -> None:
    provider = make_provider(pve_api)
    done = _cancel_after(graph, provider, 5)
    existing = provider.client.cluster.resources.get(type="vm")
    assert 5 <= len(done) <= len(existing) < len(guests_of(graph))
    assert run(graph, make_provider(pve_api)).ok
    assert_converged(graph, make_provider(pve_api), pve)


def test_creates_still_running_when_a_run_is_cancelled_are_not_doubled(
    graph: DesiredGraph, pve_api: ProxmoxApi, pve: Any
) -> None:
    pve.time_scale = 0.01
    pve.ct_secs["create"] = 10  # 0.1 s each
    done = _cancel_after(graph, make_provider(pve_api, real_sleep=True), 3)
    assert 3 <= len(done) < len(guests_of(graph))
    in_flight = [ct.vmid for ct in pve.cts if ct.lock == "create"]
    assert in_flight, "the cancel left no create running; the test proves nothing"
    provider = make_provider(pve_api, real_sleep=True)
    conv = run(graph, provider)
    assert conv.ok, [(a, r.error) for a, r in results(conv).items() if r.error]
    pve.ct_secs["create"] = 0
    assert_converged(graph, provider, pve)


@pytest.mark.parametrize("finished", [True, False], ids=["task-finished", "task-running"])
def test_a_create_whose_reply_was_lost_is_done_not_doubled(
    finished: bool, graph: DesiredGraph, pve_api: ProxmoxApi, pve: Any
) -> None:
    """The POST reached Proxmox, but the run that sent it never saw the answer: the next attempt
    meets "already exists" on a guest carrying our mark (still locked by its create task, or
    done), and counts it as done."""
    provider = make_provider(pve_api, real_sleep=True)
    plan = plan_now(graph, provider, targets=["guest/mc-rlcraft"])
    [change] = plan.actions
    if not finished:
        pve.time_scale = 0.01
        pve.ct_secs["create"] = 10
    params = create_params("zpack", change.address, change.after or {})
    provider.client.nodes("pve-runtime").lxc.post(**params)
    report = anyio.run(lambda: execute(plan, [provider]))
    by = {r.change.address: r for r in report.results}
    assert report.ok, [(a, r.error) for a, r in by.items() if r.error]
    assert by["guest/mc-rlcraft"].outcome is Outcome.DONE
    posts = [b for m, p, b in pve.requests if m == "POST" and p.endswith("/pve-runtime/lxc")]
    assert len(posts) == 2 and all(b"vmid=1004" in b for b in posts)
    assert pve.ct(1004).lock is None
    pve.ct_secs["create"] = 0
    assert run(graph, provider).ok
    assert_converged(graph, provider, pve)


# --- 10. deletes -----------------------------------------------------------------------------

WITHOUT_BACKUP_STORE = {
    "control.yaml": (
        """  backup-store:
    role: monitoring
    vmid: 2001
    host: pve-core
    profile: control
    disk: {size: 256G}
    network:
      - {name: eth0, bridge: vmbr0, ip: 10.10.0.41/24, gw: 10.10.0.1, tag: 10}
""",
        "",
    )
}


@pytest.mark.parametrize("running", [True, False], ids=["running", "stopped"])
def test_a_guest_removed_from_the_spec_is_deleted_only_when_allowed(
    running: bool, tmp_path: Path, converged: ProxmoxProvider, pve: Any
) -> None:
    smaller = load_copy(tmp_path, WITHOUT_BACKUP_STORE)
    guest = converged.client.nodes("pve-core").lxc(2001)
    if not running:
        guest.status.stop.post()
    pve.ct(2001).ha_state = "started"  # PVE refuses to destroy an HA resource without purge
    pve.requests.clear()

    kept = run(smaller, converged)
    assert kept.ok and not kept.rounds[0].plan.has_changes
    assert [d.code for d in kept.rounds[0].plan.diagnostics] == ["orphan"]
    assert mutating_calls(pve) == []
    assert pve.ct(2001) is not None

    gone = run(smaller, converged, allow_destroy=True)
    assert gone.ok
    assert [(c.address, c.action) for c in gone.rounds[0].plan.actions] == [
        ("guest/backup-store", Action.DELETE)
    ]
    expected = [("DELETE", "/api2/json/nodes/pve-core/lxc/2001")]
    if running:
        expected.insert(0, ("POST", "/api2/json/nodes/pve-core/lxc/2001/status/stop"))
    assert mutating_calls(pve) == expected
    assert pve.ct(2001) is None
    assert_converged(smaller, converged, pve)


# --- 11. replace -------------------------------------------------------------------------------

NEW_TEMPLATE = "debian-13-standard_13.1-1_amd64.tar.zst"


def test_a_new_template_leaves_an_existing_guest_alone(
    tmp_path: Path, converged: ProxmoxProvider, pve: Any
) -> None:
    # Proxmox keeps no record of the template a container was made from: a newer image in the
    # spec is for new guests, and never a reason to destroy a world.
    retemplated = load_copy(
        tmp_path,
        {
            "game.yaml": (
                "    vmid: 1001\n",
                f"    vmid: 1001\n    template: local:vztmpl/{NEW_TEMPLATE}\n",
            )
        },
    )
    pve.requests.clear()
    conv = run(retemplated, converged)
    assert conv.ok and not conv.rounds[0].plan.has_changes and not conv.rounds[0].plan.blocked
    assert mutating_calls(pve) == []


def test_an_allowed_replace_recreates_the_guest_under_the_same_vmid(
    tmp_path: Path, converged: ProxmoxProvider, pve: Any
) -> None:
    client = converged.client
    privileged = load_copy(
        tmp_path, {"game.yaml": ("    vmid: 1001\n", "    vmid: 1001\n    unprivileged: false\n")}
    )
    old_mac = client.nodes("pve-runtime").lxc(1001).config.get()["net0"]
    pve.requests.clear()
    held = run(privileged, converged)
    assert [c.address for c in held.rounds[0].plan.blocked] == ["guest/mc-survival"]
    assert mutating_calls(pve) == []
    conv = run(privileged, converged, allow_destroy=True)
    assert conv.ok
    actions = [(c.address, c.action) for c in conv.rounds[0].plan.actions]
    assert actions == [("guest/mc-survival", Action.REPLACE)]
    calls = mutating_calls(pve)
    assert calls == [
        # The game-worlds job backs it up: a last backup, waited for, before the destroy.
        ("POST", "/api2/json/nodes/pve-runtime/vzdump"),
        ("POST", "/api2/json/nodes/pve-runtime/lxc/1001/status/stop"),
        ("DELETE", "/api2/json/nodes/pve-runtime/lxc/1001"),
        ("POST", "/api2/json/nodes/pve-runtime/lxc"),
    ]
    create_body = next(b for m, p, b in pve.requests if m == "POST" and p.endswith("/lxc"))
    assert b"vmid=1001" in create_body and b"unprivileged=0" in create_body
    cfg = client.nodes("pve-runtime").lxc(1001).config.get()
    assert cfg["net0"] != old_mac  # a new container, not the old one edited
    assert_converged(privileged, converged, pve)


def test_an_allowed_replace_whose_template_is_missing_destroys_nothing(
    tmp_path: Path, converged: ProxmoxProvider, pve: Any
) -> None:
    # The create after the destroy would fail ("template not found"): the guest would be gone
    # and not made again. The replace checks the template first.
    missing = "local:vztmpl/debian-99-nowhere.tar.zst"
    privileged = load_copy(
        tmp_path,
        {
            "game.yaml": (
                "    vmid: 1001\n",
                f"    vmid: 1001\n    unprivileged: false\n    template: {missing}\n",
            )
        },
    )
    before = converged.client.nodes("pve-runtime").lxc(1001).config.get()
    pve.requests.clear()
    conv = run(privileged, converged, allow_destroy=True)
    failed = results(conv)["guest/mc-survival"]
    assert failed.outcome.value == "failed"
    assert "is not on node pve-runtime; nothing was destroyed" in failed.error
    assert mutating_calls(pve) == []
    assert converged.client.nodes("pve-runtime").lxc(1001).config.get() == before
