"""The firewall reachability evaluator: ports, addresses, set algebra, group expansion, and
which sources a chain admits once earlier rules have decided."""

from __future__ import annotations

import ipaddress

import pytest

from reconciler.policies.reachability import (
    ALL,
    ANY,
    AddressBook,
    GroupRef,
    Network,
    Ports,
    Rule,
    Traffic,
    admissions,
    compile_rule,
    contains,
    expand_groups,
    format_addresses,
    format_ports,
    intersect,
    parse_ports,
    ports_contain,
    ports_within,
    resolve_addresses,
    subtract,
    within,
)

BOOK = AddressBook(
    aliases={
        "api": "10.10.0.11",
        "control-net": "10.10.0.0/24",
        "sloppy": "10.30.0.5/24",  # host bits set: Proxmox reads it as the network
        "v6net": "fd00:10::/64",
    },
    ipsets={
        "admins": ["192.168.50.0/24"],
        "carved": ["10.10.0.0/24", "!10.10.0.11"],
        "via-alias": ["api", "10.10.0.12"],
        "broken": ["nosuch", "10.0.0.1"],
    },
)


def nets(*texts: str) -> list[Network]:
    return [ipaddress.ip_network(t) for t in texts]


def rule(action: str = "ACCEPT", **kw: object) -> Rule[str]:
    """A rule compiled from PVE strings, exactly as the adapters build them."""
    compiled = compile_rule(
        "r", direction=str(kw.pop("direction", "in")), action=action, book=BOOK, **kw
    )  # type: ignore[arg-type]
    assert len(compiled.rules) == 1
    return compiled.rules[0]


# --- ports -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("18888", ((18888, 18888),)),
        (" 53 ", ((53, 53),)),
        ("80,18888", ((80, 80), (18888, 18888))),
        ("18000:19000", ((18000, 19000),)),
        ("443,80,81", ((80, 81), (443, 443))),
        ("80:90,85:100", ((80, 100),)),
        ("ssh,https", ((22, 22), (443, 443))),
        ("0:65535", ((0, 65535),)),
    ],
)
def test_parse_ports(text: str, expected: tuple[tuple[int, int], ...]) -> None:
    assert parse_ports(text) == expected


@pytest.mark.parametrize("text", ["", "80,", "abc", "70000", "20:10", "1:2:3", "-5"])
def test_parse_ports_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_ports(text)


@pytest.mark.parametrize(
    ("ports", "port", "expected"),
    [
        (ALL, 18888, True),
        (parse_ports("18888"), 18888, True),
        (parse_ports("80,18888"), 18888, True),
        (parse_ports("18000:19000"), 18888, True),
        (parse_ports("8888"), 18888, False),
        (parse_ports("80,443"), 18888, False),
    ],
)
def test_ports_contain(ports: Ports, port: int, expected: bool) -> None:
    assert ports_contain(ports, port) is expected


@pytest.mark.parametrize(
    ("inner", "outer", "expected"),
    [
        (parse_ports("53"), parse_ports("53"), True),
        (parse_ports("80,443"), parse_ports("443,80"), True),
        (parse_ports("80"), parse_ports("80,443"), True),
        (parse_ports("80:90"), parse_ports("80,443"), False),
        (parse_ports("80:90"), parse_ports("1:1000"), True),
        (ALL, parse_ports("53"), False),
        (ALL, ALL, True),
        (parse_ports("22"), ALL, True),
    ],
)
def test_ports_within(inner: Ports, outer: Ports, expected: bool) -> None:
    assert ports_within(inner, outer) is expected


@pytest.mark.parametrize(
    ("ports", "text"),
    [
        (ALL, "every port"),
        (parse_ports("22"), "port 22"),
        (parse_ports("443,80"), "ports 80,443"),
        (parse_ports("18000:19000"), "ports 18000:19000"),
    ],
)
def test_format_ports(ports: Ports, text: str) -> None:
    assert format_ports(ports) == text


