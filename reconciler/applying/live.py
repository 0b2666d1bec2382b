"""Live runs: connect the providers a spec names, observe everything, plan, apply, and re-plan
when what we saw changed underneath us.

Used by the CLI's live `observe`, `plan` and `apply`, and by the controller's cycle. Guests are
observed first: the firewall provider reads the firewall of the guests found to be ours.

The edge: with `velocity` in the spec, `velocity_provider` talks to the bridge plugin at
`http://<velocity guest's static IP>:<bridge.port>` (or a given URL) with the spec's secret, and
`agent_watch` asks the agents of the guests in the `agent_port` policy's layers (`runtime`
without the policy) at `<guest's static IP>:<policy port>` (or given endpoints: a lab, the
tests, the demo). `observe_all` then fills the observed state's `health`: running from the
guests just observed, ready from their agents; the planner withholds what is not ready. An edge
observer that fails (the bridge down, a wrong secret) costs its own kind only: the message goes
to `ObservedState.errors`, the plan warns, and the rest of the platform converges.
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import anyio
from redis.asyncio import Redis

from reconciler.applying.executor import ApplyReport, Outcome, Progress, execute
from reconciler.loading.graph import guest_ip
from reconciler.model.errors import ConfigurationError, PermanentError, ProviderError
from reconciler.model.observed import GuestHealth, ObservedResource, ObservedState
from reconciler.model.plans import Action, Change, Plan
from reconciler.model.resources import DesiredGraph, Kind, guest_address
from reconciler.model.spec import FileFeed, PlatformSpec, ProxmoxApi, SecretRef
from reconciler.planning.planner import ObservedCheck, make_plan
from reconciler.providers import Observation, Provider
from reconciler.providers.agent import AGENT_PORT, AgentObserver, AgentTarget
from reconciler.providers.firewall import FirewallProvider
from reconciler.providers.proxmox import ProxmoxProvider, connect, read_secret
from reconciler.providers.redisconn import connect_redis
from reconciler.providers.traefik import (
    FileFeedPath,
    RedisFeedClient,
    TraefikProvider,
    TraefikRoutes,
)
from reconciler.providers.velocity import VelocityProvider

# Kinds whose observer may fail without stopping the cycle: the edge is told about guests, so
# the guests (and their firewalls) must converge even while it is down.
_EDGE = frozenset({Kind.VELOCITY, Kind.ROUTE})


def proxmox_endpoint(spec: PlatformSpec, override: ProxmoxApi | None = None) -> ProxmoxApi:
    """The one Proxmox API the spec's hosts use (a cluster answers for all its nodes)."""
    if override is not None:
        return override
    apis = {h.api.url: h.api for h in spec.hosts.values() if h.api is not None}
    if spec.proxmox is not None:
        apis.setdefault(spec.proxmox.url, spec.proxmox)
    if not apis:
        raise ConfigurationError("no Proxmox API in the spec: set 'proxmox' (or a host's 'api')")
    if len(apis) > 1:
        raise ConfigurationError(
            "hosts name more than one Proxmox API (" + ", ".join(sorted(apis)) + "); "
            "one endpoint per platform is supported today: cluster the nodes"
        )
    return next(iter(apis.values()))


def proxmox_provider(
    spec: PlatformSpec, override: ProxmoxApi | None = None, *, insecure: bool = False
) -> ProxmoxProvider:
    api = proxmox_endpoint(spec, override)
    return ProxmoxProvider(
        client=connect(api, insecure=insecure),
        platform=spec.platform.name,
        owner_tag=spec.platform.owner_tag,
        source=api.url,
        wanted_templates=wanted_templates(spec),
    )


def wanted_templates(spec: PlatformSpec) -> dict[str, tuple[str, str]]:
    """Guest address -> (node, template) for every container the spec declares: where the
    guest provider looks for templates when such a guest is still to be created."""
    return {
        guest_address(name): (spec.node_of(guest.host), guest.template)
        for name, guest in sorted(spec.guests.items())
        if guest.kind == "lxc" and guest.template and guest.host in spec.hosts
    }


