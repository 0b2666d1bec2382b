"""Read a whole Proxmox estate, owned or not: every guest's config and firewall, the cluster's
firewall objects, its backup jobs, and the nodes' size. `reconciler import` calls
`read_estate`, then hands the `Estate` to `writer.render_specs`.

It reads only. One `GET /cluster/resources` gives the guests and nodes; then each guest costs
one config read (two for a VM: its pending values too, as observation does) and two firewall
reads; each IP set and security group one read; the backup jobs one (`GET /cluster/backup`).
All calls go through the provider's retry policy and its concurrency limiter, so a big cluster
is read concurrently but bounded.

Templates (`template: 1`) are not guests the spec can describe; they are listed in
`Estate.skipped`, and so is a guest still being created or destroyed. Their inventory items are
kept (`Estate.templates`): a linked clone names its template by vmid, the spec by name.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio

from reconciler.model.errors import NotFoundError
from reconciler.providers.firewall import clean_rule
from reconciler.providers.proxmox import ProxmoxProvider, read_mark

# Locks held while a create or destroy task runs: such a guest has no settled config yet.
_TRANSIENT_LOCKS = frozenset({"create", "destroyed"})


@dataclass(frozen=True)
class GuestRecord:
    """One guest as Proxmox holds it: its `/cluster/resources` item, its config (a VM's with its
    pending values merged in), and its own firewall."""

    item: Mapping[str, Any]
    config: Mapping[str, Any]
    firewall_options: Mapping[str, Any]
    firewall_rules: tuple[Mapping[str, Any], ...]

    @property
    def vmid(self) -> int:
        return int(self.item["vmid"])

    @property
    def node(self) -> str:
        return str(self.item.get("node"))

    @property
    def kind(self) -> str:
        return str(self.item.get("type", "lxc"))

    @property
    def name(self) -> str:
        return str(self.config.get("hostname") or self.config.get("name") or self.item.get("name"))

    @property
    def mark(self) -> dict[str, str]:
        """The controller's mark line, if any platform's is there and it was written for this
        vmid (a copy made by hand carries the original's mark: it claims nothing)."""
        fields = read_mark(self.config.get("description"))[0]
        if "vmid" in fields and fields["vmid"] != str(self.vmid):
            return {}
        return fields


@dataclass(frozen=True)
class NamedObject:
    """A cluster alias, IP set or security group, comment as stored (any mark still in it)."""

    name: str
    comment: str
    cidr: str | None = None  # an alias
    entries: tuple[Mapping[str, Any], ...] = ()  # an IP set's entries, raw
    rules: tuple[Mapping[str, Any], ...] = ()  # a group's rules, cleaned


@dataclass(frozen=True)
class Estate:
    source: str
    read_at: str
    guests: tuple[GuestRecord, ...]
    nodes: Mapping[str, Mapping[str, Any]]  # node -> its resources item (maxcpu, maxmem)
    cluster_options: Mapping[str, Any]
    aliases: tuple[NamedObject, ...]
    ipsets: tuple[NamedObject, ...]
    groups: tuple[NamedObject, ...]
    skipped: tuple[str, ...] = field(default=())  # what was seen but not read, and why
    backup_jobs: tuple[Mapping[str, Any], ...] = ()  # as `GET /cluster/backup` lists them
    templates: tuple[Mapping[str, Any], ...] = ()  # template guests' `/cluster/resources` items


async def read_estate(provider: ProxmoxProvider) -> Estate:
    """Everything `import` needs, read once. Raises the provider's errors."""
    client = provider.client
    items: list[dict[str, Any]] = await provider.retrying(
        "read inventory", lambda: client.cluster.resources.get()
    )
    reader = _EstateReader(provider)
    async with anyio.create_task_group() as tg:
        tg.start_soon(reader.read_cluster_options)
        tg.start_soon(reader.read_aliases)
        tg.start_soon(reader.read_indexes, tg)
        tg.start_soon(reader.read_backup_jobs)
        for item in reader.guests_to_read(items):
            tg.start_soon(reader.read_guest, item)
    nodes = {str(i["node"]): i for i in items if i.get("type") == "node"}
    return reader.estate(nodes)


@dataclass
class _EstateReader:
    """One read of an estate: the provider it reads through, and what its concurrent reads
    have found so far (sorted when the `Estate` is made)."""

    provider: ProxmoxProvider
    guests: list[GuestRecord] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    cluster: dict[str, Any] = field(default_factory=dict)
    aliases: list[NamedObject] = field(default_factory=list)
    ipsets: list[NamedObject] = field(default_factory=list)
    groups: list[NamedObject] = field(default_factory=list)
    backup_jobs: list[Mapping[str, Any]] = field(default_factory=list)
    templates: list[Mapping[str, Any]] = field(default_factory=list)

    @property
    def _firewall(self) -> Any:
        return self.provider.client.cluster.firewall

    def guests_to_read(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The inventory's guests but templates and those being created or destroyed, which
        are noted as skipped."""
        out: list[dict[str, Any]] = []
        for item in items:
            if item.get("type") not in ("lxc", "qemu"):
                continue
            what = f"{item.get('type')} {item.get('vmid')} ({item.get('name')})"
            if item.get("template"):
                self.skipped.append(f"{what}: a template, not a guest")
                self.templates.append(item)
            elif item.get("lock") in _TRANSIENT_LOCKS:
                self.skipped.append(f"{what}: locked ({item.get('lock')}); import again later")
            else:
                out.append(item)
        return out

    async def read_guest(self, item: dict[str, Any]) -> None:
        node, vmid, kind = str(item["node"]), int(item["vmid"]), str(item["type"])
        api = self.provider.client.nodes(node)(kind)(vmid)
        retrying = self.provider.retrying
        try:
            # A VM's config as Proxmox answers it: its pending changes applied already.
            config = await retrying(f"read config of {vmid}", lambda: api.config.get())
            options = await retrying(
                f"read firewall options of {vmid}", lambda: api.firewall.options.get()
            )
            rules = await retrying(
                f"read firewall rules of {vmid}", lambda: api.firewall.rules.get()
            )
        except NotFoundError:
            self.skipped.append(f"{kind} {vmid}: destroyed while the estate was read")
            return
        self.guests.append(
            GuestRecord(
                item=item,
                config=config,
                firewall_options=options,
                firewall_rules=tuple(clean_rule(r) for r in rules),
            )
        )

    async def read_cluster_options(self) -> None:
        options = self._firewall.options
        self.cluster.update(
            await self.provider.retrying("read cluster firewall options", lambda: options.get())
        )

    async def read_aliases(self) -> None:
        aliases = self._firewall.aliases
        for a in await self.provider.retrying("read firewall aliases", lambda: aliases.get()):
            self.aliases.append(
                NamedObject(str(a["name"]), str(a.get("comment") or ""), a.get("cidr"))
            )

    async def read_indexes(self, tg: anyio.abc.TaskGroup) -> None:
        """The IP set and group indexes; each IP set and group is read in `tg`, on its own."""
        fw, retrying = self._firewall, self.provider.retrying
        for s in await retrying("read firewall IP sets", lambda: fw.ipset.get()):
            tg.start_soon(self.read_ipset, str(s["name"]), str(s.get("comment") or ""))
        for g in await retrying("read security groups", lambda: fw.groups.get()):
            tg.start_soon(self.read_group, str(g["group"]), str(g.get("comment") or ""))

    async def read_ipset(self, name: str, comment: str) -> None:
        ipset = self._firewall.ipset(name)
        entries = await self.provider.retrying(f"read IP set {name}", lambda: ipset.get())
        self.ipsets.append(NamedObject(name, comment, entries=tuple(entries)))

    async def read_group(self, name: str, comment: str) -> None:
        group = self._firewall.groups(name)
        raw = await self.provider.retrying(f"read security group {name}", lambda: group.get())
        self.groups.append(NamedObject(name, comment, rules=tuple(clean_rule(r) for r in raw)))

    async def read_backup_jobs(self) -> None:
        backup = self.provider.client.cluster.backup
        jobs = await self.provider.retrying("list backup jobs", lambda: backup.get(), read=True)
        self.backup_jobs.extend(j for j in jobs if j.get("id"))

    def estate(self, nodes: Mapping[str, Mapping[str, Any]]) -> Estate:
        now = datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat()
        return Estate(
            source=self.provider.source,
            read_at=now.replace("+00:00", "Z"),
            guests=tuple(sorted(self.guests, key=lambda g: g.vmid)),
            nodes=dict(sorted(nodes.items())),
            cluster_options=self.cluster,
            aliases=tuple(sorted(self.aliases, key=lambda a: a.name)),
            ipsets=tuple(sorted(self.ipsets, key=lambda a: a.name)),
            groups=tuple(sorted(self.groups, key=lambda a: a.name)),
            skipped=tuple(sorted(self.skipped)),
            backup_jobs=tuple(sorted(self.backup_jobs, key=lambda j: str(j["id"]))),
            templates=tuple(sorted(self.templates, key=lambda t: int(t["vmid"]))),
        )
