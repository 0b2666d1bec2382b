"""The example platform's firewall on fakepve, through the real client: it converges with the
guests, hand edits are seen (as drift, and as live policy findings) and undone, what is not ours
is never touched, and a recreated guest gets its firewall back in the same apply.

Assertions read fakepve's state through the API and its request log (`pve.requests`: method,
path without the query string, form body).
"""

from __future__ import annotations

import re
import urllib.parse
from pathlib import Path
from typing import Any

import anyio
import pytest

from reconciler.applying.converging import Convergence, converge
from reconciler.applying.executor import execute
from reconciler.applying.observing import observe_all
from reconciler.cli.main import main
from reconciler.loading.graph import build_graph
from reconciler.loading.loader import LoadResult, load_directory
from reconciler.model.diagnostics import Diagnostic, Severity
from reconciler.model.plans import START_GUEST, Action, Change, Plan
from reconciler.model.resources import DesiredGraph, Kind
from reconciler.model.spec import PlatformSpec
from reconciler.planning.observed_policies import live_isolation
from reconciler.planning.planner import make_plan
from reconciler.providers import Provider
from reconciler.providers.firewall import FirewallProvider
from reconciler.providers.proxmox import ProxmoxProvider, connect
from tests.conftest import SPECS
from tests.fakepve_fixtures import mutating_calls

MARK = "[reconciler:zpack]"
VMIDS = {"mc-lobby": 1000, "mc-survival": 1001, "mc-creative": 1002, "mc-skyblock": 1003}


def providers_of(provider: ProxmoxProvider) -> list[Provider]:
    firewall = FirewallProvider(pve=provider, manage_cluster=True)
    return [provider, firewall]


def run(graph: DesiredGraph, spec: PlatformSpec, provider: ProxmoxProvider, **kw: Any) -> Any:
    providers = providers_of(provider)
    checks = [live_isolation(spec)]
    return anyio.run(lambda: converge(graph, providers, observed_checks=checks, **kw))


def plan_now(graph: DesiredGraph, spec: PlatformSpec, provider: ProxmoxProvider) -> Plan:
    observed = anyio.run(lambda: observe_all(providers_of(provider), graph.platform))
    return make_plan(graph, observed, observed_checks=[live_isolation(spec)])


def failures(conv: Convergence) -> list[tuple[str, str]]:
    report = conv.rounds[-1].report
    return [(r.change.address, r.error) for r in report.results if r.error] if report else []


def live(diags: tuple[Diagnostic, ...]) -> list[Diagnostic]:
    return [d for d in diags if d.code.startswith("live-")]


def fw_of(provider: ProxmoxProvider, name: str) -> Any:
    return provider.client.nodes("pve-runtime").lxc(VMIDS[name]).firewall


def rules_of(endpoint: Any) -> list[dict[str, Any]]:
    """A rule list as Proxmox holds it, less what Proxmox adds (pos, digest, ipversion)."""
    skip = ("pos", "digest", "ipversion")
    return [{k: v for k, v in r.items() if k not in skip} for r in endpoint.get()]


def desired_rules(graph: DesiredGraph, address: str) -> list[dict[str, Any]]:
    return list(graph.resources[address].attributes["rules"])


def by_address(plan: Plan) -> dict[str, Change]:
    return {c.address: c for c in plan.actions}


@pytest.fixture
def spec(example: LoadResult) -> PlatformSpec:
    assert example.spec is not None
    return example.spec


@pytest.fixture
def converged(
    graph: DesiredGraph, spec: PlatformSpec, provider: ProxmoxProvider, pve: Any
) -> ProxmoxProvider:
    conv = run(graph, spec, provider)
    assert conv.ok, failures(conv)
    pve.requests.clear()
    return provider


