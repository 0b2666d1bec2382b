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

import base64
import binascii
import ipaddress
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import unquote, urlparse

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PlainSerializer,
    WithJsonSchema,
    create_model,
    model_validator,
)
from pydantic import Tag as UnionTag

from reconciler.model.calendar import check_calendar_event
from reconciler.model.disks import MOUNT_POINTS, VM_BUSES, boot_key, split_key
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
    """A guest's root disk: a container's `rootfs`; a VM's boot disk, attached as unit 0 of
    its `bus` (`scsi0` by default, `virtio0`, `sata0`, `ide0`). `disk: none` (a VM only, short
    for `bus: none`): the VM has no boot disk and boots from the network."""

    storage: str | None = Field(None, description="Defaults to platform.default_storage")
    size: DiskMiB = Field(
        8 * 1024,
        description="GiB, or a size with a unit (8G, 512M)",
        json_schema_extra={"default": format_mib(8 * 1024)},  # as written: 8192 would be GiB
    )
    bus: Literal["scsi", "virtio", "sata", "ide", "none"] | None = Field(
        None,
        description="VM only: the bus of the boot disk, which is unit 0 of it: scsi (the "
        "default: scsi0), virtio (virtio0), sata (sata0), ide (ide0); none: no disk",
    )

    @model_validator(mode="after")
    def _none_is_nothing(self) -> Disk:
        given = sorted({"storage", "size"} & self.model_fields_set)
        if self.bus == "none" and given:
            raise ValueError(
                f"a VM without a disk has no {' or '.join(given)}: write `disk: none` (it "
                "replaces a profile's disk whole)"
            )
        return self

    @property
    def attached(self) -> bool:
        """False for `disk: none`."""
        return self.bus != "none"

    def vm_key(self) -> str | None:
        """The drive a VM's boot disk is (`scsi0`, `virtio0`, ...); None for `disk: none`."""
        return boot_key(self.bus) if self.bus != "none" else None


def _no_disk(value: object) -> object:
    """`disk: none`: the same as `disk: {bus: none}`."""
    return {"bus": "none"} if value == "none" else value


GuestDisk = Annotated[
    Disk, BeforeValidator(_no_disk, json_schema_input_type=Disk | Literal["none"])
]


# Mount options a container's mount point takes (pve-container's `mountoptions`).
MountOption = Literal["discard", "lazytime", "noatime", "nodev", "noexec", "nosuid"]
# Volume keys: a container's mount points, a VM's disks on any bus (`reconciler.model.disks`);
# a VM's boot disk is `disk`, and `loading.checks` refuses a volume on its key.
VOLUME_KEYS = {"mp": MOUNT_POINTS, **VM_BUSES}
# The same keys for the JSON Schema (editors complete and check them).
_VOLUME_KEY_SCHEMA = (
    r"^(mp([0-9]|[1-9][0-9]|1[0-9]{2}|2[0-4][0-9]|25[0-5])|scsi([0-9]|[12][0-9]|30)"
    r"|virtio([0-9]|1[0-5])|sata[0-5]|ide[0-3])$"
)


def volume_kind(key: str) -> Literal["lxc", "qemu"]:
    """The guest kind a (valid) volume key belongs to: `mpN` a container, a drive a VM."""
    return "lxc" if key.startswith("mp") else "qemu"


def _volume_key(value: str) -> str:
    if split_key(value) is not None:
        return value
    raise ValueError(
        f"{value!r} is not a volume key: use mp0..mp255 (container mount points) or a VM "
        "disk: scsi0..scsi30, virtio0..virtio15, sata0..sata5, ide0..ide3"
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
    """A data volume: a container's mount point (`mpN`) or a VM's extra disk (`scsiN`,
    `virtioN`, `sataN`, `ideN`). Created
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
        "false for a container mount point (mpN: backup=0) and true for a VM disk",
    )
    options: VolumeOptions | None = Field(None, description="Container mount points only")


class Features(Strict):
    nesting: bool = False
    keyctl: bool = False
    fuse: bool = False
    mknod: bool = False


# --- pools and HA ----------------------------------------------------------------------------

# A pool the controller creates: a name (a DNS label) that starts with a letter, as pve-manager's
# pool create insists (`PVE/API2/Pool.pm`: "pool name must start with a letter").
_POOL_SCHEMA = r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$"


def _pool_name(value: str) -> str:
    check_label(value)
    if not value[:1].isalpha():
        raise ValueError(f"pool name {value!r} must start with a letter (Proxmox's rule)")
    return value


PoolName = Annotated[
    str, AfterValidator(_pool_name), WithJsonSchema({"type": "string", "pattern": _POOL_SCHEMA})
]


class PoolSpec(Strict):
    """A Proxmox resource pool the controller creates and owns (its mark ends the comment).
    Its members are the spec's guests that name it in `pool`."""

    comment: Comment = ""


class HaSpec(Strict):
    """The guest as an HA resource (`/cluster/ha/resources`, sid `ct:VMID` or `vm:VMID`).
    HA then owns the guest's power state: `state` says it (started: running; stopped or
    disabled: stopped; ignored: HA leaves it alone and the guest's own `state` applies)."""

    state: Literal["started", "stopped", "disabled", "ignored"] = "started"
    group: Identifier | None = Field(
        None,
        description="An HA group (PVE 8; PVE 9 refuses it once its groups became rules)",
    )
    max_restart: int = Field(
        1, ge=0, le=1000, strict=True, description="Restarts on its node after a failed start"
    )
    max_relocate: int = Field(
        1, ge=0, le=1000, strict=True, description="Relocations to another node after that"
    )


# The power state each HA `state` keeps the guest in; `ignored` keeps none (the guest's own).
HA_POWER = {"started": "running", "stopped": "stopped", "disabled": "stopped"}


# --- clone, cloud-init ----------------------------------------------------------------------

# A template guest's name as Proxmox takes a VM name (`dns-name`): labels joined by dots.
_NAME_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_GUEST_NAME = re.compile(rf"^{_NAME_LABEL}(\.{_NAME_LABEL})*\Z")


def _clone_source(value: object) -> object:
    """A template by vmid (a number, also written in quotes) or by name."""
    if isinstance(value, bool):
        raise ValueError("clone.from is a template's vmid (9000) or its name, not true/false")
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, int):
        if not 100 <= value <= 999_999_999:
            raise ValueError(f"vmid {value} is outside 100-999999999")
        return value
    if isinstance(value, str) and not _GUEST_NAME.match(value):
        raise ValueError(f"{value!r} is neither a vmid nor a guest name (letters, digits, - .)")
    return value


