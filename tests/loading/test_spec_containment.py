"""Files outside the spec directory are never read, whatever links point there.

A pull request can add `specs/x.yaml -> /etc/shadow`; CI then runs `validate` and posts what it
says. Each link out is refused by name (never opened, nothing of its target shown); a link that
stays inside (a Kubernetes ConfigMap volume links every file into a hidden folder) is read as
the file it leads to; links to folders are not followed. The same for the controller: the
directory source's revision id never reads outside, and the git source never checks a link out.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from reconciler.cli.main import main
from reconciler.controller.sources import GitSource, RevisionTracker, directory_id, poll
from reconciler.loading.loader import list_spec_files, load_directory
from tests.conftest import SPECS
from tests.controller.test_sources import commit_all as commit
from tests.controller.test_sources import git

# What the outside file holds: none of it may ever be shown.
SHADOW = "root:$6$SECRETSALT$SECRETHASHvalue:19000:0:99999:7:::\nsecretkey-line: hunter2-value\n"
LEAKS = ("SECRETSALT", "SECRETHASH", "secretkey-line", "hunter2")


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "shadow.yaml").write_text(SHADOW)
    (folder / "shadow").write_text(SHADOW)
    return folder


@pytest.fixture
def specs(tmp_path: Path) -> Path:
    target = tmp_path / "specs"
    shutil.copytree(SPECS, target)
    return target


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Path]]:
    """Every path os.open is asked for while the test runs (the loader reads through it)."""
    paths: list[Path] = []
    real = os.open

    def recording(path: str | os.PathLike[str], flags: int, *args: int, **kw: int) -> int:
        paths.append(Path(os.path.realpath(path)))
        return real(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", recording)
    yield paths


def assert_nothing_shown(output: str) -> None:
    for leak in LEAKS:
        assert leak not in output, f"{leak!r} shown:\n{output}"


@pytest.mark.parametrize(
    ("link", "target"),
    [
        pytest.param("stolen.yaml", "{outside}/shadow", id="absolute"),
        pytest.param("stolen.yaml", "../outside/shadow.yaml", id="relative"),
        pytest.param("sub/stolen.yaml", "../../outside/shadow.yaml", id="from-a-subfolder"),
        pytest.param("stolen.yml", "/etc/passwd", id="system-file"),
    ],
)
def test_a_link_out_is_refused_by_name_and_never_read(
    specs: Path,
    outside: Path,
    link: str,
    target: str,
    opened: list[Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = specs / link
    path.parent.mkdir(exist_ok=True)
    path.symlink_to(target.format(outside=outside))
    resolved = Path(os.path.realpath(path))

    code = main(["validate", str(specs), "--color", "never"])
    text = capsys.readouterr().out
    main(["validate", str(specs), "--format", "json"])
    as_json = capsys.readouterr().out
    main(["validate", str(specs), "--format", "github"])
    as_github = capsys.readouterr().out

    assert code == 1
    assert f"{specs / link}:1:1: error: a link to " in text
    assert "outside the spec directory" in text and "(link-outside)" in text
    for output in (text, as_json, as_github):
        assert_nothing_shown(output)
        assert "root:x:0:0" not in output  # /etc/passwd's first line
    assert resolved not in opened, "the loader opened the file outside"
    # Reported alone: the rest is not checked against a directory missing a file.
    result = load_directory(specs)
    assert [d.code for d in result.diagnostics] == ["link-outside"]


def test_a_chain_of_links_that_ends_outside_is_refused(
    specs: Path, outside: Path, opened: list[Path]
) -> None:
    (specs / "b.yaml").symlink_to(outside / "shadow.yaml")
    (specs / "a.yaml").symlink_to("b.yaml")
    result = load_directory(specs, display="specs")
    assert {(d.position.file, d.code) for d in result.diagnostics if d.position} == {
        ("specs/a.yaml", "link-outside"),
        ("specs/b.yaml", "link-outside"),
    }
    assert outside / "shadow.yaml" not in opened


def test_a_link_that_stays_inside_is_read_as_its_file_like_a_configmap(specs: Path) -> None:
    """A ConfigMap volume: `game.yaml -> ..data/game.yaml`, `..data -> ..2024_01_01`."""
    stamped = specs / "..2024_01_01_00_00_00.000"
    stamped.mkdir()
    for name in ("game.yaml", "edge.yaml"):
        (specs / name).rename(stamped / name)
    (specs / "..data").symlink_to(stamped.name)
    for name in ("game.yaml", "edge.yaml"):
        (specs / name).symlink_to(f"..data/{name}")

    result = load_directory(specs, display="specs")

    assert result.ok, [str(d) for d in result.diagnostics]
    assert "specs/game.yaml" in result.files
    assert load_directory(SPECS).source.data == result.source.data


def test_a_link_to_a_folder_is_not_followed_and_says_so(specs: Path, outside: Path) -> None:
    (specs / "shared").symlink_to(outside)
    (specs / "loop").symlink_to(".")

    result = load_directory(specs, display="specs")

    assert result.ok  # a warning: nothing under them is read, nothing else is wrong
    warned = {
        d.position.file for d in result.diagnostics if d.code == "link-not-followed" and d.position
    }
    assert warned == {"specs/shared", "specs/loop"}
    assert all(leak not in str(d) for d in result.diagnostics for leak in LEAKS)
    assert not any(f.startswith("specs/shared/") for f in result.files)


def test_a_link_to_nothing_is_named(specs: Path) -> None:
    (specs / "gone.yaml").symlink_to("not-there.yaml")
    result = load_directory(specs, display="specs")
    assert [(d.code, d.position.file if d.position else "") for d in result.diagnostics] == [
        ("read-error", "specs/gone.yaml")
    ]


def test_the_directory_revision_id_never_reads_outside(
    specs: Path, outside: Path, opened: list[Path]
) -> None:
    (specs / "stolen.yaml").symlink_to(outside / "shadow.yaml")
    before = directory_id(specs)
    (outside / "shadow.yaml").write_text("changed: outside\n")
    assert directory_id(specs) == before  # its content is not part of the revision
    assert outside / "shadow.yaml" not in opened
    # Where the link leads is: pointing it elsewhere is a new revision.
    (specs / "stolen.yaml").unlink()
    (specs / "stolen.yaml").symlink_to(outside / "shadow")
    assert directory_id(specs) != before
    assert [f.rel for f in list_spec_files(specs) if f.refused] == ["stolen.yaml"]


# --- the git source --------------------------------------------------------------------------


def test_the_git_source_never_checks_a_link_out_and_reports_it(tmp_path: Path) -> None:
    repo = tmp_path / "origin"
    repo.mkdir()
    git(repo, "init", "--quiet", "-b", "main")
    shutil.copytree(SPECS, repo / "specs")
    # Inside, through a hidden folder: fine.
    (repo / "specs" / ".shared").mkdir()
    (repo / "specs" / "game.yaml").rename(repo / "specs" / ".shared" / "game.yaml")
    (repo / "specs" / "game.yaml").symlink_to(".shared/game.yaml")
    good = commit(repo, "the platform, game.yaml through a link")
    # From the checkout (workdir/checkouts/<sha>/specs/), four levels up is tmp_path.
    (tmp_path / "secret.yaml").write_text(SHADOW)
    workdir = tmp_path / "git"
    (repo / "specs" / "stolen.yaml").symlink_to("../../../../secret.yaml")
    (repo / "specs" / "passwd.yaml").symlink_to("/etc/passwd")
    (repo / "specs" / "up.yaml").symlink_to("../README.yaml")
    (repo / "README.yaml").write_text("not: a spec\n")
    (repo / "specs" / "LICENSE").symlink_to("../../LICENSE")  # not a spec: left out, unreported
    bad = commit(repo, "links out")

    source = GitSource(str(repo), branch="main", subdir="specs", workdir=workdir)
    tracker = RevisionTracker()
    git(repo, "reset", "--quiet", "--hard", good)
    assert anyio.run(poll, source, tracker) is not None
    assert tracker.good is not None and tracker.good.id == good
    git(repo, "reset", "--quiet", "--hard", bad)

    target = anyio.run(poll, source, tracker)

    assert target is not None and target.id == good  # still converging to the last good one
    assert tracker.bad is not None and tracker.bad.revision.id == bad
    checkout = tracker.bad.revision.directory
    assert not any(p.is_symlink() for p in checkout.iterdir() if p.name != "game.yaml")
    text = tracker.status().bad_diagnostics
    for name in ("stolen.yaml", "passwd.yaml", "up.yaml"):
        assert f"{bad[:12]}:specs/{name}:1:1: error: a link to " in text, text
    assert "LICENSE" not in text
    assert_nothing_shown(text)
    assert "root:x:0:0" not in text
