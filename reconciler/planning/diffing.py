"""Field-by-field differences between a normalized desired and observed resource.

The planner decides update or replace from `FieldChange.forces_replace`; the rules for which
fields cannot change in place live here, per kind, in one table.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import replace
from typing import Any

from reconciler.model.plans import FieldChange
from reconciler.model.resources import Kind
from reconciler.model.units import parse_mib

# Fields Proxmox cannot change in place: changing them means destroy and create, except that
# the planner turns a change of `node` (with or without the disks' storage) into a migration.
FORCES_REPLACE: dict[Kind, frozenset[str]] = {
    Kind.GUEST: frozenset({"vmid", "node", "type", "unprivileged", "rootfs.storage"}),
}

# Fields that are ours alone and never observed (the role is read back from the vmid's range;
# the Velocity bridge knows a server's name, address and port only, not its forced host). A
# guest's template is used once, to create it: Proxmox keeps no record of it, so a template
# that differs on an existing guest (an imported guest's placeholder, a newer image) is not a
# change, and never a reason to destroy a guest. `adopted` (the spec directory its mark says
# it was adopted from) is observed for the planner's messages only: no spec sets it.
NOT_COMPARED: dict[Kind, frozenset[str]] = {
    # A clone's template, like a container's, is used once (and a cloud-init password's
    # reference is read when applying: only whether one is set is compared, `cloud_init`).
    # A guest's `pool` is the one it is created into: its pool's `members` are compared.
    Kind.GUEST: frozenset(
        {"role", "template", "restore_missing", "adopted", "clone", "cloud_init_password", "pool"}
    ),
    Kind.VELOCITY: frozenset({"forced_host"}),
    # Readiness policy of the controller: it is acted on, never written to Traefik. The feed
    # is where a route is read from, not part of it (a lab may feed an instance by file).
    Kind.ROUTE: frozenset({"when_unready", "feed"}),
    # A job's selection is compared as the vmids the planner resolves it to; its freshness
    # limit is the controller's policy, not Proxmox's; its id names the job to create (an
    # existing one is found by its mark, and keeps its id).
    Kind.BACKUP_JOB: frozenset({"guests", "max_age", "id"}),
    # How to get a template's file: Proxmox keeps no record of either. The file is what counts.
    Kind.TEMPLATE: frozenset({"url", "checksum"}),
    # A pool's members are compared as guest addresses; their vmids are what apply sends.
    Kind.POOL: frozenset({"vmids"}),
    # Whose HA resource it is: its sid (the change's id) says it to Proxmox.
    Kind.HA: frozenset({"guest", "type"}),
}

# Fields an observer may be unable to see: compared only when the observed side has them.
OPTIONAL_OBSERVED: dict[Kind, frozenset[str]] = {}


def diff(kind: Kind, desired: dict[str, Any], observed: dict[str, Any]) -> list[FieldChange]:
    """Top level: only the keys the spec manages. Below it, both sides' keys count."""
    out: list[FieldChange] = []
    skip = NOT_COMPARED.get(kind, frozenset())
    optional = OPTIONAL_OBSERVED.get(kind, frozenset())
    forced = FORCES_REPLACE.get(kind, frozenset())
    for key in sorted(desired):
        if key in skip or (key in optional and observed.get(key) is None):
            continue
        _walk(observed.get(key), desired[key], key, out)
    return [replace(c, forces_replace=c.path in forced) for c in out]


def shrinks(kind: Kind, change: FieldChange) -> bool:
    """A disk (the root disk, a volume) made smaller: Proxmox cannot, and the planner never
    destroys a disk to get there; it is a plan error."""
    if kind is not Kind.GUEST or not change.path.endswith(".size"):
        return False
    if not (change.path == "rootfs.size" or change.path.startswith("volumes.")):
        return False
    if not change.before or not change.after:
        return False
    return parse_mib(change.after, bare_unit="G") < parse_mib(change.before, bare_unit="G")


def _walk(before: Any, after: Any, path: str, out: list[FieldChange]) -> None:
    if before == after:
        return
    if isinstance(before, dict) and isinstance(after, dict):
        for key in sorted(set(before) | set(after)):
            _walk(before.get(key), after.get(key), f"{path}.{key}", out)
        return
    if (
        isinstance(before, list)
        and isinstance(after, list)
        and all(isinstance(x, dict) for x in before + after)
    ):
        _walk_ordered(before, after, path, out)
        return
    out.append(FieldChange(path, before, after))


def _walk_ordered(
    before: list[dict[str, Any]], after: list[dict[str, Any]], path: str, out: list[FieldChange]
) -> None:
    """Ordered lists (firewall rules): match items by content so an insertion shows as one
    inserted item, not as every later item changed. Indexes are the desired positions; a
    removed item keeps its observed index.

    An item removed in one place and inserted unchanged in another is one move
    (`moved_from`). What is left of a block replaced by as many items is compared item by
    item, so a rule whose source was widened shows as that one field."""
    keys = (
        [json.dumps(x, sort_keys=True) for x in before],
        [json.dumps(x, sort_keys=True) for x in after],
    )
    matcher = difflib.SequenceMatcher(a=keys[0], b=keys[1], autojunk=False)
    blocks = [
        (list(range(i1, i2)), list(range(j1, j2)))
        for op, i1, i2, j1, j2 in matcher.get_opcodes()
        if op != "equal"
    ]
    # Moves first, across blocks: each inserted item takes the first removed twin.
    removed = [i for gone, _ in blocks for i in gone]
    moved: dict[int, int] = {}  # desired index -> observed index
    for _, added in blocks:
        for j in added:
            twin = next((i for i in removed if keys[0][i] == keys[1][j]), None)
            if twin is not None:
                removed.remove(twin)
                moved[j] = twin
    taken = set(moved.values())
    found: list[tuple[int, list[FieldChange]]] = []  # (position, its changes), to sort
    for gone, added in blocks:
        gone = [i for i in gone if i not in taken]
        new = [j for j in added if j not in moved]
        if gone and len(gone) == len(new):
            for i, j in zip(gone, new, strict=True):
                item: list[FieldChange] = []
                _walk(before[i], after[j], f"{path}[{j}]", item)
                found.append((j, item))
            continue
        found.extend((i, [FieldChange(f"{path}[{i}]", before[i], None)]) for i in gone)
        found.extend((j, [FieldChange(f"{path}[{j}]", None, after[j])]) for j in new)
    for j, i in moved.items():
        move = FieldChange(f"{path}[{j}]", before[i], after[j], moved_from=f"{path}[{i}]")
        found.append((j, [move]))
    for _, changes in sorted(found, key=lambda item: item[0]):
        out.extend(changes)
