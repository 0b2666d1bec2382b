"""Golden tests: the text, JSON and Markdown renderings of one plan, pinned byte for byte.

The plan is the example platform against the shipped sample snapshot, which holds one of each
kind of change. After an intended change to a renderer, regenerate with
`REGEN_GOLDEN=1 pytest tests/cli/test_golden.py` and review the diff.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from reconciler.cli import render
from reconciler.cli.main import _load_observed
from reconciler.model.plans import Plan
from reconciler.model.resources import DesiredGraph
from reconciler.planning.planner import make_plan

GOLDEN = Path(__file__).parent / "golden"

RENDERERS: dict[str, Callable[[Plan], str]] = {
    "plan.txt": lambda p: render.render_text(p, color=False),
    "plan.color.txt": lambda p: render.render_text(p, color=True),
    "plan.json": render.render_json,
    "plan.md": render.render_markdown,
}


@pytest.fixture(scope="module")
def sample_plan(graph: DesiredGraph) -> Plan:
    return make_plan(graph, _load_observed("sample"))


@pytest.mark.parametrize("name", sorted(RENDERERS))
def test_rendering_matches_golden(name: str, sample_plan: Plan) -> None:
    got = RENDERERS[name](sample_plan)
    path = GOLDEN / name
    if os.environ.get("REGEN_GOLDEN"):
        path.write_text(got, encoding="utf-8")
    assert got == path.read_text(encoding="utf-8")


def test_sample_plan_holds_every_kind_of_change(sample_plan: Plan) -> None:
    summary = sample_plan.summary()
    assert summary["create"] and summary["update"] and summary["migrate"] and summary["no-op"]
    assert summary["blocked"] == 2, "a replace and a delete, held back without pruning"
    assert sample_plan.foreign, "the sample has a foreign guest"
    assert [d.code for d in sample_plan.diagnostics] == [
        "destroy-blocked",
        "orphan",
        "backup-stale",
        "backup-missing",
    ]
    freshness = {b.guest: b.freshness.value for b in sample_plan.backups}
    assert freshness["guest/mc-lobby"] == "fresh"
    assert freshness["guest/mc-survival"] == "stale"
    assert freshness["guest/mc-skyblock"] == "missing"


def test_json_plan_is_versioned_and_self_describing(sample_plan: Plan) -> None:
    doc = json.loads(render.render_json(sample_plan))
    assert doc["format"] == "reconciler/plan" and doc["format_version"] == 2
    assert doc["observed"]["digest"].startswith("sha256:")
    assert sum(doc["summary"].values()) == len(doc["changes"])
    replace = next(c for c in doc["changes"] if c["action"] == "replace")
    assert replace["replace_because"] == ["unprivileged"]
    assert replace["destroys"] == ["rootfs 16 GiB", "mp0 16 GiB"] and "prune" in replace["blocked"]
    migrate = next(c for c in doc["changes"] if c["action"] == "migrate")
    assert (migrate["from"], migrate["to"]) == ("pve-core", "pve-runtime")
    assert migrate["destroys"] == [] and migrate["blocked"] is None


def test_markdown_puts_destroys_first_then_the_summary(sample_plan: Plan) -> None:
    md = render.render_markdown(sample_plan).splitlines()
    assert md[0].startswith("### reconciler plan")
    assert md[2] == "> [!CAUTION]" and "DESTROYS DATA" in md[3]
    assert "**BLOCKED** `guest/mc-creative`: replace destroys rootfs 16 GiB" in md[5]
    table = md.index(next(line for line in md if line.startswith("| status |")))
    assert "<details>" not in "\n".join(md[:table])


def test_text_puts_destroys_first(sample_plan: Plan) -> None:
    text = render.render_text(sample_plan).splitlines()
    assert text[3].startswith("!! ") and "DESTROYS DATA" in text[3]
    assert text[4].strip() == (
        "BLOCKED  guest/mc-creative: replace destroys rootfs 16 GiB, mp0 16 GiB "
        "(cannot change in place: unprivileged); a final backup to storage 'backup' first"
    )
    assert (
        text[5]
        .strip()
        .startswith("BLOCKED  guest/mc-oldmap: delete destroys rootfs 16 GiB, mp0 50 GiB")
    )


def test_a_plan_without_destroys_has_no_banner(graph: DesiredGraph) -> None:
    from reconciler.planning.planner import converged_state

    plan = make_plan(graph, converged_state(graph))
    assert "DESTROYS" not in render.render_text(plan) + render.render_markdown(plan)
