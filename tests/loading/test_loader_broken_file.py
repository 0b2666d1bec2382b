"""A file that cannot be parsed does not hide the other files' mistakes (issue 17).

Every file's problems come in one run, each at its file and line; what the broken file might
have defined is never reported missing (no cascade of "not defined" or "missing field").
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from reconciler.loading.loader import LoadResult, load_directory, load_texts
from tests.conftest import SPECS

BROKEN = "guests: [\n"  # an unclosed list: a syntax error at line 2


def example_texts() -> dict[str, str]:
    return {f"specs/{p.name}": p.read_text(encoding="utf-8") for p in sorted(SPECS.glob("*.yaml"))}


def found(result: LoadResult) -> list[tuple[str, str, int]]:
    return [
        (d.code, d.position.file if d.position else "", d.position.line if d.position else 0)
        for d in result.diagnostics
    ]


def line_of(text: str, marker: str) -> int:
    [line] = [i for i, t in enumerate(text.splitlines(), 1) if marker in t]
    return line


def test_every_files_mistakes_are_reported_with_the_syntax_error() -> None:
    texts = example_texts()
    texts["specs/profiles.yaml"] = BROKEN
    game = texts["specs/game.yaml"].replace("  mc-lobby:\n", "  mc-lobby:\n    memroy: 3\n", 1)
    texts["specs/game.yaml"] = game
    texts["specs/dev.yaml"] = "guests:\n  dev_x:\n    cores: many\n"

    result = load_texts(texts)

    assert result.spec is None and not result.ok
    assert found(result) == [
        ("invalid-name", "specs/dev.yaml", 2),
        ("invalid-value", "specs/dev.yaml", 3),
        ("unknown-field", "specs/game.yaml", line_of(game, "memroy")),
        ("yaml-syntax", "specs/profiles.yaml", 2),
    ]
    messages = {d.code: d.message for d in result.diagnostics}
    assert messages["unknown-field"] == "unknown field 'memroy'; did you mean 'memory'?"
    assert "(got 'many')" in messages["invalid-value"]


@pytest.mark.parametrize("name", sorted(p.name for p in SPECS.glob("*.yaml")))
def test_a_broken_file_alone_is_one_error_without_a_cascade(name: str) -> None:
    """Whatever the broken file defined (the platform, profiles, hosts, the firewall), the other
    files' references to it and the fields it gave are not reported."""
    texts = example_texts()
    texts[f"specs/{name}"] = BROKEN
    result = load_texts(texts)
    assert found(result) == [("yaml-syntax", f"specs/{name}", 2)]


def test_two_broken_files_and_a_mistake_in_a_directory(tmp_path: Path) -> None:
    specs = tmp_path / "specs"
    shutil.copytree(SPECS, specs)
    (specs / "a-broken.yaml").write_text("hosts:\n  pve-x: {node: [pve\n")
    (specs / "b-broken.yaml").write_text("x: 'open\n")
    platform = (specs / "platform.yaml").read_text()
    (specs / "platform.yaml").write_text(platform.replace("platform:\n", "platform:\n  nmae: x\n"))
    os.symlink("/etc/hostname", specs / "c-outside.yaml")

    result = load_directory(specs)

    codes = [(c, Path(f).name) for c, f, _ in found(result)]
    assert codes == [
        ("yaml-syntax", "a-broken.yaml"),
        ("yaml-syntax", "b-broken.yaml"),
        ("link-outside", "c-outside.yaml"),
        ("unknown-field", "platform.yaml"),
    ]
    assert all(line for _, _, line in found(result)), "each at its line"
    assert len(result.files) == len(list(SPECS.glob("*.yaml"))) + 3


def test_past_a_limit_nothing_else_is_checked() -> None:
    """A limit stops the load (hostile input): no more work, and only the limit is reported."""
    texts = example_texts()
    texts["specs/game.yaml"] = texts["specs/game.yaml"].replace(
        "  mc-lobby:\n", "  mc-lobby:\n    memroy: 3\n", 1
    )
    texts["specs/zz-bomb.yaml"] = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
        f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
        for i in range(9)
    )
    result = load_texts(texts)
    assert {d.code for d in result.diagnostics} == {"yaml-limit"}
