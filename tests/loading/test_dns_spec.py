"""The `dns:` section: zones, derived records (a guest's static address under the internal zone,
route hosts and forced hosts under the public one) and listed records, as graph resources; and
every mistake (a record outside its zone, a duplicate, a value its type cannot hold, a CNAME
beside other data, the ownership records' names and marks) an error at the line it was written.

A platform of its own (tests/dns_fixtures.py's BASE), not specs/, with `dns_section`'s zones."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from reconciler.cli.render import render_text
from reconciler.loading.graph import build_graph
from reconciler.loading.loader import LoadResult, load_texts
from reconciler.model.diagnostics import Diagnostic, Severity
from reconciler.model.observed import ObservedState
from reconciler.model.resources import DesiredGraph, Kind, kind_of
from reconciler.planning.planner import make_plan
from tests.dns_fixtures import BASE, dns_section
from tests.loading.test_schema import COMMITTED, read_as_loader, schema_errors


def load(records: str = "", *, edge: str = "203.0.113.10", dns: str | None = None) -> LoadResult:
    texts = {
        "specs/platform.yaml": BASE,
        "specs/dns.yaml": dns or dns_section(records=records, edge=edge),
    }
    return load_texts(texts)


def graph_of(result: LoadResult) -> DesiredGraph:
    assert result.ok and result.spec is not None, [str(d) for d in result.diagnostics]
    return build_graph(result.spec, result.source)


def records(graph: DesiredGraph) -> dict[str, dict[str, Any]]:
    return {a: dict(r.attributes) for a, r in graph.resources.items() if r.kind is Kind.DNS}


def errors(result: LoadResult) -> list[Diagnostic]:
    return [d for d in result.diagnostics if d.severity is Severity.ERROR]


def line_of(text: str, marker: str) -> int:
    lines = [i for i, line in enumerate(text.splitlines(), 1) if marker in line]
    assert len(lines) == 1, f"{marker!r} must be on exactly one line"
    return lines[0]


# --- derived and listed records ----------------------------------------------------------------


def test_derived_records_name_guests_and_the_edge() -> None:
    graph = graph_of(load())
    found = records(graph)
    # The internal zone: a guest with a static address, A or AAAA by its family; none for DHCP.
    assert found["dns/mc-lobby.internal.test/A"] == {
        "zone": "internal.test",
        "name": "mc-lobby.internal.test",
        "type": "A",
        "values": ["10.20.0.10"],
        "ttl": 300,
    }
    assert found["dns/mc-six.internal.test/AAAA"]["values"] == ["2001:db8::16"]
    assert not any(a.startswith("dns/mc-dhcp.") for a in found)
    # The public zone: route hosts, SNI names and forced hosts in it, at the edge's address;
    # a route host outside every zone gets nothing.
    edge = ["203.0.113.10"]
    for name in ("survival.play.test", "map.survival.play.test", "console.play.test"):
        assert found[f"dns/{name}/A"]["values"] == edge
        assert found[f"dns/{name}/A"]["zone"] == "play.test"
    assert not any("example.org" in a for a in found)
    # Each after what it names, in the graph's waves.
    assert graph.resources["dns/mc-lobby.internal.test/A"].depends_on == ("guest/mc-lobby",)
    assert graph.resources["dns/survival.play.test/A"].depends_on == ("velocity/survival",)
    assert graph.waves["dns/mc-lobby.internal.test/A"] > graph.waves["guest/mc-lobby"]
    assert kind_of("dns/survival.play.test/A") is Kind.DNS


def test_an_edge_with_both_families_gets_a_and_aaaa() -> None:
    found = records(graph_of(load(edge="[203.0.113.10, '2001:db8::10']")))
    assert found["dns/survival.play.test/A"]["values"] == ["203.0.113.10"]
    assert found["dns/survival.play.test/AAAA"]["values"] == ["2001:db8::10"]


LISTED = (
    "        - {name: play.test, type: TXT, value: 'v=spf1 -all'}\n"
    "        - name: _minecraft._tcp.play.test\n"
    "          type: SRV\n"
    "          value: '0 5 25565 Survival.Play.Test.'\n"
    "        - name: Mirror.Play.Test.\n"
    "          type: AAAA\n"
    "          value: ['2001:DB8:0::1', '2001:db8::1']\n"
    "          ttl: 60\n"
    "        - {name: www.play.test, type: CNAME, value: play.test.}\n"
    "        - {name: '*.dev.play.test', type: A, value: 203.0.113.11}\n"
)


def test_listed_records_are_canonical_and_the_plan_shows_them() -> None:
    listed = LISTED
    found = records(graph_of(load(listed)))
    assert found["dns/_minecraft._tcp.play.test/SRV"]["values"] == ["0 5 25565 survival.play.test"]
    assert found["dns/mirror.play.test/AAAA"] == {
        "zone": "play.test",
        "name": "mirror.play.test",
        "type": "AAAA",
        "values": ["2001:db8::1"],
        "ttl": 60,
    }
    assert found["dns/www.play.test/CNAME"]["values"] == ["play.test"]
    assert found["dns/*.dev.play.test/A"]["values"] == ["203.0.113.11"]
    plan = make_plan(graph_of(load(listed)), ObservedState(kinds=(Kind.DNS,)))
    text = render_text(plan)
    assert "+ dns/survival.play.test A 203.0.113.10" in text
    assert "+ dns/_minecraft._tcp.play.test SRV 0 5 25565 survival.play.test" in text


# --- mistakes, each at its line ----------------------------------------------------------------

# (a listed record, the code, a piece of the message)
MISTAKES = [
    ("{name: www.example.org, type: A, value: 192.0.2.1}", "dns-outside-zone", "outside zone"),
    ("{name: www.play.test, type: A, value: 192.0.2.300}", "invalid-value", "not an IPv4"),
    ("{name: www.play.test, type: AAAA, value: 192.0.2.1}", "invalid-value", "not an IPv6"),
    ("{name: www.play.test, type: CNAME, value: [a.test, b.test]}", "invalid-value", "one target"),
    ("{name: www.play.test, type: CNAME, value: 'not a name'}", "invalid-value", "not a DNS name"),
    ("{name: _mc._tcp.play.test, type: SRV, value: '0 5 survival'}", "invalid-value", "SRV"),
    ('{name: t.play.test, type: TXT, value: "a\\tb"}', "invalid-value", "control"),
    ("{name: _rc-a.www.play.test, type: TXT, value: x}", "dns-reserved-name", "ownership"),
    (
        "{name: t.play.test, type: TXT, value: 'heritage=reconciler,platform=zpack'}",
        "forged-mark",
        "ownership mark",
    ),
    ("{name: survival.play.test, type: A, value: 192.0.2.1}", "duplicate-dns-record", "derived"),
    (
        "{name: survival.play.test, type: CNAME, value: x.test}",
        "dns-cname-conflict",
        "stands alone",
    ),
]


@pytest.mark.parametrize(
    ("record", "code", "says"), MISTAKES, ids=[m[1] + "-" + str(i) for i, m in enumerate(MISTAKES)]
)
def test_a_bad_record_is_an_error_at_its_line(record: str, code: str, says: str) -> None:
    text = dns_section(records=f"        - {record}  # the record\n")
    result = load(dns=text)
    found = [d for d in errors(result) if d.code == code]
    assert found, [str(d) for d in result.diagnostics]
    assert says in found[0].message
    assert found[0].position is not None
    assert found[0].position.file == "specs/dns.yaml"
    assert found[0].position.line == line_of(text, "# the record")
    assert result.spec is None


def test_a_record_listed_twice_names_the_first() -> None:
    records_text = (
        "        - {name: www.play.test, type: A, value: 192.0.2.1}  # first\n"
        "        - {name: WWW.play.test., type: A, value: 192.0.2.2}  # second\n"
    )
    text = dns_section(records=records_text)
    (found,) = [d for d in errors(load(dns=text)) if d.code == "duplicate-dns-record"]
    assert found.position is not None and found.position.line == line_of(text, "# second")
    assert f"specs/dns.yaml:{line_of(text, '# first')}" in found.message


def test_a_record_of_a_more_specific_zone_belongs_there() -> None:
    text = dns_section(
        records="        - {name: a.eu.play.test, type: A, value: 192.0.2.1}  # here\n"
    )
    text += (
        "    eu.play.test:\n"
        "      provider: {server: '127.0.0.1:53', tsig: {name: k, secret: {env: K}}}\n"
    )
    (found,) = [d for d in errors(load(dns=text)) if d.code == "dns-outside-zone"]
    assert "zone eu.play.test" in found.message and "more specific" in found.message
    assert found.position is not None and found.position.line == line_of(text, "# here")


KEY = "tsig: {name: k, secret: {env: K}}"
BAD_ZONES = [
    (f"{{kind: public, provider: {{server: ns.test, {KEY}}}}}", "edge_address"),
    (f"{{provider: {{server: 'ns.test:99999', {KEY}}}}}", "port"),
    ("{provider: {server: ns.test, tsig: {name: k, secret: 'c2VjcmV0'}}}", "literal secret"),
    (
        "{provider: {server: ns.test, tsig: {name: k, algorithm: md4, secret: {env: K}}}}",
        "algorithm",
    ),
    (
        f"{{kind: internal, edge_address: 192.0.2.1, provider: {{server: ns.test, {KEY}}}}}",
        "public zones only",
    ),
]


@pytest.mark.parametrize(("zone", "says"), BAD_ZONES)
def test_a_bad_zone_is_an_error_at_its_line(zone: str, says: str) -> None:
    text = f"dns:\n  zones:\n    other.test: {zone}\n"
    result = load(dns=dns_section() + text.removeprefix("dns:\n  zones:\n"))
    assert result.spec is None
    found = errors(result)
    assert any(says in d.message for d in found), [str(d) for d in found]
    assert all(d.position is not None and d.position.file == "specs/dns.yaml" for d in found)


def test_the_committed_schema_takes_the_dns_section_and_refuses_a_bad_one() -> None:
    validator = jsonschema.Draft202012Validator(json.loads(COMMITTED.read_text(encoding="utf-8")))
    good = dns_section(records=LISTED)
    data, diags = read_as_loader(good, "dns.yaml")
    assert not diags and not schema_errors(validator, data)
    for bad in (good.replace("kind: public", "kind: publc"), good.replace("SRV", "MX")):
        data, _ = read_as_loader(bad, "dns.yaml")
        assert schema_errors(validator, data), bad
