"""The service never destroys a disk unless the spec's `platform.prune` says so: a commit that
would replace a game server is held back (reported in /status, a gauge and the log, with no
destroying call), and applied only once a reviewed commit turns pruning on."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from reconciler.controller.sources import GitSource
from reconciler.model.spec import ProxmoxApi
from tests.controller.test_service import Running, commit, edit, full_cycle_done, git, make_repo
from tests.controller.test_service import run_service as run
from tests.fakepve_fixtures import mutating_calls

LOBBY = 1000  # mc-lobby's vmid in the example


def _gauge(metrics: str, name: str) -> float:
    families = {f.name: f for f in text_string_to_metric_families(metrics)}
    return next(s.value for s in families[name].samples if s.name == name)


def test_the_service_holds_back_a_replace_until_the_spec_allows_pruning(
    pve_api: ProxmoxApi, pve: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repo = make_repo(tmp_path)
    first = git(repo, "rev-parse", "HEAD")
    source = GitSource(str(repo), branch="main", subdir="specs", workdir=tmp_path / "git")
    caplog.set_level(logging.WARNING, logger="reconciler.service")

    async def body(svc: Running) -> None:
        await svc.until(lambda s: full_cycle_done(s, first))
        before = dict(pve.ct(LOBBY).config)
        pve.requests.clear()
        # A privileged container cannot be made from an unprivileged one in place: a replace.
        edit(repo, "game.yaml", "cores: 1\n    memory: 2G", "cores: 1\n    unprivileged: false")
        risky = commit(repo, "lobby privileged")
        status = await svc.until(lambda s: full_cycle_done(s, risky) and s["held_back"])
        [held] = status["held_back"]
        assert held["address"] == "guest/mc-lobby" and held["action"] == "replace"
        assert held["destroys"] == ["rootfs 16 GiB", "mp0 16 GiB"]  # the world volume too
        assert "platform.prune" in held["why"]
        assert status["resources"]["guest/mc-lobby"]["state"] == "withheld"
        assert _gauge((await svc.get("/metrics")).text, "reconciler_destroys_held_back") == 1
        destroying = [c for c in mutating_calls(pve) if c[0] == "DELETE"]
        assert destroying == [] and dict(pve.ct(LOBBY).config) == before
        assert any(
            r.getMessage() == "held back" and getattr(r, "fields", {}).get("address")
            for r in caplog.records
        )
        # Reviewed: pruning on in the spec. Now the replace is applied, once.
        edit(repo, "platform.yaml", "prune: false", "prune: true")
        allowed = commit(repo, "allow the lobby's replace")
        status = await svc.until(lambda s: full_cycle_done(s, allowed) and not s["held_back"])
        assert str(pve.ct(LOBBY).config.get("unprivileged", 0)) in ("0", "False")
        deletes = [c for c in mutating_calls(pve) if c[0] == "DELETE" and "/lxc/" in c[1]]
        assert [c[1].rsplit("/", 1)[-1] for c in deletes] == [str(LOBBY)]
        assert _gauge((await svc.get("/metrics")).text, "reconciler_destroys_held_back") == 0

    run(source, pve_api, tmp_path, body)
