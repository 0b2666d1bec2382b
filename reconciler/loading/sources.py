"""Read YAML while remembering where every key and value came from.

PyYAML's composer gives nodes with start marks; we build plain Python values from them and keep
two maps, path -> position of the key and path -> position of the value. A path is the tuple of
keys and list indexes from the document root, the same shape pydantic uses in its error `loc`.
Files of one directory merge into one document; a value defined in two places is an error that
names both. Sections merge across files, but a named entry (a guest, a host, a route...) is
written whole in one file, so reading one file shows all of that entry.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from reconciler.model.diagnostics import Diagnostic, Position, error

PathT = tuple[str | int, ...]


@dataclass
class Source:
    """A merged YAML document and where each of its parts was written."""

    data: dict[str, Any] = field(default_factory=dict)
    keys: dict[PathT, Position] = field(default_factory=dict)
    values: dict[PathT, Position] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)

    def where(self, path: Iterable[str | int], *, key: bool = True) -> Position | None:
        """The closest known position of `path`: its key (or value), else its nearest parent."""
        p = tuple(path)
        while True:
            found = (
                (self.keys.get(p) or self.values.get(p))
                if key
                else (self.values.get(p) or self.keys.get(p))
            )
            if found or not p:
                return found
            p = p[:-1]


class _Builder:
    def __init__(self, name: str, source: Source, diags: list[Diagnostic]) -> None:
        self.name = name
        self.source = source
        self.diags = diags
        self.constructor = SafeConstructor()

    def pos(self, node: Node) -> Position:
        return Position(self.name, node.start_mark.line + 1, node.start_mark.column + 1)

    def scalar(self, node: ScalarNode, path: PathT) -> Any:
        value = self.constructor.construct_object(node, deep=True)
        if node.tag == _INT_TAG and node.style is None and _OCTAL.match(node.value):
            # YAML 1.1 reads 01010 as octal (520): nobody writing a vmid or a port means that.
            # Carry on with the decimal the person meant, so nothing else trips over 520.
            text = node.value
            digits = text.replace("_", "").lstrip("+-")
            meant = int(digits, 10) * (-1 if text.startswith("-") else 1)
            self.diags.append(
                error(
                    "yaml-octal",
                    f"{text} would be read as the octal number {value} because of its leading "
                    f'zero: drop the zero ({meant}), or quote it ("{text}") if it is text',
                    position=self.pos(node),
                    path=_dotted(path),
                )
            )
            return meant
        return value

    def build(self, node: Node, path: PathT) -> Any:
        self.source.values.setdefault(path, self.pos(node))
        if isinstance(node, MappingNode):
            self.constructor.flatten_mapping(node)  # YAML merge keys (<<: *anchor)
            out: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = (
                    self.scalar(key_node, path)
                    if isinstance(key_node, ScalarNode)
                    else self.constructor.construct_object(key_node, deep=True)
                )
                if not isinstance(key, (str, int)) or isinstance(key, bool):
                    self.diags.append(
                        error(
                            "yaml-key",
                            f"a key must be a name, not {key!r}",
                            position=self.pos(key_node),
                        )
                    )
                    continue
                key = str(key)
                if key in out:
                    first = self.source.keys.get((*path, key))
                    self.diags.append(
                        error(
                            "duplicate-key",
                            f"key {key!r} appears twice in this mapping"
                            + (f" (first at line {first.line})" if first else ""),
                            position=self.pos(key_node),
                            path=_dotted((*path, key)),
                        )
                    )
                    continue
                self.source.keys[(*path, key)] = self.pos(key_node)
                out[key] = self.build(value_node, (*path, key))
            return out
        if isinstance(node, SequenceNode):
            return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
        assert isinstance(node, ScalarNode)
        return self.scalar(node, path)


_INT_TAG = "tag:yaml.org,2002:int"
_OCTAL = re.compile(r"^[-+]?0[0-7_]+$")  # PyYAML's YAML 1.1 octal integer


def read_file(path: Path, name: str, diags: list[Diagnostic]) -> Source | None:
    """One file -> Source (all its documents merged), or None with diagnostics."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        diags.append(error("read-error", f"cannot read file: {exc}", position=Position(name)))
        return None
    return read_text(text, name, diags)


