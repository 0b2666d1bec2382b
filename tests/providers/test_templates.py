"""Declared templates end to end on fakepve (extended with PVE's download-url checks and checksum
verification: reconciler/simulators/pve_templates.py), through the real client and a real HTTP
server the node downloads from: a missing template is downloaded, in an earlier wave, before
the container made from it (one apply does both); a template already there changes nothing; a
download whose checksum does not match fails with the url, the checksum and Proxmox's line, and
the container is not created. Assertions read what Proxmox holds (storage listings, guests) and
fakepve's request and task logs.
"""

from __future__ import annotations

import hashlib
import http.server
import threading
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
import yaml

from reconciler.applying.connecting import Endpoints, connect_platform
from reconciler.applying.converging import Convergence, converge
from reconciler.applying.executor import Outcome
from reconciler.importing.estate import read_estate
from reconciler.importing.writer import Base, render_specs
from reconciler.loading.graph import build_graph
from reconciler.loading.loader import load_texts
from reconciler.model.plans import Action
from reconciler.model.resources import DesiredGraph, Kind
from reconciler.model.spec import PlatformSpec, ProxmoxApi
from reconciler.providers.proxmox import ProxmoxProvider
from reconciler.providers.proxmox_templates import TemplateProvider, template_files
from tests.fakepve_fixtures import TEMPLATE, mutating_calls, request_bodies
from tests.guest_helpers import GAME_RANGE, platform_yaml, results

NEW = "debian-13-standard_13.1-1_amd64.tar.zst"
IMAGE = b"a container template, as the mirror serves it\n" * 1000
SHA256 = hashlib.sha256(IMAGE).hexdigest()
WRONG = hashlib.sha256(b"another image").hexdigest()


class Mirror:
    """A real HTTP server on 127.0.0.1 serving `files` (path -> bytes), counting requests."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.hits: list[str] = []
        mirror = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                mirror.hits.append(self.path)
                body = mirror.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: Any) -> None:
                return None

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Mirror:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def mirror() -> Iterator[Mirror]:
    with Mirror({f"/images/{NEW}": IMAGE}) as m:
        yield m


def templates_yaml(url: str, checksum: str = SHA256, name: str = NEW) -> str:
    return f"""
templates:
  debian-13:
    url: {url}/images/{name}
    checksum: sha256:{checksum}
    storage: local
    hosts: [pve-runtime]
"""


def guests_yaml(template: str = NEW) -> str:
    return f"""
guests:
  mc-lobby:
    role: game
    vmid: 1000
    host: pve-runtime
    template: local:vztmpl/{template}
    network:
      - {{name: eth0, bridge: vmbr0, ip: 10.20.0.10/24, gw: 10.20.0.1}}
