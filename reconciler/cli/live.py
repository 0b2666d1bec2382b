"""Live commands: `observe`, live `plan`, and `apply`, against a real (or fake) Proxmox VE.

Connection settings come from the spec (`proxmox:` or a host's `api:`); the `--proxmox-*` and
`--ca-file` flags override them field by field, for a lab or for pointing the example platform
at fakepve (`connection_override`; merged in `applying.connecting.merge_endpoint`).

The edge the spec declares is observed and applied too: Velocity registrations through the
bridge plugin, Traefik routes through each instance's feed (and what Traefik serves, through its
API), gated by the agents' health. `--no-edge` leaves it out. Its endpoints come from the spec
(the guests' static IPs); the `--velocity-url`, `--agent`, `--traefik-file` and `--traefik-api`
flags point them elsewhere (a lab, the demo). A Redis feed needs the controller's Redis
(`--redis-url`, or RECONCILER_REDIS_URL), which also caches the agents' health for the API.

Every command's parser is built from this module (`add_connection_args`, `spec_dir_args`,
`color_arg`), so importing it costs only the standard library and the model's plain data: the
live clients (anyio, Redis, the providers), loading and planning are imported in the functions
that use them (issue 16).

`apply` shows the plan and asks (a terminal, or `--auto-approve`); not confirmed, it says
"Apply cancelled." and exits 1. `--format json` prints the `reconciler/apply` document instead
(`render.APPLY_JSON`). A `--target` that names no resource, desired or observed, is an error
with the nearest addresses (`target_error`), before anything is changed.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import functools
import json
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeAlias, TypeVar

from reconciler.cli import render
from reconciler.model.diagnostics import Severity
from reconciler.model.errors import ConfigurationError, ReconcilerError, first_error
from reconciler.model.plans import Plan, plan_from_json, shown_address
from reconciler.model.resources import DesiredGraph

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from reconciler.applying.connecting import Connection, Endpoints, ProxmoxOverride
    from reconciler.applying.converging import Convergence
    from reconciler.applying.executor import Progress, Result
    from reconciler.model.observed import ObservedState
    from reconciler.model.spec import PlatformSpec, ProxmoxApi

EXIT_OK, EXIT_ERROR, EXIT_CHANGES = 0, 1, 2

T = TypeVar("T")


def run_async(fn: Callable[[], Awaitable[T]]) -> T:
    """`anyio.run` for every command. Concurrent work (anyio task groups) fails with an
    ExceptionGroup; one made only of our errors is raised as its first, so that the command
    reports one line (the call, the status, what is missing) and exits 1, no traceback."""
    import anyio

    try:
        return anyio.run(fn)
    except BaseExceptionGroup as group:
        error = first_error(group)
        if error is None:
            raise
        raise error from None


def repeatable(
    p: argparse.ArgumentParser | argparse._ArgumentGroup, flag: str, metavar: str, help: str
) -> None:
    """A flag that may be given again and again: a list, empty when it is not given (for the
    NAME=VALUE ones, `parse_pairs` reads it)."""
    p.add_argument(flag, action="append", default=[], metavar=metavar, help=help)


SPEC_DIR = "specs"


class _SpecDir(argparse.Action):
    """The spec directory, as `DIR` or `--dir DIR` (or an alias), given once."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        given = getattr(namespace, "_spec_dir_given", None)
        if given is not None:
            parser.error(
                f"the spec directory is given twice ({given} and {option_string or 'DIR'}): "
                "give DIR or --dir DIR"
            )
        namespace._spec_dir_given = option_string or "DIR"
        setattr(namespace, self.dest, values)


