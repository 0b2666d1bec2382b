"""The JSON Schema editors check spec files with (issue 17) says what the loader says.

Checked with a real validator (jsonschema, draft 2020-12) on files read the way the loader reads
them (`read_text`): every file of specs/ is valid; a broken case of tests/corpus/ fails the
schema unless its mistake needs the YAML reader or the whole platform to see (both sets are
listed, so a change shows); snippets laid over the example platform are valid to the schema
exactly when `load_texts` accepts them; the committed file is the generated one; every default
in it, read back by the models, is the default the loader uses.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Union, get_args, get_origin

import jsonschema
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, BeforeValidator, TypeAdapter
from pydantic.errors import PydanticInvalidForJsonSchema

from reconciler.loading.loader import load_texts
from reconciler.loading.schema import InputSchema, schema_document, schema_text
from reconciler.loading.sources import read_text
from reconciler.model.diagnostics import Diagnostic
from reconciler.model.spec import PlatformSpec, ProfileSpec
from reconciler.model.units import SIZE_PATTERN, parse_mib
from tests.conftest import ROOT, SPECS

COMMITTED = ROOT / "reconciler" / "data" / "platform.schema.json"
CORPUS = ROOT / "tests" / "corpus"
CASES = sorted(p for p in CORPUS.iterdir() if p.is_dir())

# Mistakes the YAML reader reports (syntax, a key twice, a leading zero): no schema sees them.
YAML_CASES = {
    "01-yaml-unclosed-bracket",
    "02-yaml-tab-indent",
    "03-yaml-duplicate-key",
    "53-vmid-with-leading-zero",
    "54-yaml-list-never-closed",
}
# Mistakes in files whose shape is right: a reference, a duplicate, a policy, a rule between
# fields, a literal secret in free text, a value only code checks (a host name, a calendar
# event, a mount path, an address). The loader's checks catch them; the schema cannot.
LOADER_ONLY_CASES = {
    "08-unknown-role",
    "09-unknown-host",
    "10-unknown-profile",
    "11-profile-extends-cycle",
    "113-backup-schedule-not-an-event",
    "114-backup-selects-an-unknown-role",
    "115-backup-job-id-taken",
    "116-backup-description-forges-the-mark",
    "12-depends-on-missing-guest",
    "13-depends-on-cycle",
    "14-duplicate-vmid",
    "15-duplicate-hostname",
    "16-guest-defined-in-two-files",
    "17-duplicate-static-ip",
    "18-route-to-missing-guest",
    "19-two-routes-same-host",
    "20-hostsni-without-tls",
    "21-bad-route-hostname",
    "23-velocity-server-missing-guest",
    "24-duplicate-forced-host",
    "26-token-in-description",
    "27-password-in-redis-url",
    "28-rule-missing-alias",
    "29-rule-missing-security-group",
    "30-capacity-exceeded",
    "31-lxc-without-template",
    "32-range-ends-before-start",
    "34-agent-port-open-to-any-source",
    "35-agent-port-open-to-the-world",
    "36-runtime-guest-on-core-host",
    "37-velocity-on-core-host",
    "38-core-traefik-routes-to-game-server",
    "39-control-guest-depends-on-runtime",
    "40-vmid-outside-its-range",
    "41-overlapping-ranges",
    "42-control-guest-accepts-runtime-network",
    "44-ip-without-prefix-length",
    "48-unused-profile-extends-missing",
    "49-unused-profiles-extend-each-other",
    "56-velocity-server-both-declared-and-unmanaged",
    "70-volume-key-of-the-other-kind",
    "71-mount-path-not-absolute",
    "80-description-forges-the-mark",
    "81-profile-description-quotes-a-mark",
    "82-firewall-comment-carries-the-mark",
    "83-rule-comment-carries-the-mark",
    "94-route-host-wildcard-or-injected",
    "95-tcp-sni-wildcard-or-injected",
}


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(COMMITTED.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def read_as_loader(text: str, name: str) -> tuple[dict[str, Any] | None, list[Diagnostic]]:
    diags: list[Diagnostic] = []
    source = read_text(text, name, diags)
    return (source.data if source is not None else None), diags


def schema_errors(validator: jsonschema.Draft202012Validator, data: Any) -> list[str]:
    return [
        f"{'.'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message[:200]}"
        for e in validator.iter_errors(data)
    ]


# --- the committed file ----------------------------------------------------------------------


def test_committed_schema_is_the_generated_one(capsys: pytest.CaptureFixture[str]) -> None:
    assert COMMITTED.read_text(encoding="utf-8") == schema_text(), (
        "regenerate with: reconciler schema --out reconciler/data/platform.schema.json"
    )
    from reconciler.cli.main import main  # the CLI sits above loading: only this test needs it

    assert main(["schema"]) == 0
    assert capsys.readouterr().out == schema_text()


def test_one_file_needs_no_section_and_sections_may_be_partial(
    validator: jsonschema.Draft202012Validator,
) -> None:
    doc = schema_document()
    assert "required" not in doc and doc["additionalProperties"] is False
    for partial in (
        {},
        {"platform": {"prune": True}},
        {"proxmox": {"verify_tls": False}},
        {"velocity": {"bridge": {"port": 8082}}},
        {"traefik": {"runtime": {"feed": {"root_key": "traefik-runtime"}}}},
        {"backups": {"nightly": {"retention": {"keep_last": 3}}}},
        {"policies": {"agent_port": {"port": 18889}}},
    ):
        assert schema_errors(validator, partial) == [], partial
    # A named entry is whole in its file; a typo is an error wherever it is.
    for broken in (
        {"velocity": {"servers": {"hub": {"port": 25565}}}},
        {"hosts": {"pve1": {"layers": ["runtime"]}}},
        {"traefik": {"runtime": {"routes": {"x": {"target": {"guest": "g", "port": 80}}}}}},
        {"platform": {"nmae": "zpack"}},
        {"velocity": {"bridge": {"secret": "hunter2"}}},
    ):
        assert schema_errors(validator, broken), broken


# --- specs/ and the corpus ---------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(SPECS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_file_of_specs_validates(
    path: Path, validator: jsonschema.Draft202012Validator
) -> None:
    data, diags = read_as_loader(path.read_text(encoding="utf-8"), path.name)
    assert data is not None and not diags, diags
    assert schema_errors(validator, data) == []


def case_verdict(case_dir: Path, validator: jsonschema.Draft202012Validator) -> str:
    """'yaml' when the YAML reader objects to a file of the case, 'schema' when the schema
    rejects one, else 'loader'."""
    errors = []
    for path in sorted(case_dir.glob("*.yaml")):
        if path.name == "expect.yaml":
            continue
        data, diags = read_as_loader(path.read_text(encoding="utf-8"), path.name)
        if data is None or diags:
            return "yaml"
        errors += schema_errors(validator, data)
    return "schema" if errors else "loader"


@pytest.mark.parametrize("case_dir", CASES, ids=lambda p: p.name)
def test_a_broken_case_fails_the_schema_unless_only_the_loader_can_tell(
    case_dir: Path, validator: jsonschema.Draft202012Validator
) -> None:
    expected = (
        "yaml"
        if case_dir.name in YAML_CASES
        else "loader"
        if case_dir.name in LOADER_ONLY_CASES
        else "schema"
    )
    mistake = yaml.safe_load((case_dir / "expect.yaml").read_text(encoding="utf-8"))["mistake"]
    assert case_verdict(case_dir, validator) == expected, f"{case_dir.name}: {mistake}"


def test_the_case_lists_name_cases_that_exist() -> None:
    names = {c.name for c in CASES}
    assert names >= YAML_CASES | LOADER_ONLY_CASES
    assert not YAML_CASES & LOADER_ONLY_CASES


# --- the schema and the loader agree -------------------------------------------------------------

# Each laid over the example platform as specs/extra.yaml: (id, text, whether the loader takes it).
SNIPPETS = [
    (
        # The issue's examples: sizes with units, a port as a number, a single host, and
        # sections (a Traefik instance, velocity) spread over files.
        "issue-17-examples",
        """
