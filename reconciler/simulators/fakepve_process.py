"""Run fakepve (a third party's fake Proxmox VE, PyPI `fakepve`) as a subprocess on a free
loopback port, with its own TLS certificate so the real client verifies TLS as in production.

Used by the benchmark, the demo and the process tests. By default it serves `PlatformPve`
(reconciler.simulators.pve: fakepve plus QEMU migration) through fakepve's own CLI
(`python -m reconciler.simulators.pve`); `platform=False` runs the plain `fakepve` CLI. fakepve
is a test and demo dependency (extra `dev`), so it is imported only when a fake is started.

`make_vm_template` makes a cloud-init VM template as an operator does (`qm create`, `qm
template`), through any proxmoxer client on a fakepve: the demo's lab (through
`FakePveProcess.seed_vm_template`) and the tests' fixtures.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def wait_task(client: Any, node: str, upid: str, *, timeout: float = 60.0) -> None:
    """Wait for a task on `node` to end; an exit status other than OK is an error naming it."""
    deadline = time.monotonic() + timeout
    while True:
        status = client.nodes(node).tasks(upid).status.get()
        if status.get("status") == "stopped":
            if status.get("exitstatus") != "OK":
                raise RuntimeError(f"fakepve task {upid} failed: {status.get('exitstatus')}")
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"fakepve task {upid} did not end within {timeout:.0f} s")
        time.sleep(0.02)


def make_vm_template(
    client: Any,
    node: str,
    vmid: int,
    name: str,
    *,
    storage: str = "local-lvm",
    disk_gib: int = 2,
) -> None:
    """A cloud-init VM template as an operator makes one from a cloud image: a VM with its
    `disk_gib` GiB boot disk (`scsi0`, the image's size), a cloud-init drive, a NIC and the
    guest agent on; then converted (`qm template`: its disk becomes `base-VMID-disk-0`)."""
    upid = client.nodes(node).qemu.post(
        vmid=vmid,
        name=name,
        ostype="l26",
        cores=1,
        memory=1024,
        scsihw="virtio-scsi-single",
        scsi0=f"{storage}:{disk_gib}",
        ide2=f"{storage}:cloudinit",
        boot="order=scsi0",
        net0="virtio,bridge=vmbr0",
        agent=1,
        serial0="socket",
        vga="serial0",
    )
    wait_task(client, node, upid)
    wait_task(client, node, client.nodes(node).qemu(vmid).template.post())


@dataclass
class FakePveProcess:
    nodes: tuple[str, ...] = ("pve-core", "pve-runtime")
    user: str = "root@pam"
    password: str = "secret"
    time_scale: float = 0.0
    latency: float = 0.0  # PVE seconds added to every response (times time_scale in real time)
    guests: list[dict[str, Any]] = field(default_factory=list)
    platform: bool = True  # serve PlatformPve (QEMU migration too), not the plain fakepve
    migrate_secs: float | None = None  # PVE seconds a migration takes (PlatformPve's default)
    # Directory storages for backups, shared by every node, added once it runs (`pvesm add dir
    # NAME --content backup --shared 1`): the example platform's `backup`.
    backup_storages: tuple[str, ...] = ("backup",)
    port: int = 0  # 0: a free one (the URL says which)
    url: str = ""
    cafile: str = ""
    _proc: subprocess.Popen[str] | None = None
    _dir: str = ""

    def start(self) -> FakePveProcess:
        from fakepve.certs import make_cert

        self._dir = tempfile.mkdtemp(prefix="fakepve-")
        cert, key, _ = make_cert(self._dir, hosts=("127.0.0.1",))
        self.cafile = cert
        seed = Path(self._dir) / "guests.json"
        # A stopped placeholder per node makes fakepve create the node; it is removed below.
        placeholders = [
            {"type": "lxc", "vmid": 999_000_000 + i, "name": f"seed-{i}", "node": node}
            for i, node in enumerate(self.nodes)
        ]
        seed.write_text(json.dumps({"guests": [*placeholders, *self.guests]}))
        if self.platform:
            program = [sys.executable, "-m", "reconciler.simulators.pve"]
            if self.migrate_secs is not None:
                program += ["--migrate-secs", str(self.migrate_secs)]
        else:
            program = [shutil.which("fakepve") or str(Path(sys.executable).parent / "fakepve")]
        self._proc = subprocess.Popen(
            [
                *program,
                str(seed),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--time-scale",
                str(self.time_scale),
                "--latency",
                str(self.latency),
                "--cert",
                cert,
                "--key",
                key,
                "--user",
                self.user,
            ],
            # The password in fakepve's variable, not its arguments: no other user's `ps` shows
            # it, and one that starts with "-" (a made one can) is not read as a flag.
            env={**os.environ, "PVE_PASS": self.password},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if "listening on" not in line:
            err = self._proc.stderr.read() if self._proc.stderr else ""
            self.stop()  # the process (if it still runs) and the certificate's directory
            raise RuntimeError(f"fakepve did not start: {line}{err}")
        self.url = line.strip().rsplit(" ", 1)[-1]
        client = self.client()
        for i, node in enumerate(self.nodes):
            upid = client.nodes(node).lxc(999_000_000 + i).delete()
            client.nodes(node).tasks(upid).status.get()
        for storage in self.backup_storages:
            client.storage.post(
                storage=storage, type="dir", path=f"/mnt/pve/{storage}", content="backup", shared=1
            )
        return self

    def client(self) -> Any:
        from proxmoxer import ProxmoxAPI

        host, port = self.url.removeprefix("https://").split(":")
        return ProxmoxAPI(
            host,
            port=int(port),
            user=self.user,
            password=self.password,
            verify_ssl=self.cafile,
            timeout=30,
        )

    def seed_template(self, filename: str) -> None:
        client = self.client()
        upid = (
            client.nodes(self.nodes[0])
            .storage("local")("download-url")
            .post(url=f"http://example.invalid/{filename}", content="vztmpl", filename=filename)
        )
        status = client.nodes(self.nodes[0]).tasks(upid).status.get()
        while status.get("status") != "stopped":
            status = client.nodes(self.nodes[0]).tasks(upid).status.get()

    def seed_vm_template(self, vmid: int, name: str, node: str, *, disk_gib: int = 2) -> None:
        """A cloud-init VM template on `node`, as an operator makes one (`make_vm_template`)."""
        make_vm_template(self.client(), node, vmid, name, disk_gib=disk_gib)

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
            for stream in (self._proc.stdout, self._proc.stderr):
                if stream:
                    stream.close()
            self._proc = None
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> FakePveProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
