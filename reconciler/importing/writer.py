"""Turn a read `Estate` into spec YAML files that describe it exactly. Called by
`reconciler import` after `estate.read_estate`; pure (no I/O) except `write_files`.

What is written (`render_specs`):
- `platform.yaml`: `platform`, `proxmox`, `layers`, `hosts`, `ranges` and `policies`, taken
  from an existing spec (`Base.from_spec`, the CLI's `--dir`) or from the example platform's
  ranges (`Base.default`). A node no host names gets a host of its own, sized from Proxmox.
  Policies: only `vmid_ranges` and `capacity` (raised to what the estate already uses); the
  design policies of an existing spec are left out, listed in a comment, because an estate
  made by hand rarely satisfies them yet and the output must validate.
- `<role>.yaml`: the guests whose vmid lies in that role's range, each with an explicit `vmid`
  (nothing moves), its `host`, and every setting Proxmox holds that the spec language has.
  A vmid outside every range gets a one-id range `unassigned-<vmid>` in layer `unassigned`.
- `profiles.yaml`: one profile per role with at least two guests. The rule: for each of kind,
  template, cores, memory, swap, disk, features, unprivileged, onboot, protection and firewall,
  the value most of the role's guests have goes into the profile when at least two share it
  (ties go to the value that sorts first); tags shared by every guest of the role go there too.
  A guest then writes only where it differs from its profile (maps key by key, as profiles
  merge). Volumes stay with their guest (`volumes:`, each with its path, storage, size and
  backup spelled out), so an imported guest with a mount point plans empty; a bind mount, and
  a volume option the spec cannot hold, is a note. A VM's `disk` is the disk it boots from
  (its boot order's first disk), with its `bus` when not scsi, or `none` when it boots from
  no disk; its other disks are its volumes by drive key (`scsi1`, `virtio1`, ...); CD-ROMs,
  the cloud-init drive and `unusedN` are not written (the spec never manages them). A VM's
  bus, or `none`, goes into a role's profile only when the role has no container.
- `firewall.yaml`: the cluster's aliases, IP sets and security groups (a mark of this platform
  stripped from their comments). The cluster options are written commented out: declaring
  them makes the controller manage them at once, and nothing marks them as reviewed.
- `backups.yaml` (when the cluster has backup jobs): `backups:`, one job per Proxmox job,
  rendered by `backup_writer` (its docstring has the option-by-option table); a job that
  existed before keeps its `id`, so `adopt backup/NAME` marks it instead of apply recreating
  it; a job's drift (all=1 written as a vmid list, vmids not imported) is in
  `ImportResult.drift`, what it cannot say in the notes.
- `templates:` at the end of `platform.yaml`, next to the hosts, when the guests use templates
  it can name (rendered by `template_writer`): a marked container's template and a VM's CD-ROM
  ISOs, each with `url: null` (Proxmox keeps no record of where a file came from), on the hosts
  using it. A VM that is a linked clone of a template guest gets `clone: {from: <template>,
  full: false}` (`template_writer.clone_of`: its disks name the template's base volume); a full
  clone's disks name nothing, so nothing is written for it.
- `edge.yaml` (when the edge was read: `edge.read_edge`, the CLI's `--dir` velocity and
  Traefik instances or `--velocity-url` / `--traefik-api`): `velocity:` (its guest, the bridge's
  port and secret reference, one server per registration on an imported guest) and
  `traefik:` (per instance: guest, routes_to, feed, api_url, and one route per router the spec
  can say exactly), rendered by `edge_writer`; what it cannot say is a note. Its header says
  that routes from hand-made routers are not adopted: the first apply adds `rc-` routers next
  to them.
- Names: the guest's hostname, made a DNS label and unique (`<name>-<vmid>` on a clash); a
  guest the controller already owns keeps the name of its mark's address.
- Template: Proxmox does not record the ostemplate a container was made from. The spec needs
  one only to re-create the guest. A guest already marked keeps its mark's template; any other
  gets `unknown:vztmpl/<ostype>-imported.tar.zst`, with a comment: a storage that does not
  exist, so a re-create fails loudly instead of installing the wrong system. `adopt` writes the
  same template into the mark line, so no plan sees a template change.
- Secrets are never written: `proxmox` credentials are `{env: ...}` references only.
- Guests marked for another platform, templates and guests being created are not written; they
  are listed in `ImportResult.notes`, and so is every setting the spec language cannot hold
  (an extra NIC option, a nomatch IP set entry, ...), which the first apply after adoption
  would change (`ImportResult.drift` names those fields per address).
- Text the spec refuses as it is, so that `validate` would: a description line that reads as
  the controller's mark (its own mark on the last line is ours, and simply taken off), a
  firewall comment with a line break or control character, or with `[reconciler:` in it. It is
  left out, never reworded, and named in a note; a description with lines left out says so in
  a comment on its line.

Output is deterministic: sorted names, a fixed key order, one header comment per file saying
where and when the estate was read.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reconciler.importing.backup_writer import BACKUPS_HEADER, job_drift, render_backups
from reconciler.importing.edge import EdgeEstate
from reconciler.importing.edge_writer import EDGE_HEADER, ImportedGuest, render_edge
from reconciler.importing.estate import Estate, GuestRecord, NamedObject
from reconciler.importing.template_writer import TEMPLATES_HEADER, clone_of, render_templates
from reconciler.importing.yamltext import Commented, dump, scalar
from reconciler.loading.checks import forges_mark
from reconciler.loading.graph import build_graph
from reconciler.loading.loader import LoadResult, load_texts
from reconciler.model.disks import DEFAULT_BUS, split_key
from reconciler.model.resources import Kind
from reconciler.model.spec import FirewallRule, GuestSpec, PlatformSpec
from reconciler.model.units import check_comment, format_mib, parse_kv, parse_mib
from reconciler.planning import diffing, normalize
from reconciler.planning.provenance import IMPORT_TEMPLATE, adopt_command
from reconciler.providers.firewall import OPTION_DEFAULTS, read_comment_mark
from reconciler.providers.proxmox import guest_attributes

# The planner knows it too: an owned guest missing from a spec whose mark names it was adopted
# from an import (planning.provenance.adopted_from_import).
PLACEHOLDER_TEMPLATE = IMPORT_TEMPLATE
TEMPLATE_NOTE = "unknown: only used to re-create a guest"
DESCRIPTION_NOTE = "lines that read as the controller's mark left out: see the import's notes"
UNASSIGNED_LAYER = "unassigned"

# The example platform's layers and ranges (specs/platform.yaml): the default table.
DEFAULT_LAYERS: dict[str, dict[str, Any]] = {
    "control": {"description": "control plane", "may_depend_on": []},
    "edge": {"description": "proxies and routers", "may_depend_on": ["control", "runtime"]},
    "runtime": {"description": "game servers and dev containers", "may_depend_on": ["control"]},
}
DEFAULT_RANGES: dict[str, dict[str, Any]] = {
    "core": {"first": 100, "last": 199, "layer": "control"},
    "template": {"first": 200, "last": 299, "layer": "control"},
    "network": {"first": 300, "last": 399, "layer": "edge"},
    "game": {"first": 1000, "last": 1099, "layer": "runtime"},
    "dev": {"first": 1100, "last": 1199, "layer": "runtime"},
    "monitoring": {"first": 2000, "last": 999_999_999, "layer": "control"},
}

# The order a guest's keys are written in (the example's order).
GUEST_ORDER = (
    "role",
    "vmid",
    "host",
    "profile",
    "hostname",
    "kind",
    "template",
    "clone",
    "cores",
    "memory",
    "swap",
    "disk",
    "volumes",
    "tags",
    "features",
    "unprivileged",
    "onboot",
    "protection",
    "state",
    "network",
    "firewall",
    "description",
)
# The settings a role profile may carry: every key a guest writes but its identity and what
# stays with each guest (tags go to a profile on their own terms: those all its guests share).
_IDENTITY = {"role", "vmid", "host", "profile", "hostname"}
_PER_GUEST = {"clone", "volumes", "tags", "state", "network", "description"}
PROFILE_CANDIDATES = tuple(name for name in GUEST_ORDER if name not in _IDENTITY | _PER_GUEST)
MAP_FIELDS = ("disk", "features", "firewall")
_LXC_ONLY = ("template", "swap", "features", "unprivileged")
_FEATURES = ("nesting", "keyctl", "fuse", "mknod")
_NIC_KEYS = ("name", "bridge", "ip", "gw", "tag", "firewall", "mtu")
# A spec rule's keys, in the order the spec declares them (a Proxmox rule's `icmp-type` is not
# one of them).
_RULE_KEYS = tuple(FirewallRule.model_fields)
_LABEL_BAD = re.compile(r"[^a-z0-9-]+")


# --- what comes from an existing spec ---------------------------------------------------------


@dataclass(frozen=True)
class Base:
    """Platform settings, layers, hosts and ranges: the frame the guests are put in."""

    platform: Mapping[str, Any]
    proxmox: Mapping[str, Any] | None
    layers: Mapping[str, Any]
    hosts: Mapping[str, Any]
    ranges: Mapping[str, Any]
    cpu_overcommit: float = 1.0
    memory_overcommit: float = 1.0
    left_out_policies: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return str(self.platform["name"])

    @property
    def owner_tag(self) -> str:
        return str(self.platform.get("owner_tag", "reconciler"))

    @property
    def default_storage(self) -> str:
        return str(self.platform.get("default_storage", "local-lvm"))

    @classmethod
    def from_spec(cls, spec: PlatformSpec) -> Base:
        dumped = spec.model_dump(mode="json", exclude_defaults=True)
        policies = spec.policies
        left_out = tuple(
            name
            for name in type(policies).model_fields
            if name not in ("vmid_ranges", "capacity") and getattr(policies, name) is not None
        )
        return cls(
            platform=spec.platform.model_dump(mode="json"),
            proxmox=dumped.get("proxmox"),
            layers=dumped.get("layers", {}),
            hosts=dumped.get("hosts", {}),
            ranges={n: r.model_dump(mode="json") for n, r in spec.ranges.items()},
            cpu_overcommit=policies.capacity.cpu_overcommit,
            memory_overcommit=policies.capacity.memory_overcommit,
            left_out_policies=left_out,
        )

    @classmethod
    def default(cls, platform: str, proxmox: Mapping[str, Any] | None = None) -> Base:
        return cls(
            platform={"name": platform, "owner_tag": "reconciler", "default_storage": "local-lvm"},
            proxmox=proxmox,
            layers=DEFAULT_LAYERS,
            hosts={},
            ranges=DEFAULT_RANGES,
        )


@dataclass
class ImportResult:
    files: dict[str, str]  # file name -> YAML text
    guests: dict[str, int]  # guest name -> vmid
    notes: list[str] = field(default_factory=list)  # what could not be carried over
    drift: dict[str, list[str]] = field(default_factory=dict)  # address -> fields that differ
    routes: dict[str, str] = field(default_factory=dict)  # route address -> hand-made router
    velocity_servers: dict[str, str] = field(default_factory=dict)  # server name -> guest
    backup_jobs: dict[str, str] = field(default_factory=dict)  # job name -> its Proxmox id
    load: LoadResult | None = None  # the written specs, loaded back

    @property
    def ok(self) -> bool:
        return self.load is not None and self.load.ok


# --- one guest: Proxmox config -> spec settings -----------------------------------------------


def label(text: str) -> str:
    """A DNS label made from a host name (empty when nothing usable is left)."""
    out = _LABEL_BAD.sub("-", text.split(".")[0].lower()).strip("-")
    return out[:63].rstrip("-")


def _size(mib: int) -> str:
    return format_mib(mib)


def _nic(kind: str, index: int, value: str, notes: list[str], who: str) -> dict[str, Any]:
    if kind == "qemu":
        model, _mac, kv = normalize.qemu_nic(value)
        if model != "virtio":
            notes.append(f"{who}: net{index} is a {model or 'unknown'} NIC; specs make virtio")
        known = {"bridge", "tag", "firewall", "mtu"}
    else:
        kv = parse_kv(value)
        known = {*_NIC_KEYS, "hwaddr", "type"}
        if "ip" not in kv:
            notes.append(f"{who}: net{index} has no ip; the spec's default is dhcp")
    extra = sorted(set(kv) - known)
    if extra:
        notes.append(f"{who}: net{index} options the spec cannot hold: {', '.join(extra)}")
    nic: dict[str, Any] = {}
    if kind != "qemu":
        nic["name"] = kv.get("name", "eth0")
    nic["bridge"] = kv.get("bridge", "vmbr0")
    if kind != "qemu":
        nic["ip"] = kv.get("ip", "dhcp")
        if kv.get("gw"):
            nic["gw"] = kv["gw"]
    if kv.get("tag"):
        nic["tag"] = int(kv["tag"])
    if kv.get("firewall", "0") != "1":
        nic["firewall"] = False
    if kv.get("mtu"):
        nic["mtu"] = int(kv["mtu"])
    return nic


def spec_rule(
    rule: Mapping[str, Any], notes: list[str], who: str, position: int = 0
) -> dict[str, Any]:
    """A cleaned Proxmox rule -> a spec rule, in the spec's key order. `position` (0 the top
    rule) names the rule in a note."""
    if "icmp-type" in rule:
        notes.append(f"{who}: a rule's icmp-type cannot be held by the spec; left out")
    out: dict[str, Any] = {}
    for key in _RULE_KEYS:
        if key not in rule:
            continue
        value = rule[key]
        if key == "enable":
            if not int(value):
                out["enable"] = False
        elif key == "log":
            if value != "nolog":
                out["log"] = value
        elif key == "comment":
            comment = spec_comment(str(value), notes, f"{who}: rule {position}")
            if comment:
                out["comment"] = comment
        else:
            out[key] = str(value)
    return out


# --- text the spec holds only in part ---------------------------------------------------------


def spec_comment(text: str, notes: list[str], what: str) -> str:
    """A firewall comment as the spec holds it: one line (Proxmox writes it at the end of a
    config line) that does not read as the controller's mark. Any other is left out and named
    in a note, never reworded: once adopted, the controller writes the spec's comment."""
    try:
        check_comment(text)
    except ValueError:
        notes.append(
            f"{what}: comment {text!r} left out: the spec holds a comment of one line, without "
            "line breaks or control characters"
        )
        return ""
    if forges_mark(text):
        notes.append(
            f"{what}: comment {text!r} left out: it reads as the controller's ownership mark "
            "('[reconciler:...]'), which only the controller writes"
        )
        return ""
    return text


