"""Read YAML while remembering where every key and value came from.

PyYAML's composer gives nodes with start marks; we build plain Python values from them and keep
two maps, path -> position of the key and path -> position of the value. A path is the tuple of
keys and list indexes from the document root, the same shape pydantic uses in its error `loc`.
Files of one directory merge into one document; a value defined in two places is an error that
names both. Sections merge across files, but a named entry (a guest, a host, a route...) is
written whole in one file, so reading one file shows all of that entry.

Spec files come from people we do not fully trust (a pull request, a commit the service
fetches), so reading one is bounded: `Limits` caps the bytes read, the nodes composed, the nodes
an alias may add (a 400-byte "billion laughs" would otherwise take every byte of memory), the
nesting depth and the length of an integer, and each excess is a `yaml-limit` diagnostic at its
file and line, never a traceback or an exhausted machine.
"""

from __future__ import annotations

import dataclasses
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.resolver import Resolver

try:  # libyaml's parser, when PyYAML was built with it (its wheels are)
    from yaml._yaml import CParser

    _LIBYAML = True
except ImportError:  # pragma: no cover
    _LIBYAML = False
from yaml.error import Mark
from yaml.events import AliasEvent, MappingStartEvent, SequenceStartEvent
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


def spec_error(
    source: Source,
    code: str,
    message: str,
    path: PathT,
    *,
    key: bool = False,
    related: PathT | None = None,
) -> Diagnostic:
    """An error at `path` of the spec (its value, or its key with `key`), naming where
    `related`, the other half of a clash, is written."""
    other = source.where(related) if related is not None else None
    return error(
        code,
        message,
        position=source.where(path, key=key),
        path=dotted(path),
        related=(other,) if other else (),
    )


def written_at(source: Source, path: PathT) -> str:
    """` (file:line)` of `path`, to name where the other half of a clash is written."""
    pos = source.where(path)
    if pos is None:
        return ""
    return f" ({pos.file}:{pos.line})" if pos.line else f" ({pos.file})"


