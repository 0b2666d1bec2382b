"""Import of an estate holding what the spec language refuses (issue 13): a Velocity
registration whose name is no DNS label (`Lobby`), Traefik routers whose name, host or path
prefix the spec refuses, a guest description with a line that reads as the controller's mark,
a firewall rule comment of two lines (a U+2028 line separator: Proxmox refuses only "\n" and
"\r" there) and an alias comment carrying `[reconciler:`.

The written specs validate; what they leave out is named in the notes (and the description's
line says so in the file); nothing is renamed: `Lobby` is listed as unmanaged, so a plan and an
apply of the imported specs leave it registered, and make no mutating call to Proxmox or the
Velocity bridge.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml

from reconciler.applying.converging import converge
from reconciler.applying.observing import observe_all
from reconciler.importing.edge import (
    edge_sources,
    read_edge,
)
from reconciler.importing.estate import Estate
from reconciler.importing.writer import ImportResult
from reconciler.loading.loader import load_directory
from reconciler.model.diagnostics import Severity
from reconciler.model.errors import ConfigurationError
from reconciler.model.plans import Action
from reconciler.model.resources import DesiredGraph
from reconciler.planning.planner import make_plan
from reconciler.providers.proxmox import ProxmoxProvider
from reconciler.simulators.velocity_bridge import VelocityBridgeSimulator
from tests.fakepve_fixtures import mutating_calls
from tests.importing.test_import_adopt import import_specs, read_fresh
from tests.importing.test_import_edge import (
    SECRET,
    SECRET_ENV,
    build_edge_estate,
    edge_providers,
    routers,
    serve_handmade,
    sources,
    wait_for,
)
from tests.traefik_fixtures import Traefik

STRAY_MARK = "reconciler:v1 platform=zpack address=guest/mc-lobby"
DESCRIPTION = f"survival world\n{STRAY_MARK}\nask ops before a reset"
# Proxmox refuses "\n" and "\r" in a firewall comment, but takes the other line breaks.
TWO_LINES = "map for players\u2028see the wiki"
ALIAS_COMMENT = "copied from [reconciler:zpack] by hand"

# Routers Traefik serves but the spec refuses as they are: a name like the controller's whose
# route part is no DNS label, a wildcard host, a path prefix with a space.
HANDMADE = """
http:
  routers:
    rc-Lobby_Map:
      rule: "Host(`map.lobby.play.zpack.dev`)"
      entryPoints: [websecure]
      tls: {certResolver: letsencrypt}
      service: lobby-map
    every-world:
      rule: "Host(`*.play.zpack.dev`)"
      entryPoints: [web]
      service: survival-web
    odd-path:
      rule: "Host(`survival.play.zpack.dev`) && PathPrefix(`/my world`)"
      entryPoints: [web]
      service: survival-web
  services:
    lobby-map:
      loadBalancer: {servers: [{url: "http://10.20.0.10:8100"}]}
    survival-web:
      loadBalancer: {servers: [{url: "http://10.20.0.11:8100"}]}
