"""Routes and Velocity registrations to a VM with `agent: true` and no static address, offline:
they go to the address its agent reports (the first IPv4, else the first IPv6), move with it,
and are withheld, with the plan saying why, while none is known; nothing else changes."""

from __future__ import annotations

from typing import Any

import pytest

from reconciler.loading.graph import build_graph
from reconciler.loading.loader import load_texts
from reconciler.model.observed import GuestHealth, ObservedResource, ObservedState
from reconciler.model.plans import Action, Cause, Plan
from reconciler.model.resources import DesiredGraph
from reconciler.planning.planner import converged_state, make_plan
from tests.guest_helpers import platform_yaml

PLATFORM = platform_yaml(
    "build: {first: 500, last: 599, layer: runtime}",
    "edge: {first: 600, last: 699, layer: runtime}",
)
CT = "local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst"
GUESTS = f"""
guests:
  traefik:
    role: edge
    host: pve-runtime
    template: {CT}
    network:
      - {{bridge: vmbr0, ip: 10.0.20.2/24, gw: 10.0.20.1}}
  proxy:
    role: edge
    host: pve-runtime
    template: {CT}
    network:
      - {{bridge: vmbr0, ip: 10.0.20.3/24, gw: 10.0.20.1}}
  web-vm:
    kind: qemu
    role: build
    host: pve-runtime
    clone: {{from: 9000}}
    agent: true
    disk: {{size: 16G}}
    network:
      - {{bridge: vmbr0}}
traefik:
  core:
    guest: traefik
    routes_to: [runtime]
    feed: {{type: file, path: /srv/traefik/core.yml}}
    routes:
      ide: {{host: ide.example.org, target: {{guest: web-vm, port: 8080}}}}
      ssh: {{type: tcp, sni: "*", target: {{guest: web-vm, port: 22}}}}
velocity:
  guest: proxy
  bridge: {{secret: {{env: VELOCITY_SECRET}}}}
  servers:
    lobby: {{guest: web-vm}}
"""
EDGE = ("route/core/ide", "route/core/ssh", "velocity/lobby")
V4, V6 = "10.0.20.77/24", "2001:db8::5/64"


def graph_of(*edits: tuple[str, str]) -> DesiredGraph:
    guests = GUESTS
    for old, new in edits:
        assert guests.count(old) == 1, old
        guests = guests.replace(old, new)
    loaded = load_texts({"platform.yaml": PLATFORM, "guests.yaml": guests})
    assert loaded.ok and loaded.spec is not None, [str(d) for d in loaded.diagnostics]
    return build_graph(loaded.spec, loaded.source)


def with_vm(seen: ObservedState, **attributes: Any) -> ObservedState:
    """`seen` with web-vm's observed attributes updated (a value None: left out)."""
    resources = []
    for r in seen.resources:
        if r.address == "guest/web-vm":
            attrs = {**r.attributes, **attributes}
            r = r.model_copy(
                update={"attributes": {k: v for k, v in attrs.items() if v is not None}}
            )
        resources.append(r)
    return seen.model_copy(update={"resources": tuple(resources)})


def with_edge(state: ObservedState, graph: DesiredGraph, **servers: str) -> ObservedState:
    """`state` with the edge resources observed as written earlier: route or registration
    name (`ide`, `ssh`, `lobby`) -> the backend it was written with."""
    added = []
    for name, value in servers.items():
        address = next(a for a in EDGE if a.endswith("/" + name))
        res = graph.resources[address]
        field = "address" if address.startswith("velocity/") else "server"
        attrs = {**res.attributes, field: value}
        if address.startswith("velocity/"):
            attrs = {k: attrs[k] for k in ("server_name", "address", "port")}
        added.append(ObservedResource(address=address, kind=res.kind, owned=True, attributes=attrs))
    kept = tuple(r for r in state.resources if r.address not in {a.address for a in added})
    return state.model_copy(update={"resources": (*kept, *added)})


def unrouted(graph: DesiredGraph) -> ObservedState:
    """The platform as applied but the edge: no route or registration written yet."""
    state = converged_state(graph)
    kept = tuple(r for r in state.resources if r.address not in EDGE)
    return state.model_copy(update={"resources": kept})


def changes(plan: Plan) -> dict[str, Any]:
    return {c.address: c for c in plan.actions}


def withheld(plan: Plan) -> dict[str | None, str]:
    return {d.address: d.message for d in plan.diagnostics if d.code == "withheld"}


