"""What the controller needs of Proxmox VE's permissions, and what a token (or user) holds.

Called by `reconciler check` (reconciler.cli.check) before a first apply:
`needed_privileges(spec)` lists the privileges the spec's features need and on which ACL paths;
`read_privileges(provider, paths)` asks Proxmox what the connected token or user holds there
(`GET /access/permissions?path=P`, one call per path: PVE answers the privileges in effect at
P, inherited ones included); `missing(needs, held, root=...)` is what is left.

Per feature, as PVE checks each call the controller makes (the README's role is this list):

- guests: `VM.Audit` on `/vms` (the inventory lists only the guests one may audit: a guest
  unseen is a vmid the controller might take twice); on each guest (`/vms/{vmid}`, or `/vms`
  while its vmid is allocated) `VM.Audit`, `VM.Allocate`, `VM.Config.CPU`, `.Memory`, `.Disk`,
  `.Network`, `.Options` (`.HWType` for a VM), `VM.PowerMgmt`; `Datastore.AllocateSpace` on
  each storage its disks are on; `SDN.Use` on each bridge it is attached to
  (`/sdn/zones/localnetwork/{bridge}[/{vlan}]`); `Sys.Modify` on `/` for a privileged
  container; feature flags other than nesting only root@pam may set (no role grants that);
- firewall: `Sys.Audit` on `/` always (observation reads the cluster's firewall: the isolation
  check needs its switch; a guest's destroy reads the backup jobs with it, refusing when a job
  not ours lists the vmid); `Sys.Modify` on `/` when the spec declares cluster options, aliases,
  IP sets or groups; a guest's own firewall is its `VM.Config.Network`;
- cluster facts (placement checks): `Sys.Audit` on each host's node, `Datastore.Audit` (or
  `Datastore.AllocateSpace`) on each storage the guests use;
- templates: `Datastore.Audit` (or `Datastore.AllocateSpace`) on each template's storage, to
  list them and to create from them;
- migration: `VM.Migrate` on each guest (a guest whose host changes is migrated);
- clones, cloud-init, agent, pools, HA (per guest using them): `VM.Clone` and `VM.Audit` on the
  template (`/vms` while it is named, not numbered), `VM.Config.Cloudinit`, `VM.GuestAgent.Audit`
  (PVE 9; `VM.Monitor` before), `Pool.Allocate` on `/pool/NAME` (and `Pool.Audit` on a
  declared pool: `GET /pools` lists no other), `Sys.Console` on `/` (HA);
- declared templates and notification targets: `Datastore.AllocateTemplate` on the storage
  and `Sys.AccessNetwork` on each node that downloads (or `Sys.Audit` with `Sys.Modify` on
  `/`); `Mapping.Audit` and `Mapping.Modify` on `/mapping/notifications`;
- backups (when the spec has `backups:`): `Sys.Audit` on `/` to read the jobs and `Sys.Modify`
  on `/` to write them, and `Datastore.Allocate` on the storage a job writes to (pve-manager
  `API2/Backup.pm`); `Datastore.AllocateSpace` on each job's storage (vzdump writes there, and
  its backups are listed there); `VM.Backup` on each guest a
  job selects (the final backup before a destroy, `reconciler backup`, a restore, and seeing
  its backups in a listing).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import anyio

from reconciler.model.resources import guest_address
from reconciler.model.spec import GuestSpec, PlatformSpec, selected_guests
from reconciler.providers.proxmox import ProxmoxProvider, template_storage

# Features, in the order they are reported.
GUESTS, FIREWALL, CLUSTER, TEMPLATES, MIGRATION, BACKUPS = (
    "guests",
    "firewall",
    "cluster facts",
    "templates",
    "migration",
    "backups",
)
POOLS, HA, NOTIFICATIONS = ("pools", "HA", "notifications")
FEATURES = (GUESTS, FIREWALL, CLUSTER, TEMPLATES, MIGRATION, BACKUPS, POOLS, HA, NOTIFICATIONS)

_ON_GUEST = (
    ("VM.Audit", "read guest configs"),
    ("VM.Allocate", "create, destroy and replace guests"),
    ("VM.Config.CPU", "set cores"),
    ("VM.Config.Memory", "set memory and swap"),
    ("VM.Config.Disk", "create and grow disks and volumes"),
    ("VM.Config.Network", "set hostnames and network interfaces"),
    ("VM.Config.Options", "set tags, description, onboot, protection"),
    ("VM.PowerMgmt", "start and stop guests"),
)
_AUDIT_STORAGE = ("Datastore.Audit", "Datastore.AllocateSpace")


@dataclass(frozen=True)
class Need:
    """One privilege (any one of `privileges`) on one ACL path, for one feature. No privileges:
    what only root@pam may do (a login as root@pam, not a token: no role grants it)."""

    feature: str
    path: str
    privileges: tuple[str, ...]
    why: str


def guest_path(guest: GuestSpec) -> str:
    """The ACL path PVE checks for a guest; `/vms` while its vmid is still to be allocated."""
    return f"/vms/{guest.vmid}" if guest.vmid is not None else "/vms"


def _storages(spec: PlatformSpec, guest: GuestSpec) -> set[str]:
    default = spec.platform.default_storage
    return {guest.disk.storage or default} | {v.storage or default for v in guest.volumes.values()}


def needed_privileges(spec: PlatformSpec) -> list[Need]:
    """Every privilege the spec's features need, on which path, once each."""
    needs: set[Need] = {
        Need(GUESTS, "/vms", ("VM.Audit",), "see every guest: an unseen one's vmid could be taken"),
        Need(FIREWALL, "/", ("Sys.Audit",), "read the cluster firewall (always observed)"),
    }
    fw = spec.firewall
    if fw.cluster is not None or fw.aliases or fw.ipsets or fw.groups:
        needs.add(
            Need(FIREWALL, "/", ("Sys.Modify",), "change cluster options, aliases, IP sets, groups")
        )
    for host in sorted(spec.hosts):
        node = spec.node_of(host)
        needs.add(Need(CLUSTER, f"/nodes/{node}", ("Sys.Audit",), "see nodes, for placement"))
    for name, guest in sorted(spec.guests.items()):
        path = guest_path(guest)
        for privilege, why in _ON_GUEST:
            needs.add(Need(GUESTS, path, (privilege,), why))
        if guest.kind == "qemu":
            needs.add(Need(GUESTS, path, ("VM.Config.HWType",), "set a VM's SCSI controller"))
        if guest.firewall is not None:
            needs.add(Need(FIREWALL, path, ("VM.Config.Network",), "set guests' firewalls"))
        needs.add(Need(MIGRATION, path, ("VM.Migrate",), "move a guest whose host changes"))
        for storage in _storages(spec, guest):
            where = f"/storage/{storage}"
            needs.add(Need(GUESTS, where, ("Datastore.AllocateSpace",), "allocate disks"))
            needs.add(Need(CLUSTER, where, _AUDIT_STORAGE, "see storages, for placement"))
        for nic in guest.network:
            bridge = f"/sdn/zones/localnetwork/{nic.bridge}"
            if nic.tag is not None:
                bridge += f"/{nic.tag}"
            needs.add(Need(GUESTS, bridge, ("SDN.Use",), "attach interfaces to bridges"))
        if guest.kind == "lxc" and not guest.unprivileged:
            needs.add(Need(GUESTS, "/", ("Sys.Modify",), "create privileged containers"))
        flags = sorted(k for k, on in guest.features.model_dump().items() if on and k != "nesting")
        if guest.kind == "lxc" and flags:
            why = f"{guest_address(name)}: feature flags {', '.join(flags)}"
            needs.add(Need(GUESTS, "/", (), why))
        templates = template_storage(guest.template) if guest.template else None
        if guest.kind == "lxc" and templates is not None:
            where = f"/storage/{templates}"
            needs.add(Need(TEMPLATES, where, _AUDIT_STORAGE, "list and use templates"))
    needs |= _backup_needs(spec)
    needs |= _vm_needs(spec)
    needs |= _platform_needs(spec)
    return sorted(needs, key=lambda n: (FEATURES.index(n.feature), n.path, n.privileges, n.why))


