"""Shared fixtures: the example platform of specs/, loaded once; the root logger put back
after every test."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import hypothesis  # noqa: F401  (imported early: see the note in pyproject about CPython 3.11 ast)
import pytest

from reconciler.loading.graph import build_graph
from reconciler.loading.loader import LoadResult, load_directory
from reconciler.model.resources import DesiredGraph

pytest_plugins = [
    "tests.fakepve_fixtures",
    "tests.redis_fixtures",
    "tests.traefik_fixtures",
    "tests.dns_fixtures",
]

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"


@pytest.fixture(scope="session")
def example() -> LoadResult:
    result = load_directory(SPECS, display="specs")
    assert result.ok, [str(d) for d in result.diagnostics]
    return result


@pytest.fixture(scope="session")
def graph(example: LoadResult) -> DesiredGraph:
    assert example.spec is not None
    return build_graph(example.spec, example.source)


@pytest.fixture(autouse=True)
def _root_logger_put_back() -> Iterator[None]:
    """A command run in process (`main(["run", ...])`) sets up logging on the stream it was
    given, as `reconciler run` does for its process; once the test's stream is closed, a later
    log line (a fake's access log, in its thread) would fail to write there."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
