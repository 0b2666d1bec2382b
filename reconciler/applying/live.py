"""Live runs: connect the providers a spec names, observe everything, plan, apply, and re-plan
when what we saw changed underneath us.

Used by the CLI's live `observe`, `plan` and `apply`, and by the controller's cycle. Guests are
observed first: the firewall provider reads the firewall of the guests found to be ours.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from reconciler.applying.executor import ApplyReport, Progress, execute
from reconciler.model.errors import ConfigurationError
from reconciler.model.observed import ObservedResource, ObservedState
from reconciler.model.plans import Plan
from reconciler.model.resources import DesiredGraph, Kind
from reconciler.model.spec import PlatformSpec, ProxmoxApi
from reconciler.planning.planner import ObservedCheck, make_plan
from reconciler.providers import Provider
from reconciler.providers.firewall import FirewallProvider
from reconciler.providers.proxmox import ProxmoxProvider, connect


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
    )


def firewall_provider(spec: PlatformSpec, guests: ProxmoxProvider) -> FirewallProvider:
    """The firewall on the guests' endpoint, sharing its client and retry policy. The cluster
    options are managed only when the spec declares `firewall.cluster`."""
    return FirewallProvider(pve=guests, manage_cluster=spec.firewall.cluster is not None)


async def observe_all(
    providers: Mapping[Kind, Provider], platform: str, source: str = ""
) -> ObservedState:
    """Every provider once, guest providers first; a firewall provider gets the guests seen."""
    resources: list[ObservedResource] = []
    unique = list({id(p): p for p in providers.values()}.values())
    unique.sort(key=lambda p: Kind.GUEST not in p.kinds)
    for provider in unique:
        if isinstance(provider, FirewallProvider):
            guests = [r for r in resources if r.kind is Kind.GUEST]
            resources.extend(await provider.observe(guests))
        else:
            resources.extend(await provider.observe())
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat()
    return ObservedState(
        platform=platform,
        observed_at=now.replace("+00:00", "Z"),
        source=source,
        kinds=tuple(sorted(providers, key=lambda k: k.rank)),
        resources=tuple(resources),
    )


@dataclass
class Round:
    plan: Plan
    report: ApplyReport | None = None


@dataclass
class Convergence:
    rounds: list[Round] = field(default_factory=list)

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
) -> Convergence:
    """Observe, plan, apply; when a change met a conflict (a stale digest, a vmid taken in a
    race), observe and plan again, up to `max_rounds` times."""
    result = Convergence()
    targets = tuple(targets)
    checks = tuple(observed_checks)
    for _ in range(max_rounds):
        observed = await observe_all(providers, graph.platform, source)
        plan = make_plan(
            graph, observed, allow_destroy=allow_destroy, targets=targets, observed_checks=checks
        )
        round_ = Round(plan)
        result.rounds.append(round_)
        if plan.errored or not plan.has_changes or not approve(plan):
            break
        round_.report = await execute(plan, providers, dry_run=dry_run, progress=progress)
        if dry_run or not round_.report.needs_replan:
            break
    return result
