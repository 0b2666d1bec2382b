"""Connecting: from a spec and the endpoints that override it to the providers of a live run,
the registry of providers. Adding a kind is writing its provider and registering it here, in
`connect_platform`; nothing downstream branches on a provider's class.

Used by the CLI's live `observe`, `plan` and `apply`, the controller's service, the demo and
the tests. The connection is then handed to `applying.observing` and `applying.converging`,
which see the providers only through `reconciler.providers.Provider`.

The edge: with `velocity` in the spec, `velocity_provider` talks to the bridge plugin at
`http://<velocity guest's static IP>:<bridge.port>` (or a given URL) with the spec's secret;
`traefik_routes` writes each Traefik instance's feed; `agent_health_provider` asks the agents
of the guests in the `agent_port` policy's layers (`runtime` without the policy) at
`<guest's static IP>:<policy port>` (or given endpoints: a lab, the tests, the demo). All three
are `optional` providers: one that fails (the bridge down, a wrong secret) costs what it
provides only. An edge provider that cannot even be built as configured (a secret that is not
set) is registered as `Unavailable`, which fails to observe with the reason, alike.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from reconciler.applying.observing import observe_all
from reconciler.loading.graph import guest_ip
from reconciler.model.errors import ConfigurationError, PermanentError
from reconciler.model.observed import ObservedResource, ObservedState
from reconciler.model.plans import Change
from reconciler.model.resources import Kind, guest_address
from reconciler.model.spec import FileFeed, PlatformSpec, ProxmoxApi, SecretRef
from reconciler.providers import Observation, Provider
from reconciler.providers.firewall import FirewallProvider
from reconciler.providers.proxmox import ProxmoxProvider, connect
from reconciler.providers.proxmox_backup import BackupJobProvider
from reconciler.providers.proxmox_ha import HaProvider
from reconciler.providers.proxmox_notifications import notification_providers
from reconciler.providers.proxmox_pools import PoolProvider
from reconciler.providers.proxmox_templates import TemplateProvider, template_files
from reconciler.providers.secrets import read_secret

# The edge's modules (and Redis, httpx) are imported when a spec has an edge: a plan of the
# guests alone starts without them (issue 16: the CLI's fixed cost).
if TYPE_CHECKING:
    from redis.asyncio import Redis

    from reconciler.providers.agent import AgentHealthProvider, AgentObserver
    from reconciler.providers.traefik import TraefikRoutes
    from reconciler.providers.velocity import VelocityProvider


@dataclass(frozen=True)
class ProxmoxOverride:
    """The `--proxmox-*` and `--ca-file` flags, as given (None: not given). They override the
    spec's API field by field (`merge_endpoint`): a flag replaces its field, the rest stays the
    spec's. Secrets are references, read when connecting."""

    url: str | None = None
    user: str | None = None
    password: SecretRef | None = None  # --proxmox-password-env
    token_id: str | None = None
    token_secret: SecretRef | None = None  # --proxmox-token-env
    ca_file: str | None = None


# Without a `proxmox` section, what the flags leave out (the lab's fakepve takes these).
DEFAULT_USER = "root@pam"
DEFAULT_PASSWORD = SecretRef(env="PVE_PASSWORD")
DEFAULT_TOKEN_SECRET = SecretRef(env="PVE_TOKEN_SECRET")


