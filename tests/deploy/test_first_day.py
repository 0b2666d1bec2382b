"""The first day, end to end (issue 17): what a new user does, from a clone to a converged lab
of their own, an estate brought in and the service keeping it, with the commands the README
gives, read from the README itself so that it cannot drift from what works.

1. the package: a `git clone` of this repository, tagged there, built as a wheel and installed
   alone into a fresh virtualenv (tests/deploy/packaging.py); from then on every command is
   that venv's `reconciler`, run in a temporary home;
2. the README's first screen: its block of five commands, run as written but for what a test
   must change (the install is the wheel's; the lab takes a free port, whose URL replaces
   8006; `~` is the temporary home). The files `init` writes validate against the JSON Schema
   (`reconciler schema`, checked with jsonschema) and pass `reconciler validate`; then, as the
   README goes on, the first guest is uncommented, `plan` shows it, `apply` creates it
   (confirmed with `yes` in a terminal, as a user does) and a second plan has no change;
3. two guests made by hand through the Proxmox API (proxmoxer with the lab's CA and password,
   as curl or pvesh would), then the README's import-merge-adopt block, run on the user's own
   spec directory: a plan of that spec then has them as its own, with no change, nothing
   foreign and no warning;
4. a hand edit drifts one of them; `reconciler run --once` heals it, and a second one finds the
   platform converged;
5. Ctrl-C stops the lab, which keeps nothing; `finally` stops whatever still runs.

A step that does not work as the README says fails here, naming the README's command.
"""

from __future__ import annotations

import json
import os
import pty
import re
import shlex
import shutil
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import yaml
from proxmoxer import ProxmoxAPI

from tests.cli.test_lab import LabProcess
from tests.deploy.packaging import (
    Venv,
    build_wheel,
    cloned_checkout,
    install_in_fresh_venv,
    wheel_metadata,
)
from tests.waiting import wait_for

TAG, VERSION = "v9.8.7", "9.8.7"
README_URL = "https://127.0.0.1:8006"  # the lab's URL in the README: PVE's port
README_SPECS = "specs"  # the spec directory of the README's import block
HAND_MADE = {"mc-lobby": 1000, "mc-survival": 1001}  # in init's `game` range (1000-1099)
FENCE = re.compile(r"^```sh\n(.*?)^```", re.MULTILINE | re.DOTALL)
EXPORT = re.compile(r'`(export (\w+)="\$\(cat ([^)`]+)\)")`')


# --- the README ------------------------------------------------------------------------------


def commands_of(block: str) -> list[list[str]]:
    text = block.replace("\\\n", " ")
    return [argv for line in text.splitlines() if (argv := shlex.split(line, comments=True))]


def block_with(text: str, start: str, where: str) -> list[list[str]]:
    """The commands of the first ```sh block in `text` that has a command starting `start`."""
    for fence in FENCE.finditer(text):
        commands = commands_of(fence.group(1))
        if any(shlex.join(c).startswith(start) for c in commands):
            return commands
    raise AssertionError(f"README.md: no ```sh block with a `{start} ...` command in {where}")


def section(readme: str, heading: str) -> str:
    start = readme.find(f"\n## {heading}")
    assert start >= 0, f"README.md: no section `## {heading}`"
    end = readme.find("\n## ", start + 1)
    return readme[start : end if end >= 0 else None]


def first_screen(readme: str) -> tuple[list[list[str]], str]:
    """The five commands of the README's first screen (before its first section), and the
    first screen's text."""
    screen = readme[: readme.find("\n## ")]
    commands = block_with(screen, "reconciler lab", "its first screen (before the first `## `)")
    assert len(commands) == 5, f"README.md: the first screen's block has {commands}, not five"
    return commands, screen


# --- the user --------------------------------------------------------------------------------


