"""A real BIND `named` (Debian's bind9) for the DNS provider's tests (a pytest plugin, loaded by
tests/conftest.py).

`start_named` writes a named.conf, a zone file per zone and the TSIG keys into a temporary
directory, starts `named -g -c named.conf` on a free loopback port (UDP and TCP), and waits
until the first zone's SOA answers. Two keys: `rc-key`, the controller's, which may transfer
(AXFR) and update every zone; `hand-key`, an operator's, which may update but not transfer
(the tests make hand changes with it, and try a transfer with it to see the refusal). Each
test gets its own server (`named`): a zone's state never leaks from one test into another.

A missing `named` fails the test, in CI (CI=true) as anywhere: the tests never skip a real part
(deploy/dev test installs bind9).
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype
import dns.tsigkeyring
import dns.update
import pytest

from reconciler.simulators.processes import free_port

__all__ = ["BASE", "NamedServer", "dns_section", "named", "start_named"]

CONTROLLER_KEY = "rc-key"
HAND_KEY = "hand-key"
ALGORITHM = "hmac-sha256"
# What every zone starts with besides its SOA and NS: records made "by hand" before the
# controller ever ran (never ours).
SEED = ("www IN A 192.0.2.80", "@ IN MX 10 mail", "mail IN A 192.0.2.25")


# A small platform of its own (not specs/, whose `dns` section may come to name the same
# zones): guests with and without a static address, routes in and out of the zones, a forced
# host. `dns_section` adds the zones.
TEMPLATE = "local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst"
BASE = f"""\
platform: {{name: zpack}}
layers:
  runtime: {{}}
  edge: {{may_depend_on: [runtime]}}
hosts:
  pve1: {{layers: [runtime, edge], capacity: {{cores: 16, memory: 64G}}}}
ranges:
  game: {{first: 1000, last: 1099, layer: runtime}}
  network: {{first: 300, last: 399, layer: edge}}
guests:
  mc-lobby: {{role: game, host: pve1, template: {TEMPLATE}, network: [{{ip: 10.20.0.10/24}}]}}
  mc-survival: {{role: game, host: pve1, template: {TEMPLATE}, network: [{{ip: 10.20.0.11/24}}]}}
  mc-dhcp: {{role: game, host: pve1, template: {TEMPLATE}, network: [{{ip: dhcp}}]}}
  mc-six: {{role: game, host: pve1, template: {TEMPLATE}, network: [{{ip: "2001:db8::16/64"}}]}}
  traefik: {{role: network, host: pve1, template: {TEMPLATE}, network: [{{ip: 10.30.0.20/24}}]}}
  velocity: {{role: network, host: pve1, template: {TEMPLATE}, network: [{{ip: 10.30.0.21/24}}]}}
traefik:
  runtime:
    guest: traefik
    routes_to: [runtime]
    feed: {{type: file, path: /tmp/traefik-runtime.yaml}}
    routes:
      map-survival:
        host: map.survival.play.test
        target: {{guest: mc-survival, port: 8100}}
      console:
        type: tcp
        sni: console.play.test
        tls: {{passthrough: true}}
        target: {{guest: mc-survival, port: 8443}}
      portal:
        host: portal.example.org
        target: {{guest: mc-lobby, port: 8080}}
velocity:
  guest: velocity
  bridge: {{secret: {{env: BRIDGE_SECRET}}}}
  servers:
    survival: {{guest: mc-survival, forced_host: survival.play.test}}
    lobby: {{guest: mc-lobby}}
"""


def dns_section(server: str = "127.0.0.1:53", records: str = "", edge: str = "203.0.113.10") -> str:
    """`dns:` with the zones `internal.test` (internal) and `play.test` (public, the edge at
    `edge`), both on `server` with the controller's key (its secret in $RC_TSIG_SECRET);
    `records`: YAML list items (indented 8) for play.test's `records`."""
    provider = (
        f"{{server: '{server}', tsig: {{name: {CONTROLLER_KEY}, secret: {{env: RC_TSIG_SECRET}}}}}}"
    )
    listed = f"      records:\n{records}" if records else ""
    return (
        "dns:\n"
        "  zones:\n"
        "    internal.test:\n"
        "      kind: internal\n"
        f"      provider: {provider}\n"
        "    play.test:\n"
        "      kind: public\n"
        f"      edge_address: {edge}\n"
        f"      provider: {provider}\n" + listed
    )


class NamedMissing(RuntimeError):
    pass


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
    _updates: int = field(default=0)

    @property
    def server(self) -> str:
        return f"127.0.0.1:{self.port}"

    def keyring(self, key: str = CONTROLLER_KEY) -> dict[dns.name.Name, dns.tsig.Key]:
        ring: dict[dns.name.Name, dns.tsig.Key] = dns.tsigkeyring.from_text(
            {key: (ALGORITHM, self.secrets[key])}
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


def _zone_file(zone: str, seed: Sequence[str]) -> str:
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


def _named_conf(workdir: Path, port: int, zones: Sequence[str], secrets: dict[str, str]) -> str:
    keys = "".join(
        f'key "{name}" {{ algorithm {ALGORITHM}; secret "{secret}"; }};\n'
        for name, secret in secrets.items()
    )
    zone_blocks = "".join(
        f'zone "{zone}" {{\n'
        f'  type primary; file "{workdir / (zone + ".zone")}";\n'
        f"  allow-transfer {{ key {CONTROLLER_KEY}; }};\n"
        "  update-policy {\n"
        f"    grant {CONTROLLER_KEY} zonesub ANY; grant {HAND_KEY} zonesub ANY;\n"
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


def start_named(workdir: Path, zones: Sequence[str], *, seed: Sequence[str] = SEED) -> NamedServer:
    """named serving `zones` (each seeded with `seed`) on a free loopback port, answering."""
    exe = named_exe()
    workdir.mkdir(parents=True, exist_ok=True)
    secrets = {CONTROLLER_KEY: _secret(), HAND_KEY: _secret()}
    for zone in zones:
        (workdir / f"{zone}.zone").write_text(_zone_file(zone, seed))
    last = ""
    for attempt in range(3):  # another process may take the free port between probe and bind
        port = free_port()
        conf = workdir / "named.conf"
        conf.write_text(_named_conf(workdir, port, zones, secrets))
        log = workdir / f"named-{attempt}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [exe, "-g", "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT
            )
        server = NamedServer(port, tuple(zones), secrets, proc, workdir, log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            if _answers(port, zones[0]):
                return server
            time.sleep(0.02)
        server.stop()
        last = log.read_text(errors="replace")[-2000:]
    hint = ""
    if "permission denied" in last.lower():
        # Debian's AppArmor profile for /usr/sbin/named confines it to /etc/bind and
        # /var/cache/bind, where a kernel enforces AppArmor.
        hint = " (AppArmor? `aa-complain /usr/sbin/named` lets it read the test's files)"
    raise RuntimeError(f"named did not start serving {zones[0]}{hint}:\n{last}")


@pytest.fixture
def named(tmp_path: Path) -> Iterator[NamedServer]:
    """A fresh named with two zones, `internal.test` and `play.test`."""
    try:
        server = start_named(tmp_path / "named", ["internal.test", "play.test"])
    except NamedMissing as exc:
        pytest.fail(f"{exc} (deploy/dev test installs it)")
    try:
        yield server
    finally:
        server.stop()
