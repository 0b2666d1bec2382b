"""Metrics: what the loop records reads back from the Prometheus text exposition."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from reconciler.applying.executor import ApplyReport, Outcome, Result
from reconciler.controller.metrics import CONTENT_TYPE_LATEST, Metrics
from reconciler.model.plans import Action, Change
from reconciler.model.resources import Kind


def samples(metrics: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample by (name, labels), `_created` timestamps left out."""
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            if not s.name.endswith("_created"):
                out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return samples(metrics)[(name, frozenset(labels.items()))]


def test_cycles_and_duration() -> None:
    m = Metrics(clock=lambda: 1000.0)
    m.cycle("full", "changed", 1.5)
    m.cycle("full", "changed", 0.5)
    m.cycle("edge", "failed", 0.05)
    assert value(m, "reconciler_cycles_total", kind="full", outcome="changed") == 2
    assert value(m, "reconciler_cycles_total", kind="edge", outcome="failed") == 1
    assert value(m, "reconciler_cycle_duration_seconds_count", kind="full") == 2
    assert value(m, "reconciler_cycle_duration_seconds_sum", kind="full") == 2.0
    assert value(m, "reconciler_cycle_duration_seconds_bucket", kind="full", le="1.0") == 1
    assert value(m, "reconciler_last_success_timestamp_seconds") == 1000.0


def test_last_success_only_after_a_successful_cycle() -> None:
    now = [50.0]
    m = Metrics(clock=lambda: now[0])
    m.cycle("full", "converged", 0.1)
    now[0] = 80.0
    m.cycle("full", "errored", 0.1)
    assert value(m, "reconciler_last_success_timestamp_seconds") == 50.0


def test_actions_from_a_report() -> None:
    m = Metrics()

    def result(address: str, kind: Kind, action: Action, outcome: Outcome) -> Result:
        return Result(Change(address=address, kind=kind, action=action, wave=0), outcome)

    m.record_report(
        ApplyReport(
            [
                result("guest/a", Kind.GUEST, Action.CREATE, Outcome.DONE),
                result("guest/b", Kind.GUEST, Action.CREATE, Outcome.FAILED),
                result("firewall/guest/b", Kind.FIREWALL_GUEST, Action.UPDATE, Outcome.SKIPPED),
                result("route/x/y", Kind.ROUTE, Action.DELETE, Outcome.DRY_RUN),
            ]
        )
    )
    got = {k: v for k, v in samples(m).items() if k[0] == "reconciler_actions_total"}
    assert got == {
        (
            "reconciler_actions_total",
            frozenset({("kind", "guest"), ("action", "create"), ("result", "done")}),
        ): 1.0,
        (
            "reconciler_actions_total",
            frozenset({("kind", "guest"), ("action", "create"), ("result", "failed")}),
        ): 1.0,
        (
            "reconciler_actions_total",
            frozenset({("kind", "firewall/guest"), ("action", "update"), ("result", "skipped")}),
        ): 1.0,
    }


def test_gauges_counters_and_lease() -> None:
    m = Metrics()
    m.set_drift(4)
    m.set_drift(1)
    m.add_api_calls()
    m.add_api_calls(9)
    m.add_retries("proxmox", 2)
    m.add_retries("traefik")
    m.set_backoff(3)
    m.set_leader(False)  # no change from the start: not counted
    m.set_leader(True)
    m.set_leader(True)
    m.set_leader(False)
    assert value(m, "reconciler_drift") == 1
    assert value(m, "reconciler_proxmox_api_calls_total") == 10
    assert value(m, "reconciler_provider_retries_total", provider="proxmox") == 2
    assert value(m, "reconciler_provider_retries_total", provider="traefik") == 1
    assert value(m, "reconciler_resources_in_backoff") == 3
    assert value(m, "reconciler_lease_changes_total") == 2
    assert value(m, "reconciler_leader") == 0


def test_only_the_loaded_revision_has_a_series() -> None:
    m = Metrics()
    m.set_revision("rev-1")
    m.set_revision("rev-2")
    m.set_revision("rev-2")
    revisions = [k for k in samples(m) if k[0] == "reconciler_revision_info"]
    assert revisions == [("reconciler_revision_info", frozenset({("revision", "rev-2")}))]


def test_registries_are_per_service() -> None:
    a, b = Metrics(), Metrics()
    a.add_api_calls(5)
    assert value(b, "reconciler_proxmox_api_calls_total") == 0
    assert a.content_type == CONTENT_TYPE_LATEST
