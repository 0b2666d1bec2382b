"""Structural checks every platform gets, whatever its policies: references resolve, names and
vmids are unique, dependencies have no cycle, hosts have room, routes and proxy names do not
collide, volumes fit their guest's kind, no description or firewall comment reads as the
controller's ownership mark. Design rules a platform opts into live in `policies`.

Each check yields diagnostics and never stops at the first; `run_all` is called by the loader
once the spec has validated.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections import defaultdict
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import Any

from reconciler.loading.dns_records import check_dns
from reconciler.loading.pools_ha import check_pools_and_ha
from reconciler.loading.provisioning import check_provisioning
from reconciler.loading.sources import PathT, Source, spec_error, written_at
from reconciler.loading.templates import check_templates
from reconciler.model.diagnostics import Diagnostic
from reconciler.model.resources import job_id
from reconciler.model.spec import (
    FirewallRule,
    GuestSpec,
    HttpRoute,
    PlatformSpec,
    PveWebhook,
    Volume,
    selected_guests,
    volume_kind,
)

Check = Callable[[PlatformSpec, Source], Iterator[Diagnostic]]


def _missing(kind: str, name: str, known: Collection[str]) -> str:
    close = difflib.get_close_matches(name, [str(k) for k in known], n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{kind} {name!r} is not defined{hint}"


def check_references(spec: PlatformSpec, source: Source) -> Iterator[Diagnostic]:
    """Every name a spec mentions exists."""
    for ref in _references(spec):
        if ref.name not in ref.known:
            message = _missing(ref.kind, ref.name, ref.known) + ref.note
            yield spec_error(source, "unknown-reference", message, ref.path)
    yield from _self_dependencies(spec, source)
    yield from _unmanaged_declared(spec, source)
    yield from _firewall_names(spec, source)


@dataclass(frozen=True)
class _Ref:
    """A name the spec mentions at `path`, of `kind`, which `known` must hold."""

    path: PathT
    kind: str
    name: str
    known: Collection[str]
    note: str = ""


def _references(spec: PlatformSpec) -> Iterator[_Ref]:
    layers, guests = spec.layers, spec.guests
    for lname, layer in layers.items():
        for i, dep in enumerate(layer.may_depend_on):
            yield _Ref(("layers", lname, "may_depend_on", i), "layer", dep, layers)
    for hname, host in spec.hosts.items():
        for i, name in enumerate(host.layers):
            yield _Ref(("hosts", hname, "layers", i), "layer", name, layers)
    for rname, rng in spec.ranges.items():
        yield _Ref(("ranges", rname, "layer"), "layer", rng.layer, layers)
    for gname, guest in guests.items():
        at: PathT = ("guests", gname)
        note = " (roles are the keys of 'ranges')"
        yield _Ref((*at, "role"), "role", guest.role, spec.ranges, note)
        yield _Ref((*at, "host"), "host", guest.host, spec.hosts)
        for i, dep in enumerate(guest.depends_on):
            yield _Ref((*at, "depends_on", i), "guest", dep, guests)
        if guest.pool is not None:
            note = " (a guest's pool is one the spec declares under 'pools')"
            yield _Ref((*at, "pool"), "pool", guest.pool, spec.pools, note)
    for path, rule in _firewall_rules(spec):
        # Only a guest's rules refer to security groups: Proxmox does not nest them.
        if path[0] == "guests" and rule.type == "group":
            yield _Ref((*path, "action"), "security group", rule.action, spec.firewall.groups)
    for iname, inst in spec.traefik.items():
        yield _Ref(("traefik", iname, "guest"), "guest", inst.guest, guests)
        for i, name in enumerate(inst.routes_to):
            yield _Ref(("traefik", iname, "routes_to", i), "layer", name, layers)
        for rname, route in inst.routes.items():
            path = ("traefik", iname, "routes", rname, "target", "guest")
            yield _Ref(path, "guest", route.target.guest, guests)
    if spec.velocity:
        yield _Ref(("velocity", "guest"), "guest", spec.velocity.guest, guests)
        for sname, server in spec.velocity.servers.items():
            yield _Ref(("velocity", "servers", sname, "guest"), "guest", server.guest, guests)
    for jname, job in spec.backups.items():
        at = ("backups", jname, "select")
        for i, role in enumerate(job.select.roles):
            yield _Ref((*at, "roles", i), "role", role, spec.ranges)
        for field in ("guests", "exclude"):
            for i, name in enumerate(getattr(job.select, field)):
                yield _Ref((*at, field, i), "guest", name, guests)


def _self_dependencies(spec: PlatformSpec, source: Source) -> Iterator[Diagnostic]:
    for gname, guest in spec.guests.items():
        for i, dep in enumerate(guest.depends_on):
            if dep == gname:
                yield spec_error(
                    source,
                    "dependency-cycle",
                    f"guest {gname!r} depends on itself",
                    ("guests", gname, "depends_on", i),
                )


def _unmanaged_declared(spec: PlatformSpec, source: Source) -> Iterator[Diagnostic]:
    if not spec.velocity:
        return
    declared = {name.lower() for name in spec.velocity.servers}
    for i, name in enumerate(spec.velocity.unmanaged):
        if name.lower() in declared:
            yield spec_error(
                source,
                "velocity-unmanaged-declared",
                f"velocity server {name!r} is both declared in `servers` and listed as "
                "unmanaged; drop one of them",
                ("velocity", "unmanaged", i),
            )


def _firewall_names(spec: PlatformSpec, source: Source) -> Iterator[Diagnostic]:
    """The IP sets (`+name`) and aliases a firewall rule's source or dest names exist."""
    known_sets = set(spec.firewall.ipsets)
    known_aliases = set(spec.firewall.aliases)
    for path, value in _firewall_addresses(spec):
        for part in value.split(","):
            part = part.strip()
            if part.startswith("+"):
                kind, name, known = "IP set", part[1:].removeprefix("dc/"), known_sets
            elif part and not _looks_like_ip(part):
                kind, name, known = "alias", part.removeprefix("dc/"), known_aliases
            else:
                continue
            if name not in known:
                yield spec_error(source, "unknown-reference", _missing(kind, name, known), path)


