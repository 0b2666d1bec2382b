"""When the service does what: its triggers' schedule and each resource's backoff. Pure: every
method takes the time `now` (the loop's monotonic clock), so the cycle's timing is tested with
plain numbers, never with sleeps.

Triggers (`Trigger`), each with its interval:

    FULL       observe everything, plan, apply          (--interval, 300 s)
    INVENTORY  one /cluster/resources call; drift asks for a FULL   (--inventory-interval, 30 s)
    EDGE       Velocity, Traefik and the agents; apply their changes (--edge-interval, 10 s)
    SOURCE     fetch the specs; a new good revision asks for a FULL (--source-interval, 60 s)

They coalesce: whatever is due runs once, by the one worker, and a FULL covers an INVENTORY and
an EDGE due at the same time (it pushes both back). A request (a new revision, leadership
gained, drift seen, changes just applied) makes a trigger due at a given time, never later than
it already was.

Backoff (`Backoffs`, with a `Handler` per resource kind and action): a change that failed with
a temporary error waits `initial * 2**(n-1)` seconds (capped at `maximum`) before the service
tries it again; one that failed permanently waits `permanent` (a bad request stays bad: no hot
loop), or until a new revision of the specs, which may be its fix. A waiting resource is left
out of the plans meanwhile, so it never blocks the others.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from reconciler.model.plans import Action, Change
from reconciler.model.resources import Kind


class Trigger(enum.StrEnum):
    SOURCE = "source"
    FULL = "full"
    INVENTORY = "inventory"
    EDGE = "edge"


# A FULL cycle does what these do, so it pushes them back when it runs.
COVERED_BY_FULL = (Trigger.INVENTORY, Trigger.EDGE)


@dataclass
class Schedule:
    intervals: Mapping[Trigger, float]
    next_at: dict[Trigger, float] = field(default_factory=dict)

    @classmethod
    def starting(cls, intervals: Mapping[Trigger, float], now: float) -> Schedule:
        """Everything is due at once: fetch the specs, then a full cycle (the resume)."""
        return cls(dict(intervals), dict.fromkeys(intervals, now))

    def due(self, now: float) -> list[Trigger]:
        """What to run now, in order; a FULL hides the triggers it covers."""
        due = [t for t in Trigger if t in self.next_at and self.next_at[t] <= now]
        if Trigger.FULL in due:
            due = [t for t in due if t not in COVERED_BY_FULL]
        return due

    def next_wake(self) -> float:
        return min(self.next_at.values())

    def ran(self, trigger: Trigger, now: float) -> None:
        self.next_at[trigger] = now + self.intervals[trigger]
        if trigger is Trigger.FULL:
            for covered in COVERED_BY_FULL:
                if covered in self.intervals:
                    self.next_at[covered] = max(
                        self.next_at[covered], now + self.intervals[covered]
                    )

    def request(self, trigger: Trigger, at: float) -> None:
        if trigger in self.next_at:
            self.next_at[trigger] = min(self.next_at[trigger], at)


@dataclass(frozen=True)
class Handler:
    """How failures of one kind of change are retried by the service."""

    initial: float = 10.0  # first wait after a temporary error, doubled each time
    maximum: float = 600.0
    permanent: float = 3600.0  # wait after a permanent error (or until a new revision)


# Per kind; every action of a kind shares its handler unless listed in HANDLER_OVERRIDES.
# Guests are slow and costly (Proxmox tasks): back off longer. The edge is cheap and
# player-facing: retry soon.
HANDLERS: Mapping[Kind, Handler] = {
    Kind.GUEST: Handler(initial=30.0, maximum=900.0),
    Kind.VELOCITY: Handler(initial=5.0, maximum=120.0, permanent=600.0),
    Kind.ROUTE: Handler(initial=5.0, maximum=120.0, permanent=600.0),
}
HANDLER_OVERRIDES: Mapping[tuple[Kind, Action], Handler] = {
    # A delete that failed permanently is usually a guest someone locked or protected on
    # purpose: look again only rarely.
    (Kind.GUEST, Action.DELETE): Handler(initial=60.0, maximum=1800.0, permanent=6 * 3600.0),
}
DEFAULT_HANDLER = Handler()


def handler_for(change: Change) -> Handler:
    return HANDLER_OVERRIDES.get(
        (change.kind, change.action), HANDLERS.get(change.kind, DEFAULT_HANDLER)
    )


@dataclass
class Waiting:
    attempts: int
    until: float
    permanent: bool
    error: str


@dataclass
class Backoffs:
    waiting: dict[str, Waiting] = field(default_factory=dict)

    def failed(self, change: Change, now: float, *, temporary: bool, error: str = "") -> float:
        """Record a failure; returns when the resource may be tried again."""
        handler = handler_for(change)
        attempts = (
            self.waiting[change.address].attempts + 1 if change.address in self.waiting else 1
        )
        if temporary:
            delay = min(handler.maximum, handler.initial * 2.0 ** (attempts - 1))
        else:
            delay = handler.permanent
        self.waiting[change.address] = Waiting(attempts, now + delay, not temporary, error)
        return now + delay

    def succeeded(self, address: str) -> None:
        self.waiting.pop(address, None)

    def blocked(self, now: float) -> set[str]:
        """Addresses still waiting at `now`."""
        return {a for a, w in self.waiting.items() if w.until > now}

    def new_revision(self) -> None:
        """A new revision may fix what failed permanently: give those another try."""
        self.waiting = {a: w for a, w in self.waiting.items() if not w.permanent}

    def forget(self, keep: Iterable[str]) -> None:
        keep = set(keep)
        self.waiting = {a: w for a, w in self.waiting.items() if a in keep}
