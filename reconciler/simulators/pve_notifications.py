"""PVE's notification targets and matchers in the fake PVE (`/cluster/notifications/...`).

fakepve 0.5 checks these routes against PVE's schema and answers them from it without storing
anything. `NotificationApi`, mixed into `PlatformPve` (reconciler/simulators/pve.py), stores
them the way fakepve builds its own areas: a `_routes_notifications` table whose handlers run
after fakepve's schema and permission checks. The behaviour follows pve-manager
`PVE/API2/Cluster/Notifications.pm`, which hands every call to proxmox-notify (proxmox-rs
`proxmox-notify/src/api/{mod,sendmail,smtp,gotify,webhook,matcher}.rs`, `context/pve.rs`) and
turns its errors into API errors with their status (`raise_api_error`):

- one namespace for every endpoint and matcher (`notifications.cfg` sections): a create whose
  name is taken is 400 "Cannot create 'x', an entity with the same name already exists";
- the built-ins of `context/pve.rs`: the sendmail endpoint `mail-to-root` (mailto-user
  root@pam) and the matcher `default-matcher` (routing everything to it), `origin` builtin;
  changed, they are `modified-builtin`; deleted, they are reset to the default, never gone;
- a read of an unknown one is 404 "endpoint 'x' not found" (typed: a sendmail endpoint is not
  found as a webhook) or "matcher 'x' not found"; a matcher's `target` must name an existing
  endpoint (404 "endpoint 'x' does not exist"); an endpoint a matcher targets cannot be deleted
  (400 "cannot delete 'x', referenced by: m");
- sendmail and smtp need a recipient (400 "must at least provide one recipient, either in mailto
  or in mailto-user"); an update checks `digest` (400 "detected modified configuration - file
  changed by other user? Try again.") and takes `delete` (the properties each type may drop);
- secrets stay apart (the private config): a Gotify token, an SMTP password and a webhook's
  secret values are never answered; a webhook's `secret` lists names only (`name=token`). An
  update's secret without a value keeps the old one of that name ("secret 'x' not known"
  otherwise); `delete=secret` drops them all. A header's value must be valid base64;
- a matcher's `match-severity` and `match-field` statements are parsed as proxmox-notify does
  and answered in its spelling (`exact:type=fencing,vzdump`); booleans come back as JSON
  booleans, only when set;
- `GET /cluster/notifications/targets` lists every endpoint with its type and origin;
  `POST .../targets/{name}/test` records the test (`notification_tests`).

Nothing is sent: the fake has no mail or HTTP client. Not modelled: `match-calendar`'s syntax
(kept as given), `mailto-user` resolution to addresses, `filter`/`group` (gone in PVE 8.1).
"""

from __future__ import annotations

import base64
import binascii
import copy
import hashlib
import json
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from fakepve.model import PveError
from fakepve.routing import StatefulRoutes

Handler = Callable[[dict[str, Any], str], Awaitable[Any]]

