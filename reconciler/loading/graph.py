"""Build the desired graph from a checked spec: one `Resource` per address, with dependencies
and waves. Called by the planner (through the CLI and the controller) after loading succeeds.

Attributes are written in the normalized shape observers produce (see planning.normalize), so
a converged platform diffs empty. LXC and QEMU guests share one attribute shape, less what a
kind does not have: a VM has no template, swap, features or unprivileged flag, and its boot disk
(`scsi0`) is the `rootfs` attribute, so the planner's rules for disks (a new storage, a smaller
disk) hold for both kinds. `volumes` are a container's mount points and a VM's extra disks by
Proxmox key: `{"mp0": {"storage": "local-lvm", "size": "50G", "path": "/data", "backup": True}}`
(a VM disk has no path or mount options).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any

from reconciler.loading.sources import Source
from reconciler.model.resources import DesiredGraph, Kind, Resource, guest_address
from reconciler.model.spec import (
    FirewallRule,
    GuestSpec,
    HttpRoute,
    NetworkInterface,
    PlatformSpec,
    TcpRoute,
    Volume,
    VolumeOptions,
    selected_guests,
)
from reconciler.model.units import format_mib


def build_graph(spec: PlatformSpec, source: Source | None = None) -> DesiredGraph:
    resources: dict[str, Resource] = {}
    for res in _resources(spec, source or Source()):
        resources[res.address] = res
    return DesiredGraph(
        platform=spec.platform.name,
        resources=MappingProxyType(resources),
        waves=MappingProxyType(compute_waves(resources)),
        settings=MappingProxyType(
            {
                "owner_tag": spec.platform.owner_tag,
                "prune": spec.platform.prune,
                "max_deletes_per_run": spec.platform.max_deletes_per_run,
                "ranges": {
                    name: {"first": r.first, "last": r.last, "layer": r.layer}
                    for name, r in sorted(spec.ranges.items())
                },
                # For the placement checks against the live cluster (planning.placement).
                "hosts": {
                    name: {"node": spec.node_of(name), "node_set": h.node is not None}
                    for name, h in sorted(spec.hosts.items())
                },
                "memory_overcommit": spec.policies.capacity.memory_overcommit,
                "backup_freshness": spec.policies.backup_freshness.enabled,
            }
        ),
    )


def compute_waves(resources: Mapping[str, Resource]) -> dict[str, int]:
    """wave = 0 without dependencies, else 1 + the deepest dependency. Cycles were rejected by
    the checks; a dependency on something outside the graph is ignored here."""
    waves: dict[str, int] = {}

    def wave(address: str, trail: frozenset[str]) -> int:
        if address in waves:
            return waves[address]
        deps = [d for d in resources[address].depends_on if d in resources and d not in trail]
        w = 1 + max((wave(d, trail | {address}) for d in deps), default=-1)
        waves[address] = w
        return w

    for address in sorted(resources):
        wave(address, frozenset())
    return waves


def guest_ip(guest: GuestSpec) -> str | None:
    for nic in guest.network:
        if "/" in nic.ip:
            return nic.ip.split("/")[0]
    return None


def _guest_endpoint(spec: PlatformSpec, name: str) -> str:
    guest = spec.guests.get(name)
    if guest is None:
        return name
    return guest_ip(guest) or (guest.hostname or name)


# Guest attributes only LXC containers have.
LXC_ONLY = ("template", "swap", "features", "unprivileged")
# The NIC model of every VM we create: paravirtualized, what a Linux guest wants.
QEMU_NIC_MODEL = "virtio"


def net_string(index: int, nic: Any) -> str:
    """The canonical `netN` value: Proxmox's keys, sorted, only what the spec manages."""
    parts = {"name": nic.name, "bridge": nic.bridge, "ip": nic.ip}
    if nic.gw:
        parts["gw"] = nic.gw
    if nic.tag is not None:
        parts["tag"] = str(nic.tag)
    if nic.mtu is not None:
        parts["mtu"] = str(nic.mtu)
    if nic.hwaddr:
        parts["hwaddr"] = nic.hwaddr.upper()
    parts["firewall"] = "1" if nic.firewall else "0"
    return ",".join(f"{k}={parts[k]}" for k in sorted(parts))