# --- limits ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """How much one load (a whole spec directory) may ask of the loader.

    Far above what a real platform needs (the example: 10 files, 19 KB, ~1,600 nodes, nesting
    6 deep, one anchor), and low enough that the worst a hostile directory can do costs a
    second or two and tens of MiB. The budgeted composer counts every node in Python (the
    scanning is libyaml's where installed), so nodes and bytes are what bound the time.
    """

    files: int = 1000
    file_bytes: int = 1 << 20
    total_bytes: int = 4 << 20
    nodes: int = 50_000
    """Nodes composed (keys, values, list items), those an alias adds counted each time it is
    used: some 1,400 guests."""
    alias_nodes: int = 10_000
    """Nodes added through aliases (`*name`, `<<: *name`), over the whole load."""
    depth: int = 32
    """Nested mappings and lists."""
    number_chars: int = 32
    """Characters of one integer: Python refuses to read an integer of 4,300 digits, and no
    spec value comes near 32 (a vmid has at most 9)."""


LIMITS = Limits()


@dataclass
class Budget:
    """What one load has used of its `Limits`; shared by every file of the load."""

    limits: Limits = LIMITS
    files: int = 0
    bytes: int = 0
    nodes: int = 0
    alias_nodes: int = 0
    full: bool = False
    """A limit of the whole load was reached (files, bytes, nodes, aliases): no further file
    is read or parsed, since the load stops at that diagnostic anyway."""

    def admit(self, name: str, size: int, diags: list[Diagnostic]) -> bool:
        """Count a file of `size` bytes and say whether to read it; why not goes to `diags`."""
        lim = self.limits
        if self.full:
            return False
        if size > lim.file_bytes:
            diags.append(
                limit_error(
                    name,
                    f"this file is {_size(size)}; a spec file may be at most "
                    f"{_size(lim.file_bytes)}, so it is not read: split it into several files",
                )
            )
            return False
        self.files += 1
        self.bytes += size
        if self.files > lim.files:
            problem = f"more than {lim.files:,} spec files"
        elif self.bytes > lim.total_bytes:
            problem = f"the spec files come to more than {_size(lim.total_bytes)} with this one"
        else:
            return True
        self.full = True
        diags.append(limit_error(name, f"{problem}: this file and any after it are not read"))
        return False


def limit_error(name: str, message: str, mark: Mark | None = None) -> Diagnostic:
    line, column = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
    return error("yaml-limit", message, position=Position(name, line, column))


def _size(n: int) -> str:
    return f"{n:,} bytes" if n % (1 << 20) else f"{n >> 20} MiB"


class YamlLimitError(yaml.MarkedYAMLError):
    """A YAML stream asked more than its `Budget` allows; `problem` says what, for people."""

    def __init__(self, problem: str, mark: Any) -> None:  # a Mark (PyYAML's or libyaml's)
        super().__init__(problem=problem, problem_mark=mark)


class _Budgeted(Composer):
    """Composing within a `Budget`, over either of PyYAML's parsers (`_Composer`, `_CComposer`).

    PyYAML composes an alias as the very node it names, so a document is a graph: building it
    into values (`_Builder`) expands each alias again. Each node's expanded size is known once it
    is composed, so an alias is charged what it will expand to before anything is built; an
    alias used inside the node it names (which would expand forever) is refused.
    """

    budget: Budget
    depth: int
    sizes: dict[int, int]  # id(node) -> nodes it expands to, once composed
    anchors: dict[Any, Node]

    def _start(self, budget: Budget) -> None:
        self.budget = budget
        self.depth = 0
        self.sizes = {}

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        budget, lim = self.budget, self.budget.limits
        event = self.peek_event()
        if isinstance(event, AliasEvent):
            target = self.anchors.get(event.anchor)
            if target is not None:
                size = self.sizes.get(id(target))
                if size is None:
                    raise YamlLimitError(
                        f"the alias *{event.anchor} is used inside the node it names, "
                        "so it would never end",
                        event.start_mark,
                    )
                budget.alias_nodes += size
                budget.nodes += size
                if budget.alias_nodes > lim.alias_nodes:
                    budget.full = True
                    raise YamlLimitError(
                        f"aliases expand to more than {lim.alias_nodes:,} nodes "
                        f"(*{event.anchor} adds {size:,}): use a profile, or write it out",
                        event.start_mark,
                    )
                self._check_nodes(event.start_mark)
            return super().compose_node(parent, index)
        nested = isinstance(event, (MappingStartEvent, SequenceStartEvent))
        if nested:
            self.depth += 1
            if self.depth > lim.depth:
                raise YamlLimitError(
                    f"mappings and lists nested more than {lim.depth} deep", event.start_mark
                )
        budget.nodes += 1
        self._check_nodes(event.start_mark)
        node = super().compose_node(parent, index)
        assert node is not None
        if nested:
            self.depth -= 1
        if isinstance(node, ScalarNode):
            if node.style == "":
                node.style = None  # a plain scalar: libyaml says "", PyYAML None
            if node.tag == _INT_TAG and len(node.value) > lim.number_chars:
                raise YamlLimitError(
                    f"a number of {len(node.value):,} characters; numbers in a spec have at "
                    f"most {lim.number_chars}",
                    node.start_mark,
                )
            size = 1
        elif isinstance(node, SequenceNode):
            size = 1 + sum(self.sizes[id(item)] for item in node.value)
        else:
            size = 1 + sum(self.sizes[id(k)] + self.sizes[id(v)] for k, v in node.value)
        self.sizes[id(node)] = size
        return node

    def _check_nodes(self, mark: Any) -> None:
        if self.budget.nodes > self.budget.limits.nodes:
            self.budget.full = True
            raise YamlLimitError(
                f"the spec files hold more than {self.budget.limits.nodes:,} YAML nodes "
                "(keys, values and list items)",
                mark,
            )

    if TYPE_CHECKING:  # from the parser each class below adds (never defined here: listed
        # first, it would hide the parser's own)

        def peek_event(self) -> Any: ...

        def dispose(self) -> None: ...


class _Composer(_Budgeted, yaml.SafeLoader):
    """PyYAML's pure-Python safe loader, composing within a budget: its error messages are
    the ones a spec's author is shown."""

    def __init__(self, text: str, budget: Budget) -> None:
        yaml.SafeLoader.__init__(self, text)
        self._start(budget)


class _CComposer(_Budgeted, CParser, SafeConstructor, Resolver):
    """The same composer over libyaml's parser: the events, scanned and parsed in C, are
    composed by PyYAML's Python `Composer` (a base of `_Budgeted`, so before `CParser`: its
    `check_node` and `get_node` are the ones used, and every node passes `compose_node`). Five times
    faster on a large spec; where the text is not valid YAML, `compose_documents` parses it
    again with `_Composer` for PyYAML's messages."""

    def __init__(self, text: str, budget: Budget) -> None:
        CParser.__init__(self, text)
        Composer.__init__(self)
        SafeConstructor.__init__(self)
        Resolver.__init__(self)
        self._start(budget)


def _compose(loader: _Budgeted) -> list[Node]:
    try:
        documents = []
        while loader.check_node():
            node = loader.get_node()
            if node is not None:
                documents.append(node)
        return documents
    finally:
        loader.dispose()


def compose_documents(text: str, budget: Budget) -> list[Node]:
    """Every document of `text` as nodes, within `budget`. Raises yaml.YAMLError: for a text
    that is not valid YAML, or over the budget, the pure-Python parser's (the budget as it was
    before this text, so nothing is charged twice)."""
    if _LIBYAML:
        before = dataclasses.replace(budget)
        try:
            return _compose(_CComposer(text, budget))
        except yaml.YAMLError:
            for name in ("files", "bytes", "nodes", "alias_nodes", "full"):
                setattr(budget, name, getattr(before, name))
    return _compose(_Composer(text, budget))


class _Builder:
    def __init__(self, name: str, source: Source, diags: list[Diagnostic]) -> None:
        self.name = name
        self.source = source
        self.diags = diags
        self.constructor = SafeConstructor()

    def pos(self, node: Node) -> Position:
        return Position(self.name, node.start_mark.line + 1, node.start_mark.column + 1)

    def scalar(self, node: ScalarNode, path: PathT) -> Any:
        try:
            value = self.constructor.construct_object(node, deep=True)
        except (ValueError, OverflowError):
            # `!!int abc`, `2024-13-01`: the value is not shown, it may be a secret.
            kind = node.tag.rpartition(":")[2] or node.tag
            raise yaml.constructor.ConstructorError(
                problem=f"this value is not a valid {kind}", problem_mark=node.start_mark
            ) from None
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
                # A list or mapping as a key is never built (nor shown): it may be an alias
                # of any size.
                key = self.scalar(key_node, path) if isinstance(key_node, ScalarNode) else None
                if not isinstance(key, (str, int)) or isinstance(key, bool):
                    shown = (
                        repr(key)
                        if isinstance(key_node, ScalarNode)
                        else "a list"
                        if isinstance(key_node, SequenceNode)
                        else "a mapping"
                    )
                    self.diags.append(
                        error(
                            "yaml-key",
                            f"a key must be a name, not {clip(shown)}",
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


def clip(text: str, width: int = 60) -> str:
    return text if len(text) <= width else f"{text[: width - 3]}..."


# How a spec file is opened: never through a link, never blocking on a FIFO.
OPEN_SPEC_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)


def read_spec_file(path: Path, name: str, budget: Budget, diags: list[Diagnostic]) -> str | None:
    """The text of one spec file, or None with why not in `diags`.

    Never follows a link (the caller resolves and checks links first) and never blocks on a
    FIFO; the size is checked against `budget` before anything is read, and no more than the
    limit is ever read, even if the file grows meanwhile.
    """
    try:
        fd = os.open(path, OPEN_SPEC_FLAGS)
    except OSError as exc:
        diags.append(read_error(name, exc.strerror or str(exc)))
        return None
    with os.fdopen(fd, "rb") as f:
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                diags.append(read_error(name, "not a regular file"))
                return None
            if not budget.admit(name, info.st_size, diags):
                return None
            data = f.read(budget.limits.file_bytes + 1)
        except OSError as exc:
            diags.append(read_error(name, exc.strerror or str(exc)))
            return None
    if len(data) > budget.limits.file_bytes:  # it grew since fstat
        budget.admit(name, len(data), diags)
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        diags.append(read_error(name, f"not UTF-8 text ({exc.reason} at byte {exc.start})"))
        return None


def read_error(name: str, why: str) -> Diagnostic:
    return error("read-error", f"cannot read file: {why}", position=Position(name, 1, 1))


def read_text(
    text: str, name: str, diags: list[Diagnostic], budget: Budget | None = None
) -> Source | None:
    """One file's text -> Source (all its documents merged), or None with diagnostics.

    `budget` is shared by the files of one load; None gives this text one of its own. The text
    is counted against it (size, and the files of the load) before it is parsed."""
    budget = budget if budget is not None else Budget()
    limit = budget.limits.file_bytes
    # Bytes as on disk; a text far over the limit needs no encoding to know it.
    size = len(text) if len(text) > limit else len(text.encode("utf-8", "surrogatepass"))
    if not budget.admit(name, size, diags):
        return None
    source = Source(files=[name])
    try:
        documents = compose_documents(text, budget)
    except YamlLimitError as exc:
        diags.append(limit_error(name, exc.problem or "too large", exc.problem_mark))
        return None
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
            pos = Position(name, mark.line + 1, mark.column + 1) if mark else Position(name, 1, 1)
            problem = getattr(exc, "problem", None) or str(exc)
            diags.append(error("yaml-syntax", f"invalid YAML: {problem}", position=pos))
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
