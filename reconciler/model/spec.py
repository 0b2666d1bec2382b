"""The spec language: pydantic models of one platform's desired state.

`reconciler.loading` builds a `PlatformSpec` from a directory of YAML files (merging files and
resolving profiles first); everything downstream reads these frozen values. Unknown keys are
errors, never ignored, and lists are tuples and maps read-only, so a loaded spec cannot change.

Conventions a spec author sees:
- memory and swap in MiB or with a unit (`4G`); disk sizes in GiB or with a unit;
- secrets only by reference: `{env: NAME}` or `{file: PATH}`;
- a name is a DNS label; the map key is the name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    WithJsonSchema,
    create_model,
    model_validator,
)

from reconciler.model.calendar import check_calendar_event
from reconciler.model.units import (
    SIZE_PATTERN,
    check_cidr,
    check_comment,
    check_hostname,
    check_identifier,
    check_key_path,
    check_label,
    check_port,
    check_sni,
    check_url_path,
    format_mib,
    parse_mib,
    parse_seconds,
)

SCHEMA_VERSION = 1

V = TypeVar("V")


def _freeze(value: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    # None only where a profile leaves the map out (`volumes:` with nothing under it).
    return MappingProxyType(dict(value)) if value is not None else None


FrozenMap = Annotated[
    Mapping[str, V],
    AfterValidator(_freeze),
    PlainSerializer(dict, return_type=dict),
]


def _as_tuple(value: object) -> object:
    """Accept a single value where a list is expected (`host: a.example` or `host: [a, b]`)."""
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        return (value,)
    return value


def _one_or_list(item: Any, min_items: int = 0) -> BeforeValidator:
    """`_as_tuple`, saying for the JSON Schema what it takes: one item, or a list of them."""
    listed: Any = Annotated[list[item], Field(min_length=min_items)] if min_items else list[item]
    return BeforeValidator(_as_tuple, json_schema_input_type=item | listed)


# The same as a JSON Schema pattern, for editors (map keys are names).
_LABEL_SCHEMA = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
Label = Annotated[
    str, AfterValidator(check_label), WithJsonSchema({"type": "string", "pattern": _LABEL_SCHEMA})
]
# A map whose keys name things in other systems' keys (a Traefik instance, a route's router and
# its Redis keys, a Velocity registration): each key a DNS label, reported where it is written.
LabelMap = Annotated[
    Mapping[Label, V],
    AfterValidator(_freeze),
    PlainSerializer(dict, return_type=dict),
    Field(json_schema_extra={"propertyNames": {"pattern": _LABEL_SCHEMA}}),
]
Hostname = Annotated[str, AfterValidator(check_hostname)]
# Strict: YAML reads `port: true` as a boolean, which must not pass as port 1.
Port = Annotated[
    int,
    Field(strict=True),
    AfterValidator(check_port),
    WithJsonSchema({"type": "integer", "minimum": 1, "maximum": 65535}),
]


def _size_schema(number: str, bare: str, example: str) -> WithJsonSchema:
    """What a size field takes (see `parse_mib`): a bare number, or a string with a unit."""
    return WithJsonSchema(
        {
            "anyOf": [
                {"type": number, "minimum": 0},
                {"type": "string", "pattern": SIZE_PATTERN},
            ],
            "description": f"{bare}, or a size with a unit ({example})",
        }
    )


MiB = Annotated[int, BeforeValidator(parse_mib), _size_schema("integer", "MiB", "512M, 4G")]
# A fraction of a GiB is fine as long as it is whole MiB (1.5 is 1536M).
DiskMiB = Annotated[
    int,
    BeforeValidator(lambda v: parse_mib(v, bare_unit="G")),
    _size_schema("number", "GiB", "8G, 512M"),
]
Cidr = Annotated[str, AfterValidator(check_cidr)]
Policy = Literal["ACCEPT", "DROP", "REJECT"]
# Text written into another system's syntax: a Traefik rule or key, a firewall config line.
# The checks are units' (their messages say what is wrong); the patterns are the same rules for
# editors, in the JSON Schema.
Sni = Annotated[str, AfterValidator(check_sni)]
UrlPath = Annotated[
    str,
    AfterValidator(check_url_path),
    WithJsonSchema(
        {"type": "string", "pattern": r"^/([A-Za-z0-9._~!$*+,;=:@/-]|%[0-9A-Fa-f]{2})*$"}
    ),
]
Identifier = Annotated[
    str,
    AfterValidator(check_identifier),
    WithJsonSchema({"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$"}),
]
KeyPath = Annotated[
    str,
    AfterValidator(check_key_path),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": r"^(?!\.\.?(/|$))[A-Za-z0-9._-]+(/(?!\.\.?(/|$))[A-Za-z0-9._-]+)*/?$",
        }
    ),
]
Comment = Annotated[
    str,
    AfterValidator(check_comment),
    WithJsonSchema({"type": "string", "pattern": "^[^\u0000-\u001f\u007f-\u009f\u2028\u2029]*$"}),
]


def _tag(value: str) -> str:
    # Proxmox lowercases tags; insisting on lowercase in the spec keeps plans honest.
    if not re.match(r"^[a-z0-9_][a-z0-9_+.-]*\Z", value):
        raise ValueError(
            f"{value!r} is not a valid Proxmox tag: use lowercase letters, digits, _ + . -"
        )
    return value


Tag = Annotated[
    str,
    AfterValidator(_tag),
    WithJsonSchema({"type": "string", "pattern": r"^[a-z0-9_][a-z0-9_+.-]*$"}),
]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- secrets -------------------------------------------------------------------------------


def _no_literal_secret(value: object) -> object:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        raise ValueError(
            "a literal secret is not allowed in a spec; reference it with "
            "{env: VARIABLE} or {file: /path/to/secret}"
        )
    return value


class SecretRef(Strict):
    """Where a secret lives. The spec never holds the secret itself."""

    env: str | None = Field(None, description="Name of an environment variable")
    file: str | None = Field(None, description="Path of a file holding the secret")

    @model_validator(mode="after")
    def _exactly_one(self) -> SecretRef:
        if (self.env is None) == (self.file is None):
            raise ValueError("give exactly one of 'env' or 'file'")
        return self


Secret = Annotated[SecretRef, BeforeValidator(_no_literal_secret, json_schema_input_type=SecretRef)]


# --- platform, layers, hosts, ranges ----------------------------------------------------------


class PlatformSettings(Strict):
    name: Label
    owner_tag: Tag = Field(
        "reconciler", description="Tag the controller puts on every guest it creates"
    )
    prune: bool = Field(False, description="Delete owned guests that left the spec")
    max_deletes_per_run: int = Field(
        3, ge=0, strict=True, description="Upper bound on deletes in one apply"
    )
    default_storage: str = "local-lvm"
    description: str = ""


class ProxmoxApi(Strict):
    """How to reach a Proxmox VE API. TLS is verified unless `verify_tls: false`."""

    url: str = Field(description="https://host:8006")
    verify_tls: bool = True
    ca_file: str | None = None
    user: str = Field(description="e.g. reconciler@pve or root@pam")
    token_id: str | None = Field(None, description="API token name (the part after '!')")
    token_secret: Secret | None = None
    password: Secret | None = None
    max_concurrency: int = Field(
        16,
        ge=1,
        le=256,
        strict=True,
        description="Calls in flight to this API at most; halved for a while when it answers "
        "429 or 503, or times out, and climbed back as it answers (--proxmox-max-concurrency "
        "overrides it)",
    )

    @model_validator(mode="after")
    def _credentials(self) -> ProxmoxApi:
        if not self.url.startswith(("https://", "http://")):
            raise ValueError(f"url {self.url!r} must start with https://")
        if self.token_id is not None and self.token_secret is None:
            raise ValueError("token_id needs token_secret ({env: ...} or {file: ...})")
        if self.token_id is None and self.password is None:
            raise ValueError("give token_id with token_secret, or password")
        return self


class LayerSpec(Strict):
    description: str = ""
    may_depend_on: tuple[str, ...] = Field(
        (), description="Layers whose guests this layer's guests may depend on, even transitively"
    )


class Capacity(Strict):
    cores: int = Field(gt=0, strict=True)
    memory: MiB


class HostSpec(Strict):
    node: Label | None = Field(None, description="Proxmox node name; defaults to the key")
    layers: Annotated[tuple[str, ...], _one_or_list(str, min_items=1)] = Field(min_length=1)
    capacity: Capacity
    api: ProxmoxApi | None = Field(None, description="Overrides the top-level 'proxmox' API")


class RangeSpec(Strict):
    first: int = Field(ge=100, le=999_999_999, strict=True)
    last: int = Field(999_999_999, ge=100, le=999_999_999, strict=True)
    layer: str
    description: str = ""

    @model_validator(mode="after")
    def _ordered(self) -> RangeSpec:
        if self.last < self.first:
            raise ValueError(f"range ends ({self.last}) before it starts ({self.first})")
        return self

    def __contains__(self, vmid: object) -> bool:
        return isinstance(vmid, int) and self.first <= vmid <= self.last


# --- firewall ------------------------------------------------------------------------------


def _port_text(value: object) -> object:
    """A port or port list as text (`25565`, `"80,443"`, `"8000:8100"`); `true` is no port."""
    if isinstance(value, bool):
        raise ValueError("a port is a number or a list of numbers, not true or false")
    return str(value) if isinstance(value, int) else value


# What `_port_text` takes: a number, or text such as "80,443" or "8000:8100".
_PORT_INPUT = int | str


class FirewallRule(Strict):
    """One Proxmox firewall rule. For `type: group`, `action` names the security group."""

    type: Literal["in", "out", "group"]
    action: str
    source: str | None = None
    dest: str | None = None
    proto: str | None = None
    dport: Annotated[
        str | None, BeforeValidator(_port_text, json_schema_input_type=_PORT_INPUT | None)
    ] = None
    sport: Annotated[
        str | None, BeforeValidator(_port_text, json_schema_input_type=_PORT_INPUT | None)
    ] = None
    macro: str | None = None
    iface: str | None = None
    enable: bool = True
    log: Literal["emerg", "alert", "crit", "err", "warning", "notice", "info", "debug", "nolog"] = (
        "nolog"
    )
    comment: Comment = ""


class GuestFirewall(Strict):
    enable: bool = True
    policy_in: Policy = "DROP"
    policy_out: Policy = "ACCEPT"
    rules: tuple[FirewallRule, ...] = ()


class ClusterFirewallOptions(Strict):
    enable: bool = True
    policy_in: Policy = "DROP"
    policy_out: Policy = "ACCEPT"


class AliasSpec(Strict):
    cidr: Cidr
    comment: Comment = ""


class IpsetSpec(Strict):
    entries: tuple[Cidr, ...] = ()
    comment: Comment = ""


class GroupSpec(Strict):
    comment: Comment = ""
    rules: tuple[FirewallRule, ...] = ()


class FirewallSpec(Strict):
    cluster: ClusterFirewallOptions | None = Field(
        None, description="Cluster firewall options; omitted means not managed"
    )
    aliases: FrozenMap[AliasSpec] = Field(default_factory=dict)
    ipsets: FrozenMap[IpsetSpec] = Field(default_factory=dict)
    groups: FrozenMap[GroupSpec] = Field(default_factory=dict)


# --- guests and profiles -------------------------------------------------------------------


class NetworkInterface(Strict):
    name: str = "eth0"
    bridge: str = "vmbr0"
    ip: str = Field("dhcp", description="CIDR (10.0.0.5/24), dhcp or manual")
    gw: str | None = None
    tag: int | None = Field(None, ge=1, le=4094, strict=True, description="VLAN tag")
    firewall: bool = True
    mtu: int | None = Field(None, ge=576, le=65535, strict=True)
    hwaddr: str | None = Field(None, description="Pin a MAC; otherwise Proxmox generates one")

    @model_validator(mode="after")
    def _addresses(self) -> NetworkInterface:
        if self.ip not in ("dhcp", "manual"):
            check_cidr(self.ip)
            if "/" not in self.ip:
                raise ValueError(f"ip {self.ip!r} needs a prefix length, e.g. {self.ip}/24")
        if self.gw is not None:
            check_cidr(self.gw)
        return self


class Disk(Strict):
    storage: str | None = Field(None, description="Defaults to platform.default_storage")
    size: DiskMiB = Field(
        8 * 1024,
        description="GiB, or a size with a unit (8G, 512M)",
        json_schema_extra={"default": format_mib(8 * 1024)},  # as written: 8192 would be GiB
    )


# Mount options a container's mount point takes (pve-container's `mountoptions`).
MountOption = Literal["discard", "lazytime", "noatime", "nodev", "noexec", "nosuid"]
# Volume keys: a container's mount points, a VM's extra SCSI disks (scsi0 is its boot disk).
_VOLUME_KEY = re.compile(r"^(?P<bus>mp|scsi)(?P<n>0|[1-9][0-9]{0,2})\Z")
VOLUME_KEYS = {"mp": (0, 255), "scsi": (1, 30)}
# The same keys for the JSON Schema (editors complete and check them).
_VOLUME_KEY_SCHEMA = (
    r"^(mp([0-9]|[1-9][0-9]|1[0-9]{2}|2[0-4][0-9]|25[0-5])|scsi([1-9]|[12][0-9]|30))$"
)


def volume_kind(key: str) -> Literal["lxc", "qemu"]:
    """The guest kind a (valid) volume key belongs to: `mpN` a container, `scsiN` a VM."""
    return "lxc" if key.startswith("mp") else "qemu"


def _volume_key(value: str) -> str:
    m = _VOLUME_KEY.match(value)
    if m is not None:
        first, last = VOLUME_KEYS[m["bus"]]
        if first <= int(m["n"]) <= last:
            return value
    if value == "scsi0":
        raise ValueError("scsi0 is a VM's boot disk: size it under 'disk'")
    raise ValueError(
        f"{value!r} is not a volume key: use mp0..mp255 (container mount points) "
        "or scsi1..scsi30 (VM disks)"
    )


def _mount_path(value: str) -> str:
    if not value.startswith("/") or value == "/":
        raise ValueError(f"{value!r} is not an absolute path below / (e.g. /srv/world)")
    parts = value.split("/")[1:]
    if any(p in ("", ".", "..") for p in parts) or any(c == "," or c < " " for c in value):
        # A comma would end the path inside Proxmox's `mp=...,backup=1` property string.
        raise ValueError(
            f"{value!r}: a mount path has no empty, '.' or '..' parts, no trailing '/', "
            "no comma and no control characters"
        )
    return value


VolumeKey = Annotated[str, AfterValidator(_volume_key)]
MountPath = Annotated[str, AfterValidator(_mount_path)]


class VolumeOptions(Strict):
    """Mount options of a container's mount point, as pve-container takes them. A closed set:
    anything else is an error, so nothing unknown reaches Proxmox."""

    acl: bool | None = Field(None, description="POSIX ACLs; left out: the filesystem's default")
    quota: bool = Field(False, description="User quotas in the container (privileged only)")
    ro: bool = Field(False, description="Mounted read-only")
    replicate: bool = Field(True, description="Included in storage replication jobs")
    mountoptions: tuple[MountOption, ...] = Field(
        (), description="Extra mount flags: discard, lazytime, noatime, nodev, noexec, nosuid"
    )


class Volume(Strict):
    """A data volume: a container's mount point (`mpN`) or a VM's extra disk (`scsiN`). Created
    with the guest or added to it, grown in place, never shrunk, moved or (without pruning)
    detached by the controller."""

    path: MountPath | None = Field(
        None, description="Container only, required there: where it is mounted (absolute)"
    )
    storage: str | None = Field(None, description="Defaults to platform.default_storage")
    size: DiskMiB = Field(
        description="GiB, or a size with a unit (50G, 512M); grows, never shrinks"
    )
    backup: bool | None = Field(
        None,
        description="Included in vzdump backups. Left out: Proxmox's own default, which is "
        "false for a container mount point (mpN: backup=0) and true for a VM disk (scsiN)",
    )
    options: VolumeOptions | None = Field(None, description="Container mount points only")


class Features(Strict):
    nesting: bool = False
    keyctl: bool = False
    fuse: bool = False
    mknod: bool = False


class GuestSpec(Strict):
    """A guest (LXC container or QEMU VM). Fields left out come from its profile, then defaults."""

    role: str = Field(description="A key of 'ranges'; decides the vmid block and the layer")
    host: str = Field(description="A key of 'hosts'")
    vmid: int | None = Field(
        None, ge=100, le=999_999_999, strict=True, description="Omit to allocate"
    )
    profile: str | None = None
    kind: Literal["lxc", "qemu"] = "lxc"
    hostname: Label | None = Field(None, description="Defaults to the guest's name")
    template: str | None = Field(None, description="LXC: ostemplate volume; QEMU: not used")
    cores: int = Field(1, ge=1, le=8192, strict=True)
    memory: MiB = 512
    swap: MiB = 512
    disk: Disk = Disk()
    volumes: Annotated[
        Mapping[VolumeKey, Volume],
        AfterValidator(_freeze),
        PlainSerializer(dict, return_type=dict),
    ] = Field(
        default_factory=dict,
        description="Data volumes by Proxmox key: mp0..mp255 on a container, scsi1..scsi30 "
        "on a VM. A profile's and a guest's merge key by key",
        json_schema_extra={"propertyNames": {"pattern": _VOLUME_KEY_SCHEMA}},
    )
    network: tuple[NetworkInterface, ...] = ()
    tags: tuple[Tag, ...] = ()
    features: Features = Features()
    unprivileged: bool = True
    protection: bool = Field(
        False,
        description="Proxmox's protection flag: the guest and its disks cannot be removed. "
        "The controller lifts it only inside a delete or replace allowed by pruning",
    )
    onboot: bool = True
    state: Literal["running", "stopped"] = "running"
    firewall: GuestFirewall | None = None
    depends_on: tuple[str, ...] = ()
    description: str = ""
    restore_missing: Literal["latest", "never"] | None = Field(
        None,
        description="When the guest is missing: 'latest' recreates it from its newest backup, "
        "'never' creates it empty. Default: latest when a backup job selects the guest",
    )

    @model_validator(mode="after")
    def _lxc_template(self) -> GuestSpec:
        if self.kind == "lxc" and not self.template:
            raise ValueError("an LXC guest needs 'template' (e.g. local:vztmpl/debian-12.tar.zst)")
        return self


# Fields a profile may set: every GuestSpec field but the guest's identity.
_NOT_INHERITED = {"role", "host", "vmid", "profile", "hostname", "depends_on"}
PROFILE_FIELDS = tuple(n for n in GuestSpec.model_fields if n not in _NOT_INHERITED)


def _optional(name: str) -> Any:
    info = GuestSpec.model_fields[name]
    annotation: Any = info.annotation
    if info.metadata:
        return Annotated[(annotation | None, *info.metadata)]
    return annotation | None


ProfileSpec: type[BaseModel] = create_model(  # type: ignore[call-overload]
    "ProfileSpec",
    __base__=Strict,
    extends=(str | None, Field(None, description="A profile this one builds on")),
    **{name: (_optional(name), None) for name in PROFILE_FIELDS},
)


# --- traefik and velocity -------------------------------------------------------------------


class RedisFeed(Strict):
    type: Literal["redis"]
    root_key: KeyPath = Field(description="One root key per Traefik instance")
    url: str | None = Field(None, description="redis://host:port/db; defaults to the controller's")


class FileFeed(Strict):
    type: Literal["file"]
    path: str = Field(description="The dynamic-configuration file this instance watches")


class Target(Strict):
    guest: str
    port: Port
    scheme: Literal["http", "https"] = "http"


class Tls(Strict):
    certresolver: Identifier | None = None
    passthrough: bool = False


def _one_or_more(value: tuple[str, ...]) -> tuple[str, ...]:
    # Not min_length: pydantic counts only the items that validated, so one bad host name would
    # also be reported as "no host".
    if not value:
        raise ValueError("give at least one name")
    return value


class HttpRoute(Strict):
    """An HTTP route: Traefik's rule is `Host(...)` for each host, and `PathPrefix(...)` with a
    path prefix. Each value is checked for what it is, a host name or a URL path, so none can
    change the rule around it."""

    type: Literal["http"] = "http"
    host: Annotated[
        tuple[Hostname, ...], _one_or_list(Hostname, min_items=1), AfterValidator(_one_or_more)
    ] = Field(
        description="Host names, each matched exactly (no wildcards)",
        json_schema_extra={"minItems": 1},
    )
    path_prefix: UrlPath | None = Field(
        None,
        description="A URL path: '/', then letters, digits, - . _ ~ ! $ * + , ; = : @ / "
        "and %XX escapes",
    )
    entrypoints: Annotated[tuple[Identifier, ...], _one_or_list(Identifier)] = ("websecure",)
    tls: Tls | None = None
    target: Target
    when_unready: Literal["withhold", "keep"] | None = Field(
        None, description="Defaults to the instance's setting"
    )


class TcpRoute(Strict):
    type: Literal["tcp"]
    sni: Annotated[
        tuple[Sni, ...], _one_or_list(Sni, min_items=1), AfterValidator(_one_or_more)
    ] = Field(description="Host names for HostSNI, or '*' alone", json_schema_extra={"minItems": 1})
    entrypoints: Annotated[tuple[Identifier, ...], _one_or_list(Identifier)] = ("websecure",)
    tls: Tls | None = None
    target: Target
    when_unready: Literal["withhold", "keep"] | None = None

    @model_validator(mode="after")
    def _sni(self) -> TcpRoute:
        if self.sni != ("*",) and self.tls is None:
            raise ValueError("HostSNI needs TLS: set tls (passthrough: true to keep it end to end)")
        return self


Route = Annotated[HttpRoute | TcpRoute, Field(discriminator="type")]


def _default_route_type(value: object) -> object:
    if isinstance(value, dict) and "type" not in value:
        return {**value, "type": "http"}
    return value


class TraefikInstance(Strict):
    guest: str = Field(description="The guest this Traefik runs in")
    routes_to: Annotated[tuple[str, ...], _one_or_list(str, min_items=1)] = Field(
        min_length=1, description="Layers this instance may route to (its traffic domain)"
    )
    feed: Annotated[RedisFeed | FileFeed, Field(discriminator="type")]
    api_url: str | None = Field(None, description="Traefik's API, to see what it serves")
    when_unready: Literal["withhold", "keep"] = Field(
        "keep", description="Routes to a guest whose agent is not ready: keep or withhold"
    )
    routes: LabelMap[
        Annotated[Route, BeforeValidator(_default_route_type, json_schema_input_type=Route)]
    ] = Field(default_factory=dict, description="Routes by name; the router is rc-<name>")


class VelocityBridge(Strict):
    port: Port = 8081
    secret: Secret


class VelocityServer(Strict):
    guest: str
    port: Port = 25565
    forced_host: Hostname | None = None


class VelocitySpec(Strict):
    guest: str = Field(description="The guest Velocity runs in")
    bridge: VelocityBridge
    servers: LabelMap[VelocityServer] = Field(default_factory=dict)
    unmanaged: Annotated[tuple[str, ...], _one_or_list(str)] = Field(
        (),
        description="Registrations someone else makes (velocity.toml, the platform API): "
        "reported, never registered or unregistered by the controller",
    )


# --- backups -------------------------------------------------------------------------------

Seconds = Annotated[
    int,
    BeforeValidator(parse_seconds),
    WithJsonSchema({"type": ["string", "integer"], "pattern": r"^\s*\d{1,6}\s*[smhdw]\s*$"}),
]
CalendarText = Annotated[str, AfterValidator(check_calendar_event)]
# A Proxmox storage id (pve-storage's `pve-storage-id`).
StorageId = Annotated[
    str,
    AfterValidator(check_identifier),
    WithJsonSchema({"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$"}),
]
_KEEP = Field(None, ge=1, le=100_000, strict=True)


class Retention(Strict):
    """How many backups of each guest the storage keeps (Proxmox's `prune-backups`)."""

    keep_last: int | None = _KEEP
    keep_hourly: int | None = _KEEP
    keep_daily: int | None = _KEEP
    keep_weekly: int | None = _KEEP
    keep_monthly: int | None = _KEEP
    keep_yearly: int | None = _KEEP

    def prune_backups(self) -> str:
        """`keep-last=3,keep-daily=7`: as Proxmox takes (and gives back) the option."""
        return ",".join(
            f"{name.replace('_', '-')}={value}"
            for name, value in self.model_dump().items()
            if value is not None
        )

    @model_validator(mode="after")
    def _one_at_least(self) -> Retention:
        if not any(v is not None for v in self.model_dump().values()):
            raise ValueError("retention keeps something: set keep_last, keep_daily, ...")
        return self


class BackupSelect(Strict):
    """Which spec guests a job backs up: `all` (less `exclude`), or any of roles, guests and
    tags. Resolved to vmids when planning, so a new guest joins its job as it is created."""

    all: bool = False
    roles: tuple[str, ...] = ()
    guests: tuple[str, ...] = ()
    tags: tuple[Tag, ...] = ()
    exclude: tuple[str, ...] = Field((), description="Guests left out of the selection")

    @model_validator(mode="after")
    def _something(self) -> BackupSelect:
        picked = bool(self.roles or self.guests or self.tags)
        if self.all and picked:
            raise ValueError("select either all (with exclude) or roles, guests and tags")
        if not self.all and not picked:
            raise ValueError("select guests: all: true, or roles, guests or tags")
        return self


class BackupJobSpec(Strict):
    """A scheduled backup job (Proxmox's `/cluster/backup`), owned by the controller."""

    schedule: CalendarText = Field(
        description="A Proxmox calendar event: 02:00, sat 03:30, mon..fri 01:00, *-*-* 00/6:00"
    )
    storage: StorageId = Field(description="A storage that holds backups (PBS or a directory)")
    mode: Literal["snapshot", "suspend", "stop"] = "snapshot"
    compress: Literal["0", "1", "gzip", "lzo", "zstd"] = "zstd"
    retention: Retention | None = Field(None, description="Left out: the storage's own")
    select: BackupSelect
    notes: Comment = Field(
        "{{guestname}}",
        description="Each backup's notes; {{guestname}}, {{vmid}}, {{node}}, {{cluster}}",
    )
    enabled: bool = True
    max_age: Seconds | None = Field(
        None,
        description="A guest's newest backup older than this is stale (36h, 2d). "
        "Default: twice the longest gap between the schedule's runs",
    )
    description: Comment = ""
    # The characters the job's ownership mark can carry (`id=...` in its comment), within
    # Proxmox's 50.
    id: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,49}$",
        description="The Proxmox job id. Default: rc-<name>; `import` writes it for a job that "
        "existed before, which `adopt` then marks as the controller's under this id",
    )


