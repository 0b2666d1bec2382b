"""The plan: a serializable value of what apply would do, and why.

Made by `reconciler.planning`, rendered by `reconciler.cli.render`, executed by
`reconciler.applying`. The `reason` of a change is for people only; decisions read `action`,
`cause` (why the change exists: a closed `Cause`) and `fields`. A plan with errors is `errored`
and apply refuses it.

JSON format (version 2), documented in README "Plan JSON":

    {"format": "reconciler/plan", "format_version": 2, "platform": ..., "observed": {...},
     "spec": {"digest": "sha256:..."}, "options": {"allow_destroy": bool, "targets": [...]},
     "errored": bool, "applyable": bool, "summary": {"create": n, ..., "blocked": n},
     "changes": [{"address", "kind", "action", "cause", "wave", "id", "fields": [...],
                  "destroys": [...], "blocked": null | "why", ...}],
     "foreign": [...], "diagnostics": [...]}

Version 2 added the `migrate` action (its `id` holds `from` and `to` nodes), `destroys` (what a
change would destroy: `["rootfs 8 GiB", "mp0 50 GiB"]`) and `blocked` (why a destroying change is
held back). A version 1 document still reads. `cause` (one of `Cause`) came later within version
2, optional: a change without it reads with `cause` None (not recorded).

What a plan was made from: the observed state's digest (`observed`), the spec's
(`spec.digest`: `planning.provenance.spec_digest`) and the options that shaped it
(`options`). A saved plan is a request, never an authority: `apply --plan` plans again from
them and applies the fresh plan only if its changes are these. A plan without a spec digest
(saved before it was recorded) reads, and is refused for apply.

Data safety: a change that destroys a disk (a guest's replace or delete, a volume's detach)
carries what it destroys in `destroys`. Without pruning (`platform.prune` or `--allow-destroy`)
the planner leaves it in the plan `blocked`: shown first, under a banner, and never executed
(`Plan.actions` leaves it out).
"""

from __future__ import annotations

import enum
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from reconciler.model.diagnostics import Diagnostic, has_errors
from reconciler.model.errors import PermanentError
from reconciler.model.resources import Kind

FORMAT = "reconciler/plan"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)


class Action(enum.StrEnum):
    NOOP = "no-op"
    CREATE = "create"
    UPDATE = "update"
    MIGRATE = "migrate"
    REPLACE = "replace"
    DELETE = "delete"

    @property
    def symbol(self) -> str:
        return _SYMBOLS[self.value]


_SYMBOLS = {
    "no-op": " ",
    "create": "+",
    "update": "~",
    "migrate": ">",
    "replace": "-/+",
    "delete": "-",
}


class Cause(enum.StrEnum):
    """Why a change exists, as the planner saw it: what a renderer or a reader of the plan JSON
    decides on, where `reason` only words it for people. Closed: the planner sets one of these on
    every change it makes."""

    MISSING = "missing"  # create: desired, and nothing observed at its address
    WITH_PARENT = "with-parent"  # create: what it is attached to is created or replaced
    IN_SYNC = "in-sync"  # no-op: matches the spec (or another change does what differs)
    DRIFTED = "drifted"  # update: observed differs from the spec, and can be changed in place
    MOVED = "moved"  # migrate: only its node (and its disks' storage) changes
    IMMUTABLE = "immutable"  # replace: a field that cannot change in place
    RENUMBERED = "renumbered"  # replace: its vmid changes (the old vmid is destroyed)
    RESTORE = "restore"  # create: missing, and brought back from its newest backup
    NOT_IN_SPEC = "not-in-spec"  # delete: owned, and no longer desired
    WITHHELD = "withheld"  # delete: desired, but its readiness gate holds it back


