"""The platform's isolation, checked on the firewall as it is live, not only as the spec says.

Called by the planner: the live `plan` and `apply` (`reconciler.cli.live`, through
`applying.live.converge`) pass `live_isolation(spec)` to `make_plan(observed_checks=...)`.

The spec's `agent_port` and `isolation` policies (`loading.policies`) prove that the spec
isolates. This module asks the same questions of what Proxmox has now, through the same
evaluator (`model.reachability`): the observed aliases, IP sets and security groups, the cluster
firewall switch, each managed guest's firewall options and rules, each NIC's `firewall` flag and
each guest's address as observed. A live rule, alias or option that opens the agent port beyond
the allowed sources, or lets a guest of `from_layers` reach one of `to_layers` beyond the
exceptions, and a switch that is off and so voids every rule (cluster `enable`, guest `enable`,
a NIC's `firewall=0`), is a WARNING naming the live object (`live-agent-port`,
`live-isolation`). The plan stays applyable, apply heals what the controller owns, and the
message says whether this plan does.

What is seen: the firewall of every guest the controller owns (only those are read: a
hand-made rule on a guest it does not own is not seen, and such a guest is not a target), and
every cluster-level object those rules refer to, owned or not. Sources are the owned guests'
observed addresses. Nothing here does I/O.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from reconciler.model.diagnostics import Diagnostic, warning
from reconciler.model.observed import ObservedResource, ObservedState
from reconciler.model.reachability import (
    ALL,
    AddressBook,
    Admission,
    GroupRef,
    Network,
    Ports,
    Rule,
    Traffic,
    admissions,
    compile_rule,
    contains,
    expand_groups,
    format_addresses,
    format_ports,
    parse_ports,
    ports_within,
    subtract,
)
from reconciler.model.resources import Kind
from reconciler.model.spec import PlatformSpec
from reconciler.model.units import parse_kv
from reconciler.planning.planner import ObservedCheck

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


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
    live = _Live(spec, observed)
    healing = frozenset(changing)
    return [*_agent_port(spec, live, healing), *_isolation(spec, live, healing)]


# --- the live firewall, in reachability's terms -----------------------------------------------


@dataclass(frozen=True)
class _Origin:
    """A live rule: the object holding it, its position, and the rule as Proxmox returns it."""

    address: str
    index: int
    rule: Mapping[str, Any]

    @property
    def where(self) -> str:
        return f"{self.address} rules[{self.index}]"


@dataclass(frozen=True)
class _Void:
    """A switch that is off: the object, the field, why every rule is void."""

    address: str
    path: str
    reason: str


@dataclass(frozen=True)
class _Inbound:
    void: tuple[_Void, ...]
    policy: str
    address: str
    chain: tuple[Rule[_Origin], ...]


def _name_of(r: ObservedResource) -> str:
    if r.address:
        return r.address.removeprefix(r.kind.value + "/")
    return str(r.attributes.get("name", r.id.get("name", "?")))


def _label(r: ObservedResource) -> str:
    """How a finding names a cluster-level object: its address, or that it is not ours."""
    if r.address:
        return r.address
    if r.kind is Kind.FIREWALL_CLUSTER:
        return f"{r.kind.value} (not owned)"
    return f"{r.kind.value}/{_name_of(r)} (not owned)"


class _Live:
    def __init__(self, spec: PlatformSpec, observed: ObservedState) -> None:
        self.spec = spec
        self.cluster: ObservedResource | None = None
        self.objects: dict[tuple[Kind, str], ObservedResource] = {}
        self.guests: dict[str, ObservedResource] = {}
        self.firewalls: dict[str, ObservedResource] = {}
        for r in observed.resources:
            if r.kind is Kind.FIREWALL_CLUSTER:
                self.cluster = r
            elif r.kind in (Kind.FIREWALL_ALIAS, Kind.FIREWALL_IPSET, Kind.FIREWALL_GROUP):
                self.objects[(r.kind, _name_of(r).lower())] = r
            elif r.owned and r.address and r.kind is Kind.GUEST:
                self.guests[_name_of(r)] = r
            elif r.owned and r.address and r.kind is Kind.FIREWALL_GUEST:
                self.firewalls[_name_of(r)] = r
        self.book = AddressBook(
            aliases={
                _name_of(r): str(r.attributes.get("cidr"))
                for (kind, _), r in self.objects.items()
                if kind is Kind.FIREWALL_ALIAS
            },
            ipsets={
                _name_of(r): tuple(r.attributes["entries"])
                for (kind, _), r in self.objects.items()
                if kind is Kind.FIREWALL_IPSET and "entries" in r.attributes
            },
        )
        self.groups: dict[str, list[Rule[_Origin]]] = {}
        for (kind, _), r in self.objects.items():
            if kind is Kind.FIREWALL_GROUP and "rules" in r.attributes:
                self.groups[_name_of(r)] = [
                    rule
                    for i, raw in enumerate(r.attributes["rules"])
                    if raw.get("type") != "group"
                    for rule in self._compile(_Origin(_label(r), i, raw))
                ]

    def _compile(self, origin: _Origin) -> tuple[Rule[_Origin], ...]:
        raw = origin.rule
        return compile_rule(
            origin,
            direction=str(raw.get("type", "in")),
            action=str(raw.get("action", "")),
            book=self.book,
            source=raw.get("source"),
            dest=raw.get("dest"),
            proto=raw.get("proto"),
            dport=None if raw.get("dport") is None else str(raw["dport"]),
            sport=None if raw.get("sport") is None else str(raw["sport"]),
            macro=raw.get("macro"),
            iface=raw.get("iface"),
            enabled=bool(int(raw.get("enable", 0))),
        ).rules

    def layer(self, name: str) -> str | None:
        guest = self.spec.guests.get(name)
        if guest is not None and guest.role in self.spec.ranges:
            return self.spec.ranges[guest.role].layer
        vmid = self.guests[name].id.get("vmid") if name in self.guests else None
        for rng in self.spec.ranges.values():
            if vmid in rng:
                return rng.layer
        return None

    def ips(self, name: str) -> list[Address]:
        """A guest's addresses as observed; the spec's when it is not live or its NICs carry
        none (a VM's address belongs to its OS, not to its netN)."""
        texts: list[str] = []
        if name in self.guests:
            nets = self.guests[name].attributes.get("net") or {}
            texts = [parse_kv(str(v)).get("ip", "") for _, v in sorted(nets.items())]
        if not any("/" in t for t in texts) and name in self.spec.guests:
            texts = [nic.ip for nic in self.spec.guests[name].network]
        return [ipaddress.ip_interface(t).ip for t in texts if "/" in t]

    def inbound(self, name: str) -> _Inbound | None:
        fw = self.firewalls.get(name)
        if fw is None or fw.address is None:
            return None  # not observed: nothing known
        void: list[_Void] = []
        if self.cluster is not None and not int(self.cluster.attributes.get("enable", 0)):
            void.append(_Void(_label(self.cluster), "enable", "the cluster firewall is off"))
        if not int(fw.attributes.get("enable", 0)):
            void.append(_Void(fw.address, "enable", "its firewall is off"))
        guest = self.guests[name]
        for key, value in sorted((guest.attributes.get("net") or {}).items()):
            if parse_kv(str(value)).get("firewall") != "1":
                void.append(
                    _Void(
                        guest.address or name,
                        f"net.{key}",
                        f"interface {key} has firewall=0, so no rule applies to it",
                    )
                )
        entries: list[Rule[_Origin] | GroupRef[_Origin]] = []
        for i, raw in enumerate(fw.attributes.get("rules") or ()):
            origin = _Origin(fw.address, i, raw)
            if raw.get("type") == "group":
                enabled = bool(int(raw.get("enable", 0)))
                entries.append(GroupRef(origin=origin, name=str(raw["action"]), enabled=enabled))
            else:
                entries.extend(self._compile(origin))
        chain = tuple(expand_groups(entries, self.groups))
        policy = str(fw.attributes.get("policy_in") or "DROP")
        return _Inbound(tuple(void), policy, fw.address, chain)

    def source_objects(self, rule: Rule[_Origin]) -> list[ObservedResource]:
        """The aliases and IP sets a rule's source names."""
        found: list[ObservedResource] = []
        for part in str(rule.origin.rule.get("source") or "").split(","):
            part = part.strip()
            kind = Kind.FIREWALL_IPSET if part.startswith("+") else Kind.FIREWALL_ALIAS
            name = part.removeprefix("+").removeprefix("dc/").lower()
            if (kind, name) in self.objects:
                found.append(self.objects[(kind, name)])
        return found


# --- findings ------------------------------------------------------------------------------


@dataclass
class _Finding:
    """One live object and field to blame, and every guest it opens."""

    address: str
    path: str
    targets: list[str] = field(default_factory=list)
    involved: set[str] = field(default_factory=set)  # addresses whose change heals it
    admission: Admission[_Origin] | None = None
    outside: list[Network] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)
    reason: str = ""
    policy_of: str = ""