"""


def load(
    templates: str, guests: str | None = None, *, control: bool = False
) -> tuple[PlatformSpec, DesiredGraph]:
    texts = {"platform.yaml": platform_yaml(GAME_RANGE, control=control) + templates}
    texts["guests.yaml"] = guests if guests is not None else guests_yaml()
    loaded = load_texts(texts)
    assert loaded.ok and loaded.spec is not None, [str(d) for d in loaded.diagnostics]
    return loaded.spec, build_graph(loaded.spec, loaded.source)


def providers(spec: PlatformSpec, provider: ProxmoxProvider) -> list[Any]:
    return [provider, TemplateProvider(pve=provider, files=template_files(spec))]


def run(graph: DesiredGraph, found: list[Any]) -> Convergence:
    return anyio.run(lambda: converge(graph, found))


def on_storage(provider: ProxmoxProvider, node: str = "pve-runtime") -> set[str]:
    items = provider.client.nodes(node).storage("local").content.get(content="vztmpl")
    return {str(i["volid"]) for i in items}


def guest_vmids(provider: ProxmoxProvider) -> set[int]:
    return {int(i["vmid"]) for i in provider.client.cluster.resources.get(type="vm")}


def task_types(pve: Any) -> list[str]:
    return [t["type"] for t in pve.tasklog]


def test_missing_template_is_downloaded_before_the_guest_in_one_apply(
    pve: Any, pve_api: ProxmoxApi, provider: ProxmoxProvider, mirror: Mirror
) -> None:
    spec, graph = load(templates_yaml(mirror.url))
    address = "template/debian-13/pve-runtime"
    assert graph.waves[address] < graph.waves["guest/mc-lobby"]
    assert address in graph.resources["guest/mc-lobby"].depends_on

    async def apply_all() -> Convergence:
        # Through the registry, as `reconciler apply` connects: the spec's templates
        # register their provider.
        async with connect_platform(spec, Endpoints(proxmox=pve_api)) as conn:
            assert any(Kind.TEMPLATE in p.kinds for p in conn.providers)
            return await converge(graph, conn.providers, source=conn.source)

    conv = anyio.run(apply_all)
    assert conv.ok, conv.rounds[-1].report
    first = conv.rounds[0].plan
    actions = {c.address: (c.action, c.wave) for c in first.changes}
    assert actions[address][0] is Action.CREATE
    assert actions[address][1] < actions["guest/mc-lobby"][1]
    done = results(conv, 0)
    assert done[address].outcome is Outcome.DONE
    assert done["guest/mc-lobby"].outcome is Outcome.DONE

    # The node fetched the file from the mirror, the checksum was handed to Proxmox, and the
    # download ran before the container was created from it.
    assert mirror.hits == [f"/images/{NEW}"]
    sent = request_bodies(pve, "POST", "/storage/local/download-url")
    assert sent == [
        {
            "url": f"{mirror.url}/images/{NEW}",
            "content": "vztmpl",
            "filename": NEW,
            "checksum": SHA256,
            "checksum-algorithm": "sha256",
        }
    ]
    types = task_types(pve)
    assert types.index("download") < types.index("vzcreate")
    assert f"local:vztmpl/{NEW}" in on_storage(provider)
    assert 1000 in guest_vmids(provider)

    # Converged: the next plan changes nothing, and downloads nothing again.
    again = anyio.run(apply_all)
    assert all(c.action is Action.NOOP for c in again.rounds[0].plan.changes)
    assert mirror.hits == [f"/images/{NEW}"]


def test_template_already_there_changes_nothing(
    pve: Any, provider: ProxmoxProvider, mirror: Mirror
) -> None:
    # The fixture put TEMPLATE on `local` (as an operator's `pveam download` would).
    spec, graph = load(templates_yaml(mirror.url, name=TEMPLATE), guests_yaml(TEMPLATE))
    conv = run(graph, providers(spec, provider))
    assert conv.ok
    plan = conv.rounds[0].plan
    template = next(c for c in plan.changes if c.kind is Kind.TEMPLATE)
    assert template.action is Action.NOOP
    assert template.before is not None and template.before["volid"] == f"local:vztmpl/{TEMPLATE}"
    assert not [p for m, p in mutating_calls(pve) if p.endswith("/download-url")]
    assert mirror.hits == []
    assert 1000 in guest_vmids(provider)


def test_checksum_mismatch_fails_the_wave_and_the_guest_is_not_created(
    pve: Any, provider: ProxmoxProvider, mirror: Mirror
) -> None:
    spec, graph = load(templates_yaml(mirror.url, checksum=WRONG))
    conv = run(graph, providers(spec, provider))
    assert not conv.ok
    done = results(conv, 0)
    failed = done["template/debian-13/pve-runtime"]
    assert failed.outcome is Outcome.FAILED
    # Clear: which url, what was expected, and Proxmox's own line.
    assert f"{mirror.url}/images/{NEW} does not match its checksum" in failed.error
    assert f"expected sha256:{WRONG}" in failed.error
    assert f"checksum mismatch: got '{SHA256}' != expect '{WRONG}'" in failed.error
    assert done["guest/mc-lobby"].outcome is Outcome.SKIPPED
    # Nothing was kept, nothing was created from it.
    assert f"local:vztmpl/{NEW}" not in on_storage(provider)
    assert 1000 not in guest_vmids(provider)
    assert not [p for m, p in mutating_calls(pve) if m == "POST" and p.endswith("/lxc")]


def test_a_template_that_left_the_spec_is_never_deleted(
    pve: Any, provider: ProxmoxProvider, mirror: Mirror
) -> None:
    spec, graph = load(templates_yaml(mirror.url))
    assert run(graph, providers(spec, provider)).ok
    # The template leaves the spec (the guest keeps its template as a plain volume name).
    _, graph2 = load("")
    conv = anyio.run(lambda: converge(graph2, providers(spec, provider), allow_destroy=True))
    assert conv.ok
    assert not [c for c in conv.rounds[0].plan.changes if c.kind is Kind.TEMPLATE]
    assert f"local:vztmpl/{NEW}" in on_storage(provider)
    assert not [p for m, p in mutating_calls(pve) if m == "DELETE" and "/content/" in p]


def test_the_fake_checks_a_file_already_there_against_the_checksum(
    pve: Any, provider: ProxmoxProvider, mirror: Mirror
) -> None:
    """PVE's download_file_from_url on an existing file (what a race between two runs meets):
    the right checksum is OK without fetching, another fails, no checksum is refused."""
    local = provider.client.nodes("pve-runtime").storage("local")

    def download(**extra: str) -> dict[str, Any]:
        upid = local("download-url").post(
            url=f"{mirror.url}/images/{NEW}", content="vztmpl", filename=NEW, **extra
        )
        status: dict[str, Any] = provider.client.nodes("pve-runtime").tasks(upid).status.get()
        return status

    sha = {"checksum": SHA256, "checksum-algorithm": "sha256"}
    assert download(**sha)["exitstatus"] == "OK"
    assert download(**sha)["exitstatus"] == "OK"
    assert mirror.hits == [f"/images/{NEW}"]  # the second found the right file there
    wrong = download(checksum=WRONG, **{"checksum-algorithm": "sha256"})
    assert wrong["exitstatus"].startswith(f"checksum mismatch: got '{SHA256}'")
    assert wrong["exitstatus"].endswith(", aborting")
    assert download()["exitstatus"].startswith("refusing to override existing file")
    # A url the mirror does not have: wget's error response, and nothing stored.
    upid = local("download-url").post(
        url=f"{mirror.url}/images/gone.tar.zst", content="vztmpl", filename="gone.tar.zst", **sha
    )
    gone = provider.client.nodes("pve-runtime").tasks(upid).status.get()["exitstatus"]
    assert gone.startswith("download failed: ") and gone.endswith("exit code 8")
    assert "local:vztmpl/gone.tar.zst" not in on_storage(provider)


def test_import_writes_the_templates_its_guests_use(
    pve: Any, provider: ProxmoxProvider, mirror: Mirror
) -> None:
    """A container the platform made from a declared template: `import` reads its template back
    from the mark, and writes it under `templates:` with `url: null` (Proxmox keeps no record of
    where the file came from); the written spec links the guest to it and plans no change."""
    spec, graph = load(templates_yaml(mirror.url))
    assert run(graph, providers(spec, provider)).ok
    estate = anyio.run(read_estate, provider)
    result = render_specs(estate, Base.from_spec(spec))
    assert result.ok, [str(d) for d in result.load.diagnostics] if result.load else None
    text = result.files["platform.yaml"]
    assert "    url: null  # unknown: set url and checksum to have it downloaded\n" in text
    written = yaml.safe_load(text)["templates"]
    assert written == {
        "debian-13-standard-13-1-1-amd64": {
            "url": None,
            "storage": "local",
            "content": "vztmpl",
            "filename": NEW,
            "hosts": ["pve-runtime"],
        }
    }
    assert result.load is not None and result.load.spec is not None
    assert not result.load.diagnostics  # declared, never downloaded: no mistake
    imported = build_graph(result.load.spec, result.load.source)
    address = "template/debian-13-standard-13-1-1-amd64/pve-runtime"
    assert address in imported.resources["guest/mc-lobby"].depends_on
    # The file is there: the imported spec's template plans nothing (and downloads nothing).
    found = providers(result.load.spec, provider)
    plan = anyio.run(lambda: converge(imported, found, dry_run=True)).rounds[0].plan
    template = next(c for c in plan.changes if c.address == address)
    assert template.action is Action.NOOP


def test_one_listing_per_node_and_storage_and_none_on_an_offline_node(
    pve: Any, provider: ProxmoxProvider, mirror: Mirror
) -> None:
    """Templates on every node: `local` is listed once per node, a shared storage once for all;
    an offline node is not listed, and nothing is planned for its templates."""
    provider.client.storage.post(
        storage="isos", type="dir", path="/mnt/pve/isos", content="iso,vztmpl", shared=1
    )
    iso = f"""
  installer:
    url: {mirror.url}/images/installer.iso
    checksum: sha256:{SHA256}
    storage: isos
    content: iso
