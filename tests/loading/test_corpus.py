"""The corpus of broken specs: one case per mistake a person really makes, each caught in place.

A case is a directory under tests/corpus/ laid over a copy of specs/: every file in it but
expect.yaml is copied in (a new file, or a replacement for the spec file of that name), and the
files its expect.yaml lists under `remove` are deleted. expect.yaml says, in `mistake`, what the
person did wrong and, in `expect`, the diagnostics `validate` must report (others may come too):

    expect:
      - {code: duplicate-vmid, file: hub.yaml, line: 4, message: "vmid 1000 is already used"}

`file` is the basename of the file the diagnostic points at, `line` its 1-based line and
`message` a substring of its message. Each case is checked twice: through the CLI (exit code 1,
and `<dir>/<file>:<line>:` with the message and `(<code>)` on one printed line) and through
`load_directory` (the same facts on the Diagnostic values).
"""

from __future__ import annotations

import difflib
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from reconciler.cli.main import main
from reconciler.loading.loader import load_directory
from reconciler.model.diagnostics import Diagnostic, Severity

ROOT = Path(__file__).resolve().parents[2]
SPECS = ROOT / "specs"
CORPUS = ROOT / "tests" / "corpus"
CASES = sorted(p for p in CORPUS.iterdir() if p.is_dir())
MIN_CASES = 30
# A case that replaces a whole spec file should differ from it only by the mistake; more than
# this many changed lines means specs/ moved on and the case is testing a stale copy.
MAX_REPLACED_LINES = 6


@dataclass(frozen=True)
class Expected:
    code: str
    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message} ({self.code})"


@dataclass(frozen=True)
class Case:
    mistake: str
    remove: tuple[str, ...]
    expect: tuple[Expected, ...]


def read_case(case_dir: Path) -> Case:
    """Parse expect.yaml, failing loudly on a malformed case rather than testing nothing."""
    raw = yaml.safe_load((case_dir / "expect.yaml").read_text(encoding="utf-8"))
    assert isinstance(raw, dict), f"{case_dir.name}: expect.yaml must be a mapping"
    unknown = set(raw) - {"mistake", "remove", "expect"}
    assert not unknown, f"{case_dir.name}: unknown keys in expect.yaml: {sorted(unknown)}"
    assert isinstance(raw.get("mistake"), str) and raw["mistake"].strip(), (
        f"{case_dir.name}: expect.yaml needs a `mistake` sentence"
    )
    remove = tuple(raw.get("remove") or ())
    for name in remove:
        assert (SPECS / name).is_file(), f"{case_dir.name}: cannot remove {name}: not in specs/"
    entries = raw.get("expect")
    assert isinstance(entries, list) and entries, f"{case_dir.name}: `expect` must list diagnostics"
    expect = []
    for entry in entries:
        assert isinstance(entry, dict) and set(entry) == {"code", "file", "line", "message"}, (
            f"{case_dir.name}: each expectation needs exactly code, file, line and message: {entry}"
        )
        expect.append(
            Expected(str(entry["code"]), str(entry["file"]), int(entry["line"]), entry["message"])
        )
    return Case(raw["mistake"], remove, tuple(expect))


def build_specs(case_dir: Path, case: Case, tmp_path: Path) -> Path:
    """A copy of specs/ with the case laid over it."""
    target = tmp_path / "specs"
    shutil.copytree(SPECS, target)
    overlay = [p for p in sorted(case_dir.iterdir()) if p.name != "expect.yaml"]
    assert overlay or case.remove, f"{case_dir.name}: the case changes nothing"
    for path in overlay:
        assert path.is_file() and path.suffix == ".yaml", (
            f"{case_dir.name}: {path.name} would not be loaded as a spec file"
        )
        if (SPECS / path.name).is_file():
            changed = changed_lines(SPECS / path.name, path)
            assert changed <= MAX_REPLACED_LINES, (
                f"{case_dir.name}: {path.name} differs from specs/{path.name} in {changed} lines; "
                "bring it up to date with specs/ so it holds only the mistake"
            )
        shutil.copyfile(path, target / path.name)
    for name in case.remove:
        (target / name).unlink()
    return target


def changed_lines(original: Path, replacement: Path) -> int:
    diff = difflib.unified_diff(
        original.read_text(encoding="utf-8").splitlines(),
        replacement.read_text(encoding="utf-8").splitlines(),
        lineterm="",
    )
    return sum(1 for line in diff if line[:1] in "+-" and not line.startswith(("+++", "---")))


def snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def printed_line_for(output: str, directory: Path, want: Expected) -> str | None:
    prefix = f"{directory}/{want.file}:{want.line}:"
    for line in output.splitlines():
        if line.startswith(prefix) and want.message in line and f"({want.code})" in line:
            return line
    return None


def diagnostic_for(diags: list[Diagnostic], want: Expected) -> Diagnostic | None:
    for d in diags:
        if (
            d.position is not None
            and Path(d.position.file).name == want.file
            and d.position.line == want.line
            and d.code == want.code
            and want.message in d.message
            and d.severity is Severity.ERROR
        ):
            return d
    return None


@pytest.mark.parametrize("case_dir", [pytest.param(c, id=c.name) for c in CASES])
def test_mistake_is_reported_where_it_was_made(
    case_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    case = read_case(case_dir)
    directory = build_specs(case_dir, case, tmp_path)
    before = snapshot(directory)

    code = main(["validate", str(directory), "--color", "never"])
    output = capsys.readouterr().out

    assert snapshot(directory) == before, "validate changed the spec directory"
    assert code == 1, f"{case.mistake}\nvalidate exited {code}:\n{output}"
    missing = [str(w) for w in case.expect if printed_line_for(output, directory, w) is None]
    assert not missing, f"{case.mistake}\nnot printed: {missing}\nvalidate printed:\n{output}"

    result = load_directory(directory)
    assert not result.ok
    shown = "\n".join(str(d) for d in result.diagnostics)
    missing = [str(w) for w in case.expect if diagnostic_for(result.diagnostics, w) is None]
    assert not missing, f"{case.mistake}\nnot among the diagnostics: {missing}\n{shown}"


def test_corpus_is_large_and_the_example_platform_is_clean(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert len(CASES) >= MIN_CASES, f"only {len(CASES)} cases in {CORPUS}"
    names = [c.name for c in CASES]
    assert all(re.fullmatch(r"\d{2,3}-[a-z0-9-]+", n) for n in names), names
    numbers = [int(n.split("-", 1)[0]) for n in names]
    assert len(set(numbers)) == len(numbers), "two cases share a number"

    code = main(["validate", str(SPECS), "--color", "never"])
    output = capsys.readouterr().out
    assert code == 0, output
    assert f"{SPECS}: valid (" in output
    assert load_directory(SPECS).ok