# --- policies ------------------------------------------------------------------------------


class _PolicyBase(Strict):
    enabled: bool = True


class LayerDependencyPolicy(_PolicyBase):
    """Guests depend (depends_on, route and proxy targets) only on layers their layer allows."""


class PlacementPolicy(_PolicyBase):
    """A guest is placed only on a host that serves the guest's layer."""


class IsolationException(Strict):
    to: str = Field(description="The guest that may be reached")
    port: Annotated[str, BeforeValidator(_port_text, json_schema_input_type=_PORT_INPUT)] | None = (
        None
    )
    reason: str


class IsolationPolicy(_PolicyBase):
    """No firewall rule lets guests of `from_layers` reach guests of `to_layers`."""

    from_layers: tuple[str, ...] = ("runtime",)
    to_layers: tuple[str, ...] = ("control",)
    exceptions: tuple[IsolationException, ...] = ()


class AgentPortPolicy(_PolicyBase):
    """The agent port on guests of `layers` is reachable only from `allowed_sources` guests."""

    port: Port = 18888
    layers: tuple[str, ...] = ("runtime",)
    allowed_sources: tuple[str, ...] = Field(min_length=1)


class TraefikDomainPolicy(_PolicyBase):
    """One Traefik instance per traffic domain; each routes only into its own domain."""


