"""HA resources (`/cluster/ha/resources`): the guests the spec makes HA resources, and every HA
resource there is (the planner leaves the power of any guest HA manages to HA).

A provider like the backup jobs': it composes a `ProxmoxProvider` for every call. Called
through the provider protocol by every run (`applying.observing`, `applying.executor`); always
registered: one call, and the privilege it needs (`Sys.Audit` on `/`) every plan needs anyway
(the firewall), so even an HA resource made by hand on a guest of ours is seen, and the plan
never fights it over the guest's power.

Observe: `GET /cluster/ha/resources`, one call. A resource's `sid` is `ct:VMID` or `vm:VMID`.
It is ours when its `comment` ends with our mark, `reconciler:v1 platform=P address=ha/GUEST
sid=SID`, and the mark's sid is the resource's own (a comment copied to another guest's
resource claims nothing). Attributes: the requested `state` (`enabled` read as `started`, its
alias; absent: `started`), `group` (None when absent: PVE 9 leaves it out once HA groups became
rules), `max_restart` and `max_relocate` (Proxmox's default 1 when absent).

Apply, always by sid, never with the config digest (one digest covers every HA resource of the
cluster, so any other change in between, a start through the API included, would stale it):
- create: `POST /cluster/ha/resources` (sid, state, max_restart, max_relocate, group when the
  spec names one, comment with our mark). "already defined" counts as done when the resource
  is ours for this address (a reply lost);
- update: read the resources again and find our mark on it, then `PUT .../{sid}` with what
  changed (`delete=group` for a group the spec dropped). HA acts on a new state by itself: the
  controller never starts or stops the guest;
- delete: read again; gone is done; ours, then `DELETE .../{sid}`. The guest stays as it is
  (running or not): HA only stops managing it. A removal destroys nothing, so the planner asks
  no pruning for it; an HA resource whose guest left the spec goes with its guest instead.
Before each write or delete, the guest at the sid (`GET /cluster/resources`, its config) must
carry our mark for the change's guest (`after.guest`, else the guest of its address): an HA
resource on another guest is refused (a PermanentError naming both), never started, stopped or
released.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from reconciler.model.errors import PermanentError, ProviderError
from reconciler.model.observed import ObservedResource
from reconciler.model.plans import Action, Change, refuse_blocked
from reconciler.model.resources import Kind
from reconciler.providers import Observation
from reconciler.providers.proxmox import MARK_PREFIX, ProxmoxProvider, claimed, read_mark

_HA_MARK = re.compile(
    rf"(?:^|\s){re.escape(MARK_PREFIX)} platform=(?P<platform>\S+) "
    r"address=(?P<address>ha/[a-z0-9-]+) sid=(?P<sid>(?:ct|vm):[1-9][0-9]*)\Z"
)
# The options the spec manages, as Proxmox names them.
_OPTIONS = ("state", "group", "max_restart", "max_relocate")


def ha_comment(platform: str, address: str, sid: str) -> str:
    """The comment an HA resource of ours carries: our mark, naming its sid."""
    return f"{MARK_PREFIX} platform={platform} address={address} sid={sid}"


def read_ha_mark(comment: str | None, sid: str) -> tuple[str, str] | None:
    """(platform, address) our mark claims, or None: no mark, or one naming another sid."""
    m = _HA_MARK.search((comment or "").strip())
    if m is None or m["sid"] != sid:
        return None
    return m["platform"], m["address"]


def ha_attributes(item: Mapping[str, Any]) -> dict[str, Any]:
    """An HA resource as Proxmox lists it -> the attributes the planner compares."""
    state = str(item.get("state") or "started")
    return {
        "state": "started" if state == "enabled" else state,
        "group": item.get("group") or None,
        "max_restart": int(item.get("max_restart", 1)),
        "max_relocate": int(item.get("max_relocate", 1)),
    }


def create_params(platform: str, address: str, sid: str, want: Mapping[str, Any]) -> dict[str, Any]:
    params: dict[str, Any] = {
        "sid": sid,
        "state": want["state"],
        "max_restart": int(want["max_restart"]),
        "max_relocate": int(want["max_relocate"]),
        "comment": ha_comment(platform, address, sid),
    }
    if want.get("group"):
        params["group"] = want["group"]
    return params


def update_params(want: Mapping[str, Any], paths: set[str]) -> dict[str, Any]:
    """The PUT for the changed options: a group the spec dropped is deleted."""
    params: dict[str, Any] = {}
    for key in _OPTIONS:
        if key not in paths:
            continue
        if key == "group" and not want.get("group"):
            params["delete"] = "group"
        else:
            params[key] = want[key]
    return params


@dataclass
class HaProvider:
    """Every HA resource on the guests' endpoint; the spec's are ours."""

    pve: ProxmoxProvider

    kinds = frozenset({Kind.HA})
    needs = frozenset[Kind]()
    streams = frozenset[Kind]()
    optional = False  # HA unknown: a plan could fight it over a guest's power

    @property
    def platform(self) -> str:
        return self.pve.platform

    async def observe(self, seen: Observation) -> list[ObservedResource]:
        async with self.pve.reading():
            items = await self._list()
        out = [self._resource(i) for i in items if i.get("sid")]
        return sorted(out, key=lambda r: str(r.id["sid"]))

    def _resource(self, item: Mapping[str, Any]) -> ObservedResource:
        sid = str(item["sid"])
        claim = read_ha_mark(item.get("comment"), sid)
        owned = claim is not None and claim[0] == self.platform
        return ObservedResource(
            address=claim[1] if owned and claim is not None else None,
            kind=Kind.HA,
            owned=owned,
            id={"sid": sid},
            attributes=ha_attributes(item),
        )

    async def _list(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = await self.pve.get(
            "list HA resources", self.pve.client.cluster.ha.resources
        )
        return found

    # --- apply -----------------------------------------------------------------------------

    async def apply(self, change: Change) -> None:
        if change.kind is not Kind.HA:
            raise PermanentError(f"{change.address}: no provider for kind {change.kind.value}")
        refuse_blocked(change)
        sid = str(change.id["sid"])
        resources = self.pve.client.cluster.ha.resources
        match change.action:
            case Action.CREATE:
                assert change.after is not None
                await self._require_guest(change, sid)
                params = create_params(self.platform, change.address, sid, change.after)
                try:
                    await self.pve.retrying(
                        f"create {change.address}", lambda: resources.post(**params)
                    )
                except ProviderError as exc:
                    # "already defined": done when it is ours (a reply lost, a run cut off).
                    if "already defined" not in str(exc) or not await self._ours(change, sid):
                        raise
            case Action.UPDATE | Action.REPLACE:
                assert change.after is not None
                await self._require_ours(change, sid)
                await self._require_guest(change, sid)
                params = update_params(change.after, {f.path for f in change.fields})
                if params:
                    await self.pve.retrying(
                        f"update {change.address}", lambda: resources(sid).put(**params)
                    )
            case Action.DELETE:
                if not await self._require_ours(change, sid, gone_ok=True):
                    return  # gone already (its guest destroyed with purge)
                await self._require_guest(change, sid)
                await self.pve.retrying(f"delete {change.address}", lambda: resources(sid).delete())
            case _:
                raise PermanentError(
                    f"{change.address}: cannot {change.action.value} an HA resource"
                )

    async def _listed(self, sid: str) -> Mapping[str, Any] | None:
        """HA resource `sid` as the list gives it now; None when there is none (the list, not
        `.../{sid}`: Proxmox answers a missing one with a 500 that a read would retry)."""
        return next((i for i in await self._list() if str(i.get("sid")) == sid), None)

    async def _ours(self, change: Change, sid: str) -> bool:
        found = await self._listed(sid)
        claim = read_ha_mark(found.get("comment"), sid) if found is not None else None
        return claim == (self.platform, change.address)

    async def _require_ours(self, change: Change, sid: str, *, gone_ok: bool = False) -> bool:
        """Read the resource again and find our mark for this address on it: one someone else
        put there in between is never changed or removed. False: it is gone (`gone_ok`)."""
        found = await self._listed(sid)
        if found is None:
            if gone_ok:
                return False
            raise PermanentError(f"{change.address}: HA resource {sid} is gone; re-plan")
        if read_ha_mark(found.get("comment"), sid) != (self.platform, change.address):
            raise PermanentError(
                f"{change.address}: HA resource {sid} does not carry this platform's mark; "
                "left alone"
            )
        return True

    async def _require_guest(self, change: Change, sid: str) -> None:
        """The guest at `sid` (its vmid, its type) carries our mark for the change's guest:
        an HA resource is never written or removed for another guest than the one it names."""
        guest = str(
            (change.after or {}).get("guest")
            or f"{Kind.GUEST.value}/{change.address.removeprefix(Kind.HA.value + '/')}"
        )
        prefix, _, number = sid.partition(":")
        kind = {"ct": "lxc", "vm": "qemu"}.get(prefix)
        inventory = await self.pve.inventory()
        item = next(
            (g for g in inventory.guests if str(g.get("vmid")) == number and g.get("type") == kind),
            None,
        )
        if item is not None and not int(item.get("template") or 0):
            node = self.pve.client.nodes(item["node"])
            config = await self.pve.get(f"read config of {number}", node(kind)(int(number)).config)
            mark, _ = read_mark(config.get("description"))
            if claimed(mark, self.platform, int(number)) == guest:
                return
        raise PermanentError(
            f"{change.address}: HA resource {sid} is not on {guest}: "
            f"{'no guest' if item is None else 'the guest'} at {sid} carries no mark of the "
            f"controller for {guest}; it is left alone (re-plan)"
        )