def qemu_net_string(nic: NetworkInterface) -> str:
    """The canonical QEMU `netN` value: the model first (`virtio`, or `virtio=MAC` when the spec
    pins the MAC), then Proxmox's keys, sorted. A VM's NIC has no name, address or gateway:
    those belong to the guest OS."""
    parts = {"bridge": nic.bridge, "firewall": "1" if nic.firewall else "0"}
    if nic.tag is not None:
        parts["tag"] = str(nic.tag)
    if nic.mtu is not None:
        parts["mtu"] = str(nic.mtu)
    model = f"{QEMU_NIC_MODEL}={nic.hwaddr.upper()}" if nic.hwaddr else QEMU_NIC_MODEL
    return ",".join([model, *(f"{k}={parts[k]}" for k in sorted(parts))])


def features_string(guest: GuestSpec) -> str:
    on = [k for k, v in sorted(guest.features.model_dump().items()) if v]
    return ",".join(f"{k}=1" for k in on)


def mount_options(options: VolumeOptions | None) -> dict[str, Any]:
    """A mount point's options as attributes: only those that differ from Proxmox's defaults
    (so a mount point Proxmox reads back without them compares equal)."""
    if options is None:
        return {}
    out: dict[str, Any] = {}
    if options.acl is not None:
        out["acl"] = options.acl
    if options.quota:
        out["quota"] = True
    if options.ro:
        out["ro"] = True
    if not options.replicate:
        out["replicate"] = False
    if options.mountoptions:
        out["mountoptions"] = ";".join(sorted(set(options.mountoptions)))
    return out


def volume_attributes(kind: str, volume: Volume, default_storage: str) -> dict[str, Any]:
    """One volume in the normalized shape (planning.normalize.volume reads Proxmox's strings
    into the same): storage, size, and for a mount point its path and options; `backup` with
    Proxmox's default filled in (off for a mount point, on for a VM disk)."""
    out: dict[str, Any] = {
        "storage": volume.storage or default_storage,
        "size": format_mib(volume.size),
    }
    if kind == "lxc":
        out["path"] = volume.path
    out["backup"] = volume.backup if volume.backup is not None else kind == "qemu"
    if kind == "lxc":
        out.update(mount_options(volume.options))
    return out


def guest_attributes(spec: PlatformSpec, name: str, guest: GuestSpec) -> dict[str, Any]:
    storage = guest.disk.storage or spec.platform.default_storage
    tags = sorted({*guest.tags, spec.platform.owner_tag})
    if guest.kind == "qemu":
        net = {f"net{i}": qemu_net_string(nic) for i, nic in enumerate(guest.network)}
    else:
        net = {f"net{i}": net_string(i, nic) for i, nic in enumerate(guest.network)}
    attrs: dict[str, Any] = {
        "name": guest.hostname or name,
        "vmid": guest.vmid,
        "node": spec.node_of(guest.host) if guest.host in spec.hosts else guest.host,
        "role": guest.role,
        "type": guest.kind,
        "template": guest.template,
        "cores": guest.cores,
        "memory": guest.memory,
        "swap": guest.swap,
        "rootfs": {"storage": storage, "size": format_mib(guest.disk.size)},
        "volumes": {
            key: volume_attributes(guest.kind, vol, spec.platform.default_storage)
            for key, vol in sorted(guest.volumes.items())
        },
        "net": net,
        "tags": tags,
        "features": features_string(guest),
        "unprivileged": guest.unprivileged,
        "protection": guest.protection,
        "onboot": guest.onboot,
        "state": guest.state,
        "description": guest.description,
    }
    if guest.restore_missing is not None:
        attrs["restore_missing"] = guest.restore_missing  # the planner's, never sent
    if guest.kind == "qemu":
        # Neither sent nor compared: a VM has none of these (a profile may still set them).
        for key in LXC_ONLY:
            del attrs[key]
    return attrs


