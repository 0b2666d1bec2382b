"""Load a spec directory into a checked `PlatformSpec`, collecting every problem with its place.

Called by the CLI (`validate`, `plan`) and the controller. The steps, in order:
read and merge every YAML file -> look for literal secrets -> check guest names -> resolve
profiles into guests -> validate with pydantic (errors mapped back to file:line, suggestions
drawn from the keys valid at the error) -> structural checks -> policies.
Nothing here touches the outside world except reading the files.

The files may be hostile (CI validates pull requests; the service loads whatever was pushed):
nothing outside the directory is read, links included (`list_spec_files`); reading and parsing
stay within `Limits` (see `sources`); and no diagnostic repeats a secret written where it does
not belong, nor the userinfo of a URL (`redact`), since CI posts them and the service shows
them in /status and its log.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, TypeGuard, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from reconciler.loading import checks, policies
from reconciler.loading.sources import (
    LIMITS,
    Budget,
    Limits,
    PathT,
    Source,
    clip,
    dotted,
    merge_into,
    read_spec_file,
    read_text,
)
from reconciler.model.diagnostics import (
    Diagnostic,
    Position,
    Severity,
    error,
    has_errors,
    sorted_unique,
    warning,
)
from reconciler.model.spec import PROFILE_FIELDS, PlatformSpec, ProfileSpec
from reconciler.model.units import check_label

SPEC_SUFFIXES = (".yaml", ".yml")


@dataclass
class LoadResult:
    spec: PlatformSpec | None
    diagnostics: list[Diagnostic] = field(default_factory=list)
    source: Source = field(default_factory=Source)
    files: list[str] = field(default_factory=list)
    """Every spec file found, including those that could not be read or parsed."""

    @property
    def ok(self) -> bool:
        return self.spec is not None and not has_errors(self.diagnostics)


@dataclass(frozen=True)
class SpecFile:
    """A *.yaml / *.yml file found under a spec directory, and whether it may be read."""

    rel: str
    """Its path under the directory, with `/`: what diagnostics show after the directory."""
    path: Path
    """What to read: the file itself, or the file inside the directory a link leads to."""
    refused: Diagnostic | None = None
    """Why it is not read (shown under the name `rel` was given), or None."""
    link: str | None = None
    """Where it leads, as the link says, when it is a link."""

    def diagnostic(self, name: str) -> Diagnostic | None:
        if self.refused is None:
            return None
        return replace(self.refused, position=Position(name, 1, 1))


def list_spec_files(directory: Path) -> list[SpecFile]:
    """Every spec file under `directory`, hidden files and folders skipped, sorted.

    Nothing outside the directory is ever read: a link is resolved and must lead to a regular
    file inside it (a Kubernetes ConfigMap volume links each file into a hidden folder beside
    it), else it is refused, with the link named and nothing of its target. Links to folders
    are not followed. Special files (a FIFO named x.yaml) are skipped as before.
    """
    root = Path(os.path.realpath(directory))
    out: list[SpecFile] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for d in [d for d in dirnames if (here / d).is_symlink()]:
            dirnames.remove(d)  # os.walk would not enter it either; say so
            link = here / d
            out.append(
                SpecFile(
                    link.relative_to(root).as_posix(),
                    link,
                    link=_link_text(link),
                    refused=warning(
                        "link-not-followed",
                        f"a link to a folder ({clip(repr(_link_text(link)))}): links to "
                        "folders are not followed, so no spec file under it is read",
                    ),
                )
            )
        for fname in filenames:
            path = here / fname
            if fname.startswith(".") or path.suffix not in SPEC_SUFFIXES:
                continue
            rel = path.relative_to(root).as_posix()
            if not path.is_symlink():
                if path.is_file():
                    out.append(SpecFile(rel, path))
                continue
            target, text = Path(os.path.realpath(path)), _link_text(path)
            if not target.is_relative_to(root):
                why = outside_link(rel, text)
            elif not target.is_file():
                why = error("read-error", f"a link to {clip(repr(text))}, which is not a file")
            else:
                out.append(SpecFile(rel, target, link=text))
                continue
            out.append(SpecFile(rel, path, why, text))
    return sorted(out, key=lambda f: f.rel)


def _link_text(link: Path) -> str:
    try:
        return os.readlink(link)
    except OSError:
        return "?"


def outside_link(name: str, target: str) -> Diagnostic:
    """A spec file that is a link out of the spec directory: named, never read."""
    return error(
        "link-outside",
        f"a link to {clip(repr(target))}, outside the spec directory: files outside it are "
        "never read (copy the file in instead)",
        position=Position(name, 1, 1),
    )


def load_directory(
    directory: Path | str,
    *,
    display: str | None = None,
    limits: Limits = LIMITS,
    problems: Iterable[Diagnostic] = (),
) -> LoadResult:
    """Load every *.yaml / *.yml under `directory` (hidden folders skipped) as one platform.

    Files are read within `limits` (sizes are checked before reading) and never from outside
    the directory (see `list_spec_files`). `problems` are the caller's, found before (a link
    the git source would not check out)."""
    directory = Path(directory)
    shown = display if display is not None else str(directory)
    if not directory.is_dir():
        d = error("no-specs", f"{shown} is not a directory", position=Position(shown))
        return LoadResult(None, [d])
    texts: dict[str, str] = {}
    diags: list[Diagnostic] = list(problems)
    budget = Budget(limits)
    found = list_spec_files(directory)
    for spec_file in found:
        name = str(Path(shown) / spec_file.rel)
        refused = spec_file.diagnostic(name)
        if refused is not None:
            diags.append(refused)
            continue
        text = read_spec_file(spec_file.path, name, budget, diags)
        if text is not None:
            texts[name] = text
    if not texts and not diags:
        return LoadResult(None, [error("no-specs", f"no *.yaml files under {shown}")])
    result = load_texts(texts, problems=diags, limits=limits)
    result.files = [
        str(Path(shown) / f.rel)
        for f in found
        if f.refused is None or f.refused.code != "link-not-followed"
    ]
    return result


# Problems that make what a file defines look missing: reported alone, without the cascade of
# false "not defined" errors they would cause. (A leading-zero number is read as the decimal
# meant, so it cascades into nothing.)
def _stops_loading(d: Diagnostic) -> bool:
    return d.severity is Severity.ERROR and (
        (d.code.startswith("yaml-") and d.code != "yaml-octal")
        or d.code in ("read-error", "link-outside")
    )


def load_texts(
    texts: dict[str, str], *, problems: Iterable[Diagnostic] = (), limits: Limits = LIMITS
) -> LoadResult:
    """Load a platform from {display name: YAML text}; used for directories and git revisions.

    `problems` are those found before (files that could not be read); the texts are parsed
    within `limits`, all of them sharing one budget."""
    diags: list[Diagnostic] = list(problems)
    source = Source()
    budget = Budget(limits)
    # Past a limit of the directory (files, bytes) the load stops: parsing the rest is waste.
    parse = {} if any(d.code == "yaml-limit" for d in diags) else texts
    for name in sorted(parse):
        part = read_text(parse[name], name, diags, budget)
        if part is not None:
            merge_into(source, part, diags)
    diags.extend(find_literal_secrets(source))
    files = sorted(texts)
    if any(_stops_loading(d) for d in diags):
        # Past a limit nothing more is checked (see `sources`). A file that could not be read
        # or parsed does not hide the others' mistakes: they are checked alone (`check_alone`).
        if not any(d.code == "yaml-limit" for d in diags):
            diags.extend(check_alone(source))
        return LoadResult(None, redact(sorted_unique(diags), source), source, files)
    diags.extend(find_bad_names(source))
    origins = resolve_profiles(source, diags)
    spec, dropped = validate(source, origins, diags)
    if spec is not None:
        found = [*checks.run_all(spec, source), *policies.run_all(spec, source)]
        # Entries left out because they are invalid are not "not defined": don't say so.
        diags.extend(d for d in found if not _about_dropped(d, dropped))
    diags = redact(sorted_unique(diags), source)
    return LoadResult(spec if not has_errors(diags) else None, diags, source, files)


def check_alone(source: Source) -> list[Diagnostic]:
    """What the files that parsed get wrong on their own, while another file could not be read
    or parsed: bad guest names, unknown fields, values of the wrong type or out of range.

    What the broken file may define is unknown, so nothing that could be a cascade of its
    absence is said: no missing field, no undefined reference, no check of a whole entry (a
    profile or a file not seen may complete it), no structural check or policy. Those run once
    every file parses. (Literal secrets and duplicates are found before, as for any load.)"""
    found = list(find_bad_names(source))
    profiles = source.data.get("profiles")
    for pname, body in (profiles if isinstance(profiles, dict) else {}).items():
        if isinstance(body, dict):
            try:
                ProfileSpec.model_validate(body)
            except ValidationError as exc:
                found.extend(_map_errors(exc, source, {}, ("profiles", pname), alone=True))
    try:
        PlatformSpec.model_validate(source.data)
    except ValidationError as exc:
        found.extend(_map_errors(exc, source, {}, (), alone=True))
    return found


def _about_dropped(d: Diagnostic, dropped: set[str]) -> bool:
    return d.code == "unknown-reference" and any(
        f"{name!r} is not defined" in d.message for name in dropped
    )


def load_file(path: Path) -> LoadResult:
    diags: list[Diagnostic] = []
    text = read_spec_file(path, str(path), Budget(), diags)
    if text is None:
        return LoadResult(None, diags)
    return load_texts({str(path): text})


# --- secrets -------------------------------------------------------------------------------

_SECRET_PATTERNS = [
    (re.compile(r"PVEAPIToken\s*=", re.I), "a Proxmox API token"),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "a private key"),
    (
        re.compile(r"![\w.-]+=[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I),
        "a Proxmox API token",
    ),
    # A notification URL's userinfo may be a reference: `user:{env:SMTP_PASSWORD}@`, `{env:T}@`.
    (
        re.compile(
            r"\b[a-z][a-z0-9+.-]*://(?!\{(?:env|file):[^{}\s]*\}@)[^/\s:@]*:"
            r"(?!\{(?:env|file):[^{}\s]*\}@)[^/\s@]+@"
        ),
        "a password inside a URL",
    ),
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


# Fields that hold a secret reference ({env: NAME} or {file: PATH}): whatever else is written
# there may be the secret itself, so no message repeats it.
_SECRET_FIELDS = {"password", "token_secret", "secret"}
_REFERENCE_KEYS = {"env", "file"}
_MASK = "***"
# `scheme://userinfo@` and a bare `user:password@host`: the userinfo is masked, the rest kept.
_URL_USERINFO = re.compile(r"\b([a-z][a-z0-9+.-]*://)[^/\s@'\"]+@", re.I)
_BARE_USERINFO = re.compile(r"(?<![\w/.:@%+-])[^\s/:@'\"]+:[^\s/@'\"]+@(?=[\w\[])")


def redact(diags: Iterable[Diagnostic], source: Source) -> list[Diagnostic]:
    """`diags` with no secret in their messages or paths, however a message was built.

    Masks the userinfo of any URL, and every value written under a secret field that is not a
    reference (`{MySecret}` makes the secret a key; `{env: X, value: hunter2}` a value), so a
    malformed reference never reaches `validate`, a pull request comment, /status or a log."""
    values = sorted(_secret_values(source.data), key=len, reverse=True)

    def clean(text: str) -> str:
        for value in values:
            text = text.replace(value, _MASK)
        text = _URL_USERINFO.sub(rf"\1{_MASK}@", text)
        return _BARE_USERINFO.sub(f"{_MASK}@", text)

    out = []
    for d in diags:
        message, path = clean(d.message), clean(d.path)
        out.append(
            d if (message, path) == (d.message, d.path) else replace(d, message=message, path=path)
        )
    return out


def _secret_values(data: Any) -> set[str]:
    found: set[str] = set()

    def walk(value: Any, secret: bool) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                if secret and k in _REFERENCE_KEYS and isinstance(v, str):
                    continue  # a reference: the name of a variable or a file, not the secret
                if secret and v is None:
                    found.add(str(k))  # `{MySecret}`: the key is all there is
                walk(v, secret or str(k) in _SECRET_FIELDS)
        elif isinstance(value, list):
            for v in value:
                walk(v, secret)
        elif secret and value is not None and not isinstance(value, bool):
            found.add(str(value))
        elif isinstance(value, str) and "@" in value:
            for m in (*_URL_USERINFO.finditer(value), *_BARE_USERINFO.finditer(value)):
                userinfo = m.group(0).rstrip("@").rpartition("//")[2]
                found.add(userinfo)
                found.add(userinfo.partition(":")[2])

    walk(data, False)
    # Too short to mask without garbling every message (and a 2-letter secret is no secret).
    return {v for v in found if len(v) >= 3}


# --- names ---------------------------------------------------------------------------------


def find_bad_names(source: Source) -> Iterator[Diagnostic]:
    """A guest's key is its resource name and default hostname: it must be a DNS label, whatever
    `hostname:` says. Checked on the raw document so it shows beside every other mistake."""
    guests = source.data.get("guests")
    if not isinstance(guests, dict):
        return
    for name, body in guests.items():
        if not isinstance(body, dict):
            continue  # not a guest at all (say, a key dedented out of one): validation says so
        try:
            check_label(str(name))
        except ValueError as exc:
            yield error(
                "invalid-name",
                f"guest {exc}",
                position=source.where(("guests", name)),
                path=dotted(("guests", name)),
            )


# --- profiles ------------------------------------------------------------------------------

_UNION_FIELDS = {"tags"}

# One item of a union list and the path it was written at.
_Item = tuple[Any, PathT]


def resolve_profiles(source: Source, diags: list[Diagnostic]) -> dict[PathT, PathT]:
    """Fold each guest's profile chain into the guest, in place.

    Returns origins: guest field path -> the path it was inherited from, so an error in an
    inherited value is reported once, at the profile (and an item of a union list at the item
    the person wrote). Maps (`disk`, `features`, `firewall`, `volumes`) merge key by key, and a
    volume field by field; `tags` are the union (profile's first); anything else the guest sets
    wins. Every profile's chain is checked, used or not.
    """
    profiles = source.data.get("profiles")
    guests = source.data.get("guests")
    origins: dict[PathT, PathT] = {}
    profiles = profiles if isinstance(profiles, dict) else {}
    chains = _profile_chains(source, profiles, diags)
    if not isinstance(guests, dict):
        return origins
    under = _profile_entries(source)

    for gname, guest in guests.items():
        if not isinstance(guest, dict) or not isinstance(guest.get("profile"), str):
            continue
        at: PathT = ("guests", gname, "profile")
        pname = guest["profile"]
        if pname not in profiles:
            diags.append(
                error(
                    "unknown-reference",
                    f"profile {pname!r} is not defined{_suggest(pname, profiles)}",
                    position=source.where(at, key=False),
                    path=dotted(at),
                )
            )
            continue
        names = chains.get(pname)
        if names is None:
            continue  # a broken chain is reported once, at the profile
        merged: dict[str, Any] = {}
        origin: dict[str, PathT] = {}
        items: dict[str, list[_Item]] = {}
        for name in reversed(names):  # base first, so nearer profiles win
            for key, value in profiles[name].items():
                if key == "extends" or key not in PROFILE_FIELDS:
                    continue
                src: PathT = ("profiles", name, key)
                if key in _UNION_FIELDS and isinstance(value, list):
                    items[key] = _union(items.get(key, []), value, src)
                    merged[key] = [v for v, _ in items[key]]
                else:
                    items.pop(key, None)
                    merged[key] = _merge_value(key, merged.get(key), value)
                origin[key] = src
        for key, value in merged.items():
            gpath = ("guests", gname, key)
            if key in guest:
                if key in items and isinstance(guest[key], list):
                    items[key] = _union(items[key], guest[key], gpath)
                    guest[key] = [v for v, _ in items[key]]
                else:
                    items.pop(key, None)
                    if isinstance(value, dict) and isinstance(guest[key], dict):
                        _inherit_under(
                            source, origins, origin[key], gpath, value, guest[key], under
                        )
                    guest[key] = _merge_value(key, value, guest[key])
            else:
                guest[key] = value
                origins[gpath] = origin[key]
                _alias_positions(source, origin[key], gpath, under)
            for i, (_, item_src) in enumerate(items.get(key, ())):
                origins[(*gpath, i)] = item_src
    return origins


def _profile_chains(
    source: Source, profiles: dict[str, Any], diags: list[Diagnostic]
) -> dict[str, list[str] | None]:
    """Each profile's chain (itself, then what it extends, and so on), or None when the chain is
    broken. A cycle or an `extends` to a missing profile is reported once, at an `extends`."""
    chains: dict[str, list[str] | None] = {}
    for start in profiles:
        walked: list[str] = []
        current = start
        tail: list[str] | None = []
        while True:
            if current in chains:
                tail = chains[current]
                break
            if current in walked:
                cycle = walked[walked.index(current) :]
                first = min(cycle)
                i = cycle.index(first)
                ordered = [*cycle[i:], *cycle[:i], first]
                at: PathT = ("profiles", first, "extends")
                diags.append(
                    error(
                        "profile-cycle",
                        "profiles extend each other in a cycle: " + " -> ".join(ordered),
                        position=source.where(at),
                        path=dotted(at),
                    )
                )
                tail = None
                break
            body = profiles.get(current)
            if not isinstance(body, dict):
                if current in profiles:
                    chains[current] = None  # not a mapping: validation says so
                else:
                    at = ("profiles", walked[-1], "extends")
                    diags.append(
                        error(
                            "unknown-reference",
                            f"profile {current!r} is not defined{_suggest(current, profiles)}",
                            position=source.where(at, key=False),
                            path=dotted(at),
                        )
                    )
                tail = None
                break
            walked.append(current)
            nxt = body.get("extends")
            if not isinstance(nxt, str):
                break
            current = nxt
        for i, name in enumerate(walked):
            chains[name] = None if tail is None else [*walked[i:], *tail]
    return chains


def _union(base: list[_Item], top: list[Any], at: PathT) -> list[_Item]:
    """`base` then the items of `top` it lacks, each with where it was written."""
    out = list(base)
    seen = [v for v, _ in base]
    for i, value in enumerate(top):
        if value not in seen:
            out.append((value, (*at, i)))
            seen.append(value)
    return out


def _merge_value(key: str, base: Any, top: Any) -> Any:
    if base is None:
        return top
    if isinstance(base, dict) and isinstance(top, dict):
        out = dict(base)
        for k, v in top.items():
            out[k] = _merge_value(k, base.get(k), v) if isinstance(v, dict) else v
        return out
    return top


def _inherit_under(
    source: Source,
    origins: dict[PathT, PathT],
    src: PathT,
    dst: PathT,
    inherited: dict[str, Any],
    own: dict[str, Any],
    under: dict[PathT, list[tuple[int, PathT, Any]]],
) -> None:
    """In a map the guest and its profile both set (`volumes`, `disk`), the keys only the
    profile wrote keep the profile's positions and origin, so a problem in one is reported
    once, at the profile's line."""
    for k, v in inherited.items():
        if k not in own:
            origins[(*dst, k)] = (*src, k)
            _alias_positions(source, (*src, k), (*dst, k), under)
        elif isinstance(v, dict) and isinstance(own[k], dict):
            _inherit_under(source, origins, (*src, k), (*dst, k), v, own[k], under)


def _profile_entries(source: Source) -> dict[PathT, list[tuple[int, PathT, Any]]]:
    """Every key and value position under `profiles.<name>.<field>`, by that 3-part prefix:
    aliasing a profile field into a guest then reads only its own entries (scanning the whole
    table for each guest field was quadratic: 130 s to load 1000 guests)."""
    out: dict[PathT, list[tuple[int, PathT, Any]]] = {}
    for index, table in enumerate((source.keys, source.values)):
        for p, pos in table.items():
            if len(p) >= 3 and p[0] == "profiles":
                out.setdefault(p[:3], []).append((index, p, pos))
    return out


def _alias_positions(
    source: Source, src: PathT, dst: PathT, under: dict[PathT, list[tuple[int, PathT, Any]]]
) -> None:
    """The positions of a profile field (`src`, 3 parts), also under the guest that inherits it
    (`dst`), so a problem in an inherited value points at the profile's line."""
    tables = (source.keys, source.values)
    n = len(src)
    for index, p, pos in under.get(src[:3], ()):
        if p[:n] == src:
            tables[index].setdefault(dst + p[n:], pos)


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
    if _is_model(annotation):
        yield annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        yield from _models_in(arg)
    for meta in getattr(annotation, "__metadata__", ()) or ():
        yield from _models_in(meta)
    origin = getattr(annotation, "__origin__", None)
    if origin is not None and origin is not annotation:
        yield from _models_in(origin)


def _is_model(annotation: Any) -> TypeGuard[type[BaseModel]]:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


_KNOWN_FIELDS: set[str] | None = None


def _suggest(word: str, candidates: Any) -> str:
    names = [str(c) for c in candidates if str(c) != str(word)]
    close = difflib.get_close_matches(str(word), names, n=1, cutoff=0.75)
    return f"; did you mean {close[0]!r}?" if close else ""


def _model_at(
    annotation: Any, data: Any, loc: tuple[Any, ...], discriminator: str | None = None
) -> type[BaseModel] | None:
    """The model that validated the value at `loc` (a pydantic error loc, from `annotation`), or
    None when the annotations cannot be followed that far.

    Walks model fields, Mapping values and tuple items, unwrapping Annotated and Optional; a
    union of models is entered by the tag pydantic put in the loc, else by the tag in the data.
    """
    if get_origin(annotation) is Annotated:
        for meta in annotation.__metadata__:
            if isinstance(getattr(meta, "discriminator", None), str):
                discriminator = meta.discriminator
        return _model_at(annotation.__origin__, data, loc, discriminator)
    if get_origin(annotation) in (Union, UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]
        if len(members) == 1:
            return _model_at(members[0], data, loc, discriminator)
        models = [m for m in members if _is_model(m)]
        for model in models:
            tags = {model.__name__, *_tags_of(model, discriminator)}
            if loc and loc[0] in tags:
                return _model_at(model, data, loc[1:])
        if discriminator is not None and isinstance(data, dict):
            for model in models:
                if data.get(discriminator) in _tags_of(model, discriminator):
                    return _model_at(model, data, loc)
        return None
    if not loc:
        return annotation if _is_model(annotation) else None
    step, rest = loc[0], loc[1:]
    inner = data.get(step) if isinstance(data, dict) else None
    if _is_model(annotation):
        info = annotation.model_fields.get(str(step))
        if info is None:
            return None
        disc = info.discriminator if isinstance(info.discriminator, str) else None
        return _model_at(info.annotation, inner, rest, disc)
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Mapping, dict) and len(args) == 2:
        return _model_at(args[1], inner, rest)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        item = None
        if isinstance(data, list) and isinstance(step, int) and 0 <= step < len(data):
            item = data[step]
        return _model_at(args[0], item, rest)
    return None