hosts:
  pve1:
    layers: runtime
    capacity: {cores: 8, memory: 32G}
guests:
  mc-extra:
    role: game
    vmid: 1050
    host: pve1
    profile: game-vanilla
    memory: 4G
    disk: {size: 16G}
    network:
      - {name: eth0, bridge: vmbr0, ip: 10.20.0.50/24, gw: 10.20.0.1, tag: 20}
    firewall:
      rules:
        - {type: group, action: agent}
        - {type: in, action: ACCEPT, proto: tcp, dport: 25565, comment: players}
traefik:
  runtime:
    routes:
      map-extra:
        host: map.extra.play.zpack.dev
        entrypoints: websecure
        tls: {certresolver: letsencrypt}
        target: {guest: mc-extra, port: 8100}
velocity:
  unmanaged: legacy-hub
  servers:
    extra: {guest: mc-extra, port: 25565, forced_host: extra.play.zpack.dev}
""",
        True,
    ),
    (
        "sizes-in-other-spellings",
        """
guests:
  mc-extra:
    role: game
    host: pve-runtime
    profile: game-vanilla
    memory: 4096
    swap: 1GiB
    disk: {size: 1.5}
""",
        True,
    ),
    (
        "memory-in-words",
        "guests: {mc-extra: {role: game, host: pve-runtime, profile: base, memory: 4 gigs}}",
        False,
    ),
    (
        "disk-size-not-a-size",
        "guests: {mc-extra: {role: game, host: pve-runtime, profile: base, disk: {size: big}}}",
        False,
    ),
    (
        "port-as-text",
        """