@dataclass(frozen=True)
class FieldChange:
    path: str
    before: Any
    after: Any
    forces_replace: bool = False
    # An item of an ordered list (a firewall rule) that only changed place: `path` is where it
    # goes, `moved_from` where it was; before and after are the item itself.
    moved_from: str | None = None

    def to_json(self) -> dict[str, Any]:
        out = {
            "path": self.path,
            "before": self.before,
            "after": self.after,
            "forces_replace": self.forces_replace,
        }
        if self.moved_from is not None:
            out["moved_from"] = self.moved_from
        return out


# Firewall first: a guest about to start (created, replaced, or started) whose firewall this
# plan also changes is created or left stopped (HOLD_START in its change's `after`), and its
# firewall change starts it once the rules are in place (START_GUEST). A guest never runs
# without its rules, even for the seconds between two waves; if the firewall fails, it stays
# stopped (fail closed) and the next run tries both again.
HOLD_START = "hold_start"
START_GUEST = "start_guest"
# A guest recreated from a backup: its create's `after` holds RESTORE_FROM, the backup
# (`{"volid", "storage", "ctime"}`) Proxmox restores it from, instead of an empty guest.
RESTORE_FROM = "restore_from"


@dataclass(frozen=True)
class FinalBackup:
    """The backup a guest's destroy waits for (a job selects the guest): where, and how."""

    storage: str
    mode: str = "snapshot"
    compress: str = "zstd"
    job: str = ""  # the job's address, for people

    def to_json(self) -> dict[str, Any]:
        return {
            "storage": self.storage,
            "mode": self.mode,
            "compress": self.compress,
            "job": self.job,
        }


class Freshness(enum.StrEnum):
    FRESH = "fresh"
    STALE = "stale"  # the newest backup is older than the job's max age
    MISSING = "missing"  # no backup at all on the job's storage
    UNKNOWN = "unknown"  # the storage's backups could not be listed


