"""What a plan was made from, and whether a saved plan still says what a fresh one does.

A saved plan (`plan --out`) is a request, never an authority: `apply --plan` plans again from
the same specs, the same observed state and the same options, and applies the fresh plan only
if its changes are the saved plan's (README "Plans"). This module holds the two pure pieces of
that check: `spec_digest`, the hash of the desired graph that `planner.make_plan` records in
every plan, and `first_difference`, the comparison the CLI's `apply --plan` makes.

It also says where a plan's guests come from, for the planner's messages: `spec_directory`
(the directory the graph's files were read from, so a hint names the exact command, `reconciler
adopt guest/x --dir imported`), `adopted_into` (the spec directory an owned guest's mark says
`reconciler adopt` read, its `adopted=` field: when the guest is missing from a spec read from
another directory, it lives there, not gone from the platform), `same_directory` (whether that
is the directory a plan read), and, for marks written before that field,
`adopted_from_import` (the mark names the template `reconciler import` writes when Proxmox
did not record one: adopted from imported specs, directory unknown).

What the spec digest covers: every resource's address, kind, attributes, dependencies and what
it is attached to, and the platform's settings (among them what gates destroys: `prune` and
`max_deletes_per_run`). Not where in the files a resource was written, so moving a definition
to another file or editing a YAML comment keeps it.
"""

from __future__ import annotations

import hashlib
import json
import os.path
import re
import shlex
from collections.abc import Mapping
from typing import Any

from reconciler.model.plans import Change, Plan
from reconciler.model.resources import DesiredGraph

# The template `reconciler import` writes for a container (Proxmox does not record the one it
# was made from), and `adopt` copies into the guest's mark: a storage named `unknown`, so a
# re-create fails loudly instead of installing the wrong system. Nothing else writes it.
IMPORT_TEMPLATE = "unknown:vztmpl/{ostype}-imported.tar.zst"
_IMPORT_TEMPLATE = re.compile(r"unknown:vztmpl/[a-z0-9-]*-imported\.tar\.zst")


def adopted_from_import(attributes: Mapping[str, Any]) -> bool:
    """Whether an observed guest was adopted from specs `reconciler import` wrote: its mark
    (read into `template`) names the import's placeholder template. A VM's mark names no
    template, so for a VM this cannot be told. The fallback for a mark without `adopted=`."""
    return bool(_IMPORT_TEMPLATE.fullmatch(str(attributes.get("template") or "")))


def adopted_into(attributes: Mapping[str, Any]) -> str | None:
    """The spec directory an observed guest was adopted from, as `reconciler adopt` was given
    it (its mark's `adopted=`, read into the attribute `adopted`); None for a mark without it
    (written before marks named it, or by a create)."""
    directory = attributes.get("adopted")
    return str(directory) if directory else None


def same_directory(adopted: str, here: str) -> bool:
    """Whether a guest adopted from `adopted` belongs to the specs read from `here` (the deepest
    folder holding every spec file of a plan, `spec_directory`): one is the other or holds it.
    A spec directory is read with its subdirectories, so `adopt --dir specs` and a plan whose
    files all sit in `specs/guests/` read the same specs, and so do `specs/guests` and
    `specs`. Relative names are taken from the current directory, as the command line does."""
    a, b = os.path.abspath(adopted), os.path.abspath(here)
    try:
        common = os.path.commonpath([a, b])
    except ValueError:  # two drives: nothing in common
        return False
    return common in (a, b)


def spec_directory(graph: DesiredGraph) -> str | None:
    """The directory the graph's spec files were read from, as the command line named it
    (`imported`, `specs`): the deepest folder holding every file a resource was written in.
    None when no resource has a position (a graph built without its source)."""
    folders = {os.path.dirname(r.position.file) for r in graph.resources.values() if r.position}
    if not folders:
        return None
    try:
        return os.path.commonpath(sorted(folders)) or "."
    except ValueError:  # absolute and relative names mixed: nothing in common
        return None


def adopt_command(address: str, spec_dir: str | None) -> str:
    """`reconciler adopt guest/x --dir imported`: the command that adopts `address` from the
    specs in `spec_dir` (left out when not known)."""
    where = f" --dir {shlex.quote(spec_dir)}" if spec_dir else ""
    return f"reconciler adopt {address}{where}"