CloneSource = Annotated[
    int | str,
    BeforeValidator(_clone_source, json_schema_input_type=int | str),
]


class CloneSpec(Strict):
    """Create the guest by cloning a template: a Proxmox template guest (`template: 1`), which
    the controller reads and never changes. The clone is then configured as the spec says."""

    source: CloneSource = Field(
        alias="from", description="The template: its vmid (9000) or its name (debian-12-ci)"
    )
    full: bool = Field(
        True,
        description="A full copy of its disks; false: a linked clone (its disks stay based on "
        "the template's, on the same storage)",
    )
    storage: Annotated[str, AfterValidator(check_identifier)] | None = Field(
        None,
        description="Full clones only: where the copy's disks go. Default: the guest's disk "
        "storage (disk.storage, else platform.default_storage)",
    )

    @model_validator(mode="after")
    def _storage_full(self) -> CloneSpec:
        if self.storage is not None and not self.full:
            raise ValueError(
                "storage is for full clones only: a linked clone's disks stay on the "
                "template's storage (drop storage, or set full: true)"
            )
        return self


# OpenSSH public key types, as `ssh-keygen` writes them into a `.pub` file.
SSH_KEY_TYPES = (
    "ssh-ed25519",
    "ssh-rsa",
    "ssh-dss",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
)


def check_ssh_public_key(value: str) -> str:
    """One OpenSSH public key line (`ssh-ed25519 AAAA... comment`), with its whitespace
    collapsed. Its key blob must decode and name its own type, so a truncated key, a private
    key or any other text is refused. The message never quotes the value."""
    text = " ".join(value.split())
    if "PRIVATE KEY" in value:
        raise ValueError("this is a private key: give the public key (the .pub file's line)")
    parts = text.split(" ", 2)
    if len(parts) < 2 or parts[0] not in SSH_KEY_TYPES:
        raise ValueError(
            "not an SSH public key: expected '<type> <base64 key> [comment]' with type one of "
            + ", ".join(SSH_KEY_TYPES)
        )
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"not an SSH public key: its {parts[0]} key is not base64") from None
    size = int.from_bytes(blob[:4], "big") if len(blob) >= 4 else -1
    if blob[4 : 4 + size] != parts[0].encode():
        raise ValueError(f"not an SSH public key: its key data is not an {parts[0]} key")
    return text


SshPublicKey = Annotated[str, AfterValidator(check_ssh_public_key)]


class SshKeyFile(Strict):
    """Public keys from a file (an `authorized_keys` or `.pub` file): every line that is not
    empty or a `#` comment must be one. Read when the spec is loaded; absolute, or relative to
    the directory the command runs in (like a secret's `file`)."""

    file: str = Field(min_length=1, description="Path of a file of OpenSSH public keys")


def _ssh_key_form(value: object) -> str:
    return "file" if isinstance(value, dict) else "key"


# One branch is checked, chosen by the item's shape: an error names that branch only.
SshKey = Annotated[
    Annotated[SshKeyFile, UnionTag("file")] | Annotated[SshPublicKey, UnionTag("key")],
    Discriminator(_ssh_key_form),
]
_CI_USER = re.compile(r"^[a-z_][a-z0-9_-]{0,31}\Z")
_SNIPPET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}:snippets/[^\s,;=]+\Z")


def _ci_user(value: str) -> str:
    if not _CI_USER.match(value):
        raise ValueError(
            f"{value!r} is not a Linux user name (lowercase letters, digits, _ and -, "
            "at most 32, starting with a letter or _)"
        )
    return value