def merge_endpoint(
    base: ProxmoxApi | None, flags: ProxmoxOverride, environ: Mapping[str, str] | None = None
) -> ProxmoxApi:
    """The spec's API (`base`, None without one) with the flags over it, field by field: each
    flag given replaces its field, every other field stays the spec's. A password flag or a
    token flag also says which kind of credential is used (the other kind's fields are
    dropped); a token flag takes the id or the secret it leaves out from the spec. Without a
    spec's API, the flags must give the URL, and a credential (or $PVE_PASSWORD must be set:
    `environ`, the process's by default); the user defaults to root@pam. A flag that cannot
    apply is a ConfigurationError naming it."""
    env = os.environ if environ is None else environ
    token_given = flags.token_id is not None or flags.token_secret is not None
    if flags.password is not None and token_given:
        token = "--proxmox-token-id" if flags.token_id is not None else "--proxmox-token-env"
        raise ConfigurationError(
            f"--proxmox-password-env and {token}: give a password or an API token, not both"
        )
    if flags.url is not None and not flags.url.startswith(("https://", "http://")):
        raise ConfigurationError(f"--proxmox-url {flags.url}: must start with https://")
    url = flags.url or (base.url if base is not None else None)
    if url is None:
        raise ConfigurationError(
            f"{', '.join(_given(flags))}: no Proxmox API to apply to: without a 'proxmox' "
            "section in the spec (or a host's 'api'), give --proxmox-url too"
        )
    fields: dict[str, Any] = {
        "url": url,
        "user": flags.user or (base.user if base is not None else DEFAULT_USER),
        "ca_file": flags.ca_file or (base.ca_file if base is not None else None),
        # --ca-file asks for verification with that CA, whatever the spec's verify_tls says.
        "verify_tls": True if flags.ca_file or base is None else base.verify_tls,
    }
    if base is not None:
        fields["max_concurrency"] = base.max_concurrency
    if flags.password is not None:
        fields["password"] = flags.password
    elif token_given:
        token_id = flags.token_id or (base.token_id if base is not None else None)
        if token_id is None:
            spec_has = "" if base is None else " (the spec's proxmox section uses a password)"
            raise ConfigurationError(
                f"--proxmox-token-env: no API token to use it with{spec_has}: give "
                "--proxmox-token-id too"
            )
        fields["token_id"] = token_id
        spec_secret = base.token_secret if base is not None else None
        fields["token_secret"] = flags.token_secret or spec_secret or DEFAULT_TOKEN_SECRET
    elif base is not None:
        fields.update(token_id=base.token_id, token_secret=base.token_secret)
        fields["password"] = base.password
    elif DEFAULT_PASSWORD.env in env:
        fields["password"] = DEFAULT_PASSWORD
    else:
        raise ConfigurationError(
            f"--proxmox-url {url}: no credential: without a 'proxmox' section in the spec, give "
            "--proxmox-password-env VAR, or --proxmox-token-id NAME with --proxmox-token-env "
            f"VAR (or set {DEFAULT_PASSWORD.env})"
        )
    try:
        return ProxmoxApi.model_validate(fields)
    except ValidationError as exc:  # a value only a flag can have brought
        why = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
        raise ConfigurationError(f"the connection flags: {why}") from None


def _given(flags: ProxmoxOverride) -> list[str]:
    """The flags an override was made of, by name, for messages."""
    names = {
        "url": "--proxmox-url",
        "user": "--proxmox-user",
        "password": "--proxmox-password-env",
        "token_id": "--proxmox-token-id",
        "token_secret": "--proxmox-token-env",
        "ca_file": "--ca-file",
    }
    return [flag for name, flag in names.items() if getattr(flags, name) is not None]


def proxmox_endpoint(
    spec: PlatformSpec, override: ProxmoxApi | ProxmoxOverride | None = None
) -> ProxmoxApi:
    """The one Proxmox API the spec's hosts use (a cluster answers for all its nodes), with the
    flags over it (`merge_endpoint`); an API given whole (the demo, the tests) replaces it."""
    if isinstance(override, ProxmoxApi):
        return override
    apis = {h.api.url: h.api for h in spec.hosts.values() if h.api is not None}
    if spec.proxmox is not None:
        apis.setdefault(spec.proxmox.url, spec.proxmox)
    if len(apis) > 1:
        raise ConfigurationError(
            "hosts name more than one Proxmox API (" + ", ".join(sorted(apis)) + "); "
            "one endpoint per platform is supported today: cluster the nodes"
        )
    base = next(iter(apis.values()), None)
    if override is not None:
        return merge_endpoint(base, override)
    if base is None:
        raise ConfigurationError("no Proxmox API in the spec: set 'proxmox' (or a host's 'api')")
    return base


def proxmox_provider(
    spec: PlatformSpec,
    override: ProxmoxApi | ProxmoxOverride | None = None,
    *,
    insecure: bool = False,
    max_concurrency: int | None = None,
) -> ProxmoxProvider:
    """The guests' provider on the spec's API (or `override`); its calls in flight bounded by
    `max_concurrency` (--proxmox-max-concurrency) when given, else the API's own setting."""
    api = proxmox_endpoint(spec, override)
    return ProxmoxProvider(
        client=connect(api, insecure=insecure),
        platform=spec.platform.name,
        owner_tag=spec.platform.owner_tag,
        source=api.url,
        concurrency=max_concurrency or api.max_concurrency,
        wanted_templates=wanted_templates(spec),
        wanted_clones=wanted_clones(spec),
    )


