"""Import and adoption on fakepve, through the real client: a hand-made estate of several roles
imports to specs that validate; planning them only reports the guests (nothing is touched);
adopting one guest marks that guest only; adopted guests plan no-op and an apply makes zero
mutating calls; refusals write nothing.

Assertions read fakepve's state (`pve.ct(vmid).config`) and its request log (`pve.requests`).
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml

from reconciler.applying.converging import converge
from reconciler.applying.observing import observe_all
from reconciler.cli.importing import add_import_commands
from reconciler.cli.live import add_connection_args
from reconciler.importing.adopting import AdoptionReport, adopt
from reconciler.importing.edge import EdgeEstate
from reconciler.importing.estate import Estate, read_estate
from reconciler.importing.writer import Base, ImportResult, render_specs, write_files
from reconciler.loading.loader import load_directory
from reconciler.model.diagnostics import Severity
from reconciler.model.plans import Action, Plan
from reconciler.model.resources import DesiredGraph, Kind
from reconciler.model.spec import ProxmoxApi
from reconciler.planning.planner import make_plan
from reconciler.providers import Provider
from reconciler.providers.firewall import FirewallProvider
from reconciler.providers.proxmox import ProxmoxProvider
from tests.cli.test_live import flags
from tests.fakepve_fixtures import mutating_calls

PLATFORM = "zpack"
NET = "name=eth0,bridge=vmbr0,firewall=1,gw={gw},ip={ip}/24,tag={tag},type=veth"

# vmid -> (hostname, node, running, config): four roles, settings shared and not.
GUESTS: dict[int, tuple[str, str, bool, dict[str, Any]]] = {
    101: (
        "zpack-api",
        "pve-core",
        True,
        {
            "cores": 2,
            "memory": 4096,
            "tags": "control;zpack",
            "onboot": 1,
            "features": "nesting=1",
            "description": "platform API\nowner: ops",
            "net0": NET.format(gw="10.10.0.1", ip="10.10.0.11", tag=10),
        },
    ),
    102: (
        "zpack-db",
        "pve-core",
        True,
        {
            "cores": 2,
            "memory": 2048,
            "tags": "control;mariadb;zpack",
            "onboot": 1,
            "features": "nesting=1",
            "rootfs": "local-lvm:vm-102-disk-0,size=64G",
            "net0": NET.format(gw="10.10.0.1", ip="10.10.0.13", tag=10),
        },
    ),
    103: (
        "zpack-redis",
        "pve-core",
        True,
        {
            "cores": 2,
            "memory": 2048,
            "tags": "control;redis;zpack",
            "onboot": 1,
            "net0": NET.format(gw="10.10.0.1", ip="10.10.0.14", tag=10),
        },
    ),
    301: (
        "traefik-runtime",
        "pve-runtime",
        True,
        {
            "cores": 2,
            "memory": 1024,
            "tags": "traefik",
            "net0": NET.format(gw="10.30.0.1", ip="10.30.0.20", tag=30),
        },
    ),
    1000: (
        "mc-lobby",
        "pve-runtime",
        True,
        {
            "cores": 2,
            "memory": 4096,
            "swap": 1024,
            "tags": "game;vanilla",
            "onboot": 1,
            "features": "nesting=1",
            "rootfs": "local-lvm:vm-1000-disk-0,size=16G",
            "description": "the lobby",
            "net0": NET.format(gw="10.20.0.1", ip="10.20.0.10", tag=20),
        },
    ),
    1001: (
        "mc-survival",
        "pve-runtime",
        False,
        {
            "cores": 4,
            "memory": 4096,
            "swap": 1024,
            "tags": "game;vanilla",
            "onboot": 1,
            "features": "nesting=1",
            "rootfs": "local-lvm:vm-1001-disk-0,size=16G",
            "net0": NET.format(gw="10.20.0.1", ip="10.20.0.11", tag=20),
        },
    ),
    1100: (
        "dev-alice",
        "pve-runtime",
        True,
        {
            "cores": 2,
            "memory": 4096,
            "tags": "dev",
            "features": "keyctl=1,nesting=1",
            "rootfs": "local-lvm:vm-1100-disk-0,size=24G",
            "net0": "name=eth0,bridge=vmbr0,ip=dhcp,type=veth",
        },
    ),
}
VMIDS = {name: vmid for vmid, (name, *_rest) in GUESTS.items()}

# Guest firewalls, top rule first.
GUEST_RULES: dict[int, list[dict[str, Any]]] = {
    101: [
        {"type": "group", "action": "from-control"},
        {"type": "in", "action": "ACCEPT", "proto": "tcp", "dport": "8080", "comment": "API"},
    ],
    1000: [
        {"type": "group", "action": "agent"},
        {"type": "in", "action": "ACCEPT", "proto": "tcp", "dport": "25565", "source": "velocity"},
        {"type": "in", "action": "ACCEPT", "proto": "tcp", "dport": "8100", "enable": 0},
    ],
    1001: [
        {"type": "group", "action": "agent"},
        {"type": "in", "action": "ACCEPT", "proto": "tcp", "dport": "25565", "source": "velocity"},
        {"type": "in", "action": "ACCEPT", "proto": "tcp", "dport": "8100", "enable": 0},
    ],
}


def build_estate(pve: Any, provider: ProxmoxProvider) -> None:
    """The hand-made estate: guests, a template, guest firewalls, cluster objects."""
    for vmid, (name, node, running, config) in GUESTS.items():
        status = "running" if running else "stopped"
        pve.add_ct(vmid, name, node=node, status=status, config=dict(config))
    pve.add_ct(201, "debian-base", node="pve-core", template=True)  # 200: the fixture's VM one
    client = provider.client
    fw = client.cluster.firewall
    fw.aliases.post(name="api", cidr="10.10.0.11", comment="platform API")
    fw.aliases.post(name="control-net", cidr="10.10.0.0/24", comment="control plane")
    fw.aliases.post(name="velocity", cidr="10.30.0.21")
    fw.ipset.post(name="admins", comment="operators")
    fw.ipset("admins").post(cidr="192.168.50.0/24")
    for group, comment, rule in (
        ("agent", "agent port", {"proto": "tcp", "dport": "18888", "source": "api"}),
        ("from-control", "", {"source": "control-net"}),
        ("ssh-admin", "SSH for operators", {"proto": "tcp", "dport": "22", "source": "+admins"}),
    ):
        fw.groups.post(group=group, **({"comment": comment} if comment else {}))
        fw.groups(group).post(type="in", action="ACCEPT", enable=1, **rule)
    for vmid, rules in GUEST_RULES.items():
        node = GUESTS[vmid][1]
        gfw = client.nodes(node).lxc(vmid).firewall
        gfw.options.put(enable=1, policy_in="DROP")
        for rule in reversed(rules):
            gfw.rules.post(**{"enable": 1, **rule})
    pve.requests.clear()


def base() -> Base:
    return Base.default(PLATFORM)


def providers_of(provider: ProxmoxProvider, graph: DesiredGraph) -> list[Provider]:
    firewall = FirewallProvider(pve=provider, manage_cluster="firewall/cluster" in graph.resources)
    return [provider, firewall]


def plan_now(graph: DesiredGraph, provider: ProxmoxProvider) -> Plan:
    observed = anyio.run(lambda: observe_all(providers_of(provider, graph), graph.platform))
    return make_plan(graph, observed)


def do_adopt(graph: DesiredGraph, provider: ProxmoxProvider, *addresses: str) -> AdoptionReport:
    return anyio.run(lambda: adopt(graph, provider, addresses))


def configs(pve: Any) -> dict[int, dict[str, Any]]:
    return {vmid: dict(pve.ct(vmid).config) for vmid in GUESTS}


def errors(plan: Plan) -> list[tuple[str, str | None]]:
    return [(d.code, d.address) for d in plan.diagnostics if d.severity is Severity.ERROR]


def read_fresh(pve: Any, provider: ProxmoxProvider) -> Estate:
    """The estate as the import reads it now; fakepve's request log cleared after the read."""
    read = anyio.run(read_estate, provider)
    pve.requests.clear()
    return read


