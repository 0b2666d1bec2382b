"""Read a spec directory as it was at a git revision, without touching the working tree.

Used by `reconciler plan --base REF` to show what a pull request changes, and later by the
controller's git source.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from reconciler.loading.loader import SPEC_SUFFIXES, LoadResult, load_texts
from reconciler.model.diagnostics import error


class RevisionError(Exception):
    pass


def _git(args: list[str], cwd: Path) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RevisionError(proc.stderr.strip() or f"git {' '.join(args)} failed")
    return proc.stdout


def load_revision(directory: Path | str, ref: str) -> LoadResult:
    directory = Path(directory).resolve()
    try:
        top = Path(_git(["rev-parse", "--show-toplevel"], directory).strip())
        rel = directory.relative_to(top)
        names = _git(["ls-tree", "-r", "--name-only", ref, "--", str(rel)], top).splitlines()
        texts = {}
        for name in names:
            if name.endswith(SPEC_SUFFIXES):
                shown = f"{ref}:{name}"
                texts[shown] = _git(["show", f"{ref}:{name}"], top)
    except (RevisionError, ValueError, OSError) as exc:
        return LoadResult(None, [error("git-revision", f"cannot read {ref}: {exc}")])
    if not texts:
        # The directory did not exist at that revision: everything is new.
        return LoadResult(None, [])
    return load_texts(texts)