def wanted_templates(spec: PlatformSpec) -> dict[str, tuple[str, str]]:
    """Guest address -> (node, template) for every container the spec declares: where the
    guest provider looks for templates when such a guest is still to be created."""
    return {
        guest_address(name): (spec.node_of(guest.host), guest.template)
        for name, guest in sorted(spec.guests.items())
        if guest.kind == "lxc" and guest.template and guest.host in spec.hosts
    }


def wanted_clones(spec: PlatformSpec) -> frozenset[str]:
    """The names of the guests the spec makes by cloning: a clone cut off before it was
    configured carries its template's tags, not ours, and is found by its name and mark."""
    return frozenset(g.hostname or name for name, g in spec.guests.items() if g.clone)


def firewall_provider(spec: PlatformSpec, guests: ProxmoxProvider) -> FirewallProvider:
    """The firewall on the guests' endpoint, sharing its client and retry policy. The cluster
    options are managed only when the spec declares `firewall.cluster`."""
    return FirewallProvider(pve=guests, manage_cluster=spec.firewall.cluster is not None)


def backup_provider(spec: PlatformSpec, guests: ProxmoxProvider) -> BackupJobProvider:
    """The spec's backup jobs, and the backups on the storages they write to, on the guests'
    endpoint. Registered only when the spec declares jobs: a platform without them is not
    asked for privileges it never needs (reading jobs takes Sys.Audit on /)."""
    return BackupJobProvider(
        pve=guests, storages=frozenset(j.storage for j in spec.backups.values())
    )


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
    from reconciler.providers.velocity import VelocityProvider

    return VelocityProvider(url, secret, **options)


def agent_layers(spec: PlatformSpec) -> tuple[str, ...]:
    """The layers whose guests run agents: the planner's readiness gate."""
    policy = spec.policies.agent_port
    return policy.layers if policy is not None else ("runtime",)


def agent_health_provider(
    spec: PlatformSpec,
    *,
    endpoints: Mapping[str, tuple[str, int]] | None = None,
    observer: AgentObserver | None = None,
) -> AgentHealthProvider:
    """The agents of every guest of an agent layer, at its static IP and the agent port;
    `endpoints` (guest address -> (ip, port)) overrides some or all of them. A VM with the
    guest agent (`agent: true`) and no static IP is asked at the address its agent reports; any
    other guest without a static IP and no override is left out, and the planner treats it as
    not ready."""
    from reconciler.providers.agent import AGENT_PORT, AgentHealthProvider, AgentObserver

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
        elif guest.kind == "qemu" and guest.agent:
            found[address] = ("", port)  # a DHCP VM: at the address its guest agent reports
    return AgentHealthProvider(observer or AgentObserver(), found, layers)


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
    from reconciler.providers.traefik import (
        FileFeedPath,
        RedisFeedClient,
        TraefikProvider,
        TraefikRoutes,
    )

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
    streams: frozenset[Kind] = frozenset()
    optional = True  # like an unreachable bridge: left out, the rest converges

    async def observe(self, seen: Observation | None = None) -> list[ObservedResource]:
        raise PermanentError(self.reason)

    async def apply(self, change: Change) -> None:
        raise PermanentError(f"{change.address}: {self.reason}")


@dataclass(frozen=True)
class Endpoints:
    """Where the outside systems are when not where the spec says, and the controller's own
    settings: from the command line (`reconciler.cli.live`), the service, the demo, the tests.
    Secrets are references (environment variable or file), read when connecting."""

    proxmox: ProxmoxApi | ProxmoxOverride | None = None  # an override: the flags, field by field
    insecure: bool = False
    proxmox_max_concurrency: int | None = None  # over the API's `max_concurrency`
    edge: bool = True  # Velocity, Traefik and the agents, as the spec declares them
    velocity_url: str | None = None
    agents: Mapping[str, tuple[str, int]] = field(default_factory=dict)  # guest -> (host, port)
    agent_token: SecretRef | None = None
    traefik_files: Mapping[str, Path] = field(default_factory=dict)  # instance -> file
    traefik_apis: Mapping[str, str] = field(default_factory=dict)  # instance -> API URL
    dns_servers: Mapping[str, str] = field(default_factory=dict)  # zone -> host:port
    redis_url: str | None = None  # leases, status, agent cache, Traefik's Redis feeds
    redis_password: SecretRef | None = None


