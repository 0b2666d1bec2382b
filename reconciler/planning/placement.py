"""Placement: can the live cluster hold what the plan would put on it? Checked before anything
is planned for a guest, so a typo in a host's node, a storage or a template is a plan error,
never a destroy followed by creates that fail (issue 12: `hosts.pve2.node: pve-2` destroyed four
guests).

Called by `planning.planner.make_plan`, first thing; pure. It runs only when the observed state
carries the cluster (`ObservedState.cluster`, filled by a live observation through the guest
provider's `observe_cluster`); an offline snapshot without it, or the service's edge poll, is
not checked.

What each desired guest is checked for, by what the plan would do with it:

- every guest: the node its host names exists in the cluster and is online, and so is the node
  it is on now (nothing can be done to a guest on an offline node, nor can it be moved away);
- a guest to be created (not observed), or moved (observed on another node): every disk's
  storage (`rootfs.storage`, each `volumes.*.storage`) exists on the node, is active and takes
  the guest's disks (`rootdir` for a container, `images` for a VM); a guest that stays where it
  is gets the same check for the disks that are new to it (a storage changed, a volume added);
- a guest to be created from a template (`template`, `local:vztmpl/x.tar.zst`): the template's
  storage exists on the node and takes `vztmpl`, and the template is on it when the observation
  listed that storage's templates, unless the spec declares it there with a url (`templates:`:
  the plan downloads it first). Never for a guest that exists: Proxmox keeps no record of its
  template, and nothing recreates it here;
- a node that guests move onto (a migration, or a replace that changes the node): its memory
  (`maxmem`) times `policies.capacity.memory_overcommit` holds the memory of the guests that will
  be on it: every guest observed there (foreign ones and templates too, by their `maxmem`),
  plus those moving in, less those moving out; a guest of the spec counts with the memory the
  spec gives it. Guests being created are not counted: the spec's own capacity policy covers
  them.

A guest that fails any check gets an error at its spec's file:line and nothing is planned for
it (no create, update, migrate or replace, nor its firewall): `Placement.unplaced` lists it.
Unknown facts are not failures: a node whose storages were not listed, a storage whose templates
were not listed, a node that reports no memory.

Not checked: bridges (`vmbrN` of a guest's NICs; it takes one more call per node, `GET
/nodes/{node}/network`: left for later), CPU, disk space.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from reconciler.model.diagnostics import Diagnostic, error, warning
from reconciler.model.observed import ClusterFacts, NodeFacts, ObservedResource, ObservedState
from reconciler.model.resources import DesiredGraph, Kind, Resource
from reconciler.planning import normalize

_MIB = 1024 * 1024
# What a storage must take for a guest's disks, by guest type.
_DISK_CONTENT = {"lxc": "rootdir", "qemu": "images"}


@dataclass(frozen=True)
class Placement:
    """What the checks found: guests that cannot go where the spec says, and why."""

    unplaced: frozenset[str] = frozenset()
    diagnostics: tuple[Diagnostic, ...] = ()


def check_placement(
    graph: DesiredGraph, observed: ObservedState, vmids: Mapping[str, int]
) -> Placement:
    """Check every desired guest against the observed cluster (see the module docstring).
    `vmids`: the planner's allocation. A guest we do not own whose vmid another guest holds is
    left to the planner's vmid checks (an adoption pending, a conflict): it is not created."""
    cluster = observed.cluster
    if cluster is None or (observed.kinds is not None and Kind.GUEST not in observed.kinds):
        return Placement()
    owned = {a: r for a, r in observed.owned().items() if r.kind is Kind.GUEST}
    held = {r.id.get("vmid") for r in observed.resources if r.kind is Kind.GUEST}
    guests = [
        r
        for r in graph.ordered()
        if r.kind is Kind.GUEST and (r.address in owned or vmids.get(r.address) not in held)
    ]
    problems: dict[str, list[Diagnostic]] = {}
    for res in guests:
        found = _check_guest(graph, cluster, res, owned.get(res.address))
        if found:
            problems[res.address] = found
    moving = {
        r.address: r
        for r in guests
        if r.address in owned
        and r.address not in problems
        and owned[r.address].id.get("node") != r.attributes.get("node")
    }
    for address, diag in _check_memory(graph, cluster, observed, moving, problems):
        problems.setdefault(address, []).append(diag)
    diags = [d for found in problems.values() for d in found]
    diags += _check_backup_storages(graph, cluster)
    return Placement(frozenset(problems), tuple(diags))