# --- addresses -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.5", nets("10.0.0.5/32")),
        ("10.0.0.5/24", nets("10.0.0.0/24")),
        ("10.0.0.1-10.0.0.4", nets("10.0.0.1/32", "10.0.0.2/31", "10.0.0.4/32")),
        ("10.0.0.1, 10.0.0.2", nets("10.0.0.1/32", "10.0.0.2/32")),
        ("10.0.0.0/25,10.0.0.128/25", nets("10.0.0.0/24")),
        ("api", nets("10.10.0.11/32")),
        ("dc/api", nets("10.10.0.11/32")),
        ("API", nets("10.10.0.11/32")),
        ("control-net", nets("10.10.0.0/24")),
        ("sloppy", nets("10.30.0.0/24")),
        ("+admins", nets("192.168.50.0/24")),
        ("+dc/admins", nets("192.168.50.0/24")),
        ("+via-alias", nets("10.10.0.11/32", "10.10.0.12/32")),
        ("fd00::1", nets("fd00::1/128")),
        ("v6net", nets("fd00:10::/64")),
    ],
)
def test_resolve_addresses(text: str, expected: list[Network]) -> None:
    resolved = resolve_addresses(text, BOOK)
    assert resolved.addresses == expected
    assert resolved.unknown == ()


@pytest.mark.parametrize("text", [None, "", "  "])
def test_empty_source_is_any(text: str | None) -> None:
    assert resolve_addresses(text, BOOK).addresses is ANY


def test_ipset_nomatch_entry_carves_out_addresses() -> None:
    addresses = resolve_addresses("+carved", BOOK).addresses
    assert addresses is not ANY
    assert not contains(addresses, ipaddress.ip_address("10.10.0.11"))
    assert contains(addresses, ipaddress.ip_address("10.10.0.12"))
    assert within(addresses, nets("10.10.0.0/24"))


@pytest.mark.parametrize(
    ("text", "addresses", "unknown"),
    [
        ("nosuch", [], ("nosuch",)),
        ("+nosuch", [], ("+nosuch",)),
        ("api,ghost", nets("10.10.0.11/32"), ("ghost",)),
        ("+broken", nets("10.0.0.1/32"), ("nosuch",)),
        ("10.0.0.9-10.0.0.1", [], ("10.0.0.9-10.0.0.1",)),
    ],
)
def test_unresolvable_names_are_unknown_not_errors(
    text: str, addresses: list[Network], unknown: tuple[str, ...]
) -> None:
    resolved = resolve_addresses(text, BOOK)
    assert resolved.addresses == addresses
    assert resolved.unknown == unknown


@pytest.mark.parametrize(
    ("a", "b", "both", "a_not_b"),
    [
        (
            nets("10.0.0.0/24"),
            nets("10.0.0.11/32"),
            nets("10.0.0.11/32"),
            nets(
                "10.0.0.0/29",
                "10.0.0.8/31",
                "10.0.0.10/32",
                "10.0.0.12/30",
                "10.0.0.16/28",
                "10.0.0.32/27",
                "10.0.0.64/26",
                "10.0.0.128/25",
            ),
        ),
        (nets("10.0.0.0/24"), nets("10.0.1.0/24"), [], nets("10.0.0.0/24")),
        (nets("10.0.0.0/24"), nets("10.0.0.0/16"), nets("10.0.0.0/24"), []),
        (nets("10.0.0.0/24"), nets("fd00::/8"), [], nets("10.0.0.0/24")),
        (ANY, nets("10.0.0.0/8"), nets("10.0.0.0/8"), None),
    ],
)
def test_intersect_and_subtract(
    a: list[Network], b: list[Network], both: list[Network], a_not_b: list[Network] | None
) -> None:
    assert intersect(a, b) == both
    if a_not_b is not None:
        assert subtract(a, b) == a_not_b


@pytest.mark.parametrize(
    ("inner", "outer", "expected"),
    [
        (nets("10.10.0.11/32"), nets("10.10.0.11/32"), True),
        (nets("10.10.0.0/24"), nets("10.10.0.11/32"), False),  # a /24 is wider than its host
        (nets("10.10.0.0/25", "10.10.0.128/25"), nets("10.10.0.0/24"), True),
        (nets("10.10.0.0/24"), nets("10.10.0.0/25", "10.10.0.128/25"), True),
        (ANY, nets("0.0.0.0/0"), False),  # ANY includes IPv6 too
        (ANY, nets("0.0.0.0/0", "::/0"), True),
    ],
)
def test_within(inner: list[Network], outer: list[Network], expected: bool) -> None:
    assert within(inner, outer) is expected


