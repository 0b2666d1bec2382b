"""The deployment files under deploy/ (and .pre-commit-hooks.yaml) against the real CLI.

Every `reconciler ...` command they hold must parse with the parser `reconciler` itself uses, so
renaming a flag breaks these tests and not a production unit or a CI pipeline. The YAML files
must load; the systemd unit must carry its hardening and pass `systemd-analyze verify` (on a
copy whose ExecStart points at a binary that exists here); the compose file and the workflow
must keep the properties the deployment relies on.
"""

from __future__ import annotations

import http.server
import re
import shlex
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from reconciler.cli.main import parser

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy/systemd/reconciler.service"
DOCKERFILE = ROOT / "deploy/docker/Dockerfile"
COMPOSE = ROOT / "deploy/docker/compose.yaml"
GITHUB = ROOT / "deploy/ci/github-plan.yml"
GITLAB = ROOT / "deploy/ci/gitlab-ci.yml"
HOOKS = ROOT / ".pre-commit-hooks.yaml"
PRECOMMIT_EXAMPLE = ROOT / "deploy/pre-commit-config.example.yaml"
YAML_FILES = [COMPOSE, GITHUB, GITLAB, HOOKS, PRECOMMIT_EXAMPLE]

MARKER = "<!-- reconciler-plan -->"


# --- helpers ---------------------------------------------------------------------------------


def parse_cli(argv: list[str], where: str) -> Any:
    """Parse argv (without the program name) with the real parser; a refusal fails the test
    naming the line it came from, instead of exiting pytest's process."""
    try:
        return parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"{where}: `reconciler {shlex.join(argv)}` does not parse (exit {exc.code})")


_COMMAND_START = {"&&", "||", ";", "|", "(", "then", "do", "else", "!", "exec", "time"}
_SHELL_STOP = {"&&", "||", ";", "|", "&", ")", ";;"}


def shell_commands(script: str) -> list[list[str]]:
    """The argv (after the program) of every `reconciler` command in a shell script. Quoted
    mentions (`"reconciler @ git+..."`, messages) are single tokens and do not count."""
    found: list[list[str]] = []
    for line in script.replace("\\\n", " ").splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        lex.commenters = "#"
        tokens = list(lex)
        for i, token in enumerate(tokens):
            at_start = i == 0 or tokens[i - 1] in _COMMAND_START
            if not (at_start and (token == "reconciler" or token.endswith("/reconciler"))):
                continue
            argv: list[str] = []
            for t in tokens[i + 1 :]:
                if t in _SHELL_STOP:
                    break
                if t.startswith((">", "<")):  # a redirection: the command's words are over
                    if argv and argv[-1].isdigit():  # `2> file`: the 2 was no argument
                        argv.pop()
                    break
                argv.append(t)
            found.append(argv)
    return found


