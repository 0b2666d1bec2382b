"""Proxmox VE guests: observe them and apply guest changes, through proxmoxer.

Called by the CLI (`observe`, `plan`, `apply`) and the controller. Blocking proxmoxer calls run
in worker threads (anyio.to_thread) behind a limiter, so observation and apply are concurrent
but bounded.

What it knows of Proxmox (see ../shared/FIELD-NOTES.md):
- the inventory of every guest is one `GET /cluster/resources?type=vm`; a config read per guest
  that carries our tag fills in the rest;
- ownership is the owner tag plus a mark line in the description naming the platform and the
  resource address; nothing without both is ever changed;
- every mutating call that returns a task id (UPID) is awaited; the config `digest` read at
  observation is sent with every update, so a config changed since the plan is never overwritten;
- all client errors are turned into ours in `classify`, the one place that decides what is
  temporary and what is not.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import anyio
import requests
from proxmoxer import ProxmoxAPI
from proxmoxer.core import AuthenticationError, ResourceException

from reconciler.model.errors import (
    ConfigurationError,
    ConflictError,
    LockedError,
    OwnershipError,
    PermanentError,
    ProviderError,
    TaskFailedError,
    TemporaryError,
)
from reconciler.model.observed import ObservedResource
from reconciler.model.plans import Action, Change
from reconciler.model.resources import Kind
from reconciler.model.spec import ProxmoxApi, SecretRef
from reconciler.model.units import parse_mib

MARK_PREFIX = "reconciler:v1"
_MARK = re.compile(rf"^{re.escape(MARK_PREFIX)} (?P<body>.*)$", re.MULTILINE)

Sleep = Callable[[float], Awaitable[None]]
Clock = Callable[[], float]


# --- errors ------------------------------------------------------------------------------------

_TEMPORARY = (
    "can't lock file",
    "got timeout",
    "got no worker upid",
    "no quorum",
    "cluster not ready",
    "no route to host",
    "connection refused",
    "service unavailable",
    "bad gateway",
    "gateway timeout",
)
_CONFLICT = ("detected modified configuration", "checksum mismatch", "already exists")
_LOCKED = re.compile(r"(?:CT|VM) is locked \((?P<lock>\w+)\)")


def classify(exc: BaseException, context: str = "") -> ProviderError:
    """Turn any client exception into ours: temporary (retry), locked (wait), conflict
    (re-plan) or permanent (report)."""
    if isinstance(exc, ProviderError):
        return exc
    prefix = f"{context}: " if context else ""
    if isinstance(exc, ResourceException):
        detail = str(exc.content or exc.status_message or "")
        if exc.errors:
            detail += " " + "; ".join(f"{k}: {str(v).strip()}" for k, v in exc.errors.items())
        message = f"{prefix}{exc.status_code} {detail}".strip()
        lowered = detail.lower()
        status = int(exc.status_code)
        if _LOCKED.search(detail):
            return LockedError(message, status=status)
        if any(t in lowered for t in _TEMPORARY):
            return TemporaryError(message, status=status)
        if any(t in lowered for t in _CONFLICT):
            return ConflictError(message, status=status)
        if status >= 500 and status != 500:
            return TemporaryError(message, status=status)  # 502, 503, 504, 595 ...
        if status == 500 and not detail:
            return TemporaryError(message, status=status)
        return PermanentError(message, status=status)
    if isinstance(exc, AuthenticationError):
        return PermanentError(f"{prefix}authentication failed: {exc}")
    if isinstance(exc, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError)):
        return TemporaryError(f"{prefix}cannot reach Proxmox: {type(exc).__name__}")
    return PermanentError(f"{prefix}{type(exc).__name__}: {exc}")


# --- connecting ----------------------------------------------------------------------------


def read_secret(ref: SecretRef) -> str:
    """Resolve a secret reference. The value is returned, never logged."""
    if ref.env is not None:
        value = os.environ.get(ref.env)
        if value is None:
            raise ConfigurationError(f"environment variable {ref.env} (a secret) is not set")
        return value
    assert ref.file is not None
    try:
        return Path(ref.file).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigurationError(f"cannot read secret file {ref.file}: {exc.strerror}") from None


def connect(api: ProxmoxApi, *, insecure: bool = False, timeout: float = 15.0) -> ProxmoxAPI:
    url = urlparse(api.url)
    if not url.hostname:
        raise ConfigurationError(f"proxmox url {api.url!r} has no host")
    verify: bool | str = api.verify_tls and not insecure
    if verify and api.ca_file:
        if not Path(api.ca_file).is_file():
            raise ConfigurationError(f"CA file {api.ca_file} does not exist")
        verify = api.ca_file
    kwargs: dict[str, Any] = {
        "port": url.port or 8006,
        "user": api.user,
        "verify_ssl": verify,
        "timeout": timeout,
    }
    if api.token_id is not None:
        assert api.token_secret is not None
        kwargs["token_name"] = api.token_id
        kwargs["token_value"] = read_secret(api.token_secret)
    else:
        assert api.password is not None
        kwargs["password"] = read_secret(api.password)
    try:
        return ProxmoxAPI(url.hostname, **kwargs)
    except Exception as exc:  # login happens here for password auth
        raise classify(exc, f"connecting to {api.url}") from None


# --- ownership mark ------------------------------------------------------------------------


def mark_line(platform: str, address: str, template: str | None) -> str:
    parts = [f"platform={platform}", f"address={address}"]
    if template:
        parts.append(f"template={template}")
    return f"{MARK_PREFIX} {' '.join(parts)}"


def with_mark(description: str, platform: str, address: str, template: str | None) -> str:
    body = description.rstrip("\n")
    mark = mark_line(platform, address, template)
    return f"{body}\n\n{mark}" if body else mark


def read_mark(description: str | None) -> tuple[dict[str, str], str]:
    """Description -> (mark fields, the description without the mark)."""
    text = description or ""
    m = _MARK.search(text)
    if not m:
        return {}, text
    fields = dict(p.split("=", 1) for p in m.group("body").split() if "=" in p)
    rest = (text[: m.start()] + text[m.end() :]).strip("\n")
    return fields, rest


# --- observation ---------------------------------------------------------------------------


@dataclass
class Inventory:
    """One `/cluster/resources` answer, the cheap view of every guest."""

    guests: list[dict[str, Any]]


def _tags(value: Any) -> list[str]:
    return sorted({t for t in str(value or "").split(";") if t})


def guest_attributes(item: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """A guest's Proxmox config -> our attribute shape (normalization finishes in planning)."""
    kind = item.get("type", "lxc")
    mark, description = read_mark(config.get("description"))
    attrs: dict[str, Any] = {
        "name": config.get("hostname") or config.get("name") or item.get("name"),
        "vmid": int(item["vmid"]),
        "node": item.get("node"),
        "type": kind,
        "template": mark.get("template"),
        "cores": int(config.get("cores", item.get("maxcpu", 1))),
        "memory": int(config.get("memory", 512)),
        "tags": _tags(config.get("tags", item.get("tags"))),
        "onboot": bool(int(config.get("onboot", 0))),
        "state": "running" if item.get("status") == "running" else "stopped",
        "description": description,
        "net": {k: str(v) for k, v in sorted(config.items()) if re.fullmatch(r"net\d+", k)},
    }
    if kind == "lxc":
        attrs["swap"] = int(config.get("swap", 512))
        attrs["rootfs"] = config.get("rootfs")
        attrs["features"] = config.get("features", "")
        attrs["unprivileged"] = bool(int(config.get("unprivileged", 0)))
    return attrs


