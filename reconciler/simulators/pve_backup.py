"""Backups in the fake PVE: backup jobs, vzdump, backup volumes, restore, and the scheduler.

fakepve 0.5 checks `/cluster/backup` and `vzdump` requests against PVE's schema but stores no
job and writes no backup. `BackupApi`, mixed into `PlatformPve` (reconciler/simulators/pve.py),
models them the way fakepve builds its own areas: `_routes_<area>` tables whose handlers run
after fakepve's schema and permission checks, and overrides of the methods fakepve's own routes
call (storage content, container and VM create) where a backup changes what they do. Used by
the tests' `fakepve` fixture and by `python -m reconciler.simulators.pve` (the demo). Each
behaviour follows PVE's source:

Jobs: pve-manager `PVE/API2/Backup.pm`, `PVE/VZDump.pm` (verify_vzdump_parameters,
get_included_guests), `PVE/Jobs.pm`, pve-guest-common `PVE/VZDump/JobBase.pm`.
- `GET /cluster/backup` lists the jobs in creation order, each with `id`, `type` (`vzdump`) and
  its options (`prune-backups`, `fleecing`, `performance` as objects) and a read-only
  `next-run` computed from now; `GET /{id}` is the same without `next-run` (Backup.pm computes
  it only in the list); an unknown id is a 400 `id: No such job 'X'`.
- `POST` stores a job under the given `id` or, like Backup.pm, a generated UUID (the `backup-`
  ids are the web UI's); `enabled` defaults to 1; `starttime`/`dow` become a `schedule`; a
  missing schedule, `schedule` with `starttime`, a conflicting selection (`all`, `exclude` or
  `pool` with `vmid`), a bad `notes-template` and a missing selection are refused with PVE's
  messages; `exclude` without `pool` means `all=1`. Errors raised inside Backup.pm's cfs lock
  (an existing id: 500 "Job 'X' already exists"; verify_vzdump_parameters) reach the client as
  Perl stringifies them: 500 "400 Parameter verification failed." plus `field: message`.
- `PUT` merges, `delete=` removes options vzdump knows (and `comment`, `repeat-missed`); a new
  `vmid` drops `all`/`exclude`/`pool`, `all` drops `vmid`/`pool`, `pool` drops the others; an
  unknown id is 500 "no such vzdump job", nothing to change 500 "no options specified". A new
  `schedule` or `enabled` counts as the job's last run (Jobs.pm detect_changed_runtime_props).
- `DELETE` removes it (unknown: the stringified `id: No such job`).
- The schema formats fakepve does not check are checked here with PVE's words:
  `pve-calendar-event` (proxmox-time `calendar_event.rs`, through pve-common
  `PVE/CalendarEvent.pm`: weekday lists and ranges, `Y-M-D`/`M-D` dates, `H:M[:S]` times with
  lists, ranges `a..b` and repetitions `a/n`, `*`, the keywords `minutely` .. `yearly`, and a
  trailing `UTC`; next runs are computed like its compute_next_event, in local time unless
  UTC), `prune-backups` (pve-storage `Plugin.pm` validate_prune_backups), `pve-day-of-week`.

vzdump: pve-manager `PVE/API2/VZDump.pm` and `PVE/VZDump.pm` (new, exec_backup,
exec_backup_task), pve-container `PVE/VZDump/LXC.pm`, pve-guest-common `AbstractConfig.pm`.
- `POST /nodes/{node}/vzdump` selects guests (`vmid` list, `all` with `exclude`, or `pool`; a
  vmid no guest has is kept and fails visibly). The API passes its own `node`, so guests on
  other nodes are not selected; with none left (and no `all`) the answer is "OK", no task.
  Otherwise a `vzdump` task (its id the vmid when there is one guest); one vzdump runs per node
  at a time. The scheduler passes no `node`: its vzdump logs other nodes' guests as skipped.
- The task checks the target storage (exists, enabled, online, takes `backup` content: "could
  not get storage information for 'S': can't use storage 'S' for backups - wrong content
  type"), then backs up each guest in vmid order: the config lock `backup` is set (a locked
  guest fails with "CT is locked (X)" / "VM is locked (X)"), writes meanwhile fail like PVE's,
  the backup takes `backup_secs` PVE seconds (scaled by `time_scale`), a stop-mode backup stops
  a running guest and starts it again, LXC snapshot mode falls back to suspend when a volume's
  storage cannot snapshot. The volume, named from the backup's start time (local time):
  directory storage `S:backup/vzdump-{lxc|qemu}-VMID-YYYY_MM_DD-HH_MM_SS.{tar|vma}[.zst|.gz|.lzo]`
  (by `compress`), PBS `S:backup/{ct|vm}/VMID/YYYY-MM-DDTHH:MM:SSZ` (UTC). Its size is an
  eighth of the included disks (rootfs and `backup=1` mount points; VM disks without
  `backup=0`), halved when compressed; it must fit in the storage's `avail`. `notes-template`
  is expanded ({{cluster}}, {{guestname}}, {{node}}, {{vmid}}, `\\n`, `\\\\`), `protected=1`
  marks it (within `max-protected-backups`), then, when `remove` (default 1), older backups of
  the guest are pruned by the job's or else the storage's `prune-backups` (pve-storage
  `Storage.pm` prune_mark_backup_group: keep-last, then hourly/daily/weekly/monthly/yearly
  periods in local time, protected backups neither removed nor counted). With `remove=0` a
  retention limit is enforced instead ("There is a max backup limit of N ..."). A guest that
  fails is logged ("ERROR: Backup of VM N failed - ...") and the others go on; the task then
  ends "job errors". The log follows PVE's lines. fakepve's `fail()` applies as to any route.

Backup volumes: pve-storage `Plugin.pm` (list_volumes, get_subdir_files), `PBSPlugin.pm`,
`API2/Storage/Content.pm`. The volumes live in fakepve's own storage model, so its content
routes list (`volid`, `content`, `format` (`tar.zst`, `vma.zst`, `pbs-ct`, ...), `size`,
`ctime`, `vmid`, and here also `subtype` and only the first line of `notes`), filter
(`content`, `vmid`), show, update (`notes`, `protected`; also on PBS) and delete them
(a protected one: "cannot remove protected volume ..."), and its LXC restore sees them.

Restore: pve-container `PVE/API2/LXC.pm` create_vm and `PVE/LXC/Create.pm`
(recover_config, sanitize_and_merge_config); qemu-server `PVE/API2/Qemu.pm` create_vm and
`PVE/QemuServer.pm` (restore_vma_archive, restore_update_config_line). A backup holds what the
archive holds: the guest's config without lock, snapshots, pending changes and parent, the
guest's firewall config, and which disks were included.
- LXC `POST /nodes/{node}/lxc` with `restore=1` and `ostemplate=<backup>`: an existing vmid
  needs `force=1` ("CT N already exists on node 'X'"); a running or protected container is not
  overwritten. Without `rootfs`/`mpN` every mount point of the backup is created anew on
  `storage` (default `local`, which must take container directories) with its size and
  options (`backup=0` ones come back empty); the backup's config fills every option the
  request does not give (description, hostname, cores, memory, net with its MAC unless
  `unique`, ...). New volumes are allocated before the old container's are freed, so their
  names change. The firewall config comes back too (not for a user who may only back the
  container up). A failure after the disks were made leaves no container; one before leaves
  the old one as it was.
- QEMU `POST /nodes/{node}/qemu` with `archive=<backup>`: the same rules for `force`; drive
  options conflict with `archive`; included disks are allocated on `storage` or else their old
  storage; a `backup=0` disk's line becomes a comment, which PVE's config parser appends to
  the description; a new `vmgenid`; old disks that were not restored become `unusedN`; the
  request's other options override the backup's. A failure leaves the VM unlocked, not
  cleaned up (as qemu-server says).

`GET /cluster/backup-info/not-backed-up` (pve-manager `API2/Cluster/BackupInfo.pm`): the
guests that no job selects; like PVE, a disabled job still counts as selecting its guests.

Scheduler (pve-manager `PVE/Jobs.pm` run_jobs, what pvescheduler runs each minute):
`run_due_jobs(now)` starts, on each online node, each enabled job whose next event after its
last run has come, as that node's vzdump with the job's options and `job-id`; a job whose last
task still runs is not started again. `backup_scheduler = True` (the CLI's
`--backup-scheduler`) runs it every second while the fake serves.

Helpers for tests: `backup_clock` (the time backups and the scheduler see; `time.time` by
default), `add_backup(storage, vmid, ctime, ...)` (seed a backup volume, e.g. a stale one),
`run_due_jobs(now)`, `hold_backups()`/`release_backups()` (backups wait after taking their
lock, so a test can look at a backup in progress), `backup_secs`.

Not modelled: `dumpdir`, `stdout`, `stop`, `script` hooks, mail and notifications, fleecing,
bandwidth limits, `included_volumes`, `extractconfig`, `repeat-missed` (there is no scheduler
restart to miss a run), restore of bind mounts' data, and VM templates' base disks on restore.
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import copy
import functools
import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from fakepve import schema as pve_schema
from fakepve.firewall import empty_conf
from fakepve.lxc import (
    CREATE_ONLY as CT_CREATE_ONLY,
)
from fakepve.lxc import (
    SNAPSHOT_STORAGE,
    FakeCt,
    mount_type,
    normalise,
    parse_mount,
    parse_size,
    print_mount,
    volume_owner,
)
from fakepve.model import FakeVm, PveError, TaskError
from fakepve.qemu import (
    CREATE_ONLY as VM_CREATE_ONLY,
)
from fakepve.qemu import (
    DRIVE_KEY,
    drives_of,
    join_drive,
    natural,
    split_drive,
    volume_ref,
    with_mac,
)
from fakepve.routing import StatefulRoutes, die, param_error, split_list

# PVE seconds one guest's backup takes: long enough to be seen, nothing at time scale 0.
BACKUP_SECS = 10.0
GIB = 1024**3
ALL_DAYS = "mon,tue,wed,thu,fri,sat,sun"
# Options of a job that are not vzdump's (Backup.pm, JobBase.pm).
_JOB_KEYS = ("id", "type", "schedule", "enabled", "comment", "repeat-missed")
_DELETABLE = ("comment", "repeat-missed")
_ROOT_ONLY = ("tmpdir", "dumpdir", "script", "job-id")
_NOTES_VARS = ("cluster", "guestname", "node", "vmid")
# compressor_info: `compress` -> the archive's extension.
_COMPRESS_EXT = {"0": "", "1": ".lzo", "lzo": ".lzo", "gzip": ".gz", "zstd": ".zst"}
_DIR_BACKUP = re.compile(
    r"^backup/vzdump-(lxc|qemu|openvz)-([1-9][0-9]{2,8})-(\d{4})_(\d\d)_(\d\d)-(\d\d)_(\d\d)_(\d\d)"
    r"\.(?:tgz|(?:tar|vma)(?:\.(?:gz|lzo|zst|bz2))?)$"
)
_PBS_BACKUP = re.compile(
    r"^backup/([^\s_]+)/([^\s_]+)/([0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z)$"
)
# Keys of a backed-up config that sanitize_and_merge_config does not bring back.
_CT_NOT_MERGED = ("digest", "rootfs", "snapshots", "unprivileged", "parent", "template", "lxc")
_ARCHIVE_DROPS = ("lock", "snapshots", "parent", "pending", "digest")


# ----------------------------------------------------------------------------- calendar events


class CalendarError(ValueError):
    """A calendar event PVE refuses; the message is proxmox-time's."""


