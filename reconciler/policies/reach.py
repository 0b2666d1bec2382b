"""The isolation and agent-port policies: who can reach a guest through its firewall.

Both rules run on a `Firewalls`: the spec's (`spec_firewall`, for `reconciler.loading.policies`,
which reports errors at file:line) or the live one (`live_firewall`, for
`reconciler.planning.observed_policies`, which reports plan warnings). Both return a `Reach`:

- `problems`: the policy's own settings are wrong (a layer or guest that is not defined, an
  exception port that does not parse, an allowed source without a static address). They are
  spec errors; the live side ignores them, since a spec with errors is never planned.
- `openings`: one per place that lets in traffic the policy forbids (a rule, a default policy
  of ACCEPT, a firewall switch that is off), with every guest it opens. Places are told apart
  the way the input says (`same`): the spec merges places written at one file position, since
  a rule inherited from a profile or a security group is written once but applies to many
  guests.

The wording of an opening is the adapters': the spec names the rule as written, the live plan
the object to fix and whether this plan heals it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from reconciler.model.spec import AgentPortPolicy, IsolationPolicy, PlatformSpec
from reconciler.policies.findings import Finding, Path, Place, ip_text, unknown_layers
from reconciler.policies.inbound import Firewalls, Inbound, Origin, Void
from reconciler.policies.reachability import (
    ALL,
    Address,
    Admission,
    Network,
    Ports,
    Traffic,
    admissions,
    contains,
    parse_ports,
    ports_within,
    subtract,
)

SamePlace = Callable[[Place], Hashable]


def _itself(place: Place) -> Hashable:
    return place


@dataclass
class Opening:
    """One place that opens guests to traffic a policy forbids, and every guest it opens.

    A void (a switch that is off) has a `reason` and no `admission`; a rule or a default policy
    has the first `admission` found there. `sources` are the isolation's senders that get in
    (guest -> its addresses, for messages); `outside` the agent port's addresses admitted beyond
    the allowed sources; `vias` the security group references the rule came in through.
    """

    place: Place
    reason: str = ""
    targets: list[str] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)
    admission: Admission[Origin] | None = None
    outside: list[Network] = field(default_factory=list)
    vias: list[Place] = field(default_factory=list)


@dataclass
class Reach:
    """What one reach rule found: problems with its settings, the openings, each opened guest's
    layer, and (agent port) the allowed sources as messages name them."""

    problems: list[Finding] = field(default_factory=list)
    openings: list[Opening] = field(default_factory=list)
    layers: dict[str, str] = field(default_factory=dict)
    allowed: list[str] = field(default_factory=list)

    @property
    def only(self) -> str:
        return ", ".join(self.allowed) or "no guest"


class _Openings:
    """Openings keyed by the place they point at, as the input tells places apart."""

    def __init__(self, same: SamePlace) -> None:
        self.same = same
        self.items: dict[tuple[str, Hashable], Opening] = {}

    def _at(self, place: Place, kind: str, target: str) -> Opening:
        key = (kind, self.same(place))
        if key not in self.items:
            self.items[key] = Opening(place)
        found = self.items[key]
        if target not in found.targets:
            found.targets.append(target)
        return found

    def void(self, void: Void, target: str) -> Opening:
        found = self._at(void.place, "void", target)
        found.reason = void.reason
        return found

    def admit(self, inbound: Inbound, adm: Admission[Origin], target: str) -> Opening:
        if adm.rule is None:
            return self._at(inbound.policy_place, "rule", target)
        found = self._at(adm.rule.origin.blame, "rule", target)
        if adm.rule.via is not None:
            found.vias.append(adm.rule.via.at)
        return found


def _targets(fw: Firewalls, layers: Sequence[str], reach: Reach) -> Iterator[tuple[str, Inbound]]:
    """The guests of `layers` whose firewall is known, each with its inbound chain; each one's
    layer is noted in `reach`."""
    for target in fw.names():
        layer = fw.layer(target)
        inbound = fw.inbound(target) if layer in layers else None
        if layer is not None and inbound is not None:
            reach.layers[target] = layer
            yield target, inbound


# --- isolation -------------------------------------------------------------------------------


def check_isolation(spec: PlatformSpec, fw: Firewalls, same: SamePlace = _itself) -> Reach:
    """No firewall lets a guest of `from_layers` reach a guest of `to_layers`, beyond the
    declared exceptions."""
    reach = Reach()
    pol = spec.policies.isolation
    if pol is None or not pol.enabled:
        return reach
    at: Path = ("policies", "isolation")
    reach.problems += unknown_layers(spec.layers, pol.from_layers, (*at, "from_layers"))
    reach.problems += unknown_layers(spec.layers, pol.to_layers, (*at, "to_layers"))
    exceptions = _exceptions(spec, pol, reach.problems)
    senders = {g: fw.ips(g) for g in fw.names() if fw.layer(g) in pol.from_layers}
    openings = _Openings(same)
    for target, inbound in _targets(fw, pol.to_layers, reach):
        others = {s: ips for s, ips in senders.items() if s != target}
        _isolate(target, inbound, others, exceptions.get(target, []), openings)
    reach.openings = list(openings.items.values())
    return reach


def _exceptions(
    spec: PlatformSpec, pol: IsolationPolicy, problems: list[Finding]
) -> dict[str, list[Ports]]:
    """Guest -> the ports its isolation exceptions let in."""
    at: Path = ("policies", "isolation", "exceptions")
    allowed: dict[str, list[Ports]] = {}
    for i, exc in enumerate(pol.exceptions):
        if exc.to not in spec.guests:
            problems.append(
                Finding("unknown-reference", f"guest {exc.to!r} is not defined", (*at, i, "to"))
            )
            continue
        try:
            ports: Ports = ALL if exc.port is None else parse_ports(exc.port)
        except ValueError as e:
            problems.append(Finding("policy-isolation", f"exception port: {e}", (*at, i, "port")))
            continue
        allowed.setdefault(exc.to, []).append(ports)
    return allowed


def _isolate(
    target: str,
    inbound: Inbound,
    others: Mapping[str, list[Address]],
    exceptions: list[Ports],
    openings: _Openings,
) -> None:
    """Record where `inbound` lets one of `others` (the senders) reach `target`."""
    if inbound.void:
        if any(p is ALL for p in exceptions) or not others:
            return
        for void in inbound.void:
            found = openings.void(void, target)
            for s, ips in others.items():
                found.sources.setdefault(s, ip_text(ips))
        return
    for adm in admissions(inbound.chain, inbound.policy):
        admitted = {
            s: ip_text(ips)
            for s, ips in others.items()
            if any(contains(adm.addresses, ip) for ip in ips) or (not ips and adm.from_any)
        }
        rule_ports: Ports = adm.rule.ports if adm.rule is not None else ALL
        if not admitted or any(ports_within(rule_ports, p) for p in exceptions):
            continue
        found = openings.admit(inbound, adm, target)
        found.admission = found.admission or adm
        for s, text in admitted.items():
            found.sources.setdefault(s, text)


# --- agent port ------------------------------------------------------------------------------


def check_agent_port(spec: PlatformSpec, fw: Firewalls, same: SamePlace = _itself) -> Reach:
    """The agent port on guests of `layers` is reachable from the `allowed_sources` guests'
    addresses and from nowhere else."""
    reach = Reach()
    pol = spec.policies.agent_port
    if pol is None or not pol.enabled:
        return reach
    reach.problems += unknown_layers(spec.layers, pol.layers, ("policies", "agent_port", "layers"))
    allowed = _allowed_sources(spec, pol, fw, reach)
    traffic = Traffic("tcp", pol.port)
    openings = _Openings(same)
    for target, inbound in _targets(fw, pol.layers, reach):
        for void in inbound.void:
            openings.void(void, target)
        if inbound.void:
            continue
        for adm in admissions(inbound.chain, inbound.policy, traffic):
            outside = subtract(adm.addresses, allowed)
            if not outside:
                continue
            found = openings.admit(inbound, adm, target)
            if found.admission is None:
                found.admission, found.outside = adm, outside
    reach.openings = list(openings.items.values())
    return reach


def _allowed_sources(
    spec: PlatformSpec, pol: AgentPortPolicy, fw: Firewalls, reach: Reach
) -> list[Network]:
    """The allowed sources' addresses; each also named in `reach.allowed`."""
    at: Path = ("policies", "agent_port", "allowed_sources")
    nets: list[Network] = []
    for i, name in enumerate(pol.allowed_sources):
        if name not in spec.guests:
            reach.problems.append(
                Finding("unknown-reference", f"guest {name!r} is not defined", (*at, i))
            )
            continue
        ips = fw.ips(name)
        if not ips:
            reach.problems.append(
                Finding(
                    "policy-agent-port",
                    f"allowed source '{name}' has no static address, so no firewall rule can "
                    "admit it alone; give it a static ip",
                    (*at, i),
                )
            )
            continue
        nets.extend(ipaddress.ip_network(ip) for ip in ips)
        reach.allowed.append(f"{name} ({ip_text(ips)})")
    return nets