def firewall_provider(spec: PlatformSpec, guests: ProxmoxProvider) -> FirewallProvider:
    """The firewall on the guests' endpoint, sharing its client and retry policy. The cluster
    options are managed only when the spec declares `firewall.cluster`."""
    return FirewallProvider(pve=guests, manage_cluster=spec.firewall.cluster is not None)


def velocity_provider(
    spec: PlatformSpec, *, url: str | None = None, **options: Any
) -> VelocityProvider | None:
    """The spec's Velocity bridge, or None without `velocity`. `options` go to the provider
    (timeout, retry, sleep, unmanaged)."""
    velocity = spec.velocity
    if velocity is None:
        return None
    if url is None:
        guest = spec.guests.get(velocity.guest)
        ip = guest_ip(guest) if guest is not None else None
        if ip is None:
            raise ConfigurationError(
                f"velocity.guest {velocity.guest!r} has no static IP, so the bridge's URL is "
                "unknown; give the guest a static address"
            )
        url = f"http://{ip}:{velocity.bridge.port}"
    try:
        secret = read_secret(velocity.bridge.secret)
    except ConfigurationError as exc:
        raise ConfigurationError(f"velocity.bridge.secret: {exc}") from None
    options.setdefault("unmanaged", velocity.unmanaged)
    return VelocityProvider(url, secret, **options)


@dataclass
class AgentWatch:
    """Which guests' agents to ask, where, and with what observer."""

    observer: AgentObserver
    endpoints: Mapping[str, tuple[str, int]]  # guest address -> (ip, port)
    layers: tuple[str, ...]  # the layers whose guests run agents: the planner's gate


def agent_layers(spec: PlatformSpec) -> tuple[str, ...]:
    policy = spec.policies.agent_port
    return policy.layers if policy is not None else ("runtime",)


def agent_watch(
    spec: PlatformSpec,
    *,
    endpoints: Mapping[str, tuple[str, int]] | None = None,
    observer: AgentObserver | None = None,
) -> AgentWatch:
    """Every guest of an agent layer, at its static IP and the agent port; `endpoints`
    (guest address -> (ip, port)) overrides some or all of them. A guest without a static IP
    and no override is left out, and the planner treats it as not ready."""
    policy = spec.policies.agent_port
    port = policy.port if policy is not None else AGENT_PORT
    layers = agent_layers(spec)
    found: dict[str, tuple[str, int]] = {}
    for name, guest in sorted(spec.guests.items()):
        if spec.layer_of(name) not in layers:
            continue
        address = guest_address(name)
        ip = guest_ip(guest)
        if endpoints is not None and address in endpoints:
            found[address] = endpoints[address]
        elif ip is not None:
            found[address] = (ip, port)
    return AgentWatch(observer or AgentObserver(), found, layers)


def traefik_routes(
    spec: PlatformSpec,
    *,
    redis: Redis | None = None,
    files: Mapping[str, Path] | None = None,
    apis: Mapping[str, str] | None = None,
) -> TraefikRoutes | None:
    """The spec's Traefik instances, or None without any. A Redis feed uses `redis` (the
    controller's own Redis); `files` (instance -> path) feeds an instance through that file
    instead of what the spec says (a lab, the demo); `apis` overrides instances' API URLs."""
    if not spec.traefik:
        return None
    files, apis = files or {}, apis or {}
    instances: dict[str, TraefikProvider] = {}
    unavailable: dict[str, str] = {}
    for name, inst in sorted(spec.traefik.items()):
        api = apis.get(name, inst.api_url)
        if name in files:
            instances[name] = TraefikProvider(name, FileFeedPath(Path(files[name])), api_url=api)
        elif isinstance(inst.feed, FileFeed):
            instances[name] = TraefikProvider(name, FileFeedPath(Path(inst.feed.path)), api_url=api)
        elif redis is None:
            unavailable[name] = (
                f"feeds from Redis (root key {inst.feed.root_key!r}) but no Redis is configured: "
                "pass --redis-url (or RECONCILER_REDIS_URL)"
            )
        else:
            feed = RedisFeedClient(redis, inst.feed.root_key)
            instances[name] = TraefikProvider(name, feed, api_url=api)
    return TraefikRoutes(instances, unavailable)