# --- the provider --------------------------------------------------------------------------


@dataclass
class RetryPolicy:
    attempts: int = 6
    initial: float = 0.2
    maximum: float = 5.0
    lock_timeout: float = 600.0  # a backup can hold a lock for minutes
    task_timeout: float = 900.0
    task_poll: float = 0.05
    task_poll_max: float = 2.0


@dataclass
class ProxmoxProvider:
    """Guests on one Proxmox API endpoint (a cluster, or a single node)."""

    client: ProxmoxAPI
    platform: str
    owner_tag: str = "reconciler"
    source: str = ""
    concurrency: int = 8
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    sleep: Sleep = anyio.sleep
    clock: Clock = time.monotonic
    calls: int = 0
    retries: int = 0
    _limiter: anyio.CapacityLimiter | None = None

    kinds = frozenset({Kind.GUEST})

    # Every Proxmox call goes through here: one thread hop, one count, one error translation.
    async def call(self, what: str, fn: Callable[[], Any]) -> Any:
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.concurrency)
        self.calls += 1
        try:
            return await anyio.to_thread.run_sync(fn, limiter=self._limiter)
        except Exception as exc:
            raise classify(exc, what) from None

    async def retrying(self, what: str, fn: Callable[[], Any]) -> Any:
        """Retry temporary errors with jittered exponential backoff; wait out config locks."""
        from tenacity import (
            AsyncRetrying,
            retry_if_exception,
            stop_after_attempt,
            wait_random_exponential,
        )

        started = self.clock()
        while True:
            try:
                async for attempt in AsyncRetrying(
                    retry=retry_if_exception(
                        lambda e: isinstance(e, TemporaryError) and not isinstance(e, LockedError)
                    ),
                    wait=wait_random_exponential(
                        multiplier=self.retry.initial, max=self.retry.maximum
                    ),
                    stop=stop_after_attempt(self.retry.attempts),
                    sleep=self.sleep,
                    reraise=True,
                    before_sleep=self._count_retry,
                ):
                    with attempt:
                        return await self.call(what, fn)
            except LockedError:
                if self.clock() - started > self.retry.lock_timeout:
                    raise
                self.retries += 1
                await self.sleep(min(self.retry.maximum, 2.0))

    def _count_retry(self, _state: Any) -> None:
        self.retries += 1

    async def inventory(self) -> Inventory:
        items = await self.retrying(
            "read inventory", lambda: self.client.cluster.resources.get(type="vm")
        )
        return Inventory([i for i in items if i.get("type") in ("lxc", "qemu")])

    async def observe(self) -> list[ObservedResource]:
        """Every guest: inventory in one call, config only for guests carrying our tag."""
        inv = await self.inventory()
        out: list[ObservedResource] = []

        async def read(item: dict[str, Any]) -> None:
            out.append(await self.observe_guest(item))

        async with anyio.create_task_group() as tg:
            for item in inv.guests:
                if item.get("template"):
                    continue
                if self.owner_tag in _tags(item.get("tags")):
                    tg.start_soon(read, item)
                else:
                    out.append(self._foreign(item))
        return sorted(out, key=lambda r: r.id["vmid"])

    def _foreign(self, item: Mapping[str, Any]) -> ObservedResource:
        return ObservedResource(
            kind=Kind.GUEST,
            owned=False,
            id={"vmid": int(item["vmid"]), "node": item.get("node")},
            attributes={
                "name": item.get("name"),
                "vmid": int(item["vmid"]),
                "node": item.get("node"),
                "type": item.get("type"),
                "state": "running" if item.get("status") == "running" else "stopped",
                "tags": _tags(item.get("tags")),
            },
        )

    async def observe_guest(self, item: Mapping[str, Any]) -> ObservedResource:
        node, vmid, kind = item["node"], int(item["vmid"]), item.get("type", "lxc")
        config = await self.retrying(
            f"read config of {vmid}",
            lambda: self.client.nodes(node)(kind)(vmid).config.get(),
        )
        mark, _ = read_mark(config.get("description"))
        if mark.get("platform") != self.platform or not mark.get("address"):
            return self._foreign(item)  # our tag alone, perhaps copied by hand: not ours
        return ObservedResource(
            address=mark["address"],
            kind=Kind.GUEST,
            owned=True,
            id={"vmid": vmid, "node": node},
            attributes=guest_attributes(item, config),
            version=config.get("digest"),
        )

    # --- apply -----------------------------------------------------------------------------

    async def apply(self, change: Change) -> None:
        if change.kind is not Kind.GUEST:
            raise PermanentError(f"{change.address}: no provider for kind {change.kind.value}")
        match change.action:
            case Action.CREATE:
                await self.create_guest(change)
            case Action.UPDATE:
                await self.update_guest(change)
            case Action.REPLACE:
                await self.destroy_guest(change)
                await self.create_guest(change)
            case Action.DELETE:
                await self.destroy_guest(change)
            case Action.NOOP:
                return

    def _guest(self, change: Change) -> Any:
        kind = (change.after or change.before or {}).get("type", "lxc")
        return self.client.nodes(change.id["node"])(kind)(change.id["vmid"])

    async def create_guest(self, change: Change) -> None:
        assert change.after is not None
        want = change.after
        node, vmid = change.id["node"], change.id["vmid"]
        params = create_params(self.platform, change.address, want)
        endpoint = self.client.nodes(node)(want.get("type", "lxc"))
        try:
            upid = await self.retrying(f"create {vmid}", lambda: endpoint.post(**params))
        except ConflictError:
            # "already exists": done only if it is ours, for this very address (a retry after
            # a lost reply, or a crash after the create). Anything else is a race we lost.
            if await self._owned_by(node, vmid, want.get("type", "lxc"), change.address):
                return
            raise ConflictError(
                f"{change.address}: vmid {vmid} was taken by someone else while applying; re-plan"
            ) from None
        await self.wait_task(node, upid, f"create {change.address}")

    async def _owned_by(self, node: str, vmid: int, kind: str, address: str) -> bool:
        try:
            config = await self.retrying(
                f"read config of {vmid}", lambda: self.client.nodes(node)(kind)(vmid).config.get()
            )
        except PermanentError:
            return False
        mark, _ = read_mark(config.get("description"))
        return mark.get("platform") == self.platform and mark.get("address") == address

    async def _checked_config(self, change: Change) -> dict[str, Any]:
        """Read the config fresh, and refuse unless it is ours and unchanged since the plan."""
        guest = self._guest(change)
        config: dict[str, Any] = await self.retrying(
            f"read config of {change.id['vmid']}", lambda: guest.config.get()
        )
        mark, _ = read_mark(config.get("description"))
        if mark.get("platform") != self.platform or mark.get("address") != change.address:
            raise OwnershipError(
                f"{change.address}: vmid {change.id['vmid']} does not carry "
                "our mark; it will not be touched"
            )
        if change.version is not None and config.get("digest") != change.version:
            raise ConflictError(
                f"{change.address}: its config changed since the plan was made; re-plan"
            )
        return config

    async def update_guest(self, change: Change) -> None:
        assert change.after is not None
        config = await self._checked_config(change)
        guest = self._guest(change)
        paths = {f.path for f in change.fields}
        params, delete = update_params(self.platform, change.address, change.after, config, paths)
        if params or delete:
            if delete:
                params["delete"] = ",".join(delete)
            params["digest"] = config["digest"]
            result = await self.retrying(
                f"update {change.address}", lambda: guest.config.put(**params)
            )
            if isinstance(result, str) and result.startswith("UPID:"):
                await self.wait_task(change.id["node"], result, f"update {change.address}")
        if "rootfs.size" in paths:
            size = change.after["rootfs"]["size"]
            upid = await self.retrying(
                f"resize {change.address}", lambda: guest.resize.put(disk="rootfs", size=size)
            )
            if isinstance(upid, str) and upid.startswith("UPID:"):
                await self.wait_task(change.id["node"], upid, f"resize {change.address}")
        if "state" in paths:
            await self.set_state(change, change.after["state"])

    async def set_state(self, change: Change, state: str) -> None:
        guest = self._guest(change)
        if state == "running":
            upid = await self.retrying(f"start {change.address}", lambda: guest.status.start.post())
        else:
            upid = await self.retrying(
                f"stop {change.address}",
                lambda: guest.status.shutdown.post(timeout=60, forceStop=1),
            )
        await self.wait_task(change.id["node"], upid, f"{state} {change.address}")

    async def destroy_guest(self, change: Change) -> None:
        """Stop, then destroy with purge; only a guest that carries our mark for this address."""
        guest = self._guest(change)
        try:
            await self._checked_config(change.__class__(**{**change.__dict__, "version": None}))
        except PermanentError as exc:
            if "does not exist" in str(exc):
                return  # already gone: a re-run after a crash
            raise
        status = await self.retrying(
            f"status of {change.address}", lambda: guest.status.current.get()
        )
        if status.get("status") == "running":
            upid = await self.retrying(f"stop {change.address}", lambda: guest.status.stop.post())
            await self.wait_task(change.id["node"], upid, f"stop {change.address}")
        upid = await self.retrying(
            f"destroy {change.address}",
            lambda: guest.delete(purge=1, **{"destroy-unreferenced-disks": 1}),
        )
        await self.wait_task(change.id["node"], upid, f"destroy {change.address}")

    async def wait_task(self, node: str, upid: Any, what: str) -> None:
        """Poll a task until it stops; `OK` and `WARNINGS: n` succeed, anything else fails with
        the log's last lines."""
        if not isinstance(upid, str) or not upid.startswith("UPID:"):
            return  # a synchronous call
        task = self.client.nodes(node).tasks(upid)
        deadline = self.clock() + self.retry.task_timeout
        delay = self.retry.task_poll
        while True:
            status = await self.retrying(f"{what}: task status", lambda: task.status.get())
            if status.get("status") == "stopped":
                break
            if self.clock() > deadline:
                raise TemporaryError(
                    f"{what}: task {upid} still running after {self.retry.task_timeout:g} s"
                )
            await self.sleep(delay)
            delay = min(delay * 1.5, self.retry.task_poll_max)
        exit_status = str(status.get("exitstatus", ""))
        if exit_status == "OK" or exit_status.startswith("WARNINGS"):
            return
        try:
            log = await self.call(f"{what}: task log", lambda: task.log.get(limit=500))
            tail = tuple(str(line.get("t", "")) for line in log[-5:])
        except ProviderError:
            tail = ()
        if _LOCKED.search(exit_status):
            raise LockedError(f"{what}: {exit_status}")
        if any(t in exit_status.lower() for t in _TEMPORARY):
            raise TemporaryError(f"{what}: {exit_status}")
        raise TaskFailedError(f"{what}: {exit_status}", log_tail=tail)


