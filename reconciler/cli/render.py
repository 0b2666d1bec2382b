"""Render plans and diagnostics for people and machines: text (terraform-like, optionally
colored), JSON (the versioned plan format) and Markdown (for a pull-request comment).

Renderers are pure functions of their inputs, so golden tests pin them byte for byte.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any, TextIO

from reconciler.model.diagnostics import Diagnostic, Severity
from reconciler.model.plans import HOLD_START, START_GUEST, Action, Change, Plan

_COLORS = {
    Action.CREATE: "\033[32m",
    Action.UPDATE: "\033[33m",
    Action.REPLACE: "\033[35m",
    Action.DELETE: "\033[31m",
    Action.NOOP: "",
}
_BOLD, _RED, _YELLOW, _DIM, _RESET = "\033[1m", "\033[31m", "\033[33m", "\033[2m", "\033[0m"


def _value(v: Any) -> str:
    if isinstance(v, dict) and "action" in v and "type" in v:
        return "{" + _rule_line(v) + "}"
    if isinstance(v, str):
        return json.dumps(v)
    if v is None:
        return "(none)"
    return json.dumps(v, sort_keys=True)


def _rule_line(rule: dict[str, Any]) -> str:
    head = f"{rule.get('type', '?')} {rule.get('action', '?')}"
    rest = " ".join(f"{k}={rule[k]}" for k in sorted(rule) if k not in ("type", "action"))
    return f"{head} {rest}".strip()


def flatten(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Nested attributes -> (path, shown value) lines, rules compact on one line each."""
    out: list[tuple[str, str]] = []
    if isinstance(value, dict):
        for k in sorted(value):
            out.extend(flatten(value[k], f"{prefix}.{k}" if prefix else k))
    elif isinstance(value, list) and value and all(isinstance(x, dict) for x in value):
        for i, item in enumerate(value):
            shown = _rule_line(item) if "action" in item else _value(item)
            out.append((f"{prefix}[{i}]", shown))
    else:
        out.append((prefix, _value(value)))
    return out


def _ident(change: Change) -> str:
    bits = []
    if "vmid" in change.id:
        bits.append(f"vmid {change.id['vmid']}")
    if "node" in change.id:
        bits.append(f"on {change.id['node']}")
    return f"  ({' '.join(bits)})" if bits else ""


def _change_lines(change: Change) -> list[str]:
    head = f"{change.action.symbol} {change.address}{_ident(change)}"
    if change.action is Action.REPLACE:
        head += "  must be replaced"
    elif change.action is Action.CREATE and change.reason not in ("", "not found"):
        head += f"  ({change.reason})"
    after = change.after or {}
    if after.get(HOLD_START):
        head += "  (starts once its firewall is in place)"
    if after.get(START_GUEST):
        head += "  (then starts the guest)"
    lines = [head]
    if change.action is Action.CREATE:
        rows = flatten({k: v for k, v in after.items() if k not in (HOLD_START, START_GUEST)})
        width = max((len(p) for p, _ in rows), default=0)
        lines += [f"      {p.ljust(width)}  {v}" for p, v in rows]
    elif change.action in (Action.UPDATE, Action.REPLACE):
        width = max((len(f.path) for f in change.fields), default=0)
        for f in change.fields:
            note = "   # forces replacement" if f.forces_replace else ""
            if f.moved_from is not None:
                moved = f"{_value(f.after)} moved from {f.moved_from}"
                lines.append(f"      {f.path.ljust(width)}  {moved}")
                continue
            lines.append(
                f"      {f.path.ljust(width)}  {_value(f.before)} -> {_value(f.after)}{note}"
            )
    return lines


def summary_line(plan: Plan) -> str:
    s = plan.summary()
    if not plan.has_changes:
        return f"No changes. {s['no-op']} resources match the spec."
    return (
        f"Plan: {s['create']} to create, {s['update']} to update, {s['replace']} to replace, "
        f"{s['delete']} to delete, {s['no-op']} unchanged."
    )


def render_text(plan: Plan, *, color: bool = False) -> str:
    def paint(code: str, text: str) -> str:
        return f"{code}{text}{_RESET}" if color and code else text

    out = [paint(_BOLD, f"Plan for platform {plan.platform}")]
    src = plan.observed_source or "snapshot"
    when = f" at {plan.observed_at}" if plan.observed_at else ""
    out.append(f"Observed: {src}{when} ({plan.observed_digest[:19]})")
    out.append("")
    for change in plan.actions:
        lines = _change_lines(change)
        out.append("  " + paint(_COLORS[change.action], lines[0]))
        out.extend("  " + line for line in lines[1:])
        if change.action is Action.REPLACE and change.reason:
            out.append("      " + paint(_DIM, f"# {change.reason}"))
    if plan.actions:
        out.append("")
    if plan.foreign:
        out.append(paint(_BOLD, "Not owned by the controller (reported, never touched):"))
        for f in plan.foreign:
            where = f" in the {f['in_range']} range" if f.get("in_range") else ""
            out.append(
                f"  ? {f['kind']} {f.get('name')!r} vmid {f.get('vmid')} on {f.get('node')}{where}"
            )
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
    out.append("| status | create | update | replace | delete | unchanged | foreign |")
    out.append("|---|---:|---:|---:|---:|---:|---:|")
    out.append(
        f"| {status} | {s['create']} | {s['update']} | {s['replace']} | {s['delete']} | "
        f"{s['no-op']} | {len(plan.foreign)} |"
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
    for action in (Action.CREATE, Action.UPDATE, Action.REPLACE, Action.DELETE):
        changes = [c for c in plan.actions if c.action is action]
        if not changes:
            continue
        verb = {
            "create": "to create",
            "update": "to update",
            "replace": "to replace",
            "delete": "to delete",
        }[action.value]
        out.append(f"<details><summary>{len(changes)} {verb}</summary>")
        out.append("")
        out.append("```diff")
        for change in changes:
            lines = _change_lines(change)
            sym = {"create": "+", "update": "!", "replace": "!", "delete": "-"}[action.value]
            out.append(f"{sym} {lines[0][len(action.symbol) + 1 :]}")
            out.extend(f"{'+' if action is Action.CREATE else '#'}{line[1:]}" for line in lines[1:])
        out.append("```")
        out.append("")
        out.append("</details>")
        out.append("")
    if plan.foreign:
        out.append(f"<details><summary>{len(plan.foreign)} not owned (never touched)</summary>")
        out.append("")
        for f in plan.foreign:
            where = f" in the {f['in_range']} range" if f.get("in_range") else ""
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
    return f"{where}{d.message} ({d.code})"


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
        text = str(d)
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
        msg = d.message.replace("%", "%25").replace("\n", "%0A")
        lines.append(f"::{d.severity.value} {','.join(props)},title={d.code}::{msg}")
    return "\n".join(lines) + ("\n" if lines else "")
