"""HA in planning: who owns a guest's power state, and what the planner leaves to HA.

Called by the planner (`planning.planner.make_plan`). Pure: the HA resources come in the
observed state (`providers.proxmox_ha`), the desired ones in the graph (`loading.pools_ha`).

HA owns the power state of a guest it manages (Proxmox turns a start or stop through the
guest's status API into an HA request that rewrites the resource's requested state:
qemu-server `API2/Qemu.pm` vm_start/vm_stop, pve-container `API2/LXC/Status.pm`). So the
planner never starts or stops such a guest itself: a `state` difference on it is dropped from
the guest's change, and its desired power state is its HA resource's `state`, which an update
of the HA resource heals. A guest is HA-managed here when

- an HA resource the controller does not own manages it (its sid, state other than `ignored`):
  that is someone else's, never changed, and a warning says the spec's `state` is not enforced;
- or the spec gives it `ha` with a state other than `ignored`.

An `ignored` resource leaves the guest to the API (pve-ha-manager `Config.pm`: "ignored
service behave as if they were not managed by HA"): its `state` is planned directly. So is a
guest whose own HA resource leaves the spec: the resource is deleted at the end of the apply,
and a start or stop before that only sets the state it is about to lose.

An HA resource's mark names its address, but its sid says which guest HA starts and stops: an
owned one whose sid is not its guest's (the guest of its address, owned, at its observed vmid
and type) is a plan error (`sid_mismatch`), and nothing is planned for it, no update and no
delete: acting on it would start, stop or release a guest that may not be the controller's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from reconciler.model.diagnostics import Diagnostic, Position, error, warning
from reconciler.model.observed import ObservedResource, ObservedState
from reconciler.model.plans import Action, Cause, Change
from reconciler.model.resources import DesiredGraph, Kind, Resource, ha_sid

# The power state each requested HA state keeps its guest in (`ignored`: none).
POWER = {"started": "running", "stopped": "stopped", "disabled": "stopped"}
# The mark an HA resource's comment ends with (providers.proxmox_ha writes and reads it).
MARK = "reconciler:v1 platform={platform} address={address} sid={sid}"


def ha_of(guest_address: str) -> str:
    """`guest/mc-lobby` -> `ha/mc-lobby`."""
    return f"{Kind.HA.value}/{guest_address.removeprefix(Kind.GUEST.value + '/')}"


def guest_of(ha_address: str) -> str:
    """`ha/mc-lobby` -> `guest/mc-lobby`."""
    return f"{Kind.GUEST.value}/{ha_address.removeprefix(Kind.HA.value + '/')}"


@dataclass(frozen=True)
class HaPower:
    """An HA resource that owns a guest's power: its sid, the state it asks for, and whether
    it is (or is to be) the controller's."""

    sid: str
    state: str
    ours: bool


def foreign_index(observed: ObservedState) -> dict[str, ObservedResource]:
    """The HA resources without our mark, by sid: built once per plan (`make_plan`'s start),
    asked for each guest."""
    return {str(r.id.get("sid")): r for r in observed.foreign() if r.kind is Kind.HA}


def power_owner(
    graph: DesiredGraph,
    foreign_ha: Mapping[str, ObservedResource],
    guest: Resource,
    desired: dict[str, Any],
) -> HaPower | None:
    """The HA resource that owns this guest's power state, or None (the controller's)."""
    sid = ha_sid(str(desired.get("type", "lxc")), int(desired["vmid"]))
    foreign = foreign_ha.get(sid)
    if foreign is not None and foreign.attributes.get("state") in POWER:
        return HaPower(sid, str(foreign.attributes["state"]), ours=False)
    wanted = graph.resources.get(ha_of(guest.address))
    if wanted is not None and wanted.attributes.get("state") in POWER:
        return HaPower(sid, str(wanted.attributes["state"]), ours=True)
    return None


