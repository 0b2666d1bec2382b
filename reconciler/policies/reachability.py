"""Who can reach a guest: a pure evaluator of Proxmox firewall rule chains.

The isolation and agent-port rules (`reconciler.policies.reach`) ask "which source addresses
does this guest's inbound chain let in, for this traffic?", of the firewall the spec writes and
of the firewall observed live on Proxmox. So this module knows nothing about spec models or API
payloads: `reconciler.policies.inbound` turns either into these neutral values first.

    PVE strings --compile_rule / resolve_addresses / parse_ports--> Rule, GroupRef
    [Rule | GroupRef] --expand_groups--> [Rule] --admissions(policy, Traffic)--> [Admission]

An `Admission` says: this rule (or the default policy) admits these source networks, after
everything earlier in the chain has decided. Address sets are lists of `ip_network`, with `ANY`
for "no source restriction"; port sets are tuples of inclusive ranges, with `ALL` for "no port
restriction". Nothing here does I/O, and nothing raises on a half-valid chain: names that do not
resolve are returned as unknown for the caller to report, and rules whose reach is not known
exactly are trusted to let traffic in but never to stop it.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Generic, TypeVar

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
PortRange = tuple[int, int]


class AnyAddress(enum.Enum):
    """A rule with no source: every address, of both families."""

    ANY = "any"


class AllPorts(enum.Enum):
    """A rule with neither dport nor macro: every port."""

    ALL = "all"


ANY = AnyAddress.ANY
ALL = AllPorts.ALL

Addresses = list[Network] | AnyAddress
Ports = tuple[PortRange, ...] | AllPorts

EVERYWHERE: tuple[Network, ...] = (
    ipaddress.IPv4Network("0.0.0.0/0"),
    ipaddress.IPv6Network("::/0"),
)

OriginT = TypeVar("OriginT")


# --- ports -----------------------------------------------------------------------------------

# The few /etc/services names people write in a dport. Proxmox reads the host's /etc/services;
# a name missing here makes the dport unreadable, which callers treat as "any port".
SERVICES: Mapping[str, int] = {
    "ftp": 21,
    "ssh": 22,
    "telnet": 23,
    "smtp": 25,
    "domain": 53,
    "http": 80,
    "pop3": 110,
    "ntp": 123,
    "imap": 143,
    "snmp": 161,
    "ldap": 389,
    "https": 443,
    "submissions": 465,
    "submission": 587,
    "ldaps": 636,
    "imaps": 993,
    "pop3s": 995,
    "mysql": 3306,
    "postgresql": 5432,
    "http-alt": 8080,
}


def parse_ports(text: str) -> tuple[PortRange, ...]:
    """A PVE dport ("22", "80,443", "18000:19000", "ssh") -> sorted, merged inclusive ranges.

    Raises ValueError for anything Proxmox would not read as a port list.
    """
    ranges: list[PortRange] = []
    for raw in text.split(","):
        part = raw.strip()
        if not part:
            raise ValueError(f"empty entry in port list {text!r}")
        lo_text, sep, hi_text = part.partition(":")
        lo = _port(lo_text, text)
        hi = _port(hi_text, text) if sep else lo
        if hi < lo:
            raise ValueError(f"port range {part!r} ends before it starts")
        ranges.append((lo, hi))
    return _merge_ranges(ranges)


def _port(text: str, whole: str) -> int:
    text = text.strip()
    if text.isdigit():
        value = int(text)
        if 0 <= value <= 65535:
            return value
        raise ValueError(f"port {value} in {whole!r} is outside 0-65535")
    if text.lower() in SERVICES:
        return SERVICES[text.lower()]
    raise ValueError(f"{text!r} in {whole!r} is neither a port number nor a known service name")


def _merge_ranges(ranges: Iterable[PortRange]) -> tuple[PortRange, ...]:
    merged: list[PortRange] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
        else:
            merged.append((lo, hi))
    return tuple(merged)


def ports_contain(ports: Ports, port: int) -> bool:
    if ports is ALL:
        return True
    return any(lo <= port <= hi for lo, hi in ports)


def ports_within(inner: Ports, outer: Ports) -> bool:
    """Every port of `inner` is in `outer`."""
    if outer is ALL:
        return True
    if inner is ALL:
        return False
    return all(any(olo <= lo and hi <= ohi for olo, ohi in outer) for lo, hi in inner)


def format_ports(ports: Ports) -> str:
    """Ports for messages: "every port", "port 22", "ports 80,443", "ports 18000:19000"."""
    if ports is ALL:
        return "every port"
    text = ",".join(str(lo) if lo == hi else f"{lo}:{hi}" for lo, hi in ports)
    return f"port {text}" if len(ports) == 1 and ports[0][0] == ports[0][1] else f"ports {text}"


# --- addresses -------------------------------------------------------------------------------


@dataclass(frozen=True)
class AddressBook:
    """The names a rule's source may use: aliases (name -> CIDR) and IP sets (name -> entries).

    Names are looked up as written, with a `dc/` scope prefix dropped, then case-insensitively
    (Proxmox keeps alias and IP set names case-insensitive).
    """

    aliases: Mapping[str, str]
    ipsets: Mapping[str, Sequence[str]]

    def alias(self, name: str) -> str | None:
        return _lookup(self.aliases, name)

    def ipset(self, name: str) -> Sequence[str] | None:
        return _lookup(self.ipsets, name)


V = TypeVar("V")


def _lookup(table: Mapping[str, V], name: str) -> V | None:
    name = name.removeprefix("dc/")
    if name in table:
        return table[name]
    lowered = name.lower()
    for key, value in table.items():
        if key.lower() == lowered:
            return value
    return None


@dataclass(frozen=True)
class Resolved:
    """A source or dest string resolved: its addresses, and the names nobody defines."""

    addresses: Addresses
    unknown: tuple[str, ...] = ()


def resolve_addresses(text: str | None, book: AddressBook) -> Resolved:
    """A PVE address spec -> networks. Empty means ANY.

    Accepts what Proxmox accepts in `source`/`dest`: an IP or CIDR, a range `a-b`, a comma list
    of those, an alias name, or `+ipset`; either name may carry the `dc/` scope. An unknown name
    contributes no address and is listed in `unknown`.
    """
    if text is None or not text.strip():
        return Resolved(ANY)
    networks: list[Network] = []
    unknown: list[str] = []
    for raw in text.split(","):
        part = raw.strip()
        if not part:
            continue
        if part.startswith("+"):
            entries = book.ipset(part[1:])
            if entries is None:
                unknown.append(part)
                continue
            found, missing = _ipset_networks(entries, book)
            networks.extend(found)
            unknown.extend(missing)
            continue
        literal = parse_address(part)
        if literal is not None:
            networks.extend(literal)
            continue
        cidr = book.alias(part)
        target = parse_address(cidr) if cidr is not None else None
        if target is None:
            unknown.append(part)
        else:
            networks.extend(target)
    return Resolved(collapse(networks), tuple(unknown))


def parse_address(text: str) -> list[Network] | None:
    """An IP, a CIDR (host bits allowed, as Proxmox does) or a range `a-b`; None if not one."""
    text = text.strip()
    try:
        return [ipaddress.ip_network(text, strict=False)]
    except ValueError:
        pass
    first, sep, last = text.partition("-")
    if not sep:
        return None
    try:
        lo = ipaddress.ip_address(first.strip())
        hi = ipaddress.ip_address(last.strip())
    except ValueError:
        return None
    if isinstance(lo, ipaddress.IPv4Address) and isinstance(hi, ipaddress.IPv4Address):
        return list(ipaddress.summarize_address_range(lo, hi)) if lo <= hi else None
    if isinstance(lo, ipaddress.IPv6Address) and isinstance(hi, ipaddress.IPv6Address):
        return list(ipaddress.summarize_address_range(lo, hi)) if lo <= hi else None
    return None


def _ipset_networks(entries: Sequence[str], book: AddressBook) -> tuple[list[Network], list[str]]:
    # An IP set entry may be an address, a network, an alias, or `!entry` for "nomatch": ipset
    # matches the most specific entry, so a nomatch entry carves its addresses out of the set.
    included: list[Network] = []
    excluded: list[Network] = []
    unknown: list[str] = []
    for raw in entries:
        entry = raw.strip()
        nomatch = entry.startswith("!")
        entry = entry.removeprefix("!").strip()
        found = parse_address(entry)
        if found is None:
            cidr = book.alias(entry)
            found = parse_address(cidr) if cidr is not None else None
        if found is None:
            unknown.append(entry)
        else:
            (excluded if nomatch else included).extend(found)
    return subtract(included, excluded), unknown


def collapse(networks: Iterable[Network]) -> list[Network]:
    """The smallest list of networks covering exactly the same addresses (IPv4 first)."""
    v4: list[ipaddress.IPv4Network] = []
    v6: list[ipaddress.IPv6Network] = []
    for net in networks:
        if isinstance(net, ipaddress.IPv4Network):
            v4.append(net)
        else:
            v6.append(net)
    out: list[Network] = [*ipaddress.collapse_addresses(v4)]
    out.extend(ipaddress.collapse_addresses(v6))
    return out


def networks_of(addresses: Addresses) -> list[Network]:
    return list(EVERYWHERE) if addresses is ANY else list(addresses)


def _inside(small: Network, big: Network) -> bool:
    if isinstance(small, ipaddress.IPv4Network) and isinstance(big, ipaddress.IPv4Network):
        return small.subnet_of(big)
    if isinstance(small, ipaddress.IPv6Network) and isinstance(big, ipaddress.IPv6Network):
        return small.subnet_of(big)
    return False


def _exclude(big: Network, small: Network) -> list[Network]:
    # Only called when `small` is inside `big`, so both are of one family.
    if isinstance(big, ipaddress.IPv4Network) and isinstance(small, ipaddress.IPv4Network):
        return list(big.address_exclude(small))
    if isinstance(big, ipaddress.IPv6Network) and isinstance(small, ipaddress.IPv6Network):
        return list(big.address_exclude(small))
    return [big]


def intersect(a: Addresses, b: Addresses) -> list[Network]:
    """Addresses in both. Two CIDR blocks either nest or are disjoint, which keeps this exact."""
    out: list[Network] = []
    for x in networks_of(a):
        for y in networks_of(b):
            if _inside(x, y):
                out.append(x)
            elif _inside(y, x):
                out.append(y)
    return collapse(out)


def subtract(a: Addresses, b: Addresses) -> list[Network]:
    """Addresses in `a` but not in `b`."""
    current = networks_of(a)
    for y in networks_of(b):
        kept: list[Network] = []
        for x in current:
            if _inside(x, y):
                continue
            kept.extend(_exclude(x, y) if _inside(y, x) else [x])
        current = kept
    return collapse(current)


def within(inner: Addresses, outer: Addresses) -> bool:
    """Every address of `inner` is in `outer`."""
    return not subtract(inner, outer)


def contains(addresses: Addresses, address: Address) -> bool:
    if addresses is ANY:
        return True
    return any(address in net for net in addresses)


def is_everywhere(addresses: Addresses) -> bool:
    return within(list(EVERYWHERE), addresses)


def format_addresses(addresses: Addresses, *, limit: int = 3) -> str:
    """For messages: "10.10.0.0/24", "any address", "any IPv4 address except 10.10.0.11"."""
    if addresses is ANY or is_everywhere(addresses):
        return "any address"
    if len(addresses) > limit:
        # Everything but a few hosts splits into dozens of CIDR blocks; name the few instead,
        # within the IP versions the addresses cover ("any IPv4 address except 10.10.0.11").
        versions = {n.version for n in addresses}
        space = [n for n in EVERYWHERE if n.version in versions]
        missing = subtract(space, addresses)
        if len(missing) <= limit:
            what = "any address" if len(space) == 2 else f"any IPv{space[0].version} address"
            return f"{what} except " + _list_networks(missing, limit)
    return _list_networks(addresses, limit)


def _list_networks(networks: Sequence[Network], limit: int) -> str:
    shown = [str(n.network_address) if n.num_addresses == 1 else str(n) for n in networks[:limit]]
    more = len(networks) - limit
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


# --- rules and chains ------------------------------------------------------------------------

# Macros as Proxmox expands them (pve-firewall `$pve_fw_macros`, imported from shorewall): each
# entry is (proto, dport or None). The rule's own source, dest and iface fill in the rest.
MACROS: Mapping[str, tuple[tuple[str, str | None], ...]] = {
    "DNS": (("udp", "53"), ("tcp", "53")),
    "FTP": (("tcp", "21"),),
    "Git": (("tcp", "9418"),),
    "HTTP": (("tcp", "80"),),
    "HTTPS": (("tcp", "443"),),
    "IMAP": (("tcp", "143"),),
    "IMAPS": (("tcp", "993"),),
    "LDAP": (("tcp", "389"),),
    "LDAPS": (("tcp", "636"),),
    "Mail": (("tcp", "25"), ("tcp", "465"), ("tcp", "587")),
    "MySQL": (("tcp", "3306"),),
    "NTP": (("udp", "123"),),
    "OpenVPN": (("udp", "1194"),),
    "Ping": (("icmp", "echo-request"),),
    "PostgreSQL": (("tcp", "5432"),),
    "RDP": (("tcp", "3389"),),
    "Rsync": (("tcp", "873"),),
    "SMTP": (("tcp", "25"),),
    "SMTPS": (("tcp", "465"),),
    "SNMP": (("udp", "161:162"), ("tcp", "161")),
    "SSH": (("tcp", "22"),),
    "Squid": (("tcp", "3128"),),
    "Submission": (("tcp", "587"),),
    "Syslog": (("udp", "514"), ("tcp", "514")),
    "Telnet": (("tcp", "23"),),
    "TFTP": (("udp", "69"),),
    "VNC": (("tcp", "5900:5999"),),
    "Web": (("tcp", "80"), ("tcp", "443")),
    "Webcache": (("tcp", "8080"),),
}

_PROTO_NUMBERS = {"6": "tcp", "17": "udp", "1": "icmp", "58": "ipv6-icmp"}
_PORT_PROTOS = ("tcp", "udp", "udplite", "sctp", "dccp")
STOPPING = ("DROP", "REJECT")


def normalize_proto(proto: str | None) -> str | None:
    if proto is None or not proto.strip():
        return None
    p = proto.strip().lower()
    return _PROTO_NUMBERS.get(p, p)


@dataclass(frozen=True, kw_only=True)
class Rule(Generic[OriginT]):
    """One resolved firewall rule.

    `origin` is whatever the adapter needs to point back at the rule (a spec path, an API
    position). `certain` is False when the rule's reach is not known exactly (an iface, dest or
    sport restriction, an unreadable dport, an unknown macro): such a rule may let traffic in,
    but is never trusted to stop it. `group` and `via` are set by `expand_groups`: the security
    group the rule came from and the origin of the reference that pulled it in.
    """

    origin: OriginT
    action: str
    direction: str = "in"
    source: Addresses = ANY
    proto: str | None = None
    ports: Ports = ALL
    enabled: bool = True
    certain: bool = True
    group: str | None = None
    via: OriginT | None = None


@dataclass(frozen=True, kw_only=True)
class GroupRef(Generic[OriginT]):
    """A `type: group` entry: the named security group's rules, in place, at this position."""

    origin: OriginT
    name: str
    enabled: bool = True


