"""Proxmox's side of a guest's provisioning: cloning a template, cloud-init, the QEMU guest agent.
Pure functions over configs, inventory items and desired attributes; `providers.proxmox` makes
the calls (`ProxmoxProvider.clone_guest`, `update_guest`, `set_state`, `observe_guest`).

What qemu-server does with these keys (PVE/API2/Qemu.pm, PVE/QemuServer/Cloudinit.pm), and what
it means here:
- clone: `POST /nodes/{node}/{qemu|lxc}/{template}/clone` with `newid`, `name` (a container's
  `hostname`), `full`, `storage` (full clones only), `target` (another node: the storage must be
  shared), `description`. The clone copies the template's config, tags included, but neither
  its `template` flag nor (a VM) its MACs; the description carries our mark from the start,
  so a run cut off after the clone finds the guest ours;
- cloud-init keys are `ciuser`, `cipassword`, `sshkeys`, `nameserver`, `searchdomain`,
  `cicustom`, `ipconfigN`; PVE answers `cipassword` as `**********` (stored hashed), so a
  password is seen as set or not, never compared. `sshkeys` is sent URL-encoded, one key per
  line, and comes back as sent: compared decoded, line by line. `PUT .../cloudinit`
  regenerates the drive (also done by every start); the guest's cloud-init reads it at boot;
- the agent: `agent: 1` (or `enabled=1,...`: its other options are kept); `POST
  .../agent/ping` answers once the agent runs in the guest; `GET
  .../agent/network-get-interfaces` lists the guest's interfaces and addresses.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import quote, unquote

from reconciler.model.disks import VM_BUSES, is_vm_disk, split_key
from reconciler.model.errors import PermanentError
from reconciler.model.spec import SecretRef
from reconciler.model.units import format_mib, parse_kv, parse_mib

# The cloud-init keys the spec manages (citype and ciupgrade are left as they are).
CLOUD_INIT_KEYS = ("ciuser", "cipassword", "sshkeys", "nameserver", "searchdomain", "cicustom")
_IPCONFIG = re.compile(r"ipconfig\d+")
_LIST_SPLIT = re.compile(r"[\s,;]+")
_TRUE = ("1", "true", "yes", "on")


# --- cloud-init --------------------------------------------------------------------------------


def canonical_ipconfig(value: str) -> str:
    """`ip=10.0.0.5/24,gw=10.0.0.1` -> `gw=10.0.0.1,ip=10.0.0.5/24`: keys sorted."""
    kv = parse_kv(str(value))
    kv.pop("volume", None)
    return ",".join(f"{k}={kv[k]}" for k in sorted(kv))


def _words(value: Any) -> list[str]:
    return [w for w in _LIST_SPLIT.split(str(value or "")) if w]


def decode_ssh_keys(value: Any) -> list[str]:
    """`sshkeys` as Proxmox holds it (URL-encoded lines) -> the keys, whitespace collapsed."""
    text = unquote(str(value or ""))
    return [
        " ".join(line.split())
        for line in text.splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]


def encode_ssh_keys(keys: Iterable[str]) -> str:
    """The keys as `sshkeys` takes them: one per line, URL-encoded (PVE's `urlencoded`)."""
    return quote("\n".join(keys), safe="")


def observed_cloud_init(config: Mapping[str, Any]) -> dict[str, Any]:
    """A VM's cloud-init settings, in the shape `loading.provisioning` writes the spec's."""
    return {
        "user": config.get("ciuser") or None,
        "password": "set" if config.get("cipassword") else None,
        "ssh_keys": decode_ssh_keys(config.get("sshkeys")),
        "nameserver": _words(config.get("nameserver")),
        "searchdomain": _words(config.get("searchdomain")),
        "user_data": parse_kv(str(config.get("cicustom") or "")).get("user") or None,
        "ipconfig": {
            k: canonical_ipconfig(str(v))
            for k, v in sorted(config.items())
            if _IPCONFIG.fullmatch(k) and v
        },
    }


def _cicustom(user_data: str | None, current: Any) -> str | None:
    """`cicustom` with the spec's `user=` snippet; the other snippets (network=, meta=,
    vendor=), set by hand, are kept."""
    kv = parse_kv(str(current or ""))
    kv.pop("volume", None)
    kv.pop("user", None)
    if user_data:
        kv = {"user": user_data, **kv}
    return ",".join(f"{k}={v}" for k, v in kv.items()) or None


def cloud_init_params(
    want: Mapping[str, Any],
    config: Mapping[str, Any],
    fields: Iterable[str] | None,
    read_secret: Callable[[SecretRef], str],
) -> tuple[dict[str, Any], list[str]]:
    """The config keys that make the VM's cloud-init what `want["cloud_init"]` says: (set,
    delete). `fields`: the changed paths under `cloud_init` (`cloud_init.user`,
    `cloud_init.ipconfig.ipconfig0`, or `cloud_init` whole); None: every key (a fresh clone).
    A key to delete that the config does not hold is left out. The password is read from its
    reference here, and only here."""
    ci = want.get("cloud_init")
    if not isinstance(ci, Mapping):
        return {}, []
    if fields is None:
        changed = None
    else:
        changed = {p.split(".")[1] if "." in p else "*" for p in fields}
        if "*" in changed:
            changed = None
    nets = {p.split(".")[2] for p in fields or () if p.startswith("cloud_init.ipconfig.")}

    def wanted(name: str) -> bool:
        return changed is None or name in changed

    values: dict[str, Any] = {}
    if wanted("user"):
        values["ciuser"] = ci.get("user")
    if wanted("password"):
        ref = want.get("cloud_init_password")
        values["cipassword"] = (
            read_secret(SecretRef.model_validate(ref)) if ci.get("password") and ref else None
        )
    if wanted("ssh_keys"):
        keys = list(ci.get("ssh_keys") or ())
        values["sshkeys"] = encode_ssh_keys(keys) if keys else None
    if wanted("nameserver"):
        values["nameserver"] = " ".join(ci.get("nameserver") or ()) or None
    if wanted("searchdomain"):
        values["searchdomain"] = " ".join(ci.get("searchdomain") or ()) or None
    if wanted("user_data"):
        values["cicustom"] = _cicustom(ci.get("user_data"), config.get("cicustom"))
    if wanted("ipconfig"):
        configs = dict(ci.get("ipconfig") or {})
        present = {k for k in config if _IPCONFIG.fullmatch(k)}
        for key in sorted(set(configs) | present):
            if changed is None or not nets or key in nets:
                values[key] = configs.get(key)
    params = {k: v for k, v in values.items() if v is not None}
    delete = [k for k, v in values.items() if v is None and config.get(k) is not None]
    return params, delete


def cloud_init_drive(config: Mapping[str, Any]) -> str | None:
    """The key of the VM's cloud-init drive (`ide2: local-lvm:vm-100-cloudinit,media=cdrom`),
    or None."""
    for key, value in config.items():
        parts = split_key(key)
        if parts is None or parts[0] not in VM_BUSES:
            continue
        volume = parse_kv(str(value)).get("volume", "")
        if volume and not is_vm_disk(value) and "cloudinit" in volume:
            return key
    return None


def new_cloud_init_drive(config: Mapping[str, Any], storage: str) -> tuple[str, str]:
    """Where a VM without a cloud-init drive gets one, and its allocation form: `ide2`, the
    slot Proxmox's tools use, or the first free IDE or SATA slot."""
    slots = ["ide2", "ide0", "ide1", "ide3", *(f"sata{n}" for n in range(6))]
    free = next((s for s in slots if s not in config), None)
    if free is None:
        raise PermanentError("no free IDE or SATA slot for a cloud-init drive")
    return free, f"{storage}:cloudinit"


# --- the guest agent -----------------------------------------------------------------------------


def agent_enabled(value: Any) -> bool:
    """`agent: 1`, `enabled=1,fstrim_cloned_disks=1`: is the agent on."""
    kv = parse_kv(str(value or ""))
    return str(kv.get("enabled", kv.get("volume", "0"))).lower() in _TRUE


def agent_value(on: bool, current: Any) -> str:
    """`agent` switched on or off, the agent's other options (`fstrim_cloned_disks`, `type`,
    `freeze-fs`) kept as they are."""
    kv = parse_kv(str(current or ""))
    rest = [f"{k}={v}" for k, v in kv.items() if k not in ("volume", "enabled")]
    return ",".join(["1" if on else "0", *rest])


def agent_addresses(answer: Any) -> list[str]:
    """`network-get-interfaces`' answer -> the guest's addresses as `ip/prefix`, loopback and
    link-local left out, in the order the guest lists them (IPv4 before IPv6 per interface)."""
    interfaces = answer.get("result") if isinstance(answer, Mapping) else answer
    out: list[str] = []
    for iface in interfaces if isinstance(interfaces, list) else ():
        if not isinstance(iface, Mapping) or iface.get("name") == "lo":
            continue
        found = []
        for item in iface.get("ip-addresses") or ():
            try:
                ip = ipaddress.ip_interface(f"{item['ip-address']}/{int(item.get('prefix', 32))}")
            except (KeyError, TypeError, ValueError):
                continue
            if ip.ip.is_loopback or ip.ip.is_link_local:
                continue
            found.append((ip.version, str(ip)))
        out += [text for _, text in sorted(found, key=lambda f: f[0])]
    return list(dict.fromkeys(out))


# --- cloning -------------------------------------------------------------------------------------


def find_template(
    guests: Iterable[Mapping[str, Any]], clone: Mapping[str, Any], kind: str, address: str
) -> Mapping[str, Any]:
    """The inventory item of the template `clone` names (by the vmid the plan found, else by
    `from`): PermanentError when there is none, it is not a template, several have the name,
    or it is of the other kind. Nothing has been done then."""
    source = clone.get("vmid") or clone["from"]
    if isinstance(source, int) or str(source).isdigit():
        found = [g for g in guests if int(g["vmid"]) == int(source)]
    else:
        found = [g for g in guests if g.get("name") == source]
    templates = [g for g in found if int(g.get("template") or 0)]
    why = ""
    if not found:
        why = "no such guest in the cluster"
    elif not templates:
        why = f"vmid {found[0]['vmid']} is not a template"
    elif len(templates) > 1:
        why = "several templates have that name: " + ", ".join(str(t["vmid"]) for t in templates)
    elif templates[0].get("type") != kind:
        why = f"it is a {templates[0].get('type')} template, the guest a {kind}"
    if why:
        raise PermanentError(f"{address}: cannot clone {source}: {why}; nothing was cloned")
    return templates[0]


def clone_params(
    want: Mapping[str, Any],
    template: Mapping[str, Any],
    node: str,
    description: str,
    storage: str | None,
) -> dict[str, Any]:
    """The clone request: the new vmid, name, full or linked, the target node when the
    template is on another one, the description with our mark, the pool it joins, and for a
    full clone the storage its disks go to (`clone.storage`, else `storage`: the spec's root
    disk's)."""
    clone = want["clone"]
    kind = want.get("type", "lxc")
    full = bool(clone.get("full", True))
    params: dict[str, Any] = {
        "newid": want["vmid"],
        "name" if kind == "qemu" else "hostname": want["name"],
        "full": int(full),
        "description": description,
    }
    if full and (clone.get("storage") or storage):
        params["storage"] = clone.get("storage") or storage
    if template.get("node") != node:
        params["target"] = node
    if want.get("pool"):
        params["pool"] = want["pool"]  # joins its pool with the clone, as a create does
    return params


def _size_of(value: Any) -> int | None:
    size = parse_kv(str(value or "")).get("size")
    return parse_mib(size, bare_unit="G") if size else None


def check_template_disks(
    address: str,
    want: Mapping[str, Any],
    config: Mapping[str, Any],
    template_disks: Mapping[str, str],
) -> None:
    """Before a clone: the template's disks fit the spec. A VM boots from the disk the spec
    names (its `boot_disk`): the template must have it (the clone would boot from another, or
    get an empty one). No disk of the template is larger than the spec's (a disk cannot
    shrink). A linked clone's disks stay on the template's storage, which must be the spec's.
    PermanentError, naming what to write in the spec, when not."""
    if want.get("type", "lxc") == "qemu":
        boot = want.get("boot_disk")
        if boot and boot not in template_disks:
            listed = ", ".join(template_disks) or "none"
            raise PermanentError(
                f"{address}: the template's disks are {listed}, not {boot}: set the spec's "
                "disk bus to the template's (disk: {bus: ...}); nothing was cloned"
            )
        disks = dict(template_disks)
        wanted = {k: v for k, v in (want.get("volumes") or {}).items() if k in disks}
    else:
        disks = {"rootfs": str(config.get("rootfs") or "")}
        wanted = {"rootfs": want.get("rootfs") or {}}
    linked = not (want.get("clone") or {}).get("full", True)
    for key, volume in sorted(wanted.items()):
        where = parse_kv(str(disks.get(key) or "")).get("volume", "").partition(":")[0]
        if linked and where and volume.get("storage") and volume["storage"] != where:
            raise PermanentError(
                f"{address}: a linked clone's disks stay on the template's storage: its {key} "
                f"is on {where}, the spec says {volume['storage']}; set the disk's storage to "
                f"{where}, or make a full clone. Nothing was cloned"
            )
        have, size = _size_of(disks.get(key)), volume.get("size")
        if have is not None and size and parse_mib(size, bare_unit="G") < have:
            raise PermanentError(
                f"{address}: the template's {key} is {format_mib(have)}, larger than the "
                f"spec's {size}: a disk cannot shrink; give it at least the template's size. "
                "Nothing was cloned"
            )
