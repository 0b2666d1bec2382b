"""The commands end to end, through `main()`, as a person or CI runs them."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from reconciler.cli.main import main
from reconciler.loading.schema import schema_document
from reconciler.model.resources import DesiredGraph
from reconciler.planning.planner import converged_state
from tests.conftest import ROOT, SPECS


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_validate_example_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["validate", str(SPECS)], capsys)
    assert code == 0
    assert "valid (10 files, 21 guests" in out


def test_validate_reports_every_problem_in_one_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    specs = tmp_path / "specs"
    shutil.copytree(SPECS, specs)
    (specs / "oops.yaml").write_text(
        "guests:\n"
        "  mc-extra:\n"
        "    role: game\n"
        "    host: pve-runtime\n"
        "    profile: game-vanilla\n"
        "    memroy: 2G\n"
        "  mc-other:\n"
        "    role: gmae\n"
        "    host: pve-runtime\n"
        "    profile: game-vanilla\n"
    )
    code, out, _ = run(["validate", str(specs)], capsys)
    assert code == 1
    assert f"{specs}/oops.yaml:6:5: error: unknown field 'memroy'; did you mean 'memory'?" in out
    assert f"{specs}/oops.yaml:8:11: error: role 'gmae' is not defined; did you mean 'game'?" in out


def test_validate_json_and_github_formats(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    specs = tmp_path / "specs"
    shutil.copytree(SPECS, specs)
    (specs / "bad.yaml").write_text("guests:\n  x: {role: game, host: nowhere, template: t}\n")
    code, out, _ = run(["validate", str(specs), "--format", "json"], capsys)
    doc = json.loads(out)
    assert code == 1 and doc["valid"] is False
    assert (doc["format"], doc["format_version"]) == ("reconciler/validate", 1)
    found = {(d["code"], d["line"], d["path"]) for d in doc["diagnostics"]}
    assert ("unknown-reference", 2, "guests.x.host") in found
    code, out, _ = run(["validate", str(specs), "--format", "github"], capsys)
    assert f"::error file={specs}/bad.yaml,line=2,col=25,title=unknown-reference::host" in out


def _snapshot(tmp_path: Path, graph: DesiredGraph, empty: bool) -> Path:
    path = tmp_path / "observed.json"
    state = converged_state(graph)
    if empty:
        state = state.model_copy(update={"resources": ()})
    path.write_text(state.model_dump_json())
    return path


def test_plan_detailed_exitcode(
    tmp_path: Path, graph: DesiredGraph, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = _snapshot(tmp_path, graph, empty=True)
    code, out, _ = run(
        ["plan", str(SPECS), "--observed", str(empty), "--detailed-exitcode"], capsys
    )
    assert code == 2 and "96 to create" in out  # 67, and 29 DNS record sets
    code, _, _ = run(["plan", str(SPECS), "--observed", str(empty)], capsys)
    assert code == 0
    converged = _snapshot(tmp_path, graph, empty=False)
    code, out, _ = run(
        ["plan", str(SPECS), "--observed", str(converged), "--detailed-exitcode"], capsys
    )
    assert code == 0 and "No changes." in out


def test_plan_saves_json(
    tmp_path: Path, graph: DesiredGraph, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = _snapshot(tmp_path, graph, empty=True)
    saved = tmp_path / "plan.json"
    code, _, _ = run(
        ["plan", str(SPECS), "--observed", str(empty), "--out", str(saved), "--format", "markdown"],
        capsys,
    )
    assert code == 0
    assert json.loads(saved.read_text())["summary"]["create"] == 96


def test_plan_on_invalid_specs_exits_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    specs = tmp_path / "specs"
    shutil.copytree(SPECS, specs)
    (specs / "broken.yaml").write_text("guests: [\n")
    code, _, err = run(["plan", str(specs), "--observed", "sample"], capsys)
    assert code == 1 and "broken.yaml:2:1: error: invalid YAML" in err


def test_plan_against_a_git_base(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(SPECS, repo / "specs")

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
    game = repo / "specs" / "game.yaml"
    game.write_text(
        game.read_text().replace("    cores: 1\n    memory: 2G\n", "    cores: 1\n    memory: 3G\n")
    )
    code, out, _ = run(
        ["plan", str(repo / "specs"), "--base", "HEAD", "--format", "json", "--detailed-exitcode"],
        capsys,
    )
    doc = json.loads(out)
    assert code == 2
    assert [(c["address"], c["action"]) for c in doc["changes"] if c["action"] != "no-op"] == [
        ("guest/mc-lobby", "update")
    ]
    assert doc["changes"][0]["action"] == "no-op"
    lobby = next(c for c in doc["changes"] if c["address"] == "guest/mc-lobby")
    assert lobby["fields"] == [
        {"path": "memory", "before": 2048, "after": 3072, "forces_replace": False}
    ]


def test_schema_is_fresh_and_partial_files_are_allowed(capsys: pytest.CaptureFixture[str]) -> None:
    committed = json.loads((ROOT / "reconciler/data/platform.schema.json").read_text())
    assert committed == json.loads(json.dumps(schema_document())), (
        "regenerate with: reconciler schema --out reconciler/data/platform.schema.json"
    )
    assert "required" not in committed
    assert committed["additionalProperties"] is False
    for spec_file in SPECS.glob("*.yaml"):
        assert spec_file.read_text().startswith(
            "# yaml-language-server: $schema=../reconciler/data/platform.schema.json"
        ), spec_file


def test_demo_runs(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["demo", str(SPECS), "--offline", "--color", "never"], capsys)
    assert code == 0
    assert "must be replaced" in out and "legacy-test" in out
