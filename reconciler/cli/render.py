"""Render plans and diagnostics for people and machines: text (terraform-like, optionally
colored), JSON (the versioned plan format) and Markdown (for a pull-request comment).

Renderers are pure functions of their inputs, so golden tests pin them byte for byte. They
decide on data (a change's `action`, `cause`, `fields`), never on the wording of a `reason` or
a message: those are shown, as they are. `render_change` is one change as the text plan shows
it, for callers that show changes one at a time (the demo). `render_observed` is `observe
--format text`; `apply_document` is `apply --format json` (`reconciler/apply`, documented at
`APPLY_JSON` and in the README). A count is shown with its noun in the right number (`plural`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, TextIO

from reconciler.model.diagnostics import Diagnostic, Position, Severity
from reconciler.model.plans import (
    HOLD_START,
    RESTORE_FROM,
    START_GUEST,
    Action,
    Cause,
    Change,
    Plan,
    rule_line,
    shown_address,
    shown_value,
)

if TYPE_CHECKING:
    from reconciler.applying.converging import Round
    from reconciler.model.observed import ObservedState

_COLORS = {
    Action.CREATE: "\033[32m",
    Action.UPDATE: "\033[33m",
    Action.MIGRATE: "\033[36m",
    Action.REPLACE: "\033[35m",
    Action.DELETE: "\033[31m",
    Action.NOOP: "",
}
_BOLD, _RED, _YELLOW, _DIM, _RESET = "\033[1m", "\033[31m", "\033[33m", "\033[2m", "\033[0m"


def flatten(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Nested attributes -> (path, shown value) lines, rules compact on one line each."""
    out: list[tuple[str, str]] = []
    if isinstance(value, dict):
        for k in sorted(value):
            out.extend(flatten(value[k], f"{prefix}.{k}" if prefix else k))
    elif isinstance(value, list) and value and all(isinstance(x, dict) for x in value):
        for i, item in enumerate(value):
            shown = rule_line(item) if "action" in item else shown_value(item)
            out.append((f"{prefix}[{i}]", shown))
    else:
        out.append((prefix, shown_value(value)))
    return out


def ident(change: Change) -> str:
    """`  (vmid 1000 on pve-a)`, `  (vmid 1001 from pve-a to pve-b)`: which guest a change acts
    on and where, after its address; "" when its id says neither."""
    bits = []
    if "vmid" in change.id:
        # A replace that renumbers destroys the old vmid: say both.
        old = (change.before or {}).get("vmid") if change.action is Action.REPLACE else None
        was = f"{old} -> " if old is not None and old != change.id["vmid"] else ""
        bits.append(f"vmid {was}{change.id['vmid']}")
    moves = change.moves
    if moves is not None:
        bits.append(f"from {moves[0]} to {moves[1]}")
    elif "node" in change.id:
        bits.append(f"on {change.id['node']}")
    return f"  ({' '.join(bits)})" if bits else ""


def foreign_where(item: dict[str, Any]) -> str:
    """` in the game range (a template)`: where a foreign guest sits, for the plan's list."""
    where = f" in the {item['in_range']} range" if item.get("in_range") else ""
    return where + (" (a template)" if item.get("template") else "")


def foreign_line(item: dict[str, Any]) -> str:
    """`? guest 'hand-made' vmid 1005 on pve-a in the game range`: one foreign guest."""
    return (
        f"? {item['kind']} {item.get('name')!r} vmid {item.get('vmid')} on {item.get('node')}"
        + foreign_where(item)
    )


def destroy_line(change: Change) -> str:
    """`guest/mc-x: replace destroys rootfs 8 GiB, mp0 50 GiB (why)`: one line per change that
    destroys data or is held back, for the banner."""
    what = (
        f"{change.action.value} destroys {', '.join(change.destroys)}"
        if change.destroys
        else change.action.value
    )
    why = f" ({change.reason})" if change.reason else ""
    first = (
        f"; a final backup to storage {change.final_backup.storage!r} first"
        if change.final_backup
        else ""
    )
    return f"{change.address}: {what}{why}{first}"


