"""Resource pools (`/pools`): the pools the spec declares, and which of the controller's guests
are in them.

A provider like the backup jobs': it composes a `ProxmoxProvider` for every call (one thread
hop, one retry loop, one error translation). Called through the provider protocol by every run
(`applying.observing`, `applying.executor`); registered when the spec declares `pools`.

Observe (two calls, however many pools): `GET /pools` (every pool the token may audit, with its
comment) and `GET /cluster/resources?type=vm` (each guest's `pool`). A pool is ours when its
comment ends with our mark, `reconciler:v1 platform=P address=pool/NAME`, for its own name (a
pool made by hand with a copied comment claims nothing). Its `members` are the addresses of
the controller's own guests in it (the guests are observed first: `needs`), so a member that
is not ours is never compared, never removed; `vmids` holds their vmids, for apply. A foreign
pool is observed the same way (the planner reads which of our guests sit in one) and never
changed.

Apply (PVE 8.1+: `POST/PUT/DELETE /pools` with `poolid`, the API PVE 9 keeps; the older
`/pools/{poolid}` is deprecated):
- create: `POST /pools` (poolid, comment with the mark), then the members that exist, one by
  one: `PUT /pools` (`vms=N`, `allow-move=1`: a guest of ours in another of our pools moves);
- update: read the pools again and find our mark on this one (a pool someone took over in
  between is left alone); the comment; members added, and members of ours the spec no longer
  puts there removed (`vms=N`, `delete=1`), one at a time: a guest already in (or already
  out, moved by another pool's change in the same wave) counts as done;
- delete (pruning allowed it): our members out, then `DELETE /pools`. Proxmox refuses to delete
  a pool that still holds someone else's guests or storages: that is reported, and the pool
  stays.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from reconciler.model.errors import ConflictError, PermanentError, ProviderError
from reconciler.model.observed import ObservedResource
from reconciler.model.plans import Action, Change, refuse_blocked
from reconciler.model.resources import Kind
from reconciler.providers import Observation
from reconciler.providers.proxmox import MARK_PREFIX, ProxmoxProvider

_POOL_MARK = re.compile(
    rf"(?:^|\s){re.escape(MARK_PREFIX)} platform=(?P<platform>\S+) "
    r"address=(?P<address>pool/[A-Za-z0-9_.-]+)\Z"
)
# What Proxmox answers a membership change that is already made (pve-manager API2/Pool.pm).
_ALREADY = ("is already a pool member", "is not a pool member")


def pool_comment(platform: str, address: str, comment: str) -> str:
    """The comment as sent: the spec's text, then our mark, on one line (Proxmox keeps a
    pool's comment on its line of user.cfg)."""
    mark = f"{MARK_PREFIX} platform={platform} address={address}"
    return f"{comment} {mark}" if comment else mark


def read_pool_mark(comment: str | None, poolid: str) -> tuple[tuple[str, str] | None, str]:
    """A pool's comment -> ((platform, address) our mark claims, or None), the comment without
    the mark. A mark naming another pool (a comment copied by hand) claims nothing."""
    text = (comment or "").strip()
    m = _POOL_MARK.search(text)
    if m is None:
        return None, text
    rest = text[: m.start()].strip()
    if m["address"] != f"{Kind.POOL.value}/{poolid}":
        return None, rest
    return (m["platform"], m["address"]), rest


def pool_members(guests: Iterable[Mapping[str, Any]]) -> dict[str, list[int]]:
    """Pool -> the vmids of the guests in it, from a `/cluster/resources` answer."""
    out: dict[str, list[int]] = {}
    for item in guests:
        pool, vmid = item.get("pool"), item.get("vmid")
        if pool and vmid is not None:
            out.setdefault(str(pool), []).append(int(vmid))
    return out


