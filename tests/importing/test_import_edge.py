"""Import of the edge: fakepve's hand-made estate (plus a Velocity guest), the Velocity bridge
simulator with registrations made by hand, and a real Traefik fed by a hand-written dynamic
configuration. The written `edge.yaml` validates and holds what they serve, pointed at the
imported guests; what the spec cannot say is a note; a plan of the imported specs finds the
registrations already there (no-ops) and adds `rc-` routers next to the hand-made ones.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import yaml

from reconciler.applying.connecting import traefik_routes
from reconciler.applying.converging import converge
from reconciler.applying.observing import observe_all
from reconciler.importing.edge import (
    EdgeSources,
    TraefikSource,
    VelocitySource,
    read_edge,
)
from reconciler.importing.edge_writer import parse_rule
from reconciler.importing.estate import Estate
from reconciler.importing.writer import ImportResult, render_specs, write_files
from reconciler.loading.loader import load_directory
from reconciler.model.plans import Action
from reconciler.model.resources import DesiredGraph
from reconciler.model.spec import ProxmoxApi, SecretRef
from reconciler.planning.planner import make_plan
from reconciler.providers import Provider
from reconciler.providers.proxmox import ProxmoxProvider
from reconciler.providers.velocity import VelocityProvider
from reconciler.simulators.velocity_bridge import VelocityBridgeSimulator
from tests.cli.test_live import flags
from tests.fakepve_fixtures import mutating_calls
from tests.importing.test_import_adopt import (
    NET,
    base,
    build_estate,
    import_specs,
    providers_of,
    read_fresh,
    run_cli,
)
from tests.traefik_fixtures import Traefik

SECRET = "edge-import-secret"
SECRET_ENV = "EDGE_IMPORT_BRIDGE_SECRET"
VELOCITY_IP = "10.30.0.21"
SPEC_TRAEFIK_API = "http://10.30.0.20:8080"

# Made by hand on Traefik: a Host route with a resolver, a HostSNI passthrough, one router
# with two servers (the spec routes to one guest) and one to no imported guest.
HANDMADE = """
http:
  routers:
    lobby-map:
      rule: "Host(`map.lobby.play.zpack.dev`)"
      entryPoints: [websecure]
      tls: {certResolver: letsencrypt}
      service: lobby-map
    api-pool:
      rule: "Host(`api.zpack.dev`)"
      entryPoints: [web]
      service: api-pool
    elsewhere:
      rule: "Host(`elsewhere.zpack.dev`) && PathPrefix(`/x`)"
      entryPoints: [web]
      service: elsewhere
  services:
    lobby-map:
      loadBalancer: {servers: [{url: "http://10.20.0.10:8100"}]}
    api-pool:
      loadBalancer: {servers: [{url: "http://10.10.0.11:8080"}, {url: "http://10.10.0.13:8080"}]}
    elsewhere:
      loadBalancer: {servers: [{url: "http://192.0.2.7:80"}]}
tcp:
  routers:
    console-survival:
      rule: "HostSNI(`console.survival.play.zpack.dev`)"
      entryPoints: [websecure]
      tls: {passthrough: true}
      service: console-survival
  services:
    console-survival:
      loadBalancer: {servers: [{address: "10.20.0.11:8443"}]}
"""
HANDMADE_ROUTERS = {
    "lobby-map@file",
    "api-pool@file",
    "elsewhere@file",
    "console-survival@file",
}


def routers(traefik: Traefik) -> set[str]:
    out: set[str] = set()
    with httpx.Client(trust_env=False, timeout=2) as client:
        for protocol in ("http", "tcp"):
            for r in client.get(f"{traefik.api_url}/api/{protocol}/routers").json():
                out.add(r["name"])
    return out


def wait_for(traefik: Traefik, names: set[str]) -> None:
    deadline = time.monotonic() + 10
    while not names <= routers(traefik):
        assert time.monotonic() < deadline, f"Traefik never served {names - routers(traefik)}"
        time.sleep(0.05)


def build_edge_estate(pve: Any, provider: ProxmoxProvider) -> None:
    """fakepve's hand-made estate, plus the Velocity guest (302, at VELOCITY_IP)."""
    build_estate(pve, provider)
    pve.add_ct(
        302,
        "velocity",
        node="pve-runtime",
        status="running",
        config={
            "cores": 2,
            "memory": 1024,
            "net0": NET.format(gw="10.30.0.1", ip=VELOCITY_IP, tag=30),
        },
    )


