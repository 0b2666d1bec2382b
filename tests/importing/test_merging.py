"""`reconciler merge FROM DIR`, offline: what an import's directory adds to a platform's own
specs, in new files, and what it refuses. The target's hosts, ranges and profiles stand: an
imported guest is put on the target's host of its node and in the target's range holding its
vmid, and a profile the target has under the same name for something else is added renamed.
A guest (or vmid) the target defines otherwise is a conflict naming both files, and nothing is
written; a second merge adds nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from reconciler.cli.main import main
from reconciler.loading.loader import load_directory

PLACEHOLDER = "unknown:vztmpl/debian-imported.tar.zst"

TARGET = {
    "platform.yaml": """\
platform: {name: zpack, default_storage: local-lvm}
layers:
  control: {may_depend_on: []}
  runtime: {may_depend_on: [control]}
hosts:
  core: {node: pve-core, layers: [control, runtime], capacity: {cores: 16, memory: 64G}}
ranges:
  core: {first: 100, last: 199, layer: control}
  game: {first: 1000, last: 1099, layer: runtime}
""",
    "guests.yaml": """\
profiles:
  game: {template: "local:vztmpl/debian.tar.zst", cores: 4}
guests:
  zpack-api: {role: core, host: core, vmid: 101, template: "local:vztmpl/debian.tar.zst"}
""",
}

SOURCE = {
    "platform.yaml": """\
platform: {name: zpack}
layers:
  control: {may_depend_on: []}
  runtime: {may_depend_on: [control]}
  unassigned: {may_depend_on: []}
hosts:
  pve-core: {layers: [control, runtime, unassigned], capacity: {cores: 32, memory: 64G}}
ranges:
  core: {first: 100, last: 199, layer: control}
  servers: {first: 1000, last: 1199, layer: runtime}
  unassigned-5000: {first: 5000, last: 5000, layer: unassigned}
""",
    "profiles.yaml": f"""\
profiles:
  game: {{template: "{PLACEHOLDER}", cores: 2, memory: 4G}}
""",
    "game.yaml": """\
guests:
  mc-lobby: {role: servers, vmid: 1000, host: pve-core, profile: game}
  mc-survival: {role: servers, vmid: 1001, host: pve-core, profile: game, cores: 4}
""",
    "core.yaml": """\
guests:
  zpack-api: {role: core, host: pve-core, vmid: 101, template: "local:vztmpl/debian.tar.zst"}
  odd: {role: unassigned-5000, vmid: 5000, host: pve-core, template: "local:vztmpl/x.tar.zst"}
""",
    "firewall.yaml": """\
firewall:
  aliases:
    api: {cidr: 10.10.0.11, comment: platform API}
