"""The cheap check: has anything changed since the last full observation, judged from one
`GET /cluster/resources` call? The service runs it between full refreshes (issue: no config
read per guest unless something moved).

It sees what the inventory carries: guests (templates included) appearing or disappearing,
node, name, power state, cores, memory, tags and locks. Changes only visible in a guest's
config (network, features, description) wait for the next full observation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from reconciler.model.observed import ObservedState
from reconciler.model.resources import Kind
from reconciler.providers.proxmox import Inventory

_MIB = 1024 * 1024


def _fingerprint(item: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "node": item.get("node"),
        "name": item.get("name"),
        "state": "running" if item.get("status") == "running" else "stopped",
        "cores": int(item.get("maxcpu", 0)),
        "memory": int(item.get("maxmem", 0)) // _MIB,
        "tags": sorted({t for t in str(item.get("tags") or "").split(";") if t}),
        "lock": item.get("lock"),
    }


def inventory_drift(snapshot: ObservedState, inventory: Inventory) -> list[str]:
    """Differences between a full snapshot and a fresh inventory, one line each; empty when the
    inventory agrees with the snapshot."""
    seen: dict[int, dict[str, Any]] = {}
    for r in snapshot.resources:
        if r.kind is Kind.GUEST and "vmid" in r.id:
            a = r.attributes
            seen[int(r.id["vmid"])] = {
                "node": r.id.get("node"),
                "name": a.get("name"),
                "state": a.get("state"),
                "cores": a.get("cores"),
                "memory": a.get("memory"),
                "tags": sorted(a.get("tags") or []),
                "lock": None,
            }
    # Templates too: the snapshot holds them (as foreign guests), since they take vmids.
    now = {int(i["vmid"]): _fingerprint(i) for i in inventory.guests}
    out: list[str] = []
    for vmid in sorted(set(seen) | set(now)):
        before, after = seen.get(vmid), now.get(vmid)
        if before is None:
            out.append(f"vmid {vmid}: appeared")
        elif after is None:
            out.append(f"vmid {vmid}: disappeared")
        else:
            for key, value in after.items():
                # A foreign guest's snapshot lacks cores/memory: compare only what it has.
                known = before.get(key) is not None or key == "lock"
                if known and before.get(key) != value:
                    out.append(f"vmid {vmid}: {key} {before.get(key)!r} -> {value!r}")
    return out
