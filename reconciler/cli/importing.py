"""`reconciler import` and `reconciler adopt`: bring an existing Proxmox estate under the
controller. `reconciler.cli.main` registers them with `add_import_commands`.

    reconciler import --out DIR [--dir SPECS] [--platform NAME] [--force] [connection flags]
        [--velocity-url URL --velocity-secret-env VAR] [--traefik-api I=URL [--traefik-guest I=G]]
    reconciler adopt ADDR... [--dir SPECS] [--dry-run] [--auto-approve] [connection flags]

`import` reads everything (owned or not) and writes spec YAML that describes it, then loads it
back: exit 0 when it validates, 1 otherwise. `--dir` (or `--ranges-from`) takes the platform
settings, Proxmox endpoint, layers, hosts and ranges from an existing spec; without it the
example platform's ranges are used and `--platform` names the platform. The cluster's backup
jobs go to `backups.yaml` (`reconciler.importing.backup_writer`), each keeping its id. `adopt`
marks reviewed guests, firewall objects and backup jobs as owned; see
`reconciler.importing.adopting`.

The edge, where configured (the `--dir` spec's `velocity` and Traefik instances with an
`api_url`, or the flags), is read too and written to `edge.yaml` (`reconciler.importing.edge`,
`edge_writer`); `--no-edge` leaves it out. A part that cannot be read is a note.

The parsers cost only the standard library; the importers and the Proxmox client are imported
when a command runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from reconciler.cli.live import (
    confirm,
    connection_override,
    holding_lease,
    load_checked,
    on_specs,
    parse_pairs,
    repeatable,
    run_async,
    warn_insecure,
)
from reconciler.model.errors import ReconcilerError
from reconciler.model.resources import DesiredGraph

if TYPE_CHECKING:
    from reconciler.importing.adopting import AdoptionReport
    from reconciler.model.spec import PlatformSpec, ProxmoxApi
    from reconciler.providers.proxmox import ProxmoxProvider

EXIT_OK, EXIT_ERROR = 0, 1


def add_import_commands(
    sub: argparse._SubParsersAction,  # type: ignore[type-arg]
    add_connection_args: Callable[[argparse.ArgumentParser], None],
) -> None:
    im = sub.add_parser("import", help="write spec YAML for what exists in Proxmox")
    im.add_argument("--out", required=True, metavar="DIR", help="directory to write specs to")
    im.add_argument(
        "--dir",
        "--ranges-from",
        dest="dir",
        metavar="DIR",
        help="an existing spec: its platform, Proxmox endpoint, layers, hosts and ranges",
    )
    im.add_argument("--platform", metavar="NAME", help="platform name (without --dir)")
    im.add_argument("--force", action="store_true", help="replace the spec files in --out")
    add_connection_args(im)
    im.add_argument(
        "--velocity-secret-env",
        metavar="VAR",
        help="variable holding the Velocity bridge's secret (written as a reference)",
    )
    repeatable(
        im,
        "--traefik-guest",
        "INSTANCE=GUEST",
        "the imported guest a --traefik-api instance runs in (repeat)",
    )
    im.set_defaults(func=cmd_import)
    ad = sub.add_parser(
        "adopt", help="mark reviewed guests, firewall objects and backup jobs as owned"
    )
    ad.add_argument("addresses", nargs="+", metavar="ADDR", help="e.g. guest/mc-lobby")
    ad.add_argument("--dir", default="specs", help="spec directory (default: specs)")
    ad.add_argument("--dry-run", action="store_true", help="show what would be written")
    ad.add_argument("--auto-approve", action="store_true", help="do not ask for confirmation")
    add_connection_args(ad)
    ad.set_defaults(func=cmd_adopt)


def _secret_ref(api: ProxmoxApi) -> dict[str, Any]:
    """The endpoint as a spec's `proxmox:` section: references only, never a secret."""
    out: dict[str, Any] = {"url": api.url, "user": api.user}
    if api.ca_file:
        out["ca_file"] = api.ca_file
    if api.token_id is not None and api.token_secret is not None:
        out["token_id"] = api.token_id
        out["token_secret"] = api.token_secret.model_dump(exclude_none=True)
    elif api.password is not None:
        out["password"] = api.password.model_dump(exclude_none=True)
    return out


