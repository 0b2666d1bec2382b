"""Design-rule policies: the checks a platform opts into in its spec's `policies` section.

Called by the loader (`reconciler.loading.loader.load_texts`) after the structural checks of
`checks`, on a spec that validated. Each policy present with `enabled: true` runs; a policy left
out is off (capacity, which every platform gets, lives in `checks`). Every problem is an error
diagnostic with a stable code `policy-<name>` and the file:line of the exact field to change.

The checks never stop at the first problem and never crash on a half-valid spec: a reference
that does not resolve is skipped here, because `checks` already reports it. The firewall
policies (isolation, agent port) translate spec rules into the neutral values of
`reconciler.model.reachability` and let it decide who can reach whom, so the same evaluation can
later run against the firewall observed on Proxmox.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from reconciler.loading.checks import guest_edges
from reconciler.loading.sources import PathT, Source, dotted
from reconciler.model.diagnostics import Diagnostic, Position, error
from reconciler.model.reachability import (
    ALL,
    ANY,
    AddressBook,
    Admission,
    Compiled,
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
from reconciler.model.spec import FirewallRule, GuestSpec, PlatformSpec

Check = Callable[[PlatformSpec, Source], Iterator[Diagnostic]]
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _err(
    source: Source,
    code: str,
    message: str,
    path: PathT,
    *,
    key: bool = False,
    address: str = "",
    related: Iterable[Position | None] = (),
) -> Diagnostic:
    return error(
        code,
        message,
        position=source.where(path, key=key),
        path=dotted(path),
        address=address,
        related=tuple(dict.fromkeys(p for p in related if p is not None)),
    )


# --- small helpers -------------------------------------------------------------------------


def _layer(spec: PlatformSpec, guest: str) -> str | None:
    """The guest's layer, or None when the guest or its role does not resolve."""
    g = spec.guests.get(guest)
    if g is None or g.role not in spec.ranges:
        return None
    return spec.ranges[g.role].layer


def _quoted(names: Sequence[str], *, limit: int = 3) -> str:
    """'a', 'b', 'c' and 4 more."""
    shown = ", ".join(f"'{n}'" for n in names[:limit])
    more = len(names) - limit
    return f"{shown} and {more} more" if more > 0 else shown


def _guests_phrase(layer: str, names: Sequence[str]) -> str:
    if len(names) == 1:
        return f"{layer} guest '{names[0]}'"
    return f"{layer} guests {_quoted(names)}"


def _static_ips(guest: GuestSpec) -> list[Address]:
    # `dhcp` and `manual` NICs have no address the spec knows.
    return [ipaddress.ip_interface(nic.ip).ip for nic in guest.network if "/" in nic.ip]


def _unknown_layers(
    spec: PlatformSpec, source: Source, names: Sequence[str], path: PathT
) -> Iterator[Diagnostic]:
    for i, name in enumerate(names):
        if name not in spec.layers:
            yield _err(source, "unknown-reference", f"layer {name!r} is not defined", (*path, i))


def _enabled(policy: object) -> bool:
    return policy is not None and bool(getattr(policy, "enabled", False))


# --- 1. layer dependencies -----------------------------------------------------------------


@dataclass(frozen=True)
class _Hop:
    to: str
    path: PathT
    how: str


