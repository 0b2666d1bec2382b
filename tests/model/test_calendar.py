"""Proxmox calendar events: what parses, when it runs next, how far apart its runs are."""

from __future__ import annotations

import datetime

import pytest

from reconciler.model.calendar import CalendarError, CalendarEvent
from reconciler.model.units import format_seconds, parse_seconds

NOW = datetime.datetime(2026, 12, 4, 21, 0, tzinfo=datetime.UTC)  # a Friday


@pytest.mark.parametrize(
    ("text", "next_run", "hours_apart"),
    [
        ("02:00", "2026-12-05T02:00", 24),
        ("sat 03:30", "2026-12-05T03:30", 168),
        ("*-*-* 00/6:00", "2026-12-05T00:00", 6),
        ("daily", "2026-12-05T00:00", 24),
        ("hourly", "2026-12-04T22:00", 1),
        ("weekly", "2026-12-07T00:00", 168),
        ("mon..fri 02:00", "2026-12-07T02:00", 72),  # Friday to Monday
        ("mon,wed 12..13:5/20", "2026-12-07T12:05", 118 + 1 / 3),
        ("*/5", "2026-12-04T21:05", 1 / 12),
        ("Sat *-1..7 15:00", "2026-12-05T15:00", 840),  # the first Saturday of a month
        ("sunday 1:0", "2026-12-06T01:00", 168),
        ("quarterly", "2027-01-01T00:00", 2208),
    ],
)
def test_events_parse_and_run_when_proxmox_would(
    text: str, next_run: str, hours_apart: float
) -> None:
    event = CalendarEvent.parse(text)
    assert event.next_after(NOW) == datetime.datetime.fromisoformat(next_run + "+00:00")
    assert event.interval() == pytest.approx(hours_apart * 3600)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "non-empty"),
        ("25:00", "out of range for the hour"),
        ("mon..", "not a weekday"),
        ("fri..mon 02:00", "runs backwards"),
        ("someday", "not a weekday"),
        ("*-02-30", "never happens"),
        ("2015-02-29", "never happens"),
        ("1 2 3", "unexpected '2'"),
        ("02:00 03:00", "unexpected '03:00'"),
        ("0/0", "repetition"),
        ("1:2:3:4", "HOUR:MINUTE"),
        ("x" * 300, "at most 200"),
    ],
)
def test_what_is_not_an_event_says_why(text: str, says: str) -> None:
    with pytest.raises(CalendarError, match=says):
        CalendarEvent.parse(text)


def test_a_past_date_parses_but_never_runs_again() -> None:
    event = CalendarEvent.parse("2015-10-21 07:28")
    assert event.next_after(NOW) is None


@pytest.mark.parametrize(
    ("text", "seconds"), [("90m", 5400), ("36h", 129600), ("2d", 172800), ("1w", 604800), (60, 60)]
)
def test_durations(text: str | int, seconds: int) -> None:
    assert parse_seconds(text) == seconds


@pytest.mark.parametrize("bad", ["", "0h", "3 days", "1.5h", True, -5, "9999999h"])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_seconds(bad)


@pytest.mark.parametrize(
    ("seconds", "shown"), [(59, "59s"), (600, "10m"), (5400, "1h 30m"), (129600, "1d 12h")]
)
def test_durations_shown(seconds: int, shown: str) -> None:
    assert format_seconds(seconds) == shown