@dataclass(frozen=True)
class Compiled(Generic[OriginT]):
    rules: tuple[Rule[OriginT], ...]
    unknown: tuple[str, ...] = ()


def compile_rule(
    origin: OriginT,
    *,
    direction: str,
    action: str,
    book: AddressBook,
    source: str | None = None,
    dest: str | None = None,
    proto: str | None = None,
    dport: str | None = None,
    sport: str | None = None,
    macro: str | None = None,
    iface: str | None = None,
    enabled: bool = True,
) -> Compiled[OriginT]:
    """One PVE rule, as written in a spec or returned by the API, -> resolved `Rule`s.

    A macro expands into one rule per protocol/port pair, as Proxmox does; a macro entry without
    a dport takes the rule's own.
    """
    resolved = resolve_addresses(source, book)
    # iface, dest and sport narrow what a rule catches; we do not model them exactly, so such a
    # rule counts as letting traffic in (the safe reading for an ACCEPT) but never as stopping it.
    narrowed = bool(iface or (dest and dest.strip()) or (sport and sport.strip()))
    if macro:
        entries = _macro(macro)
        if entries is None:
            parts: list[tuple[str | None, str | None, bool]] = [(proto, dport, False)]
        else:
            parts = [(p, d if d is not None else dport, True) for p, d in entries]
    else:
        parts = [(proto, dport, True)]
    rules: list[Rule[OriginT]] = []
    for part_proto, part_dport, known in parts:
        p = normalize_proto(part_proto)
        ports: Ports = ALL
        certain = known and not narrowed
        if part_dport and part_dport.strip():
            if p is None or p in _PORT_PROTOS:
                try:
                    ports = parse_ports(part_dport)
                except ValueError:
                    certain = False
            else:
                # icmp and friends have no ports; Proxmox reads dport as an icmp type there,
                # which narrows the rule in a way we do not model.
                certain = False
        rules.append(
            Rule(
                origin=origin,
                action=action.strip().upper(),
                direction=direction.strip().lower(),
                source=resolved.addresses,
                proto=p,
                ports=ports,
                enabled=enabled,
                certain=certain,
            )
        )
    return Compiled(tuple(rules), resolved.unknown)


