"""Sizes and names as Proxmox spells them, parsed once so every layer compares like with like.

Memory and swap are MiB (Proxmox's unit for them); disk sizes are held in MiB too but a bare
number in a spec means GiB, as in Proxmox's `rootfs: local-lvm:8`.
"""

from __future__ import annotations

import ipaddress
import re

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT])?(?:I?B)?\s*$", re.IGNORECASE)
_FACTOR_MIB = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}

_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_HOST_LABEL = re.compile(r"^(\*|[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)$", re.IGNORECASE)


def parse_mib(value: object, *, bare_unit: str = "M") -> int:
    """`4G`, `4GiB`, `512M`, `512` -> MiB. A bare number is in `bare_unit`."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 512M or 4G, not a boolean")
    if isinstance(value, int):
        number, unit = float(value), bare_unit
    elif isinstance(value, float):
        number, unit = value, bare_unit
    elif isinstance(value, str):
        m = _SIZE.match(value)
        if not m:
            raise ValueError(f"{value!r} is not a size; write e.g. 512M, 4G or 1T")
        number, unit = float(m.group(1)), (m.group(2) or bare_unit).upper()
    else:
        raise ValueError("expected a size such as 512M or 4G")
    mib = number * _FACTOR_MIB[unit]
    if mib != int(mib):
        raise ValueError(f"{value!r} is not a whole number of MiB")
    if mib < 0:
        raise ValueError("a size cannot be negative")
    return int(mib)


def format_mib(mib: int) -> str:
    """MiB -> the shortest exact Proxmox size string (`8G`, `512M`)."""
    if mib and mib % (1024 * 1024) == 0:
        return f"{mib // (1024 * 1024)}T"
    if mib and mib % 1024 == 0:
        return f"{mib // 1024}G"
    return f"{mib}M"


def check_label(value: str) -> str:
    """A DNS label: what Proxmox accepts as a guest hostname and we use as a resource name."""
    if not _LABEL.match(value):
        raise ValueError(
            f"{value!r} is not a valid name: use lowercase letters, digits and '-', "
            "starting and ending with a letter or digit, at most 63 characters"
        )
    return value


def check_hostname(value: str) -> str:
    """A fully qualified host name as routes use it (`portal.example.org`, `*.play.example.org`)."""
    host = value.rstrip(".")
    labels = host.split(".")
    if len(host) > 253 or len(labels) < 2:
        raise ValueError(f"{value!r} is not a fully qualified host name (e.g. portal.example.org)")
    for i, label in enumerate(labels):
        if not _HOST_LABEL.match(label) or (label == "*" and i != 0):
            raise ValueError(f"{value!r} is not a valid host name: bad label {label!r}")
    return host.lower()


def check_cidr(value: str) -> str:
    """An IPv4/IPv6 address or network, normalized (`10.0.0.5/24` keeps its host part)."""
    try:
        if "/" in value:
            return str(ipaddress.ip_interface(value))
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address or CIDR (e.g. 10.0.0.5/24)") from None


def check_port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise ValueError(f"port {value} is outside 1-65535")
    return value


def parse_kv(value: str) -> dict[str, str]:
    """`name=eth0,bridge=vmbr0` -> dict. A bare first item (rootfs volume) becomes `volume`."""
    out: dict[str, str] = {}
    for i, part in enumerate(p for p in value.split(",") if p):
        if "=" in part:
            k, v = part.split("=", 1)
            out[k.strip()] = v.strip()
        elif i == 0:
            out["volume"] = part.strip()
    return out


def ipset_entry(value: str) -> str:
    """Proxmox stores a single address in an IP set without its /32 (or /128)."""
    if value.endswith("/32") and ":" not in value:
        return value[:-3]
    if value.endswith("/128") and ":" in value:
        return value[:-4]
    return value
