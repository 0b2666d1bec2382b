"""The design rules only the spec answers: layer dependencies, placement, Traefik domains,
Velocity host and vmid ranges.

Called by `reconciler.loading.policies` on a spec that validated. Each rule runs when its policy
is present with `enabled: true`, and yields a `Finding` with a stable code `policy-<name>` at the
spec path of the field to change. A reference that does not resolve is skipped here, because
`loading.checks` already reports it. The firewall rules (isolation, agent port) live in
`reconciler.policies.reach`, since they also run on the live firewall.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from reconciler.model.spec import PlatformSpec
from reconciler.policies.findings import Finding, Path

Rule = Callable[[PlatformSpec], Iterator[Finding]]


def layer_of(spec: PlatformSpec, guest: str) -> str | None:
    """The guest's layer, or None when the guest or its role does not resolve."""
    g = spec.guests.get(guest)
    if g is None or g.role not in spec.ranges:
        return None
    return spec.ranges[g.role].layer


def _enabled(policy: object) -> bool:
    return policy is not None and bool(getattr(policy, "enabled", False))


def _about_guest(code: str, guest: str, field: str, message: str) -> Finding:
    """A finding about one guest's field: it points there and concerns the guest's address."""
    return Finding(code, message, ("guests", guest, field), address=f"guest/{guest}")


def guest_edges(spec: PlatformSpec) -> Iterator[tuple[str, str, Path, str]]:
    """Every dependency between guests: (from, to, where it is declared, how)."""
    for gname, guest in spec.guests.items():
        for i, dep in enumerate(guest.depends_on):
            yield gname, dep, ("guests", gname, "depends_on", i), "depends_on"
    for iname, inst in spec.traefik.items():
        for rname, route in inst.routes.items():
            yield (
                inst.guest,
                route.target.guest,
                ("traefik", iname, "routes", rname, "target", "guest"),
                f"route {iname}/{rname}",
            )
    if spec.velocity:
        for sname, server in spec.velocity.servers.items():
            yield (
                spec.velocity.guest,
                server.guest,
                ("velocity", "servers", sname, "guest"),
                f"velocity server {sname}",
            )


# --- layer dependencies ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Hop:
    to: str
    path: Path
    how: str


def check_layer_dependencies(spec: PlatformSpec) -> Iterator[Finding]:
    """Everything a guest depends on, directly or through other guests, lies in its own layer or
    in one its layer's `may_depend_on` names. Reported once per edge that leaves the allowed
    layers, naming every guest for which it does."""
    if not _enabled(spec.policies.layer_dependencies):
        return
    for path, found in _leaving_edges(spec).items():
        found.sort(key=lambda item: (len(item[1]), item[0]))
        origin, hops = found[0]
        yield Finding(
            "policy-layer-dependencies",
            _dependency_message(spec, origin, hops, found[1:]),
            path,
            address=f"guest/{origin}",
            related=(hops[0].path,) if len(hops) > 1 else (),
        )


def _leaving_edges(spec: PlatformSpec) -> dict[Path, list[tuple[str, list[_Hop]]]]:
    """Edge path -> [(origin guest, hops from the origin up to and including this edge)]."""
    out_edges: dict[str, list[_Hop]] = {}
    for frm, to, path, how in guest_edges(spec):
        if frm in spec.guests and to in spec.guests:
            out_edges.setdefault(frm, []).append(_Hop(to, path, how))
    leaving: dict[Path, list[tuple[str, list[_Hop]]]] = {}
    for origin in spec.guests:
        layer = layer_of(spec, origin)
        if layer is None or layer not in spec.layers:
            continue
        allowed = {layer, *spec.layers[layer].may_depend_on}
        # Breadth first, so each chain shown is a shortest one.
        seen = {origin}
        queue: list[tuple[str, list[_Hop]]] = [(origin, [])]
        while queue:
            node, hops = queue.pop(0)
            for hop in out_edges.get(node, ()):
                to_layer = layer_of(spec, hop.to)
                if to_layer is None:
                    continue
                if to_layer not in allowed:
                    # Stop here: the first step outside is the one to fix; what lies beyond it
                    # would only repeat the same mistake.
                    leaving.setdefault(hop.path, []).append((origin, [*hops, hop]))
                elif hop.to not in seen:
                    seen.add(hop.to)
                    queue.append((hop.to, [*hops, hop]))
    return leaving


def _through(hops: Sequence[_Hop]) -> str:
    if len(hops) == 1:
        return hops[0].how
    return " -> ".join(h.to for h in hops) + f" ({hops[-1].how})"


