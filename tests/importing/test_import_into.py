"""Bringing an import into a platform's own specs, on fakepve through the commands: a guest
adopted from `imported/` is named in the plan of `specs/` as adopted elsewhere (not a plain
orphan, and visibly so when pruning would delete it) until `merge` brings it in; `import
--into specs` does it in one step; the hints name the directory to pass (`--dir`); adopt's
refusal names the directory it read; a conflict writes nothing.

Adopt writes the directory it read into the mark (`adopted=imported`, for a container and a
VM alike, normalised, a space percent-encoded), and a plan of another directory names it and
the exact merge; a plan of that directory itself (or a folder of it) that lacks the guest
calls it a plain orphan.

The planner's rule is also checked offline: a mark naming another directory is adopted
elsewhere, one naming the planned directory is an orphan; a mark without the field falls back
to the template: only a guest whose mark names the import's placeholder template is said to be
adopted elsewhere; any other owned guest missing from the spec (a VM's) is an orphan, as before.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from reconciler.cli.main import main
from reconciler.loading.graph import build_graph
from reconciler.loading.loader import load_texts
from reconciler.model.observed import ObservedResource, ObservedState
from reconciler.model.plans import Action, Plan
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
    # The mark names the directory adopt read: the hint is the exact command.
    assert f"(vmid 1000) was adopted from the specs in {imported}/, not from {specs}/" in note
    assert f"(its mark says adopted={imported})" in note
    assert f"`reconciler merge {imported} {specs}`" in note
    assert "IMPORT_DIR" not in note
    assert "kept because pruning is off" in note
    delete = change(plan, "guest/mc-lobby")
    assert (delete["action"], delete["cause"]) == ("delete", "not-in-spec")
    assert delete["blocked"]
    assert (
        f"adopted from {imported}: merge it in first (reconciler merge {imported} {specs})"
        in (delete["reason"])
    )

    # Pruning on: the delete is planned, and the plan says loudly what it is.
    plan = plan_of(capsys, specs, pve_api, "--allow-destroy")
    note = guest_notes(plan, "adopted-elsewhere")["guest/mc-lobby"]
    assert "this plan DELETES it (pruning is on): merge first" in note
    assert change(plan, "guest/mc-lobby")["blocked"] is None
    argv = ["plan", str(specs), "--allow-destroy", "--color", "never", *flags(pve_api)]
    code, text, _ = run(capsys, *argv)
    banner = text[: text.index("guest/mc-lobby") + 400]
    assert f"adopted from {imported}: merge it in first" in banner
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


def owned_guest(
    name: str, vmid: int, template: str | None, adopted: str | None = None
) -> ObservedResource:
    """An owned guest as observed: a container (a template in its mark) or a VM (None);
    `adopted`: the directory its mark names."""
    attributes: dict[str, Any] = {"name": name, "vmid": vmid, "node": "pve1"}
    attributes.update({"type": "lxc", "template": template} if template else {"type": "qemu"})
    if adopted is not None:
        attributes["adopted"] = adopted
    return ObservedResource(
        address=f"guest/{name}",
        kind=Kind.GUEST,
        owned=True,
        id={"vmid": vmid, "node": "pve1"},
        attributes=attributes,
    )


def plan_specs(*guests: ObservedResource, allow_destroy: bool = False) -> Plan:
    """The plan of `specs/` (no guests in it) with these guests observed."""
    loaded = load_texts({"specs/platform.yaml": SPEC})
    assert loaded.spec is not None
    graph = build_graph(loaded.spec, loaded.source)
    observed = ObservedState(platform="zpack", resources=guests)
    return make_plan(graph, observed, allow_destroy=allow_destroy)


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


# --- the mark names the directory adopted from (`adopted=`) ----------------------------------

VM = 1010  # a VM beside the estate's containers, in the game range
VM_NET = "virtio=BC:24:11:00:10:10,bridge=vmbr0,firewall=1,tag=20"


def add_vm(pve: Any) -> None:
    pve.add_vm(
        VM,
        "mc-modded",
        node="pve-runtime",
        status="running",
        config={
            "cores": 2,
            "memory": 4096,
            "tags": "game",
            "onboot": 1,
            "scsihw": "virtio-scsi-single",
            "scsi0": f"local-lvm:vm-{VM}-disk-0,size=32G",
            "net0": VM_NET,
            "description": "modded server",
        },
    )
    pve.requests.clear()


def last_line(description: str) -> str:
    return description.rstrip("\n").rsplit("\n", 1)[-1]


def test_the_plan_of_another_directory_names_the_one_a_guest_and_a_vm_were_adopted_from(
    specs: Path,
    pve_api: ProxmoxApi,
    pve: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    add_vm(pve)
    monkeypatch.chdir(tmp_path)  # the directories as people name them: relative
    code, _, err = run(capsys, "import", "--out", "imported", "--dir", "specs", *flags(pve_api))
    assert code == 0, err
    adopt = ["adopt", "guest/mc-lobby", "guest/mc-modded", "--dir", "./imported/"]
    code, out, err = run(capsys, *adopt, "--auto-approve", *flags(pve_api))
    assert code == 0, err + out
    # Written as given, normalised: `./imported/` is `imported`; a VM's mark too.
    assert last_line(pve.ct(1000).config["description"]) == (
        "reconciler:v1 platform=zpack address=guest/mc-lobby vmid=1000 "
        f"template={PLACEHOLDER} adopted=imported"
    )
    assert last_line(pve.vm(VM).config["description"]) == (
        f"reconciler:v1 platform=zpack address=guest/mc-modded vmid={VM} adopted=imported"
    )
    pve.requests.clear()

    # The import's own directory: both are its, in sync (the field is never drift).
    plan = plan_of(capsys, Path("imported"), pve_api, "--allow-destroy")
    for address in ("guest/mc-lobby", "guest/mc-modded"):
        assert change(plan, address)["action"] == "no-op"
    assert guest_notes(plan, "orphan", "adopted-elsewhere") == {}

    # specs/ lacks both: each named with the directory and the exact merge, a VM as well as a
    # container (a VM's mark names no template: before the field it was a plain orphan).
    plan = plan_of(capsys, Path("specs"), pve_api)
    assert guest_notes(plan, "orphan") == {}
    notes = guest_notes(plan, "adopted-elsewhere")
    assert set(notes) == {"guest/mc-lobby", "guest/mc-modded"}
    for address, vmid in (("guest/mc-lobby", 1000), ("guest/mc-modded", VM)):
        assert notes[address] == (
            f"{address} (vmid {vmid}) was adopted from the specs in imported/, not from specs/ "
            "(its mark says adopted=imported), so it most likely lives there: merge it into "
            "specs/ with `reconciler merge imported specs`; kept because pruning is off "
            "(platform.prune or --allow-destroy)"
        )
        delete = change(plan, address)
        assert (delete["action"], delete["cause"]) == ("delete", "not-in-spec")
        assert delete["reason"] == (
            "not in the spec; adopted from imported: merge it in first "
            "(reconciler merge imported specs)"
        )
    plan = plan_of(capsys, Path("specs"), pve_api, "--allow-destroy")
    assert "this plan DELETES it" in guest_notes(plan, "adopted-elsewhere")["guest/mc-modded"]
    assert mutating_calls(pve) == []

    # The command the warning names brings them in: no warning, nothing to do.
    code, _, err = run(capsys, "merge", "imported", "specs")
    assert code == 0, err
    plan = plan_of(capsys, Path("specs"), pve_api)
    assert guest_notes(plan, "orphan", "adopted-elsewhere") == {}
    assert {change(plan, a)["action"] for a in ("guest/mc-lobby", "guest/mc-modded")} == {"no-op"}


def test_a_guest_adopted_into_this_directory_and_gone_from_it_is_a_plain_orphan(
    specs: Path, pve_api: ProxmoxApi, pve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "import", "--into", str(specs), *flags(pve_api))
    assert code == 0, err
    adopt = ["adopt", "guest/mc-lobby", "--dir", str(specs), "--auto-approve"]
    code, out, err = run(capsys, *adopt, *flags(pve_api))
    assert code == 0, err + out
    assert last_line(pve.ct(1000).config["description"]).endswith(f" adopted={specs}")
    # Taken out of the spec by hand: its mark names this directory, so it was not adopted
    # elsewhere, though its template is the import's placeholder (the field decides).
    game = specs / "imported-game.yaml"
    text = game.read_text()
    data = yaml.safe_load(text)
    del data["guests"]["mc-lobby"]
    game.write_text(yaml.safe_dump(data))
    plan = plan_of(capsys, specs, pve_api)
    assert guest_notes(plan, "adopted-elsewhere") == {}
    assert (
        "(vmid 1000) is owned by the controller but no longer in the spec"
        in (guest_notes(plan, "orphan")["guest/mc-lobby"])
    )
    assert change(plan, "guest/mc-lobby")["reason"] == "not in the spec"


def test_a_directory_with_a_space_is_written_encoded_and_named_quoted(
    specs: Path,
    pve_api: ProxmoxApi,
    pve: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    imported = tmp_path / "new import"
    code, _, err = run(
        capsys, "import", "--out", str(imported), "--dir", str(specs), *flags(pve_api)
    )
    assert code == 0, err
    adopt = ["adopt", "guest/mc-lobby", "--dir", str(imported), "--auto-approve"]
    code, out, err = run(capsys, *adopt, *flags(pve_api))
    assert code == 0, err + out
    encoded = str(imported).replace(" ", "%20")
    assert last_line(pve.ct(1000).config["description"]).endswith(f" adopted={encoded}")
    note = guest_notes(plan_of(capsys, specs, pve_api), "adopted-elsewhere")["guest/mc-lobby"]
    assert f"adopted from the specs in {imported}/, not from {specs}/" in note
    assert f"`reconciler merge '{imported}' {specs}`" in note


@pytest.mark.parametrize(
    "adopted",
    ["specs", "./specs/", "specs/game", os.path.abspath("specs"), "."],
    ids=["same", "spelled-otherwise", "below", "absolute", "above"],
)
@pytest.mark.parametrize("template", [PLACEHOLDER, None], ids=["container", "vm"])
def test_a_mark_naming_the_directory_planned_makes_a_plain_orphan(
    adopted: str, template: str | None
) -> None:
    """`specs/` read with its subdirectories: a guest adopted from it (or from a folder of it,
    or from a folder holding it) and gone from it is an orphan, whatever its template says."""
    plan = plan_specs(owned_guest("gone", 1000, template, adopted))
    codes = {d.address: d.code for d in plan.diagnostics}
    assert codes["guest/gone"] == "orphan"
    [delete] = [c for c in plan.changes if c.address == "guest/gone"]
    assert delete.reason == "not in the spec"


@pytest.mark.parametrize(
    ("adopted", "merge"),
    [
        ("imported", "reconciler merge imported specs"),
        ("specs-imported", "reconciler merge specs-imported specs"),  # a prefix, not a folder
        ("/srv/imports/zpack", "reconciler merge /srv/imports/zpack specs"),
        ("my imports", "reconciler merge 'my imports' specs"),
    ],
    ids=["relative", "prefix", "absolute", "space"],
)
@pytest.mark.parametrize("template", [PLACEHOLDER, "local:vztmpl/d.tar.zst", None])
def test_a_mark_naming_another_directory_names_it_and_the_merge(
    adopted: str, merge: str, template: str | None
) -> None:
    plan = plan_specs(owned_guest("moved", 1000, template, adopted), allow_destroy=True)
    [diag] = [d for d in plan.diagnostics if d.address == "guest/moved"]
    assert diag.code == "adopted-elsewhere"
    assert f"adopted from the specs in {adopted}/, not from specs/" in diag.message
    assert f"(its mark says adopted={adopted})" in diag.message
    assert f"`{merge}`" in diag.message and "this plan DELETES it" in diag.message
    assert "IMPORT_DIR" not in diag.message
    [delete] = [c for c in plan.changes if c.address == "guest/moved"]
    assert delete.reason == f"not in the spec; adopted from {adopted}: merge it in first ({merge})"
    assert delete.action is Action.DELETE and delete.blocked is None


def test_a_vm_adopted_before_marks_named_the_directory_is_a_plain_orphan() -> None:
    """The fallback cannot tell for a VM (its mark names no template): as before the field."""
    plan = plan_specs(owned_guest("old-vm", 1000, None))
    assert {d.address: d.code for d in plan.diagnostics}["guest/old-vm"] == "orphan"