def check_layer_dependencies(spec: PlatformSpec, source: Source) -> Iterator[Diagnostic]:
    """Everything a guest depends on, directly or through other guests, lies in its own layer or
    in one its layer's `may_depend_on` names. Reported once per edge that leaves the allowed
    layers, naming every guest for which it does."""
    if not _enabled(spec.policies.layer_dependencies):
        return
    out_edges: dict[str, list[_Hop]] = {}
    for frm, to, path, how in guest_edges(spec):
        if frm in spec.guests and to in spec.guests:
            out_edges.setdefault(frm, []).append(_Hop(to, path, how))

    # edge path -> [(origin guest, hops from the origin up to and including this edge)]
    leaving: dict[PathT, list[tuple[str, list[_Hop]]]] = {}
    for origin in spec.guests:
        layer = _layer(spec, origin)
        if layer is None or layer not in spec.layers:
            continue
        allowed = {layer, *spec.layers[layer].may_depend_on}
        # Breadth first, so each chain shown is a shortest one.
        seen = {origin}
        queue: list[tuple[str, list[_Hop]]] = [(origin, [])]
        while queue:
            node, hops = queue.pop(0)
            for hop in out_edges.get(node, ()):
                to_layer = _layer(spec, hop.to)
                if to_layer is None:
                    continue
                if to_layer not in allowed:
                    # Stop here: the first step outside is the one to fix; what lies beyond it
                    # would only repeat the same mistake.
                    leaving.setdefault(hop.path, []).append((origin, [*hops, hop]))
                elif hop.to not in seen:
                    seen.add(hop.to)
                    queue.append((hop.to, [*hops, hop]))

    for path, found in leaving.items():
        found.sort(key=lambda item: (len(item[1]), item[0]))
        origin, hops = found[0]
        yield _err(
            source,
            "policy-layer-dependencies",
            _dependency_message(spec, origin, hops, found[1:]),
            path,
            address=f"guest/{origin}",
            related=[source.where(hops[0].path)] if len(hops) > 1 else [],
        )


def _through(hops: Sequence[_Hop]) -> str:
    if len(hops) == 1:
        return hops[0].how
    return " -> ".join(h.to for h in hops) + f" ({hops[-1].how})"


def _dependency_message(
    spec: PlatformSpec, origin: str, hops: list[_Hop], others: list[tuple[str, list[_Hop]]]
) -> str:
    layer = _layer(spec, origin) or "?"
    target = hops[-1].to
    allowed = [layer, *(d for d in spec.layers[layer].may_depend_on if d != layer)]
    text = (
        f"{layer} guest '{origin}' depends on {_layer(spec, target)} guest '{target}' through "
        f"{_through(hops)}; {layer} guests may depend only on {', '.join(allowed)} guests"
    )
    if others:
        shown = "; ".join(f"'{o}' through {_through(h)}" for o, h in others[:3])
        more = len(others) - 3
        text += f". Also reached from {shown}" + (f" and {more} more" if more > 0 else "")
    return text


# --- 2. placement --------------------------------------------------------------------------


def check_placement(spec: PlatformSpec, source: Source) -> Iterator[Diagnostic]:
    """A guest sits on a host that serves its layer."""
    if not _enabled(spec.policies.placement):
        return
    for gname, guest in spec.guests.items():
        layer = _layer(spec, gname)
        host = spec.hosts.get(guest.host)
        if layer is None or host is None or layer in host.layers:
            continue
        yield _err(
            source,
            "policy-placement",
            f"{layer} guest '{gname}' is placed on host '{guest.host}', which serves only "
            f"{', '.join(host.layers)}",
            ("guests", gname, "host"),
            address=f"guest/{gname}",
        )


# --- firewall: spec -> neutral rules ---------------------------------------------------------


@dataclass(frozen=True)
class _Origin:
    """Where a rule was written: its path in the spec and the rule as written."""

    path: PathT
    rule: FirewallRule


@dataclass(frozen=True)
class _Inbound:
    """What decides inbound traffic to one guest, or why nothing does."""

    guest: str
    void: tuple[tuple[PathT, str], ...]  # (field that switches filtering off, why)
    policy: str
    policy_path: PathT
    chain: tuple[Rule[_Origin], ...]