@dataclass
class Connection:
    """Everything a live run talks to, for one spec: the registry of providers (each once, in
    the order registered; `applying.observing` orders them by their `needs`)."""

    providers: tuple[Provider, ...]
    source: str
    redis: Redis | None = None
    # The guests' provider also as itself: the controller's inventory check and edge poll read
    # the inventory in one call (`ProxmoxProvider.inventory`), outside any observation.
    guests: ProxmoxProvider | None = None
    # The layers whose guests' agents are asked (the planner's readiness gate, `make_plan`'s
    # `agent_layers`); empty when no agents are (the edge off, or no edge in the spec).
    agent_layers: tuple[str, ...] = ()

    @property
    def kinds(self) -> frozenset[Kind]:
        return frozenset(k for p in self.providers for k in p.kinds)

    async def observe(self, platform: str) -> ObservedState:
        return await observe_all(self.providers, platform, self.source)


@contextlib.asynccontextmanager
async def connect_platform(
    spec: PlatformSpec, endpoints: Endpoints | None = None
) -> AsyncIterator[Connection]:
    """Connect every provider the spec names (the edge too, unless `endpoints.edge` is off),
    and close what needs closing afterwards. Raises ConfigurationError for settings that
    cannot work (no Proxmox API, a secret that is not there)."""
    ep = endpoints or Endpoints()
    guests = proxmox_provider(
        spec, ep.proxmox, insecure=ep.insecure, max_concurrency=ep.proxmox_max_concurrency
    )
    providers: list[Provider] = [guests, firewall_provider(spec, guests), HaProvider(pve=guests)]
    if spec.pools:
        providers.append(PoolProvider(pve=guests))
    if spec.backups:
        providers.append(backup_provider(spec, guests))
    providers += notification_providers(spec, guests)  # PVE's own notification targets
    if spec.templates:
        providers.append(TemplateProvider(pve=guests, files=template_files(spec)))
    if spec.dns is not None:  # dnspython is imported for a spec with zones only
        from reconciler.providers.dns import dns_provider

        providers.append(dns_provider(spec, servers=ep.dns_servers, secrets=read_secret))
    redis = None
    if ep.redis_url:
        from reconciler.providers.redisconn import connect_redis

        password = read_secret(ep.redis_password) if ep.redis_password else None
        # The one builder of the controller's Redis clients (the lease uses it too): plain,
        # TLS, unix socket or Sentinel URLs, redis-py's own retries off.
        redis = connect_redis(ep.redis_url, password=password)
    layers: tuple[str, ...] = ()
    try:
        if ep.edge and (spec.velocity is not None or spec.traefik):
            providers += edge_providers(spec, ep, redis)
            # The agents' health gates what the edge is told: asked whenever there is an edge.
            from reconciler.providers.agent import AgentObserver

            token = read_secret(ep.agent_token) if ep.agent_token else None
            agents = agent_health_provider(
                spec,
                endpoints={guest_address(g): hp for g, hp in ep.agents.items()},
                observer=AgentObserver(token=token, redis=redis),
            )
            providers.append(agents)
            layers = agents.layers  # the planner gates these layers' guests on `health`
        yield Connection(tuple(providers), guests.source, redis, guests, layers)
    finally:
        if redis is not None:
            await redis.aclose()
        close_client(guests.client)


def edge_providers(spec: PlatformSpec, ep: Endpoints, redis: Redis | None) -> list[Provider]:
    """The edge's providers the spec declares: Velocity (or why it cannot be reached) and the
    Traefik instances."""
    providers: list[Provider] = []
    try:
        velocity: Provider | None = velocity_provider(spec, url=ep.velocity_url)
    except ConfigurationError as exc:
        # Like an unreachable bridge: Velocity is left out, the rest converges.
        velocity = Unavailable(frozenset({Kind.VELOCITY}), str(exc))
    if velocity is not None:
        providers.append(velocity)
    routes = traefik_routes(spec, redis=redis, files=ep.traefik_files, apis=ep.traefik_apis)
    if routes is not None:
        providers.append(routes)
    return providers
