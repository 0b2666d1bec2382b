"""The connection flags (issue 17): each one given overrides its field of the spec's `proxmox`
section, the others stay the spec's (`merge_endpoint`, a table of cases); a flag that cannot
apply is an error naming it, on every command that takes the flags, before anything connects;
and a connection that fails says where and why, in one line, against fakepve and a port where
nothing listens."""

from __future__ import annotations

import argparse
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import certifi
import pytest

from reconciler.applying.connecting import ProxmoxOverride, merge_endpoint
from reconciler.cli.main import main, parser
from reconciler.model.errors import ConfigurationError
from reconciler.model.spec import ProxmoxApi, SecretRef

PASSWORD = SecretRef(env="SPEC_PW")
SECRET = SecretRef(env="SPEC_TOKEN")
TOKEN_SPEC = ProxmoxApi(
    url="https://pve.example.lan:8006",
    user="reconciler@pve",
    token_id="controller",
    token_secret=SECRET,
    ca_file="/etc/reconciler/ca.pem",
    max_concurrency=4,
)
PASSWORD_SPEC = ProxmoxApi(
    url="https://pve.example.lan:8006",
    user="ops@pve",
    password=PASSWORD,
    ca_file="/etc/reconciler/ca.pem",
    verify_tls=False,
)
FLAG_PW, FLAG_SECRET = SecretRef(env="FLAG_PW"), SecretRef(env="FLAG_TOKEN")
URL = "https://127.0.0.1:8006"

# (case, the spec's API, the flags, the fields that differ from the spec's; without a spec,
# the fields checked). Every field not listed stays the spec's: the test compares them all.
MERGES: list[tuple[str, ProxmoxApi | None, ProxmoxOverride, dict[str, Any]]] = [
    ("url alone keeps ca_file, user, token", TOKEN_SPEC, ProxmoxOverride(url=URL), {"url": URL}),
    (
        "ca_file alone",
        TOKEN_SPEC,
        ProxmoxOverride(ca_file="/lab/ca.pem"),
        {"ca_file": "/lab/ca.pem"},
    ),
    ("user alone", TOKEN_SPEC, ProxmoxOverride(user="me@pve"), {"user": "me@pve"}),
    (
        "a password replaces the token, the user stays",
        TOKEN_SPEC,
        ProxmoxOverride(url=URL, password=FLAG_PW),
        {"url": URL, "password": FLAG_PW, "token_id": None, "token_secret": None},
    ),
    (
        "a token secret alone keeps the token id",
        TOKEN_SPEC,
        ProxmoxOverride(token_secret=FLAG_SECRET),
        {"token_secret": FLAG_SECRET},
    ),
    (
        "a token id alone keeps the secret",
        TOKEN_SPEC,
        ProxmoxOverride(token_id="other"),
        {"token_id": "other"},
    ),
    (
        "a token id over a password: the default secret variable",
        PASSWORD_SPEC,
        ProxmoxOverride(token_id="ci"),
        {"token_id": "ci", "token_secret": SecretRef(env="PVE_TOKEN_SECRET"), "password": None},
    ),
    (
        "a token over a password",
        PASSWORD_SPEC,
        ProxmoxOverride(token_id="ci", token_secret=FLAG_SECRET),
        {"token_id": "ci", "token_secret": FLAG_SECRET, "password": None},
    ),
    (
        "a password over a password",
        PASSWORD_SPEC,
        ProxmoxOverride(password=FLAG_PW),
        {"password": FLAG_PW},
    ),
    (
        "--ca-file turns verification on",
        PASSWORD_SPEC,
        ProxmoxOverride(ca_file="/lab/ca.pem"),
        {"ca_file": "/lab/ca.pem", "verify_tls": True},
    ),
    ("url alone keeps verify_tls: false", PASSWORD_SPEC, ProxmoxOverride(url=URL), {"url": URL}),
    (
        "no spec: url and password, user root@pam",
        None,
        ProxmoxOverride(url=URL, password=FLAG_PW),
        {"url": URL, "user": "root@pam", "password": FLAG_PW, "verify_tls": True},
    ),
    (
        "no spec: a token",
        None,
        ProxmoxOverride(url=URL, user="ci@pve", token_id="ci", token_secret=FLAG_SECRET),
        {"url": URL, "user": "ci@pve", "token_id": "ci", "token_secret": FLAG_SECRET},
    ),
    (
        "no spec: url alone, $PVE_PASSWORD set",
        None,
        ProxmoxOverride(url=URL, ca_file="/lab/ca.pem"),
        {"url": URL, "user": "root@pam", "password": SecretRef(env="PVE_PASSWORD")},
    ),
]


