"""`reconciler import`, `reconciler merge` and `reconciler adopt`: bring an existing Proxmox
estate under the controller. `reconciler.cli.main` registers them with `add_import_commands`.

    reconciler import --out DIR [--dir SPECS] [--platform NAME] [--force] [connection flags]
        [--velocity-url URL --velocity-secret-env VAR] [--traefik-api I=URL [--traefik-guest I=G]]
    reconciler import --into SPECS [connection flags] [edge flags]
    reconciler merge FROM [SPECS] [--dry-run]
    reconciler adopt ADDR... [--dir SPECS] [--dry-run] [--auto-approve] [connection flags]

`import` reads everything (owned or not) and writes spec YAML that describes it, then loads it
back: exit 0 when it validates, 1 otherwise. `--dir` (or `--ranges-from`) takes the platform
settings, Proxmox endpoint, layers, hosts and ranges from an existing spec; without it the
example platform's ranges are used and `--platform` names the platform. The cluster's backup
jobs go to `backups.yaml` (`reconciler.importing.backup_writer`), each keeping its id. `adopt`
marks reviewed guests, firewall objects and backup jobs as owned; see
`reconciler.importing.adopting`; a refusal of an address not in the specs names the directory
read.

`import --into SPECS` renders the estate in SPECS's frame and merges it into SPECS; `merge FROM
SPECS` merges an import's directory (reviewed, perhaps adopted from) into SPECS. Both add what
SPECS lacks in new files, leave what it has, and refuse (writing nothing) on a conflict or when
the merged specs do not validate: `reconciler.importing.merging`.

The edge, where configured (the `--dir` spec's `velocity` and Traefik instances with an
`api_url`, or the flags), is read too and written to `edge.yaml` (`reconciler.importing.edge`,
`edge_writer`); `--no-edge` leaves it out. A part that cannot be read is a note.

The parsers cost only the standard library; the importers and the Proxmox client are imported
when a command runs.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from reconciler.cli import render
from reconciler.cli.live import (
    color_arg,
    confirm,
    connection_alone,
    connection_override,
    holding_lease,
    load_checked,
    on_specs,
    parse_pairs,
    repeatable,
    run_async,
    spec_dir_args,
    warn_insecure,
)
from reconciler.model.errors import ReconcilerError
from reconciler.model.resources import DesiredGraph

if TYPE_CHECKING:
    from reconciler.importing.adopting import AdoptionReport
    from reconciler.importing.merging import SpecTree
    from reconciler.model.diagnostics import Diagnostic
    from reconciler.model.spec import PlatformSpec, ProxmoxApi
    from reconciler.providers.proxmox import ProxmoxProvider

EXIT_OK, EXIT_ERROR = 0, 1


def add_import_commands(
    sub: argparse._SubParsersAction,  # type: ignore[type-arg]
    add_connection_args: Callable[[argparse.ArgumentParser], None],
) -> None:
    im = sub.add_parser("import", help="write spec YAML for what exists in Proxmox")
    im.add_argument("--out", metavar="DIR", help="a new directory to write the specs to")
    im.add_argument(
        "--into",
        metavar="DIR",
        help="merge the estate into this platform's specs instead (its platform, endpoint, "
        "hosts and ranges; what it has already is left as it is)",
    )
    spec_dir_args(
        im,
        None,
        aliases=("--ranges-from",),
        help="an existing spec: its platform, Proxmox endpoint, layers, hosts and ranges",
    )
    im.add_argument("--platform", metavar="NAME", help="platform name (without --dir)")
    im.add_argument("--force", action="store_true", help="replace the spec files in --out")
    color_arg(im)
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
    spec_dir_args(ad, positional=False)
    ad.add_argument("--dry-run", action="store_true", help="show what would be written")
    ad.add_argument("--auto-approve", action="store_true", help="do not ask for confirmation")
    color_arg(ad)
    add_connection_args(ad)
    ad.set_defaults(func=cmd_adopt)
    mg = sub.add_parser(
        "merge", help="add the entries of imported specs to a platform's specs (new files)"
    )
    mg.add_argument("source", metavar="FROM", help="the specs to take from (an import's --out)")
    spec_dir_args(mg, help="the platform's spec directory to add them to (default: specs)")
    mg.add_argument("--dry-run", action="store_true", help="show what would be written")
    color_arg(mg)
    mg.set_defaults(func=cmd_merge)


def proxmox_section(api: ProxmoxApi) -> dict[str, Any]:
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
    """`import`: read the estate (guests, firewall, backup jobs, edge), write specs for it
    into --out (or merge them into --into), check that they validate, and say what next."""
    from reconciler.importing.writer import render_specs, spec_files_in, write_files

    if getattr(args, "into", None) is not None:
        return _import_into(args, Path(args.into), out, err)
    target = _import_target(args, err)
    if target is None:
        return EXIT_ERROR
    try:
        read = _read_for_import(args, err)
    except ReconcilerError as exc:
        err.write(f"error: {exc}\n")
        return EXIT_ERROR
    if read is None:
        return EXIT_ERROR
    estate, edge, base = read
    result = render_specs(estate, base, edge, directory=str(target))
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
    return _report_import(args, target, result, estate.source, out, err)


def _import_target(args: argparse.Namespace, err: TextIO) -> Path | None:
    """--out, as a directory the import may write into; None (said on `err`) when not."""
    if not args.out:
        err.write(
            "import needs --out DIR (a new directory for the specs) or --into DIR (an existing "
            "platform's specs, to merge the estate into)\n"
        )
        return None
    target = Path(args.out)
    if target.exists() and not target.is_dir():
        err.write(f"{target} exists and is not a directory\n")
        return None
    if target.is_dir() and any(target.iterdir()) and not args.force:
        err.write(f"{target} is not empty; pass --force to replace its spec files\n")
        return None
    return target


def _read_live(args: argparse.Namespace, spec: Any, provider: Any) -> tuple[Any, Any]:
    """The estate from Proxmox and, unless `--no-edge`, what Traefik and Velocity hold."""
    from reconciler.importing.edge import edge_sources, read_edge
    from reconciler.importing.estate import read_estate

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
    return estate, edge


def _read_for_import(args: argparse.Namespace, err: TextIO) -> tuple[Any, Any, Any] | None:
    """(estate, edge or None, the frame to render in): from the spec in --dir and its
    endpoint (the flags over it), or from the flags alone with --platform."""
    from reconciler.applying.connecting import proxmox_provider
    from reconciler.importing.writer import Base
    from reconciler.providers.proxmox import ProxmoxProvider, connect

    spec: PlatformSpec | None = None
    if args.dir:
        loaded = load_checked(args.dir, err, color=render.use_color(args.color, err))
        if loaded is None:
            return None
        spec, _ = loaded
        base = Base.from_spec(spec)
        provider = proxmox_provider(
            spec,
            connection_override(args),
            insecure=args.insecure,
            max_concurrency=args.proxmox_max_concurrency,
        )
    else:
        override = connection_alone(args)  # no spec: the flags must say it all
        if override is None or not args.platform:
            err.write("import needs --dir SPECS, or --platform NAME with --proxmox-url\n")
            return None
        base = Base.default(args.platform, proxmox_section(override))
        provider = ProxmoxProvider(
            client=connect(override, insecure=args.insecure),
            platform=args.platform,
            source=override.url,
            concurrency=args.proxmox_max_concurrency or override.max_concurrency,
        )
    warn_insecure(args, err)
    estate, edge = _read_live(args, spec, provider)
    return estate, edge, base


def _report_import(
    args: argparse.Namespace, target: Path, result: Any, source: str, out: TextIO, err: TextIO
) -> int:
    """The written specs checked (they must validate), and what to do with them next."""
    from reconciler.loading.loader import load_directory
    from reconciler.planning.provenance import adopt_command

    check = load_directory(target)
    if not check.ok or check.spec is None:
        err.write(
            render.render_diagnostics(check.diagnostics, color=render.use_color(args.color, err))
        )
        err.write(f"{target}: the imported specs do not validate (see the notes above)\n")
        return EXIT_ERROR
    more = ""
    if "edge.yaml" in result.files:
        routes = sum(len(i.routes) for i in check.spec.traefik.values())
        more = f", {len(result.velocity_servers)} Velocity servers, {routes} routes"
    if result.backup_jobs:
        more += f", {len(result.backup_jobs)} backup jobs"
    out.write(
        f"{target}: {len(result.guests)} guests{more} imported from {source}; valid. "
        f"Review them, then `{adopt_command('ADDR...', str(target))}`; to keep them in the "
        f"platform's own specs, `reconciler merge {shlex.quote(str(target))} SPECS` (README "
        '"Bringing an existing estate").\n'
    )
    if result.routes:
        out.write(
            f"{len(result.routes)} routes come from hand-made routers: the first apply adds an "
            "rc- router next to each (see the notes and edge.yaml).\n"
        )
    return EXIT_OK


def _import_into(args: argparse.Namespace, target: Path, out: TextIO, err: TextIO) -> int:
    """`import --into DIR`: the estate rendered in DIR's frame (its platform, endpoint, hosts
    and ranges) and merged into DIR by `importing.merging`: what DIR lacks is added in new files,
    what it has already is left as it is, and a guest it defines otherwise is a conflict."""
    from reconciler.applying.connecting import proxmox_provider
    from reconciler.importing.merging import read_directory, read_tree
    from reconciler.importing.writer import Base, render_specs
    from reconciler.planning.provenance import adopt_command

    shown = str(target)
    if args.out or (args.dir and Path(args.dir) != target):
        err.write(
            f"--into {shown} is the spec directory to merge into, and the platform comes from "
            "it: leave out --out and --dir\n"
        )
        return EXIT_ERROR
    texts, problems = read_directory(target, shown)
    tree, diags = read_tree(texts) if texts and not problems else (None, problems)
    if tree is None:
        what = f"{shown}: the specs do not validate; nothing imported"
        return _invalid(diags, what, err, args.color)
    try:
        provider = proxmox_provider(
            tree.spec,
            connection_override(args),
            insecure=args.insecure,
            max_concurrency=args.proxmox_max_concurrency,
        )
        warn_insecure(args, err)
        estate, edge = _read_live(args, tree.spec, provider)
    except ReconcilerError as exc:
        err.write(f"error: {exc}\n")
        return EXIT_ERROR
    base = Base.from_spec(tree.spec)
    result = render_specs(estate, base, edge, directory=shown)
    for note in result.notes:
        err.write(f"note: {note}\n")
    incoming, diags = read_tree({f"(import)/{n}": t for n, t in result.files.items()})
    if incoming is None:
        what = "the imported specs do not validate; nothing imported"
        return _invalid(diags, what, err, args.color)
    owned = {
        str(g.mark["address"]).removeprefix("guest/")
        for g in estate.guests
        if g.mark.get("platform") == base.name and g.mark.get("address")
    }
    header = [
        f"Imported by `reconciler import --into` from {estate.source} at {estate.read_at}.",
        "Guests not owned yet are only reported: review them, then",
        f"`{adopt_command('ADDRESS', shown)}`.",
    ]
    code = _merge_into(
        tree, incoming, target, header, out, err, keep=True, owned=owned, color=args.color
    )
    if code == EXIT_OK:
        for address, fields in sorted(result.drift.items()):
            err.write(
                f"note: {address}: the first apply after adoption would change "
                + ", ".join(fields)
                + "\n"
            )
    return code


def cmd_merge(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """`merge FROM DIR`: the entries of FROM (an `import --out` directory) DIR lacks, added to
    DIR in new files; see `reconciler.importing.merging`."""
    from reconciler.importing.merging import read_directory, read_tree
    from reconciler.planning.provenance import adopt_command

    source, target = Path(args.source), Path(args.dir)
    if source.resolve() == target.resolve():
        err.write(f"{source} and {target} are the same directory: nothing to merge\n")
        return EXIT_ERROR
    trees = []
    for directory in (source, target):
        texts, problems = read_directory(directory)
        tree, diags = read_tree(texts) if texts and not problems else (None, problems)
        if tree is None:
            what = f"{directory}: the specs do not validate; nothing merged"
            return _invalid(diags or [], what, err, args.color)
        trees.append(tree)
    header = [
        f"Merged by `reconciler merge {shlex.quote(str(source))} {shlex.quote(str(target))}`.",
        "Guests not owned yet are only reported: review them, then",
        f"`{adopt_command('ADDRESS', str(target))}`.",
    ]
    return _merge_into(
        trees[1], trees[0], target, header, out, err, dry_run=args.dry_run, color=args.color
    )


_NOUNS = (
    ("guest", "guest"),
    ("profile", "profile"),
    ("host", "host"),
    ("range", "range"),
    ("firewall", "firewall object"),
    ("backup", "backup job"),
)


def _invalid(diags: list[Diagnostic], what: str, err: TextIO, color: str = "auto") -> int:
    err.write(render.render_diagnostics(diags, color=render.use_color(color, err)))
    err.write(what + "\n")
    return EXIT_ERROR


def _merge_into(
    target: SpecTree,
    incoming: SpecTree,
    directory: Path,
    header: list[str],
    out: TextIO,
    err: TextIO,
    *,
    dry_run: bool = False,
    keep: bool = False,
    owned: set[str] | None = None,
    color: str = "auto",
) -> int:
    """Merge, check the merged directory, and write the new files (never over a file)."""
    from reconciler.importing.merging import merge_specs
    from reconciler.planning.provenance import adopt_command

    shown = str(directory)
    taken = {p.name for p in directory.iterdir()} if directory.is_dir() else set()
    merged = merge_specs(target, incoming, shown, header, keep=keep, owned=owned or (), taken=taken)
    for note in merged.notes:
        err.write(f"note: {note}\n")
    if not merged.ok:
        what = f"{shown}: nothing merged (a merge never overwrites a definition; see above)"
        return _invalid(merged.diagnostics, what, err, color)
    for address in merged.added:
        out.write(f"  + {address}\n")
    if not merged.files:
        out.write(f"{shown}: nothing to merge; it has all {len(merged.present)} entries already\n")
        return EXIT_OK
    if dry_run:
        for name in merged.files:
            out.write(f"would write {directory / name}\n")
        out.write("Dry run: nothing was written.\n")
        return EXIT_OK
    for name, text in merged.files.items():
        with open(directory / name, "x", encoding="utf-8") as f:  # never over a file
            f.write(text)
        out.write(f"wrote {directory / name}\n")
    counts = ", ".join(
        f"{n} {noun}{'s' if n != 1 else ''}" for kind, noun in _NOUNS if (n := merged.count(kind))
    )
    out.write(
        f"{shown}: merged {counts or 'edge entries'} ({len(merged.present)} there already); "
        f"valid. Next: `reconciler plan {shlex.quote(shown)}`, and "
        f"`{adopt_command('ADDR...', shown)}` for what is not adopted yet.\n"
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
            return await adopt(graph, provider, args.addresses, spec_dir=args.dir)
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
    preview = run_async(
        lambda: adopt(graph, provider, args.addresses, dry_run=True, spec_dir=args.dir)
    )
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
