"""`reconciler` command line: validate, plan, observe, apply, run (the service), import, adopt,
check (the Proxmox token's privileges), backup, backups, restore, schema, graph, demo and
completion (shell scripts made from this parser: `reconciler.cli.completion`).

Every command reads its spec directory, `--color` and environment the same way (issue 17):
`live.spec_dir_args`, `live.color_arg`, and `ENVIRONMENT`, which `CommandParser` shows at the
end of each command's --help; tests/cli/test_consistency.py holds every command to them.

Exit codes follow Terraform's: 0 success, 1 error; with `plan --detailed-exitcode`, 0 means no
changes and 2 means changes. Nothing here decides anything: it wires loading, planning and
rendering together and prints.

It starts at once (issue 16): building the parser imports no command's implementation. What a
command runs with (pydantic models, loading, planning, the live clients, the demo's lab) is
imported in the function that runs it, or, for the demo, when its command is parsed
(`CommandParser`); tests/cli/test_startup.py checks what `--version`, `--help` and `validate`
load.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import importlib
import json
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO, TypeAlias, cast

from reconciler.cli import render
from reconciler.cli.backups import add_backup_commands
from reconciler.cli.check import add_check_parser
from reconciler.cli.completion import add_completion_parser
from reconciler.cli.importing import add_import_commands
from reconciler.cli.live import (
    Command,
    add_connection_args,
    cmd_apply,
    cmd_observe,
    color_arg,
    repeatable,
    spec_dir_args,
    target_errors,
    write_errors,
)
from reconciler.cli.service import add_run_parser
from reconciler.model.diagnostics import Severity, has_errors
from reconciler.model.plans import Plan

if TYPE_CHECKING:
    from reconciler.loading.loader import LoadResult
    from reconciler.model.observed import ObservedState

EXIT_OK, EXIT_ERROR, EXIT_CHANGES = 0, 1, 2


# `validate --format json`: {"format": "reconciler/validate", "format_version": 1, "valid": BOOL,
# "diagnostics": [{"severity", "code", "message", "file", "line", "column", "path", ...}]}.
VALIDATE_FORMAT, VALIDATE_FORMAT_VERSION = "reconciler/validate", 1


def _report_load(result: LoadResult, fmt: str, out: TextIO, color: bool) -> None:
    if fmt == "json":
        json.dump(
            {
                "format": VALIDATE_FORMAT,
                "format_version": VALIDATE_FORMAT_VERSION,
                "valid": result.ok,
                "diagnostics": [d.to_json() for d in result.diagnostics],
            },
            out,
            indent=2,
        )
        out.write("\n")
    elif fmt == "github":
        out.write(render.render_github(result.diagnostics))
    else:
        out.write(render.render_diagnostics(result.diagnostics, color=color))


def cmd_validate(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from reconciler.loading.graph import build_graph
    from reconciler.loading.loader import load_directory

    result = load_directory(args.dir)
    color = render.use_color(args.color, out)
    _report_load(result, args.format, out, color)
    if args.format == "text":
        plural = render.plural
        errors = sum(d.severity is Severity.ERROR for d in result.diagnostics)
        warnings = len(result.diagnostics) - errors
        files = len(result.files)  # found, not only parsed: a broken file still counts
        if result.ok and result.spec is not None:
            graph = build_graph(result.spec, result.source)
            out.write(
                f"{args.dir}: valid ({plural(files, 'file')}, "
                f"{plural(len(result.spec.guests), 'guest')}, "
                f"{plural(len(graph.resources), 'resource')}"
                + (f", {plural(warnings, 'warning')}" if warnings else "")
                + ")\n"
            )
        else:
            out.write(
                f"{args.dir}: {plural(errors, 'error')}, {plural(warnings, 'warning')} "
                f"in {plural(files, 'file')}\n"
            )
    return EXIT_OK if result.ok else EXIT_ERROR


def _load_observed(path: str) -> ObservedState:
    from importlib import resources

    from reconciler.model.observed import ObservedState

    text = (
        resources.files("reconciler.data").joinpath("sample-observed.json").read_text()
        if path == "sample"
        else Path(path).read_text(encoding="utf-8")
    )
    return ObservedState.model_validate_json(text)


def build_plan(args: argparse.Namespace, err: TextIO) -> Plan | None:
    from reconciler.loading.graph import build_graph
    from reconciler.loading.loader import load_directory
    from reconciler.loading.revisions import load_revision
    from reconciler.model.observed import ObservedState
    from reconciler.planning.observed_policies import live_isolation
    from reconciler.planning.planner import converged_state, make_plan

    result = load_directory(args.dir)
    color = render.use_color(args.color, err)
    if not result.ok or result.spec is None:
        err.write(render.render_diagnostics(result.diagnostics, color=color))
        err.write(f"{args.dir}: the specs do not validate; no plan made\n")
        return None
    graph = build_graph(result.spec, result.source)
    if args.base:
        base = load_revision(args.dir, args.base)
        if has_errors(base.diagnostics) or (base.spec is None and base.diagnostics):
            err.write(render.render_diagnostics(base.diagnostics, color=color))
            err.write(f"the specs at {args.base} do not validate; planning against nothing\n")
        observed = (
            converged_state(build_graph(base.spec, base.source))
            if base.spec is not None and not has_errors(base.diagnostics)
            else ObservedState()
        )
        observed = observed.model_copy(update={"source": f"specs at {args.base}"})
    elif args.observed:
        try:
            observed = _load_observed(args.observed)
        except (OSError, ValueError) as exc:
            err.write(f"{args.observed}: not an observed-state snapshot: {exc}\n")
            return None
    else:
        from reconciler.cli.live import live_plan

        live = live_plan(args, result.spec, graph, err)
        return _with_spec_warnings(live, result) if live is not None else None
    wrong = target_errors(args.target, graph, observed)
    if wrong:
        write_errors(wrong, err)
        return None
    # A snapshot is what was live: check its firewall against the policies as a live plan does.
    checks = [live_isolation(result.spec)] if args.observed else []
    plan = make_plan(
        graph,
        observed,
        allow_destroy=args.allow_destroy,
        targets=args.target,
        observed_checks=checks,
        final_backups=not args.no_final_backup,
    )
    return _with_spec_warnings(plan, result)


def _with_spec_warnings(plan: Plan, result: LoadResult) -> Plan:
    if not result.diagnostics:
        return plan
    from dataclasses import replace

    return replace(plan, diagnostics=(*result.diagnostics, *plan.diagnostics))


def cmd_plan(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    plan = build_plan(args, err)
    if plan is None:
        return EXIT_ERROR
    write_plan(plan, args.format, out, render.use_color(args.color, out))
    if args.out:
        Path(args.out).write_text(render.render_json(plan), encoding="utf-8")
    if plan.errored:
        return EXIT_ERROR
    if args.detailed_exitcode and plan.drifted:
        return EXIT_CHANGES
    return EXIT_OK


def write_plan(plan: Plan, fmt: str, out: TextIO, color: bool) -> None:
    if fmt == "json":
        out.write(render.render_json(plan))
    elif fmt == "markdown":
        out.write(render.render_markdown(plan))
    else:
        out.write(render.render_text(plan, color=color))


def cmd_schema(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from reconciler.loading.schema import schema_text

    text = schema_text()
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    else:
        out.write(text)
    return EXIT_OK


def cmd_graph(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from reconciler.loading.graph import build_graph
    from reconciler.loading.loader import load_directory

    result = load_directory(args.dir)
    if not result.ok or result.spec is None:
        err.write(
            render.render_diagnostics(result.diagnostics, color=render.use_color(args.color, err))
        )
        return EXIT_ERROR
    graph = build_graph(result.spec, result.source)
    bold = render.use_color(args.color, out)
    current = -1
    for res in graph.ordered():
        wave = graph.waves[res.address]
        if wave != current:
            out.write(render.bold(f"wave {wave}:", bold) + "\n")
            current = wave
        deps = f"  <- {', '.join(res.depends_on)}" if res.depends_on else ""
        out.write(f"  {res.address}{deps}\n")
    return EXIT_OK


class VersionAction(argparse.Action):
    """`--version`: the installed version, read only when asked (reconciler.__version__)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(
            option_strings, argparse.SUPPRESS, nargs=0, help="print the version and exit"
        )

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        from reconciler import __version__

        sys.stdout.write(f"reconciler {__version__}\n")
        parser.exit()