def spec_description(text: str, notes: list[str], who: str) -> tuple[str, bool]:
    """A guest's description as the spec holds it, and whether lines were left out.
    `guest_attributes` has taken the controller's mark off its last line already (the
    controller writes it again on adoption); any other line that reads as a mark (a line
    starting `reconciler:v1`, or holding `[reconciler:`) is refused by `validate`
    (forged-mark), so it is left out and named in a note."""
    kept: list[str] = []
    dropped: list[str] = []
    for line in text.split("\n"):
        (dropped if forges_mark(line) else kept).append(line)
    if dropped:
        notes.append(
            f"{who}: description lines that read as the controller's ownership mark left out "
            "(only the controller writes its mark; once adopted, it writes the description "
            "without them): " + "; ".join(repr(line.strip()) for line in dropped)
        )
    return "\n".join(kept).strip("\n"), bool(dropped)


def _guest_firewall(g: GuestRecord, notes: list[str], who: str) -> dict[str, Any] | None:
    opts = g.firewall_options
    enable = int(bool(int(opts.get("enable", 0) or 0)))
    rules = [spec_rule(r, notes, who, i) for i, r in enumerate(g.firewall_rules)]
    if not enable and not rules and "policy_in" not in opts and "policy_out" not in opts:
        return None  # nothing set: leave it out, so the spec does not start managing it
    return {
        "enable": bool(enable),
        "policy_in": str(opts.get("policy_in", OPTION_DEFAULTS["policy_in"])),
        "policy_out": str(opts.get("policy_out", OPTION_DEFAULTS["policy_out"])),
        "rules": rules,
    }


