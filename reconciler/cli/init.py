"""`reconciler init [DIR]`: start a platform. Writes a minimal spec directory that `validate`
accepts and that plans nothing on a cluster without guests, from the live cluster or from
flags alone. `reconciler.cli.main` registers it: `add_init_args` adds its flags when the
command is parsed, `cmd_init` runs it.

    reconciler init [DIR] [--name NAME] [connection flags] [--storage ID] [--template VOLID]
    reconciler init [DIR] [--name NAME] --nodes pve1,pve2 [--storage ID] [--cores N --memory SIZE]

From the cluster (`--proxmox-url` and the other connection flags, as for `plan`): one
`GET /cluster/resources` gives the nodes (their cores and memory become the hosts' capacity)
and their storages; the storage for guests' disks is `--storage`, else one every node has that
takes container disks (`local-lvm` first); the profile's template is `--template`, else a
container template found on the first node's storages (one content listing per storage that
holds templates). From flags (`--nodes`, no connection): the hosts are the nodes named, each
with `--cores` and `--memory`, and the storage is `--storage` (default local-lvm).

The platform's name is `--name`, else DIR's own name (it goes into every ownership mark, so
choose it before the first apply). What it writes (DIR, default `specs`; refused when DIR has
files, unless `--force`, which replaces its spec files):
- `platform.yaml`: `platform` (the name, owner tag `reconciler`, prune off, 3 destroys a run at
  most, the storage), `proxmox` (the endpoint it was given, secrets as references: never a
  value), `layers` and `ranges` (the example platform's: README "The spec language"), one host
  per node serving every layer, and the `layer_dependencies`, `placement`, `vmid_ranges` and
  `capacity` policies;
- `profiles.yaml`: one profile, `default` (an unprivileged container on that storage), and a
  first guest as a comment.
It is checked in memory before anything is written; then it says what it wrote.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from reconciler.cli.live import (
    add_connection_args,
    color_arg,
    connection_alone,
    run_async,
    spec_dir_args,
    warn_insecure,
)
from reconciler.model.errors import ReconcilerError

if TYPE_CHECKING:
    from reconciler.model.observed import ClusterFacts
    from reconciler.providers.proxmox import ProxmoxProvider

EXIT_OK, EXIT_ERROR = 0, 1
DEFAULT_STORAGE = "local-lvm"
PROFILE = "default"

# The example platform's layers and ranges (README "The spec language", specs/platform.yaml).
LAYERS: dict[str, dict[str, Any]] = {
    "control": {"description": "platform API, portal, databases, DNS, monitoring, backup"},
    "edge": {"description": "Traefik, Velocity, routers", "may_depend_on": ["control", "runtime"]},
    "runtime": {"description": "game servers and dev containers", "may_depend_on": ["control"]},
}
RANGES: dict[str, dict[str, Any]] = {
    "core": {"first": 100, "last": 199, "layer": "control", "description": "control plane"},
    "template": {"first": 200, "last": 299, "layer": "control", "description": "templates"},
    "network": {"first": 300, "last": 399, "layer": "edge", "description": "proxies"},
    "game": {"first": 1000, "last": 1099, "layer": "runtime", "description": "game servers"},
    "dev": {"first": 1100, "last": 1199, "layer": "runtime", "description": "dev containers"},
    "monitoring": {"first": 2000, "layer": "control", "description": "monitoring and backup"},
}


def add_init_args(p: argparse.ArgumentParser) -> None:
    spec_dir_args(p, help="the directory to write the platform to (default: specs)")
    p.add_argument("--name", help="the platform's name, a DNS label (default: DIR's own name)")
    p.add_argument(
        "--nodes",
        metavar="NODE,...",
        help="write these nodes as hosts, without reading a cluster",
    )
    p.add_argument(
        "--storage",
        metavar="ID",
        help="where guests' disks go (default: one every node has for container disks, "
        "local-lvm first; without a cluster, local-lvm)",
    )
    p.add_argument("--template", metavar="VOLID", help="the profile's container template")
    p.add_argument("--cores", type=int, default=4, help="each host's cores, with --nodes")
    p.add_argument("--memory", default="16G", help="each host's memory, with --nodes")
    p.add_argument("--force", action="store_true", help="replace the spec files in DIR")
    color_arg(p)
    add_connection_args(p)


class InitError(Exception):
    """A flag or the cluster does not give what a platform needs; the message says which."""


def cmd_init(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from reconciler.cli import render
    from reconciler.importing.writer import spec_files_in
    from reconciler.loading.loader import load_texts

    target = Path(args.dir)
    if target.exists() and not target.is_dir():
        err.write(f"{target} exists and is not a directory\n")
        return EXIT_ERROR
    if target.is_dir() and any(target.iterdir()) and not args.force:
        err.write(f"{target} is not empty; pass --force to replace its spec files\n")
        return EXIT_ERROR
    try:
        files, notes = platform_files(args, err)
    except (InitError, ReconcilerError) as exc:
        err.write(f"error: {exc}\n")
        return EXIT_ERROR
    for note in notes:
        err.write(f"note: {note}\n")
    check = load_texts({str(target / name): text for name, text in files.items()})
    if not check.ok:
        color = render.use_color(args.color, err)
        err.write(render.render_diagnostics(check.diagnostics, color=color))
        err.write(f"{target}: the platform would not validate; nothing written\n")
        return EXIT_ERROR
    if target.is_dir() and args.force:
        for old in spec_files_in(target):
            old.unlink()
    target.mkdir(parents=True, exist_ok=True)
    for name, text in sorted(files.items()):
        (target / name).write_text(text, encoding="utf-8")
        out.write(f"wrote {target / name}\n")
    spec = check.spec
    assert spec is not None
    shown = shlex.quote(str(target))
    out.write(
        f"{target}: platform {spec.platform.name!r}, {len(spec.hosts)} hosts "
        f"({', '.join(sorted(spec.hosts))}), {len(spec.ranges)} ranges, profile {PROFILE!r}; "
        f"valid. Next: `reconciler plan {shown}` (nothing to change), then add guests "
        f"(profiles.yaml shows one), or bring existing ones in with `reconciler import --into "
        f"{shown}`.\n"
    )
    return EXIT_OK


def platform_files(args: argparse.Namespace, err: TextIO) -> tuple[dict[str, str], list[str]]:
    """The files to write, and notes on what was guessed."""
    from reconciler.cli.importing import proxmox_section
    from reconciler.model.units import check_label, format_mib, parse_mib

    notes: list[str] = []
    if not args.name:
        args.name = Path(args.dir).resolve().name
        notes.append(f"the platform is named {args.name!r}, as its directory (--name to choose)")
    try:
        check_label(args.name)
    except ValueError as exc:
        raise InitError(f"--name {args.name!r}: {exc}") from None
    override = connection_alone(args)
    if args.nodes:
        nodes = [n.strip() for n in args.nodes.split(",") if n.strip()]
        if not nodes:
            raise InitError("--nodes: name at least one node")
        try:
            memory = format_mib(parse_mib(args.memory))
        except ValueError as exc:
            raise InitError(f"--memory {args.memory!r}: {exc}") from None
        if args.cores < 1:
            raise InitError(f"--cores {args.cores}: a host has one core at least")
        hosts = {n: {"cores": args.cores, "memory": memory} for n in nodes}
        storage = args.storage or DEFAULT_STORAGE
        template = args.template
        source = "--nodes " + ",".join(nodes)
        notes.append(
            f"each host's capacity is {args.cores} cores and {memory} (--cores, --memory): "
            "correct it in platform.yaml"
        )
    elif override is None:
        raise InitError(
            "init needs --proxmox-url (and the other connection flags) to read the cluster's "
            "nodes, or --nodes NODE,... to write them without one"
        )
    else:
        hosts, storage, template = _from_cluster(args, err, notes)
        source = override.url
    for node in hosts:
        try:
            check_label(node)
        except ValueError as exc:
            raise InitError(f"node {node!r} cannot name a host: {exc}") from None
    if not template:
        notes.append(
            f"no container template given or found: set profiles.{PROFILE}.template before "
            "adding a guest (`pveam available`, `pveam download local <template>`)"
        )
    section = proxmox_section(override) if override is not None else None
    return _render(args.name, source, hosts, storage, template, section), notes


def _from_cluster(
    args: argparse.Namespace, err: TextIO, notes: list[str]
) -> tuple[dict[str, dict[str, Any]], str, str | None]:
    """Hosts (node -> capacity), the guests' storage and a template, read from the cluster."""
    from reconciler.model.units import format_mib
    from reconciler.providers.proxmox import ProxmoxProvider, cluster_facts, connect

    api = connection_alone(args)
    assert api is not None
    provider = ProxmoxProvider(
        client=connect(api, insecure=args.insecure),
        platform=args.name,
        source=api.url,
        concurrency=args.proxmox_max_concurrency or api.max_concurrency,
    )
    warn_insecure(args, err)
    facts = cluster_facts(run_async(provider.inventory))
    if facts is None or not facts.nodes:
        raise InitError(
            f"{api.url} lists no node (the user needs Sys.Audit on /nodes): pass --nodes"
        )
    hosts: dict[str, dict[str, Any]] = {}
    for name, node in facts.nodes.items():
        if not node.online:
            notes.append(f"node {name} is offline; its capacity is a guess: check it")
        mib = node.maxmem // (1024 * 1024)
        hosts[name] = {"cores": max(1, node.maxcpu), "memory": format_mib(max(1024, mib))}
    storage = _storage(facts, args.storage)
    template = args.template or run_async(lambda: _find_template(provider, facts))
    return hosts, storage, template


