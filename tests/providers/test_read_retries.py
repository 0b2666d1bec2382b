"""A read changes nothing, so any server error on one is retried (within the retry policy); a
write that got a 500 may have half-happened, so only the messages known to be temporary are
retried. And a 403 names the privilege missing.

`classify` is checked on its own for each status, then through the real client against
fakepve: guests and firewall observed with an unknown 500 injected into one read at a time,
and an update that meets the same 500.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest
from proxmoxer.core import ResourceException

from reconciler.applying.converging import converge
from reconciler.applying.observing import observe_all
from reconciler.model.errors import PermanentError, ProviderError, TemporaryError
from reconciler.model.resources import DesiredGraph
from reconciler.planning.planner import make_plan
from reconciler.providers import Provider
from reconciler.providers.firewall import FirewallProvider
from reconciler.providers.proxmox import ProxmoxProvider, classify
from tests.guest_helpers import load_copy

UNKNOWN = "unexpected answer from pmxcfs"  # in no list of known temporary messages

CLASSIFIED: dict[str, tuple[int, str, bool, type[ProviderError]]] = {
    "unknown-500-read": (500, UNKNOWN, True, TemporaryError),
    "unknown-500-write": (500, UNKNOWN, False, PermanentError),
    "bare-500-write": (500, "", False, TemporaryError),
    "known-500-write": (500, "got no worker upid - start worker failed", False, TemporaryError),
    "596-read": (596, "Errors during TLS negotiation", True, TemporaryError),
    "596-write": (596, "Errors during TLS negotiation", False, TemporaryError),
    "503-read": (503, "Service Unavailable", True, TemporaryError),
    "501-read": (501, "Method 'GET /x' not implemented", True, PermanentError),
    "400-read": (400, "Parameter verification failed.", True, PermanentError),
    "403-read": (403, "Permission check failed (/, Sys.Audit)", True, PermanentError),
}


@pytest.mark.parametrize("case", CLASSIFIED.values(), ids=CLASSIFIED.keys())
def test_classify_retries_any_server_error_on_a_read_only_known_ones_on_a_write(
    case: tuple[int, str, bool, type[ProviderError]],
) -> None:
    status, message, read, expected = case
    error = classify(ResourceException(status, "", message), "read x", read=read)
    assert type(error) is expected
    assert error.status == status and message in str(error)


@pytest.mark.parametrize(
    ("message", "needs"),
    [
        ("Permission check failed (/, Sys.Audit)", "the token needs Sys.Audit on /"),
        (
            "Permission check failed (/storage/local, Datastore.AllocateSpace|Datastore.Audit)",
            "the token needs Datastore.AllocateSpace or Datastore.Audit on /storage/local",
        ),
    ],
)
def test_a_403_names_the_privilege_missing(message: str, needs: str) -> None:
    error = classify(ResourceException(403, "Forbidden", message), "read firewall IP sets")
    assert str(error) == f"read firewall IP sets: 403 {message}: {needs}"


def providers_of(provider: ProxmoxProvider) -> list[Provider]:
    firewall = FirewallProvider(pve=provider, manage_cluster=True)
    return [provider, firewall]


def converge_now(graph: DesiredGraph, provider: ProxmoxProvider) -> Any:
    return anyio.run(lambda: converge(graph, providers_of(provider)))


def plan_now(graph: DesiredGraph, provider: ProxmoxProvider) -> Any:
    observed = anyio.run(lambda: observe_all(providers_of(provider), graph.platform))
    return make_plan(graph, observed)


def requests_to(pve: Any, method: str, path: str) -> int:
    return sum(1 for m, p, _ in pve.requests if m == method and p.endswith(path))


READS = {
    "inventory": "/cluster/resources",
    "guest-config": "/nodes/pve-runtime/lxc/1000/config",
    "cluster-ipsets": "/cluster/firewall/ipset",
    "guest-firewall-rules": "/nodes/pve-runtime/lxc/1000/firewall/rules",
}


@pytest.mark.parametrize("path", READS.values(), ids=READS.keys())
def test_an_unknown_500_on_a_read_is_retried_and_the_plan_succeeds(
    path: str, graph: DesiredGraph, provider: ProxmoxProvider, pve: Any
) -> None:
    assert converge_now(graph, provider).ok
    provider.retries = 0
    pve.requests.clear()
    pve.fail("GET", path, status=500, message=UNKNOWN, times=2)
    plan = plan_now(graph, provider)
    assert not plan.errored and not plan.has_changes
    assert ("GET", path) not in pve.failures  # both injected failures were met
    assert requests_to(pve, "GET", path) == 3
    assert provider.retries == 2


def test_an_unknown_500_on_a_write_is_not_retried(
    tmp_path: Path, graph: DesiredGraph, provider: ProxmoxProvider, pve: Any
) -> None:
    assert converge_now(graph, provider).ok
    lobby = "/nodes/pve-runtime/lxc/1000/config"
    memory = pve.ct(1000).config["memory"]
    bigger = load_copy(
        tmp_path, {"game.yaml": ("cores: 1\n    memory: 2G", "cores: 1\n    memory: 3G")}
    )
    provider.retries = 0
    pve.requests.clear()
    pve.fail("PUT", lobby, status=500, message=UNKNOWN, times=2)
    conv = converge_now(bigger, provider)
    report = conv.rounds[-1].report
    assert report is not None and not report.ok
    failed = {r.change.address: r.error for r in report.results if r.error}
    assert failed == {"guest/mc-lobby": f"update guest/mc-lobby: 500 {UNKNOWN}"}
    assert requests_to(pve, "PUT", lobby) == 1  # tried once: it may have half-happened
    assert provider.retries == 0
    assert pve.ct(1000).config["memory"] == memory
