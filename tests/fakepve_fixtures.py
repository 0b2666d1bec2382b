"""Test fixtures (a pytest plugin, loaded by tests/conftest.py): fakepve with the example
platform's two nodes, and the real proxmoxer client against it. `pve_api` also gives the cluster
what an operator puts there before the platform: the container template, the backup storage,
and the cloud-init VM template the example's VMs are cloned from (vmid 200 on pve-core).

fakepve is a third party's fake Proxmox VE that checks requests against PVE's API schema. Its
pytest plugin starts one per test; if the package is missing these tests error (never skip).
The fixture serves `PlatformPve` (reconciler.simulators.pve: fakepve plus QEMU migration).
"""

from __future__ import annotations

import urllib.parse
from typing import Any

import fakepve.pytest_plugin as fakepve_plugin
import pytest

from reconciler.demo.lab import CLOUD_TEMPLATE_NAME, CLOUD_TEMPLATE_VMID
from reconciler.model.spec import ProxmoxApi, SecretRef
from reconciler.providers.proxmox import ProxmoxProvider, RetryPolicy, connect
from reconciler.simulators.fakepve_process import make_vm_template
from reconciler.simulators.pve import PlatformPve

TEMPLATE = "debian-12-standard_12.7-1_amd64.tar.zst"
MUTATING = ("POST", "PUT", "DELETE")
BACKUP_STORAGE = "backup"  # where the example's backup jobs write (specs/backups.yaml)


async def no_sleep(_seconds: float) -> None:
    return None


@pytest.fixture
def _platform_pve(monkeypatch: pytest.MonkeyPatch) -> None:
    # fakepve's plugin builds `fakepve.pytest_plugin.FakePve(...)` and offers no hook for
    # another class: substituting the name it serves, for one test, is the least intrusive way
    # to serve PlatformPve with the plugin's own fixture (its TLS, thread and shutdown).
    monkeypatch.setattr(fakepve_plugin, "FakePve", PlatformPve)


@pytest.fixture
def fakepve(_platform_pve: None, fakepve: Any) -> Any:
    """fakepve's own fixture (the marker's options included), serving PlatformPve."""
    return fakepve


@pytest.fixture
def pve(fakepve: Any) -> Any:
    fakepve.add_node("pve-core")
    fakepve.add_node("pve-runtime")
    del fakepve.nodes["pve1"]
    return fakepve


@pytest.fixture
def pve_api(pve: Any, fakepve_cafile: str, monkeypatch: pytest.MonkeyPatch) -> ProxmoxApi:
    monkeypatch.setenv("FAKEPVE_PASSWORD", "secret")
    api = ProxmoxApi(
        url=pve.url,
        user="root@pam",
        password=SecretRef(env="FAKEPVE_PASSWORD"),
        ca_file=fakepve_cafile,
    )
    client = connect(api)
    upid = (
        client.nodes("pve-core")
        .storage("local")("download-url")
        .post(url=f"http://example.invalid/{TEMPLATE}", content="vztmpl", filename=TEMPLATE)
    )
    assert client.nodes("pve-core").tasks(upid).status.get()["exitstatus"] == "OK"
    add_backup_storage(client)
    make_vm_template(client, "pve-core", CLOUD_TEMPLATE_VMID, CLOUD_TEMPLATE_NAME)
    pve.requests.clear()
    return api


def add_backup_storage(client: Any, storage: str = BACKUP_STORAGE) -> None:
    """The example's `backup` storage, as an operator adds one (`pvesm add dir`): a directory
    every node mounts (NFS in a real cluster), holding backups only."""
    client.storage.post(
        storage=storage, type="dir", path=f"/mnt/pve/{storage}", content="backup", shared=1
    )


@pytest.fixture
def provider(pve_api: ProxmoxApi) -> ProxmoxProvider:
    return ProxmoxProvider(
        client=connect(pve_api),
        platform="zpack",
        source=pve_api.url,
        retry=RetryPolicy(initial=0.0, maximum=0.0),
        sleep=no_sleep,
    )


def mutating_calls(pve: Any) -> list[tuple[str, str]]:
    return [
        (m, p) for m, p, _ in pve.requests if m in MUTATING and not p.endswith("/access/ticket")
    ]


def request_bodies(pve: Any, method: str, path_end: str) -> list[dict[str, str]]:
    """The form bodies of the requests fakepve logged with this method and path ending."""
    return [
        dict(urllib.parse.parse_qsl(body.decode() if isinstance(body, bytes) else body or ""))
        for m, path, body in pve.requests
        if m == method and path.endswith(path_end)
    ]


def body_of(pve: Any, method: str, path_end: str) -> dict[str, str]:
    """The form body of the last request fakepve logged with this method and path ending."""
    bodies = request_bodies(pve, method, path_end)
    assert bodies, f"no {method} request to ...{path_end}"
    return bodies[-1]