def _macro(name: str) -> tuple[tuple[str, str | None], ...] | None:
    return _lookup(MACROS, name)


def expand_groups(
    entries: Sequence[Rule[OriginT] | GroupRef[OriginT]],
    groups: Mapping[str, Sequence[Rule[OriginT]]],
) -> list[Rule[OriginT]]:
    """Replace each enabled group reference by its group's rules, in order. Proxmox does not
    nest groups, and an unknown group contributes nothing (the structural checks report it)."""
    out: list[Rule[OriginT]] = []
    for entry in entries:
        if isinstance(entry, Rule):
            out.append(entry)
        elif entry.enabled:
            members = _lookup(groups, entry.name) or ()
            out.extend(replace(rule, group=entry.name, via=entry.origin) for rule in members)
    return out


@dataclass(frozen=True)
class Traffic:
    """What is asked about: None means "any" (any protocol, any port)."""

    proto: str | None = None
    port: int | None = None


@dataclass(frozen=True)
class Admission(Generic[OriginT]):
    """Sources a rule admits for some traffic, after every earlier rule has had its say.

    `rule` is None for the chain's default policy. `from_any` is True when the rule itself has
    no source restriction, so sources whose address is unknown (DHCP) are admitted too.
    """

    rule: Rule[OriginT] | None
    addresses: list[Network]
    from_any: bool


