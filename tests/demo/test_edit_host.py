"""The demo's pull request edits one guest's host line, found where the loader says it is
written, and nothing else."""

from __future__ import annotations

import difflib
from pathlib import Path

import pytest

from reconciler.demo.script import _edit_host
from reconciler.loading.loader import load_directory
from reconciler.model.errors import ReconcilerError
from tests.conftest import SPECS


def test_only_the_guests_host_line_changes(tmp_path: Path) -> None:
    into = tmp_path / "pr"
    edited = _edit_host(SPECS, into, "mc-survival", "pve-runtime", "pve-runtime-2")
    before = (SPECS / edited).read_text().splitlines()
    after = (into / edited).read_text().splitlines()
    changed = [line for line in difflib.ndiff(before, after) if line[:1] in "+-"]
    assert changed == ["-     host: pve-runtime", "+     host: pve-runtime-2"]
    loaded = load_directory(into)
    assert loaded.spec is not None and loaded.spec.guests["mc-survival"].host == "pve-runtime-2"
    assert loaded.spec.guests["mc-lobby"].host == "pve-runtime"


@pytest.mark.parametrize(
    ("guest", "src"), [("no-such-guest", "pve-runtime"), ("mc-survival", "pve-core")]
)
def test_a_host_not_written_as_said_is_an_error_never_a_guess(
    tmp_path: Path, guest: str, src: str
) -> None:
    with pytest.raises(ReconcilerError):
        _edit_host(SPECS, tmp_path / "pr", guest, src, "pve-runtime-2")