@dataclass(frozen=True)
class BackupFreshness:
    """One guest's newest backup under one job that selects it."""

    guest: str  # address
    job: str  # address
    vmid: int
    freshness: Freshness
    max_age: int  # seconds
    newest: str | None = None  # its volid
    age: int | None = None  # seconds

    def to_json(self) -> dict[str, Any]:
        return {
            "guest": self.guest,
            "job": self.job,
            "vmid": self.vmid,
            "freshness": self.freshness.value,
            "max_age": self.max_age,
            "newest": self.newest,
            "age": self.age,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> BackupFreshness:
        return cls(
            guest=str(doc["guest"]),
            job=str(doc["job"]),
            vmid=int(doc["vmid"]),
            freshness=Freshness(doc["freshness"]),
            max_age=int(doc["max_age"]),
            newest=doc.get("newest"),
            age=None if doc.get("age") is None else int(doc["age"]),
        )


@dataclass(frozen=True)
class Change:
    address: str
    kind: Kind
    action: Action
    wave: int
    id: dict[str, Any] = field(default_factory=dict)
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None
    fields: tuple[FieldChange, ...] = ()
    depends_on: tuple[str, ...] = ()
    reason: str = ""
    version: str | None = None  # the observed version the change was planned against
    # What this change destroys, for people: "rootfs 8 GiB", "mp0 50 GiB". Empty: nothing.
    destroys: tuple[str, ...] = ()
    # Why it is held back (a destroy without pruning): None when it may run.
    blocked: str | None = None
    # Why it exists, as data (see Cause); None: not recorded (a plan saved before it was).
    cause: Cause | None = None
    # A guest's replace or delete: the backup taken first (None: none; see FinalBackup).
    final_backup: FinalBackup | None = None

    @property
    def replace_because(self) -> tuple[str, ...]:
        if self.action is not Action.REPLACE:
            return ()
        return tuple(f.path for f in self.fields if f.forces_replace)

    @property
    def destructive(self) -> bool:
        return bool(self.destroys)

    @property
    def moves(self) -> tuple[str, str] | None:
        """A migration's (from node, to node)."""
        if self.action is not Action.MIGRATE:
            return None
        return str(self.id.get("from")), str(self.id.get("node"))

    def to_json(self) -> dict[str, Any]:
        moves = self.moves
        return {
            "address": self.address,
            "kind": self.kind.value,
            "action": self.action.value,
            "cause": self.cause.value if self.cause is not None else None,
            "wave": self.wave,
            "id": self.id,
            "reason": self.reason,
            "replace_because": list(self.replace_because),
            "fields": [f.to_json() for f in self.fields],
            "before": self.before,
            "after": self.after,
            "depends_on": list(self.depends_on),
            "version": self.version,
            "destroys": list(self.destroys),
            "blocked": self.blocked,
            "final_backup": self.final_backup.to_json() if self.final_backup else None,
            **({"from": moves[0], "to": moves[1]} if moves else {}),
        }


@dataclass(frozen=True)
class Plan:
    platform: str
    changes: tuple[Change, ...]
    observed_digest: str
    observed_at: str | None = None
    observed_source: str = ""
    foreign: tuple[dict[str, Any], ...] = ()
    diagnostics: tuple[Diagnostic, ...] = ()
    # What it was made from besides the observed state: the spec (its digest; "" when unknown)
    # and the options (`--allow-destroy`, `--target`). `apply --plan` plans again with them.
    spec_digest: str = ""
    allow_destroy: bool = False
    targets: tuple[str, ...] = ()
    # `--no-final-backup`: destroys go without the backup a job would take first.
    final_backups: bool = True
    # Every guest a backup job selects, with its newest backup (see BackupFreshness).
    backups: tuple[BackupFreshness, ...] = ()

    @property
    def errored(self) -> bool:
        return has_errors(self.diagnostics)

    @property
    def actions(self) -> tuple[Change, ...]:
        """Changes that apply would make (no-ops and blocked changes left out)."""
        return tuple(c for c in self.changes if c.action is not Action.NOOP and not c.blocked)

    @property
    def blocked(self) -> tuple[Change, ...]:
        """Changes held back: they destroy data and pruning is off."""
        return tuple(c for c in self.changes if c.blocked)

    @property
    def destructive(self) -> tuple[Change, ...]:
        """Every change that destroys data, allowed or blocked: the banner's list."""
        return tuple(c for c in self.changes if c.destroys)

    @property
    def drifted(self) -> bool:
        """Differs from the spec: changes to make, or changes held back."""
        return bool(self.actions or self.blocked)

    @property
    def has_changes(self) -> bool:
        return bool(self.actions)

    @property
    def applyable(self) -> bool:
        return not self.errored and self.has_changes

    def summary(self) -> dict[str, int]:
        counts = Counter(c.action for c in self.changes if not c.blocked)
        out = {a.value: counts.get(a, 0) for a in Action}
        out["blocked"] = len(self.blocked)
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "platform": self.platform,
            "observed": {
                "digest": self.observed_digest,
                "observed_at": self.observed_at,
                "source": self.observed_source,
            },
            "spec": {"digest": self.spec_digest},
            "options": {
                "allow_destroy": self.allow_destroy,
                "targets": list(self.targets),
                "final_backups": self.final_backups,
            },
            "errored": self.errored,
            "applyable": self.applyable,
            "summary": self.summary(),
            "changes": [c.to_json() for c in self.changes],
            "foreign": list(self.foreign),
            "diagnostics": [d.to_json() for d in self.diagnostics],
            "backups": [b.to_json() for b in self.backups],
        }


def _final_backup(doc: Any) -> FinalBackup | None:
    if not doc:
        return None
    return FinalBackup(
        storage=str(doc["storage"]),
        mode=str(doc.get("mode", "snapshot")),
        compress=str(doc.get("compress", "zstd")),
        job=str(doc.get("job", "")),
    )


