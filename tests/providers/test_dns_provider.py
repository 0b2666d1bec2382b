"""The DNS provider against a real BIND `named` (tests/dns_fixtures.py), through the same path
every kind takes: load the spec, observe (AXFR with the TSIG key), plan, apply (RFC 2136
updates), observe and plan again. Records are created with their ownership companions; a record
of ours changed or deleted by hand is healed; records made by hand are left alone, also where
the spec wants their name; a delete waits for pruning; an update planned against what a hand
change has replaced since is refused, not applied; a refused transfer, an unknown key and a
wrong secret are errors that say which."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import replace

import anyio
import pytest

from reconciler.applying.connecting import Endpoints, connect_platform
from reconciler.applying.converging import Convergence, converge
from reconciler.applying.observing import observe_all
from reconciler.cli.render import render_text
from reconciler.loading.graph import build_graph
from reconciler.loading.loader import load_texts
from reconciler.model.errors import ConflictError, PermanentError, TemporaryError
from reconciler.model.observed import ObservedState
from reconciler.model.plans import Action, Plan
from reconciler.model.resources import DesiredGraph, Kind
from reconciler.model.spec import DnsSpec, PlatformSpec, ProxmoxApi, SecretRef
from reconciler.planning.planner import NEEDS_PRUNE, make_plan
from reconciler.providers.dns import DnsProvider, RetryPolicy, ZoneAccess, dns_provider
from tests.dns_fixtures import BASE, CONTROLLER_KEY, HAND_KEY, NamedServer, dns_section
from tests.waiting import wait_for

SRV = "        - {name: _minecraft._tcp.play.test, type: SRV, value: '0 5 25565 mc.play.test'}\n"
MORE = (
    SRV
    + "        - {name: play.test, type: TXT, value: 'v=spf1 -all'}\n"
    + "        - {name: files.play.test, type: CNAME, value: cdn.example.net}\n"
    + "        - {name: '*.dev.play.test', type: A, value: [203.0.113.11, 203.0.113.12], ttl: 60}\n"
    + "        - {name: long.play.test, type: TXT, value: '"
    + "x" * 600
    + "'}\n"
)
MARK = '"heritage=reconciler,platform=zpack,address=dns/mc-lobby.internal.test/A"'


@pytest.fixture(autouse=True)
def _secret(named: NamedServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("RC_TSIG_SECRET", named.secrets[CONTROLLER_KEY])
    yield


def spec_of(named: NamedServer, records: str = MORE) -> PlatformSpec:
    texts = {"platform.yaml": BASE, "dns.yaml": dns_section(named.server, records)}
    result = load_texts(texts)
    assert result.ok and result.spec is not None, [str(d) for d in result.diagnostics]
    return result.spec


def graph_of(spec: PlatformSpec) -> DesiredGraph:
    return build_graph(spec)


def provider_of(spec: PlatformSpec) -> DnsProvider:
    return dns_provider(spec, retry=RetryPolicy(attempts=2, initial=0.01, maximum=0.01))


def observe(provider: DnsProvider) -> ObservedState:
    return anyio.run(lambda: observe_all([provider], "zpack"))


def plan_now(spec: PlatformSpec, **options: bool) -> Plan:
    return make_plan(graph_of(spec), observe(provider_of(spec)), **options)


def run(spec: PlatformSpec, *, allow_destroy: bool = False) -> Convergence:
    async def go() -> Convergence:
        return await converge(graph_of(spec), [provider_of(spec)], allow_destroy=allow_destroy)

    return anyio.run(go)


def hand_made(named: NamedServer) -> dict[str, list[str]]:
    """What the zones held before the controller: never to be changed."""
    return {
        "www": named.lookup("www.play.test", "A"),
        "mail": named.lookup("mail.play.test", "A"),
        "mx": named.lookup("play.test", "MX"),
    }


def test_converge_creates_every_record_with_its_companion(named: NamedServer) -> None:
    spec = spec_of(named)
    before = hand_made(named)
    first = plan_now(spec)
    text = render_text(first)
    assert "+ dns/survival.play.test A 203.0.113.10" in text
    assert "+ dns/mc-lobby.internal.test A 10.20.0.10" in text
    done = run(spec)
    assert done.ok, done
    assert named.lookup("mc-lobby.internal.test", "A") == ["10.20.0.10"]
    assert named.lookup("mc-six.internal.test", "AAAA") == ["2001:db8::16"]
    assert named.lookup("survival.play.test", "A") == ["203.0.113.10"]
    assert named.lookup("console.play.test", "A") == ["203.0.113.10"]
    assert named.lookup("_minecraft._tcp.play.test", "SRV") == ["0 5 25565 mc.play.test."]
    assert named.lookup("files.play.test", "CNAME") == ["cdn.example.net."]
    assert named.lookup("x.dev.play.test", "A") == ["203.0.113.11", "203.0.113.12"]
    assert named.ttl("x.dev.play.test", "A") == 60
    (long,) = named.lookup("long.play.test", "TXT")
    assert long.replace('" "', "").strip('"') == "x" * 600  # 255-byte strings, joined back
    assert named.lookup("_rc-a.mc-lobby.internal.test", "TXT") == [MARK]
    assert named.lookup("portal.example.org", "A") == []  # outside every zone
    assert hand_made(named) == before
    again = plan_now(spec)
    assert not again.actions, render_text(again)  # the spelling read back is the spec's
    owned = observe(provider_of(spec)).owned()
    assert owned["dns/mc-lobby.internal.test/A"].attributes["values"] == ["10.20.0.10"]


def test_a_record_of_ours_changed_by_hand_is_healed(named: NamedServer) -> None:
    spec = spec_of(named)
    assert run(spec).ok
    named.hand_update(
        "internal.test",
        ("replace", "mc-lobby.internal.test.", 60, "A", "10.99.0.1"),
        ("add", "mc-lobby.internal.test.", 60, "A", "10.99.0.2"),
    )
    plan = plan_now(spec)
    (change,) = plan.actions
    assert change.address == "dns/mc-lobby.internal.test/A"
    assert change.action is Action.UPDATE
    assert {f.path: (f.before, f.after) for f in change.fields} == {
        "values": (["10.99.0.1", "10.99.0.2"], ["10.20.0.10"]),
        "ttl": (60, 300),
    }
    assert run(spec).ok
    assert named.lookup("mc-lobby.internal.test", "A") == ["10.20.0.10"]
    assert named.ttl("mc-lobby.internal.test", "A") == 300
    assert named.lookup("_rc-a.mc-lobby.internal.test", "TXT") == [MARK]


def test_a_record_of_ours_deleted_by_hand_comes_back(named: NamedServer) -> None:
    spec = spec_of(named)
    assert run(spec).ok
    named.hand_update("internal.test", ("delete", "mc-lobby.internal.test.", "A"))
    seen = observe(provider_of(spec)).owned()["dns/mc-lobby.internal.test/A"]
    assert seen.attributes["values"] == []  # its companion is left: still ours, and empty
    assert [c.address for c in plan_now(spec).actions] == ["dns/mc-lobby.internal.test/A"]
    assert run(spec).ok
    assert named.lookup("mc-lobby.internal.test", "A") == ["10.20.0.10"]


def test_records_made_by_hand_are_left_alone_even_where_the_spec_wants_the_name(
    named: NamedServer,
) -> None:
    spec = spec_of(named)
    named.hand_update(
        "internal.test",
        ("add", "mc-lobby.internal.test.", 300, "A", "10.66.0.1"),
        # A copied companion names another record: no claim on this one.
        ("add", "mc-survival.internal.test.", 300, "A", "10.66.0.2"),
        ("add", "_rc-a.mc-survival.internal.test.", 300, "TXT", MARK),
    )
    named.hand_update("play.test", ("add", "survival.play.test.", 300, "CNAME", "elsewhere.net."))
    plan = plan_now(spec)
    held = {d.address for d in plan.diagnostics if d.code == "dns-name-held-by-foreign"}
    assert held == {
        "dns/mc-lobby.internal.test/A",
        "dns/mc-survival.internal.test/A",
        "dns/survival.play.test/A",
    }
    assert not held & {c.address for c in plan.changes}
    foreign = {r.attributes["name"] for r in observe(provider_of(spec)).foreign()}
    assert {"www.play.test", "mc-lobby.internal.test", "survival.play.test"} <= foreign
    assert run(spec, allow_destroy=True).ok
    assert named.lookup("mc-lobby.internal.test", "A") == ["10.66.0.1"]
    assert named.lookup("mc-survival.internal.test", "A") == ["10.66.0.2"]
    assert named.lookup("survival.play.test", "CNAME") == ["elsewhere.net."]
    assert named.lookup("velocity.internal.test", "A") == ["10.30.0.21"]  # the rest converged
    assert named.lookup("www.play.test", "A") == ["192.0.2.80"]


def test_a_delete_waits_for_pruning(named: NamedServer) -> None:
    assert run(spec_of(named)).ok
    before = hand_made(named)
    smaller = spec_of(named, MORE.replace(SRV, ""))
    plan = plan_now(smaller)
    (delete,) = [c for c in plan.changes if c.action is Action.DELETE]
    assert delete.address == "dns/_minecraft._tcp.play.test/SRV"
    assert delete.blocked == NEEDS_PRUNE and not delete.destroys
    assert any(d.code == "orphan" and d.address == delete.address for d in plan.diagnostics)
    assert run(smaller).ok
    assert named.lookup("_minecraft._tcp.play.test", "SRV") != []  # kept: pruning is off
    assert run(smaller, allow_destroy=True).ok
    assert named.lookup("_minecraft._tcp.play.test", "SRV") == []
    assert named.lookup("_rc-srv._minecraft._tcp.play.test", "TXT") == []
    assert hand_made(named) == before
    assert not plan_now(smaller, allow_destroy=True).actions


def test_an_update_against_a_newer_hand_change_is_refused(named: NamedServer) -> None:
    spec = spec_of(named)
    assert run(spec).ok
    named.hand_update(
        "internal.test", ("replace", "mc-lobby.internal.test.", 300, "A", "10.99.0.1")
    )
    (change,) = plan_now(spec).actions
    named.hand_update(
        "internal.test", ("replace", "mc-lobby.internal.test.", 300, "A", "10.77.0.1")
    )
    with pytest.raises(ConflictError, match="changed since it was observed"):
        anyio.run(provider_of(spec).apply, change)
    assert named.lookup("mc-lobby.internal.test", "A") == ["10.77.0.1"]  # not overwritten


def zone_access(named: NamedServer, key: str = CONTROLLER_KEY, port: int = 0) -> DnsProvider:
    access = ZoneAccess(
        "play.test", "127.0.0.1", port or named.port, key, "hmac-sha256", SecretRef(env="K")
    )
    return DnsProvider(
        "zpack",
        {"play.test": access},
        secrets=lambda ref: named.secrets.get(key, named.secrets[CONTROLLER_KEY]),
        timeout=2.0,
        retry=RetryPolicy(attempts=2, initial=0.01, maximum=0.01),
    )


def test_a_transfer_the_key_may_not_make_is_refused_clearly(named: NamedServer) -> None:
    with pytest.raises(PermanentError) as refused:
        anyio.run(zone_access(named, HAND_KEY).observe)
    message = str(refused.value)
    assert "transfer (AXFR) of zone play.test" in message and named.server in message
    assert "REFUSED" in message and f"allow-transfer {{ key {HAND_KEY}; }}" in message
    assert named.secrets[HAND_KEY] not in message


def test_an_unknown_key_and_a_wrong_secret_say_which(named: NamedServer) -> None:
    with pytest.raises(PermanentError, match=r"does not know the TSIG key 'nobody' \(BADKEY\)"):
        anyio.run(zone_access(named, "nobody").observe)
    wrong = zone_access(named)
    wrong._secrets = lambda ref: "AAAA" + named.secrets[CONTROLLER_KEY][4:]
    with pytest.raises(PermanentError, match=r"BADSIG.*tsig.secret is not the server's") as bad:
        anyio.run(wrong.observe)
    assert named.secrets[CONTROLLER_KEY][4:] not in str(bad.value)


def test_an_unset_secret_or_a_server_down_costs_the_records_only(
    named: NamedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = spec_of(named)
    monkeypatch.delenv("RC_TSIG_SECRET")
    state = observe(provider_of(spec))
    assert "RC_TSIG_SECRET" in state.errors["dns"] and "tsig.secret" in state.errors["dns"]
    assert Kind.DNS not in (state.kinds or ())
    plan = make_plan(graph_of(spec), state)
    assert not plan.changes and any(d.code == "observe-failed" for d in plan.diagnostics)
    named.stop()
    with pytest.raises(TemporaryError, match="cannot reach the server"):
        anyio.run(zone_access(named).observe)


def test_a_server_that_accepts_and_never_answers_costs_the_deadline_not_minutes(
    named: NamedServer,
) -> None:
    """A black hole (a socket that takes the connection and says nothing): each try would wait
    its timeout, and a transfer up to six of them; the zone's observation stops at `deadline`,
    its tries included, and says so."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(8)  # the kernel completes the handshakes; nobody reads the query
    try:
        slow = zone_access(named, port=hole.getsockname()[1])
        slow.timeout, slow.deadline = 30.0, 0.5
        slow.retry = RetryPolicy(attempts=4, initial=0.01, maximum=0.01)
        started = time.monotonic()
        with pytest.raises(TemporaryError) as late:
            anyio.run(slow.observe)
        # Without the deadline: 4 tries of 30 s at least.
        assert time.monotonic() - started < slow.timeout
        assert "no answer within 0.5 s" in str(late.value) and "play.test" in str(late.value)
        # Nor does the try's thread wait its 30 s on (the process would wait for it at exit).
        wait_for(
            lambda: not [t for t in threading.enumerate() if t.name == "AnyIO worker thread"],
            "the transfer's worker thread ends by the deadline",
            timeout=slow.timeout / 2,
        )
    finally:
        hole.close()


