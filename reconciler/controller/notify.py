"""The controller's news for people: one notifier, fed by the service's own events, tells the
spec's notification targets (Apprise URLs) what broke, what healed and who leads.

`controller.service` owns one `Notifier` and calls it where it already records what happened:

    configure(spec)         a new revision: the targets, and how long a guest may stay unready
    cycle(kind, outcome)    every cycle's end (`_cycle_done`): a full or edge cycle that errored
                            opens `cycle-failed`, one that ran resolves it; the resources whose
                            last change failed (the status board's `failed` and `backoff`) are
                            `change-failed`, one incident each, resolved when they converge
    planned(...)            a full or edge cycle's plan, observation and apply reports: the drift
                            it found and healed (`drift-healed`: one summary a cycle), and, for
                            a full cycle, the destroys held back (`held-back`), live isolation
                            openings (`isolation`) and stale or missing backups (`backup-stale`);
                            from any observation with agents' health, a guest not ready (a crash
                            included) for longer than `notifications.unready_after`
                            (`guest-unready`); and what its applied changes destroyed
                            (`destroyed`: one summary a cycle, each destroy told)
    leadership(...)         the lease gained (info), lost (an incident until regained), released

Nothing else decides what people hear; no provider notifies.

**Once per incident.** A condition the service sees every cycle (a failed change, a held-back
destroy, a stale backup) is an incident keyed by (event, subject): told when it opens, told
"resolved" when it clears (to the targets that heard of it), and not repeated while it lasts.
One-off news (drift healed, destroyed, leadership gained) is told once. Every message, sent or
not, is a `notification` line in the log and an entry of `/status` (`notifications.recent`, with
the open incidents and each target's counts): with no target configured, they are still listed.

**Never in the cycle's way.** The cycle only queues: each message goes out from a task of the
notifier's own task group (`run`), one at a time per target, within the target's `timeout`;
a target that hangs or fails delays only its own messages. Failures are counted
(`reconciler_notifications_total{target,result="failed"}`) and logged once per incident
("notification target failing", then "... recovered"). At most `max_per_hour` messages go to a
target in any hour; the rest are counted as suppressed, and the next message sent says how many.
A `destroyed` summary is never suppressed (it counts toward the hour): what is gone is news.
At most `MAX_PENDING` wait per target; more are dropped and counted.

**Secrets.** A target's URL holds `{env:NAME}`/`{file:/path}` references, read when a message is
sent; their values are registered with the log's redactor, and no log line, status entry or
error message holds the URL, resolved or not (a target shows its scheme only).

Incidents live in memory: a restarted service (or a new leader) tells the open ones again.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import anyio
import anyio.abc

from reconciler.applying.executor import ApplyReport, Outcome
from reconciler.controller.logs import Redactor
from reconciler.controller.metrics import Metrics
from reconciler.controller.status import (
    CycleKind,
    CycleOutcome,
    ResourceState,
    StatusBoard,
    rfc3339,
)
from reconciler.model.errors import ConfigurationError
from reconciler.model.observed import ObservedState
from reconciler.model.plans import (
    Action,
    Cause,
    Change,
    Freshness,
    Plan,
    shown_address,
    shown_value,
)
from reconciler.model.resources import Kind
from reconciler.model.spec import (
    NOTIFICATION_EVENTS,
    URL_REFERENCE,
    NotificationTarget,
    PlatformSpec,
    SecretRef,
    url_references,
)
from reconciler.model.units import format_seconds
from reconciler.providers.proxmox_notifications import endpoint_secrets
from reconciler.providers.secrets import read_secret

log = logging.getLogger("reconciler.notify")

MAX_PENDING = 50  # messages waiting per target; more are dropped
HISTORY = 50  # messages kept for /status
HOUR = 3600.0


class Event(enum.StrEnum):
    """What the controller tells people about: the spec's `events` (model.spec)."""

    CHANGE_FAILED = "change-failed"
    CYCLE_FAILED = "cycle-failed"
    DRIFT_HEALED = "drift-healed"
    GUEST_UNREADY = "guest-unready"
    HELD_BACK = "held-back"
    ISOLATION = "isolation"
    LEADERSHIP = "leadership"
    BACKUP_STALE = "backup-stale"
    DESTROYED = "destroyed"


assert tuple(Event) == NOTIFICATION_EVENTS  # one list of events, two spellings