def _banner_changes(plan: Plan) -> list[Change]:
    """Changes a reviewer must not miss: every one that destroys data, and every blocked one."""
    return [c for c in plan.changes if c.destroys or c.blocked]


def _change_lines(change: Change) -> list[str]:
    head = f"{change.action.symbol} {shown_address(change)}{ident(change)}"
    if change.blocked:
        head += "  BLOCKED"
    if change.action is Action.REPLACE:
        head += "  must be replaced"
    elif change.action is Action.CREATE and change.cause in (Cause.WITH_PARENT, Cause.RESTORE):
        # Created for another's sake, or from a backup: say so (a create because it is
        # missing says nothing).
        head += f"  ({change.reason})"
    if change.final_backup is not None:
        head += f"  (a final backup to storage {change.final_backup.storage!r} first)"
    after = change.after or {}
    clone = after.get("clone")
    if change.action in (Action.CREATE, Action.REPLACE) and isinstance(clone, dict):
        head += f"  (clone of {clone.get('vmid') or clone.get('from')})"
    if after.get(HOLD_START):
        head += "  (starts once its firewall is in place)"
    if after.get(START_GUEST):
        head += "  (then starts the guest)"
    lines = [head]
    if change.action is Action.CREATE:
        hidden = (HOLD_START, START_GUEST, RESTORE_FROM)
        rows = flatten({k: v for k, v in after.items() if k not in hidden})
        width = max((len(p) for p, _ in rows), default=0)
        lines += [f"      {p.ljust(width)}  {v}" for p, v in rows]
    elif change.action in (Action.UPDATE, Action.MIGRATE, Action.REPLACE):
        width = max((len(f.path) for f in change.fields), default=0)
        for f in change.fields:
            note = ""
            if f.forces_replace:
                moving = change.action is Action.MIGRATE
                note = "   # moves the guest" if moving else "   # forces replacement"
            if f.moved_from is not None:
                moved = f"{shown_value(f.after)} moved from {f.moved_from}"
                lines.append(f"      {f.path.ljust(width)}  {moved}")
                continue
            lines.append(
                f"      {f.path.ljust(width)}  "
                f"{shown_value(f.before)} -> {shown_value(f.after)}{note}"
            )
        if change.action is Action.UPDATE and any(
            f.path.startswith("cloud_init") for f in change.fields
        ):
            lines.append(f"    {_CLOUD_INIT_NOTE}")
    return lines


# Proxmox regenerates the cloud-init drive at once; the guest's cloud-init reads it at boot.
_CLOUD_INIT_NOTE = "# cloud-init: the drive is regenerated now, applied at the guest's next start"


def plural(count: int, noun: str, nouns: str = "") -> str:
    """`1 error`, `0 errors`, `2 errors`: a count with its noun (`nouns`: an irregular
    plural)."""
    return f"{count} {noun if count == 1 else (nouns or noun + 's')}"


def summary_line(plan: Plan) -> str:
    s = plan.summary()
    blocked = f"; {s['blocked']} blocked (never applied without pruning)" if s["blocked"] else ""
    if not plan.has_changes:
        match = "matches" if s["no-op"] == 1 else "match"
        return f"No changes. {plural(s['no-op'], 'resource')} {match} the spec{blocked}."
    migrate = f"{s['migrate']} to migrate, " if s["migrate"] else ""
    return (
        f"Plan: {s['create']} to create, {s['update']} to update, {migrate}"
        f"{s['replace']} to replace, {s['delete']} to delete, {s['no-op']} unchanged{blocked}."
    )


def render_change(change: Change, *, color: bool = False) -> list[str]:
    """One change as the text plan shows it, without its indent: the head line (colored by
    action), what changes, and a replace's reason."""
    lines = _change_lines(change)
    out = [_paint(color, _COLORS[change.action], lines[0]), *lines[1:]]
    if change.action is Action.REPLACE and change.reason:
        out.append("    " + _paint(color, _DIM, f"# {change.reason}"))
    return out


def _paint(color: bool, code: str, text: str) -> str:
    return f"{code}{text}{_RESET}" if color and code else text


