"""The platform's isolation, checked on the firewall as it is live, not only as the spec says.

Called by the planner: the live `plan` and `apply` (`reconciler.cli.live`) pass
`live_isolation(spec)` to `make_plan(observed_checks=...)`.

The spec's `agent_port` and `isolation` policies prove that the spec isolates. This module runs
the same rules (`reconciler.policies.reach`) on what Proxmox has now
(`reconciler.policies.live_firewall`: the observed aliases, IP sets and security groups, the
cluster firewall switch, each managed guest's firewall options and rules, each NIC's `firewall`
flag and each guest's address as observed), and is their live-side adapter. A live rule, alias
or option that opens the agent port beyond the allowed sources, or lets a guest of
`from_layers` reach one of `to_layers` beyond the exceptions, and a switch that is off and so
voids every rule (cluster `enable`, guest `enable`, a NIC's `firewall=0`), is a WARNING naming
the live object (`live-agent-port`, `live-isolation`). The plan stays applyable, apply heals
what the controller owns, and the message says whether this plan does. Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Iterable

from reconciler.loading.sources import dotted
from reconciler.model.diagnostics import Diagnostic, warning
from reconciler.model.observed import ObservedState
from reconciler.model.resources import Kind
from reconciler.model.spec import PlatformSpec
from reconciler.planning.planner import ObservedCheck
from reconciler.policies.findings import fw_line, guests_phrase, senders_phrase
from reconciler.policies.inbound import Origin
from reconciler.policies.live_firewall import LiveFirewalls, label
from reconciler.policies.reach import Opening, Reach, check_agent_port, check_isolation
from reconciler.policies.reachability import Rule, format_addresses, format_ports


def live_isolation(spec: PlatformSpec) -> ObservedCheck:
    """The check to hand to `make_plan(observed_checks=...)`."""

    def check(observed: ObservedState, changing: frozenset[str]) -> list[Diagnostic]:
        return check_observed(spec, observed, changing)

    return check


def check_observed(
    spec: PlatformSpec, observed: ObservedState, changing: Iterable[str] = ()
) -> list[Diagnostic]:
    """Run the spec's agent_port and isolation policies on the observed firewall. `changing`:
    addresses the plan changes, to say which findings it heals."""
    kinds = observed.kinds
    if kinds is not None and Kind.FIREWALL_GUEST not in kinds:
        return []  # the firewall was not looked at: nothing to say
    live = _Warnings(spec, observed, frozenset(changing))
    # The rules' `problems` are the spec's own errors, reported when it loads; a spec with
    # errors is never planned, so there are none here.
    agent_port = check_agent_port(spec, live.firewalls)
    isolation = check_isolation(spec, live.firewalls)
    return [
        *(live.agent_port(agent_port, o) for o in agent_port.openings),
        *(live.isolation(o) for o in isolation.openings),
    ]


class _Warnings:
    """Words live openings as plan warnings that name the live object to fix."""

    def __init__(self, spec: PlatformSpec, observed: ObservedState, healing: frozenset[str]):
        self.spec = spec
        self.firewalls = LiveFirewalls(spec, observed)
        self.healing = healing

    def agent_port(self, reach: Reach, f: Opening) -> Diagnostic:
        assert self.spec.policies.agent_port is not None
        whom = guests_phrase("/".join(sorted({reach.layers[t] for t in f.targets})), f.targets)
        head = f"agent port {self.spec.policies.agent_port.port} on {whom} is open"
        field = dotted(f.place.path)
        if f.admission is None:
            what = field if field != "enable" else "enable=0"
            message = f"{head} to any source: {f.reason} ({f.place.address} {what})"
        elif f.admission.rule is None:
            message = (
                f"{head} to {format_addresses(f.outside)} through {f.place.address} policy_in "
                "ACCEPT, which lets in whatever no rule drops"
            )
        else:
            through = self._through(f.admission.rule)
            message = f"{head} to {format_addresses(f.outside)} through {through}"
        return self._warning("live-agent-port", f, f"{message}; only {reach.only} may reach it")

    def isolation(self, f: Opening) -> Diagnostic:
        assert self.spec.policies.isolation is not None
        from_layer = "/".join(self.spec.policies.isolation.from_layers)
        whom = guests_phrase("/".join(self.spec.policies.isolation.to_layers), f.targets)
        if f.admission is None:
            verb = "are" if len(f.targets) > 1 else "is"
            where = f"{f.place.address} {dotted(f.place.path)}"
            message = f"{whom} {verb} open to every {from_layer} guest: {f.reason} ({where})"
        else:
            rule = f.admission.rule
            if rule is None:
                through = f"{f.place.address} policy_in ACCEPT"
            else:
                through = f"{self._through(rule)} ({format_ports(rule.ports)})"
            message = (
                f"{senders_phrase(from_layer, f.sources)} can reach {whom} through {through}; "
                "no isolation exception covers it"
            )
        return self._warning("live-isolation", f, message)

    def _through(self, rule: Rule[Origin]) -> str:
        at = rule.origin.at
        text = f"rule {at.address} {dotted(at.path)} `{fw_line(rule.origin.fields)}`"
        if rule.via is not None:
            via = rule.via.at
            text += f" (in group '{rule.group}', used by {via.address} {dotted(via.path)})"
        named = [
            f"{label(r)} = {r.attributes.get('cidr') or ','.join(r.attributes.get('entries', []))}"
            for r in self.firewalls.source_objects(rule)
        ]
        if named:
            text += " with " + "; ".join(named)
        return text

    def _warning(self, code: str, f: Opening, message: str) -> Diagnostic:
        address = f.place.address
        return warning(
            code,
            "live: " + message + self._heals(f),
            path=dotted(f.place.path),
            address=address,
        )

    def _heals(self, f: Opening) -> str:
        """Whether this plan corrects the opening: it changes the object, the group reference
        that brings the rule in, or an alias or IP set the rule's source names."""
        involved = {f.place.address, *(via.address for via in f.vias)}
        if f.admission is not None and f.admission.rule is not None:
            rule = f.admission.rule
            involved.update(r.address for r in self.firewalls.source_objects(rule) if r.address)
        fixing = sorted(involved & self.healing)
        if fixing:
            return f"; this plan corrects {', '.join(fixing)}"
        if "(not owned)" in f.place.address:
            owner = f.place.address.removesuffix(" (not owned)")
            return f"; the controller does not own {owner}: fix it"
        return ""
