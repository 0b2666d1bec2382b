"""PVE's own notification endpoints and matchers (`/cluster/notifications/...`), so that
Proxmox's notifications (a vzdump that failed, a node fenced) reach the people the
controller's own do.

A provider like the backup jobs': it composes the guests' `ProxmoxProvider` for every call (one
thread hop, one retry loop, one error translation). Registered by
`applying.connecting.connect_platform` (`notification_providers`) when the spec's
`notifications.proxmox` declares anything; called through the provider protocol.

Observe: the four endpoint lists (`GET .../endpoints/{sendmail,smtp,gotify,webhook}`) and the
matchers (`GET .../matchers`), five reads at once. One is ours when its `comment` ends with our
mark, `reconciler:v1 platform=P address=notification/endpoint/NAME` (or `.../matcher/NAME`),
the address naming the entity's own name: a copy made by hand under another name claims
nothing, and PVE's built-ins (`mail-to-root`, `default-matcher`) are never ours. Everything
else is reported as foreign and never changed. The attributes are those of
`loading.graph.notification_endpoint_attributes` and `..._matcher_attributes`: what PVE
answers, less what it never shows (a Gotify token, an SMTP password, a webhook secret's value:
its name only), so those are written, never compared.

Apply: create (the secrets read from their references now), update (`delete=` for what the
spec dropped, the digest of the read it follows) and delete, each update or delete only after
reading the entity again and finding our mark on it. A create whose name PVE already holds
fails, naming it, unless what holds it is ours (a create that had happened). An endpoint's type
cannot change in place: that is an error saying what to do. A delete is planned only with
pruning (`platform.prune` or `--allow-destroy`; the planner's `_deletes`): one made by mistake
leaves PVE's own failures unheard.

Errors are those of `proxmox.classify`; this module adds `OwnershipError` (no mark).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import anyio

from reconciler.model.errors import ConfigurationError, OwnershipError, PermanentError
from reconciler.model.observed import ObservedResource
from reconciler.model.plans import Action, Change, refuse_blocked
from reconciler.model.resources import Kind
from reconciler.model.spec import PlatformSpec, PveGotify, PveSmtp, PveWebhook, SecretRef
from reconciler.providers import Observation
from reconciler.providers.proxmox import MARK_PREFIX, ProxmoxProvider
from reconciler.providers.secrets import read_secret

ENDPOINT_TYPES = ("sendmail", "smtp", "gotify", "webhook")
_MARK = re.compile(
    rf"(?:^|\s){re.escape(MARK_PREFIX)} platform=(?P<platform>\S+) "
    r"address=(?P<address>notification/(?:endpoint|matcher)/[A-Za-z0-9_-]+)\Z"
)
# What an update may drop (proxmox-notify's Deleteable*Property), by type.
_DELETABLE: dict[str, tuple[str, ...]] = {
    "sendmail": ("mailto", "mailto-user", "from-address", "author", "comment"),
    "smtp": ("mailto", "mailto-user", "author", "comment", "port", "username", "password"),
    "gotify": ("comment",),
    "webhook": ("header", "body", "secret", "comment"),
    "matcher": ("match-severity", "match-field", "match-calendar", "comment"),
}


class Claim(NamedTuple):
    platform: str
    address: str


def notification_comment(platform: str, address: str, description: str) -> str:
    """The comment as sent: the spec's description, then our mark, on one line."""
    mark = f"{MARK_PREFIX} platform={platform} address={address}"
    return f"{description} {mark}" if description else mark


def read_notification_mark(comment: str | None) -> tuple[Claim | None, str]:
    """An entity's comment -> (what our mark claims, the description without it)."""
    text = (comment or "").strip()
    m = _MARK.search(text)
    if m is None:
        return None, text
    return Claim(m["platform"], m["address"]), text[: m.start()].strip()


def _flag(value: Any) -> int:
    return 1 if value in (True, 1, "1", "true") else 0


def _decode(value: str) -> str:
    try:
        return base64.b64decode(value, validate=True).decode()
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return value  # not ours to judge: shown as it is, so it differs and is rewritten


