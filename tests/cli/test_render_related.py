"""A diagnostic's related places (the first definition of a duplicate, the rule a finding goes
through) are shown by every renderer, once: a place the message already names is not repeated."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from reconciler.cli import render
from reconciler.model.diagnostics import Diagnostic, Position, error
from reconciler.model.plans import Plan


def markdown(diags: list[Diagnostic]) -> str:
    return render.render_markdown(
        Plan(platform="lab", changes=(), observed_digest="sha256:0", diagnostics=tuple(diags))
    )


RENDERERS: dict[str, tuple[Callable[[list[Diagnostic]], str], str]] = {
    "text": (render.render_diagnostics, "also {}"),
    "github": (render.render_github, "also {}"),
    "markdown": (markdown, "also `{}`"),
}


@pytest.mark.parametrize("name", sorted(RENDERERS))
@pytest.mark.parametrize(
    ("message", "related", "shown"),
    [
        pytest.param(
            "guest 'web' is defined in two files",
            (Position("specs/a.yaml", 12, 3),),
            ["specs/a.yaml:12:3"],
            id="a place not in the message",
        ),
        pytest.param(
            "vmid 101 is already used by guest 'db' (specs/a.yaml:12)",
            (Position("specs/a.yaml", 12, 5),),
            [],
            id="named by the message already",
        ),
        pytest.param(
            "vmid 101 is already used by guest 'db' (specs/a.yaml:12)",
            (Position("specs/a.yaml", 1, 5), Position("specs/c.yaml")),
            ["specs/a.yaml:1:5", "specs/c.yaml"],
            id="line 1 is not line 12, a whole file is a place",
        ),
    ],
)
def test_related_places_are_rendered_once(
    name: str, message: str, related: tuple[Position, ...], shown: list[str]
) -> None:
    fn, form = RENDERERS[name]
    d = error("duplicate-vmid", message, position=Position("specs/b.yaml", 3, 3), related=related)
    out = fn([d])
    assert message in out
    for place in shown:
        assert form.format(place) in out
    assert out.count("also ") == len(shown)