class _Findings:
    def __init__(self) -> None:
        self.items: dict[tuple[str, str], _Finding] = {}

    def at(self, address: str, path: str) -> _Finding:
        key = (address, path)
        if key not in self.items:
            self.items[key] = _Finding(address, path, involved={address})
        return self.items[key]

    def blame(self, inbound: _Inbound, adm: Admission[_Origin], live: _Live) -> _Finding:
        if adm.rule is None:
            f = self.at(inbound.address, "policy_in")
            f.policy_of = inbound.address
            return f
        origin = adm.rule.origin
        f = self.at(origin.address, f"rules[{origin.index}]")
        if adm.rule.via is not None:
            f.involved.add(adm.rule.via.address)
        f.involved.update(r.address for r in live.source_objects(adm.rule) if r.address)
        return f


def _fw_line(raw: Mapping[str, Any]) -> str:
    """A live rule as Proxmox's .fw files spell it: `IN ACCEPT -source api -p tcp -dport 22`."""
    action = str(raw.get("action", "?"))
    if raw.get("macro"):
        action = f"{raw['macro']}({action})"
    parts = [str(raw.get("type", "?")).upper(), action]
    for flag, key in (
        ("-i", "iface"),
        ("-source", "source"),
        ("-dest", "dest"),
        ("-p", "proto"),
        ("-dport", "dport"),
        ("-sport", "sport"),
    ):
        if raw.get(key):
            parts += [flag, str(raw[key])]
    return " ".join(parts)


