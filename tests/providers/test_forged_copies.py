"""A hand-made copy of a managed guest, on fakepve through the real client: the copy carries the
controller's owner tag and mark. The mark names the vmid it was written for, so the copy is
foreign and never touched. A copy of a mark written before marks named a vmid makes two guests
claim one address: the plan is an error naming both, nothing of either (nor its firewall) is
touched, and `apply` refuses.

A mark naming the directory a guest was adopted from (`adopted=`) is ours the same way, and a
copy of it is foreign just the same. Also: a mark-like line that is not the description's last
line is description text, never an ownership claim; and a guest whose spec vmid changes is
replaced only with pruning, destroying the vmid observed, the plan saying both. Assertions
read Proxmox's state or fakepve's request log (`pve.requests`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from reconciler.applying.converging import converge
from reconciler.applying.observing import observe_all
from reconciler.cli.main import main
from reconciler.loading.checks import forges_mark
from reconciler.model.plans import Action, Plan
from reconciler.model.resources import DesiredGraph
from reconciler.model.spec import ProxmoxApi
from reconciler.planning.planner import make_plan
from reconciler.providers import Provider
from reconciler.providers.firewall import (
    FirewallProvider,
    read_comment_mark,
    with_comment_mark,
)
from reconciler.providers.proxmox import ProxmoxProvider, mark_line, read_mark, with_mark
from tests.cli.test_live import flags
from tests.conftest import SPECS
from tests.fakepve_fixtures import mutating_calls
from tests.guest_helpers import load_copy, marks

LOBBY, COPY = 1000, 1050
RUNTIME = "pve-runtime"


def providers_of(provider: ProxmoxProvider) -> list[Provider]:
    firewall = FirewallProvider(pve=provider, manage_cluster=True)
    return [provider, firewall]


def plan_now(graph: DesiredGraph, provider: ProxmoxProvider, **kw: Any) -> Plan:
    observed = anyio.run(lambda: observe_all(providers_of(provider), graph.platform))
    return make_plan(graph, observed, **kw)


def by_hand(provider: ProxmoxProvider, what: str, call: Callable[[], Any]) -> None:
    """A call someone makes with the API, its task awaited (polled until it stops)."""
    anyio.run(lambda: provider.run_task(what, RUNTIME, call))


MARK = "reconciler:v1 platform=zpack address=guest/mc-lobby"


# --- the mark: the description's last line, nowhere else -----------------------------------------


@pytest.mark.parametrize(
    ("description", "mark", "rest"),
    [
        (MARK, {"platform": "zpack", "address": "guest/mc-lobby"}, ""),
        (f"lobby\n\n{MARK}\n\n", {"platform": "zpack", "address": "guest/mc-lobby"}, "lobby"),
        (
            f"{MARK} template=local:vztmpl/d.tar.zst",
            {
                "platform": "zpack",
                "address": "guest/mc-lobby",
                "template": "local:vztmpl/d.tar.zst",
            },
            "",
        ),
        # Quoted in notes, not the last line: text, not a claim.
        (f"notes:\n{MARK}\nkeep until friday", {}, f"notes:\n{MARK}\nkeep until friday"),
        # Two fields of one name, or an address that is not a guest's: not our mark.
        (f"{MARK} address=guest/other", {}, f"{MARK} address=guest/other"),
        (
            "reconciler:v1 platform=zpack address=firewall/alias/api",
            {},
            "reconciler:v1 platform=zpack address=firewall/alias/api",
        ),
        ("reconciler:v1 platform=zpack", {}, "reconciler:v1 platform=zpack"),
        (None, {}, ""),
    ],
    ids=["alone", "after-text", "template", "quoted", "repeated", "not-a-guest", "short", "none"],
)
def test_the_mark_is_read_from_the_last_line_only(
    description: str | None, mark: dict[str, str], rest: str
) -> None:
    assert read_mark(description) == (mark, rest)


def test_what_the_controller_writes_reads_back_and_is_what_validate_rejects() -> None:
    for body in ("", "lobby", "lobby\n\nsecond paragraph\n"):
        written = with_mark(body, "zpack", "guest/mc-lobby", None)
        assert read_mark(written) == (
            {"platform": "zpack", "address": "guest/mc-lobby"},
            body.strip("\n"),
        )
    # Adopting appends to a description that quotes a mark: the new last line is what counts.
    quoted = f"notes:\n{MARK}\nmore"
    assert read_mark(with_mark(quoted, "zpack", "guest/mc-hub", None))[0]["address"] == (
        "guest/mc-hub"
    )
    assert forges_mark(mark_line("zpack", "guest/x", None))
    assert forges_mark(f"text\n  {mark_line('zpack', 'guest/x', 'local:vztmpl/t')}")
    assert forges_mark(with_comment_mark("ops net", "zpack"))
    assert not forges_mark("the reconciler manages this; see reconciler docs")
    # The comment mark counts only at the end of a comment.
    assert read_comment_mark(with_comment_mark("ops", "zpack")) == ("zpack", "ops")
    assert read_comment_mark("[reconciler:zpack] ops") == (None, "[reconciler:zpack] ops")


def touching(pve: Any, *vmids: int) -> list[tuple[str, str]]:
    """Mutating calls on any of `vmids` (the guest, its config, status or firewall)."""
    paths = tuple(f"/lxc/{v}" for v in vmids)
    return [(m, p) for m, p in mutating_calls(pve) if any(x in p for x in paths)]


@pytest.fixture
def converged(graph: DesiredGraph, provider: ProxmoxProvider, pve: Any) -> ProxmoxProvider:
    conv = anyio.run(lambda: converge(graph, providers_of(provider)))
    assert conv.ok
    pve.requests.clear()
    return provider


def copy_lobby(provider: ProxmoxProvider, *, legacy: bool = False) -> None:
    """Clone mc-lobby by hand, as an operator would: a running container is cloned from a
    snapshot, with its description (the mark included); the clone keeps its tags. `legacy`:
    the copy's mark is one written before marks named their vmid."""
    lobby = provider.client.nodes(RUNTIME).lxc(LOBBY)
    original = lobby.config.get()
    assert f" vmid={LOBBY}" in original["description"]  # what the controller writes now
    description = original["description"]
    if legacy:
        description = description.replace(f" vmid={LOBBY}", "")
    by_hand(provider, "snapshot", lambda: lobby.snapshot.post(snapname="copy"))
    by_hand(
        provider,
        "clone",
        lambda: lobby.clone.post(newid=COPY, snapname="copy", full=1, description=description),
    )
    copy = provider.client.nodes(RUNTIME).lxc(COPY).config.get()
    assert copy["description"] == description
    assert copy["tags"] == original["tags"]