def _check_backup_storages(graph: DesiredGraph, cluster: ClusterFacts) -> list[Diagnostic]:
    """A backup job's storage is there and takes backups on some online node: otherwise every
    run of the job fails (a warning: the job itself can still be written, and fixed there)."""
    out: list[Diagnostic] = []
    for res in graph.ordered():
        if res.kind is not Kind.BACKUP_JOB:
            continue
        storage = str(res.attributes["storage"])
        seen = [
            st
            for node in cluster.nodes.values()
            if node.online and node.storages is not None
            for sid, st in node.storages.items()
            if sid == storage
        ]
        if any(node.storages is None for node in cluster.nodes.values()):
            continue  # the storages could not be listed: nothing to say
        if not seen:
            why = f"storage {storage!r} is on no online node"
        elif not any(st.active and "backup" in st.content for st in seen):
            why = f"storage {storage!r} does not take backups (content: backup) or is inactive"
        else:
            continue
        out.append(
            warning(
                "backup-storage",
                f"{res.address}: {why}; every run of the job would fail",
                position=res.position,
                address=res.address,
            )
        )
    return out


# --- one guest ---------------------------------------------------------------------------------


def _check_guest(
    graph: DesiredGraph, cluster: ClusterFacts, res: Resource, obs: ObservedResource | None
) -> list[Diagnostic]:
    attrs = res.attributes
    node = str(attrs.get("node"))
    here = str(obs.id.get("node")) if obs is not None else None
    target = cluster.nodes.get(node)
    if target is None:
        return [_unknown_node(graph, cluster, res, node)]
    out: list[Diagnostic] = []
    if not target.online:
        out.append(_offline(res, node, "the node its host names"))
    if here is not None and here != node:
        source = cluster.nodes.get(here)
        if source is not None and not source.online:
            out.append(_offline(res, here, "the node it is on now"))
    if out:
        return out
    kind = str(attrs.get("type", "lxc"))
    for path, storage in _new_disks(attrs, obs, here != node):
        problem = _storage_problem(node, target, storage, _DISK_CONTENT.get(kind, "images"))
        if problem is not None:
            out.append(_diag(res, "storage-unusable", f"{path} {storage!r}: {problem}"))
    template = attrs.get("template")
    if obs is None and kind == "lxc" and template:
        fetched = _downloaded_first(graph, res)
        problem = _template_problem(node, target, str(template), fetched)
        if problem is not None:
            out.append(_diag(res, "template-missing", problem))
    return out


def _new_disks(
    attrs: Mapping[str, Any], obs: ObservedResource | None, moves: bool
) -> list[tuple[str, str]]:
    """(path, storage) of the disks the plan would allocate or move onto the node: all of them
    for a guest created or moved, else those whose storage is new to the guest."""
    have: dict[str, str | None] = {}
    if obs is not None and not moves:
        have["rootfs.storage"] = _storage_of(obs.attributes.get("rootfs"))
        for key, value in (obs.attributes.get("volumes") or {}).items():
            have[f"volumes.{key}.storage"] = _storage_of(value)
    wanted: list[tuple[str, str]] = []
    rootfs = _storage_of(attrs.get("rootfs"))
    if rootfs:
        wanted.append(("rootfs.storage", rootfs))
    for key, value in sorted((attrs.get("volumes") or {}).items()):
        storage = _storage_of(value)
        if storage:
            wanted.append((f"volumes.{key}.storage", storage))
    if obs is None or moves:
        return wanted
    return [(path, storage) for path, storage in wanted if have.get(path) != storage]


def _storage_of(value: Any) -> str | None:
    if not value:
        return None
    return normalize.rootfs(value).get("storage")


def _storage_problem(name: str, node: NodeFacts, storage: str, content: str) -> str | None:
    if node.storages is None:
        return None  # not listed: unknown
    found = node.storages.get(storage)
    if found is None:
        return f"node {name} has no such storage (it has {_names(node.storages)})"
    if not found.active:
        return f"not active on node {name}"
    if content not in found.content:
        takes = ", ".join(found.content) or "nothing"
        return f"does not take {content} on node {name} (it takes {takes})"
    return None


def _downloaded_first(graph: DesiredGraph, res: Resource) -> bool:
    """The guest depends on a declared template with a url: downloaded before it is created."""
    return any(
        (dep := graph.resources.get(address)) is not None
        and dep.kind is Kind.TEMPLATE
        and bool(dep.attributes.get("url"))
        for address in res.depends_on
    )


