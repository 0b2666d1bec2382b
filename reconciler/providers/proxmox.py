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
- all client errors, and the exit status of every task that failed, are turned into ours in
  `classify`, the one place that decides what is temporary and what is not;
- temporary errors are retried with jittered exponential backoff, a config lock (`backup`,
  `migrate`, ...) is waited out up to `RetryPolicy.lock_timeout`, both on the injected `sleep`
  and `clock`; a guest whose create or destroy task is still running is waited for before it is
  judged ours or foreign (during a create Proxmox shows it without tags or description);
- a QEMU VM is created empty (no template): one disk, `scsi0` on virtio-scsi-single, virtio NICs,
  ostype l26. Its config is read with its pending values, what it runs with after its next
  start (a running VM takes cores and memory changes only then, unless hotplugged). Proxmox's
  config view merges them in already; fakepve's QEMU view does not, so they are read from
  `pending`, which both answer alike.

Errors (reconciler.model.errors), as `classify` hands them out:

    ProviderError
    ├── TemporaryError        5xx from a proxy, 595, "no quorum", "can't lock file", no worker
    │   └── LockedError       "CT is locked (backup)": waited out, not retried on a budget
    └── PermanentError        everything else: reported
        ├── NotFoundError     "Configuration file ... does not exist" (here: the guest is gone)
        ├── ConflictError     stale digest, "already exists": re-observe and re-plan
        ├── TaskFailedError   a task's exit status, with the task log's last lines
        └── OwnershipError    raised by the provider itself: the guest lacks our mark
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
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
    NotFoundError,
    OwnershipError,
    PermanentError,
    ProviderError,
    TaskFailedError,
    TemporaryError,
)
from reconciler.model.observed import ObservedResource
from reconciler.model.plans import HOLD_START, Action, Change
from reconciler.model.resources import Kind
from reconciler.model.spec import ProxmoxApi, SecretRef
from reconciler.model.units import parse_kv, parse_mib
from reconciler.providers.backoff import backoff

MARK_PREFIX = "reconciler:v1"
_MARK = re.compile(rf"^{re.escape(MARK_PREFIX)} (?P<body>.*)$", re.MULTILINE)

# A VM's one disk (its boot disk, observed and compared as `rootfs`), and what a VM is created
# with besides the spec's fields: an empty Linux VM, booting from that disk.
QEMU_DISK = "scsi0"
_QEMU_CREATE = {"scsihw": "virtio-scsi-single", "ostype": "l26"}

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
_NOT_FOUND = re.compile(r"Configuration file '[^']*' does not exist")
_LOCKED = re.compile(r"(?:CT|VM) is locked \((?P<lock>[\w-]+)\)")
_TASK_LOG_LINES = 5


class TaskExit(Exception):
    """A Proxmox task stopped with an exit status other than OK. Raised inside the provider and
    turned into ours by `classify`, like any client error."""

    def __init__(self, exit_status: str, log_tail: tuple[str, ...] = ()) -> None:
        super().__init__(exit_status)
        self.exit_status = exit_status
        self.log_tail = log_tail


def _by_text(text: str, message: str, status: int | None) -> ProviderError | None:
    if _LOCKED.search(text):
        return LockedError(message, status=status)
    lowered = text.lower()
    if any(t in lowered for t in _TEMPORARY):
        return TemporaryError(message, status=status)
    if any(t in lowered for t in _CONFLICT):
        return ConflictError(message, status=status)
    if _NOT_FOUND.search(text):
        return NotFoundError(message, status=status)
    return None