ENDPOINT_TYPES = ("gotify", "sendmail", "smtp", "webhook")
MATCHER = "matcher"
# What each type keeps in notifications.cfg and answers (`name` and `origin` besides).
_PUBLIC: dict[str, tuple[str, ...]] = {
    "sendmail": ("mailto", "mailto-user", "from-address", "author", "comment", "disable"),
    "smtp": (
        "server",
        "port",
        "mode",
        "username",
        "mailto",
        "mailto-user",
        "from-address",
        "author",
        "comment",
        "disable",
    ),
    "gotify": ("server", "comment", "disable"),
    "webhook": ("url", "method", "header", "body", "comment", "disable"),
    MATCHER: (
        "match-field",
        "match-severity",
        "match-calendar",
        "target",
        "mode",
        "invert-match",
        "comment",
        "disable",
    ),
}
# What goes to priv/notifications.cfg: never answered.
_PRIVATE: dict[str, tuple[str, ...]] = {"smtp": ("password",), "gotify": ("token",)}
# The `Deleteable*Property` enums.
_DELETABLE: dict[str, tuple[str, ...]] = {
    "sendmail": ("from-address", "author", "comment", "mailto", "mailto-user", "disable"),
    "smtp": (
        "author",
        "comment",
        "disable",
        "mailto",
        "mailto-user",
        "mode",
        "password",
        "port",
        "username",
    ),
    "gotify": ("comment", "disable"),
    "webhook": ("comment", "disable", "header", "body", "secret"),
    MATCHER: (*_PUBLIC[MATCHER][:6], "comment", "disable"),
}
_BOOLEANS = ("disable", "invert-match")
_SEVERITIES = ("info", "notice", "warning", "error", "unknown")
_FIELD_STATEMENT = re.compile(r"^(?:(exact|regex):)?([A-Za-z0-9_][A-Za-z0-9._-]*)=(.*)$", re.S)
_DIGEST_CHANGED = "detected modified configuration - file changed by other user? Try again."
# proxmox-notify's default config in PVE (context/pve.rs).
BUILTINS: dict[str, dict[str, Any]] = {
    "mail-to-root": {
        "type": "sendmail",
        "mailto-user": ["root@pam"],
        "comment": "Send mails to root@pam's email address",
    },
    "default-matcher": {
        "type": MATCHER,
        "mode": "all",
        "target": ["mail-to-root"],
        "comment": "Route all notifications to mail-to-root",
    },
}


def _property_string(text: str) -> dict[str, str]:
    """`name=X,value=B64` (a header or secret) -> {"name": X, "value": B64}."""
    out: dict[str, str] = {}
    for part in str(text).split(","):
        key, sep, value = part.partition("=")
        if not sep:
            raise PveError(400, "Parameter verification failed.", {"value": f"bad item {part!r}"})
        out[key.strip()] = value.strip()
    if "name" not in out:
        raise PveError(400, "Parameter verification failed.", {"name": "property is missing"})
    return out


def _base64_ok(value: str) -> bool:
    try:
        base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


def _severities(statement: str) -> str:
    """A SeverityMatcher: severities joined by ',', each one PVE knows."""
    out = []
    for element in str(statement).split(","):
        severity = element.strip()
        if severity not in _SEVERITIES:
            raise PveError(400, f"invalid severity {severity!r}")
        out.append(severity)
    return ",".join(out)


def _field_statement(statement: str) -> str:
    """A FieldMatcher in its Display form; `exact` values trimmed and joined by ','."""
    m = _FIELD_STATEMENT.match(str(statement))
    if m is None or m.group(1) is None:
        raise PveError(400, f"invalid match-field statement: {statement}")
    kind, field, value = m.groups()
    if kind == "regex":
        try:
            re.compile(value)
        except re.error as exc:
            raise PveError(400, f"invalid regex: {exc}") from None
        return f"regex:{field}={value}"
    return f"exact:{field}=" + ",".join(v.strip() for v in value.split(","))