""",
}


def write(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text)
    return directory


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    return write(tmp_path / "imported", SOURCE), write(tmp_path / "specs", TARGET)


def merge(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["merge", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def contents(directory: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(directory.iterdir())}


def test_merge_adds_what_the_specs_lack_in_new_files_in_their_frame(
    dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    source, target = dirs
    code, out, err = merge(capsys, str(source), str(target))
    assert code == 0, err
    files = contents(target)
    # The target's own files are as they were; what is added is in new files.
    assert {n: files[n] for n in TARGET} == TARGET
    added = ["core", "firewall", "game", "platform", "profiles"]
    assert sorted(files) == sorted([*TARGET, *(f"imported-{n}.yaml" for n in added)])
    loaded = load_directory(target)
    assert loaded.ok and loaded.spec is not None, [str(d) for d in loaded.diagnostics]
    spec = loaded.spec
    # On the target's host of the same node, in the target's range that holds the vmid.
    assert (spec.guests["mc-lobby"].host, spec.guests["mc-lobby"].role) == ("core", "game")
    assert spec.guests["mc-lobby"].vmid == 1000
    # The target's profile `game` is another one: the import's is added under a new name.
    assert spec.guests["mc-lobby"].profile == "game-imported"
    assert (spec.guests["mc-lobby"].cores, spec.guests["mc-survival"].cores) == (2, 4)
    assert spec.profiles["game"].cores == 4  # the target's own, untouched
    assert "profile 'game'" in err and "named 'game-imported'" in err
    # A vmid outside every range of the target: the import's range and layer come along.
    assert spec.ranges["unassigned-5000"].first == 5000 and "unassigned" in spec.layers
    assert spec.guests["odd"].host == "core"
    assert "hosts" not in yaml.safe_load(files["imported-platform.yaml"])
    assert str(spec.firewall.aliases["api"].cidr).startswith("10.10.0.11")
    # The guest the target has already, the same once its host is the target's: left alone.
    assert "guest/zpack-api" not in out
    assert "+ guest/mc-lobby" in out and "+ profile/game-imported" in out
    # The placeholder keeps its comment, and the header says where from and what is next.
    game = files["imported-profiles.yaml"]
    assert f"template: {PLACEHOLDER}  # unknown: only used to re-create" in game
    assert f"Merged from {source}/profiles.yaml." in game
    assert f"`reconciler adopt ADDRESS --dir {target}`" in game
    assert f"{target}: merged 3 guests, 1 profile, 1 range, 1 firewall object" in out


def test_a_second_merge_adds_nothing(
    dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    source, target = dirs
    assert merge(capsys, str(source), str(target))[0] == 0
    before = contents(target)
    code, out, _ = merge(capsys, str(source), str(target))
    assert code == 0 and "nothing to merge" in out
    assert contents(target) == before


def test_a_guest_the_specs_created_is_the_same_one_in_their_import(
    dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """The import of a guest the platform made from its own entry (no vmid: allocated; its
    storage the default) has the vmid the mark gave it and the storage written out: the same
    guest, left as it is (the first day's `import --out`, then `merge`, on a platform with a
    guest of its own). A vmid the target writes out still has to agree (the test below)."""
    source, target = dirs
    (target / "game.yaml").write_text(
        "guests:\n"
        f"  mc-lobby: {{role: game, host: core, template: '{PLACEHOLDER}', cores: 2,"
        " memory: 4G, disk: {storage: local-lvm}}\n"
    )
    code, out, err = merge(capsys, str(source), str(target))
    assert code == 0, err
    assert "guest/mc-lobby" not in out and "+ guest/mc-survival" in out
    loaded = load_directory(target)
    assert loaded.ok and loaded.spec is not None, [str(d) for d in loaded.diagnostics]
    assert loaded.spec.guests["mc-lobby"].vmid is None  # the target's entry, as it was


def test_a_guest_defined_otherwise_is_a_conflict_naming_both_files(
    dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    source, target = dirs
    (target / "game.yaml").write_text(
        "guests:\n"
        "  mc-lobby: {role: game, vmid: 1050, host: core, template: local:vztmpl/x.tar.zst}\n"
    )
    before = contents(target)
    code, _, err = merge(capsys, str(source), str(target))
    assert code == 1
    assert (
        f"guest 'mc-lobby' is defined in {target}/game.yaml:2 and, differently, in "
        f"{source}/game.yaml:2" in err
    )
    assert "a merge never overwrites a definition" in err and "nothing merged" in err
    assert contents(target) == before


def test_a_vmid_the_specs_give_another_guest_is_a_conflict(
    dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    source, target = dirs
    (target / "game.yaml").write_text(
        "guests:\n  lobby: {role: game, vmid: 1000, host: core, template: local:vztmpl/x.tar.zst}\n"
    )
    before = contents(target)
    code, _, err = merge(capsys, str(source), str(target))
    assert code == 1
    assert f"vmid 1000 is defined in {target}/game.yaml:2" in err
    assert "guest 'lobby' there, guest 'mc-lobby' here" in err
    assert contents(target) == before


def test_specs_of_another_platform_are_refused(
    dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    source, target = dirs
    (source / "platform.yaml").write_text(
        SOURCE["platform.yaml"].replace("name: zpack", "name: other")
    )
    before = contents(target)
    code, _, err = merge(capsys, str(source), str(target))
    assert code == 1 and "platform 'other'" in err and "which 'zpack' does not own" in err
    assert contents(target) == before


def test_a_merged_directory_that_would_not_validate_is_not_written(
    dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """The target's policies hold for what comes in: here its capacity."""
    source, target = dirs
    (target / "policies.yaml").write_text(
        "policies: {capacity: {cpu_overcommit: 0.25, memory_overcommit: 1.0}}\n"
    )
    before = contents(target)
    code, _, err = merge(capsys, str(source), str(target))
    assert code == 1 and "capacity" in err and "nothing merged" in err
    assert contents(target) == before


