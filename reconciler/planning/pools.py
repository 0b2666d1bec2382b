"""Pools in planning: which of a pool's members are reconciled now, and a pool the spec declares
that someone else's pool already holds.

Called by the planner (`planning.planner.make_plan`). Pure: what Proxmox holds comes in the
observed state (`providers.proxmox_pools`: a pool's `members` are the addresses of the
controller's own guests in it; other members are never read into it, so never removed).

Membership. A declared pool's desired members are the spec's guests that name it; planned now
are those that exist (a guest to be created joins with its create's `pool=`, so the pool's
change, which runs before it, never adds a vmid nobody holds yet), each at the vmid the guest
carrying our mark was observed at, never its desired one: a renumbered guest's new vmid may
be someone else's guest, which `allow-move` would take out of its pool into ours. A guest of
ours in a pool the controller does not own is not moved out of it: a foreign pool is never
changed (it may grant its users rights on its members), so the guest stays where it is, with a
warning.

A declared pool whose name a pool without the controller's mark holds is a plan error: it is
not the controller's to change, and a guest created "into it" would land in someone else's
pool.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from reconciler.model.diagnostics import Diagnostic, error, warning
from reconciler.model.observed import ObservedResource, ObservedState
from reconciler.model.resources import Kind, Resource

# The mark a pool's comment ends with (providers.proxmox_pools writes and reads it).
MARK = "reconciler:v1 platform={platform} address={address}"


def member_vmids(res: Resource, vmids: Mapping[str, int]) -> dict[str, int]:
    """Each member's vmid, for apply (a guest without one is left out)."""
    return {g: vmids[g] for g in res.attributes.get("members", ()) if g in vmids}


def foreign_homes(observed: ObservedState) -> dict[str, str]:
    """Our guests that sit in a pool the controller does not own: address -> that pool."""
    homes: dict[str, str] = {}
    for r in observed.resources:
        if r.kind is Kind.POOL and not r.owned:
            for guest in r.attributes.get("members") or ():
                homes.setdefault(str(guest), str(r.id.get("poolid")))
    return homes


def present_members(
    res: Resource,
    desired: dict[str, Any],
    existing: Mapping[str, int],
    homes: Mapping[str, str],
    positions: Mapping[str, Any],
) -> tuple[dict[str, Any], list[Diagnostic]]:
    """The pool's desired attributes with the members reconciled now: guests that exist
    (`existing`: owned guest address -> its observed vmid) and are not in a foreign pool (each
    of those a warning, at its guest). Their `vmids` are the observed ones."""
    there = existing
    kept: list[str] = []
    diags: list[Diagnostic] = []
    for guest in desired.get("members") or ():
        if guest not in there:
            continue  # created into the pool by its own create
        home = homes.get(guest)
        if home is not None and home != res.name:
            vmid = there[guest]
            diags.append(
                warning(
                    "pool-foreign-member",
                    f"{guest} is in pool {home!r}, which the controller does not own, so it is "
                    f"not moved into {res.address}: a foreign pool is never changed. Take it "
                    f"out of {home!r} first (pvesh set /pools --poolid {home} --vms {vmid} "
                    "--delete 1)",
                    position=positions.get(guest),
                    address=guest,
                )
            )
            continue
        kept.append(guest)
    out = {**desired, "members": kept, "vmids": {g: there[g] for g in kept}}
    return out, diags


def held_by_foreign(
    res: Resource, observed: Iterable[ObservedResource], platform: str
) -> Diagnostic | None:
    """A pool to create whose name a pool without our mark holds: an error naming the mark
    that hands it to the controller."""
    for r in observed:
        if r.kind is Kind.POOL and not r.owned and r.id.get("poolid") == res.name:
            mark = MARK.format(platform=platform, address=res.address)
            return error(
                "pool-held-by-foreign",
                f"{res.address}: a pool named {res.name!r} exists without the controller's mark: "
                "it is not the controller's to change, and no guest is created into it. Rename "
                f"the pool in the spec, or hand it to the controller by ending its comment with "
                f"'{mark}'",
                position=res.position,
                address=res.address,
            )
    return None