def _may_match(rule: Rule[OriginT], traffic: Traffic) -> bool:
    if rule.proto is not None and traffic.proto is not None and rule.proto != traffic.proto:
        return False
    return traffic.port is None or ports_contain(rule.ports, traffic.port)


def _catches_all(rule: Rule[OriginT], traffic: Traffic) -> bool:
    """The rule matches every packet of `traffic` from its sources (so it decides them)."""
    if not rule.certain:
        return False
    if rule.proto is not None and rule.proto != traffic.proto:
        return False
    if rule.ports is ALL:
        return True
    return traffic.port is not None and ports_contain(rule.ports, traffic.port)


def admissions(
    chain: Sequence[Rule[OriginT]], policy: str, traffic: Traffic | None = None
) -> list[Admission[OriginT]]:
    """Walk an inbound chain in order and say which sources each ACCEPT (and the policy) admits.

    Addresses a rule fully decides (DROP/REJECT, or an ACCEPT catching all of the traffic) are
    taken out of what later rules can see, so an ACCEPT behind a blanket DROP admits nothing.
    """
    traffic = traffic or Traffic()
    undecided: list[Network] = list(EVERYWHERE)
    out: list[Admission[OriginT]] = []
    for rule in chain:
        if not rule.enabled or rule.direction != "in" or not undecided:
            continue
        if not _may_match(rule, traffic):
            continue
        if rule.action == "ACCEPT":
            hit = intersect(undecided, rule.source)
            if hit:
                out.append(Admission(rule, hit, rule.source is ANY))
        elif rule.action not in STOPPING:
            continue  # not an action Proxmox knows for in/out rules: it decides nothing
        if _catches_all(rule, traffic):
            undecided = subtract(undecided, rule.source)
    if policy.strip().upper() == "ACCEPT" and undecided:
        out.append(Admission(None, undecided, True))
    return out