def backend(plan: Plan, address: str) -> Any:
    """The backend the plan has for `address` (a no-op's too)."""
    change = next(c for c in plan.changes if c.address == address)
    assert change.after is not None
    return change.after["address" if address.startswith("velocity/") else "server"]


def test_the_graph_names_the_vm_by_its_host_name_and_the_plan_by_its_agents_address() -> None:
    graph = graph_of()
    assert graph.resources["route/core/ide"].attributes["server"] == "http://web-vm:8080"
    state = with_vm(unrouted(graph), addresses=[V6, V4])
    plan = make_plan(graph, state)
    assert not plan.errored and not withheld(plan)
    assert {a: changes(plan)[a].action for a in EDGE} == dict.fromkeys(EDGE, Action.CREATE)
    # The first IPv4 the agent lists, though an IPv6 comes first.
    assert backend(plan, "route/core/ide") == "http://10.0.20.77:8080"
    assert backend(plan, "route/core/ssh") == "10.0.20.77:22"
    assert backend(plan, "velocity/lobby") == "10.0.20.77"
    assert set(changes(plan)) == set(EDGE)  # nothing else


def test_an_ipv6_only_vm_gets_its_address_in_brackets_before_a_port() -> None:
    graph = graph_of()
    plan = make_plan(graph, with_vm(unrouted(graph), addresses=[V6]))
    assert backend(plan, "route/core/ide") == "http://[2001:db8::5]:8080"
    assert backend(plan, "route/core/ssh") == "[2001:db8::5]:22"
    assert backend(plan, "velocity/lobby") == "2001:db8::5"


UNKNOWN = {
    "not created": (None, "it is not created yet"),
    "stopped": ({"state": "stopped"}, "it is not running"),
    "agent silent": ({"addresses": None}, "the agent did not answer"),
    "no lease": ({"addresses": []}, "reports none yet"),
}


@pytest.mark.parametrize("case", sorted(UNKNOWN))
def test_while_no_address_is_known_nothing_is_pointed_at_the_host_name(case: str) -> None:
    graph = graph_of()
    vm, why = UNKNOWN[case]
    state = unrouted(graph)
    if vm is None:
        state = state.model_copy(
            update={"resources": tuple(r for r in state.resources if r.address != "guest/web-vm")}
        )
    else:
        state = with_vm(state, **vm)
    plan = make_plan(graph, state)
    assert not plan.errored
    said = withheld(plan)
    assert set(said) == set(EDGE)
    for address in EDGE:
        assert said[address].startswith(f"{address} is withheld: guest/web-vm has no static ")
        assert why in said[address]
        assert address not in changes(plan)  # not created at web-vm, nor anywhere


def test_an_address_change_moves_the_route_and_the_registration() -> None:
    graph = graph_of()
    state = with_vm(unrouted(graph), addresses=["10.0.20.78/24"])
    state = with_edge(
        state, graph, ide="http://10.0.20.77:8080", ssh="10.0.20.77:22", lobby="10.0.20.77"
    )
    plan = make_plan(graph, state)
    found = changes(plan)
    assert {a: found[a].action for a in EDGE} == dict.fromkeys(EDGE, Action.UPDATE)
    assert [(f.path, f.before, f.after) for f in found["route/core/ide"].fields] == [
        ("server", "http://10.0.20.77:8080", "http://10.0.20.78:8080")
    ]
    assert backend(plan, "velocity/lobby") == "10.0.20.78"
    # Applied, it is no change.
    moved = with_edge(
        state, graph, ide="http://10.0.20.78:8080", ssh="10.0.20.78:22", lobby="10.0.20.78"
    )
    assert not make_plan(graph, moved).has_changes


def test_a_route_whose_vm_stopped_is_withdrawn_without_pruning() -> None:
    graph = graph_of()
    state = with_vm(unrouted(graph), state="stopped", addresses=None)
    state = with_edge(state, graph, ide="http://10.0.20.77:8080", lobby="10.0.20.77")
    plan = make_plan(graph, state)
    found = changes(plan)
    for address in ("route/core/ide", "velocity/lobby"):
        assert found[address].action is Action.DELETE
        assert found[address].cause is Cause.WITHHELD and not found[address].blocked
        assert "guest/web-vm has no static address" in found[address].reason
    assert "route/core/ssh" not in found  # never written: nothing to withdraw


def test_a_hand_set_route_at_the_host_name_is_moved_to_the_agents_address() -> None:
    """A route written before the agent's address was used: moved, not kept."""
    graph = graph_of()
    state = with_vm(unrouted(graph), addresses=[V4])
    state = with_edge(state, graph, ide="http://web-vm:8080")
    ide = changes(make_plan(graph, state))["route/core/ide"]
    assert ide.action is Action.UPDATE
    assert (ide.before or {})["server"] == "http://web-vm:8080"
    assert (ide.after or {})["server"] == "http://10.0.20.77:8080"