@pytest.fixture
def estate(pve: Any, provider: ProxmoxProvider) -> Estate:
    build_edge_estate(pve, provider)
    return read_fresh(pve, provider)


@pytest.fixture
def bridge(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    with VelocityBridgeSimulator(SECRET) as sim:
        sim.register("lobby", "10.20.0.10", 25565)
        sim.register("survival", "10.20.0.11", 25566)
        sim.register("ghost", "10.99.0.5", 25565)  # no imported guest has this address
        yield sim


def serve_handmade(traefik_factory: Any, dynamic: Path, handmade: str, names: set[str]) -> Traefik:
    """A Traefik watching `dynamic`, where `handmade` is written, once it serves `names`."""
    (dynamic / "handmade.yml").write_text(handmade)
    started: Traefik = traefik_factory(
        [f"--providers.file.directory={dynamic}", "--providers.file.watch=true"]
    )
    wait_for(started, names)
    return started


@pytest.fixture
def traefik(traefik_factory: Any, dynamic: Path) -> Traefik:
    return serve_handmade(traefik_factory, dynamic, HANDMADE, HANDMADE_ROUTERS)


def sources(bridge: VelocityBridgeSimulator, traefik: Traefik) -> EdgeSources:
    return EdgeSources(
        velocity=VelocitySource(bridge.url, SecretRef(env=SECRET_ENV), 8081, guest="velocity"),
        traefik=(
            TraefikSource("runtime", traefik.api_url, SPEC_TRAEFIK_API, guest="traefik-runtime"),
        ),
    )


@pytest.fixture
def imported(
    estate: Estate, bridge: VelocityBridgeSimulator, traefik: Traefik, tmp_path: Path
) -> ImportResult:
    edge = anyio.run(read_edge, sources(bridge, traefik))
    result = import_specs(estate, tmp_path, edge)
    assert len(result.routes) == 2, (result.notes, edge.traefik)
    return result


# --- what is written ----------------------------------------------------------------------------


def test_edge_yaml_holds_the_registrations_and_routes_on_the_imported_guests(
    imported: ImportResult, graph: DesiredGraph
) -> None:
    assert imported.ok
    text = imported.files["edge.yaml"]
    edge = yaml.safe_load(text)
    assert edge["velocity"] == {
        "guest": "velocity",
        "bridge": {"port": 8081, "secret": {"env": SECRET_ENV}},
        "servers": {
            "lobby": {"guest": "mc-lobby"},
            "survival": {"guest": "mc-survival", "port": 25566},
        },
        "unmanaged": ["ghost"],
    }
    runtime = edge["traefik"]["runtime"]
    assert runtime["guest"] == "traefik-runtime"
    assert runtime["routes_to"] == ["runtime"]
    assert runtime["api_url"] == SPEC_TRAEFIK_API
    assert runtime["feed"] == {"type": "file", "path": "/etc/traefik/dynamic/runtime.yml"}
    assert runtime["routes"] == {
        "console-survival": {
            "type": "tcp",
            "sni": "console.survival.play.zpack.dev",
            "tls": {"passthrough": True},
            "target": {"guest": "mc-survival", "port": 8443},
        },
        "lobby-map": {
            "host": "map.lobby.play.zpack.dev",
            "tls": {"certresolver": "letsencrypt"},
            "target": {"guest": "mc-lobby", "port": 8100},
        },
    }
    # The graph the controller will plan: the same servers Traefik and Velocity hold.
    assert graph.resources["route/runtime/lobby-map"].attributes["server"] == (
        "http://10.20.0.10:8100"
    )
    assert graph.resources["route/runtime/console-survival"].attributes["server"] == (
        "10.20.0.11:8443"
    )
    assert graph.resources["velocity/survival"].attributes["port"] == 25566
    # No secret, a guessed feed said to be one, the round trip said in the header.
    assert SECRET not in text
    assert "# a guess" in text
    assert "ADDS a router rc-<route>" in text
    assert imported.routes == {
        "route/runtime/console-survival": "console-survival@file",
        "route/runtime/lobby-map": "lobby-map@file",
    }


def test_what_the_spec_cannot_say_is_a_note(imported: ImportResult) -> None:
    notes = "\n".join(imported.notes)
    assert "velocity server ghost (10.99.0.5:25565): no imported guest" in notes
    assert "so it is listed as `unmanaged`: reported, never unregistered" in notes
    assert "router api-pool@file not imported: 2 backend servers" in notes
    assert "router elsewhere@file not imported: backend http://192.0.2.7:80 is no imported" in (
        notes
    )
    assert "the first apply ADDS routers rc-console-survival, rc-lobby-map" in notes
    assert "@internal" not in notes  # Traefik's own routers are not the estate's


def test_the_import_is_deterministic(
    estate: Estate, bridge: VelocityBridgeSimulator, traefik: Traefik
) -> None:
    edge = anyio.run(read_edge, sources(bridge, traefik))
    assert render_specs(estate, base(), edge).files == render_specs(estate, base(), edge).files


def test_an_unreachable_edge_is_a_note_and_the_guests_are_imported(
    estate: Estate, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    down = EdgeSources(
        velocity=VelocitySource("http://127.0.0.1:9", SecretRef(env=SECRET_ENV), 8081),
        traefik=(TraefikSource("runtime", "http://127.0.0.1:9", "http://127.0.0.1:9"),),
    )

    async def no_sleep(_s: float) -> None:
        pass

    edge = anyio.run(lambda: read_edge(down, sleep=no_sleep))
    result = render_specs(estate, base(), edge)
    assert result.ok and "edge.yaml" not in result.files
    assert any(n.startswith("velocity: not read, so not written") for n in result.notes)
    assert any(n.startswith("traefik runtime: not read, so not written") for n in result.notes)


# --- the round trip ------------------------------------------------------------------------------


def edge_providers(
    graph: DesiredGraph,
    provider: ProxmoxProvider,
    bridge: VelocityBridgeSimulator,
    traefik: Traefik,
    feed: Path,
    spec: Any,
) -> list[Provider]:
    routes = traefik_routes(spec, files={"runtime": feed}, apis={"runtime": traefik.api_url})
    assert routes is not None
    velocity = VelocityProvider(bridge.url, SECRET, unmanaged=spec.velocity.unmanaged)
    return [*providers_of(provider, graph), velocity, routes]


def test_a_plan_finds_the_registrations_and_adds_rc_routers_next_to_the_handmade_ones(
    graph: DesiredGraph,
    provider: ProxmoxProvider,
    pve: Any,
    bridge: VelocityBridgeSimulator,
    traefik: Traefik,
    dynamic: Path,
    tmp_path: Path,
) -> None:
    loaded = load_directory(tmp_path / "imported")
    providers = edge_providers(
        graph, provider, bridge, traefik, dynamic / "rc-runtime.yml", loaded.spec
    )
    observed = anyio.run(lambda: observe_all(providers, graph.platform))
    plan = make_plan(graph, observed)
    actions = {c.address: c.action for c in plan.changes}
    assert actions["velocity/lobby"] is Action.NOOP
    assert actions["velocity/survival"] is Action.NOOP
    assert "route/runtime/lobby-map" in actions, (plan.diagnostics, observed.errors)
    assert actions["route/runtime/lobby-map"] is Action.CREATE
    assert actions["route/runtime/console-survival"] is Action.CREATE
    # A registration the spec cannot hold is listed as unmanaged: never touched.
    assert "velocity/ghost" not in actions
    assert loaded.spec is not None and loaded.spec.velocity is not None
    assert loaded.spec.velocity.unmanaged == ("ghost",)
    requests_before = len(bridge.requests)
    conv = anyio.run(lambda: converge(graph, providers))
    assert conv.ok
    posts = [(m, path) for m, path, _ in bridge.requests[requests_before:] if m == "POST"]
    assert posts == []  # nothing registered again, nothing unregistered
    assert bridge.servers() == {
        "ghost": ("10.99.0.5", 25565),
        "lobby": ("10.20.0.10", 25565),
        "survival": ("10.20.0.11", 25566),
    }
    wait_for(traefik, {"rc-lobby-map@file", "rc-console-survival@file"})
    assert routers(traefik) >= HANDMADE_ROUTERS  # the hand-made ones are still there
    assert mutating_calls(pve) == []  # unadopted guests are only reported
    again = make_plan(graph, anyio.run(lambda: observe_all(providers, graph.platform)))
    assert not again.has_changes, [c.address for c in again.actions]


# --- the command -------------------------------------------------------------------------------


def test_the_import_command_reads_the_edge_the_dir_spec_configures(
    estate: Estate,
    bridge: VelocityBridgeSimulator,
    traefik: Traefik,
    pve_api: ProxmoxApi,
    tmp_path: Path,
    pve: Any,
) -> None:
    # An existing spec: the imported guests, plus the edge as an operator would declare it.
    specs = tmp_path / "specs"
    write_files(render_specs(estate, base()).files, specs)
    (specs / "edge-config.yaml").write_text(
        "velocity:\n"
        "  guest: velocity\n"
        f"  bridge: {{port: 8081, secret: {{env: {SECRET_ENV}}}}}\n"
        "traefik:\n"
        "  runtime:\n"
        "    guest: traefik-runtime\n"
        "    routes_to: [edge]\n"
        "    feed: {type: redis, root_key: traefik-runtime}\n"
        f"    api_url: {SPEC_TRAEFIK_API}\n"
    )
    assert load_directory(specs).ok
    out = tmp_path / "out"
    code, text, err = run_cli(
        [
            "import",
            "--out",
            str(out),
            "--dir",
            str(specs),
            *flags(pve_api, edge=True),
            "--velocity-url",
            bridge.url,
            "--traefik-api",
            f"runtime={traefik.api_url}",
        ]
    )
    assert code == 0, err
    assert "2 Velocity servers, 2 routes imported" in text
    assert "the first apply adds an rc- router next to each" in text
    assert "note: velocity server ghost" in err
    assert load_directory(out).ok
    edge = yaml.safe_load((out / "edge.yaml").read_text())
    runtime = edge["traefik"]["runtime"]
    assert runtime["feed"] == {"type": "redis", "root_key": "traefik-runtime"}
    assert runtime["routes_to"] == ["edge", "runtime"]  # widened to the routes' targets
    assert runtime["api_url"] == SPEC_TRAEFIK_API
    assert edge["velocity"]["bridge"]["secret"] == {"env": SECRET_ENV}
    assert mutating_calls(pve) == []


def test_the_import_command_refuses_a_velocity_url_without_its_secret(
    estate: Estate, pve_api: ProxmoxApi, tmp_path: Path
) -> None:
    code, _, err = run_cli(
        [
            "import",
            "--out",
            str(tmp_path / "out"),
            "--platform",
            "zpack",
            *flags(pve_api, edge=True),
            "--velocity-url",
            "http://127.0.0.1:9",
        ]
    )
    assert code == 1 and "--velocity-url needs --velocity-secret-env" in err


# --- rules ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("protocol", "rule", "parsed"),
    [
        ("http", "Host(`a.dev`)", (["a.dev"], None)),
        ("http", "Host(`a.dev`) || Host(`b.dev`)", (["a.dev", "b.dev"], None)),
        ("http", "(Host(`a.dev`) || Host(`b`)) && PathPrefix(`/x`)", (["a.dev", "b"], "/x")),
        ("http", 'Host("a.dev") && PathPrefix("/x")', (["a.dev"], "/x")),
        ("http", "Host(`a.dev`) && Headers(`X`, `1`)", None),
        ("http", "HostRegexp(`.+`)", None),
        ("http", "PathPrefix(`/x`)", None),
        ("tcp", "HostSNI(`a.dev`)", (["a.dev"], None)),
        ("tcp", "HostSNI(`a.dev`) || HostSNI(`b.dev`)", (["a.dev", "b.dev"], None)),
        ("tcp", "HostSNI(`a.dev`) && ClientIP(`10.0.0.0/8`)", None),
    ],
)
def test_rules_the_spec_can_say(
    protocol: str, rule: str, parsed: tuple[list[str], str | None] | None
) -> None:
    assert parse_rule(protocol, rule) == parsed
