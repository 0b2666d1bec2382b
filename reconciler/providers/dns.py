"""DNS records: observe and apply `dns/<name>/<TYPE>` record sets on each zone's primary server
by zone transfer (AXFR) and dynamic update (RFC 2136), both over TCP and signed with the zone's
TSIG key (RFC 8945), through dnspython. BIND, Knot, PowerDNS and Technitium all speak both.

Called like every provider (`reconciler.providers.Provider`); registered by
`applying.connecting.connect_platform` when the spec has a `dns` section (`dns_provider`).
dnspython's calls block, so each runs in a worker thread; the secrets are read when a zone is
first used, never logged, and never part of a message or a repr.

Observe: one AXFR per zone, the zones at once. Every record set is observed but the zone's own
machinery (its SOA, the NS at its apex, DNSSEC's records) and the ownership records themselves.

Ownership, after external-dns's TXT registry: every record set the controller writes has a
companion TXT record set one label below its name, `_rc-<type>.<name>`
(`_rc-a.survival.play.zpack.dev`), whose text is `heritage=reconciler,platform=<platform>,
address=<address>`. A label of its own, not a TXT at the record's name, because a CNAME stands
alone at its name (RFC 1034 3.6.2: no TXT can sit beside it), because a TXT there would join the
TXT set resolvers hand out for that name (SPF, site verifications, a TXT the spec itself lists),
and because one companion per type lets the A and the TXT of one name be owned apart: what
external-dns's "new format" registry moved to (`a-<name>`) for the same reasons. The leading
underscore (RFC 8552's attribute leaves) is no host's name, and `_rc-a.<zone>` stays inside the
zone for the apex too, where a prefix on the first label could not.

A record set is ours when its companion holds exactly our mark, naming its own address. One
without a companion, or whose companion names another platform or another address (a copied
mark), is foreign: observed with `owned` false, never changed or deleted. A companion of ours
whose record set is gone (deleted by hand) is observed as ours with no values, so the plan
writes the records back, or deletes the companion once the spec no longer wants them.

Apply: one update message per change, which the server applies whole or not at all, with
prerequisites (RFC 2136 2.4) so that a change made by hand since the observation is never
overwritten blindly:
- create: the record set does not exist (nor a CNAME at its name; for a CNAME, nothing at its
  name); then its companion (replacing a stale one) and its records are added;
- update: the record set is exactly what was observed (the change's `version`: its records as
  the server sent them) and its companion is our mark; then the set is replaced whole;
- delete: the same prerequisites; then the record set and its companion are deleted.
A failed prerequisite is a ConflictError: the caller observes and plans again.

Time: each exchange waits `timeout` (10 s) for the server, a transfer at most six times that
in all; a zone's observation, its tries and backoffs included, at most `deadline` (30 s),
after which it is a TemporaryError and the zone's records are left out of the plan. Each try's
waits end by the deadline too, so no worker thread outlives it (a process waits for its
threads). The plan of everything else waits for the slowest provider, so a DNS server that
accepts and never answers (a firewall's black hole, a server stuck mid-transfer) costs a cycle
30 s, never minutes. An update is not cut short: once sent, it is waited for (its own
timeout), so its outcome is known.

Errors (reconciler.model.errors), as `classify` hands them out:

    ProviderError
    ├── TemporaryError      a timeout, a connection refused or reset, a name that does not
    │                       resolve, SERVFAIL: retried with backoff, `RetryPolicy.attempts`
    │                       tries in all, sleeping on the injected `sleep`
    └── PermanentError      the TSIG key unknown (BADKEY) or its secret wrong (BADSIG, or an
        │                   answer whose signature does not verify), a transfer or update
        │                   refused (REFUSED: the server's allow-transfer / update-policy), a
        │                   server not authoritative for the zone (NOTAUTH), a secret that
        │                   cannot be read, an update without the observed version
        └── ConflictError   a prerequisite failed (YXRRSET, NXRRSET, YXDOMAIN, NXDOMAIN): the
                            record set changed since it was observed; re-observe and re-plan
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread
import dns.exception
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.tsig
import dns.tsigkeyring
import dns.update
import dns.xfr
import dns.zone

from reconciler.model.errors import (
    ConfigurationError,
    ConflictError,
    PermanentError,
    ProviderError,
    TemporaryError,
)
from reconciler.model.observed import ObservedResource
from reconciler.model.plans import Action, Change, refuse_blocked
from reconciler.model.resources import Kind, dns_address
from reconciler.model.spec import (
    DNS_MARK_HERITAGE,
    DNS_MARK_PREFIX,
    PlatformSpec,
    SecretRef,
    dns_value,
    split_dns_server,
)
from reconciler.providers import Observation
from reconciler.providers.backoff import backoff
from reconciler.providers.secrets import read_secret

Sleep = Callable[[float], Awaitable[None]]
ReadSecret = Callable[[SecretRef], str]

# A zone's own machinery, never a record anyone declares: not observed at all.
_MACHINERY = frozenset(
    {"SOA", "RRSIG", "NSEC", "NSEC3", "NSEC3PARAM", "DNSKEY", "CDS", "CDNSKEY", "TYPE65534"}
)
# Prerequisite failures: what the server holds is not what the update was planned against.
_CONFLICTS = {dns.rcode.YXRRSET, dns.rcode.NXRRSET, dns.rcode.YXDOMAIN, dns.rcode.NXDOMAIN}
_TXT_CHUNK = 255  # bytes in one TXT string


# --- ownership marks ---------------------------------------------------------------------------


def mark_name(name: str, rtype: str) -> str:
    """`_rc-a.survival.play.zpack.dev`: where the companion of the A records at a name is."""
    return f"{DNS_MARK_PREFIX}{rtype.lower()}.{name}"


def mark_text(platform: str, address: str) -> str:
    return f"{DNS_MARK_HERITAGE},platform={platform},address={address}"


def _marked(label: str) -> str | None:
    """The record type a companion's first label stands for (`_rc-aaaa` -> AAAA), or None."""
    if not label.startswith(DNS_MARK_PREFIX):
        return None
    rtype = label.removeprefix(DNS_MARK_PREFIX).upper()
    return rtype if rtype and rtype.isalnum() else None


