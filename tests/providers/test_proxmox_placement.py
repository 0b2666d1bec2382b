"""The plan checks the spec against the live cluster (fakepve, the real client): a node name
typo, a storage or template the node does not have, an offline node are plan errors, and apply
makes no call; a hand-made template inside a vmid range takes its id and is never touched."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import pytest

from reconciler.applying.connecting import wanted_templates
from reconciler.applying.converging import converge
from reconciler.applying.observing import observe_all
from reconciler.cli.main import main
from reconciler.importing.adopting import adopt
from reconciler.loading.loader import load_directory
from reconciler.model.errors import TemporaryError
from reconciler.model.observed import ObservedState
from reconciler.model.plans import Action, Plan
from reconciler.model.resources import DesiredGraph, Kind
from reconciler.model.spec import ProxmoxApi
from reconciler.providers.proxmox import ProxmoxProvider, connect, with_mark
from reconciler.providers.proxmox_inventory import inventory_drift
from tests.cli.test_live import flags
from tests.conftest import SPECS
from tests.fakepve_fixtures import TEMPLATE, mutating_calls
from tests.guest_helpers import load_copy, plan_now

TYPO = {"platform.yaml": ("  pve-runtime:\n", "  pve-runtime:\n    node: pve-2\n")}


def with_spec(
    provider: ProxmoxProvider, tmp_path: Path, edits: dict[str, tuple[str, str]]
) -> DesiredGraph:
    """The example specs copied to tmp_path (edited), and the provider told which templates
    they create from, as `applying.connecting.proxmox_provider` does for a spec."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    graph = load_copy(tmp_path, edits)
    loaded = load_directory(tmp_path / "specs")
    assert loaded.spec is not None
    provider.wanted_templates = wanted_templates(loaded.spec)
    return graph


def runtime_guests(graph: DesiredGraph) -> set[str]:
    return {
        a
        for a, r in graph.resources.items()
        if r.kind is Kind.GUEST and r.attributes["node"] == "pve-runtime"
    }


def converge_guests(graph: DesiredGraph, provider: ProxmoxProvider) -> Any:
    return anyio.run(lambda: converge(graph, [provider]))


def requests_ending(pve: Any, suffix: str) -> list[str]:
    return [p for _, p, _ in pve.requests if p.endswith(suffix)]


def template_listings(pve: Any) -> list[str]:
    return [p for m, p, _ in pve.requests if m == "GET" and p.endswith("/content")]


def errors_by_address(plan: Plan) -> dict[str, str]:
    return {d.address: d.code for d in plan.diagnostics if d.severity.value == "error"}


def download(provider: ProxmoxProvider, node: str, name: str) -> None:
    local = provider.client.nodes(node).storage("local")
    upid = local("download-url").post(
        url=f"http://example.invalid/{name}", content="vztmpl", filename=name
    )
    assert provider.client.nodes(node).tasks(upid).status.get()["exitstatus"] == "OK"


# --- a node name typo ----------------------------------------------------------------------------