def import_specs(estate: Estate, tmp_path: Path, edge: EdgeEstate | None = None) -> ImportResult:
    """The specs for `estate` (and `edge`) in `base()`'s frame, written to tmp_path/imported."""
    result = render_specs(estate, base(), edge)
    write_files(result.files, tmp_path / "imported")
    return result


@pytest.fixture
def estate(pve: Any, provider: ProxmoxProvider) -> Estate:
    build_estate(pve, provider)
    return read_fresh(pve, provider)


@pytest.fixture
def imported(estate: Estate, tmp_path: Path) -> ImportResult:
    return import_specs(estate, tmp_path)


FIREWALL_OBJECTS = (
    "firewall/alias/api",
    "firewall/alias/control-net",
    "firewall/alias/velocity",
    "firewall/ipset/admins",
    "firewall/group/agent",
    "firewall/group/from-control",
    "firewall/group/ssh-admin",
)


# --- import -----------------------------------------------------------------------------------


def test_the_estate_is_read_with_one_inventory_call_and_reads_only(
    pve: Any, provider: ProxmoxProvider
) -> None:
    build_estate(pve, provider)
    estate = anyio.run(read_estate, provider)
    assert [g.vmid for g in estate.guests] == sorted(GUESTS)
    assert estate.skipped == (
        "lxc 201 (debian-base): a template, not a guest",
        "qemu 200 (debian-12-cloudinit): a template, not a guest",  # the example's, from pve_api
    )
    assert [a.name for a in estate.aliases] == ["api", "control-net", "velocity"]
    assert [g.name for g in estate.groups] == ["agent", "from-control", "ssh-admin"]
    assert sum(1 for m, p, _ in pve.requests if p.endswith("/cluster/resources")) == 1
    assert mutating_calls(pve) == []