def parser() -> argparse.ArgumentParser:
    """The command line: one function a group of commands, each naming the function that runs
    it (`func`, a `Command`)."""
    p = Parser(prog="reconciler", description=DESCRIPTION, epilog=EPILOG)
    p.add_argument("--version", action=VersionAction)
    # Every command's parser is a CommandParser; the groups need only an ArgumentParser's API.
    sub = cast(
        Subparsers, p.add_subparsers(dest="command", required=True, parser_class=CommandParser)
    )
    _add_spec_commands(sub)
    _add_plan_parser(sub)
    _add_live_commands(sub)
    add_run_parser(sub)
    add_import_commands(sub, add_connection_args)
    sub.add_parser(
        "init",
        help="start a platform: write a minimal spec from the cluster (or --nodes)",
        deferred_args="reconciler.cli.init:add_init_args",
    ).set_defaults(func=deferred("reconciler.cli.init:cmd_init"))
    add_check_parser(sub, add_connection_args)
    add_backup_commands(sub)
    add_completion_parser(sub)
    _add_demo_parser(sub)
    sub.add_parser(
        "lab",
        help="a fake Proxmox VE of your own to try the CLI on, until Ctrl-C",
        deferred_args="reconciler.cli.lab:add_lab_args",
    ).set_defaults(func=deferred("reconciler.cli.lab:cmd_lab"))
    return p


