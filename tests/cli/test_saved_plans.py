"""`apply --plan FILE` against fakepve, through `main()` and the real client: a saved plan is a
request, never an authority (STYLE 13, issue 13 item 3).

Each tampering of a saved plan is refused with one line naming what differs, before any
mutating call: the file's changes are compared with a fresh plan's, and only the fresh plan
ever runs. The honest path (an untouched plan) applies and converges.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from reconciler.cli.main import main
from reconciler.model.spec import ProxmoxApi
from tests.cli.test_live import flags
from tests.conftest import SPECS
from tests.fakepve_fixtures import mutating_calls

Doc = dict[str, Any]
FIVE = [
    "guest/mc-lobby",
    "guest/mc-survival",
    "guest/zpack-api",
    "guest/zpack-db",
    "guest/dev-alice",
]


def converge(api: ProxmoxApi, specs: Path = SPECS) -> None:
    assert main(["apply", str(specs), "--auto-approve", *flags(api)]) == 0


def save_plan(api: ProxmoxApi, path: Path, specs: Path = SPECS, *extra: str) -> Doc:
    assert main(["plan", str(specs), "--out", str(path), *extra, *flags(api)]) == 0
    doc: Doc = json.loads(path.read_text())
    return doc


def apply_saved(api: ProxmoxApi, path: Path, specs: Path = SPECS, *extra: str) -> int:
    return main(["apply", str(specs), "--plan", str(path), *extra, *flags(api)])


def change_of(doc: Doc, address: str) -> Doc:
    changes: list[Doc] = [c for c in doc["changes"] if c["address"] == address]
    [change] = changes
    return change


def copy_specs(tmp_path: Path, edit: Callable[[Path], None]) -> Path:
    specs = tmp_path / "specs"
    shutil.copytree(SPECS, specs)
    edit(specs)
    return specs


def edit_file(name: str, old: str, new: str) -> Callable[[Path], None]:
    def edit(specs: Path) -> None:
        path = specs / name
        text = path.read_text()
        assert text.count(old) == 1, old
        path.write_text(text.replace(old, new))

    return edit


# zpack-redis (pve-core, where the fixtures' template is) made privileged: a replace, which
# destroys its disk.
PRIVILEGED_REDIS = edit_file(
    "control.yaml", "    tags: [redis]\n", "    tags: [redis]\n    unprivileged: false\n"
)

# zpack-dns (1G) given 2G: one update.
_DNS = "\n    network:\n      - {name: eth0, bridge: vmbr0, ip: 10.10.0.15"
BIGGER_DNS = edit_file("control.yaml", "memory: 1G" + _DNS, "memory: 2G" + _DNS)


def privileged_redis_plan(api: ProxmoxApi, tmp_path: Path, *extra: str) -> tuple[Path, Path, Doc]:
    """On the converged platform, a plan saved (with `extra`) of specs with zpack-redis made
    privileged: the specs, the plan's path, and the plan."""
    converge(api)
    specs = copy_specs(tmp_path, PRIVILEGED_REDIS)
    path = tmp_path / "plan.json"
    return specs, path, save_plan(api, path, specs, *extra)


def refused(
    api: ProxmoxApi,
    pve: Any,
    path: Path,
    doc: Doc,
    capsys: pytest.CaptureFixture[str],
    *extra: str,
    specs: Path = SPECS,
) -> str:
    """Write the (tampered) plan, apply it: refused, one line, and not one mutating call."""
    path.write_text(json.dumps(doc))
    capsys.readouterr()
    pve.requests.clear()
    assert apply_saved(api, path, specs, *extra) == 1
    err = capsys.readouterr().err
    assert mutating_calls(pve) == []
    [line] = [line for line in err.splitlines() if "not applied" in line]
    return line


# --- tampered plans: each refused, nothing touched ------------------------------------------


def delete_five_guests(doc: Doc) -> None:
    """Five guests still in the spec deleted: prune off, no --allow-destroy, over
    max_deletes_per_run (3)."""
    for address in FIVE:
        change = change_of(doc, address)
        change.update(action="delete", after=None, destroys=["rootfs 8 GiB"], blocked=None)


def open_agent_port_to_anyone(doc: Doc) -> None:
    change = change_of(doc, "firewall/guest/mc-lobby")
    rule = {"type": "in", "action": "ACCEPT", "proto": "tcp", "dport": "18888", "enable": 1}
    position = len(change["after"]["rules"])
    change["after"]["rules"].append(rule)
    change.update(
        action="update",
        fields=[
            {"path": f"rules[{position}]", "before": None, "after": rule, "forces_replace": False}
        ],
    )


def memory_64g_without_version(doc: Doc) -> None:
    change = change_of(doc, "guest/mc-lobby")
    before = change["after"]["memory"]
    change["after"]["memory"] = 65536
    change.update(
        action="update",
        version=None,
        fields=[{"path": "memory", "before": before, "after": 65536, "forces_replace": False}],
    )


def guest_the_spec_does_not_have(doc: Doc) -> None:
    ghost = copy.deepcopy(change_of(doc, "guest/mc-lobby"))
    ghost["after"].update(name="mc-ghost", vmid=1090)
    ghost.update(
        address="guest/mc-ghost",
        action="create",
        id={"vmid": 1090, "node": "pve-runtime"},
        before=None,
        version=None,
    )
    doc["changes"].append(ghost)