def cmd_import(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from reconciler.applying.connecting import proxmox_provider
    from reconciler.importing.edge import edge_sources, read_edge
    from reconciler.importing.estate import read_estate
    from reconciler.importing.writer import Base, render_specs, spec_files_in, write_files
    from reconciler.loading.loader import load_directory
    from reconciler.providers.proxmox import ProxmoxProvider, connect

    target = Path(args.out)
    if target.exists() and not target.is_dir():
        err.write(f"{target} exists and is not a directory\n")
        return EXIT_ERROR
    if target.is_dir() and any(target.iterdir()) and not args.force:
        err.write(f"{target} is not empty; pass --force to replace its spec files\n")
        return EXIT_ERROR
    override = connection_override(args)
    spec: PlatformSpec | None = None
    try:
        if args.dir:
            loaded = load_checked(args.dir, err)
            if loaded is None:
                return EXIT_ERROR
            spec, _ = loaded
            base = Base.from_spec(spec)
            provider = proxmox_provider(
                spec, override, insecure=args.insecure, max_concurrency=args.proxmox_max_concurrency
            )
        else:
            if override is None or not args.platform:
                err.write("import needs --dir SPECS, or --platform NAME with --proxmox-url\n")
                return EXIT_ERROR
            base = Base.default(args.platform, _secret_ref(override))
            provider = ProxmoxProvider(
                client=connect(override, insecure=args.insecure),
                platform=args.platform,
                source=override.url,
                concurrency=args.proxmox_max_concurrency or override.max_concurrency,
            )
        warn_insecure(args, err)
        sources = None
        if not args.no_edge:
            sources = edge_sources(
                spec,
                velocity_url=args.velocity_url,
                velocity_secret_env=args.velocity_secret_env,
                traefik_apis=parse_pairs(args.traefik_api, "--traefik-api"),
                traefik_guests=parse_pairs(args.traefik_guest, "--traefik-guest"),
            )
        estate = run_async(lambda: read_estate(provider))
        edge = run_async(lambda: read_edge(sources)) if sources is not None else None
    except ReconcilerError as exc:
        err.write(f"error: {exc}\n")
        return EXIT_ERROR
    result = render_specs(estate, base, edge)
    if target.is_dir() and args.force:
        for old in spec_files_in(target):
            old.unlink()
    for path in write_files(result.files, target):
        out.write(f"wrote {path}\n")
    for note in result.notes:
        err.write(f"note: {note}\n")
    for address, fields in sorted(result.drift.items()):
        err.write(
            f"note: {address}: the first apply after adoption would change "
            + ", ".join(fields)
            + "\n"
        )
    check = load_directory(target)
    if not check.ok or check.spec is None:
        from reconciler.cli import render

        err.write(render.render_diagnostics(check.diagnostics))
        err.write(f"{target}: the imported specs do not validate (see the notes above)\n")
        return EXIT_ERROR
    more = ""
    if "edge.yaml" in result.files:
        routes = sum(len(i.routes) for i in check.spec.traefik.values())
        more = f", {len(result.velocity_servers)} Velocity servers, {routes} routes"
    if result.backup_jobs:
        more += f", {len(result.backup_jobs)} backup jobs"
    out.write(
        f"{target}: {len(result.guests)} guests{more} imported from {estate.source}; valid. "
        f"Review them, then `reconciler adopt ADDR... --dir {target}`.\n"
    )
    if result.routes:
        out.write(
            f"{len(result.routes)} routes come from hand-made routers: the first apply adds an "
            "rc- router next to each (see the notes and edge.yaml).\n"
        )
    return EXIT_OK


def _render_report(report: AdoptionReport, out: TextIO, *, dry_run: bool) -> None:
    for address, why in report.refused.items():
        out.write(f"  refused  {address}: {why}\n")
    for a in report.adoptions:
        out.write(f"  {a.status:<12} {a.address} ({a.target})\n")
        for key, value in a.writes.items():
            shown = value.replace("\n", "\\n")
            out.write(f"      {key} = {shown}\n")
        if a.error:
            out.write(f"      error: {a.error}\n")
        if a.drift:
            out.write("      the next apply would change: " + ", ".join(a.drift) + "\n")
    if report.refused:
        out.write("Nothing was adopted: fix or leave out the refused addresses.\n")
    elif dry_run:
        out.write("Dry run: nothing was written.\n")


async def _adopt_holding_lease(
    args: argparse.Namespace, graph: DesiredGraph, provider: ProxmoxProvider
) -> AdoptionReport:
    """Adopting changes guests: with the controller's Redis it holds the leader lease, so a
    running service never acts at the same moment (see `holding_lease`)."""
    from reconciler.importing.adopting import adopt
    from reconciler.providers.redisconn import connect_redis

    redis = connect_redis(args.redis_url) if args.redis_url else None
    try:
        async with holding_lease(redis, args):
            return await adopt(graph, provider, args.addresses)
    finally:
        if redis is not None:
            await redis.aclose()


@on_specs
def cmd_adopt(
    args: argparse.Namespace, spec: PlatformSpec, graph: DesiredGraph, out: TextIO, err: TextIO
) -> int:
    from reconciler.applying.connecting import proxmox_provider
    from reconciler.importing.adopting import adopt

    provider = proxmox_provider(
        spec,
        connection_override(args),
        insecure=args.insecure,
        max_concurrency=args.proxmox_max_concurrency,
    )
    warn_insecure(args, err)
    preview = run_async(lambda: adopt(graph, provider, args.addresses, dry_run=True))
    _render_report(preview, out, dry_run=args.dry_run)
    if args.dry_run or not preview.ok:
        return EXIT_OK if preview.ok else EXIT_ERROR
    if not any(a.writes for a in preview.adoptions):
        out.write("Nothing to adopt.\n")
        return EXIT_OK
    if not args.auto_approve and not confirm(
        "adopt", "Adopt these? The controller will manage them from now on.", err
    ):
        return EXIT_ERROR
    report = run_async(lambda: _adopt_holding_lease(args, graph, provider))
    _render_report(report, out, dry_run=False)
    return EXIT_OK if report.ok else EXIT_ERROR