def _nameserver(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError(f"nameserver {value!r} is not an IP address") from None


def _snippet(value: str) -> str:
    if not _SNIPPET.match(value):
        raise ValueError(
            f"{value!r} is not a snippet volume: STORAGE:snippets/FILE, e.g. "
            "local:snippets/user.yaml (on a storage with content 'snippets')"
        )
    return value


class CloudInitSpec(Strict):
    """What cloud-init sets up in a VM at its first boot (and again after a change, at its next
    start): Proxmox's `ciuser`, `cipassword`, `sshkeys`, `nameserver`, `searchdomain`,
    `cicustom`; each NIC's `ipconfigN` comes from the guest's `network` entry of the same
    index (its `ip` and `gw`)."""

    user: Annotated[str, AfterValidator(_ci_user)] | None = Field(
        None, description="The user cloud-init creates (ciuser); default: the image's"
    )
    password: Secret | None = Field(
        None,
        description="That user's password, by reference ({env:} or {file:}); never shown. "
        "Read back only as set or not: a new value under the same reference is not seen",
    )
    ssh_keys: tuple[SshKey, ...] = Field(
        (), description="OpenSSH public keys, each a literal line or {file: PATH}"
    )
    nameserver: Annotated[
        tuple[Annotated[str, AfterValidator(_nameserver)], ...], _one_or_list(str)
    ] = Field((), description="DNS servers (IP addresses); default: the node's")
    searchdomain: Annotated[tuple[Hostname, ...], _one_or_list(str)] = Field(
        (), description="DNS search domains; default: the node's"
    )
    user_data: Annotated[str, AfterValidator(_snippet)] | None = Field(
        None,
        description="A user-data snippet in place of the generated one (cicustom user=): "
        "STORAGE:snippets/FILE, e.g. local:snippets/user.yaml",
    )


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
    clone: CloneSpec | None = Field(
        None, description="Create it by cloning a template guest (instead of 'template')"
    )
    cores: int = Field(1, ge=1, le=8192, strict=True)
    memory: MiB = 512
    swap: MiB = 512
    disk: GuestDisk = Field(
        Disk(),
        description="The root disk (a VM's boot disk: `bus`), or `none` for a VM that has none",
    )
    volumes: Annotated[
        Mapping[VolumeKey, Volume],
        AfterValidator(_freeze),
        PlainSerializer(dict, return_type=dict),
    ] = Field(
        default_factory=dict,
        description="Data volumes by Proxmox key: mp0..mp255 on a container; a VM's disks "
        "scsi0..scsi30, virtio0..virtio15, sata0..sata5, ide0..ide3 (not its boot disk's key). "
        "A profile's and a guest's merge key by key",
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
    state: Literal["running", "stopped"] = Field(
        "running",
        description="Power state. With `ha` (not ignored), HA owns it: taken from ha.state "
        "when left out, an error when it disagrees",
    )
    pool: PoolName | None = Field(
        None, description="A pool of 'pools' the guest is a member of; left out: not managed"
    )
    ha: HaSpec | None = Field(
        None, description="Make the guest an HA resource; left out: not managed by the spec"
    )
    firewall: GuestFirewall | None = None
    depends_on: tuple[str, ...] = ()
    description: str = ""
    restore_missing: Literal["latest", "never"] | None = Field(
        None,
        description="When the guest is missing: 'latest' recreates it from its newest backup, "
        "'never' creates it empty. Default: latest when a backup job selects the guest",
    )
    cloud_init: CloudInitSpec | None = Field(
        None, description="QEMU only: cloud-init settings; left out: not managed"
    )
    agent: bool | None = Field(
        None,
        description="QEMU only: the QEMU guest agent (agent=1); the controller waits for it "
        "after a start and reads the guest's addresses from it. Left out: not managed",
    )

    @model_validator(mode="after")
    def _lxc_template(self) -> GuestSpec:
        if self.kind == "lxc" and not self.template and self.clone is None:
            raise ValueError(
                "an LXC guest needs 'template' (e.g. local:vztmpl/debian-12.tar.zst) or 'clone'"
            )
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


# --- templates -----------------------------------------------------------------------------

# download-url's `checksum-algorithm` values (pve-storage API2/Storage/Status.pm), each with the
# length of its hex digest.
CHECKSUM_ALGORITHMS = {
    "md5": 32,
    "sha1": 40,
    "sha224": 56,
    "sha256": 64,
    "sha384": 96,
    "sha512": 128,
}
# The file names download-url takes per content (pve-storage Storage.pm: ISO_EXT_RE_0,
# VZTMPL_EXT_RE_1, UPLOAD_IMPORT_EXT_RE_1), and what PVE keeps of a name
# (normalize_content_filename: anything else becomes '_').
TEMPLATE_EXTENSIONS = {
    "vztmpl": (r"\.tar\.(gz|xz|zst|bz2)", ".tar.gz, .tar.xz, .tar.zst or .tar.bz2"),
    "iso": (r"\.(iso|img)", ".iso or .img"),
    "import": (r"\.(ova|qcow2|raw|vmdk)", ".ova, .qcow2, .raw or .vmdk"),
}
_SAFE_FILENAME = re.compile(r"^[A-Za-z0-9_.-]+\Z")
_ARTICLE = {"vztmpl": "a", "iso": "an", "import": "an"}


def _checksum(value: str) -> str:
    algorithm, sep, digest = value.partition(":")
    length = CHECKSUM_ALGORITHMS.get(algorithm.lower())
    if not sep or length is None:
        raise ValueError(
            f"{value!r} is not a checksum: write ALGORITHM:HEX, e.g. sha256:<64 hex digits> "
            f"(algorithms: {', '.join(CHECKSUM_ALGORITHMS)})"
        )
    if not re.fullmatch(rf"[0-9a-fA-F]{{{length}}}", digest):
        raise ValueError(
            f"the {algorithm.lower()} checksum {digest!r} is not {length} hex digits "
            f"(it has {len(digest)} characters)"
        )
    return f"{algorithm.lower()}:{digest.lower()}"


def _download_url(value: str) -> str:
    # download-url's own pattern is `https?://.*`; a host and no whitespace besides.
    if not re.fullmatch(r"https?://[^\s/?#]+[^\s]*", value):
        raise ValueError(f"{value!r} is not an http:// or https:// URL Proxmox can download")
    return value


Checksum = Annotated[
    str,
    AfterValidator(_checksum),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": r"^[A-Za-z0-9]+:[0-9a-fA-F]+$",
            "description": "ALGORITHM:HEX, e.g. sha256:<64 hex digits>",
        }
    ),
]
DownloadUrl = Annotated[
    str,
    AfterValidator(_download_url),
    WithJsonSchema({"type": "string", "pattern": r"^https?://\S+$"}),
]