# --- reading a zone ----------------------------------------------------------------------------


def _text(name: dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True).lower()


def _txt_string(rdata: Any) -> str:
    return b"".join(rdata.strings).decode("utf-8", errors="replace")


def value_of(rtype: str, rdata: Any) -> str:
    """One record's value in the spec's spelling (`model.spec.dns_value`); a type the spec does
    not list, or a value it could not hold, as the server writes it."""
    try:
        if rtype in ("A", "AAAA"):
            return dns_value(rtype, str(rdata.address))
        if rtype == "CNAME":
            return dns_value(rtype, _text(rdata.target))
        if rtype == "SRV":
            target = "." if rdata.target == dns.name.root else _text(rdata.target)
            return dns_value(rtype, f"{rdata.priority} {rdata.weight} {rdata.port} {target}")
        if rtype == "TXT":
            return _txt_string(rdata)
    except ValueError:
        pass
    return str(rdata.to_text())


def records_of(zone: str, transferred: dns.zone.Zone, platform: str) -> list[ObservedResource]:
    """A transferred zone's record sets, each ours or foreign by its companion (see the module
    docstring), sorted by name and type. `transferred` holds absolute names (relativize off)."""
    sets: dict[tuple[str, str], dns.rdataset.Rdataset] = {}
    marks: dict[tuple[str, str], str] = {}
    for owner, node in transferred.nodes.items():
        name = _text(owner)
        for rdataset in node.rdatasets:
            rtype = dns.rdatatype.to_text(rdataset.rdtype)
            if rtype in _MACHINERY or (rtype == "NS" and name == zone):
                continue
            label, _, rest = name.partition(".")
            marked = _marked(label)
            if marked is not None and rtype == "TXT" and rest:
                # A companion: registry data, never a record of its own. Its text is its
                # strings joined; more than one TXT record there is no mark of ours.
                texts = [_txt_string(rd) for rd in rdataset]
                marks[(rest, marked)] = texts[0] if len(texts) == 1 else ""
                continue
            sets[(name, rtype)] = rdataset
    out: list[ObservedResource] = []
    for (name, rtype), rdataset in sorted(sets.items()):
        address = dns_address(name, rtype)
        ours = marks.get((name, rtype)) == mark_text(platform, address)
        out.append(
            _observed(
                zone,
                name,
                rtype,
                ours,
                [value_of(rtype, rd) for rd in rdataset],
                int(rdataset.ttl),
                sorted(str(rd.to_text()) for rd in rdataset),
            )
        )
    for (name, rtype), text in sorted(marks.items()):
        address = dns_address(name, rtype)
        if (name, rtype) not in sets and text == mark_text(platform, address):
            out.append(_observed(zone, name, rtype, True, [], None, []))
    return sorted(out, key=lambda r: (r.attributes["name"], r.attributes["type"]))