def _tags_of(model: type[BaseModel], discriminator: str | None) -> tuple[Any, ...]:
    info = model.model_fields.get(discriminator or "")
    if info is None or get_origin(info.annotation) is not Literal:
        return ()
    return get_args(info.annotation)


def _fields_at(data: Any, loc: tuple[Any, ...]) -> set[str]:
    """The keys valid in the mapping at `loc`; every known field name if that cannot be told."""
    model = _model_at(PlatformSpec, data, loc)
    if model is not None:
        return set(model.model_fields)
    assert _KNOWN_FIELDS is not None
    return _KNOWN_FIELDS


def _raw_path(data: Any, loc: tuple[Any, ...], *, keep_last: bool = False) -> PathT:
    """pydantic's loc -> the path in our raw document, dropping the steps that are not in it
    (union tags, validator names). With `keep_last`, a last step that is not in the data stays:
    it is the field a missing- or unknown-field error is about."""
    out: list[str | int] = []
    current = data
    for i, part in enumerate(loc):
        if isinstance(current, dict) and part in current:
            out.append(part)
            current = current[part]
        elif isinstance(current, list) and isinstance(part, int) and 0 <= part < len(current):
            out.append(part)
            current = current[part]
        elif keep_last and i == len(loc) - 1 and isinstance(part, str):
            out.append(part)
    return tuple(out)


