"""Values the controller writes into a Traefik rule or key, checked twice: by the spec language
(every hostile value is a diagnostic at its file:line; the corpus cases 90-99 hold one each) and
by the rule builder, which quotes every value and refuses what it cannot quote, whatever the
model lets through (here: models built without validation, as a future field might be).

Traefik's rules are Go expressions: a backtick string is a raw literal that ends at the next
backtick and has no escapes, so a value that cannot close it cannot add a matcher.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.loading.graph import build_graph, route_rule, rule_literal
from reconciler.loading.loader import LoadResult, load_texts
from reconciler.model.spec import HttpRoute, PlatformSpec, Target, TcpRoute, Tls
from reconciler.model.units import check_hostname, check_sni, check_url_path
from tests.conftest import SPECS

INJECTION = "/x`) || Host(`portal.zpack.dev`) || PathPrefix(`/"
# What the builder writes, and nothing else: Host(...)s joined by ||, in parentheses when more
# than one, then && PathPrefix(...); or HostSNI(...)s joined by ||.
_LIT = r"`([^`]+)`"
HTTP_RULE = re.compile(
    rf"(?:Host\({_LIT}\)|\(Host\({_LIT}\)(?: \|\| Host\({_LIT}\))+\))(?: && PathPrefix\({_LIT}\))?"
)
PROPS = settings(max_examples=300, deadline=None)


def load_with(extra: str) -> LoadResult:
    texts = {f"specs/{p.name}": p.read_text(encoding="utf-8") for p in sorted(SPECS.glob("*.yaml"))}
    texts["specs/extra.yaml"] = extra
    return load_texts(texts)


def literals(rule: str) -> list[str]:
    """The quoted values of a rule, as Traefik's parser reads them (raw strings)."""
    return re.findall(_LIT, rule)


# --- names with a line break: reported where they are written ---------------------------------


@pytest.mark.parametrize(
    ("extra", "line", "shown"),
    [
        (
            'traefik:\n  runtime:\n    routes:\n      "ide\\nrc-portal":\n'
            "        host: carol.dev.zpack.dev\n"
            "        target: {guest: dev-alice, port: 8080}\n",
            4,
            "'ide\\nrc-portal' is not a valid name",
        ),
        (
            'velocity:\n  servers:\n    "lobby\\nsurvival": {guest: mc-lobby, port: 25566}\n',
            3,
            "'lobby\\nsurvival' is not a valid name",
        ),
        (
            'traefik:\n  "edge\\nhttp:":\n    guest: traefik-runtime\n    routes_to: [edge]\n'
            "    feed: {type: file, path: /etc/traefik/dynamic/edge.yml}\n",
            2,
            "'edge\\nhttp:' is not a valid name",
        ),
    ],
    ids=["route", "velocity-server", "instance"],
)
def test_a_name_with_a_line_break_is_refused_at_its_key(extra: str, line: int, shown: str) -> None:
    result = load_with(extra)
    assert not result.ok
    found = [
        d
        for d in result.diagnostics
        if d.code == "invalid-value" and shown in d.message and d.position is not None
    ]
    assert found, [str(d) for d in result.diagnostics]
    assert found[0].position is not None
    assert (found[0].position.file, found[0].position.line) == ("specs/extra.yaml", line)


def test_the_example_platform_still_loads_and_its_rules_are_unchanged(
    example: LoadResult,
) -> None:
    assert example.spec is not None
    rules = {
        a: r.attributes["rule"]
        for a, r in build_graph(example.spec).resources.items()
        if a.startswith("route/")
    }
    assert rules["route/core/portal"] == "Host(`portal.zpack.dev`)"
    assert rules["route/runtime/console-skyblock"] == "HostSNI(`console.skyblock.play.zpack.dev`)"
    assert len(rules) == 9


# --- the builder quotes, or refuses ---------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        INJECTION,
        "a`b",
        "`",
        "",
        "/a\nb",
        "/a\rb",
        "/a\x00",
        "/a\x7f",
        "host.éxample.org",
        "/a\u2028b",
    ],
)
def test_rule_literal_refuses_what_it_cannot_quote(value: str) -> None:
    with pytest.raises(ValueError, match="cannot be quoted in a Traefik rule"):
        rule_literal(value)


def test_rule_literal_quotes_printable_ascii_in_backticks() -> None:
    printable = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "`")
    assert rule_literal(printable) == f"`{printable}`"
    assert literals(f"PathPrefix({rule_literal(printable)})") == [printable]


def crafted_http(path: str | None = None, *hosts: str) -> HttpRoute:
    """An HttpRoute built without validation: what a model that forgot a check would hold."""
    return HttpRoute.model_construct(
        type="http",
        host=hosts or ("tools.dev.zpack.dev",),
        path_prefix=path,
        entrypoints=("websecure",),
        tls=Tls(certresolver="letsencrypt"),
        target=Target(guest="dev-alice", port=8080),
        when_unready=None,
    )