def assert_matches_spec(graph: DesiredGraph, provider: ProxmoxProvider) -> None:
    """Every managed rule list in Proxmox is the spec's, rule for rule, in order."""
    client = provider.client
    for address, res in graph.resources.items():
        if res.kind is Kind.FIREWALL_GUEST:
            guest = graph.resources[str(res.attached_to)].attributes
            if guest["vmid"] is None:
                continue  # allocated at plan time: covered by the next plan being empty
            fw = client.nodes(guest["node"]).lxc(guest["vmid"]).firewall
            assert rules_of(fw.rules) == desired_rules(graph, address), address
            options = fw.options.get()
            assert (options["enable"], options["policy_in"]) == (1, res.attributes["policy_in"])
        elif res.kind is Kind.FIREWALL_GROUP:
            assert rules_of(client.cluster.firewall.groups(res.name)) == desired_rules(
                graph, address
            )


# --- converging ------------------------------------------------------------------------------


def test_the_example_firewall_converges_with_its_guests_then_a_second_apply_is_silent(
    graph: DesiredGraph, spec: PlatformSpec, provider: ProxmoxProvider, pve: Any
) -> None:
    first = run(graph, spec, provider)
    assert first.ok, failures(first)
    planned = {c.address: c.action for c in first.rounds[0].plan.actions}
    firewall = {a for a, r in graph.resources.items() if r.kind.value.startswith("firewall")}
    assert firewall <= set(planned)
    assert planned["firewall/cluster"] is Action.UPDATE  # a fresh cluster: firewall off
    client = provider.client
    assert client.cluster.firewall.options.get()["enable"] == 1
    aliases = {a["name"]: a for a in client.cluster.firewall.aliases.get()}
    assert aliases["api"]["cidr"] == "10.10.0.11"
    assert aliases["api"]["comment"] == f"platform API, the only agent client {MARK}"
    assert [e["cidr"] for e in client.cluster.firewall.ipset("admins").get()] == ["192.168.50.0/24"]
    groups = {g["group"]: g.get("comment") for g in client.cluster.firewall.groups.get()}
    assert groups["agent"] == f"the in-container agent, reachable from the API only {MARK}"
    assert_matches_spec(graph, provider)
    # Every rule was sent enabled: Proxmox would have created it disabled otherwise.
    posts = [b for m, p, b in pve.requests if m == "POST" and p.endswith("/rules")]
    assert posts and all(b"enable=1" in b for b in posts)
    # The live check finds nothing on the converged platform.
    assert live(plan_now(graph, spec, provider).diagnostics) == []

    pve.requests.clear()
    second = run(graph, spec, provider)
    assert not second.rounds[0].plan.has_changes, [
        (c.address, c.fields) for c in second.rounds[0].plan.actions
    ]
    assert mutating_calls(pve) == []
    # What looking costs: the cluster options, aliases, IP sets and groups (4 reads), the
    # content of our IP set and 3 groups (4), then options and rules of each of 21 guests.
    firewall_reads = [p for m, p, _ in pve.requests if m == "GET" and "/firewall" in p]
    assert len(firewall_reads) == 4 + 4 + 2 * 21


def test_rules_deleted_disabled_reordered_or_widened_by_hand_are_seen_and_restored(
    graph: DesiredGraph, spec: PlatformSpec, converged: ProxmoxProvider, pve: Any
) -> None:
    fw_of(converged, "mc-lobby").rules(1).delete()  # the Velocity rule
    fw_of(converged, "mc-survival").rules(0).put(enable=0)  # the agent group, switched off
    fw_of(converged, "mc-creative").rules(2).put(moveto=0)  # the web map rule, now first
    fw_of(converged, "mc-skyblock").rules(1).put(source="0.0.0.0/0")  # Velocity -> anyone
    pve.requests.clear()

    conv = run(graph, spec, converged)
    assert conv.ok, failures(conv)
    changes = by_address(conv.rounds[0].plan)
    assert set(changes) == {f"firewall/guest/{n}" for n in VMIDS}
    fields = {a.removeprefix("firewall/guest/"): c.fields for a, c in changes.items()}
    [inserted] = fields["mc-lobby"]
    assert (inserted.path, inserted.before) == ("rules[1]", None)
    assert inserted.after["source"] == "velocity"
    assert [(f.path, f.before, f.after) for f in fields["mc-survival"]] == [
        ("rules[0].enable", 0, 1)
    ]
    [moved] = fields["mc-creative"]
    assert (moved.path, moved.moved_from, moved.after["comment"]) == (
        "rules[2]",
        "rules[0]",
        "web map",
    )
    assert [(f.path, f.before, f.after) for f in fields["mc-skyblock"]] == [
        ("rules[1].source", "0.0.0.0/0", "velocity")
    ]

    # A repair is a call or two, each sent with the digest of the list it was planned on.
    sent = {
        (m, p.removeprefix("/api2/json/nodes/pve-runtime/lxc/")): b
        for m, p, b in pve.requests
        if m != "GET"
    }
    assert set(sent) == {
        ("POST", "1000/firewall/rules"),  # inserted at 0 ...
        ("PUT", "1000/firewall/rules/0"),  # ... and moved to 1
        ("PUT", "1001/firewall/rules/0"),
        ("PUT", "1002/firewall/rules/0"),
        ("PUT", "1003/firewall/rules/1"),
    }
    assert b"enable=1" in sent[("POST", "1000/firewall/rules")]
    assert b"moveto=2" in sent[("PUT", "1000/firewall/rules/0")]
    assert b"moveto=3" in sent[("PUT", "1002/firewall/rules/0")]
    assert b"enable=1" in sent[("PUT", "1001/firewall/rules/0")]
    assert b"source=velocity" in sent[("PUT", "1003/firewall/rules/1")]
    assert all(b"digest=" in b for k, b in sent.items() if k[0] == "PUT")
    assert_matches_spec(graph, converged)
    assert not plan_now(graph, spec, converged).has_changes


