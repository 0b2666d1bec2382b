"""One change rendered on its own (`render.render_change`) is what the text plan shows for it,
and the demo shows changes through it, never by cutting the rendered plan apart."""

from __future__ import annotations

import io

import pytest

from reconciler.cli import render
from reconciler.cli.main import _load_observed
from reconciler.demo.script import Screen
from reconciler.model.plans import Action, Plan
from reconciler.model.resources import DesiredGraph
from reconciler.planning.planner import make_plan


@pytest.fixture(scope="module")
def pruning_plan(graph: DesiredGraph) -> Plan:
    """The sample plan with pruning: the replace that destroys disks is allowed, so the plan
    opens with the banner."""
    return make_plan(graph, _load_observed("sample"), allow_destroy=True)


@pytest.mark.parametrize("color", [False, True])
def test_the_text_plan_is_made_of_its_changes_rendered_one_by_one(
    pruning_plan: Plan, color: bool
) -> None:
    text = render.render_text(pruning_plan, color=color)
    shown = [
        "  " + line for c in pruning_plan.actions for line in render.render_change(c, color=color)
    ]
    start = text.index(shown[0] + "\n")
    assert text[start:].startswith("\n".join(shown) + "\n")


def test_the_demo_shows_a_replace_under_a_banner_as_the_plan_does(pruning_plan: Plan) -> None:
    replace = next(c for c in pruning_plan.actions if c.action is Action.REPLACE)
    assert replace.destroys and render.BANNER_TITLE in render.render_text(pruning_plan)
    out = io.StringIO()
    Screen(out, color=False).plan(pruning_plan)
    lines = out.getvalue().splitlines()
    shown = ["     " + line for line in render.render_change(replace)]
    assert shown[0].startswith(f"     -/+ {replace.address}{render.ident(replace)}  must be")
    assert shown[-1] == f"         # {replace.reason}"
    head = lines.index(shown[0])
    assert lines[head : head + len(shown)] == shown
    assert not any(render.BANNER_TITLE in line for line in lines)