def test_a_node_name_typo_is_stopped_in_the_plan_and_apply_makes_no_call(
    graph: DesiredGraph,
    pve_api: ProxmoxApi,
    pve: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["apply", str(SPECS), "--auto-approve", "--color", "never", *flags(pve_api)]) == 0
    client = connect(pve_api)
    client.nodes("pve-core").lxc(103).config.put(memory=1024)  # drift on the right host
    load_copy(tmp_path, TYPO)
    specs = str(tmp_path / "specs")
    capsys.readouterr()
    pve.requests.clear()

    assert main(["plan", specs, "--color", "never", *flags(pve_api)]) == 1
    text = capsys.readouterr().out
    line = next(x for x in text.splitlines() if "error: guest/mc-survival:" in x)
    assert line.startswith(f"{specs}/game.yaml:")
    assert "hosts.pve-runtime.node is 'pve-2'; the cluster has pve-core, pve-runtime" in line

    assert main(["plan", specs, "--format", "json", *flags(pve_api)]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["errored"] is True and doc["applyable"] is False
    typo = {d["address"]: d for d in doc["diagnostics"] if d["code"] == "unknown-node"}
    runtime = runtime_guests(graph)
    assert set(typo) == runtime and len(runtime) == 9
    assert all(d["file"].startswith(specs) and d["line"] > 0 for d in typo.values())
    changed = {c["address"]: c["action"] for c in doc["changes"] if c["action"] != "no-op"}
    assert changed == {"guest/zpack-db": "update"}  # the right host's guests: as ever
    firewalls = {"firewall/guest/" + a.split("/")[1] for a in runtime}
    assert {c["address"] for c in doc["changes"]}.isdisjoint(runtime | firewalls)

    assert main(["apply", specs, "--auto-approve", "--color", "never", *flags(pve_api)]) == 1
    assert mutating_calls(pve) == []
    where = {i["name"]: i["node"] for i in client.cluster.resources.get(type="vm")}
    names = {str(graph.resources[a].attributes["name"]) for a in runtime}
    assert {where.get(n) for n in names} == {"pve-runtime"}


# --- storages and templates ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("storage", "why"),
    [
        ("local-zfs", "node pve-runtime has no such storage (it has backup, local, local-lvm)"),
        ("local", "does not take rootdir on node pve-runtime"),
    ],
)
def test_a_storage_the_node_does_not_have_stops_that_guest_only(
    provider: ProxmoxProvider, pve: Any, tmp_path: Path, storage: str, why: str
) -> None:
    edit = (
        "    profile: game-heavy\n",
        f"    profile: game-heavy\n    disk: {{storage: {storage}}}\n",
    )
    graph = with_spec(provider, tmp_path, {"game.yaml": edit})
    conv = converge_guests(graph, provider)
    plan = conv.rounds[0].plan
    assert plan.errored and conv.rounds[0].report is None
    (found,) = [d for d in plan.diagnostics if d.severity.value == "error"]
    assert found.code == "storage-unusable" and found.address == "guest/mc-rlcraft"
    assert f"guest/mc-rlcraft: rootfs.storage '{storage}': {why}" in found.message
    assert found.position is not None and found.position.file.endswith("game.yaml")
    planned = {c.address for c in plan.changes}
    assert planned.isdisjoint({"guest/mc-rlcraft", "firewall/guest/mc-rlcraft"})
    assert {c.action for c in plan.changes} == {Action.CREATE}
    assert mutating_calls(pve) == []


def test_a_missing_template_stops_a_guest_to_create_but_not_one_that_exists(
    provider: ProxmoxProvider, pve: Any, tmp_path: Path
) -> None:
    graph = with_spec(provider, tmp_path / "example", {})
    assert converge_guests(graph, provider).ok
    # Converged: nothing to create, so no template listing at all.
    pve.requests.clear()
    assert not plan_now(graph, provider).has_changes
    assert template_listings(pve) == []
    assert requests_ending(pve, "/cluster/resources") == ["/api2/json/cluster/resources"]

    newer = "debian-13-standard_13.1-1_amd64.tar.zst"
    edit = {"profiles.yaml": (f"local:vztmpl/{TEMPLATE}", f"local:vztmpl/{newer}")}
    graph = with_spec(provider, tmp_path / "newer", edit)
    node = provider.client.nodes("pve-runtime").lxc(1002)
    node.status.stop.post()
    node.delete(purge=1)  # mc-creative is gone: it would be created, from the new template
    pve.requests.clear()
    plan = plan_now(graph, provider)
    assert errors_by_address(plan) == {"guest/mc-creative": "template-missing"}
    message = next(d.message for d in plan.diagnostics if d.address == "guest/mc-creative")
    assert f"template 'local:vztmpl/{newer}' is not on node pve-runtime" in message
    assert {c.address for c in plan.actions} == set()  # the others keep what they run
    assert template_listings(pve) == ["/api2/json/nodes/pve-runtime/storage/local/content"]
    assert mutating_calls(pve) == []

    download(provider, "pve-runtime", newer)
    conv = converge_guests(graph, provider)
    assert conv.ok and not conv.rounds[0].plan.errored
    assert {c.address for c in conv.rounds[0].plan.actions} == {"guest/mc-creative"}


# --- offline nodes -------------------------------------------------------------------------------


def test_an_offline_node_gets_nothing_planned_and_the_other_node_converges(
    provider: ProxmoxProvider, pve: Any, tmp_path: Path
) -> None:
    graph = with_spec(provider, tmp_path, {})
    pve.set_node_offline("pve-runtime")
    conv = converge_guests(graph, provider)
    plan = conv.rounds[0].plan
    assert plan.errored and conv.rounds[0].report is None
    assert set(errors_by_address(plan)) == runtime_guests(graph)
    assert set(errors_by_address(plan).values()) == {"node-offline"}
    assert {c.id["node"] for c in plan.changes if c.kind is Kind.GUEST} == {"pve-core"}
    assert mutating_calls(pve) == []

    pve.set_node_offline("pve-runtime", offline=False)
    assert converge_guests(graph, provider).ok
    # Our guests on a node that goes down cannot be read: the observation stops, naming them.
    pve.set_node_offline("pve-core")
    pve.requests.clear()
    with pytest.raises(TemporaryError, match="node pve-core is offline: guests 1"):
        converge_guests(graph, provider)
    assert mutating_calls(pve) == []


