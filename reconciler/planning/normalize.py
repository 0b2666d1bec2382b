"""Normalization: both sides of a diff in one canonical shape, so a converged platform plans empty.

Proxmox rewrites what it is sent (tags lowercased, deduped, sorted and `;`-joined;
rootfs as `local-lvm:vm-103-disk-0,size=8G`; MACs and `type=veth` added to netN; booleans as
0/1). Observers may hand us either spelling; every comparison goes through here.

QEMU spells things its own way: a NIC is `virtio=BC:24:11:..,bridge=vmbr0` (the model's key holds
the generated MAC; `model=virtio,macaddr=..` is accepted too), and memory comes back as a
string (`"2048"`, or the property-string form `"current=2048"`). A VM has no `rootfs`: its disks,
the boot disk among them, are `volumes` by drive key (`scsi0`, `virtio0`, ...), and `boot_disk`
names the one it boots from (None: it has none). An observation made before VMs were read that
way (a saved snapshot: `rootfs` for `scsi0`, no `boot_disk`) is read in this shape (`pair`).

Volumes (a container's `mpN`, a VM's disks) come back as `local-lvm:vm-1001-disk-1,mp=/data,
backup=1,size=50G`; both sides become `{"storage", "size", "path", "backup", options...}` with
Proxmox's defaults filled in (`volume`).
"""

from __future__ import annotations

from typing import Any

from reconciler.model import units
from reconciler.model.resources import Kind
from reconciler.model.units import format_mib, parse_kv, parse_mib

# Keys Proxmox adds to netN on its own; compared only when the spec sets them. For a VM, "hwaddr"
# stands for the MAC in `virtio=MAC`.
_NET_GENERATED = ("hwaddr", "type")

# qemu-server's NIC models: in `virtio=BC:24:11:..` the key is the model, the value the MAC.
QEMU_NIC_MODELS = frozenset(
    {
        "e1000",
        "e1000-82540em",
        "e1000-82544gc",
        "e1000-82545em",
        "e1000e",
        "i82551",
        "i82557b",
        "i82559er",
        "ne2k_isa",
        "ne2k_pci",
        "pcnet",
        "rtl8139",
        "virtio",
        "vmxnet3",
    }
)


def tags(value: Any) -> list[str]:
    if value is None:
        return []
    items = (
        value.replace(",", ";").replace(" ", ";").split(";") if isinstance(value, str) else value
    )
    return sorted({str(t).strip().lower() for t in items if str(t).strip()})


def net(value: str, keep: frozenset[str] = frozenset()) -> str:
    kv = parse_kv(value)
    for key in _NET_GENERATED:
        if key not in keep:
            kv.pop(key, None)
    if "hwaddr" in kv:
        kv["hwaddr"] = kv["hwaddr"].upper()
    kv.setdefault("firewall", "0")
    return ",".join(f"{k}={kv[k]}" for k in sorted(kv))


def qemu_nic(value: str) -> tuple[str, str | None, dict[str, str]]:
    """A VM's `netN` -> (model, MAC or None, the other keys), from either spelling."""
    model, mac, rest = "", None, {}
    for part in value.split(","):
        key, _, val = (x.strip() for x in part.partition("="))
        if key in QEMU_NIC_MODELS:
            model, mac = key, val or None
        elif key == "model":
            model = val
        elif key == "macaddr":
            mac = val or None
        elif key:
            rest[key] = val
    return model, mac.upper() if mac else None, rest


def qemu_net(value: str, keep: frozenset[str] = frozenset()) -> str:
    """`virtio=BC:24:11:..,tag=10,bridge=vmbr0` -> `virtio,bridge=vmbr0,firewall=0,tag=10`: the
    model first, its MAC only when the spec pins one ("hwaddr" in `keep`), the rest sorted."""
    model, mac, kv = qemu_nic(value)
    head = f"{model}={mac}" if mac and "hwaddr" in keep else model
    kv.setdefault("firewall", "0")
    parts = [head] if head else []
    return ",".join(parts + [f"{k}={kv[k]}" for k in sorted(kv)])


def memory(value: Any) -> Any:
    """MiB as an int: QEMU answers `"2048"` or `"current=2048"`."""
    if isinstance(value, str):
        kv = parse_kv(value)
        return int(kv.get("current") or kv.get("volume") or value)
    return value


def rootfs(value: Any) -> dict[str, str]:
    if isinstance(value, dict):
        storage, size = value.get("storage"), value.get("size")
    else:
        kv = parse_kv(str(value))
        volume = kv.get("volume", "")
        storage = volume.split(":", 1)[0] if volume else None
        size = kv.get("size")
        if size is None and ":" in volume and volume.split(":", 1)[1].replace(".", "", 1).isdigit():
            size = volume.split(":", 1)[1]  # `local-lvm:8` as sent on create (or allocating)
    out: dict[str, str] = {}
    if storage:
        out["storage"] = str(storage)
    if size is not None:
        out["size"] = format_mib(parse_mib(size, bare_unit="G"))
    return out


def features(value: Any) -> str:
    if not value:
        return ""
    kv = parse_kv(value) if isinstance(value, str) else {k: str(int(v)) for k, v in value.items()}
    return ",".join(f"{k}=1" for k in sorted(kv) if kv[k] in ("1", "True"))


# A mount point's options as Proxmox stores them, and their defaults: an option at its
# default is left out of the normalized shape (loading.graph.mount_options writes the same).
_MOUNT_FLAGS = {"acl": None, "quota": False, "ro": False, "replicate": True}


