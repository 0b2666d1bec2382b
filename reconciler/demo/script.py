"""The demo's story, told on a lab (`reconciler.demo.lab`): `reconciler demo` runs it through
`cmd_demo_live`, the tests through `run_demo`.

    1. the platform is empty: plan, apply with progress, again until the plan is empty (what
       the spec gates on the agents' readiness follows once the new guests' agents answer);
       each VM cloned from a template is read back from Proxmox and said in one line (its
       template, its cloud-init settings, its grown disk, its pool, its guest agent's answer),
       and the DNS records are asked of the lab's named;
    2. break it the way production breaks: Velocity restarts and forgets its servers, a game
       server's memory is changed by hand, the agent-port firewall rule is deleted, a container
       nobody declared appears in the game range, a game server crashes (its agent not ready),
       another game server is destroyed by hand (after the backup jobs ran once), and a DNS
       record is changed by hand (where named runs);
    3. one cycle detects and heals each (the plan is shown first; the foreign container is
       reported, never touched; the destroyed server comes back from its newest backup), the
       agent comes back, the next cycle restores what was withheld, and the last plan is empty;
    4. a pull request moves a game server to another node: the plan says migrate (`>`), the
       apply moves it, and its disks (the world) are the very same volumes after;
    then the notifications the controller's notifier sent (fed after each cycle as the service
    feeds it, delivered by Apprise to the lab's receiver) are listed with the summary;
    5. stop the lab and say where its state and logs are.

Breaking goes through the same doors people and outages use: the Proxmox API (proxmoxer against
fakepve), the bridge simulator's restart, the agent's own status, a signed DNS update.
`--offline` keeps the old demo: validate the specs and plan them against the shipped sample
snapshot, with nothing started.
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import tempfile
import textwrap
import time
import traceback
import urllib.parse
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, TextIO

import anyio
import dns.rdata
import dns.rdataclass
from proxmoxer.core import ResourceException

from reconciler import __version__
from reconciler.applying.connecting import connect_platform
from reconciler.applying.converging import Convergence, converge
from reconciler.applying.executor import Outcome, Result
from reconciler.cli import render
from reconciler.controller.metrics import Metrics
from reconciler.controller.notify import Notifier
from reconciler.controller.status import (
    CycleKind,
    StatusBoard,
    cycle_outcome,
    plan_verdicts,
)
from reconciler.demo.lab import TEMPLATE, Lab, Received, start_lab
from reconciler.loading.graph import build_graph
from reconciler.loading.loader import load_directory
from reconciler.model.diagnostics import Severity
from reconciler.model.errors import ReconcilerError
from reconciler.model.observed import ObservedState
from reconciler.model.plans import Action, Cause, Change, Plan, shown_address
from reconciler.model.resources import DesiredGraph, Kind, Resource
from reconciler.model.spec import PlatformSpec, selected_guests
from reconciler.planning.observed_policies import live_isolation
from reconciler.planning.planner import make_plan
from reconciler.providers.dns import mark_name, value_of
from reconciler.simulators.processes import PartMissing

EXIT_OK, EXIT_ERROR = 0, 1
WIDTH = 100
_BOLD, _DIM, _GREEN, _YELLOW, _RED, _CYAN = (
    "\033[1m",
    "\033[2m",
    "\033[32m",
    "\033[33m",
    "\033[31m",
    "\033[36m",
)
_RESET = "\033[0m"
FOREIGN_NAME = "hand-made"
MOVED = "mc-survival"
# Where the DNS break points a record by hand: documentation addresses (RFC 5737, RFC 3849).
WRONG_ADDRESS = {"A": "198.51.100.7", "AAAA": "2001:db8::bad"}


# --- the command ------------------------------------------------------------------------------


def add_demo_args(p: argparse.ArgumentParser) -> None:
    """The demo's own flags (the CLI adds `dir` and `--color`)."""
    p.add_argument(
        "--offline",
        action="store_true",
        help="start nothing: validate the specs and plan them against the sample snapshot",
    )
    p.add_argument(
        "--state-dir", metavar="DIR", help="keep state and logs here (default: a new temp dir)"
    )
    p.add_argument(
        "--time-scale",
        type=float,
        default=0.0,
        metavar="X",
        help="fakepve's real seconds per Proxmox second (default 0: tasks finish at once)",
    )
    p.add_argument(
        "--no-redis",
        action="store_true",
        help="feed the runtime Traefik through a file even when redis-server is installed",
    )
    p.add_argument(
        "--no-dns",
        action="store_true",
        help="leave the spec's DNS records out even when BIND's named is installed",
    )