@dataclass
class PoolProvider:
    """The spec's pools, on the guests' endpoint."""

    pve: ProxmoxProvider

    kinds = frozenset({Kind.POOL})
    needs = frozenset({Kind.GUEST})  # a member is ours when the guest is
    streams = frozenset[Kind]()
    optional = False  # a pool unknown: nothing is planned

    @property
    def platform(self) -> str:
        return self.pve.platform

    # --- observe ---------------------------------------------------------------------------

    async def observe(self, seen: Observation) -> list[ObservedResource]:
        async with self.pve.reading():
            pools = await self.pve.get("list pools", self.pve.client.pools)
            guests = await self.pve.get(
                "read pool members", self.pve.client.cluster.resources, type="vm"
            )
        ours = {
            int(r.id["vmid"]): r.address
            for r in seen.of(Kind.GUEST)
            if r.owned and r.address and "vmid" in r.id
        }
        members = pool_members(guests)
        out = [self._pool(p, members.get(str(p["poolid"]), []), ours) for p in pools]
        return sorted(out, key=lambda r: str(r.id["poolid"]))

    def _pool(
        self, pool: Mapping[str, Any], vmids: Iterable[int], ours: Mapping[int, str]
    ) -> ObservedResource:
        poolid = str(pool["poolid"])
        claim, comment = read_pool_mark(pool.get("comment"), poolid)
        owned = claim is not None and claim[0] == self.platform
        mine = {ours[v]: v for v in vmids if v in ours}
        return ObservedResource(
            address=claim[1] if owned and claim is not None else None,
            kind=Kind.POOL,
            owned=owned,
            id={"poolid": poolid},
            attributes={
                "name": poolid,
                "comment": comment,
                "members": sorted(mine),
                "vmids": dict(sorted(mine.items())),
            },
        )

    # --- apply -----------------------------------------------------------------------------

    async def apply(self, change: Change) -> None:
        if change.kind is not Kind.POOL:
            raise PermanentError(f"{change.address}: no provider for kind {change.kind.value}")
        refuse_blocked(change)
        poolid = change.address.removeprefix(f"{Kind.POOL.value}/")
        before = change.before or {}
        after = change.after or {}
        match change.action:
            case Action.CREATE:
                await self._create(change, poolid, str(after.get("comment") or ""))
                await self._members(change, poolid, before, after)
            case Action.UPDATE:
                await self._require_ours(change, poolid)
                if any(f.path == "comment" for f in change.fields):
                    comment = pool_comment(self.platform, change.address, after["comment"])
                    await self._put(f"update {change.address}", poolid, comment=comment)
                await self._members(change, poolid, before, after)
            case Action.DELETE:
                if not await self._require_ours(change, poolid, gone_ok=True):
                    return  # already gone
                await self._members(change, poolid, before, {})
                pools = self.pve.client.pools
                try:
                    await self.pve.retrying(
                        f"delete {change.address}", lambda: pools.delete(poolid=poolid)
                    )
                except PermanentError as exc:
                    if "is not empty" not in str(exc):
                        raise
                    raise PermanentError(
                        f"{exc}: it holds members that are not the controller's, so it is left "
                        "in place (move them out of it to have it deleted)"
                    ) from None
            case _:
                raise PermanentError(f"{change.address}: cannot {change.action.value} a pool")

    async def _create(self, change: Change, poolid: str, comment: str) -> None:
        marked = pool_comment(self.platform, change.address, comment)
        pools = self.pve.client.pools
        try:
            await self.pve.retrying(
                f"create {change.address}", lambda: pools.post(poolid=poolid, comment=marked)
            )
        except (ConflictError, PermanentError) as exc:
            # "already exists": done only when it is ours (a reply lost, a run cut off).
            if "already exists" not in str(exc) or not await self._ours(change, poolid):
                raise

    async def _members(
        self, change: Change, poolid: str, before: Mapping[str, Any], after: Mapping[str, Any]
    ) -> None:
        """Members added and removed, one at a time; every one tried, the failures reported
        together."""
        had = dict(before.get("vmids") or {})
        want = dict(after.get("vmids") or {})
        failed: list[str] = []
        for guest in sorted(set(want) - set(had)):
            try:
                await self._put(
                    f"add {guest} to {change.address}",
                    poolid,
                    vms=int(want[guest]),
                    **{"allow-move": 1},
                )
            except ProviderError as exc:
                failed.append(str(exc))
        for guest in sorted(set(had) - set(want)):
            try:
                await self._put(
                    f"remove {guest} from {change.address}", poolid, vms=int(had[guest]), delete=1
                )
            except ProviderError as exc:
                failed.append(str(exc))
        if failed:
            raise PermanentError("; ".join(failed))

    async def _put(self, what: str, poolid: str, **params: Any) -> None:
        """`PUT /pools`; a membership change Proxmox finds made already is done."""
        pools = self.pve.client.pools
        try:
            await self.pve.retrying(what, lambda: pools.put(poolid=poolid, **params))
        except PermanentError as exc:
            if "vms" in params and any(text in str(exc) for text in _ALREADY):
                return
            raise

    async def _listed(self, poolid: str) -> Mapping[str, Any] | None:
        """The pool as `GET /pools` lists it now; None when there is none (the list, not
        `?poolid=`: Proxmox answers a missing pool with a 500 a read would retry)."""
        pools = await self.pve.get("list pools", self.pve.client.pools)
        return next((p for p in pools if str(p.get("poolid")) == poolid), None)

    async def _ours(self, change: Change, poolid: str) -> bool:
        found = await self._listed(poolid)
        if found is None:
            return False
        claim, _ = read_pool_mark(found.get("comment"), poolid)
        return claim == (self.platform, change.address)

    async def _require_ours(self, change: Change, poolid: str, *, gone_ok: bool = False) -> bool:
        """Read the pool again and find our mark for this address on it: a pool someone else
        made under this name in between is never changed or deleted. False: it is gone (only
        with `gone_ok`)."""
        found = await self._listed(poolid)
        if found is None:
            if gone_ok:
                return False
            raise PermanentError(f"{change.address}: pool {poolid} is gone; re-plan")
        claim, _ = read_pool_mark(found.get("comment"), poolid)
        if claim != (self.platform, change.address):
            raise PermanentError(
                f"{change.address}: pool {poolid} does not carry this platform's mark; left alone"
            )
        return True