def _vm_needs(spec: PlatformSpec) -> set[Need]:
    """A clone, cloud-init, the guest agent, a pool, HA: per guest that uses them (qemu-server
    and pve-container's `clone`, `agent/*`, the pools and HA APIs, as the PVE 9 schema says)."""
    needs: set[Need] = set()
    for guest in spec.guests.values():
        path = guest_path(guest)
        if guest.clone is not None:
            source = guest.clone.source
            template = f"/vms/{source}" if isinstance(source, int) else "/vms"
            needs.add(Need(GUESTS, template, ("VM.Clone",), "clone guests from the template"))
            needs.add(Need(GUESTS, template, ("VM.Audit",), "read the template's disks"))
        if guest.cloud_init is not None:
            needs.add(Need(GUESTS, path, ("VM.Config.Cloudinit",), "set cloud-init"))
        if guest.agent:
            why = "wait for the guest agent, read its addresses"
            needs.add(Need(GUESTS, path, ("VM.GuestAgent.Audit", "VM.Monitor"), why))
        if guest.pool is not None:
            why = "put guests in the pool, take them out"
            needs.add(Need(POOLS, f"/pool/{guest.pool}", ("Pool.Allocate",), why))
        if guest.ha is not None:
            needs.add(Need(HA, "/", ("Sys.Console",), "create and change HA resources"))
    return needs