def spec_dir_args(
    p: argparse.ArgumentParser,
    default: str | None = SPEC_DIR,
    *,
    positional: bool = True,
    aliases: tuple[str, ...] = (),
    help: str = "",
) -> None:
    """The spec directory, the same on every command that reads specs: `DIR`, after the
    command's other positional arguments (`positional=False` when those are a list, GUEST...:
    it could not be told from one), and `--dir DIR` (and `aliases`); `args.dir`."""
    what = help or "the spec directory" + (f" (default: {default})" if default else "")
    if positional:
        p.add_argument(
            "dir", nargs="?", default=argparse.SUPPRESS, metavar="DIR", action=_SpecDir, help=what
        )
    p.add_argument(
        "--dir",
        *aliases,
        dest="dir",
        default=default,
        metavar="DIR",
        action=_SpecDir,
        help="the same, as a flag" if positional else what,
    )


def color_arg(p: argparse.ArgumentParser) -> None:
    """--color, on every command that prints for people (plans, diagnostics, tables)."""
    p.add_argument(
        "--color",
        choices=["auto", "always", "never"],
        default="auto",
        help="color the output: auto (a terminal, unless NO_COLOR is set), always or never",
    )


def max_concurrency(text: str) -> int:
    """--proxmox-max-concurrency: a whole number in 1..256, as the spec's `max_concurrency`."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= value <= 256:
        raise argparse.ArgumentTypeError(f"{value}: must be from 1 to 256")
    return value


def add_connection_args(p: argparse.ArgumentParser) -> None:
    """The connection flags, the same on every command that talks to Proxmox. Each one given
    replaces its field of the spec's `proxmox` section; the others stay the spec's
    (`connection_override`, `applying.connecting.merge_endpoint`)."""
    g = p.add_argument_group(
        "Proxmox connection (each flag given overrides its field of the spec's proxmox section)"
    )
    g.add_argument("--proxmox-url", metavar="URL", help="the API, https://host:8006")
    g.add_argument(
        "--proxmox-user",
        metavar="USER",
        help="the user (default: the spec's; root@pam without a proxmox section)",
    )
    g.add_argument(
        "--proxmox-password-env",
        metavar="VAR",
        help="environment variable holding the password (log in with it, not a token)",
    )
    g.add_argument(
        "--proxmox-token-id", metavar="NAME", help="the API token's name (the part after '!')"
    )
    g.add_argument(
        "--proxmox-token-env",
        metavar="VAR",
        help="environment variable holding the API token secret (default: the spec's, "
        "else PVE_TOKEN_SECRET)",
    )
    g.add_argument(
        "--ca-file", metavar="FILE", help="CA bundle to verify Proxmox's TLS (turns it on)"
    )
    g.add_argument(
        "--proxmox-max-concurrency",
        metavar="N",
        type=max_concurrency,
        help="Proxmox API calls in flight at most, 1..256 (default: the spec's "
        "proxmox.max_concurrency, 16); halved for a while on 429/503 answers",
    )
    g.add_argument(
        "--insecure", action="store_true", help="do not verify TLS (labs only; prints a warning)"
    )
    e = p.add_argument_group("the edge (Velocity, Traefik, agents; on when the spec has one)")
    e.add_argument("--no-edge", action="store_true", help="leave Velocity, Traefik and agents out")
    e.add_argument("--velocity-url", metavar="URL", help="the Velocity bridge plugin")
    repeatable(
        e,
        "--agent",
        "GUEST=HOST:PORT",
        "where a guest's agent answers (repeat; default: its static IP and the agent port)",
    )
    e.add_argument("--agent-token-env", metavar="VAR", help="variable holding the agents' token")
    repeatable(
        e,
        "--traefik-file",
        "INSTANCE=PATH",
        "feed a Traefik instance through this file instead of what the spec says (repeat)",
    )
    repeatable(
        e,
        "--traefik-api",
        "INSTANCE=URL",
        "a Traefik instance's API (repeat; default: the spec's api_url)",
    )
    e.add_argument(
        "--redis-url",
        metavar="URL",
        default=os.environ.get("RECONCILER_REDIS_URL"),
        help="the controller's Redis (default: $RECONCILER_REDIS_URL)",
    )
    e.add_argument("--redis-password-env", metavar="VAR", help="variable holding its password")
    e.add_argument(
        "--lease-name",
        metavar="NAME",
        default=os.environ.get("RECONCILER_LEASE_NAME"),
        help="the leader lease in Redis that the service and a manual apply share "
        "(default: reconciler)",
    )


def parse_pairs(values: list[str], flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for value in values:
        key, sep, rest = value.partition("=")
        if not sep or not key or not rest:
            raise ConfigurationError(f"{flag} {value!r}: expected NAME=VALUE")
        out[key] = rest
    return out


def endpoints_from(args: argparse.Namespace) -> Endpoints:
    from reconciler.applying.connecting import Endpoints
    from reconciler.model.spec import SecretRef

    agents: dict[str, tuple[str, int]] = {}
    for guest, where in parse_pairs(args.agent, "--agent").items():
        host, _, port = where.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigurationError(f"--agent {guest}={where}: expected GUEST=HOST:PORT")
        agents[guest] = (host, int(port))
    return Endpoints(
        proxmox=connection_override(args),
        insecure=args.insecure,
        proxmox_max_concurrency=args.proxmox_max_concurrency,
        edge=not args.no_edge,
        velocity_url=args.velocity_url,
        agents=agents,
        agent_token=SecretRef(env=args.agent_token_env) if args.agent_token_env else None,
        traefik_files={
            k: Path(v) for k, v in parse_pairs(args.traefik_file, "--traefik-file").items()
        },
        traefik_apis=parse_pairs(args.traefik_api, "--traefik-api"),
        redis_url=args.redis_url,
        redis_password=SecretRef(env=args.redis_password_env) if args.redis_password_env else None,
    )


def connection_override(args: argparse.Namespace) -> ProxmoxOverride | None:
    """The connection flags given, as an override of the spec's API field by field (merged
    when connecting: `applying.connecting.merge_endpoint`); None when none is. A flag that
    cannot apply whatever the spec says is a ConfigurationError naming it, before anything
    connects."""
    from reconciler.applying.connecting import ProxmoxOverride
    from reconciler.model.spec import SecretRef

    def ref(var: str | None) -> SecretRef | None:
        return SecretRef(env=var) if var else None

    if args.ca_file is not None:
        if args.insecure:
            raise ConfigurationError(
                "--insecure and --ca-file: give one (--ca-file verifies TLS with that CA, "
                "--insecure does not verify at all)"
            )
        if not Path(args.ca_file).is_file():
            raise ConfigurationError(f"--ca-file {args.ca_file}: no such file")
    override = ProxmoxOverride(
        url=args.proxmox_url,
        user=args.proxmox_user,
        password=ref(args.proxmox_password_env),
        token_id=args.proxmox_token_id,
        token_secret=ref(args.proxmox_token_env),
        ca_file=args.ca_file,
    )
    return None if override == ProxmoxOverride() else override


def connection_alone(args: argparse.Namespace) -> ProxmoxApi | None:
    """The API the connection flags describe on their own, for the commands without a spec
    (`init`, `import --platform`): None when no flag is given; flags that are not enough
    (no --proxmox-url, no credential) are a ConfigurationError naming what is missing."""
    from reconciler.applying.connecting import merge_endpoint

    override = connection_override(args)
    return None if override is None else merge_endpoint(None, override)


def load_checked(
    directory: str, err: TextIO, *, color: bool = False
) -> tuple[PlatformSpec, DesiredGraph] | None:
    from reconciler.loading.graph import build_graph
    from reconciler.loading.loader import load_directory

    result = load_directory(directory)
    if not result.ok or result.spec is None:
        err.write(render.render_diagnostics(result.diagnostics, color=color))
        err.write(f"{directory}: the specs do not validate; nothing done\n")
        return None
    return result.spec, build_graph(result.spec, result.source)


# A command as `main` runs it, and one that acts on the platform its specs describe.
Command = Callable[[argparse.Namespace, TextIO, TextIO], int]
SpecCommand: TypeAlias = (
    "Callable[[argparse.Namespace, PlatformSpec, DesiredGraph, TextIO, TextIO], int]"
)


def on_specs(command: SpecCommand) -> Command:
    """A command on the platform the specs in `args.dir` describe: they are loaded and checked
    first (invalid: their diagnostics, exit 1, nothing done), and an error of ours on the way (a
    connection refused, a secret missing, the lease held) is one line and exit 1, no traceback."""

    @functools.wraps(command)
    def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
        color = render.use_color(getattr(args, "color", "never"), err)
        loaded = load_checked(args.dir, err, color=color)
        if loaded is None:
            return EXIT_ERROR
        try:
            return command(args, *loaded, out, err)
        except ReconcilerError as exc:
            err.write(f"error: {exc}\n")
            return EXIT_ERROR

    return run


Guard = Callable[[], Awaitable[object]]


@contextlib.asynccontextmanager
async def holding_lease(
    redis: Redis | None, args: argparse.Namespace, *, dry_run: bool = False
) -> AsyncIterator[Guard | None]:
    """With the controller's Redis, a manual apply (or adopt) is one more replica: it takes the
    service's leader lease for as long as it acts, every change passes the lease's check, and
    while a running service holds the lease it refuses, naming the holder. Without Redis (or
    for a dry run) there is nothing to share."""
    import anyio

    from reconciler.controller.lease import LeaseKeeper, RedisLease, default_holder

    if redis is None or dry_run:
        yield None
        return
    lease = RedisLease(
        redis,
        name=args.lease_name or "reconciler",
        holder=f"cli:{default_holder()}",
        ttl=MANUAL_LEASE_TTL,
    )
    if not await lease.acquire():
        info = await lease.info()
        holder = info.holder if info is not None else "another replica"
        raise ReconcilerError(
            f"the leader lease {lease.name!r} is held by {holder}: a running controller is "
            "acting on this platform. Let it converge (see its /status), or stop it first"
        )
    keeper = LeaseKeeper(lease, interval=MANUAL_LEASE_TTL / 3)
    async with anyio.create_task_group() as tg:
        tg.start_soon(keeper.run)  # renews while we act; releases when cancelled
        try:
            yield lease.check
        finally:
            tg.cancel_scope.cancel()


MANUAL_LEASE_TTL = 15.0


def warn_insecure(args: argparse.Namespace, err: TextIO) -> None:
    """Every command that connects to Proxmox says so when TLS is not verified (with
    --ca-file too, it is an error instead: `connection_override`)."""
    if args.insecure and args.ca_file is None:
        err.write(
            "warning: TLS verification of the Proxmox API is OFF (--insecure); "
            "anyone on the path can read the credentials\n"
        )


def observe_live(args: argparse.Namespace, spec: PlatformSpec, err: TextIO) -> ObservedState:
    from reconciler.applying.connecting import connect_platform

    warn_insecure(args, err)
    endpoints = endpoints_from(args)

    async def run() -> ObservedState:
        async with connect_platform(spec, endpoints) as conn:
            return await conn.observe(spec.platform.name)

    return run_async(run)


@on_specs
def cmd_observe(
    args: argparse.Namespace, spec: PlatformSpec, _: DesiredGraph, out: TextIO, err: TextIO
) -> int:
    """The snapshot as JSON (`reconciler/observed-state`) on stdout, or in `--out FILE`;
    `--format text` shows it for people (on stdout, with `--out` too)."""
    state = observe_live(args, spec, err)
    text = state.model_dump_json(indent=1) + "\n"
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
        owned = sum(1 for r in state.resources if r.owned)
        seen = render.plural(len(state.resources), "resource")
        err.write(f"observed {seen} ({owned} owned) -> {args.out}\n")
    if args.format == "text":
        out.write(render.render_observed(state, color=render.use_color(args.color, out)))
    elif not args.out:
        out.write(text)
    return EXIT_OK


def _hits(target: str, address: str) -> bool:
    """Does `--target` `target` select `address`: the address itself, or a prefix such as
    `guest/` (as `planning.planner` keeps targets)."""
    return address == target or address.startswith(target.rstrip("/") + "/")


def unknown_targets(targets: Iterable[str], addresses: Iterable[str]) -> list[str]:
    """The targets that select none of `addresses`, in the order given."""
    known = list(addresses)
    return [t for t in dict.fromkeys(targets) if not any(_hits(t, a) for a in known)]


def target_errors(
    targets: Iterable[str], graph: DesiredGraph, observed: ObservedState | None
) -> list[str]:
    """Why `--target` is wrong, a line for each target that names no resource the specs
    describe or the platform holds (ours; `observed`), with the nearest addresses; [] when all
    are known."""
    addresses = {*graph.resources}
    if observed is not None:
        addresses |= {r.address for r in observed.resources if r.address}
    unknown = unknown_targets(targets, addresses)
    kinds = {a.split("/", 1)[0] + "/" for a in addresses}
    candidates = sorted(addresses | kinds)
    lines = []
    for target in unknown:
        close = difflib.get_close_matches(target, candidates, n=2, cutoff=0.6)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        lines.append(
            f"--target {target}: no resource has this address, in the specs or on the "
            f"platform{hint}"
        )
    return lines


async def check_targets(
    targets: Iterable[str], graph: DesiredGraph, conn: Connection, platform: str
) -> list[str]:
    """`target_errors`, observing only when a target is not in the specs (it may name a
    resource of ours that left them, to delete it)."""
    wanted = list(targets)
    if not unknown_targets(wanted, graph.resources):
        return []
    return target_errors(wanted, graph, await conn.observe(platform))


def write_errors(lines: Iterable[str], err: TextIO) -> None:
    err.writelines(f"error: {line}\n" for line in lines)


def progress_lines(err: TextIO) -> Progress:
    def show(result: Result, done: int, total: int) -> None:
        c = result.change
        line = f"[{done}/{total}] {c.action.symbol} {shown_address(c)}: {result.outcome.value}"
        if result.seconds >= 0.05:
            line += f" ({result.seconds:.1f} s)"
        if result.error:
            line += f"\n        {result.error}"
        err.write(line + "\n")
        err.flush()

    return show


def confirm(verb: str, question: str, err: TextIO) -> bool:
    """Ask in a terminal; only 'yes' counts. Without a terminal, say how to confirm instead."""
    if not sys.stdin.isatty():
        err.write(f"{verb} needs confirmation: run it in a terminal or pass --auto-approve\n")
        return False
    err.write(f"{question} Only 'yes' is accepted: ")
    err.flush()
    return sys.stdin.readline().strip() == "yes"


@on_specs
def cmd_apply(
    args: argparse.Namespace, spec: PlatformSpec, graph: DesiredGraph, out: TextIO, err: TextIO
) -> int:
    from reconciler.applying.connecting import connect_platform

    as_json = args.format == "json"
    # The plan goes where people read it: stdout, or stderr when stdout is the JSON document.
    shown = err if as_json else out
    color = render.use_color(args.color, shown)
    warn_insecure(args, err)
    cancelled: list[Plan] = []

    def approve(plan: Plan) -> bool:
        asking = not (args.auto_approve or args.dry_run)
        if not as_json or (asking and sys.stdin.isatty()):
            shown.write(render.render_text(plan, color=color))
            shown.flush()
        if not asking or confirm("apply", "Apply these changes?", err):
            return True
        cancelled.append(plan)
        return False

    async def run() -> Convergence | int:
        async with connect_platform(spec, endpoints_from(args)) as conn:
            if args.target and not args.plan:
                wrong = await check_targets(args.target, graph, conn, spec.platform.name)
                if wrong:
                    write_errors(wrong, err)
                    err.write("Nothing was changed.\n")
                    return EXIT_ERROR
            async with holding_lease(conn.redis, args, dry_run=args.dry_run) as guard:
                if args.plan:
                    return await _apply_saved(args, spec, graph, conn, err, guard)
                return await converge_live(
                    graph,
                    spec,
                    conn,
                    err,
                    guard,
                    allow_destroy=args.allow_destroy,
                    targets=args.target,
                    final_backups=not args.no_final_backup,
                    dry_run=args.dry_run,
                    approve=approve,
                )

    result = run_async(run)
    if isinstance(result, int):
        return result
    last = result.rounds[-1]
    if as_json:
        doc = render.apply_document(
            result.rounds,
            platform=spec.platform.name,
            dry_run=args.dry_run,
            cancelled=bool(cancelled),
        )
        out.write(json.dumps(doc, indent=2) + "\n")
        if cancelled:
            err.write("Apply cancelled.\n")
        elif last.plan.errored:
            err.write(render.render_text(last.plan, color=color))
        return EXIT_OK if doc["outcome"] in ("applied", "no-changes", "dry-run") else EXIT_ERROR
    if cancelled:
        err.write("Apply cancelled.\n")
        return EXIT_ERROR
    if all(r.report is None for r in result.rounds) and not last.plan.errored:
        out.write(render.render_text(last.plan, color=color))  # no changes: say so
    return report_convergence(result, out, err, color=color)


async def converge_live(
    graph: DesiredGraph,
    spec: PlatformSpec,
    conn: Connection,
    err: TextIO,
    guard: Guard | None,
    **options: Any,
) -> Convergence:
    """`converge` as every command that changes the platform by hand runs it (`apply`,
    `restore`): the connection's providers and agent layers, the live isolation check,
    progress on `err`, each change behind the lease's `guard`; `options` are converge's."""
    from reconciler.applying.converging import converge
    from reconciler.planning.observed_policies import live_isolation

    return await converge(
        graph,
        conn.providers,
        source=conn.source,
        progress=progress_lines(err),
        observed_checks=[live_isolation(spec)],
        agent_layers=conn.agent_layers,
        guard=guard,
        **options,
    )


def report_convergence(
    result: Convergence, out: TextIO, err: TextIO, *, color: bool = False, errored: str = ""
) -> int:
    """The end of every command that converges (`apply`, `restore`): a last plan with errors
    was never applied (converge stops first): shown, with `errored` said after it; else why it
    planned more than once, and the apply's summary."""
    last = result.rounds[-1]
    if last.plan.errored:
        out.write(render.render_text(last.plan, color=color))
        if errored:
            err.write(errored + "\n")
        return EXIT_ERROR
    if result.again():
        err.write(result.again() + "\n")
    return summarize_report(last.report, out)