def _hosts(value: object) -> object:
    """`hosts: all`, `hosts: pve-a` or `hosts: [pve-a, pve-b]`."""
    if value == "all":
        return value
    return _as_tuple(value)


class TemplateSpec(Strict):
    """A file the platform needs on its hosts' storage: a container template (`vztmpl`), an ISO
    (`iso`) or a VM image (`import`). A missing one is downloaded by Proxmox (`download-url`,
    verified against `checksum`) before any guest that uses it is created. The file on the
    storage is the identity: a new image is a new file name. Never deleted by the controller."""

    url: DownloadUrl | None = Field(
        description="Where Proxmox downloads it from (http:// or https://). null: not "
        "downloadable (`import` writes it so): it is checked for on its hosts, a missing one is "
        "a plan warning"
    )
    checksum: Checksum | None = Field(
        None,
        description="ALGORITHM:HEX (sha256:..., also md5, sha1, sha224, sha384, sha512): "
        "Proxmox verifies the download with it. Required with a url",
    )
    storage: StorageId = Field(description="A file storage that takes this content (local)")
    content: Literal["vztmpl", "iso", "import"] = Field(
        "vztmpl", description="vztmpl (container template), iso, or import (a VM disk image)"
    )
    hosts: Annotated[
        Literal["all"] | tuple[str, ...],
        BeforeValidator(_hosts, json_schema_input_type=Literal["all"] | str | list[str]),
    ] = Field("all", description="The hosts (keys of 'hosts') that need it, or all")
    filename: str | None = Field(
        None, description="The file's name on the storage. Default: the url's last path segment"
    )

    @property
    def file(self) -> str:
        """The file's name on the storage: `filename`, else the url's last path segment."""
        if self.filename is not None:
            return self.filename
        path = urlparse(self.url or "").path
        return unquote(path.rsplit("/", 1)[-1])

    @property
    def volid(self) -> str:
        """How Proxmox names the file: `local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst`."""
        return f"{self.storage}:{self.content}/{self.file}"

    @model_validator(mode="after")
    def _complete(self) -> TemplateSpec:
        if self.url is not None and self.checksum is None:
            raise ValueError(
                "a template with a url needs its checksum (sha256:<hex>): Proxmox verifies the "
                "download with it"
            )
        if self.url is None and self.filename is None:
            raise ValueError("a template without a url needs its filename")
        if self.hosts == ():
            raise ValueError("hosts: name at least one host, or all")
        name = self.file
        if not name:
            raise ValueError(f"the url {self.url!r} names no file: set filename")
        if not _SAFE_FILENAME.match(name) or name.startswith("."):
            kept = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
            raise ValueError(
                f"Proxmox would store {name!r} as {kept!r} (letters, digits, '_', '.' and '-' "
                f"only): set filename: {kept}"
            )
        pattern, says = TEMPLATE_EXTENSIONS[self.content]
        if not re.search(rf"[^/]{pattern}\Z", name, re.IGNORECASE):
            raise ValueError(
                f"{name!r} cannot be {_ARTICLE[self.content]} {self.content} file: its name ends "
                f"in {says} "
                "(set filename, or content)"
            )
        return self


