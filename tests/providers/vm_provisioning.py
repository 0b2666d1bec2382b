"""Helpers of the VM provisioning tests (clone, cloud-init, agent): a small platform with one
VM made by cloning a cloud-init template, the template as an operator makes one, and the
provider as `connect_platform` builds it for the spec."""

from __future__ import annotations

from typing import Any

import anyio

from reconciler.applying.connecting import wanted_clones
from reconciler.applying.converging import Convergence, converge
from reconciler.loading.graph import build_graph
from reconciler.loading.loader import load_texts
from reconciler.model.resources import DesiredGraph
from reconciler.model.spec import PlatformSpec
from reconciler.providers.proxmox import ProxmoxProvider, RetryPolicy
from tests.fakepve_fixtures import mutating_calls, no_sleep
from tests.guest_helpers import platform_yaml

PLATFORM = platform_yaml("build: {first: 500, last: 599, layer: runtime}")
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHc0eUcsVhmd1tWWbPvT7KmGRSnMlgQ0/b+vTjWlhG0Q ops@lab"
TEMPLATE_VMID = 9000
NODE = "pve-runtime"

GUESTS = f"""
guests:
  web-vm:
    kind: qemu
    role: build
    host: pve-runtime
    cores: 2
    memory: 2G
    disk: {{size: 16G}}
    clone: {{from: {TEMPLATE_VMID}}}
    agent: true
    network:
      - {{bridge: vmbr0, ip: 10.0.20.5/24, gw: 10.0.20.1}}
    cloud_init:
      user: ops
      ssh_keys: ["{KEY}"]
      nameserver: 10.0.0.53
"""


def load(guests: str = GUESTS, *edits: tuple[str, str]) -> tuple[PlatformSpec, DesiredGraph]:
    for old, new in edits:
        assert guests.count(old) == 1, old
        guests = guests.replace(old, new)
    loaded = load_texts({"platform.yaml": PLATFORM, "guests.yaml": guests})
    assert loaded.ok and loaded.spec is not None, [str(d) for d in loaded.diagnostics]
    return loaded.spec, build_graph(loaded.spec, loaded.source)


def make_template(client: Any, storage: str = "local-lvm", fmt: str | None = None) -> None:
    """A cloud-init template as an operator makes one: a VM with a disk, a cloud-init drive,
    a NIC, its own tags; then `template`."""
    upid = client.nodes(NODE).qemu.post(
        vmid=TEMPLATE_VMID,
        name="debian-12-ci",
        scsi0=f"{storage}:4" + (f",format={fmt}" if fmt else ""),
        ide2=f"{storage}:cloudinit",
        net0="virtio,bridge=vmbr0",
        scsihw="virtio-scsi-single",
        ostype="l26",
        boot="order=scsi0",
        tags="base;cloud",
        cores=1,
        memory=1024,
    )
    assert client.nodes(NODE).tasks(upid).status.get()["exitstatus"] == "OK"
    upid = client.nodes(NODE).qemu(TEMPLATE_VMID).template.post()
    assert client.nodes(NODE).tasks(upid).status.get()["exitstatus"] == "OK"


def with_clones(provider: ProxmoxProvider, spec: PlatformSpec, **kw: Any) -> ProxmoxProvider:
    """The provider as `connect_platform` builds it for this spec (`wanted_clones`)."""
    kw.setdefault("retry", RetryPolicy(initial=0.0, maximum=0.0))
    kw.setdefault("sleep", no_sleep)
    return ProxmoxProvider(
        client=provider.client,
        platform="zpack",
        source=provider.source,
        wanted_clones=wanted_clones(spec),
        **kw,
    )


def converge_once(graph: DesiredGraph, provider: ProxmoxProvider) -> Convergence:
    return anyio.run(lambda: converge(graph, [provider]))


def errors(conv: Convergence) -> dict[str, str]:
    report = conv.rounds[-1].report
    assert report is not None
    return {r.change.address: str(r.error) for r in report.results if r.error is not None}


def vm(provider: ProxmoxProvider, vmid: int = 500) -> dict[str, Any]:
    return dict(provider.client.nodes(NODE).qemu(vmid).config.get())


def clone_posts(pve: Any) -> list[tuple[str, str]]:
    return [(m, p) for m, p in mutating_calls(pve) if p.endswith("/clone")]


def assert_template_untouched(provider: ProxmoxProvider, pve: Any, before: dict[str, Any]) -> None:
    assert vm(provider, TEMPLATE_VMID) == before
    touched = [
        (m, p)
        for m, p in mutating_calls(pve)
        if f"/qemu/{TEMPLATE_VMID}" in p and not p.endswith(f"/qemu/{TEMPLATE_VMID}/clone")
    ]
    assert touched == []