def unit_entries(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) of a systemd unit, continuation lines joined."""
    entries: list[tuple[str, str, str]] = []
    section = ""
    for line in re.sub(r"\\\n\s*", " ", text).splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def unit_values(key: str) -> list[str]:
    return [v for _, k, v in unit_entries(UNIT.read_text()) if k == key]


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def workflow_scripts(path: Path) -> list[str]:
    doc = load(path)
    if path == GITHUB:
        return [
            step["run"] for job in doc["jobs"].values() for step in job["steps"] if "run" in step
        ]
    scripts: list[str] = []
    for job in doc.values():
        if isinstance(job, dict):
            for part in ("before_script", "script", "after_script"):
                scripts.extend(job.get(part, []))
    return scripts


# --- every command line parses -----------------------------------------------------------------


def test_unit_exec_start_parses() -> None:
    (exec_start,) = unit_values("ExecStart")
    program, *argv = shlex.split(exec_start)
    assert program == "/opt/reconciler/venv/bin/reconciler"
    args = parse_cli(argv, f"{UNIT.name} ExecStart")
    assert args.command == "run"
    assert args.state_dir == "/var/lib/reconciler"


def test_unit_stops_later_than_the_shutdown_grace() -> None:
    (exec_start,) = unit_values("ExecStart")
    args = parse_cli(shlex.split(exec_start)[1:], f"{UNIT.name} ExecStart")
    (timeout,) = unit_values("TimeoutStopSec")
    assert float(timeout.removesuffix("s")) > args.shutdown_grace


def test_dockerfile_entrypoint_and_cmd_parse() -> None:
    import json

    ins = dockerfile_instructions(DOCKERFILE.read_text())
    entrypoint = json.loads([v for k, v in ins if k == "ENTRYPOINT"][-1])
    cmd = json.loads([v for k, v in ins if k == "CMD"][-1])
    assert entrypoint == ["reconciler"]
    args = parse_cli(cmd, f"{DOCKERFILE.name} CMD")
    assert args.command == "run"


def test_compose_command_parses() -> None:
    services = load(COMPOSE)["services"]
    args = parse_cli(services["reconciler"]["command"], f"{COMPOSE.name} reconciler.command")
    assert args.command == "run"
    grace = services["reconciler"]["stop_grace_period"]
    assert float(grace.removesuffix("s")) > args.shutdown_grace


@pytest.mark.parametrize("path", [GITHUB, GITLAB], ids=lambda p: p.name)
def test_workflow_commands_parse(path: Path) -> None:
    commands = [argv for script in workflow_scripts(path) for argv in shell_commands(script)]
    names = [argv[0] for argv in commands if argv]
    # Not vacuous: the pipeline says what it installed, validates and plans.
    assert ["--version"] in commands, f"{path.name}: found {commands}"
    assert "validate" in names and "plan" in names, f"{path.name}: found {commands}"
    for argv in commands:
        if argv == ["--version"]:
            continue
        args = parse_cli(argv, path.name)
        if args.command == "plan":
            assert args.observed == "observed.json"
            assert args.format == "markdown" and args.detailed_exitcode


def test_pre_commit_entry_parses() -> None:
    (hook,) = load(HOOKS)
    assert hook["id"] == "reconciler-validate"
    program, *argv = shlex.split(hook["entry"])
    assert program == "reconciler"
    args = parse_cli([*argv, *hook.get("args", [])], f"{HOOKS.name} entry")
    assert args.command == "validate"
    assert hook["language"] == "python" and hook["pass_filenames"] is False
    pattern = re.compile(hook["files"])
    assert pattern.search("specs/game.yaml") and pattern.search("specs/sub/dev.yml")
    assert not pattern.search("deploy/docker/compose.yaml")


def test_pre_commit_example_runs_the_hook_as_declared() -> None:
    """The example's local hook (the reconciler on PATH) is the declared hook, run by the
    system's reconciler instead of one pre-commit installs."""
    (repo,) = load(PRECOMMIT_EXAMPLE)["repos"]
    assert repo["repo"] == "local"
    (hook,) = repo["hooks"]
    (declared,) = load(HOOKS)
    assert hook["language"] == "system"
    same = ("id", "entry", "files", "pass_filenames", "require_serial")
    assert {k: hook[k] for k in same} == {k: declared[k] for k in same}


def test_shell_commands_finds_what_it_should() -> None:
    script = (
        'pip install "reconciler @ git+https://x/y@v1"\n'
        "set +e; reconciler plan specs --observed o.json > plan.md 2> plan.err\n"
        "/opt/venv/bin/reconciler validate \\\n  specs --format github  # annotate\n"
        'echo "reconciler run is not a command here"\n'
    )
    assert shell_commands(script) == [
        ["plan", "specs", "--observed", "o.json"],
        ["validate", "specs", "--format", "github"],
    ]


def test_a_bad_flag_fails() -> None:
    with pytest.raises(pytest.fail.Exception, match="--no-such-flag"):
        parse_cli(["run", "--no-such-flag"], "here")


# --- the YAML files and what they promise ------------------------------------------------------


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.name)
def test_yaml_loads(path: Path) -> None:
    assert load(path)


def test_github_workflow_triggers_comments_and_permissions() -> None:
    doc = load(GITHUB)
    on = doc.get("on", doc.get(True))  # YAML 1.1 reads a bare `on` as true
    assert on["pull_request"]["paths"] == ["specs/**"]
    assert doc["permissions"] == {"contents": "read", "pull-requests": "write"}
    text = GITHUB.read_text()
    assert MARKER in text
    assert "pull_request_target" not in yaml.safe_dump(doc)
    script = next(
        s["with"]["script"]
        for s in doc["jobs"]["plan"]["steps"]
        if s.get("uses", "").startswith("actions/github-script@")
    )
    assert "updateComment" in script and "createComment" in script


def test_gitlab_pipeline_is_for_merge_requests_and_keeps_one_note() -> None:
    doc = load(GITLAB)
    job = doc["reconciler-plan"]
    assert job["rules"][0]["if"] == '$CI_PIPELINE_SOURCE == "merge_request_event"'
    assert job["rules"][0]["changes"] == ["specs/**/*"]
    text = "\n".join(job["script"])
    assert MARKER in text and '"PUT"' in text and '"POST"' in text


