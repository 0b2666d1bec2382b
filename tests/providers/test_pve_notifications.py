"""PVE's own notification endpoints and matchers on fakepve (extended with them:
reconciler/simulators/pve_notifications.py), through the real client: created with the
controller's mark and their secrets, silent once converged, an endpoint and a matcher changed
by hand healed, foreign and forged ones and PVE's built-ins left alone, one that left the spec
deleted, a name a foreign one holds refused, and secrets never read back nor shown.
Assertions read what the fake PVE holds and its request log.
"""

from __future__ import annotations

import base64
from typing import Any

import anyio
import pytest

from reconciler.applying.observing import observe_all
from reconciler.loading.graph import build_graph
from reconciler.loading.loader import load_texts
from reconciler.model.plans import Action
from reconciler.model.resources import DesiredGraph
from reconciler.planning.planner import NEEDS_PRUNE, make_plan
from reconciler.providers.proxmox import ProxmoxProvider
from reconciler.providers.proxmox_notifications import NotificationProvider, endpoint_secrets
from tests.fakepve_fixtures import mutating_calls, request_bodies
from tests.guest_helpers import ok, plan_now, run

PLATFORM = "platform: {name: zpack}\n"
NOTIFICATIONS = """
notifications:
  proxmox:
    endpoints:
      ops-mail:
        type: sendmail
        mailto: [ops@zpack.dev]
        description: the ops list
      ops-hook:
        type: webhook
        url: "https://ntfy.zpack.dev/pve"
        headers: {Content-Type: application/json}
        body: '{"title": "{{ title }}", "token": "{{ secrets.token }}"}'
        secrets: {token: {env: HOOK_TOKEN}}
      ops-gotify:
        type: gotify
        server: https://gotify.zpack.dev
        token: {env: GOTIFY_TOKEN}
    matchers:
      ops-errors:
        severities: [error, warning]
        types: [vzdump, fencing]
        targets: [ops-mail, ops-hook, mail-to-root]
"""
HOOK_TOKEN = "hook-SECRET-0042"
GOTIFY_TOKEN = "gotify-SECRET-0042"


@pytest.fixture(autouse=True)
def _secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOK_TOKEN", HOOK_TOKEN)
    monkeypatch.setenv("GOTIFY_TOKEN", GOTIFY_TOKEN)


def load(text: str = NOTIFICATIONS) -> tuple[DesiredGraph, NotificationProvider, Any]:
    loaded = load_texts({"platform.yaml": PLATFORM, "notifications.yaml": text})
    assert loaded.ok and loaded.spec is not None, [str(d) for d in loaded.diagnostics]
    return build_graph(loaded.spec, loaded.source), loaded.spec, endpoint_secrets(loaded.spec)


@pytest.fixture
def providers(provider: ProxmoxProvider) -> list[Any]:
    _graph, _spec, secrets = load()
    return [provider, NotificationProvider(pve=provider, secrets=secrets)]


def notifications(client: Any) -> Any:
    return client.cluster.notifications


def endpoint(client: Any, kind: str, name: str) -> dict[str, Any]:
    item: dict[str, Any] = notifications(client).endpoints(kind)(name).get()
    return item


def matcher(client: Any, name: str) -> dict[str, Any]:
    item: dict[str, Any] = notifications(client).matchers(name).get()
    return item


def test_endpoints_and_matchers_are_created_marked_with_their_secrets_then_silent(
    providers: list[Any], provider: ProxmoxProvider, pve: Any
) -> None:
    graph, _spec, _secrets = load()
    ok(run(graph, providers))
    client = provider.client
    mail = endpoint(client, "sendmail", "ops-mail")
    assert mail["mailto"] == ["ops@zpack.dev"]
    assert mail["comment"] == (
        "the ops list reconciler:v1 platform=zpack address=notification/endpoint/ops-mail"
    )
    hook = endpoint(client, "webhook", "ops-hook")
    assert hook["url"] == "https://ntfy.zpack.dev/pve" and hook["method"] == "post"
    assert hook["secret"] == ["name=token"]  # the name only: PVE never answers a secret
    assert base64.b64decode(hook["body"]).decode().startswith('{"title": "{{ title }}"')
    # The secrets reached PVE's private config, read from their references.
    assert pve.notification_private["ops-hook"]["secret"] == {
        "token": base64.b64encode(HOOK_TOKEN.encode()).decode()
    }
    assert pve.notification_private["ops-gotify"]["token"] == GOTIFY_TOKEN
    assert "token" not in endpoint(client, "gotify", "ops-gotify")
    errors = matcher(client, "ops-errors")
    # One statement each: two severities as two statements would both have to match.
    assert errors["match-severity"] == ["warning,error"]
    assert errors["match-field"] == ["exact:type=fencing,vzdump"]
    assert errors["target"] == ["mail-to-root", "ops-hook", "ops-mail"]
    pve.requests.clear()
    assert not plan_now(graph, providers).has_changes
    assert mutating_calls(pve) == []


