"""The isolation policies run on observed state: the example platform as converged, then edited
the way a person at the Proxmox GUI would, at our own boundary (no Proxmox here)."""

from __future__ import annotations

from typing import Any

import pytest

from reconciler.loading.loader import LoadResult
from reconciler.model.diagnostics import Severity
from reconciler.model.observed import ObservedResource, ObservedState
from reconciler.model.resources import DesiredGraph, Kind
from reconciler.model.spec import PlatformSpec
from reconciler.planning.observed_policies import check_observed, live_isolation
from reconciler.planning.planner import converged_state, make_plan

OPEN_AGENT = {"type": "in", "action": "ACCEPT", "proto": "tcp", "dport": "18888", "enable": 1}


@pytest.fixture(scope="module")
def spec(example: LoadResult) -> PlatformSpec:
    assert example.spec is not None
    return example.spec


@pytest.fixture(scope="module")
def base(graph: DesiredGraph) -> ObservedState:
    return converged_state(graph)


def edit(state: ObservedState, address: str, **attrs: Any) -> ObservedState:
    out = []
    for r in state.resources:
        if r.address == address:
            r = r.model_copy(update={"attributes": {**r.attributes, **attrs}})
        out.append(r)
    return state.model_copy(update={"resources": tuple(out)})


def rules(state: ObservedState, address: str) -> list[dict[str, Any]]:
    return list(state.owned()[address].attributes["rules"])


def found(spec: PlatformSpec, state: ObservedState, changing: tuple[str, ...] = ()) -> list[Any]:
    diags = check_observed(spec, state, changing)
    assert all(d.severity is Severity.WARNING for d in diags)
    return [(d.code, d.address, d.path) for d in diags]


def test_the_converged_platform_is_isolated(spec: PlatformSpec, base: ObservedState) -> None:
    assert check_observed(spec, base) == []


def test_a_live_rule_opening_the_agent_port_to_anyone(
    spec: PlatformSpec, base: ObservedState
) -> None:
    lobby = "firewall/guest/mc-lobby"
    state = edit(base, lobby, rules=[OPEN_AGENT, *rules(base, lobby)])
    [d] = check_observed(spec, state, [lobby])
    assert (d.code, d.address, d.path) == ("live-agent-port", lobby, "rules[0]")
    assert d.message == (
        "live: agent port 18888 on runtime guest 'mc-lobby' is open to any address except "
        "10.10.0.11 through "
        "rule firewall/guest/mc-lobby rules[0] `IN ACCEPT -p tcp -dport 18888`; only zpack-api "
        "(10.10.0.11) may reach it; this plan corrects firewall/guest/mc-lobby"
    )


def test_policy_in_accept_opens_everything(spec: PlatformSpec, base: ObservedState) -> None:
    state = edit(base, "firewall/guest/mc-survival", policy_in="ACCEPT")
    assert found(spec, state) == [("live-agent-port", "firewall/guest/mc-survival", "policy_in")]


def test_a_widened_alias_is_named_with_the_rule_that_uses_it(
    spec: PlatformSpec, base: ObservedState
) -> None:
    state = edit(base, "firewall/alias/api", cidr="0.0.0.0/0")
    diags = check_observed(spec, state, ["firewall/alias/api"])
    # One finding for the group's rule, however many guests use the group.
    [d] = [d for d in diags if d.code == "live-agent-port"]
    assert (d.address, d.path) == ("firewall/group/agent", "rules[0]")
    assert "runtime guests 'dev-alice', 'dev-bob', 'mc-creative' and 4 more" in d.message
    assert "firewall/alias/api = 0.0.0.0/0" in d.message
    assert d.message.endswith("this plan corrects firewall/alias/api")
    # Velocity's bridge rule names the alias too, but Velocity is edge, not control.
    assert [(x.code, x.address) for x in diags if x.code == "live-isolation"] == []


@pytest.mark.parametrize(
    ("address", "attrs", "expected"),
    [
        (
            "firewall/guest/mc-lobby",
            {"enable": 0},
            [("live-agent-port", "firewall/guest/mc-lobby", "enable")],
        ),
        (
            "guest/mc-lobby",
            {"net": {"net0": "bridge=vmbr0,firewall=0,ip=10.20.0.10/24,name=eth0,tag=20"}},
            [("live-agent-port", "guest/mc-lobby", "net.net0")],
        ),
        (
            "guest/zpack-db",
            {"net": {"net0": "bridge=vmbr0,ip=10.10.0.13/24,name=eth0,tag=10"}},
            [("live-isolation", "guest/zpack-db", "net.net0")],
        ),
        (
            "firewall/cluster",
            {"enable": 0},
            [
                ("live-agent-port", "firewall/cluster", "enable"),
                ("live-isolation", "firewall/cluster", "enable"),
            ],
        ),
    ],
)
def test_a_switch_turned_off_voids_every_rule(
    spec: PlatformSpec,
    base: ObservedState,
    address: str,
    attrs: dict[str, Any],
    expected: list[Any],
) -> None:
    assert found(spec, edit(base, address, **attrs)) == expected