def rule_attributes(rule: FirewallRule) -> dict[str, Any]:
    """A rule as Proxmox stores it: absent fields left out, enable as 0/1."""
    out: dict[str, Any] = {"type": rule.type, "action": rule.action, "enable": int(rule.enable)}
    for key in ("source", "dest", "proto", "dport", "sport", "macro", "iface", "comment"):
        value = getattr(rule, key)
        if value:
            out[key] = value
    if rule.log != "nolog":
        out["log"] = rule.log
    return out


def rule_literal(value: str) -> str:
    """`value` as a string in a Traefik rule: between backticks, Go's raw string, which has no
    escapes, so it ends at the next backtick and nowhere else. Anything that cannot sit there
    unchanged is refused, not escaped: a backtick, a character outside printable ASCII (Go drops
    a carriage return from a raw string; Traefik refuses non-ASCII hosts), or nothing at all.
    The spec refuses such values already; this holds for any field a rule is ever built from."""
    if not value or any(c == "`" or not " " <= c <= "~" for c in value):
        raise ValueError(f"{value!r} cannot be quoted in a Traefik rule")
    return f"`{value}`"


def route_rule(route: HttpRoute | TcpRoute) -> str:
    """The Traefik rule of a route, every value through `rule_literal`."""
    if isinstance(route, HttpRoute):
        hosts = " || ".join(f"Host({rule_literal(h)})" for h in route.host)
        rule = f"({hosts})" if len(route.host) > 1 else hosts
        if route.path_prefix is not None:
            rule += f" && PathPrefix({rule_literal(route.path_prefix)})"
        return rule
    return " || ".join(f"HostSNI({rule_literal(h)})" for h in route.sni)


def _resources(spec: PlatformSpec, source: Source) -> Iterator[Resource]:
    """Every desired resource, kind by kind; each kind's resources in name order."""
    yield from _firewall_resources(spec, source)
    yield from _guest_resources(spec, source)
    yield from _route_resources(spec, source)
    yield from _velocity_resources(spec, source)
    yield from _backup_resources(spec, source)


def _firewall_resources(spec: PlatformSpec, source: Source) -> Iterator[Resource]:
    """The cluster-wide firewall: its options, aliases, IP sets and security groups."""
    fw = spec.firewall
    if fw.cluster is not None:
        yield Resource(
            "firewall/cluster",
            Kind.FIREWALL_CLUSTER,
            fw.cluster.model_dump(),
            position=source.where(("firewall", "cluster")),
        )
    for name, alias in sorted(fw.aliases.items()):
        yield Resource(
            f"firewall/alias/{name}",
            Kind.FIREWALL_ALIAS,
            {"cidr": alias.cidr, "comment": alias.comment},
            position=source.where(("firewall", "aliases", name)),
        )
    for name, ipset in sorted(fw.ipsets.items()):
        yield Resource(
            f"firewall/ipset/{name}",
            Kind.FIREWALL_IPSET,
            {"entries": sorted(ipset.entries), "comment": ipset.comment},
            position=source.where(("firewall", "ipsets", name)),
        )
    for name, group in sorted(fw.groups.items()):
        yield Resource(
            f"firewall/group/{name}",
            Kind.FIREWALL_GROUP,
            {"comment": group.comment, "rules": [rule_attributes(r) for r in group.rules]},
            depends_on=tuple(sorted(_rule_refs(spec, group.rules))),
            position=source.where(("firewall", "groups", name)),
        )


def _guest_resources(spec: PlatformSpec, source: Source) -> Iterator[Resource]:
    """Each guest, and its own firewall (attached to it) when it declares one."""
    for name, guest in sorted(spec.guests.items()):
        address = guest_address(name)
        yield Resource(
            address,
            Kind.GUEST,
            guest_attributes(spec, name, guest),
            depends_on=tuple(guest_address(d) for d in guest.depends_on),
            position=source.where(("guests", name)),
        )
        if guest.firewall is not None:
            yield Resource(
                f"firewall/guest/{name}",
                Kind.FIREWALL_GUEST,
                {
                    "enable": int(guest.firewall.enable),
                    "policy_in": guest.firewall.policy_in,
                    "policy_out": guest.firewall.policy_out,
                    "rules": [rule_attributes(r) for r in guest.firewall.rules],
                },
                depends_on=(address, *sorted(_rule_refs(spec, guest.firewall.rules))),
                attached_to=address,
                position=source.where(("guests", name, "firewall")),
            )