def bold(text: str, color: bool) -> str:
    """A heading, bold when colored."""
    return _paint(color, _BOLD, text)


BANNER_TITLE = "THIS PLAN DESTROYS DATA OR HOLDS BACK A DESTROY: read these first"
BLOCKED_NOTE = (
    "Blocked changes are never applied: they need platform.prune or --allow-destroy "
    "(reconciler run: platform.prune only)."
)


def render_text(plan: Plan, *, color: bool = False) -> str:
    def paint(code: str, text: str) -> str:
        return _paint(color, code, text)

    out = [paint(_BOLD, f"Plan for platform {plan.platform}")]
    src = plan.observed_source or "snapshot"
    when = f" at {plan.observed_at}" if plan.observed_at else ""
    out.append(f"Observed: {src}{when} ({plan.observed_digest[:19]})")
    out.append("")
    banner = _banner_changes(plan)
    if banner:
        out.append(paint(_BOLD + _RED, f"!! {BANNER_TITLE}"))
        for change in banner:
            state = "BLOCKED" if change.blocked else "APPLIES"
            out.append("  " + paint(_RED, f"{state}  {destroy_line(change)}"))
        if plan.blocked:
            out.append("  " + BLOCKED_NOTE)
        out.append("")
    for change in (*plan.blocked, *plan.actions):
        out.extend("  " + line for line in render_change(change, color=color))
    if plan.actions:
        out.append("")
    if plan.foreign:
        out.append(paint(_BOLD, "Not owned by the controller (reported, never touched):"))
        out.extend("  " + foreign_line(f) for f in plan.foreign)
        out.append("")
    if plan.diagnostics:
        out.extend(render_diagnostics(plan.diagnostics, color=color).rstrip("\n").split("\n"))
        out.append("")
    if plan.errored:
        out.append(paint(_RED, "The plan has errors and cannot be applied."))
    out.append(paint(_BOLD, summary_line(plan)))
    return "\n".join(out) + "\n"


def render_json(plan: Plan) -> str:
    return json.dumps(plan.to_json(), indent=2) + "\n"


def render_markdown(plan: Plan) -> str:
    s = plan.summary()
    out = [f"### reconciler plan for `{plan.platform}`", ""]
    status = "errored" if plan.errored else ("changes" if plan.has_changes else "no changes")
    banner = _banner_changes(plan)
    if banner:
        out.append("> [!CAUTION]")
        out.append(f"> **{BANNER_TITLE}**")
        out.append(">")
        for change in banner:
            state = "BLOCKED" if change.blocked else "APPLIES"
            what = destroy_line(change)[len(change.address) + 2 :]
            out.append(f"> - **{state}** `{change.address}`: {what}")
        if plan.blocked:
            out.append(">")
            out.append(f"> {BLOCKED_NOTE}")
        out.append("")
    out.append(
        "| status | create | update | migrate | replace | delete | blocked | unchanged | foreign |"
    )
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    out.append(
        f"| {status} | {s['create']} | {s['update']} | {s['migrate']} | {s['replace']} | "
        f"{s['delete']} | {s['blocked']} | {s['no-op']} | {len(plan.foreign)} |"
    )
    out.append("")
    errors = [d for d in plan.diagnostics if d.severity is Severity.ERROR]
    warnings = [d for d in plan.diagnostics if d.severity is Severity.WARNING]
    for title, items in (("Errors", errors), ("Warnings", warnings)):
        if items:
            out.append(f"**{title}**")
            out.append("")
            out.extend(f"- {_md_diag(d)}" for d in items)
            out.append("")
    groups: list[tuple[str, Action | None, list[Change]]] = [
        (f"to {a.value}", a, [c for c in plan.actions if c.action is a])
        for a in (Action.CREATE, Action.UPDATE, Action.MIGRATE, Action.REPLACE, Action.DELETE)
    ]
    groups.append(("blocked (not applied)", None, list(plan.blocked)))
    for verb, action, changes in groups:
        if not changes:
            continue
        out.append(f"<details><summary>{len(changes)} {verb}</summary>")
        out.append("")
        out.append("```diff")
        for change in changes:
            lines = _change_lines(change)
            sym = {"create": "+", "delete": "-"}.get(change.action.value, "!")
            out.append(f"{sym} {lines[0][len(change.action.symbol) + 1 :]}")
            create = action is Action.CREATE
            out.extend(f"{'+' if create else '#'}{line[1:]}" for line in lines[1:])
        out.append("```")
        out.append("")
        out.append("</details>")
        out.append("")
    if plan.foreign:
        out.append(f"<details><summary>{len(plan.foreign)} not owned (never touched)</summary>")
        out.append("")
        for f in plan.foreign:
            where = foreign_where(f)
            out.append(
                f"- {f['kind']} `{f.get('name')}` vmid {f.get('vmid')} on {f.get('node')}{where}"
            )
        out.append("")
        out.append("</details>")
        out.append("")
    out.append(f"_{summary_line(plan)}_")
    return "\n".join(out) + "\n"