def _looks_like_ip(value: str) -> bool:
    for piece in value.split("-"):
        try:
            ipaddress.ip_network(piece, strict=False)
        except ValueError:
            return False
    return True


def _firewall_rules(spec: PlatformSpec) -> Iterator[tuple[PathT, FirewallRule]]:
    """Every firewall rule the spec writes, security groups' first, with its path."""
    for gname, group in spec.firewall.groups.items():
        for i, rule in enumerate(group.rules):
            yield ("firewall", "groups", gname, "rules", i), rule
    for gname, guest in spec.guests.items():
        for i, rule in enumerate(guest.firewall.rules if guest.firewall else ()):
            yield ("guests", gname, "firewall", "rules", i), rule


def _firewall_addresses(spec: PlatformSpec) -> Iterator[tuple[PathT, str]]:
    for path, rule in _firewall_rules(spec):
        for f in ("source", "dest"):
            v = getattr(rule, f)
            if v:
                yield (*path, f), v


def check_unique(spec: PlatformSpec, source: Source) -> Iterator[Diagnostic]:
    """Vmids and hostnames are unique; two hosts are not the same Proxmox node."""
    by_vmid: dict[int, list[str]] = defaultdict(list)
    by_hostname: dict[str, list[str]] = defaultdict(list)
    for gname, guest in spec.guests.items():
        if guest.vmid is not None:
            by_vmid[guest.vmid].append(gname)
        by_hostname[guest.hostname or gname].append(gname)
    vmids = {f"vmid {vmid}": names for vmid, names in by_vmid.items()}
    yield from _already_used(source, "duplicate-vmid", vmids, "vmid")
    # A guest without `hostname:` is named by its key: point there.
    hostnames = {f"hostname {hostname!r}": names for hostname, names in by_hostname.items()}
    yield from _already_used(source, "duplicate-name", hostnames, "hostname", key=True)
    by_node: dict[str, list[str]] = defaultdict(list)
    for hname in spec.hosts:
        by_node[spec.node_of(hname)].append(hname)
    for node, names in by_node.items():
        for other in names[1:]:
            yield spec_error(
                source,
                "duplicate-name",
                f"host {other!r} names node {node!r}, already used by host {names[0]!r}",
                ("hosts", other, "node"),
                key=True,
            )


def _already_used(
    source: Source, code: str, users: dict[str, list[str]], field: str, *, key: bool = False
) -> Iterator[Diagnostic]:
    """Each guest after the first that uses one value ("vmid 101": [guests]) is a clash, at its
    `field`, naming the first and where it is written."""
    for what, names in users.items():
        first: PathT = ("guests", names[0], field)
        for other in names[1:]:
            yield spec_error(
                source,
                code,
                f"{what} is already used by guest {names[0]!r}{written_at(source, first)}",
                ("guests", other, field),
                key=key,
                related=first,
            )


