"""Observed state: what the observers saw, as a versioned, documented JSON snapshot.

`reconciler observe --out FILE` writes it, `reconciler plan --observed FILE` reads it, and the
controller publishes its latest one so CI can plan without reaching Proxmox.

Format (version 2; a version 1 snapshot, which has no `health` or `errors`, still reads):

    {
      "format": "reconciler/observed-state",
      "format_version": 2,
      "platform": "zpack",               # optional: the platform the observer was looking for
      "observed_at": "2026-11-23T09:00:00Z",
      "source": "https://pve.example:8006",
      "kinds": ["guest"],                # optional: what was observed; null means everything
      "resources": [
        {
          "address": "guest/zpack-api",  # null for a resource without our ownership mark
          "kind": "guest",               # a reconciler.model.resources.Kind value
          "owned": true,                 # carries the controller's mark
          "id": {"vmid": 101, "node": "pve-core"},   # how the outside system names it
          "attributes": {...},           # same shape as the desired resource's attributes
          "version": "9f2c..."           # optional: the config digest it was read at
                                         # (firewall: "options=.. rules=..", one per list)
        }
      ],
      "health": {                        # optional (version 2): guests whose agent was asked
        "guest/mc-lobby": {
          "running": true,               # Proxmox reports the guest running
          "reachable": true,             # its agent gave a valid `/status`
          "ready": true,                 # ... and says the game server is ready
          "error": null                  # why not, when it is not ready or not reachable
        }
      },
      "errors": {"velocity": "..."},     # optional (version 2): kinds whose observer failed,
                                         # with its message; such a kind is left out of `kinds`
      "serving": {                       # optional (version 2): what Traefik serves, per route
        "route/runtime/ide-alice": {     # the controller wrote (from Traefik's own API)
          "served": true,                # listed with status enabled or warning
          "status": "enabled",           # Traefik's status; null when it does not list it
          "errors": []                   # Traefik's error texts for the router
        },
        "route/core": {"served": null, "errors": ["..."]}   # an instance whose API failed
      },
      "cluster": {                       # optional (version 2): the Proxmox cluster's nodes,
        "nodes": {                       # from the same /cluster/resources answer as guests
          "pve-runtime": {
            "online": true,
            "maxcpu": 32,
            "maxmem": 137438953472,      # bytes, as Proxmox says
            "storages": {                # null: the answer listed no storage at all
              "local": {"content": ["backup", "iso", "vztmpl"], "shared": false,
                        "active": true,
                        "templates": ["local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst"]},
              "local-lvm": {"content": ["images", "rootdir"], "shared": false,
                            "active": true, "templates": null}   # null: not listed
            }
          }
        }
      },
      "backups": [                       # optional (version 2): the backups on the storages
        {"volid": "backup:backup/vzdump-lxc-1001-2026_12_02-02_00_00.tar.zst",   # the spec's
         "storage": "backup", "node": null,   # jobs write to; null: not listed
         "vmid": 1001, "ctime": 1764640800, "size": 1073741824,
         "notes": "mc-survival", "protected": false, "subtype": "lxc"}
      ],
      "backup_errors": {"backup": "..."}   # optional: storages whose listing failed (then
                                         # `backups` is null: unknown, not empty)
    }

Attributes of a foreign guest (not owned) hold at least `name`, `vmid` and `node`. An address
is claimed by one resource at most; more than one (a guest copied by hand, its mark with it)
are listed by `duplicates()`, and the planner makes that a plan error and touches none of them.

`health` holds an entry for every guest of a layer that runs agents (the `agent_port` policy's
layers), written by the live observation (`applying.observing.observe_all`): the guest's power state
from Proxmox, its agent's answer from `providers.agent`. The planner withholds Velocity
registrations (and routes set to `when_unready: withhold`) from guests that are not both running
and ready. An empty `health` means nobody asked, not that everything is healthy.

`cluster` holds what the planner's placement checks (`planning.placement`) compare the spec's
hosts with: the nodes, whether each is online, its size, and its storages. A storage's
`templates` are the container templates (`vztmpl` volumes) found on it, listed only where a
guest still to be created wants a template from it; null means nobody looked, so nothing is
checked against it. A missing `cluster` (an older snapshot, a partial observation such as the
service's edge poll) means the cluster was not observed: no placement check runs. It is not
part of the digest: a saved plan must not go stale because a node's memory figure moved.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from collections.abc import Iterable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from reconciler.model.resources import Kind

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def agent_ip(addresses: Iterable[object]) -> IpAddress | None:
    """The address a VM is reached at among its observed `addresses` (`10.0.20.77/24`, as its
    QEMU guest agent reports them): the first IPv4, else the first IPv6; None when there is
    none. The edge's backends (planning.backends) and the agents' health checks both use it."""
    found: list[IpAddress] = []
    for text in addresses:
        try:
            found.append(ipaddress.ip_interface(str(text)).ip)
        except ValueError:
            continue
    return next((ip for ip in found if ip.version == 4), found[0] if found else None)


FORMAT = "reconciler/observed-state"
FORMAT_VERSION = 2


class GuestHealth(BaseModel):
    """One guest's health, as the planner's readiness gate needs it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    running: bool = False
    reachable: bool = False
    ready: bool = False
    error: str | None = None
    crashes: int | None = None  # the agent's crash count since it started; None: unknown

    @property
    def serving(self) -> bool:
        """Running with a ready agent: only then is it registered and routed to."""
        return self.running and self.reachable and self.ready