# --- a template inside a vmid range --------------------------------------------------------------


@pytest.mark.parametrize("marked", [False, True], ids=["plain", "carrying-our-mark"])
def test_a_template_where_allocation_would_pick_takes_its_id_and_is_never_touched(
    graph: DesiredGraph, provider: ProxmoxProvider, pve: Any, marked: bool
) -> None:
    config: dict[str, Any] = {}
    if marked:  # copied by hand from one of ours, mark and tag included
        config = {
            "tags": "reconciler;zpack",
            "description": with_mark("", "zpack", "guest/mc-rlcraft", None),
        }
    pve.add_ct(1004, name="debian-golden", node="pve-runtime", template=True, config=config)
    conv = converge_guests(graph, provider)
    assert conv.ok and len(conv.rounds) == 1, [
        r.error for r in (conv.rounds[-1].report.results if conv.rounds[-1].report else [])
    ]
    plan = conv.rounds[0].plan
    creates = {c.address: c for c in plan.actions}
    assert creates["guest/mc-rlcraft"].id["vmid"] == 1005
    assert plan.foreign == (
        {  # the example's cloud-init template, in the template range
            "kind": "guest",
            "name": "debian-12-cloudinit",
            "vmid": 200,
            "node": "pve-core",
            "in_range": "template",
            "template": True,
        },
        {
            "kind": "guest",
            "name": "debian-golden",
            "vmid": 1004,
            "node": "pve-runtime",
            "in_range": "game",
            "template": True,
        },
    )
    assert not [p for m, p in mutating_calls(pve) if "/1004" in p]
    assert pve.ct(1004).template and pve.ct(1005).name == "mc-rlcraft"

    # Planned again: nothing to do, and the template is still foreign.
    pve.requests.clear()
    again = plan_now(graph, provider)
    assert not again.has_changes and [f["vmid"] for f in again.foreign] == [200, 1004]
    # The drift check keeps seeing it where the snapshot has it: no drift, one call.
    snapshot = anyio.run(lambda: observe_all([provider], "zpack"))
    pve.requests.clear()
    assert inventory_drift(snapshot, anyio.run(provider.inventory)) == []
    assert [p for _, p, _ in pve.requests] == ["/api2/json/cluster/resources"]


# --- the observed facts --------------------------------------------------------------------------


def test_cluster_facts_come_with_the_inventory_call_and_stay_out_of_the_digest(
    provider: ProxmoxProvider, pve: Any, tmp_path: Path
) -> None:
    graph = with_spec(provider, tmp_path, {})
    assert converge_guests(graph, provider).ok
    pve.requests.clear()
    observed = anyio.run(lambda: observe_all([provider], "zpack"))
    assert requests_ending(pve, "/cluster/resources") == ["/api2/json/cluster/resources"]
    assert template_listings(pve) == []
    assert observed.cluster is not None
    assert set(observed.cluster.nodes) == {"pve-core", "pve-runtime"}
    runtime = observed.cluster.nodes["pve-runtime"]
    assert runtime.online and runtime.maxmem > 0 and runtime.maxcpu > 0
    assert runtime.storages is not None
    assert set(runtime.storages["local-lvm"].content) >= {"images", "rootdir"}
    assert "vztmpl" in runtime.storages["local"].content
    assert runtime.storages["local"].templates is None  # nobody needed them
    # A snapshot keeps it; an older one without it still reads; the digest ignores it.
    again = ObservedState.model_validate_json(observed.model_dump_json())
    assert again == observed
    older = json.loads(observed.model_dump_json())
    del older["cluster"]
    assert ObservedState.model_validate(older).cluster is None
    assert observed.model_copy(update={"cluster": None}).digest() == observed.digest()


def test_a_template_is_never_adopted(
    graph: DesiredGraph, provider: ProxmoxProvider, pve: Any
) -> None:
    """Even one with the spec's name at the spec's vmid: the plan says it is held by a
    template (no adoption offered), and adopt refuses it."""
    pve.add_ct(1000, name="mc-lobby", node="pve-runtime", template=True)
    pve.requests.clear()
    plan = plan_now(graph, provider)
    (found,) = [d for d in plan.diagnostics if d.address == "guest/mc-lobby"]
    assert found.code == "vmid-held-by-foreign" and "held by template" in found.message
    report = anyio.run(lambda: adopt(graph, provider, ["guest/mc-lobby"]))
    assert report.refused == {
        "guest/mc-lobby": "lxc 1000 on pve-runtime is a template: templates are never managed"
    }
    assert mutating_calls(pve) == []
