"""`reconciler init`: a minimal platform, from fakepve's cluster or from flags alone, that
validates with no diagnostics at all and plans no change on a cluster without guests; it never
writes over a directory that has files (unless --force), and never writes a secret.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from reconciler.cli.main import main
from reconciler.loading.loader import load_directory
from reconciler.model.spec import ProxmoxApi
from tests.cli.test_live import flags
from tests.fakepve_fixtures import TEMPLATE, mutating_calls


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def platform(directory: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((directory / "platform.yaml").read_text())
    return data


def test_init_from_the_cluster_validates_and_plans_no_change(
    pve_api: ProxmoxApi, pve: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    specs = tmp_path / "specs"
    code, out, err = run(capsys, "init", str(specs), "--name", "zpack", *flags(pve_api))
    assert code == 0, err
    assert f"wrote {specs}/platform.yaml" in out and f"wrote {specs}/profiles.yaml" in out
    assert "platform 'zpack', 2 hosts (pve-core, pve-runtime)" in out
    data = platform(specs)
    # One host per node, sized as Proxmox says (fakepve's nodes: 4 cores, 8 GiB).
    assert data["hosts"] == {
        node: {"layers": ["control", "edge", "runtime"], "capacity": {"cores": 4, "memory": "8G"}}
        for node in ("pve-core", "pve-runtime")
    }
    assert data["platform"]["default_storage"] == "local-lvm"  # on every node, for containers
    assert data["ranges"]["game"] == {
        "first": 1000,
        "last": 1099,
        "layer": "runtime",
        "description": "game servers",
    }
    # The endpoint it was given, the password as a reference only.
    assert data["proxmox"]["url"] == pve_api.url
    assert data["proxmox"]["password"] == {"env": "FAKEPVE_PASSWORD"}
    assert "secret" not in (specs / "platform.yaml").read_text()
    profile = yaml.safe_load((specs / "profiles.yaml").read_text())["profiles"]["default"]
    assert profile["template"] == f"local:vztmpl/{TEMPLATE}"  # found on the first node
    assert profile["disk"] == {"storage": "local-lvm", "size": "8G"}
    loaded = load_directory(specs)
    assert loaded.ok and loaded.diagnostics == [], [str(d) for d in loaded.diagnostics]
    assert mutating_calls(pve) == []
    # The written `proxmox:` section is enough to plan: no connection flags needed.
    code, out, err = run(capsys, "plan", str(specs), "--detailed-exitcode", "--no-edge")
    assert code == 0, err
    assert "No changes." in out
    assert mutating_calls(pve) == []


def test_init_from_flags_needs_no_cluster(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    specs = tmp_path / "new"
    code, out, err = run(
        capsys,
        "init",
        str(specs),
        "--name",
        "lab",
        "--nodes",
        "pve1,pve2",
        "--storage",
        "local-zfs",
        "--template",
        "local:vztmpl/alpine.tar.zst",
        "--cores",
        "8",
        "--memory",
        "32G",
    )
    assert code == 0, err
    data = platform(specs)
    assert data["platform"] == {
        "name": "lab",
        "owner_tag": "reconciler",
        "prune": False,
        "max_deletes_per_run": 3,
        "default_storage": "local-zfs",
    }
    assert sorted(data["hosts"]) == ["pve1", "pve2"]
    assert data["hosts"]["pve2"]["capacity"] == {"cores": 8, "memory": "32G"}
    assert "proxmox" not in data  # none given: an example, commented out
    assert "# proxmox:" in (specs / "platform.yaml").read_text()
    assert "8 cores and 32G (--cores, --memory)" in err
    loaded = load_directory(specs)
    assert loaded.ok and loaded.diagnostics == [], [str(d) for d in loaded.diagnostics]
    assert loaded.spec is not None and loaded.spec.guests == {}
    code, out, _ = run(capsys, "validate", str(specs))
    assert code == 0 and "valid" in out


def test_the_first_guest_in_the_comment_validates_as_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What profiles.yaml suggests, uncommented, is a valid guest."""
    specs = tmp_path / "specs"
    assert run(capsys, "init", str(specs), "--name", "lab", "--nodes", "pve1")[0] == 0
    text = (specs / "profiles.yaml").read_text()
    guest = text[text.index("# guests:") :]
    (specs / "guests.yaml").write_text(
        "\n".join(line.removeprefix("# ") for line in guest.splitlines()) + "\n"
    )
    (specs / "profiles.yaml").write_text(
        text.replace("    kind: lxc\n", "    kind: lxc\n    template: local:vztmpl/t.tar.zst\n")
    )
    loaded = load_directory(specs)
    assert loaded.ok and loaded.spec is not None, [str(d) for d in loaded.diagnostics]
    assert loaded.spec.guests["hello"].host == "pve1"


def test_init_refuses_a_directory_with_files_unless_forced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "mine.yaml").write_text("guests: {}\n")
    (specs / "README").write_text("notes\n")
    argv = ["init", str(specs), "--name", "lab", "--nodes", "pve1"]
    code, out, err = run(capsys, *argv)
    assert code == 1 and f"{specs} is not empty; pass --force" in err and out == ""
    assert sorted(p.name for p in specs.iterdir()) == ["README", "mine.yaml"]
    code, _, err = run(capsys, *argv, "--force")
    assert code == 0, err
    # --force replaces the spec files, and leaves anything else.
    assert sorted(p.name for p in specs.iterdir()) == ["README", "platform.yaml", "profiles.yaml"]


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        ([], "init needs --proxmox-url"),
        (["--nodes", "pve1", "--name", "Not_A_Label"], "--name 'Not_A_Label'"),
        (["--nodes", "pve_1"], "node 'pve_1' cannot name a host"),
        (["--nodes", "pve1", "--memory", "lots"], "--memory 'lots'"),
    ],
    ids=["no-cluster-no-nodes", "bad-name", "bad-node", "bad-memory"],
)
def test_init_says_what_is_missing_and_writes_nothing(
    argv: list[str], says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    specs = tmp_path / "specs"
    if "--name" not in argv:
        argv = [*argv, "--name", "lab"]
    code, _, err = run(capsys, "init", str(specs), *argv)
    assert code == 1 and says in err
    assert not specs.exists()


def test_a_storage_the_nodes_lack_is_refused_naming_them(
    pve_api: ProxmoxApi, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    specs = tmp_path / "specs"
    code, _, err = run(
        capsys, "init", str(specs), "--name", "zpack", "--storage", "ceph", *flags(pve_api)
    )
    assert code == 1
    assert "--storage ceph: not a storage for container disks on pve-core, pve-runtime" in err
    assert "pve-core: local-lvm" in err
    assert not specs.exists()


def test_the_platform_is_named_after_its_directory_unless_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    specs = tmp_path / "my-lab"
    code, _, err = run(capsys, "init", str(specs), "--nodes", "pve1")
    assert code == 0, err
    assert platform(specs)["platform"]["name"] == "my-lab"
    assert "named 'my-lab', as its directory (--name to choose)" in err
    code, _, err = run(capsys, "init", str(tmp_path / "Not_A_Label"), "--nodes", "pve1")
    assert code == 1 and "--name 'Not_A_Label'" in err