guests:
  mc-extra:
    role: game
    host: pve-runtime
    profile: game-vanilla
    firewall:
      rules: [{type: in, action: ACCEPT, proto: tcp, dport: "25565:25575"}]
""",
        True,
    ),
    (
        "port-true",
        """
guests:
  mc-extra:
    role: game
    host: pve-runtime
    profile: game-vanilla
    firewall:
      rules: [{type: in, action: ACCEPT, proto: tcp, dport: true}]
""",
        False,
    ),
    (
        # With a profile, a volume the profile has may change one field: they merge.
        "volume-merged-with-the-profile",
        """
guests:
  mc-extra:
    role: game
    host: pve-runtime
    profile: game-vanilla
    volumes:
      mp0: {backup: false}
""",
        True,
    ),
    (
        "volume-without-size-and-no-profile",
        """
guests:
  mc-extra:
    role: game
    host: pve-runtime
    template: local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst
    volumes:
      mp0: {path: /srv/world}
""",
        False,
    ),
    (
        "guest-without-role",
        "guests: {mc-extra: {host: pve-runtime, profile: game-vanilla}}",
        False,
    ),
    (
        "route-without-type-is-http",
        """
traefik:
  runtime:
    routes:
      map-extra:
        host: [a.play.zpack.dev, b.play.zpack.dev]
        target: {guest: mc-lobby, port: 8100}
""",
        True,
    ),
    (
        "tcp-route-with-host",
        """
traefik:
  runtime:
    routes:
      console-extra:
        type: tcp
        host: console.play.zpack.dev
        tls: {passthrough: true}
        target: {guest: mc-lobby, port: 8100}
