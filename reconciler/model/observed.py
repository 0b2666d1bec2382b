"""Observed state: what the observers saw, as a versioned, documented JSON snapshot.

`reconciler observe --out FILE` writes it, `reconciler plan --observed FILE` reads it, and the
controller publishes its latest one so CI can plan without reaching Proxmox.

Format (version 1):

    {
      "format": "reconciler/observed-state",
      "format_version": 1,
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
      ]
    }

Attributes of a foreign guest (not owned) hold at least `name`, `vmid` and `node`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from reconciler.model.resources import Kind

FORMAT = "reconciler/observed-state"
FORMAT_VERSION = 1


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
    format_version: Literal[1] = 1
    platform: str | None = None
    observed_at: str | None = None
    source: str = ""
    # The kinds the observers looked at; None means every kind. Planning leaves the others alone.
    kinds: tuple[Kind, ...] | None = None
    resources: tuple[ObservedResource, ...] = ()

    def digest(self) -> str:
        """Content hash of what was observed (not when): a saved plan applies only if it matches."""
        body = [r.model_dump(mode="json") for r in self.resources]
        text = json.dumps(sorted(body, key=_sort_key), sort_keys=True, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(text.encode()).hexdigest()

    def owned(self) -> dict[str, ObservedResource]:
        return {r.address: r for r in self.resources if r.owned and r.address}

    def foreign(self) -> list[ObservedResource]:
        return [r for r in self.resources if not r.owned]


def _sort_key(r: dict[str, Any]) -> str:
    return json.dumps([r.get("kind"), r.get("address"), r.get("id")], sort_keys=True)


EMPTY = ObservedState()