def _dependency_message(
    spec: PlatformSpec, origin: str, hops: list[_Hop], others: list[tuple[str, list[_Hop]]]
) -> str:
    layer = layer_of(spec, origin) or "?"
    target = hops[-1].to
    allowed = [layer, *(d for d in spec.layers[layer].may_depend_on if d != layer)]
    text = (
        f"{layer} guest '{origin}' depends on {layer_of(spec, target)} guest '{target}' through "
        f"{_through(hops)}; {layer} guests may depend only on {', '.join(allowed)} guests"
    )
    if others:
        shown = "; ".join(f"'{o}' through {_through(h)}" for o, h in others[:3])
        more = len(others) - 3
        text += f". Also reached from {shown}" + (f" and {more} more" if more > 0 else "")
    return text


# --- placement -------------------------------------------------------------------------------


def check_placement(spec: PlatformSpec) -> Iterator[Finding]:
    """A guest sits on a host that serves its layer."""
    if not _enabled(spec.policies.placement):
        return
    for gname, guest in spec.guests.items():
        layer = layer_of(spec, gname)
        host = spec.hosts.get(guest.host)
        if layer is None or host is None or layer in host.layers:
            continue
        yield _about_guest(
            "policy-placement",
            gname,
            "host",
            f"{layer} guest '{gname}' is placed on host '{guest.host}', which serves only "
            f"{', '.join(host.layers)}",
        )


# --- traefik domains -------------------------------------------------------------------------


def check_traefik_domains(spec: PlatformSpec) -> Iterator[Finding]:
    """One Traefik instance per traffic domain (`routes_to`), and each routes only into it."""
    if not _enabled(spec.policies.traefik_domains):
        return
    by_domain: dict[frozenset[str], str] = {}
    for iname, inst in spec.traefik.items():
        domain = frozenset(inst.routes_to)
        if domain in by_domain:
            yield Finding(
                "policy-traefik-domains",
                f"Traefik instances '{by_domain[domain]}' and '{iname}' both serve the traffic "
                f"domain {', '.join(sorted(domain))}; keep one instance per domain",
                ("traefik", iname, "routes_to"),
            )
        else:
            by_domain[domain] = iname
        for rname, route in inst.routes.items():
            target = route.target.guest
            layer = layer_of(spec, target)
            if layer is None or layer in inst.routes_to:
                continue
            yield Finding(
                "policy-traefik-domains",
                f"route {iname}/{rname} sends traffic to {layer} guest '{target}', outside the "
                f"domain of Traefik instance '{iname}' ({', '.join(inst.routes_to)})",
                ("traefik", iname, "routes", rname, "target", "guest"),
                address=f"route/{iname}/{rname}",
            )


# --- velocity host ---------------------------------------------------------------------------


def check_velocity_host(spec: PlatformSpec) -> Iterator[Finding]:
    """Velocity runs on a host that serves `host_layer` (next to the servers it proxies)."""
    pol = spec.policies.velocity_host
    if pol is None or not pol.enabled:
        return
    if pol.host_layer not in spec.layers:
        yield Finding(
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
    yield _about_guest(
        "policy-velocity-host",
        vguest,
        "host",
        f"Velocity guest '{vguest}' is on host '{hname}', which does not serve the "
        f"{pol.host_layer} layer (it serves {', '.join(host.layers)})",
    )


# --- vmid ranges -----------------------------------------------------------------------------


def check_vmid_ranges(spec: PlatformSpec) -> Iterator[Finding]:
    """Every explicit vmid lies in its role's range, and no two ranges overlap."""
    if not _enabled(spec.policies.vmid_ranges):
        return
    for gname, guest in spec.guests.items():
        rng = spec.ranges.get(guest.role)
        if guest.vmid is None or rng is None or guest.vmid in rng:
            continue
        yield _about_guest(
            "policy-vmid-ranges",
            gname,
            "vmid",
            f"guest '{gname}' has vmid {guest.vmid}, outside its role {guest.role}'s range "
            f"{_span(rng.first, rng.last)}",
        )
    ranges = list(spec.ranges.items())
    for j, (later, b) in enumerate(ranges):
        for earlier, a in ranges[:j]:
            if a.first <= b.last and b.first <= a.last:
                yield Finding(
                    "policy-vmid-ranges",
                    f"range '{later}' ({_span(b.first, b.last)}) overlaps range '{earlier}' "
                    f"({_span(a.first, a.last)})",
                    ("ranges", later, "first"),
                )


def _span(first: int, last: int) -> str:
    return f"{first}+" if last == 999_999_999 else f"{first}-{last}"


DESIGN_RULES: tuple[Rule, ...] = (
    check_layer_dependencies,
    check_placement,
    check_traefik_domains,
    check_velocity_host,
    check_vmid_ranges,
)