class VelocityHostPolicy(_PolicyBase):
    host_layer: str = "runtime"


class VmidRangePolicy(_PolicyBase):
    """Every vmid lies in its role's range and ranges never overlap."""


class BackupFreshnessPolicy(_PolicyBase):
    """Every guest a backup job selects has a backup on the job's storage younger than the
    job's `max_age`: a missing or stale one is a plan warning, a status entry and a gauge."""


class CapacityPolicy(_PolicyBase):
    cpu_overcommit: float = Field(1.0, gt=0)
    memory_overcommit: float = Field(1.0, gt=0)


class Policies(Strict):
    """Checks that keep the platform's design rules true. A policy left out is off."""

    layer_dependencies: LayerDependencyPolicy | None = None
    placement: PlacementPolicy | None = None
    isolation: IsolationPolicy | None = None
    agent_port: AgentPortPolicy | None = None
    traefik_domains: TraefikDomainPolicy | None = None
    velocity_host: VelocityHostPolicy | None = None
    vmid_ranges: VmidRangePolicy | None = None
    capacity: CapacityPolicy = CapacityPolicy()
    backup_freshness: BackupFreshnessPolicy = BackupFreshnessPolicy()


# --- the whole platform -----------------------------------------------------------------------


class PlatformSpec(Strict):
    """One platform, merged from every YAML file of a spec directory."""

    platform: PlatformSettings
    proxmox: ProxmoxApi | None = Field(None, description="Default API for every host")
    layers: FrozenMap[LayerSpec] = Field(default_factory=dict)
    hosts: FrozenMap[HostSpec] = Field(default_factory=dict)
    ranges: FrozenMap[RangeSpec] = Field(default_factory=dict)
    profiles: FrozenMap[ProfileSpec] = Field(default_factory=dict)
    guests: FrozenMap[GuestSpec] = Field(
        default_factory=dict,
        # A guest's key is its name: a DNS label (the loader's `find_bad_names`).
        json_schema_extra={"propertyNames": {"pattern": _LABEL_SCHEMA}},
    )
    traefik: LabelMap[TraefikInstance] = Field(default_factory=dict)
    velocity: VelocitySpec | None = None
    firewall: FirewallSpec = FirewallSpec()
    backups: LabelMap[BackupJobSpec] = Field(
        default_factory=dict, description="Scheduled backup jobs by name"
    )
    policies: Policies = Policies()

    def node_of(self, host: str) -> str:
        return self.hosts[host].node or host

    def layer_of(self, guest: str) -> str:
        return self.ranges[self.guests[guest].role].layer


TOP_LEVEL_KEYS = tuple(PlatformSpec.model_fields)


def selected_guests(spec: PlatformSpec, select: BackupSelect) -> list[str]:
    """The spec guests a backup selection names, by name, sorted."""
    names: set[str] = set()
    for name, guest in spec.guests.items():
        if (
            select.all
            or guest.role in select.roles
            or name in select.guests
            or set(guest.tags) & set(select.tags)
        ):
            names.add(name)
    return sorted(names - set(select.exclude))
