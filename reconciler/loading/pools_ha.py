"""Pools and HA in the spec: their desired resources, and the checks only the whole platform can
make. Called by `loading.graph` (the resources, a guest's `pool` and power state) and by
`loading.checks` (`check_pools_and_ha`).

A pool (`pool/<name>`) is one the spec declares under `pools`; its `members` are the spec's
guests that name it in `pool` (addresses: the planner turns them into vmids, and keeps to those
that exist: a guest to be created joins its pool in its own create, `pool=`). A guest in a pool
depends on it, so the pool exists before the guest is created into it.

A guest's HA resource (`ha/<guest>`) is attached to the guest (recreated with it: a destroy
with purge removes it from Proxmox's HA config) and depends on it, and on its firewall when it
has one: HA starts what it manages, and a guest never runs before its rules are in place.

HA owns the power state of what it manages: for a guest with `ha` (state other than
`ignored`), the guest's `state` attribute is the one its `ha.state` keeps it in (started:
running; stopped, disabled: stopped). Written by hand, `state` must agree (`ha-state-conflict`,
at its line); left out, it follows `ha.state`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from reconciler.loading.sources import PathT, Source, dotted
from reconciler.model.diagnostics import Diagnostic, error
from reconciler.model.resources import Kind, Resource, guest_address
from reconciler.model.spec import HA_POWER, GuestSpec, PlatformSpec


def pool_address(name: str) -> str:
    return f"{Kind.POOL.value}/{name}"


def ha_address(guest: str) -> str:
    """`ha/mc-lobby`: the HA resource of guest `mc-lobby`."""
    return f"{Kind.HA.value}/{guest}"


def guest_pool_ha(guest: GuestSpec) -> dict[str, Any]:
    """What a guest's attributes take from its `pool` and `ha`: the pool it is created into
    (`pool`, only when the spec names one; membership itself is the pool's to reconcile) and,
    when HA manages it, the power state HA keeps it in."""
    out: dict[str, Any] = {}
    if guest.pool is not None:
        out["pool"] = guest.pool
    if guest.ha is not None and guest.ha.state in HA_POWER:
        out["state"] = HA_POWER[guest.ha.state]
    return out


def guest_pool_dependency(spec: PlatformSpec, guest: GuestSpec) -> tuple[str, ...]:
    """The declared pool a guest is created into, as a dependency (none for no pool)."""
    if guest.pool is not None and guest.pool in spec.pools:
        return (pool_address(guest.pool),)
    return ()


def pool_resources(spec: PlatformSpec, source: Source) -> Iterator[Resource]:
    """Each declared pool, with the guests that name it."""
    for name, pool in sorted(spec.pools.items()):
        members = sorted(guest_address(g) for g, guest in spec.guests.items() if guest.pool == name)
        yield Resource(
            pool_address(name),
            Kind.POOL,
            {"comment": pool.comment, "members": members},
            position=source.where(("pools", name)),
        )


def ha_resource(spec: PlatformSpec, source: Source, name: str, guest: GuestSpec) -> Resource | None:
    """A guest's HA resource, or None when the spec gives it none. `guest` and `type` say whose
    it is (its sid, `ct:VMID` or `vm:VMID`, is the planner's: the vmid may be allocated)."""
    ha = guest.ha
    if ha is None:
        return None
    address = guest_address(name)
    after_firewall = (f"firewall/guest/{name}",) if guest.firewall is not None else ()
    return Resource(
        ha_address(name),
        Kind.HA,
        {
            "state": ha.state,
            "group": ha.group,
            "max_restart": ha.max_restart,
            "max_relocate": ha.max_relocate,
            "guest": address,
            "type": "vm" if guest.kind == "qemu" else "ct",
        },
        depends_on=(address, *after_firewall),
        attached_to=address,
        position=source.where(("guests", name, "ha")),
    )


def check_pools_and_ha(spec: PlatformSpec, source: Source) -> Iterator[Diagnostic]:
    """A guest's `state`, when written, agrees with the power state its HA resource keeps it in
    (`pool` names a declared pool: `checks.check_references`)."""
    for name, guest in sorted(spec.guests.items()):
        ha = guest.ha
        if ha is None or ha.state not in HA_POWER or "state" not in guest.model_fields_set:
            continue
        if guest.state == HA_POWER[ha.state]:
            continue
        path: PathT = ("guests", name, "state")
        agree = "started" if guest.state == "running" else "stopped (or disabled)"
        yield error(
            "ha-state-conflict",
            f"state {guest.state!r} disagrees with ha.state {ha.state!r}: HA owns this guest's "
            f"power state, and keeps it {HA_POWER[ha.state]}. Leave 'state' out (it follows "
            f"ha.state), or set ha.state: {agree}",
            position=source.where(path),
            path=dotted(path),
            related=tuple(p for p in (source.where(("guests", name, "ha", "state")),) if p),
        )
