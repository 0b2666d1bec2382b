"""Proxmox VE firewall: cluster options, aliases, IP sets, security groups, and each managed
guest's options and ordered rule list. Observe them and apply their changes.

Called by the CLI and the controller next to `ProxmoxProvider`, on the same API endpoint. It
composes that provider for every call (`retrying`: one thread hop, one count, one retry policy,
one error translation in `proxmox.classify`), so all Proxmox calls share one retry loop;
observation only reads (`_read`), and a read is retried on any server error.
`applying.observing.observe_all` observes guests first and hands the owned ones to `observe`: a
guest's firewall is read only for guests that carry our mark.

Ownership:
- cluster options are ours only when the spec declares `firewall.cluster` (`manage_cluster`);
  otherwise they are still observed, unowned (the live isolation check needs the switch), and
  never changed;
- an alias, IP set or security group is ours only when its comment ends with our mark
  `[reconciler:<platform>]`. The observed comment has the mark stripped, so it diffs against
  the spec's comment. Anything else is foreign: observed, never changed, never deleted. IP set
  entries and group rules are read for foreign ones too (one call each): the isolation check
  needs what a rule of ours that names one admits, and the planner compares a foreign one with
  the spec's before it calls it an adoption candidate;
- a managed guest's firewall options and its whole rule list are ours.

Rules, as Proxmox's firewall API treats them: POST inserts at position 0 and creates the rule
disabled unless `enable` is sent, so `enable` is always sent; an update PUTs the rule's fields
at its position with `delete=` for the fields that went away; `moveto` puts a rule in front of
the rule at that position, counted before the move. `rule_ops` is the pure edit script from an
observed list to the desired one; `apply_op` is Proxmox's semantics of one step, used to check
the list between steps and by the tests.

Digests: each options object and each list (a rule list, the alias list, the IP set and group
indexes, an IP set's entries) has one. `ObservedResource.version` holds those a resource was
read at as `name=digest` pairs, e.g. `options=3f.. rules=9a..`. Every mutation is sent with the
digest of what it was computed against. Before a step that names a position in a list this
change has already edited, the list is read back, compared with what we expect, and its new
digest used (a run of inserts at 0 needs no read). A list changed by someone else
ends the change with a ConflictError (the caller re-observes and re-plans); lists shared by
several changes of one apply (the aliases) are retried once against a fresh read, provided the
item itself is still as planned.

Errors are those of `proxmox.classify`; this module adds OwnershipError (no mark) and
ConflictError (a list changed under us, a name taken by someone else).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Literal

import anyio

from reconciler.model.errors import (
    ConflictError,
    NotFoundError,
    OwnershipError,
    PermanentError,
)
from reconciler.model.observed import ObservedResource
from reconciler.model.plans import START_GUEST, Action, Change
from reconciler.model.resources import Kind
from reconciler.model.units import ipset_entry
from reconciler.providers import Observation
from reconciler.providers.proxmox import ProxmoxProvider, claimed, read_mark

FIREWALL_KINDS = frozenset(
    {
        Kind.FIREWALL_CLUSTER,
        Kind.FIREWALL_ALIAS,
        Kind.FIREWALL_IPSET,
        Kind.FIREWALL_GROUP,
        Kind.FIREWALL_GUEST,
    }
)

# Proxmox's defaults when an option is not set (pve-firewall: policy_in || 'DROP', ...).
OPTION_DEFAULTS: Mapping[str, Any] = {"enable": 0, "policy_in": "DROP", "policy_out": "ACCEPT"}
RULE_FIELDS = (
    "type",
    "action",
    "enable",
    "source",
    "dest",
    "proto",
    "dport",
    "sport",
    "macro",
    "iface",
    "log",
    "comment",
    "icmp-type",
)
_REQUIRED = ("type", "action", "enable")


# --- the comment mark ----------------------------------------------------------------------

_MARK = re.compile(r"\s*\[reconciler:(?P<platform>[A-Za-z0-9_.-]+)\]\s*$")


def comment_mark(platform: str) -> str:
    return f"[reconciler:{platform}]"


def with_comment_mark(comment: str, platform: str) -> str:
    """The comment as sent: the spec's comment, then our mark."""
    return f"{comment.strip()} {comment_mark(platform)}".strip()


