"""Volumes and protection in the spec: profiles and guests merge volumes key by key, the graph
holds them in the normalized shape with Proxmox's defaults filled in, and what cannot be a
volume of a guest (a key of the other kind, a VM disk with a path, a mount point without one,
two mount points at one path) is an error at the line it was written, once.

Texts are loaded with `load_texts` over the example platform, as in test_loader_merge.
"""

from __future__ import annotations

from typing import Any

import pytest

from reconciler.loading.graph import build_graph
from reconciler.loading.loader import LoadResult
from reconciler.model.diagnostics import Severity
from reconciler.model.resources import DesiredGraph
from tests.loading.test_loader_merge import line_of, load_with

HUB = """guests:
  mc-hub:
    role: game
    vmid: 1010
    host: pve-runtime
    profile: {profile}
    network:
      - {{name: eth0, bridge: vmbr0, ip: 10.20.0.30/24, gw: 10.20.0.1, tag: 20}}
{more}"""

VM = """guests:
  vm-build:
    role: network
    vmid: 350
    host: pve-runtime
    kind: qemu
    cores: 2
    memory: 2G
{more}"""


def loaded(extra: dict[str, str]) -> tuple[LoadResult, DesiredGraph | None, dict[str, str]]:
    result, texts = load_with(extra)
    graph = build_graph(result.spec, result.source) if result.ok and result.spec else None
    return result, graph, texts


def volumes_of(graph: DesiredGraph | None, guest: str) -> dict[str, Any]:
    assert graph is not None
    return dict(graph.resources[f"guest/{guest}"].attributes["volumes"])


def errors(result: LoadResult) -> list[Any]:
    return [d for d in result.diagnostics if d.severity is Severity.ERROR]


def test_the_example_game_profile_keeps_the_world_on_a_volume(graph: DesiredGraph) -> None:
    world = {"storage": "local-lvm", "size": "16G", "path": "/srv/world", "backup": True}
    assert volumes_of(graph, "mc-survival") == {"mp0": world}
    assert volumes_of(graph, "mc-skyblock") == {"mp0": world}  # game-modded extends it
    assert volumes_of(graph, "zpack-api") == {}
    attrs = graph.resources["guest/mc-survival"].attributes
    assert attrs["protection"] is False


def test_a_guests_volumes_merge_with_its_profiles_key_by_key_and_field_by_field() -> None:
    more = "    volumes:\n      mp0: {size: 32G}\n      mp1: {path: /srv/maps, size: 4G}\n"
    result, graph, _ = loaded({"hub.yaml": HUB.format(profile="game-vanilla", more=more)})
    assert result.ok, [str(d) for d in result.diagnostics]
    assert volumes_of(graph, "mc-hub") == {
        "mp0": {"storage": "local-lvm", "size": "32G", "path": "/srv/world", "backup": True},
        "mp1": {"storage": "local-lvm", "size": "4G", "path": "/srv/maps", "backup": False},
    }


def test_protection_and_volumes_come_from_a_profile_chain() -> None:
    profile = (
        "profiles:\n  game-safe:\n    extends: game-modded\n    protection: true\n"
        "    volumes:\n      mp1: {path: /srv/backups, size: 8G, storage: tank}\n"
    )
    result, graph, _ = loaded(
        {"safe.yaml": profile, "hub.yaml": HUB.format(profile="game-safe", more="")}
    )
    assert result.ok, [str(d) for d in result.diagnostics]
    assert graph is not None
    attrs = graph.resources["guest/mc-hub"].attributes
    assert attrs["protection"] is True
    assert sorted(attrs["volumes"]) == ["mp0", "mp1"]
    assert attrs["volumes"]["mp1"]["storage"] == "tank"


def test_mount_options_are_a_closed_set_kept_only_where_they_differ_from_proxmox() -> None:
    more = (
        "    volumes:\n      mp1:\n        path: /srv/maps\n        size: 512M\n"
        "        options: {acl: false, ro: true, replicate: true,"
        " mountoptions: [noatime, nodev, noatime]}\n"
    )
    result, graph, _ = loaded({"hub.yaml": HUB.format(profile="game-vanilla", more=more)})
    assert result.ok, [str(d) for d in result.diagnostics]
    assert volumes_of(graph, "mc-hub")["mp1"] == {
        "storage": "local-lvm",
        "size": "512M",
        "path": "/srv/maps",
        "backup": False,
        "acl": False,
        "ro": True,
        "mountoptions": "noatime;nodev",
    }


def test_a_vm_disk_is_backed_up_unless_the_spec_says_not() -> None:
    more = "    volumes:\n      scsi1: {size: 100G}\n      scsi2: {size: 1T, backup: false}\n"
    result, graph, _ = loaded({"vm.yaml": VM.format(more=more)})
    assert result.ok, [str(d) for d in result.diagnostics]
    assert volumes_of(graph, "vm-build") == {
        "scsi0": {"storage": "local-lvm", "size": "8G", "backup": True},  # its boot disk
        "scsi1": {"storage": "local-lvm", "size": "100G", "backup": True},
        "scsi2": {"storage": "local-lvm", "size": "1T", "backup": False},
    }