def _storage(facts: ClusterFacts, wanted: str | None) -> str:
    """`wanted`, checked: every node has it for container disks; else the first such storage
    of them all (local-lvm, local-zfs, then by name)."""
    per_node = {
        name: {
            sid
            for sid, s in (node.storages or {}).items()
            if "rootdir" in s.content or "images" in s.content
        }
        for name, node in facts.nodes.items()
    }
    common = set.intersection(*per_node.values()) if per_node else set()
    if wanted:
        lacking = sorted(n for n, sids in per_node.items() if wanted not in sids)
        if lacking and any(node.storages is not None for node in facts.nodes.values()):
            have = "; ".join(f"{n}: {', '.join(sorted(per_node[n])) or 'none'}" for n in lacking)
            raise InitError(
                f"--storage {wanted}: not a storage for container disks on {', '.join(lacking)} "
                f"(they have {have})"
            )
        return wanted
    for sid in ("local-lvm", "local-zfs", *sorted(common)):
        if sid in common:
            return sid
    raise InitError(
        "no storage for container disks is on every node: pass --storage ID (and correct the "
        "hosts' disks where they differ)"
    )


async def _find_template(provider: ProxmoxProvider, facts: ClusterFacts) -> str | None:
    """A container template on the first node: a Debian one if there is one, else the first
    by name. One content listing per storage there that holds templates."""
    node = next(iter(sorted(facts.nodes)))
    found: list[str] = []
    for sid, s in sorted((facts.nodes[node].storages or {}).items()):
        if "vztmpl" not in s.content:
            continue
        items = await provider.get(
            f"list templates on {sid}",
            provider.client.nodes(node).storage(sid).content,
            content="vztmpl",
        )
        found.extend(str(i["volid"]) for i in items if i.get("volid"))
    if not found:
        return None
    return min(found, key=lambda v: ("debian" not in v, v))


