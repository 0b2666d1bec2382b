"""Prometheus metrics of the controller service, served as `/metrics` by the status listener
(`reconciler.controller.http`).

The loop (`reconciler.controller.service`) owns one `Metrics` per service and calls its
methods as things happen. Each `Metrics` has its own `CollectorRegistry`, never the process-wide
default one, so several services (and tests) live side by side without clashing names.

    reconciler_cycles_total{kind,outcome}               counter  kind: full|inventory|edge
    reconciler_cycle_duration_seconds{kind}             histogram
    reconciler_actions_total{kind,action,result}        counter  kind: guest, firewall/guest,
                                                                 route, velocity, ...;
                                                                 action: create|update|
                                                                 replace|delete;
                                                                 result: done|failed|skipped
    reconciler_drift                                    gauge    changes the last plan wanted
    reconciler_destroys_held_back                       gauge    changes the last plan held
                                                                 back: they destroy data and
                                                                 platform.prune is off
    reconciler_proxmox_api_calls_total                  counter
    reconciler_provider_retries_total{provider}         counter
    reconciler_lease_changes_total                      counter  leadership gained or lost
    reconciler_leader                                   gauge    1 while this replica leads
    reconciler_revision_info{revision}                  gauge    1, for the loaded revision only
    reconciler_last_success_timestamp_seconds           gauge    end of the last converged or
                                                                 changed cycle (epoch seconds)
    reconciler_resources_in_backoff                     gauge
    reconciler_backup_age_seconds{guest,job}            gauge    age of the guest's newest
                                                                 backup on the job's storage,
                                                                 as of the last full cycle;
                                                                 no series when it has none
                                                                 (missing) or its storage
                                                                 could not be listed (unknown)
    reconciler_backup_max_age_seconds{guest,job}        gauge    the job's max_age, for every
                                                                 guest it selects (missing ones
                                                                 too)
    reconciler_backups_stale                            gauge    guests stale or missing, one
                                                                 per guest and job that
                                                                 selects it (as /status lists)
    reconciler_backups_unknown                          gauge    the same, whose storage could
                                                                 not be listed
    reconciler_notifications_total{target,result}       counter  messages per notification
                                                                 target: sent|failed|
                                                                 suppressed|dropped
    reconciler_notification_incidents{event}            gauge    incidents open, by event

A missing backup has no age, and NaN would hide it from `>` comparisons anyway, so it has no
age series; alert on `reconciler_backups_stale > 0`, or per guest on
`reconciler_backup_age_seconds > reconciler_backup_max_age_seconds` together with
`reconciler_backup_max_age_seconds unless reconciler_backup_age_seconds` (none at all).

Label values are closed sets (the enums of `reconciler.controller.status` and
`reconciler.model`), never addresses or error texts, so the number of series stays bounded;
except the backup gauges' `guest` and `job`: names from the spec (without `guest/` and
`backup/`), one series per guest a job selects, removed when the guest leaves the spec or the
job (or, for the age, has no backup any more); and the notifications' `target`, a name from
the spec's `notifications.targets`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from reconciler.applying.executor import ApplyReport, Outcome
from reconciler.controller.status import SUCCESSFUL, CycleOutcome
from reconciler.model.plans import BackupFreshness, Freshness

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

# Cycles run from under a second (nothing to do) to minutes (clones, migrations).
CYCLE_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)

# An executor outcome as the `result` label; a dry run is not an action and is not counted.
RESULTS = {Outcome.DONE: "done", Outcome.FAILED: "failed", Outcome.SKIPPED: "skipped"}


class Metrics:
    """The service's metrics, in their own registry. See the module docstring."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.cycles = Counter(
            "reconciler_cycles", "Reconcile cycles run.", ["kind", "outcome"], registry=r
        )
        self.cycle_duration = Histogram(
            "reconciler_cycle_duration_seconds",
            "Duration of a reconcile cycle.",
            ["kind"],
            buckets=CYCLE_BUCKETS,
            registry=r,
        )
        self.actions = Counter(
            "reconciler_actions",
            "Changes applied, by resource kind, action and result.",
            ["kind", "action", "result"],
            registry=r,
        )
        self.drift = Gauge("reconciler_drift", "Changes the last plan wanted.", registry=r)
        self.held_back = Gauge(
            "reconciler_destroys_held_back",
            "Changes the last plan held back: they destroy data and pruning is off.",
            registry=r,
        )
        self.api_calls = Counter(
            "reconciler_proxmox_api_calls", "Calls made to the Proxmox API.", registry=r
        )
        self.retries = Counter(
            "reconciler_provider_retries",
            "Retries of temporary provider errors.",
            ["provider"],
            registry=r,
        )
        self.lease_changes = Counter(
            "reconciler_lease_changes", "Leadership gained or lost by this replica.", registry=r
        )
        self.leader = Gauge(
            "reconciler_leader", "1 while this replica holds the lease.", registry=r
        )
        self.revision = Gauge(
            "reconciler_revision_info",
            "The spec revision loaded (value 1).",
            ["revision"],
            registry=r,
        )
        self.last_success = Gauge(
            "reconciler_last_success_timestamp_seconds",
            "When the last converged or changed cycle ended.",
            registry=r,
        )
        self.backoff = Gauge(
            "reconciler_resources_in_backoff", "Resources waiting to retry a change.", registry=r
        )
        self._declare_backups_and_notifications(r)
        self._is_leader = False
        self._revision: str | None = None
        self._backup_series: dict[Gauge, set[tuple[str, str]]] = {}

    def _declare_backups_and_notifications(self, r: CollectorRegistry) -> None:
        """The backup freshness and notification series (`__init__`'s second half)."""
        self.backup_age = Gauge(
            "reconciler_backup_age_seconds",
            "Age of the guest's newest backup on the job's storage, at the last full cycle.",
            ["guest", "job"],
            registry=r,
        )
        self.backup_max_age = Gauge(
            "reconciler_backup_max_age_seconds",
            "The job's max_age: an older newest backup is stale.",
            ["guest", "job"],
            registry=r,
        )
        self.backups_stale = Gauge(
            "reconciler_backups_stale",
            "Guests (per job that selects them) whose newest backup is stale or missing.",
            registry=r,
        )
        self.backups_unknown = Gauge(
            "reconciler_backups_unknown",
            "Guests (per job that selects them) whose job's storage could not be listed.",
            registry=r,
        )
        self.notifications = Counter(
            "reconciler_notifications",
            "Notifications per target: sent, failed, suppressed (rate limit) or dropped.",
            ["target", "result"],
            registry=r,
        )
        self.notification_incidents = Gauge(
            "reconciler_notification_incidents",
            "Incidents the notifier holds open, by event.",
            ["event"],
            registry=r,
        )

    def cycle(self, kind: str, outcome: str, seconds: float) -> None:
        """A cycle ended after `seconds`; a successful one also stamps last_success."""
        self.cycles.labels(kind=kind, outcome=outcome).inc()
        self.cycle_duration.labels(kind=kind).observe(seconds)
        if CycleOutcome(outcome) in SUCCESSFUL:
            self.last_success.set(self.clock())

    def action(self, kind: str, action: str, result: str) -> None:
        self.actions.labels(kind=kind, action=action, result=result).inc()

    def record_report(self, report: ApplyReport) -> None:
        """Count every result of one apply (dry-run results are not actions)."""
        for r in report.results:
            result = RESULTS.get(r.outcome)
            if result is not None:
                self.action(r.change.kind.value, r.change.action.value, result)

    def set_drift(self, n: int) -> None:
        self.drift.set(n)

    def set_held_back(self, n: int) -> None:
        self.held_back.set(n)

    def add_api_calls(self, n: int = 1) -> None:
        self.api_calls.inc(n)

    def add_retries(self, provider: str, n: int = 1) -> None:
        self.retries.labels(provider=provider).inc(n)

    def set_leader(self, is_leader: bool) -> None:
        """This replica's leadership; counts a change only when it flips."""
        if is_leader != self._is_leader:
            self.lease_changes.inc()
            self._is_leader = is_leader
        self.leader.set(1 if is_leader else 0)

    def set_revision(self, revision: str) -> None:
        """Only the loaded revision keeps a series: the previous one is removed."""
        if self._revision is not None and self._revision != revision:
            self.revision.remove(self._revision)
        self._revision = revision
        self.revision.labels(revision=revision).set(1)

    def set_backoff(self, n: int) -> None:
        self.backoff.set(n)

    def set_backups(self, items: Iterable[BackupFreshness]) -> None:
        """The last full plan's backup freshness; the series of guests no longer listed (or,
        for the age, without a backup now) are removed."""
        listed = list(items)
        ages: dict[tuple[str, str], float] = {}
        limits: dict[tuple[str, str], float] = {}
        for b in listed:
            labels = (b.guest.removeprefix("guest/"), b.job.removeprefix("backup/"))
            limits[labels] = b.max_age
            if b.age is not None:  # fresh or stale: a missing or unknown one has no age
                ages[labels] = b.age
        self._set_series(self.backup_age, ages)
        self._set_series(self.backup_max_age, limits)
        bad = (Freshness.STALE, Freshness.MISSING)
        self.backups_stale.set(sum(1 for b in listed if b.freshness in bad))
        self.backups_unknown.set(sum(1 for b in listed if b.freshness is Freshness.UNKNOWN))

    def _set_series(self, gauge: Gauge, values: dict[tuple[str, str], float]) -> None:
        for labels in self._backup_series.get(gauge, set()) - set(values):
            gauge.remove(*labels)
        for labels, v in values.items():
            gauge.labels(*labels).set(v)
        self._backup_series[gauge] = set(values)

    def notification(self, target: str, result: str) -> None:
        self.notifications.labels(target=target, result=result).inc()

    def set_notifications_open(self, counts: Mapping[str, int]) -> None:
        for event, n in counts.items():
            self.notification_incidents.labels(event=event).set(n)

    def render(self) -> bytes:
        """The registry in the Prometheus text format (`content_type`)."""
        return generate_latest(self.registry)