def _field_label(path: PathT) -> str:
    """The last named field and any list indexes after it: `network[0]`, `tags[3]`, `memory`."""
    indexes = ""
    for part in reversed(path):
        if isinstance(part, int):
            indexes = f"[{part}]{indexes}"
        else:
            return f"{part}{indexes}"
    return indexes or "(root)"


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
    profiles = source.data.get("profiles")
    for pname, body in (profiles if isinstance(profiles, dict) else {}).items():
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


def _map_errors(
    exc: ValidationError,
    source: Source,
    origins: dict[PathT, PathT],
    prefix: PathT,
    *,
    alone: bool = False,
) -> Iterator[Diagnostic]:
    """pydantic's errors as diagnostics at the file:line they are about. `alone` (for
    `check_alone`): only those a file can be wrong about by itself; a missing field, or a
    check of a whole entry (its validator was given the mapping), may be what another file
    would have given."""
    for err in exc.errors(include_url=False):
        loc = (*prefix, *err["loc"])
        kind = err["type"]
        if alone and (
            kind == "missing"
            or (kind in ("value_error", "assertion_error") and isinstance(err.get("input"), dict))
        ):
            continue
        path = _raw_path(source.data, loc, keep_last=kind in ("extra_forbidden", "missing"))
        # An error inside an inherited value belongs to the profile that set it.
        for n in range(len(path), 0, -1):
            if path[:n] in origins:
                path = origins[path[:n]] + path[n:]
                break
        where_key = True
        if kind == "extra_forbidden" and any(str(p) in _SECRET_FIELDS for p in loc[:-1]):
            # The key may be the secret itself (`token_secret: {MySecret}`): never named.
            msg = (
                "a secret reference is {env: VARIABLE} or {file: /path}; this one has another "
                "key, not shown in case it is the secret itself"
            )
            at = path
            path = path[:-1] if path and path[-1] == loc[-1] else path
            yield error("unknown-field", msg, position=source.where(at), path=dotted(path))
            continue
        if kind == "extra_forbidden":
            bad = str(loc[-1])
            code = "unknown-field"
            msg = (
                f"unknown field {clip(repr(bad))}{_suggest(bad, _fields_at(source.data, loc[:-1]))}"
            )
            path = (*path[:-1], bad) if path and path[-1] == bad else (*path, bad)
        elif kind == "missing":
            code = "missing-field"
            missing = str(loc[-1])
            msg = f"missing required field {missing!r}"
            path = path[:-1] if path and path[-1] == missing else path
        else:
            code = "invalid-value"
            # A bad map key (a volume key) is pointed at where the key is written.
            where_key = loc[-1] == "[key]"
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
                text = f"{text} (got {clip(repr(shown))})"
            msg = f"{_field_label(path)}: {text}" if path else text
        yield error(code, msg, position=source.where(path, key=where_key), path=dotted(path))