# --- dns -----------------------------------------------------------------------------------

# The record types a spec may list; derived records are A and AAAA.
DnsType = Literal["A", "AAAA", "CNAME", "TXT", "SRV"]
# The ownership record of a record set sits one label below its name: `_rc-a.<name>` (TXT)
# for the A records at <name> (providers.dns says why). Its text starts with MARK_HERITAGE.
DNS_MARK_PREFIX = "_rc-"
DNS_MARK_HERITAGE = "heritage=reconciler"
# A record's name leaves room for the longest ownership label (`_rc-cname.`) within 253.
DNS_NAME_MAX = 253 - len(DNS_MARK_PREFIX + "cname.")
_DNS_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\Z")
_DNS_LABEL_SCHEMA = r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"


def check_dns_name(value: str, *, wildcard: bool = False) -> str:
    """A DNS name written in full (`survival.play.zpack.dev`, a final dot allowed), lowercased
    without the dot: labels of letters, digits, '-' and '_' (service labels such as
    `_minecraft._tcp`); `*` as the first label only where `wildcard`."""
    name = value.lower().removesuffix(".")
    if not name or len(name) > 253:
        raise ValueError(f"{value!r} is not a DNS name (1 to 253 characters, labels joined by '.')")
    for i, label in enumerate(name.split(".")):
        if label == "*" and i == 0 and wildcard:
            continue
        if not _DNS_LABEL.match(label):
            raise ValueError(
                f"{value!r} is not a DNS name: bad label {label!r} (letters, digits, '-' and '_', "
                "at most 63 characters, not starting or ending with '-')"
            )
    return name


def split_dns_server(value: str) -> tuple[str, int]:
    """`10.0.0.53:5353` -> ("10.0.0.53", 5353); `ns1.zpack.dev` -> (.., 53); an IPv6 address
    with a port in brackets (`[2001:db8::53]:53`), without one bare."""
    host, port = value, "53"
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{value!r}: write an IPv6 server as [ADDRESS]:PORT")
        port = rest[1:] or "53"
    elif value.count(":") == 1:
        host, port = value.split(":")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if "." in host:
            check_hostname(host)
        else:
            check_label(host)
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{value!r}: the port must be a number from 1 to 65535")
    return host, int(port)


def _dns_server(value: str) -> str:
    split_dns_server(value)
    return value


def _ip_text(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError(f"{value!r} is not an IPv4 or IPv6 address") from None


DnsName = Annotated[
    str,
    AfterValidator(check_dns_name),
    WithJsonSchema(
        {"type": "string", "pattern": rf"^({_DNS_LABEL_SCHEMA}\.)*{_DNS_LABEL_SCHEMA}\.?$"}
    ),
]
DnsRecordName = Annotated[
    str,
    AfterValidator(lambda v: check_dns_name(v, wildcard=True)),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": rf"^(\*\.)?({_DNS_LABEL_SCHEMA}\.)*{_DNS_LABEL_SCHEMA}\.?$",
        }
    ),
]
IpText = Annotated[str, AfterValidator(_ip_text)]


def dns_value(rtype: str, text: str) -> str:
    """A record's value in the one spelling the spec's and the zone's are compared in (the
    provider reads a server's records into it): an address as Python writes it, a name
    lowercased without its final dot, an SRV as `PRIORITY WEIGHT PORT TARGET`, a TXT's text
    as it is. ValueError saying what is wrong otherwise."""
    text = text.strip() if rtype != "TXT" else text
    if rtype in ("A", "AAAA"):
        version = 4 if rtype == "A" else 6
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            address = None
        if address is None or address.version != version:
            raise ValueError(f"{text!r} is not an IPv{version} address ({rtype} record)")
        return str(address)
    if rtype == "CNAME":
        return check_dns_name(text)
    if rtype == "SRV":
        parts = text.split()
        numbers = parts[:3]
        if len(parts) != 4 or not all(p.isdigit() and int(p) <= 65535 for p in numbers):
            raise ValueError(
                f"{text!r} is not an SRV value: PRIORITY WEIGHT PORT TARGET, e.g. "
                "'0 5 25565 survival.play.zpack.dev' (numbers up to 65535)"
            )
        target = "." if parts[3] == "." else check_dns_name(parts[3])
        return " ".join([*(str(int(p)) for p in numbers), target])
    if rtype == "TXT":
        if any(c < " " or c == "\x7f" for c in text):
            raise ValueError("a TXT value holds no control characters (no newline, no tab)")
        if len(text.encode()) > 4000:
            raise ValueError("a TXT value is at most 4000 bytes")
        return text
    raise ValueError(f"record type {rtype!r} is not one of A, AAAA, CNAME, TXT, SRV")


class TsigKey(Strict):
    """A TSIG key (RFC 8945) the DNS server knows, as `tsig-keygen NAME` makes it: its name,
    algorithm and base64 secret, the secret by reference only."""

    name: DnsName = Field(description="The key's name, as the server's configuration has it")
    algorithm: Literal[
        "hmac-sha256", "hmac-sha384", "hmac-sha512", "hmac-sha224", "hmac-sha1", "hmac-md5"
    ] = "hmac-sha256"
    secret: Secret


