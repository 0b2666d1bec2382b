"""One rule, two inputs: the isolation and agent-port rules find the same openings on the spec's
firewall and on the live firewall converged from it, each pointing at its own kind of place."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from reconciler.loading.graph import build_graph
from reconciler.loading.loader import LoadResult
from reconciler.model.spec import FirewallRule, PlatformSpec
from reconciler.planning.planner import converged_state
from reconciler.policies.findings import Place
from reconciler.policies.inbound import Firewalls
from reconciler.policies.live_firewall import LiveFirewalls
from reconciler.policies.reach import Reach, check_agent_port, check_isolation
from reconciler.policies.spec_firewall import SpecFirewalls

Edit = Callable[[PlatformSpec], PlatformSpec]


def with_guest_firewall(guest: str, **update: object) -> Edit:
    def edit(spec: PlatformSpec) -> PlatformSpec:
        g = spec.guests[guest]
        assert g.firewall is not None
        firewall = g.firewall.model_copy(update=update)
        guests = {**spec.guests, guest: g.model_copy(update={"firewall": firewall})}
        return spec.model_copy(update={"guests": guests})

    return edit


def with_rule_first(guest: str, **rule: str) -> Edit:
    def edit(spec: PlatformSpec) -> PlatformSpec:
        fw = spec.guests[guest].firewall
        assert fw is not None
        return with_guest_firewall(guest, rules=(FirewallRule(**rule), *fw.rules))(spec)

    return edit


def with_alias(name: str, cidr: str) -> Edit:
    def edit(spec: PlatformSpec) -> PlatformSpec:
        aliases = {**spec.firewall.aliases}
        aliases[name] = aliases[name].model_copy(update={"cidr": cidr})
        firewall = spec.firewall.model_copy(update={"aliases": aliases})
        return spec.model_copy(update={"firewall": firewall})

    return edit


def opened(reach: Reach) -> list[tuple[str, list[str]]]:
    """Each opening as (void, default policy or rule; the guests it opens), input-neutral."""
    out = []
    for o in reach.openings:
        kind = "void" if o.admission is None else "policy" if o.admission.rule is None else "rule"
        out.append((kind, sorted(o.targets)))
    return sorted(out)


@pytest.mark.parametrize(
    ("edit", "agent_port", "isolation"),
    [
        pytest.param(lambda s: s, [], [], id="as-written"),
        pytest.param(
            with_guest_firewall("mc-lobby", enable=False),
            [("void", ["mc-lobby"])],
            [],
            id="firewall-off",
        ),
        pytest.param(
            with_guest_firewall("mc-survival", policy_in="ACCEPT"),
            [("policy", ["mc-survival"])],
            [],
            id="policy-accept",
        ),
        pytest.param(
            with_rule_first("mc-lobby", type="in", action="ACCEPT", proto="tcp", dport="18888"),
            [("rule", ["mc-lobby"])],
            [],
            id="agent-port-open",
        ),
        pytest.param(
            with_rule_first("zpack-db", type="in", action="ACCEPT", source="10.20.0.0/24"),
            [],
            [("rule", ["zpack-db"])],
            id="control-open-to-runtime",
        ),
    ],
)
def test_the_spec_and_the_live_firewall_open_the_same_guests(
    example: LoadResult,
    edit: Edit,
    agent_port: list[tuple[str, list[str]]],
    isolation: list[tuple[str, list[str]]],
) -> None:
    assert example.spec is not None
    spec = edit(example.spec)
    live = converged_state(build_graph(spec, example.source))
    inputs: list[Firewalls] = [SpecFirewalls(spec), LiveFirewalls(spec, live)]
    for fw in inputs:
        assert opened(check_agent_port(spec, fw)) == agent_port, type(fw).__name__
        assert opened(check_isolation(spec, fw)) == isolation, type(fw).__name__


def test_a_widened_alias_opens_every_guest_of_the_group_once(example: LoadResult) -> None:
    assert example.spec is not None
    spec = with_alias("api", "0.0.0.0/0")(example.spec)
    live = converged_state(build_graph(spec, example.source))
    on_spec = check_agent_port(spec, SpecFirewalls(spec))
    on_live = check_agent_port(spec, LiveFirewalls(spec, live))
    # One opening for the security group's rule, however many guests use the group.
    [spec_opening] = on_spec.openings
    [live_opening] = on_live.openings
    assert sorted(spec_opening.targets) == sorted(live_opening.targets)
    assert len(spec_opening.targets) > 1
    # Each input points where its adapter reports: the rule's source in the spec, the live rule.
    assert spec_opening.place == Place(("firewall", "groups", "agent", "rules", 0, "source"))
    assert live_opening.place == Place(("rules", 0), "firewall/group/agent")


def test_a_policy_with_unknown_names_reports_them_as_problems(example: LoadResult) -> None:
    assert example.spec is not None
    pol = example.spec.policies.agent_port
    assert pol is not None
    policies = example.spec.policies.model_copy(
        update={
            "agent_port": pol.model_copy(
                update={"layers": ("nowhere",), "allowed_sources": ("ghost",)}
            )
        }
    )
    spec = example.spec.model_copy(update={"policies": policies})
    reach = check_agent_port(spec, SpecFirewalls(spec))
    assert [(p.code, p.path) for p in reach.problems] == [
        ("unknown-reference", ("policies", "agent_port", "layers", 0)),
        ("unknown-reference", ("policies", "agent_port", "allowed_sources", 0)),
    ]
    assert reach.only == "no guest"