def _md_diag(d: Diagnostic) -> str:
    where = f"`{d.position}` " if d.position else ""
    also = "".join(f"; also `{p}`" for p in _also(d))
    return f"{where}{d.message} ({d.code}){also}"


def _also(d: Diagnostic) -> list[Position]:
    """The other places a problem involves (the first definition of a duplicate, the rule a
    policy finding goes through), leaving out those the message already names as `file:line`
    (or `file`), so a place is shown once.

    This reads the message, and only to leave out a repeat: what is shown never depends on
    the wording otherwise. Some checks in `reconciler.loading` write the place into the message
    as well as into `related`; once they write it in one only, this can show them all."""
    out = []
    for p in d.related:
        named = f"{p.file}:{p.line}" if p.line else p.file
        if not re.search(re.escape(named) + r"(?![\d])", d.message):
            out.append(p)
    return out


def use_color(choice: str, stream: TextIO) -> bool:
    """--color auto|always|never; auto means a terminal, and NO_COLOR turns it off."""
    if choice == "always":
        return True
    if choice == "never" or os.environ.get("NO_COLOR"):
        return False
    return stream.isatty()


def render_diagnostics(diags: Iterable[Diagnostic], *, color: bool = False) -> str:
    lines = []
    for d in diags:
        text = str(d) + "".join(f"; also {p}" for p in _also(d))
        if color:
            code = _RED if d.severity is Severity.ERROR else _YELLOW
            text = text.replace(f"{d.severity.value}:", f"{code}{d.severity.value}:{_RESET}", 1)
        lines.append(text)
    return "\n".join(lines) + ("\n" if lines else "")


def render_github(diags: Iterable[Diagnostic]) -> str:
    """GitHub Actions workflow commands: each problem becomes an annotation on the PR diff."""
    lines = []
    for d in diags:
        props = []
        if d.position:
            props.append(f"file={d.position.file}")
            if d.position.line:
                props.append(f"line={d.position.line},col={d.position.column}")
        also = "".join(f"; also {p}" for p in _also(d))
        msg = (d.message + also).replace("%", "%25").replace("\n", "%0A")
        lines.append(f"::{d.severity.value} {','.join(props)},title={d.code}::{msg}")
    return "\n".join(lines) + ("\n" if lines else "")


# --- observed state and applies -------------------------------------------------------------


