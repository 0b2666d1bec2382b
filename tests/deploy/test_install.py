"""The install path (issue 17): the package's version comes from git tags, a wheel built from a
tagged checkout carries it, and installed into a fresh virtualenv it runs; a source tree
without git builds as the fallback version, or as the one it is given (the image build);
nothing under deploy/ installs from a placeholder URL.

The builds run on a copy of what a wheel is made from (pyproject.toml, README.md,
reconciler/), committed and tagged in a temporary repository, so the working tree's own
history and tags are never touched. pip builds in its isolated environment, as a user's
`pip wheel .` or `pipx install` does (setuptools and setuptools-scm from the index). The
helpers are tests/deploy/packaging.py's, shared with the first day's test.
"""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from reconciler import FALLBACK_VERSION
from tests.conftest import ROOT, SPECS
from tests.deploy.packaging import (
    build_wheel,
    copy_source,
    install_in_fresh_venv,
    tagged_repo,
    wheel_version,
)

DEPLOY = ROOT / "deploy"


@pytest.fixture(scope="module")
def tagged_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("tagged")
    return build_wheel(tagged_repo(base / "src", "v7.8.9"), base / "dist")


def test_a_tagged_checkout_builds_that_version(tagged_wheel: Path) -> None:
    assert tagged_wheel.name == "reconciler-7.8.9-py3-none-any.whl"
    assert wheel_version(tagged_wheel) == "7.8.9"
    with zipfile.ZipFile(tagged_wheel) as zf:
        names = set(zf.namelist())
    # The package data the commands read ships in the wheel; the tests do not.
    assert "reconciler/data/sample-observed.json" in names
    assert "reconciler/cli/lab.py" in names
    assert not any(n.startswith("tests/") for n in names)


def test_a_tree_without_git_builds_the_fallback_or_the_given_version(tmp_path: Path) -> None:
    """A tarball has no tags: the fallback version; the image build gives the version
    (deploy/docker/Dockerfile sets SETUPTOOLS_SCM_PRETEND_VERSION from its build argument)."""
    source = copy_source(tmp_path / "src")
    wheel = build_wheel(source, tmp_path / "dist")
    assert wheel_version(wheel) == FALLBACK_VERSION
    given = build_wheel(
        source, tmp_path / "dist-given", env={"SETUPTOOLS_SCM_PRETEND_VERSION": "3.4.5"}
    )
    assert wheel_version(given) == "3.4.5"


def test_the_installed_wheel_runs(tagged_wheel: Path, tmp_path: Path) -> None:
    """Into a fresh virtualenv with `pip install --no-deps`; the dependencies come from this
    environment's site-packages through a .pth file, placed after the venv's own, so the
    wheel's `reconciler` is the one imported (not this checkout)."""
    venv = install_in_fresh_venv(tagged_wheel, tmp_path / "venv")
    python, venv_site, env = venv.python, venv.site, venv.env()
    reconciler = venv.bin / "reconciler"

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False
        )

    version = run(str(reconciler), "--version")
    assert (version.returncode, version.stdout) == (0, "reconciler 7.8.9\n"), version.stderr
    where = run(str(python), "-c", "import reconciler; print(reconciler.__file__)")
    assert where.stdout.startswith(str(venv_site)), where.stdout + where.stderr
    # The shipped sample snapshot is found: package data made it into the install.
    plan = run(str(reconciler), "plan", str(SPECS), "--observed", "sample", "--color", "never")
    assert plan.returncode == 0, plan.stderr
    assert "Plan for platform zpack" in plan.stdout


def test_the_version_is_read_only_when_asked() -> None:
    """importlib.metadata costs tens of milliseconds: `--help` does not load it, `--version`
    does and prints what is installed here."""
    probe = (
        "import contextlib, io, sys\n"
        "from reconciler.cli.main import main\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        "    try:\n"
        "        main(sys.argv[1:])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('importlib.metadata' in sys.modules, out.getvalue().strip())\n"
    )

    def loaded(*argv: str) -> str:
        return subprocess.run(
            [sys.executable, "-c", probe, *argv],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    assert loaded("--help").startswith("False usage: reconciler")
    from importlib.metadata import version

    assert loaded("--version") == f"True reconciler {version('reconciler')}\n"


# Hosts reserved for examples (RFC 2606 and the like): an install from one can never work.
PLACEHOLDER = re.compile(
    r"(?:[\w-]+\.)*example\.(?:com|org|net|lan|invalid)\b|github\.com/example\b", re.IGNORECASE
)


def test_the_placeholder_pattern_finds_what_it_should() -> None:
    hits = [
        "pip install 'reconciler @ git+https://github.com/example/reconciler@v0.1.0'",
        "https://git.example.lan/platform/reconciler@v0.1.0",
        "Documentation=https://example.com/docs",
    ]
    misses = ["deploy/pre-commit-config.example.yaml", "the example platform (specs/)"]
    assert all(PLACEHOLDER.search(h) for h in hits)
    assert not any(PLACEHOLDER.search(m) for m in misses)


def test_nothing_under_deploy_names_a_placeholder_host() -> None:
    files = [p for p in DEPLOY.rglob("*") if p.is_file()]
    assert len(files) >= 8
    found = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in files
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if PLACEHOLDER.search(line)
    ]
    assert not found, "\n".join(found)


@pytest.mark.parametrize(
    "path",
    ["deploy/ci/github-plan.yml", "deploy/ci/gitlab-ci.yml"],
)
def test_ci_installs_what_the_user_names(path: str) -> None:
    text = (ROOT / path).read_text()
    assert 'pip install "$RECONCILER_INSTALL"' in text
    assert "pip install ." in text  # the reconciler repository itself
    assert "RECONCILER_INSTALL" in text.split("\n\n")[0]  # documented in the header


def test_the_image_build_passes_its_version_to_setuptools_scm() -> None:
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    assert "ARG RECONCILER_VERSION" in text
    assert 'SETUPTOOLS_SCM_PRETEND_VERSION="${RECONCILER_VERSION#v}"' in text