def plan_from_json(doc: dict[str, Any]) -> Plan:
    """Read back a saved plan (`plan --out`), for `apply --plan FILE`."""
    from reconciler.model.diagnostics import Diagnostic, Position, Severity

    if doc.get("format") != FORMAT or doc.get("format_version") not in READABLE_VERSIONS:
        raise ValueError(f"not a {FORMAT} v{FORMAT_VERSION} document")
    changes = tuple(
        Change(
            address=c["address"],
            kind=Kind(c["kind"]),
            action=Action(c["action"]),
            wave=int(c["wave"]),
            id=dict(c.get("id") or {}),
            before=c.get("before"),
            after=c.get("after"),
            fields=tuple(
                FieldChange(
                    f["path"],
                    f["before"],
                    f["after"],
                    bool(f["forces_replace"]),
                    f.get("moved_from"),
                )
                for f in c.get("fields", ())
            ),
            depends_on=tuple(c.get("depends_on", ())),
            reason=c.get("reason", ""),
            version=c.get("version"),
            destroys=tuple(str(d) for d in c.get("destroys") or ()),
            blocked=c.get("blocked"),
            cause=Cause(c["cause"]) if c.get("cause") is not None else None,
            final_backup=_final_backup(c.get("final_backup")),
        )
        for c in doc["changes"]
    )
    diags = tuple(
        Diagnostic(
            Severity(d["severity"]),
            d["code"],
            d["message"],
            Position.from_json(d) if d.get("file") else None,
            d.get("path") or "",
            d.get("address") or "",
            tuple(Position.from_json(p) for p in d.get("related") or ()),
        )
        for d in doc.get("diagnostics", ())
    )
    observed = doc.get("observed") or {}
    spec = doc.get("spec") or {}
    options = doc.get("options") or {}
    return Plan(
        platform=doc["platform"],
        changes=changes,
        observed_digest=observed.get("digest", ""),
        observed_at=observed.get("observed_at"),
        observed_source=observed.get("source", ""),
        foreign=tuple(doc.get("foreign", ())),
        diagnostics=diags,
        spec_digest=str(spec.get("digest") or ""),
        # Only a JSON `true` is one: anything else in a hand-edited file is not.
        allow_destroy=options.get("allow_destroy") is True,
        targets=tuple(str(t) for t in options.get("targets") or ()),
        # Only a JSON `false` turns them off: a plan saved before the option had them on.
        final_backups=options.get("final_backups") is not False,
        backups=tuple(BackupFreshness.from_json(b) for b in doc.get("backups") or ()),
    )


def refuse_blocked(change: Change) -> None:
    """A blocked change (it destroys and pruning is off) is never applied, whoever hands it
    over: the plan leaves it out of `actions`; every provider checks again before it acts."""
    if change.blocked:
        raise PermanentError(f"{change.address}: held back, not applied: {change.blocked}")


# --- how a plan shows its values (the CLI, the demo, the notifications) -------------------


def shown_value(v: Any) -> str:
    """A value as plans show it: a firewall rule on one line, a string quoted, None as
    `(none)`, anything else as JSON. The CLI's plan, the demo and the notifications use it."""
    if isinstance(v, dict) and "action" in v and "type" in v:
        return "{" + rule_line(v) + "}"
    if isinstance(v, str):
        return json.dumps(v)
    if v is None:
        return "(none)"
    return json.dumps(v, sort_keys=True)


def rule_line(rule: dict[str, Any]) -> str:
    """`in ACCEPT dport=18888 proto=tcp source=api`: a firewall rule on one line."""
    head = f"{rule.get('type', '?')} {rule.get('action', '?')}"
    rest = " ".join(f"{k}={rule[k]}" for k in sorted(rule) if k not in ("type", "action"))
    return f"{head} {rest}".strip()


def shown_address(change: Change) -> str:
    """A change's address as its plan line starts: a DNS record set as `dns/NAME TYPE VALUES`
    (`dns/survival.play.zpack.dev A 203.0.113.10`: what it will say, or said for a delete),
    anything else as its address."""
    if change.kind is not Kind.DNS:
        return change.address
    attrs = change.after or change.before or {}
    values = ", ".join(str(v) for v in attrs.get("values") or ())
    return f"dns/{attrs.get('name')} {attrs.get('type')} {values}".rstrip()