"""
HANDMADE_ROUTERS = {"rc-Lobby_Map@file", "every-world@file", "odd-path@file"}


@pytest.fixture
def estate(pve: Any, provider: ProxmoxProvider) -> Estate:
    build_edge_estate(pve, provider)
    pve.ct(1001).config["description"] = DESCRIPTION
    fw = provider.client.cluster.firewall
    fw.aliases("api").put(cidr="10.10.0.11", comment=ALIAS_COMMENT)
    # On top of mc-lobby's rules: a rule whose comment has a line break.
    provider.client.nodes("pve-runtime").lxc(1000).firewall.rules.post(
        type="in", action="ACCEPT", proto="tcp", dport="8100", enable=1, comment=TWO_LINES
    )
    return read_fresh(pve, provider)


@pytest.fixture
def bridge(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    with VelocityBridgeSimulator(SECRET) as sim:
        sim.register("Lobby", "10.20.0.10", 25565)  # mc-lobby's address, a name no label
        sim.register("survival", "10.20.0.11", 25566)
        yield sim


@pytest.fixture
def traefik(traefik_factory: Any, dynamic: Path) -> Traefik:
    return serve_handmade(traefik_factory, dynamic, HANDMADE, HANDMADE_ROUTERS)


@pytest.fixture
def imported(
    estate: Estate, bridge: VelocityBridgeSimulator, traefik: Traefik, tmp_path: Path
) -> ImportResult:
    edge = anyio.run(read_edge, sources(bridge, traefik))
    return import_specs(estate, tmp_path, edge)


def test_the_written_specs_validate_cleanly(imported: ImportResult, tmp_path: Path) -> None:
    loaded = load_directory(tmp_path / "imported")
    assert loaded.ok, [str(d) for d in loaded.diagnostics]
    assert [str(d) for d in loaded.diagnostics if d.severity is Severity.ERROR] == []
    assert imported.ok


def test_lobby_is_unmanaged_never_renamed(imported: ImportResult) -> None:
    velocity = yaml.safe_load(imported.files["edge.yaml"])["velocity"]
    assert velocity["servers"] == {"survival": {"guest": "mc-survival", "port": 25566}}
    assert velocity["unmanaged"] == ["Lobby"]
    assert imported.velocity_servers == {"survival": "mc-survival"}
    notes = "\n".join(imported.notes)
    assert "velocity server 'Lobby' (10.20.0.10:25565): its name is not a DNS label" in notes
    assert "listed as `unmanaged`: reported, never unregistered" in notes


def test_routers_the_spec_refuses_are_notes_or_read_as_hand_made(imported: ImportResult) -> None:
    routes = yaml.safe_load(imported.files["edge.yaml"])["traefik"]["runtime"]["routes"]
    # rc-Lobby_Map cannot be the controller's route `Lobby_Map`: a hand-made router, imported
    # under a name the spec holds, and the first apply adds rc-lobby-map next to it.
    assert routes == {
        "lobby-map": {
            "host": "map.lobby.play.zpack.dev",
            "tls": {"certresolver": "letsencrypt"},
            "target": {"guest": "mc-lobby", "port": 8100},
        }
    }
    assert imported.routes == {"route/runtime/lobby-map": "rc-Lobby_Map@file"}
    notes = "\n".join(imported.notes)
    assert (
        "router rc-Lobby_Map@file is named like the controller's (rc-<route>), but 'Lobby_Map' "
        "is not a DNS label" in notes
    )
    assert "router every-world@file not imported: not a valid spec route:" in notes
    assert "'*.play.zpack.dev' is not a host name: no wildcards here" in notes
    assert "router odd-path@file not imported: not a valid spec route:" in notes
    assert "'/my world' is not a URL path" in notes


def test_mark_like_text_and_line_breaks_are_left_out_and_named(imported: ImportResult) -> None:
    survival = yaml.safe_load(imported.files["game.yaml"])["guests"]["mc-survival"]
    assert survival["description"] == "survival world\nask ops before a reset"
    assert "# lines that read as the controller's mark left out" in imported.files["game.yaml"]
    lobby_rules = yaml.safe_load(imported.files["game.yaml"])["guests"]["mc-lobby"]["firewall"]
    assert lobby_rules["rules"][0] == {
        "type": "in",
        "action": "ACCEPT",
        "proto": "tcp",
        "dport": "8100",
    }
    aliases = yaml.safe_load(imported.files["firewall.yaml"])["firewall"]["aliases"]
    assert aliases["api"] == {"cidr": "10.10.0.11"}
    notes = "\n".join(imported.notes)
    assert (
        "lxc 1001 (mc-survival): description lines that read as the controller's ownership "
        "mark left out" in notes
    )
    assert repr(STRAY_MARK) in notes
    rule = f"lxc 1000 (mc-lobby): rule 0: comment {TWO_LINES!r} left out: the spec holds a "
    alias = f"alias api: comment {ALIAS_COMMENT!r} left out: it reads as the controller's"
    assert rule in notes and alias in notes
    # What the first apply after adoption would change, said per address.
    assert imported.drift["guest/mc-survival"] == ["description"]
    assert any(f.startswith("firewall.rules") for f in imported.drift["guest/mc-lobby"])


def test_a_plan_and_an_apply_of_the_imported_specs_leave_everything_as_it_is(
    imported: ImportResult,
    graph: DesiredGraph,
    provider: ProxmoxProvider,
    pve: Any,
    bridge: VelocityBridgeSimulator,
    traefik: Traefik,
    dynamic: Path,
    tmp_path: Path,
) -> None:
    loaded = load_directory(tmp_path / "imported")
    assert loaded.spec is not None and loaded.spec.velocity is not None
    providers = edge_providers(
        graph, provider, bridge, traefik, dynamic / "rc-runtime.yml", loaded.spec
    )
    observed = anyio.run(lambda: observe_all(providers, graph.platform))
    assert observed.errors == {}
    plan = make_plan(graph, observed)
    assert not plan.errored, [str(d) for d in plan.diagnostics]
    actions = {c.address: c.action for c in plan.changes}
    assert actions["velocity/survival"] is Action.NOOP
    assert not any(a.startswith("velocity/") and a != "velocity/survival" for a in actions)
    assert {a: x for a, x in actions.items() if x is not Action.NOOP} == {
        "route/runtime/lobby-map": Action.CREATE  # next to the hand-made rc-Lobby_Map
    }
    assert mutating_calls(pve) == []

    before = len(bridge.requests)
    assert anyio.run(lambda: converge(graph, providers)).ok
    assert [(m, p) for m, p, _ in bridge.requests[before:] if m != "GET"] == []
    assert bridge.servers() == {
        "Lobby": ("10.20.0.10", 25565),
        "survival": ("10.20.0.11", 25566),
    }
    assert mutating_calls(pve) == []
    wait_for(traefik, {"rc-lobby-map@file"})
    assert routers(traefik) >= HANDMADE_ROUTERS


def test_an_instance_the_flags_name_with_no_dns_label_is_refused() -> None:
    """The instance is a key of the spec written (`traefik: {NAME: ...}`): refused up front,
    never written to fail `validate`."""
    with pytest.raises(ConfigurationError, match="instance 'Runtime' is not a valid name"):
        edge_sources(None, traefik_apis={"Runtime": "http://127.0.0.1:9"})
    assert [s.instance for s in edge_sources(None, traefik_apis={"rt": "x"}).traefik] == ["rt"]
