"""The DNS record sets a spec wants, one per name and type: derived from its guests and its edge,
and listed. Read by `loading.graph` (one `dns/<name>/<TYPE>` resource each: `dns_resources`)
and by `loading.checks` (`check_dns`: records outside their zone, duplicates, bad values, a
CNAME beside other data), so both see the same records from the same place.

Derived records (README "DNS records"):
- an internal zone (`kind: internal`) gets an A record (AAAA for an IPv6 address) per guest
  with a static address, `<guest>.<zone>`, pointing at that address;
- a public zone (`kind: public`) gets one per route host (an HTTP route's `host`, a TCP
  route's `sni` but `*`) and Velocity forced host that falls in it, pointing at the zone's
  `edge_address` (A for its IPv4 addresses, AAAA for its IPv6 ones).

A name belongs to the most specific zone declared (the longest suffix): `x.eu.play.zpack.dev`
goes to `eu.play.zpack.dev` when both it and `play.zpack.dev` are declared, and is derived only
if that zone derives its kind of record. Values are in `model.spec.dns_value`'s spelling, sorted
and without repeats: the spelling the provider reads a zone's records into.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

from reconciler.loading.sources import PathT, Source, spec_error, written_at
from reconciler.model.diagnostics import Diagnostic
from reconciler.model.resources import Kind, Resource, dns_address, guest_address
from reconciler.model.spec import (
    DNS_MARK_HERITAGE,
    DNS_MARK_PREFIX,
    DNS_NAME_MAX,
    DnsZone,
    HttpRoute,
    PlatformSpec,
    dns_value,
)

# Errors at a spec value's key, as these checks name it.
_err = partial(spec_error, key=True)


@dataclass(frozen=True)
class WantedRecord:
    """One record set the spec asks for, and where it comes from."""

    zone: str
    name: str
    type: str
    values: tuple[str, ...]
    ttl: int
    path: PathT  # where it is written: the record, or what it is derived from
    origin: str  # for people: "record 2 of zone play.zpack.dev", "guest 'mc-lobby'"
    depends_on: tuple[str, ...] = ()
    listed: bool = False  # written in a zone's `records` (not derived)


def zone_of(spec: PlatformSpec, name: str) -> str | None:
    """The most specific declared zone `name` is in (the zone itself counts), or None."""
    zones = spec.dns.zones if spec.dns is not None else {}
    found = [z for z in zones if name == z or name.endswith("." + z)]
    return max(found, key=len) if found else None


def _canonical(rtype: str, values: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(sorted({dns_value(rtype, v) for v in values}))


def _by_family(addresses: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """Addresses as record sets: IPv4 ones as A, IPv6 ones as AAAA."""
    out: dict[str, list[str]] = {}
    for text in addresses:
        rtype = "A" if ipaddress.ip_address(text).version == 4 else "AAAA"
        out.setdefault(rtype, []).append(text)
    return {t: _canonical(t, tuple(v)) for t, v in out.items()}


def derived_records(spec: PlatformSpec) -> Iterator[WantedRecord]:
    """The records guests and the edge imply, each once per source (a name two sources imply,
    say a route host that is also a forced host, comes twice: `merged` joins them)."""
    if spec.dns is None:
        return
    zones = spec.dns.zones
    for zname, zone in sorted(zones.items()):
        if zone.kind != "internal":
            continue
        for gname, guest in sorted(spec.guests.items()):
            ip = next((n.ip.split("/")[0] for n in guest.network if "/" in n.ip), None)
            name = f"{gname}.{zname}"
            if ip is None or zone_of(spec, name) != zname:
                continue
            for rtype, values in _by_family((ip,)).items():
                yield WantedRecord(
                    zname,
                    name,
                    rtype,
                    values,
                    zone.ttl,
                    ("guests", gname),
                    f"guest {gname!r}",
                    (guest_address(gname),),
                )
    for host, path, origin, dependency in _edge_hosts(spec):
        home = zone_of(spec, host)
        edge = zones[home] if home is not None else None
        if home is None or edge is None or edge.kind != "public":
            continue
        for rtype, values in _by_family(edge.edge_address).items():
            yield WantedRecord(home, host, rtype, values, edge.ttl, path, origin, (dependency,))


def _edge_hosts(spec: PlatformSpec) -> Iterator[tuple[str, PathT, str, str]]:
    """(host, where written, what it is, its resource's address) for every name players or
    browsers reach the edge by: route hosts and SNI names, Velocity forced hosts."""
    for iname, inst in sorted(spec.traefik.items()):
        for rname, route in sorted(inst.routes.items()):
            if isinstance(route, HttpRoute):
                field, names = "host", route.host
            else:
                field, names = "sni", route.sni
            for i, host in enumerate(names):
                if host != "*":
                    path: PathT = ("traefik", iname, "routes", rname, field, i)
                    yield host, path, f"route {iname}/{rname}", f"route/{iname}/{rname}"
    if spec.velocity is not None:
        for sname, server in sorted(spec.velocity.servers.items()):
            if server.forced_host:
                path = ("velocity", "servers", sname, "forced_host")
                yield server.forced_host, path, f"Velocity server {sname!r}", f"velocity/{sname}"


def listed_records(spec: PlatformSpec) -> Iterator[tuple[WantedRecord, DnsZone]]:
    """The records the zones list, as written (values not checked: `loading.checks` does)."""
    if spec.dns is None:
        return
    for zname, zone in sorted(spec.dns.zones.items()):
        for i, record in enumerate(zone.records):
            yield (
                WantedRecord(
                    zname,
                    record.name,
                    record.type,
                    record.value,
                    record.ttl if record.ttl is not None else zone.ttl,
                    ("dns", "zones", zname, "records", i),
                    f"record {i + 1} of zone {zname}",
                    listed=True,
                ),
                zone,
            )


def merged(spec: PlatformSpec) -> list[WantedRecord]:
    """Every record set the spec wants, one per (name, type), sorted: derived ones of one name
    and type joined (their values and dependencies), listed ones with canonical values. For a
    spec that passed the checks (no listed record clashes with another or a derived one)."""
    out: dict[tuple[str, str], WantedRecord] = {}
    for record in derived_records(spec):
        key = (record.name, record.type)
        seen = out.get(key)
        if seen is not None:
            record = WantedRecord(
                seen.zone,
                seen.name,
                seen.type,
                tuple(sorted(set(seen.values) | set(record.values))),
                seen.ttl,
                seen.path,
                seen.origin,
                tuple(dict.fromkeys((*seen.depends_on, *record.depends_on))),
            )
        out[key] = record
    for record, _ in listed_records(spec):
        values = _canonical(record.type, record.values)
        out.setdefault((record.name, record.type), _with_values(record, values))
    return [out[k] for k in sorted(out)]


def _with_values(record: WantedRecord, values: tuple[str, ...]) -> WantedRecord:
    return WantedRecord(
        record.zone,
        record.name,
        record.type,
        values,
        record.ttl,
        record.path,
        record.origin,
        record.depends_on,
        record.listed,
    )


def dns_resources(spec: PlatformSpec, source: Source) -> Iterator[Resource]:
    """One `dns/<name>/<TYPE>` resource per record set, after what it names (its guest, or
    the route or Velocity server its host comes from). Attributes in the shape the provider
    observes: zone, name, type, values, ttl."""
    for record in merged(spec):
        yield Resource(
            dns_address(record.name, record.type),
            Kind.DNS,
            {
                "zone": record.zone,
                "name": record.name,
                "type": record.type,
                "values": list(record.values),
                "ttl": record.ttl,
            },
            depends_on=record.depends_on,
            position=source.where(record.path),
        )


# --- checks ------------------------------------------------------------------------------------


def check_dns(spec: PlatformSpec, source: Source) -> Iterator[Diagnostic]:
    """Every listed record lies in its zone (and not in a more specific declared one), has
    values its type takes, is listed once and is not also derived; a CNAME stands alone at its
    name; no name is too long for its ownership record or takes the ownership records' label;
    no TXT reads as the controller's ownership mark."""
    if spec.dns is None:
        return
    derived: dict[tuple[str, str], WantedRecord] = {}
    for record in derived_records(spec):
        derived.setdefault((record.name, record.type), record)
        if len(record.name) > DNS_NAME_MAX:
            yield _err(source, "invalid-value", _too_long(record.name), record.path)
    listed: dict[tuple[str, str], WantedRecord] = {}
    for record, _ in listed_records(spec):
        yield from _check_listed(spec, source, record)
        key = (record.name, record.type)
        first = listed.get(key) or derived.get(key)
        if first is not None:
            what = "listed" if first.listed else "derived"
            yield _err(
                source,
                "duplicate-dns-record",
                f"{record.name} {record.type} is already {what} as {first.origin}"
                f"{written_at(source, first.path)}: a name holds one record set per type; list its "
                "values in one record",
                (*record.path, "name"),
                related=first.path,
            )
        else:
            listed[key] = record
    yield from _cname_alone(source, listed, derived)


def _too_long(name: str) -> str:
    return (
        f"{name} is longer than {DNS_NAME_MAX} characters: its ownership record "
        f"({DNS_MARK_PREFIX}<type>.{name}) would pass DNS's 253"
    )


def _check_listed(spec: PlatformSpec, source: Source, record: WantedRecord) -> Iterator[Diagnostic]:
    at = record.path
    zone = record.zone
    if record.name != zone and not record.name.endswith("." + zone):
        yield _err(
            source,
            "dns-outside-zone",
            f"{record.name} is outside zone {zone}: a zone's records are its name or names "
            f"under it (write names in full, e.g. www.{zone})",
            (*at, "name"),
        )
    elif (inner := zone_of(spec, record.name)) != zone and inner is not None:
        yield _err(
            source,
            "dns-outside-zone",
            f"{record.name} is in zone {inner}"
            f"{written_at(source, ('dns', 'zones', inner))}, which is "
            f"declared too and is more specific than {zone}: list the record there",
            (*at, "name"),
            related=("dns", "zones", inner),
        )
    if len(record.name) > DNS_NAME_MAX:
        yield _err(source, "invalid-value", _too_long(record.name), (*at, "name"))
    if record.name.split(".")[0].startswith(DNS_MARK_PREFIX):
        yield _err(
            source,
            "dns-reserved-name",
            f"{record.name}: names whose first label starts with {DNS_MARK_PREFIX!r} hold the "
            "controller's ownership records; choose another name",
            (*at, "name"),
        )
    if record.type == "CNAME" and len(record.values) > 1:
        yield _err(
            source,
            "invalid-value",
            f"a CNAME has one target; {record.name} lists {len(record.values)}",
            (*at, "value"),
        )
    for j, value in enumerate(record.values):
        try:
            dns_value(record.type, value)
        except ValueError as exc:
            yield _err(source, "invalid-value", str(exc), (*at, "value", j))
            continue
        if record.type == "TXT" and DNS_MARK_HERITAGE in value:
            yield _err(
                source,
                "forged-mark",
                f"this TXT value holds {DNS_MARK_HERITAGE!r}, the controller's DNS ownership "
                "mark: only the controller writes its mark, and a copied one could make it claim "
                "records that are not its own. Reword it",
                (*at, "value", j),
            )


def _cname_alone(
    source: Source,
    listed: dict[tuple[str, str], WantedRecord],
    derived: dict[tuple[str, str], WantedRecord],
) -> Iterator[Diagnostic]:
    """A CNAME owns its name (RFC 1034 3.6.2): no other record beside it."""
    everything = {**derived, **listed}
    for (name, rtype), record in sorted(listed.items()):
        if rtype != "CNAME":
            continue
        others = [r for (n, t), r in sorted(everything.items()) if n == name and t != "CNAME"]
        for other in others:
            yield _err(
                source,
                "dns-cname-conflict",
                f"{name} is a CNAME, and {other.origin}{written_at(source, other.path)} puts its "
                f"{other.type} record at the same name: a CNAME stands alone at its name",
                (*record.path, "name"),
                related=other.path,
            )
