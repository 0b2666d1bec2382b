"""`reconciler lab`: a fake Proxmox VE of one's own to try the controller on, in the foreground
until Ctrl-C (or SIGTERM).

It starts fakepve the way the demo does (`reconciler.demo.lab.start_fakepve`: PlatformPve, its
own TLS certificate, on 127.0.0.1) with the nodes, storages and container templates the user
names, writes the certificate (the CA to verify it with) where `--ca-file` says and the
password where `--password-file` says (or takes it from `$PVE_PASSWORD`), and prints the exact
flags that point any command at it. fakepve keeps everything in memory: a new lab starts
empty. On the way out it stops fakepve and removes the two files it wrote.

Registered in reconciler/cli/main.py as a deferred command: nothing here is imported until
`reconciler lab` is parsed, and fakepve (a `dev` extra) only when it runs.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import re
import secrets
import shlex
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from reconciler.simulators.fakepve_process import FakePveProcess

EXIT_OK, EXIT_ERROR = 0, 1
DEFAULT_TEMPLATE = "debian-12-standard_12.7-1_amd64.tar.zst"  # the demo's (demo.lab.TEMPLATE)
DEFAULT_STORAGES = ["backup=backup"]
USER = "root@pam"  # fakepve's administrator
DEFAULT_PASSWORD_ENV = "PVE_PASSWORD"  # the CLI's default --proxmox-password-env
# The first line of a CA file the lab writes: PEM readers skip text before "-----BEGIN", and a
# file that does not start with it is never overwritten (it may be a real cluster's CA).
CA_MARKER = "# reconciler lab: the CA of a fake Proxmox VE (fakepve); rewritten by each lab"
# PVE's own rules: a node name is a DNS label, a storage id pve-storage-id, content a list of
# pve-storage-content.
_NODE = re.compile(r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?")
_STORAGE_ID = re.compile(r"[a-z][a-z0-9\-_.]*[a-z0-9]")
_CONTENT = {"images", "rootdir", "vztmpl", "iso", "backup", "snippets", "import"}


class LabError(Exception):
    """A flag the lab cannot use, or a start that failed: printed as `error: ...`, exit 1."""


def add_lab_args(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Start a fake Proxmox VE (fakepve) on 127.0.0.1 with these nodes, storages and "
        "templates, write its CA file, print the flags that point the CLI at it, and run "
        "until Ctrl-C."
    )
    p.add_argument(
        "--nodes",
        default="pve1",
        metavar="NAMES",
        help="the cluster's nodes, comma-separated (default: pve1)",
    )
    p.add_argument(
        "--storage",
        action="append",
        metavar="NAME=CONTENT",
        help="a shared directory storage besides fakepve's `local` (iso, vztmpl, backup) and "
        "`local-lvm` (images, rootdir), CONTENT comma-separated; repeat "
        "(default: backup=backup)",
    )
    p.add_argument(
        "--template",
        action="append",
        metavar="FILE",
        help=f"a container template put in `local` storage; repeat (default: {DEFAULT_TEMPLATE})",
    )
    p.add_argument(
        "--vm-template",
        action="store_true",
        help="also a cloud-init VM template, as an operator makes one (vmid 200, "
        "debian-12-cloudinit, on the first node): what a spec's `clone: {from: ...}` clones",
    )
    p.add_argument(
        "--ca-file",
        default="lab-ca.pem",
        metavar="PATH",
        help="where to write the CA that verifies the lab's TLS (default: ./lab-ca.pem)",
    )
    p.add_argument(
        "--password-env",
        default=DEFAULT_PASSWORD_ENV,
        metavar="VAR",
        help="the password is this variable's value when it is set; otherwise one is made and "
        "written to --password-file (default: PVE_PASSWORD, which the CLI reads)",
    )
    p.add_argument(
        "--password-file",
        metavar="PATH",
        help="where a made password is written, mode 0600 (default: lab-password beside "
        "the CA file)",
    )
    p.add_argument(
        "--port",
        type=int,
        default=8006,
        help="the port on 127.0.0.1 (default: 8006, PVE's; 0: any free one)",
    )
    p.add_argument(
        "--time-scale",
        type=float,
        default=0.0,
        help="real seconds per PVE second of a task (default: 0, tasks finish at once)",
    )


def cmd_lab(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    missing = [m for m in ("fakepve", "cryptography") if importlib.util.find_spec(m) is None]
    if missing:
        err.write(
            f"error: reconciler lab needs {' and '.join(missing)}, which this install lacks: "
            "install the `lab` extra (pipx install '.[lab]' in a clone, or "
            "pip install 'reconciler[lab] @ git+...'; README, \"Install\")\n"
        )
        return EXIT_ERROR
    try:
        setup = _Setup.from_args(args)
    except LabError as exc:
        err.write(f"error: {exc}\n")
        return EXIT_ERROR
    with _stopping_on_sigterm():
        try:
            with running_lab(setup, err) as fake:
                _describe(setup, fake, out)
                out.flush()
                code = fake._proc.wait() if fake._proc is not None else 0
                err.write(f"error: fakepve exited by itself (status {code}); the lab is over\n")
                return EXIT_ERROR
        except LabError as exc:
            err.write(f"error: {exc}\n")
            return EXIT_ERROR
        except KeyboardInterrupt:
            err.write("lab stopped\n")
            return EXIT_OK


class _Setup:
    """The lab's flags, checked before anything starts."""

    def __init__(
        self,
        *,
        nodes: list[str],
        storages: dict[str, str],
        templates: list[str],
        ca_file: Path,
        password: str,
        password_env: str,
        password_file: Path | None,
        port: int,
        time_scale: float,
        vm_template: bool = False,
    ) -> None:
        self.nodes = nodes
        self.storages = storages
        self.templates = templates
        self.ca_file = ca_file
        self.password = password
        self.password_env = password_env
        self.password_file = password_file
        self.port = port
        self.time_scale = time_scale
        self.vm_template = vm_template

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> _Setup:
        ca_file = _writable("--ca-file", args.ca_file)
        if ca_file.exists() and not _is_lab_ca(ca_file):
            raise LabError(
                f"--ca-file {ca_file}: the file exists and is not a CA an earlier lab wrote; "
                "name another path (the lab never overwrites another file)"
            )
        password = os.environ.get(args.password_env, "")
        password_file = None
        if not password:
            password = secrets.token_urlsafe(18)
            password_file = _writable(
                "--password-file", args.password_file or ca_file.parent / "lab-password"
            )
        if not 0 <= args.port <= 65535:
            raise LabError(f"--port {args.port}: not a port (0 to 65535)")
        if args.port:
            _check_free(args.port)
        if args.time_scale < 0:
            raise LabError(f"--time-scale {args.time_scale}: must be 0 or more")
        return cls(
            nodes=_parse_nodes(args.nodes),
            storages=_parse_storages(args.storage or DEFAULT_STORAGES),
            templates=args.template or [DEFAULT_TEMPLATE],
            ca_file=ca_file,
            password=password,
            password_env=args.password_env,
            password_file=password_file,
            port=args.port,
            time_scale=args.time_scale,
            vm_template=bool(getattr(args, "vm_template", False)),
        )