def check_cycles(spec: PlatformSpec, source: Source) -> Iterator[Diagnostic]:
    """depends_on must form no cycle (routes may point back; they order nothing)."""
    graph: dict[str, list[str]] = {
        g: [d for d in spec.guests[g].depends_on if d in spec.guests] for g in spec.guests
    }
    state: dict[str, int] = {}
    reported: set[frozenset[str]] = set()
    stack: list[str] = []

    def visit(node: str) -> Iterator[Diagnostic]:
        state[node] = 1
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :]
                key = frozenset(cycle)
                if key not in reported and len(cycle) > 1:
                    reported.add(key)
                    first = min(cycle)
                    i = cycle.index(first)
                    ordered = cycle[i:] + cycle[:i] + [first]
                    yield spec_error(
                        source,
                        "dependency-cycle",
                        "depends_on forms a cycle: " + " -> ".join(ordered),
                        ("guests", first, "depends_on"),
                        key=True,
                    )
            elif nxt not in state:
                yield from visit(nxt)
        stack.pop()
        state[node] = 2

    for g in sorted(graph):
        if g not in state:
            yield from visit(g)


def check_capacity(spec: PlatformSpec, source: Source) -> Iterator[Diagnostic]:
    """Guests on a host fit its cores and memory, times the declared overcommit."""
    pol = spec.policies.capacity
    if not pol.enabled:
        return
    cores: dict[str, int] = defaultdict(int)
    memory: dict[str, int] = defaultdict(int)
    for guest in spec.guests.values():
        cores[guest.host] += guest.cores
        memory[guest.host] += guest.memory
    for hname, host in spec.hosts.items():
        limit_cores = host.capacity.cores * pol.cpu_overcommit
        limit_mem = host.capacity.memory * pol.memory_overcommit
        if cores[hname] > limit_cores:
            yield spec_error(
                source,
                "capacity",
                f"guests on host {hname!r} ask for {cores[hname]} cores; it has "
                f"{host.capacity.cores} x overcommit {pol.cpu_overcommit:g} = {limit_cores:g}",
                ("hosts", hname, "capacity", "cores"),
            )
        if memory[hname] > limit_mem:
            yield spec_error(
                source,
                "capacity",
                f"guests on host {hname!r} ask for {memory[hname]} MiB of memory; it has "
                f"{host.capacity.memory} MiB x overcommit {pol.memory_overcommit:g}"
                f" = {limit_mem:g} MiB",
                ("hosts", hname, "capacity", "memory"),
            )


def check_routes(spec: PlatformSpec, source: Source) -> Iterator[Diagnostic]:
    """Two routes on one instance never claim the same host (and path); Velocity names and forced
    hosts are unique."""
    for iname, inst in spec.traefik.items():
        claimed: dict[tuple[str, str, str], str] = {}
        for rname, route in inst.routes.items():
            names = route.host if isinstance(route, HttpRoute) else route.sni
            path = route.path_prefix or "" if isinstance(route, HttpRoute) else ""
            for i, host in enumerate(names):
                key = (route.type, host, path)
                if key in claimed:
                    field = "host" if route.type == "http" else "sni"
                    yield spec_error(
                        source,
                        "duplicate-route",
                        f"{host}{path} is already claimed by route {claimed[key]!r} "
                        f"on Traefik instance {iname!r}",
                        ("traefik", iname, "routes", rname, field, i),
                    )
                else:
                    claimed[key] = rname
    if spec.velocity:
        forced: dict[str, str] = {}
        for sname, server in spec.velocity.servers.items():
            if server.forced_host:
                if server.forced_host in forced:
                    yield spec_error(
                        source,
                        "duplicate-forced-host",
                        f"forced host {server.forced_host} is already used by Velocity "
                        f"server {forced[server.forced_host]!r}",
                        ("velocity", "servers", sname, "forced_host"),
                    )
                else:
                    forced[server.forced_host] = sname
        lowered: dict[str, str] = {}
        for sname in spec.velocity.servers:
            if sname.lower() in lowered:
                yield spec_error(
                    source,
                    "duplicate-name",
                    f"Velocity server names are case-insensitive: {sname!r} clashes with "
                    f"{lowered[sname.lower()]!r}",
                    ("velocity", "servers", sname),
                    key=True,
                )
            lowered[sname.lower()] = sname