def test_compose_wiring() -> None:
    services = load(COMPOSE)["services"]
    redis, rec = services["redis"], services["reconciler"]
    assert redis["image"].startswith("redis:7") and "healthcheck" in redis
    assert rec["depends_on"]["redis"]["condition"] == "service_healthy"
    assert rec["environment"]["RECONCILER_REDIS_URL"] == "redis://redis:6379/0"
    assert rec["build"]["context"] == "../.."
    assert (COMPOSE.parent / rec["build"]["context"] / rec["build"]["dockerfile"]).is_file()
    # 9180 is published, and only on the host's loopback.
    assert rec["ports"], "the status port is not published"
    for port in rec["ports"]:
        assert str(port).startswith("127.0.0.1:"), f"{port} is published beyond loopback"
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port} beyond loopback"
    assert rec["read_only"] is True and "/tmp" in rec["tmpfs"]
    assert rec["env_file"], "secrets come from an env file"
    assert "standby" in COMPOSE.read_text()


def test_no_secret_in_the_image_or_the_unit() -> None:
    env_keys = [v.split("=", 1)[0] for v in unit_values("Environment")]
    for text, where in [(DOCKERFILE.read_text(), "Dockerfile"), ("\n".join(env_keys), "unit")]:
        assert "PVE_TOKEN_SECRET=" not in text, where
        assert "ZPACK_BRIDGE_SECRET=" not in text, where
    assert unit_values("EnvironmentFile") == ["-/etc/reconciler/env"]


def test_dockerfile_shape() -> None:
    ins = dockerfile_instructions(DOCKERFILE.read_text())
    froms = [v for k, v in ins if k == "FROM"]
    assert all(f.startswith("python:3.11-slim") for f in froms)
    users = [v for k, v in ins if k == "USER"]
    assert users and not users[-1].startswith(("root", "0")), "runs as root"
    runs = " ".join(v for k, v in ins if k == "RUN")
    assert "pip install" in runs and "[dev]" not in runs
    assert ("EXPOSE", "9180") in ins
    assert any(k == "VOLUME" and "/var/lib/reconciler" in v for k, v in ins)
    assert any(k == "HEALTHCHECK" and "/healthz" in v for k, v in ins)


def test_dockerignore_keeps_the_context_small() -> None:
    lines = (ROOT / ".dockerignore").read_text().split()
    for entry in [".venv", ".git", ".scratch", ".pytest_cache"]:
        assert entry in lines


# --- the image's health check works ----------------------------------------------------------


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[http.server.HTTPServer]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (503, False)])
def test_healthcheck_command(
    health_server: http.server.HTTPServer, status: int, healthy: bool, monkeypatch: Any
) -> None:
    import json
    import sys

    ins = dockerfile_instructions(DOCKERFILE.read_text())
    healthcheck = next(v for k, v in ins if k == "HEALTHCHECK")
    argv = json.loads(healthcheck[healthcheck.index("CMD") + 3 :])
    assert argv[0] == "python"
    monkeypatch.setattr(_Health, "status", status)
    port = health_server.server_address[1]
    proc = subprocess.run(
        [sys.executable, *argv[1:]],
        env={"RECONCILER_LISTEN": f"0.0.0.0:{port}"},
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert (proc.returncode == 0) is healthy, proc.stderr.decode()


# --- the systemd unit --------------------------------------------------------------------------

HARDENING = {
    "User": "reconciler",
    "DynamicUser": "no",
    "StateDirectory": "reconciler",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "NoNewPrivileges": "yes",
    "CapabilityBoundingSet": "",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "MemoryDenyWriteExecute": "yes",
    "LockPersonality": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "RestrictNamespaces": "yes",
    "RestrictSUIDSGID": "yes",
    "PrivateDevices": "yes",
    "Restart": "on-failure",
}


@pytest.mark.parametrize(("key", "value"), HARDENING.items(), ids=list(HARDENING))
def test_unit_hardening(key: str, value: str) -> None:
    assert value in unit_values(key), f"{key}={value} missing; has {unit_values(key)}"


def test_unit_system_call_filter() -> None:
    assert "@system-service" in unit_values("SystemCallFilter")


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """On a copy whose ExecStart is /bin/true (the venv does not exist here). Its warnings
    (an unknown key, a value it cannot parse) do not change its exit code, so any line it
    prints about the unit fails the test too."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is needed to check the unit (apt-get install systemd)"
    text = UNIT.read_text().replace(
        "ExecStart=/opt/reconciler/venv/bin/reconciler", "ExecStart=/bin/true"
    )
    assert "ExecStart=/bin/true" in text
    copy = tmp_path / "reconciler.service"
    copy.write_text(text)
    proc = subprocess.run(
        [analyze, "verify", "--man=no", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 0, output
    about_unit = [line for line in output.splitlines() if "reconciler.service" in line]
    assert not about_unit, "\n".join(about_unit)