def summarize_report(report: object, out: TextIO) -> int:
    if report is None:
        return EXIT_OK
    from reconciler.applying.executor import ApplyReport, Outcome

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


async def _apply_saved(
    args: argparse.Namespace,
    spec: PlatformSpec,
    graph: DesiredGraph,
    conn: Connection,
    err: TextIO,
    guard: Guard | None = None,
) -> Convergence | int:
    """`apply --plan FILE`. A saved plan is a request, never an authority (README "Plans"): it
    is applied only if a plan made now, from these specs, the platform as it is and the file's
    own options, makes the same changes; and what runs is that fresh plan, never the file's
    changes, so every gate, cap, ownership check and policy holds whatever the file says.
    Applied, it is one round of a convergence, reported as `apply` reports one."""
    from reconciler.applying.converging import Convergence, Round
    from reconciler.applying.executor import execute
    from reconciler.planning.provenance import first_difference

    saved = _read_saved(args.plan, err)
    if saved is None:
        return EXIT_ERROR
    why = _unusable(saved, args, spec, graph)
    if why is not None:
        err.write(f"{args.plan}: not applied: {why}\n")
        return EXIT_ERROR
    observed = await conn.observe(spec.platform.name)
    if observed.digest() != saved.observed_digest:
        err.write(
            f"{args.plan}: the platform changed since this plan was made "
            f"({saved.observed_digest[:19]} then, {observed.digest()[:19]} now); "
            "make a new plan\n"
        )
        return EXIT_ERROR
    fresh = plan_observed(
        graph,
        spec,
        conn,
        observed,
        allow_destroy=saved.allow_destroy,
        targets=saved.targets,
        final_backups=saved.final_backups,
    )
    if fresh.errored:
        errors = [d for d in fresh.diagnostics if d.severity is Severity.ERROR]
        err.write(render.render_diagnostics(errors))
        err.write(f"{args.plan}: not applied: a fresh plan has errors\n")
        return EXIT_ERROR
    difference = first_difference(saved, fresh)
    if difference is not None:
        err.write(
            f"{args.plan}: not applied, it is not what a fresh plan does: {difference}. "
            "Make a new plan\n"
        )
        return EXIT_ERROR
    report = await execute(
        fresh, conn.providers, dry_run=args.dry_run, progress=progress_lines(err), guard=guard
    )
    return Convergence(rounds=[Round(fresh, report=report, observed=observed)])


