"""A real BIND `named` for the DNS provider's tests (a pytest plugin, loaded by
tests/conftest.py): the `named` fixture, and a small platform of the tests' own (`BASE`,
`dns_section`). Starting named is `reconciler.simulators.named`'s (the demo's lab starts it the
same way); its names are re-exported here for the tests.

Two keys: `rc-key`, the controller's, which may transfer (AXFR) and update every zone;
`hand-key`, an operator's, which may update but not transfer (the tests make hand changes with
it, and try a transfer with it to see the refusal). Each test gets its own server (`named`): a
zone's state never leaks from one test into another.

A missing `named` fails the test, in CI (CI=true) as anywhere: the tests never skip a real part
(deploy/dev test installs bind9).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.simulators.named import (
    ALGORITHM,
    CONTROLLER_KEY,
    HAND_KEY,
    SEED,
    NamedMissing,
    NamedServer,
    named_exe,
    start_named,
)

__all__ = [
    "ALGORITHM",
    "BASE",
    "CONTROLLER_KEY",
    "HAND_KEY",
    "SEED",
    "NamedMissing",
    "NamedServer",
    "dns_section",
    "named",
    "named_exe",
    "start_named",
]


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