def read_text(text: str, name: str, diags: list[Diagnostic]) -> Source | None:
    source = Source(files=[name])
    try:
        documents = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        pos = Position(name, mark.line + 1, mark.column + 1) if mark else Position(name)
        problem = exc.problem or exc.context or "invalid YAML"
        context = f" ({_describe_context(exc)})" if exc.context and exc.problem else ""
        diags.append(error("yaml-syntax", f"invalid YAML: {problem}{context}", position=pos))
        return None
    except yaml.YAMLError as exc:
        diags.append(error("yaml-syntax", f"invalid YAML: {exc}", position=Position(name)))
        return None
    for document in documents:
        if document is None:
            continue
        builder = _Builder(name, Source(files=[name]), diags)
        try:
            value = builder.build(document, ())
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            pos = Position(name, mark.line + 1, mark.column + 1) if mark else Position(name)
            diags.append(error("yaml-syntax", f"invalid YAML: {exc}", position=pos))
            return None
        if not isinstance(value, dict):
            diags.append(
                error(
                    "yaml-root",
                    "a spec file must be a mapping of sections (platform, hosts, guests, ...)",
                    position=builder.pos(document),
                )
            )
            return None
        builder.source.data = value
        merge_into(source, builder.source, diags)
    return source


# Where PyYAML says what it was in the middle of, name the thing and the line it started on:
# for an unclosed bracket that line is where the mistake is, not where PyYAML noticed it.
_CONTEXTS = {
    "while parsing a flow sequence": "the list opened at line {}",
    "while parsing a flow mapping": "the mapping opened at line {}",
    "while parsing a block mapping": "in the mapping that starts at line {}",
    "while parsing a block collection": "in the list that starts at line {}",
    "while scanning a quoted scalar": "the quoted string opened at line {}",
    "while scanning a simple key": "the key at line {}",
}


def _describe_context(exc: yaml.MarkedYAMLError) -> str:
    context = exc.context or ""
    if exc.context_mark is None:
        return context
    line = exc.context_mark.line + 1
    template = _CONTEXTS.get(context)
    return template.format(line) if template else f"{context} at line {line}"


# Named entries of the map sections: each is written whole in one file. (The sections around
# them, such as a Traefik instance, velocity or firewall, may be spread over files.)
_ENTRIES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("guests", "*"), "guest"),
    (("hosts", "*"), "host"),
    (("layers", "*"), "layer"),
    (("ranges", "*"), "range"),
    (("profiles", "*"), "profile"),
    (("traefik", "*", "routes", "*"), "Traefik route"),
    (("velocity", "servers", "*"), "Velocity server"),
    (("firewall", "aliases", "*"), "firewall alias"),
    (("firewall", "ipsets", "*"), "IP set"),
    (("firewall", "groups", "*"), "security group"),
)


def _entry_kind(path: PathT) -> tuple[str, str] | None:
    """(kind, name) when `path` is a named entry, such as ("guest", "mc-lobby")."""
    for pattern, kind in _ENTRIES:
        if len(pattern) != len(path):
            continue
        pairs = list(zip(pattern, path, strict=True))
        if all(a in ("*", b) for a, b in pairs):
            return kind, "/".join(str(b) for a, b in pairs if a == "*")
    return None


def merge_into(target: Source, other: Source, diags: list[Diagnostic]) -> None:
    """Deep-merge `other` into `target`: maps merge by key; a value set twice is an error, and
    so is a named entry (see `_ENTRIES`) written in two places, however its fields split."""
    target.files.extend(f for f in other.files if f not in target.files)

    def walk(dst: dict[str, Any], src: dict[str, Any], path: PathT) -> None:
        for key, value in src.items():
            p = (*path, key)
            entry = _entry_kind(p)
            if key not in dst:
                dst[key] = value
                _copy_positions(other, target, p)
            elif entry is not None:
                first = target.keys.get(p)
                second = other.keys.get(p)
                kind, name = entry
                where = ""
                if first is not None:
                    where = f": first at {first.file}:{first.line}"
                twice = (
                    "twice"
                    if first is not None and second is not None and first.file == second.file
                    else "in two files"
                )
                diags.append(
                    error(
                        "duplicate-definition",
                        f"{kind} {name!r} is defined {twice}{where}",
                        position=second,
                        path=_dotted(p),
                        related=(first,) if first else (),
                    )
                )
            elif isinstance(dst[key], dict) and isinstance(value, dict):
                walk(dst[key], value, p)
            else:
                first = target.keys.get(p)
                diags.append(
                    error(
                        "duplicate-definition",
                        f"{_dotted(p)} is defined twice" + (f"; first at {first}" if first else ""),
                        position=other.keys.get(p),
                        path=_dotted(p),
                        related=(first,) if first else (),
                    )
                )

    walk(target.data, other.data, ())


def _copy_positions(src: Source, dst: Source, prefix: PathT) -> None:
    n = len(prefix)
    for table_src, table_dst in ((src.keys, dst.keys), (src.values, dst.values)):
        for p, pos in table_src.items():
            if p[:n] == prefix:
                table_dst[p] = pos


def _dotted(path: Iterable[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


dotted = _dotted