DESCRIPTION = (
    "Keep a Proxmox VE platform as its YAML specs declare it: check the specs, plan and apply "
    "the changes by hand, or run as a service that keeps it converged."
)
EPILOG = (
    "Each command takes the spec directory as DIR or --dir DIR (default: specs) and has its "
    "own --help. Exit codes: 0 success, 1 error (plan --detailed-exitcode: 2 for changes)."
)
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

# Every RECONCILER_* variable a command reads, as (command, or "" for any, flag, variable):
# each command's --help lists those of its flags. tests/cli/test_consistency.py checks that
# every variable the CLI reads is here.
ENVIRONMENT: tuple[tuple[str, str, str], ...] = (
    ("", "--redis-url", "RECONCILER_REDIS_URL"),
    ("", "--lease-name", "RECONCILER_LEASE_NAME"),
    ("run", "dir", "RECONCILER_DIR"),
    *(
        ("run", "--" + name.lower().replace("_", "-"), "RECONCILER_" + name)
        for name in (
            "GIT_URL",
            "GIT_BRANCH",
            "GIT_SUBDIR",
            "INTERVAL",
            "INVENTORY_INTERVAL",
            "EDGE_INTERVAL",
            "SOURCE_INTERVAL",
            "WATCH_INTERVAL",
            "STATE_DIR",
            "LISTEN",
            "STATUS_TOKEN_ENV",
            "STATUS_TOKEN_FILE",
            "LEASE_TTL",
            "HOLDER",
            "LOG_FORMAT",
            "LOG_LEVEL",
        )
    ),
    ("", "--color", "NO_COLOR"),
    ("", "--proxmox-token-env", "PVE_TOKEN_SECRET"),
    ("lab", "--password-env", "PVE_PASSWORD"),
)
# What a variable does where it is not the default of its flag.
ENV_MEANING = {
    "NO_COLOR": "when set, --color auto means never",
    "PVE_TOKEN_SECRET": "the API token's secret, where neither --proxmox-token-env nor the "
    "spec's proxmox.token_secret names a variable",
    "PVE_PASSWORD": "the lab's password when set (the default of --password-env); else one is made",
}