def _route_resources(spec: PlatformSpec, source: Source) -> Iterator[Resource]:
    """Each Traefik instance's routes, after the Traefik guest and the guest they reach."""
    for iname, inst in sorted(spec.traefik.items()):
        for rname, route in sorted(inst.routes.items()):
            target = _guest_endpoint(spec, route.target.guest)
            attrs: dict[str, Any] = {
                "instance": iname,
                "feed": inst.feed.type,
                "protocol": route.type,
                "rule": route_rule(route),
                "entrypoints": list(route.entrypoints),
                "tls": route.tls.model_dump(exclude_defaults=True) if route.tls else None,
                "when_unready": route.when_unready or inst.when_unready,
            }
            if isinstance(route, HttpRoute):
                attrs["server"] = f"{route.target.scheme}://{target}:{route.target.port}"
            else:
                attrs["server"] = f"{target}:{route.target.port}"
            yield Resource(
                f"route/{iname}/{rname}",
                Kind.ROUTE,
                attrs,
                depends_on=(guest_address(inst.guest), guest_address(route.target.guest)),
                position=source.where(("traefik", iname, "routes", rname)),
            )


def _velocity_resources(spec: PlatformSpec, source: Source) -> Iterator[Resource]:
    """Each backend server Velocity registers, after the proxy guest and the server guest."""
    if spec.velocity is None:
        return
    for sname, server in sorted(spec.velocity.servers.items()):
        yield Resource(
            f"velocity/{sname}",
            Kind.VELOCITY,
            {
                "server_name": sname,
                "address": _guest_endpoint(spec, server.guest),
                "port": server.port,
                "forced_host": server.forced_host,
            },
            depends_on=(guest_address(spec.velocity.guest), guest_address(server.guest)),
            position=source.where(("velocity", "servers", sname)),
        )


def _backup_resources(spec: PlatformSpec, source: Source) -> Iterator[Resource]:
    """Each backup job, its selection resolved to the spec's guests (the planner turns them
    into vmids, so a guest created in the same run is in its job from the start)."""
    for name, job in sorted(spec.backups.items()):
        yield Resource(
            f"{Kind.BACKUP_JOB.value}/{name}",
            Kind.BACKUP_JOB,
            {
                "schedule": job.schedule,
                "storage": job.storage,
                "mode": job.mode,
                "compress": job.compress,
                "prune-backups": job.retention.prune_backups() if job.retention else None,
                "notes-template": job.notes or None,
                "enabled": int(job.enabled),
                "guests": [guest_address(g) for g in selected_guests(spec, job.select)],
                "description": job.description,
                **({"max_age": job.max_age} if job.max_age else {}),
                # The job an adopted one already is; else the provider's `rc-<name>`.
                **({"id": job.id} if job.id else {}),
            },
            position=source.where(("backups", name)),
        )


def _rule_refs(spec: PlatformSpec, rules: tuple[FirewallRule, ...]) -> set[str]:
    """Firewall objects a rule list names: groups, aliases, IP sets."""
    refs: set[str] = set()
    for rule in rules:
        if rule.type == "group":
            refs.add(f"firewall/group/{rule.action}")
        for value in (rule.source, rule.dest):
            for part in (value or "").split(","):
                part = part.strip().removeprefix("dc/")
                if part.startswith("+"):
                    name = part[1:].removeprefix("dc/")
                    if name in spec.firewall.ipsets:
                        refs.add(f"firewall/ipset/{name}")
                elif part in spec.firewall.aliases:
                    refs.add(f"firewall/alias/{part}")
    return refs
