"""Building and installing the package as a user does, shared by tests/deploy/test_install.py
and tests/deploy/test_first_day.py.

Two ways to get a tagged source: `tagged_repo` (a copy of what a wheel is made from,
committed in a new repository: for the version tests, which need trees with and without git)
and `cloned_checkout` (a `git clone` of the repository the tests run in: what a new user gets).
Both leave the working tree's own history and tags untouched. `build_wheel` builds as a
user's `pip wheel .` or `pipx install` does: pip's isolated build environment, setuptools and
setuptools-scm from the index. `install_in_fresh_venv` installs the wheel alone into a new
virtualenv and lends it this environment's dependencies (the fast way: nothing downloaded).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import ROOT

PIP = [sys.executable, "-m", "pip"]


def copy_source(dest: Path) -> Path:
    """What a wheel is made from, copied to `dest`."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, dest / name)
    shutil.copytree(
        ROOT / "reconciler",
        dest / "reconciler",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    return dest


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-c", "user.name=test", "-c", "user.email=test@localhost", *args],
        cwd=repo,
        # Reading the checkout never takes its index lock (others may be using it).
        env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"},
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.stdout


def tagged_repo(dest: Path, tag: str) -> Path:
    repo = copy_source(dest)
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "release")
    git(repo, "tag", "-a", tag, "-m", tag)
    return repo


def cloned_checkout(dest: Path, tag: str) -> Path:
    """A `git clone` of the repository the tests run in, tagged `tag` there. What the working
    tree changes (modified, deleted and new files that .gitignore does not exclude) is
    committed on top first, so a developer tests the tree they have; CI's clean clone has
    nothing on top, and a file git does not know is missing here as it is for a user."""
    subprocess.run(
        ["git", "clone", "-q", "--no-hardlinks", str(ROOT), str(dest)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    listed = git(ROOT, "ls-files", "-z", "--modified", "--others", "--exclude-standard")
    for name in sorted({n for n in listed.split("\0") if n}):
        source, target = ROOT / name, dest / name
        if source.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
        elif target.is_file():  # deleted in the working tree
            target.unlink()
    git(dest, "add", "-A")
    git(dest, "commit", "-q", "--allow-empty", "-m", "the working tree")
    git(dest, "tag", "-a", tag, "-m", tag)
    return dest


def build_wheel(source: Path, out: Path, env: dict[str, str] | None = None) -> Path:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SETUPTOOLS_SCM")}
    done = subprocess.run(
        [*PIP, "wheel", "-q", "--no-deps", "-w", str(out), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**environ, **(env or {})},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    (wheel,) = out.glob("reconciler-*.whl")
    return wheel


def wheel_metadata(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as zf:
        (metadata,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        return zf.read(metadata).decode()


def wheel_version(wheel: Path) -> str:
    found = re.search(r"^Version: (\S+)$", wheel_metadata(wheel), re.MULTILINE)
    assert found, f"{wheel.name}: no Version in METADATA"
    return found.group(1)


@dataclass(frozen=True)
class Venv:
    """A fresh virtualenv holding the installed wheel."""

    root: Path
    site: Path  # its site-packages

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    @property
    def python(self) -> Path:
        return self.bin / "python"

    def env(self) -> dict[str, str]:
        """This process's environment for the venv's commands: its bin first on PATH, and
        neither PYTHONPATH nor this environment's own bin (so `reconciler` is the venv's)."""
        outer = str(Path(sys.executable).parent)
        path = [str(self.bin)] + [
            p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != outer
        ]
        environ = {
            k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PATH")
        }
        return {**environ, "PATH": os.pathsep.join(path), "VIRTUAL_ENV": str(self.root)}


def install_in_fresh_venv(wheel: Path, venv: Path) -> Venv:
    """Into a fresh virtualenv with `pip install --no-deps`; the dependencies (the `lab`
    extra's too) come from this environment's site-packages through a .pth file, placed after
    the venv's own, so the wheel's `reconciler` is the one imported (not this checkout)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [*PIP, "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    (site / "outer-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return Venv(venv, site)
