"""Helpers shared by the Proxmox guest tests: converge, read outcomes, read ownership marks
straight from Proxmox, and load an edited copy of the example specs."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import anyio

from reconciler.applying.converging import Convergence, converge
from reconciler.applying.executor import Result
from reconciler.applying.observing import observe_all
from reconciler.loading.graph import build_graph
from reconciler.loading.loader import load_directory, load_texts
from reconciler.model.plans import Action, Plan
from reconciler.model.resources import DesiredGraph
from reconciler.planning.planner import make_plan
from reconciler.providers.proxmox import ProxmoxProvider
from tests.conftest import SPECS

# Parsed here on its own, not with the provider's parser: the tests check what Proxmox holds.
MARK = re.compile(
    r"^reconciler:v1 platform=(\S+) address=(\S+)(?: vmid=(\d+))?(?: template=(\S+))?",
    re.MULTILINE,
)


GAME_RANGE = "game: {first: 1000, last: 1099, layer: runtime}"
CORE_RANGE = "core: {first: 100, last: 199, layer: control}"


# Two game servers with static addresses, each a `guests:` entry built on a `game` profile.
LOBBY = """
  mc-lobby:
    role: game
    vmid: 1000
    host: pve-runtime
    profile: game
    network:
      - {name: eth0, bridge: vmbr0, ip: 10.20.0.10/24, gw: 10.20.0.1}
"""
SURVIVAL = """
  mc-survival:
    role: game
    vmid: 1001
    host: pve-runtime
    profile: game
    network:
      - {name: eth0, bridge: vmbr0, ip: 10.20.0.11/24, gw: 10.20.0.1}
"""


def platform_yaml(*ranges: str, control: bool = False, max_deletes: int | None = None) -> str:
    """The small platform.yaml the guest tests build on: pve-runtime (layer `runtime`), with
    pve-core (layer `control`, which runtime may depend on) if `control`; each range one
    `name: {...}` entry."""
    limit = "" if max_deletes is None else f", max_deletes_per_run: {max_deletes}"
    layers = "  runtime: {}\n"
    hosts = "  pve-runtime: {layers: [runtime], capacity: {cores: 32, memory: 128G}}\n"
    if control:
        layers = "  control: {}\n  runtime: {may_depend_on: [control]}\n"
        hosts = "  pve-core: {layers: [control], capacity: {cores: 16, memory: 64G}}\n" + hosts
    return (
        "\nplatform: {name: zpack, owner_tag: reconciler, default_storage: local-lvm"
        + limit
        + "}\nlayers:\n"
        + layers
        + "hosts:\n"
        + hosts
        + "ranges:\n"
        + "".join(f"  {r}\n" for r in ranges)
    )


def _listed(providers: ProxmoxProvider | list[Any]) -> list[Any]:
    return providers if isinstance(providers, list) else [providers]


def run(graph: DesiredGraph, providers: ProxmoxProvider | list[Any], **kw: Any) -> Convergence:
    """Converge `graph` with the guest provider (or these providers)."""
    return anyio.run(lambda: converge(graph, _listed(providers), **kw))


def plan_now(graph: DesiredGraph, providers: ProxmoxProvider | list[Any], **kw: Any) -> Plan:
    """A fresh plan for `graph`, from what the provider (or these providers) observe now."""
    observed = anyio.run(lambda: observe_all(_listed(providers), graph.platform))
    return make_plan(graph, observed, **kw)


def ok(conv: Convergence) -> None:
    """The convergence succeeded; if not, the failed changes and why."""
    report = conv.rounds[-1].report
    assert conv.ok, report and [(r.change.address, r.error) for r in report.results]


def changed(plan: Plan) -> dict[str, Action]:
    """What the plan does, by address (its no-ops left out)."""
    return {c.address: c.action for c in plan.changes if c.action is not Action.NOOP}


def load_edited(platform: str, guests: str, *edits: tuple[str, str]) -> DesiredGraph:
    """A platform file and a guests file, with each (old, new) replaced once in the guests."""
    for old, new in edits:
        assert guests.count(old) == 1, old
        guests = guests.replace(old, new)
    loaded = load_texts({"platform.yaml": platform, "guests.yaml": guests})
    assert loaded.ok and loaded.spec is not None, [str(d) for d in loaded.diagnostics]
    return build_graph(loaded.spec, loaded.source)


def results(conv: Convergence, round_: int = -1) -> dict[str, Result]:
    report = conv.rounds[round_].report
    assert report is not None
    return {r.change.address: r for r in report.results}


def marks(provider: ProxmoxProvider) -> dict[str, list[int]]:
    """Address -> the vmids whose description carries our mark for it, read from Proxmox."""
    out: dict[str, list[int]] = {}
    for item in provider.client.cluster.resources.get(type="vm"):
        kind = "qemu" if item["type"] == "qemu" else "lxc"  # the example has a VM and a template
        config = provider.client.nodes(item["node"])(kind)(item["vmid"]).config.get()
        m = MARK.search(config.get("description") or "")
        if m and m.group(1) == "zpack":
            out.setdefault(m.group(2), []).append(int(item["vmid"]))
    return out


def load_copy(tmp_path: Path, edits: dict[str, tuple[str, str]]) -> DesiredGraph:
    """The example specs copied to tmp_path with text edits: file -> (old, new)."""
    target = tmp_path / "specs"
    target.mkdir()
    for src in SPECS.glob("*.yaml"):
        text = src.read_text(encoding="utf-8")
        if src.name in edits:
            old, new = edits[src.name]
            assert old in text, (src.name, old)
            text = text.replace(old, new, 1)
        (target / src.name).write_text(text, encoding="utf-8")
    loaded = load_directory(target)
    assert loaded.ok and loaded.spec is not None, [str(d) for d in loaded.diagnostics]
    return build_graph(loaded.spec, loaded.source)
