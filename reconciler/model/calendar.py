"""Proxmox calendar events (a backup job's `schedule`), parsed once: checked in the spec, and
asked when a job runs next and how far apart its runs are (a backup's freshness is measured
against that interval).

The grammar is Proxmox's (pve-docs `calendar-events.adoc`, proxmox-time `parse_time.rs`), a
subset of systemd.time(7):

    [WEEKDAYS] [[YEARS-]MONTHS-DAYS] [HOURS:MINUTES[:SECONDS]]

- WEEKDAYS: `mon`..`sun` (or full names), lists `mon,wed` and ranges `mon..fri`;
- every other field: `*`, a number, a list `1,15`, a range `8..17`, a repetition `0/15` or
  `8..17/2` (start, then every step up to the range's end or the field's last value);
- a time of one field is the minutes (`*/5`: every five minutes; `0/15` on the quarter hour);
  a missing time is `0:00`, a missing date is every day;
- the words `minutely`, `hourly`, `daily`, `weekly`, `monthly`, `yearly` (`annually`),
  `quarterly`, `semiannually`.

Times are UTC here; Proxmox reads them in the node's local time. The controller uses them for
the interval between runs, which does not depend on the zone, and to show the next run.
Called by the spec models (`schedule` fields) and the backup-freshness policy.
"""

from __future__ import annotations

import calendar
import datetime
import re
from dataclasses import dataclass

_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_FULL_DAYS = tuple(calendar.day_name[i].lower() for i in range(7))
_WORDS = {
    "minutely": "*-*-* *:*:00",
    "hourly": "*-*-* *:00:00",
    "daily": "*-*-* 00:00:00",
    "weekly": "mon *-*-* 00:00:00",
    "monthly": "*-*-01 00:00:00",
    "yearly": "*-01-01 00:00:00",
    "annually": "*-01-01 00:00:00",
    "quarterly": "*-01,04,07,10-01 00:00:00",
    "semiannually": "*-01,07-01 00:00:00",
}
_MAX_TEXT = 200  # an event longer than this is not one anybody meant
_SEARCH_DAYS = 366 * 5  # Feb 29 on a Monday still comes round within this


class CalendarError(ValueError):
    """Not a Proxmox calendar event; the message says what is wrong."""


def _field(text: str, low: int, high: int, what: str) -> frozenset[int]:
    """One field (`*`, `5`, `1,15`, `8..17`, `0/15`, `8..17/2`, lists of these) -> its values."""
    values: set[int] = set()
    for part in text.split(","):
        if not part:
            raise CalendarError(f"an empty item in the {what}")
        base, slash, step_text = part.partition("/")
        step = 1
        if slash:
            if not step_text.isdigit() or int(step_text) == 0:
                raise CalendarError(f"{part!r}: the repetition in the {what} must be a number > 0")
            step = int(step_text)
        if base == "*":
            first, last = low, high
        elif ".." in base:
            a, _, b = base.partition("..")
            first, last = _number(a, low, high, what), _number(b, low, high, what)
            if first > last:
                raise CalendarError(f"{part!r}: the {what} range runs backwards")
        else:
            first = _number(base, low, high, what)
            last = high if slash else first
        values.update(range(first, last + 1, step))
    return frozenset(values)


def _number(text: str, low: int, high: int, what: str) -> int:
    if not text.isdigit() or len(text) > 4:
        raise CalendarError(f"{text!r} is not a number for the {what}")
    value = int(text)
    if not low <= value <= high:
        raise CalendarError(f"{value} is out of range for the {what} ({low}..{high})")
    return value


def _weekdays(text: str) -> frozenset[int]:
    days: set[int] = set()
    for part in text.split(","):
        a, dots, b = part.partition("..")
        first, last = _day(a), _day(b) if dots else _day(a)
        if first > last:
            raise CalendarError(f"{part!r}: the weekday range runs backwards")
        days.update(range(first, last + 1))
    return frozenset(days)


def _day(text: str) -> int:
    name = text.lower()
    if name in _DAYS:
        return _DAYS.index(name)
    if name in _FULL_DAYS:
        return _FULL_DAYS.index(name)
    raise CalendarError(f"{text!r} is not a weekday (mon..sun)")


_WEEKDAY_TOKEN = re.compile(r"^[A-Za-z.,]+\Z")