class _Firewall:
    """The spec's firewall, compiled once for all guests a policy looks at."""

    def __init__(self, spec: PlatformSpec) -> None:
        self.spec = spec
        fw = spec.firewall
        self.book = AddressBook(
            aliases={name: alias.cidr for name, alias in fw.aliases.items()},
            ipsets={name: ipset.entries for name, ipset in fw.ipsets.items()},
        )
        self.groups: dict[str, list[Rule[_Origin]]] = {}
        for gname, group in fw.groups.items():
            rules: list[Rule[_Origin]] = []
            for i, rule in enumerate(group.rules):
                if rule.type != "group":  # Proxmox does not nest security groups
                    rules.extend(self._compile(("firewall", "groups", gname, "rules", i), rule))
            self.groups[gname] = rules

    def _compile(self, path: PathT, rule: FirewallRule) -> tuple[Rule[_Origin], ...]:
        compiled: Compiled[_Origin] = compile_rule(
            _Origin(path, rule),
            direction=rule.type,
            action=rule.action,
            book=self.book,
            source=rule.source,
            dest=rule.dest,
            proto=rule.proto,
            dport=rule.dport,
            sport=rule.sport,
            macro=rule.macro,
            iface=rule.iface,
            enabled=rule.enable,
        )
        return compiled.rules  # unknown names are reported by checks.check_references

    def inbound(self, gname: str) -> _Inbound:
        guest = self.spec.guests[gname]
        at: PathT = ("guests", gname)
        void: list[tuple[PathT, str]] = []
        cluster = self.spec.firewall.cluster
        # Proxmox filters a guest's traffic only when the cluster firewall, the guest's firewall
        # and the NIC's firewall flag are all on; any one off voids every rule.
        if cluster is not None and not cluster.enable:
            void.append((("firewall", "cluster", "enable"), "the cluster firewall is disabled"))
        fw = guest.firewall
        if fw is None:
            void.append((at, "it has no firewall section, so Proxmox filters nothing"))
            return _Inbound(gname, tuple(void), "ACCEPT", at, ())
        if not fw.enable:
            void.append(((*at, "firewall", "enable"), "its firewall is disabled"))
        for i, nic in enumerate(guest.network):
            if not nic.firewall:
                void.append(
                    (
                        (*at, "network", i, "firewall"),
                        f"interface {nic.name} has firewall: false, so no rule applies",
                    )
                )
        entries: list[Rule[_Origin] | GroupRef[_Origin]] = []
        for i, rule in enumerate(fw.rules):
            path: PathT = (*at, "firewall", "rules", i)
            if rule.type == "group":
                entries.append(
                    GroupRef(origin=_Origin(path, rule), name=rule.action, enabled=rule.enable)
                )
            else:
                entries.extend(self._compile(path, rule))
        chain = expand_groups(entries, self.groups)
        return _Inbound(
            gname, tuple(void), fw.policy_in, (*at, "firewall", "policy_in"), tuple(chain)
        )


def _fw_line(rule: FirewallRule) -> str:
    """The rule as Proxmox's .fw files spell it: `IN ACCEPT -source api -p tcp -dport 18888`."""
    action = f"{rule.macro}({rule.action})" if rule.macro else rule.action
    parts = [rule.type.upper(), action]
    for flag, value in (
        ("-i", rule.iface),
        ("-source", rule.source),
        ("-dest", rule.dest),
        ("-p", rule.proto),
        ("-dport", rule.dport),
        ("-sport", rule.sport),
    ):
        if value:
            parts += [flag, value]
    return " ".join(parts)


def _rule_phrase(rule: Rule[_Origin]) -> str:
    where = f" of security group '{rule.group}'" if rule.group else ""
    return f"rule `{_fw_line(rule.origin.rule)}`{where}"


def _admission_path(inbound: _Inbound, adm: Admission[_Origin]) -> PathT:
    # Point at the rule's source when it has one (that is what to narrow), else at the rule.
    if adm.rule is None:
        return inbound.policy_path
    return (*adm.rule.origin.path, "source")


@dataclass
class _Finding:
    """One offending place in the spec and every guest it affects."""

    path: PathT
    targets: list[str] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)  # guest -> its address, for messages
    related: list[Position | None] = field(default_factory=list)
    admission: Admission[_Origin] | None = None
    reason: str = ""
    outside: list[Network] = field(default_factory=list)

    def add_target(self, guest: str) -> None:
        if guest not in self.targets:
            self.targets.append(guest)