def test_a_hand_made_copy_is_foreign_and_neither_is_touched(
    graph: DesiredGraph, converged: ProxmoxProvider, pve: Any
) -> None:
    copy_lobby(converged)
    pve.requests.clear()
    plan = plan_now(graph, converged, allow_destroy=True)
    assert not plan.errored, [str(d) for d in plan.diagnostics]
    assert [f["name"] for f in plan.foreign if f["vmid"] == COPY] == ["mc-lobby"]
    assert not [c for c in plan.actions if c.id.get("vmid") in (LOBBY, COPY)]
    conv = anyio.run(lambda: converge(graph, providers_of(converged), allow_destroy=True))
    assert conv.ok
    assert touching(pve, LOBBY, COPY) == []


def test_a_copy_of_a_mark_without_vmid_errors_the_plan_naming_both_and_touches_neither(
    graph: DesiredGraph, converged: ProxmoxProvider, pve: Any
) -> None:
    copy_lobby(converged, legacy=True)
    pve.requests.clear()

    plan = plan_now(graph, converged, allow_destroy=True)
    assert plan.errored and not plan.applyable
    [dup] = [d for d in plan.diagnostics if d.code == "duplicate-owner"]
    assert dup.address == "guest/mc-lobby"
    assert f"vmid {LOBBY} on {RUNTIME}" in dup.message
    assert f"vmid {COPY} on {RUNTIME}" in dup.message
    assert "description's last line" in dup.message
    planned = {c.address for c in plan.changes}
    assert "guest/mc-lobby" not in planned
    assert "firewall/guest/mc-lobby" not in planned
    assert not [c for c in plan.changes if c.id.get("vmid") in (LOBBY, COPY)]

    # Converging (destroys allowed) applies nothing: the plan is an error.
    conv = anyio.run(lambda: converge(graph, providers_of(converged), allow_destroy=True))
    assert not conv.ok and conv.rounds[-1].report is None
    assert touching(pve, LOBBY, COPY) == []
    assert converged.client.nodes(RUNTIME).lxc(LOBBY).status.current.get()["status"] == "running"


def test_a_mark_naming_its_directory_is_ours_and_a_copy_of_it_is_not(
    graph: DesiredGraph, converged: ProxmoxProvider, pve: Any
) -> None:
    """`adopted=` (the spec directory adopt read) is provenance only: the guest is ours as
    before, the field is no drift, and a hand-made copy carrying it is still foreign."""
    lobby = converged.client.nodes(RUNTIME).lxc(LOBBY)
    description = str(lobby.config.get()["description"]).rstrip("\n")
    assert description.endswith(".tar.zst")  # the mark as a create writes it: no field
    lobby.config.put(description=f"{description} adopted=my%20specs")
    pve.requests.clear()
    plan = plan_now(graph, converged, allow_destroy=True)
    assert not plan.errored, [str(d) for d in plan.diagnostics]
    [mine] = [c for c in plan.changes if c.address == "guest/mc-lobby"]
    assert mine.action is Action.NOOP and mine.before is not None
    assert mine.before["adopted"] == "my specs"
    assert not [f for f in plan.foreign if f["vmid"] == LOBBY]

    copy_lobby(converged)
    copy = converged.client.nodes(RUNTIME).lxc(COPY).config.get()
    assert str(copy["description"]).endswith(" adopted=my%20specs")
    pve.requests.clear()
    plan = plan_now(graph, converged, allow_destroy=True)
    assert not plan.errored, [str(d) for d in plan.diagnostics]
    assert [f["name"] for f in plan.foreign if f["vmid"] == COPY] == ["mc-lobby"]
    assert not [c for c in plan.actions if c.id.get("vmid") in (LOBBY, COPY)]
    conv = anyio.run(lambda: converge(graph, providers_of(converged), allow_destroy=True))
    assert conv.ok
    assert touching(pve, LOBBY, COPY) == []