# --- the isolation, checked live -------------------------------------------------------------


def test_a_hand_made_rule_opening_the_agent_port_is_a_plan_warning_and_apply_removes_it(
    graph: DesiredGraph, spec: PlatformSpec, converged: ProxmoxProvider, pve: Any
) -> None:
    fw_of(converged, "mc-lobby").rules.post(
        type="in", action="ACCEPT", proto="tcp", dport="18888", enable=1, comment="debug"
    )
    plan = plan_now(graph, spec, converged)
    assert plan.applyable and not plan.errored
    [found] = live(plan.diagnostics)
    assert found.severity is Severity.WARNING
    assert (found.code, found.address, found.path) == (
        "live-agent-port",
        "firewall/guest/mc-lobby",
        "rules[0]",
    )
    assert "IN ACCEPT -p tcp -dport 18888" in found.message
    assert "to any address" in found.message and "only zpack-api (10.10.0.11)" in found.message
    assert "this plan corrects firewall/guest/mc-lobby" in found.message
    [removed] = by_address(plan)["firewall/guest/mc-lobby"].fields
    assert (removed.path, removed.after, removed.before["dport"]) == ("rules[0]", None, "18888")

    conv = run(graph, spec, converged)
    assert conv.ok, failures(conv)
    assert rules_of(fw_of(converged, "mc-lobby").rules) == desired_rules(
        graph, "firewall/guest/mc-lobby"
    )
    assert live(plan_now(graph, spec, converged).diagnostics) == []


def test_switches_turned_off_by_hand_are_warnings_and_drift_and_are_turned_back_on(
    graph: DesiredGraph, spec: PlatformSpec, converged: ProxmoxProvider, pve: Any
) -> None:
    client = converged.client
    fw_of(converged, "mc-survival").options.put(enable=0)
    creative = client.nodes("pve-runtime").lxc(1002)
    net0 = creative.config.get()["net0"]
    creative.config.put(net0=net0.replace("firewall=1", "firewall=0"))
    client.cluster.firewall.options.put(enable=0)

    plan = plan_now(graph, spec, converged)
    assert plan.applyable
    found = {(d.code, d.address, d.path) for d in live(plan.diagnostics)}
    assert {
        ("live-agent-port", "firewall/guest/mc-survival", "enable"),
        ("live-agent-port", "guest/mc-creative", "net.net0"),
        ("live-agent-port", "firewall/cluster", "enable"),
        ("live-isolation", "firewall/cluster", "enable"),
    } <= found
    changes = by_address(plan)
    assert [(f.path, f.before, f.after) for f in changes["firewall/guest/mc-survival"].fields] == [
        ("enable", 0, 1)
    ]
    assert [f.path for f in changes["guest/mc-creative"].fields] == ["net.net0"]
    assert [(f.path, f.before, f.after) for f in changes["firewall/cluster"].fields] == [
        ("enable", 0, 1)
    ]

    conv = run(graph, spec, converged)
    assert conv.ok, failures(conv)
    assert fw_of(converged, "mc-survival").options.get()["enable"] == 1
    assert "firewall=1" in creative.config.get()["net0"]
    assert client.cluster.firewall.options.get()["enable"] == 1
    after = plan_now(graph, spec, converged)
    assert not after.has_changes and live(after.diagnostics) == []