def test_dry_run_writes_nothing(
    dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    source, target = dirs
    code, out, _ = merge(capsys, str(source), str(target), "--dry-run")
    assert code == 0 and f"would write {target}/imported-game.yaml" in out
    assert contents(target) == TARGET


VELOCITY_GUEST = (
    '  velocity: {role: core, vmid: 150, host: HOST, template: "local:vztmpl/debian.tar.zst"}\n'
)
EDGE = """\
velocity:
  guest: velocity
  bridge: {secret: {env: BRIDGE_SECRET}}
  servers: {lobby: {guest: mc-lobby, forced_host: lobby.example.net}}
  unmanaged: [hub]
backups:
  worlds:
    schedule: "*-*-* 02:00"
    storage: backup
    select: {guests: [mc-lobby, mc-survival]}
"""


@pytest.fixture
def edge_dirs(dirs: tuple[Path, Path]) -> tuple[Path, Path]:
    """Both have the Velocity guest and section; the import has servers and a backup job."""
    source, target = dirs
    (source / "core.yaml").write_text(
        SOURCE["core.yaml"] + VELOCITY_GUEST.replace("HOST", "pve-core")
    )
    (source / "edge.yaml").write_text(EDGE)
    (target / "guests.yaml").write_text(
        TARGET["guests.yaml"] + VELOCITY_GUEST.replace("HOST", "core")
    )
    (target / "edge.yaml").write_text(
        "velocity: {guest: velocity, bridge: {secret: {env: BRIDGE_SECRET}}}\n"
    )
    return source, target


def test_velocity_servers_unmanaged_names_and_backup_jobs_are_merged(
    edge_dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    source, target = edge_dirs
    code, out, err = merge(capsys, str(source), str(target))
    assert code == 0, err
    for added in ("velocity/lobby", "velocity/unmanaged", "backup/worlds"):
        assert f"+ {added}" in out
    assert "+ guest/velocity" not in out  # the same guest, there already
    loaded = load_directory(target)
    assert loaded.ok and loaded.spec is not None, [str(d) for d in loaded.diagnostics]
    velocity = loaded.spec.velocity
    assert velocity is not None and velocity.unmanaged == ("hub",)
    assert velocity.servers["lobby"].forced_host == "lobby.example.net"
    assert loaded.spec.backups["worlds"].select.guests == ("mc-lobby", "mc-survival")
    edge = yaml.safe_load((target / "imported-edge.yaml").read_text())
    assert sorted(edge) == ["backups", "velocity"]
    assert sorted(edge["velocity"]) == ["servers", "unmanaged"]  # DIR's guest and bridge stand


def test_unmanaged_names_a_list_in_the_specs_lacks_are_a_conflict(
    edge_dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    source, target = edge_dirs
    (target / "edge.yaml").write_text(
        "velocity: {guest: velocity, bridge: {secret: {env: BRIDGE_SECRET}}, unmanaged: [x]}\n"
    )
    before = contents(target)
    code, _, err = merge(capsys, str(source), str(target))
    assert code == 1
    assert f"velocity.unmanaged is written in {target}/edge.yaml:1" in err
    assert "leave hub unmanaged too: add them there by hand" in err
    assert contents(target) == before
