"""Reading and merging spec files: a named entry is written whole in one file, sections merge,
leading-zero numbers and unclosed brackets are reported in words a person can act on.

Texts are loaded with `load_texts` over the example platform, under the names `specs/<file>`,
so expected lines are found by searching the text that was loaded.
"""

from __future__ import annotations

import pytest

from reconciler.loading.loader import LoadResult, load_texts
from reconciler.loading.sources import read_text
from reconciler.model.diagnostics import Diagnostic
from tests.conftest import SPECS


def example_texts() -> dict[str, str]:
    return {f"specs/{p.name}": p.read_text(encoding="utf-8") for p in sorted(SPECS.glob("*.yaml"))}


def load_with(extra: dict[str, str]) -> tuple[LoadResult, dict[str, str]]:
    texts = {**example_texts(), **{f"specs/{name}": text for name, text in extra.items()}}
    return load_texts(texts), texts


def line_of(text: str, marker: str) -> int:
    lines = [i for i, line in enumerate(text.splitlines(), 1) if marker in line]
    assert len(lines) == 1, f"{marker!r} must be on exactly one line"
    return lines[0]


def with_code(result: LoadResult, code: str) -> list[Diagnostic]:
    return [d for d in result.diagnostics if d.code == code]


# --- a named entry is defined in one file --------------------------------------------------

# (second file's text, kind and name in the message, file and line marker of the first definition)
SPLIT_ENTRIES = [
    ("guests:\n  mc-lobby:\n    swap: 2G\n", "guest 'mc-lobby'", "game.yaml", "  mc-lobby:"),
    ("hosts:\n  pve-core:\n    node: pve1\n", "host 'pve-core'", "platform.yaml", "  pve-core:"),
    ("layers:\n  edge:\n    description: x\n", "layer 'edge'", "platform.yaml", "  edge:"),
    ("ranges:\n  dev:\n    description: x\n", "range 'dev'", "platform.yaml", "  dev: "),
    ("profiles:\n  dev:\n    cores: 4\n", "profile 'dev'", "profiles.yaml", "  dev:"),
    (
        "traefik:\n  core:\n    routes:\n      vpn:\n        when_unready: keep\n",
        "Traefik route 'core/vpn'",
        "control.yaml",
        "      vpn:",
    ),
    (
        "velocity:\n  servers:\n    lobby:\n      port: 25566\n",
        "Velocity server 'lobby'",
        "game.yaml",
        "    lobby:",
    ),
    (
        "firewall:\n  aliases:\n    api:\n      comment: x\n",
        "firewall alias 'api'",
        "firewall.yaml",
        "    api:",
    ),
    (
        "firewall:\n  ipsets:\n    admins:\n      comment: x\n",
        "IP set 'admins'",
        "firewall.yaml",
        "    admins:",
    ),
    (
        "firewall:\n  groups:\n    agent:\n      comment: x\n",
        "security group 'agent'",
        "firewall.yaml",
        "    agent:",
    ),
]


@pytest.mark.parametrize(
    ("text", "what", "first_file", "marker"), SPLIT_ENTRIES, ids=[e[1] for e in SPLIT_ENTRIES]
)
def test_an_entry_split_across_files_is_one_error_at_the_second_definition(
    text: str, what: str, first_file: str, marker: str
) -> None:
    result, texts = load_with({"zz-more.yaml": text})
    found = with_code(result, "duplicate-definition")
    first_line = line_of(texts[f"specs/{first_file}"], marker)
    assert [d.message for d in found] == [
        f"{what} is defined in two files: first at specs/{first_file}:{first_line}"
    ]
    position = found[0].position
    assert position is not None
    # The entry's key is on the line before the last of the (short) second file.
    assert (position.file, position.line) == ("specs/zz-more.yaml", text.count("\n") - 1)
    assert not result.ok


def test_an_entry_written_twice_in_one_file_says_twice() -> None:
    text = "guests:\n  mc-x:\n    cores: 1\n---\nguests:\n  mc-x:\n    cores: 2\n"
    result, _ = load_with({"zz-more.yaml": text})
    [found] = with_code(result, "duplicate-definition")
    assert found.message == "guest 'mc-x' is defined twice: first at specs/zz-more.yaml:2"
    assert found.position is not None and found.position.line == 6


def test_sections_still_merge_across_files() -> None:
    # A Traefik instance's routes may live beside the guests they serve, in another file.
    route = (
        "traefik:\n  core:\n    routes:\n      status:\n        host: status.zpack.dev\n"
        "        tls: {certresolver: letsencrypt}\n"
        "        target: {guest: zpack-monitor, port: 3001}\n"
    )
    result, _ = load_with({"zz-more.yaml": route})
    assert result.ok, [str(d) for d in result.diagnostics]
    assert result.spec is not None
    assert {"portal", "status"} <= set(result.spec.traefik["core"].routes)


def test_a_field_set_twice_outside_named_entries_is_still_reported() -> None:
    result, _ = load_with({"zz-more.yaml": "platform:\n  prune: true\n"})
    [found] = with_code(result, "duplicate-definition")
    assert found.message.startswith("platform.prune is defined twice; first at specs/platform.yaml")


# --- numbers with a leading zero ---------------------------------------------------------------


def read(text: str) -> tuple[object, list[Diagnostic]]:
    diags: list[Diagnostic] = []
    source = read_text(text, "f.yaml", diags)
    return (source.data if source else None), diags


def test_a_leading_zero_integer_is_an_error_and_read_as_the_decimal_meant() -> None:
    data, diags = read("vmid: 01010\nport: -017\n")
    assert [(d.code, d.position and d.position.line, d.path) for d in diags] == [
        ("yaml-octal", 1, "vmid"),
        ("yaml-octal", 2, "port"),
    ]
    assert "01010 would be read as the octal number 520" in diags[0].message
    assert "drop the zero (1010)" in diags[0].message
    assert data == {"vmid": 1010, "port": -17}


@pytest.mark.parametrize("value", ["0", "'01010'", '"0755"', "0x1f", "09", "1010", "0.5"])
def test_other_numbers_are_left_alone(value: str) -> None:
    _, diags = read(f"value: {value}\n")
    assert diags == []


def test_a_leading_zero_key_is_reported_too() -> None:
    data, diags = read("ranges:\n  010: {first: 100}\n")
    assert [d.code for d in diags] == ["yaml-octal"]
    assert data == {"ranges": {"10": {"first": 100}}}


def test_a_leading_zero_vmid_does_not_cascade_into_other_errors() -> None:
    guest = (
        "guests:\n  mc-hub:\n    role: game\n    vmid: 01010\n    host: pve-runtime\n"
        "    profile: game-vanilla\n    network:\n"
        "      - {name: eth0, bridge: vmbr0, ip: 10.20.0.30/24, gw: 10.20.0.1, tag: 20}\n"
    )
    result, _ = load_with({"zz-more.yaml": guest})
    assert [d.code for d in result.diagnostics] == ["yaml-octal"]
    assert result.spec is None


# --- YAML syntax --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: [1, 2\n", "expected ',' or ']', but got '<stream end>' (the list opened at line 1)"),
        ("a:\n  b: {x: 1\n", "expected ',' or '}', but got '<stream end>' (the mapping opened at"),
        ("a: 'abc\n", "found unexpected end of stream (the quoted string opened at line 1)"),
    ],
    ids=["list", "mapping", "quoted-string"],
)
def test_a_syntax_error_names_where_the_open_thing_started(text: str, message: str) -> None:
    _, diags = read(text)
    [d] = diags
    assert d.code == "yaml-syntax"
    assert message in d.message, d.message