def test_a_widened_alias_is_blamed_on_the_rule_and_the_alias_and_restored(
    graph: DesiredGraph, spec: PlatformSpec, converged: ProxmoxProvider, pve: Any
) -> None:
    aliases = converged.client.cluster.firewall.aliases
    aliases("api").put(cidr="0.0.0.0/0", comment=f"platform API, the only agent client {MARK}")
    plan = plan_now(graph, spec, converged)
    [found] = [d for d in live(plan.diagnostics) if d.code == "live-agent-port"]
    assert (found.address, found.path) == ("firewall/group/agent", "rules[0]")
    assert "firewall/alias/api = 0.0.0.0/0" in found.message
    assert "this plan corrects firewall/alias/api" in found.message
    assert run(graph, spec, converged).ok
    assert {a["name"]: a["cidr"] for a in aliases.get()}["api"] == "10.10.0.11"


# --- ownership -----------------------------------------------------------------------------


def test_aliases_ipsets_and_groups_without_our_mark_are_never_touched(
    graph: DesiredGraph, spec: PlatformSpec, provider: ProxmoxProvider, pve: Any
) -> None:
    fw = provider.client.cluster.firewall
    fw.aliases.post(name="legacy", cidr="192.0.2.1", comment="kept by hand")
    fw.ipset.post(name="ops", comment="kept by hand")
    fw.ipset("ops").post(cidr="192.0.2.0/28")
    fw.groups.post(group="manual", comment="kept by hand")
    fw.groups("manual").post(type="in", action="ACCEPT", proto="tcp", dport="22", enable=1)
    # Ours but no longer in the spec: kept unless deletes are allowed.
    fw.aliases.post(name="retired", cidr="192.0.2.9", comment=f"old {MARK}")
    pve.requests.clear()

    first = run(graph, spec, provider)
    assert first.ok, failures(first)
    orphans = [d for d in first.rounds[0].plan.diagnostics if d.code == "orphan"]
    assert [d.address for d in orphans] == ["firewall/alias/retired"]
    pruned = run(graph, spec, provider, allow_destroy=True)
    assert pruned.ok
    assert [(c.address, c.action) for c in pruned.rounds[0].plan.actions] == [
        ("firewall/alias/retired", Action.DELETE)
    ]
    names = re.compile(r"/(legacy|ops|manual)(/|$)")
    assert [(m, p) for m, p, _ in pve.requests if m != "GET" and names.search(p)] == []
    assert {a["name"] for a in fw.aliases.get()} >= {"legacy"} and "retired" not in {
        a["name"] for a in fw.aliases.get()
    }
    assert [e["cidr"] for e in fw.ipset("ops").get()] == ["192.0.2.0/28"]
    assert len(fw.groups("manual").get()) == 1


def test_a_name_the_spec_wants_held_without_our_mark_errors_the_plan(
    graph: DesiredGraph, spec: PlatformSpec, provider: ProxmoxProvider, pve: Any
) -> None:
    provider.client.cluster.firewall.aliases.post(name="api", cidr="10.9.9.9", comment="mine")
    pve.requests.clear()
    conv = run(graph, spec, provider)
    plan = conv.rounds[0].plan
    assert plan.errored and conv.rounds[0].report is None
    [problem] = [d for d in plan.diagnostics if d.severity is Severity.ERROR]
    assert (problem.code, problem.address) == (
        "firewall-name-held-by-foreign",
        "firewall/alias/api",
    )
    assert mutating_calls(pve) == []
    [alias] = provider.client.cluster.firewall.aliases.get()
    assert (alias["cidr"], alias["comment"]) == ("10.9.9.9", "mine")