def classify(exc: BaseException, context: str = "") -> ProviderError:
    """Turn any client exception, or a failed task, into ours: temporary (retry), locked (wait),
    conflict (re-plan), not found, task failed, or permanent (report)."""
    if isinstance(exc, ProviderError):
        return exc
    prefix = f"{context}: " if context else ""
    if isinstance(exc, TaskExit):
        message = f"{prefix}{exc.exit_status}"
        if exc.log_tail:
            message += "; task log: " + " / ".join(exc.log_tail)
        found = _by_text(exc.exit_status, message, None)
        if isinstance(found, TemporaryError):
            return found
        return TaskFailedError(message, log_tail=exc.log_tail)
    if isinstance(exc, ResourceException):
        detail = str(exc.content or exc.status_message or "")
        if exc.errors:
            detail += " " + "; ".join(f"{k}: {str(v).strip()}" for k, v in exc.errors.items())
        status = int(exc.status_code)
        message = f"{prefix}{status} {detail}".strip()
        found = _by_text(detail, message, status)
        if found is not None:
            return found
        if status > 500 and status != 501:
            return TemporaryError(message, status=status)  # 502, 503, 504, 595 ...
        if status == 500 and not detail:
            return TemporaryError(message, status=status)
        return PermanentError(message, status=status)
    if isinstance(exc, AuthenticationError):
        return PermanentError(f"{prefix}authentication failed: {exc}")
    if isinstance(exc, requests.exceptions.SSLError):
        # Retrying cannot fix a certificate we do not trust: say how to fix it instead.
        return PermanentError(
            f"{prefix}TLS verification failed (SSLError): give the cluster's CA as ca_file "
            "(/etc/pve/pve-root-ca.pem on a node), or --insecure in a lab"
        )
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


def _memory(value: Any) -> int:
    """MiB: QEMU answers with a string, `"2048"` or `"current=2048"`."""
    if isinstance(value, str):
        kv = parse_kv(value)
        value = kv.get("current") or kv.get("volume") or value
    return int(value)


