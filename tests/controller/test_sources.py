"""Spec sources for the controller service: a directory, or a git branch fetched at an interval.

Real git against a repository in tmp_path: a broken commit is reported and never becomes the
target, the fix does; only commits are ever seen; errors are ours (temporary or configuration).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import anyio
import pytest

from reconciler.controller.sources import (
    DirectorySource,
    GitSource,
    Revision,
    RevisionTracker,
    SpecSource,
    directory_id,
    poll,
    redact_url,
)
from reconciler.model.errors import ConfigurationError, TemporaryError

SPECS = Path(__file__).resolve().parents[2] / "specs"


def typo_line() -> int:
    """The line of the first `cores: 1` in game.yaml: the typo goes there and is reported there."""
    lines = (SPECS / "game.yaml").read_text().splitlines()
    return next(n for n, line in enumerate(lines, 1) if line.strip() == "cores: 1")


TYPO_LINE = typo_line()


def git(repo: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.org",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.org",
    }
    proc = subprocess.run(
        ["git", "-c", "commit.gpgsign=false", *args],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return proc.stdout.strip()


def commit_all(repo: Path, message: str) -> str:
    git(repo, "add", "-A")
    git(repo, "commit", "--quiet", "-m", message)
    return git(repo, "rev-parse", "HEAD")


@pytest.fixture
def origin(tmp_path: Path) -> Path:
    repo = tmp_path / "origin"
    repo.mkdir()
    git(repo, "init", "--quiet", "-b", "main")
    shutil.copytree(SPECS, repo / "specs")
    commit_all(repo, "Example platform")
    return repo


def break_game(repo: Path) -> None:
    game = repo / "specs" / "game.yaml"
    lines = game.read_text().splitlines(keepends=True)
    lines[TYPO_LINE - 1] = lines[TYPO_LINE - 1].replace("cores", "corse")
    game.write_text("".join(lines))


def fix_game(repo: Path) -> None:
    game = repo / "specs" / "game.yaml"
    game.write_text(game.read_text().replace("corse: 1", "cores: 1"))


def fetch(source: SpecSource) -> Revision:
    return anyio.run(source.fetch)


def poll_once(source: SpecSource, tracker: RevisionTracker) -> Revision | None:
    return anyio.run(poll, source, tracker)


def test_a_broken_commit_is_reported_and_never_applied_the_fix_is(
    origin: Path, tmp_path: Path
) -> None:
    first = git(origin, "rev-parse", "HEAD")
    source = GitSource(str(origin), workdir=tmp_path / "work")
    tracker = RevisionTracker()

    target = poll_once(source, tracker)
    assert target is not None and target.id == first
    assert target.summary == "Example platform" and target.committed_at
    assert tracker.good_result is not None and tracker.good_result.ok
    assert tracker.status().healthy

    break_game(origin)
    broken = commit_all(origin, "Typo in a game server")
    target = poll_once(source, tracker)
    assert target is not None and target.id == first  # still converging to the good one
    status = tracker.status()
    assert (status.current_id, status.good_id, status.bad_id) == (broken, first, broken)
    assert not status.healthy
    assert f"{broken[:12]}:specs/game.yaml:{TYPO_LINE}:" in status.bad_diagnostics
    assert "corse" in status.bad_diagnostics
    assert (tmp_path / "work" / "checkouts" / first).is_dir()  # the good one stays on disk

    fix_game(origin)
    fixed = commit_all(origin, "Fix the typo")
    target = poll_once(source, tracker)
    assert target is not None and target.id == fixed
    status = tracker.status()
    assert (status.current_id, status.good_id, status.bad_id) == (fixed, fixed, None)
    assert status.bad_diagnostics == "" and status.healthy


def test_a_bad_first_revision_gives_nothing_to_converge_to(origin: Path, tmp_path: Path) -> None:
    break_game(origin)
    broken = commit_all(origin, "Broken from the start")
    tracker = RevisionTracker()
    assert poll_once(GitSource(origin.as_uri(), workdir=tmp_path / "work"), tracker) is None
    status = tracker.status()
    assert (status.current_id, status.good_id, status.bad_id) == (broken, None, broken)
    assert "game.yaml" in status.bad_diagnostics
    assert status.to_json()["good"] is None


def test_only_commits_are_seen_never_the_working_tree(origin: Path, tmp_path: Path) -> None:
    first = git(origin, "rev-parse", "HEAD")
    break_game(origin)  # edited, not committed
    (origin / "specs" / "extra.yaml").write_text("guests: {}\n")  # untracked
    revision = fetch(GitSource(str(origin), workdir=tmp_path / "work"))
    assert revision.id == first
    assert "cores: 1" in (revision.directory / "game.yaml").read_text()
    assert not (revision.directory / "extra.yaml").exists()
    assert not (revision.directory / ".git").exists()


def test_a_relative_workdir_and_a_file_url_work(
    origin: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    revision = fetch(GitSource(origin.as_uri(), workdir="work"))
    assert revision.id == git(origin, "rev-parse", "HEAD")
    assert revision.directory == tmp_path / "work" / "checkouts" / revision.id / "specs"


def test_the_same_commit_is_extracted_once(origin: Path, tmp_path: Path) -> None:
    source = GitSource(str(origin), workdir=tmp_path / "work")
    first = fetch(source)
    game = first.directory / "game.yaml"
    before = (game.stat().st_ino, game.stat().st_mtime_ns)
    second = fetch(source)
    assert second == first
    assert (game.stat().st_ino, game.stat().st_mtime_ns) == before
    # A new process over the same workdir reuses it too.
    third = fetch(GitSource(str(origin), workdir=tmp_path / "work"))
    assert third.directory == first.directory
    assert (game.stat().st_ino, game.stat().st_mtime_ns) == before


def test_old_checkouts_go_but_the_last_good_one_stays(origin: Path, tmp_path: Path) -> None:
    source = GitSource(str(origin), workdir=tmp_path / "work", keep=1)
    tracker = RevisionTracker()
    good = poll_once(source, tracker)
    assert good is not None
    for n in range(3):
        (origin / "specs" / "game.yaml").write_text(f"broken: [{n}\n")
        commit_all(origin, f"broken {n}")
        assert poll_once(source, tracker) == good
    checkouts = sorted(p.name for p in (tmp_path / "work" / "checkouts").iterdir())
    assert checkouts == sorted({good.id, git(origin, "rev-parse", "HEAD")})
    assert (good.directory / "game.yaml").is_file()


def test_a_missing_branch_is_a_configuration_error(origin: Path, tmp_path: Path) -> None:
    source = GitSource(str(origin), branch="production", workdir=tmp_path / "work")
    with pytest.raises(ConfigurationError, match="production"):
        fetch(source)


def test_a_missing_spec_folder_is_a_configuration_error(origin: Path, tmp_path: Path) -> None:
    source = GitSource(str(origin), subdir="platform", workdir=tmp_path / "work")
    with pytest.raises(ConfigurationError, match="platform"):
        fetch(source)


def test_an_unreachable_remote_is_temporary_and_recorded(tmp_path: Path) -> None:
    source = GitSource(str(tmp_path / "nowhere"), workdir=tmp_path / "work")
    tracker = RevisionTracker()
    with pytest.raises(TemporaryError):
        poll_once(source, tracker)
    status = tracker.status()
    assert status.fetch_error and "TemporaryError" in status.fetch_error
    assert status.current_id is None and not status.healthy


def test_a_remote_that_comes_back_is_fetched(origin: Path, tmp_path: Path) -> None:
    moved = tmp_path / "moved"
    origin.rename(moved)
    source = GitSource(str(origin), workdir=tmp_path / "work")
    tracker = RevisionTracker()
    with pytest.raises(TemporaryError):
        poll_once(source, tracker)
    moved.rename(origin)
    assert poll_once(source, tracker) is not None
    assert tracker.status().fetch_error is None


@pytest.mark.parametrize(
    ("url", "secret"),
    [
        ("https://user:tok3n@git.example/x.git", "tok3n"),
        ("https://ghp_abcdefghijklmnop1234@github.com/o/r.git", "ghp_"),
        ("ssh://deploy:hunter2@git.example:22/x.git", "hunter2"),
    ],
)
def test_describe_never_shows_credentials(url: str, secret: str, tmp_path: Path) -> None:
    shown = GitSource(url, workdir=tmp_path).describe()
    assert secret not in shown
    assert "git.example" in shown or "github.com" in shown


@pytest.mark.parametrize(
    "url",
    ["https://git.example/x.git", "git@github.com:o/r.git", "/srv/specs.git", "file:///srv/x"],
)
def test_urls_without_secrets_are_shown_as_they_are(url: str) -> None:
    assert redact_url(url) == url


def test_a_fetch_error_never_shows_credentials(tmp_path: Path) -> None:
    # Nothing listens on port 9 of localhost: the connection is refused at once.
    source = GitSource("http://user:tok3n@127.0.0.1:9/x.git", workdir=tmp_path / "work")
    with pytest.raises(TemporaryError) as caught:
        fetch(source)
    assert "tok3n" not in str(caught.value)


def test_a_directory_revision_changes_with_its_yaml_files_only(tmp_path: Path) -> None:
    specs = tmp_path / "specs"
    shutil.copytree(SPECS, specs)
    source = DirectorySource(specs)
    first = fetch(source)
    assert first.id.startswith("dir-") and len(first.id) == len("dir-") + 12
    assert first.directory == specs and first.committed_at is None
    assert fetch(source).id == first.id

    (specs / "README.md").write_text("not a spec\n")
    (specs / ".hidden").mkdir()
    (specs / ".hidden" / "x.yaml").write_text("ignored: true\n")
    assert fetch(source).id == first.id

    break_game(tmp_path)
    assert fetch(source).id != first.id
    fix_game(tmp_path)
    assert fetch(source).id == first.id
    (specs / "game.yaml").rename(specs / "games.yaml")
    assert directory_id(specs) != first.id


def test_a_directory_source_keeps_the_last_good_specs(tmp_path: Path) -> None:
    specs = tmp_path / "specs"
    shutil.copytree(SPECS, specs)
    source = DirectorySource(specs)
    tracker = RevisionTracker()
    good = poll_once(source, tracker)
    assert good is not None
    break_game(tmp_path)
    assert poll_once(source, tracker) == good
    status = tracker.status()
    assert status.bad_id not in (None, good.id)
    assert f"{specs / 'game.yaml'}:{TYPO_LINE}:" in status.bad_diagnostics


def test_a_missing_directory_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError):
        fetch(DirectorySource(tmp_path / "absent"))