def check_networks(spec: PlatformSpec, source: Source) -> Iterator[Diagnostic]:
    """Static addresses are unique, and NIC names are unique within a guest."""
    seen: dict[str, tuple[str, PathT]] = {}
    for gname, guest in spec.guests.items():
        names: set[str] = set()
        for i, nic in enumerate(guest.network):
            if nic.name in names:
                yield spec_error(
                    source,
                    "duplicate-name",
                    f"interface {nic.name!r} appears twice in guest {gname!r}",
                    ("guests", gname, "network", i, "name"),
                )
            names.add(nic.name)
            if "/" in nic.ip:
                addr = nic.ip.split("/")[0]
                at: PathT = ("guests", gname, "network", i, "ip")
                if addr in seen:
                    owner, first = seen[addr]
                    yield spec_error(
                        source,
                        "duplicate-address",
                        f"address {addr} is already used by guest {owner!r}"
                        f"{written_at(source, first)}",
                        at,
                        related=first,
                    )
                else:
                    seen[addr] = (gname, at)


def check_backups(spec: PlatformSpec, source: Source) -> Iterator[Diagnostic]:
    """A backup job selects at least one guest (Proxmox refuses a job without a selection),
    and no job names the same guest twice through `guests` and `exclude`."""
    ids: dict[str, str] = {}
    # Implied ids first: the job whose `id` takes another's is the one reported.
    for jname, job in sorted(spec.backups.items(), key=lambda kv: (kv[1].id is not None, kv[0])):
        ident = job.id or job_id(f"backup/{jname}")
        if ident in ids:
            yield spec_error(
                source,
                "backup-job-id",
                f"backup jobs {ids[ident]!r} and {jname!r} both use the Proxmox job id "
                f"{ident!r}; Proxmox keeps one job per id",
                ("backups", jname, "id") if job.id else ("backups", jname),
                key=not job.id,
            )
        ids.setdefault(ident, jname)
    for jname, job in spec.backups.items():
        at: PathT = ("backups", jname, "select")
        both = set(job.select.guests) & set(job.select.exclude)
        for name in sorted(both):
            i = job.select.exclude.index(name)
            yield spec_error(
                source,
                "backup-selection",
                f"backup job {jname!r} both selects and excludes guest {name!r}",
                (*at, "exclude", i),
            )
        named = (*job.select.guests, *job.select.exclude)
        unknown = any(r not in spec.ranges for r in job.select.roles) or any(
            g not in spec.guests for g in named
        )  # reported by check_references
        if not both and not unknown and not selected_guests(spec, job.select):
            yield spec_error(
                source,
                "backup-selection",
                f"backup job {jname!r} selects no guest of the spec; Proxmox keeps no job "
                "without a selection (disable it with enabled: false, or delete it)",
                at,
            )


def check_volumes(spec: PlatformSpec, source: Source) -> Iterator[Diagnostic]:
    """A guest's volume keys fit its kind (mount points `mpN` on a container, disks `scsiN`,
    `virtioN`, `sataN`, `ideN` on a VM, but not on its boot disk's key); a mount point has a
    path, unique in its guest; a VM disk has neither path nor mount options; a container's
    root disk has no bus and cannot be none. A volume inherited from a profile is reported
    once, at the profile's line."""
    said: set[tuple[object, str]] = set()
    for gname, guest in spec.guests.items():
        for d in _guest_volumes(gname, guest, source):
            if d.code == "duplicate-mount-path" or (d.position, d.message) not in said:
                said.add((d.position, d.message))
                yield d