@pytest.mark.parametrize(
    ("edit", "server"),
    [
        # A static address in the spec is the address: the agent's is not looked at.
        (("- {bridge: vmbr0}", "- {bridge: vmbr0, ip: 10.0.20.5/24}"), "http://10.0.20.5:8080"),
        # A static IPv6 address is bracketed before its port, as the agent's is.
        (
            ("- {bridge: vmbr0}", '- {bridge: vmbr0, ip: "2001:db8::9/64"}'),
            "http://[2001:db8::9]:8080",
        ),
        # Without the agent nothing reports its address: the host name, as before.
        (("    agent: true\n", ""), "http://web-vm:8080"),
    ],
    ids=["static", "static-ipv6", "no-agent"],
)
def test_other_guests_keep_the_graphs_backend(edit: tuple[str, str], server: str) -> None:
    graph = graph_of(edit)
    plan = make_plan(graph, with_vm(unrouted(graph), addresses=[V4]))
    assert backend(plan, "route/core/ide") == server
    assert not withheld(plan)


def test_the_readiness_gate_says_why_first() -> None:
    """A registration the readiness gate holds back is withheld once, for its readiness."""
    graph = graph_of()
    state = with_vm(unrouted(graph), addresses=[])
    state = state.model_copy(
        update={"health": {"guest/web-vm": GuestHealth(running=True, reachable=False)}}
    )
    said = withheld(make_plan(graph, state, agent_layers=("runtime",)))
    assert "has no reachable agent" in said["velocity/lobby"]
    assert "no static address" in said["route/core/ide"]  # `keep`: not gated on readiness


def test_converged_state_holds_the_edge_at_the_agents_address_or_the_host_name() -> None:
    graph = graph_of()
    # Nothing observed (`plan --base`): the graph's host name stands in for the address.
    bare = converged_state(graph)
    servers = {r.address: r.attributes for r in bare.resources if r.address in EDGE}
    assert servers["route/core/ide"]["server"] == "http://web-vm:8080"
    assert not make_plan(graph, bare).has_changes  # the stand-in is kept: no agent was asked
    seen = with_vm(bare, addresses=[V4])
    converged = converged_state(graph, seen)
    servers = {r.address: r.attributes for r in converged.resources if r.address in EDGE}
    assert servers["route/core/ide"]["server"] == "http://10.0.20.77:8080"
    # A perfect apply, planned again against the same guest, is no change.
    vm = next(r for r in seen.resources if r.address == "guest/web-vm")
    again = converged.model_copy(
        update={
            "resources": tuple(
                vm if r.address == "guest/web-vm" else r for r in converged.resources
            )
        }
    )
    assert not make_plan(graph, again).has_changes


def test_a_running_vm_whose_agent_did_not_answer_keeps_its_routes() -> None:
    """A missed read (an agent busy, or frozen by a backup's fs-freeze) withdraws nothing: the
    backends stay as written, with a warning; only the routes never written wait."""
    graph = graph_of()
    state = with_vm(unrouted(graph), addresses=None)  # running; the agent did not answer
    state = with_edge(state, graph, ide="http://10.0.20.77:8080", lobby="10.0.20.77")
    plan = make_plan(graph, state)
    assert "route/core/ide" not in changes(plan) and "velocity/lobby" not in changes(plan)
    assert backend(plan, "route/core/ide") == "http://10.0.20.77:8080"
    kept = {d.address: d.message for d in plan.diagnostics if d.code == "backend-kept"}
    assert set(kept) == {"route/core/ide", "velocity/lobby"}
    assert "did not answer: the backend stays http://10.0.20.77:8080" in kept["route/core/ide"]
    assert set(withheld(plan)) == {"route/core/ssh"}  # never written: nowhere to keep it at


def test_a_pull_requests_edit_to_a_dhcp_vms_route_shows_in_its_plan() -> None:
    """`plan --base`: both sides are converged states with no address known; a route's other
    fields still show their change, at the host name's stand-in."""
    base = graph_of()
    edited = graph_of(("ide: {host: ide.example.org,", "ide: {host: code.example.org,"))
    plan = make_plan(edited, converged_state(base))
    ide = changes(plan)["route/core/ide"]
    assert ide.action is Action.UPDATE
    assert [f.path for f in ide.fields] == ["rule"]
    assert set(changes(plan)) == {"route/core/ide"}