def _through(rule: Rule[_Origin], live: _Live) -> str:
    origin = rule.origin
    text = f"rule {origin.where} `{_fw_line(origin.rule)}`"
    if rule.via is not None:
        text += f" (in group '{rule.group}', used by {rule.via.where})"
    named = [
        f"{_label(r)} = {r.attributes.get('cidr') or ','.join(r.attributes.get('entries', []))}"
        for r in live.source_objects(rule)
    ]
    if named:
        text += " with " + "; ".join(named)
    return text


def _heals(f: _Finding, healing: frozenset[str]) -> str:
    fixing = sorted(f.involved & healing)
    if fixing:
        return f"; this plan corrects {', '.join(fixing)}"
    if "(not owned)" in f.address:
        return f"; the controller does not own {f.address.removesuffix(' (not owned)')}: fix it"
    return ""


def _guests(layer: str, names: Sequence[str]) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:3])
    more = len(names) - 3
    shown += f" and {more} more" if more > 0 else ""
    return f"{layer} guest{'s' if len(names) > 1 else ''} {shown}"


def _ip_text(ips: Sequence[Address]) -> str:
    return ", ".join(str(ip) for ip in ips) if ips else "dhcp"


def _live(code: str, f: _Finding, message: str, healing: frozenset[str]) -> Diagnostic:
    return warning(code, "live: " + message + _heals(f, healing), path=f.path, address=f.address)


# --- agent port ----------------------------------------------------------------------------