def _guest_volumes(gname: str, guest: GuestSpec, source: Source) -> Iterator[Diagnostic]:
    """`check_volumes` for one guest."""
    if guest.kind == "lxc" and guest.disk.bus is not None:
        yield spec_error(
            source,
            "invalid-value",
            "disk: a container's root disk is its rootfs: "
            + ("it cannot be none" if guest.disk.bus == "none" else "it has no bus")
            + " (bus and none are a VM's)",
            ("guests", gname, "disk", "bus"),
            key=True,
        )
    boot = guest.disk.vm_key() if guest.kind == "qemu" else None
    paths: dict[str, str] = {}  # mount path -> the key that has it
    for key, vol in sorted(guest.volumes.items()):
        at: PathT = ("guests", gname, "volumes", key)
        if key == boot:
            yield spec_error(
                source,
                "invalid-value",
                f"{key} is a VM's boot disk (disk.bus {guest.disk.bus or 'scsi'}): size "
                "it under 'disk', or give disk another bus, or write disk: none",
                at,
                key=True,
            )
        elif volume_kind(key) != guest.kind:
            yield _wrong_volume_kind(key, guest.kind, source, at)
        elif guest.kind == "qemu":
            for field in ("path", "options"):
                if getattr(vol, field) is not None:
                    yield spec_error(
                        source,
                        "invalid-value",
                        f"{key}.{field}: a VM disk has no {field}; it is mounted inside the VM",
                        (*at, field),
                        key=True,
                    )
        else:
            yield from _mount_path(gname, key, vol, paths, source, at)


def _wrong_volume_kind(key: str, kind: str, source: Source, at: PathT) -> Diagnostic:
    what = "a container mount point" if key.startswith("mp") else "a VM disk"
    takes = (
        "mount points mp0..mp255"
        if kind == "lxc"
        else "disks scsi0..scsi30, virtio0..virtio15, sata0..sata5, ide0..ide3"
    )
    return spec_error(
        source,
        "volume-kind",
        f"volume {key!r} is {what}, but this guest is kind {kind}: its volumes are {takes}",
        at,
        key=True,
    )


def _mount_path(
    gname: str, key: str, vol: Volume, paths: dict[str, str], source: Source, at: PathT
) -> Iterator[Diagnostic]:
    """A container mount point's path: given, and unique in its guest."""
    if vol.path is None:
        yield spec_error(
            source,
            "missing-field",
            f"mount point {key!r} needs 'path': where the container sees it (e.g. /srv/world)",
            at,
            key=True,
        )
    elif vol.path in paths:
        yield spec_error(
            source,
            "duplicate-mount-path",
            f"{key}.path {vol.path} is already the path of {paths[vol.path]} in guest {gname!r}",
            (*at, "path"),
        )
    else:
        paths[vol.path] = key


# The controller's ownership marks, as providers.proxmox and providers.firewall write them: a
# description's last line `reconciler:v1 platform=.. address=..`, a comment's `[reconciler:..]`.
_MARK_LINE = "reconciler:v1"
_COMMENT_MARK = "[reconciler:"


def forges_mark(text: str) -> bool:
    """Text that reads as the controller's mark: a line starting with `reconciler:v1`, or
    `[reconciler:` anywhere."""
    return _COMMENT_MARK in text or any(
        line.strip().startswith(_MARK_LINE) for line in text.split("\n")
    )


def check_marks(spec: PlatformSpec, source: Source) -> Iterator[Diagnostic]:
    """No text the controller writes into Proxmox (descriptions, firewall comments) carries
    something that reads as its mark: the mark says what it owns, and only it writes one. A
    value inherited from a profile is reported once, at the profile's line."""
    said: set[object] = set()
    texts: list[tuple[PathT, str | None]] = []
    bodies: list[tuple[str, str, Any]] = [("profiles", n, p) for n, p in spec.profiles.items()]
    bodies += [("guests", n, g) for n, g in spec.guests.items()]
    for section, name, body in bodies:  # a profile's fields are a guest's, all optional
        texts.append(((section, name, "description"), body.description))
        rules = body.firewall.rules if body.firewall else ()
        texts += [
            ((section, name, "firewall", "rules", i, "comment"), r.comment)
            for i, r in enumerate(rules)
        ]
    for section, named in (
        ("aliases", spec.firewall.aliases),
        ("ipsets", spec.firewall.ipsets),
        ("groups", spec.firewall.groups),
    ):
        for name, obj in named.items():
            texts.append((("firewall", section, name, "comment"), obj.comment))
    for name, group in spec.firewall.groups.items():
        texts += [
            (("firewall", "groups", name, "rules", i, "comment"), r.comment)
            for i, r in enumerate(group.rules)
        ]
    for name, job in spec.backups.items():
        texts.append((("backups", name, "description"), job.description))
    for name, pool in spec.pools.items():
        texts.append((("pools", name, "comment"), pool.comment))
    pve_notifications = spec.notifications.proxmox
    for section, notifying in (
        ("endpoints", pve_notifications.endpoints),
        ("matchers", pve_notifications.matchers),
    ):
        for name, item in notifying.items():
            said_at = ("notifications", "proxmox", section, name, "description")
            texts.append((said_at, item.description))
    for path, text in texts:
        # A job's description, a pool's comment, shares one line with its mark: the mark's
        # words anywhere in it.
        one_line = path[0] in ("backups", "pools", "notifications")
        forged = _MARK_LINE in text if one_line and text else forges_mark(text or "")
        if not forged:
            continue
        where = source.where(path, key=False)
        seen = where if where is not None else path
        if seen in said:
            continue
        said.add(seen)
        field = "description" if path[-1] == "description" else "comment"
        yield spec_error(
            source,
            "forged-mark",
            f"this {field} holds text that reads as the controller's ownership mark "
            f"('{_MARK_LINE} ...' as a line, or '{_COMMENT_MARK}...]'): only the controller "
            "writes its mark, and a copied one could make it claim a guest or firewall object "
            "that is not its own. Reword it",
            path,
        )