def _observed(
    zone: str,
    name: str,
    rtype: str,
    ours: bool,
    values: list[str],
    ttl: int | None,
    raw: list[str],
) -> ObservedResource:
    return ObservedResource(
        address=dns_address(name, rtype) if ours else None,
        kind=Kind.DNS,
        owned=ours,
        id={"zone": zone, "name": name, "type": rtype},
        attributes={
            "zone": zone,
            "name": name,
            "type": rtype,
            "values": sorted(set(values)),
            "ttl": ttl,
        },
        # The records exactly as the server sent them: an update's prerequisite.
        version=json.dumps(raw),
    )


# --- writing records ---------------------------------------------------------------------------


def _absolute(name: str) -> dns.name.Name:
    return dns.name.from_text(name)  # relative to the root: absolute


def _txt(text: str) -> dns.rdata.Rdata:
    data = text.encode()
    chunks = [data[i : i + _TXT_CHUNK] for i in range(0, len(data), _TXT_CHUNK)] or [b""]
    return dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, dns.rdatatype.TXT, chunks)


def rdatas(rtype: str, values: Iterable[str]) -> list[dns.rdata.Rdata]:
    """Records of one type from values in the spec's spelling."""
    out: list[dns.rdata.Rdata] = []
    for value in values:
        if rtype == "TXT":
            out.append(_txt(value))
            continue
        text = value
        if rtype == "CNAME":
            text = value + "."
        elif rtype == "SRV":
            head, _, target = value.rpartition(" ")
            text = f"{head} {target if target == '.' else target + '.'}"
        out.append(dns.rdata.from_text(dns.rdataclass.IN, rtype, text))
    return out


# --- errors ------------------------------------------------------------------------------------


def _os_reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return os.strerror(exc.errno).lower()
    return type(exc).__name__