def test_import_writes_one_file_per_role_and_the_specs_validate(
    imported: ImportResult, graph: DesiredGraph
) -> None:
    assert imported.ok, [str(d) for d in imported.load.diagnostics] if imported.load else None
    assert sorted(imported.files) == [
        "core.yaml",
        "dev.yaml",
        "firewall.yaml",
        "game.yaml",
        "network.yaml",
        "platform.yaml",
        "profiles.yaml",
    ]
    assert imported.guests == {name: vmid for name, vmid in VMIDS.items()}
    assert imported.drift == {}
    game = yaml.safe_load(imported.files["game.yaml"])["guests"]
    # Every guest keeps its vmid; shared settings went to the role's profile.
    assert {n: g["vmid"] for n, g in game.items()} == {"mc-lobby": 1000, "mc-survival": 1001}
    profiles = yaml.safe_load(imported.files["profiles.yaml"])["profiles"]
    assert profiles["game"]["memory"] == "4G" and profiles["game"]["disk"] == {"size": "16G"}
    assert profiles["game"]["tags"] == ["game", "vanilla"]
    assert profiles["core"]["cores"] == 2 and profiles["core"]["tags"] == ["control", "zpack"]
    assert game["mc-survival"]["cores"] == 4 and "memory" not in game["mc-survival"]
    assert game["mc-survival"]["state"] == "stopped"
    # The template is unknown: a placeholder, said so in a comment.
    assert (
        "template: unknown:vztmpl/debian-imported.tar.zst  # unknown: only used to re-create"
        in (imported.files["profiles.yaml"])
    )
    assert graph.resources["firewall/guest/mc-lobby"].attributes["rules"][2]["enable"] == 0
    assert "guest/dev-alice" in graph.resources and "firewall/guest/dev-alice" not in (
        graph.resources
    )
    assert set(FIREWALL_OBJECTS) <= set(graph.resources)
    assert all(
        text.startswith("# Imported by `reconciler import` from https://")
        for text in (imported.files.values())
    )


def test_import_is_deterministic(estate: Estate) -> None:
    first, second = render_specs(estate, base()), render_specs(estate, base())
    assert first.files == second.files


