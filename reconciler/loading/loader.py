"""Load a spec directory into a checked `PlatformSpec`, collecting every problem with its place.

Called by the CLI (`validate`, `plan`) and the controller. The steps, in order:
read and merge every YAML file -> look for literal secrets -> resolve profiles into guests ->
validate with pydantic (errors mapped back to file:line) -> structural checks -> policies.
Nothing here touches the outside world except reading the files.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from reconciler.loading import checks, policies
from reconciler.loading.sources import PathT, Source, dotted, merge_into, read_file, read_text
from reconciler.model.diagnostics import Diagnostic, Position, error, has_errors, sorted_unique
from reconciler.model.spec import PROFILE_FIELDS, PlatformSpec, ProfileSpec

SPEC_SUFFIXES = (".yaml", ".yml")


@dataclass
class LoadResult:
    spec: PlatformSpec | None
    diagnostics: list[Diagnostic] = field(default_factory=list)
    source: Source = field(default_factory=Source)

    @property
    def ok(self) -> bool:
        return self.spec is not None and not has_errors(self.diagnostics)


def spec_files(directory: Path) -> list[Path]:
    return sorted(
        p
        for p in directory.rglob("*")
        if p.suffix in SPEC_SUFFIXES
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )


def load_directory(directory: Path | str, *, display: str | None = None) -> LoadResult:
    """Load every *.yaml / *.yml under `directory` (hidden folders skipped) as one platform."""
    directory = Path(directory)
    shown = display if display is not None else str(directory)
    if not directory.is_dir():
        d = error("no-specs", f"{shown} is not a directory", position=Position(shown))
        return LoadResult(None, [d])
    texts: dict[str, str] = {}
    diags: list[Diagnostic] = []
    for path in spec_files(directory):
        name = str(Path(shown) / path.relative_to(directory))
        try:
            texts[name] = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            diags.append(error("read-error", f"cannot read file: {exc}", position=Position(name)))
    if not texts and not diags:
        return LoadResult(None, [error("no-specs", f"no *.yaml files under {shown}")])
    result = load_texts(texts)
    result.diagnostics = sorted_unique([*diags, *result.diagnostics])
    return result


def load_texts(texts: dict[str, str]) -> LoadResult:
    """Load a platform from {display name: YAML text}; used for directories and git revisions."""
    diags: list[Diagnostic] = []
    source = Source()
    for name in sorted(texts):
        part = read_text(texts[name], name, diags)
        if part is not None:
            merge_into(source, part, diags)
    diags.extend(find_literal_secrets(source))
    if any(d.code.startswith("yaml-") for d in diags):
        # A file that does not parse would make everything it defines look missing: report the
        # syntax errors alone rather than a cascade of false "not defined" errors.
        return LoadResult(None, sorted_unique(diags), source)
    origins = resolve_profiles(source, diags)
    spec, dropped = validate(source, origins, diags)
    if spec is not None:
        found = [*checks.run_all(spec, source), *policies.run_all(spec, source)]
        # Entries left out because they are invalid are not "not defined": don't say so.
        diags.extend(d for d in found if not _about_dropped(d, dropped))
    diags = sorted_unique(diags)
    return LoadResult(spec if not has_errors(diags) else None, diags, source)


def _about_dropped(d: Diagnostic, dropped: set[str]) -> bool:
    return d.code == "unknown-reference" and any(
        f"{name!r} is not defined" in d.message for name in dropped
    )


def load_file(path: Path) -> LoadResult:
    diags: list[Diagnostic] = []
    part = read_file(path, str(path), diags)
    if part is None:
        return LoadResult(None, diags)
    return load_texts({str(path): path.read_text(encoding="utf-8")})


# --- secrets -------------------------------------------------------------------------------

_SECRET_PATTERNS = [
    (re.compile(r"PVEAPIToken\s*=", re.I), "a Proxmox API token"),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "a private key"),
    (
        re.compile(r"![\w.-]+=[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I),
        "a Proxmox API token",
    ),
    (re.compile(r"\b[a-z][a-z0-9+.-]*://[^/\s:@]*:[^/\s@]+@"), "a password inside a URL"),
    (
        re.compile(r"(?:^|[\s,;])(?:password|passwd|secret|token)\s*[=:]\s*\S{4,}", re.I),
        "a password or token",
    ),
    (re.compile(r"\bAKIA[0-9A-Z]{16}\b"), "an AWS access key"),
    (re.compile(r"\b(?:ghp|gho|ghs|glpat)[-_][A-Za-z0-9_]{16,}"), "an access token"),
]


def find_literal_secrets(source: Source) -> Iterator[Diagnostic]:
    """Flag any string value that looks like a secret. The message never repeats the value."""

    def walk(value: Any, path: PathT) -> Iterator[Diagnostic]:
        if isinstance(value, dict):
            for k, v in value.items():
                yield from walk(v, (*path, k))
        elif isinstance(value, list):
            for i, v in enumerate(value):
                yield from walk(v, (*path, i))
        elif isinstance(value, str):
            for pattern, what in _SECRET_PATTERNS:
                if pattern.search(value):
                    yield error(
                        "literal-secret",
                        f"this value looks like {what}; secrets never go in specs: "
                        "reference them with {env: VARIABLE} or {file: /path}",
                        position=source.where(path, key=False),
                        path=dotted(path),
                    )
                    break

    yield from walk(source.data, ())


# --- profiles ------------------------------------------------------------------------------

_UNION_FIELDS = {"tags"}


def resolve_profiles(source: Source, diags: list[Diagnostic]) -> dict[PathT, PathT]:
    """Fold each guest's profile chain into the guest, in place.

    Returns origins: guest field path -> the profile path it was inherited from, so an error in
    an inherited value is reported once, at the profile. Maps merge key by key, `tags` are the
    union (profile's first), anything else the guest sets wins.
    """
    profiles = source.data.get("profiles")
    guests = source.data.get("guests")
    origins: dict[PathT, PathT] = {}
    if not isinstance(guests, dict):
        return origins
    profiles = profiles if isinstance(profiles, dict) else {}

    def chain(name: str, at: PathT) -> list[str] | None:
        seen: list[str] = []
        current: str | None = name
        while current is not None:
            if current in seen:
                diags.append(
                    error(
                        "profile-cycle",
                        "profiles extend each other in a cycle: " + " -> ".join([*seen, current]),
                        position=source.where(("profiles", current, "extends")),
                        path=f"profiles.{current}.extends",
                    )
                )
                return None
            body = profiles.get(current)
            if not isinstance(body, dict):
                known = _suggest(current, profiles)
                diags.append(
                    error(
                        "unknown-reference",
                        f"profile {current!r} is not defined{known}",
                        position=source.where(at, key=False),
                        path=dotted(at),
                    )
                )
                return None
            seen.append(current)
            at = ("profiles", current, "extends")
            nxt = body.get("extends")
            current = nxt if isinstance(nxt, str) else None
        return seen

    for gname, guest in guests.items():
        if not isinstance(guest, dict) or not isinstance(guest.get("profile"), str):
            continue
        names = chain(guest["profile"], ("guests", gname, "profile"))
        if names is None:
            continue
        merged: dict[str, Any] = {}
        origin: dict[str, PathT] = {}
        for pname in reversed(names):  # base first, so nearer profiles win
            for key, value in profiles[pname].items():
                if key == "extends" or key not in PROFILE_FIELDS:
                    continue
                merged[key] = _merge_value(key, merged.get(key), value)
                origin[key] = ("profiles", pname, key)
        for key, (value, src) in {k: (v, origin[k]) for k, v in merged.items()}.items():
            gpath = ("guests", gname, key)
            if key in guest:
                guest[key] = _merge_value(key, value, guest[key])
                continue
            guest[key] = value
            origins[gpath] = src
            _alias_positions(source, src, gpath)
    return origins


def _merge_value(key: str, base: Any, top: Any) -> Any:
    if base is None:
        return top
    if key in _UNION_FIELDS and isinstance(base, list) and isinstance(top, list):
        return list(dict.fromkeys([*base, *top]))
    if isinstance(base, dict) and isinstance(top, dict):
        out = dict(base)
        for k, v in top.items():
            out[k] = _merge_value(k, base.get(k), v) if isinstance(v, dict) else v
        return out
    return top


def _alias_positions(source: Source, src: PathT, dst: PathT) -> None:
    n = len(src)
    for table in (source.keys, source.values):
        for p, pos in list(table.items()):
            if p[:n] == src:
                table.setdefault(dst + p[n:], pos)


# --- pydantic validation -----------------------------------------------------------------------


def _all_field_names(model: type[BaseModel], seen: set[type[BaseModel]] | None = None) -> set[str]:
    seen = seen if seen is not None else set()
    if model in seen:
        return set()
    seen.add(model)
    names = set(model.model_fields)
    for f in model.model_fields.values():
        for sub in _models_in(f.annotation):
            names |= _all_field_names(sub, seen)
    return names


def _models_in(annotation: Any) -> Iterator[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        yield from _models_in(arg)
    for meta in getattr(annotation, "__metadata__", ()) or ():
        yield from _models_in(meta)
    origin = getattr(annotation, "__origin__", None)
    if origin is not None and origin is not annotation:
        yield from _models_in(origin)


_KNOWN_FIELDS: set[str] | None = None


def _suggest(word: str, candidates: Any) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=1, cutoff=0.75)
    return f"; did you mean {close[0]!r}?" if close else ""


def _raw_path(data: Any, loc: tuple[Any, ...]) -> PathT:
    """pydantic's loc -> the path in our raw document (dropping union tags and the like)."""
    out: list[str | int] = []
    current = data
    for part in loc:
        if isinstance(current, dict) and part in current:
            out.append(part)
            current = current[part]
        elif isinstance(current, list) and isinstance(part, int) and 0 <= part < len(current):
            out.append(part)
            current = current[part]
        elif part is loc[-1] and isinstance(part, str) and isinstance(current, dict):
            # A missing or unknown field: keep it, it is the last step. Other strings that are
            # not keys are union tags or validator names and are dropped.
            out.append(part)
    return tuple(out)


# Sections that are maps of named entries: an invalid entry can be left out so the checks still
# run on the rest, and one run reports every mistake.
_MAP_SECTIONS = ("layers", "hosts", "ranges", "profiles", "guests", "traefik")


def validate(
    source: Source, origins: dict[PathT, PathT], diags: list[Diagnostic]
) -> tuple[PlatformSpec | None, set[str]]:
    global _KNOWN_FIELDS
    if _KNOWN_FIELDS is None:
        _KNOWN_FIELDS = _all_field_names(PlatformSpec) | set(ProfileSpec.model_fields)
    # Profiles are checked on their own, so a mistake in an unused profile shows too.
    for pname, body in (source.data.get("profiles") or {}).items():
        if isinstance(body, dict):
            try:
                ProfileSpec.model_validate(body)
            except ValidationError as exc:
                diags.extend(_map_errors(exc, source, origins, prefix=("profiles", pname)))
    data = source.data
    dropped: set[str] = set()
    for attempt in range(2):
        try:
            return PlatformSpec.model_validate(data), dropped
        except ValidationError as exc:
            if attempt == 0:
                diags.extend(_map_errors(exc, source, origins, prefix=()))
            bad = {(e["loc"][0], e["loc"][1]) for e in exc.errors() if len(e["loc"]) >= 2}
            if attempt or any(
                len(e["loc"]) < 2 or e["loc"][0] not in _MAP_SECTIONS for e in exc.errors()
            ):
                return None, dropped
            data = {
                section: (
                    {k: v for k, v in value.items() if (section, k) not in bad}
                    if isinstance(value, dict) and section in _MAP_SECTIONS
                    else value
                )
                for section, value in data.items()
            }
            dropped |= {str(key) for _, key in bad}
    return None, dropped


_SECRET_FIELDS = {"password", "token_secret", "secret"}


def _map_errors(
    exc: ValidationError, source: Source, origins: dict[PathT, PathT], prefix: PathT
) -> Iterator[Diagnostic]:
    assert _KNOWN_FIELDS is not None
    for err in exc.errors(include_url=False):
        loc = (*prefix, *err["loc"])
        path = _raw_path(source.data, loc)
        kind = err["type"]
        # An error inside an inherited value belongs to the profile that set it.
        for n in range(len(path), 0, -1):
            if path[:n] in origins:
                path = origins[path[:n]] + path[n:]
                break
        field_name = str(path[-1]) if path else "(root)"
        where_key = True
        if kind == "extra_forbidden":
            bad = str(loc[-1])
            code = "unknown-field"
            msg = f"unknown field {bad!r}{_suggest(bad, _KNOWN_FIELDS)}"
            path = (*path[:-1], bad) if path and path[-1] == bad else (*path, bad)
        elif kind == "missing":
            code = "missing-field"
            missing = str(loc[-1])
            msg = f"missing required field {missing!r}"
            path = path[:-1] if path and path[-1] == missing else path
        else:
            code = "invalid-value"
            where_key = False
            text = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
            if "literal secret" in text:
                code = "literal-secret"
            shown = err.get("input")
            secret = any(str(p) in _SECRET_FIELDS for p in path)
            if (
                not secret
                and code != "literal-secret"
                and isinstance(shown, (str, int, float))
                and kind not in ("value_error", "assertion_error")
            ):
                text = f"{text} (got {shown!r})"
            msg = f"{field_name}: {text}" if path else text
        yield error(code, msg, position=source.where(path, key=where_key), path=dotted(path))
