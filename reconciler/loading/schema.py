"""The JSON Schema of one spec file, generated from the models the loader validates with.

Called by `reconciler schema` (which prints it or writes the committed copy,
reconciler/data/platform.schema.json) and by the tests that keep that copy fresh. Editors (the
YAML language server) check a spec file against it as it is typed, so it describes what the
loader *accepts*, not what it makes of it:

- pydantic's validation-mode schema of `PlatformSpec`, where every before-validator says what it
  takes (`json_schema_input_type` or `WithJsonSchema` in reconciler.model.spec): `memory: 4G`,
  `dport: 25565`, `host: pve1` as well as `host: [a, b]`. A before-validator that does not say
  stops the generation (`InputSchema`), so the schema cannot quietly describe less than the
  loader takes; and a default is shown as it would be written (`size: 8G`, not 8192 MiB).
- one file, not the platform: the loader merges the files of a directory map by map
  (`sources.merge_into`), so every section is optional and a section that may be spread over
  files (`platform`, `proxmox`, a Traefik instance, `velocity`, `firewall`, a backup job,
  `policies`) may be partial: nothing in it is required. A named entry (a guest, a host, a
  route, a Velocity server...: `sources._ENTRIES`) is written whole in one file, so its required
  fields stay required; lists are never merged, so their items are whole too.
- a guest with a `profile` gets the profile's maps merged in key by key
  (`loader.resolve_profiles`), so in such a guest a volume may leave out what its profile sets.

Whatever else the loader checks (a role that is not defined, a range that ends before it starts,
a template an LXC guest lacks) needs the whole platform or the code, not a schema.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel
from pydantic.errors import PydanticInvalidForJsonSchema
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

# The loader's own table of what is written whole in one file, not a copy that could drift.
from reconciler.loading.sources import PathT, _entry_kind
from reconciler.model.spec import PROFILE_FIELDS, PlatformSpec

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
TITLE = "reconciler platform spec (one file of a spec directory)"
DESCRIPTION = (
    "One YAML file of a spec directory. The loader merges every file of the directory map by "
    "map, so each section is optional here and a section spread over files may be partial; a "
    "guest, host, layer, range, profile, route, Velocity server, firewall alias, IP set or "
    "security group is written whole in one file. Generated from the loader's models by "
    "`reconciler schema` (reconciler/loading/schema.py)."
)
# Definitions made for a place in a file: a section that may be partial, a guest with a profile.
PARTIAL_SUFFIX = "Part"
WITHOUT_PROFILE = "GuestSpecWithoutProfile"

_Schema = dict[str, Any]


class InputSchema(GenerateJsonSchema):
    """pydantic's generator, held to describing input: a validator that changes what a field
    accepts must say what that is, and a model given as a default is shown as written (`{}`)."""

    def function_before_schema(
        self, schema: core_schema.BeforeValidatorFunctionSchema
    ) -> JsonSchemaValue:
        self._require_input_schema(schema)
        return super().function_before_schema(schema)

    def function_wrap_schema(
        self, schema: core_schema.WrapValidatorFunctionSchema
    ) -> JsonSchemaValue:
        self._require_input_schema(schema)
        return super().function_wrap_schema(schema)

    def function_plain_schema(
        self, schema: core_schema.PlainValidatorFunctionSchema
    ) -> JsonSchemaValue:
        self._require_input_schema(schema)
        return super().function_plain_schema(schema)

    def _require_input_schema(
        self,
        schema: core_schema.BeforeValidatorFunctionSchema
        | core_schema.WrapValidatorFunctionSchema
        | core_schema.PlainValidatorFunctionSchema,
    ) -> None:
        if self.mode == "validation" and schema.get("json_schema_input_schema") is None:
            function = schema["function"]["function"]
            name = getattr(function, "__qualname__", repr(function))
            raise PydanticInvalidForJsonSchema(
                f"the validator {name} may take other input than the type it returns: say what "
                "with BeforeValidator(..., json_schema_input_type=...) or WithJsonSchema"
            )

    def default_schema(self, schema: core_schema.WithDefaultSchema) -> JsonSchemaValue:
        json_schema = super().default_schema(schema)
        # Left out means unset (a profile's `memory`), but `null` written there is refused.
        if (
            "default" in json_schema
            and json_schema["default"] is None
            and not _takes_null(json_schema)
        ):
            del json_schema["default"]
        return json_schema

    def get_default_value(self, schema: core_schema.WithDefaultSchema) -> Any:
        default = super().get_default_value(schema)
        if isinstance(default, BaseModel):
            # `disk: Disk()` dumped would read `size: 8192`, which a file means as GiB. The
            # same value written in a file is the empty map; anything else needs a thought.
            if default != type(default).model_validate({}):
                raise PydanticInvalidForJsonSchema(
                    f"the default {default!r} is not what an empty map gives: show it as written"
                )
            return {}
        return default


def _takes_null(schema: JsonSchemaValue) -> bool:
    kind = schema.get("type")
    if kind == "null" or (isinstance(kind, list) and "null" in kind):
        return True
    return any(_takes_null(choice) for key in ("anyOf", "oneOf") for choice in schema.get(key, ()))


def schema_document() -> dict[str, Any]:
    """The JSON Schema of one spec file (see the module docstring)."""
    platform = PlatformSpec.model_json_schema(mode="validation", schema_generator=InputSchema)
    defs: dict[str, _Schema] = platform.pop("$defs")
    files = _FileSchema(defs)
    root = files.partial(platform, ())
    if "GuestSpec" in defs:
        defs["GuestSpec"] = files.guest(defs["GuestSpec"])
    return {
        "$schema": SCHEMA_DIALECT,
        "title": TITLE,
        "description": DESCRIPTION,
        **{k: v for k, v in root.items() if k not in ("title", "description")},
        "$defs": dict(sorted({**defs, **files.made}.items())),
    }


def schema_text() -> str:
    """`schema_document()` as the committed file holds it."""
    return json.dumps(schema_document(), indent=2) + "\n"


class _FileSchema:
    """Partial variants of the definitions, by where in a file a schema stands."""

    def __init__(self, defs: dict[str, _Schema]) -> None:
        self.defs = defs
        self.made: dict[str, _Schema] = {}
        self._making: set[str] = set()

    def partial(self, node: _Schema, path: PathT) -> _Schema:
        """`node` standing at `path` of a file that may hold only part of it: no field is
        required, down to the named entries (whole) and the items of lists (whole)."""
        if "$ref" in node:
            name = node["$ref"].rpartition("/")[2]
            made = self._partial_def(name, path)
            return node if made is None else {**node, "$ref": f"#/$defs/{made}"}
        out = {k: v for k, v in node.items() if k not in ("required", "discriminator")}
        if "properties" in node:
            out["properties"] = {
                key: self._inside(value, (*path, key)) for key, value in node["properties"].items()
            }
        if isinstance(node.get("additionalProperties"), dict):
            out["additionalProperties"] = self._inside(node["additionalProperties"], (*path, "*"))
        if "patternProperties" in node:  # a map whose keys are names (`LabelMap`)
            out["patternProperties"] = {
                key: self._inside(value, (*path, "*"))
                for key, value in node["patternProperties"].items()
            }
        for key in ("anyOf", "oneOf"):
            if key in node:
                out[key] = [self.partial(choice, path) for choice in node[key]]
        if "oneOf" in out:
            # A partial mapping may fit more than one choice until the other files are read.
            out["anyOf"] = out.pop("oneOf")
        return out

    def guest(self, guest: _Schema) -> _Schema:
        """A guest's schema: the maps it may inherit (`PROFILE_FIELDS`) partial, for a guest
        with a `profile` gets the profile's keys merged into them; without one, whole."""
        relaxed = dict(guest)
        relaxed["properties"] = {
            key: self.partial(value, ("guests", "*", key)) if key in PROFILE_FIELDS else value
            for key, value in guest["properties"].items()
        }
        if relaxed == guest:
            return guest
        self.made[WITHOUT_PROFILE] = guest
        return {
            **relaxed,
            "if": {"required": ["profile"]},
            "else": {"$ref": f"#/$defs/{WITHOUT_PROFILE}"},
        }

    def _inside(self, node: _Schema, path: PathT) -> _Schema:
        return node if _entry_kind(path) is not None else self.partial(node, path)

    def _partial_def(self, name: str, path: PathT) -> str | None:
        """The name of the partial variant of definition `name` (made on first use), or None
        when that would be the definition itself."""
        if name in self._making:
            raise ValueError(f"{name} contains itself (at {_shown(path)}): not supported")
        self._making.add(name)
        try:
            made = self.partial(self.defs[name], path)
        finally:
            self._making.discard(name)
        if made == self.defs[name]:
            return None
        part = name + PARTIAL_SUFFIX
        if self.made.setdefault(part, made) != made:
            # The same section partial in two ways, by where it stands: name them by place.
            raise ValueError(f"{name} would need two partial variants (one at {_shown(path)})")
        return part


def _shown(path: PathT) -> str:
    return ".".join(str(p) for p in path) or "(root)"