"""
    every_host = templates_yaml(mirror.url).replace("    hosts: [pve-runtime]\n", "")
    spec, graph = load(every_host + iso, control=True)
    assert sorted(a for a in graph.resources if a.startswith("template/")) == [
        "template/debian-13/pve-core",
        "template/debian-13/pve-runtime",
        "template/installer/pve-core",
        "template/installer/pve-runtime",
    ]
    found = providers(spec, provider)
    pve.requests.clear()
    plan = anyio.run(lambda: converge(graph, found, dry_run=True)).rounds[0].plan
    listed = [p for m, p, _ in pve.requests if m == "GET" and p.endswith("/content")]
    assert sorted(listed) == [
        "/api2/json/nodes/pve-core/storage/isos/content",
        "/api2/json/nodes/pve-core/storage/local/content",
        "/api2/json/nodes/pve-runtime/storage/local/content",
    ]
    creates = {c.address for c in plan.changes if c.action is Action.CREATE}
    assert "template/installer/pve-runtime" in creates

    pve.set_node_offline("pve-core")
    plan = anyio.run(lambda: converge(graph, found, dry_run=True)).rounds[0].plan
    by = {c.address: c for c in plan.changes}
    assert by["template/debian-13/pve-core"].action is Action.NOOP
    assert by["template/debian-13/pve-core"].before == {
        "node": "pve-core",
        "storage": "local",
        "content": "vztmpl",
        "filename": NEW,
        "volid": f"local:vztmpl/{NEW}",
        "listed": False,
    }
    assert by["template/debian-13/pve-runtime"].action is Action.CREATE