class _Findings:
    """Findings keyed by the position they will be reported at.

    A rule inherited from a profile or a security group is written once but applies to many
    guests; keying by position gives one diagnostic per rule as written, not one per guest.
    """

    def __init__(self, source: Source) -> None:
        self.source = source
        self.items: dict[object, _Finding] = {}

    def at(self, path: PathT, kind: str = "") -> _Finding:
        pos = self.source.where(path)
        key = (kind, pos if pos is not None else path)
        if key not in self.items:
            self.items[key] = _Finding(path)
        return self.items[key]


# --- 3. isolation --------------------------------------------------------------------------


def check_isolation(spec: PlatformSpec, source: Source) -> Iterator[Diagnostic]:
    """No firewall rule lets a guest of `from_layers` reach a guest of `to_layers`, beyond the
    declared exceptions."""
    pol = spec.policies.isolation
    if pol is None or not pol.enabled:
        return
    at: PathT = ("policies", "isolation")
    yield from _unknown_layers(spec, source, pol.from_layers, (*at, "from_layers"))
    yield from _unknown_layers(spec, source, pol.to_layers, (*at, "to_layers"))

    allowed: dict[str, list[Ports]] = {}
    for i, exc in enumerate(pol.exceptions):
        if exc.to not in spec.guests:
            yield _err(
                source,
                "unknown-reference",
                f"guest {exc.to!r} is not defined",
                (*at, "exceptions", i, "to"),
            )
            continue
        try:
            ports: Ports = ALL if exc.port is None else parse_ports(exc.port)
        except ValueError as e:
            yield _err(
                source, "policy-isolation", f"exception port: {e}", (*at, "exceptions", i, "port")
            )
            continue
        allowed.setdefault(exc.to, []).append(ports)

    from_layer = "/".join(pol.from_layers)
    to_layer = "/".join(pol.to_layers)
    senders = {
        g: _static_ips(spec.guests[g]) for g in spec.guests if _layer(spec, g) in pol.from_layers
    }
    targets = [g for g in spec.guests if _layer(spec, g) in pol.to_layers]
    firewall = _Firewall(spec)
    findings = _Findings(source)

    for target in targets:
        exceptions = allowed.get(target, [])
        inbound = firewall.inbound(target)
        others = {s: ips for s, ips in senders.items() if s != target}
        if inbound.void:
            if any(p is ALL for p in exceptions) or not others:
                continue
            for path, reason in inbound.void:
                f = findings.at(path, "void")
                f.add_target(target)
                f.reason = reason
                for s, ips in others.items():
                    f.sources.setdefault(s, _ip_text(ips))
            continue
        for adm in admissions(inbound.chain, inbound.policy):
            admitted = {
                s: _ip_text(ips)
                for s, ips in others.items()
                if any(contains(adm.addresses, ip) for ip in ips) or (not ips and adm.from_any)
            }
            if not admitted:
                continue
            rule_ports: Ports = adm.rule.ports if adm.rule is not None else ALL
            if any(ports_within(rule_ports, p) for p in exceptions):
                continue
            f = findings.at(_admission_path(inbound, adm), "rule")
            f.add_target(target)
            f.admission = f.admission or adm
            for s, text in admitted.items():
                f.sources.setdefault(s, text)
            if adm.rule is not None and adm.rule.via is not None:
                f.related.append(source.where(adm.rule.via.path))

    for f in findings.items.values():
        example, example_ip = next(iter(f.sources.items()))
        count = len(f.sources)
        who = (
            f"{from_layer} guest '{example}' ({example_ip})"
            if count == 1
            else f"{count} {from_layer} guests, e.g. '{example}' ({example_ip}),"
        )
        whom = _guests_phrase(to_layer, f.targets)
        if f.admission is None:
            message = (
                f"{whom} is open to every {from_layer} guest: {f.reason}"
                if len(f.targets) == 1
                else f"{whom} are open to every {from_layer} guest: {f.reason}"
            )
        elif f.admission.rule is None:
            message = (
                f"{who} can reach {whom} through policy_in ACCEPT, which lets in "
                f"whatever no rule drops"
            )
        else:
            rule = f.admission.rule
            message = (
                f"{who} can reach {whom} through {_rule_phrase(rule)} "
                f"({format_ports(rule.ports)}); no isolation exception covers it"
            )
        yield _err(
            source,
            "policy-isolation",
            message,
            f.path,
            address=f"guest/{f.targets[0]}",
            related=f.related,
        )