def spec_digest(graph: DesiredGraph) -> str:
    body = {
        "platform": graph.platform,
        "resources": [
            {
                "address": r.address,
                "kind": r.kind.value,
                "attributes": _plain(r.attributes),
                "depends_on": list(r.depends_on),
                "attached_to": r.attached_to,
            }
            for r in sorted(graph.resources.values(), key=lambda r: r.address)
        ],
        "settings": _plain(graph.settings),
    }
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def _plain(value: Any) -> Any:
    """Attributes and settings as JSON takes them (a read-only mapping is still a mapping)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


# The order in which two versions of one change are told apart: what it does first.
_KEYS = (
    "action",
    "blocked",
    "destroys",
    "final_backup",
    "id",
    "fields",
    "after",
    "before",
    "version",
    "kind",
    "wave",
    "depends_on",
    "cause",
)


def first_difference(saved: Plan, fresh: Plan) -> str | None:
    """None when the saved plan's changes are the fresh plan's, every one of them as the JSON
    file holds it; else the first difference, one line for people, in the fresh plan's order:
    `guest/mc-x: the file says delete, a fresh plan says no-op`."""
    theirs = _by_address(saved.changes)
    ours = _by_address(fresh.changes)
    for address in [*ours, *(a for a in theirs if a not in ours)]:
        file_says, fresh_says = theirs.get(address, []), ours.get(address, [])
        if not file_says:
            return f"{address}: a fresh plan says {fresh_says[0]['action']}, the file has nothing"
        if not fresh_says:
            return (
                f"{address}: the file says {file_says[0]['action']}, a fresh plan has nothing "
                "for it"
            )
        if len(file_says) != len(fresh_says):
            return f"{address}: the file has {len(file_says)} changes for it, a fresh plan has 1"
        for one, other in zip(file_says, fresh_says, strict=True):
            why = _differs(address, one, other)
            if why is not None:
                return why
    return None


def _by_address(changes: tuple[Change, ...]) -> dict[str, list[dict[str, Any]]]:
    """Each change in its canonical form: its JSON, through JSON (tuples are lists there)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for c in changes:
        out.setdefault(c.address, []).append(json.loads(json.dumps(c.to_json())))
    return out


def _differs(address: str, file_says: dict[str, Any], fresh_says: dict[str, Any]) -> str | None:
    for key in _KEYS:
        one, other = file_says.get(key), fresh_says.get(key)
        if one == other:
            continue
        if key == "action":
            return f"{address}: the file says {one}, a fresh plan says {other}"
        if key == "blocked":
            if not one:
                return f"{address}: the file lets it run, a fresh plan holds it back ({other})"
            if not other:
                return f"{address}: the file holds it back, a fresh plan lets it run"
        if key == "destroys":
            return (
                f"{address}: the file says it destroys {_listed(one)}, a fresh plan says it "
                f"destroys {_listed(other)}"
            )
        if key == "fields":
            return _field_difference(address, one or [], other or [])
        return f"{address}: its {key}: the file says {_short(one)}, a fresh plan {_short(other)}"
    return None


def _field_difference(address: str, file_says: list[Any], fresh_says: list[Any]) -> str:
    theirs = {f.get("path"): f for f in file_says if isinstance(f, dict)}
    ours = {f.get("path"): f for f in fresh_says if isinstance(f, dict)}
    for path in [*ours, *(p for p in theirs if p not in ours)]:
        one, other = theirs.get(path), ours.get(path)
        if one == other:
            continue
        if one is None:
            return f"{address}: a fresh plan changes {path}, the file does not"
        if other is None:
            return (
                f"{address}: the file changes {path} to {_short(one.get('after'))}, a fresh "
                "plan does not"
            )
        if one.get("after") != other.get("after"):
            one, other = one.get("after"), other.get("after")
        return f"{address}: {path}: the file says {_short(one)}, a fresh plan says {_short(other)}"
    return f"{address}: its fields: the file lists them otherwise than a fresh plan"


def _listed(items: Any) -> str:
    return ", ".join(str(i) for i in items) if items else "nothing"


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."
