"""Live commands: `observe`, live `plan`, and `apply`, against a real (or fake) Proxmox VE.

Connection settings come from the spec (`proxmox:` or a host's `api:`); the `--proxmox-*` flags
override them, for a lab or for pointing the example platform at fakepve.

`--edge` adds the edge the spec declares: Velocity registrations through the bridge plugin
(`--velocity-url` overrides the URL derived from the Velocity guest's IP) and the agents' health
that gates them. It is opt-in while the Traefik provider is being written; it will become the
default once the whole edge is observed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TextIO

import anyio

from reconciler.applying.executor import Outcome, Progress, Result, execute
from reconciler.applying.live import (
    AgentWatch,
    agent_watch,
    converge,
    firewall_provider,
    observe_all,
    proxmox_provider,
    velocity_provider,
)
from reconciler.cli import render
from reconciler.loading.graph import build_graph
from reconciler.loading.loader import load_directory
from reconciler.model.errors import ReconcilerError
from reconciler.model.observed import ObservedState
from reconciler.model.plans import Plan, plan_from_json
from reconciler.model.resources import DesiredGraph, Kind
from reconciler.model.spec import PlatformSpec, ProxmoxApi, SecretRef
from reconciler.planning.observed_policies import live_isolation
from reconciler.planning.planner import make_plan
from reconciler.providers import Provider

EXIT_OK, EXIT_ERROR, EXIT_CHANGES = 0, 1, 2


def add_connection_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Proxmox connection (overrides the spec)")
    g.add_argument("--proxmox-url", metavar="URL")
    g.add_argument("--proxmox-user", metavar="USER", default="root@pam")
    g.add_argument(
        "--proxmox-password-env", metavar="VAR", help="environment variable holding the password"
    )
    g.add_argument("--proxmox-token-id", metavar="NAME")
    g.add_argument(
        "--proxmox-token-env",
        metavar="VAR",
        help="environment variable holding the API token secret",
    )
    g.add_argument("--ca-file", metavar="FILE", help="CA bundle to verify Proxmox's TLS")
    g.add_argument(
        "--insecure", action="store_true", help="do not verify TLS (labs only; prints a warning)"
    )
    e = p.add_argument_group("the edge")
    e.add_argument(
        "--edge",
        action="store_true",
        help="also observe and apply Velocity registrations, gated by the agents' health",
    )
    e.add_argument("--velocity-url", metavar="URL", help="the Velocity bridge (with --edge)")


def connection_override(args: argparse.Namespace) -> ProxmoxApi | None:
    if not args.proxmox_url:
        return None
    if args.proxmox_token_id:
        return ProxmoxApi(
            url=args.proxmox_url,
            user=args.proxmox_user,
            token_id=args.proxmox_token_id,
            token_secret=SecretRef(env=args.proxmox_token_env or "PVE_TOKEN_SECRET"),
            ca_file=args.ca_file,
        )
    return ProxmoxApi(
        url=args.proxmox_url,
        user=args.proxmox_user,
        password=SecretRef(env=args.proxmox_password_env or "PVE_PASSWORD"),
        ca_file=args.ca_file,
    )


def load_checked(directory: str, err: TextIO) -> tuple[PlatformSpec, DesiredGraph] | None:
    result = load_directory(directory)
    if not result.ok or result.spec is None:
        err.write(render.render_diagnostics(result.diagnostics))
        err.write(f"{directory}: the specs do not validate; nothing done\n")
        return None
    return result.spec, build_graph(result.spec, result.source)


def providers_for(
    spec: PlatformSpec, args: argparse.Namespace, err: TextIO
) -> dict[Kind, Provider]:
    if args.insecure:
        err.write(
            "warning: TLS verification of the Proxmox API is OFF (--insecure); "
            "anyone on the path can read the credentials\n"
        )
    provider = proxmox_provider(spec, connection_override(args), insecure=args.insecure)
    firewall = firewall_provider(spec, provider)
    providers: dict[Kind, Provider] = {
        Kind.GUEST: provider,
        **dict.fromkeys(firewall.kinds, firewall),
    }
    if getattr(args, "edge", False):
        velocity = velocity_provider(spec, url=args.velocity_url)
        if velocity is not None:
            providers.update(dict.fromkeys(velocity.kinds, velocity))
    return providers


def agents_for(spec: PlatformSpec, args: argparse.Namespace) -> AgentWatch | None:
    """The agents whose health gates the edge, with --edge and a spec that has one."""
    if not getattr(args, "edge", False) or spec.velocity is None:
        return None
    return agent_watch(spec)


async def _observe(
    spec: PlatformSpec, providers: dict[Kind, Provider], agents: AgentWatch | None = None
) -> ObservedState:
    source = next(iter(providers.values())).source if providers else ""  # type: ignore[attr-defined]
    return await observe_all(providers, spec.platform.name, source, agents)


def observe_live(args: argparse.Namespace, spec: PlatformSpec, err: TextIO) -> ObservedState:
    providers = providers_for(spec, args, err)
    return anyio.run(_observe, spec, providers, agents_for(spec, args))


def cmd_observe(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    loaded = load_checked(args.dir, err)
    if loaded is None:
        return EXIT_ERROR
    spec, _ = loaded
    try:
        state = observe_live(args, spec, err)
    except ReconcilerError as exc:
        err.write(f"error: {exc}\n")
        return EXIT_ERROR
    text = state.model_dump_json(indent=1) + "\n"
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
        owned = sum(1 for r in state.resources if r.owned)
        err.write(f"observed {len(state.resources)} resources ({owned} owned) -> {args.out}\n")
    else:
        out.write(text)
    return EXIT_OK


def _progress(err: TextIO) -> Progress:
    def show(result: Result, done: int, total: int) -> None:
        c = result.change
        line = f"[{done}/{total}] {c.action.symbol} {c.address}: {result.outcome.value}"
        if result.seconds >= 0.05:
            line += f" ({result.seconds:.1f} s)"
        if result.error:
            line += f"\n        {result.error}"
        err.write(line + "\n")
        err.flush()

    return show


def _confirm(plan: Plan, args: argparse.Namespace, err: TextIO) -> bool:
    if args.auto_approve or args.dry_run:
        return True
    if not sys.stdin.isatty():
        err.write("apply needs confirmation: run it in a terminal or pass --auto-approve\n")
        return False
    err.write("Apply these changes? Only 'yes' is accepted: ")
    err.flush()
    return sys.stdin.readline().strip() == "yes"


def cmd_apply(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    loaded = load_checked(args.dir, err)
    if loaded is None:
        return EXIT_ERROR
    spec, graph = loaded
    color = render.use_color(getattr(args, "color", "auto"), out)
    try:
        providers = providers_for(spec, args, err)
        if args.plan:
            return _apply_saved(args, spec, providers, out, err)

        def approve(plan: Plan) -> bool:
            out.write(render.render_text(plan, color=color))
            out.flush()
            return _confirm(plan, args, err)

        result = anyio.run(
            lambda: converge(
                graph,
                providers,
                source=getattr(providers[Kind.GUEST], "source", ""),
                allow_destroy=args.allow_destroy,
                targets=args.target,
                dry_run=args.dry_run,
                approve=approve,
                progress=_progress(err),
                observed_checks=[live_isolation(spec)],
                agents=agents_for(spec, args),
            )
        )
    except ReconcilerError as exc:
        err.write(f"error: {exc}\n")
        return EXIT_ERROR
    last = result.rounds[-1]
    if last.plan.errored:
        return EXIT_ERROR
    if len(result.rounds) > 1:
        err.write(f"re-planned {len(result.rounds) - 1} time(s) after conflicts\n")
    return _summarize(result.rounds[-1].report, out)


def _summarize(report: object, out: TextIO) -> int:
    if report is None:
        return EXIT_OK
    from reconciler.applying.executor import ApplyReport

    assert isinstance(report, ApplyReport)
    done, failed = report.count(Outcome.DONE), report.count(Outcome.FAILED)
    skipped, dry = report.count(Outcome.SKIPPED), report.count(Outcome.DRY_RUN)
    out.write(
        f"Apply: {done} done, {failed} failed, {skipped} skipped"
        + (f", {dry} dry-run" if dry else "")
        + ".\n"
    )
    for r in report.results:
        if r.outcome in (Outcome.FAILED, Outcome.SKIPPED):
            out.write(f"  {r.outcome.value}: {r.change.address}: {r.error}\n")
    if failed or skipped:
        out.write(
            "Nothing is left half-done that a new run cannot finish: run apply again "
            "once the cause is fixed.\n"
        )
    return EXIT_OK if report.ok else EXIT_ERROR


def _apply_saved(
    args: argparse.Namespace,
    spec: PlatformSpec,
    providers: dict[Kind, Provider],
    out: TextIO,
    err: TextIO,
) -> int:
    try:
        plan = plan_from_json(json.loads(Path(args.plan).read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError) as exc:
        err.write(f"{args.plan}: not a saved plan: {exc}\n")
        return EXIT_ERROR
    if plan.platform != spec.platform.name:
        err.write(
            f"{args.plan} is a plan for platform {plan.platform!r}, not {spec.platform.name!r}\n"
        )
        return EXIT_ERROR
    observed = anyio.run(_observe, spec, providers, agents_for(spec, args))
    if observed.digest() != plan.observed_digest:
        err.write(
            f"{args.plan}: the platform changed since this plan was made "
            f"({plan.observed_digest[:19]} then, {observed.digest()[:19]} now); "
            "make a new plan\n"
        )
        return EXIT_ERROR
    if plan.errored:
        err.write(f"{args.plan} has errors; it cannot be applied\n")
        return EXIT_ERROR
    report = anyio.run(
        lambda: execute(plan, providers, dry_run=args.dry_run, progress=_progress(err))
    )
    return _summarize(report, out)


def live_plan(
    args: argparse.Namespace, spec: PlatformSpec, graph: DesiredGraph, err: TextIO
) -> Plan | None:
    agents = agents_for(spec, args)
    try:
        providers = providers_for(spec, args, err)
        observed = anyio.run(_observe, spec, providers, agents)
    except ReconcilerError as exc:
        err.write(f"error: {exc}\n")
        return None
    return make_plan(
        graph,
        observed,
        allow_destroy=args.allow_destroy,
        targets=args.target,
        observed_checks=[live_isolation(spec)],
        agent_layers=agents.layers if agents is not None else (),
    )