class Severity(enum.StrEnum):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"

    @property
    def rank(self) -> int:
        return list(Severity).index(self)


class State(enum.StrEnum):
    OPENED = "opened"  # an incident begins
    RESOLVED = "resolved"  # ... and ends
    ANNOUNCED = "announced"  # one-off news


class Delivery(enum.StrEnum):
    """What became of one message for one target (`/status`, the metric's `result`)."""

    QUEUED = "queued"
    SENT = "sent"
    FAILED = "failed"
    SUPPRESSED = "suppressed"  # over the target's max_per_hour
    DROPPED = "dropped"  # too many waiting for the target


# Apprise's notify types.
_APPRISE_TYPE = {Severity.INFO: "info", Severity.WARNING: "warning", Severity.ERROR: "failure"}


@dataclass(frozen=True)
class Finding:
    """One thing to tell: how bad, a one-line title, and the what and why."""

    severity: Severity
    title: str
    body: str


@dataclass(frozen=True)
class Message:
    """What a target receives (Apprise's title, body and type)."""

    title: str
    body: str
    notify_type: str


class DeliveryError(Exception):
    """A target did not take a message; the text says why (never a secret)."""


Sender = Callable[[str, Message], Awaitable[None]]


async def apprise_send(url: str, message: Message) -> None:
    """One message to one Apprise URL: `Apprise()`, `.add(url)`, `.async_notify(...)`."""
    import apprise  # the service's alone: no other command loads it

    sink = apprise.Apprise()
    if not sink.add(url):
        raise DeliveryError("Apprise does not understand the URL (its scheme or its form)")
    result = await sink.async_notify(
        body=message.body, title=message.title, notify_type=message.notify_type
    )
    if not result:
        # Apprise 2 says why in the result's log; 1.x answers a bare False.
        logs = result.logs() if hasattr(result, "logs") else ()
        said = [e.message for e in logs if e.level in ("WARNING", "ERROR")]
        raise DeliveryError(said[-1] if said else "the service did not accept the message")


@dataclass
class Incident:
    event: Event
    subject: str
    finding: Finding
    since: float  # wall-clock time it opened
    told: tuple[str, ...] = ()  # the targets it went (or was to go) to


@dataclass
class Record:
    """One message of the notifier, sent or not: a `/status` entry."""

    at: float
    event: Event
    subject: str
    severity: Severity
    state: State
    title: str
    body: str
    deliveries: dict[str, Delivery] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "at": rfc3339(self.at),
            "event": self.event.value,
            "subject": self.subject,
            "severity": self.severity.value,
            "state": self.state.value,
            "title": self.title,
            "body": self.body,
            "targets": {name: d.value for name, d in sorted(self.deliveries.items())},
        }


@dataclass
class Target:
    """One target of the spec and what became of its messages."""

    name: str
    url: str  # with its references, never resolved here
    events: frozenset[Event]
    min_severity: Severity
    max_per_hour: int
    timeout: float
    counts: dict[Delivery, int] = field(default_factory=dict)
    sent_at: deque[float] = field(default_factory=deque)  # clock times, the last hour's
    held: int = 0  # suppressed since the last message sent
    pending: int = 0
    failing: bool = False
    last_error: str = ""
    last_sent: float | None = None  # wall-clock
    lock: anyio.Lock = field(default_factory=anyio.Lock)

    @classmethod
    def of(cls, name: str, spec: NotificationTarget) -> Target:
        return cls(
            name=name,
            url=spec.url,
            events=frozenset(Event(e) for e in spec.events),
            min_severity=Severity(spec.min_severity),
            max_per_hour=spec.max_per_hour,
            timeout=float(spec.timeout),
        )

    def wants(self, event: Event, severity: Severity) -> bool:
        return event in self.events and severity.rank >= self.min_severity.rank

    def to_json(self) -> dict[str, Any]:
        return {
            "scheme": self.url.split("://", 1)[0],  # the URL itself may say too much
            "events": sorted(e.value for e in self.events),
            "min_severity": self.min_severity.value,
            "max_per_hour": self.max_per_hour,
            **{d.value: self.counts.get(d, 0) for d in Delivery if d is not Delivery.QUEUED},
            "pending": self.pending,
            "failing": self.failing,
            "last_error": self.last_error,
            "last_sent_at": rfc3339(self.last_sent),
        }


