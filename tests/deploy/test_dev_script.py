"""deploy/dev says what it does, on stderr, only when it does it: creating .venv, installing,
updating after pyproject.toml changed; a run with nothing to set up says nothing of its own.

It runs on a copy of the script beside a stand-in pyproject.toml, with a stand-in Python (a
shell script: `-m venv` lays out a venv of stand-ins, `-m pip` records its arguments), so no
real venv is built and the check takes a moment.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tests.conftest import ROOT

FAKE_PYTHON = """\
#!/usr/bin/env bash
# A stand-in for python: enough for deploy/dev.
case "$1" in
  -c) case "$2" in *python_version*) echo 3.12.7 ;; esac ;;  # else: fits, exit 0
  -m)
    case "$2" in
      venv)
        mkdir -p "$3/bin"
        cp "$0" "$3/bin/python"
        printf '#!/usr/bin/env bash\\necho "reconciler 9.9.9 ran: $*"\\n' > "$3/bin/reconciler"
        chmod +x "$3/bin/reconciler" ;;
      pip) shift 2; echo "$*" >> "$(dirname "$0")/../../pip.log" ;;
    esac ;;
esac
"""


def make_project(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    (project / "deploy").mkdir(parents=True)
    shutil.copy(ROOT / "deploy" / "dev", project / "deploy" / "dev")
    (project / "pyproject.toml").write_text("[project]\nname = 'reconciler'\n")
    python = tmp_path / "python3-fake"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    return project


def dev(project: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": str(project.parent / "python3-fake")}
    return subprocess.run(
        ["bash", str(project / "deploy" / "dev"), *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_first_run_says_what_it_sets_up_and_the_next_says_nothing(tmp_path: Path) -> None:
    project = make_project(tmp_path)
    first = dev(project, "--version")
    assert first.returncode == 0, first.stderr
    lines = first.stderr.splitlines()
    assert lines[0] == f"deploy/dev: creating .venv with {project.parent / 'python3-fake'} (3.12.7)"
    assert lines[1].startswith("deploy/dev: installing reconciler and its test tools")
    assert "(about a minute)" in lines[1]
    assert lines[2] == "deploy/dev: ready: reconciler 9.9.9 ran: --version"
    assert len(lines) == 3
    assert (project / "pip.log").read_text().split() == [
        "install", "-q", "--disable-pip-version-check", "-e", ".[dev]",
    ]  # fmt: skip
    assert first.stdout == "reconciler 9.9.9 ran: --version\n"

    second = dev(project, "validate", "specs")
    assert (second.returncode, second.stderr) == (0, "")
    assert second.stdout == "reconciler 9.9.9 ran: validate specs\n"


def test_a_changed_pyproject_is_announced_as_an_update(tmp_path: Path) -> None:
    project = make_project(tmp_path)
    assert dev(project, "--version").returncode == 0
    stamp = project / ".venv" / ".installed"
    os.utime(stamp, (1_000_000, 1_000_000))  # older than pyproject.toml
    again = dev(project, "--version")
    assert again.returncode == 0
    assert again.stderr.splitlines()[0] == (
        "deploy/dev: pyproject.toml changed: updating reconciler and its test tools in .venv"
    )
    assert "creating" not in again.stderr


STAND_INS = {
    # root, with apt-get and systemd: what the install does is recorded, nothing is installed.
    "id": "#!/usr/bin/env bash\necho 0\n",
    "apt-get": (
        "#!/usr/bin/env bash\n"
        'echo "apt-get $* policy=$(cat "$DEPLOY_DEV_POLICY_RC_D" 2>/dev/null | tail -1)"'
        ' >> "$LOG"\n'
    ),
    "systemctl": '#!/usr/bin/env bash\necho "systemctl $*" >> "$LOG"\n',
}


def test_the_demo_installs_named_with_its_service_left_off(tmp_path: Path) -> None:
    """Debian starts and enables named (port 53, every address) when bind9 is installed: the
    demo needs only the binary, so no service starts while apt-get runs (a policy-rc.d that
    says 101, removed after) and the unit is disabled and stopped after."""
    project = make_project(tmp_path)
    assert dev(project, "--version").returncode == 0
    tools = tmp_path / "bin"
    tools.mkdir()
    for name, text in STAND_INS.items():
        (tools / name).write_text(text)
        (tools / name).chmod(0o755)
    log, policy = tmp_path / "install.log", tmp_path / "policy-rc.d"
    env = {
        **os.environ,
        "PYTHON": str(project.parent / "python3-fake"),
        "PATH": f"{tools}:/usr/bin:/bin",  # the stand-ins, and no named (Debian's is in sbin)
        "DEPLOY_DEV_SBIN": str(tmp_path / "no-sbin"),
        "DEPLOY_DEV_POLICY_RC_D": str(policy),
        "LOG": str(log),
    }
    done = subprocess.run(
        ["bash", str(project / "deploy" / "dev"), "demo"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "installing bind9 (apt-get) for the demo's DNS records; its named service left off" in (
        done.stderr
    )
    assert log.read_text().splitlines() == [
        "apt-get install -y -qq bind9 policy=exit 101",
        "systemctl disable --now named",
    ]
    assert not policy.exists()  # put back as it was: there was none
    assert done.stdout == "reconciler 9.9.9 ran: demo\n"