@pytest.mark.parametrize(
    "route",
    [
        crafted_http(INJECTION),
        crafted_http('/x") || Host("portal.zpack.dev") || PathPrefix("/x\r'),
        crafted_http(None, "tools.dev.zpack.dev", "x`) || Host(`portal.zpack.dev"),
        crafted_http(""),
        TcpRoute.model_construct(
            type="tcp",
            sni=("console.lobby.play.zpack.dev`) || HostSNI(`*",),
            entrypoints=("websecure",),
            tls=Tls(passthrough=True),
            target=Target(guest="mc-lobby", port=8443),
            when_unready=None,
        ),
    ],
    ids=["backtick-path", "carriage-return-path", "backtick-host", "empty-path", "backtick-sni"],
)
def test_route_rule_refuses_a_value_the_model_did_not_check(route: HttpRoute | TcpRoute) -> None:
    with pytest.raises(ValueError, match="cannot be quoted in a Traefik rule"):
        route_rule(route)


def with_route(spec: PlatformSpec, instance: str, name: str, route: Any) -> PlatformSpec:
    inst = spec.traefik[instance]
    changed = inst.model_copy(update={"routes": {**inst.routes, name: route}})
    return spec.model_copy(update={"traefik": {**spec.traefik, instance: changed}})


def test_building_the_graph_refuses_the_injection_that_slipped_past_the_model(
    example: LoadResult,
) -> None:
    """The issue's value, put into a loaded spec behind the model's back: no graph, no rule."""
    assert example.spec is not None
    hostile = with_route(example.spec, "runtime", "ide-tools", crafted_http(INJECTION))
    with pytest.raises(ValueError, match="cannot be quoted in a Traefik rule"):
        build_graph(hostile)


def test_a_checked_path_prefix_is_quoted_once_and_joins_no_matcher(example: LoadResult) -> None:
    assert example.spec is not None
    route = HttpRoute.model_validate(
        {
            "host": ["tools.dev.zpack.dev", "docs.dev.zpack.dev"],
            "path_prefix": "/a-._~!$*+,;=:@/%2F",
            "target": {"guest": "dev-alice", "port": 8080},
        }
    )
    spec = with_route(example.spec, "runtime", "ide-tools", route)
    rule = build_graph(spec).resources["route/runtime/ide-tools"].attributes["rule"]
    assert rule == (
        "(Host(`tools.dev.zpack.dev`) || Host(`docs.dev.zpack.dev`))"
        " && PathPrefix(`/a-._~!$*+,;=:@/%2F`)"
    )
    assert HTTP_RULE.fullmatch(rule)


# --- everything the spec accepts, the builder quotes, and the rule says only that ---------------


# Paths of the characters a URL path holds, escapes, and those a rule gives a meaning to.
_PATHISH = st.lists(
    st.one_of(
        st.sampled_from("aZ09-._~!$*+,;=:@/"),
        st.sampled_from(["%2F", "%7e", "%", "%G1"]),
        st.sampled_from("`\"'()|& \t\n\r\\é\u2028"),
        st.characters(),
    ),
    max_size=20,
).map(lambda parts: "/" + "".join(parts))


@PROPS
@given(_PATHISH)
def test_any_path_the_spec_accepts_stays_inside_its_quotes(path: str) -> None:
    try:
        checked = check_url_path(path)
    except ValueError:
        return
    rule = route_rule(crafted_http(checked))
    assert HTTP_RULE.fullmatch(rule), rule
    assert literals(rule) == ["tools.dev.zpack.dev", checked]


# Host names of 2-4 labels, each a DNS label or text with characters a rule gives a meaning to.
_LABEL = st.one_of(
    st.from_regex(r"[a-zA-Z0-9]([a-z0-9-]{0,6}[a-z0-9])?", fullmatch=True),
    st.text(alphabet=st.sampled_from("ab-*` ()|&\"'\\/\n\té"), min_size=1, max_size=6),
)
_HOSTISH = st.one_of(st.lists(_LABEL, min_size=2, max_size=4).map(".".join), st.just("*"))


@PROPS
@given(_HOSTISH, _HOSTISH)
def test_any_host_the_spec_accepts_is_the_only_host_in_its_rule(one: str, two: str) -> None:
    try:
        hosts = (check_hostname(one), check_hostname(two))
    except ValueError:
        return
    rule = route_rule(crafted_http(None, *hosts))
    assert HTTP_RULE.fullmatch(rule), rule
    assert literals(rule) == list(hosts)


@PROPS
@given(_HOSTISH)
def test_any_sni_the_spec_accepts_is_the_only_name_in_its_rule(name: str) -> None:
    try:
        sni = check_sni(name)
    except ValueError:
        return
    route = TcpRoute.model_construct(
        type="tcp",
        sni=(sni,),
        entrypoints=("websecure",),
        tls=Tls(passthrough=True),
        target=Target(guest="mc-lobby", port=8443),
        when_unready=None,
    )
    assert route_rule(route) == f"HostSNI(`{sni}`)"


@pytest.mark.parametrize(
    "check",
    ["check_label", "check_hostname", "check_sni", "check_identifier", "check_key_path"],
)
def test_a_trailing_newline_is_not_a_name(check: str) -> None:
    # `$` matches before a final newline; every name checker must see the whole value.
    from reconciler.model import units

    with pytest.raises(ValueError):
        getattr(units, check)("abc.example.org\n")
