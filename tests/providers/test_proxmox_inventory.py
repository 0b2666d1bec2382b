"""The inventory-only check: one API call tells whether anything moved since a full snapshot."""

from __future__ import annotations

from typing import Any

import anyio

from reconciler.applying.converging import converge
from reconciler.applying.observing import observe_all
from reconciler.model.resources import DesiredGraph
from reconciler.providers.proxmox import ProxmoxProvider
from reconciler.providers.proxmox_inventory import inventory_drift


def test_inventory_check_is_one_call_and_sees_drift(
    graph: DesiredGraph, provider: ProxmoxProvider, pve: Any
) -> None:
    assert anyio.run(lambda: converge(graph, [provider])).ok
    snapshot = anyio.run(lambda: observe_all([provider], "zpack"))
    pve.requests.clear()
    assert inventory_drift(snapshot, anyio.run(provider.inventory)) == []
    assert [p for _, p, _ in pve.requests] == ["/api2/json/cluster/resources"]

    node = provider.client.nodes("pve-runtime")
    node.lxc(1001).config.put(memory=1024)
    node.lxc(1002).status.stop.post()
    pve.add_ct(1090, name="intruder", node="pve-runtime")
    drift = inventory_drift(snapshot, anyio.run(provider.inventory))
    assert drift == [
        "vmid 1001: memory 4096 -> 1024",
        "vmid 1002: state 'running' -> 'stopped'",
        "vmid 1090: appeared",
    ]
