"""What the loader says about a mistake: suggestions from the keys valid where the mistake is,
messages that name the field (not a union tag or a bare index), profile chains checked once,
guest names checked, and `validate` counting every file it found.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from reconciler.cli.main import main
from reconciler.loading.loader import LoadResult, _fields_at, load_texts
from reconciler.model.diagnostics import Diagnostic
from reconciler.model.spec import GuestSpec, NetworkInterface, ProfileSpec, TcpRoute
from tests.conftest import SPECS


def load_with(extra: dict[str, str]) -> LoadResult:
    texts = {f"specs/{p.name}": p.read_text(encoding="utf-8") for p in sorted(SPECS.glob("*.yaml"))}
    texts.update({f"specs/{name}": text for name, text in extra.items()})
    return load_texts(texts)


def with_code(result: LoadResult, code: str) -> list[Diagnostic]:
    return [d for d in result.diagnostics if d.code == code]


GUEST = (
    "guests:\n  mc-hub:\n    role: game\n    vmid: 1010\n    host: pve-runtime\n"
    "    profile: game-vanilla\n"
)


# --- did you mean ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # A top-level typo: 'guest' is a field elsewhere (velocity, routes), never the answer here.
        ("guest:\n  mc-hub: {role: game}\n", "unknown field 'guest'; did you mean 'guests'?"),
        (GUEST + "    memroy: 4G\n", "unknown field 'memroy'; did you mean 'memory'?"),
        # In a list item of a guest.
        (
            GUEST + "    network:\n      - {name: eth0, bridg: vmbr0, ip: dhcp}\n",
            "unknown field 'bridg'; did you mean 'bridge'?",
        ),
        # A profile may say `extends`, a guest may not.
        ("profiles:\n  p:\n    extend: base\n", "unknown field 'extend'; did you mean 'extends'?"),
        # A TCP route has no `host`: no suggestion is better than "did you mean 'host'?".
        (
            "traefik:\n  runtime:\n    routes:\n      c:\n        type: tcp\n"
            "        sni: c.play.zpack.dev\n        host: c.play.zpack.dev\n"
            "        tls: {passthrough: true}\n        target: {guest: mc-lobby, port: 1}\n",
            "unknown field 'host'",
        ),
        # Inside the Redis member of the feed union.
        (
            "traefik:\n  extra:\n    guest: traefik-runtime\n    routes_to: [edge]\n"
            "    feed: {type: redis, root_kye: x}\n",
            "unknown field 'root_kye'; did you mean 'root_key'?",
        ),
    ],
    ids=["top-level", "guest", "network-item", "profile", "tcp-route", "redis-feed"],
)
def test_a_suggestion_comes_from_the_keys_valid_where_the_typo_is(text: str, message: str) -> None:
    found = with_code(load_with({"zz-more.yaml": text}), "unknown-field")
    assert [d.message for d in found] == [message]


def test_the_walk_follows_maps_tuples_optionals_and_union_tags() -> None:
    route = {"type": "tcp", "sni": "x"}
    data = {"traefik": {"runtime": {"routes": {"c": route}}}, "guests": {"g": {"network": [{}]}}}
    assert _fields_at(data, ("traefik", "runtime", "routes", "c")) == set(TcpRoute.model_fields)
    assert _fields_at(data, ("traefik", "runtime", "routes", "c", "tcp")) == set(
        TcpRoute.model_fields
    )
    assert _fields_at(data, ("guests", "g")) == set(GuestSpec.model_fields)
    assert _fields_at(data, ("guests", "g", "network", 0)) == set(NetworkInterface.model_fields)
    assert _fields_at(data, ("profiles", "p")) == set(ProfileSpec.model_fields)
    assert _fields_at(data, ("proxmox",)) >= {"url", "token_secret"}
    # A loc that does not lead to a model falls back to every field name.
    assert {"guests", "memory", "sni"} <= _fields_at(data, ("guests", "g", "nonsense"))


# --- messages name the field -------------------------------------------------------------------


def test_a_route_error_names_the_route_not_the_union_tag() -> None:
    text = (
        "traefik:\n  runtime:\n    routes:\n      console-lobby:\n        type: tcp\n"
        "        sni: console.lobby.play.zpack.dev\n"
        "        target: {guest: mc-lobby, port: 8443}\n"
    )
    [found] = with_code(load_with({"zz-more.yaml": text}), "invalid-value")
    assert found.message.startswith("console-lobby: HostSNI needs TLS")
    assert found.path == "traefik.runtime.routes.console-lobby"


def test_a_bad_tag_inherited_from_a_profile_is_reported_at_that_profile_once() -> None:
    # `odd` extends `game-vanilla` (tags zpack, game, vanilla): the merged list is
    # [zpack, game, vanilla, Odd, extra]; `Odd` was written in the profile at index 0.
    text = (
        "profiles:\n  odd:\n    extends: game-vanilla\n    tags: [Odd]\n"
        "guests:\n  mc-hub:\n    role: game\n    vmid: 1010\n    host: pve-runtime\n"
        "    profile: odd\n    tags: [extra, Bad]\n"
    )
    found = with_code(load_with({"zz-more.yaml": text}), "invalid-value")
    shown = sorted((d.path, d.position and d.position.line, d.message[:14]) for d in found)
    assert shown == [
        ("guests.mc-hub.tags[1]", 11, "tags[1]: 'Bad'"),
        ("profiles.odd.tags[0]", 4, "tags[0]: 'Odd'"),
    ]


# --- profile chains -----------------------------------------------------------------------------


def test_a_cycle_between_profiles_two_guests_use_is_reported_once() -> None:
    text = (
        "profiles:\n  hub:\n    extends: hub-base\n  hub-base:\n    extends: hub\n"
        "guests:\n"
        "  mc-a: {role: game, host: pve-runtime, profile: hub, template: t}\n"
        "  mc-b: {role: game, host: pve-runtime, profile: hub-base, template: t}\n"
    )
    found = with_code(load_with({"zz-more.yaml": text}), "profile-cycle")
    assert [(d.message, d.path) for d in found] == [
        ("profiles extend each other in a cycle: hub -> hub-base -> hub", "profiles.hub.extends")
    ]


def test_an_extends_to_a_missing_profile_is_reported_at_the_extends_not_per_guest() -> None:
    text = (
        "profiles:\n  hub:\n    extends: nowhere\n"
        "guests:\n"
        "  mc-a: {role: game, host: pve-runtime, profile: hub, template: t}\n"
        "  mc-b: {role: game, host: pve-runtime, profile: hub, template: t}\n"
    )
    found = with_code(load_with({"zz-more.yaml": text}), "unknown-reference")
    assert [(d.message, d.path) for d in found] == [
        ("profile 'nowhere' is not defined", "profiles.hub.extends")
    ]


# --- guest names --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mc_Hub", "Hub", "-hub", "hub-", "a" * 64])
def test_a_guest_name_must_be_a_dns_label_even_with_a_hostname(name: str) -> None:
    text = (
        f"guests:\n  {name}:\n    role: game\n    host: pve-runtime\n    hostname: hub\n"
        "    profile: game-vanilla\n"
    )
    found = with_code(load_with({"zz-more.yaml": text}), "invalid-name")
    assert [(d.path, d.position and d.position.line) for d in found] == [(f"guests.{name}", 2)]
    assert found[0].message.startswith(f"guest {name!r} is not a valid name")


# --- validate's summary -------------------------------------------------------------------------


def test_validate_counts_a_file_that_does_not_parse(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    specs = tmp_path / "specs"
    shutil.copytree(SPECS, specs)
    count = len(list(specs.glob("*.yaml")))
    (specs / "broken.yaml").write_text("guests: [\n")
    assert main(["validate", str(specs), "--color", "never"]) == 1
    summary = capsys.readouterr().out.splitlines()[-1]
    assert summary == f"{specs}: 1 error, 0 warnings in {count + 1} files"