def classify(exc: BaseException, what: str, zone: ZoneAccess) -> ProviderError:
    """Any dnspython or socket exception as ours, naming what was done, the server and the key
    (never its secret)."""
    if isinstance(exc, ProviderError):
        return exc
    where = f"{what} on {zone.server}"
    key, path = zone.key_name, f"dns.zones.{zone.zone}.provider.tsig"
    if isinstance(exc, dns.tsig.PeerBadKey):
        return PermanentError(
            f"{where}: the server does not know the TSIG key {key!r} (BADKEY): add it to the "
            f"server, or fix {path}.name"
        )
    if isinstance(exc, dns.tsig.PeerBadSignature | dns.tsig.BadSignature):
        return PermanentError(
            f"{where}: the TSIG signature of key {key!r} does not verify (BADSIG): {path}.secret "
            "is not the server's secret for this key"
        )
    if isinstance(exc, dns.tsig.PeerBadTime | dns.tsig.BadTime):
        return PermanentError(
            f"{where}: the server refused the TSIG time (BADTIME): this machine's clock and the "
            "server's differ by more than five minutes"
        )
    if isinstance(exc, dns.tsig.PeerError):
        return PermanentError(f"{where}: the server refused the TSIG key {key!r} ({exc})")
    if isinstance(exc, dns.xfr.TransferError):
        return _refusal(exc.rcode, where, zone)
    if isinstance(exc, dns.exception.Timeout | TimeoutError):
        return TemporaryError(f"{where}: the server did not answer in time")
    if isinstance(exc, socket.gaierror):
        return TemporaryError(f"{where}: cannot resolve the server's name ({exc.strerror})")
    if isinstance(exc, EOFError | ConnectionError | OSError):
        return TemporaryError(f"{where}: cannot reach the server ({_os_reason(exc)})")
    if isinstance(exc, ConfigurationError):
        return PermanentError(f"{where}: {exc}")
    return PermanentError(f"{where}: {type(exc).__name__}: {exc}")


def _refusal(rcode: dns.rcode.Rcode, where: str, zone: ZoneAccess) -> ProviderError:
    """An answer's error code as ours."""
    name = dns.rcode.to_text(rcode)
    if rcode in _CONFLICTS:
        return ConflictError(
            f"{where}: the record set changed since it was observed (prerequisite failed: "
            f"{name}); it was left as it is: observe and plan again"
        )
    if rcode == dns.rcode.REFUSED:
        return PermanentError(
            f"{where}: refused (REFUSED): the server does not let TSIG key {zone.key_name!r} do "
            f"this in zone {zone.zone} (BIND: allow-transfer {{ key {zone.key_name}; }} and "
            "update-policy)"
        )
    if rcode == dns.rcode.NOTAUTH:
        return PermanentError(
            f"{where}: the server is not authoritative for zone {zone.zone}, or did not accept "
            f"TSIG key {zone.key_name!r} (NOTAUTH)"
        )
    if rcode == dns.rcode.SERVFAIL:
        return TemporaryError(f"{where}: the server failed (SERVFAIL)")
    return PermanentError(f"{where}: the server answered {name}")


