"""The live commands through `main()`, against fakepve: observe, plan, apply, apply --plan.
Guests and firewalls only (`--no-edge`); tests/cli/test_edge_cli.py runs them with the edge."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from reconciler.cli.main import main
from reconciler.model.spec import ProxmoxApi
from tests.conftest import SPECS
from tests.fakepve_fixtures import mutating_calls


def flags(api: ProxmoxApi, *, edge: bool = False) -> list[str]:
    """The command-line flags that point a live command at fakepve (guests and firewall only,
    unless `edge`)."""
    assert api.ca_file is not None
    return [
        "--proxmox-url",
        api.url,
        "--proxmox-user",
        "root@pam",  # fakepve's; the example spec's user is reconciler@pve
        "--proxmox-password-env",
        "FAKEPVE_PASSWORD",
        "--ca-file",
        api.ca_file,
        *([] if edge else ["--no-edge"]),
    ]


def test_apply_then_plan_is_empty_and_observe_writes_a_snapshot(
    pve_api: ProxmoxApi, pve: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["apply", str(SPECS), "--auto-approve", "--color", "never", *flags(pve_api)]) == 0
    out, err = capsys.readouterr()
    # 21 guests, 30 firewall objects (cluster options, 4 aliases, 1 IP set, 3 groups, and
    # each guest's firewall) and 2 backup jobs.
    assert "Apply: 53 done, 0 failed, 0 skipped." in out
    assert "[53/53]" in err
    pve.requests.clear()
    assert main(["plan", str(SPECS), "--detailed-exitcode", *flags(pve_api)]) == 0
    assert "No changes." in capsys.readouterr().out
    assert mutating_calls(pve) == []
    snap = tmp_path / "observed.json"
    assert main(["observe", str(SPECS), "--out", str(snap), *flags(pve_api)]) == 0
    doc = json.loads(snap.read_text())
    # Those 53, and the VM template the bastion was cloned from (foreign).
    assert doc["format"] == "reconciler/observed-state" and len(doc["resources"]) == 54
    # The snapshot plans offline exactly as the live system does: no guest changes.
    capsys.readouterr()
    assert main(["plan", str(SPECS), "--observed", str(snap), "--format", "json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["summary"]["create"] == plan["summary"]["update"] == 0


def test_saved_plan_applies_only_if_nothing_changed(
    pve_api: ProxmoxApi, pve: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    saved = tmp_path / "plan.json"
    assert main(["plan", str(SPECS), "--out", str(saved), *flags(pve_api)]) == 0
    pve.add_ct(1090, name="intruder", node="pve-runtime")  # someone acts in between
    capsys.readouterr()
    assert main(["apply", str(SPECS), "--plan", str(saved), *flags(pve_api)]) == 1
    assert "changed since this plan was made" in capsys.readouterr().err
    assert mutating_calls(pve) == []
    assert main(["plan", str(SPECS), "--out", str(saved), *flags(pve_api)]) == 0
    assert main(["apply", str(SPECS), "--plan", str(saved), *flags(pve_api)]) == 0
    assert "Apply: 53 done" in capsys.readouterr().out


def test_apply_refuses_without_confirmation(
    pve_api: ProxmoxApi, pve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["apply", str(SPECS), *flags(pve_api)]) == 1  # not confirmed: not a success
    err = capsys.readouterr().err
    assert "needs confirmation" in err and err.endswith("Apply cancelled.\n")
    assert mutating_calls(pve) == []