# --- request parameters ----------------------------------------------------------------------


def _gib(size: str) -> str:
    mib = parse_mib(size, bare_unit="G")
    gib = mib / 1024
    return str(int(gib)) if gib == int(gib) else f"{gib:g}"


def create_params(platform: str, address: str, want: Mapping[str, Any]) -> dict[str, Any]:
    kind = want.get("type", "lxc")
    params: dict[str, Any] = {
        "vmid": want["vmid"],
        "cores": want["cores"],
        "memory": want["memory"],
        "onboot": int(want["onboot"]),
        "tags": ";".join(want["tags"]),
        "description": with_mark(
            want.get("description", ""), platform, address, want.get("template")
        ),
        "start": int(want["state"] == "running"),
    }
    rootfs = want.get("rootfs") or {}
    if kind == "lxc":
        params.update(
            {
                "hostname": want["name"],
                "ostemplate": want["template"],
                "swap": want["swap"],
                "unprivileged": int(want["unprivileged"]),
                "rootfs": f"{rootfs['storage']}:{_gib(rootfs['size'])}",
            }
        )
        if want.get("features"):
            params["features"] = want["features"]
        params.update(dict(want.get("net") or {}))
    else:
        params["name"] = want["name"]
        params["scsi0"] = f"{rootfs['storage']}:{_gib(rootfs['size'])}"
    return params