def _render(
    name: str,
    source: str,
    hosts: Mapping[str, Mapping[str, Any]],
    storage: str,
    template: str | None,
    proxmox: Mapping[str, Any] | None,
) -> dict[str, str]:
    from reconciler.importing.yamltext import dump

    every_layer = list(LAYERS)
    platform: dict[str, Any] = {
        "platform": {
            "name": name,
            "owner_tag": "reconciler",
            "prune": False,
            "max_deletes_per_run": 3,
            "default_storage": storage,
        },
    }
    if proxmox is not None:
        platform["proxmox"] = dict(proxmox)
    platform["layers"] = {
        k: {**v, "may_depend_on": v.get("may_depend_on", [])} for k, v in LAYERS.items()
    }
    platform["hosts"] = {
        node: {"layers": every_layer, "capacity": dict(cap)} for node, cap in sorted(hosts.items())
    }
    platform["ranges"] = RANGES
    platform["policies"] = {
        "layer_dependencies": {},
        "placement": {},
        "vmid_ranges": {},
        "capacity": {"cpu_overcommit": 4.0, "memory_overcommit": 1.0},
    }
    head = [f"Written by `reconciler init` from {source}: a platform to start from."]
    files = {
        "platform.yaml": dump(
            platform,
            [
                *head,
                "Every host serves every layer; give the control plane a host of its own as the",
                'platform grows (README "The spec language"). Guests are created in their role\'s',
                "range; the isolation and agent_port policies are worth turning on once the",
                "guests they name exist.",
            ]
            + ([] if proxmox else ["", *_PROXMOX_EXAMPLE]),
        ),
    }
    profile: dict[str, Any] = {"kind": "lxc"}
    if template:
        profile["template"] = template
    profile.update(
        {
            "unprivileged": True,
            "onboot": True,
            "cores": 1,
            "memory": "1G",
            "swap": "512M",
            "disk": {"storage": storage, "size": "8G"},
        }
    )
    first = next(iter(sorted(hosts)))
    files["profiles.yaml"] = (
        dump(
            {"profiles": {PROFILE: profile}},
            [*head, "A guest takes every setting it leaves out from its profile."],
        )
        + "\n".join(f"# {line}".rstrip() for line in _first_guest(first))
        + "\n"
    )
    return files


_PROXMOX_EXAMPLE = (
    "The Proxmox API (or pass --proxmox-url and the other connection flags):",
    "proxmox:",
    "  url: https://pve.example.lan:8006",
    "  user: reconciler@pve",
    "  token_id: controller",
    "  token_secret: {env: PVE_TOKEN_SECRET}",
)


def _first_guest(host: str) -> Sequence[str]:
    return (
        "",
        "A first guest (`reconciler plan` shows it, `reconciler apply` creates it):",
        "guests:",
        "  hello:",
        "    role: core",
        f"    host: {host}",
        f"    profile: {PROFILE}",
        "    network: [{bridge: vmbr0, ip: dhcp}]",
    )