# --- the provider ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ZoneAccess:
    """How one zone is reached: its primary and its TSIG key (the secret by reference)."""

    zone: str
    host: str
    port: int
    key_name: str
    algorithm: str
    secret: SecretRef

    @property
    def server(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass
class RetryPolicy:
    attempts: int = 4  # tries of one transfer or update that meets temporary errors
    initial: float = 0.2  # backoff: a random delay up to initial * 2**n, capped at maximum
    maximum: float = 5.0


class DnsProvider:
    """Record sets in the spec's zones, each on its own primary with its own key."""

    kinds = frozenset({Kind.DNS})
    needs = frozenset[Kind]()
    streams = frozenset[Kind]()
    optional = True  # a DNS server down costs the records only: the rest converges

    def __init__(
        self,
        platform: str,
        zones: Mapping[str, ZoneAccess],
        *,
        secrets: ReadSecret = read_secret,
        timeout: float = 10.0,
        deadline: float = 30.0,
        retry: RetryPolicy | None = None,
        sleep: Sleep = anyio.sleep,
    ) -> None:
        self.platform = platform
        self.zones = dict(zones)
        self._secrets = secrets
        self.timeout = timeout
        self.deadline = deadline  # one zone's observation, its tries included
        self.retry = retry or RetryPolicy()
        self.sleep = sleep
        self.calls = 0  # transfers and updates sent
        self.retries = 0  # of them repeated after a temporary error

    def __repr__(self) -> str:
        return f"DnsProvider(zones={sorted(self.zones)!r}, timeout={self.timeout})"

    # --- one exchange --------------------------------------------------------------------

    def _keyring(self, zone: ZoneAccess) -> dict[dns.name.Name, dns.tsig.Key]:
        try:
            secret = self._secrets(zone.secret)
        except ConfigurationError as exc:
            raise PermanentError(f"dns.zones.{zone.zone}.provider.tsig.secret: {exc}") from None
        try:
            ring: dict[dns.name.Name, dns.tsig.Key] = dns.tsigkeyring.from_text(
                {zone.key_name: (zone.algorithm, secret)}
            )
        except Exception:  # the secret itself is not base64: never repeat it
            raise PermanentError(
                f"dns.zones.{zone.zone}.provider.tsig.secret: not a TSIG secret (base64, as "
                "tsig-keygen prints it)"
            ) from None
        return ring

    def _where(self, zone: ZoneAccess) -> str:
        """The server's address: dnspython takes addresses only."""
        info = socket.getaddrinfo(zone.host, zone.port, type=socket.SOCK_STREAM)
        return str(info[0][4][0])

    def _transfer(self, zone: ZoneAccess, until: float | None = None) -> dns.zone.Zone:
        """The zone by AXFR. `until` (time.monotonic): the observation's deadline, which this
        try's waits end by, so that no thread outlives it (a process waits for its threads)."""
        left = self.timeout * 6 if until is None else max(0.1, until - time.monotonic())
        keyring = self._keyring(zone)
        query = dns.message.make_query(zone.zone + ".", dns.rdatatype.AXFR)
        query.use_tsig(keyring, keyname=zone.key_name, algorithm=zone.algorithm)
        transferred = dns.zone.Zone(zone.zone + ".", relativize=False)
        dns.query.inbound_xfr(
            self._where(zone),
            transferred,
            query,
            port=zone.port,
            timeout=min(self.timeout, left),
            lifetime=min(self.timeout * 6, left),
        )
        return transferred

    def _send(self, zone: ZoneAccess, update: dns.update.UpdateMessage, what: str) -> None:
        answer = dns.query.tcp(update, self._where(zone), timeout=self.timeout, port=zone.port)
        if answer.rcode() != dns.rcode.NOERROR:
            raise _refusal(answer.rcode(), f"{what} on {zone.server}", zone)

    async def _run(
        self, zone: ZoneAccess, what: str, call: Callable[[], Any], *, abandon: bool = False
    ) -> Any:
        """`call` in a worker thread under the retry policy, its errors as ours. `abandon`: a
        read that a cancelled caller stops waiting for (the thread ends at its own timeout)."""
        tries = 0
        while True:
            self.calls += 1
            try:
                return await anyio.to_thread.run_sync(call, abandon_on_cancel=abandon)
            except Exception as exc:
                error = classify(exc, what, zone)
            if not isinstance(error, TemporaryError):
                raise error
            tries += 1
            if tries >= self.retry.attempts:
                raise error
            self.retries += 1
            await self.sleep(backoff(tries, initial=self.retry.initial, maximum=self.retry.maximum))

    # --- observe -------------------------------------------------------------------------

    async def observe(self, seen: Observation | None = None) -> list[ObservedResource]:
        found: dict[str, list[ObservedResource]] = {}
        failed: dict[str, ProviderError] = {}

        async def one(zone: ZoneAccess) -> None:
            what = f"transfer (AXFR) of zone {zone.zone}"
            until = time.monotonic() + self.deadline
            try:
                with anyio.fail_after(self.deadline):
                    transferred = await self._run(
                        zone, what, lambda: self._transfer(zone, until), abandon=True
                    )
            except TimeoutError:
                failed[zone.zone] = TemporaryError(
                    f"{what} from {zone.server}: no answer within {self.deadline:g} s "
                    "(its tries included)"
                )
                return
            except ProviderError as exc:
                failed[zone.zone] = exc
                return
            found[zone.zone] = records_of(zone.zone, transferred, self.platform)

        async with anyio.create_task_group() as tg:
            for name in sorted(self.zones):
                tg.start_soon(one, self.zones[name])
        if failed:
            first = failed[min(failed)]
            message = "; ".join(str(failed[z]) for z in sorted(failed))
            raise type(first)(message)
        return [r for name in sorted(found) for r in found[name]]

    # --- apply ---------------------------------------------------------------------------

    async def apply(self, change: Change) -> None:
        if change.kind is not Kind.DNS:
            raise PermanentError(f"{change.address}: no provider for kind {change.kind.value}")
        if change.action is Action.NOOP:
            return
        refuse_blocked(change)
        attrs = change.after or change.before or {}
        zone = self.zones.get(str(attrs.get("zone") or change.id.get("zone")))
        if zone is None:
            raise PermanentError(
                f"{change.address}: zone {attrs.get('zone')!r} is not in the spec's dns.zones"
            )
        update = self._update(zone, change)
        what = f"{change.action.value} {change.address}"
        try:
            await self._run(zone, what, lambda: self._send(zone, update, what))
        except ConflictError as exc:
            if change.action is not Action.CREATE:
                raise
            attrs = change.after or {}
            mark = mark_name(str(attrs["name"]), str(attrs["type"]))
            raise ConflictError(
                f"{what}: the name is taken since it was observed, or a TXT record at {mark} "
                "that is not this platform's mark claims it (another platform's or "
                f"external-dns's registry, or one made by hand): left as it is ({exc})"
            ) from None

    def _update(self, zone: ZoneAccess, change: Change) -> dns.update.UpdateMessage:
        """The one update message that makes `change`, prerequisites first."""
        attrs = change.after or change.before or {}
        name, rtype = str(attrs["name"]), str(attrs["type"])
        owner, mark = _absolute(name), _absolute(mark_name(name, rtype))
        update = dns.update.UpdateMessage(
            _absolute(zone.zone),
            keyring=self._keyring(zone),
            keyname=dns.name.from_text(zone.key_name),
            keyalgorithm=zone.algorithm,
        )
        ours = _txt(mark_text(self.platform, change.address))
        if change.action is Action.CREATE:
            assert change.after is not None
            ttl = int(change.after["ttl"])
            if rtype == "CNAME":
                update.absent(owner)  # a CNAME stands alone: nothing may be at its name
            else:
                update.absent(owner, rtype)
                update.absent(owner, "CNAME")
            # Nothing at the companion's name either: a TXT there that is not our mark is
            # another owner's claim (a stale one of ours is observed, and planned as an update).
            update.absent(mark, "TXT")
            update.add(mark, ttl, ours)
            update.add(owner, ttl, *rdatas(rtype, change.after["values"]))
            return update
        # An update or a delete: only of the record set exactly as observed, still ours.
        if change.version is None:
            raise PermanentError(f"{change.address}: no observed version: re-plan")
        seen = [
            dns.rdata.from_text(dns.rdataclass.IN, rtype, t) for t in json.loads(change.version)
        ]
        if seen:
            update.present(owner, *seen)
        else:
            update.absent(owner, rtype)
        update.present(mark, ours)
        update.delete(owner, rtype)
        if change.action is Action.DELETE:
            update.delete(mark, "TXT")
        else:
            assert change.after is not None
            update.add(owner, int(change.after["ttl"]), *rdatas(rtype, change.after["values"]))
        return update


def dns_provider(
    spec: PlatformSpec, *, servers: Mapping[str, str] | None = None, **options: Any
) -> DnsProvider:
    """The provider of the spec's zones (none without `dns`). `servers` (zone -> host:port)
    overrides where zones' primaries are (a lab, the demo); `options` go to the provider
    (secrets, timeout, retry, sleep)."""
    zones: dict[str, ZoneAccess] = {}
    for name, zone in sorted((spec.dns.zones if spec.dns is not None else {}).items()):
        host, port = split_dns_server((servers or {}).get(name, zone.provider.server))
        key = zone.provider.tsig
        zones[name] = ZoneAccess(name, host, port, key.name, key.algorithm, key.secret)
    return DnsProvider(spec.platform.name, zones, **options)
