"""Where the edge sends traffic to a VM the spec gives no address: the address its QEMU guest
agent reports.

Called by `planning.planner` (`make_plan`, `converged_state`) once per plan, before any
resource is planned. `loading.graph` names the backend of a Traefik route (`server`) and of a
Velocity registration (`address`) by its target guest's static IP, or, when the spec has none
(`ip: dhcp`), by the guest's host name. For a VM with `agent: true` the address is known
better than that: the Proxmox provider reads the running VM's `addresses` from
`agent/network-get-interfaces` into the observed state. Such a backend takes the first IPv4
address the agent lists (its interfaces in the guest's order, loopback and link-local left
out), or, with none, its first IPv6 one: the address of the guest's first interface, net0 in
a cloud image. While no address is known (the guest is not created yet, not running, its agent
lists none, or did not answer and nothing was written yet), the route or registration is
withheld, with the reason the plan shows, never pointed at the host name (which a DHCP VM's
resolver may not know, or may know as another guest's). A running VM whose agent did not answer
this time keeps the backend its route was written with: a missed read (an agent busy or frozen
by a backup's fs-freeze) withdraws nothing.

A container, and a VM without the agent, keep their host name: nothing reports their address.
The target is the last of the resource's `depends_on`, as `loading.graph` builds them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from reconciler.model.observed import IpAddress, ObservedResource, ObservedState, agent_ip
from reconciler.model.resources import DesiredGraph, Kind, Resource

# The attribute each kind names its backend in.
_BACKEND_FIELD = {Kind.ROUTE: "server", Kind.VELOCITY: "address"}


@dataclass(frozen=True)
class Backends:
    """The resolved backends (address -> its attributes with the observed address) and the
    withheld ones (address -> why)."""

    attributes: dict[str, dict[str, Any]] = field(default_factory=dict)
    withheld: dict[str, str] = field(default_factory=dict)
    # address -> why its backend stays as observed: the VM runs but its agent did not answer
    kept: dict[str, str] = field(default_factory=dict)


def split_server(kind: Kind, value: str) -> tuple[str, str, str]:
    """A backend value as (prefix, host, suffix): `http://web-vm:8080` is ("http://", "web-vm",
    ":8080"), a TCP route's `web-vm:8443` ("", "web-vm", ":8443"), a registration's address
    ("", "web-vm", "")."""
    if kind is Kind.VELOCITY:
        return "", value, ""
    scheme, sep, rest = value.rpartition("://")
    host, colon, port = rest.rpartition(":")
    if not colon:
        return scheme + sep, rest, ""
    return scheme + sep, host, colon + port


def dhcp_target(graph: DesiredGraph, res: Resource) -> str | None:
    """The VM whose agent names `res`'s backend: a route or registration whose target guest is a
    VM with `agent: true` that the graph names by host name (the spec gives it no static IP)."""
    backend = _BACKEND_FIELD.get(res.kind)
    if backend is None or not res.depends_on:
        return None
    target = res.depends_on[-1]
    guest = graph.resources.get(target)
    if guest is None or guest.kind is not Kind.GUEST:
        return None
    attrs = guest.attributes
    if attrs.get("type") != "qemu" or attrs.get("agent") is not True:
        return None
    _, host, _ = split_server(res.kind, str(res.attributes.get(backend, "")))
    return target if host == attrs.get("name") else None


def _why_unknown(target: str, guest: ObservedResource | None) -> str:
    head = f"{target} has no static address and its QEMU guest agent reports none"
    if guest is None:
        return f"{head}: it is not created yet"
    if guest.attributes.get("state", "running") != "running":
        return f"{head}: it is not running"
    if "addresses" not in guest.attributes:
        return f"{head}: the agent did not answer"
    return f"{head} yet (no DHCP lease?)"


def with_ip(res: Resource, ip: IpAddress) -> dict[str, Any]:
    """`res`'s attributes with its backend at `ip` (an IPv6 one in brackets before a port)."""
    backend = _BACKEND_FIELD[res.kind]
    prefix, _, suffix = split_server(res.kind, str(res.attributes[backend]))
    host = f"[{ip}]" if ip.version == 6 and suffix else str(ip)
    return {**res.attributes, backend: prefix + host + suffix}


def resolve(
    graph: DesiredGraph, observed: ObservedState, skip: Mapping[str, str] | None = None
) -> Backends:
    """Each DHCP VM's route and registration: at its agent's address, or withheld. Resources in
    `skip` (withheld already, by the readiness gate) and of kinds nobody observed are left out."""
    owned = observed.owned()
    out = Backends()
    for res in graph.ordered():
        if res.address in (skip or {}):
            continue
        if observed.kinds is not None and res.kind not in observed.kinds:
            continue  # not planned at all
        target = dhcp_target(graph, res)
        if target is None:
            continue
        guest = owned.get(target)
        running = guest is not None and guest.attributes.get("state", "running") == "running"
        ip = agent_ip(guest.attributes.get("addresses") or ()) if guest and running else None
        if ip is not None:
            out.attributes[res.address] = with_ip(res, ip)
            continue
        written = _written_backend(res, owned.get(res.address))
        if guest is not None and running and "addresses" not in guest.attributes and written:
            # The agent did not answer this time (busy, frozen by a backup's fs-freeze, slow,
            # or not asked: a plan from a snapshot): the route stays where it was written,
            # not withdrawn for a missed read. Its other fields are planned as usual.
            out.attributes[res.address] = {**res.attributes, _BACKEND_FIELD[res.kind]: written}
            out.kept[res.address] = (
                f"{target}'s QEMU guest agent did not answer: the backend stays {written}"
            )
            continue
        out.withheld[res.address] = _why_unknown(target, guest)
    return out


def _written_backend(res: Resource, seen: ObservedResource | None) -> str | None:
    """The backend an existing route or registration was written with, if any."""
    if seen is None:
        return None
    value = seen.attributes.get(_BACKEND_FIELD[res.kind])
    return str(value) if value else None
