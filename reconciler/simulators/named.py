"""A real BIND `named` (Debian's bind9) on loopback, for the demo's lab (`reconciler.demo.lab`)
and the DNS provider's tests (`tests/dns_fixtures.py`). Not a simulator: it lives here because
both start it the same way, as `processes` starts Traefik and Redis.

`start_named` writes a named.conf, a zone file per zone and the TSIG keys into a directory,
starts `named -g -c named.conf` on a free loopback port (UDP and TCP), and waits until the first
zone's SOA answers. Two kinds of key: the controller's (`rc-key` unless the caller names its
own, as the demo names the spec's), which may transfer (AXFR) and update every zone; and
`hand-key`, an operator's, which may update but not transfer (hand changes are made with it:
`NamedServer.hand_update`). Each key's secret is made fresh for each server.

A missing `named` raises NamedMissing (a PartMissing) naming the package.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import dns.exception
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype
import dns.tsig
import dns.tsigkeyring
import dns.update

from reconciler.simulators.processes import PartMissing, free_port

__all__ = [
    "ALGORITHM",
    "CONTROLLER_KEY",
    "HAND_KEY",
    "SEED",
    "NamedMissing",
    "NamedServer",
    "named_conf",
    "named_exe",
    "start_named",
    "zone_file",
]

CONTROLLER_KEY = "rc-key"
HAND_KEY = "hand-key"
ALGORITHM = "hmac-sha256"
# What every zone starts with besides its SOA and NS, unless told otherwise: records made "by
# hand" before the controller ever ran (never ours).
SEED = ("www IN A 192.0.2.80", "@ IN MX 10 mail", "mail IN A 192.0.2.25")


class NamedMissing(PartMissing):
    """BIND's named is not installed."""


def named_exe() -> str:
    """`named` on PATH, or where Debian puts it (/usr/sbin is not on every user's PATH)."""
    found = shutil.which("named") or shutil.which("named", path="/usr/sbin:/sbin")
    if found is None:
        raise NamedMissing("BIND's named is not installed: apt-get install bind9")
    return found


def _secret() -> str:
    return base64.b64encode(os.urandom(32)).decode()


@dataclass
class NamedServer:
    port: int
    zones: tuple[str, ...]
    secrets: dict[str, str]  # key name -> base64 secret
    proc: subprocess.Popen[bytes]
    workdir: Path
    log: Path
    algorithms: dict[str, str]  # key name -> its algorithm

    @property
    def server(self) -> str:
        return f"127.0.0.1:{self.port}"

    def keyring(self, key: str = CONTROLLER_KEY) -> dict[dns.name.Name, dns.tsig.Key]:
        algorithm = self.algorithms.get(key, ALGORITHM)
        ring: dict[dns.name.Name, dns.tsig.Key] = dns.tsigkeyring.from_text(
            {key: (algorithm, self.secrets[key])}
        )
        return ring

    def hand_update(self, zone: str, *edits: tuple[str, ...]) -> None:
        """An operator's change with `hand-key`: each edit ("add", name, ttl, type, value...),
        ("replace", name, ttl, type, value...) or ("delete", name[, type]). Raises unless the
        server says NOERROR."""
        keyring = self.keyring(HAND_KEY)
        update = dns.update.UpdateMessage(
            zone, keyring=keyring, keyname=dns.name.from_text(HAND_KEY), keyalgorithm=ALGORITHM
        )
        for op, name, *rest in edits:
            if op == "delete":
                update.delete(name, *rest)
            else:
                ttl, rtype, *values = rest
                getattr(update, op)(name, int(ttl), rtype, *values)
        answer = dns.query.tcp(update, "127.0.0.1", port=self.port, timeout=5)
        if answer.rcode() != dns.rcode.NOERROR:
            raise AssertionError(f"hand update refused: {dns.rcode.to_text(answer.rcode())}")

    def lookup(self, name: str, rtype: str) -> list[str]:
        """The values the server answers for name/type (sorted), [] for none."""
        query = dns.message.make_query(name, rtype)
        answer = dns.query.tcp(query, "127.0.0.1", port=self.port, timeout=5)
        wanted = dns.rdatatype.from_text(rtype)
        return sorted(
            rd.to_text() for rrset in answer.answer if rrset.rdtype == wanted for rd in rrset
        )

    def ttl(self, name: str, rtype: str) -> int | None:
        query = dns.message.make_query(name, rtype)
        answer = dns.query.tcp(query, "127.0.0.1", port=self.port, timeout=5)
        for rrset in answer.answer:
            if rrset.rdtype == dns.rdatatype.from_text(rtype):
                return int(rrset.ttl)
        return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def zone_file(zone: str, seed: Sequence[str]) -> str:
    """A zone's master file: SOA, NS at the apex (ns1 at 127.0.0.1), then `seed`'s lines."""
    return "\n".join(
        [
            "$TTL 300",
            f"$ORIGIN {zone}.",
            f"@ IN SOA ns1.{zone}. hostmaster.{zone}. 1 3600 600 86400 300",
            f"@ IN NS ns1.{zone}.",
            "ns1 IN A 127.0.0.1",
            *seed,
            "",
        ]
    )