def environment_help(command: str, p: argparse.ArgumentParser) -> str:
    """The environment section of a command's --help: each variable it reads, and the flag
    (or argument) it stands in for; "" when it reads none."""
    names = {s for a in p._actions for s in (*a.option_strings, a.dest)}
    rows = [(var, flag) for cmd, flag, var in ENVIRONMENT if cmd in ("", command) and flag in names]
    if not rows:
        return ""
    width = max(len(var) for var, _ in rows)
    lines = [
        f"  {var.ljust(width)}  "
        + ENV_MEANING.get(var, f"default of {flag if flag.startswith('-') else flag.upper()}")
        for var, flag in rows
    ]
    return "environment:\n" + "\n".join(lines) + "\n"


def _resolve(target: str) -> Any:
    """`"package.module:name"` -> that object, its module imported now."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def deferred(target: str) -> Command:
    """The command `"module:function"`, imported only when it runs."""

    def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
        command: Command = _resolve(target)
        return command(args, out, err)

    return run


class Parser(argparse.ArgumentParser):
    """argparse's parser, but a command line it cannot parse exits 1 (an error), not argparse's
    2: with `plan --detailed-exitcode`, 2 means changes, and a mistyped flag in a CI script
    must not read as that."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message}\n")


class CommandParser(Parser):
    """A command's parser. With `deferred_args` ("module:function"), the command's own flags
    are defined beside an implementation too heavy to import for every command (the demo's,
    beside its lab): they are added when this command is parsed (its `--help` too), never when
    another is."""

    def __init__(self, *args: Any, deferred_args: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deferred_args = deferred_args

    def add_deferred_args(self) -> None:
        """Add the command's deferred flags now (parsing does; so does `completion`)."""
        if self._deferred_args is not None:
            add_args: Callable[[argparse.ArgumentParser], None] = _resolve(self._deferred_args)
            self._deferred_args = None
            add_args(self)

    def parse_known_args(self, *args: Any, **kwargs: Any) -> Any:
        self.add_deferred_args()
        return super().parse_known_args(*args, **kwargs)

    def format_help(self) -> str:
        """argparse's help, then the environment variables the command reads."""
        env = environment_help(self.prog.rsplit(" ", 1)[-1], self)
        return super().format_help() + ("\n" + env if env else "")


def _scope_opts(sp: argparse.ArgumentParser) -> None:
    """What a plan covers, the same for `plan` and `apply`."""
    repeatable(sp, "--target", "ADDR", "only this resource (and what it depends on); repeatable")
    sp.add_argument(
        "--allow-destroy",
        action="store_true",
        help="allow what destroys data: deletes of owned resources that left the spec, "
        "replaces, detached volumes",
    )
    sp.add_argument(
        "--no-final-backup",
        action="store_true",
        help="destroy a guest a backup job selects without backing it up first (the plan says so)",
    )


def _add_spec_commands(sub: Subparsers) -> None:
    """The commands that read only the specs: validate, schema, graph."""
    v = sub.add_parser("validate", help="check the specs; exit 0 when clean, 1 otherwise")
    spec_dir_args(v)
    v.add_argument(
        "--format",
        choices=["text", "json", "github"],
        default="text",
        help="json: {format: reconciler/validate, format_version: 1, valid, diagnostics}; "
        "github: workflow commands that annotate the files",
    )
    color_arg(v)
    v.set_defaults(func=cmd_validate)
    s = sub.add_parser("schema", help="print the JSON Schema of a spec file")
    s.add_argument("--out", metavar="FILE")
    s.set_defaults(func=cmd_schema)
    g = sub.add_parser("graph", help="print the desired resources by dependency wave")
    spec_dir_args(g)
    color_arg(g)
    g.set_defaults(func=cmd_graph)


def _add_plan_parser(sub: Subparsers) -> None:
    pl = sub.add_parser("plan", help="show what would change")
    spec_dir_args(pl)
    src = pl.add_mutually_exclusive_group()
    src.add_argument("--observed", metavar="FILE", help="plan against an observed-state snapshot")
    src.add_argument("--base", metavar="GITREF", help="plan against the specs at a git revision")
    pl.add_argument("--format", choices=["text", "json", "markdown"], default="text")
    pl.add_argument(
        "--detailed-exitcode",
        action="store_true",
        help="exit 0 without changes, 2 with changes, 1 on error",
    )
    pl.add_argument("--out", metavar="FILE", help="also save the plan as JSON")
    _scope_opts(pl)
    color_arg(pl)
    add_connection_args(pl)
    pl.set_defaults(func=cmd_plan)


def _add_live_commands(sub: Subparsers) -> None:
    """The commands on the live platform: observe, apply."""
    ob = sub.add_parser("observe", help="observe the live platform; write a snapshot")
    spec_dir_args(ob)
    ob.add_argument("--out", metavar="FILE", help="write the snapshot here (default: stdout)")
    ob.add_argument(
        "--format",
        choices=["json", "text"],
        default="json",
        help="json: the snapshot (reconciler/observed-state, what plan --observed reads); "
        "text: a summary for people (on stdout, with --out too)",
    )
    color_arg(ob)
    add_connection_args(ob)
    ob.set_defaults(func=cmd_observe)
    ap = sub.add_parser(
        "apply",
        help="plan, confirm, and apply to the live platform",
        epilog=render.APPLY_JSON,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    spec_dir_args(ap)
    ap.add_argument("--auto-approve", action="store_true", help="do not ask for confirmation")
    ap.add_argument(
        "--plan",
        metavar="FILE",
        help="apply this saved JSON plan, only if the platform is still as it saw",
    )
    _scope_opts(ap)
    ap.add_argument(
        "--dry-run", action="store_true", help="walk the apply without changing anything"
    )
    ap.add_argument(
        "--format",
        choices=["text", "json"],
        default="text",
        help="json: the reconciler/apply document on stdout (below); the plan goes to stderr",
    )
    color_arg(ap)
    add_connection_args(ap)
    ap.set_defaults(func=cmd_apply)


def _add_demo_parser(sub: Subparsers) -> None:
    d = sub.add_parser(
        "demo",
        help="the demo: a fake Proxmox VE, simulators and Traefik, converged, broken and healed",
        deferred_args="reconciler.demo.script:add_demo_args",
    )
    spec_dir_args(d)
    color_arg(d)
    d.set_defaults(func=deferred("reconciler.demo.script:cmd_demo_live"))


# A command runs for seconds and allocates many small objects that live until it ends (the
# specs, every observed guest, the plan): CPython's first-generation threshold (700) would
# look for cycles hundreds of times in a plan of 1000 guests, 10% of its CPU. The service
# (`run`) keeps the defaults: it runs for months.
_COMMAND_GC = (50_000, 20, 20)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    command: Command = args.func
    if args.command == "run":
        return command(args, sys.stdout, sys.stderr)
    before = gc.get_threshold()
    gc.set_threshold(*_COMMAND_GC)
    try:
        return command(args, sys.stdout, sys.stderr)
    finally:
        gc.set_threshold(*before)


def entry() -> NoReturn:
    """The `reconciler` console script: `main`, then out without tearing the heap down.
    Python frees every object one by one at exit: after a plan of 1000 guests that took ~0.1 s
    once the plan was printed (issue 16). What the interpreter's exit does that matters is done
    first, in its order: `threading._shutdown` (threading's own exit hooks, which stop idle
    executor workers such as Apprise's, then every non-daemon thread joined), the exit handlers
    (logging, temporary directories), output flushed. Without that hook (another Python), or
    with output that cannot be flushed, the interpreter's own exit runs. A reader that went
    away (a pipe into `head`) ends the command with 1 and no traceback."""
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`reconciler graph | head`): no traceback for that. Python's
        # advice: stdout onto /dev/null, so that no later flush tries again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = EXIT_ERROR
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is None:
        sys.exit(code)
    shutdown()
    atexit._run_exitfuncs()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        sys.exit(code)
    os._exit(code)


if __name__ == "__main__":
    entry()