def resolve_url(url: str) -> tuple[str, list[str]]:
    """The URL with each reference replaced by its secret (percent-encoded, as Apprise reads
    it back), and the secrets. ConfigurationError names the reference, never a value."""
    values = [read_secret(ref) for ref in url_references(url)]
    found = iter(values)
    return URL_REFERENCE.sub(lambda _m: quote(next(found), safe=""), url), values


class Notifier:
    """See the module docstring. Synchronous feeders (the loop calls them between awaits) and
    one `run` task that sends."""

    def __init__(
        self,
        board: StatusBoard,
        metrics: Metrics,
        *,
        redactor: Redactor | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        sender: Sender = apprise_send,
    ) -> None:
        self.board = board
        self.metrics = metrics
        self.redactor = redactor
        self.clock = clock
        self.wall = wall
        self.sender = sender
        self.platform = ""
        self.targets: dict[str, Target] = {}
        self.unready_after = 300.0
        self.open: dict[tuple[Event, str], Incident] = {}
        self.recent: deque[Record] = deque(maxlen=HISTORY)
        self._unready_since: dict[str, float] = {}  # guest address -> clock time
        self._crashes: dict[str, int] = {}  # guest address -> its agent's last crash count
        # For drift: what the last cycle left converged, under which revision; and what a
        # readiness gate took away (its coming back is not drift).
        self._converged: frozenset[str] = frozenset()
        self._revision: str | None = None
        self._gated: set[str] = set()
        self._tg: anyio.abc.TaskGroup | None = None
        self._backlog: list[tuple[Target, Record, Message]] = []
        self._inflight = 0
        self._configured = False  # a revision has named the targets
        self._early: list[tuple[Record, Finding]] = []
        board.notifications = self.to_json

    # --- configuration ----------------------------------------------------------------------

    def configure(self, spec: PlatformSpec) -> None:
        """A new revision's targets; one whose name stays keeps its counts and its queue."""
        self.platform = spec.platform.name
        self.unready_after = float(spec.notifications.unready_after)
        targets: dict[str, Target] = {}
        for name, target_spec in sorted(spec.notifications.targets.items()):
            fresh = Target.of(name, target_spec)
            old = self.targets.get(name)
            if old is not None:
                old.url, old.events, old.min_severity = fresh.url, fresh.events, fresh.min_severity
                old.max_per_hour, old.timeout = fresh.max_per_hour, fresh.timeout
                fresh = old
            targets[name] = fresh
            self._mask(url_references(target_spec.url))
        self.targets = targets
        # PVE's endpoints' secrets too (a Gotify token, an SMTP password, webhook secrets):
        # the notification provider writes them, and no log line may ever show one.
        self._mask(ref for refs in endpoint_secrets(spec).values() for ref in refs.values())
        if not self._configured:
            self._configured = True
            early, self._early = self._early, []
            for record, finding in early:
                told = [t.name for t in targets.values() if t.wants(record.event, finding.severity)]
                incident = self.open.get((record.event, record.subject))
                if record.state is State.OPENED and incident is not None:
                    incident.told = tuple(told)
                self._dispatch(record, finding, told)

    def _mask(self, refs: Iterable[SecretRef]) -> list[str]:
        """Read secrets and register them with the log's redactor."""
        values = []
        for ref in refs:
            with contextlib.suppress(ConfigurationError):
                values.append(read_secret(ref))
        if self.redactor is not None:
            for value in values:
                self.redactor.add(value)
        return values

    # --- the service's events ---------------------------------------------------------------

    def cycle(self, kind: CycleKind, outcome: CycleOutcome, error: str = "") -> None:
        """A cycle ended. A full or edge cycle that could not run opens `cycle-failed`; one
        that ran resolves it, and brings the failed changes up to date."""
        if kind not in (CycleKind.FULL, CycleKind.EDGE) or outcome is CycleOutcome.SKIPPED:
            return
        subject = f"{kind.value} cycle"
        if outcome is CycleOutcome.ERRORED:
            finding = Finding(Severity.ERROR, f"the {kind.value} cycle failed", error or "?")
            if (Event.CYCLE_FAILED, subject) not in self.open:
                self._open(Event.CYCLE_FAILED, subject, finding)
                self._count_open()
        else:
            self.resolve(Event.CYCLE_FAILED, subject)
        self._failed_changes()

    def _failed_changes(self) -> None:
        failing = {
            address: Finding(
                Severity.ERROR,
                f"{address}: its change failed",
                (status.last_error or "no reason given")
                + (f"; retried at {rfc3339(status.next_retry_at)}" if status.next_retry_at else ""),
            )
            for address, status in self.board.resources.items()
            if status.state in (ResourceState.FAILED, ResourceState.BACKOFF)
        }
        self.settle(Event.CHANGE_FAILED, failing)

    def planned(
        self,
        plan: Plan,
        observed: ObservedState | None,
        reports: Iterable[ApplyReport],
        *,
        revision: str | None,
        full: bool,
    ) -> None:
        """A full (or edge) cycle's plan, observation and apply reports."""
        done = list(reports)
        self._drift(done, revision)
        self._destroyed(done)
        if full:
            self._held_back(plan)
            self._isolation(plan, observed)
            self._backups(plan)
        if observed is not None and observed.health:
            self._health(observed)

    def leadership(self, is_leader: bool, holder: str | None, *, closing: bool = False) -> None:
        who = holder or "this replica"
        if is_leader:
            if (Event.LEADERSHIP, "lease") in self.open:
                self.resolve(Event.LEADERSHIP, "lease")
            else:
                body = f"{who} holds the leader lease and acts for the platform"
                self.announce(Event.LEADERSHIP, "lease", Finding(Severity.INFO, "leader", body))
        elif closing:
            body = f"{who} released the leader lease: the service stops"
            self.announce(Event.LEADERSHIP, "lease", Finding(Severity.INFO, "lease released", body))
        else:
            body = f"{who} lost the leader lease: it changes nothing until it leads again"
            self.settle(
                Event.LEADERSHIP,
                {"lease": Finding(Severity.WARNING, "not the leader", body)},
            )

    # --- what the feeders find --------------------------------------------------------------

    def _drift(self, reports: list[ApplyReport], revision: str | None) -> None:
        """Changes made to what the last cycle left converged, under the same revision: what
        someone or something changed, put back. One summary for the cycle."""
        same = revision is not None and revision == self._revision
        healed = []
        for report in reports:
            for r in report.results:
                c = r.change
                if r.outcome is not Outcome.DONE:
                    continue
                if c.cause is Cause.WITHHELD:
                    self._gated.add(c.address)
                    continue
                if c.address in self._gated:
                    self._gated.discard(c.address)
                    continue
                if same and c.address in self._converged:
                    healed.append(c)
        self._revision = revision
        self._converged = frozenset(
            a for a, s in self.board.resources.items() if s.state is ResourceState.CONVERGED
        )
        if not healed:
            return
        lines = []
        for c in healed[:20]:
            what = ", ".join(
                f"{f.path} {_short(shown_value(f.before))} -> {_short(shown_value(f.after))}"
                for f in c.fields[:4]
            )
            if c.cause is Cause.RESTORE:
                what = "gone; restored from its backup"
            elif not what:
                what = c.reason or c.action.value
            lines.append(f"{c.action.symbol} {shown_address(c)}: {what}")
        if len(healed) > 20:
            lines.append(f"... and {len(healed) - 20} more")
        count = len(healed)
        title = (
            f"drift healed: {count} resource{'s' if count != 1 else ''} put back as the spec says"
        )
        subject = f"cycle at {rfc3339(self.wall())}"
        self.announce(
            Event.DRIFT_HEALED, subject, Finding(Severity.WARNING, title, "\n".join(lines))
        )

    def _destroyed(self, reports: list[ApplyReport]) -> None:
        """What the cycle's applied changes destroyed (disks, or a guest deleted or replaced),
        which a gate allowed: one summary, never an incident (each destroy is news)."""
        gone = [
            r.change
            for report in reports
            for r in report.results
            if r.outcome is Outcome.DONE and _destroying(r.change)
        ]
        if not gone:
            return
        lines = [_destroy_line(c) for c in gone]
        names = ", ".join(shown_address(c) for c in gone[:3])
        more = f" and {len(gone) - 3} more" if len(gone) > 3 else ""
        subject = f"cycle at {rfc3339(self.wall())}"
        # A warning: the spec and its gate asked for it; nothing is broken. It reaches the
        # default `min_severity` and is never suppressed by the hourly limit (`_admit`).
        finding = Finding(Severity.WARNING, f"destroyed: {names}{more}", "\n".join(lines))
        self.announce(Event.DESTROYED, subject, finding)

    def _held_back(self, plan: Plan) -> None:
        found = {}
        for c in plan.blocked:
            destroys = f"; it would destroy {', '.join(c.destroys)}" if c.destroys else ""
            found[c.address] = Finding(
                Severity.WARNING,
                f"{c.address}: {c.action.value} held back",
                f"{c.reason}{destroys}. Held back: {c.blocked}",
            )
        self.settle(Event.HELD_BACK, found)

    def _isolation(self, plan: Plan, observed: ObservedState | None) -> None:
        kinds = observed.kinds if observed is not None else None
        if observed is None or (kinds is not None and Kind.FIREWALL_GUEST not in kinds):
            return  # the firewall was not looked at: nothing known either way
        found: dict[str, Finding] = {}
        for d in plan.diagnostics:
            if d.code not in ("live-isolation", "live-agent-port"):
                continue
            subject = " ".join(p for p in (d.code, d.address, d.path) if p)
            title = f"isolation broken live: {d.address or d.path}"
            previous = found.get(subject)
            body = d.message if previous is None else f"{previous.body}\n{d.message}"
            found[subject] = Finding(Severity.ERROR, title, body)
        self.settle(Event.ISOLATION, found)

    def _backups(self, plan: Plan) -> None:
        found: dict[str, Finding] = {}
        unknown: set[str] = set()
        for b in plan.backups:
            subject = f"{b.guest} ({b.job})"
            if b.freshness is Freshness.UNKNOWN:
                unknown.add(subject)
            elif b.freshness in (Freshness.STALE, Freshness.MISSING):
                if b.freshness is Freshness.STALE and b.age is not None:
                    body = (
                        f"its newest backup ({b.newest}) is {format_seconds(b.age)} old; the "
                        f"job {b.job} allows {format_seconds(b.max_age)}"
                    )
                else:
                    body = f"it has no backup on the storage of {b.job}"
                title = f"backup {b.freshness.value}: {b.guest}"
                found[subject] = Finding(Severity.WARNING, title, body)
        self.settle(Event.BACKUP_STALE, found, keep=unknown)

    def _health(self, observed: ObservedState) -> None:
        """A guest not ready for longer than `unready_after`; one whose agent counted a new
        crash at once (the incident stays open until it serves again)."""
        now = self.clock()
        found: dict[str, Finding] = {}
        crashed: set[str] = set()  # open crash incidents, kept while the guest recovers
        for address, health in observed.health.items():
            if self._crashed(address, health.crashes):
                crashed.add(address)
                found[address] = Finding(
                    Severity.ERROR,
                    f"{address}: crashed ({health.crashes} since its agent started)",
                    f"its agent says: {health.error}"
                    if health.error
                    else "its agent counted a crash",
                )
            if health.serving:
                self._unready_since.pop(address, None)
                continue
            since = self._unready_since.setdefault(address, now)
            if address in found or now - since < self.unready_after:
                continue
            down = not health.running or not health.reachable
            why = health.error or ("the guest is not running" if not health.running else "")
            found[address] = Finding(
                Severity.ERROR if down else Severity.WARNING,
                f"{address}: not ready for {format_seconds(max(now - since, 1))}",
                f"its agent says: {why}" if why else "its agent says it is not ready",
            )
        for address in set(self._unready_since) - set(observed.health):
            del self._unready_since[address]
        # A crash told stays open while the guest comes back (not serving yet), then resolves.
        keep = {a for a in self._subjects(Event.GUEST_UNREADY) if a in self._unready_since}
        self.settle(Event.GUEST_UNREADY, found, keep=keep - set(found))

    def _crashed(self, address: str, crashes: int | None) -> bool:
        """Whether the agent counted a crash since the last observation. The first count seen
        is the baseline: crashes before the controller looked are not news."""
        if crashes is None:
            return False
        before = self._crashes.get(address)
        self._crashes[address] = crashes
        return before is not None and crashes > before

    # --- incidents --------------------------------------------------------------------------

    def _subjects(self, event: Event) -> set[str]:
        return {s for e, s in self.open if e is event}

    def settle(
        self, event: Event, current: Mapping[str, Finding], *, keep: Iterable[str] = ()
    ) -> None:
        """`current`: every subject of `event` that is wrong now. New ones open; open ones
        no longer there (and not in `keep`: not known either way) are resolved."""
        for subject, finding in sorted(current.items()):
            if (event, subject) not in self.open:
                self._open(event, subject, finding)
        kept = set(keep)
        for subject in sorted(self._subjects(event) - set(current) - kept):
            self.resolve(event, subject)
        self._count_open()

    def _open(self, event: Event, subject: str, finding: Finding) -> None:
        told = [t.name for t in self.targets.values() if t.wants(event, finding.severity)]
        self.open[(event, subject)] = Incident(event, subject, finding, self.wall(), tuple(told))
        self._tell(event, subject, finding, State.OPENED, told)

    def resolve(self, event: Event, subject: str) -> None:
        incident = self.open.pop((event, subject), None)
        if incident is None:
            return
        lasted = format_seconds(max(1.0, self.wall() - incident.since))
        finding = Finding(
            Severity.INFO,
            f"resolved: {incident.finding.title}",
            f"{incident.finding.title}: resolved after {lasted}",
        )
        told = [t for t in incident.told if t in self.targets]
        self._tell(event, subject, finding, State.RESOLVED, told)
        self._count_open()

    def announce(self, event: Event, subject: str, finding: Finding) -> None:
        told = [t.name for t in self.targets.values() if t.wants(event, finding.severity)]
        self._tell(event, subject, finding, State.ANNOUNCED, told)

    def _count_open(self) -> None:
        counts = dict.fromkeys((e.value for e in Event), 0)
        for event, _subject in self.open:
            counts[event.value] += 1
        self.metrics.set_notifications_open(counts)

    # --- telling ----------------------------------------------------------------------------

    def _tell(
        self, event: Event, subject: str, finding: Finding, state: State, told: list[str]
    ) -> None:
        """Record it (log, /status) and queue it for `told`. Before the first revision is
        loaded (the lease is often won first) no target is known: it is kept, and told when
        the targets are."""
        record = Record(
            self.wall(), event, subject, finding.severity, state, finding.title, finding.body
        )
        if not self._configured:
            self._early.append((record, finding))
        self._dispatch(record, finding, told)
        self.recent.append(record)
        level = (
            logging.WARNING
            if state is State.OPENED and finding.severity is not Severity.INFO
            else logging.INFO
        )
        log.log(
            level,
            "notification",
            extra={
                "fields": {
                    "event": event.value,
                    "subject": subject,
                    "severity": finding.severity.value,
                    "state": state.value,
                    "title": finding.title,
                    "targets": {n: d.value for n, d in sorted(record.deliveries.items())},
                }
            },
        )

    def _dispatch(self, record: Record, finding: Finding, told: Iterable[str]) -> None:
        resolved = record.state is State.RESOLVED
        notify_type = "success" if resolved else _APPRISE_TYPE[finding.severity]
        where = f"[{self.platform}] " if self.platform else ""
        for name in told:
            target = self.targets[name]
            body = finding.body
            delivery = self._admit(target, limited=record.event is not Event.DESTROYED)
            if delivery is Delivery.QUEUED and target.held:
                body += (
                    f"\n({target.held} earlier notification{'s' if target.held > 1 else ''} "
                    f"suppressed by the limit of {target.max_per_hour} an hour: /status lists "
                    "them)"
                )
                target.held = 0
            record.deliveries[name] = delivery
            if delivery is Delivery.QUEUED:
                message = Message(f"{where}{finding.title}", body, notify_type)
                self._queue(target, record, message)
            else:
                self._count(target, delivery)

    def _admit(self, target: Target, *, limited: bool = True) -> Delivery:
        """Within the target's hourly limit (unless not `limited`) and queue? Counts it
        against the limit if so."""
        now = self.clock()
        while target.sent_at and now - target.sent_at[0] >= HOUR:
            target.sent_at.popleft()
        if limited and len(target.sent_at) >= target.max_per_hour:
            target.held += 1
            return Delivery.SUPPRESSED
        if target.pending >= MAX_PENDING:
            return Delivery.DROPPED
        target.sent_at.append(now)
        return Delivery.QUEUED

    def _count(self, target: Target, delivery: Delivery) -> None:
        target.counts[delivery] = target.counts.get(delivery, 0) + 1
        self.metrics.notification(target.name, delivery.value)

    def _queue(self, target: Target, record: Record, message: Message) -> None:
        target.pending += 1
        self._inflight += 1
        if self._tg is None:
            self._backlog.append((target, record, message))  # sent once `run` starts
        else:
            self._tg.start_soon(self._send, target, record, message)

    async def _send(self, target: Target, record: Record, message: Message) -> None:
        try:
            async with target.lock:  # one at a time per target, in order
                error = await self._deliver(target, message)
            record.deliveries[target.name] = Delivery.FAILED if error else Delivery.SENT
            self._count(target, Delivery.FAILED if error else Delivery.SENT)
            if error is None:
                target.last_sent = self.wall()
                if target.failing:
                    target.failing, target.last_error = False, ""
                    log.info(
                        "notification target recovered", extra={"fields": {"target": target.name}}
                    )
            else:
                target.last_error = error
                if not target.failing:
                    target.failing = True
                    log.warning(
                        "notification target failing",
                        extra={"fields": {"target": target.name, "error": error}},
                    )
        finally:
            target.pending -= 1
            self._inflight -= 1

    async def _deliver(self, target: Target, message: Message) -> str | None:
        """Send; None when delivered, else why not (never holding a secret)."""
        secrets: list[str] = []
        try:
            url, secrets = resolve_url(target.url)
            for value in secrets:
                if self.redactor is not None:
                    self.redactor.add(value)
            with anyio.fail_after(target.timeout):
                await self.sender(url, message)
            return None
        except ConfigurationError as exc:
            return f"its URL: {exc}"
        except TimeoutError:
            return f"no answer within {target.timeout:g} s"
        except DeliveryError as exc:
            return self._clean(str(exc), secrets)
        except Exception as exc:  # Apprise or a plugin: whatever it raises costs the message only
            return self._clean(f"{type(exc).__name__}: {exc}", secrets)

    def _clean(self, text: str, secrets: Iterable[str]) -> str:
        for value in sorted(secrets, key=len, reverse=True):
            if value:
                text = text.replace(value, "***").replace(quote(value, safe=""), "***")
        return self.redactor.text(text) if self.redactor is not None else text

    # --- the sending task -------------------------------------------------------------------

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Send what is queued, until cancelled (the service's task group)."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            backlog, self._backlog = self._backlog, []
            for item in backlog:
                tg.start_soon(self._send, *item)
            task_status.started()
            try:
                await anyio.sleep_forever()
            finally:
                self._tg = None

    async def drain(self, timeout: float) -> None:
        """Wait up to `timeout` s for what is in flight (the service stops: the lease released,
        a `--once` cycle's news)."""
        with anyio.move_on_after(timeout):
            while self._inflight and self._tg is not None:
                await anyio.sleep(0.02)

    @property
    def inflight(self) -> int:
        return self._inflight

    # --- /status ----------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "targets": {name: t.to_json() for name, t in sorted(self.targets.items())},
            "open": [
                {
                    "event": i.event.value,
                    "subject": i.subject,
                    "severity": i.finding.severity.value,
                    "title": i.finding.title,
                    "body": i.finding.body,
                    "since": rfc3339(i.since),
                    "targets": list(i.told),
                }
                for (_e, _s), i in sorted(self.open.items())
            ],
            "recent": [r.to_json() for r in self.recent],
        }


