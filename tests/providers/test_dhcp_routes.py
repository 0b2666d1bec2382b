"""A Traefik route to a DHCP VM, end to end: fakepve's QEMU guest agent answers
`network-get-interfaces`, the Proxmox provider reads it into the VM's observed `addresses`, and
the planner writes the route to the file feed at that address; withheld while the agent lists
none, moved when the address changes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import yaml

from reconciler.applying.converging import Convergence, converge
from reconciler.loading.graph import build_graph
from reconciler.loading.loader import load_texts
from reconciler.model.plans import Action
from reconciler.providers.proxmox import ProxmoxProvider
from reconciler.providers.traefik import FileFeedPath, TraefikProvider, TraefikRoutes
from tests.fakepve_fixtures import TEMPLATE
from tests.guest_helpers import CORE_RANGE, plan_now, platform_yaml
from tests.providers.vm_provisioning import make_template, with_clones

PLATFORM = platform_yaml("build: {first: 500, last: 599, layer: runtime}", CORE_RANGE, control=True)
GUESTS = f"""
guests:
  traefik-core:
    role: core
    host: pve-core
    template: local:vztmpl/{TEMPLATE}
    network:
      - {{bridge: vmbr0, ip: 10.10.0.20/24, gw: 10.10.0.1}}
  web-vm:
    kind: qemu
    role: build
    host: pve-runtime
    disk: {{size: 16G}}
    clone: {{from: 9000}}
    agent: true
    network:
      - {{bridge: vmbr0}}
    cloud_init: {{user: ops}}
traefik:
  core:
    guest: traefik-core
    routes_to: [runtime]
    feed: {{type: file, path: /etc/traefik/dynamic/core.yml}}
    routes:
      ide: {{host: ide.example.org, target: {{guest: web-vm, port: 8080}}}}
"""
LOOPBACK = {
    "name": "lo",
    "hardware-address": "00:00:00:00:00:00",
    "ip-addresses": [{"ip-address": "127.0.0.1", "ip-address-type": "ipv4", "prefix": 8}],
}


def leased(ip: str) -> list[dict[str, Any]]:
    """`network-get-interfaces` of a guest whose eth0 got `ip` from DHCP."""
    return [
        LOOPBACK,
        {
            "name": "eth0",
            "hardware-address": "bc:24:11:00:00:05",
            "ip-addresses": [
                {"ip-address": "fe80::be24:11ff:fe00:5", "ip-address-type": "ipv6", "prefix": 64},
                {"ip-address": ip, "ip-address-type": "ipv4", "prefix": 24},
            ],
        },
    ]


def served(path: Path) -> dict[str, Any]:
    """The file feed's services, as Traefik reads them."""
    if not path.exists():
        return {}
    return dict((yaml.safe_load(path.read_text()) or {}).get("http", {}).get("services", {}))


def test_a_route_to_a_dhcp_vm_follows_its_agents_address(
    provider: ProxmoxProvider, pve: Any, tmp_path: Path
) -> None:
    make_template(provider.client)
    loaded = load_texts({"platform.yaml": PLATFORM, "guests.yaml": GUESTS})
    assert loaded.ok and loaded.spec is not None, [str(d) for d in loaded.diagnostics]
    spec, graph = loaded.spec, build_graph(loaded.spec, loaded.source)
    feed = tmp_path / "core.yml"
    providers: list[Any] = [
        with_clones(provider, spec),
        TraefikRoutes({"core": TraefikProvider("core", FileFeedPath(feed))}),
    ]

    def converge_now() -> Convergence:
        conv = anyio.run(lambda: converge(graph, providers))
        report = conv.rounds[-1].report
        assert conv.ok, report and [(r.change.address, r.error) for r in report.results]
        return conv

    # The guest's image boots its agent, but DHCP has handed out nothing yet.
    pve.agent_answers[500] = {"interfaces": [LOOPBACK]}
    first = converge_now().rounds[0].plan
    said = {d.address: d.message for d in first.diagnostics if d.code == "withheld"}
    assert "is not created yet" in said["route/core/ide"]
    assert "route/core/ide" not in {c.address for c in first.changes}
    assert "rc-ide" not in served(feed)  # never pointed at the host name `web-vm`

    plan = plan_now(graph, providers)
    said = {d.address: d.message for d in plan.diagnostics if d.code == "withheld"}
    assert "reports none yet" in said["route/core/ide"]
    assert not plan.has_changes

    # The lease arrives: the route is written at the agent's address.
    vm = pve.vm(500)
    vm.agent["interfaces"] = leased("10.0.20.77")
    plan = plan_now(graph, providers)
    (create,) = plan.actions
    assert (create.address, create.action) == ("route/core/ide", Action.CREATE)
    converge_now()
    assert served(feed)["rc-ide"] == {
        "loadBalancer": {"servers": [{"url": "http://10.0.20.77:8080"}]}
    }
    assert not plan_now(graph, providers).has_changes

    # A new lease moves the route.
    vm.agent["interfaces"] = leased("10.0.20.91")
    (update,) = plan_now(graph, providers).actions
    assert update.action is Action.UPDATE
    assert [(f.path, f.after) for f in update.fields] == [("server", "http://10.0.20.91:8080")]
    converge_now()
    assert served(feed)["rc-ide"]["loadBalancer"]["servers"] == [{"url": "http://10.0.20.91:8080"}]

    # Stopped by hand, the guest has no address: the route is withdrawn, not left pointing at an
    # address another guest may lease.
    provider.client.nodes("pve-runtime").qemu(500).status.stop.post()
    plan = plan_now(graph, providers)
    withdraw = next(c for c in plan.actions if c.address == "route/core/ide")
    assert withdraw.action is Action.DELETE and not withdraw.blocked
    assert "it is not running" in withdraw.reason
