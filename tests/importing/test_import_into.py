"""Bringing an import into a platform's own specs, on fakepve through the commands: a guest
adopted from `imported/` is named in the plan of `specs/` as adopted elsewhere (not a plain
orphan, and visibly so when pruning would delete it) until `merge` brings it in; `import
--into specs` does it in one step; the hints name the directory to pass (`--dir`); adopt's
refusal names the directory it read; a conflict writes nothing.

The planner's rule is also checked offline: only a guest whose mark names the import's
placeholder template is said to be adopted elsewhere; any other owned guest missing from the
spec is an orphan, as before.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from reconciler.cli.main import main
from reconciler.loading.graph import build_graph
from reconciler.loading.loader import load_texts
from reconciler.model.observed import ObservedResource, ObservedState
from reconciler.model.plans import Action
from reconciler.model.resources import Kind
from reconciler.model.spec import ProxmoxApi
from reconciler.planning.planner import make_plan
from reconciler.providers.proxmox import ProxmoxProvider
from tests.cli.test_live import flags
from tests.fakepve_fixtures import mutating_calls
from tests.importing.test_import_adopt import VMIDS, build_estate

PLACEHOLDER = "unknown:vztmpl/debian-imported.tar.zst"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def plan_of(
    capsys: pytest.CaptureFixture[str], directory: Path, api: ProxmoxApi, *more: str
) -> dict[str, Any]:
    code, out, err = run(capsys, "plan", str(directory), "--format", "json", *flags(api), *more)
    assert code == 0, err
    plan: dict[str, Any] = json.loads(out)
    return plan


def guest_notes(plan: dict[str, Any], *codes: str) -> dict[str, str]:
    """Address -> message of the plan's diagnostics with these codes, about guests."""
    return {
        d["address"]: d["message"]
        for d in plan["diagnostics"]
        if d["code"] in codes and str(d["address"]).startswith("guest/")
    }


def change(plan: dict[str, Any], address: str) -> dict[str, Any]:
    [found] = [c for c in plan["changes"] if c["address"] == address]
    return found