class Rfc2136Provider(Strict):
    """A zone's primary server, reached by zone transfer (AXFR) to observe and by dynamic
    updates (RFC 2136) to apply, both over TCP and signed with the TSIG key: BIND, Knot,
    PowerDNS and Technitium speak it."""

    type: Literal["rfc2136"] = "rfc2136"
    server: Annotated[str, AfterValidator(_dns_server)] = Field(
        description="The primary: host or host:port (port 53 by default), [IPv6]:port"
    )
    tsig: TsigKey


class DnsRecord(Strict):
    """One record set the spec lists: every value of one name and type."""

    name: DnsRecordName = Field(
        description="In full: the zone's name or a name under it (survival.play.zpack.dev); "
        "a first label '*' is a wildcard"
    )
    type: DnsType
    value: Annotated[
        tuple[str, ...], _one_or_list(str, min_items=1), AfterValidator(_one_or_more)
    ] = Field(
        description="One value or a list: an address (A, AAAA), a name (CNAME, one only), a "
        "text (TXT), or 'PRIORITY WEIGHT PORT TARGET' (SRV)",
        json_schema_extra={"minItems": 1},
    )
    ttl: int | None = Field(
        None, ge=0, le=2_147_483_647, strict=True, description="Seconds; default: the zone's"
    )


class DnsZone(Strict):
    """A zone the controller writes records into, on the server its provider names."""

    kind: Literal["internal", "public", "explicit"] = Field(
        "explicit",
        description="internal: an A (AAAA) record per guest with a static address, "
        "<guest>.<zone>; public: one per route host and Velocity forced host under the zone, "
        "pointing at edge_address; explicit: only the records listed",
    )
    provider: Rfc2136Provider
    edge_address: Annotated[tuple[IpText, ...], _one_or_list(str)] = Field(
        (),
        description="public zones: the edge's public address(es), where players and browsers "
        "connect (IPv4 gives A records, IPv6 AAAA)",
    )
    ttl: int = Field(300, ge=0, le=2_147_483_647, strict=True, description="Default TTL, seconds")
    records: tuple[DnsRecord, ...] = Field((), description="Records besides the derived ones")

    @model_validator(mode="after")
    def _edge(self) -> DnsZone:
        if self.kind == "public" and not self.edge_address:
            raise ValueError(
                "a public zone needs edge_address: the address its route hosts and forced hosts "
                "point at"
            )
        if self.kind != "public" and self.edge_address:
            raise ValueError("edge_address is for public zones only (kind: public)")
        return self


class DnsSpec(Strict):
    """DNS zones by name, each with its provider and records (README "DNS records")."""

    zones: Annotated[
        Mapping[DnsName, DnsZone],
        AfterValidator(_freeze),
        PlainSerializer(dict, return_type=dict),
    ] = Field(default_factory=dict, description="Zones by name (play.zpack.dev)")


# --- notifications -------------------------------------------------------------------------

# What the controller tells people about (controller.notify): closed, one name per kind of news.
NotificationEvent = Literal[
    "change-failed",  # a change failed (what, why); resolved when the resource converges
    "cycle-failed",  # a cycle could not run (Proxmox unreachable, a plan error)
    "drift-healed",  # one summary per cycle of what drifted and was put back
    "guest-unready",  # a guest whose agent stays unready (a crash included) past a threshold
    "held-back",  # a destroy a gate holds back (pruning off)
    "isolation",  # a live firewall opening the isolation policies forbid
    "leadership",  # this replica gained or lost the leader lease
    "backup-stale",  # a guest's newest backup is older than its job's max_age, or missing
    "destroyed",  # what a cycle destroyed (pruning allowed): one summary per cycle
]
NOTIFICATION_EVENTS: tuple[NotificationEvent, ...] = (
    "change-failed",
    "cycle-failed",
    "drift-healed",
    "guest-unready",
    "held-back",
    "isolation",
    "leadership",
    "backup-stale",
    "destroyed",
)
NotificationSeverity = Literal["info", "warning", "error"]
# `{env:NAME}` or `{file:/path}` inside a notification URL: resolved when a message is sent.
URL_REFERENCE = re.compile(r"\{(env|file):([^{}]*)\}")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
_APPRISE_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://\S+\Z")
# Query parameters (and Apprise's `-Header=` / `+param=` forms) whose value is a secret.
_SECRET_PARAM = re.compile(r"(?i)token|key|secret|pass|pwd|auth|sig")
_TOKEN_TEXT = re.compile(r"^[A-Za-z0-9_-]{12,}\Z")
_SENTINEL = "rcref{}x"