def cmd_demo_live(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """`reconciler demo`: the live demo, or with `--offline` the offline validate and plan."""
    directory = str(getattr(args, "dir", "specs"))
    color = render.use_color(getattr(args, "color", "auto"), out)
    if getattr(args, "offline", False):
        return run_offline(directory, out, err, color=color)
    state = getattr(args, "state_dir", None)
    state_dir = Path(state) if state else Path(tempfile.mkdtemp(prefix="reconciler-demo-"))
    try:
        result = run_demo(
            directory,
            out,
            color=color,
            state_dir=state_dir,
            time_scale=float(getattr(args, "time_scale", 0.0) or 0.0),
            use_redis=False if getattr(args, "no_redis", False) else None,
            use_named=not getattr(args, "no_dns", False),
        )
    except PartMissing as exc:
        err.write(f"error: the demo needs a part that is not installed: {exc}\n")
        return EXIT_ERROR
    if result.error:
        err.write(f"error: {result.error}\n")
    return EXIT_OK if result.ok else EXIT_ERROR


def run_offline(directory: str, out: TextIO, err: TextIO, *, color: bool) -> int:
    """The demo before there was a lab: validate, then plan against the shipped snapshot."""
    out.write(f"== reconciler {__version__}: validate {directory}\n")
    loaded = load_directory(directory)
    out.write(render.render_diagnostics(loaded.diagnostics, color=color))
    if not loaded.ok or loaded.spec is None:
        errors = sum(d.severity is Severity.ERROR for d in loaded.diagnostics)
        out.write(f"{directory}: {errors} errors in {len(loaded.files)} files\n")
        return EXIT_ERROR
    graph = build_graph(loaded.spec, loaded.source)
    out.write(
        f"{directory}: valid ({len(loaded.files)} files, {len(loaded.spec.guests)} guests, "
        f"{len(graph.resources)} resources)\n"
    )
    out.write(
        f"\n== plan {directory} against the sample observed state "
        "(reconciler/data/sample-observed.json)\n"
    )
    text = resources.files("reconciler.data").joinpath("sample-observed.json").read_text()
    try:
        observed = ObservedState.model_validate_json(text)
    except ValueError as exc:
        err.write(f"the sample snapshot does not load: {exc}\n")
        return EXIT_ERROR
    plan = make_plan(graph, observed, observed_checks=[live_isolation(loaded.spec)])
    if loaded.diagnostics:
        plan = replace(plan, diagnostics=(*loaded.diagnostics, *plan.diagnostics))
    out.write(render.render_text(plan, color=color))
    return EXIT_OK


# --- what the demo reports --------------------------------------------------------------------


@dataclass
class Break:
    """One thing broken on purpose, and what became of it."""

    key: str  # velocity, memory, firewall, foreign, unready, destroyed, dns
    what: str  # for people, with how it was done
    short: str  # for the summary table
    expect: tuple[str, ...]  # the addresses (or `foreign:<vmid>`) the plan should show
    guest: str = ""  # the guest it happened to
    broken_at: float = 0.0
    detected: list[str] = field(default_factory=list)  # the plan lines that showed it
    healed: str = ""  # how it healed, for people
    healed_at: float | None = None
    ok: bool = False  # healed (or, for the foreign container, left untouched)


@dataclass
class BuiltVm:
    """A VM the first apply built from a template, as read back from Proxmox afterwards."""

    name: str
    vmid: int
    node: str
    template: int | None  # the template the plan cloned it from (its vmid)
    template_name: str
    user: str  # ciuser
    ssh_keys: int  # how many keys sshkeys holds
    ipconfig0: str
    disk: str  # the boot disk's size in its config (`16G`)
    template_disk: str  # the template's boot disk's size (`2G`)
    pool: str  # its pool, "" when none
    agent: bool  # agent/ping answered
    running: bool

    @property
    def ok(self) -> bool:
        return self.template is not None and self.running and self.agent and bool(self.user)

    def line(self) -> str:
        """`bastion (vmid 109 on pve-core) is a VM cloned from template 200 ...`: for people."""
        if self.template is None:
            return f"{self.name} (vmid {self.vmid}) was NOT cloned from a template"
        keys = f"{self.ssh_keys} SSH key" + ("" if self.ssh_keys == 1 else "s")
        where = f", in pool {self.pool}" if self.pool else ""
        power = "started" if self.running else "NOT running"
        agent = "its guest agent answered" if self.agent else "its guest agent did NOT answer"
        return (
            f"{self.name} (vmid {self.vmid} on {self.node}) is a VM cloned from template "
            f"{self.template} {self.template_name!r}, configured by cloud-init (user "
            f"{self.user}, {keys}, ipconfig0 {self.ipconfig0}), its disk grown from "
            f"{self.template_disk} to {self.disk}{where}; {power}, {agent}"
        )


@dataclass
class Step:
    title: str
    seconds: float = 0.0
    plans: list[Plan] = field(default_factory=list)  # the plans shown, in order
    ok: bool = True
    began: float = field(default_factory=time.monotonic)

    def finish(self) -> None:
        self.seconds = time.monotonic() - self.began


@dataclass
class DemoResult:
    state_dir: Path
    steps: list[Step] = field(default_factory=list)
    breaks: list[Break] = field(default_factory=list)
    detect_plan: Plan | None = None  # the plan that saw the breaks
    final_plan: Plan | None = None
    foreign_untouched: bool = False
    vms: list[BuiltVm] = field(default_factory=list)  # the VMs cloned in step 1
    moved: str = ""  # the move's outcome, for people ("" when the demo had no second node)
    dns_records: int = 0  # the record sets the spec wants, when the lab runs named
    dns_answered: int = 0  # ... that named answered as the spec says, with their mark
    notifications: list[dict[str, Any]] = field(default_factory=list)  # the notifier's records
    received: list[Received] = field(default_factory=list)  # what the lab's receiver got
    pids: dict[str, int] = field(default_factory=dict)  # every process the lab started
    seconds: float = 0.0
    error: str = ""

    @property
    def ok(self) -> bool:
        return (
            not self.error
            and self.final_plan is not None
            and not self.final_plan.has_changes
            and not self.final_plan.errored
            and all(s.ok for s in self.steps)
            and all(b.ok for b in self.breaks)
            and all(d == "sent" for n in self.notifications for d in n.get("targets", {}).values())
            and all(r.authorized for r in self.received)
        )


# --- output -----------------------------------------------------------------------------------


class Screen:
    """What the reader sees: headings, explanations, plans, progress, the summary table."""

    def __init__(self, out: TextIO, color: bool) -> None:
        self.out = out
        self.color = color

    def paint(self, code: str, text: str) -> str:
        return f"{code}{text}{_RESET}" if self.color else text

    def line(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def heading(self, text: str) -> None:
        self.line()
        self.line(self.paint(_BOLD + _CYAN, f"== {text}"))

    def say(self, text: str, *, hang: int = 0) -> None:
        """Plain text, wrapped; `hang` indents the lines after the first."""
        lines = textwrap.wrap(text, WIDTH - 3, subsequent_indent=" " * hang, break_on_hyphens=False)
        for para in lines:
            self.line("   " + para)

    def plan(self, plan: Plan) -> None:
        """A plan, compact: updates and replaces field by field through the text renderer,
        creates and deletes one line each (a create holds nothing the spec does not say), and by
        kind when there are many; warnings that something is withheld folded into one list."""
        self.line(f"   Observed: {plan.observed_source} at {plan.observed_at}")
        detailed = (Action.UPDATE, Action.MIGRATE, Action.REPLACE)
        many = len(plan.actions) > 25
        if many:  # creates and deletes by kind; what changes in place still field by field
            groups: dict[tuple[Action, Kind], list[str]] = {}
            for change in plan.actions:
                if change.action not in detailed:
                    name = change.address.removeprefix(change.kind.value + "/")
                    groups.setdefault((change.action, change.kind), []).append(name)
            for (action, kind), names in groups.items():
                head = f"{action.symbol} {len(names):>2} {kind.value}".ljust(22)
                names = [n for n in names if n != kind.value]  # firewall/cluster is one
                if kind is Kind.DNS:  # names under a few zones: say how many in each
                    names = _by_zone(names, plan, action)
                self.wrapped(self.paint(_action_color(action), head), names, 22)
        for change in plan.actions:
            if change.action in detailed:
                for line in render.render_change(change, color=self.color):
                    self.line("     " + line)
            elif not many:
                head = _head(change)
                if change.cause is Cause.RESTORE:  # not empty: say which backup
                    head += f"  ({change.reason})"
                self.line("     " + self.paint(_action_color(change.action), head))
        if plan.foreign:
            self.line("   Not owned by the controller (reported, never touched):")
            for f in plan.foreign:
                self.line("     " + render.foreign_line(f))
        withheld = [d for d in plan.diagnostics if d.code == "withheld"]
        if len(withheld) > 3:
            self.wrapped(
                f"   {len(withheld)} withheld until their guests run and their agents are ready:",
                [d.address for d in withheld],
                0,
            )
        else:
            for d in withheld:
                self.say(f"{self.paint(_YELLOW, '!')} {d.message}", hang=2)
        others = [d for d in plan.diagnostics if d.code != "withheld"]
        if others:
            text = render.render_diagnostics(others, color=self.color)
            for line in text.rstrip("\n").split("\n"):
                self.line("   " + line)
        self.line("   " + self.paint(_BOLD, render.summary_line(plan)))

    def wrapped(self, head: str, items: list[str], indent: int) -> None:
        """`head` then `items` comma-separated, wrapped under themselves (or on new lines)."""
        if indent:
            body = _wrap(", ".join(items), WIDTH - 7 - indent) or [""]
            self.line(f"     {head}  {body[0]}")
            for more in body[1:]:
                self.line(" " * (7 + indent) + more)
            return
        self.line(head)
        for more in _wrap(", ".join(items), WIDTH - 7):
            self.line("       " + more)

    def progress(self, plan: Plan, clock: Callable[[], float]) -> ProgressLines:
        return ProgressLines(self, plan, clock)


def _severity_color(severity: str) -> str:
    """A notification's severity as a color."""
    return {"error": _RED, "warning": _YELLOW}.get(severity, "")


def _action_color(action: Action) -> str:
    return {
        Action.CREATE: _GREEN,
        Action.UPDATE: _YELLOW,
        Action.MIGRATE: _YELLOW,
        Action.REPLACE: _YELLOW,
        Action.DELETE: _RED,
    }.get(action, "")


def _by_zone(names: list[str], plan: Plan, action: Action) -> list[str]:
    """`22 in internal.zpack.dev`, ...: the DNS record sets of `action` in `plan`, counted by
    zone (a list of 30 names says less than where they go)."""
    zones: Counter[str] = Counter()
    for c in plan.actions:
        if c.kind is Kind.DNS and c.action is action:
            zones[str((c.after or c.before or {}).get("zone", "?"))] += 1
    if sum(zones.values()) != len(names):
        return names
    return [f"{n} in {zone}" for zone, n in sorted(zones.items())]


def _head(change: Change) -> str:
    """`+ guest/mc-x  (vmid 1000 on pve-a)`: a change in one line, for creates, deletes and
    progress."""
    return f"{change.action.symbol} {shown_address(change)}{render.ident(change)}"


class ProgressLines:
    """Progress as changes apply: a line a change for small applies; for big ones a line a
    dependency wave (what it did, how long it took), and every failure as it happens."""

    def __init__(self, screen: Screen, plan: Plan, clock: Callable[[], float]) -> None:
        self.screen = screen
        self.clock = clock
        self.per_change = len(plan.actions) <= 12
        self.wave_total = Counter(c.wave for c in plan.actions)
        self.wave_done: Counter[int] = Counter()
        self.wave_what: dict[int, Counter[str]] = {}
        self.wave_started: dict[int, float] = {}
        self.done_at: dict[str, float] = {}  # address -> when it was applied (demo clock)
        self.failed = 0

    def __call__(self, result: Result, done: int, total: int) -> None:
        c, s = result.change, self.screen
        if result.outcome is Outcome.DONE:
            self.done_at[c.address] = self.clock()
        else:
            self.failed += 1
        ok = result.outcome is Outcome.DONE
        mark = s.paint(_GREEN if ok else _RED, result.outcome.value)
        if self.per_change or not ok:
            took = f"  {result.seconds:.2f} s" if result.seconds >= 0.01 else ""
            s.line(f"     [{done:>{len(str(total))}}/{total}] {_head(c)}: {mark}{took}")
            if result.error:
                s.line(f"         {result.error}")
            if self.per_change:
                return
        wave = c.wave
        self.wave_started.setdefault(wave, self.clock() - result.seconds)
        self.wave_done[wave] += 1
        verb = {"create": "created", "update": "updated", "replace": "replaced"}
        self.wave_what.setdefault(wave, Counter())[
            f"{c.kind.value} {verb.get(c.action.value, 'deleted')}"
        ] += 1
        if self.wave_done[wave] == self.wave_total[wave]:
            what = ", ".join(f"{n} {k}" for k, n in self.wave_what[wave].items())
            spent = self.clock() - self.wave_started[wave]
            head = f"     [{done:>{len(str(total))}}/{total}] wave {wave} done in {spent:.1f} s: "
            body = _wrap(what, WIDTH - len(head))
            s.line(head + body[0])
            for more in body[1:]:
                s.line(" " * len(head) + more)


# --- the story --------------------------------------------------------------------------------


def run_demo(
    directory: str,
    out: TextIO,
    *,
    color: bool = False,
    state_dir: Path,
    time_scale: float = 0.0,
    use_redis: bool | None = None,
    use_named: bool = True,
) -> DemoResult:
    """Run the whole demo, printing as it goes; the lab is stopped whatever happens.
    `use_named` False leaves DNS out even where named is installed."""
    screen = Screen(out, color)
    began = time.monotonic()
    result = DemoResult(state_dir=state_dir)
    loaded = load_directory(directory)
    if not loaded.ok or loaded.spec is None:
        out.write(render.render_diagnostics(loaded.diagnostics, color=color))
        result.error = f"{directory}: the specs do not validate"
        return result
    spec = loaded.spec
    graph = build_graph(spec, loaded.source)
    screen.line(
        screen.paint(_BOLD, f"reconciler {__version__} demo: platform {spec.platform.name}")
        + f" from {directory}/ ({len(spec.guests)} guests, {len(graph.resources)} resources)"
    )
    screen.say(
        "Everything runs on this machine, on 127.0.0.1: a fake Proxmox VE, simulated agents and "
        "Velocity, real Traefik, a real BIND for the DNS records (where installed), and a "
        "receiver for the notifications. Nothing outside is touched."
    )
    screen.line()
    screen.line(f"   Starting the lab (state and logs: {state_dir})")
    lab = start_lab(
        spec, state_dir, time_scale=time_scale, use_redis=use_redis, use_named=use_named
    )
    result.pids = dict(lab.pids)
    try:
        width = max(len(p.name) for p in lab.parts)
        for part in lab.parts:
            screen.line(f"     {part.name.ljust(width)}  {part.where}")
            screen.line(f"     {' ' * width}  {screen.paint(_DIM, part.what)}")
        if lab.dns_skipped:  # the spec's own DNS server is not here: its records are left out
            screen.line("   " + screen.paint(_YELLOW, lab.dns_skipped))
            lab.events.write("dns-skipped", why=lab.dns_skipped)
            spec = lab.scoped(spec)
            graph = build_graph(spec, loaded.source)
        screen.line(f"   Lab ready in {time.monotonic() - began:.1f} s.")
        story = Story(screen, lab, spec, graph, result, spec_dir=Path(directory))
        try:
            story.run()
        except Exception as exc:  # a demo reports and stops cleanly, whatever failed
            result.error = f"{type(exc).__name__}: {exc}"
            detail = "" if isinstance(exc, ReconcilerError) else traceback.format_exc()
            lab.events.write("error", error=result.error, traceback=detail or None)
            screen.line(screen.paint(_RED, f"   The demo stopped: {result.error}"))
        story.deliver()
        result.seconds = time.monotonic() - began
        story.summary()
        lab.events.write("finished", ok=result.ok, seconds=round(result.seconds, 2))
    finally:
        screen.heading("5. Stopping everything the demo started")
        lab.stop()
    screen.say(
        f"Stopped {', '.join(lab.pids)} (processes {', '.join(map(str, lab.pids.values()))}), "
        "the Velocity and agent simulators"
        + (", the notification receiver" if lab.receiver is not None else "")
        + ", and put back the environment."
    )
    screen.line(f"   State and logs: {state_dir}")
    for path in sorted(state_dir.rglob("*")):
        if path.is_file():
            screen.line(f"     {path.relative_to(state_dir)}")
    result.seconds = time.monotonic() - began
    verdict = "healed everything" if result.ok else "did NOT heal everything"
    screen.line()
    screen.line(
        screen.paint(
            _BOLD + (_GREEN if result.ok else _RED),
            f"The demo {verdict} in {result.seconds:.1f} s.",
        )
    )
    return result


class Story:
    """Steps 1 to 3 on a started lab, and the summary table; fills the DemoResult."""

    def __init__(
        self,
        screen: Screen,
        lab: Lab,
        spec: PlatformSpec,
        graph: DesiredGraph,
        result: DemoResult,
        spec_dir: Path = Path("specs"),
    ) -> None:
        self.spec_dir = spec_dir
        self.screen = screen
        self.lab = lab
        self.spec = spec
        self.graph = graph
        self.result = result
        self.plans_dir = lab.state_dir / "plans"
        self.plans_dir.mkdir(exist_ok=True)
        self.saved = 0
        self.applied_at: dict[str, float] = {}  # address -> when last applied (demo clock)
        self.foreign: tuple[str, int, dict[str, Any]] | None = None  # node, vmid, state
        self.destroyed: tuple[str, str] | None = None  # the guest destroyed by hand, its MAC
        self._progress: ProgressLines | None = None
        # The service's notifier, fed after each cycle as the service feeds it (`watch`), its
        # targets pointed at the lab's receiver. Step one is a new platform whose backup jobs
        # have not run yet: its cycles set the baseline (what converged) and tell nothing of
        # backups, held-back destroys or isolation (`full` False, as an edge cycle); the rest
        # are full cycles. The revision changes with the pull request of step four.
        self.notifier = Notifier(StatusBoard(spec.platform.name), Metrics())
        self.notifier.configure(lab.aimed(spec))
        self.revision = "specs"
        self.full = False

    # --- talking to the platform --------------------------------------------------------

    def clock(self) -> float:
        return self.lab.events.elapsed()

    def save(self, plan: Plan, name: str) -> None:
        self.saved += 1
        path = self.plans_dir / f"{self.saved:02d}-{name}.json"
        path.write_text(render.render_json(plan), encoding="utf-8")
        self.lab.events.write(
            "plan", name=name, summary=plan.summary(), file=str(path), foreign=len(plan.foreign)
        )

    def cycle(self, step: Step, name: str) -> Convergence:
        """One controller cycle: observe, plan (shown), apply with progress."""

        def approve(plan: Plan) -> bool:
            step.plans.append(plan)
            self.save(plan, name)
            self.screen.plan(plan)
            self.screen.line("   Applying:")
            self._progress = self.screen.progress(plan, self.clock)
            return True

        def progress(result: Result, done: int, total: int) -> None:
            if self._progress is not None:
                self._progress(result, done, total)
            if result.outcome is Outcome.DONE:
                self.applied_at[result.change.address] = self.clock()
            self.lab.events.write(
                "applied",
                address=result.change.address,
                action=result.change.action.value,
                outcome=result.outcome.value,
                seconds=round(result.seconds, 3),
                error=result.error or None,
            )

        async def run() -> Convergence:
            async with connect_platform(self.spec, self.lab.endpoints) as conn:
                return await converge(
                    self.graph,
                    conn.providers,
                    source=conn.source,
                    approve=approve,
                    progress=progress,
                    observed_checks=[live_isolation(self.spec)],
                    agent_layers=conn.agent_layers,
                )

        began = time.monotonic()
        conv = anyio.run(run)
        self.watch(conv)
        last = conv.rounds[-1]
        if not step.plans or step.plans[-1] is not last.plan:  # not applied: shown here
            step.plans.append(last.plan)
            self.save(last.plan, name)
            self.screen.plan(last.plan)
        if last.plan.errored or (last.report is not None and not last.report.ok):
            step.ok = False
        if conv.again():
            self.screen.say(conv.again()[0].upper() + conv.again()[1:] + ".")
        if last.report is not None:
            r = last.report
            self.screen.line(
                f"   Applied in {time.monotonic() - began:.1f} s: {r.count(Outcome.DONE)} done, "
                f"{r.count(Outcome.FAILED)} failed, {r.count(Outcome.SKIPPED)} skipped."
            )
        return conv

    def watch(self, conv: Convergence) -> None:
        """A cycle's end, told to the notifier as `controller.service` tells it: every
        resource's state into the status board (the plan's verdict, then the apply results),
        then the plan, observation and reports (`Notifier.planned`), then the outcome."""
        last = conv.rounds[-1]
        plan = last.plan
        reports = [r.report for r in conv.rounds if r.report is not None]
        v = plan_verdicts(self.graph, plan, last.observed, set(Kind))
        board = self.notifier.board
        board.record_plan(v.wanted, in_sync=v.in_sync, withheld=v.withheld, unseen=v.unseen)
        for report in reports:
            board.record_report(report)
        self.notifier.planned(plan, last.observed, reports, revision=self.revision, full=self.full)
        outcome = cycle_outcome(plan, reports)
        errors = [d.message for d in plan.diagnostics if d.severity is Severity.ERROR]
        self.notifier.cycle(CycleKind.FULL, outcome, "; ".join(errors))

    def deliver(self) -> None:
        """Send what the notifier queued (Apprise, to the lab's receiver), within 15 s, and
        keep what it recorded and what the receiver got."""

        async def run() -> None:
            async with anyio.create_task_group() as tg:
                await tg.start(self.notifier.run)
                await self.notifier.drain(15.0)
                tg.cancel_scope.cancel()

        try:
            anyio.run(run)
        except Exception as exc:  # a notification that cannot go out costs itself only
            self.lab.events.write("error", error=f"notifications: {type(exc).__name__}: {exc}")
        self.result.notifications = [r.to_json() for r in self.notifier.recent]
        for record in self.result.notifications:
            self.lab.events.write("notified", notification=record)
        if self.lab.receiver is not None:
            self.result.received = list(self.lab.receiver.got)

    def observe_and_plan(self) -> tuple[ObservedState, Plan]:
        async def run() -> tuple[ObservedState, Plan]:
            async with connect_platform(self.spec, self.lab.endpoints) as conn:
                observed = await conn.observe(self.spec.platform.name)
                plan = make_plan(
                    self.graph,
                    observed,
                    observed_checks=[live_isolation(self.spec)],
                    agent_layers=conn.agent_layers,
                )
                return observed, plan

        return anyio.run(run)

    # --- the steps ----------------------------------------------------------------------

    def run(self) -> None:
        self.step_one()
        breaks = self.step_two()
        self.step_three(breaks)
        self.step_four()

    def begin(self, title: str, heading: str) -> Step:
        """A step of the story: recorded in the result, timed from now, its heading shown."""
        step = Step(title)
        self.result.steps.append(step)
        self.screen.heading(heading)
        return step

    def step_one(self) -> None:
        s = self.screen
        step = self.begin("an empty platform", "1. An empty platform: plan, then apply")
        s.say(
            f"The controller observes the fake Proxmox VE (no guests yet), compares it with "
            f"the {len(self.graph.resources)} resources the spec declares, and applies the plan "
            "in dependency waves: firewall objects, then guests, then their firewalls, routes "
            "and Velocity registrations."
        )
        for n in range(1, 4):
            conv = self.cycle(step, f"empty-{n}")
            if not conv.rounds[-1].plan.has_changes or not step.ok:
                break
            if n == 1:
                s.line()
                s.say(
                    "Velocity registrations and the runtime routes wait until their guest's "
                    "agent answers ready (the spec gates them on it); the new guests now run "
                    "and their agents answer, so the next cycle adds them."
                )
        step.finish()
        s.say(f"Converged in {step.seconds:.1f} s.")
        self.built_vms(step)
        self.dns_written(step)
        self.first_backups()
        self.full = True

    def built_vms(self, step: Step) -> None:
        """Each VM the spec builds from a template, read back from Proxmox: one line each."""
        pve = self.lab.pve()
        where = {r["name"]: r for r in pve.cluster.resources.get(type="vm")}
        creates = {c.address: c for p in step.plans for c in p.actions if c.action is Action.CREATE}
        for name, guest in sorted(self.spec.guests.items()):
            if guest.kind != "qemu" or guest.clone is None or name not in where:
                continue
            vm = _read_vm(pve, where, name, creates.get(f"guest/{name}"))
            self.result.vms.append(vm)
            step.ok = step.ok and vm.ok
            self.lab.events.write("vm-built", **vars(vm))
            s = self.screen
            s.say(f"{s.paint(_GREEN if vm.ok else _RED, '+')} {vm.line()}.", hang=2)

    def _dns_records(self) -> list[Resource]:
        return [r for r in self.graph.ordered() if r.kind is Kind.DNS]

    def _answered(self, name: str, rtype: str) -> list[str]:
        """What the lab's named answers for name/type, in the spelling the spec's values are
        in (`providers.dns.value_of`)."""
        assert self.lab.named is not None
        return sorted(
            value_of(rtype, dns.rdata.from_text(dns.rdataclass.IN, rtype, text))
            for text in self.lab.named.lookup(name, rtype)
        )

    def _as_wanted(self, record: Resource) -> bool:
        """named answers `record` as the spec says, and its ownership record (a TXT)."""
        assert self.lab.named is not None
        name, rtype = str(record.attributes["name"]), str(record.attributes["type"])
        if self._answered(name, rtype) != sorted(record.attributes["values"]):
            return False
        return bool(self.lab.named.lookup(mark_name(name, rtype), "TXT"))

    def dns_written(self, step: Step) -> None:
        """The record sets the spec wants, asked of named (real DNS queries): each answered
        as the spec says, with its ownership record beside it. One line."""
        records = self._dns_records()
        if self.lab.named is None or not records:
            return
        answered = [r for r in records if self._as_wanted(r)]
        self.result.dns_records, self.result.dns_answered = len(records), len(answered)
        ok = len(answered) == len(records)
        step.ok = step.ok and ok
        zones = Counter(str(r.attributes["zone"]) for r in records)
        where = ", ".join(f"{n} in {z}" for z, n in sorted(zones.items()))
        shown = [r for r in answered if not r.depends_on][:1] + [
            r for r in answered if r.depends_on
        ][:1]
        examples = "; ".join(
            f"{r.attributes['name']} {r.attributes['type']} {', '.join(r.attributes['values'])}"
            for r in shown
        )
        s = self.screen
        s.say(
            f"{s.paint(_GREEN if ok else _RED, '+')} DNS: named answers {len(answered)} of the "
            f"{len(records)} record sets the spec derives and lists ({where}), each beside its "
            f"ownership record (_rc-<type>.<name> TXT){': ' + examples if examples else ''}.",
            hang=2,
        )
        self.lab.events.write("dns-written", records=len(records), answered=len(answered))

    def step_two(self) -> list[Break]:
        s = self.screen
        step = self.begin("break it", "2. Breaking it the way production breaks")
        pve = self.lab.pve()
        guests = {
            r["name"]: r for r in pve.cluster.resources.get(type="vm") if r.get("type") == "lxc"
        }
        unready_guest, unready_server = self._unready_target()
        memory_guest = self._memory_target(unready_guest)
        breaks = [
            self.break_velocity(),
            self.break_memory(pve, guests[memory_guest]),
            self.break_firewall(pve),
            self.break_foreign(pve, guests, memory_guest),
            self.break_unready(unready_guest, unready_server),
        ]
        destroyed = self._destroy_target({unready_guest, memory_guest, MOVED})
        if destroyed is not None:
            breaks.append(self.break_destroyed(pve, guests[destroyed]))
        record = self._dns_target()
        if record is not None:
            breaks.append(self.break_dns(record))
        s.say(
            f"{len(breaks)} things go wrong at once, each through the door it takes in "
            "production: the Proxmox API, a restart, the agent's own status"
            + (", a DNS update." if record is not None else ".")
        )
        for b in breaks:
            s.say(f"{s.paint(_RED, 'x')} {b.what}", hang=2)
            self.lab.events.write("broke", key=b.key, what=b.what)
        step.finish()
        self.result.breaks = breaks
        return breaks

    def step_three(self, breaks: list[Break]) -> None:
        s = self.screen
        step = self.begin("detect and heal", "3. One controller cycle: detect, then heal")
        s.say(
            "The controller knows nothing of what happened: it observes, compares with the spec, "
            "and the plan shows each problem."
        )
        conv = self.cycle(step, "heal")
        detect = conv.rounds[0].plan
        self.result.detect_plan = detect
        for b in breaks:
            b.detected = detected_lines(detect, b)

        unready = next(b for b in breaks if b.key == "unready")
        name = unready.guest
        s.line()
        s.say(
            f"{name}'s server is back up and its agent answers ready again. The next cycle puts "
            "back what was withheld while it was not."
        )
        self.lab.agents[name].ready()
        self.lab.events.write("agent-ready", guest=name)
        self.cycle(step, "after-ready")

        s.line()
        s.say("A last look: observe everything and plan once more.")
        observed, final = self.observe_and_plan()
        step.plans.append(final)
        self.save(final, "final")
        (self.lab.state_dir / "observed.json").write_text(
            observed.model_dump_json(indent=1) + "\n", encoding="utf-8"
        )
        self.screen.plan(final)
        self.result.final_plan = final
        self.check_healed(breaks, final)
        step.finish()
        step.ok = step.ok and not final.has_changes and not final.errored

    def _move_target(self) -> tuple[str, str, str] | None:
        """A game server to move, its host, and another host serving its layer: the one whose
        disks hold the most (a world volume), else the first."""
        hosts = self.spec.hosts
        best: tuple[int, str, str, str] | None = None
        for name, guest in sorted(self.spec.guests.items()):
            if self.spec.layer_of(name) != "runtime" or guest.kind != "lxc":
                continue
            layer = self.spec.layer_of(name)
            others = [h for h, hs in sorted(hosts.items()) if layer in hs.layers]
            other = next((h for h in others if h != guest.host), None)
            if other is None:
                continue
            size = guest.disk.size + sum(v.size for v in getattr(guest, "volumes", {}).values())
            if name == MOVED:  # the example's story: players of survival keep their world
                size = 1 << 40
            if best is None or size > best[0]:
                best = (size, name, guest.host, other)
        return None if best is None else best[1:]

    def step_four(self) -> None:
        target = self._move_target()
        if target is None:
            return
        name, src, dst = target
        s = self.screen
        step = self.begin(
            "move a game server", "4. A pull request moves a game server to another node"
        )
        pr = self.lab.state_dir / "pr-specs"
        edited = _edit_host(self.spec_dir, pr, name, src, dst)
        s.say(
            f"The edit a pull request makes: {edited}: guests.{name}.host {src} -> {dst}. "
            "Changing a guest's node cannot be done in place; a controller that replaced it "
            "would destroy its world. This one plans a migration."
        )
        loaded = load_directory(pr, display="specs")
        if not loaded.ok or loaded.spec is None:
            raise ReconcilerError(render.render_diagnostics(loaded.diagnostics))
        pve = self.lab.pve()
        vmid, before = _disks_of(pve, name)
        self.spec = self.lab.scoped(loaded.spec)
        self.graph = build_graph(self.spec, loaded.source)
        self.revision = f"pull request: {edited}"
        conv = self.cycle(step, "move")
        moved = any(
            c.action is Action.MIGRATE and c.address == f"guest/{name}"
            for r in conv.rounds
            for c in r.plan.actions
        )
        _, after = _disks_of(pve, name)
        node = _node_of(pve, vmid)
        same = bool(before) and before == after
        step.ok = step.ok and moved and node == self.spec.node_of(dst) and same
        disks = ", ".join(f"{k} {v}" for k, v in sorted(after.items()))
        self.result.moved = (
            f"{name} (vmid {vmid}) moved from {src} to {dst} by a migration; its disks are "
            f"the same volumes ({disks})"
            if step.ok
            else f"{name} did NOT move as planned (node {node}; disks before {before}, after "
            f"{after})"
        )
        s.say(self.result.moved + ".")
        # The round after the move (conv.again) is the last look: it must plan nothing.
        last = conv.rounds[-1]
        final = last.plan
        if last.observed is not None:
            (self.lab.state_dir / "observed.json").write_text(
                last.observed.model_dump_json(indent=1) + "\n", encoding="utf-8"
            )
        self.result.final_plan = final
        step.ok = step.ok and not final.has_changes and not final.errored
        step.finish()

    # --- breaking -----------------------------------------------------------------------

    def _unready_target(self) -> tuple[str, str | None]:
        """A game server whose readiness gates the most: a Velocity server, and the target of a
        route withheld while unready when there is one."""
        velocity = self.spec.velocity
        servers = dict(velocity.servers) if velocity is not None else {}
        gated = {
            r.target.guest
            for inst in self.spec.traefik.values()
            if inst.when_unready == "withhold"
            for r in inst.routes.values()
        }
        agents = sorted(self.lab.agents)
        candidates = [(srv.guest, name) for name, srv in servers.items() if srv.guest in agents]
        for guest, server in candidates:
            if guest in gated:
                return guest, server
        if candidates:
            return candidates[0]
        return agents[0], None

    def _memory_target(self, unready: str) -> str:
        velocity = self.spec.velocity
        servers = [srv.guest for srv in velocity.servers.values()] if velocity else []
        for guest in [*servers, *sorted(self.lab.agents)]:
            if guest != unready:
                return guest
        return unready

    def break_velocity(self) -> Break:
        velocity = self.spec.velocity
        names = list(velocity.servers) if velocity is not None else []
        before = len(self.lab.bridge.servers())
        self.lab.bridge.restart()
        return Break(
            "velocity",
            f"Velocity restarts and forgets its {before} registered servers",
            f"Velocity restarted, forgot its {before} servers",
            tuple(f"velocity/{n}" for n in names),
            broken_at=self.clock(),
        )

    def break_memory(self, pve: Any, guest: dict[str, Any]) -> Break:
        node, vmid, name = guest["node"], guest["vmid"], guest["name"]
        ct = pve.nodes(node).lxc(vmid)
        memory = int(ct.config.get()["memory"])
        ct.config.put(memory=memory + 1024)
        return Break(
            "memory",
            f"someone sets {name}'s memory by hand: {memory} -> {memory + 1024} MiB "
            f"(PUT /nodes/{node}/lxc/{vmid}/config)",
            f"{name}'s memory changed by hand to {memory + 1024} MiB",
            (f"guest/{name}",),
            broken_at=self.clock(),
        )

    def _agent_rule_home(self) -> tuple[str, str | None]:
        """Where the rule opening the agent port lives in the spec: ('group', name) or
        ('guest', name)."""
        port = self._agent_port()
        for name, group in sorted(self.spec.firewall.groups.items()):
            if any(port in (r.dport or "").split(",") for r in group.rules):
                return "group", name
        for name in sorted(self.lab.agents):
            fw = self.spec.guests[name].firewall
            if fw is not None and any(port in (r.dport or "").split(",") for r in fw.rules):
                return "guest", name
        return "group", None

    def _agent_port(self) -> str:
        policy = self.spec.policies.agent_port
        return str(policy.port if policy is not None else 18888)

    def break_firewall(self, pve: Any) -> Break:
        port = self._agent_port()
        kind, name = self._agent_rule_home()
        if name is None:
            nothing = f"(no rule opens port {port} in the spec: nothing to delete)"
            return Break("firewall", nothing, nothing, ())
        if kind == "group":
            rules = pve.cluster.firewall.groups(name)
            where, address = f"security group {name!r}", f"firewall/group/{name}"
            path = f"/cluster/firewall/groups/{name}"
        else:
            res = next(r for r in pve.cluster.resources.get(type="vm") if r.get("name") == name)
            rules = pve.nodes(res["node"]).lxc(res["vmid"]).firewall.rules
            where, address = f"{name}'s firewall", f"firewall/guest/{name}"
            path = f"/nodes/{res['node']}/lxc/{res['vmid']}/firewall/rules"
        pos = next(r["pos"] for r in rules.get() if str(r.get("dport", "")) == port)
        rules(pos).delete()
        return Break(
            "firewall",
            f"the rule opening the agent port {port} is deleted from {where} (DELETE {path}/{pos})",
            f"agent-port rule ({port}) deleted from {where}",
            (address,),
            broken_at=self.clock(),
        )

    def break_foreign(self, pve: Any, guests: dict[str, Any], near: str) -> Break:
        """A container nobody declared, in the range of `near`'s role, on its node."""
        role = self.spec.guests[near].role
        rng = self.spec.ranges[role]
        taken = {int(r["vmid"]) for r in pve.cluster.resources.get(type="vm")}
        taken |= {g.vmid for g in self.spec.guests.values() if g.vmid is not None}
        vmid = next(v for v in range(rng.first, rng.last + 1) if v not in taken)
        node = guests[near]["node"]
        upid = pve.nodes(node).lxc.post(
            vmid=vmid,
            hostname=FOREIGN_NAME,
            ostemplate=f"local:vztmpl/{TEMPLATE}",
            rootfs="local-lvm:8",
            memory=1024,
            net0="name=eth0,bridge=vmbr0,ip=dhcp",
            start=1,
        )
        _wait_task(pve, node, upid)
        self.foreign = (node, vmid, _guest_state(pve, node, vmid))
        return Break(
            "foreign",
            f"a container nobody declared appears in the {role} range: {FOREIGN_NAME!r}, "
            f"vmid {vmid} on {node}, no owner tag",
            f"a foreign container, vmid {vmid}, in the {role} range",
            (f"foreign:{vmid}",),
            broken_at=self.clock(),
        )

    def _withheld_routes(self, guest: str) -> tuple[str, ...]:
        """The routes to `guest` that its readiness gates (`when_unready: withhold`)."""
        return tuple(
            f"route/{iname}/{rname}"
            for iname, inst in sorted(self.spec.traefik.items())
            if inst.when_unready == "withhold"
            for rname, route in sorted(inst.routes.items())
            if route.target.guest == guest
        )

    def break_unready(self, guest: str, server: str | None) -> Break:
        reason = "killed by the kernel: out of memory"
        self.lab.agents[guest].crash(137, reason)
        routes = self._withheld_routes(guest)
        return Break(
            "unready",
            f"{guest}'s game server crashes (exit 137, {reason!r}): its agent counts the crash "
            "and stops answering ready",
            f"{guest}'s game server crashed, its agent not ready",
            (*((f"velocity/{server}",) if server else ()), *routes),
            guest=guest,
            broken_at=self.clock(),
        )

    def first_backups(self) -> None:
        """What the backup jobs' schedules would do next: back up every guest they select
        (one vzdump per job and node, as the scheduler runs them)."""
        pve = self.lab.pve()
        where = {r["name"]: r for r in pve.cluster.resources.get(type="vm")}
        made = 0
        for job in self.spec.backups.values():
            by_node: dict[str, list[int]] = {}
            for name in selected_guests(self.spec, job.select):
                if name in where:
                    by_node.setdefault(where[name]["node"], []).append(int(where[name]["vmid"]))
            for node, vmids in sorted(by_node.items()):
                upid = pve.nodes(node).vzdump.post(
                    vmid=",".join(map(str, sorted(vmids))),
                    storage=job.storage,
                    mode=job.mode,
                    compress=job.compress,
                    **{"notes-template": job.notes},
                )
                _wait_task(pve, node, upid)
                made += len(vmids)
        if made:
            self.screen.say(
                f"The backup jobs run as their schedules would: {made} guests backed up to "
                f"{', '.join(sorted({j.storage for j in self.spec.backups.values()}))}."
            )

    def _destroy_target(self, taken: set[str]) -> str | None:
        """A game server a backup job selects, with its vmid fixed in the spec (so its backups
        are provably its own), that no other break uses; one Velocity registers first."""
        selected = {
            name
            for job in self.spec.backups.values()
            for name in selected_guests(self.spec, job.select)
        }
        velocity = self.spec.velocity
        servers = [srv.guest for srv in velocity.servers.values()] if velocity else []
        candidates = [
            g
            for g in [*servers, *sorted(self.spec.guests)]
            if g in selected
            and g not in taken
            and self.spec.guests[g].vmid is not None
            and self.spec.guests[g].restore_missing != "never"
        ]
        return candidates[0] if candidates else None

    def break_destroyed(self, pve: Any, guest: dict[str, Any]) -> Break:
        """A game server destroyed by hand (stopped, then deleted with its disks): the next
        cycle brings it back from its newest backup, its MAC address with it."""
        node, vmid, name = guest["node"], int(guest["vmid"]), guest["name"]
        ct = pve.nodes(node).lxc(vmid)
        self.destroyed = (name, _mac(ct.config.get()))
        if ct.status.current.get()["status"] == "running":
            _wait_task(pve, node, ct.status.stop.post())
        _wait_task(pve, node, ct.delete(purge=1))
        velocity = self.spec.velocity
        servers = (
            [n for n, srv in velocity.servers.items() if srv.guest == name] if velocity else []
        )
        routes = self._withheld_routes(name)
        return Break(
            "destroyed",
            f"game server {name} (vmid {vmid}) is destroyed by hand, world and all "
            f"(DELETE /nodes/{node}/lxc/{vmid}?purge=1)",
            f"{name} destroyed by hand",
            (f"guest/{name}", *(f"velocity/{n}" for n in servers), *routes),
            guest=name,
            broken_at=self.clock(),
        )

    def _dns_target(self) -> Resource | None:
        """An address record players use (in a public zone first), one nothing else depends
        on first (a listed record), where named runs."""
        if self.lab.named is None:
            return None
        public = {
            name
            for name, zone in (self.spec.dns.zones if self.spec.dns is not None else {}).items()
            if zone.kind == "public"
        }
        records = [r for r in self._dns_records() if r.attributes["type"] in WRONG_ADDRESS]
        records.sort(key=lambda r: (r.attributes["zone"] not in public, bool(r.depends_on)))
        return records[0] if records else None

    def break_dns(self, record: Resource) -> Break:
        """A record of ours pointed elsewhere by hand: an RFC 2136 update signed with an
        operator's own key (as `nsupdate -k` sends it), not the controller's."""
        assert self.lab.named is not None
        attrs = record.attributes
        name, rtype, zone = str(attrs["name"]), str(attrs["type"]), str(attrs["zone"])
        wrong = WRONG_ADDRESS[rtype]
        absolute = name + "."  # a name without its dot is relative to the zone in an update
        self.lab.named.hand_update(zone, ("replace", absolute, str(attrs["ttl"]), rtype, wrong))
        before = ", ".join(attrs["values"])
        return Break(
            "dns",
            f"someone points {name} elsewhere by hand: {rtype} {before} -> {wrong} (a signed "
            "DNS update with their own key, as nsupdate sends it)",
            f"{name} {rtype} changed by hand to {wrong}",
            (record.address,),
            broken_at=self.clock(),
        )

    # --- checking -----------------------------------------------------------------------

    def check_healed(self, breaks: list[Break], final: Plan) -> None:
        pve = self.lab.pve()
        for b in breaks:
            if b.key == "foreign" and self.foreign is not None:
                node, vmid, before = self.foreign
                after = _guest_state(pve, node, vmid)
                b.ok = after == before and any(f.get("vmid") == vmid for f in final.foreign)
                b.healed = (
                    "reported as not owned, never touched: its config and firewall are as they were"
                    if b.ok
                    else "CHANGED by the controller"
                )
                self.result.foreign_untouched = after == before
                continue
            addresses = [a for a in b.expect if "/" in a]
            times = [self.applied_at[a] for a in addresses if a in self.applied_at]
            b.healed_at = max(times) if times else None
            b.ok = all(not any(c.address == a for c in final.actions) for a in addresses)
            b.healed = {
                "velocity": "the servers registered again"
                + ("; the unready one once its agent was ready" if len(b.expect) else ""),
                "memory": "set back to the spec's value, in place",
                "firewall": "the rule put back in its place",
                "unready": "its registration and routes withheld while unready, restored when "
                "ready",
                "destroyed": "restored from its newest backup (not recreated empty); its "
                "registration and route followed once its agent was ready",
                "dns": "put back by an update that first checks the record is as observed; "
                "named answers the spec's value",
            }[b.key]
            if b.key == "dns":
                records = [r for r in self._dns_records() if r.address in b.expect]
                b.ok = b.ok and bool(records) and all(self._as_wanted(r) for r in records)
            if b.key == "destroyed" and self.destroyed is not None:
                b.ok = b.ok and self._restored_as_before(pve, *self.destroyed)
            if b.key == "velocity":
                registered = set(self.lab.bridge.servers())
                wanted = {a.removeprefix("velocity/") for a in b.expect}
                b.ok = b.ok and wanted <= {n.lower() for n in registered} | registered
            if not b.ok:
                b.healed = "NOT healed: " + b.healed

    def _restored_as_before(self, pve: Any, name: str, mac: str) -> bool:
        """The destroyed guest is back with the MAC address it had: restored from its backup
        (an empty create gets a new one)."""
        found = [r for r in pve.cluster.resources.get(type="vm") if r.get("name") == name]
        if len(found) != 1:
            return False
        config = pve.nodes(found[0]["node"]).lxc(found[0]["vmid"]).config.get()
        return bool(mac) and _mac(config) == mac

    def summary(self) -> None:
        s = self.screen
        if not self.result.breaks:
            return
        s.heading("What broke, how the controller saw it, how it healed")
        cols = (("what broke", 28), ("seen in the plan as", 34), ("healed", 24), ("after", 5))
        s.line("   " + "  ".join(s.paint(_BOLD, name.ljust(w)) for name, w in cols))
        s.line("   " + "  ".join("-" * w for _, w in cols))
        for b in self.result.breaks:
            after = (
                f"{b.healed_at - b.broken_at:.1f} s"
                if b.healed_at is not None
                else ("-" if b.ok else "never")
            )
            cells = [
                _wrap(b.short, cols[0][1]),
                _wrap("; ".join(b.detected) or "NOT DETECTED", cols[1][1]),
                _wrap(b.healed, cols[2][1]),
                [after],
            ]
            for row in itertools.zip_longest(*cells, fillvalue=""):
                s.line("   " + "  ".join(c.ljust(w) for c, (_, w) in zip(row, cols, strict=True)))
            s.line()
        s.say("after: seconds from the break to the change that healed it.")
        final = self.result.final_plan
        if final is not None:
            s.say(
                f"Final plan: {render.summary_line(final)} "
                + (
                    "The foreign container is still there, untouched and reported."
                    if self.result.foreign_untouched
                    else ""
                )
            )
        self.told()

    def told(self) -> None:
        """The notifications of the run, one line each (event, severity, title, what became of
        it), with the first lines of what they said."""
        s = self.screen
        records = self.result.notifications
        targets = sorted(self.lab.target_urls)
        s.heading("What the controller told people")
        if targets:
            got = len(self.result.received)
            s.say(
                f"Its notifier, fed after each cycle as the service feeds it, sent to the spec's "
                f"target{'s' if len(targets) > 1 else ''} {', '.join(targets)} (pointed at the "
                f"lab's receiver, through Apprise), which got {got} "
                f"message{'' if got == 1 else 's'}:"
            )
        else:
            s.say("The spec names no notification target; the notifier listed:")
        if not records:
            s.line("     (nothing)")
        for r in records:
            where = ", ".join(f"{t}: {d}" for t, d in sorted(r["targets"].items()))
            head = f"{r['event']:<13} {r['severity']:<8} {r['title']}"
            s.line("     " + s.paint(_severity_color(r["severity"]), head))
            body = str(r["body"]).splitlines()
            for line in body[:8]:
                line = line if len(line) <= WIDTH - 9 else line[: WIDTH - 10] + "…"
                s.line("         " + s.paint(_DIM, line))
            if len(body) > 8:
                s.line("         " + s.paint(_DIM, f"... {len(body) - 8} more lines"))
            if where:
                s.line("         " + s.paint(_DIM, f"({where})"))


def detected_lines(plan: Plan, b: Break) -> list[str]:
    """The lines of `plan` that show break `b`, in plan order: its changes, then what is
    withheld, or the foreign guest."""
    lines: list[str] = []
    wanted = set(b.expect)
    withheld = {d.address for d in plan.diagnostics if d.code == "withheld"} & wanted
    for c in plan.actions:
        if c.address in wanted:
            line = f"{c.action.symbol} {shown_address(c)}"
            if c.action is Action.UPDATE and c.fields:
                first = c.fields[0]
                if c.kind is Kind.DNS:  # the address shows the value it is put back to
                    line += f" (was {_short(first.before)})"
                else:
                    line += f" {first.path} {_short(first.before)} -> {_short(first.after)}"
            lines.append(line + (" (withheld)" if c.address in withheld else ""))
    changed = {c.address for c in plan.actions}
    lines += [f"{a} withheld" for a in sorted(withheld - changed)]
    for f in plan.foreign:
        if f"foreign:{f.get('vmid')}" in wanted:
            lines.append(f"? {f['kind']} {f.get('name')!r} vmid {f.get('vmid')}: not owned")
    return _fold(lines)


def _fold(lines: list[str]) -> list[str]:
    """`+ velocity/a`, `+ velocity/b` -> `+ velocity/{a,b}`: a table cell stays short."""
    out: list[str] = []
    groups: dict[str, list[str]] = {}
    for line in lines:
        head, sep, name = line.rpartition("/")
        if sep and " " in head and " " not in name and head.count(" ") == 1:
            if head not in groups:
                groups[head] = []
                out.append(head)
            groups[head].append(name)
        else:
            out.append(line)
    return [
        (f"{h}/{{{','.join(groups[h])}}}" if len(groups[h]) > 1 else f"{h}/{groups[h][0]}")
        if h in groups
        else h
        for h in out
    ]


def _wrap(text: str, width: int) -> list[str]:
    return textwrap.wrap(text, width, break_on_hyphens=False)


def _short(value: Any) -> str:
    if isinstance(value, dict) and "action" in value:
        bits = [str(value.get(k)) for k in ("type", "action", "proto", "dport") if value.get(k)]
        return "{" + " ".join(bits) + "}"
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value)
    return "(none)" if value is None else str(value)


def _read_vm(
    pve: Any, where: dict[str, dict[str, Any]], name: str, create: Change | None
) -> BuiltVm:
    """A cloned VM as Proxmox has it now: its config, pool, power state and agent's answer;
    its template is the one its create named (`after.clone.vmid`)."""
    item = where[name]
    node, vmid = str(item["node"]), int(item["vmid"])
    qm = pve.nodes(node).qemu(vmid)
    config = qm.config.get()
    clone = (create.after or {}).get("clone") if create is not None else None
    template = int(clone["vmid"]) if isinstance(clone, dict) and clone.get("vmid") else None
    source = next((r for r in where.values() if template and r["vmid"] == template), None)
    template_disk = "?"
    if source is not None:
        template_config = pve.nodes(source["node"]).qemu(template).config.get()
        template_disk = _boot_disk_size(template_config)
    running = qm.status.current.get().get("status") == "running"
    try:
        qm.agent.ping.post()
        agent = True
    except ResourceException:  # 500 "QEMU guest agent is not running": what this reports
        agent = False
    keys = urllib.parse.unquote(str(config.get("sshkeys", "")))
    return BuiltVm(
        name=name,
        vmid=vmid,
        node=node,
        template=template,
        template_name=str(source["name"]) if source is not None else "",
        user=str(config.get("ciuser", "")),
        ssh_keys=sum(1 for line in keys.splitlines() if line.strip()),
        ipconfig0=str(config.get("ipconfig0", "")),
        disk=_boot_disk_size(config),
        template_disk=template_disk,
        pool=str(item.get("pool", "")),
        agent=agent,
        running=running,
    )


def _boot_disk_size(config: dict[str, Any]) -> str:
    """The size (`16G`) of the first disk of a VM's `boot: order=`, "?" when it has none."""
    boot = str(config.get("boot", "")).removeprefix("order=").split(";")[0]
    props = str(config.get(boot, "")).split(",")
    return next((p.removeprefix("size=") for p in props if p.startswith("size=")), "?")


def _mac(config: dict[str, Any]) -> str:
    """net0's MAC address (`hwaddr=`), "" when it has none."""
    for part in str(config.get("net0", "")).split(","):
        key, _, value = part.partition("=")
        if key == "hwaddr":
            return value
    return ""


def _wait_task(pve: Any, node: str, upid: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = pve.nodes(node).tasks(upid).status.get()
        if status.get("status") == "stopped":
            if status.get("exitstatus") != "OK":
                raise OSError(f"task {upid} failed: {status.get('exitstatus')}")
            return
        time.sleep(0.05)
    raise OSError(f"task {upid} did not finish")


def _guest_state(pve: Any, node: str, vmid: int) -> dict[str, Any]:
    """A guest's config and firewall, to compare before and after."""
    ct = pve.nodes(node).lxc(vmid)
    return {
        "config": ct.config.get(),
        "firewall_options": ct.firewall.options.get(),
        "firewall_rules": ct.firewall.rules.get(),
    }


def _edit_host(specs: Path, into: Path, guest: str, src: str, dst: str) -> str:
    """Copy the spec directory to `into` with `guest`'s host changed from `src` to `dst`, as a
    pull request would edit it; the file edited, relative to the directory.

    The edit is made to the text, as a person makes it (comments and layout stay; the diff is
    one line), at the place the loader says `guests.<guest>.host` is written: never another
    guest's host line, whatever the layout, and a host this guest does not write (none in its
    entry) is an error, never a guess."""
    shutil.rmtree(into, ignore_errors=True)
    shutil.copytree(specs, into)
    where = load_directory(into, display="").source.values.get(("guests", guest, "host"))
    if where is None or not where.line:
        raise ReconcilerError(f"guest {guest}'s host is not written in the specs under {specs}")
    path = into / where.file
    lines = path.read_text(encoding="utf-8").split("\n")
    line, at = lines[where.line - 1], where.column - 1
    quote = line[at] if line[at : at + 1] in ("'", '"') else ""
    written = f"{quote}{src}{quote}"
    if line[at : at + len(written)] != written:
        raise ReconcilerError(f"{where}: guest {guest}'s host is not {src}: {line.strip()!r}")
    lines[where.line - 1] = line[:at] + f"{quote}{dst}{quote}" + line[at + len(written) :]
    path.write_text("\n".join(lines), encoding="utf-8")
    return where.file


def _node_of(pve: Any, vmid: int) -> str:
    items = [g for g in pve.cluster.resources.get(type="vm") if int(g["vmid"]) == vmid]
    return str(items[0]["node"]) if len(items) == 1 else f"{len(items)} guests at {vmid}"


def _disks_of(pve: Any, name: str) -> tuple[int, dict[str, str]]:
    """A guest's vmid and its disks' volume ids (`rootfs`, `mpN`), read from Proxmox."""
    item = next(g for g in pve.cluster.resources.get(type="vm") if g.get("name") == name)
    config = pve.nodes(item["node"]).lxc(item["vmid"]).config.get()
    disks = {
        key: str(value).split(",", 1)[0]
        for key, value in config.items()
        if key == "rootfs" or (key.startswith("mp") and key[2:].isdigit())
    }
    return int(item["vmid"]), disks