def close_client(client: Any) -> None:
    """Close a proxmoxer client's HTTP session (the service reconnects on every revision)."""
    session = getattr(client, "_store", {}).get("session")
    if session is not None:
        with contextlib.suppress(Exception):
            session.close()


@dataclass
class Unavailable:
    """An edge provider that cannot be built as configured (a secret that is not set): its
    kinds fail to observe with the reason, so the plan warns and leaves them out."""

    kinds: frozenset[Kind]
    reason: str
    needs: frozenset[Kind] = frozenset()

    async def observe(self, seen: Observation | None = None) -> list[ObservedResource]:
        raise PermanentError(self.reason)

    async def apply(self, change: Change) -> None:
        raise PermanentError(f"{change.address}: {self.reason}")


@dataclass(frozen=True)
class Endpoints:
    """Where the outside systems are when not where the spec says, and the controller's own
    settings: from the command line (`reconciler.cli.live`), the service, the demo, the tests.
    Secrets are references (environment variable or file), read when connecting."""

    proxmox: ProxmoxApi | None = None
    insecure: bool = False
    edge: bool = True  # Velocity, Traefik and the agents, as the spec declares them
    velocity_url: str | None = None
    agents: Mapping[str, tuple[str, int]] = field(default_factory=dict)  # guest -> (host, port)
    agent_token: SecretRef | None = None
    traefik_files: Mapping[str, Path] = field(default_factory=dict)  # instance -> file
    traefik_apis: Mapping[str, str] = field(default_factory=dict)  # instance -> API URL
    redis_url: str | None = None  # leases, status, agent cache, Traefik's Redis feeds
    redis_password: SecretRef | None = None


@dataclass
class Connection:
    """Everything a live run talks to, for one spec."""

    providers: dict[Kind, Provider]
    agents: AgentWatch | None
    source: str
    redis: Redis | None = None
    # The guests' provider also as itself: the controller's inventory check and edge poll read
    # the inventory in one call (`ProxmoxProvider.inventory`), outside any observation.
    guests: ProxmoxProvider | None = None

    async def observe(self, platform: str) -> ObservedState:
        return await observe_all(self.providers, platform, self.source, self.agents)


@contextlib.asynccontextmanager
async def connect_platform(
    spec: PlatformSpec, endpoints: Endpoints | None = None
) -> AsyncIterator[Connection]:
    """Connect every provider the spec names (the edge too, unless `endpoints.edge` is off),
    and close what needs closing afterwards. Raises ConfigurationError for settings that
    cannot work (no Proxmox API, a secret that is not there)."""
    ep = endpoints or Endpoints()
    guests = proxmox_provider(spec, ep.proxmox, insecure=ep.insecure)
    firewall = firewall_provider(spec, guests)
    providers: dict[Kind, Provider] = {
        Kind.GUEST: guests,
        **dict.fromkeys(firewall.kinds, firewall),
    }
    redis = None
    if ep.redis_url:
        password = read_secret(ep.redis_password) if ep.redis_password else None
        # The one builder of the controller's Redis clients (the lease uses it too): plain,
        # TLS, unix socket or Sentinel URLs, redis-py's own retries off.
        redis = connect_redis(ep.redis_url, password=password)
    agents = None
    try:
        if ep.edge:
            velocity: Provider | None
            try:
                velocity = velocity_provider(spec, url=ep.velocity_url)
            except ConfigurationError as exc:
                # Like an unreachable bridge: Velocity is left out, the rest converges.
                velocity = Unavailable(frozenset({Kind.VELOCITY}), str(exc))
            if velocity is not None:
                providers.update(dict.fromkeys(velocity.kinds, velocity))
            routes = traefik_routes(spec, redis=redis, files=ep.traefik_files, apis=ep.traefik_apis)
            if routes is not None:
                providers.update(dict.fromkeys(routes.kinds, routes))
            if spec.velocity is not None or spec.traefik:
                token = read_secret(ep.agent_token) if ep.agent_token else None
                endpoints_by_address = {guest_address(g): hp for g, hp in ep.agents.items()}
                agents = agent_watch(
                    spec,
                    endpoints=endpoints_by_address,
                    observer=AgentObserver(token=token, redis=redis),
                )
        yield Connection(providers, agents, guests.source, redis, guests)
    finally:
        if redis is not None:
            await redis.aclose()
        close_client(guests.client)