@dataclass
class _Guest:
    name: str
    record: GuestRecord
    role: str
    host: str
    settings: dict[str, Any]  # every field, explicit; None for what a VM does not have
    tags: list[str]
    network: list[dict[str, Any]]
    description: str
    volumes: dict[str, Any] = field(default_factory=dict)
    description_cut: bool = False  # mark-like lines were left out of the description
    clone: dict[str, Any] | None = None  # a linked clone's template (template_writer.clone_of)


def _settings(
    g: GuestRecord, base: Base, notes: list[str], who: str
) -> tuple[dict[str, Any], list[str], list[dict[str, Any]], str]:
    attrs = guest_attributes(g.item, g.config)
    kind = g.kind
    if kind == "qemu":
        disk = _vm_disk(attrs, base, notes, who)
    else:
        rootfs = normalize.rootfs(attrs["rootfs"]) if attrs.get("rootfs") else {}
        if not rootfs:
            notes.append(f"{who}: no rootfs disk to describe")
        disk = {
            "storage": rootfs.get("storage", base.default_storage),
            "size": rootfs.get("size", "8G"),
        }
    feats = parse_kv(str(attrs.get("features") or ""))
    extra = sorted(k for k in feats if k not in _FEATURES)
    if extra:
        notes.append(f"{who}: features the spec cannot hold: {', '.join(extra)}")
    template = g.mark.get("template") if g.mark.get("platform") == base.name else None
    if kind == "lxc" and not template:
        ostype = label(str(g.config.get("ostype") or "linux")) or "linux"
        template = PLACEHOLDER_TEMPLATE.format(ostype=ostype)
    settings: dict[str, Any] = {
        "kind": kind,
        "template": template if kind == "lxc" else None,
        "cores": attrs["cores"],
        "memory": attrs["memory"],
        "swap": attrs.get("swap"),
        "disk": disk,
        "features": {k: feats.get(k) == "1" for k in _FEATURES} if kind == "lxc" else None,
        "unprivileged": attrs.get("unprivileged"),
        "onboot": attrs["onboot"],
        "protection": attrs["protection"],
        "firewall": _guest_firewall(g, notes, who),
    }
    tags = [t for t in attrs["tags"] if t != base.owner_tag]
    nets = attrs["net"]
    if sorted(nets) != [f"net{i}" for i in range(len(nets))]:
        notes.append(f"{who}: NICs {', '.join(sorted(nets))} are not numbered net0, net1, ...")
    network = [
        _nic(kind, i, nets[k], notes, who)
        for i, k in enumerate(sorted(nets, key=lambda k: int(k[3:])))
    ]
    return settings, tags, network, str(attrs.get("description") or "").strip("\n")


