"""Turn what the edge holds (`edge.EdgeEstate`) into the `velocity:` and `traefik:` sections of
the imported `edge.yaml`. Called by `writer.render_specs` once the guests are named; pure.

Every reference is to an imported guest, found by static IP (the proxy's guest also by the
`--dir` spec's name): a registration or a backend that is no imported guest cannot be written
(the spec can only point at guests) and becomes a note.

- Velocity: `guest`, `bridge: {port, secret}` (the secret as a reference, never its value) and
  one server per registration, `{guest, port}` (the port only when not 25565; a `forced_host`
  kept from the `--dir` spec's server of the same name). Registrations are soft state: the
  first apply finds them registered (no-op), nothing to adopt. A registration that is no
  imported guest's cannot be declared (the spec registers guests only), nor one whose name is
  no DNS label (`Lobby`: a declared server's name is one, and declaring it under another name
  would unregister it and register it again): it goes into `velocity.unmanaged`, so the
  controller reports it and never unregisters it; the note says so, and removing it from that
  list hands it to the controller (which then unregisters it).
- Traefik, per instance: `guest`, `routes_to` (the spec's, plus every layer a route targets),
  `feed` (the spec's; else a file feed, marked as a guess the operator must settle), `api_url`
  and one route per router that the spec language can say exactly: a rule of `Host(...)`s
  (`||`), optionally `&& PathPrefix(...)`, or of `HostSNI(...)`s; no middlewares; one backend
  server on an imported guest; tls with at most a cert resolver or passthrough. Anything else
  is a note naming the router, and so is a host or path prefix the spec refuses (a wildcard,
  a character outside a host name or a URL path): the route is validated as the spec would.
  `@internal` routers are Traefik's own; a router named `rc-x` is the controller's own route
  `x` (written as the `--dir` spec declares it, when it does) when `x` is a DNS label; one
  whose `x` is not (`rc-Lobby_Map`) cannot be named by any route, and is read as a hand-made
  router. Route names are router names without `@provider` (and without `rc-`), made DNS
  labels and unique.

The round trip: a hand-made router is not the controller's, so the first apply writes a router
`rc-<route>` next to it; `edge.yaml`'s header and the notes say so, with the steps.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from pydantic import ValidationError

from reconciler.importing.edge import (
    EdgeEstate,
    Router,
    TraefikRead,
    TraefikSource,
    VelocityRead,
    resolve_guest,
)
from reconciler.importing.yamltext import Commented, unique_name
from reconciler.model.spec import HttpRoute, TcpRoute
from reconciler.model.units import check_label
from reconciler.providers.traefik import ROUTER_PREFIX

DEFAULT_GAME_PORT = 25565
DEFAULT_ENTRYPOINTS = ("websecure",)
FEED_GUESS = "a guess: Traefik does not say how it is fed; choose file or redis"
_Q = r"[`\"]([^`\"]+)[`\"]"
_HOSTS = re.compile(rf"\s*Host\({_Q}\)\s*(?:\|\|\s*Host\({_Q}\)\s*)*")
_HOST = re.compile(rf"Host\({_Q}\)")
_PATH = re.compile(rf"\s*&&\s*PathPrefix\({_Q}\)\s*")
_SNIS = re.compile(rf"\s*HostSNI\({_Q}\)\s*(?:\|\|\s*HostSNI\({_Q}\)\s*)*")
_SNI = re.compile(rf"HostSNI\({_Q}\)")
_NAME_BAD = re.compile(r"[^a-z0-9-]+")


@dataclass(frozen=True)
class ImportedGuest:
    """What the edge needs of an imported guest."""

    name: str
    layer: str
    ip: str | None


@dataclass
class EdgeResult:
    sections: dict[str, Any] = field(default_factory=dict)  # velocity, traefik
    notes: list[str] = field(default_factory=list)
    routes: dict[str, str] = field(default_factory=dict)  # route address -> Traefik router
    servers: dict[str, str] = field(default_factory=dict)  # velocity server -> guest


def parse_rule(protocol: str, rule: str) -> tuple[list[str], str | None] | None:
    """(hosts, path prefix) of a rule the spec can say, else None."""
    text = rule.strip()
    if protocol == "tcp":
        return ([m.group(1) for m in _SNI.finditer(text)], None) if _SNIS.fullmatch(text) else None
    path = None
    found = _PATH.search(text)
    if found is not None and found.end() == len(text):
        path, text = found.group(1), text[: found.start()].strip()
    if text.startswith("(") and text.endswith(")"):
        text = text[1:-1]
    if not _HOSTS.fullmatch(text):
        return None
    return [m.group(1) for m in _HOST.finditer(text)], path


def is_label(name: str) -> bool:
    try:
        check_label(name)
    except ValueError:
        return False
    return True


def is_ours(router: Router) -> bool:
    """A router the controller wrote for route `x`: named `rc-x`, with `x` a DNS label (the
    only names its routes have)."""
    name = router.bare_name
    return name.startswith(ROUTER_PREFIX) and is_label(name.removeprefix(ROUTER_PREFIX))


def _route_name(router: Router, taken: set[str]) -> str:
    bare = router.bare_name.removeprefix(ROUTER_PREFIX)
    base = _NAME_BAD.sub("-", bare.lower()).strip("-")[:60].strip("-") or "route"
    return unique_name(base, taken)


def _target(router: Router, by_ip: Mapping[str, str]) -> tuple[dict[str, Any] | None, str | None]:
    """The route's target, or why there is none."""
    if len(router.servers) != 1:
        return None, f"{len(router.servers)} backend servers (the spec routes to one guest)"
    server = router.servers[0]
    if router.protocol == "http":
        parts = urlsplit(server)
        scheme = parts.scheme or "http"
        if scheme not in ("http", "https") or parts.path not in ("", "/"):
            return None, f"backend {server} is not a plain http(s) URL"
        host = parts.hostname
        port = parts.port or (443 if scheme == "https" else 80)
    else:
        host, _, raw = server.rpartition(":")
        if not raw.isdigit():
            return None, f"backend {server} has no port"
        port, scheme = int(raw), "http"
    guest = by_ip.get(host or "")
    if guest is None:
        return None, f"backend {server} is no imported guest's static IP"
    target: dict[str, Any] = {"guest": guest, "port": port}
    if scheme == "https":
        target["scheme"] = "https"
    return target, None