def volume(kind: str, value: Any) -> dict[str, Any]:
    """One volume, from Proxmox's string (`local-lvm:vm-1001-disk-1,mp=/data,backup=1,size=50G`,
    or the allocation form `local-lvm:50,mp=/data` as sent) or from the normalized dict, into
    the normalized dict: storage, size, path (containers), backup with Proxmox's default (a
    mount point is not backed up unless `backup=1`, a VM disk is unless `backup=0`), and the
    mount options that differ from their defaults. What the spec cannot say (a VM disk's
    iothread, a mount point's idmap) is left out."""
    out: dict[str, Any] = dict(rootfs(value))  # storage and size, read as a root disk's
    if isinstance(value, dict):
        kv = {k: v for k, v in value.items() if v is not None}
        path = kv.get("path")
    else:
        kv = parse_kv(str(value))
        path = kv.get("mp")
    if kind == "lxc" and path is not None:
        out["path"] = str(path)
    backup = _bool(kv.get("backup"))
    out["backup"] = (kind == "qemu") if backup is None else bool(backup)
    if kind == "lxc":
        for flag, default in _MOUNT_FLAGS.items():
            found = _bool(kv.get(flag))
            if found is not None and bool(found) != default:
                out[flag] = bool(found)
        options = str(kv.get("mountoptions") or "")
        flags = sorted({o for o in options.split(";") if o})
        if flags:
            out["mountoptions"] = ";".join(flags)
    return out


def volumes(kind: str, value: Any) -> dict[str, dict[str, Any]]:
    """Every volume by key (none: `{}`)."""
    return {k: volume(kind, v) for k, v in sorted((value or {}).items())}


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _bool(value: Any) -> Any:
    if isinstance(value, str) and value.lower() in (*_TRUE, *_FALSE):
        return value.lower() in _TRUE
    if isinstance(value, int) and not isinstance(value, bool):
        return bool(value)
    return value


def guest(
    attrs: dict[str, Any], *, net_keep: dict[str, frozenset[str]] | None = None
) -> dict[str, Any]:
    out = dict(attrs)
    if "tags" in out:
        out["tags"] = tags(out["tags"])
    if "rootfs" in out and out["rootfs"] is not None:
        out["rootfs"] = rootfs(out["rootfs"])
    if "features" in out:
        out["features"] = features(out["features"])
    if isinstance(out.get("net"), dict):
        keep = net_keep or {}
        one = qemu_net if out.get("type") == "qemu" else net
        out["net"] = {k: one(v, keep.get(k, frozenset())) for k, v in sorted(out["net"].items())}
    for key in ("onboot", "unprivileged", "protection"):
        if key in out:
            out[key] = _bool(out[key])
    if "volumes" in out:
        out["volumes"] = volumes(str(out.get("type") or "lxc"), out["volumes"])
    if "memory" in out:
        out["memory"] = memory(out["memory"])
    for key in ("cores", "swap"):
        if isinstance(out.get(key), str):
            out[key] = int(out[key])
    if out.get("description") is None and "description" in out:
        out["description"] = ""
    return out


def _pinned(value: str, qemu: bool) -> frozenset[str]:
    """The generated keys a desired netN sets (a pinned MAC, `virtio=AA:..` for a VM): those
    are compared too."""
    if qemu:
        return frozenset({"hwaddr"}) if qemu_nic(value)[1] else frozenset()
    return frozenset(key for key in _NET_GENERATED if key in parse_kv(value))


def _vm_disks(desired: dict[str, Any], observed: dict[str, Any]) -> dict[str, Any]:
    """A VM observed in the older shape (a saved snapshot: its boot disk `scsi0` as `rootfs`,
    no `boot_disk`) in today's: the disk among its volumes; a boot disk not observed is taken
    as the spec's (unknown, never drift)."""
    legacy = observed.pop("rootfs", None)
    if legacy is not None and "scsi0" not in (observed.get("volumes") or {}):
        observed["volumes"] = {"scsi0": legacy, **(observed.get("volumes") or {})}
        observed.setdefault("boot_disk", "scsi0")
    if "boot_disk" in desired and "boot_disk" not in observed:
        observed["boot_disk"] = desired["boot_disk"]
    return observed


def rule(value: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in value.items() if v not in (None, "") and k not in ("pos", "digest")}
    out["enable"] = int(out.get("enable", 0))
    if out.get("log") == "nolog":
        out.pop("log")
    if "dport" in out:
        out["dport"] = str(out["dport"])
    if isinstance(out.get("macro"), str):
        # Proxmox stores a macro under its preferred spelling (ssh -> SSH).
        out["macro"] = out["macro"].lower()
    return out


def firewall(attrs: dict[str, Any]) -> dict[str, Any]:
    out = dict(attrs)
    if isinstance(out.get("rules"), list):
        out["rules"] = [rule(r) for r in out["rules"]]
    if "enable" in out:
        out["enable"] = int(out["enable"])
    if isinstance(out.get("entries"), list):
        out["entries"] = sorted(units.ipset_entry(str(e)) for e in out["entries"])
    return out


def pair(
    kind: Kind, desired: dict[str, Any], observed: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Normalize a desired/observed pair of one resource."""
    if kind is Kind.GUEST:
        qemu = desired.get("type") == "qemu"
        keep = {k: _pinned(v, qemu) for k, v in (desired.get("net") or {}).items()}
        # What Proxmox leaves out of a config is at its default: no volumes, no protection
        # (an observer, or a saved observation, that does not list them saw none).
        observed = dict(observed)
        if "volumes" in desired and observed.get("volumes") is None:
            observed["volumes"] = {}
        if "protection" in desired and observed.get("protection") is None:
            observed["protection"] = False
        if qemu and observed.get("type") == "qemu":
            observed = _vm_disks(desired, observed)
        return guest(desired, net_keep=keep), guest(observed, net_keep=keep)
    if kind.value.startswith("firewall"):
        return firewall(desired), firewall(observed)
    return dict(desired), dict(observed)
