"""Shared by the import tests: the specs a test module's `imported` fixture wrote, loaded; the
directory a hand-made Traefik watches (`dynamic`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.importing.writer import ImportResult
from reconciler.loading.graph import build_graph
from reconciler.loading.loader import load_directory
from reconciler.model.resources import DesiredGraph


@pytest.fixture
def graph(imported: ImportResult, tmp_path: Path) -> DesiredGraph:
    """The imported specs, which must validate, as the controller plans them."""
    loaded = load_directory(tmp_path / "imported")
    assert loaded.ok and loaded.spec is not None, [str(d) for d in loaded.diagnostics]
    return build_graph(loaded.spec, loaded.source)


@pytest.fixture
def dynamic(tmp_path: Path) -> Path:
    """The dynamic-configuration directory a Traefik with hand-made routers watches."""
    directory = tmp_path / "dynamic"
    directory.mkdir()
    return directory
