"""Import and adoption of guests with volumes and protection: the written spec holds each
mount point and extra VM disk (path, storage, size, backup, options) and the protection flag,
so an imported guest plans empty; what the spec cannot hold (a bind mount, an unknown volume
option) is a note. On fakepve, a hand-made protected game server with its world on a mount
point imports, adopts and then applies with zero mutating calls.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio

from reconciler.applying.converging import converge
from reconciler.importing.adopting import adopt
from reconciler.importing.estate import read_estate
from reconciler.importing.writer import Base, render_specs, write_files
from reconciler.loading.graph import build_graph
from reconciler.loading.loader import load_directory
from reconciler.providers.proxmox import ProxmoxProvider
from tests.fakepve_fixtures import mutating_calls
from tests.importing.test_writer import ct, estate, guests_of, vm

WORLD = "local-lvm:vm-1001-disk-1,backup=1,mp=/srv/world,size=32G"
MAPS = "local-lvm:vm-1001-disk-2,acl=0,mountoptions=noatime;nodev,mp=/srv/maps,ro=1,size=4G"


def test_volumes_and_protection_are_written_and_the_guest_plans_empty() -> None:
    result = render_specs(
        estate(
            ct(1001, "mc-survival", protection=1, mp0=WORLD, mp1=MAPS, mp2="/mnt/share,mp=/x"),
            vm(
                1150,
                "build-vm",
                scsi1="local-lvm:vm-1150-disk-1,iothread=1,size=100G",
                scsi2="local-lvm:vm-1150-disk-2,backup=0,size=1T",
                scsi3="local-lvm:vm-1150-cloudinit,media=cdrom",
                ide2="local:iso/debian.iso,media=cdrom",
            ),
        ),
        Base.default("zpack"),
    )
    assert result.ok, [str(d) for d in result.load.diagnostics] if result.load else None
    assert result.drift == {}
    guests = guests_of(result.files)
    survival, build = guests["mc-survival"], guests["build-vm"]
    assert survival["protection"] is True and "protection" not in build
    assert survival["volumes"] == {
        "mp0": {"path": "/srv/world", "storage": "local-lvm", "size": "32G", "backup": True},
        "mp1": {
            "path": "/srv/maps",
            "storage": "local-lvm",
            "size": "4G",
            "backup": False,
            "options": {"acl": False, "ro": True, "mountoptions": ["noatime", "nodev"]},
        },
    }
    assert build["volumes"] == {
        "scsi1": {"storage": "local-lvm", "size": "100G", "backup": True},
        "scsi2": {"storage": "local-lvm", "size": "1T", "backup": False},
    }
    assert any("mp2 is a bind or device mount" in n for n in result.notes), result.notes
    assert any("scsi1 options the spec cannot hold: iothread" in n for n in result.notes)


def test_a_protected_game_server_with_a_world_volume_imports_adopts_and_plans_empty(
    pve: Any, provider: ProxmoxProvider, tmp_path: Path
) -> None:
    net = "name=eth0,bridge=vmbr0,firewall=1,gw=10.20.0.1,ip=10.20.0.11/24,tag=20,type=veth"
    pve.add_ct(
        1001,
        "mc-survival",
        node="pve-runtime",
        status="running",
        config={"memory": 4096, "tags": "game", "protection": 1, "mp0": WORLD, "net0": net},
    )
    read = anyio.run(read_estate, provider)
    result = render_specs(read, Base.default("zpack"))
    assert result.ok and result.drift == {}, result.drift
    write_files(result.files, tmp_path / "imported")
    loaded = load_directory(tmp_path / "imported")
    assert loaded.ok and loaded.spec is not None, [str(d) for d in loaded.diagnostics]
    graph = build_graph(loaded.spec, loaded.source)
    attrs = graph.resources["guest/mc-survival"].attributes
    assert attrs["protection"] is True and attrs["volumes"]["mp0"]["path"] == "/srv/world"

    report = anyio.run(lambda: adopt(graph, provider, ("guest/mc-survival",)))
    assert report.ok and [a.drift for a in report.adoptions] == [[]], report
    pve.requests.clear()
    conv = anyio.run(lambda: converge(graph, [provider]))
    plan = conv.rounds[0].plan
    assert not plan.has_changes and not plan.errored, [(c.address, c.fields) for c in plan.actions]
    assert mutating_calls(pve) == []
    assert pve.ct(1001).config["mp0"] == WORLD and pve.ct(1001).config["protection"] == 1