# PVE's built-in endpoint and matcher (proxmox-notify's default config): never the spec's.
PVE_BUILTIN_NOTIFICATIONS = ("mail-to-root", "default-matcher")
_SECRET_USE = re.compile(r"\{\{\s*secrets\.([A-Za-z0-9_-]+)\s*\}\}")


def check_notifications(spec: PlatformSpec, source: Source) -> Iterator[Diagnostic]:
    """PVE's notification endpoints and matchers share one namespace of config ids (a letter
    first): no name twice, none of PVE's built-ins; a matcher routes to endpoints, not to a
    matcher; a webhook's `{{ secrets.NAME }}` names one of its secrets."""
    pve = spec.notifications.proxmox
    at: PathT = ("notifications", "proxmox")
    for section, named in (("endpoints", pve.endpoints), ("matchers", pve.matchers)):
        for name in named:
            where: PathT = (*at, section, name)
            if not re.match(r"^[a-z][a-z0-9_-]+\Z", name):
                yield spec_error(
                    source,
                    "invalid-name",
                    f"{name!r} is not a PVE notification name: a letter first, then letters, "
                    "digits, '-' or '_' (two characters at least)",
                    where,
                    key=True,
                )
            if name in PVE_BUILTIN_NOTIFICATIONS:
                yield spec_error(
                    source,
                    "notification-builtin",
                    f"{name!r} is PVE's built-in {section[:-1]}; the controller does not manage "
                    "it: name yours otherwise (a matcher may still route to mail-to-root)",
                    where,
                    key=True,
                )
    for name in sorted(set(pve.endpoints) & set(pve.matchers)):
        yield spec_error(
            source,
            "duplicate-name",
            f"{name!r} names an endpoint and a matcher"
            f"{written_at(source, (*at, 'endpoints', name))}; "
            "PVE keeps one name for one of them",
            (*at, "matchers", name),
            key=True,
        )
    for name, matcher in pve.matchers.items():
        for i, target in enumerate(matcher.targets):
            if target in pve.matchers:
                yield spec_error(
                    source,
                    "unknown-reference",
                    f"matcher {name!r} routes to {target!r}, a matcher: targets are endpoints",
                    (*at, "matchers", name, "targets", i),
                )
    for name, ep in pve.endpoints.items():
        if not isinstance(ep, PveWebhook):
            continue
        texts = {"url": ep.url, "body": ep.body or ""}
        texts |= {f"headers.{k}": v for k, v in ep.headers.items()}
        for field, text in texts.items():
            for used in _SECRET_USE.findall(text):
                if used not in ep.secrets:
                    path: PathT = (*at, "endpoints", name, *field.split(".", 1))
                    yield spec_error(
                        source,
                        "unknown-reference",
                        f"{{{{ secrets.{used} }}}} names no secret of webhook {name!r} "
                        f"(its secrets: {', '.join(sorted(ep.secrets)) or 'none'})",
                        path,
                    )


ALL: tuple[Check, ...] = (
    check_references,
    check_unique,
    check_cycles,
    check_capacity,
    check_routes,
    check_networks,
    check_volumes,
    check_backups,
    check_templates,
    check_provisioning,
    check_pools_and_ha,
    check_marks,
    check_dns,
    check_notifications,
)


def run_all(spec: PlatformSpec, source: Source) -> Iterator[Diagnostic]:
    for check in ALL:
        yield from check(spec, source)