def test_changes_by_hand_are_healed_foreign_and_builtin_ones_left_alone(
    providers: list[Any], provider: ProxmoxProvider, pve: Any
) -> None:
    graph, _spec, _secrets = load()
    ok(run(graph, providers))
    client = provider.client
    nt = notifications(client)
    # By hand: the list's address, the matcher's severities; a foreign endpoint and matcher;
    # a copy of ours under another name (its mark claims ops-mail's address); the built-in
    # matcher switched off.
    nt.endpoints.sendmail("ops-mail").put(mailto=["someone@else.dev"])
    nt.matchers("ops-errors").put(**{"match-severity": ["error"]})
    nt.endpoints.sendmail.post(name="team-mail", mailto=["team@zpack.dev"], comment="by hand")
    nt.matchers.post(name="team-all", target=["team-mail"], comment="by hand")
    copied = endpoint(client, "sendmail", "ops-mail")["comment"]
    nt.endpoints.sendmail.post(name="ops-copy", mailto=["x@zpack.dev"], comment=copied)
    nt.matchers("default-matcher").put(disable=1)

    plan = plan_now(graph, providers)
    changed = {c.address: c for c in plan.actions}
    assert set(changed) == {"notification/endpoint/ops-mail", "notification/matcher/ops-errors"}
    assert changed["notification/endpoint/ops-mail"].action is Action.UPDATE
    assert [f.path for f in changed["notification/matcher/ops-errors"].fields] == ["match-severity"]
    pve.requests.clear()
    ok(run(graph, providers))
    assert endpoint(client, "sendmail", "ops-mail")["mailto"] == ["ops@zpack.dev"]
    assert matcher(client, "ops-errors")["match-severity"] == ["warning,error"]
    # Each update read the entity first (our mark) and sent its digest.
    puts = request_bodies(pve, "PUT", "/sendmail/ops-mail")
    assert puts and all(b.get("digest") for b in puts)
    # The foreign ones, the copy and the built-in are as they were.
    assert endpoint(client, "sendmail", "team-mail")["comment"] == "by hand"
    assert matcher(client, "team-all")["target"] == ["team-mail"]
    assert endpoint(client, "sendmail", "ops-copy")["mailto"] == ["x@zpack.dev"]
    assert matcher(client, "default-matcher")["disable"] is True
    touched = {p for _m, p in mutating_calls(pve)}
    assert not any(n in p for p in touched for n in ("team-", "ops-copy", "default-matcher"))
    assert not plan_now(graph, providers).has_changes


def test_what_left_the_spec_is_deleted_and_a_foreign_name_is_never_taken(
    providers: list[Any], provider: ProxmoxProvider, pve: Any
) -> None:
    graph, _spec, _secrets = load()
    ok(run(graph, providers))
    client = provider.client
    # The webhook leaves the spec (and the matcher's targets): the matcher is updated first,
    # then the endpoint deleted (PVE refuses to delete an endpoint a matcher routes to).
    smaller = NOTIFICATIONS.replace("[ops-mail, ops-hook, mail-to-root]", "[ops-mail]")
    start = smaller.index("      ops-hook:")
    smaller = smaller[:start] + smaller[smaller.index("      ops-gotify:") :]
    graph2, _spec2, _ = load(smaller)
    # Without pruning the endpoint stays (the matcher still changes): a delete by mistake would
    # leave PVE's own failures unheard.
    plan = plan_now(graph2, providers)
    held = {c.address: c.blocked for c in plan.changes if c.action is Action.DELETE}
    assert held == {"notification/endpoint/ops-hook": NEEDS_PRUNE}
    assert any(d.code == "orphan" and "ops-hook" in d.message for d in plan.diagnostics)
    ok(run(graph2, providers))
    assert "ops-hook" in {t["name"] for t in notifications(client).targets.get()}
    conv = run(graph2, providers, allow_destroy=True)
    ok(conv)
    names = {t["name"] for t in notifications(client).targets.get()}
    assert "ops-hook" not in names and {"ops-mail", "ops-gotify", "mail-to-root"} <= names
    assert "ops-hook" not in pve.notification_private
    # A spec endpoint whose name a foreign one holds: refused, naming it; the foreign one stays.
    notifications(client).endpoints.sendmail.post(name="ops-hook", mailto=["a@zpack.dev"])
    pve.requests.clear()
    conv = run(graph, providers)
    report = conv.rounds[-1].report
    assert report is not None
    failed = {r.change.address: r.error for r in report.results if r.error}
    assert "without this platform's mark" in failed["notification/endpoint/ops-hook"]
    assert endpoint(client, "sendmail", "ops-hook")["mailto"] == ["a@zpack.dev"]
    assert ("DELETE", "/api2/json/cluster/notifications/endpoints/sendmail/ops-hook") not in (
        mutating_calls(pve)
    )


def test_secrets_never_reach_a_plan_or_an_observation(
    providers: list[Any], provider: ProxmoxProvider, pve: Any
) -> None:
    graph, _spec, _secrets = load()
    ok(run(graph, providers))
    observed = anyio.run(lambda: observe_all(providers, graph.platform))
    plan = make_plan(graph, observed)
    text = observed.model_dump_json() + str(plan.to_json())
    assert HOOK_TOKEN not in text and GOTIFY_TOKEN not in text
    assert base64.b64encode(HOOK_TOKEN.encode()).decode() not in text