@pytest.mark.parametrize(
    ("addresses", "text"),
    [
        (ANY, "any address"),
        (nets("0.0.0.0/0", "::/0"), "any address"),
        (nets("10.10.0.11/32"), "10.10.0.11"),
        (nets("10.10.0.0/24"), "10.10.0.0/24"),
        (subtract(ANY, nets("10.10.0.11/32")), "any address except 10.10.0.11"),
        (
            nets("10.0.0.1/32", "10.0.0.3/32", "10.0.0.5/32", "10.0.0.7/32"),
            "10.0.0.1, 10.0.0.3, 10.0.0.5 and 1 more",
        ),
    ],
)
def test_format_addresses(addresses: list[Network], text: str) -> None:
    assert format_addresses(addresses) == text


# --- compiling rules -------------------------------------------------------------------------


def test_macro_expands_to_its_protocols_and_ports() -> None:
    compiled = compile_rule(
        "r", direction="in", action="accept", macro="dns", book=BOOK, source="control-net"
    )
    assert [(r.proto, r.ports) for r in compiled.rules] == [
        ("udp", ((53, 53),)),
        ("tcp", ((53, 53),)),
    ]
    assert all(r.action == "ACCEPT" and r.certain for r in compiled.rules)
    assert all(r.source == nets("10.10.0.0/24") for r in compiled.rules)


@pytest.mark.parametrize(
    ("kw", "proto", "ports", "certain"),
    [
        ({"proto": "tcp", "dport": "18888"}, "tcp", ((18888, 18888),), True),
        ({"proto": "6", "dport": "22"}, "tcp", ((22, 22),), True),
        ({"macro": "SSH"}, "tcp", ((22, 22),), True),
        ({"macro": "NoSuchMacro"}, None, ALL, False),
        ({"proto": "tcp", "dport": "nonsense"}, "tcp", ALL, False),
        ({"proto": "icmp", "dport": "echo-request"}, "icmp", ALL, False),
        ({"iface": "net0"}, None, ALL, False),
        ({"dest": "10.0.0.1"}, None, ALL, False),
        ({"proto": "tcp", "sport": "1024:65535"}, "tcp", ALL, False),
        ({}, None, ALL, True),
    ],
)
def test_compile_rule(kw: dict[str, str], proto: str | None, ports: Ports, certain: bool) -> None:
    r = rule("DROP", **kw)
    assert (r.proto, r.ports, r.certain) == (proto, ports, certain)


def test_compile_rule_reports_unknown_names() -> None:
    compiled = compile_rule("r", direction="in", action="ACCEPT", book=BOOK, source="ghost")
    assert compiled.unknown == ("ghost",)
    assert compiled.rules[0].source == []


def test_expand_groups_in_place() -> None:
    groups = {"agent": [rule(source="api", proto="tcp", dport="18888")]}
    first = rule(proto="tcp", dport="25565")
    last = rule("DROP")
    chain = expand_groups(
        [
            first,
            GroupRef(origin="ref", name="agent"),
            GroupRef(origin="off", name="agent", enabled=False),
            GroupRef(origin="gone", name="nosuch"),
            last,
        ],
        groups,
    )
    assert [r.ports for r in chain] == [((25565, 25565),), ((18888, 18888),), ALL]
    assert (chain[1].group, chain[1].via) == ("agent", "ref")
    assert (chain[0].group, chain[0].via) == (None, None)


# --- admissions ------------------------------------------------------------------------------

AGENT = Traffic("tcp", 18888)


def admitted(
    chain: list[Rule[str]], policy: str = "DROP", traffic: Traffic | None = None
) -> list[list[Network]]:
    return [a.addresses for a in admissions(chain, policy, traffic)]


def test_accept_from_any_admits_everything() -> None:
    (adm,) = admissions([rule()], "DROP")
    assert adm.from_any
    assert format_addresses(adm.addresses) == "any address"