def test_import_takes_ranges_and_platform_from_an_existing_spec(
    estate: Estate, example: Any
) -> None:
    result = render_specs(estate, Base.from_spec(example.spec))
    assert result.ok
    platform = yaml.safe_load(result.files["platform.yaml"])
    assert platform["proxmox"]["token_secret"] == {"env": "PVE_TOKEN_SECRET"}
    assert platform["ranges"]["game"] == {
        "first": 1000,
        "last": 1099,
        "layer": "runtime",
        "description": "game servers",
    }
    assert "isolation" not in platform["policies"]
    assert "left out" in result.files["platform.yaml"]


# --- before adoption: only reported ------------------------------------------------------------


def test_unadopted_guests_are_only_reported_and_an_apply_touches_nothing(
    graph: DesiredGraph, provider: ProxmoxProvider, pve: Any
) -> None:
    before = configs(pve)
    plan = plan_now(graph, provider)
    assert not plan.has_changes
    pending = {d.address for d in plan.diagnostics if d.code == "adoption-pending"}
    assert {a for a in pending if a.startswith("guest/")} == {f"guest/{name}" for name in VMIDS}
    assert {a.split("/")[1] for a in pending if a.startswith("firewall/")} == {
        "alias",
        "ipset",
        "group",
    }
    assert all(d.severity is Severity.WARNING for d in plan.diagnostics)
    conv = anyio.run(lambda: converge(graph, providers_of(provider, graph)))
    assert not conv.rounds[-1].plan.has_changes
    assert mutating_calls(pve) == []
    assert configs(pve) == before


def test_unadopted_firewall_objects_are_only_reported_too(
    graph: DesiredGraph, provider: ProxmoxProvider
) -> None:
    assert errors(plan_now(graph, provider)) == []


# --- adoption -----------------------------------------------------------------------------------


def test_adopting_one_guest_marks_only_that_guest(
    graph: DesiredGraph, provider: ProxmoxProvider, pve: Any, tmp_path: Path
) -> None:
    before = configs(pve)
    report = do_adopt(graph, provider, "guest/mc-lobby")
    assert report.ok, report
    assert [(a.address, a.status, a.drift) for a in report.adoptions] == [
        ("guest/mc-lobby", "adopted", [])
    ]
    assert mutating_calls(pve) == [("PUT", "/api2/json/nodes/pve-runtime/lxc/1000/config")]
    after = configs(pve)
    assert {v: c for v, c in after.items() if v != 1000} == {
        v: c for v, c in before.items() if v != 1000
    }
    lobby = after[1000]
    assert lobby["tags"] == "game;reconciler;vanilla"
    assert lobby["description"] == (
        "the lobby\n\nreconciler:v1 platform=zpack address=guest/mc-lobby vmid=1000 "
        f"template=unknown:vztmpl/debian-imported.tar.zst adopted={tmp_path / 'imported'}"
    )
    assert {k: v for k, v in lobby.items() if k not in ("tags", "description")} == {
        k: v for k, v in before[1000].items() if k not in ("tags", "description")
    }
    plan = plan_now(graph, provider)
    actions = {c.address: c.action for c in plan.changes}
    assert actions["guest/mc-lobby"] is Action.NOOP
    assert actions["firewall/guest/mc-lobby"] is Action.NOOP
    pending = {d.address for d in plan.diagnostics if d.code == "adoption-pending"}
    assert {a for a in pending if a.startswith("guest/")} == {
        f"guest/{n}" for n in VMIDS if n != "mc-lobby"
    }


def test_adopted_guests_and_firewall_objects_apply_with_zero_mutating_calls(
    graph: DesiredGraph, provider: ProxmoxProvider, pve: Any
) -> None:
    assert do_adopt(graph, provider, "guest/mc-lobby", *FIREWALL_OBJECTS).ok
    assert len(mutating_calls(pve)) == 1 + len(FIREWALL_OBJECTS)
    pve.requests.clear()
    before = configs(pve)
    conv = anyio.run(lambda: converge(graph, providers_of(provider, graph)))
    plan = conv.rounds[0].plan
    assert errors(plan) == [] and not plan.has_changes, [c.address for c in plan.actions]
    assert mutating_calls(pve) == []
    assert configs(pve) == before