def leave_power_to_ha(
    change: Change,
    owner: HaPower,
    observed: ObservedState,
    guest: Resource,
    platform: str,
) -> tuple[Change, list[Diagnostic]]:
    """The guest's change without its start or stop: HA owns its power. A warning when the
    guest is not where its HA resource keeps it and no change of ours heals that: a foreign
    resource (never changed by us), or ours asking for it already (the HA manager is on it)."""
    if change.action not in (Action.UPDATE, Action.MIGRATE):
        return change, []
    power = [f for f in change.fields if f.path == "state"]
    if not power:
        return change, []
    rest = tuple(f for f in change.fields if f.path != "state")
    if rest:
        left = replace(change, fields=rest)
    else:
        left = replace(change, action=Action.NOOP, fields=(), reason="", cause=Cause.IN_SYNC)
    seen, wanted = power[0].before, power[0].after
    diags: list[Diagnostic] = []
    if not owner.ours:
        mark = MARK.format(platform=platform, address=ha_of(guest.address), sid=owner.sid)
        diags.append(
            warning(
                "ha-owns-power",
                f"{guest.address} is {seen} and the spec says {wanted}, but HA resource "
                f"{owner.sid}, which the controller does not own, manages its power and asks "
                f"for {owner.state}: the controller does not start or stop a guest HA manages. "
                f"Set its state with `ha-manager set {owner.sid} --state ...`, or give the "
                f"guest `ha:` in the spec and end the resource's comment with '{mark}'",
                position=guest.position,
                address=guest.address,
            )
        )
    else:
        ours = observed.owned().get(ha_of(guest.address))
        if ours is not None and ours.attributes.get("state") == owner.state:
            diags.append(
                warning(
                    "ha-power-pending",
                    f"{guest.address} is {seen}, and its HA resource {owner.sid} already asks "
                    f"for {owner.state}: the HA manager brings it there (the controller does "
                    "not start or stop a guest HA manages)",
                    position=guest.position,
                    address=guest.address,
                )
            )
    return left, diags


def held_by_foreign(
    res: Resource, sid: str, foreign_ha: Mapping[str, ObservedResource], platform: str
) -> Diagnostic | None:
    """An HA resource to create for a guest that one without our mark manages already: left
    as it is (it is someone else's), with a warning naming the mark that hands it over."""
    found = foreign_ha.get(sid)
    if found is None:
        return None
    mark = MARK.format(platform=platform, address=res.address, sid=sid)
    return warning(
        "ha-held-by-foreign",
        f"{res.address}: HA resource {sid} exists without the controller's mark (state "
        f"{found.attributes.get('state')}); it is left as it is. Remove it, or hand it to the "
        f"controller by ending its comment with '{mark}'",
        position=res.position,
        address=res.address,
    )


def sid_mismatch(
    ha_res: ObservedResource, guest: ObservedResource | None, position: Position | None
) -> Diagnostic | None:
    """An owned HA resource whose sid is not the sid of its guest (`guest`: the owned,
    observed guest of its address, or None): an error naming both; None when they agree."""
    address = str(ha_res.address)
    sid = str(ha_res.id.get("sid"))
    guest_address = guest_of(address)
    if guest is not None and guest.kind is Kind.GUEST and "vmid" in guest.id:
        vmid = int(guest.id["vmid"])
        expected = ha_sid(str(guest.attributes.get("type") or "lxc"), vmid)
        if expected == sid:
            return None
        why = f"{guest_address} is vmid {vmid} (sid {expected})"
    else:
        why = f"{guest_address} is not observed as the controller's"
    return error(
        "ha-sid-mismatch",
        f"{address}: HA resource {sid} carries the controller's mark for {address}, but "
        f"{why}: it is neither changed nor deleted (that would start, stop or release another "
        f"guest). Remove the mark from the comment of {sid} (`ha-manager set {sid} --comment "
        "...`) or remove the resource, then plan again",
        position=position,
        address=address,
    )