@dataclass(frozen=True)
class CalendarEvent:
    """A parsed event: the sets of values each field takes."""

    text: str
    weekdays: frozenset[int]  # 0 = Monday
    years: frozenset[int] | None  # None: any year
    months: frozenset[int]
    days: frozenset[int]
    hours: frozenset[int]
    minutes: frozenset[int]
    seconds: frozenset[int]

    @classmethod
    def parse(cls, text: str) -> CalendarEvent:
        if not isinstance(text, str) or not text.strip():
            raise CalendarError("a calendar event is a non-empty text, e.g. 02:00 or sat 03:30")
        if len(text) > _MAX_TEXT:
            raise CalendarError(f"a calendar event is at most {_MAX_TEXT} characters")
        original = text
        text = _WORDS.get(text.strip().lower(), text)
        tokens = text.split()
        weekdays = frozenset(range(7))
        if tokens and _WEEKDAY_TOKEN.match(tokens[0]) and not tokens[0].startswith("*"):
            weekdays = _weekdays(tokens.pop(0))
        years: frozenset[int] | None = None
        months = days = None
        if tokens and "-" in tokens[0]:
            parts = tokens.pop(0).split("-")
            if len(parts) == 3:
                years = None if parts[0] == "*" else _field(parts[0], 1970, 9999, "year")
                parts = parts[1:]
            if len(parts) != 2:
                raise CalendarError(f"{original!r}: a date is [YEAR-]MONTH-DAY")
            months = _field(parts[0], 1, 12, "month")
            days = _field(parts[1], 1, 31, "day")
        hours, minutes, seconds = frozenset({0}), frozenset({0}), frozenset({0})
        if tokens:
            parts = tokens.pop(0).split(":")
            if len(parts) == 1:  # minutes alone: `*/5`, `0/15`
                hours, minutes = frozenset(range(24)), _field(parts[0], 0, 59, "minute")
            elif len(parts) in (2, 3):
                hours = _field(parts[0], 0, 23, "hour")
                minutes = _field(parts[1], 0, 59, "minute")
                if len(parts) == 3:
                    seconds = _field(parts[2], 0, 59, "second")
            else:
                raise CalendarError(f"{original!r}: a time is HOUR:MINUTE[:SECOND]")
        if tokens:
            raise CalendarError(
                f"{original!r}: unexpected {tokens[0]!r}; write [WEEKDAYS] [[YEAR-]MONTH-DAY] "
                "[HOUR:MINUTE[:SECOND]], e.g. 'mon..fri 02:00' or '*-*-* 00/6:00'"
            )
        event = cls(
            original.strip(),
            weekdays,
            years,
            months if months is not None else frozenset(range(1, 13)),
            days if days is not None else frozenset(range(1, 32)),
            hours,
            minutes,
            seconds,
        )
        first_year = min(event.years) if event.years else 2000
        if event.next_after(datetime.datetime(first_year - 1, 12, 31, tzinfo=datetime.UTC)) is None:
            raise CalendarError(f"{original!r} never happens")
        return event

    def next_after(self, when: datetime.datetime) -> datetime.datetime | None:
        """The first time strictly after `when` (UTC) that the event names, or None when there
        is none within five years."""
        when = when.astimezone(datetime.UTC).replace(microsecond=0)
        times = sorted(
            datetime.time(h, m, s) for h in self.hours for m in self.minutes for s in self.seconds
        )
        day = when.date()
        for _ in range(_SEARCH_DAYS):
            if self._takes(day):
                for t in times:
                    at = datetime.datetime.combine(day, t, tzinfo=datetime.UTC)
                    if at > when:
                        return at
            day += datetime.timedelta(days=1)
        return None

    def _takes(self, day: datetime.date) -> bool:
        return (
            day.weekday() in self.weekdays
            and (self.years is None or day.year in self.years)
            and day.month in self.months
            and day.day in self.days
            and day.day <= calendar.monthrange(day.year, day.month)[1]
        )

    def interval(self, start: datetime.datetime | None = None, runs: int = 16) -> float:
        """The longest gap, in seconds, between the next `runs` runs after `start` (default: the
        first of next month): how long a guest may go between two backups when every run
        succeeds. An event that runs once has no interval: a year, for the arithmetic."""
        at = start or datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
        previous = self.next_after(at)
        longest = 0.0
        for _ in range(runs):
            if previous is None:
                break
            following = self.next_after(previous)
            if following is None:
                break
            longest = max(longest, (following - previous).total_seconds())
            previous = following
        return longest or 366 * 86400.0


def check_calendar_event(value: str) -> str:
    """A spec validator: the text unchanged when it parses."""
    CalendarEvent.parse(value)
    return value