@pytest.fixture
def specs(
    pve: Any,
    provider: ProxmoxProvider,
    pve_api: ProxmoxApi,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> Path:
    """The hand-made estate on fakepve, and a platform's own specs without its guests (written
    by `init`, pointed at fakepve), with one firewall alias of its own: a plan names the
    directory of the files its resources were written in (a spec with none cannot be named)."""
    build_estate(pve, provider)
    directory = tmp_path / "specs"
    code, _, err = run(
        capsys,
        "init",
        str(directory),
        "--name",
        "zpack",
        "--nodes",
        "pve-core,pve-runtime",
        "--cores",
        "16",
        "--memory",
        "64G",
        *flags(pve_api),
    )
    assert code == 0, err
    (directory / "firewall.yaml").write_text("firewall: {aliases: {dns: {cidr: 10.10.0.53}}}\n")
    pve.requests.clear()
    return directory


def test_a_guest_adopted_from_an_import_is_named_in_the_plan_until_merged(
    specs: Path,
    pve_api: ProxmoxApi,
    pve: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    imported = tmp_path / "imported"
    code, out, err = run(
        capsys, "import", "--out", str(imported), "--dir", str(specs), *flags(pve_api)
    )
    assert code == 0, err
    # Every hint names the directory adopt must read.
    assert f"`reconciler adopt ADDR... --dir {imported}`" in out
    assert f"`reconciler merge {imported} SPECS`" in out
    assert f"`reconciler adopt ADDRESS --dir {imported}`" in (imported / "game.yaml").read_text()
    pending = guest_notes(plan_of(capsys, imported, pve_api), "adoption-pending")
    assert set(pending) == {f"guest/{n}" for n in VMIDS}
    assert (
        f"`reconciler adopt guest/mc-lobby --dir {imported}` to manage it"
        in (pending["guest/mc-lobby"])
    )

    adopt = ["adopt", "guest/mc-lobby", "--dir", str(imported), "--auto-approve"]
    code, out, err = run(capsys, *adopt, *flags(pve_api))
    assert code == 0, err + out
    pve.requests.clear()

    # specs/ does not have it: adopted elsewhere, kept, and said so (not a plain orphan).
    plan = plan_of(capsys, specs, pve_api)
    assert guest_notes(plan, "orphan") == {}
    note = guest_notes(plan, "adopted-elsewhere")["guest/mc-lobby"]
    assert f"(vmid 1000) was adopted from imported specs, not from {specs}/" in note
    assert PLACEHOLDER in note
    assert f"`reconciler merge IMPORT_DIR {specs}`" in note
    assert f"`reconciler import --into {specs}`" in note
    assert "kept because pruning is off" in note
    delete = change(plan, "guest/mc-lobby")
    assert (delete["action"], delete["cause"]) == ("delete", "not-in-spec")
    assert delete["blocked"] and "adopted from imported specs" in delete["reason"]

    # Pruning on: the delete is planned, and the plan says loudly what it is.
    plan = plan_of(capsys, specs, pve_api, "--allow-destroy")
    note = guest_notes(plan, "adopted-elsewhere")["guest/mc-lobby"]
    assert "this plan DELETES it (pruning is on): merge first" in note
    assert change(plan, "guest/mc-lobby")["blocked"] is None
    argv = ["plan", str(specs), "--allow-destroy", "--color", "never", *flags(pve_api)]
    code, text, _ = run(capsys, *argv)
    banner = text[: text.index("guest/mc-lobby") + 400]
    assert "adopted from imported specs: merge them in first" in banner
    assert mutating_calls(pve) == []

    code, out, err = run(capsys, "merge", str(imported), str(specs))
    assert code == 0, err
    assert "+ guest/mc-lobby" in out
    plan = plan_of(capsys, specs, pve_api)
    assert guest_notes(plan, "orphan", "adopted-elsewhere") == {}
    assert change(plan, "guest/mc-lobby")["action"] == "no-op"
    pending = guest_notes(plan, "adoption-pending")
    assert set(pending) == {f"guest/{n}" for n in VMIDS if n != "mc-lobby"}
    assert f"`reconciler adopt guest/mc-survival --dir {specs}`" in pending["guest/mc-survival"]
    assert mutating_calls(pve) == []


def test_import_into_the_specs_adds_the_estate_in_one_step(
    specs: Path, pve_api: ProxmoxApi, pve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    before = {p.name: p.read_text() for p in specs.iterdir()}
    code, out, err = run(capsys, "import", "--into", str(specs), *flags(pve_api))
    assert code == 0, err
    assert f"{specs}: merged 7 guests" in out and f"--dir {specs}`" in out
    # The platform's own files are untouched; the estate is in new ones.
    assert {n: (specs / n).read_text() for n in before} == before
    assert (specs / "imported-game.yaml").exists()
    assert "Imported by `reconciler import --into`" in (specs / "imported-game.yaml").read_text()
    plan = plan_of(capsys, specs, pve_api)
    assert guest_notes(plan, "orphan", "adopted-elsewhere") == {}
    pending = guest_notes(plan, "adoption-pending")
    assert set(pending) == {f"guest/{n}" for n in VMIDS}
    assert (
        f"`reconciler adopt guest/mc-lobby --dir {specs}` to manage it"
        in (pending["guest/mc-lobby"])
    )
    code, _, err = run(
        capsys, "adopt", "guest/mc-lobby", "--dir", str(specs), "--auto-approve", *flags(pve_api)
    )
    assert code == 0, err
    assert change(plan_of(capsys, specs, pve_api), "guest/mc-lobby")["action"] == "no-op"
    # Again: every guest is there already (the adopted one too, by its mark): nothing added.
    files = {p.name: p.read_text() for p in specs.iterdir()}
    code, out, err = run(capsys, "import", "--into", str(specs), *flags(pve_api))
    assert code == 0, err
    assert "nothing to merge" in out
    assert {p.name: p.read_text() for p in specs.iterdir()} == files


def test_import_into_refuses_a_guest_the_specs_define_otherwise(
    specs: Path, pve_api: ProxmoxApi, pve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    (specs / "game.yaml").write_text(
        "guests:\n"
        "  mc-lobby: {role: game, vmid: 1050, host: pve-runtime, profile: default,\n"
        "             template: local:vztmpl/debian.tar.zst}\n"
    )
    before = {p.name: p.read_text() for p in specs.iterdir()}
    code, _, err = run(capsys, "import", "--into", str(specs), *flags(pve_api))
    assert code == 1
    assert f"guest 'mc-lobby' is defined in {specs}/game.yaml:2 and, differently, in " in err
    assert "(import)/game.yaml:" in err and "nothing merged" in err
    assert {p.name: p.read_text() for p in specs.iterdir()} == before
    assert mutating_calls(pve) == []


def test_adopt_names_the_directory_it_read(
    specs: Path, pve_api: ProxmoxApi, pve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(
        capsys, "adopt", "guest/mc-lobby", "--dir", str(specs), "--auto-approve", *flags(pve_api)
    )
    assert code == 1
    assert f"refused  guest/mc-lobby: not in the specs in {specs} (0 guest entries there)" in out
    assert "the `import --out` directory" in out
    assert mutating_calls(pve) == []


# --- the planner's rule, offline ------------------------------------------------------------

SPEC = """\
platform: {name: zpack}
layers: {runtime: {}}
hosts: {pve1: {layers: [runtime], capacity: {cores: 8, memory: 16G}}}
ranges: {game: {first: 1000, last: 1099, layer: runtime}}
firewall: {aliases: {dns: {cidr: 10.10.0.53}}}
"""


def owned_guest(name: str, vmid: int, template: str) -> ObservedResource:
    return ObservedResource(
        address=f"guest/{name}",
        kind=Kind.GUEST,
        owned=True,
        id={"vmid": vmid, "node": "pve1"},
        attributes={"name": name, "vmid": vmid, "node": "pve1", "template": template},
    )


@pytest.mark.parametrize("allow_destroy", [False, True], ids=["kept", "pruned"])
def test_only_a_guest_adopted_from_an_import_is_said_to_be_adopted_elsewhere(
    allow_destroy: bool,
) -> None:
    loaded = load_texts({"specs/platform.yaml": SPEC})
    assert loaded.spec is not None
    graph = build_graph(loaded.spec, loaded.source)
    observed = ObservedState(
        platform="zpack",
        resources=(
            owned_guest("from-import", 1000, PLACEHOLDER),
            owned_guest("made-here", 1001, "local:vztmpl/debian-12.tar.zst"),
        ),
    )
    plan = make_plan(graph, observed, allow_destroy=allow_destroy)
    codes = {d.address: d.code for d in plan.diagnostics}
    assert codes["guest/from-import"] == "adopted-elsewhere"
    assert codes.get("guest/made-here") == (None if allow_destroy else "orphan")
    deletes = {c.address: c for c in plan.changes if c.action is Action.DELETE}
    assert "merge them in first (reconciler merge IMPORT_DIR specs)" in (
        deletes["guest/from-import"].reason
    )
    assert deletes["guest/made-here"].reason == "not in the spec"
    assert all((c.blocked is None) is allow_destroy for c in deletes.values())
