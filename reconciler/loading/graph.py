"""Build the desired graph from a checked spec: one `Resource` per address, with dependencies
and waves. Called by the planner (through the CLI and the controller) after loading succeeds.

Attributes are written in the normalized shape observers produce (see planning.normalize), so
a converged platform diffs empty. LXC and QEMU guests share one attribute shape, less what a
kind does not have: a VM has no template, swap, features, unprivileged flag or `rootfs`.
`volumes` are a container's mount points and a VM's disks by Proxmox key, a VM's boot disk
among them (`scsi0`, or unit 0 of the spec's `disk.bus`; none for `disk: none`), which
`boot_disk` names (None: no disk): `{"mp0": {"storage": "local-lvm", "size": "50G", "path":
"/data", "backup": True}}` (a VM disk has no path or mount options). So the planner's rules
for volumes (grown in place, never shrunk or moved, detached only with pruning) hold for
every disk of a VM.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any

from reconciler.loading.dns_records import dns_resources
from reconciler.loading.pools_ha import (
    guest_pool_dependency,
    guest_pool_ha,
    ha_resource,
    pool_resources,
)
from reconciler.loading.provisioning import provisioning_attributes
from reconciler.loading.sources import Source
from reconciler.loading.templates import guest_templates
from reconciler.model.resources import (
    DesiredGraph,
    Kind,
    Resource,
    guest_address,
    template_address,
)
from reconciler.model.spec import (
    FirewallRule,
    GuestSpec,
    HttpRoute,
    NetworkInterface,
    PlatformSpec,
    PveEndpoint,
    PveGotify,
    PveMatcher,
    PveSendmail,
    PveSmtp,
    PveWebhook,
    TcpRoute,
    Volume,
    VolumeOptions,
    selected_guests,
    template_nodes,
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
    # A full clone's disks go where `clone.storage` says, unless the spec names the disk's.
    cloned = guest.clone.storage if guest.clone is not None else None
    storage = guest.disk.storage or cloned or spec.platform.default_storage
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
    attrs.update(provisioning_attributes(guest))  # clone, agent, cloud-init (the spec's)
    attrs.update(guest_pool_ha(guest))  # its pool; its power state when HA owns it
    if guest.kind == "qemu":
        # Neither sent nor compared: a VM has none of these (a profile may still set them).
        for key in LXC_ONLY:
            del attrs[key]
        del attrs["rootfs"]
        attrs.update(vm_disk_attributes(guest, storage, attrs["volumes"]))
    return attrs


def vm_disk_attributes(
    guest: GuestSpec, storage: str, volumes: Mapping[str, Any]
) -> dict[str, Any]:
    """A VM's boot disk as one of its `volumes`, under its drive key, and `boot_disk` naming
    it (None for `disk: none`): in place of a container's `rootfs`."""
    boot = guest.disk.vm_key()
    disks = dict(volumes)
    if boot is not None:
        disks[boot] = {"storage": storage, "size": format_mib(guest.disk.size), "backup": True}
    return {"volumes": dict(sorted(disks.items())), "boot_disk": boot}


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
    yield from _template_resources(spec, source)
    yield from pool_resources(spec, source)
    yield from _guest_resources(spec, source)
    yield from _route_resources(spec, source)
    yield from _velocity_resources(spec, source)
    yield from _backup_resources(spec, source)
    yield from _notification_resources(spec, source)
    yield from dns_resources(spec, source)


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
    """Each guest, and its own firewall and HA resource (attached to it) when it declares
    them."""
    for name, guest in sorted(spec.guests.items()):
        address = guest_address(name)
        yield Resource(
            address,
            Kind.GUEST,
            guest_attributes(spec, name, guest),
            depends_on=(
                *(guest_address(d) for d in guest.depends_on),
                *guest_templates(spec, guest),
                *guest_pool_dependency(spec, guest),
            ),
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
        ha = ha_resource(spec, source, name, guest)
        if ha is not None:
            yield ha


def _template_resources(spec: PlatformSpec, source: Source) -> Iterator[Resource]:
    """Each declared template on each node it is declared for. `url` and `checksum` say how to
    get the file and are never observed (Proxmox keeps no record of either); the rest is the
    file's identity, which observation reads back from the storage's listing."""
    for name, template in sorted(spec.templates.items()):
        for node in template_nodes(spec, template):
            yield Resource(
                template_address(name, node),
                Kind.TEMPLATE,
                {
                    "node": node,
                    "storage": template.storage,
                    "content": template.content,
                    "filename": template.file,
                    "volid": template.volid,
                    "url": template.url,
                    "checksum": template.checksum,
                },
                position=source.where(("templates", name)),
            )


def _route_resources(spec: PlatformSpec, source: Source) -> Iterator[Resource]:
    """Each Traefik instance's routes, after the Traefik guest and the guest they reach."""
    for iname, inst in sorted(spec.traefik.items()):
        for rname, route in sorted(inst.routes.items()):
            target = _guest_endpoint(spec, route.target.guest)
            if ":" in target:  # an IPv6 address: bracketed before a port (RFC 3986)
                target = f"[{target}]"
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


# PVE's severities from the least to the most severe: a matcher's list is written in this order.
_PVE_SEVERITIES = ("info", "notice", "warning", "error", "unknown")


def notification_endpoint_attributes(endpoint: PveEndpoint) -> dict[str, Any]:
    """A PVE notification endpoint as its GET answers it, less what PVE never shows (a
    Gotify token, an SMTP password, a webhook secret's value: only the secrets' names) and
    less our mark in `comment`. Lists sorted; a webhook's body and header values decoded."""
    attrs: dict[str, Any] = {
        "type": endpoint.type,
        "comment": endpoint.description,
        "disable": int(not endpoint.enabled),
    }
    if isinstance(endpoint, PveSendmail | PveSmtp):
        attrs |= {
            "mailto": sorted(endpoint.mailto),
            "mailto-user": sorted(endpoint.mailto_user),
            "from-address": endpoint.from_address,
            "author": endpoint.author,
        }
    if isinstance(endpoint, PveSmtp):
        attrs |= {
            "server": endpoint.server,
            "port": endpoint.port,
            "mode": endpoint.mode,
            "username": endpoint.username,
        }
    elif isinstance(endpoint, PveGotify):
        attrs["server"] = endpoint.server
    elif isinstance(endpoint, PveWebhook):
        attrs |= {
            "url": endpoint.url,
            "method": endpoint.method,
            "header": dict(sorted(endpoint.headers.items())),
            "body": endpoint.body,
            "secret": sorted(endpoint.secrets),
        }
    return attrs


def notification_matcher_attributes(matcher: PveMatcher) -> dict[str, Any]:
    """A PVE notification matcher as its GET answers it. The severities are one statement (a
    list of statements is matched as the `mode` says: `all` of two severities would match
    nothing), and so are the types (`exact:type=fencing,vzdump`)."""
    severities = [s for s in _PVE_SEVERITIES if s in matcher.severities]
    fields = [f"exact:type={','.join(sorted(set(matcher.types)))}"] if matcher.types else []
    return {
        "match-severity": [",".join(severities)] if severities else [],
        "match-field": [*fields, *matcher.fields],
        "match-calendar": list(matcher.calendar),
        "mode": matcher.mode,
        "invert-match": int(matcher.invert),
        "target": sorted(set(matcher.targets)),
        "comment": matcher.description,
        "disable": int(not matcher.enabled),
    }


def _notification_resources(spec: PlatformSpec, source: Source) -> Iterator[Resource]:
    """PVE's own notification endpoints and matchers; a matcher after the spec's endpoints it
    routes to (others it names, such as the built-in mail-to-root, are PVE's)."""
    pve = spec.notifications.proxmox
    endpoint = Kind.NOTIFICATION_ENDPOINT.value
    for name, ep in sorted(pve.endpoints.items()):
        yield Resource(
            f"{endpoint}/{name}",
            Kind.NOTIFICATION_ENDPOINT,
            notification_endpoint_attributes(ep),
            position=source.where(("notifications", "proxmox", "endpoints", name)),
        )
    for name, matcher in sorted(pve.matchers.items()):
        yield Resource(
            f"{Kind.NOTIFICATION_MATCHER.value}/{name}",
            Kind.NOTIFICATION_MATCHER,
            notification_matcher_attributes(matcher),
            depends_on=tuple(
                f"{endpoint}/{t}" for t in sorted(set(matcher.targets)) if t in pve.endpoints
            ),
            position=source.where(("notifications", "proxmox", "matchers", name)),
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