_PLAIN_KEYS = ("cores", "memory", "swap", "features")


def update_params(
    platform: str,
    address: str,
    want: Mapping[str, Any],
    config: Mapping[str, Any],
    paths: Iterable[str],
) -> tuple[dict[str, Any], list[str]]:
    """The config PUT for the changed fields. netN keeps its MAC: Proxmox would give it a new
    one otherwise (and so would we, every run)."""
    from reconciler.planning.normalize import parse_kv

    paths = set(paths)
    params: dict[str, Any] = {}
    delete: list[str] = []
    for key in _PLAIN_KEYS:
        if key in paths:
            if key == "features" and not want[key]:
                delete.append("features")
            else:
                params[key] = want[key]
    if "name" in paths:
        params["hostname"] = want["name"]
    if "tags" in paths:
        params["tags"] = ";".join(want["tags"])
    if "onboot" in paths:
        params["onboot"] = int(want["onboot"])
    if "description" in paths or "template" in paths:
        params["description"] = with_mark(
            want.get("description", ""), platform, address, want.get("template")
        )
    for path in sorted(p for p in paths if p.startswith("net.")):
        key = path.split(".", 1)[1]
        value = (want.get("net") or {}).get(key)
        if value is None:
            delete.append(key)
            continue
        current = parse_kv(str(config.get(key, "")))
        if "hwaddr" in current and "hwaddr=" not in value:
            value += f",hwaddr={current['hwaddr']}"
        params[key] = value
    return params, delete