def _destroying(change: Change) -> bool:
    """Whether a change destroys something: disks it names, or a guest deleted or replaced."""
    return bool(change.destroys) or (
        change.kind is Kind.GUEST and change.action in (Action.DELETE, Action.REPLACE)
    )


def _destroy_line(change: Change) -> str:
    """`- guest/mc-x (vmid 1001 on pve-runtime): delete; destroyed rootfs 8 GiB; after a final
    backup to storage 'backup' (backup/worlds)`."""
    vmid, node = change.id.get("vmid"), change.id.get("node")
    where = " ".join(
        part
        for part in (f"vmid {vmid}" if vmid is not None else "", f"on {node}" if node else "")
        if part
    )
    head = f"{change.action.symbol} {shown_address(change)}" + (f" ({where})" if where else "")
    what = ", ".join(change.destroys) or ("the guest" if change.kind is Kind.GUEST else "?")
    text = f"{head}: {change.action.value}; destroyed {what}"
    backup = change.final_backup
    if backup is not None:
        job = f" ({backup.job})" if backup.job else ""
        text += f"; after a final backup to storage {backup.storage!r}{job}"
    elif change.kind is Kind.GUEST and change.action in (Action.DELETE, Action.REPLACE):
        text += "; no final backup"
    return text


def _short(value: Any, limit: int = 60) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