def read_comment_mark(comment: str | None) -> tuple[str | None, str]:
    """Comment -> (the platform it is marked for, or None; the comment without the mark)."""
    text = comment or ""
    m = _MARK.search(text)
    if not m:
        return None, text
    return m.group("platform"), text[: m.start()]


# --- versions: several digests in one string ------------------------------------------------


def join_version(**digests: str | None) -> str | None:
    parts = [f"{k}={v}" for k, v in sorted(digests.items()) if v]
    return " ".join(parts) or None


def split_version(version: str | None) -> dict[str, str]:
    return dict(p.split("=", 1) for p in (version or "").split() if "=" in p)


# --- rules: shape, edit script, Proxmox's semantics -----------------------------------------

Rule = dict[str, Any]


def clean_rule(raw: Mapping[str, Any]) -> Rule:
    """A rule as the API returns it -> our shape (planning.normalize.rule finishes the job; this
    is the same shape, so the list can be checked between two steps of an apply)."""
    out: Rule = {k: v for k, v in raw.items() if k in RULE_FIELDS and v is not None and v != ""}
    out["enable"] = int(out.get("enable", 0))
    if out.get("log") == "nolog":
        out.pop("log")
    for key in ("dport", "sport"):
        if key in out:
            out[key] = str(out[key])
    return out


def _key(rule: Mapping[str, Any]) -> str:
    return json.dumps(clean_rule(rule), sort_keys=True)


@dataclass(frozen=True)
class RuleOp:
    """One step of a rule list's edit script, with positions as they are when it is sent."""

    verb: Literal["post", "put", "move", "delete"]
    pos: int = 0  # put, move, delete: the rule's position now
    to: int = 0  # move: its position afterwards
    rule: Rule | None = None  # post, put: the rule to write
    delete: tuple[str, ...] = ()  # put: fields to remove

    def describe(self) -> str:
        match self.verb:
            case "post":
                return "insert a rule at 0"
            case "put":
                return f"rewrite rule {self.pos}"
            case "move":
                return f"move rule {self.pos} to {self.to}"
            case _:
                return f"delete rule {self.pos}"

    def params(self) -> dict[str, Any]:
        """The request body (the position goes in the path)."""
        if self.verb == "move":
            # Proxmox puts the rule in front of the one at `moveto`, counted before the move
            # (pve-firewall Rules.pm); moveto == pos is no move there, but an edit.
            assert self.to != self.pos
            return {"moveto": self.to if self.to < self.pos else self.to + 1}
        if self.verb == "delete":
            return {}
        assert self.rule is not None
        body = {k: self.rule[k] for k in RULE_FIELDS if k in self.rule}
        body["enable"] = int(self.rule.get("enable", 0))  # never left to Proxmox's default 0
        if self.delete:
            body["delete"] = ",".join(self.delete)
        return body


def apply_op(rules: Sequence[Rule], op: RuleOp) -> list[Rule]:
    """What Proxmox's rule list looks like after `op` (pve-firewall Rules.pm semantics)."""
    out = [dict(r) for r in rules]
    match op.verb:
        case "post":
            assert op.rule is not None
            out.insert(0, clean_rule(op.rule))
        case "put":
            assert op.rule is not None
            rule = {**out[op.pos], **clean_rule(op.rule)}
            for name in op.delete:
                rule.pop(name, None)
            out[op.pos] = clean_rule(rule)
        case "move":
            moveto = op.params()["moveto"]
            moving = out[op.pos]
            moved: list[Rule] = []
            for i, rule in enumerate(out):
                if i == op.pos:
                    continue
                if i == moveto:
                    moved.append(moving)
                moved.append(rule)
            if moveto >= len(out):
                moved.append(moving)
            out = moved
        case "delete":
            del out[op.pos]
    return out


