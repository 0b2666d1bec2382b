"""Declared templates in the spec, the graph and the offline plan: the checks (with file and
line), one resource per node a guest depends on, `+ template/...` in an earlier wave than the
guest in `plan --observed` and `plan --base`, no change for a template that is there, never a
delete for one that left the spec, a warning (not a download) for one without a url, and the
placement check that lets a guest wait for its template instead of refusing it."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from reconciler.cli.main import main
from reconciler.loading.graph import build_graph
from reconciler.loading.loader import LoadResult, load_texts
from reconciler.model.observed import (
    ClusterFacts,
    NodeFacts,
    ObservedResource,
    ObservedState,
    StorageFacts,
)
from reconciler.model.plans import Action
from reconciler.model.resources import DesiredGraph, Kind
from reconciler.planning.planner import converged_state, make_plan
from tests.guest_helpers import GAME_RANGE, platform_yaml

FILE = "debian-13-standard_13.1-1_amd64.tar.zst"
VOLID = f"local:vztmpl/{FILE}"
SHA = hashlib.sha256(b"template").hexdigest()
URL = f"https://images.example.org/system/{FILE}"
PLATFORM = platform_yaml(GAME_RANGE, control=True)
TEMPLATES = f"""
templates:
  debian-13:
    url: {URL}
    checksum: sha256:{SHA}
    storage: local
"""
GUESTS = f"""
guests:
  mc-lobby:
    role: game
    vmid: 1000
    host: pve-runtime
    template: {VOLID}