def _read_saved(path: str, err: TextIO) -> Plan | None:
    try:
        return plan_from_json(json.loads(Path(path).read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        err.write(f"{path}: not a saved plan: {exc}\n")
        return None


def _unusable(
    saved: Plan, args: argparse.Namespace, spec: PlatformSpec, graph: DesiredGraph
) -> str | None:
    """Why a saved plan cannot be applied with these specs and flags, before anything is asked
    of the platform; None when it may be planned again."""
    from reconciler.planning.provenance import spec_digest

    if saved.platform != spec.platform.name:
        return f"it is a plan for platform {saved.platform!r}, not {spec.platform.name!r}"
    if not saved.spec_digest:
        return (
            "it does not record the specs it was made from (saved by an older reconciler), so "
            "it cannot be checked against them; make a new plan"
        )
    if saved.errored:
        return "it has errors; it cannot be applied"
    if saved.allow_destroy and not args.allow_destroy:
        return (
            "it was made with --allow-destroy, which a file cannot grant: give --allow-destroy "
            "to apply it too"
        )
    if not saved.final_backups and not args.no_final_backup:
        return (
            "it was made with --no-final-backup, which a file cannot grant: give "
            "--no-final-backup to apply it too"
        )
    if args.target and tuple(sorted(set(args.target))) != saved.targets:
        made_for = ", ".join(saved.targets) or "every resource"
        return (
            f"it was made for {made_for}; apply a saved plan without --target (its own are "
            "used) or with the same"
        )
    now = spec_digest(graph)
    if now != saved.spec_digest:
        return (
            "it was made from another revision of the specs "
            f"({saved.spec_digest[:19]} then, {now[:19]} now); make a new plan"
        )
    return None


def plan_observed(
    graph: DesiredGraph,
    spec: PlatformSpec,
    conn: Connection,
    observed: ObservedState,
    *,
    allow_destroy: bool,
    targets: Iterable[str],
    final_backups: bool = True,
) -> Plan:
    """The live plan, made one way for `plan` and for a saved plan's re-planning at `apply
    --plan` (the two must agree for an honest saved plan to apply)."""
    from reconciler.planning.observed_policies import live_isolation
    from reconciler.planning.planner import make_plan

    return make_plan(
        graph,
        observed,
        allow_destroy=allow_destroy,
        targets=targets,
        final_backups=final_backups,
        observed_checks=[live_isolation(spec)],
        agent_layers=conn.agent_layers,
    )


def live_plan(
    args: argparse.Namespace, spec: PlatformSpec, graph: DesiredGraph, err: TextIO
) -> Plan | None:
    from reconciler.applying.connecting import connect_platform

    warn_insecure(args, err)

    async def run() -> Plan | list[str]:
        async with connect_platform(spec, endpoints_from(args)) as conn:
            observed = await conn.observe(spec.platform.name)
            wrong = target_errors(args.target, graph, observed)
            if wrong:
                return wrong
            return plan_observed(
                graph,
                spec,
                conn,
                observed,
                allow_destroy=args.allow_destroy,
                targets=args.target,
                final_backups=not args.no_final_backup,
            )

    try:
        made = run_async(run)
    except ReconcilerError as exc:
        err.write(f"error: {exc}\n")
        return None
    if isinstance(made, list):
        write_errors(made, err)
        return None
    return made
