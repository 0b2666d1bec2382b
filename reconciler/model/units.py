"""Sizes and names as Proxmox spells them, parsed once so every layer compares like with like.

Memory and swap are MiB (Proxmox's unit for them); disk sizes are held in MiB too but a bare
number in a spec means GiB, as in Proxmox's `rootfs: local-lvm:8`.

The checkers for text the controller writes into someone else's syntax (a Traefik rule, a
Redis key, a Proxmox firewall config line) accept a closed set of characters, so no value can
end the place it is written into and start another: a host name, a URL path, a simple name, a
key path, a comment of one line. Called by the spec models (reconciler.model.spec).
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT])?(?:I?B)?\s*$", re.IGNORECASE)
# What `_SIZE` matches, as a JSON Schema pattern (ECMAScript has no flags, so the case is spelled
# out): the spelling an editor checks a size against (reconciler/loading/schema.py).
SIZE_PATTERN = r"^\s*\d+(\.\d+)?\s*[KMGTkmgt]?([Ii]?[Bb])?\s*$"
_FACTOR_MIB = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}

_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
_HOST_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z", re.IGNORECASE)
_IDENTIFIER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}\Z")
# RFC 3986 path characters less those a Traefik rule gives a meaning to: the unreserved ones,
# the sub-delims but & ' ( ), ':' '@' and '/'; '%' only as the start of a %XX escape.
_URL_PATH = re.compile(r"(?:[A-Za-z0-9._~!$*+,;=:@/-]|%[0-9A-Fa-f]{2})*")
_KEY_SEGMENT = re.compile(r"^[A-Za-z0-9._-]+\Z")


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


_DURATION = re.compile(r"^\s*(\d{1,6})\s*([smhdw])\s*\Z")
_FACTOR_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_seconds(value: object) -> int:
    """`90m`, `36h`, `2d`, `1w` -> seconds; a bare whole number is seconds."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError("expected a duration such as 36h, 2d or 1w")
    if isinstance(value, int):
        seconds = value
    else:
        m = _DURATION.match(value)
        if not m:
            raise ValueError(f"{value[:40]!r} is not a duration; write e.g. 90m, 36h, 2d or 1w")
        seconds = int(m.group(1)) * _FACTOR_SECONDS[m.group(2)]
    if seconds <= 0:
        raise ValueError("a duration must be longer than zero")
    return seconds


def format_seconds(seconds: float) -> str:
    """Seconds -> the largest whole unit that is exact or, past a day, days and hours (`36h`,
    `2d`, `1d 6h`): how ages and limits are shown."""
    whole = int(seconds)
    if whole >= 86400:
        days, rest = divmod(whole, 86400)
        return f"{days}d" + (f" {rest // 3600}h" if rest // 3600 else "")
    if whole >= 3600:
        hours, rest = divmod(whole, 3600)
        return f"{hours}h" + (f" {rest // 60}m" if rest // 60 else "")
    if whole >= 60:
        return f"{whole // 60}m"
    return f"{whole}s"


def check_label(value: str) -> str:
    """A DNS label: what Proxmox accepts as a guest hostname and we use as a resource name."""
    if not _LABEL.match(value):
        raise ValueError(
            f"{value!r} is not a valid name: use lowercase letters, digits and '-', "
            "starting and ending with a letter or digit, at most 63 characters"
        )
    return value


def check_hostname(value: str) -> str:
    """A fully qualified host name as routes and forced hosts use it (`portal.example.org`): DNS
    labels of letters, digits and '-'. No wildcard: Traefik v3 releases disagree on `*.` in Host
    (earlier ones compare it as text, the 3.7 binary the tests run matches one label), Velocity's
    forced hosts are exact, and a name standing for many claims hosts other routes and
    instances serve, which the duplicate-route check cannot see. Name each host."""
    host = value.rstrip(".")
    labels = host.split(".")
    if len(host) > 253 or len(labels) < 2:
        raise ValueError(f"{value!r} is not a fully qualified host name (e.g. portal.example.org)")
    for label in labels:
        if label == "*":
            raise ValueError(f"{value!r} is not a host name: no wildcards here, name each host")
        if not _HOST_LABEL.match(label):
            raise ValueError(f"{value!r} is not a valid host name: bad label {label!r}")
    return host.lower()


def check_sni(value: str) -> str:
    """A name for Traefik's HostSNI: a host name, or `*` alone (any name, or none)."""
    return value if value == "*" else check_hostname(value)


def check_url_path(value: str) -> str:
    """A URL path as a route's path prefix: '/' then path characters or %XX escapes. Nothing
    that could end a quoted value in a Traefik rule or join another matcher to it (a backtick,
    a quote, a parenthesis, whitespace, '|', '&', a backslash, a control character)."""
    if not value.startswith("/"):
        raise ValueError(f"{value!r} is not a URL path: it must start with '/'")
    end = _URL_PATH.match(value)
    if end is not None and end.end() < len(value):
        char = value[end.end()]
        if char == "%":
            raise ValueError(f"{value!r} is not a URL path: '%' starts a %XX escape (%2F)")
        raise ValueError(
            f"{value!r} is not a URL path: {char!r} is not allowed; use letters, digits, '/', "
            "- . _ ~ ! $ * + , ; = : @ and %XX escapes"
        )
    return value


def check_identifier(value: str) -> str:
    """A simple name another system keys by (a Traefik entrypoint or certificate resolver)."""
    if not _IDENTIFIER.match(value):
        raise ValueError(
            f"{value!r} is not a simple name: use letters, digits, '-' and '_', starting with "
            "a letter or digit, at most 63 characters"
        )
    return value


def check_key_path(value: str) -> str:
    """A key prefix such as a Traefik instance's Redis root key (`traefik`, `edge/traefik`):
    segments of letters, digits, '.', '_' and '-', joined by '/'. No glob characters, spaces or
    control characters, no empty, '.' or '..' segment."""
    segments = value.removesuffix("/").split("/")
    if not all(_KEY_SEGMENT.match(s) and s not in (".", "..") for s in segments):
        raise ValueError(
            f"{value!r} is not a key path: use segments of letters, digits, '.', '_' and '-' "
            "joined by '/'"
        )
    return value


def check_comment(value: str) -> str:
    """Free text kept on one line: no line break or other control character (Proxmox writes a
    firewall comment at the end of a config line; a newline there would start a new rule)."""
    for char in value:
        if unicodedata.category(char) in ("Cc", "Zl", "Zp"):
            raise ValueError(
                f"a comment is one line of text: {char!r} (a line break or control character) "
                "is not allowed"
            )
    return value


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