def _encode(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _property_strings(items: Any) -> dict[str, str | None]:
    """PVE's `name=X,value=B64` list (a webhook's headers or secrets) -> {X: B64 or None}."""
    out: dict[str, str | None] = {}
    for item in items or []:
        parts = dict(p.partition("=")[::2] for p in str(item).split(","))
        if "name" in parts:
            out[parts["name"]] = parts.get("value") or None
    return out


def endpoint_attributes(kind: str, item: Mapping[str, Any], description: str) -> dict[str, Any]:
    """An endpoint as PVE answers it -> the attributes the planner compares."""
    attrs: dict[str, Any] = {
        "type": kind,
        "comment": description,
        "disable": _flag(item.get("disable", 0)),
    }
    if kind in ("sendmail", "smtp"):
        attrs |= {
            "mailto": sorted(str(m) for m in item.get("mailto") or []),
            "mailto-user": sorted(str(m) for m in item.get("mailto-user") or []),
            "from-address": item.get("from-address"),
            "author": item.get("author"),
        }
    if kind == "smtp":
        port = item.get("port")
        attrs |= {
            "server": item.get("server"),
            "port": int(port) if port is not None else None,
            "mode": item.get("mode") or "tls",
            "username": item.get("username"),
        }
    elif kind == "gotify":
        attrs["server"] = item.get("server")
    elif kind == "webhook":
        headers = _property_strings(item.get("header"))
        body = item.get("body")
        attrs |= {
            "url": item.get("url"),
            "method": item.get("method") or "post",
            "header": {k: _decode(v or "") for k, v in sorted(headers.items())},
            "body": _decode(body) if body else None,
            "secret": sorted(_property_strings(item.get("secret"))),
        }
    return attrs


def matcher_attributes(item: Mapping[str, Any], description: str) -> dict[str, Any]:
    """A matcher as PVE answers it -> the attributes the planner compares."""
    return {
        "match-severity": [str(s) for s in item.get("match-severity") or []],
        "match-field": [str(s) for s in item.get("match-field") or []],
        "match-calendar": [str(s) for s in item.get("match-calendar") or []],
        "mode": item.get("mode") or "all",
        "invert-match": _flag(item.get("invert-match", 0)),
        "target": sorted(str(t) for t in item.get("target") or []),
        "comment": description,
        "disable": _flag(item.get("disable", 0)),
    }


def endpoint_secrets(spec: PlatformSpec) -> dict[str, dict[str, SecretRef]]:
    """Endpoint name -> its secrets by parameter (`token`, `password`, `secret.NAME`): the
    references, read only when an endpoint is written."""
    out: dict[str, dict[str, SecretRef]] = {}
    for name, ep in spec.notifications.proxmox.endpoints.items():
        refs: dict[str, SecretRef] = {}
        if isinstance(ep, PveGotify):
            refs["token"] = ep.token
        elif isinstance(ep, PveSmtp) and ep.password is not None:
            refs["password"] = ep.password
        elif isinstance(ep, PveWebhook):
            refs |= {f"secret.{n}": ref for n, ref in ep.secrets.items()}
        out[name] = refs
    return out


def notification_providers(spec: PlatformSpec, pve: ProxmoxProvider) -> list[NotificationProvider]:
    """The provider of the spec's PVE notifications on the guests' endpoint; none when the
    spec declares none, so a platform without them is not asked for Mapping.Audit."""
    declared = spec.notifications.proxmox
    if not declared.endpoints and not declared.matchers:
        return []
    return [NotificationProvider(pve=pve, secrets=endpoint_secrets(spec))]


@dataclass
class NotificationProvider:
    """The spec's PVE notification endpoints and matchers; `secrets` by endpoint name."""

    pve: ProxmoxProvider
    secrets: Mapping[str, Mapping[str, SecretRef]] = field(default_factory=dict)

    kinds = frozenset({Kind.NOTIFICATION_ENDPOINT, Kind.NOTIFICATION_MATCHER})
    needs = frozenset[Kind]()
    streams = frozenset[Kind]()
    # Unreadable (no Mapping.Audit), only they are left out: the guests converge regardless.
    optional = True

    @property
    def platform(self) -> str:
        return self.pve.platform

    # --- observe -------------------------------------------------------------------------

    async def observe(self, seen: Observation | None = None) -> list[ObservedResource]:
        notifications = self.pve.client.cluster.notifications
        found: dict[str, list[dict[str, Any]]] = {}

        async def read(kind: str) -> None:
            where = notifications.matchers if kind == "matcher" else notifications.endpoints(kind)
            found[kind] = await self.pve.get(f"list notification {kind}s", where)

        async with self.pve.reading(), anyio.create_task_group() as tg:
            for kind in (*ENDPOINT_TYPES, "matcher"):
                tg.start_soon(read, kind)
        out = [
            self._resource(kind, item)
            for kind in (*ENDPOINT_TYPES, "matcher")
            for item in found[kind]
            if item.get("name")
        ]
        return sorted(out, key=lambda r: (r.kind.value, str(r.id["name"])))

    def _resource(self, kind: str, item: Mapping[str, Any]) -> ObservedResource:
        name = str(item["name"])
        resource_kind = (
            Kind.NOTIFICATION_MATCHER if kind == "matcher" else Kind.NOTIFICATION_ENDPOINT
        )
        claim, description = read_notification_mark(item.get("comment"))
        owned = (
            claim is not None
            and claim.platform == self.platform
            and claim.address == f"{resource_kind.value}/{name}"
            and item.get("origin", "user-created") == "user-created"
        )
        if kind == "matcher":
            attrs = matcher_attributes(item, description)
        else:
            attrs = endpoint_attributes(kind, item, description)
        return ObservedResource(
            address=claim.address if owned and claim is not None else None,
            kind=resource_kind,
            owned=owned,
            id={"name": name, "type": kind},
            attributes=attrs if owned else {"name": name, **attrs},
        )

    # --- apply -----------------------------------------------------------------------------

    async def apply(self, change: Change) -> None:
        if change.kind not in self.kinds:
            raise PermanentError(f"{change.address}: no provider for kind {change.kind.value}")
        refuse_blocked(change)
        name = change.address.rsplit("/", 1)[1]
        before = change.before or {}
        after = change.after or {}
        kind = self._type_of(change)
        match change.action:
            case Action.CREATE:
                await self._create(change, kind, name)
            case Action.UPDATE | Action.REPLACE:
                if before.get("type", kind) != kind:
                    raise PermanentError(
                        f"{change.address}: its type changes from {before.get('type')} to "
                        f"{kind}, which PVE cannot do in place: give the {kind} endpoint "
                        "another name (the old one is then deleted)"
                    )
                digest = await self._require_ours(change, kind, name)
                params = self._params(kind, name, after)
                dropped = [k for k in _DELETABLE[kind] if k not in params]
                if dropped:
                    params["delete"] = dropped
                await self.pve.retrying(
                    f"update {change.address}",
                    lambda: self._one(kind, name).put(digest=digest, **params),
                )
            case Action.DELETE:
                try:
                    await self._require_ours(change, kind, name)
                except PermanentError as exc:
                    if exc.status == 404:
                        return  # already gone
                    raise
                await self.pve.retrying(
                    f"delete {change.address}", lambda: self._one(kind, name).delete()
                )
            case _:
                raise PermanentError(f"{change.address}: cannot {change.action.value} it")

    @staticmethod
    def _type_of(change: Change) -> str:
        if change.kind is Kind.NOTIFICATION_MATCHER:
            return "matcher"
        if change.action is Action.DELETE:
            return str(change.id.get("type") or (change.before or {}).get("type"))
        return str((change.after or {}).get("type"))

    def _many(self, kind: str) -> Any:
        notifications = self.pve.client.cluster.notifications
        return notifications.matchers if kind == "matcher" else notifications.endpoints(kind)

    def _one(self, kind: str, name: str) -> Any:
        return self._many(kind)(name)

    async def _create(self, change: Change, kind: str, name: str) -> None:
        params = self._params(kind, name, change.after or {})
        try:
            await self.pve.retrying(
                f"create {change.address}", lambda: self._many(kind).post(name=name, **params)
            )
        except PermanentError as exc:
            if "already exists" not in str(exc):
                raise
            # Ours already (a create whose answer was lost), or someone else's: never taken.
            try:
                await self._require_ours(change, kind, name)
            except PermanentError:
                raise OwnershipError(
                    f"{change.address}: PVE already has a notification endpoint or matcher "
                    f"named {name!r} without this platform's mark; it will not be touched: "
                    "give the spec's another name, or remove that one"
                ) from None

    async def _require_ours(self, change: Change, kind: str, name: str) -> str:
        """Read the entity again and find our mark for this address on it; its digest, for the
        write that follows."""
        item = await self.pve.get(f"read {change.address}", self._one(kind, name))
        claim, _ = read_notification_mark(item.get("comment"))
        if claim != Claim(self.platform, change.address):
            raise OwnershipError(
                f"{change.address}: the {kind} {name!r} does not carry this platform's mark "
                "for it; left alone"
            )
        return str(item.get("digest") or "")

    def _params(self, kind: str, name: str, want: Mapping[str, Any]) -> dict[str, Any]:
        """The desired attributes -> a create's or update's parameters, secrets read now."""
        address_kind = (
            Kind.NOTIFICATION_MATCHER if kind == "matcher" else Kind.NOTIFICATION_ENDPOINT
        )
        address = f"{address_kind.value}/{name}"
        params: dict[str, Any] = {
            "comment": notification_comment(self.platform, address, want.get("comment") or ""),
            "disable": _flag(want.get("disable", 0)),
        }
        skip = {"type", "comment", "disable", "header", "body", "secret"}
        for key, value in want.items():
            if key in skip or value is None or value == []:
                continue
            params[key] = value
        secrets = self.secrets.get(name, {})
        if kind == "webhook":
            if want.get("header"):
                params["header"] = [
                    f"name={k},value={_encode(v)}" for k, v in sorted(want["header"].items())
                ]
            if want.get("body"):
                params["body"] = _encode(want["body"])
            if want.get("secret"):
                params["secret"] = [
                    f"name={n},value={_encode(self._secret(name, secrets, f'secret.{n}'))}"
                    for n in want["secret"]
                ]
        for key in ("token", "password"):
            if key in secrets:
                params[key] = self._secret(name, secrets, key)
        return params

    @staticmethod
    def _secret(name: str, secrets: Mapping[str, SecretRef], key: str) -> str:
        ref = secrets.get(key)
        if ref is None:
            raise PermanentError(f"notification endpoint {name!r}: no reference for {key}")
        try:
            return read_secret(ref)
        except ConfigurationError as exc:  # its message names the reference, never the value
            raise PermanentError(f"notification endpoint {name!r}, {key}: {exc}") from None
