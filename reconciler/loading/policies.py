"""Design-rule policies on the spec: the rules of `reconciler.policies`, reported at file:line.

Called by the loader (`reconciler.loading.loader.load_texts`) after the structural checks of
`checks`, on a spec that validated. Each policy present with `enabled: true` runs; a policy left
out is off (capacity, which every platform gets, lives in `checks`). Every problem is an error
diagnostic with a stable code `policy-<name>` and the file:line of the exact field to change.

The rules live in `reconciler.policies` and find problems at spec paths; this module is their
spec-side adapter: it feeds them the spec's firewall (`policies.spec_firewall`), words the
isolation and agent-port openings with the rules as written, and places every finding at its
file:line through the `Source`. The same rules run on the live firewall in
`reconciler.planning.observed_policies`.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator

from reconciler.loading.sources import Source, dotted
from reconciler.model.diagnostics import Diagnostic, error
from reconciler.model.spec import PlatformSpec
from reconciler.policies.design import DESIGN_RULES
from reconciler.policies.findings import (
    Finding,
    Place,
    fw_line,
    guests_phrase,
    senders_phrase,
)
from reconciler.policies.inbound import Origin
from reconciler.policies.reach import Opening, Reach, check_agent_port, check_isolation
from reconciler.policies.reachability import ANY, Rule, format_addresses, format_ports
from reconciler.policies.spec_firewall import SpecFirewalls


def run_all(spec: PlatformSpec, source: Source) -> Iterator[Diagnostic]:
    """Every enabled policy's findings, as error diagnostics at their file:line."""

    def same(place: Place) -> Hashable:
        # One finding per place as written: a rule inherited from a profile or a security group
        # applies to many guests but stands at one file position.
        pos = source.where(place.path)
        return pos if pos is not None else place.path

    firewalls = SpecFirewalls(spec)
    isolation = check_isolation(spec, firewalls, same)
    agent_port = check_agent_port(spec, firewalls, same)
    findings = [
        *(f for rule in DESIGN_RULES for f in rule(spec)),
        *isolation.problems,
        *(_isolation_finding(spec, o) for o in isolation.openings),
        *agent_port.problems,
        *(_agent_port_finding(spec, agent_port, o) for o in agent_port.openings),
    ]
    for f in findings:
        related = (source.where(p) for p in f.related)
        yield error(
            f.code,
            f.message,
            position=source.where(f.path, key=False),
            path=dotted(f.path),
            address=f.address,
            related=tuple(dict.fromkeys(p for p in related if p is not None)),
        )


def _opened(code: str, opening: Opening, message: str) -> Finding:
    return Finding(
        code,
        message,
        opening.place.path,
        address=f"guest/{opening.targets[0]}",
        related=tuple(via.path for via in opening.vias),
    )


def _rule_phrase(rule: Rule[Origin]) -> str:
    where = f" of security group '{rule.group}'" if rule.group else ""
    return f"rule `{fw_line(rule.origin.fields)}`{where}"


def _isolation_finding(spec: PlatformSpec, f: Opening) -> Finding:
    assert spec.policies.isolation is not None
    from_layer = "/".join(spec.policies.isolation.from_layers)
    whom = guests_phrase("/".join(spec.policies.isolation.to_layers), f.targets)
    if f.admission is None:
        verb = "is" if len(f.targets) == 1 else "are"
        message = f"{whom} {verb} open to every {from_layer} guest: {f.reason}"
    elif f.admission.rule is None:
        message = (
            f"{senders_phrase(from_layer, f.sources)} can reach {whom} through policy_in "
            "ACCEPT, which lets in whatever no rule drops"
        )
    else:
        rule = f.admission.rule
        message = (
            f"{senders_phrase(from_layer, f.sources)} can reach {whom} through "
            f"{_rule_phrase(rule)} ({format_ports(rule.ports)}); no isolation exception covers it"
        )
    return _opened("policy-isolation", f, message)


def _agent_port_finding(spec: PlatformSpec, reach: Reach, f: Opening) -> Finding:
    assert spec.policies.agent_port is not None
    whom = guests_phrase("/".join(sorted({reach.layers[t] for t in f.targets})), f.targets)
    head = f"agent port {spec.policies.agent_port.port} on {whom}"
    only = reach.only
    found = f.admission
    if found is None:
        message = f"{head} is open to any source: {f.reason}; only {only} may reach it"
    elif found.rule is None:
        message = (
            f"{head} is open to {format_addresses(f.outside)} through policy_in "
            f"ACCEPT, which lets in whatever no rule drops; only {only} may reach it"
        )
    elif found.rule.source is ANY:
        message = (
            f"{head} is open to any source through {_rule_phrase(found.rule)}; "
            f"only {only} may reach it"
        )
    else:
        written = found.rule.origin.fields.get("source")
        message = (
            f"{head} is open to '{written}' ({format_addresses(found.addresses)}), "
            f"wider than {only}, through {_rule_phrase(found.rule)}"
        )
    return _opened("policy-agent-port", f, message)