"""


def load(templates: str = TEMPLATES, guests: str = GUESTS) -> LoadResult:
    return load_texts({"platform.yaml": PLATFORM + templates, "guests.yaml": guests})


def graph_of(templates: str = TEMPLATES, guests: str = GUESTS) -> DesiredGraph:
    loaded = load(templates, guests)
    assert loaded.ok and loaded.spec is not None, [str(d) for d in loaded.diagnostics]
    return build_graph(loaded.spec, loaded.source)


def found(diags: LoadResult) -> set[tuple[str, str, int | None, str]]:
    return {
        (d.severity.value, d.code, d.position.line if d.position else None, d.path or "")
        for d in diags.diagnostics
    }


# --- the spec and its checks ------------------------------------------------------------------


def line_of(text: str, needle: str) -> int:
    """The 1-based line of `text` where `needle` first appears."""
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


@pytest.mark.parametrize(
    ("entry", "message", "at"),
    [
        ({"checksum": "sha256:abc"}, "the sha256 checksum 'abc' is not 64 hex digits", "checksum"),
        ({"checksum": f"crc32:{SHA}"}, "is not a checksum: write ALGORITHM:HEX", "checksum"),
        ({"checksum": None}, "needs its checksum", None),
        ({"url": "ftp://example.org/x.tar.zst"}, "not an http:// or https:// URL", "url"),
        ({"content": "import"}, "cannot be an import file", None),
        ({"filename": "debian 13.tar.zst"}, "set filename: debian_13.tar.zst", None),
        ({"url": None}, "a template without a url needs its filename", None),
    ],
)
def test_a_malformed_template_is_an_error_at_its_line(
    entry: dict[str, str | None], message: str, at: str | None
) -> None:
    fields = {"url": URL, "checksum": f"sha256:{SHA}", "storage": "local"}
    fields.update(entry)
    body = "".join(
        f"    {k}: {'null' if v is None else json.dumps(v)}\n"
        for k, v in fields.items()
        if not (k == "checksum" and v is None)
    )
    templates = "\ntemplates:\n  debian-13:\n" + body
    loaded = load(templates)
    assert not loaded.ok
    (diag,) = [d for d in loaded.diagnostics if message in d.message]
    assert diag.position is not None and diag.position.file == "platform.yaml"
    text = PLATFORM + templates
    # A field's own error at its line; one about the entry as a whole where its mapping starts.
    expected = line_of(text, f"    {at}:") if at else line_of(text, "  debian-13:") + 1
    assert diag.position.line == expected
    assert diag.path == "templates.debian-13" + (f".{at}" if at else "")


def test_hosts_must_exist_and_a_guest_needs_its_template_on_its_host() -> None:
    loaded = load(TEMPLATES + "    hosts: [pve-core, pve-runtim]\n")
    assert not loaded.ok
    hosts = line_of(PLATFORM + TEMPLATES, "    storage: local") + 1
    assert found(loaded) == {
        ("error", "unknown-reference", hosts, "templates.debian-13.hosts[1]"),
        ("error", "template-host", line_of(GUESTS, "template:"), "guests.mc-lobby.template"),
    }
    hint = next(d for d in loaded.diagnostics if d.code == "unknown-reference")
    assert "did you mean 'pve-runtime'?" in hint.message
    host = next(d for d in loaded.diagnostics if d.code == "template-host")
    assert host.position is not None and host.position.file == "guests.yaml"
    assert "add the host to templates.debian-13.hosts" in host.message


def test_one_file_declared_twice_on_a_node_is_an_error() -> None:
    twice = TEMPLATES + TEMPLATES.replace("templates:\n  debian-13:", "  again:")
    loaded = load(twice)
    line = line_of(PLATFORM + twice, "  debian-13:")
    assert found(loaded) == {("error", "template-duplicate", line, "templates.debian-13")}
    (diag,) = loaded.diagnostics
    assert "templates 'again' and 'debian-13' are both " + VOLID in diag.message
    assert [p.line for p in diag.related] == [line_of(PLATFORM + twice, "  again:")]


def test_a_template_without_url_validates_without_a_word() -> None:
    """A file uploaded by hand (or one `import` found): declared, never downloaded."""
    entry = f"\ntemplates:\n  debian-13:\n    url: null\n    storage: local\n    filename: {FILE}\n"
    loaded = load(entry)
    assert loaded.ok
    assert found(loaded) == set()


# --- the graph and the offline plan -------------------------------------------------------------


def test_a_guest_depends_on_its_template_on_its_own_node() -> None:
    graph = graph_of()
    nodes = {a for a, r in graph.resources.items() if r.kind is Kind.TEMPLATE}
    assert nodes == {"template/debian-13/pve-core", "template/debian-13/pve-runtime"}
    guest = graph.resources["guest/mc-lobby"]
    assert guest.depends_on == ("template/debian-13/pve-runtime",)
    assert graph.waves["template/debian-13/pve-runtime"] == 0
    assert graph.waves["guest/mc-lobby"] == 1
    attrs = graph.resources["template/debian-13/pve-runtime"].attributes
    assert attrs["volid"] == VOLID and attrs["checksum"] == f"sha256:{SHA}"


def present(graph: DesiredGraph, *addresses: str) -> list[ObservedResource]:
    """The templates as the provider observes them when their files are there."""
    out = []
    for address in addresses:
        attrs = graph.resources[address].attributes
        seen = {k: attrs[k] for k in ("node", "storage", "content", "filename", "volid")}
        out.append(
            ObservedResource(
                address=address,
                kind=Kind.TEMPLATE,
                owned=True,
                id={"node": attrs["node"]},
                attributes=seen,
            )
        )
    return out


def test_missing_templates_are_created_before_the_guest() -> None:
    graph = graph_of()
    plan = make_plan(graph, ObservedState(platform="zpack"))
    by = {c.address: c for c in plan.changes}
    template = by["template/debian-13/pve-runtime"]
    assert template.action is Action.CREATE
    assert template.id == {"node": "pve-runtime"}
    assert template.wave < by["guest/mc-lobby"].wave
    assert by["template/debian-13/pve-core"].action is Action.CREATE


def test_a_template_that_is_there_plans_nothing_and_one_that_left_is_never_deleted() -> None:
    graph = graph_of()
    observed = converged_state(graph)
    plan = make_plan(graph, observed)
    assert all(c.action is Action.NOOP for c in plan.changes)
    # A template that left the spec: not deleted, even with --allow-destroy.
    without = graph_of(templates="")
    plan = make_plan(without, observed, allow_destroy=True)
    assert not [c for c in plan.changes if c.kind is Kind.TEMPLATE]
    assert not plan.errored


def test_a_missing_template_without_url_is_a_warning_not_a_download() -> None:
    entry = f"\ntemplates:\n  debian-13:\n    url: null\n    storage: local\n    filename: {FILE}\n"
    graph = graph_of(templates=entry)
    observed = ObservedState(
        platform="zpack", resources=tuple(present(graph, "template/debian-13/pve-core"))
    )
    plan = make_plan(graph, observed)
    assert not [c for c in plan.changes if c.kind is Kind.TEMPLATE and c.action is Action.CREATE]
    (warned,) = [d for d in plan.diagnostics if d.code == "template-missing"]
    assert "template/debian-13/pve-runtime" in warned.message and "no url" in warned.message
    assert warned.position is not None and warned.position.file == "platform.yaml"


def cluster(templates: tuple[str, ...]) -> ClusterFacts:
    local = StorageFacts(content=("iso", "vztmpl"), templates=templates)
    lvm = StorageFacts(content=("images", "rootdir"))
    facts = NodeFacts(maxmem=256 << 30, storages={"local": local, "local-lvm": lvm})
    return ClusterFacts(nodes={"pve-core": facts, "pve-runtime": facts})


def test_placement_lets_a_guest_wait_for_a_declared_template() -> None:
    """Not on the node yet: declared with a url, the plan downloads it first and creates the
    guest; not declared, the guest is a placement error, as before."""
    observed = ObservedState(platform="zpack", cluster=cluster(()))
    plan = make_plan(graph_of(), observed)
    assert not plan.errored, [str(d) for d in plan.diagnostics]
    assert {c.address: c.action for c in plan.changes}["guest/mc-lobby"] is Action.CREATE
    plan = make_plan(graph_of(templates=""), observed)
    assert plan.errored
    assert [d.code for d in plan.diagnostics if d.severity.value == "error"] == ["template-missing"]
    assert "guest/mc-lobby" not in {c.address for c in plan.changes}


def test_target_by_name_takes_the_template_on_every_node() -> None:
    graph = graph_of()
    plan = make_plan(graph, ObservedState(platform="zpack"), targets=["template/debian-13"])
    assert {c.address for c in plan.changes} == {
        "template/debian-13/pve-core",
        "template/debian-13/pve-runtime",
    }
    plan = make_plan(graph, ObservedState(platform="zpack"), targets=["guest/mc-lobby"])
    assert {c.address for c in plan.changes} == {
        "guest/mc-lobby",
        "template/debian-13/pve-runtime",
    }


# --- the command line: plan --observed and plan --base ---------------------------------------


def write_specs(directory: Path, templates: str = TEMPLATES) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "platform.yaml").write_text(PLATFORM + templates)
    (directory / "guests.yaml").write_text(GUESTS)


def test_plan_observed_shows_the_downloads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    specs = tmp_path / "specs"
    write_specs(specs)
    empty = tmp_path / "observed.json"
    empty.write_text(ObservedState(platform="zpack", source="test").model_dump_json())
    assert main(["plan", str(specs), "--observed", str(empty)]) == 0
    out = capsys.readouterr().out
    assert "+ template/debian-13/pve-runtime  (on pve-runtime)" in out
    assert f'url       "{URL}"' in out
    assert out.index("+ template/debian-13/pve-runtime") < out.index("+ guest/mc-lobby")


def test_plan_base_shows_a_template_added_by_the_change(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = tmp_path / "repo"
    write_specs(repo / "specs", templates="")

    def git(*args: str) -> None:
        subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
            cwd=repo,
            check=True,
            capture_output=True,
        )

    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "base")
    write_specs(repo / "specs")  # the working tree declares the template
    code = main(["plan", str(repo / "specs"), "--base", "HEAD", "--format", "json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0
    changed = {c["address"]: c["action"] for c in doc["changes"] if c["action"] != "no-op"}
    assert changed == {
        "template/debian-13/pve-core": "create",
        "template/debian-13/pve-runtime": "create",
    }