def test_a_control_guest_opened_to_the_runtime(spec: PlatformSpec, base: ObservedState) -> None:
    db = "firewall/guest/zpack-db"
    pg = {**OPEN_AGENT, "dport": "5432", "source": "10.20.0.0/24"}
    state = edit(base, db, rules=[*rules(base, db), pg])
    [d] = check_observed(spec, state)
    assert (d.code, d.address, d.path) == ("live-isolation", db, "rules[2]")
    assert d.message.startswith("live: 7 runtime guests, e.g. 'dev-alice' (10.20.0.100),")
    assert "(port 5432); no isolation exception covers it" in d.message
    # The declared exception (DNS on 53) is not a finding.
    dns = "firewall/guest/zpack-dns"
    wide_dns = {**OPEN_AGENT, "dport": "53", "source": "10.20.0.0/24"}
    assert check_observed(spec, edit(base, dns, rules=[*rules(base, dns), wide_dns])) == []


def test_a_guest_opened_by_one_rule_on_two_ports_is_named_once(
    spec: PlatformSpec, base: ObservedState
) -> None:
    # The Web macro is two rules to Proxmox (80 and 443): both open zpack-db, one finding.
    db = "firewall/guest/zpack-db"
    web = {"type": "in", "action": "ACCEPT", "macro": "Web", "source": "10.20.0.0/24", "enable": 1}
    [d] = check_observed(spec, edit(base, db, rules=[*rules(base, db), web]))
    assert (d.code, d.address, d.path) == ("live-isolation", db, "rules[2]")
    assert "can reach control guest 'zpack-db' through" in d.message


def test_objects_the_controller_does_not_own_are_named_as_such(
    spec: PlatformSpec, base: ObservedState
) -> None:
    # The cluster options unmanaged (no firewall.cluster in the spec) and switched off by hand;
    # a hand-made group, not ours, that a managed guest's rule was pointed at.
    cluster = ObservedResource(
        kind=Kind.FIREWALL_CLUSTER,
        id={"name": "cluster"},
        attributes={"name": "cluster", "enable": 0, "policy_in": "DROP", "policy_out": "ACCEPT"},
    )
    debug = ObservedResource(
        kind=Kind.FIREWALL_GROUP,
        id={"name": "debug"},
        attributes={"name": "debug", "comment": "by hand", "rules": [OPEN_AGENT]},
    )
    kept = [r for r in base.resources if r.kind is not Kind.FIREWALL_CLUSTER]
    state = base.model_copy(update={"resources": (*kept, cluster)})
    off = check_observed(spec, state)
    assert {(d.address, d.path) for d in off} == {("firewall/cluster (not owned)", "enable")}
    assert all("the controller does not own firewall/cluster: fix it" in d.message for d in off)

    lobby = "firewall/guest/mc-lobby"
    ref = {"type": "group", "action": "debug", "enable": 1}
    state = edit(base, lobby, rules=[ref, *rules(base, lobby)])
    state = state.model_copy(update={"resources": (*state.resources, debug)})
    [d] = check_observed(spec, state, [lobby])
    assert (d.address, d.path) == ("firewall/group/debug (not owned)", "rules[0]")
    assert "(in group 'debug', used by firewall/guest/mc-lobby rules[0])" in d.message
    assert d.message.endswith("this plan corrects firewall/guest/mc-lobby")


def test_nothing_is_said_when_the_firewall_was_not_observed(
    spec: PlatformSpec, base: ObservedState
) -> None:
    state = edit(base, "firewall/cluster", enable=0).model_copy(update={"kinds": (Kind.GUEST,)})
    assert check_observed(spec, state) == []


def test_the_plan_carries_the_findings_as_warnings_and_stays_applyable(
    spec: PlatformSpec, graph: DesiredGraph, base: ObservedState
) -> None:
    state = edit(base, "firewall/guest/mc-survival", enable=0)
    plan = make_plan(graph, state, observed_checks=[live_isolation(spec)])
    assert plan.applyable and not plan.errored
    assert [(d.code, d.address) for d in plan.diagnostics] == [
        ("live-agent-port", "firewall/guest/mc-survival")
    ]
    assert "this plan corrects firewall/guest/mc-survival" in plan.diagnostics[0].message