@pytest.mark.parametrize("action", ["DROP", "REJECT"])
def test_blanket_drop_shadows_a_later_accept(action: str) -> None:
    assert admitted([rule(action), rule(proto="tcp", dport="18888")]) == []
    assert admitted([rule(action), rule(proto="tcp", dport="18888")], traffic=AGENT) == []


@pytest.mark.parametrize(
    ("drop", "shadows_any_traffic", "shadows_agent"),
    [
        ({}, True, True),
        ({"proto": "tcp"}, False, True),
        ({"proto": "tcp", "dport": "18000:19000"}, False, True),
        ({"proto": "tcp", "dport": "22"}, False, False),
        ({"proto": "udp"}, False, False),
        ({"macro": "SSH"}, False, False),
        ({"iface": "net0"}, False, False),  # not modelled exactly: never trusted to stop
        ({"enable": False}, False, False),
    ],
)
def test_which_drops_shadow(
    drop: dict[str, object], shadows_any_traffic: bool, shadows_agent: bool
) -> None:
    enabled = bool(drop.pop("enable", True))
    chain = [rule("DROP", enabled=enabled, **drop), rule()]
    assert (admitted(chain) == []) is shadows_any_traffic
    assert (admitted(chain, traffic=AGENT) == []) is shadows_agent


def test_drop_of_a_subnet_leaves_the_rest_admitted() -> None:
    (adm,) = admissions([rule("DROP", source="10.0.0.0/8"), rule()], "DROP")
    assert not contains(adm.addresses, ipaddress.ip_address("10.1.2.3"))
    assert contains(adm.addresses, ipaddress.ip_address("192.168.1.1"))
    assert contains(adm.addresses, ipaddress.ip_address("fd00::1"))
    assert adm.from_any  # a guest of unknown address may still be outside 10/8


def test_earlier_accept_decides_its_sources() -> None:
    chain = [rule(source="api", proto="tcp", dport="18888"), rule(source="control-net")]
    first, second = admissions(chain, "DROP", AGENT)
    assert first.addresses == nets("10.10.0.11/32")
    # The API was let in already; the rest of control-net reaches the port through rule two.
    assert not contains(second.addresses, ipaddress.ip_address("10.10.0.11"))
    assert within(second.addresses, nets("10.10.0.0/24"))
    assert subtract(second.addresses, nets("10.10.0.11/32")) == second.addresses


@pytest.mark.parametrize(
    ("accept", "matches_agent"),
    [
        ({}, True),
        ({"proto": "tcp"}, True),
        ({"proto": "tcp", "dport": "80,18888"}, True),
        ({"proto": "tcp", "dport": "18000:19000"}, True),
        ({"proto": "tcp", "dport": "22"}, False),
        ({"proto": "udp", "dport": "18888"}, False),
        ({"macro": "HTTPS"}, False),
        ({"direction": "out"}, False),
    ],
)
def test_which_accepts_reach_the_agent_port(accept: dict[str, str], matches_agent: bool) -> None:
    assert bool(admitted([rule(**accept)], traffic=AGENT)) is matches_agent


@pytest.mark.parametrize(
    ("policy", "chain_len", "admits"),
    [
        ("ACCEPT", 0, True),
        ("accept", 0, True),
        ("DROP", 0, False),
        ("REJECT", 0, False),
        ("ACCEPT", 1, False),
    ],
)
def test_default_policy(policy: str, chain_len: int, admits: bool) -> None:
    chain = [rule("DROP")] * chain_len
    adms = admissions(chain, policy)
    assert bool(adms) is admits
    if admits:
        assert adms[0].rule is None and adms[0].from_any


def test_policy_accept_admits_only_what_no_rule_decided() -> None:
    (allowed, by_policy) = admissions(
        [rule(source="api", proto="tcp", dport="18888")], "ACCEPT", AGENT
    )
    assert allowed.rule is not None
    assert by_policy.rule is None
    assert format_addresses(by_policy.addresses) == "any address except 10.10.0.11"


def test_unknown_action_neither_admits_nor_stops() -> None:
    assert admitted([rule("LOG"), rule()]) == [[*nets("0.0.0.0/0", "::/0")]]
