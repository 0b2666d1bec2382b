"""Merge the entries of one spec directory into a platform's own, never overwriting what is
there. Called by `reconciler merge FROM DIR` (an `import --out` directory, reviewed and perhaps
adopted from, brought into the platform's specs) and by `reconciler import --into DIR` (the
estate rendered in DIR's frame by `writer.render_specs`, merged the same way).

Why: a guest adopted from `imported/` carries this platform's mark, so the platform's own
`specs/` plans it as an orphan until its entry is there too (the planner says so:
`adopted-elsewhere`). Merging is how it gets there, with the review done on `imported/` kept.

What is merged (a named entry is written whole in one file, so an entry DIR lacks is added
whole, in a new file; no file of DIR is ever edited):
- guests: added when DIR has no guest of that name and none with its vmid. A guest DIR has
  already is the same one when its settings, profiles folded in, mean the same: left as it is
  (a storage left out is the platform's `default_storage`, and a vmid DIR leaves out is the
  one the planner reads back from the mark, so the import of a guest DIR created itself
  matches it); otherwise, and for a vmid DIR gives another guest, it is a conflict: an error
  naming both files and lines, and nothing is written. With `keep`, `import --into`'s rule: DIR's
  definition of a guest it already manages stands (same vmid, or DIR gives none and the estate
  shows the guest owned under that name); the first apply converges it.
- what an added guest needs: its host is DIR's host of the same node, else the incoming one
  (added); its role is the incoming one when DIR's range of that name holds its vmid, else
  DIR's range that does, else the incoming range (added, with its layer); its profile chain is
  DIR's profile of that name when equal, else added, renamed `<name>-imported` when DIR has
  the name for something else (a note says so).
- templates: added when DIR lacks the file (its storage, content and name), whatever the entry's
  name; DIR's entry for the same file stands (it may have the url an import cannot know).
- firewall aliases, IP sets and groups, backup jobs, Velocity servers and `velocity.unmanaged`
  names (the whole `velocity` section when DIR has none), Traefik routes (a whole instance DIR
  lacks): added when DIR lacks them, left when equal, a conflict when they differ (with `keep`,
  DIR's stands and a note says so).
- never: `platform`, `proxmox`, `policies`, `firewall.cluster`, and a layer, host or range DIR
  has: DIR's stay.

Added entries go to new files, one per file they came from (`imported-game.yaml` for
`game.yaml`, `-2` and on when taken), under a header saying where from; a template placeholder
keeps its comment. The merged directory is loaded in memory first: when it does not validate
(a policy of DIR's an imported guest breaks, capacity), nothing is written and the
diagnostics say why. Pure: the CLI reads the directories and writes the files.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

from reconciler.importing.writer import TEMPLATE_NOTE
from reconciler.importing.yamltext import Commented, dump
from reconciler.loading.loader import list_spec_files, load_texts
from reconciler.loading.sources import (
    Budget,
    PathT,
    Source,
    merge_into,
    read_spec_file,
    read_text,
)
from reconciler.model.diagnostics import Diagnostic, Position, error, has_errors
from reconciler.model.spec import GuestSpec, PlatformSpec

CONFLICT = "merge-conflict"
PREFIX = "imported-"
# The order sections are written in, as the spec's own files have them.
_SECTIONS: tuple[str, ...] = (
    "layers",
    "hosts",
    "ranges",
    "profiles",
    "guests",
    "firewall",
    "backups",
    "templates",
    "velocity",
    "traefik",
)


@dataclass(frozen=True)
class SpecTree:
    """A platform's files: their texts, the document as written (profiles not folded in), with
    where each key is, and the checked spec."""

    texts: Mapping[str, str]  # display name -> text
    raw: Source
    spec: PlatformSpec

    def at(self, path: PathT) -> Position | None:
        return self.raw.keys.get(path) or self.raw.where(path)

    def entry(self, path: PathT) -> Any:
        value: Any = self.raw.data
        for key in path:
            value = value[key]
        return copy.deepcopy(value)

    def has(self, path: PathT) -> bool:
        value: Any = self.raw.data
        for key in path:
            if not isinstance(value, dict) or key not in value:
                return False
            value = value[key]
        return True


def read_directory(
    directory: Path, display: str | None = None
) -> tuple[dict[str, str], list[Diagnostic]]:
    """The spec files under `directory` as {display name: text}, read as `load_directory`
    reads them (inside the directory only, within the loader's limits)."""
    shown = display if display is not None else str(directory)
    texts: dict[str, str] = {}
    diags: list[Diagnostic] = []
    if not directory.is_dir():
        return texts, [error("no-specs", f"{shown} is not a directory", position=Position(shown))]
    budget = Budget()
    for found in list_spec_files(directory):
        name = str(Path(shown) / found.rel)
        refused = found.diagnostic(name)
        if refused is not None:
            diags.append(refused)
            continue
        text = read_spec_file(found.path, name, budget, diags)
        if text is not None:
            texts[name] = text
    return texts, diags


def read_tree(texts: Mapping[str, str]) -> tuple[SpecTree | None, list[Diagnostic]]:
    """The tree of `texts`, or None when they do not validate (with every diagnostic)."""
    loaded = load_texts(dict(texts))
    if not loaded.ok or loaded.spec is None:
        return None, loaded.diagnostics
    raw = Source()
    diags: list[Diagnostic] = []
    for name in sorted(texts):
        part = read_text(texts[name], name, diags)
        if part is not None:
            merge_into(raw, part, diags)
    return SpecTree(dict(texts), raw, loaded.spec), loaded.diagnostics


@dataclass
class Merged:
    files: dict[str, str] = field(default_factory=dict)  # new file name in DIR -> text
    added: list[str] = field(default_factory=list)  # "guest/mc-lobby", "profile/game", ...
    present: list[str] = field(default_factory=list)  # in DIR already: left as they are
    notes: list[str] = field(default_factory=list)
    diagnostics: list[Diagnostic] = field(default_factory=list)  # conflicts; the merged load's

    @property
    def ok(self) -> bool:
        return not has_errors(self.diagnostics)

    def count(self, kind: str) -> int:
        return sum(1 for a in self.added if a.split("/", 1)[0] == kind)


@dataclass
class _Merge:
    """One merge as it goes: what is added (path -> value, and the file it came from)."""

    target: SpecTree
    incoming: SpecTree
    keep: bool
    owned: frozenset[str]
    out: Merged = field(default_factory=Merged)
    adds: dict[PathT, tuple[Any, str]] = field(default_factory=dict)
    profiles: dict[str, str] = field(default_factory=dict)  # incoming name -> name in DIR

    def add(self, path: PathT, value: Any, what: str, origin: PathT | None = None) -> None:
        pos = self.incoming.at(origin or path)
        self.adds[path] = (value, pos.file if pos else "merged.yaml")
        self.out.added.append(what)

    def conflict(self, what: str, path: PathT, theirs: PathT, why: str = "") -> None:
        """An error at the incoming entry, naming DIR's (a related place)."""
        ours, mine = self.target.at(theirs), self.incoming.at(path)
        self.out.diagnostics.append(
            error(
                CONFLICT,
                f"{what} is defined in {_place(ours)} and, differently, in {_place(mine)}"
                + (f" ({why})" if why else "")
                + ": a merge never overwrites a definition. Make them agree, or rename or "
                "leave out one, then merge again",
                position=mine,
                related=(ours,) if ours else (),
            )
        )

    def differs(self, what: str, path: PathT, theirs: PathT) -> None:
        """Both have it, differently: a conflict, or DIR's stands (`keep`)."""
        if self.keep:
            self.out.present.append(what)
            self.out.notes.append(
                f"{what}: {_place(self.target.at(theirs))} defines it otherwise than the estate "
                "does; the spec's stands, and the first apply after adoption converges it"
            )
        else:
            self.conflict(what, path, theirs)


def merge_specs(
    target: SpecTree,
    incoming: SpecTree,
    target_dir: str,
    header: Sequence[str],
    *,
    keep: bool = False,
    owned: Iterable[str] = (),
    taken: Iterable[str] = (),
) -> Merged:
    """What merging `incoming` into `target` (read from `target_dir`) adds, as new files, with
    the merged directory loaded to check it. `keep` and `owned` (guest names the estate shows
    owned): `import --into`'s rule for what DIR already has. `taken`: file names DIR has."""
    m = _Merge(target, incoming, keep, frozenset(owned))
    if target.spec.platform.name != incoming.spec.platform.name:
        m.out.diagnostics.append(
            error(
                CONFLICT,
                f"the incoming specs are platform {incoming.spec.platform.name!r}, "
                f"{target_dir} is {target.spec.platform.name!r}: a guest adopted from them "
                f"carries the mark of {incoming.spec.platform.name!r}, which "
                f"{target.spec.platform.name!r} does not own. Import again with "
                f"`--dir {target_dir}` (its platform)",
                position=incoming.at(("platform", "name")),
                related=tuple(p for p in [target.at(("platform", "name"))] if p),
            )
        )
        return m.out
    for name in sorted(incoming.spec.guests):
        _merge_guest(m, name)
    _merge_named(m)
    _merge_templates(m)
    _merge_edge(m)
    if not m.out.ok:
        return m.out
    try:
        m.out.files = _files(m, header, taken)
    except ValueError as exc:  # a value the YAML writer cannot write back as it was read
        m.out.diagnostics.append(error("merge-write", f"cannot write the merged entries: {exc}"))
        return m.out
    merged = dict(target.texts)
    merged.update({str(Path(target_dir) / n): text for n, text in m.out.files.items()})
    m.out.diagnostics.extend(load_texts(merged).diagnostics)
    return m.out


# --- guests and what they need ------------------------------------------------------------------


def _merge_guest(m: _Merge, name: str) -> None:
    guest = m.incoming.spec.guests[name]
    path: PathT = ("guests", name)
    host = _host_for(m, guest.host)
    role = _role_for(m, name, guest.role, guest.vmid)
    if host is None or role is None:
        return  # a conflict, said
    mapped = guest.model_copy(update={"host": host[0], "role": role[0]})
    held = {g.vmid: n for n, g in m.target.spec.guests.items() if g.vmid is not None}
    ours = m.target.spec.guests.get(name)
    if ours is not None:
        if _settings(ours, m.target.spec) == _settings(
            mapped if ours.vmid is not None else mapped.model_copy(update={"vmid": None}),
            m.incoming.spec,
        ):
            m.out.present.append(f"guest/{name}")
        elif m.keep and (ours.vmid == guest.vmid or (ours.vmid is None and name in m.owned)):
            m.out.present.append(f"guest/{name}")
        else:
            m.conflict(f"guest {name!r}", path, path)
        return
    if guest.vmid is not None and guest.vmid in held:
        other = held[guest.vmid]
        m.conflict(
            f"vmid {guest.vmid}",
            path,
            ("guests", other),
            f"guest {other!r} there, guest {name!r} here",
        )
        return
    entry = m.incoming.entry(path)
    if host[1]:
        m.add(("hosts", host[0]), m.incoming.entry(("hosts", guest.host)), f"host/{host[0]}")
        _need_layers(m, m.incoming.spec.hosts[guest.host].layers)
    if role[1]:
        m.add(("ranges", role[0]), m.incoming.entry(("ranges", guest.role)), f"range/{role[0]}")
        _need_layers(m, [m.incoming.spec.ranges[guest.role].layer])
    if entry.get("host", guest.host) != host[0]:
        entry["host"] = host[0]
    if entry.get("role", guest.role) != role[0]:
        entry["role"] = role[0]
    if isinstance(entry.get("profile"), str):
        entry["profile"] = _profile_for(m, entry["profile"])
    m.add(path, entry, f"guest/{name}")


def _host_for(m: _Merge, host: str) -> tuple[str, bool] | None:
    """DIR's host for the incoming `host`: the one of its node; else the incoming one, to add
    (True). None (a conflict) when DIR has the key for another node."""
    node = m.incoming.spec.node_of(host)
    for key in sorted(m.target.spec.hosts):
        if m.target.spec.node_of(key) == node:
            return key, False
    if ("hosts", host) in m.adds:
        return host, False
    if host not in m.target.spec.hosts:
        return host, True
    m.conflict(
        f"host {host!r}",
        ("hosts", host),
        ("hosts", host),
        f"node {m.target.spec.node_of(host)} there, node {node} here",
    )
    return None


def _role_for(m: _Merge, guest: str, role: str, vmid: int | None) -> tuple[str, bool] | None:
    """DIR's range for the guest: the incoming role when DIR's range of that name holds its
    vmid, else DIR's range that does; else the incoming range, to add (True). None (a
    conflict) when DIR has that name for a range that does not hold it."""
    ranges = m.target.spec.ranges
    ours = ranges.get(role)
    if ours is not None and (vmid is None or ours.first <= vmid <= ours.last):
        return role, False
    if vmid is not None:
        for key, r in sorted(ranges.items()):
            if r.first <= vmid <= r.last:
                return key, False
    if ("ranges", role) in m.adds:
        return role, False
    if ours is None:
        return role, True
    m.conflict(
        f"range {role!r}",
        ("guests", guest, "role"),
        ("ranges", role),
        f"guest {guest!r} has vmid {vmid}, outside {ours.first}-{ours.last}, and no range "
        "there holds it",
    )
    return None


def _need_layers(m: _Merge, layers: Iterable[str]) -> None:
    """Add the incoming layers DIR lacks, and those they may depend on."""
    for layer in layers:
        if layer in m.target.spec.layers or ("layers", layer) in m.adds:
            continue
        spec = m.incoming.spec.layers.get(layer)
        if spec is None:
            continue  # not defined there either: the merged load says so
        m.add(("layers", layer), m.incoming.entry(("layers", layer)), f"layer/{layer}")
        _need_layers(m, spec.may_depend_on)


def _profile_for(m: _Merge, name: str) -> str:
    """The name an incoming profile has in DIR: its own when DIR has the same (its `extends`
    chain mapped first) or none of that name; else `<name>-imported` (added)."""
    done = m.profiles
    if name in done:
        return done[name]
    entry = m.incoming.entry(("profiles", name))
    if isinstance(entry.get("extends"), str):
        entry["extends"] = _profile_for(m, entry["extends"])
    theirs = m.target.raw.data.get("profiles", {})
    if name in theirs and theirs[name] == entry:
        done[name] = name
        m.out.present.append(f"profile/{name}")
        return name
    new = name
    n = 1
    while (
        new in theirs
        or ("profiles", new) in m.adds
        or (new != name and new in m.incoming.spec.profiles)
    ):
        n += 1
        new = f"{name}-imported" if n == 2 else f"{name}-imported-{n - 1}"
    if new != name:
        m.out.notes.append(
            f"profile {name!r}: {_place(m.target.at(('profiles', name)))} defines another one "
            f"of that name; the merged one is named {new!r}"
        )
    done[name] = new
    m.add(("profiles", new), entry, f"profile/{new}", origin=("profiles", name))
    return new


# --- firewall objects and backup jobs ----------------------------------------------------------


def _merge_named(m: _Merge) -> None:
    fw_in, fw_ours = m.incoming.spec.firewall, m.target.spec.firewall
    for section, kind, what, fold in (
        ("aliases", "alias", "firewall alias", True),
        ("ipsets", "ipset", "IP set", True),
        ("groups", "group", "security group", False),
    ):
        mine: Mapping[str, Any] = getattr(fw_in, section)
        theirs: Mapping[str, Any] = getattr(fw_ours, section)
        by_name = {(k.lower() if fold else k): k for k in theirs}
        for name, spec in sorted(mine.items()):
            path: PathT = ("firewall", section, name)
            other = by_name.get(name.lower() if fold else name)
            label = f"{what} {name!r}"
            if other is None:
                m.add(path, m.incoming.entry(path), f"firewall/{kind}/{name}")
            elif _dump(theirs[other]) == _dump(spec):
                m.out.present.append(f"firewall/{kind}/{name}")
            else:
                m.differs(label, path, ("firewall", section, other))
    ids = {(job.id or f"rc-{name}"): name for name, job in m.target.spec.backups.items()}
    for name, job in sorted(m.incoming.spec.backups.items()):
        path = ("backups", name)
        ours = m.target.spec.backups.get(name)
        ident = job.id or f"rc-{name}"
        if ours is not None:
            if _dump(ours) == _dump(job):
                m.out.present.append(f"backup/{name}")
            else:
                m.differs(f"backup job {name!r}", path, path)
        elif ident in ids:
            m.conflict(
                f"backup job id {ident!r}",
                path,
                ("backups", ids[ident]),
                f"job {ids[ident]!r} there, job {name!r} here",
            )
        else:
            m.add(path, m.incoming.entry(path), f"backup/{name}")


def _merge_templates(m: _Merge) -> None:
    """A template DIR declares already (the same file, whatever its name) stands as DIR has it:
    DIR's may well have the url an import cannot know. Another file under a name DIR uses is a
    conflict; anything else is added."""
    theirs = {t.volid: name for name, t in m.target.spec.templates.items()}
    for name, template in sorted(m.incoming.spec.templates.items()):
        path: PathT = ("templates", name)
        if template.volid in theirs:
            m.out.present.append(f"template/{name}")
        elif name in m.target.spec.templates:
            m.conflict(
                f"template {name!r}",
                path,
                path,
                f"{m.target.spec.templates[name].volid} there, {template.volid} here",
            )
        else:
            m.add(path, m.incoming.entry(path), f"template/{name}")


# --- the edge -----------------------------------------------------------------------------------


def _merge_edge(m: _Merge) -> None:
    mine, theirs = m.incoming.spec.velocity, m.target.spec.velocity
    if mine is not None and theirs is None:
        m.add(("velocity",), m.incoming.entry(("velocity",)), "velocity")
    elif mine is not None and theirs is not None:
        if (mine.guest, mine.bridge) != (theirs.guest, theirs.bridge):
            m.out.notes.append(
                f"velocity: {_place(m.target.at(('velocity',)))} has its own guest and bridge; "
                "they stand"
            )
        for name, server in sorted(mine.servers.items()):
            path: PathT = ("velocity", "servers", name)
            ours = theirs.servers.get(name)
            if ours is None:
                m.add(path, m.incoming.entry(path), f"velocity/{name}")
            elif _dump(ours) == _dump(server):
                m.out.present.append(f"velocity/{name}")
            else:
                m.differs(f"Velocity server {name!r}", path, path)
        new = [n for n in mine.unmanaged if n not in theirs.unmanaged]
        at: PathT = ("velocity", "unmanaged")
        if new and m.target.has(at):
            # A list is written in one place: it cannot be added to from another file.
            m.out.diagnostics.append(
                error(
                    CONFLICT,
                    f"velocity.unmanaged is written in {_place(m.target.at(at))} and the "
                    f"incoming specs leave {', '.join(new)} unmanaged too: add them "
                    "there by hand (a list is written in one place), then merge again",
                    position=m.incoming.at(("velocity", "unmanaged")),
                )
            )
        elif new:
            m.add(("velocity", "unmanaged"), new, "velocity/unmanaged")
    for instance, spec in sorted(m.incoming.spec.traefik.items()):
        ours_i = m.target.spec.traefik.get(instance)
        if ours_i is None:
            m.add(
                ("traefik", instance),
                m.incoming.entry(("traefik", instance)),
                f"traefik/{instance}",
            )
            continue
        for name, route in sorted(spec.routes.items()):
            path = ("traefik", instance, "routes", name)
            ours_r = ours_i.routes.get(name)
            if ours_r is None:
                m.add(path, m.incoming.entry(path), f"route/{instance}/{name}")
            elif _dump(ours_r) == _dump(route):
                m.out.present.append(f"route/{instance}/{name}")
            else:
                m.differs(f"Traefik route {instance}/{name}", path, path)


# --- the files ----------------------------------------------------------------------------------


def _files(m: _Merge, header: Sequence[str], taken: Iterable[str]) -> dict[str, str]:
    """The added entries, one new file per file they came from."""
    by_file: dict[str, dict[PathT, Any]] = {}
    for path, (value, origin) in m.adds.items():
        by_file.setdefault(origin, {})[path] = value
    used = {PurePath(n).name for n in m.target.texts} | set(taken)
    files: dict[str, str] = {}
    for origin in sorted(by_file):
        name = _free_name(PurePath(origin).stem, used)
        used.add(name)
        data: dict[str, Any] = {}
        for path, value in sorted(by_file[origin].items(), key=lambda kv: _order(kv[0])):
            _put(data, path, _commented(value))
        ordered = {k: data[k] for k in sorted(data, key=_section_rank)}
        files[name] = dump(ordered, [*header, f"Merged from {origin}."])
    return files


def _free_name(stem: str, used: set[str]) -> str:
    stem = stem.removeprefix(PREFIX)
    n = 1
    while True:
        name = f"{PREFIX}{stem}{'' if n == 1 else f'-{n}'}.yaml"
        if name not in used:
            return name
        n += 1


def _order(path: PathT) -> tuple[int, tuple[str, ...]]:
    return _section_rank(str(path[0])), tuple(str(p) for p in path[1:])


def _section_rank(section: str) -> int:
    return _SECTIONS.index(section) if section in _SECTIONS else len(_SECTIONS)


def _put(data: dict[str, Any], path: PathT, value: Any) -> None:
    here = data
    for key in path[:-1]:
        here = here.setdefault(str(key), {})
    here[str(path[-1])] = value


def _commented(value: Any) -> Any:
    """The import's template placeholder keeps its comment."""
    if isinstance(value, dict):
        return {
            k: Commented(v, TEMPLATE_NOTE)
            if k == "template" and isinstance(v, str) and v.startswith("unknown:")
            else _commented(v)
            for k, v in value.items()
        }
    return value


# --- helpers ------------------------------------------------------------------------------------


def _settings(guest: GuestSpec, spec: PlatformSpec) -> Any:
    """What a guest's settings mean, to compare two definitions: profiles folded in (the
    checked spec has them), a storage left out resolved to `spec`'s `default_storage`."""
    default = spec.platform.default_storage
    resolved = guest.model_copy(
        update={
            "disk": guest.disk.model_copy(update={"storage": guest.disk.storage or default}),
            "volumes": {
                key: vol.model_copy(update={"storage": vol.storage or default})
                for key, vol in guest.volumes.items()
            },
        }
    )
    return _dump(resolved, "profile")


def _dump(model: Any, *leave_out: str) -> Any:
    return model.model_dump(mode="json", exclude=set(leave_out))


def _place(pos: Position | None) -> str:
    if pos is None:
        return "the other specs"
    return f"{pos.file}:{pos.line}" if pos.line else pos.file