@pytest.mark.parametrize(
    ("spec", "flags", "changed"), [m[1:] for m in MERGES], ids=[m[0] for m in MERGES]
)
def test_flags_override_the_spec_field_by_field(
    spec: ProxmoxApi | None, flags: ProxmoxOverride, changed: dict[str, Any]
) -> None:
    merged = merge_endpoint(spec, flags, environ={"PVE_PASSWORD": "x"})
    if spec is None:
        for name, value in changed.items():
            assert getattr(merged, name) == value, name
        return
    want = spec.model_dump() | {
        k: v.model_dump() if isinstance(v, SecretRef) else v for k, v in changed.items()
    }
    assert merged.model_dump() == want


@pytest.mark.parametrize(
    ("spec", "flags", "message"),
    [
        (None, ProxmoxOverride(ca_file="/lab/ca.pem"), "give --proxmox-url"),
        (None, ProxmoxOverride(url=URL), "give --proxmox-password-env VAR, or --proxmox-token-id"),
        (PASSWORD_SPEC, ProxmoxOverride(token_secret=FLAG_SECRET), "--proxmox-token-env: no API"),
        (None, ProxmoxOverride(url=URL, token_secret=FLAG_SECRET), "--proxmox-token-env: no API"),
        (
            TOKEN_SPEC,
            ProxmoxOverride(password=FLAG_PW, token_id="ci"),
            "--proxmox-password-env and --proxmox-token-id: give a password or an API token",
        ),
        (
            TOKEN_SPEC,
            ProxmoxOverride(password=FLAG_PW, token_secret=FLAG_SECRET),
            "--proxmox-password-env and --proxmox-token-env",
        ),
        (TOKEN_SPEC, ProxmoxOverride(url="ftp://h:8006"), "--proxmox-url ftp://h:8006: must start"),
    ],
)
def test_a_flag_that_cannot_apply_is_an_error_naming_it(
    spec: ProxmoxApi | None, flags: ProxmoxOverride, message: str
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        merge_endpoint(spec, flags, environ={})
    assert message in str(caught.value)


# --- every command that takes the flags ------------------------------------------------------

PLATFORM = """\
platform: {name: mylab, owner_tag: reconciler, default_storage: local-lvm}
proxmox:
  url: %(url)s
  user: %(user)s
  %(credential)s
  ca_file: %(ca_file)s
layers:
  apps: {}
hosts:
  pve1: {layers: [apps], capacity: {cores: 8, memory: 16G}}
ranges:
  app: {first: 100, last: 199, layer: apps}
guests:
  web:
    role: app
    host: pve1
    template: local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst
    memory: 512M
    network:
      - {name: eth0, bridge: vmbr0, ip: dhcp}
"""


CREDENTIALS = {
    "password": "password: {env: LAB_PW}",
    # A token is not used before the first read (the password logs in when connecting): the
    # read path's errors, through the same `classify`.
    "token": "token_id: ci\n  token_secret: {env: LAB_PW}",
}


def write_spec(
    directory: Path, *, url: str, user: str = "root@pam", ca_file: str, credential: str = "password"
) -> Path:
    directory.mkdir()
    cred = CREDENTIALS[credential]
    text = PLATFORM % {"url": url, "user": user, "ca_file": ca_file, "credential": cred}
    (directory / "platform.yaml").write_text(text, encoding="utf-8")
    return directory


@pytest.fixture
def refused_url() -> Iterator[str]:
    """https://127.0.0.1:PORT where nothing listens: bound, never listening, so a connection
    is refused at once, and no other test takes the port meanwhile."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield f"https://127.0.0.1:{s.getsockname()[1]}"


def commands(spec: Path, tmp: Path) -> dict[str, list[str]]:
    """Each command that takes the connection flags, as it is run on `spec`."""
    return {
        "plan": ["plan", str(spec)],
        "observe": ["observe", str(spec)],
        "apply": ["apply", str(spec), "--auto-approve"],
        "check": ["check", str(spec)],
        "backup": ["backup", "web", "--storage", "local", "--dir", str(spec)],
        "backups": ["backups", "--storage", "local", "--dir", str(spec)],
        "restore": ["restore", "web", "--latest", "--yes", "--dir", str(spec)],
        "adopt": ["adopt", "guest/web", "--dir", str(spec), "--auto-approve"],
        "import": ["import", "--dir", str(spec), "--out", str(tmp / "imported")],
        "import --platform": ["import", "--platform", "p", "--out", str(tmp / "imported")],
        "init": ["init", str(tmp / "new"), "--name", "new"],
        "run": ["run", "--dir", str(spec), "--once", "--log-format", "text"],
    }


def test_the_table_names_every_command_that_takes_the_connection_flags(tmp_path: Path) -> None:
    (sub,) = (a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    taking = set()
    for name, command in sub.choices.items():
        getattr(command, "add_deferred_args", lambda: None)()
        if any("--proxmox-url" in a.option_strings for a in command._actions):
            taking.add(name)
    assert taking == {c.split()[0] for c in commands(tmp_path, tmp_path)}


CANNOT_APPLY = [
    (["--insecure", "--ca-file", "CA"], "--insecure and --ca-file: give one"),
    (["--ca-file", "no/such/ca.pem"], "--ca-file no/such/ca.pem: no such file"),
    (
        ["--proxmox-password-env", "LAB_PW", "--proxmox-token-id", "ci"],
        "--proxmox-password-env and --proxmox-token-id",
    ),
    (["--proxmox-token-env", "TOKEN"], "--proxmox-token-env: no API token to use it with"),
]


@pytest.mark.parametrize("command", list(commands(Path("s"), Path("t"))))
@pytest.mark.parametrize(("flags", "message"), CANNOT_APPLY, ids=[c[1][:24] for c in CANNOT_APPLY])
def test_every_command_refuses_a_flag_that_cannot_apply_before_connecting(
    command: str,
    flags: list[str],
    message: str,
    refused_url: str,
    fakepve_cafile: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("LAB_PW", "pw")
    monkeypatch.setenv("PVE_PASSWORD", "pw")
    spec = write_spec(tmp_path / "spec", url=refused_url, ca_file=fakepve_cafile)
    argv = commands(spec, tmp_path)[command]
    flags = [fakepve_cafile if f == "CA" else f for f in flags]
    assert main([*argv, *flags, "--proxmox-url", refused_url, "--no-edge"]) == 1
    err = capsys.readouterr().err
    assert message in err
    assert "refused" not in err  # nothing connected
    assert "Traceback" not in err


# --- against fakepve and a port where nothing listens ----------------------------------------


@pytest.mark.fakepve(user="reconciler@pve", password="lab-pw")
def test_the_url_alone_keeps_the_specs_ca_file_and_user(
    fakepve_url: str,
    fakepve_cafile: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The spec names fakepve's CA and a user other than the old default (root@pam), at an
    address where nothing answers; only --proxmox-url points it at fakepve."""
    monkeypatch.setenv("LAB_PW", "lab-pw")
    spec = write_spec(
        tmp_path / "spec",
        url="https://pve.example.invalid:8006",
        user="reconciler@pve",
        ca_file=fakepve_cafile,
    )
    assert main(["observe", str(spec), "--proxmox-url", fakepve_url, "--no-edge"]) == 0
    out, err = capsys.readouterr()
    assert '"format": "reconciler/observed-state"' in out, err


@pytest.mark.parametrize("credential", list(CREDENTIALS))
def test_a_refused_connection_names_the_address_and_the_cause(
    credential: str,
    refused_url: str,
    fakepve_cafile: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("LAB_PW", "pw")
    spec = write_spec(
        tmp_path / "spec", url=refused_url, ca_file=fakepve_cafile, credential=credential
    )
    assert main(["plan", str(spec), "--no-edge"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert refused_url.removeprefix("https://") in err and "connection refused" in err
    assert "Error" not in err  # no exception class names


@pytest.mark.parametrize("credential", list(CREDENTIALS))
@pytest.mark.parametrize("ca", ["wrong", "missing"])
def test_an_untrusted_certificate_says_so_with_the_host_and_the_fix(
    ca: str,
    credential: str,
    fakepve_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """fakepve's certificate is self-signed: checked against another CA (public ones), or
    without a CA (the system's), it is not trusted."""
    monkeypatch.setenv("LAB_PW", "secret")
    ca_file = certifi.where() if ca == "wrong" else "/etc/reconciler/ca.pem"
    checked = ca_file if ca == "wrong" else "the system's CAs"
    spec = write_spec(tmp_path / "spec", url=fakepve_url, ca_file=ca_file, credential=credential)
    if ca == "missing":
        text = (spec / "platform.yaml").read_text().replace(f"  ca_file: {ca_file}\n", "")
        (spec / "platform.yaml").write_text(text)
    assert main(["plan", str(spec), "--no-edge"]) == 1
    err = capsys.readouterr().err
    host = fakepve_url.removeprefix("https://")
    assert err.count("\n") == 1, err
    assert "certificate verify failed" in err and "self-signed" in err, err
    assert host in err and "--ca-file" in err and "ca_file" in err
    assert "Error" not in err
    if credential == "password":  # the login names the CA it checked against
        assert f"(TLS checked against {checked})" in err