def rule_ops(have: Sequence[Mapping[str, Any]], want: Sequence[Mapping[str, Any]]) -> list[RuleOp]:
    """An edit script turning the observed rule list into the desired one, position by position.

    1. Rules nobody wants are deleted, highest position first, as many as the list is too long.
    2. Into an empty list the rules are inserted last first (each insert lands at 0: no moves).
    3. Then for each desired position: keep a matching rule; else move the wanted rule up from
       further down; else rewrite the rule there, unless a later position still needs it; else
       insert the rule and move it into place.
    4. What is left beyond the desired length is deleted from the end.
    """
    cur = [clean_rule(r) for r in have]
    target = [clean_rule(r) for r in want]
    keys = [_key(r) for r in cur]
    wanted = [_key(r) for r in target]
    ops: list[RuleOp] = []

    def run(op: RuleOp) -> None:
        nonlocal cur, keys
        ops.append(op)
        cur = apply_op(cur, op)
        keys = [_key(r) for r in cur]

    need = Counter(wanted)
    surplus: list[int] = []
    for i, k in enumerate(keys):
        if need[k] > 0:
            need[k] -= 1
        else:
            surplus.append(i)
    extra = max(0, len(cur) - len(target))
    for i in sorted(surplus[len(surplus) - min(extra, len(surplus)) :], reverse=True):
        run(RuleOp("delete", pos=i))

    if not cur:
        for rule in reversed(target):
            run(RuleOp("post", rule=rule))
        return ops

    for i, (rule, k) in enumerate(zip(target, wanted, strict=True)):
        if i < len(cur) and keys[i] == k:
            continue
        later = next((j for j in range(i + 1, len(cur)) if keys[j] == k), None)
        slot = None
        if later == i + 1:
            slot = next((j for j in range(i + 1, len(target)) if wanted[j] == keys[i]), None)
        if slot is not None:
            # The rule here belongs further down and the wanted one is next: one move (of the
            # rule put on top by hand, say) instead of moving every other rule up past it.
            run(RuleOp("move", pos=i, to=min(slot, len(cur) - 1)))
            continue
        if later is not None:
            run(RuleOp("move", pos=later, to=i))
            continue
        if i < len(cur) and wanted[i + 1 :].count(keys[i]) <= keys[i + 1 :].count(keys[i]):
            gone = tuple(sorted(f for f in cur[i] if f not in rule and f not in _REQUIRED))
            run(RuleOp("put", pos=i, rule=rule, delete=gone))
            continue
        run(RuleOp("post", rule=rule))
        if i:
            run(RuleOp("move", pos=0, to=i))
    while len(cur) > len(target):
        run(RuleOp("delete", pos=len(cur) - 1))
    return ops


# --- the provider ----------------------------------------------------------------------------


def _options(raw: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: raw.get(k, default) for k, default in OPTION_DEFAULTS.items()}
    # The cluster keeps a time stamp above 1 for "enabled" on some versions: on is on.
    out["enable"] = int(bool(int(out["enable"] or 0)))
    return out


def ipset_entry_of(raw: Mapping[str, Any]) -> str:
    """An IP set entry as Proxmox lists it, in the spec's spelling (`!` for nomatch)."""
    return ("!" if raw.get("nomatch") else "") + str(raw["cidr"])


def _list_digest(raw: Sequence[Mapping[str, Any]]) -> str | None:
    """A list's digest: Proxmox repeats it in every item, so an empty list has none."""
    return raw[0].get("digest") if raw else None


@dataclass(frozen=True)
class _Listed:
    """What differs between an IP set and a security group. Both are a named item of a cluster
    index, with a comment, holding a list (entries, rules) that has its own digest; observing
    and applying them is written once, reading this."""

    noun: str  # in messages: "IP set"
    article: str  # "an"
    index: str  # the cluster firewall's endpoint for the index: ipset, groups
    read_index: str  # how a read of the index is described
    key: str  # the index field naming an item: name, group
    items: str  # its list, in the observed attributes and version: entries, rules
    read_items: Callable[[Sequence[Mapping[str, Any]]], list[Any]]  # the list as observed

    def endpoint(self, client: Any) -> Any:
        return getattr(client.cluster.firewall, self.index)


_LISTED: Mapping[Kind, _Listed] = {
    Kind.FIREWALL_IPSET: _Listed(
        "IP set",
        "an",
        "ipset",
        "read firewall IP sets",
        "name",
        "entries",
        lambda raw: sorted(ipset_entry_of(e) for e in raw),
    ),
    Kind.FIREWALL_GROUP: _Listed(
        "security group",
        "a",
        "groups",
        "read security groups",
        "group",
        "rules",
        lambda raw: [clean_rule(r) for r in raw],
    ),
}