def _platform_needs(spec: PlatformSpec) -> set[Need]:
    """Declared pools and templates, and PVE's own notification targets."""
    needs: set[Need] = set()
    for name in spec.pools:
        needs.add(Need(POOLS, f"/pool/{name}", ("Pool.Allocate",), "create and change the pool"))
        # GET /pools lists only the pools the caller may audit (pve-access-control Pool.pm).
        needs.add(Need(POOLS, f"/pool/{name}", ("Pool.Audit",), "see the pool and its members"))
    for template in spec.templates.values():
        where = f"/storage/{template.storage}"
        needs.add(Need(TEMPLATES, where, ("Datastore.AllocateTemplate",), "download templates"))
        hosts = spec.hosts if template.hosts == "all" else template.hosts
        for host in sorted(h for h in hosts if h in spec.hosts):
            node = spec.node_of(host)
            why = "download from a URL on the node (or Sys.Audit with Sys.Modify on /)"
            needs.add(Need(TEMPLATES, f"/nodes/{node}", ("Sys.AccessNetwork",), why))
    pve = spec.notifications.proxmox
    if pve.endpoints or pve.matchers:
        where = "/mapping/notifications"
        needs.add(Need(NOTIFICATIONS, where, ("Mapping.Audit",), "read notification targets"))
        needs.add(Need(NOTIFICATIONS, where, ("Mapping.Modify",), "write notification targets"))
    return needs


def _backup_needs(spec: PlatformSpec) -> set[Need]:
    if not spec.backups:
        return set()
    needs = {
        Need(BACKUPS, "/", ("Sys.Audit",), "read backup jobs"),
        Need(BACKUPS, "/", ("Sys.Modify",), "create, change and delete backup jobs"),
    }
    for job in spec.backups.values():
        where = f"/storage/{job.storage}"
        needs.add(Need(BACKUPS, where, ("Datastore.AllocateSpace",), "write and list backups"))
        needs.add(Need(BACKUPS, where, ("Datastore.Allocate",), "point a backup job at it"))
        for name in selected_guests(spec, job.select):
            path = guest_path(spec.guests[name])
            needs.add(Need(BACKUPS, path, ("VM.Backup",), "back up and restore the guest"))
    return needs


async def read_privileges(
    provider: ProxmoxProvider, paths: Iterable[str]
) -> dict[str, frozenset[str]]:
    """The privileges the connected token or user holds on each path: one
    `GET /access/permissions?path=P` each (anyone may read their own). PVE answers
    `{P: {privilege: propagate}}`, in effect at P; every entry of the answer counts."""
    access = provider.client.access.permissions
    held: dict[str, frozenset[str]] = {}

    async def read(path: str) -> None:
        answer: Mapping[str, Any] = await provider.get(
            f"read permissions on {path}", access, path=path
        )
        held[path] = frozenset(p for privs in (answer or {}).values() for p in privs or {})

    async with anyio.create_task_group() as tg:
        for path in sorted(set(paths)):
            tg.start_soon(read, path)
    return dict(sorted(held.items()))


def missing(
    needs: Iterable[Need], held: Mapping[str, frozenset[str]], *, root: bool = False
) -> list[Need]:
    """The needs `held` does not meet. `root`: logged in as root@pam (not a token), who holds
    every privilege and may do what only root may."""
    if root:
        return []
    return [
        n
        for n in needs
        if not n.privileges or not set(n.privileges) & held.get(n.path, frozenset())
    ]