# (extra text, code, marker of the line it is reported at, message part)
MISTAKES = [
    (
        VM.format(more="    volumes:\n      mp0: {path: /data, size: 8G}\n"),
        "volume-kind",
        "      mp0:",
        "volume 'mp0' is a container mount point, but this guest is kind qemu",
    ),
    (
        VM.format(more="    volumes:\n      scsi1:\n        size: 8G\n        path: /data\n"),
        "invalid-value",
        "        path: /data",
        "scsi1.path: a VM disk has no path",
    ),
    (
        VM.format(more="    volumes:\n      scsi0: {size: 8G}\n"),
        "invalid-value",
        "      scsi0:",
        "scsi0 is a VM's boot disk",
    ),
    (
        HUB.format(profile="game-vanilla", more="    volumes:\n      mp1: {size: 8G}\n"),
        "missing-field",
        "      mp1:",
        "mount point 'mp1' needs 'path'",
    ),
    (
        HUB.format(
            profile="game-vanilla", more="    volumes:\n      mp1: {path: /srv/world, size: 8G}\n"
        ),
        "duplicate-mount-path",
        "      mp1:",
        "mp1.path /srv/world is already the path of mp0",
    ),
    (
        HUB.format(
            profile="game-vanilla", more="    volumes:\n      mp1: {path: /srv/../etc, size: 8G}\n"
        ),
        "invalid-value",
        "      mp1:",
        "no empty, '.' or '..' parts",
    ),
    (
        HUB.format(
            profile="game-vanilla", more="    volumes:\n      mp1: {path: '/a,b', size: 8G}\n"
        ),
        "invalid-value",
        "      mp1:",
        "no comma",
    ),
    (
        HUB.format(profile="game-vanilla", more="    volumes:\n      mp1: {path: /srv/maps}\n"),
        "missing-field",
        "      mp1:",
        "missing required field 'size'",
    ),
    (
        HUB.format(
            profile="game-vanilla",
            more="    volumes:\n      mp1: {path: /m, size: 1G, options: {mountoptions: [sync]}}\n",
        ),
        "invalid-value",
        "      mp1:",
        "mountoptions[0]",
    ),
    (
        HUB.format(profile="game-vanilla", more="    protection: yes please\n"),
        "invalid-value",
        "    protection:",
        "protection",
    ),
]


@pytest.mark.parametrize(
    ("text", "code", "marker", "message"), MISTAKES, ids=[m[3][:40] for m in MISTAKES]
)
def test_a_volume_mistake_is_reported_where_it_was_written(
    text: str, code: str, marker: str, message: str
) -> None:
    result, _, texts = loaded({"extra.yaml": text})
    assert not result.ok
    found = [d for d in errors(result) if d.code == code and message in d.message]
    assert found, [str(d) for d in result.diagnostics]
    assert found[0].position is not None
    assert found[0].position.file == "specs/extra.yaml"
    assert found[0].position.line == line_of(texts["specs/extra.yaml"], marker)


def test_a_volume_a_profile_gives_many_guests_is_reported_once_at_the_profile() -> None:
    profile = "profiles:\n  vm-disks:\n    kind: lxc\n    volumes:\n      scsi3: {size: 8G}\n"
    guests = "guests:\n" + "".join(
        f"  vm-{i}:\n    role: dev\n    vmid: {1150 + i}\n    host: pve-runtime\n"
        f"    kind: lxc\n    template: local:vztmpl/x.tar.zst\n    profile: vm-disks\n"
        f"    volumes:\n      mp{i}: {{path: /d{i}, size: 1G}}\n"
        for i in range(3)
    )
    result, _, texts = loaded({"p.yaml": profile, "g.yaml": guests})
    found = [d for d in errors(result) if d.code == "volume-kind"]
    assert len(found) == 1, [str(d) for d in result.diagnostics]
    assert found[0].position is not None and found[0].position.file == "specs/p.yaml"
    assert found[0].position.line == line_of(texts["specs/p.yaml"], "scsi3")


def test_an_invalid_inherited_volume_field_is_reported_once_at_the_profile() -> None:
    profile = (
        "profiles:\n  worlds:\n    extends: game-vanilla\n"
        "    volumes:\n      mp3: {path: /w, size: huge}\n"
    )
    guests = "guests:\n" + "".join(
        f"  mc-w{i}:\n    role: game\n    vmid: {1050 + i}\n    host: pve-runtime\n"
        f"    profile: worlds\n    volumes:\n      mp{4 + i}: {{path: /x{i}, size: 1G}}\n"
        for i in range(3)
    )
    result, _, texts = loaded({"p.yaml": profile, "g.yaml": guests})
    found = [d for d in errors(result) if "'huge' is not a size" in d.message]
    assert len(found) == 1, [str(d) for d in result.diagnostics]
    assert found[0].position is not None and found[0].position.file == "specs/p.yaml"
    assert found[0].position.line == line_of(texts["specs/p.yaml"], "huge")


def test_a_profile_with_an_empty_volumes_key_is_read_not_a_crash() -> None:
    result, _, _ = loaded({"p.yaml": "profiles:\n  bare:\n    extends: base\n    volumes:\n"})
    assert result.ok, [str(d) for d in result.diagnostics]
