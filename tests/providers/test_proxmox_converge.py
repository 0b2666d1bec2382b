"""Converging the example platform's guests on fakepve, through the real client."""

from __future__ import annotations

from typing import Any

import anyio

from reconciler.applying.converging import converge
from reconciler.model.plans import Action
from reconciler.model.resources import DesiredGraph, Kind
from reconciler.providers.proxmox import ProxmoxProvider
from tests.fakepve_fixtures import mutating_calls


def run_converge(graph: DesiredGraph, provider: ProxmoxProvider, **kw: Any) -> Any:
    return anyio.run(lambda: converge(graph, [provider], **kw))


def guests_of(graph: DesiredGraph) -> set[str]:
    return {a for a, r in graph.resources.items() if r.kind is Kind.GUEST}


def test_converges_from_empty_then_second_apply_is_silent(
    graph: DesiredGraph, provider: ProxmoxProvider, pve: Any
) -> None:
    first = run_converge(graph, provider)
    assert first.ok, [(r.change.address, r.error) for r in first.rounds[-1].report.results]
    assert {c.address for c in first.rounds[0].plan.actions} == guests_of(graph)
    # Every guest once, beside the VM template the bastion was cloned from.
    resources = [
        r for r in provider.client.cluster.resources.get(type="vm") if not r.get("template")
    ]
    assert len(resources) == len(guests_of(graph))
    assert len({r["vmid"] for r in resources}) == len(resources)

    pve.requests.clear()
    second = run_converge(graph, provider)
    assert not second.rounds[0].plan.has_changes, [
        (c.address, c.fields) for c in second.rounds[0].plan.actions
    ]
    assert mutating_calls(pve) == []


def test_out_of_band_changes_are_planned_and_corrected(
    graph: DesiredGraph, provider: ProxmoxProvider, pve: Any
) -> None:
    assert run_converge(graph, provider).ok
    node = provider.client.nodes("pve-runtime")
    node.lxc(1001).config.put(memory=1024, tags="game;reconciler;zpack")
    node.lxc(1002).status.stop.post()
    node.lxc(1100).status.stop.post()
    node.lxc(1100).delete(purge=1)
    second = run_converge(graph, provider)
    plan = second.rounds[0].plan
    by = {c.address: c for c in plan.actions}
    assert by["guest/mc-survival"].action is Action.UPDATE
    assert {f.path for f in by["guest/mc-survival"].fields} == {"memory", "tags"}
    assert [f.path for f in by["guest/mc-creative"].fields] == ["state"]
    assert by["guest/dev-alice"].action is Action.CREATE
    assert second.ok
    assert not run_converge(graph, provider).rounds[0].plan.has_changes
