"""Normalization: both sides of a diff in one canonical shape, so a converged platform plans empty.

Proxmox rewrites what it is sent (FIELD-NOTES: tags lowercased, deduped, sorted and `;`-joined;
rootfs as `local-lvm:vm-103-disk-0,size=8G`; MACs and `type=veth` added to netN; booleans as
0/1). Observers may hand us either spelling; every comparison goes through here.
"""

from __future__ import annotations

from typing import Any

from reconciler.model.resources import Kind
from reconciler.model.units import format_mib, parse_kv, parse_mib

# Keys Proxmox adds to netN on its own; compared only when the spec sets them.
_NET_GENERATED = ("hwaddr", "type")


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


def rootfs(value: Any) -> dict[str, str]:
    if isinstance(value, dict):
        storage, size = value.get("storage"), value.get("size")
    else:
        kv = parse_kv(str(value))
        volume = kv.get("volume", "")
        storage = volume.split(":", 1)[0] if volume else None
        size = kv.get("size")
        if size is None and ":" in volume and volume.split(":", 1)[1].isdigit():
            size = volume.split(":", 1)[1]  # `local-lvm:8` as sent on create
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


def _bool(value: Any) -> Any:
    if isinstance(value, str) and value in ("0", "1"):
        return value == "1"
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
        out["net"] = {k: net(v, keep.get(k, frozenset())) for k, v in sorted(out["net"].items())}
    for key in ("onboot", "unprivileged"):
        if key in out:
            out[key] = _bool(out[key])
    for key in ("cores", "memory", "swap"):
        if isinstance(out.get(key), str):
            out[key] = int(out[key])
    if out.get("description") is None and "description" in out:
        out["description"] = ""
    return out


def rule(value: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in value.items() if v not in (None, "") and k not in ("pos", "digest")}
    out["enable"] = int(out.get("enable", 0))
    if out.get("log") == "nolog":
        out.pop("log")
    if "dport" in out:
        out["dport"] = str(out["dport"])
    return out


def firewall(attrs: dict[str, Any]) -> dict[str, Any]:
    out = dict(attrs)
    if isinstance(out.get("rules"), list):
        out["rules"] = [rule(r) for r in out["rules"]]
    if "enable" in out:
        out["enable"] = int(out["enable"])
    if isinstance(out.get("entries"), list):
        out["entries"] = sorted(out["entries"])
    return out


def pair(
    kind: Kind, desired: dict[str, Any], observed: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Normalize a desired/observed pair of one resource."""
    if kind is Kind.GUEST:
        keep = {
            k: frozenset(key for key in _NET_GENERATED if key in parse_kv(v))
            for k, v in (desired.get("net") or {}).items()
        }
        return guest(desired, net_keep=keep), guest(observed, net_keep=keep)
    if kind.value.startswith("firewall"):
        return firewall(desired), firewall(observed)
    return dict(desired), dict(observed)