def _looks_like_token(text: str) -> bool:
    """A path or user part that reads as an access token (a Discord or Slack webhook token, a
    Gotify app token, an ntfy `tk_` token): long, letters and digits mixed, no dots."""
    if not _TOKEN_TEXT.match(text):
        return False
    digits = sum(c.isdigit() for c in text)
    letters = sum(c.isalpha() for c in text)
    if not digits or not letters:
        return False
    mixed = any(c.isupper() for c in text) and any(c.islower() for c in text)
    bare = "-" not in text and "_" not in text
    return mixed or (len(text) >= 20 and bare and digits >= len(text) / 5)


def url_references(url: str) -> list[SecretRef]:
    """The secret references a notification URL holds, in order (`{env:X}` -> env X)."""
    refs = []
    for kind, name in URL_REFERENCE.findall(url):
        refs.append(SecretRef(env=name) if kind == "env" else SecretRef(file=name))
    return refs


def check_notification_url(value: str) -> str:
    """An Apprise URL (`scheme://...`) whose secrets are references: a malformed reference, a
    secret-named query parameter with a literal value, or a path or user part that reads as a
    token is refused, never repeated. (A literal password in the userinfo is refused by the
    loader's literal-secret scan, as in any URL of a spec.)"""
    if not _APPRISE_URL.match(value):
        raise ValueError(
            "expected an Apprise URL, scheme://... without spaces (ntfys://ntfy.sh/topic, "
            "json://host/path, mailtos://mail.example.org?to=ops@example.org)"
        )
    refs = URL_REFERENCE.findall(value)
    bare = URL_REFERENCE.sub("", value)
    if any(
        (kind == "env" and not _ENV_NAME.match(name)) or (kind == "file" and not name.strip())
        for kind, name in refs
    ) or re.search(r"(?i)\{\s*(env|file)\b", bare):
        raise ValueError(
            "a secret reference in the URL is {env:VARIABLE} or {file:/path}; one here is "
            "malformed (not shown, in case it is the secret itself)"
        )
    count = iter(range(len(refs)))
    text = URL_REFERENCE.sub(lambda _m: _SENTINEL.format(next(count)), value)
    rest = text.split("://", 1)[1]
    rest, _, query = rest.partition("?")
    rest = rest.partition("#")[0]
    how = "write {env:VARIABLE} or {file:/path} there instead (read when a message is sent)"
    for part in query.split("&"):
        key, _, item = part.partition("=")
        if item and _SECRET_PARAM.search(key) and "rcref" not in item:
            name = key.lstrip("-+:")[:40]
            raise ValueError(
                f"a literal secret is not allowed in a spec: the URL's {name!r} parameter "
                f"holds one (not shown); {how}"
            )
    for piece in re.split(r"[/:@]", rest):
        if "rcref" not in piece and _looks_like_token(unquote(piece)):
            raise ValueError(
                "a literal secret is not allowed in a spec: a part of the URL reads as an "
                f"access token (not shown); {how}"
            )
    return value


NotificationUrl = Annotated[str, AfterValidator(check_notification_url)]


def _duration_in(low: int, high: int) -> AfterValidator:
    def check(seconds: int) -> int:
        if not low <= seconds <= high:
            raise ValueError(f"between {low} s and {high} s")
        return seconds

    return AfterValidator(check)


class NotificationTarget(Strict):
    """Where the controller's own news goes: one Apprise URL (ntfy, Discord, Slack, Gotify,
    Matrix, email and about a hundred more), the events it wants and the least severity."""

    url: NotificationUrl = Field(
        description="An Apprise URL; secrets in it as {env:VARIABLE} or {file:/path}, read when "
        "a message is sent and never logged"
    )
    events: Annotated[tuple[NotificationEvent, ...], _one_or_list(NotificationEvent)] = Field(
        NOTIFICATION_EVENTS, description="The events this target gets (default: all)"
    )
    min_severity: NotificationSeverity = Field(
        "warning", description="info, warning or error: quieter events are not sent here"
    )
    max_per_hour: int = Field(
        30,
        ge=1,
        le=3600,
        strict=True,
        description="At most this many messages an hour; more are counted, not sent",
    )
    timeout: Annotated[Seconds, _duration_in(1, 300)] = Field(
        10, description="A message not delivered within this long counts as failed"
    )


_CONFIG_ID = r"^[A-Za-z][A-Za-z0-9_-]+$"
PveName = Annotated[str, Field(pattern=_CONFIG_ID)]
_MAIL = r"^[^\s@,;]+@[^\s@,;]+$"
HeaderName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9-]*$")]


class _PveEndpointBase(Strict):
    description: Comment = ""
    enabled: bool = True


class _Recipients(_PveEndpointBase):
    mailto: Annotated[tuple[Annotated[str, Field(pattern=_MAIL)], ...], _one_or_list(str)] = ()
    mailto_user: Annotated[
        tuple[Annotated[str, Field(pattern=r"^[^\s@]+@[A-Za-z][A-Za-z0-9._-]*$")], ...],
        _one_or_list(str),
    ] = Field((), description="PVE users (root@pam) whose email address gets it")
    from_address: Annotated[str, Field(pattern=_MAIL)] | None = None
    author: Comment | None = None

    @model_validator(mode="after")
    def _someone(self) -> _Recipients:
        if not self.mailto and not self.mailto_user:
            raise ValueError("give at least one recipient: mailto or mailto_user")
        return self