def with_pending(config: Mapping[str, Any], pending: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """A config with its pending changes applied: what the guest runs with after its next start."""
    out = dict(config)
    for item in pending:
        key = str(item.get("key", ""))
        if item.get("delete"):
            out.pop(key, None)
        elif "pending" in item:
            out[key] = item["pending"]
    return out


def guest_attributes(item: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """A guest's Proxmox config -> our attribute shape (normalization finishes in planning). A
    VM has no template, swap, features or unprivileged flag; its boot disk is `rootfs`."""
    kind = item.get("type", "lxc")
    mark, description = read_mark(config.get("description"))
    attrs: dict[str, Any] = {
        "name": config.get("hostname") or config.get("name") or item.get("name"),
        "vmid": int(item["vmid"]),
        "node": item.get("node"),
        "type": kind,
        "template": mark.get("template"),
        "cores": int(config.get("cores", item.get("maxcpu", 1))),
        "memory": _memory(config.get("memory", 512)),
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
    else:
        del attrs["template"]
        attrs["rootfs"] = config.get(QEMU_DISK)
    return attrs


# --- the provider --------------------------------------------------------------------------

# Locks held by a create or destroy task: the guest's identity (our mark, or the guest itself)
# is only known once the task has ended, so observation waits for them.
_TRANSIENT_LOCKS = frozenset({"create", "destroyed"})


@dataclass
class RetryPolicy:
    attempts: int = 6  # tries of one call that meets temporary errors
    initial: float = 0.2  # backoff: a random delay up to initial * 2**n, capped at maximum
    maximum: float = 5.0
    lock_timeout: float = 600.0  # a backup can hold a lock for minutes
    lock_poll: float = 2.0
    task_timeout: float = 900.0
    task_poll: float = 0.05
    task_poll_max: float = 2.0


@dataclass
class _Tries:
    """What one operation has spent of its retry policy so far."""

    temporary: int = 0
    locked_since: float | None = None


def _is_upid(value: Any) -> bool:
    return isinstance(value, str) and value.startswith("UPID:")


def _without_lock(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in ("lock", "digest")}


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
    calls: int = 0  # Proxmox API calls made
    retries: int = 0  # calls (or tasks) repeated after a temporary error
    waits: int = 0  # polls while waiting for a lock to clear
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

    async def again(self, error: ProviderError, tries: _Tries) -> None:
        """Sleep before the next try, or raise `error` when the policy says stop: a temporary
        error gets `attempts` tries with jittered exponential backoff; a lock is waited out,
        polling every `lock_poll` s for up to `lock_timeout` s; anything else is raised."""
        if isinstance(error, LockedError):
            now = self.clock()
            if tries.locked_since is None:
                tries.locked_since = now
            if now - tries.locked_since >= self.retry.lock_timeout:
                raise error
            self.waits += 1
            await self.sleep(self.retry.lock_poll)
            return
        if not isinstance(error, TemporaryError):
            raise error
        tries.temporary += 1
        if tries.temporary >= self.retry.attempts:
            raise error
        self.retries += 1
        await self.sleep(self._backoff(tries.temporary))

    def _backoff(self, attempt: int) -> float:
        return backoff(attempt, initial=self.retry.initial, maximum=self.retry.maximum)

    async def retrying(self, what: str, fn: Callable[[], Any]) -> Any:
        """One call under the retry policy (see `again`)."""
        tries = _Tries()
        while True:
            try:
                return await self.call(what, fn)
            except TemporaryError as exc:
                await self.again(exc, tries)

    async def inventory(self) -> Inventory:
        items = await self.retrying(
            "read inventory", lambda: self.client.cluster.resources.get(type="vm")
        )
        return Inventory([i for i in items if i.get("type") in ("lxc", "qemu")])

    async def settled_inventory(self) -> Inventory:
        """The inventory once no create or destroy task holds a guest. A guest being created
        shows neither our tag nor our mark yet: judged then, an interrupted create of ours
        would look foreign (an errored plan, or a second guest under another vmid). Gives up
        after `lock_timeout` and returns what it sees: a create stuck for good stays foreign."""
        tries = _Tries()
        while True:
            inv = await self.inventory()
            busy = [g for g in inv.guests if g.get("lock") in _TRANSIENT_LOCKS]
            if not busy:
                return inv
            try:
                await self.again(
                    LockedError(f"guest {busy[0]['vmid']} is locked ({busy[0]['lock']})"), tries
                )
            except LockedError:
                return inv

    async def observe(self) -> list[ObservedResource]:
        """Every guest: inventory in one call, config only for guests carrying our tag."""
        inv = await self.settled_inventory()
        out: list[ObservedResource] = []

        async def read(item: dict[str, Any]) -> None:
            # Destroyed since the inventory was read: it is not there.
            with contextlib.suppress(NotFoundError):
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
        guest = self.client.nodes(node)(kind)(vmid)
        config = await self.retrying(f"read config of {vmid}", lambda: guest.config.get())
        if kind == "qemu":
            pending = await self.retrying(
                f"read pending config of {vmid}", lambda: guest.pending.get()
            )
            config = with_pending(config, pending)
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
                await self.destroy_guest(_observed_side(change))
                await self.create_guest(change)
            case Action.DELETE:
                await self.destroy_guest(change)
            case Action.NOOP:
                return

    def _kind(self, change: Change) -> str:
        return str((change.after or change.before or {}).get("type", "lxc"))

    def _guest(self, change: Change) -> Any:
        return self.client.nodes(change.id["node"])(self._kind(change))(change.id["vmid"])

    async def run_task(self, what: str, node: str, start: Callable[[], Any]) -> None:
        """Make a call that may start a task, and wait for the task. A task that ends on a lock
        or another temporary failure (Proxmox reports those in the exit status, not as an HTTP
        error) is started again under the same policy. A task still running at `task_timeout`
        is not: it may yet finish, and the next run observes what it did."""
        tries = _Tries()
        while True:
            upid = await self.retrying(what, start)
            if not _is_upid(upid):
                return  # a synchronous call, done
            error = await self.wait_task(node, upid, what)
            if error is None:
                return
            await self.again(error, tries)

    async def wait_task(self, node: str, upid: str, what: str) -> ProviderError | None:
        """Poll a task until it stops: None when it succeeded (`OK`, `WARNINGS: n`), else its
        error, with the log's last lines. Raises TemporaryError at `task_timeout`."""
        task = self.client.nodes(node).tasks(upid)
        deadline = self.clock() + self.retry.task_timeout
        delay = self.retry.task_poll
        while True:
            status = await self.retrying(f"{what}: task status", lambda: task.status.get())
            if status.get("status") == "stopped":
                break
            if self.clock() >= deadline:
                raise TemporaryError(
                    f"{what}: task {upid} still running after {self.retry.task_timeout:g} s"
                )
            await self.sleep(delay)
            delay = min(delay * 1.5, self.retry.task_poll_max)
        exit_status = str(status.get("exitstatus", ""))
        if exit_status == "OK" or exit_status.startswith("WARNINGS"):
            return None
        try:
            log = await self.call(f"{what}: task log", lambda: task.log.get(limit=500))
            tail = tuple(str(line.get("t", "")) for line in log[-_TASK_LOG_LINES:])
        except ProviderError:
            tail = ()
        return classify(TaskExit(exit_status, tail), what)

    async def config_when_unlocked(
        self, guest: Any, what: str, locks: frozenset[str] | None = None
    ) -> dict[str, Any]:
        """The guest's config once it holds none of `locks` (None: no lock at all), waiting
        under the lock policy; LockedError when the lock outlasts it."""
        tries = _Tries()
        while True:
            config: dict[str, Any] = await self.retrying(what, lambda: guest.config.get())
            lock = config.get("lock")
            if not lock or (locks is not None and lock not in locks):
                return config
            await self.again(LockedError(f"{what}: CT is locked ({lock})"), tries)

    async def create_guest(self, change: Change) -> None:
        assert change.after is not None
        want = change.after
        node, vmid = change.id["node"], change.id["vmid"]
        params = create_params(self.platform, change.address, want)
        endpoint = self.client.nodes(node)(self._kind(change))
        try:
            await self.run_task(f"create {change.address}", node, lambda: endpoint.post(**params))
        except ConflictError:
            # "already exists": done only if it is ours, for this very address (a retry after
            # a lost reply, or a run cancelled after the POST). Anything else is a race we lost.
            if await self._owned_by(change):
                return
            raise ConflictError(
                f"{change.address}: vmid {vmid} was taken by someone else while applying; re-plan"
            ) from None

    async def _owned_by(self, change: Change) -> bool:
        """Does the guest at the change's vmid carry our mark for its address? A guest whose
        create task still runs has no description yet: wait for the task to end."""
        what = f"read config of {change.id['vmid']}"
        try:
            config = await self.config_when_unlocked(self._guest(change), what, _TRANSIENT_LOCKS)
        except (NotFoundError, LockedError):
            return False
        mark, _ = read_mark(config.get("description"))
        return mark.get("platform") == self.platform and mark.get("address") == change.address

    def _check_mark(self, change: Change, config: Mapping[str, Any]) -> None:
        mark, _ = read_mark(config.get("description"))
        if mark.get("platform") != self.platform or mark.get("address") != change.address:
            raise OwnershipError(
                f"{change.address}: vmid {change.id['vmid']} does not carry "
                "our mark; it will not be touched"
            )

    async def _checked_config(self, change: Change) -> dict[str, Any]:
        """Read the config fresh once no lock holds it, and refuse unless it is ours and
        unchanged since the plan. A lock that comes and goes is not a change: the digest is
        compared after it is gone, and if the plan itself saw the lock, the config must be the
        one it saw, less the lock."""
        guest = self._guest(change)
        what = f"read config of {change.id['vmid']}"
        seen: dict[str, Any] = await self.retrying(what, lambda: guest.config.get())
        self._check_mark(change, seen)
        config = seen
        if seen.get("lock"):
            config = await self.config_when_unlocked(guest, what)
            self._check_mark(change, config)
        if change.version is None or config.get("digest") == change.version:
            return config
        if seen.get("digest") == change.version and _without_lock(seen) == _without_lock(config):
            return config
        raise ConflictError(
            f"{change.address}: its config changed since the plan was made; re-plan"
        )

    async def update_guest(self, change: Change) -> None:
        assert change.after is not None
        config = await self._checked_config(change)
        guest = self._guest(change)
        node = change.id["node"]
        paths = {f.path for f in change.fields}
        params, delete = update_params(self.platform, change.address, change.after, config, paths)
        if params or delete:
            if delete:
                params["delete"] = ",".join(delete)
            params["digest"] = config["digest"]
            await self.run_task(
                f"update {change.address}", node, lambda: guest.config.put(**params)
            )
        if "rootfs.size" in paths:
            size = change.after["rootfs"]["size"]
            disk = QEMU_DISK if self._kind(change) == "qemu" else "rootfs"
            await self.run_task(
                f"resize {change.address}",
                node,
                lambda: guest.resize.put(disk=disk, size=size),
            )
        if "state" in paths and not change.after.get(HOLD_START):
            await self.set_state(change, change.after["state"])

    async def set_state(self, change: Change, state: str) -> None:
        guest = self._guest(change)
        node = change.id["node"]
        if state == "running":
            await self.run_task(f"start {change.address}", node, lambda: guest.status.start.post())
        else:
            await self.run_task(
                f"stop {change.address}",
                node,
                lambda: guest.status.shutdown.post(timeout=60, forceStop=1),
            )

    async def destroy_guest(self, change: Change) -> None:
        """Stop, then destroy with purge; only a guest that carries our mark for this address."""
        guest = self._guest(change)
        node = change.id["node"]
        try:
            await self._checked_config(replace(change, version=None))
        except NotFoundError:
            return  # already gone: a re-run after a crash
        if await self._power(change) == "running":
            await self.run_task(f"stop {change.address}", node, lambda: guest.status.stop.post())
            await self._until_stopped(change)
        await self.run_task(
            f"destroy {change.address}",
            node,
            lambda: guest.delete(purge=1, **{"destroy-unreferenced-disks": 1}),
        )

    async def power(self, change: Change) -> str:
        """The guest's power state now: running, stopped (one status read)."""
        return await self._power(change)

    async def _power(self, change: Change) -> str:
        guest = self._guest(change)
        status = await self.retrying(
            f"status of {change.address}", lambda: guest.status.current.get()
        )
        return str(status.get("status"))

    async def _until_stopped(self, change: Change) -> None:
        """The stop task of an HA-managed guest only asks the HA manager, which stops the guest
        later: destroying it before then fails ("container is running")."""
        deadline = self.clock() + self.retry.task_timeout
        while await self._power(change) == "running":
            if self.clock() >= deadline:
                raise TemporaryError(f"{change.address}: still running after its stop task")
            await self.sleep(self.retry.task_poll)


def _observed_side(change: Change) -> Change:
    """A replace's old guest, to destroy: its kind and node are what was observed (a kind or node
    change is what forced the replace), not what is wanted."""
    before = change.before or {}
    node = before.get("node") or change.id["node"]
    return replace(change, after=None, id={**change.id, "node": node})


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
        "start": int(want["state"] == "running" and not want.get(HOLD_START)),
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
        params.update(
            {
                "name": want["name"],
                QEMU_DISK: f"{rootfs['storage']}:{_gib(rootfs['size'])}",
                **_QEMU_CREATE,
            }
        )
        params.update(dict(want.get("net") or {}))
    return params


_PLAIN_KEYS = ("cores", "memory", "swap", "features")
_MAC = re.compile(r"^[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){5}$")


def _keep_mac(kind: str, value: str, current: str) -> str:
    """The desired netN with the MAC the NIC has now, unless the spec pins one: LXC's
    `hwaddr=MAC`, QEMU's `virtio=MAC` (or `macaddr=MAC`)."""
    if kind != "qemu":
        mac = parse_kv(current).get("hwaddr")
        return f"{value},hwaddr={mac}" if mac and "hwaddr=" not in value else value
    mac = _qemu_mac(current)
    model, sep, rest = value.partition(",")
    if mac is None or "=" in model:
        return value
    return f"{model}={mac}{sep}{rest}"


def _qemu_mac(net: str) -> str | None:
    """The MAC of a VM's netN: the value of its model's key (`virtio=MAC`) or of `macaddr`."""
    for part in net.split(","):
        value = part.partition("=")[2].strip()
        if _MAC.match(value):
            return value
    return None


def update_params(
    platform: str,
    address: str,
    want: Mapping[str, Any],
    config: Mapping[str, Any],
    paths: Iterable[str],
) -> tuple[dict[str, Any], list[str]]:
    """The config PUT for the changed fields. netN keeps its MAC: Proxmox would give it a new
    one otherwise (and so would we, every run). A VM's name is `name`, a container's
    `hostname`."""
    paths = set(paths)
    kind = str(want.get("type", "lxc"))
    params: dict[str, Any] = {}
    delete: list[str] = []
    for key in _PLAIN_KEYS:
        if key in paths:
            if key == "features" and not want[key]:
                delete.append("features")
            else:
                params[key] = want[key]
    if "name" in paths:
        params["name" if kind == "qemu" else "hostname"] = want["name"]
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
        params[key] = _keep_mac(kind, value, str(config.get(key, "")))
    return params, delete