def _vm_disk(
    attrs: Mapping[str, Any], base: Base, notes: list[str], who: str
) -> dict[str, Any] | str:
    """A VM's `disk` setting: the disk it boots from (`boot_disk`, from its boot order), its
    storage and size, and its bus when not scsi; `none` when it boots from no disk. A boot
    disk the spec cannot name (not unit 0 of its bus: `scsi1`) stays among the volumes, with
    `disk: none` and a note (the boot order is then drift)."""
    boot = attrs.get("boot_disk")
    if boot is None:
        return "none"
    found = split_key(str(boot))
    if found is None or found[1] != 0:
        notes.append(
            f"{who}: boots from {boot}, which the spec cannot name (a VM's boot disk is unit 0 "
            "of its bus: scsi0, virtio0, sata0, ide0): written as a volume with disk: none"
        )
        return "none"
    raw = str((attrs.get("volumes") or {})[boot])
    extra = sorted(set(parse_kv(raw)) - _VOLUME_OWN)
    if extra:
        notes.append(f"{who}: {boot} options the spec cannot hold: {', '.join(extra)}")
    vol = normalize.volume("qemu", raw)
    if "size" not in vol:
        notes.append(f"{who}: {boot} has no size to describe")
    out: dict[str, Any] = {
        "storage": vol.get("storage", base.default_storage),
        "size": vol.get("size", "8G"),
    }
    if found[0] != DEFAULT_BUS:
        out["bus"] = found[0]
    if not vol["backup"]:
        notes.append(f"{who}: {boot} is left out of backups (backup=0), which disk cannot say")
    return out


def _vm_boot_volume(settings: Mapping[str, Any]) -> str | None:
    """The drive `disk` describes (written there, not among the volumes)."""
    disk = settings.get("disk")
    if settings.get("kind") != "qemu" or not isinstance(disk, Mapping):
        return None
    return f"{disk.get('bus') or DEFAULT_BUS}0"


# What a volume's property string may hold beyond what the spec says (Proxmox's own keys).
_VOLUME_OWN = {"volume", "size", "mp", "backup", "acl", "quota", "ro", "replicate", "mountoptions"}


def _natural(key: str) -> tuple[str, int]:
    """mp2 before mp10."""
    head = key.rstrip("0123456789")
    return head, int(key[len(head) :] or 0)