def cli_flags(api: ProxmoxApi) -> list[str]:
    return [*flags(api), "--color", "never"]


def test_apply_refuses_while_a_copy_claims_a_guest(
    converged: ProxmoxProvider,
    pve_api: ProxmoxApi,
    pve: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    copy_lobby(converged, legacy=True)
    pve.requests.clear()
    capsys.readouterr()
    flags = cli_flags(pve_api)
    code = main(["apply", str(SPECS), "--auto-approve", "--allow-destroy", *flags])
    out = capsys.readouterr()
    assert code == 1
    text = out.out + out.err
    assert "guest/mc-lobby is claimed by" in text and "(duplicate-owner)" in text
    assert touching(pve, LOBBY, COPY) == []

    # The copy's mark removed (its description's last line): the original is managed again,
    # and the copy is foreign, never touched.
    config = converged.client.nodes(RUNTIME).lxc(COPY).config
    rest = str(config.get()["description"]).rstrip("\n").split("\n")[:-1]
    if any(rest):
        config.put(description="\n".join(rest))
    else:
        config.put(delete="description")
    pve.requests.clear()
    assert main(["apply", str(SPECS), "--auto-approve", "--allow-destroy", *flags]) == 0
    assert touching(pve, LOBBY, COPY) == []


def test_a_mark_line_that_is_not_the_last_is_description_text(
    graph: DesiredGraph, converged: ProxmoxProvider, pve: Any
) -> None:
    # A foreign container with the owner tag whose notes quote a managed guest's mark line:
    # not the last line, so not a claim. It stays foreign, is never deleted, and its vmid
    # stays taken.
    description = (
        "copied from mc-survival's notes:\n"
        "reconciler:v1 platform=zpack address=guest/mc-old\n"
        "\n"
        "ops: keep until friday"
    )
    node = converged.client.nodes(RUNTIME)
    by_hand(
        converged,
        "create",
        lambda: node.lxc.post(
            vmid=1060,
            hostname="scratch",
            ostemplate="local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst",
            storage="local-lvm",
            tags="reconciler;zpack",
            description=description,
        ),
    )
    pve.requests.clear()
    plan = plan_now(graph, converged, allow_destroy=True)
    assert not plan.errored, [str(d) for d in plan.diagnostics]
    assert "guest/mc-old" not in {c.address for c in plan.changes}
    assert [f["name"] for f in plan.foreign if f["vmid"] == 1060] == ["scratch"]
    assert not [c for c in plan.changes if c.action is Action.DELETE]
    assert touching(pve, 1060) == []


def test_a_vmid_changed_in_the_spec_replaces_the_observed_guest_only_when_allowed(
    converged: ProxmoxProvider,
    pve_api: ProxmoxApi,
    pve: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    load_copy(tmp_path, {"game.yaml": ("    vmid: 1000\n", f"    vmid: {COPY}\n")})
    specs, flags = str(tmp_path / "specs"), cli_flags(pve_api)
    capsys.readouterr()

    assert main(["plan", specs, *flags]) == 0
    text = capsys.readouterr().out
    assert f"guest/mc-lobby  (vmid {LOBBY} -> {COPY} on {RUNTIME})  BLOCKED" in text
    assert f"destroys vmid {LOBBY}, creates vmid {COPY}" in text

    # Without pruning: held back, nothing of either vmid touched.
    assert main(["apply", specs, "--auto-approve", *flags]) == 0
    assert touching(pve, LOBBY, COPY) == []

    assert main(["apply", specs, "--auto-approve", "--allow-destroy", *flags]) == 0
    vmids = {int(i["vmid"]) for i in converged.client.cluster.resources.get(type="vm")}
    assert LOBBY not in vmids and COPY in vmids
    assert marks(converged)["guest/mc-lobby"] == [COPY]
    destroyed = [p for m, p in mutating_calls(pve) if m == "DELETE"]
    assert destroyed == [f"/api2/json/nodes/{RUNTIME}/lxc/{LOBBY}"]


def test_a_mark_claims_only_the_vmid_it_was_written_for() -> None:
    from reconciler.providers.proxmox import claimed

    written = read_mark(with_mark("", "zpack", "guest/mc-lobby", None, 1000))[0]
    assert written["vmid"] == "1000"
    assert claimed(written, "zpack", 1000) == "guest/mc-lobby"
    assert claimed(written, "zpack", 1050) is None  # a copy
    assert claimed(written, "other", 1000) is None
    legacy = read_mark(MARK)[0]
    assert claimed(legacy, "zpack", 1050) == "guest/mc-lobby"  # taken at its word