def render_observed(state: ObservedState, *, color: bool = False) -> str:
    """`observe --format text`: what was seen, for people. Ours by address, with where a guest
    is and its agent's health; then what is not ours; then the observers that failed. The JSON
    snapshot (the default) is what `plan --observed` reads."""
    when = f" at {state.observed_at}" if state.observed_at else ""
    platform = state.platform or "(any)"
    out = [
        _paint(color, _BOLD, f"Observed platform {platform}{when}"),
        f"Source: {state.source or 'snapshot'} ({state.digest()[:19]})",
        "",
    ]
    owned = sorted((r for r in state.resources if r.owned), key=lambda r: r.address or "")
    for r in owned:
        where = ", ".join(f"{k} {r.id[k]}" for k in ("vmid", "node") if k in r.id)
        line = f"  {r.address}" + (f"  ({where})" if where else "")
        health = state.health.get(r.address or "")
        if health is not None:
            state_text = "ready" if health.serving else f"not ready: {health.error or 'unknown'}"
            line += f"  {state_text}"
        out.append(line)
    foreign = state.foreign()
    if foreign:
        out += ["", _paint(color, _BOLD, "Not owned by the controller (never touched):")]
        out += [f"  ? {r.label}" for r in foreign]
    if state.errors:
        out += ["", _paint(color, _BOLD + _RED, "Not observed (its observer failed):")]
        out += [f"  {kind}: {message}" for kind, message in sorted(state.errors.items())]
    out += [
        "",
        _paint(
            color,
            _BOLD,
            f"{plural(len(state.resources), 'resource')}: {len(owned)} owned, "
            f"{len(foreign)} not owned.",
        ),
    ]
    return "\n".join(out) + "\n"


APPLY_FORMAT = "reconciler/apply"
APPLY_FORMAT_VERSION = 1
APPLY_OUTCOMES = ("applied", "no-changes", "dry-run", "failed", "errored", "cancelled")
APPLY_JSON = """\
apply --format json prints one document on stdout (the plan and the progress for people go to
stderr), stable across releases of the same format_version:

  {"format": "reconciler/apply", "format_version": 1, "platform": NAME, "dry_run": BOOL,
   "outcome": "applied" | "no-changes" | "dry-run" | "failed" | "errored" | "cancelled",
   "summary": {"done": N, "failed": N, "skipped": N, "dry-run": N} (every round's results),
   "rounds": [
     {"plan": the plan JSON (reconciler/plan) this round made and applied,
      "again": null, or why it observed and planned again after it: "conflict" |
               "migrated" | "restored",
      "results": [{"address": ADDR, "kind": KIND, "action": ACTION,
                   "outcome": "done" | "failed" | "skipped" | "dry-run",
                   "error": null | MESSAGE, "seconds": N}, ...]},
     ...]}

Exit 0 for applied, no-changes and dry-run; 1 otherwise. Stopped before any plan (specs that do
not validate, an unknown --target, a saved plan refused, no connection): no document, the error
on stderr, exit 1."""


def apply_document(
    rounds: Sequence[Round], *, platform: str, dry_run: bool, cancelled: bool = False
) -> dict[str, Any]:
    """`apply --format json`: what was planned and applied, round by round, and how it ended
    (see `APPLY_JSON`). A round without results was not applied: its plan had no changes or
    errors, or it was not confirmed (`cancelled`)."""
    results = [r for round_ in rounds for r in (round_.report.results if round_.report else ())]
    summary = {o: sum(1 for r in results if r.outcome.value == o) for o in _RESULT_OUTCOMES}
    # How it ended is the last round's (a conflict that a later round resolved is no failure),
    # as `apply`'s text and exit code say.
    last = rounds[-1] if rounds else None
    if cancelled:
        outcome = "cancelled"
    elif last is not None and last.plan.errored:
        outcome = "errored"
    elif last is not None and last.report is not None and not last.report.ok:
        outcome = "failed"
    elif dry_run and results:
        outcome = "dry-run"
    elif summary["done"]:
        outcome = "applied"
    else:
        outcome = "no-changes"
    return {
        "format": APPLY_FORMAT,
        "format_version": APPLY_FORMAT_VERSION,
        "platform": platform,
        "dry_run": dry_run,
        "outcome": outcome,
        "summary": summary,
        "rounds": [
            {
                "plan": round_.plan.to_json(),
                "again": round_.again or None,
                "results": [
                    {
                        "address": r.change.address,
                        "kind": r.change.kind.value,
                        "action": r.change.action.value,
                        "outcome": r.outcome.value,
                        "error": r.error or None,
                        "seconds": round(r.seconds, 3),
                    }
                    for r in (round_.report.results if round_.report else ())
                ],
            }
            for round_ in rounds
        ],
    }


_RESULT_OUTCOMES = ("done", "failed", "skipped", "dry-run")