def _volumes(g: GuestRecord, notes: list[str], who: str, boot: str | None = None) -> dict[str, Any]:
    """A guest's volumes (mount points, a VM's disks but `boot`, its `disk`) in the spec's
    words, each with its storage, size and backup setting spelled out. What the spec cannot
    hold is a note."""
    out: dict[str, Any] = {}
    raw = dict(guest_attributes(g.item, g.config)["volumes"])
    raw.pop(boot or "", None)
    for key in sorted(g.config):
        if re.fullmatch(r"mp\d+", key) and key not in raw and g.kind == "lxc":
            notes.append(f"{who}: {key} is a bind or device mount, which the spec cannot hold")
    for key in sorted(raw, key=_natural):
        kv = parse_kv(raw[key])
        extra = sorted(set(kv) - _VOLUME_OWN)
        if extra:
            notes.append(f"{who}: {key} options the spec cannot hold: {', '.join(extra)}")
        vol = normalize.volume(g.kind, raw[key])
        spec: dict[str, Any] = {}
        if g.kind == "lxc":
            spec["path"] = vol.get("path")
        spec["storage"] = vol.get("storage")
        spec["size"] = vol.get("size")
        spec["backup"] = vol["backup"]
        options: dict[str, Any] = {
            k: vol[k] for k in ("acl", "quota", "ro", "replicate") if k in vol
        }
        if vol.get("mountoptions"):
            options["mountoptions"] = str(vol["mountoptions"]).split(";")
        if options:
            spec["options"] = options
        out[key] = spec
    return out


# --- roles, profiles, overrides ----------------------------------------------------------------


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _defaults(base: Base) -> dict[str, Any]:
    """GuestSpec's defaults, in the explicit settings shape."""
    d = GuestSpec.model_fields
    return {
        "kind": d["kind"].default,
        "template": None,
        "cores": d["cores"].default,
        "memory": d["memory"].default,
        "swap": d["swap"].default,
        "disk": {"storage": base.default_storage, "size": "8G"},
        "features": dict.fromkeys(_FEATURES, False),
        "unprivileged": d["unprivileged"].default,
        "onboot": d["onboot"].default,
        "protection": d["protection"].default,
        "firewall": None,
    }


