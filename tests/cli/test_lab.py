"""`reconciler lab` as a user runs it: started as a process, it prints the flags that point the
CLI at it; `observe`, `plan` and `apply` run with exactly those flags see its nodes, storages
and template and converge a platform on it; Ctrl-C (or SIGTERM) stops fakepve and removes the
files the lab wrote. Flags it cannot use are refused before anything starts, naming the flag.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from reconciler.cli.lab import CA_MARKER
from reconciler.cli.main import main
from tests.waiting import wait_for

RECONCILER = str(Path(sys.executable).parent / "reconciler")
TEMPLATE = "local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst"

PLATFORM = """\
platform: {name: mylab, owner_tag: reconciler, default_storage: local-lvm}
layers:
  apps: {}
hosts:
  pve1: {layers: [apps], capacity: {cores: 8, memory: 16G}}
  %(second)s: {layers: [apps], capacity: {cores: 8, memory: 16G}}
ranges:
  app: {first: 100, last: 199, layer: apps}
guests:
  web:
    role: app
    host: %(second)s
    template: %(template)s
    memory: 512M
    network:
      - {name: eth0, bridge: vmbr0, ip: dhcp}
"""


@dataclass
class LabProcess:
    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    readers: list[threading.Thread] = field(default_factory=list)

    def text(self) -> str:
        return "".join(self.lines)

    def flags(self) -> list[str]:
        """The connection flags, as printed: the line that starts with --proxmox-url."""
        line = wait_for(
            lambda: (
                next((x for x in self.lines if x.startswith("  --proxmox-url ")), None)
                or self.failed()
            ),
            "the lab's flags line",
        )
        return shlex.split(line)

    def failed(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"the lab exited {self.proc.returncode}: {''.join(self.errors)}")

    @classmethod
    def started(cls, proc: subprocess.Popen[str]) -> LabProcess:
        """`proc` (stdout and stderr piped), its output read as it comes."""
        lab = cls(proc)
        for stream, into in ((proc.stdout, lab.lines), (proc.stderr, lab.errors)):
            reader = threading.Thread(target=_read, args=(stream, into), daemon=True)
            reader.start()
            lab.readers.append(reader)
        return lab

    def stop(self) -> None:
        """As Ctrl-C: the lab stops its fakepve; killed if it does not end."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait(15)
        for reader in self.readers:
            reader.join(10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def _read(stream: object, into: list[str]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        into.append(line)


@pytest.fixture
def start_lab(tmp_path: Path) -> Iterator[object]:
    started: list[LabProcess] = []

    def start(*argv: str, env: dict[str, str] | None = None) -> LabProcess:
        environ = {k: v for k, v in os.environ.items() if k != "PVE_PASSWORD"}
        proc = subprocess.Popen(
            [RECONCILER, "lab", *argv],
            cwd=tmp_path,
            env={**environ, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        lab = LabProcess.started(proc)
        started.append(lab)
        return lab

    yield start
    for lab in started:
        lab.stop()


def cli(
    *argv: str, cwd: Path, password_env: str = "PVE_PASSWORD", password: str = ""
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PVE_PASSWORD"}
    env[password_env] = password
    return subprocess.run(
        [RECONCILER, *argv],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )


def refuses_connections(url: str) -> bool:
    host, port = url.removeprefix("https://").rsplit(":", 1)
    with socket.socket() as s:
        return s.connect_ex((host, int(port))) != 0


def test_the_printed_flags_observe_plan_and_converge_a_platform(
    start_lab: object, tmp_path: Path
) -> None:
    lab = start_lab(  # type: ignore[operator]
        "--nodes", "pve1,pve2", "--port", "0", "--ca-file", "ca.pem",
        "--storage", "backup=backup", "--storage", "shared-ct=images,rootdir",
    )  # fmt: skip
    flags = lab.flags()
    assert flags[0] == "--proxmox-url"
    assert flags[2:] == ["--proxmox-user", "root@pam", "--ca-file", str(tmp_path / "ca.pem")]
    url = flags[1]
    ca, password_file = tmp_path / "ca.pem", tmp_path / "lab-password"
    assert ca.read_text().startswith(CA_MARKER + "\n-----BEGIN CERTIFICATE-----")
    assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
    password = password_file.read_text().strip()
    # The password is in the file, never in what the lab prints; the export line reads it.
    assert password not in lab.text() + "".join(lab.errors)
    assert f'export PVE_PASSWORD="$(cat {password_file})"' in lab.text()

    # The next steps it prints (init writes the connection into the spec) work as printed.
    text = lab.text()
    steps = [
        shlex.split(line)[1:]
        for line in text[text.index("Next:") :].splitlines()
        if line.startswith("  reconciler ")
    ]
    assert [s[0] for s in steps] == ["init", "plan", "apply"]
    for step in steps:
        done = cli(*step, cwd=tmp_path, password=password)
        assert done.returncode == 0, f"{step}: {done.stdout}{done.stderr}"
    assert "No changes" in done.stdout  # init's platform has no guests yet

    spec = tmp_path / "mylab"
    spec.mkdir()
    (spec / "platform.yaml").write_text(PLATFORM % {"second": "pve2", "template": TEMPLATE})

    observed = cli("observe", "mylab", *flags, cwd=tmp_path, password=password)
    assert observed.returncode == 0, observed.stderr
    cluster = json.loads(observed.stdout)["cluster"]["nodes"]
    assert sorted(cluster) == ["pve1", "pve2"]
    assert {"local", "local-lvm", "backup", "shared-ct"} <= set(cluster["pve2"]["storages"])

    plan = cli("plan", "mylab", *flags, "--detailed-exitcode", cwd=tmp_path, password=password)
    assert plan.returncode == 2, plan.stderr
    assert "+ guest/web  (vmid 100 on pve2)" in plan.stdout

    applied = cli("apply", "mylab", *flags, "--auto-approve", cwd=tmp_path, password=password)
    assert applied.returncode == 0, applied.stderr + applied.stdout
    again = cli("plan", "mylab", *flags, "--detailed-exitcode", cwd=tmp_path, password=password)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "No changes" in again.stdout

    lab.proc.send_signal(signal.SIGINT)
    assert lab.proc.wait(30) == 0
    assert not ca.exists() and not password_file.exists()
    assert refuses_connections(url)


def test_a_spec_naming_a_node_the_lab_lacks_is_told_which_it_has(
    start_lab: object, tmp_path: Path
) -> None:
    """The password from a variable the user names; the flags then name that variable."""
    lab = start_lab(  # type: ignore[operator]
        "--nodes", "pve1,pve2", "--port", "0", "--ca-file", "ca.pem",
        "--password-env", "LAB_PW",
        env={"LAB_PW": "chosen-pw"},
    )  # fmt: skip
    flags = lab.flags()
    assert flags[-2:] == ["--proxmox-password-env", "LAB_PW"]
    assert not (tmp_path / "lab-password").exists()
    assert "chosen-pw" not in lab.text()
    spec = tmp_path / "mylab"
    spec.mkdir()
    (spec / "platform.yaml").write_text(PLATFORM % {"second": "pve3", "template": TEMPLATE})
    plan = cli("plan", "mylab", *flags, cwd=tmp_path, password_env="LAB_PW", password="chosen-pw")
    assert plan.returncode == 1
    assert "pve3" in plan.stdout + plan.stderr
    assert "pve1, pve2" in plan.stdout + plan.stderr
    lab.proc.terminate()
    assert lab.proc.wait(30) == 0
    assert not (tmp_path / "ca.pem").exists()


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--nodes", "pve1,pve_2"], "--nodes 'pve1,pve_2': 'pve_2' is not a node name"),
        (["--nodes", "pve1,pve1"], "a node is named twice"),
        (["--storage", "backup"], "--storage 'backup': expected NAME=CONTENT"),
        (["--storage", "nfs=images,disks"], "not disks"),
        (["--storage", "local=images"], "storage 'local' exists already"),
        (["--ca-file", "no/such/dir/ca.pem"], "does not exist"),
        (["--port", "70000"], "--port 70000: not a port"),
    ],
)
def test_flags_it_cannot_use_are_refused_before_anything_starts(
    argv: list[str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["lab", "--port", "0", *argv]) == 1
    err = capsys.readouterr().err
    assert message in err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_a_taken_port_is_refused(
    taken_port: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["lab", "--port", str(taken_port)]) == 1
    assert f"--port {taken_port}: 127.0.0.1:{taken_port} is taken" in capsys.readouterr().err


def test_a_file_the_lab_did_not_write_is_never_overwritten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    real = tmp_path / "pve-root-ca.pem"
    real.write_text("-----BEGIN CERTIFICATE-----\nthe cluster's\n-----END CERTIFICATE-----\n")
    assert main(["lab", "--port", "0", "--ca-file", str(real)]) == 1
    assert "is not a CA an earlier lab wrote" in capsys.readouterr().err
    assert "the cluster's" in real.read_text()


def test_a_vm_template_for_specs_that_clone(start_lab: object, tmp_path: Path) -> None:
    """--vm-template: the cloud-init template the example's bastion clones, made in the lab as
    an operator makes one, and said in what the lab prints."""
    lab = start_lab(  # type: ignore[operator]
        "--nodes", "pve1,pve2", "--port", "0", "--ca-file", "ca.pem", "--vm-template",
        env={"PVE_PASSWORD": "lab-pw"},
    )  # fmt: skip
    flags = lab.flags()
    assert any("VM template 200 debian-12-cloudinit on pve1" in line for line in lab.lines)
    spec = tmp_path / "mylab"
    spec.mkdir()
    (spec / "platform.yaml").write_text(PLATFORM % {"second": "pve2", "template": TEMPLATE})
    observed = cli("observe", "mylab", *flags, cwd=tmp_path, password="lab-pw")
    assert observed.returncode == 0, observed.stderr
    template = [r for r in json.loads(observed.stdout)["resources"] if r["id"].get("vmid") == 200]
    assert template and template[0]["attributes"]["template"]