@dataclass
class User:
    """A new user in a home of their own, with the venv's `reconciler` on PATH."""

    home: Path
    env: dict[str, str]
    reconciler: str
    lab_url: str = README_URL

    def argv(self, command: Sequence[str], specs: str = README_SPECS) -> list[str]:
        """A README command as this test runs it: `~` is this home, the lab's URL the one the
        lab printed, and `specs` (of the import block) the user's spec directory."""
        assert command[0] == "reconciler", f"README.md: `{shlex.join(command)}` is not ours"
        return [self.reconciler] + [self.expand(a, specs) for a in command[1:]]

    def expand(self, arg: str, specs: str = README_SPECS) -> str:
        if arg.rstrip("/") == README_SPECS:
            return specs
        arg = arg.replace(README_URL, self.lab_url)
        return str(self.home) + arg[1:] if arg.startswith("~/") else arg

    def run(
        self, argv: Sequence[str], *, said: Sequence[str] | None = None, expect: int = 0
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv`; `apply` and `adopt` in a terminal where the user types `yes`. `said`:
        the README's command it comes from, named when the exit code is not `expect`."""
        if argv[1] in ("apply", "adopt"):
            done = in_terminal(argv, self.home, self.env, answer="yes\n")
        else:
            done = subprocess.run(
                argv,
                cwd=self.home,
                env=self.env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
        what = f"README.md's `{shlex.join(said)}`" if said else f"`{shlex.join(argv[1:])}`"
        assert done.returncode == expect, (
            f"{what} (run as `reconciler {shlex.join(argv[1:])}`) exited {done.returncode}, "
            f"not {expect}:\n{done.stdout}{done.stderr}"
        )
        return done


def in_terminal(
    argv: Sequence[str], cwd: Path, env: dict[str, str], answer: str
) -> subprocess.CompletedProcess[str]:
    """`argv` with a terminal as its stdin, on which `answer` is typed ahead (stdout and
    stderr still captured)."""
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=terminal,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        os.write(controller, answer.encode())
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
    finally:
        os.close(terminal)
        os.close(controller)
    return subprocess.CompletedProcess(list(argv), proc.returncode, out, err)


def start_lab(argv: list[str], user: User) -> LabProcess:
    proc = subprocess.Popen(
        argv,
        cwd=user.home,
        env=user.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return LabProcess.started(proc)


# --- checks ----------------------------------------------------------------------------------


def installs_as_the_readme_says(command: list[str], wheel: Path, venv: Venv) -> None:
    """The README's install command names the clone (`.`) and extras the wheel provides, whose
    requirements the venv has: what `pipx install '.[lab]'` would have installed."""
    assert command[:2] in (["pipx", "install"], ["pip", "install"]), (
        f"README.md: the first command `{shlex.join(command)}` is not a pipx or pip install"
    )
    found = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", command[-1])
    assert found, f"README.md: `{shlex.join(command)}` does not install the clone (`.`)"
    metadata = wheel_metadata(wheel)
    needed: list[str] = []
    for extra in (found.group(1) or "").split(","):
        if extra:
            assert f"Provides-Extra: {extra}\n" in metadata, f"the wheel has no extra {extra!r}"
            needed += re.findall(
                rf'^Requires-Dist: ([\w.-]+).*; extra == "{extra}"$', metadata, re.MULTILINE
            )
    probe = "import importlib.metadata as m, sys; [m.version(n) for n in sys.argv[1:]]"
    done = subprocess.run(
        [str(venv.python), "-c", probe, *needed], env=venv.env(), capture_output=True, text=True
    )
    assert done.returncode == 0, f"the venv lacks what {command[-1]} needs: {done.stderr}"


def schema_errors(user: User, directory: Path) -> list[str]:
    """Each spec file of `directory` checked against the installed `reconciler schema`."""
    schema = json.loads(user.run([user.reconciler, "schema"]).stdout)
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    files = sorted(directory.glob("*.yaml"))
    assert files, f"no spec file in {directory}"
    return [
        f"{path.name}: {'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message[:200]}"
        for path in files
        for e in validator.iter_errors(yaml.safe_load(path.read_text()))
    ]


def validates(user: User, directory: Path) -> None:
    assert schema_errors(user, directory) == []
    done = user.run([user.reconciler, "validate", directory.name])
    assert done.stdout.startswith(f"{directory.name}: valid "), done.stdout + done.stderr


def uncomment_first_guest(profiles: Path) -> str:
    """As the README says: the commented guest at the end of profiles.yaml, uncommented; its
    name."""
    lines = profiles.read_text().splitlines()
    assert "# guests:" in lines, f"{profiles}: no commented `guests:` at its end"
    at = lines.index("# guests:")
    assert all(line.startswith("# ") for line in lines[at:]), lines[at:]
    profiles.write_text("\n".join(lines[:at] + [line[2:] for line in lines[at:]]) + "\n")
    (name,) = yaml.safe_load(profiles.read_text())["guests"]
    return str(name)


def plan_json(user: User, specs: str) -> dict[str, Any]:
    done = user.run([user.reconciler, "plan", specs, "--format", "json", "--detailed-exitcode"])
    plan: dict[str, Any] = json.loads(done.stdout)
    return plan


def finished(pve: ProxmoxAPI, node: str, upid: str) -> None:
    task = pve.nodes(node).tasks(upid).status
    status = wait_for(lambda: (s := task.get())["status"] == "stopped" and s, f"task {upid}")
    assert status["exitstatus"] == "OK", status


def run_once(user: User, specs: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """`reconciler run --once` (its log is JSON lines on stderr): its cycle and changes."""
    state_dir = ["--state-dir", str(user.home / "state")]
    done = user.run(
        [user.reconciler, "run", specs, "--once", "--listen", "127.0.0.1:0", *state_dir]
    )
    events = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    (cycle,) = [e for e in events if e["event"] == "cycle"]
    return cycle, [e for e in events if e["event"] == "change"]


# --- the test --------------------------------------------------------------------------------


def test_a_new_user_gets_from_a_clone_to_a_converged_lab_of_their_own(tmp_path: Path) -> None:
    # 1. The package, from a clone, into a fresh venv: only its `reconciler` from here on.
    clone = cloned_checkout(tmp_path / "clone", TAG)
    wheel = build_wheel(clone, tmp_path / "dist")
    venv = install_in_fresh_venv(wheel, tmp_path / "venv")
    home = tmp_path / "home"
    home.mkdir()
    env = {
        k: v for k, v in venv.env().items() if not k.startswith(("RECONCILER_", "PVE_", "PROXMOX_"))
    }
    env |= {"HOME": str(home), "NO_COLOR": "1"}
    reconciler = shutil.which("reconciler", path=env["PATH"])
    assert reconciler == str(venv.bin / "reconciler"), reconciler
    user = User(home, env, reconciler)
    assert user.run([reconciler, "--version"]).stdout == f"reconciler {VERSION}\n"
    where = user.run([str(venv.python), "-c", "import reconciler; print(reconciler.__file__)"])
    assert where.stdout.startswith(str(venv.site)), where.stdout

    readme = (clone / "README.md").read_text()
    (install, lab_command, init, plan, apply), screen = first_screen(readme)
    installs_as_the_readme_says(install, wheel, venv)
    assert [c[:2] for c in (lab_command, init, plan, apply)] == [
        ["reconciler", "lab"],
        ["reconciler", "init"],
        ["reconciler", "plan"],
        ["reconciler", "apply"],
    ], "README.md: the first screen's commands after the install are not lab, init, plan, apply"
    specs = init[2]  # init's DIR, which plan and apply name
    platform = init[init.index("--name") + 1] if "--name" in init else specs
    assert plan[2:] == apply[2:] == [specs], (plan, apply)

    # 2. The lab, in the background, waited for on what it prints.
    argv = user.argv(lab_command)
    if "--port" in argv:
        argv[argv.index("--port") + 1] = "0"
    else:
        argv += ["--port", "0"]
    lab = start_lab(argv, user)
    try:
        flags = lab.flags()
        assert flags[0] == "--proxmox-url" and flags[2:4] == ["--proxmox-user", "root@pam"], flags
        assert flags[4] == "--ca-file", flags
        user.lab_url, ca_file = flags[1], Path(flags[5])
        assert ca_file == Path(user.expand(lab_command[lab_command.index("--ca-file") + 1]))
        # The second shell takes the password as the README says, and the lab prints it so.
        export = EXPORT.search(" ".join(screen.split()))  # a code span may wrap
        assert export, 'README.md: the first screen names no `export VAR="$(cat FILE)"`'
        line, variable, password_file = export.groups()
        assert f"  {line.replace('~/', f'{home}/')}\n" in lab.lines, lab.text()
        password = Path(user.expand(password_file)).read_text().strip()
        user.env[variable] = password

        user.run(user.argv(init), said=init)
        validates(user, home / specs)
        assert "No changes" in user.run(user.argv(plan), said=plan).stdout
        user.run(user.argv(apply), said=apply)

        first = uncomment_first_guest(home / specs / "profiles.yaml")
        assert f"+ guest/{first} " in user.run(user.argv(plan), said=plan).stdout
        applied = user.run(user.argv(apply), said=apply)
        assert "Apply: 1 done, 0 failed, 0 skipped" in applied.stdout + applied.stderr
        converged = plan_json(user, specs)
        assert converged["summary"]["no-op"] == 1, converged["summary"]

        # 3. Two guests made by hand on the lab's cluster, brought in, merged and adopted.
        url = urlsplit(user.lab_url)
        (login,) = re.findall(r"^  user +([^,\s]+),", lab.text(), re.MULTILINE)
        (template,) = re.findall(r"^  templates +(\S+)", lab.text(), re.MULTILINE)
        pve = ProxmoxAPI(
            url.hostname, port=url.port, user=login, password=password, verify_ssl=str(ca_file)
        )
        nodes = sorted(n["node"] for n in pve.nodes.get())
        where_made = dict(zip(HAND_MADE, (nodes[0], nodes[-1]), strict=True))
        for name, vmid in HAND_MADE.items():
            upid = pve.nodes(where_made[name]).lxc.post(
                vmid=vmid,
                hostname=name,
                ostemplate=template,
                cores=2,
                memory=2048,
                swap=512,
                rootfs="local-lvm:8",
                net0="name=eth0,bridge=vmbr0,ip=dhcp",
                unprivileged=1,
                start=1,
            )
            finished(pve, where_made[name], upid)

        steps = block_with(
            section(readme, "Bringing an existing estate"),
            "reconciler merge",
            'section "Bringing an existing estate"',
        )
        assert [c[1] for c in steps] == ["import", "plan", "merge", "adopt"], steps
        addresses = [f"guest/{name}" for name in HAND_MADE]
        for step in steps:
            argv = user.argv(step, specs)
            if step[1] == "adopt":  # the README adopts one guest: here both
                argv = [a for a in argv if not a.startswith("guest/")] + addresses
            done = user.run(argv, said=step)
            if step[1] == "plan":  # the import, on its own: no change, both only reported
                assert "No changes" in done.stdout, done.stdout
                for address in addresses:
                    assert f"{address} matches guest" in done.stdout, done.stdout
                    assert "(adoption-pending)" in done.stdout
            if step[1] == "merge":
                validates(user, home / specs)
        for name, vmid in HAND_MADE.items():
            config = pve.nodes(where_made[name]).lxc(vmid).config.get()
            mark = f"platform={platform} address=guest/{name} "
            assert mark in config.get("description", ""), config

        plan_of_specs = plan_json(user, specs)  # exit 0: no change
        actions = {c["address"]: c["action"] for c in plan_of_specs["changes"]}
        # The import declared the template the hand-made guests use (it is on the node).
        templates = {a for a in actions if a.startswith("template/")}
        assert len(templates) == 1, actions
        assert actions == {
            f"guest/{first}": "no-op",
            **dict.fromkeys(addresses, "no-op"),
            **dict.fromkeys(templates, "no-op"),
        }
        assert plan_of_specs["foreign"] == []
        assert plan_of_specs["diagnostics"] == []  # no orphan, nothing adoption-pending

        # 4. The service: a hand edit drifts a guest; one cycle heals it, the next has nothing.
        drifted = pve.nodes(where_made["mc-survival"]).lxc(HAND_MADE["mc-survival"])
        drifted.config.put(memory=4096)
        cycle, changes = run_once(user, specs)
        assert (cycle["kind"], cycle["outcome"], cycle["drift"]) == ("full", "changed", 1), cycle
        assert [(c["address"], c["action"], c["outcome"]) for c in changes] == [
            ("guest/mc-survival", "update", "done")
        ]
        assert int(drifted.config.get()["memory"]) == 2048
        cycle, changes = run_once(user, specs)
        assert (cycle["outcome"], cycle["drift"], changes) == ("converged", 0, []), cycle

        # 5. Ctrl-C: the lab stops and keeps nothing.
        lab.proc.send_signal(signal.SIGINT)
        assert lab.proc.wait(30) == 0, "".join(lab.errors)
        assert not ca_file.exists() and not Path(user.expand(password_file)).exists()
    finally:
        lab.stop()