async def observe_health(
    watch: AgentWatch, resources: Iterable[ObservedResource]
) -> dict[str, GuestHealth]:
    """Every watched guest's health: running from the guests observed, ready from its agent.
    Only running guests' agents are asked."""
    guests = {r.address: r for r in resources if r.kind is Kind.GUEST and r.owned and r.address}
    health: dict[str, GuestHealth] = {}
    targets: list[AgentTarget] = []
    for address, (ip, port) in sorted(watch.endpoints.items()):
        guest = guests.get(address)
        if guest is None or "vmid" not in guest.id:
            health[address] = GuestHealth(error="the guest does not exist")
        elif guest.attributes.get("state") != "running":
            health[address] = GuestHealth(error="the guest is stopped")
        else:
            targets.append(AgentTarget(vmid=guest.id["vmid"], address=address, ip=ip, port=port))
    for address, seen in (await watch.observer.observe(targets)).items():
        health[address] = GuestHealth(
            running=True, reachable=seen.reachable, ready=seen.ready, error=seen.last_error
        )
    return dict(sorted(health.items()))


def observation_order(providers: Iterable[Provider]) -> list[Provider]:
    """Each provider once, after the providers of the kinds it `needs`, otherwise in the order
    given. A need nobody here provides is what the caller already knows (the edge poll's
    guests): it does not hold the provider back."""
    pending = list({id(p): p for p in providers}.values())
    provided = {k for p in pending for k in p.kinds}
    ordered: list[Provider] = []
    done: set[Kind] = set()
    while pending:
        ready = next((p for p in pending if not (p.needs & provided) - done - p.kinds), None)
        if ready is None:
            names = sorted(type(p).__name__ for p in pending)
            raise ConfigurationError("providers need each other's kinds: " + ", ".join(names))
        ordered.append(ready)
        done |= ready.kinds
        pending.remove(ready)
    return ordered


async def observe_all(
    providers: Mapping[Kind, Provider],
    platform: str,
    source: str = "",
    agents: AgentWatch | None = None,
    *,
    kinds: Iterable[Kind] | None = None,
    given: Iterable[ObservedResource] = (),
) -> ObservedState:
    """The providers of `kinds` (default: every kind in `providers`) once each, in the order
    of their `needs`, each handed what was seen before it; `given` is what the caller already
    knows (the edge poll's guests, with a fresh power state), seen first but not looked at, so
    its kinds are not in the state's `kinds` and nothing of them is planned. The agent watch
    gets the guests seen. An edge provider's failure is recorded, not raised."""
    seen = Observation(list(given))
    errors: dict[str, str] = {}
    looked = set(providers) if kinds is None else set(kinds) & set(providers)
    order = observation_order(p for k, p in providers.items() if k in looked)
    health: dict[str, GuestHealth] | None = None
    for i, provider in enumerate(order):
        if health is None and not any(Kind.GUEST in p.kinds for p in order[i:]):
            # The agent watch needs the guests, like a provider: asked once they are all seen.
            health = await observe_health(agents, seen.resources) if agents is not None else {}
        try:
            seen.resources.extend(await provider.observe(seen))
        except ProviderError as exc:
            if not provider.kinds <= _EDGE:
                raise
            for kind in sorted(provider.kinds, key=lambda k: k.rank):
                errors[kind.value] = str(exc)
            looked -= provider.kinds
    if health is None:
        health = await observe_health(agents, seen.resources) if agents is not None else {}
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat()
    return ObservedState(
        platform=platform,
        observed_at=now.replace("+00:00", "Z"),
        source=source,
        kinds=tuple(sorted(looked, key=lambda k: k.rank)),
        resources=tuple(seen.resources),
        health=health,
        errors=errors,
        serving=seen.serving,
        cluster=seen.cluster,
    )