def _parse_nodes(text: str) -> list[str]:
    nodes = [n.strip() for n in text.split(",") if n.strip()]
    if not nodes:
        raise LabError(f"--nodes {text!r}: name at least one node")
    for node in nodes:
        if not _NODE.fullmatch(node):
            raise LabError(
                f"--nodes {text!r}: {node!r} is not a node name (letters, digits and inner "
                "hyphens, as PVE requires)"
            )
    if len(set(nodes)) != len(nodes):
        raise LabError(f"--nodes {text!r}: a node is named twice")
    return nodes


def _parse_storages(values: list[str]) -> dict[str, str]:
    storages: dict[str, str] = {}
    for value in values:
        name, sep, content = value.partition("=")
        if not sep or not _STORAGE_ID.fullmatch(name):
            raise LabError(
                f"--storage {value!r}: expected NAME=CONTENT with a PVE storage id "
                "(lowercase letters, digits, - _ .), e.g. backup=backup"
            )
        if name in ("local", "local-lvm") or name in storages:
            raise LabError(f"--storage {value!r}: storage {name!r} exists already")
        kinds = [c.strip() for c in content.split(",") if c.strip()]
        unknown = sorted(set(kinds) - _CONTENT)
        if not kinds or unknown:
            raise LabError(
                f"--storage {value!r}: content must be some of {', '.join(sorted(_CONTENT))}"
                + (f"; not {', '.join(unknown)}" if unknown else "")
            )
        storages[name] = ",".join(kinds)
    return storages


def _writable(flag: str, path: str | Path) -> Path:
    where = Path(path).expanduser().absolute()
    if not where.parent.is_dir():
        raise LabError(f"{flag} {path}: the directory {where.parent} does not exist")
    if where.is_dir():
        raise LabError(f"{flag} {path}: is a directory; name a file")
    return where


def _is_lab_ca(path: Path) -> bool:
    try:
        with path.open(encoding="utf-8") as f:
            return f.readline().rstrip("\n") == CA_MARKER
    except (OSError, UnicodeDecodeError):
        return False


def _check_free(port: int) -> None:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as exc:
            raise LabError(
                f"--port {port}: 127.0.0.1:{port} is taken ({exc.strerror}); name another, "
                "or --port 0 for any free one"
            ) from None