""",
        False,
    ),
    ("backup-job-split-over-files", "backups: {game-worlds: {enabled: false}}", True),
    (
        "server-port-out-of-range",
        "velocity: {servers: {extra: {guest: mc-lobby, port: 70000}}}",
        False,
    ),
]


def example_texts() -> dict[str, str]:
    return {f"specs/{p.name}": p.read_text(encoding="utf-8") for p in sorted(SPECS.glob("*.yaml"))}


@pytest.mark.parametrize(("text", "loads"), [pytest.param(t, ok, id=i) for i, t, ok in SNIPPETS])
def test_the_schema_takes_a_file_exactly_when_the_loader_does(
    text: str, loads: bool, validator: jsonschema.Draft202012Validator
) -> None:
    result = load_texts({**example_texts(), "specs/extra.yaml": text})
    shown = [str(d) for d in result.diagnostics]
    assert result.ok is loads, shown
    data, diags = read_as_loader(text, "extra.yaml")
    assert data is not None and not diags
    errors = schema_errors(validator, data)
    assert (not errors) is loads, errors or f"the schema takes it; the loader says {shown}"


def test_the_example_platform_spreads_velocity_over_files(
    validator: jsonschema.Draft202012Validator,
) -> None:
    parts = {}
    for path in sorted(SPECS.glob("*.yaml")):
        data, _ = read_as_loader(path.read_text(encoding="utf-8"), path.name)
        assert data is not None
        if "velocity" in data:
            parts[path.name] = data["velocity"]
            assert schema_errors(validator, {"velocity": data["velocity"]}) == []
    assert len(parts) >= 2, f"velocity is no longer split over files: {sorted(parts)}"
    assert not any({"guest", "servers"} <= set(part) for part in parts.values())


# --- defaults and patterns ------------------------------------------------------------------------


def models_from(model: type[BaseModel]) -> dict[str, type[BaseModel]]:
    found: dict[str, type[BaseModel]] = {}

    def visit(annotation: Any) -> None:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if annotation.__name__ not in found:
                found[annotation.__name__] = annotation
                for info in annotation.model_fields.values():
                    visit(info.annotation)
                    for meta in info.metadata:
                        visit(meta)
            return
        if get_origin(annotation) in (Union, UnionType, Annotated) or get_args(annotation):
            for arg in get_args(annotation):
                visit(arg)
        for meta in getattr(annotation, "__metadata__", ()):
            visit(meta)

    visit(model)
    return found


def test_every_default_reads_back_as_the_loaders_default() -> None:
    doc = schema_document()
    checked = 0
    for name, model in {**models_from(PlatformSpec), "ProfileSpec": ProfileSpec}.items():
        definition = doc if model is PlatformSpec else doc["$defs"][name]
        for field, prop in definition["properties"].items():
            if "default" not in prop:
                continue
            info = model.model_fields[field]
            annotation = info.annotation
            if info.metadata:
                annotation = Annotated[(annotation, *info.metadata)]
            read = TypeAdapter(annotation).validate_python(prop["default"])
            assert read == info.get_default(call_default_factory=True), f"{name}.{field}"
            checked += 1
    assert checked > 50
    assert doc["$defs"]["Disk"]["properties"]["size"]["default"] == "8G"


@given(st.text(alphabet=" \t0123456789.KMGTkmgtIiBbx-", max_size=12))
def test_the_size_pattern_is_the_spelling_parse_mib_reads(text: str) -> None:
    try:
        parse_mib(text)
        spelled = True
    except ValueError as exc:
        spelled = "is not a size" not in str(exc)
    assert (re.search(SIZE_PATTERN, text) is not None) is spelled


def test_a_validator_that_does_not_say_what_it_takes_stops_the_generation() -> None:
    class Loose(BaseModel):
        size: Annotated[int, BeforeValidator(parse_mib)]

    with pytest.raises(PydanticInvalidForJsonSchema, match="parse_mib"):
        Loose.model_json_schema(mode="validation", schema_generator=InputSchema)

    class Said(BaseModel):
        size: Annotated[int, BeforeValidator(parse_mib, json_schema_input_type=int | str)]

    schema = Said.model_json_schema(mode="validation", schema_generator=InputSchema)
    assert schema["properties"]["size"]["anyOf"] == [{"type": "integer"}, {"type": "string"}]