def _agent_port(spec: PlatformSpec, live: _Live, healing: frozenset[str]) -> list[Diagnostic]:
    pol = spec.policies.agent_port
    if pol is None or not pol.enabled:
        return []
    allowed: list[Network] = []
    texts: list[str] = []
    for name in pol.allowed_sources:
        ips = live.ips(name)
        allowed.extend(ipaddress.ip_network(ip) for ip in ips)
        texts.append(f"{name} ({_ip_text(ips)})")
    only = ", ".join(texts) or "no guest"
    traffic = Traffic("tcp", pol.port)
    findings = _Findings()
    layers: dict[str, str] = {}
    for name in sorted(live.guests):
        layer = live.layer(name)
        inbound = live.inbound(name)
        if layer not in pol.layers or inbound is None:
            continue
        layers[name] = layer
        if inbound.void:
            for v in inbound.void:
                f = findings.at(v.address, v.path)
                f.targets.append(name)
                f.reason = v.reason
            continue
        for adm in admissions(inbound.chain, inbound.policy, traffic):
            outside = subtract(adm.addresses, allowed)
            if not outside:
                continue
            f = findings.blame(inbound, adm, live)
            f.targets.append(name)
            if f.admission is None and not f.reason:
                f.admission, f.outside = adm, outside
            elif f.admission is None:
                f.outside = outside

    out: list[Diagnostic] = []
    for f in findings.items.values():
        whom = _guests("/".join(sorted({layers[t] for t in f.targets})), f.targets)
        head = f"agent port {pol.port} on {whom} is open"
        if f.admission is None:
            what = f"{f.address} {f.path}" if f.path != "enable" else f"{f.address} enable=0"
            message = f"{head} to any source: {f.reason} ({what})"
        elif f.admission.rule is None:
            message = (
                f"{head} to {format_addresses(f.outside)} through {f.policy_of} policy_in "
                "ACCEPT, which lets in whatever no rule drops"
            )
        else:
            through = _through(f.admission.rule, live)
            message = f"{head} to {format_addresses(f.outside)} through {through}"
        out.append(_live("live-agent-port", f, f"{message}; only {only} may reach it", healing))
    return out


# --- isolation -----------------------------------------------------------------------------


def _isolation(spec: PlatformSpec, live: _Live, healing: frozenset[str]) -> list[Diagnostic]:
    pol = spec.policies.isolation
    if pol is None or not pol.enabled:
        return []
    exceptions: dict[str, list[Ports]] = {}
    for exc in pol.exceptions:
        try:
            ports: Ports = ALL if exc.port is None else parse_ports(exc.port)
        except ValueError:
            continue  # the spec's own check reports it
        exceptions.setdefault(exc.to, []).append(ports)
    senders = {g: live.ips(g) for g in sorted(live.guests) if live.layer(g) in pol.from_layers}
    from_layer, to_layer = "/".join(pol.from_layers), "/".join(pol.to_layers)
    findings = _Findings()
    for target in sorted(live.guests):
        inbound = live.inbound(target)
        if live.layer(target) not in pol.to_layers or inbound is None:
            continue
        allowed = exceptions.get(target, [])
        others = {s: ips for s, ips in senders.items() if s != target}
        if inbound.void:
            if any(p is ALL for p in allowed) or not others:
                continue
            for v in inbound.void:
                f = findings.at(v.address, v.path)
                f.targets.append(target)
                f.reason = v.reason
            continue
        for adm in admissions(inbound.chain, inbound.policy):
            admitted = {
                s: _ip_text(ips)
                for s, ips in others.items()
                if any(contains(adm.addresses, ip) for ip in ips) or (not ips and adm.from_any)
            }
            rule_ports: Ports = adm.rule.ports if adm.rule is not None else ALL
            if not admitted or any(ports_within(rule_ports, p) for p in allowed):
                continue
            f = findings.blame(inbound, adm, live)
            f.targets.append(target)
            f.admission = f.admission or adm
            for s, text in admitted.items():
                f.sources.setdefault(s, text)

    out: list[Diagnostic] = []
    for f in findings.items.values():
        whom = _guests(to_layer, f.targets)
        if f.admission is None:
            verb = "are" if len(f.targets) > 1 else "is"
            message = (
                f"{whom} {verb} open to every {from_layer} guest: {f.reason} ({f.address} {f.path})"
            )
        else:
            example, ip = next(iter(f.sources.items()))
            who = (
                f"{from_layer} guest '{example}' ({ip})"
                if len(f.sources) == 1
                else f"{len(f.sources)} {from_layer} guests, e.g. '{example}' ({ip}),"
            )
            rule = f.admission.rule
            if rule is None:
                through = f"{f.policy_of} policy_in ACCEPT"
            else:
                through = f"{_through(rule, live)} ({format_ports(rule.ports)})"
            message = f"{who} can reach {whom} through {through}; no isolation exception covers it"
        out.append(_live("live-isolation", f, message, healing))
    return out