def _profile(
    guests: Sequence[_Guest], defaults: Mapping[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """The role profile: per field, the most common value when two or more guests share it
    and it is not the default anyway. A field some guest cannot take from a profile is left
    out: the firewall when a guest has none (a guest cannot unset an inherited firewall)."""
    profile: dict[str, Any] = {}
    containers = any(g.record.kind == "lxc" for g in guests)
    for name in PROFILE_CANDIDATES:
        values = [g.settings[name] for g in guests if g.settings[name] is not None]
        if name == "firewall" and len(values) < len(guests):
            continue
        if name == "disk" and containers:
            # A VM's bus (or none) would reach the role's containers too, which have neither.
            values = [v for v in values if isinstance(v, Mapping) and "bus" not in v]
        first = {_key(v): v for v in reversed(values)}  # each value as the first guest has it
        counts = Counter(_key(v) for v in values)
        if not counts:
            continue
        best, n = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        if n >= 2 and first[best] != defaults[name]:
            profile[name] = first[best]
    shared = set(guests[0].tags)
    for g in guests[1:]:
        shared &= set(g.tags)
    return profile, sorted(shared)


def _overrides(
    settings: Mapping[str, Any], effective: Mapping[str, Any], kind: str
) -> dict[str, Any]:
    """The fields a guest must write so that, merged over `effective` (its profile over the
    defaults), it gets `settings`. Maps merge key by key, so a map writes only its keys that
    differ."""
    out: dict[str, Any] = {}
    for name in PROFILE_CANDIDATES:
        want, have = settings[name], effective.get(name)
        if want is None or (kind == "qemu" and name in _LXC_ONLY):
            continue
        if name in MAP_FIELDS and isinstance(have, Mapping) and isinstance(want, Mapping):
            diff = {k: v for k, v in want.items() if have.get(k) != v}
            if diff:
                out[name] = diff
        elif want != have:
            out[name] = want
    return out


def _write_settings(
    values: Mapping[str, Any], base: Base, *, profile: bool = False
) -> dict[str, Any]:
    """Settings as YAML values: sizes with units, the template with its comment, false
    features and the default storage left out when nothing needs them."""
    out: dict[str, Any] = {}
    for name, value in values.items():
        if name in ("memory", "swap"):
            out[name] = _size(int(value))
        elif name == "template" and str(value).startswith("unknown:"):
            out[name] = Commented(value, TEMPLATE_NOTE)
        elif name == "features":
            on = {k: v for k, v in value.items() if v or not profile}
            if on:
                out[name] = on
        elif name == "disk" and profile and isinstance(value, Mapping):
            disk = {k: v for k, v in value.items() if k != "storage" or v != base.default_storage}
            if disk:
                out[name] = disk
        elif name == "firewall":
            fw = {k: value[k] for k in ("enable", "policy_in", "policy_out") if k in value}
            if "rules" in value:
                fw["rules"] = list(value["rules"])
            out[name] = fw
        else:
            out[name] = value
    return out


# --- the whole estate -----------------------------------------------------------------------


def render_specs(
    estate: Estate, base: Base, edge: EdgeEstate | None = None, directory: str | None = None
) -> ImportResult:
    """The spec files for `estate` in `base`'s frame (and `edge.yaml` for what `edge` holds),
    loaded back and compared with what was read (`ImportResult.drift`). `directory`: where
    they are going, as the headers' `adopt` command names it."""
    notes: list[str] = [f"skipped {s}" for s in estate.skipped]
    frame = _Frame.of(base)
    guests = _place_guests(estate, base, frame, notes)
    by_role: dict[str, list[_Guest]] = {}
    for guest in guests:
        by_role.setdefault(guest.role, []).append(guest)
    defaults = _defaults(base)
    profiles, profile_tags = _role_profiles(by_role, defaults)

    header = [
        f"Imported by `reconciler import` from {estate.source or 'Proxmox'} at {estate.read_at}.",
        "Guests not owned yet are only reported: review them, then",
        f"`{adopt_command('ADDRESS', directory)}`.",
    ]
    files: dict[str, str] = {}
    for role, members in sorted(by_role.items()):
        files[f"{role}.yaml"] = _role_file(
            role, members, profiles.get(role), profile_tags.get(role, []), defaults, base, header
        )
    if profiles:
        files["profiles.yaml"] = _profiles_file(profiles, profile_tags, base, header)
    files["firewall.yaml"] = _firewall_file(estate, base, header, notes)
    files["platform.yaml"] = _platform_file(
        base, frame.layers, frame.hosts, frame.ranges, guests, header
    )
    used = render_templates(
        (g.name, g.host, g.settings["template"], g.record.config) for g in guests
    )
    notes.extend(used.notes)
    if used.section:  # next to the hosts that need them
        files["platform.yaml"] += "\n" + dump({"templates": used.section}, TEMPLATES_HEADER)
    jobs = render_backups(estate.backup_jobs, {g.record.vmid: g.name for g in guests}, base.name)
    notes.extend(jobs.notes)
    if jobs.section:
        files["backups.yaml"] = dump({"backups": jobs.section}, [*header, "", *BACKUPS_HEADER])

    edged = render_edge(
        edge or EdgeEstate(),
        [
            ImportedGuest(g.name, frame.ranges[g.role]["layer"], _static_ip(g.network))
            for g in guests
        ],
    )
    notes.extend(edged.notes)
    if edged.sections:
        files["edge.yaml"] = dump(edged.sections, [*header, "", *EDGE_HEADER])

    result = ImportResult(files, {g.name: g.record.vmid for g in guests}, notes)
    result.routes, result.velocity_servers = edged.routes, edged.servers
    result.backup_jobs = jobs.ids
    result.load = load_texts(files)
    if result.load.ok and result.load.spec is not None:
        result.drift = _drift(result.load.spec, guests, estate, base)
        vmids = {f"guest/{g.name}": g.record.vmid for g in guests}
        result.drift.update(job_drift(build_graph(result.load.spec), jobs, vmids))
    return result


@dataclass
class _Frame:
    """`base`'s ranges, layers and hosts as the guests fill them in: a vmid outside every range
    gets a one-id range of its own, a node no host names a host of its own."""

    roles: list[tuple[str, int, int]]  # (range, first, last), sorted
    ranges: dict[str, dict[str, Any]]
    layers: dict[str, dict[str, Any]]
    hosts: dict[str, dict[str, Any]]
    by_node: dict[str, str]  # node -> host key
    new_hosts: set[str] = field(default_factory=set)  # the hosts made for a node

    @classmethod
    def of(cls, base: Base) -> _Frame:
        return cls(
            roles=sorted(
                (name, int(r["first"]), int(r.get("last", 999_999_999)))
                for name, r in base.ranges.items()
            ),
            ranges={k: dict(v) for k, v in base.ranges.items()},
            layers={k: dict(v) for k, v in base.layers.items()},
            hosts={k: dict(v) for k, v in base.hosts.items()},
            by_node={str(h.get("node") or key): key for key, h in base.hosts.items()},
        )

    def place_role(self, g: GuestRecord, notes: list[str], who: str) -> str:
        """The range the guest's vmid lies in; a one-id range in layer `unassigned` if none."""
        role = next((r for r, first, last in self.roles if first <= g.vmid <= last), None)
        if role is not None:
            return role
        role = f"{UNASSIGNED_LAYER}-{g.vmid}"
        self.ranges[role] = {"first": g.vmid, "last": g.vmid, "layer": UNASSIGNED_LAYER}
        self.layers.setdefault(UNASSIGNED_LAYER, {"may_depend_on": []})
        notes.append(f"{who}: vmid outside every range; put in range {role!r}")
        return role

    def place_host(self, g: GuestRecord, role: str, nodes: Mapping[str, Any]) -> str:
        """The host naming the guest's node; a host of its own, sized from Proxmox, if none."""
        if g.node not in self.by_node:
            self.by_node[g.node] = g.node
            self.hosts[g.node] = {"layers": [], "capacity": _capacity(nodes.get(g.node))}
            self.new_hosts.add(g.node)
        host = self.by_node[g.node]
        if host in self.new_hosts:
            # A host of our own serves the layers of the guests found on it.
            layers = {*self.hosts[host]["layers"], self.ranges[role]["layer"]}
            self.hosts[host]["layers"] = sorted(layers)
        return host


def _place_guests(estate: Estate, base: Base, frame: _Frame, notes: list[str]) -> list[_Guest]:
    """Every guest that is not another platform's, named, in its range, on its host, with its
    settings read."""
    guests: list[_Guest] = []
    taken: set[str] = set()
    # Guests we own first: they keep the names of their marks.
    records = sorted(estate.guests, key=lambda g: (g.mark.get("platform") != base.name, g.vmid))
    for g in records:
        who = f"{g.kind} {g.vmid} ({g.name})"
        platform = g.mark.get("platform")
        if platform is not None and platform != base.name:
            notes.append(f"skipped {who}: it carries the mark of platform {platform!r}")
            continue
        role = frame.place_role(g, notes, who)
        name = _guest_name(g, taken, notes, who)
        host = frame.place_host(g, role, estate.nodes)
        settings, tags, network, description = _settings(g, base, notes, who)
        description, cut = spec_description(description, notes, who)
        volumes = _volumes(g, notes, who, _vm_boot_volume(settings))
        clone = clone_of(g.kind, g.config, estate.templates)
        guests.append(
            _Guest(name, g, role, host, settings, tags, network, description, volumes, cut, clone)
        )
    return guests


def _guest_name(g: GuestRecord, taken: set[str], notes: list[str], who: str) -> str:
    """The name of its mark's address for a guest we own, else its hostname as a DNS label;
    `<name>-<vmid>` when that is `taken` already."""
    owned_name = g.mark.get("address", "").removeprefix("guest/") if g.mark.get("platform") else ""
    name = owned_name or label(g.name) or f"guest-{g.vmid}"
    if name in taken:
        name = f"{name}-{g.vmid}"
    taken.add(name)
    if name != g.name:
        notes.append(
            f"{who}: named {name!r}; its hostname {g.name!r} is not a unique DNS label, "
            "so the first apply after adoption would rename it"
        )
    return name


def _role_profiles(
    by_role: Mapping[str, Sequence[_Guest]], defaults: Mapping[str, Any]
) -> tuple[dict[str, dict[str, Any]], dict[str, list[str]]]:
    """Per role of two guests or more: its profile, and the tags all its guests share (a role
    with neither has no profile)."""
    profiles: dict[str, dict[str, Any]] = {}
    profile_tags: dict[str, list[str]] = {}
    for role, members in sorted(by_role.items()):
        if len(members) >= 2:
            profile, shared = _profile(members, defaults)
            if profile or shared:
                profiles[role] = profile
                profile_tags[role] = shared
    return profiles, profile_tags


def _role_file(
    role: str,
    members: Sequence[_Guest],
    profile: Mapping[str, Any] | None,
    profile_tags: Sequence[str],
    defaults: Mapping[str, Any],
    base: Base,
    header: list[str],
) -> str:
    """`<role>.yaml`: each guest writes what differs from its profile merged over the defaults
    (maps key by key)."""
    effective = {**defaults, **(profile or {})}
    for name in ("disk", "features"):
        # A map merges key by key; `disk: none` replaces it whole.
        if profile is not None and isinstance(profile.get(name), Mapping):
            effective[name] = {**defaults[name], **profile[name]}
    entries: dict[str, Any] = {}
    for guest in sorted(members, key=lambda m: m.name):
        entry: dict[str, Any] = {"role": role, "vmid": guest.record.vmid, "host": guest.host}
        if profile is not None:
            entry["profile"] = role
        over = _overrides(guest.settings, effective, guest.record.kind)
        entry.update(_write_settings(over, base))
        if guest.clone is not None:
            entry["clone"] = guest.clone
        extra_tags = [t for t in guest.tags if t not in profile_tags]
        if extra_tags:
            entry["tags"] = extra_tags
        if guest.record.item.get("status") != "running":
            entry["state"] = "stopped"
        if guest.network:
            entry["network"] = guest.network
        if guest.volumes:
            entry["volumes"] = guest.volumes
        if guest.description:
            entry["description"] = (
                Commented(guest.description, DESCRIPTION_NOTE)
                if guest.description_cut
                else guest.description
            )
        entries[guest.name] = {k: entry[k] for k in GUEST_ORDER if k in entry}
    return dump({"guests": entries}, [*header, "", f"Role {role}."])


def _profiles_file(
    profiles: Mapping[str, Mapping[str, Any]],
    profile_tags: Mapping[str, list[str]],
    base: Base,
    header: list[str],
) -> str:
    written: dict[str, Any] = {}
    for role, profile in sorted(profiles.items()):
        values = _write_settings(profile, base, profile=True)
        if profile_tags.get(role):
            values["tags"] = profile_tags[role]
        written[role] = {k: values[k] for k in GUEST_ORDER if k in values}
    return dump(
        {"profiles": written},
        [
            *header,
            "",
            "One profile per role: a setting at least two of its guests share (the most",
            "common), and the tags all of them have. Guests write only what differs.",
        ],
    )


def _static_ip(network: Sequence[Mapping[str, Any]]) -> str | None:
    for nic in network:
        ip = str(nic.get("ip") or "")
        if "/" in ip:
            return ip.split("/")[0]
    return None


def _capacity(node: Mapping[str, Any] | None) -> dict[str, Any]:
    if not node:
        return {"cores": 1, "memory": "1G"}
    return {
        "cores": max(1, int(node.get("maxcpu") or 1)),
        "memory": _size(max(1, int(node.get("maxmem") or 0) // (1024 * 1024))),
    }


def _firewall_file(estate: Estate, base: Base, header: list[str], notes: list[str]) -> str:
    def ours(obj: NamedObject, what: str) -> str | None:
        platform, comment = read_comment_mark(obj.comment)
        if platform is not None and platform != base.name:
            notes.append(f"skipped {what} {obj.name}: it carries the mark of platform {platform!r}")
            return None
        return spec_comment(comment.strip(), notes, f"{what} {obj.name}")

    aliases: dict[str, Any] = {}
    for a in estate.aliases:
        comment = ours(a, "alias")
        if comment is not None:
            aliases[a.name] = {"cidr": a.cidr, **({"comment": comment} if comment else {})}
    ipsets: dict[str, Any] = {}
    for s in estate.ipsets:
        comment = ours(s, "IP set")
        if comment is None:
            continue
        entries = sorted(str(e["cidr"]) for e in s.entries if not e.get("nomatch"))
        if any(e.get("nomatch") for e in s.entries):
            notes.append(f"IP set {s.name}: nomatch entries cannot be held by the spec")
        ipsets[s.name] = {"entries": entries, **({"comment": comment} if comment else {})}
    groups: dict[str, Any] = {}
    for grp in estate.groups:
        comment = ours(grp, "security group")
        if comment is None:
            continue
        rules = [spec_rule(r, notes, f"group {grp.name}", i) for i, r in enumerate(grp.rules)]
        groups[grp.name] = {**({"comment": comment} if comment else {}), "rules": rules}
    section: dict[str, Any] = {}
    if aliases:
        section["aliases"] = aliases
    if ipsets:
        section["ipsets"] = ipsets
    if groups:
        section["groups"] = groups
    opts = {
        k: estate.cluster_options.get(k, d) for k, d in OPTION_DEFAULTS.items()
    }  # as Proxmox reads them, absent keys at their defaults
    cluster = [
        "The cluster options, as read. Declaring them makes the controller manage them at once,",
        "so they are left for you to uncomment once reviewed:",
        "firewall:",
        "  cluster:",
        f"    enable: {scalar(bool(int(opts['enable'] or 0)))}",
        f"    policy_in: {opts['policy_in']}",
        f"    policy_out: {opts['policy_out']}",
    ]
    return dump({"firewall": section}, [*header, "", *cluster], gap_at=4)


def _platform_file(
    base: Base,
    layers: Mapping[str, Any],
    hosts: Mapping[str, Any],
    ranges: Mapping[str, Any],
    guests: Sequence[_Guest],
    header: list[str],
) -> str:
    cores: Counter[str] = Counter()
    memory: Counter[str] = Counter()
    for g in guests:
        cores[g.host] += int(g.settings["cores"])
        memory[g.host] += int(g.settings["memory"])
    cpu, mem = base.cpu_overcommit, base.memory_overcommit
    for key, host in hosts.items():
        cap = host["capacity"]
        have_mem = parse_mib(cap["memory"])
        cpu = max(cpu, math.ceil(cores[key] / int(cap["cores"]) * 4) / 4)
        mem = max(mem, math.ceil(memory[key] / have_mem * 4) / 4)
    data: dict[str, Any] = {"platform": dict(base.platform)}
    if base.proxmox:
        data["proxmox"] = dict(base.proxmox)
    data["layers"] = {k: dict(v) for k, v in layers.items()}
    data["hosts"] = {k: dict(v) for k, v in sorted(hosts.items())}
    data["ranges"] = {
        k: {f: x for f, x in v.items() if (f, x) != ("last", 999_999_999) and x != ""}
        for k, v in sorted(ranges.items(), key=lambda kv: int(kv[1]["first"]))
    }
    data["policies"] = {
        "vmid_ranges": {},
        "capacity": {"cpu_overcommit": float(cpu), "memory_overcommit": float(mem)},
    }
    more = []
    if base.left_out_policies:
        more = [
            "",
            "Policies of the original spec left out (the estate may not satisfy them yet; add",
            "them back after review): " + ", ".join(base.left_out_policies) + ".",
        ]
    return dump(data, [*header, *more])


def _drift(
    spec: PlatformSpec, guests: Sequence[_Guest], estate: Estate, base: Base
) -> dict[str, list[str]]:
    """Per address, the fields the written spec and Proxmox disagree on once the guest is
    adopted (its mark then names the spec's template): what the first apply would change."""
    graph = build_graph(spec)
    drift: dict[str, list[str]] = {}
    for g in guests:
        address = f"guest/{g.name}"
        desired = dict(graph.resources[address].attributes)
        observed = guest_attributes(g.record.item, g.record.config)
        if "template" in observed:
            observed["template"] = desired.get("template")
        observed["tags"] = sorted({*observed["tags"], base.owner_tag})
        want, have = normalize.pair(Kind.GUEST, desired, observed)
        fields = [f.path for f in diffing.diff(Kind.GUEST, want, have)]
        fw = graph.resources.get(f"firewall/guest/{g.name}")
        if fw is not None:
            opts = g.record.firewall_options
            seen = {
                "enable": int(bool(int(opts.get("enable", 0) or 0))),
                "policy_in": opts.get("policy_in", OPTION_DEFAULTS["policy_in"]),
                "policy_out": opts.get("policy_out", OPTION_DEFAULTS["policy_out"]),
                "rules": list(g.record.firewall_rules),
            }
            want, have = normalize.pair(Kind.FIREWALL_GUEST, dict(fw.attributes), seen)
            fields += ["firewall." + f.path for f in diffing.diff(Kind.FIREWALL_GUEST, want, have)]
        if fields:
            drift[address] = fields
    return drift


def write_files(files: Mapping[str, str], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in sorted(files.items()):
        path = out / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def spec_files_in(directory: Path) -> Iterable[Path]:
    """The spec files `--force` replaces: *.yaml and *.yml directly in the directory."""
    return sorted(p for p in directory.glob("*.y*ml") if p.suffix in (".yaml", ".yml"))