def test_adopting_everything_round_trips_to_an_empty_plan(
    graph: DesiredGraph, provider: ProxmoxProvider, pve: Any
) -> None:
    guests = [a for a, r in graph.resources.items() if r.kind is Kind.GUEST]
    report = do_adopt(graph, provider, *guests, *FIREWALL_OBJECTS)
    assert report.ok and all(a.drift == [] for a in report.adoptions), report
    pve.requests.clear()
    conv = anyio.run(lambda: converge(graph, providers_of(provider, graph)))
    plan = conv.rounds[0].plan
    assert plan.diagnostics == () and not plan.has_changes
    assert all(c.action is Action.NOOP for c in plan.changes)
    assert len([c for c in plan.changes if c.kind is Kind.FIREWALL_GUEST]) == len(GUEST_RULES)
    assert mutating_calls(pve) == []
    # Adopting again changes nothing: every address is already owned.
    again = do_adopt(graph, provider, *guests)
    assert {a.status for a in again.adoptions} == {"already owned"}
    assert mutating_calls(pve) == []


@pytest.mark.parametrize(
    ("address", "setup", "why"),
    [
        ("guest/nope", None, "not in the specs"),
        ("firewall/guest/mc-lobby", None, "follows its guest"),
        ("guest/mc-survival", {"hostname": "someone-else"}, "is named 'someone-else'"),
        (
            "guest/mc-survival",
            {"description": "reconciler:v1 platform=other address=guest/x"},
            "mark of platform 'other'",
        ),
        ("guest/mc-survival", {"lock": "backup"}, "locked (backup)"),
    ],
    ids=["not-in-specs", "guest-firewall", "name-differs", "other-platform", "locked"],
)
def test_a_refusal_writes_nothing_for_any_address(
    address: str,
    setup: dict[str, str] | None,
    why: str,
    graph: DesiredGraph,
    provider: ProxmoxProvider,
    pve: Any,
) -> None:
    if setup:
        pve.ct(1001).config.update(setup)
    before = configs(pve)
    report = do_adopt(graph, provider, "guest/mc-lobby", address)
    assert not report.ok and why in report.refused[address]
    assert [(a.address, a.status) for a in report.adoptions] == [("guest/mc-lobby", "not adopted")]
    assert mutating_calls(pve) == []
    assert configs(pve) == before


def test_a_vmid_nobody_holds_is_refused(
    graph: DesiredGraph, provider: ProxmoxProvider, pve: Any
) -> None:
    provider.client.nodes("pve-runtime").lxc(1100).delete(force=1, purge=1)
    pve.requests.clear()
    report = do_adopt(graph, provider, "guest/dev-alice")
    assert "no guest holds vmid 1100" in report.refused["guest/dev-alice"]
    assert mutating_calls(pve) == []


def test_a_firewall_object_of_another_platform_is_refused(
    graph: DesiredGraph, provider: ProxmoxProvider, pve: Any
) -> None:
    provider.client.cluster.firewall.aliases("api").put(
        cidr="10.10.0.11", comment="x [reconciler:other]"
    )
    pve.requests.clear()
    report = do_adopt(graph, provider, "firewall/alias/api")
    assert "mark of platform 'other'" in report.refused["firewall/alias/api"]
    assert mutating_calls(pve) == []


def test_dry_run_shows_the_writes_and_writes_nothing(
    graph: DesiredGraph, provider: ProxmoxProvider, pve: Any
) -> None:
    report = anyio.run(
        lambda: adopt(graph, provider, ["guest/dev-alice", "firewall/group/agent"], dry_run=True)
    )
    assert report.ok
    assert [(a.address, a.status) for a in report.adoptions] == [
        ("guest/dev-alice", "would adopt"),
        ("firewall/group/agent", "would adopt"),
    ]
    assert report.adoptions[0].writes["tags"] == "dev;reconciler"
    assert report.adoptions[1].writes == {"comment": "agent port [reconciler:zpack]"}
    assert mutating_calls(pve) == []