def _template_problem(
    name: str, node: NodeFacts, template: str, fetched: bool = False
) -> str | None:
    storage, sep, _ = template.partition(":")
    if not sep or node.storages is None:
        return None
    found = node.storages.get(storage)
    if found is None:
        return (
            f"template {template!r}: node {name} has no storage {storage!r} "
            f"(it has {_names(node.storages)})"
        )
    if "vztmpl" not in found.content:
        return (
            f"template {template!r}: storage {storage!r} on node {name} does not hold "
            "container templates"
        )
    if found.templates is not None and template not in found.templates and not fetched:
        have = ", ".join(found.templates[:5]) or "none"
        more = f" and {len(found.templates) - 5} more" if len(found.templates) > 5 else ""
        return (
            f"template {template!r} is not on node {name} (its storage {storage!r} has "
            f"{have}{more}); download it there first (`pveam download {storage} NAME`)"
        )
    return None


def _unknown_node(
    graph: DesiredGraph, cluster: ClusterFacts, res: Resource, node: str
) -> Diagnostic:
    hosts: Mapping[str, Mapping[str, Any]] = graph.settings.get("hosts", {})
    naming = [
        (h, bool(v.get("node_set"))) for h, v in sorted(hosts.items()) if v.get("node") == node
    ]
    if not naming:
        said = f"its node {node!r} is not in the cluster"
    else:
        said = "; ".join(
            f"hosts.{h}.node is {node!r}"
            if explicit
            else f"host {h!r} names node {node!r} (hosts.{h} has no node: its key is the name)"
            for h, explicit in naming
        )
    where = next((f"hosts.{h}.node" for h, explicit in naming if explicit), "")
    return _diag(
        res,
        "unknown-node",
        f"{said}; the cluster has {_names(cluster.nodes)}",
        path=where,
    )


def _offline(res: Resource, node: str, which: str) -> Diagnostic:
    return _diag(res, "node-offline", f"node {node} ({which}) is offline")


def _diag(res: Resource, code: str, what: str, *, path: str = "") -> Diagnostic:
    return error(
        code,
        f"{res.address}: {what}. Nothing is planned for this guest",
        position=res.position,
        address=res.address,
        path=path,
    )


def _names(items: Iterable[str]) -> str:
    return ", ".join(sorted(items)) or "none"


# --- capacity of the nodes guests move onto ------------------------------------------------------


def _check_memory(
    graph: DesiredGraph,
    cluster: ClusterFacts,
    observed: ObservedState,
    moving: Mapping[str, Resource],
    problems: Mapping[str, list[Diagnostic]],
) -> list[tuple[str, Diagnostic]]:
    overcommit = float(graph.settings.get("memory_overcommit", 1.0))
    into: dict[str, list[Resource]] = {}
    for res in moving.values():
        into.setdefault(str(res.attributes.get("node")), []).append(res)
    out: list[tuple[str, Diagnostic]] = []
    for node, arriving in sorted(into.items()):
        facts = cluster.nodes[node]
        if not facts.maxmem:
            continue  # no figure: unknown
        staying = 0
        for r in observed.resources:
            if r.kind is not Kind.GUEST or r.id.get("node") != node:
                continue
            if r.address in moving:
                continue  # moving out (a guest moving in is observed elsewhere)
            staying += _memory(graph, r)
        incoming = sum(_mib(res.attributes.get("memory")) for res in arriving)
        total = staying + incoming
        has = facts.maxmem // _MIB
        limit = int(has * overcommit)
        if total <= limit:
            continue
        names = ", ".join(
            f"{r.address} {_size(_mib(r.attributes.get('memory')))}" for r in arriving
        )
        for res in arriving:
            if res.address in problems:
                continue
            out.append(
                (
                    res.address,
                    _diag(
                        res,
                        "node-memory",
                        f"node {node} cannot take it: {_size(total)} of guest memory would be "
                        f"on it ({_size(staying)} there, {_size(incoming)} moving in: "
                        f"{names}); it has {_size(has)} x memory_overcommit {overcommit:g} = "
                        f"{_size(limit)}",
                    ),
                )
            )
    return out


def _memory(graph: DesiredGraph, r: ObservedResource) -> int:
    """MiB a guest will have after the plan: the spec's for a guest of the spec, else what was
    observed (a foreign guest's `maxmem`)."""
    res = graph.resources.get(r.address or "")
    if r.owned and res is not None:
        return _mib(res.attributes.get("memory"))
    return _mib(r.attributes.get("memory"))


def _mib(value: Any) -> int:
    if value in (None, "") or isinstance(value, bool):
        return 0
    return int(normalize.memory(value))


def _size(mib: int) -> str:
    return f"{mib / 1024:g} GiB" if mib >= 1024 else f"{mib} MiB"