def _ip_text(ips: Sequence[Address]) -> str:
    return ", ".join(str(ip) for ip in ips) if ips else "dhcp"


# --- 4. agent port -------------------------------------------------------------------------


def check_agent_port(spec: PlatformSpec, source: Source) -> Iterator[Diagnostic]:
    """The agent port on guests of `layers` is reachable from the `allowed_sources` guests'
    addresses and from nowhere else."""
    pol = spec.policies.agent_port
    if pol is None or not pol.enabled:
        return
    at: PathT = ("policies", "agent_port")
    yield from _unknown_layers(spec, source, pol.layers, (*at, "layers"))
    allowed_nets: list[Network] = []
    allowed_text: list[str] = []
    for i, name in enumerate(pol.allowed_sources):
        guest = spec.guests.get(name)
        if guest is None:
            yield _err(
                source,
                "unknown-reference",
                f"guest {name!r} is not defined",
                (*at, "allowed_sources", i),
            )
            continue
        ips = _static_ips(guest)
        if not ips:
            yield _err(
                source,
                "policy-agent-port",
                f"allowed source '{name}' has no static address, so no firewall rule can "
                "admit it alone; give it a static ip",
                (*at, "allowed_sources", i),
            )
            continue
        allowed_nets.extend(ipaddress.ip_network(ip) for ip in ips)
        allowed_text.append(f"{name} ({_ip_text(ips)})")
    only = ", ".join(allowed_text) or "no guest"

    port = pol.port
    traffic = Traffic("tcp", port)
    firewall = _Firewall(spec)
    findings = _Findings(source)
    layer_of_target: dict[str, str] = {}
    for target in spec.guests:
        layer = _layer(spec, target)
        if layer is None or layer not in pol.layers:
            continue
        layer_of_target[target] = layer
        inbound = firewall.inbound(target)
        if inbound.void:
            for path, reason in inbound.void:
                f = findings.at(path, "void")
                f.add_target(target)
                f.reason = reason
            continue
        for adm in admissions(inbound.chain, inbound.policy, traffic):
            outside = subtract(adm.addresses, allowed_nets)
            if not outside:
                continue
            f = findings.at(_admission_path(inbound, adm), "rule")
            f.add_target(target)
            if f.admission is None:
                f.admission, f.outside = adm, outside
            if adm.rule is not None and adm.rule.via is not None:
                f.related.append(source.where(adm.rule.via.path))

    for f in findings.items.values():
        layers = sorted({layer_of_target[t] for t in f.targets})
        whom = _guests_phrase("/".join(layers), f.targets)
        head = f"agent port {port} on {whom}"
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
            written = found.rule.origin.rule.source
            message = (
                f"{head} is open to '{written}' ({format_addresses(found.addresses)}), "
                f"wider than {only}, through {_rule_phrase(found.rule)}"
            )
        yield _err(
            source,
            "policy-agent-port",
            message,
            f.path,
            address=f"guest/{f.targets[0]}",
            related=f.related,
        )


# --- 5. traefik domains --------------------------------------------------------------------