@dataclass(frozen=True)
class _Value:
    """proxmox-time DateTimeValue: a single value, a range `a..b`, or a repetition `a[..b]/n`."""

    start: int
    end: int | None = None
    step: int | None = None

    def contains(self, value: int) -> bool:
        if self.step is None:
            return value == self.start if self.end is None else self.start <= value <= self.end
        if value < self.start:
            return False
        if self.step == 0:
            return value == self.start
        return (value - self.start) % self.step == 0 and (self.end is None or value <= self.end)

    def next_after(self, value: int) -> int | None:
        if value < self.start:
            return self.start
        if self.step is None:
            if self.end is None:
                return None
            return value + 1 if value + 1 <= self.end else None
        if self.step == 0:
            return None
        found = self.start + ((value - self.start + self.step) // self.step) * self.step
        return found if self.end is None or found <= self.end else None


def _contains(values: tuple[_Value, ...], value: int) -> bool:
    return any(v.contains(value) for v in values)


def _find_next(values: tuple[_Value, ...], value: int) -> int | None:
    found = [n for n in (v.next_after(value) for v in values) if n is not None]
    return min(found) if found else None


class _Miss(Exception):
    """A nom parser error: where it stopped and the error kind as proxmox-time prints it."""

    def __init__(self, at: str, kind: str) -> None:
        super().__init__(at)
        self.at = at
        self.kind = kind


_WEEKDAYS = {
    name: n
    for n, names in enumerate(
        (
            ("mon", "monday"),
            ("tue", "tuesday"),
            ("wed", "wednesday"),
            ("thu", "thursday"),
            ("fri", "friday"),
            ("sat", "saturday"),
            ("sun", "sunday"),
        )
    )
    for name in names
}
_MIDNIGHT = ((_Value(0),), (_Value(0),), (_Value(0),))
_KEYWORDS: dict[str, dict[str, tuple[_Value, ...]]] = {
    "minutely": {"second": (_Value(0),)},
    "hourly": {"minute": (_Value(0),), "second": (_Value(0),)},
    "daily": dict(zip(("hour", "minute", "second"), _MIDNIGHT, strict=True)),
    "weekly": dict(zip(("hour", "minute", "second"), _MIDNIGHT, strict=True)),
    "monthly": {
        **dict(zip(("hour", "minute", "second"), _MIDNIGHT, strict=True)),
        "day": (_Value(1),),
    },
    "yearly": {
        **dict(zip(("hour", "minute", "second"), _MIDNIGHT, strict=True)),
        "day": (_Value(1),),
        "month": (_Value(1),),
    },
    "quarterly": {
        **dict(zip(("hour", "minute", "second"), _MIDNIGHT, strict=True)),
        "day": (_Value(1),),
        "month": tuple(_Value(m) for m in (1, 4, 7, 10)),
    },
    "semiannually": {
        **dict(zip(("hour", "minute", "second"), _MIDNIGHT, strict=True)),
        "day": (_Value(1),),
        "month": (_Value(1), _Value(7)),
    },
}
_KEYWORDS["annually"] = _KEYWORDS["yearly"]
_KEYWORDS["semi-annually"] = _KEYWORDS["semiannually"]


def _number(text: str, limit: int) -> tuple[int, str]:
    """parse_time_comp: digits below `limit`."""
    found = re.match(r"\d+", text)
    if not found:
        raise _Miss(text, "Nom(Digit)")
    value, rest = int(found.group()), text[found.end() :]
    if value >= limit:
        raise _Miss(rest, 'Context("time value too large")')
    return value, rest


def _component(text: str, limit: int) -> tuple[_Value, str]:
    """parse_date_time_comp: `a`, `a..b`, `a/n` or `a..b/n`."""
    value, rest = _number(text, limit)
    if rest.startswith(".."):
        try:
            end, after = _number(rest[2:], limit)
        except _Miss:
            end = None
        if end is not None:
            rest = after
            if value > end:
                raise _Miss(rest, 'Context("range start is bigger than end")')
            if rest.startswith("/"):
                step, rest = _number(rest[1:], limit)
                return _Value(value, end, step), rest
            return _Value(value, end), rest
    if rest.startswith("/"):
        step, rest = _number(rest[1:], limit)
        return _Value(value, None, step), rest
    return _Value(value), rest


def _component_list(text: str, start: int, limit: int) -> tuple[tuple[_Value, ...], str]:
    """parse_date_time_comp_list: `*`, `*/n`, or components separated by commas."""
    if text.startswith("*"):
        rest = text[1:]
        if rest.startswith("/"):
            step, after = _number(rest[1:], limit)
            if step > 0:
                return (_Value(start, None, step),), after
        return (), rest
    value, rest = _component(text, limit)
    values = [value]
    while rest.startswith(","):
        try:
            value, after = _component(rest[1:], limit)
        except _Miss:
            break  # separated_list1 stops before a separator not followed by an item
        values.append(value)
        rest = after
    return tuple(values), rest


def _weekday(text: str) -> tuple[int, str]:
    word = re.match(r"[A-Za-z]+", text)
    name = word.group() if word else ""
    if name.lower() not in _WEEKDAYS:
        raise _Miss(name or text, 'Context("weekday")')
    return 1 << _WEEKDAYS[name.lower()], text[len(name) :]


def _weekday_range(text: str) -> tuple[int, str]:
    """parse_weekdays_range: `mon` or `fri..mon` (wrapping over the week's end)."""
    first, rest = _weekday(text)
    if not rest.startswith(".."):
        return first, rest
    try:
        last, after = _weekday(rest[2:])
    except _Miss:
        return first, rest
    if first > last:
        return _bits_between(first, 1 << 6) | _bits_between(1, last), after
    return _bits_between(first, last), after


def _bits_between(first: int, last: int) -> int:
    bits, pos = 0, first
    while True:
        bits |= pos
        if pos >= last:
            return bits
        pos <<= 1


def _date_spec(text: str) -> tuple[dict[str, tuple[_Value, ...]], str]:
    """parse_date_spec: `Y-M-D` or `M-D`, each part a list."""
    with contextlib.suppress(_Miss):
        year, rest = _component_list(text, 0, 2200)
        if rest.startswith("-"):
            month, rest = _component_list(rest[1:], 1, 13)
            if rest.startswith("-"):
                day, rest = _component_list(rest[1:], 1, 32)
                return {"year": year, "month": month, "day": day}, rest
    with contextlib.suppress(_Miss):
        month, rest = _component_list(text, 1, 13)
        if rest.startswith("-"):
            day, rest = _component_list(rest[1:], 1, 32)
            return {"month": month, "day": day}, rest
    raise _Miss(text, 'Context("invalid date spec")')


def _time_spec(text: str) -> tuple[dict[str, tuple[_Value, ...]], str]:
    """parse_time_spec: `[H:]M[:S]`, each part a list; seconds default to 0."""
    hour: tuple[_Value, ...] = ()
    rest = text
    with contextlib.suppress(_Miss):
        hours, after = _component_list(text, 0, 24)
        if after.startswith(":"):
            hour, rest = hours, after[1:]
    minute, rest = _component_list(rest, 0, 60)
    second: tuple[_Value, ...] = (_Value(0),)
    if rest.startswith(":"):
        with contextlib.suppress(_Miss):
            second, rest = _component_list(rest[1:], 0, 60)
    return {"hour": hour, "minute": minute, "second": second}, rest


@dataclass(frozen=True)
class CalendarEvent:
    """A parsed systemd-like calendar event (proxmox-time CalendarEvent)."""

    utc: bool = False
    days: int = 0  # bit n: weekday n, Monday first; 0 or all bits: every day
    year: tuple[_Value, ...] = ()
    month: tuple[_Value, ...] = ()
    day: tuple[_Value, ...] = ()
    hour: tuple[_Value, ...] = ()
    minute: tuple[_Value, ...] = ()
    second: tuple[_Value, ...] = ()

    def next_after(self, last: float) -> int | None:
        """compute_next_event: the first matching epoch strictly after `last`, or None."""
        t = _Clock(int(last) + 1, self.utc)
        for _ in range(1001):
            if not self._advance(t):
                return t.epoch()
            if t.gone:
                return None
        return None

    def _advance(self, t: _Clock) -> bool:
        """One step of the search: False when `t` matches, else True after moving `t` on (to
        the next candidate of the first field that does not match, or past its range)."""
        if _step(
            (self.year, t.at.year, t.to_year, t.end_search),
            (self.month, t.at.month, t.to_month, t.next_year),
            (self.day, t.at.day, t.to_day, t.next_month),
        ):
            return True
        if self.days not in (0, 0x7F):
            today = t.at.weekday()
            if not self.days & (1 << today):
                later = [d for d in range(today + 1, 7) if self.days & (1 << d)]
                t.add_days((later[0] if later else 7) - today)
                return True
        return _step(
            (self.hour, t.at.hour, t.to_hour, t.next_day),
            (self.minute, t.at.minute, t.to_minute, t.next_hour),
            (self.second, t.at.second, t.to_second, t.next_minute),
        )


_Field = tuple[tuple[_Value, ...], int, Callable[[int], None], Callable[[], None]]


def _step(*fields: _Field) -> bool:
    for values, now, forward, overflow in fields:
        if values and not _contains(values, now):
            found = _find_next(values, now)
            if found is None:
                overflow()
            else:
                forward(found)
            return True
    return False


class _Clock:
    """proxmox-time TmEditor: a broken-down time that normalises like mktime. `to_*` move
    forward to a value of a field (the smaller fields reset), `next_*` past the current one."""

    def __init__(self, epoch: int, utc: bool) -> None:
        self.utc = utc
        self.gone = False
        self.at = (
            datetime.fromtimestamp(epoch, UTC).replace(tzinfo=None)
            if utc
            else datetime.fromtimestamp(epoch)
        )

    def epoch(self) -> int:
        if self.utc:
            return calendar.timegm(self.at.timetuple())
        return int(time.mktime(self.at.timetuple()))

    def end_search(self) -> None:
        self.gone = True

    def to_year(self, year: int) -> None:
        self.at = datetime(year, 1, 1)

    def next_year(self) -> None:
        self.to_year(self.at.year + 1)

    def to_month(self, month: int) -> None:
        self.at = datetime(self.at.year, month, 1)

    def next_month(self) -> None:
        index = self.at.year * 12 + self.at.month  # the next month, zero-based
        self.at = datetime(index // 12, index % 12 + 1, 1)

    def add_days(self, days: int) -> None:
        self.at = datetime(self.at.year, self.at.month, self.at.day) + timedelta(days=days)

    def to_day(self, day: int) -> None:
        self.add_days(day - self.at.day)  # past the month's end: into the next month

    def next_day(self) -> None:
        self.add_days(1)

    def _set(self, hours: int, minutes: int, seconds: int) -> None:
        midnight = datetime(self.at.year, self.at.month, self.at.day)
        self.at = midnight + timedelta(hours=hours, minutes=minutes, seconds=seconds)

    def to_hour(self, hour: int) -> None:
        self._set(hour, 0, 0)

    def next_hour(self) -> None:
        self._set(self.at.hour + 1, 0, 0)

    def to_minute(self, minute: int) -> None:
        self._set(self.at.hour, minute, 0)

    def next_minute(self) -> None:
        self._set(self.at.hour, self.at.minute + 1, 0)

    def to_second(self, second: int) -> None:
        self._set(self.at.hour, self.at.minute, second)


def parse_calendar_event(text: str) -> CalendarEvent:
    """PVE::CalendarEvent::parse_calendar_event (pve-common, then proxmox-time's parser).

    Raises CalendarError with proxmox-time's message, e.g. "unable to parse calendar event at
    'x' - Context(\"weekday\")"."""
    event = text.strip()
    if not event:
        raise CalendarError("unable to parse calendar event - event is empty")
    try:
        return _parse_event(event)
    except _Miss as miss:
        raise CalendarError(
            f"unable to parse calendar event at '{miss.at}' - {miss.kind}"
        ) from None


def _parse_event(text: str) -> CalendarEvent:
    utc = text.endswith("UTC")
    if utc:
        text = text[:-3].rstrip(" ")
    if text in _KEYWORDS:
        days = 1 if text == "weekly" else 0
        return CalendarEvent(utc=utc, days=days, **_KEYWORDS[text])
    parts: dict[str, Any] = {"utc": utc}
    if text[:1].isascii() and text[:1].isalpha():
        days, text = _weekday_range(text)
        while text.startswith(","):
            try:
                more, after = _weekday_range(text[1:])
            except _Miss:
                break
            days, text = days | more, after
        parts["days"] = days
        text = text.lstrip(" \t")
    with contextlib.suppress(_Miss):
        dates, rest = _date_spec(text)
        parts.update(dates)
        text = rest.lstrip(" \t")
    try:
        times, text = _time_spec(text)
        parts.update(times)
    except _Miss:
        if len(parts) == 1:  # neither days nor a date
            raise _Miss(text, 'Context("date or time specification")') from None
        parts.update(zip(("hour", "minute", "second"), _MIDNIGHT, strict=True))
    if text:
        raise _Miss(text, "Nom(Eof)")
    return CalendarEvent(**parts)


def calendar_event_error(text: str) -> str | None:
    """The `pve-calendar-event` format check: PVE's parameter message, or None."""
    try:
        parse_calendar_event(text)
    except CalendarError as exc:
        return f"invalid format - invalid calendar event '{text}' - {exc}\n"
    return None


# ----------------------------------------------------------------------------------- retention


@functools.cache
def _prune_format() -> dict[str, Any]:
    """The `prune-backups` property-string format, from the schema PVE ships."""
    returns = pve_schema.load().paths["/cluster/backup/{id}"]["GET"]["returns"]
    format_: dict[str, Any] = returns["properties"]["prune-backups"]["properties"]
    return format_


def parse_prune_backups(text: str) -> dict[str, int]:
    """parse_property_string('prune-backups') with pve-storage's validate_prune_backups: no
    positive keep option means keep-all. Raises ValueError with PVE's parameter message."""
    _value, error = pve_schema.check_value({"type": "string", "format": _prune_format()}, text)
    if error:
        raise ValueError(error)
    keep: dict[str, int] = {}
    for part in str(text).split(","):
        key, _, value = part.strip().partition("=")
        if key == "keep-all":
            keep[key] = int(pve_schema.parse_boolean(value) or 0)
        elif key:
            keep[key] = int(value)
    keep_all = keep.pop("keep-all", 0)
    if not any(v > 0 for v in keep.values()):
        return {"keep-all": 1}
    if keep_all:
        raise ValueError("invalid format - keep-all cannot be set together with other options.\n")
    return keep


def print_prune_backups(keep: dict[str, Any]) -> str:
    """print_property_string for a job's property-string options."""
    return ",".join(f"{k}={keep[k]}" for k in sorted(keep))


def _property_object(key: str, text: str) -> dict[str, Any]:
    """JobBase.pm decode_value for `fleecing` and `performance`: the property string as the
    object the job returns, typed by the schema PVE ships (a bare value: the default key)."""
    returns = pve_schema.load().paths["/cluster/backup/{id}"]["GET"]["returns"]
    props: dict[str, Any] = returns["properties"][key]["properties"]
    default = next((k for k, p in props.items() if p.get("default_key")), None)
    out: dict[str, Any] = {}
    for part in str(text).split(","):
        name, eq, value = part.strip().partition("=")
        if not eq:
            name, value = default or name, name
        kind = props.get(name, {}).get("type")
        if kind == "boolean":
            out[name] = int(pve_schema.parse_boolean(value) or 0)
        elif kind == "integer" and value.lstrip("-").isdigit():
            out[name] = int(value)
        elif name:
            out[name] = value
    return out


def _iso_week(ctime: float) -> tuple[int, int]:
    year, week, _day = datetime.fromtimestamp(ctime).isocalendar()
    return week, year


_PERIODS: tuple[tuple[str, Callable[[float], Any]], ...] = (
    ("keep-last", lambda ctime: ctime),
    ("keep-hourly", lambda ctime: time.localtime(ctime)[:4]),
    ("keep-daily", lambda ctime: time.localtime(ctime)[:3]),
    ("keep-weekly", _iso_week),
    ("keep-monthly", lambda ctime: time.localtime(ctime)[:2]),
    ("keep-yearly", lambda ctime: time.localtime(ctime)[0]),
)


def prune_mark_backup_group(group: list[dict[str, Any]], keep: dict[str, int]) -> None:
    """pve-storage PVE::Storage::prune_mark_backup_group: sets each entry's `mark` (`keep` or
    `remove`; an entry already marked, e.g. `protected`, is left as it is and not counted)."""
    if keep.get("keep-all") or not any(v > 0 for k, v in keep.items() if k != "keep-all"):
        for entry in group:
            if entry.get("mark") in (None, "remove"):
                entry["mark"] = "keep"
        return
    newest_first = sorted(group, key=lambda e: -e["ctime"])
    for option, period in _PERIODS:
        _prune_mark(newest_first, keep.get(option, 0), period)
    for entry in newest_first:
        if entry.get("mark") is None:
            entry["mark"] = "remove"


def _prune_mark(entries: list[dict[str, Any]], count: int, period: Callable[[float], Any]) -> None:
    if not count:
        return
    already = {period(e["ctime"]) for e in entries if e.get("mark") == "keep"}
    newly: set[Any] = set()
    for entry in entries:
        key = period(entry["ctime"])
        if entry.get("mark") is not None or key in already:
            continue
        if key in newly:
            entry["mark"] = "remove"
            continue
        if len(newly) >= count:
            break
        newly.add(key)
        entry["mark"] = "keep"


# -------------------------------------------------------------------------------------- notes


def verify_notes_template(template: str) -> None:
    """VZDump.pm verify_notes_template; raises ValueError with PVE's message."""
    if "\n" in template:
        raise ValueError("contains a line feed\n")
    problems = [
        f"escape sequence '\\{m.group(1)}' at char {m.start()}"
        for m in re.finditer(r"\\(.)", template)
        if m.group(1) not in ("n", "\\")
    ]
    problems += [
        f"variable '{m.group(1)}' at char {m.end() - len(m.group(1))}"
        for m in re.finditer(r"\{\{([^\s{}]+)\}\}", template)
        if m.group(1) not in _NOTES_VARS
    ]
    if problems:
        raise ValueError("found unknown: " + ", ".join(problems) + "\n")


def expand_notes(template: str, info: dict[str, Any]) -> str:
    """VZDump.pm generate_notes: `\\n` and `\\\\` unescaped, then the variables filled in."""
    verify_notes_template(template)
    text = re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else "\\", template)
    pattern = r"\{\{(" + "|".join(_NOTES_VARS) + r")\}\}"
    return re.sub(pattern, lambda m: str(info[m.group(1)]), text)


# --------------------------------------------------------------------------------- shared parts


@functools.cache
def _vzdump_options() -> frozenset[str]:
    """The options vzdump knows (VZDump::Common confdesc): the API's parameters but its own."""
    props = pve_schema.load().paths["/nodes/{node}/vzdump"]["POST"]["parameters"]["properties"]
    return frozenset(props) - {"stdout", "job-id"}


def _stringified(exc: PveError) -> PveError:
    """An exception raised inside PVE's cfs_lock_file and re-raised with `die "$@"`: Perl
    stringifies it (PVE::Exception::stringify), so the client sees a 500 with the code,
    message and field errors as text."""
    if not exc.errors:
        return exc
    lines = [f"{exc.status} {exc.message}"]
    lines += [f"{field}: {str(text).rstrip()}" for field, text in exc.errors.items()]
    return die("\n".join(lines))


def _kind(guest: Any) -> str:
    """`lxc` or `qemu`."""
    return "lxc" if isinstance(guest, FakeCt) else "qemu"


def _guest_name(guest: Any) -> str:
    if isinstance(guest, FakeCt):
        return str(guest.config.get("hostname") or f"CT{guest.vmid}")
    return str(guest.config.get("name") or f"VM {guest.vmid}")


def _archive_of(kind: str, config: dict[str, Any], firewall: Any) -> dict[str, Any]:
    """What a vzdump archive holds: the guest's config as VZDump/LXC.pm and VZDump/QemuServer.pm
    write it into the archive, its firewall config, and the disks included (key -> bytes)."""
    conf = {k: v for k, v in config.items() if k not in _ARCHIVE_DROPS}
    included: dict[str, int] = {}
    if kind == "lxc":
        for key in sorted(conf):
            if key != "rootfs" and not re.fullmatch(r"mp\d+", key):
                continue
            mount = parse_mount(conf[key])
            if mount_type(mount.get("volume", "")) != "volume":
                continue
            if key == "rootfs" or pve_schema.parse_boolean(str(mount.get("backup", "0"))) == "1":
                included[key] = parse_size(mount.get("size", "0")) or 0
    else:
        for key, _volume, props in drives_of(conf, skip_cdrom=True):
            if pve_schema.parse_boolean(str(props.get("backup", "1"))) != "0":
                included[key] = parse_size(props.get("size", "0")) or 0
    return {"type": kind, "config": conf, "firewall": copy.deepcopy(firewall), "disks": included}


def _archive_size(archive: dict[str, Any], compressed: bool) -> int:
    """The fake's archive size: an eighth of the included disks is data, halved by compression."""
    data = int(sum(archive["disks"].values())) // 8
    return max(data // 2 if compressed else data, 1024**2)


def _default_config(kind: str, vmid: int) -> dict[str, Any]:
    if kind == "lxc":
        return {
            "arch": "amd64",
            "hostname": f"CT{vmid}",
            "memory": 512,
            "ostype": "debian",
            "rootfs": f"local-lvm:vm-{vmid}-disk-0,size=8G",
            "swap": 512,
            "unprivileged": 1,
        }
    return {"memory": 2048, "name": f"VM{vmid}", "scsi0": f"local-lvm:vm-{vmid}-disk-0,size=8G"}


def _stamp(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def _duration(seconds: float) -> str:
    whole = int(seconds)
    return f"{whole // 3600:02d}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def _format_size(size: int) -> str:
    """VZDump.pm format_size."""
    if size < 1024**2:
        return f"{size // 1024}KB"
    if size < 1024**3:
        return f"{size // 1024**2}MB"
    if size < 1024**4:
        return f"{size / 1024**3:.2f}GB"
    return f"{size / 1024**4:.2f}TB"


def _vmids(text: Any) -> list[int]:
    """VZDump.pm check_vmids."""
    out = []
    for item in split_list(text):
        if not item.isdigit():
            raise die(f"ERROR: strange VM ID '{item}'")
        out.append(int(item))
    return out


def _command_line(opts: dict[str, Any]) -> str:
    """VZDump::Common::command_line, for the task log."""
    words = ["vzdump", *split_list(opts.get("vmid"))]
    for key in sorted(opts):
        if key in ("id", "vmid", "starttime", "dow", "stdout", "enabled", "job-id"):
            continue
        value = opts[key]
        if isinstance(value, dict):
            value = print_prune_backups(value)
        if value is not None and value != "":
            words += [f"--{key}", str(value)]
    return " ".join(words)


# ---------------------------------------------------------------------------------------- jobs


class BackupJobsApi(StatefulRoutes):  # type: ignore[misc]  # fakepve ships no types
    """Backup jobs, not-backed-up and the scheduler (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # id -> the job's options as jobs.cfg holds them (prune-backups parsed), creation order.
        self.backup_jobs: dict[str, dict[str, Any]] = {}
        # The time backups and the scheduler see; tests may set a fixed or stepping clock.
        self.backup_clock: Callable[[], float] = time.time
        # (job id, node) -> the node's job state (Jobs.pm): time, updated, upid.
        self._bk_state: dict[tuple[str, str], dict[str, Any]] = {}
        self._bk_created: dict[str, float] = {}

    def _routes_backup_jobs(self) -> list[tuple[str, str, Any]]:
        one = "/cluster/backup/{id}"
        return [
            ("GET", "/cluster/backup", self._bj_index),
            ("POST", "/cluster/backup", self._bj_create),
            ("GET", one, self._bj_read),
            ("PUT", one, self._bj_update),
            ("DELETE", one, self._bj_delete),
            ("GET", "/cluster/backup-info/not-backed-up", self._bj_not_backed_up),
        ]

    # ---------------------------------------------------------------- parameters

    @staticmethod
    def _bk_check_formats(params: dict[str, Any]) -> None:
        """The schema formats fakepve leaves unchecked, with PVE's parameter messages."""
        errors: dict[str, str] = {}
        if params.get("schedule") is not None:
            why = calendar_event_error(str(params["schedule"]))
            if why:
                errors["schedule"] = why
        if isinstance(params.get("prune-backups"), str):
            try:
                params["prune-backups"] = parse_prune_backups(params["prune-backups"])
            except ValueError as exc:
                errors["prune-backups"] = str(exc)
        for key in ("fleecing", "performance"):
            if isinstance(params.get(key), str):
                params[key] = _property_object(key, params[key])
        for day in split_list(params.get("dow")):
            if day not in ALL_DAYS.split(","):
                errors["dow"] = f"invalid format - invalid day '{day}'\n"
        if errors:
            raise param_error(**errors)

    def _bk_assert_common(self, user: str, params: dict[str, Any]) -> None:
        """Backup.pm assert_param_permission_common."""
        if user == "root@pam":
            return
        for key in _ROOT_ONLY:
            if key in params:
                raise param_error(**{key: "Only root may set this option."})
        if any(params.get(k) is not None for k in ("bwlimit", "ionice", "performance")):
            self.require(user, "/", "Sys.Modify")

    def _bk_check_pool(self, user: str, params: dict[str, Any]) -> None:
        pool = params.get("pool")
        if pool:
            if pool not in self.pools:
                raise PveError(403, f"Permission check failed (pool '{pool}' does not exist)")
            self.require(user, f"/pool/{pool}", "VM.Backup")

    @staticmethod
    def _bk_schedule_param(params: dict[str, Any], required: bool) -> None:
        """Backup.pm $schedule_param_check: the old `starttime`/`dow` become a schedule."""
        if params.get("schedule") is not None:
            if params.get("starttime") is not None:
                raise param_error(starttime="'starttime' and 'schedule' cannot both be set")
        elif params.get("starttime") is None:
            if required:
                raise param_error(schedule="neither 'starttime' nor 'schedule' were set")
        else:
            dow = ",".join(split_list(params.get("dow")))
            start = str(params["starttime"])
            params["schedule"] = start if not dow or dow == ALL_DAYS else f"{dow} {start}"
        params.pop("starttime", None)
        params.pop("dow", None)

    @staticmethod
    def _bk_verify(params: dict[str, Any], check_missing: bool) -> None:
        """VZDump.pm verify_vzdump_parameters."""
        for key in ("all", "exclude", "pool"):
            if params.get(key) and params.get("vmid"):
                raise param_error(**{key: "option conflicts with option 'vmid'"})
        if isinstance(params.get("prune-backups"), str):
            params["prune-backups"] = parse_prune_backups(params["prune-backups"])
        if params.get("notes-template"):
            try:
                verify_notes_template(str(params["notes-template"]))
            except ValueError as exc:
                raise param_error(**{"notes-template": str(exc)}) from None
        if params.get("exclude") is not None and not params.get("pool"):
            params["all"] = 1
        if check_missing and not (
            params.get("all") or params.get("stop") or params.get("pool") or params.get("vmid")
        ):
            raise param_error(vmid="property is missing")

    # -------------------------------------------------------------------- routes

    def _bj_view(self, jid: str, job: dict[str, Any]) -> dict[str, Any]:
        out = {k: dict(v) if isinstance(v, dict) else v for k, v in job.items()}
        out["id"] = jid
        return out

    async def _bj_index(self, v: dict[str, Any], user: str) -> list[dict[str, Any]]:
        now = self.backup_clock()
        out = []
        for jid, job in self.backup_jobs.items():
            item = self._bj_view(jid, job)
            if job.get("schedule"):
                # Jobs are cluster wide and may not have run here: the next event from now.
                upcoming = parse_calendar_event(str(job["schedule"])).next_after(now)
                if upcoming is not None:
                    item["next-run"] = upcoming
            out.append(item)
        return out

    async def _bj_read(self, v: dict[str, Any], user: str) -> dict[str, Any]:
        job = self.backup_jobs.get(v["id"])
        if job is None:
            raise param_error(id=f"No such job '{v['id']}'")
        return self._bj_view(v["id"], job)

    async def _bj_create(self, v: dict[str, Any], user: str) -> None:
        params = dict(v)
        self._bk_check_formats(params)
        self._bk_assert_common(user, params)
        storage = None if params.get("dumpdir") else params.get("storage") or "local"
        if storage and user != "root@pam":
            self.require(user, f"/storage/{storage}", "Datastore.Allocate")
        self._bk_check_pool(user, params)
        self._bk_schedule_param(params, required=True)
        params.setdefault("enabled", 1)
        jid = str(params.pop("id", None) or uuid.uuid4())
        self.need_quorum()
        if jid in self.backup_jobs:
            raise die(f"Job '{jid}' already exists")
        try:
            self._bk_verify(params, check_missing=True)
        except PveError as exc:
            raise _stringified(exc) from None
        self.backup_jobs[jid] = {"type": "vzdump", **params}
        self._bk_created[jid] = self.backup_clock()

    async def _bj_update(self, v: dict[str, Any], user: str) -> None:
        params = {k: x for k, x in v.items() if k not in ("id", "delete")}
        jid = str(v["id"])
        deletes = split_list(v.get("delete"))
        self._bk_check_formats(params)
        self._bk_assert_common(user, params)
        self._bk_check_pool(user, params)
        self._bk_schedule_param(params, required=False)
        self.need_quorum()
        try:
            job = self._bj_merge(jid, params, deletes)
        except PveError as exc:
            raise _stringified(exc) from None
        old = self.backup_jobs[jid]
        self.backup_jobs[jid] = job
        if any(str(old.get(k, "")) != str(job.get(k, "")) for k in ("enabled", "schedule")):
            now = self.backup_clock()
            for (state_jid, _node), state in self._bk_state.items():
                if state_jid == jid:
                    state["updated"] = now
            self._bk_created[jid] = now

    def _bj_merge(self, jid: str, params: dict[str, Any], deletes: list[str]) -> dict[str, Any]:
        """Backup.pm update_job, inside its cfs lock: the job with the update applied."""
        if not params and not deletes:
            raise die("no options specified")
        self._bk_verify(params, check_missing=False)
        job = self.backup_jobs.get(jid)
        if job is None:
            raise die("no such vzdump job")
        new = dict(job)
        for key in deletes:
            if key not in _vzdump_options() and key not in _DELETABLE:
                raise param_error(delete=f"unknown option '{key}'")
            new.pop(key, None)
        new.update(params)
        if new.get("exclude") is not None and new.get("pool") is None:
            new["all"] = 1
        drops = (
            ("all", "exclude", "pool")
            if params.get("vmid") is not None
            else ("vmid", "pool")
            if params.get("all")
            else ("vmid", "all", "exclude")
            if new.get("pool")
            else ()
        )
        for key in drops:
            new.pop(key, None)
        self._bk_verify(new, check_missing=True)
        return new

    async def _bj_delete(self, v: dict[str, Any], user: str) -> None:
        jid = str(v["id"])
        self.need_quorum()
        if jid not in self.backup_jobs:
            raise _stringified(param_error(id=f"No such job '{jid}'"))
        del self.backup_jobs[jid]
        self._bk_created.pop(jid, None)
        for key in [k for k in self._bk_state if k[0] == jid]:
            del self._bk_state[key]

    def _bk_included(self, job: dict[str, Any]) -> dict[str, list[int]]:
        """VZDump.pm get_included_guests: node -> the selected vmids there ('' for ids no
        guest has)."""
        if job.get("pool"):
            pool = str(job["pool"])
            if pool not in self.pools:
                raise die(f"pool '{pool}' does not exist")
            ids = [vmid for vmid in self.pools[pool] if self.guest(vmid) is not None]
        elif job.get("vmid"):
            ids = _vmids(job["vmid"])
        elif job.get("all"):
            exclude = set(_vmids(job.get("exclude")))
            ids = [g.vmid for g in self._guests() if g.vmid not in exclude]
        else:
            return {}
        per_node: dict[str, list[int]] = {}
        for vmid in ids:
            guest = self.guest(vmid)
            if guest is None:
                per_node.setdefault("", []).append(vmid)
            elif not job.get("node") or job["node"] == guest.node:
                per_node.setdefault(guest.node, []).append(vmid)
        return per_node

    async def _bj_not_backed_up(self, v: dict[str, Any], user: str) -> list[dict[str, Any]]:
        """BackupInfo.pm get_guests_not_in_backup: every job counts, enabled or not."""
        included: set[int] = set()
        for job in self.backup_jobs.values():
            for ids in self._bk_included(job).values():
                included.update(ids)
        out = []
        for guest in sorted(self._guests(), key=lambda g: g.vmid):
            if guest.vmid in included or not self.allowed(user, f"/vms/{guest.vmid}", "VM.Audit"):
                continue
            out.append({"vmid": guest.vmid, "type": _kind(guest), "name": _guest_name(guest)})
        return out

    # ------------------------------------------------------------------ scheduler

    def _bk_last_run(self, jid: str, node: str) -> dict[str, Any]:
        return self._bk_state.setdefault((jid, node), {"time": self._bk_created.get(jid, 0.0)})

    def _bk_job_running(self, state: dict[str, Any]) -> bool:
        record = self.tasks.get(state.get("upid") or "")
        return bool(record and record["status"] == "running")

    async def run_jobs(self, now: float | None = None) -> list[str]:
        """Jobs.pm run_jobs on every online node: start each enabled job whose next event after
        its last run has come. Returns the UPIDs of the vzdump tasks started."""
        now = self.backup_clock() if now is None else now
        started: list[str] = []
        for jid in sorted(self.backup_jobs):
            job = self.backup_jobs[jid]
            for node in sorted(self.nodes):
                if not self.nodes[node].get("online", True):
                    continue
                if job.get("node") and job["node"] != node:
                    continue  # only local jobs are scheduled
                state = self._bk_last_run(jid, node)
                if self._bk_job_running(state) or not job.get("enabled", 1):
                    continue
                last = state.get("updated", state["time"])
                upcoming = parse_calendar_event(str(job["schedule"])).next_after(last)
                if upcoming is None or now < upcoming:
                    continue
                result = await self._bk_run_job(jid, job, node)
                upid = result if result.startswith("UPID:") else None
                self._bk_state[(jid, node)] = {"time": now, "upid": upid, "msg": result}
                if upid:
                    started.append(upid)
        return started

    async def _bk_run_job(self, jid: str, job: dict[str, Any], node: str) -> str:
        """Jobs/VZDump.pm run: the API's vzdump with the job's vzdump options and its id."""
        opts = {k: v for k, v in job.items() if k in _vzdump_options()}
        opts.update({"job-id": jid, "quiet": 1})
        try:
            upid: str = await self._vz_run(node, "root@pam", opts)
        except PveError as exc:
            return str(exc.message)  # pvescheduler warns and records it as the job's state
        return upid

    def run_due_jobs(self, now: float | None = None) -> list[str]:
        """run_jobs() from a thread other than the fake's (a test): what pvescheduler does."""
        loop = getattr(self, "_bk_loop", None)
        if loop is None or not loop.is_running():
            raise RuntimeError("the fake is not serving")
        if loop is _running_loop():
            raise RuntimeError("on the fake's own loop: await pve.run_jobs(now)")
        started: list[str] = asyncio.run_coroutine_threadsafe(self.run_jobs(now), loop).result(30)
        return started


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


# -------------------------------------------------------------------------------------- vzdump


def backup_volname(pbs: bool, kind: str, vmid: int, ctime: float, compress: str) -> tuple[str, str]:
    """(volume name, format) of a backup started at `ctime`: VZDump.pm exec_backup_task's
    archive name on a directory storage (local time), PBSPlugin.pm print_volid on PBS (UTC)."""
    if pbs:
        btype = "ct" if kind == "lxc" else "vm"
        return f"backup/{btype}/{vmid}/{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(ctime))}", (
            f"pbs-{btype}"
        )
    stamp = time.strftime("%Y_%m_%d-%H_%M_%S", time.localtime(ctime))
    ext = ("tar" if kind == "lxc" else "vma") + _COMPRESS_EXT[str(compress)]
    return f"backup/vzdump-{kind}-{vmid}-{stamp}.{ext}", ext


def _name_ctime(volname: str) -> int | None:
    """Storage.pm archive_info: the ctime a standard backup name carries (local time)."""
    found = _DIR_BACKUP.match(volname)
    if not found:
        return None
    year, month, day, hour, minute, second = (int(x) for x in found.groups()[2:8])
    return int(time.mktime((year, month, day, hour, minute, second, 0, 0, -1)))


class VzdumpApi(StatefulRoutes):  # type: ignore[misc]  # fakepve ships no types
    """`POST /nodes/{node}/vzdump` and the backup volumes it writes (see the module docstring)."""

    backup_secs = BACKUP_SECS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._bk_claimed: set[str] = set()
        self._bk_node_locks: dict[str, asyncio.Lock] = {}
        self._bk_hold = False
        self._bk_gate: asyncio.Event | None = None
        self._bk_loop: asyncio.AbstractEventLoop | None = None

    def _routes_vzdump(self) -> list[tuple[str, str, Any]]:
        return [("POST", "/nodes/{node}/vzdump", self._vz_post)]

    async def _vz_post(self, v: dict[str, Any], user: str) -> str:
        """API2/VZDump.pm vzdump: the checks made before the worker starts."""
        opts = dict(v)
        if opts.get("stdout"):
            raise param_error(stdout="option is only allowed on the command line interface.")
        self._bk_check_formats(opts)
        self._bk_assert_common(user, opts)
        storage = None if opts.get("dumpdir") else opts.get("storage") or "local"
        if opts.get("prune-backups") is not None and storage and user != "root@pam":
            self.require(user, f"/storage/{storage}", "Datastore.Allocate")
        self._bk_verify(opts, check_missing=True)
        return await self._vz_run(v["node"], user, opts)

    async def _vz_run(self, node: str, user: str, opts: dict[str, Any]) -> str:
        """The node's part of a vzdump: its guests in one `vzdump` task, or "OK" for none."""
        if opts.get("node") and opts["node"] != node:
            return "OK"
        per_node = self._bk_included(opts)
        local = sorted(per_node.pop(node, []) + per_node.pop("", []))
        skipped = sorted(vmid for ids in per_node.values() for vmid in ids)
        if not local and not opts.get("all"):
            return "OK"  # no selected guest is here
        storage = None if opts.get("dumpdir") else opts.get("storage") or "local"
        if storage:
            self.require(user, f"/storage/{storage}", "Datastore.AllocateSpace")

        async def body() -> None:
            record = self._vz_claim(node)
            try:
                lock = self._bk_node_locks.setdefault(node, asyncio.Lock())
                async with lock:  # VZDump.pm getlock: one vzdump per node at a time
                    await self._vz_job(node, user, opts, local, skipped, record["log"])
            except (TaskError, asyncio.CancelledError):
                raise
            except Exception as exc:  # a bug here must still end the task, not hang it
                logging.getLogger(__name__).exception("vzdump on %s", node)
                raise TaskError(f"internal error: {exc}") from exc
            finally:
                self._bk_claimed.discard(record.get("upid", ""))

        tid = local[0] if len(local) == 1 else ""
        upid: str = await self.task(node, "vzdump", tid, user, body, lock=False)
        return upid

    def _vz_claim(self, node: str) -> dict[str, Any]:
        """The task record of the vzdump body starting now: the oldest running vzdump of the
        node not claimed yet (tasks start in the order they were made)."""
        for record in self.tasklog:
            if (record["type"], record["node"], record["status"]) != ("vzdump", node, "running"):
                continue
            if record["upid"] not in self._bk_claimed:
                self._bk_claimed.add(record["upid"])
                claimed: dict[str, Any] = record
                return claimed
        return {"log": []}

    async def _vz_job(
        self,
        node: str,
        user: str,
        opts: dict[str, Any],
        vmids: list[int],
        skipped: list[int],
        log: list[str],
    ) -> None:
        """VZDump.pm new and exec_backup: the storage, then each guest; one failing guest does
        not stop the others, the job then ends in error."""
        setup = self._vz_setup(node, user, opts)
        log.append(f"INFO: starting new backup job: {_command_line(opts)}")
        if skipped:
            log.append("INFO: skip external VMs: " + ", ".join(map(str, skipped)))
        todo = []
        for vmid in vmids:
            guest = self.guest(vmid)
            if guest is not None and not self.allowed(user, f"/vms/{vmid}", "VM.Backup"):
                if opts.get("all"):
                    continue
                raise TaskError(f"Permission check failed (/vms/{vmid}, VM.Backup)")
            todo.append((vmid, guest))
        failed = 0
        for vmid, guest in todo:
            failed += not await self._vz_guest(setup, vmid, guest, log)
        log.append(f"INFO: Backup job finished {'with errors' if failed else 'successfully'}")
        if failed:
            raise TaskError("job errors")

    def _vz_setup(self, node: str, user: str, opts: dict[str, Any]) -> dict[str, Any]:
        """VZDump.pm new: the target storage (storage_info) and the retention to apply."""
        if opts.get("storage") and opts.get("dumpdir"):
            raise TaskError("cannot use options 'storage' and 'dumpdir' at the same time")
        if opts.get("dumpdir"):
            raise TaskError(f"dumpdir '{opts['dumpdir']}' does not exist")
        sid = str(opts.get("storage") or "local")
        errors = []
        try:
            self._active_store(sid, node)
        except PveError as exc:
            errors.append(f"could not activate storage '{sid}': {exc.message}")
        store = self.storages.get(sid)
        why = "could not get storage information for '{0}': {1}".format
        if store is None:
            errors.append(why(sid, f"storage '{sid}' does not exist"))
        elif "backup" not in split_list(store.get("content")):
            errors.append(why(sid, f"can't use storage '{sid}' for backups - wrong content type"))
        if errors:
            raise TaskError("\n".join(errors))
        keep = opts.get("prune-backups")
        if keep is None and store.get("prune-backups"):
            try:
                keep = parse_prune_backups(str(store["prune-backups"]))
            except ValueError as exc:
                raise TaskError(f"could not get storage information for '{sid}': {exc}") from None
        keep = keep or {"keep-all": 1}
        return {
            "node": node,
            "user": user,
            "storage": sid,
            "store": store,
            "pbs": store.get("type") == "pbs",
            "dumpdir": f"{self._base_path(sid)}/dump",
            "mode": opts.get("mode") or "snapshot",
            "compress": str(opts.get("compress") or "0"),
            "keep": keep,
            "remove": bool(opts.get("remove", 1)) and not keep.get("keep-all"),
            "notes": opts.get("notes-template"),
            "protected": bool(opts.get("protected")),
        }

    async def _vz_guest(self, setup: dict[str, Any], vmid: int, guest: Any, log: list[str]) -> bool:
        """VZDump.pm exec_backup_task for one guest, its errors logged: True when it worked."""
        try:
            if guest is None:
                raise TaskError(f"unable to find VM '{vmid}'")
            await self._vz_backup(setup, guest, self.backup_clock(), log)
        except TaskError as exc:
            log.append(f"ERROR: Backup of VM {vmid} failed - {exc}")
            log.append(f"INFO: Failed at {_stamp(self.backup_clock())}")
            return False
        log.append(f"INFO: Finished Backup of VM {vmid} ({_duration(self.backup_secs)})")
        log.append(f"INFO: Backup finished at {_stamp(self.backup_clock())}")
        return True

    async def _vz_backup(
        self, setup: dict[str, Any], guest: Any, started: float, log: list[str]
    ) -> None:
        kind, vmid = _kind(guest), guest.vmid
        if setup["mode"] == "stop" and guest.ha_state == "started":
            raise TaskError(
                "Cannot execute a backup with stop mode on a HA managed and enabled Service. "
                "Use snapshot mode or disable the Service."
            )
        volname, fmt = backup_volname(setup["pbs"], kind, vmid, started, setup["compress"])
        self._vz_check_limit(setup, kind, vmid)
        running = guest.status == "running"
        log.append(f"INFO: Starting Backup of VM {vmid} ({kind})")
        log.append(f"INFO: Backup started at {_stamp(started)}")
        log.append(f"INFO: status = {'running' if running else 'stopped'}")
        await self._vz_lock(guest)
        stopped = False
        try:
            mode = self._vz_prepare(setup, guest, running, log)
            archive = _archive_of(kind, guest.config, self._fw()["guests"].get(vmid))
            if mode == "stop" and running:
                log.append("INFO: stopping virtual guest")
                self._vz_power(guest, False)
                stopped = True
            where = (
                volname.split("/", 1)[1] if setup["pbs"] else f"{setup['dumpdir']}/{volname[7:]}"
            )
            label = "Proxmox Backup Server" if setup["pbs"] else "vzdump"
            log.append(f"INFO: creating {label} archive '{where}'")
            await self._vz_wait()
            vol = self._vz_write(setup, volname, fmt, vmid, started, archive)
            if not setup["pbs"]:
                log.append(f"INFO: archive file size: {_format_size(vol['size'])}")
            self._vz_annotate(setup, guest, vol, log)
            if setup["remove"]:
                self._vz_prune(setup, vmid, kind, log)
        finally:
            self._vz_unlock(guest)
            if stopped:
                log.append("INFO: restarting vm")
                self._vz_power(guest, True)

    def _vz_check_limit(self, setup: dict[str, Any], kind: str, vmid: int) -> None:
        """exec_backup_task: without `remove` the retention is a limit; protected backups have
        their own (max-protected-backups)."""
        keep = setup["keep"]
        limit = 0 if keep.get("keep-all") else sum(keep.values())
        if not ((limit and not setup["remove"]) or setup["protected"]):
            return
        backups = [
            vol
            for _name, vol in self._bk_backups(setup["storage"], vmid)
            if vol.get("subtype") in (None, kind)
        ]
        count = sum(1 for vol in backups if not vol.get("protected"))
        if setup["protected"]:
            most = self._bk_max_protected(setup["storage"], setup["user"])
            if most > -1 and len(backups) - count >= most:
                raise TaskError(
                    f"The number of protected backups per guest is limited to {most} on "
                    f"storage '{setup['storage']}'"
                )
        elif count >= limit:
            raise TaskError(
                f"There is a max backup limit of {limit} enforced by the target storage or the "
                "vzdump parameters. Either increase the limit or delete old backups."
            )

    def _bk_max_protected(self, sid: str, user: str) -> int:
        """Storage.pm get_max_protected_backups."""
        configured = self.storages[sid].get("max-protected-backups")
        if configured is not None:
            return int(configured)
        return -1 if self.allowed(user, f"/storage/{sid}", "Datastore.Allocate") else 5

    async def _vz_lock(self, guest: Any) -> None:
        """The plugins' lock_vm: AbstractConfig set_lock, under the config file lock."""
        await self.acquire(guest, "vzdump")  # TaskError "can't lock file ..." on a timeout
        try:
            if guest.lock:
                raise TaskError(
                    f"{'CT' if _kind(guest) == 'lxc' else 'VM'} is locked ({guest.lock})"
                )
            self._vz_set_lock(guest, "backup")
        finally:
            self.release(guest, "vzdump")

    def _vz_unlock(self, guest: Any) -> None:
        if guest.lock == "backup":
            self._vz_set_lock(guest, None)

    @staticmethod
    def _vz_set_lock(guest: Any, lock: str | None) -> None:
        guest.lock = lock
        if not isinstance(guest, FakeCt):  # a VM keeps its lock in two places
            if lock:
                guest.config["lock"] = lock
            else:
                guest.config.pop("lock", None)

    def _vz_prepare(self, setup: dict[str, Any], guest: Any, running: bool, log: list[str]) -> str:
        """The plugins' prepare: what is included, and the mode (a stopped guest: `stop`; LXC
        snapshot mode on storage that cannot snapshot falls back to `suspend`)."""
        mode = setup["mode"] if running else "stop"
        archive = _archive_of(_kind(guest), guest.config, None)
        log.append(f"INFO: {'CT' if _kind(guest) == 'lxc' else 'VM'} Name: {_guest_name(guest)}")
        if isinstance(guest, FakeCt):
            for key in sorted(guest.config, key=natural):
                if key != "rootfs" and not re.fullmatch(r"mp\d+", key):
                    continue
                mount = parse_mount(guest.config[key])
                path, kind = mount.get("mp", "/"), mount_type(mount.get("volume", ""))
                if key in archive["disks"]:
                    log.append(f"INFO: including mount point {key} ('{path}') in backup")
                else:
                    why = "disabled" if kind == "volume" else "not a volume"
                    where = f"{kind} mount point {key} ('{path}')"
                    log.append(f"INFO: excluding {where} from backup ({why})")
            stores = {
                str(parse_mount(guest.config[k]).get("volume", "")).split(":")[0]
                for k in archive["disks"]
            }
            if mode == "snapshot" and any(
                self.storages.get(sid, {}).get("type") not in SNAPSHOT_STORAGE for sid in stores
            ):
                log.append("INFO: mode failure - some volumes do not support snapshots")
                log.append("INFO: trying 'suspend' mode instead")
                mode = "suspend"
        else:
            for key, volume, props in drives_of(guest.config, skip_cdrom=True):
                if key in archive["disks"]:
                    log.append(
                        f"INFO: include disk '{key}' '{volume}' {props.get('size', '')}".rstrip()
                    )
                else:
                    log.append(f"INFO: exclude disk '{key}' '{volume}' (backup=no)")
        log.append(f"INFO: backup mode: {mode}")
        return mode

    def _vz_power(self, guest: Any, on: bool) -> None:
        """A stop-mode backup stops a running guest and starts it again afterwards."""
        guest.status = "running" if on else "stopped"
        guest.started_at = time.time() if on else None
        if isinstance(guest, FakeCt):
            guest.pid = next(self._ct_pids) if on else None
        else:
            guest.qmpstatus = guest.status

    async def _vz_wait(self) -> None:
        """The archive being written: `backup_secs` PVE seconds, after any hold_backups()."""
        while self._bk_hold:
            if self._bk_gate is None:
                self._bk_gate = asyncio.Event()
            await self._bk_gate.wait()
        await self.pause(self.backup_secs)

    def _vz_write(
        self,
        setup: dict[str, Any],
        volname: str,
        fmt: str,
        vmid: int,
        started: float,
        archive: dict[str, Any],
    ) -> dict[str, Any]:
        size = _archive_size(archive, setup["pbs"] or setup["compress"] != "0")
        vol = {
            "content": "backup",
            "format": fmt,
            "size": size,
            "ctime": int(started),
            "vmid": vmid,
            "subtype": archive["type"],
            "archive": archive,
        }
        self._bk_store_volume(setup["storage"], volname, vol)
        return vol

    def _bk_store_volume(self, sid: str, volname: str, vol: dict[str, Any]) -> None:
        """Put a backup volume on the storage, within its free space (a file of the same name
        is overwritten)."""
        store = self.storages[sid]
        volumes = store.setdefault("volumes", {})
        freed = int((volumes.get(volname) or {}).get("size") or 0)
        if "avail" in store:
            if vol["size"] > store["avail"] + freed:
                raise TaskError(f"unable to write to storage '{sid}': No space left on device")
            store["avail"] += freed - vol["size"]
        volumes[volname] = vol

    def _vz_annotate(
        self, setup: dict[str, Any], guest: Any, vol: dict[str, Any], log: list[str]
    ) -> None:
        """exec_backup_task: the notes from `notes-template`, then `protected`."""
        if setup["notes"]:
            log.append("INFO: adding notes to backup")
            info = {
                "cluster": self.cluster_name,
                "guestname": _guest_name(guest),
                "node": setup["node"],
                "vmid": guest.vmid,
            }
            try:
                vol["notes"] = expand_notes(str(setup["notes"]), info)
            except ValueError as exc:
                log.append(f"WARN: unable to add notes - {str(exc).rstrip()}")
        if setup["protected"]:
            log.append("INFO: marking backup as protected")
            vol["protected"] = True

    def _vz_prune(self, setup: dict[str, Any], vmid: int, kind: str, log: list[str]) -> None:
        keep = setup["keep"]
        log.append(
            "INFO: prune older backups with retention: "
            + ", ".join(f"{k}={keep[k]}" for k in sorted(keep))
        )
        removed = self.prune_backups(setup["storage"], keep, vmid, kind, log)
        extra = " not covered by keep-retention policy" if removed else ""
        log.append(f"INFO: pruned {removed} backup(s){extra}")

    def prune_backups(
        self, sid: str, keep: dict[str, int], vmid: int, kind: str, log: list[str] | None = None
    ) -> int:
        """pve-storage Plugin.pm prune_backups for one guest: its backups of `kind` on the
        storage marked by prune_mark_backup_group (names not in vzdump's scheme are left alone,
        protected ones kept), those marked `remove` deleted. Returns how many were."""
        pbs = self.storages[sid].get("type") == "pbs"
        entries: list[dict[str, Any]] = []
        group: list[dict[str, Any]] = []
        for volname, vol in self._bk_backups(sid, vmid):
            if (vol.get("subtype") or "unknown") != kind:
                continue
            named = int(vol.get("ctime") or 0) if pbs else _name_ctime(volname)
            entry: dict[str, Any] = {"volname": volname, "ctime": named or 0, "mark": None}
            if named is None:
                entry["mark"] = "renamed"
            if vol.get("protected"):
                entry["mark"] = "protected"
            entries.append(entry)
            if named is not None:
                group.append(entry)
        prune_mark_backup_group(group, keep)
        removed = 0
        for entry in entries:
            if entry["mark"] == "remove":
                if log is not None:
                    log.append(f"INFO: removing backup '{sid}:{entry['volname']}'")
                self._bk_free(sid, entry["volname"])
                removed += 1
        return removed

    def _bk_backups(self, sid: str, vmid: int | None = None) -> list[tuple[str, dict[str, Any]]]:
        volumes = self.storages[sid].get("volumes", {})
        return [
            (name, vol)
            for name, vol in sorted(volumes.items())
            if vol.get("content") == "backup" and (vmid is None or vol.get("vmid") == vmid)
        ]

    def _bk_free(self, sid: str, volname: str) -> None:
        store = self.storages[sid]
        vol = store.get("volumes", {}).pop(volname, None)
        if vol and "avail" in store:
            store["avail"] += int(vol.get("size") or 0)

    # -------------------------------------------------------------- storage content

    def _item(self, name: str, volname: str, vol: dict[str, Any]) -> dict[str, Any]:
        """A content listing entry; backups also carry `subtype` and only the first line of
        their notes (Plugin.pm get_subdir_files, PBSPlugin.pm list_volumes)."""
        item: dict[str, Any] = super()._item(name, volname, vol)
        if vol.get("content") == "backup":
            item["subtype"] = vol.get("subtype") or "unknown"
            if "notes" in item:
                item["notes"] = str(item["notes"]).split("\n", 1)[0]
        return item

    def _parse_volname(self, store: dict[str, Any], volname: str) -> tuple[str, Any, str]:
        """PBSPlugin.pm parse_volname for PBS storages; fakepve's own for the others."""
        if store.get("type") != "pbs":
            parsed: tuple[str, Any, str] = super()._parse_volname(store, volname)
            return parsed
        found = _PBS_BACKUP.match(volname)
        if not found:
            raise die(f"unable to parse PBS volume name '{volname}'")
        bid = found.group(2)
        return "backup", int(bid) if bid.isdigit() else None, f"pbs-{found.group(1)}"

    async def _content_put(self, v: dict[str, Any], user: str) -> None:
        """Content.pm updateattributes: also on PBS, and within max-protected-backups
        (Storage.pm update_volume_attribute)."""
        sid, volname, volid, store, vtype, owner, _fmt = self._volume_target(v)
        vol = store.get("volumes", {}).get(volname)
        if vtype == "backup" and vol and v.get("protected") and not vol.get("protected"):
            most = self._bk_max_protected(sid, user)
            same = [
                b
                for _n, b in self._bk_backups(sid, owner)
                if b.get("subtype") == vol.get("subtype")
            ]
            if most > -1 and sum(1 for b in same if b.get("protected")) >= most:
                raise die(
                    f"The number of protected backups per guest is limited to {most} on "
                    f"storage '{sid}'"
                )
        if store.get("type") != "pbs":
            await super()._content_put(v, user)
            return
        self._check_access(user, sid, vtype, owner, volid)
        if vol is None:
            raise die(f"volume '{volid}' does not exist")
        if "notes" in v:
            vol["notes"] = v["notes"]
            if not v["notes"]:
                vol.pop("notes")
        if "protected" in v:
            vol["protected"] = bool(v["protected"])

    # --------------------------------------------------------------------- helpers

    def add_backup(
        self,
        storage: str,
        vmid: int,
        ctime: float,
        *,
        kind: str | None = None,
        config: dict[str, Any] | None = None,
        notes: str | None = None,
        protected: bool = False,
        compress: str = "zstd",
        size: int | None = None,
    ) -> str:
        """Seed a backup volume as vzdump would have written it at `ctime` (e.g. a stale one).
        The archive holds `config`, else the guest's current config, else a minimal one.
        Returns its volume id."""
        store = self.storages[storage]
        guest = self.guest(vmid)
        kind = kind or (_kind(guest) if guest is not None else "lxc")
        if config is None:
            same = guest is not None and _kind(guest) == kind
            config = dict(guest.config) if same else _default_config(kind, vmid)
        firewall = self._fw()["guests"].get(vmid) if guest is not None else None
        archive = _archive_of(kind, config, firewall)
        pbs = store.get("type") == "pbs"
        volname, fmt = backup_volname(pbs, kind, vmid, ctime, compress)
        vol: dict[str, Any] = {
            "content": "backup",
            "format": fmt,
            "size": size if size is not None else _archive_size(archive, pbs or compress != "0"),
            "ctime": int(ctime),
            "vmid": vmid,
            "subtype": kind,
            "archive": archive,
        }
        if notes is not None:
            vol["notes"] = notes
        if protected:
            vol["protected"] = True
        try:
            self._bk_store_volume(storage, volname, vol)
        except TaskError as exc:
            raise ValueError(str(exc)) from None
        return f"{storage}:{volname}"

    def hold_backups(self) -> None:
        """Make backups wait, once they hold their guest's lock, until release_backups(); needs
        time_scale > 0 (at 0 a backup runs inside its request)."""
        if not self.time_scale:
            raise ValueError("hold_backups() needs time_scale > 0")
        self._bk_hold = True

    def release_backups(self) -> None:
        """Let held backups go on."""
        self._bk_hold = False
        gate, self._bk_gate = self._bk_gate, None
        if gate is None:
            return
        loop = self._bk_loop
        if loop is not None and loop is not _running_loop() and loop.is_running():
            loop.call_soon_threadsafe(gate.set)
        else:
            gate.set()


# ------------------------------------------------------------------------------------- restore


class RestoreApi(StatefulRoutes):  # type: ignore[misc]  # fakepve ships no types
    """Restore from the backups above: fakepve's container and VM create, extended (see the
    module docstring)."""

    def _bk_archive_volume(self, volid: str) -> tuple[bool, dict[str, Any] | None]:
        """(whether a restore from `volid` is this module's, the backup volume): one written
        or seeded here, or a backup volume that is missing (its restore fails); any other is
        left to fakepve."""
        sid, colon, volname = volid.partition(":")
        store = self.storages.get(sid) if colon else None
        if store is None:
            return False, None
        vol = store.get("volumes", {}).get(volname)
        if vol is None:
            return volname.startswith("backup/"), None
        return "archive" in vol, vol

    def _bk_restore_firewall(self, vmid: int, archive: dict[str, Any], pbs: bool) -> None:
        """The guest's firewall config comes back from the archive (a directory backup always
        has one, empty when the guest had none)."""
        if archive.get("firewall") is not None:
            self._fw()["guests"][vmid] = copy.deepcopy(archive["firewall"])
        elif not pbs:
            self._fw()["guests"][vmid] = empty_conf()

    # ------------------------------------------------------------------ containers

    async def _lxc_create(self, user: str, v: dict[str, Any]) -> Any:
        if v.get("restore"):
            ours, vol = self._bk_archive_volume(str(v.get("ostemplate", "")))
            if ours:
                return await self._ct_restore(user, v, vol)
        return await super()._lxc_create(user, v)

    def _ct_restore_checks(self, user: str, v: dict[str, Any]) -> tuple[Any, bool]:
        """LXC.pm create_vm before the worker: the existing container (only with `force`, not
        running, not protected), the pool, the permissions, the backup volume. Returns the
        container to overwrite or None, and whether its firewall config is left alone (a
        user who may only back it up cannot configure its firewall)."""
        node, vmid = v["node"], int(v["vmid"])
        self.need_quorum()
        existing = self.ct(vmid)
        same = existing is not None and existing.node == node
        if v.get("ha-managed"):
            self.require(user, "/", "Sys.Console")
        if same and v.get("force"):
            if existing.status == "running":
                raise die("can't overwrite running container")
            self._check_protection(existing, f"unable to restore CT {vmid}")
        else:
            self._check_vmid_unused(vmid)
            existing = None
        pool = v.get("pool")
        if pool and pool not in self.pools:
            raise PveError(403, f"Permission check failed (pool '{pool}' does not exist)")
        if v.get("start"):
            self._vm_perm(user, vmid, pool, "VM.PowerMgmt")
        allowed = self.allowed(user, f"/vms/{vmid}", "VM.Allocate") or (
            pool and self.allowed(user, f"/pool/{pool}", "VM.Allocate")
        )
        if not allowed and not (existing and self.allowed(user, f"/vms/{vmid}", "VM.Backup")):
            raise PveError(403, "Permission check failed")
        self._check_template(user, str(v["ostemplate"]), True)
        return existing, not allowed

    def _ct_restore_params(
        self, user: str, v: dict[str, Any], storage: str
    ) -> tuple[dict[str, str], dict[str, Any]]:
        """The request's mount points (`rootfs`, `mpN`; a bare number is GiB on `storage`) and
        its other options, their storages checked."""
        vmid, node = int(v["vmid"]), v["node"]
        params = {k: x for k, x in v.items() if k not in CT_CREATE_ONLY}
        self._check_modify_perm(user, vmid, v.get("pool"), None, params, [], v.get("unprivileged"))
        mounts: dict[str, str] = {}
        conf: dict[str, Any] = {}
        for opt, value in params.items():
            if opt == "rootfs" or re.fullmatch(r"mp\d+", opt):
                bare = re.fullmatch(r"\d+(\.\d+)?", str(value))
                mounts[opt] = f"{storage}:{value}" if bare else str(value)
            elif not opt.startswith("unused"):
                conf[opt] = normalise(opt, value)
        if mounts and "rootfs" not in mounts:
            raise die("mount points configured, but 'rootfs' not set - aborting")
        sids = [storage] if "rootfs" not in mounts else []
        for value in mounts.values():
            volume = str(parse_mount(value).get("volume", ""))
            if mount_type(volume) != "volume":
                if user != "root@pam":
                    raise die("Only root can pass arbitrary filesystem paths.")
            else:
                sids.append(volume.split(":")[0])
        for sid in sids:  # check_and_activate_storage
            self._check_enabled(sid, node)
            self._storage_for(sid, user, vmid)
        return mounts, conf

    async def _ct_restore(self, user: str, v: dict[str, Any], vol: dict[str, Any] | None) -> Any:
        node, vmid = v["node"], int(v["vmid"])
        existing, skip_firewall = self._ct_restore_checks(user, v)
        storage = str(v.get("storage") or "local")
        mounts, conf = self._ct_restore_params(user, v, storage)
        emsg = f"unable to restore CT {vmid} -"
        if existing is not None:  # create_and_lock_config with force
            if existing.lock:
                raise die(f"{emsg} CT is locked ({existing.lock})")
            existing.lock = "create"
            ct = existing
        else:
            ct = FakeCt(vmid, node=node, defaults=False, config={"lock": "create"})
            self.cts.append(ct)
        ostemplate = str(v["ostemplate"])

        async def body() -> str | None:
            made = existing is None  # destroy_config_on_error
            try:
                if vol is None:
                    raise TaskError(f"can't find file '{ostemplate}'")
                archive = vol["archive"]
                if archive["type"] != "lxc":
                    raise TaskError(f"got unexpected backup format '{vol.get('format')}'")
                mp_param: dict[str, str] = mounts
                delayed: dict[str, str] = {}
                if not mounts:
                    mp_param, delayed = self._ct_archive_mounts(archive, storage, user)
                made = True
                await self._ct_restore_into(ct, archive, mp_param, delayed, conf, v)
                if not skip_firewall:
                    pbs = str(vol.get("format", "")).startswith("pbs")
                    self._bk_restore_firewall(vmid, archive, pbs)
            except TaskError as exc:
                if made:
                    self._drop(ct)
                else:
                    ct.lock = None  # the old container stays as it was
                raise TaskError(f"{emsg} {exc}") from None
            return await self._ct_after_create(ct, user, v)

        log = [f"recovering backed-up configuration from '{ostemplate}'"]
        return await self.task(node, "vzrestore", vmid, user, body, vm=ct, log=log)

    @staticmethod
    def _ct_archive_mounts(
        archive: dict[str, Any], storage: str, user: str
    ) -> tuple[dict[str, str], dict[str, str]]:
        """LXC.pm create_vm, storage-only mode: every volume mount point of the backup, made
        anew on `storage` with its size and options; bind and device mounts come back last."""
        config = archive["config"]
        mounts: dict[str, str] = {}
        delayed: dict[str, str] = {}
        for key in sorted(config, key=natural):
            if key != "rootfs" and not re.fullmatch(r"mp\d+", key):
                continue
            mount = parse_mount(config[key])
            kind = mount_type(str(mount.get("volume", "")))
            if kind == "volume":
                if mount.get("size") is None:
                    raise TaskError(f"unable to detect disk size - please specify {key} (size)")
                size = parse_size(mount.pop("size")) or 0
                mount["volume"] = f"{storage}:{format(size / GIB, '.15g')}"
                mounts[key] = print_mount(mount, key == "rootfs")
            elif key == "rootfs":
                raise TaskError(
                    f"restoring rootfs to {kind} mount is only possible by specifying -rootfs "
                    "manually!"
                )
            elif user != "root@pam":
                raise TaskError(f"restoring '{key}' to {kind} mount is only possible for root")
            else:
                delayed[key] = print_mount(mount)
        if "rootfs" not in mounts:
            raise TaskError(
                "rootfs configuration could not be recovered, please check and specify manually!"
            )
        return mounts, delayed

    async def _ct_restore_into(
        self,
        ct: Any,
        archive: dict[str, Any],
        mp_param: dict[str, str],
        delayed: dict[str, str],
        conf: dict[str, Any],
        v: dict[str, Any],
    ) -> None:
        """The worker: new disks (allocated while the old ones still exist), the archive
        extracted, the backed-up config merged under the given one (Create.pm
        sanitize_and_merge_config), the defaults, then the config written."""
        final = dict(conf)
        taken = self._taken_volumes()
        for key in sorted(mp_param, key=lambda k: (k != "rootfs", natural(k))):
            final[key] = self._realise(ct.vmid, key, mp_param[key], taken)
        await self.pause(self.ct_secs["create"])
        original = copy.deepcopy(archive["config"])
        for key, value in original.items():
            if key in _CT_NOT_MERGED or re.fullmatch(r"(mp|unused)\d+", key):
                continue
            if v.get("unique") and re.fullmatch(r"net\d+", key):
                final[key] = normalise(key, re.sub(r"(^|,)hwaddr=[^,]*", "", str(value)))
                continue
            final.setdefault(key, value)
        if v.get("unprivileged") is not None:
            final.pop("unprivileged", None)
            if pve_schema.parse_boolean(str(v["unprivileged"])) == "1":
                final["unprivileged"] = 1
        elif original.get("unprivileged") is not None:
            final["unprivileged"] = original["unprivileged"]
        final.setdefault("hostname", f"CT{ct.vmid}")
        final.setdefault("memory", 512)
        final.setdefault("swap", 512)
        final.update(delayed)
        if original.get("template"):
            final["template"] = 1
        ct.config, ct.pending, ct.snapshots = final, {}, {}
        ct.status, ct.pid = "stopped", None

    async def _ct_after_create(self, ct: Any, user: str, v: dict[str, Any]) -> str | None:
        if v.get("pool"):
            self._pool_join(v["pool"], ct.vmid)
        if v.get("start"):
            await self._start_steps(ct, user)
        if v.get("ha-managed"):
            ct.ha_state = "started" if v.get("start") else "stopped"
            return "Add as HA resource"
        return None

    # ------------------------------------------------------------------------- VMs

    async def _qm_create(self, v: dict[str, Any], user: str) -> Any:
        archive = str(v.get("archive") or "")
        if archive:
            ours, vol = self._bk_archive_volume(archive)
            if ours or archive == "-":
                return await self._vm_restore(v, user, vol)
        return await super()._qm_create(v, user)

    def _vm_restore_checks(self, v: dict[str, Any], user: str) -> dict[str, Any]:
        """Qemu.pm create_vm before the worker; returns the request's config options."""
        vmid, pool, storage = int(v["vmid"]), v.get("pool"), v.get("storage")
        self.need_quorum()
        self._qm_check_pool(pool)
        if storage:
            self.require(user, f"/storage/{storage}", "Datastore.AllocateSpace")
        if v.get("ha-managed"):
            self.require(user, "/", "Sys.Console")
        if v.get("start"):
            self._qm_perm(user, vmid, pool, "VM.PowerMgmt")
        existing = self.vm(vmid)
        backup_ok = v.get("force") and existing is not None and existing.node == v["node"]
        if not (
            self.allowed(user, f"/vms/{vmid}", "VM.Allocate")
            or (pool and self.allowed(user, f"/pool/{pool}", "VM.Allocate"))
            or (backup_ok and self.allowed(user, f"/vms/{vmid}", "VM.Backup"))
        ):
            raise PveError(403, "Permission check failed")
        for key in sorted(v):
            if DRIVE_KEY.match(key):
                raise param_error(**{key: "option conflicts with option 'archive'"})
        if str(v["archive"]) == "-":
            raise die("pipe requires cli environment")
        self._check_template(user, str(v["archive"]), True)
        params = {k: x for k, x in v.items() if k not in VM_CREATE_ONLY}
        for key in sorted(params):
            priv = self._config_priv(key)
            if priv == "root" and user != "root@pam":
                raise PveError(403, f"only root can set '{key}' config")
            if priv != "root":
                self._qm_perm(user, vmid, pool, priv)
            if re.fullmatch(r"net\d+", key):
                params[key] = with_mac(params[key])
        return params

    def _vm_lock_for_restore(self, v: dict[str, Any], emsg: str) -> Any:
        """QemuConfig create_and_lock_config(vmid, force): the VM to restore into, locked."""
        vmid, node = int(v["vmid"]), v["node"]
        other = self.guest(vmid)
        if other is not None and not (
            v.get("force") and _kind(other) == "qemu" and other.node == node
        ):
            label = "VM" if _kind(other) == "qemu" else "CT"
            raise die(f"{emsg} {label} {vmid} already exists on node '{other.node}'")
        if other is not None:
            if other.lock:
                raise die(f"{emsg} VM is locked ({other.lock})")
            self._qm_lock(other, "create")
            return other
        vm = FakeVm(vmid, f"VM {vmid}", node=node)
        vm.config = {}
        self._qm_lock(vm, "create")
        self.vms.append(vm)
        return vm

    async def _vm_restore(self, v: dict[str, Any], user: str, vol: dict[str, Any] | None) -> Any:
        vmid = int(v["vmid"])
        params = self._vm_restore_checks(v, user)
        if vol is None:
            raise die(f"can't find file '{v['archive']}'")  # classify_restore_archive
        emsg = f"unable to restore VM {vmid} -"
        vm = self._vm_lock_for_restore(v, emsg)

        async def body() -> None:
            try:
                self._vm_restore_into(vm, vol, v, params, emsg)
            except (PveError, TaskError) as exc:
                self._qm_lock(vm, None)  # qemu-server: "VM state is NOT cleaned up"
                raise TaskError(str(getattr(exc, "message", exc))) from None
            if v.get("pool"):
                self._pool_join(v["pool"], vmid)
            if v.get("ha-managed"):
                vm.ha_state = "started" if v.get("start") else "stopped"
            if v.get("start"):
                vm.status = vm.qmpstatus = "running"
                vm.started_at = time.time()

        return await self.task(v["node"], "qmrestore", vmid, user, body, vm=vm)

    def _vm_restore_into(
        self,
        vm: Any,
        vol: dict[str, Any],
        v: dict[str, Any],
        params: dict[str, Any],
        emsg: str,
    ) -> None:
        """restore_vma_archive: the old disks being restored are freed, the backed-up config
        written with new disks (restore_update_config_line), then the request's options."""
        if vm.config.get("protection") in (1, "1", True):
            raise TaskError(f"{emsg} - protection mode enabled")
        if vm.status == "running":
            raise TaskError(f"{emsg} vm is running")
        archive = vol["archive"]
        if archive["type"] != "qemu":
            raise TaskError(
                f"ERROR: file '{v['archive']}' does not look like a QemuServer vzdump backup"
            )
        conf, fresh, notes = self._vm_archive_config(
            archive, v.get("storage"), bool(v.get("unique"))
        )
        kept = []
        for key, volume, _props in drives_of(vm.config, skip_cdrom=True):
            if volume_ref(volume)[0] is None or volume_owner(volume) != vm.vmid:
                continue
            if key in fresh:
                self._qm_free(volume)
            else:
                kept.append(volume)
        # fakepve counts volumes a config names as taken: the freed ones are free again.
        vm.config = {k: x for k, x in vm.config.items() if k not in fresh}
        for key, (sid, props) in fresh.items():
            volid, _fmt = self._qm_alloc(sid, vm.vmid, None, archive["disks"][key])
            conf[key] = join_drive(volid, props)
        for volume in kept:  # rescan: disks no longer in the config are unused
            conf[next(f"unused{n}" for n in range(256) if f"unused{n}" not in conf)] = volume
        if notes:  # a commented-out line of the config is part of the description
            conf["description"] = "\n".join([*filter(None, [conf.get("description")]), *notes])
        conf.update(params)
        # The restored config is written without the `create` lock (qemu-server
        # restore_vma_archive writes the archive's config, which holds none).
        vm.config, vm.pending, vm.snapshots = conf, {}, {}
        self._qm_lock(vm, None)
        vm.name = conf.get("name") or f"VM {vm.vmid}"
        vm.template = bool(conf.get("template"))
        self._bk_restore_firewall(vm.vmid, archive, str(vol.get("format", "")).startswith("pbs"))

    def _vm_archive_config(
        self, archive: dict[str, Any], storage: str | None, unique: bool
    ) -> tuple[dict[str, Any], dict[str, tuple[str, dict[str, str]]], list[str]]:
        """The backed-up config through restore_update_config_line: (config without the disks
        to allocate, key -> (storage, options) of those disks, lines commented out)."""
        conf: dict[str, Any] = {}
        fresh: dict[str, tuple[str, dict[str, str]]] = {}
        notes: list[str] = []
        for key in sorted(archive["config"], key=natural):
            value = archive["config"][key]
            if re.fullmatch(r"unused\d+", key):
                continue
            if DRIVE_KEY.match(key):
                volume, props = split_drive(value)
                if pve_schema.parse_boolean(str(props.get("backup", "1"))) == "0":
                    notes.append(f"{key}: {value}")
                    continue
                if key in archive["disks"]:
                    sid = storage or volume_ref(volume)[0] or "local"
                    store = self.storages.get(sid)
                    if store is None:
                        raise TaskError(f"storage '{sid}' does not exist")
                    if "images" not in split_list(store.get("content")):
                        raise TaskError(
                            f"Content type 'images' is not available on storage '{sid}'"
                        )
                    props.pop("format", None)
                    fresh[key] = (sid, props)
                    continue
            elif key == "vmgenid" and str(value) != "0":
                value = str(uuid.uuid4())
            elif unique and re.fullmatch(r"net\d+", key):
                value = with_mac(value, fresh=True)
            elif unique and key == "smbios1":
                value = re.sub(r"uuid=[^,]*", f"uuid={uuid.uuid4()}", str(value))
            conf[key] = value
        return conf, fresh, notes


# ------------------------------------------------------------------------------------ together


class BackupApi(RestoreApi, VzdumpApi, BackupJobsApi):
    """The mixin `PlatformPve` stacks on fakepve's FakePve: jobs, vzdump, backup volumes,
    restore, and the scheduler while the fake serves (`backup_scheduler`)."""

    backup_scheduler = False  # run due jobs every second while serving (the CLI's option)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._bk_scheduler: asyncio.Future[None] | None = None

    async def start(self, certfile: str, keyfile: str) -> None:
        await super().start(certfile, keyfile)
        self._bk_loop = asyncio.get_running_loop()
        if self.backup_scheduler:
            self._bk_scheduler = asyncio.ensure_future(self._bk_schedule_forever())

    async def stop(self) -> None:
        job, self._bk_scheduler = self._bk_scheduler, None
        if job is not None:
            job.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await job
        await super().stop()

    async def _bk_schedule_forever(self) -> None:
        """pvescheduler, at the start of every second (calendar events go down to seconds)."""
        while True:
            await asyncio.sleep(1.0 - time.time() % 1.0)
            try:
                await self.run_jobs()
            except Exception:
                logging.getLogger(__name__).exception("backup scheduler")