def _tls(router: Router) -> tuple[dict[str, Any] | None, str | None]:
    if router.tls is None:
        return None, None
    tls = dict(router.tls)
    if tls.get("options") == "default":
        del tls["options"]  # what Traefik's API shows for a router that names no options
    extra = sorted(k for k, v in tls.items() if k not in ("certResolver", "passthrough") and v)
    if extra:
        return None, "tls " + ", ".join(extra) + " (the spec holds a cert resolver or passthrough)"
    out: dict[str, Any] = {}
    if tls.get("certResolver"):
        out["certresolver"] = str(tls["certResolver"])
    if tls.get("passthrough"):
        out["passthrough"] = True
    return out, None


def route_of(router: Router, by_ip: Mapping[str, str]) -> tuple[dict[str, Any] | None, str]:
    """A router as a spec route, or why it cannot be one."""
    if router.middlewares:
        return None, "middlewares " + ", ".join(router.middlewares)
    parsed = parse_rule(router.protocol, router.rule)
    if parsed is None:
        return None, f"rule {router.rule!r} is not plain Host/PathPrefix or HostSNI"
    hosts, path = parsed
    tls, why = _tls(router)
    if why:
        return None, why
    target, why = _target(router, by_ip)
    if target is None:
        return None, str(why)
    route: dict[str, Any] = {}
    if router.protocol == "tcp":
        route = {"type": "tcp", "sni": hosts[0] if len(hosts) == 1 else hosts}
    else:
        route = {"host": hosts[0] if len(hosts) == 1 else hosts}
        if path:
            route["path_prefix"] = path
    if router.entrypoints and tuple(router.entrypoints) != DEFAULT_ENTRYPOINTS:
        route["entrypoints"] = list(router.entrypoints)
    if tls is not None:
        route["tls"] = tls
    route["target"] = target
    try:
        valid = (TcpRoute if router.protocol == "tcp" else HttpRoute).model_validate(route)
    except ValidationError as exc:
        first = exc.errors()[0]
        return None, f"not a valid spec route: {first['msg']}"
    # Names as the spec holds them (lowercase, no trailing dot), so two routers naming one
    # host in different spellings are found to clash here, not by `validate` later.
    names = list(valid.sni if isinstance(valid, TcpRoute) else valid.host)
    route["sni" if router.protocol == "tcp" else "host"] = names[0] if len(names) == 1 else names
    return route, ""