class NotificationApi(StatefulRoutes):  # type: ignore[misc]  # fakepve ships no types
    """Mixin for FakePve: PVE's notification endpoints and matchers (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # name -> the section as notifications.cfg holds it ("type" included), in order.
        self.notification_config: dict[str, dict[str, Any]] = {}
        # name -> what priv/notifications.cfg holds: token, password, secret (name -> base64).
        self.notification_private: dict[str, dict[str, Any]] = {}
        self.notification_tests: list[str] = []  # targets tested, in order

    def _routes_notifications(self) -> list[tuple[str, str, Handler]]:
        base = "/cluster/notifications"
        routes: list[tuple[str, str, Handler]] = [
            ("GET", f"{base}/targets", self._nt_targets),
            ("POST", f"{base}/targets/{{name}}/test", self._nt_test),
        ]
        for kind in (*ENDPOINT_TYPES, MATCHER):
            many = f"{base}/endpoints/{kind}" if kind != MATCHER else f"{base}/matchers"
            routes += [
                ("GET", many, self._nt_handler(self._nt_list, kind)),
                ("POST", many, self._nt_handler(self._nt_create, kind)),
                ("GET", f"{many}/{{name}}", self._nt_handler(self._nt_read, kind)),
                ("PUT", f"{many}/{{name}}", self._nt_handler(self._nt_update, kind)),
                ("DELETE", f"{many}/{{name}}", self._nt_handler(self._nt_delete, kind)),
            ]
        return routes

    @staticmethod
    def _nt_handler(method: Callable[[str, dict[str, Any]], Any], kind: str) -> Handler:
        async def handle(values: dict[str, Any], _user: str) -> Any:
            return method(kind, values)

        return handle

    # ------------------------------------------------------------------ the config

    def _nt_sections(self) -> dict[str, dict[str, Any]]:
        """The merged config: the built-ins, overridden by what the user config holds."""
        merged = {n: {**copy.deepcopy(b), "origin": "builtin"} for n, b in BUILTINS.items()}
        for name, section in self.notification_config.items():
            origin = "modified-builtin" if name in BUILTINS else "user-created"
            merged[name] = {**copy.deepcopy(section), "origin": origin}
        return merged

    def _nt_digest(self) -> str:
        text = json.dumps(self._nt_sections(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def _nt_lookup(self, kind: str, name: str) -> dict[str, Any]:
        section = self._nt_sections().get(name)
        if section is None or section["type"] != kind:
            what = "matcher" if kind == MATCHER else "endpoint"
            raise PveError(404, f"{what} '{name}' not found")
        return section

    def _nt_answer(self, name: str, section: Mapping[str, Any], *, listed: bool) -> dict[str, Any]:
        kind = section["type"]
        out: dict[str, Any] = {"name": name}
        for key in _PUBLIC[kind]:
            if section.get(key) is None:
                continue
            value = section[key]
            out[key] = bool(value) if key in _BOOLEANS else copy.deepcopy(value)
        if kind == "webhook":
            secrets = self.notification_private.get(name, {}).get("secret", {})
            out["secret"] = [f"name={s}" for s in secrets]
        if listed:
            out["origin"] = section["origin"]
        return out

    # ------------------------------------------------------------------ handlers

    async def _nt_targets(self, values: dict[str, Any], _user: str) -> Any:
        out = []
        for name, section in self._nt_sections().items():
            if section["type"] == MATCHER:
                continue
            item = {"name": name, "type": section["type"], "origin": section["origin"]}
            if section.get("disable") is not None:
                item["disable"] = bool(section["disable"])
            if section.get("comment") is not None:
                item["comment"] = section["comment"]
            out.append(item)
        return sorted(out, key=lambda t: (t["type"], t["name"]))

    async def _nt_test(self, values: dict[str, Any], _user: str) -> Any:
        name = str(values["name"])
        section = self._nt_sections().get(name)
        if section is None or section["type"] == MATCHER:
            raise PveError(404, f"endpoint '{name}' does not exist")
        self.notification_tests.append(name)
        return None

    def _nt_list(self, kind: str, values: dict[str, Any]) -> Any:
        return [
            self._nt_answer(n, s, listed=True)
            for n, s in self._nt_sections().items()
            if s["type"] == kind
        ]

    def _nt_read(self, kind: str, values: dict[str, Any]) -> Any:
        name = str(values["name"])
        section = self._nt_lookup(kind, name)
        return {**self._nt_answer(name, section, listed=False), "digest": self._nt_digest()}

    def _nt_create(self, kind: str, values: dict[str, Any]) -> Any:
        name = str(values["name"])
        if name in self._nt_sections():
            raise PveError(
                400, f"Cannot create '{name}', an entity with the same name already exists"
            )
        section: dict[str, Any] = {"type": kind}
        private: dict[str, Any] = {}
        self._nt_set(kind, section, private, values, {})
        self._nt_validate(kind, section)
        self.notification_config[name] = section
        if kind != MATCHER:
            self.notification_private[name] = private
        return None

    def _nt_update(self, kind: str, values: dict[str, Any]) -> Any:
        name = str(values["name"])
        digest = values.get("digest")
        if digest and digest != self._nt_digest():
            raise PveError(400, _DIGEST_CHANGED)
        section = copy.deepcopy(self._nt_lookup(kind, name))
        section.pop("origin", None)
        private = copy.deepcopy(self.notification_private.get(name, {}))
        for key in values.get("delete") or []:
            if key not in _DELETABLE[kind]:
                raise PveError(
                    400, "Parameter verification failed.", {"delete": f"invalid value '{key}'"}
                )
            if key == "secret":
                private["secret"] = {}
            elif key in _PRIVATE.get(kind, ()):
                private.pop(key, None)
            else:
                section.pop(key, None)
        old_secrets = dict(private.get("secret", {}))
        self._nt_set(kind, section, private, values, old_secrets)
        self._nt_validate(kind, section)
        self.notification_config[name] = section
        if kind != MATCHER:
            self.notification_private[name] = private
        return None

    def _nt_delete(self, kind: str, values: dict[str, Any]) -> Any:
        name = str(values["name"])
        section = self._nt_lookup(kind, name)
        if kind != MATCHER and section["origin"] == "user-created":
            referrers = sorted(
                n
                for n, s in self._nt_sections().items()
                if s["type"] == MATCHER and name in (s.get("target") or [])
            )
            if referrers:
                raise PveError(
                    400, f"cannot delete '{name}', referenced by: {', '.join(referrers)}"
                )
        # A built-in is reset to its default: it exists whatever the user config says.
        self.notification_config.pop(name, None)
        self.notification_private.pop(name, None)
        return None

    # ------------------------------------------------------------------ writing a section

    def _nt_set(
        self,
        kind: str,
        section: dict[str, Any],
        private: dict[str, Any],
        values: Mapping[str, Any],
        old_secrets: Mapping[str, str],
    ) -> None:
        """The parameters given into the section (and its private part), as proxmox-notify
        reads them."""
        for key in _PUBLIC[kind]:
            if key not in values or values[key] is None:
                continue
            value = values[key]
            if key in _BOOLEANS:
                value = 1 if str(value) in ("1", "true", "True") else 0
            elif key == "port":
                value = int(value)
            elif key == "header":
                value = self._nt_headers(value)
            elif key == "match-severity":
                value = [_severities(v) for v in value]
            elif key == "match-field":
                value = [_field_statement(v) for v in value]
            elif key == "target":
                for target in value:
                    found = self._nt_sections().get(str(target))
                    if found is None or found["type"] == MATCHER:
                        raise PveError(404, f"endpoint '{target}' does not exist")
                value = [str(t) for t in value]
            elif isinstance(value, list):
                value = [str(v) for v in value]
            section[key] = value
        for key in _PRIVATE.get(kind, ()):
            if values.get(key) is not None:
                private[key] = str(values[key])
        if kind == "webhook" and values.get("secret") is not None:
            secrets: dict[str, str] = {}
            for item in values["secret"]:
                entry = _property_string(item)
                secret = entry["name"]
                if entry.get("value"):
                    if not _base64_ok(entry["value"]):
                        raise PveError(
                            400, f"secret '{secret}' does not have valid base64 encoded data"
                        )
                    value = entry["value"]
                elif secret in old_secrets:
                    value = old_secrets[secret]
                else:
                    raise PveError(400, f"secret '{secret}' not known")
                if secret in secrets:
                    raise PveError(400, f"secret '{secret}' defined multiple times")
                secrets[secret] = value
            private["secret"] = secrets

    @staticmethod
    def _nt_headers(items: list[Any]) -> list[str]:
        out = []
        for item in items:
            entry = _property_string(item)
            if not entry.get("value"):
                raise PveError(400, f"header '{entry['name']}' has empty value")
            if not _base64_ok(entry["value"]):
                raise PveError(
                    400, f"header '{entry['name']}' does not have valid base64 encoded data"
                )
            out.append(f"name={entry['name']},value={entry['value']}")
        return out

    @staticmethod
    def _nt_validate(kind: str, section: Mapping[str, Any]) -> None:
        if (
            kind in ("sendmail", "smtp")
            and not section.get("mailto")
            and not section.get("mailto-user")
        ):
            raise PveError(
                400, "must at least provide one recipient, either in mailto or in mailto-user"
            )