@dataclass
class Round:
    plan: Plan
    report: ApplyReport | None = None
    observed: ObservedState | None = None  # what the plan was made from
    # Why another round followed: "conflict" (re-plan after a stale digest or a vmid race),
    # "migrated" (re-verify what follows a moved guest); "" when this round was the last.
    again: str = ""


@dataclass
class Convergence:
    rounds: list[Round] = field(default_factory=list)

    def again(self) -> str:
        """For people: why it observed and planned more than once ("" when it did not)."""
        why = {"conflict": "after a conflict", "migrated": "to re-verify a migrated guest"}
        reasons = [why[r.again] for r in self.rounds if r.again]
        if not reasons:
            return ""
        return f"observed and planned again {len(reasons)} time(s): " + ", ".join(
            dict.fromkeys(reasons)
        )

    @property
    def ok(self) -> bool:
        if not self.rounds:
            return False
        last = self.rounds[-1]
        return not last.plan.errored and (last.report is None or last.report.ok)


async def converge(
    graph: DesiredGraph,
    providers: Mapping[Kind, Provider],
    *,
    source: str = "",
    allow_destroy: bool = False,
    targets: Iterable[str] = (),
    dry_run: bool = False,
    max_rounds: int = 3,
    approve: Callable[[Plan], bool] = lambda _plan: True,
    progress: Progress | None = None,
    observed_checks: Iterable[ObservedCheck] = (),
    agents: AgentWatch | None = None,
    guard: Callable[[], Awaitable[object]] | None = None,
    stop: anyio.Event | None = None,
    exclude: Callable[[Plan], Plan] | None = None,
    kinds: Iterable[Kind] | None = None,
    given: Iterable[ObservedResource] = (),
) -> Convergence:
    """Observe, plan, apply; when a change met a conflict (a stale digest, a vmid taken in a
    race), or a guest was migrated (its firewall, Velocity registration and routes are
    re-verified on its new node), observe and plan again, up to `max_rounds` times. `guard`,
    `stop`: see `applying.executor.execute`; `exclude` trims a plan before it is applied (the
    service leaves out resources waiting out a backoff).

    The one path of every run: the full cycle, `apply [--target]` and the demo look at every
    kind; the edge poll passes `kinds` (only those are observed, planned and applied: a kind
    not looked at is never deleted) and `given` (what it already knows; see `observe_all`)."""
    result = Convergence()
    targets = tuple(targets)
    checks = tuple(observed_checks)
    only = frozenset(kinds) if kinds is not None else None
    known = tuple(given)
    for _ in range(max_rounds):
        observed = await observe_all(
            providers, graph.platform, source, agents, kinds=only, given=known
        )
        plan = make_plan(
            graph,
            observed,
            allow_destroy=allow_destroy,
            targets=targets,
            observed_checks=checks,
            agent_layers=agents.layers if agents is not None else (),
        )
        if only is not None:  # and whatever the plan holds besides: those kinds alone
            plan = replace(plan, changes=tuple(c for c in plan.changes if c.kind in only))
        round_ = Round(plan, observed=observed)
        result.rounds.append(round_)
        if exclude is not None:
            plan = exclude(plan)
        if plan.errored or not plan.has_changes or not approve(plan):
            break
        if stop is not None and stop.is_set():
            break
        round_.report = await execute(
            plan, providers, dry_run=dry_run, progress=progress, guard=guard, stop=stop
        )
        if dry_run:
            break
        if round_.report.needs_replan:
            round_.again = "conflict"
        elif _migrated(round_.report):
            round_.again = "migrated"
        else:
            break
    return result


def _migrated(report: ApplyReport) -> bool:
    """Did a guest move? What was observed before the move (where its firewall is, which
    address Velocity and the routes reach) is stale, so the caller looks again."""
    return any(
        r.outcome is Outcome.DONE and r.change.action is Action.MIGRATE for r in report.results
    )