# --- a recreated guest ---------------------------------------------------------------------

NEW_TEMPLATE = "debian-13-standard_13.1-1_amd64.tar.zst"


def load_copy_dir(tmp_path: Path, file: str, old: str, new: str) -> Path:
    """The example specs, copied, with one edit."""
    target = tmp_path / "specs"
    target.mkdir()
    for src in SPECS.glob("*.yaml"):
        text = src.read_text(encoding="utf-8")
        if src.name == file:
            assert old in text
            text = text.replace(old, new, 1)
        (target / src.name).write_text(text, encoding="utf-8")
    return target


def load_copy(tmp_path: Path, file: str, old: str, new: str) -> tuple[DesiredGraph, PlatformSpec]:
    loaded = load_directory(load_copy_dir(tmp_path, file, old, new))
    assert loaded.ok and loaded.spec is not None, [str(d) for d in loaded.diagnostics]
    return build_graph(loaded.spec, loaded.source), loaded.spec


def test_a_replaced_guest_gets_its_firewall_back_in_the_same_apply(
    tmp_path: Path, converged: ProxmoxProvider, pve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Proxmox removes a guest's <vmid>.fw when it destroys the guest (pve-container's
    # destroy_vm calls PVE::Firewall::remove_vmfw_conf); fakepve's LXC destroy keeps it, so the
    # fake is made to forget it the same way.
    drop = pve._drop

    def drop_with_firewall(ct: Any) -> None:
        drop(ct)
        pve._fw()["guests"].pop(int(ct.vmid), None)

    monkeypatch.setattr(pve, "_drop", drop_with_firewall)
    client = converged.client
    # A privileged container cannot be made from an unprivileged one in place: a replace,
    # allowed here (it destroys the disk).
    graph, spec = load_copy(
        tmp_path, "game.yaml", "    vmid: 1002\n", "    vmid: 1002\n    unprivileged: false\n"
    )
    pve.requests.clear()

    conv = run(graph, spec, converged, allow_destroy=True)
    assert conv.ok, failures(conv)
    actions = {c.address: c for c in conv.rounds[0].plan.actions}
    assert actions["guest/mc-creative"].action is Action.REPLACE
    fw_change = actions["firewall/guest/mc-creative"]
    assert fw_change.action is Action.CREATE
    assert fw_change.id == {"vmid": 1002, "node": "pve-runtime", "type": "lxc"}
    assert fw_change.wave > actions["guest/mc-creative"].wave
    calls = mutating_calls(pve)
    created = calls.index(("POST", "/api2/json/nodes/pve-runtime/lxc"))
    firewall = [
        i
        for i, (_, p) in enumerate(calls)
        if p.startswith("/api2/json/nodes/pve-runtime/lxc/1002/firewall")
    ]
    assert firewall and min(firewall) > created
    fw = client.nodes("pve-runtime").lxc(1002).firewall
    assert rules_of(fw.rules) == desired_rules(graph, "firewall/guest/mc-creative")
    assert fw.options.get()["enable"] == 1
    assert not plan_now(graph, spec, converged).has_changes


# --- through the command line --------------------------------------------------------------


def flags(pve_api: Any) -> list[str]:
    return [
        "--proxmox-url",
        pve_api.url,
        "--proxmox-user",
        "root@pam",
        "--proxmox-password-env",
        "FAKEPVE_PASSWORD",
        "--ca-file",
        pve_api.ca_file,
        "--color",
        "never",
    ]


def test_plan_and_apply_commands_reconcile_the_firewall_and_show_live_findings(
    pve_api: Any, pve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["apply", str(SPECS), "--auto-approve", *flags(pve_api)]) == 0
    assert "Apply: 53 done, 0 failed, 0 skipped." in capsys.readouterr().out
    lobby = connect(pve_api).nodes("pve-runtime").lxc(1000).firewall
    lobby.rules.post(type="in", action="ACCEPT", proto="tcp", dport="18888", enable=1)

    assert main(["plan", str(SPECS), "--detailed-exitcode", *flags(pve_api)]) == 2
    out = capsys.readouterr().out
    assert "warning: live: agent port 18888 on runtime guest 'mc-lobby' is open" in out
    assert "(live-agent-port)" in out
    assert "rules[0]  {in ACCEPT dport=18888 enable=1 proto=tcp} -> (none)" in out

    assert main(["apply", str(SPECS), "--auto-approve", *flags(pve_api)]) == 0
    assert "Apply: 1 done, 0 failed, 0 skipped." in capsys.readouterr().out
    pve.requests.clear()
    assert main(["plan", str(SPECS), "--detailed-exitcode", *flags(pve_api)]) == 0
    out = capsys.readouterr().out
    assert "No changes." in out and "live-" not in out
    assert mutating_calls(pve) == []


def test_a_spec_rule_opening_the_agent_port_to_the_world_is_refused_before_any_call(
    tmp_path: Path, pve_api: Any, pve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    rule = '        - {type: group, action: agent, comment: "agent port, API only"}\n'
    load_copy_dir(
        tmp_path,
        "profiles.yaml",
        rule,
        rule + "        - {type: in, action: ACCEPT, proto: tcp, dport: 18888, comment: oops}\n",
    )
    assert main(["apply", str(tmp_path / "specs"), "--auto-approve", *flags(pve_api)]) == 1
    err = capsys.readouterr().err
    assert "(policy-agent-port)" in err and "open to any source" in err
    assert "nothing done" in err
    assert pve.requests == []


# --- digests ---------------------------------------------------------------------------------


def test_aliases_sharing_one_digest_are_all_restored_in_one_apply(
    graph: DesiredGraph, spec: PlatformSpec, converged: ProxmoxProvider, pve: Any
) -> None:
    aliases = converged.client.cluster.firewall.aliases
    aliases("velocity").put(cidr="10.30.0.99", comment=f"Velocity proxy {MARK}")
    aliases("traefik-runtime").put(cidr="10.30.0.98", comment=f"runtime Traefik {MARK}")
    pve.requests.clear()
    conv = run(graph, spec, converged)
    assert conv.ok and len(conv.rounds) == 1, failures(conv)
    # The second PUT met the digest the first one changed, read the list again, found its
    # alias as planned, and went through.
    puts = [p for m, p, _ in pve.requests if m == "PUT"]
    assert len(puts) == 3
    now = {a["name"]: a["cidr"] for a in aliases.get()}
    assert (now["velocity"], now["traefik-runtime"]) == ("10.30.0.21", "10.30.0.20")


def test_rules_edited_between_plan_and_apply_are_re_planned_not_edited_blindly(
    graph: DesiredGraph, spec: PlatformSpec, converged: ProxmoxProvider, pve: Any
) -> None:
    lobby = fw_of(converged, "mc-lobby")
    lobby.rules(1).delete()
    edits = iter([lambda: lobby.rules.post(type="in", action="DROP", enable=1, comment="late")])

    def someone_edits_meanwhile(plan: Plan) -> bool:
        next(edits, lambda: None)()
        return True

    conv = run(graph, spec, converged, approve=someone_edits_meanwhile)
    assert len(conv.rounds) == 2 and conv.ok, failures(conv)
    # Positions planned on the old list are not used on the new one: the change stops (the
    # POST's digest, or the read-back before the move, sees the list changed) and is re-planned.
    [first] = conv.rounds[0].report.results
    assert first.conflict and "changed" in first.error
    assert by_address(conv.rounds[1].plan)["firewall/guest/mc-lobby"].fields[0].path == "rules[0]"
    assert rules_of(lobby.rules) == desired_rules(graph, "firewall/guest/mc-lobby")


# --- firewall first ----------------------------------------------------------------------------


def test_a_new_guest_starts_only_once_its_firewall_is_in_place(
    graph: DesiredGraph, spec: PlatformSpec, provider: ProxmoxProvider, pve: Any
) -> None:
    conv = run(graph, spec, provider)
    assert conv.ok, failures(conv)
    requests = [
        (m, p.removeprefix("/api2/json"), dict(urllib.parse.parse_qsl(body.decode())))
        for m, p, body in pve.requests
    ]
    guests = [
        r
        for r in graph.resources.values()
        if r.kind is Kind.GUEST and r.attributes.get("state") == "running"
    ]
    vmids = {c.address: c.id["vmid"] for c in conv.rounds[0].plan.changes if c.kind is Kind.GUEST}
    checked = 0
    for res in guests:
        if f"firewall/guest/{res.name}" not in graph.resources:
            continue
        vmid, node = vmids[res.address], res.attributes["node"]
        base = f"/nodes/{node}/{res.attributes['type']}"
        # A container is created (POST .../lxc), the bastion VM cloned (POST .../clone).
        [create] = [
            i
            for i, (m, p, body) in enumerate(requests)
            if m == "POST"
            and (
                (p == base and int(body.get("vmid", 0)) == vmid)
                or (p.endswith("/clone") and int(body.get("newid", 0)) == vmid)
            )
        ]
        assert int(requests[create][2].get("start", 0)) == 0, res.address
        rules = [
            i
            for i, (m, p, _) in enumerate(requests)
            if m != "GET" and p.startswith(f"{base}/{vmid}/firewall/")
        ]
        [start] = [
            i
            for i, (m, p, _) in enumerate(requests)
            if (m, p) == ("POST", f"{base}/{vmid}/status/start")
        ]
        assert create < max(rules) < start, res.address
        checked += 1
    assert checked == 21
    assert {pve.guest(vmids[r.address]).status for r in guests} == {"running"}
    assert not plan_now(graph, spec, provider).has_changes


def test_a_guest_whose_firewall_fails_stays_stopped(
    graph: DesiredGraph, spec: PlatformSpec, provider: ProxmoxProvider, pve: Any
) -> None:
    """Fail closed: the rules could not be written, so the guest is not started."""
    for kind in ("lxc", "qemu"):
        pve.fail(
            "PUT",
            f"/nodes/{{node}}/{kind}/{{vmid}}/firewall/options",
            status=400,
            message="bad option",
            times=None,
        )
    conv = run(graph, spec, provider)
    assert not conv.ok
    vmids = {c.address: c.id["vmid"] for c in conv.rounds[0].plan.changes if c.kind is Kind.GUEST}
    held = [a for a in vmids if f"firewall/guest/{a.removeprefix('guest/')}" in graph.resources]
    assert "guest/mc-lobby" in held and "guest/bastion" in held and len(held) == 21
    assert {pve.guest(vmids[a]).status for a in held} == {"stopped"}


def test_a_held_guest_started_by_someone_else_meanwhile_is_not_started_twice(
    graph: DesiredGraph, spec: PlatformSpec, provider: ProxmoxProvider, pve: Any
) -> None:
    assert run(graph, spec, provider).ok
    vmid = graph.resources["guest/mc-lobby"].attributes["vmid"]
    pve.ct(vmid).status = "stopped"
    fw = fw_of(provider, "mc-lobby")
    [first] = [r for r in fw.rules.get() if r["pos"] == 0]
    fw.rules(0).delete(digest=first["digest"])
    plan = plan_now(graph, spec, provider)
    changes = by_address(plan)
    assert changes["firewall/guest/mc-lobby"].after[START_GUEST] is True
    pve.ct(vmid).status = "running"  # HA (or a person) started it before the apply
    report = anyio.run(lambda: execute(plan, providers_of(provider)))
    assert report.ok, [(r.change.address, r.error) for r in report.results]
    assert pve.ct(vmid).status == "running"
    assert not plan_now(graph, spec, provider).has_changes


def test_an_address_written_with_its_prefix_converges_as_proxmox_stores_it(
    provider: ProxmoxProvider, pve: Any, tmp_path: Path
) -> None:
    """An IP set entry `10.9.9.9/32` is stored by Proxmox as `10.9.9.9`: applied once, then no
    drift (the spec's spelling and Proxmox's are the same address)."""
    graph, spec = load_copy(
        tmp_path, "firewall.yaml", "[192.168.50.0/24]", "[192.168.50.0/24, 10.9.9.9/32]"
    )
    assert run(graph, spec, provider).ok
    entries = [e["cidr"] for e in provider.client.cluster.firewall.ipset("admins").get()]
    assert sorted(entries) == ["10.9.9.9", "192.168.50.0/24"]
    assert not plan_now(graph, spec, provider).has_changes