@contextlib.contextmanager
def running_lab(setup: _Setup, err: TextIO) -> Iterator[FakePveProcess]:
    """fakepve started and seeded, the CA and password files written, its output forwarded to
    `err`; on the way out everything stopped and removed."""
    from reconciler.demo.lab import (
        CLOUD_TEMPLATE_NAME,
        CLOUD_TEMPLATE_VMID,
        VmTemplate,
        start_fakepve,
    )

    vm_templates = (
        (VmTemplate(CLOUD_TEMPLATE_VMID, CLOUD_TEMPLATE_NAME, setup.nodes[0]),)
        if setup.vm_template
        else ()
    )
    try:
        fake = start_fakepve(
            setup.nodes,
            templates=setup.templates,
            vm_templates=vm_templates,
            time_scale=setup.time_scale,
            port=setup.port,
            password=setup.password,
            backup_storages=(),
        )
    except RuntimeError as exc:
        last = str(exc).strip().splitlines()[-1:] or ["no output"]
        raise LabError(f"fakepve did not start: {last[0]}") from None
    written: list[Path] = []
    forwarders: list[threading.Thread] = []
    try:
        _add_storages(fake, setup.storages)
        _write_private(setup.ca_file, f"{CA_MARKER}\n{Path(fake.cafile).read_text()}", 0o644)
        written.append(setup.ca_file)
        if setup.password_file is not None:
            _write_private(setup.password_file, setup.password + "\n", 0o600)
            written.append(setup.password_file)
        if fake._proc is not None:
            forwarders = [
                _forward(stream, err)
                for stream in (fake._proc.stdout, fake._proc.stderr)
                if stream is not None
            ]
        yield fake
    finally:
        if fake._proc is not None:
            fake._proc.terminate()
            with contextlib.suppress(Exception):
                fake._proc.wait(5)
        for thread in forwarders:
            thread.join(5)
        fake.stop()
        for path in written:
            path.unlink(missing_ok=True)


def _add_storages(fake: FakePveProcess, storages: dict[str, str]) -> None:
    client = fake.client()
    for name, content in storages.items():
        try:
            client.storage.post(
                storage=name, type="dir", path=f"/mnt/pve/{name}", content=content, shared=1
            )
        except Exception as exc:  # proxmoxer's errors: the fake refused the storage
            raise LabError(f"--storage {name}={content}: fakepve refused it: {exc}") from None


def _write_private(path: Path, text: str, mode: int) -> None:
    """Write `text` to `path`, created with `mode` (and set to it, if it existed)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    os.fchmod(fd, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


def _forward(stream: IO[str], err: TextIO) -> threading.Thread:
    """A thread copying fakepve's output to `err`: its pipes would fill and stall it unread."""

    def copy() -> None:
        with contextlib.suppress(ValueError, OSError):
            for line in stream:
                err.write(f"fakepve: {line}")
                err.flush()

    thread = threading.Thread(target=copy, name="fakepve-output", daemon=True)
    thread.start()
    return thread


def _describe(setup: _Setup, fake: FakePveProcess, out: TextIO) -> None:
    """What runs, read back from the fake, and the flags to reach it."""
    client = fake.client()
    made = [g for g in client.cluster.resources.get(type="vm") if g.get("template")]
    vm_template = ", ".join(f"{g['vmid']} {g['name']} on {g['node']}" for g in made)
    storages = sorted(client.storage.get(), key=lambda s: str(s["storage"]))
    volumes = [str(v["volid"]) for v in client.nodes(setup.nodes[0]).storage("local").content.get()]
    # The user too: a flag overrides the spec's field, and a spec of one's own may name
    # another user (the example's is reconciler@pve).
    flags = (
        f"--proxmox-url {fake.url} --proxmox-user {USER} "
        f"--ca-file {shlex.quote(str(setup.ca_file))}"
    )
    if setup.password_env != DEFAULT_PASSWORD_ENV:
        flags += f" --proxmox-password-env {setup.password_env}"
    if setup.password_file is not None:
        password = f"in {setup.password_file} (mode 0600)"
        export = f'export {setup.password_env}="$(cat {shlex.quote(str(setup.password_file))})"'
    else:
        password = f"${setup.password_env}, as set in this shell"
        export = f"export {setup.password_env}=...   # the value this lab was started with"
    speed = "at once" if not setup.time_scale else f"at {setup.time_scale} s a PVE second"

    def storage_line(s: dict[str, Any]) -> str:
        shared = "; shared" if s.get("shared") else ""
        return f"{s['storage']} ({s.get('type')}: {s.get('content', '')}{shared})"

    lines = [
        f"reconciler lab: a fake Proxmox VE (fakepve) on {fake.url}",
        f"  nodes      {', '.join(setup.nodes)}",
        f"  storages   {', '.join(storage_line(s) for s in storages)}",
        f"  templates  {', '.join(volumes) or 'none'}",
        *(
            [f"  VM template {vm_template} (a spec clones it with clone: {{from: VMID}})"]
            if made
            else []
        ),
        f"  user       {USER}, password {password}",
        f"  CA file    {setup.ca_file}",
        f"  tasks      finish {speed}",
        "",
        "Point any command at it from another shell (these flags override a spec's "
        "`proxmox` section field by field):",
        f"  {export}",
        f"  {flags}",
        "",
        "Next: a platform of your own from it (init writes the connection into its spec), "
        "then plan and apply it:",
        f"  reconciler init my-lab --name my-lab {flags}",
        "  reconciler plan my-lab",
        "  reconciler apply my-lab",
        "",
        "Ctrl-C stops the lab; it keeps nothing (the next one starts empty).",
    ]
    out.write("\n".join(lines) + "\n")


@contextlib.contextmanager
def _stopping_on_sigterm() -> Iterator[None]:
    """SIGTERM ends the lab as Ctrl-C does, so fakepve is stopped and the files removed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
