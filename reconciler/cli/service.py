"""`reconciler run`: the controller as a long-running service (reconciler.controller.service).

Its settings are flags, each with an environment variable for container and systemd use
(`RECONCILER_<FLAG>`, e.g. RECONCILER_REDIS_URL); secrets are named by the variable or file
that holds them, never passed as values. Its parser costs only the standard library: the
controller (anyio, Redis, the status listener, the providers) is imported when it runs.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from reconciler.cli.live import add_connection_args, endpoints_from, spec_dir_args
from reconciler.model.errors import ReconcilerError

if TYPE_CHECKING:
    from reconciler.controller.service import ServiceOptions


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"RECONCILER_{name}", default)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text}: must be more than 0 seconds")
    return value


def _seconds_or_off(text: str) -> float:
    """Seconds, or 0 for off."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text}: must be 0 (off) or more seconds")
    return value


def _seconds_flag(group: argparse._ArgumentGroup, flag: str, default: str, help: str) -> None:
    """A duration flag with its environment variable; argparse converts (and checks) a string
    default only when `run` is parsed, so a bad variable never breaks the other commands."""
    name = flag.removeprefix("--").replace("-", "_").upper()
    group.add_argument(flag, type=_seconds, default=_env(name, default), help=help)


def add_run_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    r = sub.add_parser(
        "run",
        help="run the controller as a service: keep the platform converged",
        description="Keep the platform converged with the specs: a full cycle at an interval, "
        "a cheap inventory check in between, a faster poll of the edge, and a new revision "
        "of the specs as soon as it is fetched. One replica acts at a time (leader lease).",
    )
    spec_dir_args(r, _env("DIR", "specs"))
    g = r.add_argument_group("a git source instead of a directory")
    g.add_argument("--git-url", metavar="URL", default=_env("GIT_URL"))
    g.add_argument("--git-branch", metavar="BRANCH", default=_env("GIT_BRANCH", "main"))
    g.add_argument(
        "--git-subdir", metavar="PATH", default=_env("GIT_SUBDIR", "specs"), help="specs in it"
    )
    t = r.add_argument_group("timing (seconds)")
    _seconds_flag(
        t, "--interval", "300", "full cycle: observe everything, plan, apply (default 300)"
    )
    _seconds_flag(
        t,
        "--inventory-interval",
        "30",
        "cheap inventory check between full cycles: one Proxmox call (default 30)",
    )
    _seconds_flag(
        t, "--edge-interval", "10", "poll of Velocity, Traefik and the agents (default 10)"
    )
    _seconds_flag(t, "--source-interval", "60", "fetch of the specs' source (default 60)")
    t.add_argument(
        "--watch-interval",
        type=_seconds_or_off,
        default=_env("WATCH_INTERVAL", "1"),
        help="a specs directory's files are looked at (stat only) this often, and a change "
        "is loaded at once instead of at the next fetch; 0: off (default 1)",
    )
    s = r.add_argument_group("service")
    s.add_argument(
        "--state-dir",
        metavar="DIR",
        default=_env("STATE_DIR", "/var/lib/reconciler"),
        help="snapshot, git checkouts, the single-copy lock (default /var/lib/reconciler)",
    )
    s.add_argument(
        "--listen",
        metavar="HOST:PORT",
        default=_env("LISTEN", "127.0.0.1:9180"),
        help="status listener: /healthz /readyz /status /metrics /snapshot",
    )
    s.add_argument(
        "--status-token-env",
        metavar="VAR",
        default=_env("STATUS_TOKEN_ENV"),
        help="variable holding a bearer token that /status, /snapshot and /metrics then "
        "require (/healthz and /readyz stay open); give one beyond loopback",
    )
    s.add_argument(
        "--status-token-file",
        metavar="FILE",
        default=_env("STATUS_TOKEN_FILE"),
        help="file holding that token instead (a systemd credential)",
    )
    _seconds_flag(
        s,
        "--lease-ttl",
        "15",
        "leader lease time in Redis; a standby takes over within it (default 15)",
    )
    s.add_argument("--holder", metavar="ID", default=_env("HOLDER"), help="this replica's name")
    s.add_argument("--log-format", choices=["json", "text"], default=_env("LOG_FORMAT", "json"))
    s.add_argument("--log-level", default=_env("LOG_LEVEL", "info"))
    s.add_argument(
        "--shutdown-grace",
        type=_seconds,
        default=60.0,
        help="on SIGTERM, wait this long for in-flight changes (default 60)",
    )
    s.add_argument("--once", action="store_true", help="one full cycle, then exit")
    add_connection_args(r)
    r.set_defaults(func=cmd_run)


def options_from(args: argparse.Namespace) -> ServiceOptions:
    """`run`'s flags as the controller's typed options: argparse stops here."""
    from reconciler.controller.service import ServiceOptions

    return ServiceOptions(
        dir=str(args.dir),
        git_url=args.git_url,
        git_branch=args.git_branch,
        git_subdir=args.git_subdir,
        state_dir=Path(args.state_dir),
        lease_name=args.lease_name,
        holder=args.holder,
        lease_ttl=float(args.lease_ttl),
        listen=str(args.listen),
        status_token_env=args.status_token_env,
        status_token_file=args.status_token_file,
        source_interval=float(args.source_interval),
        interval=float(args.interval),
        inventory_interval=float(args.inventory_interval),
        edge_interval=float(args.edge_interval),
        shutdown_grace=float(args.shutdown_grace),
        once=bool(args.once),
        watch_interval=float(args.watch_interval),
    )


def cmd_run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """`reconciler run`: build the service from the command line and run it until SIGTERM
    (or, with --once, for one full cycle). Exit 0, or 1 when it could not start (or the
    --once cycle neither found the platform converged nor applied its changes)."""
    import anyio

    from reconciler.controller.logs import setup_logging
    from reconciler.controller.service import build_service, fields, log, redact_secrets
    from reconciler.controller.status import CycleOutcome
    from reconciler.controller.timing import Trigger
    from reconciler.providers.redisconn import describe_redis_url

    try:
        redactor = setup_logging(args.log_format, args.log_level, err)
    except ValueError as exc:
        err.write(f"error: {exc}\n")
        return 1
    try:
        endpoints = endpoints_from(args)
        redact_secrets(redactor, endpoints)
        service, close = build_service(options_from(args), endpoints=endpoints, redactor=redactor)
        if service.settings.status_token is not None:
            redactor.add(service.settings.status_token)
    except ReconcilerError as exc:
        log.error("cannot start", extra=fields(error=str(exc)))
        return 1

    async def main() -> None:
        try:
            await service.run()
        finally:
            await close()

    log.info(
        "starting",
        extra=fields(
            source=service.source.describe(),
            holder=service.lease.holder,
            redis=describe_redis_url(endpoints.redis_url) if endpoints.redis_url else None,
            state_dir=str(service.settings.state_dir),
        ),
    )
    anyio.run(main)
    if args.once:
        outcomes = [o for t, o in service.cycles if t is Trigger.FULL]
        return (
            0 if outcomes and outcomes[-1] in (CycleOutcome.CONVERGED, CycleOutcome.CHANGED) else 1
        )
    return 0