def test_a_guest_edited_after_the_checks_is_not_overwritten(
    graph: DesiredGraph, provider: ProxmoxProvider, pve: Any
) -> None:
    real = provider.run_task

    async def edit_first(what: str, node: str, start: Any) -> None:
        pve.ct(1000).config["description"] = "edited meanwhile"
        await real(what, node, start)

    provider.run_task = edit_first  # type: ignore[method-assign]
    report = do_adopt(graph, provider, "guest/mc-lobby")
    assert [(a.status, a.error) for a in report.adoptions] == [
        ("failed", "changed since it was read; look again, then re-run")
    ]
    assert pve.ct(1000).config["description"] == "edited meanwhile"
    assert "reconciler" not in pve.ct(1000).config["tags"]


# --- the commands -------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reconciler")
    add_import_commands(p.add_subparsers(dest="command", required=True), add_connection_args)
    return p


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    args = parser().parse_args(argv)
    out, err = io.StringIO(), io.StringIO()
    code = args.func(args, out, err)
    return code, out.getvalue(), err.getvalue()


def test_the_import_command_writes_valid_specs_and_refuses_to_overwrite(
    estate: Estate, pve_api: ProxmoxApi, tmp_path: Path, pve: Any
) -> None:
    out = tmp_path / "out"
    argv = ["import", "--out", str(out), "--platform", PLATFORM, *flags(pve_api)]
    code, text, err = run_cli(argv)
    assert code == 0, err
    assert "7 guests imported" in text and "valid" in text
    assert load_directory(out).ok
    assert "FAKEPVE_PASSWORD" in (out / "platform.yaml").read_text()
    assert "secret" not in (out / "platform.yaml").read_text().replace("_secret", "")
    code, _, err = run_cli(argv)
    assert code == 1 and "not empty" in err
    (out / "stale.yaml").write_text("guests: {}\n")
    code, _, err = run_cli([*argv, "--force"])
    assert code == 0, err
    assert not (out / "stale.yaml").exists()
    assert mutating_calls(pve) == []


def test_the_adopt_command_dry_runs_then_adopts_with_approval(
    imported: ImportResult, pve_api: ProxmoxApi, tmp_path: Path, pve: Any
) -> None:
    specs = str(tmp_path / "imported")
    base_argv = ["adopt", "guest/mc-lobby", "--dir", specs, *flags(pve_api)]
    code, text, err = run_cli([*base_argv, "--dry-run"])
    assert code == 0, err
    assert "would adopt  guest/mc-lobby (lxc 1000 on pve-runtime)" in text
    assert "Dry run: nothing was written." in text
    assert mutating_calls(pve) == []
    code, text, err = run_cli(base_argv)  # no terminal, no --auto-approve
    assert code == 1 and "needs confirmation" in err
    assert mutating_calls(pve) == []
    code, text, err = run_cli([*base_argv, "--auto-approve"])
    assert code == 0, err
    assert "adopted      guest/mc-lobby" in text
    assert mutating_calls(pve) == [("PUT", "/api2/json/nodes/pve-runtime/lxc/1000/config")]
    code, text, _ = run_cli(["adopt", "guest/nope", "--dir", specs, *flags(pve_api)])
    assert code == 1 and "refused  guest/nope: not in the specs" in text


def test_adopting_an_ip_set_that_differs_from_the_spec_shows_what_apply_would_change(
    graph: DesiredGraph, provider: ProxmoxProvider, pve: Any
) -> None:
    """Someone added an entry after the import: adopt says the next apply takes it out."""
    provider.client.cluster.firewall.ipset("admins").post(cidr="198.51.100.7")
    pve.requests.clear()
    report = anyio.run(lambda: adopt(graph, provider, ["firewall/ipset/admins"], dry_run=True))
    [adoption] = report.adoptions
    assert adoption.drift == ["entries"]
    assert mutating_calls(pve) == []