def check_traefik_domains(spec: PlatformSpec, source: Source) -> Iterator[Diagnostic]:
    """One Traefik instance per traffic domain (`routes_to`), and each routes only into it."""
    if not _enabled(spec.policies.traefik_domains):
        return
    by_domain: dict[frozenset[str], str] = {}
    for iname, inst in spec.traefik.items():
        domain = frozenset(inst.routes_to)
        if domain in by_domain:
            yield _err(
                source,
                "policy-traefik-domains",
                f"Traefik instances '{by_domain[domain]}' and '{iname}' both serve the traffic "
                f"domain {', '.join(sorted(domain))}; keep one instance per domain",
                ("traefik", iname, "routes_to"),
            )
        else:
            by_domain[domain] = iname
        for rname, route in inst.routes.items():
            target = route.target.guest
            layer = _layer(spec, target)
            if layer is None or layer in inst.routes_to:
                continue
            yield _err(
                source,
                "policy-traefik-domains",
                f"route {iname}/{rname} sends traffic to {layer} guest '{target}', outside the "
                f"domain of Traefik instance '{iname}' ({', '.join(inst.routes_to)})",
                ("traefik", iname, "routes", rname, "target", "guest"),
                address=f"route/{iname}/{rname}",
            )


# --- 6. velocity host ----------------------------------------------------------------------


def check_velocity_host(spec: PlatformSpec, source: Source) -> Iterator[Diagnostic]:
    """Velocity runs on a host that serves `host_layer` (next to the servers it proxies)."""
    pol = spec.policies.velocity_host
    if pol is None or not pol.enabled:
        return
    if pol.host_layer not in spec.layers:
        yield _err(
            source,
            "unknown-reference",
            f"layer {pol.host_layer!r} is not defined",
            ("policies", "velocity_host", "host_layer"),
        )
        return
    if spec.velocity is None or spec.velocity.guest not in spec.guests:
        return
    vguest = spec.velocity.guest
    hname = spec.guests[vguest].host
    host = spec.hosts.get(hname)
    if host is None or pol.host_layer in host.layers:
        return
    yield _err(
        source,
        "policy-velocity-host",
        f"Velocity guest '{vguest}' is on host '{hname}', which does not serve the "
        f"{pol.host_layer} layer (it serves {', '.join(host.layers)})",
        ("guests", vguest, "host"),
        address=f"guest/{vguest}",
    )


# --- 7. vmid ranges ------------------------------------------------------------------------


def check_vmid_ranges(spec: PlatformSpec, source: Source) -> Iterator[Diagnostic]:
    """Every explicit vmid lies in its role's range, and no two ranges overlap."""
    if not _enabled(spec.policies.vmid_ranges):
        return
    for gname, guest in spec.guests.items():
        rng = spec.ranges.get(guest.role)
        if guest.vmid is None or rng is None or guest.vmid in rng:
            continue
        yield _err(
            source,
            "policy-vmid-ranges",
            f"guest '{gname}' has vmid {guest.vmid}, outside its role {guest.role}'s range "
            f"{_span(rng.first, rng.last)}",
            ("guests", gname, "vmid"),
            address=f"guest/{gname}",
        )
    ranges = list(spec.ranges.items())
    for j, (later, b) in enumerate(ranges):
        for earlier, a in ranges[:j]:
            if a.first <= b.last and b.first <= a.last:
                yield _err(
                    source,
                    "policy-vmid-ranges",
                    f"range '{later}' ({_span(b.first, b.last)}) overlaps range '{earlier}' "
                    f"({_span(a.first, a.last)})",
                    ("ranges", later, "first"),
                )


def _span(first: int, last: int) -> str:
    return f"{first}+" if last == 999_999_999 else f"{first}-{last}"


ALL_CHECKS: tuple[Check, ...] = (
    check_layer_dependencies,
    check_placement,
    check_isolation,
    check_agent_port,
    check_traefik_domains,
    check_velocity_host,
    check_vmid_ranges,
)


def run_all(spec: PlatformSpec, source: Source) -> Iterator[Diagnostic]:
    for check in ALL_CHECKS:
        yield from check(spec, source)