class RouteServing(BaseModel):
    """What a Traefik instance does with a route the controller wrote, read from its API."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    served: bool | None = None  # None: not known (the instance's API did not answer)
    status: str | None = None
    errors: tuple[str, ...] = ()


class StorageFacts(BaseModel):
    """One storage as one node sees it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    content: tuple[str, ...] = ()  # what it takes: images, rootdir, vztmpl, iso, backup, ...
    shared: bool = False
    active: bool = True
    # Container templates on it (volids, `local:vztmpl/x.tar.zst`); None: not listed.
    templates: tuple[str, ...] | None = None


class NodeFacts(BaseModel):
    """One cluster node."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    online: bool = True
    maxcpu: int = 0
    maxmem: int = 0  # bytes
    # By storage id; None when the observation listed no storage at all (a token that may not
    # audit storage): unknown, not empty.
    storages: dict[str, StorageFacts] | None = None


class ClusterFacts(BaseModel):
    """The Proxmox cluster the guests live on: see the module docstring."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    nodes: dict[str, NodeFacts] = Field(default_factory=dict)


class BackupVolume(BaseModel):
    """One backup on a storage, from its content listing."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    volid: str  # `backup:backup/vzdump-lxc-1001-2026_12_02-02_00_00.tar.zst`
    storage: str
    node: str | None = None  # the node whose local storage holds it; None: a shared storage
    vmid: int
    ctime: int  # when the backup started, Unix seconds
    size: int = 0  # bytes
    notes: str = ""
    protected: bool = False
    subtype: str = ""  # lxc, qemu


class ObservedResource(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    address: str | None = None
    kind: Kind
    owned: bool = False
    id: dict[str, Any] = Field(default_factory=dict)
    attributes: dict[str, Any] = Field(default_factory=dict)
    # The outside system's version of what we saw (Proxmox's config digest): an update is sent
    # only against this version, so a change made by someone else in between is never overwritten.
    version: str | None = None

    @property
    def label(self) -> str:
        """How a person recognizes it: its address, or name and vmid for a foreign guest."""
        if self.address:
            return self.address
        name = self.attributes.get("name", "?")
        where = ", ".join(f"{k} {v}" for k, v in sorted(self.id.items()))
        return f"{self.kind.value} {name!r} ({where})"


class ObservedState(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["reconciler/observed-state"] = "reconciler/observed-state"
    format_version: Literal[1, 2] = 2
    platform: str | None = None
    observed_at: str | None = None
    source: str = ""
    # The kinds the observers looked at; None means every kind. Planning leaves the others alone.
    kinds: tuple[Kind, ...] | None = None
    resources: tuple[ObservedResource, ...] = ()
    # By guest address; see the module docstring.
    health: dict[str, GuestHealth] = Field(default_factory=dict)
    # Kinds whose observer failed (kind value -> message); those kinds are not in `kinds`.
    errors: dict[str, str] = Field(default_factory=dict)
    # By route address (or `route/<instance>` for an instance whose API failed). Not part of
    # the digest: no plan changes it, and a saved plan must not go stale when Traefik reloads.
    serving: dict[str, RouteServing] = Field(default_factory=dict)
    # The cluster's nodes and storages; None: not observed. Not part of the digest either.
    cluster: ClusterFacts | None = None
    # The backups on the spec's backup storages, oldest first per guest; None: not listed (or
    # a listing failed). Not part of the digest: a new backup must not stale a saved plan.
    backups: tuple[BackupVolume, ...] | None = None
    # Why the backups could not be listed (storage, or "cluster", -> message). With `backups`
    # None and nothing here, nobody looked (an older snapshot, no jobs): planning ignores them.
    backup_errors: dict[str, str] = Field(default_factory=dict)

    def digest(self) -> str:
        """Content hash of what was observed (not when): a saved plan applies only if it matches.
        Health counts (a plan withholds by it); without any, the digest is version 1's."""
        body: Any = sorted((r.model_dump(mode="json") for r in self.resources), key=_sort_key)
        if self.health:
            body = {
                "resources": body,
                "health": {a: h.model_dump(mode="json") for a, h in self.health.items()},
            }
        text = json.dumps(body, sort_keys=True, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(text.encode()).hexdigest()

    def owned(self) -> dict[str, ObservedResource]:
        """By address. An address that more than one resource claims (see `duplicates`) maps
        to one of them: the planner plans nothing for such an address."""
        return {r.address: r for r in self.resources if r.owned and r.address}

    def duplicates(self) -> dict[str, list[ObservedResource]]:
        """Addresses that more than one owned resource claims (a hand-made copy of a guest
        carries its mark), each with all of its claimants, in the order observed."""
        claims: dict[str, list[ObservedResource]] = {}
        for r in self.resources:
            if r.owned and r.address:
                claims.setdefault(r.address, []).append(r)
        return {a: rs for a, rs in sorted(claims.items()) if len(rs) > 1}

    def foreign(self) -> list[ObservedResource]:
        return [r for r in self.resources if not r.owned]


def _sort_key(r: dict[str, Any]) -> str:
    return json.dumps([r.get("kind"), r.get("address"), r.get("id")], sort_keys=True)


EMPTY = ObservedState()