def test_a_live_connection_registers_the_zones_where_it_is_told(
    named: NamedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = spec_of(named)
    monkeypatch.setenv("PVE_TOKEN", "unused")
    api = ProxmoxApi(
        url="https://127.0.0.1:8006",
        user="reconciler@pve",
        token_id="t",
        token_secret=SecretRef(env="PVE_TOKEN"),
    )
    # The spec says port 53; the endpoints say where the zone's primary answers instead.
    ep = Endpoints(proxmox=api, dns_servers={"play.test": named.server})

    async def go() -> list[str]:
        async with connect_platform(spec.model_copy(update={"dns": moved(spec)}), ep) as conn:
            (provider,) = [p for p in conn.providers if Kind.DNS in p.kinds]
            assert isinstance(provider, DnsProvider)
            assert provider.zones["play.test"].port == named.port
            return [r.attributes["name"] for r in await provider.observe()]

    assert "www.play.test" in anyio.run(go)


def moved(spec: PlatformSpec) -> DnsSpec:
    """The spec's zones, play.test alone, on port 53 (where nothing answers)."""
    assert spec.dns is not None
    zone = spec.dns.zones["play.test"]
    provider = zone.provider.model_copy(update={"server": "127.0.0.1:53"})
    return DnsSpec(zones={"play.test": zone.model_copy(update={"provider": provider})})


def test_the_servers_config_with_the_keys_secrets_is_its_owners_only(named: NamedServer) -> None:
    conf = named.workdir / "named.conf"
    assert named.secrets[CONTROLLER_KEY] in conf.read_text()
    assert conf.stat().st_mode & 0o077 == 0


def test_another_owners_claim_at_the_companions_name_is_never_overwritten(
    named: NamedServer,
) -> None:
    """A TXT at `_rc-a.<name>` that is not this platform's mark (another platform's registry,
    external-dns's, a hand-made one) is someone's claim: the create is refused, saying so, and
    the claim stays; the rest converges."""
    spec = spec_of(named)
    other = '"heritage=reconciler,platform=other,address=dns/mc-lobby.internal.test/A"'
    named.hand_update("internal.test", ("add", "_rc-a.mc-lobby.internal.test.", 300, "TXT", other))
    conv = run(spec)
    report = conv.rounds[-1].report
    assert report is not None
    failed = {r.change.address: r.error for r in report.results if r.error}
    assert "_rc-a.mc-lobby.internal.test" in failed["dns/mc-lobby.internal.test/A"]
    assert "not this platform's mark" in failed["dns/mc-lobby.internal.test/A"]
    assert named.lookup("_rc-a.mc-lobby.internal.test", "TXT") == [other]
    assert named.lookup("mc-lobby.internal.test", "A") == []
    assert named.lookup("velocity.internal.test", "A") == ["10.30.0.21"]  # the rest converged


def test_a_held_back_delete_handed_over_anyway_is_refused(named: NamedServer) -> None:
    """The plan leaves a blocked change out of its actions; the provider checks again."""
    spec = spec_of(named)
    assert run(spec).ok
    plan = plan_now(spec)
    seen = next(c for c in plan.changes if c.address == "dns/mc-lobby.internal.test/A")
    held = replace(seen, action=Action.DELETE, after=None, blocked="needs pruning")
    with pytest.raises(PermanentError, match="held back, not applied: needs pruning"):
        anyio.run(provider_of(spec).apply, held)
    assert named.lookup("mc-lobby.internal.test", "A") == ["10.20.0.10"]
