"""The README's examples of VMs and what they are built from (issue 18: "VM disks", "VMs:
clone, cloud-init, agent", "Templates: what the hosts need", "Pools and HA") load as they are
written, in a small platform of the hosts, layers and ranges they name, and say in the graph
what the README says they do. An example the loader refuses, or that stopped saying it, fails
here."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from reconciler.loading.graph import build_graph
from reconciler.loading.loader import load_texts
from reconciler.model.resources import DesiredGraph
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")
PLATFORM = """
platform: {name: zpack, owner_tag: reconciler, default_storage: local-lvm}
layers:
  control: {}
  edge: {may_depend_on: [control, runtime]}
  runtime: {may_depend_on: [control]}
hosts:
  pve-core: {layers: [control], capacity: {cores: 16, memory: 64G}}
  pve-runtime: {layers: [edge, runtime], capacity: {cores: 32, memory: 128G}}
ranges:
  core: {first: 100, last: 199, layer: control}
  network: {first: 300, last: 399, layer: edge}
  game: {first: 1000, last: 1099, layer: runtime}
  dev: {first: 1100, last: 1199, layer: runtime}
"""
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl admin"
SECTIONS = (
    "### VM disks",
    "### VMs: clone, cloud-init, agent",
    "## Templates: what the hosts need",
    "## Pools and HA",
)


def examples(heading: str) -> list[str]:
    """The ```yaml blocks of one README section (up to the next heading of its level or
    higher)."""
    start = README.index(f"\n{heading}\n")
    level = heading.split(" ", 1)[0]
    end = re.search(rf"\n#{{1,{len(level)}}} ", README[start + 1 :])
    body = README[start : start + 1 + end.start()] if end else README[start:]
    return re.findall(r"```yaml\n(.*?)```", body, re.S)


@pytest.fixture
def graphs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, DesiredGraph]:
    """Each section's examples, loaded with the platform; `{file: keys/admins.pub}` is read
    relative to where the command runs, as the README says."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "admins.pub").write_text(f"# the admins\n{KEY}\n", encoding="utf-8")
    out: dict[str, DesiredGraph] = {}
    for heading in SECTIONS:
        found = examples(heading)
        assert found, f"{heading}: no yaml example"
        texts = {"platform.yaml": PLATFORM}
        texts.update({f"example{i}.yaml": text for i, text in enumerate(found)})
        loaded = load_texts(texts)
        assert loaded.ok and loaded.spec is not None, (
            heading,
            [str(d) for d in loaded.diagnostics],
        )
        out[heading] = build_graph(loaded.spec, loaded.source)
    return out


def guest(graph: DesiredGraph, name: str) -> dict[str, Any]:
    return dict(graph.resources[f"guest/{name}"].attributes)


def test_vm_disks(graphs: dict[str, DesiredGraph]) -> None:
    graph = graphs["### VM disks"]
    router = guest(graph, "router")
    assert router["boot_disk"] == "virtio0"
    assert router["volumes"]["virtio0"]["size"] == "16G"
    assert router["volumes"]["scsi1"] == {"storage": "local-zfs", "size": "50G", "backup": False}
    assert guest(graph, "pxe-node")["boot_disk"] is None  # disk: none


def test_clone_cloud_init_and_agent(graphs: dict[str, DesiredGraph]) -> None:
    graph = graphs["### VMs: clone, cloud-init, agent"]
    bastion = guest(graph, "bastion")
    assert bastion["agent"] is True
    assert bastion["clone"] == {"from": "debian-12-ci", "full": True, "storage": None}
    ci = bastion["cloud_init"]
    assert ci["user"] == "ops" and ci["password"] == "set"
    assert len(ci["ssh_keys"]) == 2 and ci["ssh_keys"][1] == KEY  # the literal, then the file's
    assert ci["nameserver"] == ["10.0.0.53"] and ci["searchdomain"] == ["lab.example"]
    assert ci["user_data"] == "local:snippets/bastion.yaml"
    assert ci["ipconfig"] == {"ipconfig0": "gw=10.0.0.1,ip=10.0.0.20/24", "ipconfig1": "ip=dhcp"}
    assert bastion["cloud_init_password"] == {"env": "BASTION_PASSWORD"}  # a reference only
    runner = guest(graph, "ci-runner")
    assert runner["clone"] == {"from": 9000, "full": False, "storage": None}  # merged
    assert runner["cloud_init"]["ipconfig"] == {
        "ipconfig0": "gw6=2001:db8:20::1,ip6=2001:db8:20::5/64"
    }
    db = guest(graph, "db")
    assert db["clone"] == {"from": "debian-12-ci", "full": True, "storage": "fast"}
    assert db["volumes"]["scsi0"]["storage"] == "fast"  # a full clone's disks go there
    assert db["cloud_init"]["ipconfig"] == {"ipconfig0": "ip=dhcp"}


def test_templates(graphs: dict[str, DesiredGraph]) -> None:
    graph = graphs["## Templates: what the hosts need"]
    volids = {
        a: r.attributes["volid"] for a, r in graph.resources.items() if a.startswith("template/")
    }
    assert volids == {
        "template/debian-12/pve-core": "local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst",
        "template/debian-12/pve-runtime": "local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst",
        "template/noble/pve-runtime": "local:import/noble-server-cloudimg-amd64.qcow2",
        "template/opnsense/pve-runtime": "local:iso/OPNsense-25.1-dvd-amd64.iso",
    }
    # The guest waits for its template's download on its node.
    assert "template/debian-12/pve-runtime" in graph.resources["guest/mc-lobby"].depends_on


def test_pools_and_ha(graphs: dict[str, DesiredGraph]) -> None:
    graph = graphs["## Pools and HA"]
    assert graph.resources["pool/game-servers"].attributes["members"] == ["guest/mc-lobby"]
    assert "pool" not in guest(graph, "velocity")
    velocity = graph.resources["ha/velocity"].attributes
    assert (velocity["state"], velocity["max_restart"], velocity["max_relocate"]) == (
        "started",
        2,
        1,
    )
    lobby = graph.resources["ha/mc-lobby"].attributes
    assert lobby["group"] == "runtime-nodes" and lobby["state"] == "started"
    assert guest(graph, "mc-lobby")["pool"] == "game-servers"  # from its profile
