"""The service fetches a hostile commit: it reports it and keeps converging to the last good one.

The service loads every commit with the same loader as `validate`, so a commit holding an alias
bomb (or a misplaced secret) reaches it as well. On fakepve, with a git source: the bad commit
is in /status as `revision_error`, one diagnostic at its file and line, the service stays up and
keeps the last good revision, and neither /status nor the JSON log ever holds the secret.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reconciler.controller.logs import JsonFormatter, Redactor
from reconciler.controller.sources import GitSource
from reconciler.model.spec import ProxmoxApi
from tests.controller.test_service import (
    Running,
    commit,
    full_cycle_done,
    git,
    make_repo,
    run_service,
)
from tests.loading.test_hostile_yaml import alias_bomb

SECRET = "hunter2xyzzy"


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """The service's log as `reconciler run --log-format json` writes it."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter(Redactor()))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield out
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def error_of(status: dict[str, Any], revision: str) -> bool:
    return (status["revision_error"] or {}).get("id") == revision


def test_a_hostile_commit_is_reported_and_the_last_good_revision_kept(
    pve_api: ProxmoxApi, pve: Any, tmp_path: Path, json_log: io.StringIO
) -> None:
    repo = make_repo(tmp_path)
    first = git(repo, "rev-parse", "HEAD")
    source = GitSource(str(repo), branch="main", subdir="specs", workdir=tmp_path / "git")
    specs = repo / "specs"
    platform = (specs / "platform.yaml").read_text()

    async def body(svc: Running) -> None:
        await svc.until(lambda s: full_cycle_done(s, first))

        (specs / "bomb.yaml").write_text(alias_bomb())
        bomb = commit(repo, "an alias bomb")
        status = await svc.until(lambda s: error_of(s, bomb))
        diagnostics = status["revision_error"]["diagnostics"]
        assert f"{bomb[:12]}:specs/bomb.yaml:5:" in diagnostics
        assert "(yaml-limit)" in diagnostics and "aliases expand" in diagnostics
        assert diagnostics.count("\n") == 1  # that one problem alone
        assert status["revision"]["id"] == first  # still converging to the last good one
        assert (await svc.get("/healthz")).status_code == 200

        (specs / "bomb.yaml").unlink()
        (specs / "platform.yaml").write_text(
            platform.replace(
                "token_secret: {env: PVE_TOKEN_SECRET}", f"token_secret: {{{SECRET}}}", 1
            )
        )
        leaky = commit(repo, "a secret where its reference goes")
        status = await svc.until(lambda s: error_of(s, leaky))
        assert f"{leaky[:12]}:specs/platform.yaml:" in status["revision_error"]["diagnostics"]
        assert status["revision"]["id"] == first
        raw = (await svc.get("/status")).text
        assert SECRET not in raw

    run_service(source, pve_api, tmp_path, body)

    lines = [json.loads(line) for line in json_log.getvalue().splitlines()]
    refused = [e for e in lines if e["event"] == "revision does not validate; not applied"]
    assert {e["revision"] for e in refused} >= {git(repo, "rev-parse", "HEAD")}
    assert SECRET not in json_log.getvalue()