@pytest.mark.parametrize(
    ("tamper", "says"),
    [
        (delete_five_guests, "guest/dev-alice: the file says delete, a fresh plan says no-op"),
        (
            open_agent_port_to_anyone,
            "firewall/guest/mc-lobby: the file says update, a fresh plan says no-op",
        ),
        (
            memory_64g_without_version,
            "guest/mc-lobby: the file says update, a fresh plan says no-op",
        ),
        (guest_the_spec_does_not_have, "guest/mc-ghost: the file says create, a fresh plan has"),
    ],
    ids=["five-deletes", "port-18888-from-anyone", "64g-version-null", "guest-not-in-spec"],
)
def test_a_tampered_change_on_a_converged_platform_is_refused(
    tamper: Callable[[Doc], None],
    says: str,
    pve_api: ProxmoxApi,
    pve: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    converge(pve_api)
    path = tmp_path / "plan.json"
    doc = save_plan(pve_api, path)
    assert all(c["action"] == "no-op" for c in doc["changes"])
    tamper(doc)
    line = refused(pve_api, pve, path, doc, capsys)
    assert says in line and "Make a new plan" in line


def test_a_blocked_replace_whose_blocked_field_is_removed_is_refused(
    pve_api: ProxmoxApi, pve: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    specs, path, doc = privileged_redis_plan(pve_api, tmp_path)
    change = change_of(doc, "guest/zpack-redis")
    assert change["action"] == "replace" and "prune" in change["blocked"]
    change["blocked"] = None
    doc["summary"]["blocked"] = 0
    line = refused(pve_api, pve, path, doc, capsys, specs=specs)
    assert "guest/zpack-redis: the file lets it run, a fresh plan holds it back" in line


def test_a_replace_whose_destroys_are_emptied_is_refused(
    pve_api: ProxmoxApi, pve: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Allowed (--allow-destroy on both commands), but the file hides what it destroys."""
    specs, path, doc = privileged_redis_plan(pve_api, tmp_path, "--allow-destroy")
    change = change_of(doc, "guest/zpack-redis")
    assert change["action"] == "replace" and change["blocked"] is None and change["destroys"]
    change["destroys"] = []
    line = refused(pve_api, pve, path, doc, capsys, "--allow-destroy", specs=specs)
    assert "guest/zpack-redis: the file says it destroys nothing, a fresh plan says it " in line


def test_a_plan_from_another_revision_of_the_specs_is_refused(
    pve_api: ProxmoxApi, pve: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    converge(pve_api)
    other = copy_specs(tmp_path, BIGGER_DNS)
    path = tmp_path / "plan.json"
    doc = save_plan(pve_api, path, other)
    assert [c["address"] for c in doc["changes"] if c["action"] != "no-op"] == ["guest/zpack-dns"]
    line = refused(pve_api, pve, path, doc, capsys)  # applied with specs/, not the copy
    assert "made from another revision of the specs" in line


def test_a_plan_that_does_not_record_its_specs_is_refused(
    pve_api: ProxmoxApi, pve: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "plan.json"
    doc = save_plan(pve_api, path)
    assert doc["applyable"] and doc["summary"]["create"] > 40
    del doc["spec"], doc["options"]  # as a plan saved before the digest was recorded
    line = refused(pve_api, pve, path, doc, capsys)
    assert "does not record the specs it was made from" in line and "make a new plan" in line


def test_a_plan_made_with_allow_destroy_needs_it_on_apply_too(
    pve_api: ProxmoxApi, pve: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    specs, path, doc = privileged_redis_plan(pve_api, tmp_path, "--allow-destroy")
    assert doc["options"] == {"allow_destroy": True, "targets": [], "final_backups": True}
    line = refused(pve_api, pve, path, doc, capsys, specs=specs)
    assert "made with --allow-destroy, which a file cannot grant" in line
    # Given on the command line as well, the operator allows it: the replace runs.
    assert apply_saved(pve_api, path, specs, "--allow-destroy") == 0
    assert "Apply: 2 done, 0 failed" in capsys.readouterr().out  # the guest and its firewall


# --- the honest path ----------------------------------------------------------------------


def test_an_untouched_saved_plan_applies_and_converges(
    pve_api: ProxmoxApi, pve: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "plan.json"
    doc = save_plan(
        pve_api, path, SPECS, "--target", "guest/zpack-dns", "--target", "guest/mc-lobby"
    )
    assert doc["spec"]["digest"].startswith("sha256:")
    targets = ["guest/mc-lobby", "guest/zpack-dns"]
    assert doc["options"] == {"allow_destroy": False, "targets": targets, "final_backups": True}
    capsys.readouterr()
    assert apply_saved(pve_api, path) == 0  # its own targets: no --target needed
    # The two guests, their firewalls, and the aliases, IP set and groups their rules name.
    assert "Apply: 12 done, 0 failed" in capsys.readouterr().out

    doc = save_plan(pve_api, path)
    assert apply_saved(pve_api, path) == 0
    assert "Apply: 41 done, 0 failed" in capsys.readouterr().out  # the rest of the 53
    pve.requests.clear()
    assert main(["plan", str(SPECS), "--detailed-exitcode", *flags(pve_api)]) == 0
    assert "No changes." in capsys.readouterr().out
    assert mutating_calls(pve) == []


def test_target_on_apply_must_be_the_saved_plans_own(
    pve_api: ProxmoxApi, pve: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "plan.json"
    doc = save_plan(pve_api, path, SPECS, "--target", "guest/mc-lobby")
    line = refused(pve_api, pve, path, doc, capsys, "--target", "guest/")
    assert "it was made for guest/mc-lobby" in line
    assert apply_saved(pve_api, path, SPECS, "--target", "guest/mc-lobby") == 0