def named_conf(
    workdir: Path,
    port: int,
    zones: Sequence[str],
    secrets: Mapping[str, str],
    algorithms: Mapping[str, str],
    controllers: Sequence[str] = (CONTROLLER_KEY,),
) -> str:
    """named.conf: every key; each zone a primary that `controllers` may transfer and update,
    and `hand-key` update only; listening on loopback `port` alone, no recursion."""
    keys = "".join(
        f'key "{name}" {{ algorithm {algorithms.get(name, ALGORITHM)}; secret "{secret}"; }};\n'
        for name, secret in secrets.items()
    )
    transfer = " ".join(f"key {k};" for k in controllers)
    grants = " ".join(f"grant {k} zonesub ANY;" for k in (*controllers, HAND_KEY))
    zone_blocks = "".join(
        f'zone "{zone}" {{\n'
        f'  type primary; file "{workdir / (zone + ".zone")}";\n'
        f"  allow-transfer {{ {transfer} }};\n"
        "  update-policy {\n"
        f"    {grants}\n"
        "  };\n"
        "};\n"
        for zone in zones
    )
    return (
        "options {\n"
        f'  directory "{workdir}";\n'
        f'  pid-file "{workdir / "named.pid"}";\n'
        f'  session-keyfile "{workdir / "session.key"}";\n'
        f'  managed-keys-directory "{workdir}";\n'
        f"  listen-on port {port} {{ 127.0.0.1; }};\n"
        "  listen-on-v6 { none; };\n"
        "  recursion no;\n"
        "  dnssec-validation no;\n"
        "  notify no;\n"
        "  allow-transfer { none; };\n"
        "};\n"
        "controls { };\n" + keys + zone_blocks
    )


def _answers(port: int, zone: str) -> bool:
    try:
        answer = dns.query.udp(
            dns.message.make_query(zone, "SOA"), "127.0.0.1", port=port, timeout=0.5
        )
    except (OSError, dns.exception.DNSException):
        return False
    return answer.rcode() == dns.rcode.NOERROR and bool(answer.answer)


def start_named(
    workdir: Path,
    zones: Sequence[str],
    *,
    seed: Sequence[str] = SEED,
    keys: Mapping[str, str] | None = None,
) -> NamedServer:
    """named serving `zones` (each seeded with `seed`) on a free loopback port, answering.
    `keys`: the controller's keys, name -> algorithm (default `rc-key`, hmac-sha256), each
    with a fresh secret (`NamedServer.secrets`). RuntimeError with named's log when it does
    not start serving."""
    exe = named_exe()
    workdir.mkdir(parents=True, exist_ok=True)
    algorithms = dict(keys or {CONTROLLER_KEY: ALGORITHM})
    controllers = tuple(algorithms)
    algorithms.setdefault(HAND_KEY, ALGORITHM)
    secrets = {name: _secret() for name in algorithms}
    for zone in zones:
        (workdir / f"{zone}.zone").write_text(zone_file(zone, seed))
    last = ""
    for attempt in range(3):  # another process may take the free port between probe and bind
        port = free_port()
        conf = workdir / "named.conf"
        conf.touch(mode=0o600)  # it holds the keys' secrets: its owner's only
        conf.chmod(0o600)
        conf.write_text(named_conf(workdir, port, zones, secrets, algorithms, controllers))
        log = workdir / f"named-{attempt}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [exe, "-g", "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT
            )
        server = NamedServer(port, tuple(zones), secrets, proc, workdir, log, algorithms)
        deadline = time.monotonic() + 30
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                if _answers(port, zones[0]):
                    return server
                time.sleep(0.02)
        except BaseException:  # Ctrl-C while it starts: no named left behind
            server.stop()
            raise
        server.stop()
        last = log.read_text(errors="replace")[-2000:]
    hint = ""
    if "permission denied" in last.lower():
        # Debian's AppArmor profile for /usr/sbin/named confines it to /etc/bind and
        # /var/cache/bind, where a kernel enforces AppArmor.
        hint = " (AppArmor? `aa-complain /usr/sbin/named` lets it read these files)"
    raise RuntimeError(f"named did not start serving {zones[0]}{hint}:\n{last}")