class PveSendmail(_Recipients):
    """Mail through the node's sendmail (Postfix)."""

    type: Literal["sendmail"]


class PveSmtp(_Recipients):
    """Mail through an SMTP relay."""

    type: Literal["smtp"]
    server: Hostname
    port: Port | None = None
    mode: Literal["insecure", "starttls", "tls"] = "tls"
    username: str | None = None
    password: Secret | None = None
    from_address: Annotated[str, Field(pattern=_MAIL)]


class PveGotify(_PveEndpointBase):
    type: Literal["gotify"]
    server: str = Field(pattern=r"^https?://\S+$", description="https://gotify.example.org")
    token: Secret


class PveWebhook(_PveEndpointBase):
    """An HTTP request per notification; `{{ title }}`, `{{ message }}`, `{{ severity }}` and
    `{{ secrets.NAME }}` are filled in by Proxmox."""

    type: Literal["webhook"]
    url: str = Field(pattern=r"^https?://\S+$")
    method: Literal["post", "put", "get"] = "post"
    headers: Mapping[HeaderName, Comment] = Field(default_factory=dict)
    body: str | None = Field(None, description="The request body (a Handlebars template)")
    secrets: Mapping[Identifier, Secret] = Field(
        default_factory=dict,
        description="Values the URL, headers and body use as {{ secrets.NAME }}: PVE keeps "
        "them apart and never shows them",
    )


PveEndpoint = Annotated[PveSendmail | PveSmtp | PveGotify | PveWebhook, Field(discriminator="type")]
PveSeverity = Literal["info", "notice", "warning", "error", "unknown"]


class PveMatcher(Strict):
    """Which of Proxmox's own notifications (vzdump, fencing, replication, package updates)
    go to which endpoints: a PVE notification matcher."""

    severities: Annotated[tuple[PveSeverity, ...], _one_or_list(PveSeverity)] = ()
    types: Annotated[tuple[Identifier, ...], _one_or_list(str)] = Field(
        (), description="vzdump, fencing, replication, package-updates, system-mail"
    )
    fields: Annotated[
        tuple[Annotated[str, Field(pattern=r"^(exact|regex):[A-Za-z0-9][A-Za-z0-9_-]*=.+$")], ...],
        _one_or_list(str),
    ] = Field((), description="More match-field statements: exact:hostname=pve1, regex:...")
    calendar: Annotated[tuple[Comment, ...], _one_or_list(str)] = ()
    mode: Literal["all", "any"] = "all"
    invert: bool = False
    targets: Annotated[tuple[PveName, ...], _one_or_list(str, 1)] = Field(
        description="Endpoints to notify: the spec's, or existing ones (mail-to-root)"
    )
    description: Comment = ""
    enabled: bool = True


class PveNotifications(Strict):
    endpoints: LabelMap[PveEndpoint] = Field(default_factory=dict)
    matchers: LabelMap[PveMatcher] = Field(default_factory=dict)


class NotificationsSpec(Strict):
    """Who hears about what: the controller's own events through Apprise targets, and
    Proxmox's own notifications through its endpoints and matchers."""

    targets: LabelMap[NotificationTarget] = Field(default_factory=dict)
    unready_after: Seconds = Field(
        300, description="A guest whose agent is not ready this long is reported (5m)"
    )
    proxmox: PveNotifications = PveNotifications()


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
    pools: Annotated[
        Mapping[PoolName, PoolSpec],
        AfterValidator(_freeze),
        PlainSerializer(dict, return_type=dict),
    ] = Field(
        default_factory=dict,
        description="Resource pools the controller creates and owns, by name",
        json_schema_extra={"propertyNames": {"pattern": _POOL_SCHEMA}},
    )
    templates: LabelMap[TemplateSpec] = Field(
        default_factory=dict,
        description="Files the hosts need (container templates, ISOs, VM images), by name: "
        "downloaded where missing, before the guests that use them",
    )
    dns: DnsSpec | None = Field(
        None,
        description="DNS zones and their records: derived from guests and the edge, and listed",
    )
    notifications: NotificationsSpec = Field(
        default_factory=NotificationsSpec,
        description="Who hears about what: Apprise targets, and PVE's own notifications",
    )
    policies: Policies = Policies()

    def node_of(self, host: str) -> str:
        return self.hosts[host].node or host

    def layer_of(self, guest: str) -> str:
        return self.ranges[self.guests[guest].role].layer


TOP_LEVEL_KEYS = tuple(PlatformSpec.model_fields)


def template_nodes(spec: PlatformSpec, template: TemplateSpec) -> list[str]:
    """The Proxmox nodes a template is to be on (its hosts' nodes; `all`: every host's), sorted,
    each once. A host the spec does not define is left out (the checks report it)."""
    hosts = spec.hosts if template.hosts == "all" else template.hosts
    return sorted({spec.node_of(h) for h in hosts if h in spec.hosts})


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