@dataclass
class FirewallProvider:
    """The firewall on one Proxmox API endpoint, through `pve`'s client and retry policy."""

    pve: ProxmoxProvider
    manage_cluster: bool = False
    _locks: dict[str, anyio.Lock] = field(default_factory=dict)

    kinds = FIREWALL_KINDS
    needs = frozenset({Kind.GUEST})  # the owned guests' firewalls are read
    streams = frozenset({Kind.GUEST})  # a guest's firewall is read as soon as it is ours
    optional = False  # a guest's firewall unknown: nothing is planned for it or its guest

    @property
    def platform(self) -> str:
        return self.pve.platform

    @property
    def source(self) -> str:
        return self.pve.source

    @property
    def client(self) -> Any:
        return self.pve.client

    async def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        return await self.pve.retrying(what, fn)

    async def _read(self, what: str, resource: Any) -> Any:
        """A call that only reads: retried on any server error (see `proxmox.classify`)."""
        return await self.pve.get(what, resource)

    def _lock(self, name: str) -> anyio.Lock:
        if name not in self._locks:
            self._locks[name] = anyio.Lock()
        return self._locks[name]

    def _ours(self, comment: str | None) -> tuple[bool, str]:
        platform, rest = read_comment_mark(comment)
        return platform == self.platform, rest

    # --- observe -------------------------------------------------------------------------

    async def observe(self, seen: Observation | None = None) -> list[ObservedResource]:
        """The cluster-level objects and the firewall of each owned guest `seen` (observed
        through `pve` when not given). Every read runs concurrently, a guest's as soon as
        `seen` has it (the guests are still being read); the foreign IP sets and groups are
        read last, once the indexes have said which they are."""
        seen = seen if seen is not None else Observation(await self.pve.observe())
        out: list[ObservedResource] = []
        foreign: dict[Kind, dict[str, dict[str, Any]]] = {kind: {} for kind in _LISTED}
        async with self.pve.reading():
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._observe_cluster, out)
                tg.start_soon(self._observe_aliases, out)
                for kind in _LISTED:
                    tg.start_soon(self._observe_index, kind, tg, out, foreign[kind])
                async for res in seen.arrive(Kind.GUEST):
                    if res.owned and res.address:
                        tg.start_soon(self._observe_guest, res, out)
            # Every index read: the foreign ones are known.
            out.extend(await self._foreign(foreign))
        return sorted(out, key=lambda r: (r.kind.rank, r.address or "", json.dumps(r.id)))

    async def _observe_cluster(self, out: list[ObservedResource]) -> None:
        options = self.client.cluster.firewall.options
        raw = await self._read("read cluster firewall options", options)
        owned = self.manage_cluster
        out.append(
            ObservedResource(
                address="firewall/cluster" if owned else None,
                kind=Kind.FIREWALL_CLUSTER,
                owned=owned,
                id={"name": "cluster"},
                attributes=_options(raw) | ({} if owned else {"name": "cluster"}),
                version=join_version(options=raw.get("digest")),
            )
        )

    async def _observe_aliases(self, out: list[ObservedResource]) -> None:
        aliases = self.client.cluster.firewall.aliases
        for item in await self._read("read firewall aliases", aliases):
            name = str(item["name"])
            ours, comment = self._ours(item.get("comment"))
            attrs = {"cidr": item.get("cidr"), "comment": comment}
            out.append(
                ObservedResource(
                    address=f"firewall/alias/{name}" if ours else None,
                    kind=Kind.FIREWALL_ALIAS,
                    owned=ours,
                    id={"name": name},
                    attributes=attrs if ours else {"name": name, **attrs},
                    version=join_version(aliases=item.get("digest")),
                )
            )

    async def _observe_index(
        self,
        kind: Kind,
        tg: anyio.abc.TaskGroup,
        out: list[ObservedResource],
        foreign: dict[str, dict[str, Any]],
    ) -> None:
        """The IP set or group index: each of ours is read in `tg`, on its own; the others
        are kept in `foreign`, for `_foreign`."""
        listed = _LISTED[kind]
        index = listed.endpoint(self.client)
        for item in await self._read(listed.read_index, index):
            name = str(item[listed.key])
            ours, comment = self._ours(item.get("comment"))
            if ours:
                tg.start_soon(self._observe_listed, kind, name, comment, item.get("digest"), out)
            else:
                foreign[name] = {"name": name, "comment": item.get("comment", "")}

    async def _observe_listed(
        self, kind: Kind, name: str, comment: str, index: str | None, out: list[ObservedResource]
    ) -> None:
        """One IP set or group of ours, read at the index digest `index`."""
        listed = _LISTED[kind]
        items, digest = await self._read_listed(kind, name)
        out.append(
            ObservedResource(
                address=f"{kind.value}/{name}",
                kind=kind,
                owned=True,
                id={"name": name},
                attributes={"comment": comment, listed.items: items},
                version=join_version(index=index, **{listed.items: digest}),
            )
        )

    async def _read_listed(
        self, kind: Kind, name: str, *, observing: bool = True
    ) -> tuple[list[Any], str | None]:
        """An IP set's entries or a group's rules as observed, and the list's digest. A read
        while observing is retried on any server error; one during an apply as a call is."""
        listed = _LISTED[kind]
        endpoint = listed.endpoint(self.client)(name)
        what = f"read {listed.noun} {name}"
        if observing:
            raw = await self._read(what, endpoint)
        else:
            raw = await self._call(what, lambda: endpoint.get())
        return listed.read_items(raw), _list_digest(raw)

    async def _observe_guest(self, res: ObservedResource, out: list[ObservedResource]) -> None:
        assert res.address is not None
        node, vmid = res.id["node"], int(res.id["vmid"])
        kind = str(res.attributes.get("type") or "lxc")
        base = self.client.nodes(node)(kind)(vmid).firewall
        try:
            opts = await self._read(f"read firewall options of {vmid}", base.options)
            raw = await self._read(f"read firewall rules of {vmid}", base.rules)
        except NotFoundError:
            return  # destroyed since the guests were read: no firewall to speak of
        out.append(
            ObservedResource(
                address="firewall/guest/" + res.address.removeprefix("guest/"),
                kind=Kind.FIREWALL_GUEST,
                owned=True,
                id={"vmid": vmid, "node": node, "type": kind},
                attributes={**_options(opts), "rules": [clean_rule(r) for r in raw]},
                version=join_version(options=opts.get("digest"), rules=_list_digest(raw)),
            )
        )

    async def _foreign(
        self, foreign: Mapping[Kind, dict[str, dict[str, Any]]]
    ) -> list[ObservedResource]:
        """Foreign IP sets and groups, with their content: one of our rules may name them (the
        isolation check needs what they allow), and one may be what the spec wants, not yet
        adopted (the planner compares contents before it calls it a match). One call each;
        a platform has few."""

        async def read(kind: Kind, name: str) -> None:
            items, _digest = await self._read_listed(kind, name)
            foreign[kind][name][_LISTED[kind].items] = items

        async with anyio.create_task_group() as tg:
            for kind, table in foreign.items():
                for name in sorted(table):
                    tg.start_soon(read, kind, name)
        return [
            ObservedResource(kind=kind, owned=False, id={"name": name}, attributes=attrs)
            for kind, table in foreign.items()
            for name, attrs in sorted(table.items())
        ]

    # --- apply ---------------------------------------------------------------------------

    async def apply(self, change: Change) -> None:
        if change.action is Action.NOOP:
            return
        match change.kind:
            case Kind.FIREWALL_CLUSTER:
                await self.apply_cluster(change)
            case Kind.FIREWALL_ALIAS:
                await self.apply_alias(change)
            case Kind.FIREWALL_IPSET:
                await self.apply_ipset(change)
            case Kind.FIREWALL_GROUP:
                await self.apply_group(change)
            case Kind.FIREWALL_GUEST:
                await self.apply_guest(change)
            case _:
                raise PermanentError(f"{change.address}: no provider for kind {change.kind.value}")

    @staticmethod
    def _name(change: Change) -> str:
        return change.address.removeprefix(change.kind.value + "/")

    async def _guarded(
        self,
        what: str,
        lock: str,
        digest: str | None,
        send: Callable[[str | None], Any],
        fresh: Callable[[], Awaitable[str | None]],
    ) -> None:
        """Send with the digest the plan saw. When the shared list changed since (another of
        this apply's changes, or someone else), read it again: if our item is still as planned
        (`fresh` raises ConflictError otherwise), send once more with the new digest."""
        async with self._lock(lock):
            try:
                await self._call(what, lambda: send(digest))
                return
            except ConflictError:
                if digest is None:
                    raise
            again = await fresh()
            await self._call(what, lambda: send(again))

    async def apply_cluster(self, change: Change) -> None:
        if not self.manage_cluster:
            raise OwnershipError(
                f"{change.address}: the spec does not declare firewall.cluster, so the cluster "
                "options are not the controller's; they will not be touched"
            )
        if change.action is Action.DELETE:
            return  # the cluster options are never removed, only left alone
        assert change.after is not None
        body = {
            "enable": int(change.after["enable"]),
            "policy_in": change.after["policy_in"],
            "policy_out": change.after["policy_out"],
            "digest": split_version(change.version).get("options"),
        }
        options = self.client.cluster.firewall.options
        await self._call(f"update {change.address}", lambda: options.put(**body))

    # aliases

    async def _alias(self, name: str) -> tuple[dict[str, Any] | None, str | None]:
        items = await self._call(
            "read firewall aliases", lambda: self.client.cluster.firewall.aliases.get()
        )
        digest = items[0].get("digest") if items else None
        found = next((i for i in items if str(i["name"]).lower() == name.lower()), None)
        return found, digest

    async def _alias_as_planned(self, change: Change) -> str | None:
        item, digest = await self._alias(self._name(change))
        before = change.before or {}
        ours, comment = self._ours(item.get("comment") if item else None)
        if (
            item is None
            or not ours
            or (item.get("cidr"), comment)
            != (
                before.get("cidr"),
                before.get("comment", ""),
            )
        ):
            raise ConflictError(f"{change.address}: changed since the plan was made; re-plan")
        return digest

    async def _alias_ours(self, change: Change) -> str | None:
        """The alias still exists and carries our mark, checked before it is updated or deleted
        (as an IP set's or group's is): the aliases list's digest now. OwnershipError for one
        without our mark, whatever the change says; ConflictError for one that is gone."""
        item, digest = await self._alias(self._name(change))
        if item is None:
            raise ConflictError(f"{change.address}: gone since the plan was made; re-plan")
        if not self._ours(item.get("comment"))[0]:
            raise OwnershipError(
                f"{change.address}: the alias {item['name']!r} does not carry our mark "
                f"{comment_mark(self.platform)}; it will not be touched"
            )
        return digest

    async def apply_alias(self, change: Change) -> None:
        name = self._name(change)
        aliases = self.client.cluster.firewall.aliases
        planned: str | None = None
        if change.action is not Action.CREATE:
            now = await self._alias_ours(change)
            # Sent with the digest the plan saw (a list changed since is read again, and our
            # alias must still be as planned); one the plan has not is taken from this read.
            planned = split_version(change.version).get("aliases") or now
        if change.action is Action.DELETE:
            await self._guarded(
                f"delete {change.address}",
                "aliases",
                planned,
                lambda d: aliases(name).delete(digest=d),
                lambda: self._alias_as_planned(change),
            )
            return
        assert change.after is not None
        body = {
            "cidr": change.after["cidr"],
            "comment": with_comment_mark(change.after.get("comment", ""), self.platform),
        }
        if change.action is Action.CREATE:
            try:
                await self._call(
                    f"create {change.address}", lambda: aliases.post(name=name, **body)
                )
            except ConflictError:
                item, _ = await self._alias(name)
                if item is None or not self._ours(item.get("comment"))[0]:
                    raise self._taken(change, "an alias") from None
                await self._call(f"update {change.address}", lambda: aliases(name).put(**body))
            return
        await self._guarded(
            f"update {change.address}",
            "aliases",
            planned,
            lambda d: aliases(name).put(**body, digest=d),
            lambda: self._alias_as_planned(change),
        )

    def _taken(self, change: Change, what: str) -> ConflictError:
        return ConflictError(
            f"{change.address}: {what} of that name exists without our mark "
            f"{comment_mark(self.platform)}; it will not be touched"
        )

    # IP sets and security groups: an index of names with comments, and a list in each

    async def _index_entry(self, kind: Kind, name: str) -> tuple[dict[str, Any] | None, str | None]:
        listed = _LISTED[kind]
        index = listed.endpoint(self.client)
        items = await self._call(listed.read_index, index)
        return next((i for i in items if i[listed.key] == name), None), _list_digest(items)

    async def _ours_in_index(self, change: Change, *, comment: str | None = None) -> str | None:
        """Our IP set or group still exists, with our mark (and the planned comment when given):
        the index digest; ConflictError otherwise."""
        item, digest = await self._index_entry(change.kind, self._name(change))
        ours, rest = self._ours(item.get("comment") if item else None)
        if item is None or not ours or (comment is not None and rest != comment):
            raise ConflictError(f"{change.address}: changed since the plan was made; re-plan")
        return digest

    async def _create_named(self, change: Change, post: Callable[[], Any]) -> None:
        """Create an IP set or group; one that exists already is fine only if it is ours."""
        try:
            await self._call(f"create {change.address}", post)
        except ConflictError:
            item, _ = await self._index_entry(change.kind, self._name(change))
            if item is None or not self._ours(item.get("comment"))[0]:
                listed = _LISTED[change.kind]
                raise self._taken(change, f"{listed.article} {listed.noun}") from None

    async def _update_comment(self, change: Change, post: Callable[[str | None], Any]) -> None:
        before, after = change.before or {}, change.after or {}
        if before.get("comment", "") == after.get("comment", ""):
            return
        await self._guarded(
            f"update {change.address} comment",
            change.kind.value,
            split_version(change.version).get("index"),
            post,
            lambda: self._ours_in_index(change, comment=before.get("comment", "")),
        )

    async def _write_listed(self, change: Change) -> tuple[list[Any], list[Any], str | None]:
        """Create an IP set or group, or update its comment; then its list as it is, the list
        wanted, and the digest to send with the list's first edit. An update's list is the
        one the plan saw, at the digest it saw; a new one's is read back."""
        assert change.after is not None
        listed = _LISTED[change.kind]
        name = self._name(change)
        index = listed.endpoint(self.client)
        named = {listed.key: name}
        comment = with_comment_mark(change.after.get("comment", ""), self.platform)
        want = list(change.after.get(listed.items, []))
        if change.action is Action.UPDATE:
            await self._update_comment(
                change, lambda d: index.post(**named, rename=name, comment=comment, digest=d)
            )
            have = list((change.before or {}).get(listed.items, []))
            return have, want, split_version(change.version).get(listed.items)
        await self._create_named(change, lambda: index.post(**named, comment=comment))
        have, digest = await self._read_listed(change.kind, name, observing=False)
        return have, want, digest

    async def apply_ipset(self, change: Change) -> None:
        ipset = self.client.cluster.firewall.ipset(self._name(change))
        if change.action is Action.DELETE:
            await self._ours_in_index(change)
            await self._call(f"delete {change.address}", lambda: ipset.delete(force=1))
            return
        have, want, digest = await self._write_listed(change)
        await self._sync_entries(change, have, want, digest)

    async def _sync_entries(
        self, change: Change, have: list[str], want: list[str], digest: str | None
    ) -> None:
        name = self._name(change)
        ipset = self.client.cluster.firewall.ipset(name)
        want = [ipset_entry(e) for e in want]  # as Proxmox will store them
        current = set(have)
        for entry in sorted(current - set(want)):
            if digest is None:
                raw = await self._call(f"read IP set {name}", lambda: ipset.get())
                if {ipset_entry_of(e) for e in raw} != current:
                    raise ConflictError(f"{change.address}: changed while applying; re-plan")
                digest = _list_digest(raw)
            remove = partial(ipset(entry.removeprefix("!")).delete, digest=digest)
            await self._call(f"{change.address}: remove {entry}", remove)
            current.discard(entry)
            digest = None
        for entry in sorted(set(want) - current):
            body: dict[str, Any] = {"cidr": entry.removeprefix("!")}
            if entry.startswith("!"):
                body["nomatch"] = 1
            await self._call(f"{change.address}: add {entry}", partial(ipset.post, **body))

    async def apply_group(self, change: Change) -> None:
        group = self.client.cluster.firewall.groups(self._name(change))
        if change.action is Action.DELETE:
            await self._ours_in_index(change)
            # Emptied first: Proxmox deletes only a group without rules.
            have = list((change.before or {}).get("rules", []))
            digest = split_version(change.version).get("rules")
            await self._sync_rules(change.address, group, have, [], digest)
            await self._call(f"delete {change.address}", lambda: group.delete())
            return
        have, want, digest = await self._write_listed(change)
        await self._sync_rules(change.address, group, have, want, digest)

    # a guest's firewall

    async def _check_guest(self, change: Change) -> Any:
        """The guest's firewall endpoint, once the guest is known to carry our mark."""
        node, vmid = change.id["node"], int(change.id["vmid"])
        kind = str(change.id.get("type") or "lxc")
        guest = self.client.nodes(node)(kind)(vmid)
        config = await self._call(f"read config of {vmid}", lambda: guest.config.get())
        mark, _ = read_mark(config.get("description"))
        address = "guest/" + self._name(change)
        if claimed(mark, self.platform, vmid) != address:
            raise OwnershipError(
                f"{change.address}: vmid {vmid} does not carry our mark for {address}; "
                "its firewall will not be touched"
            )
        return guest.firewall

    async def apply_guest(self, change: Change) -> None:
        if change.action is Action.DELETE:
            raise PermanentError(
                f"{change.address}: a guest's firewall goes with its guest, never on its own"
            )
        assert change.after is not None
        fw = await self._check_guest(change)
        digests = split_version(change.version)
        if change.action is Action.UPDATE and change.before is not None:
            have_opts = _options(change.before)
            have = list(change.before.get("rules", []))
        else:
            # A new (or recreated) guest: what is there now, not what the plan saw before.
            raw_opts = await self._call(f"read {change.address} options", lambda: fw.options.get())
            raw = await self._call(f"read {change.address} rules", lambda: fw.rules.get())
            have_opts, have = _options(raw_opts), [clean_rule(r) for r in raw]
            digests = split_version(
                join_version(options=raw_opts.get("digest"), rules=_list_digest(raw))
            )
        want_opts = _options(change.after)
        if want_opts != have_opts:
            # Options first: switching filtering on with policy_in DROP closes before it opens.
            body = {**want_opts, "digest": digests.get("options")}
            await self._call(f"update {change.address} options", lambda: fw.options.put(**body))
        await self._sync_rules(
            change.address,
            fw.rules,
            have,
            list(change.after.get("rules", [])),
            digests.get("rules"),
        )
        if change.after.get(START_GUEST):
            # The guest was held stopped until its rules were in place (firewall first).
            guest = replace(change, after={"type": change.id.get("type", "lxc")})
            # Someone (HA, onboot after a reboot, a person) may have started it meanwhile.
            if await self.pve.power(guest) != "running":
                await self.pve.set_state(guest, "running")

    # rule lists

    async def _sync_rules(
        self,
        what: str,
        endpoint: Any,
        have: list[Rule],
        want: list[Rule],
        digest: str | None,
    ) -> None:
        """Run `rule_ops` against a rule list. Each step goes with the digest of the list it
        was computed against; before a step that names a position, a list we changed is read
        back and must be exactly what we expect (else someone else is editing it)."""
        cur = [clean_rule(r) for r in have]
        for op in rule_ops(have, want):
            if digest is None and op.verb != "post":
                raw = await self._call(f"{what}: read rules", lambda: endpoint.get())
                if [_key(r) for r in raw] != [_key(r) for r in cur]:
                    raise ConflictError(f"{what}: its rules changed while applying; re-plan")
                digest = _list_digest(raw)
            body = op.params()
            if digest:
                body["digest"] = digest
            step = f"{what}: {op.describe()}"
            if op.verb == "post":
                await self._call(step, partial(endpoint.post, **body))
            elif op.verb == "delete":
                await self._call(step, partial(endpoint(op.pos).delete, **body))
            else:
                await self._call(step, partial(endpoint(op.pos).put, **body))
            cur = apply_op(cur, op)
            digest = None