def _claims(route: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    kind = str(route.get("type", "http"))
    names = route.get("sni") if kind == "tcp" else route.get("host")
    names = [names] if isinstance(names, str) else list(names or [])
    return [(kind, str(n), str(route.get("path_prefix") or "")) for n in names]


def _velocity(
    read: VelocityRead, guests: Sequence[ImportedGuest], by_ip: Mapping[str, str], out: EdgeResult
) -> None:
    src = read.source
    names = [g.name for g in guests]
    vguest = resolve_guest(src.guest, src.guest_ip, src.url, by_ip, names)
    if vguest is None:
        out.notes.append(
            f"velocity: no imported guest is Velocity's (by the spec's name, or by the static IP "
            f"{src.guest_ip or urlsplit(src.url).hostname}); velocity is not written. "
            f"Registrations seen: {', '.join(r['server_name'] for r in read.registrations)}"
        )
        return
    servers: dict[str, Any] = {}
    unmanaged: list[str] = []
    for reg in read.registrations:
        name, address, port = str(reg["server_name"]), str(reg["address"]), int(reg["port"])
        guest = by_ip.get(address) or (address if address in names else None)
        if not is_label(name):
            out.notes.append(
                f"velocity server {name!r} ({address}:{port}): its name is not a DNS label, "
                "which a declared server's name is, so it is listed as `unmanaged`: reported, "
                "never unregistered (declaring it under another name would unregister it and "
                "register it again)"
            )
            unmanaged.append(name)
            continue
        if guest is None:
            out.notes.append(
                f"velocity server {name} ({address}:{port}): no imported guest has that "
                "address, so it is listed as `unmanaged`: reported, never unregistered"
            )
            unmanaged.append(name)
            continue
        server: dict[str, Any] = {"guest": guest}
        if port != DEFAULT_GAME_PORT:
            server["port"] = port
        forced = (src.servers.get(name) or {}).get("forced_host")
        if forced:
            server["forced_host"] = forced
        servers[name] = server
        out.servers[name] = guest
    section: dict[str, Any] = {
        "guest": vguest,
        "bridge": {"port": src.port, "secret": src.secret.model_dump(exclude_none=True)},
    }
    if servers:
        section["servers"] = servers
    if unmanaged:
        section["unmanaged"] = sorted(unmanaged)
    out.sections["velocity"] = section


def _instance(
    read: TraefikRead,
    guests: Sequence[ImportedGuest],
    by_ip: Mapping[str, str],
    out: EdgeResult,
) -> dict[str, Any] | None:
    """One Traefik instance's section, or None (and a note) when no imported guest runs it."""
    src = read.source
    inst = src.instance
    names = [g.name for g in guests]
    tguest = resolve_guest(src.guest, src.guest_ip, src.api_url, by_ip, names)
    if tguest is None:
        out.notes.append(
            f"traefik {inst}: no imported guest runs it (by name {src.guest!r}, or by the static "
            f"IP of {src.guest_ip or src.api_url}); pass --traefik-guest {inst}=GUEST. "
            "The instance is not written"
        )
        return None
    routes, handmade = _instance_routes(read, names, by_ip, out)
    layer_of = {g.name: g.layer for g in guests}
    section: dict[str, Any] = {
        "guest": tguest,
        "routes_to": _routes_to(src, routes, layer_of, layer_of[tguest], out),
        "feed": _feed(src, out),
        "api_url": src.written_api_url,
    }
    if src.when_unready:
        section["when_unready"] = src.when_unready
    if routes:
        section["routes"] = dict(sorted(routes.items()))
    _note_handmade(inst, handmade, out)
    return section


def _instance_routes(
    read: TraefikRead, names: Sequence[str], by_ip: Mapping[str, str], out: EdgeResult
) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """The routes of an instance's routers, by name, and (route name, router) for those made
    from hand-made routers. A router whose route claims a host (and path) an earlier one
    claims is left out, with a note."""
    inst = read.source.instance
    routes: dict[str, Any] = {}
    claimed: dict[tuple[str, str, str], str] = {}
    taken: set[str] = set()
    handmade: list[tuple[str, str]] = []
    # The controller's own routers first: their routes keep their names.
    ordered = sorted(
        (r for r in read.routers if r.provider != "internal"),
        key=lambda r: (not is_ours(r), r.name),
    )
    for router in ordered:
        route = _router_route(router, read.source, names, by_ip, out)
        if route is None:
            continue
        clash = next((claimed[c] for c in _claims(route) if c in claimed), None)
        if clash is not None:
            out.notes.append(
                f"traefik {inst}: router {router.name} not imported: it claims what router "
                f"{clash} already does"
            )
            continue
        if is_ours(router):
            name = router.bare_name.removeprefix(ROUTER_PREFIX)
            taken.add(name)
        else:
            name = _route_name(router, taken)
            handmade.append((name, router.name))
        for c in _claims(route):
            claimed[c] = router.name
        routes[name] = route
    return routes, handmade


def _router_route(
    router: Router,
    src: TraefikSource,
    names: Sequence[str],
    by_ip: Mapping[str, str],
    out: EdgeResult,
) -> dict[str, Any] | None:
    """A router's route: the `--dir` spec's, for one of the controller's own routers the spec
    declares; else read from the router, or None (and a note) when the spec cannot say it."""
    own = is_ours(router)
    if not own and router.bare_name.startswith(ROUTER_PREFIX):
        out.notes.append(
            f"traefik {src.instance}: router {router.name} is named like the controller's "
            f"({ROUTER_PREFIX}<route>), but "
            f"{router.bare_name.removeprefix(ROUTER_PREFIX)!r} is not a DNS label, which "
            "a route's name is: it is read as a hand-made router"
        )
    declared = src.routes.get(router.bare_name.removeprefix(ROUTER_PREFIX)) if own else None
    if declared is not None and declared["target"]["guest"] in names:
        return {k: v for k, v in declared.items() if (k, v) != ("type", "http")}
    made, why = route_of(router, by_ip)
    if made is None:
        out.notes.append(f"traefik {src.instance}: router {router.name} not imported: {why}")
    return made


def _routes_to(
    src: TraefikSource,
    routes: Mapping[str, Any],
    layer_of: Mapping[str, str],
    own_layer: str,
    out: EdgeResult,
) -> list[str]:
    """The spec's `routes_to`, widened by every layer a route targets; the instance's own
    layer when that leaves none."""
    layers = list(src.routes_to)
    for route in routes.values():
        layer = layer_of[route["target"]["guest"]]
        if layer not in layers:
            layers.append(layer)
    if not layers:
        layers = [own_layer]
    if src.routes_to and list(src.routes_to) != layers:
        out.notes.append(
            f"traefik {src.instance}: routes_to widened to {', '.join(layers)}: routes it "
            "serves target those layers"
        )
    return layers


def _feed(src: TraefikSource, out: EdgeResult) -> Any:
    """The spec's feed; else a file feed, marked in the YAML and in a note as a guess."""
    if src.feed is not None:
        return dict(src.feed)
    out.notes.append(
        f"traefik {src.instance}: its feed is a guess (a file, "
        f"/etc/traefik/dynamic/{src.instance}.yml); Traefik does not say how it is fed: "
        "choose before the first apply"
    )
    return Commented(
        {"type": "file", "path": f"/etc/traefik/dynamic/{src.instance}.yml"}, FEED_GUESS
    )


def _note_handmade(inst: str, handmade: list[tuple[str, str]], out: EdgeResult) -> None:
    """Name each route from a hand-made router, and say what the first apply does to them."""
    handmade.sort()
    for name, from_router in handmade:
        out.routes[f"route/{inst}/{name}"] = from_router
    if handmade:
        out.notes.append(
            f"traefik {inst}: {len(handmade)} route(s) come from routers the controller does not "
            "own ("
            + ", ".join(r for _n, r in handmade)
            + "); the first apply ADDS routers "
            + ", ".join(f"{ROUTER_PREFIX}{n}" for n, _r in handmade)
            + " next to them. Apply, check that Traefik serves the new routers (the plan warns "
            "route-not-served otherwise), then remove the hand-made ones"
        )


def render_edge(edge: EdgeEstate, guests: Sequence[ImportedGuest]) -> EdgeResult:
    """The `velocity` and `traefik` sections for the imported `guests`, and the notes."""
    out = EdgeResult(notes=list(edge.notes))
    by_ip: dict[str, str] = {}
    for g in sorted(guests, key=lambda g: g.name):
        if g.ip:
            by_ip.setdefault(g.ip, g.name)
    if edge.velocity is not None:
        _velocity(edge.velocity, guests, by_ip, out)
    instances: dict[str, Any] = {}
    for read in edge.traefik:
        section = _instance(read, guests, by_ip, out)
        if section is not None:
            instances[read.source.instance] = section
    if instances:
        out.sections["traefik"] = instances
    return out


EDGE_HEADER = (
    "The edge as it was read: Velocity's registrations and the routers Traefik serves.",
    "Velocity registrations are soft state: the first apply finds them registered, nothing to",
    "adopt; those of no imported guest, or whose name is no DNS label, are listed as",
    "unmanaged and never touched.",
    "Routes from routers the controller does not own (not named rc-<route>, the route's name a",
    "DNS label) are NOT adopted: the first apply ADDS a router rc-<route> for each, next to the",
    "hand-made one, both serving the same hosts. Then: apply, check that Traefik serves the",
    "rc- routers (`reconciler plan` warns route-not-served otherwise), and remove the",
    "hand-made routers.",
)
