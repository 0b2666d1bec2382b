"""Proxmox VE guests: observe them and apply guest changes, through proxmoxer.

Called by the CLI (`observe`, `plan`, `apply`) and the controller. Blocking proxmoxer calls run
in worker threads (anyio.to_thread), each holding a slot of one `AdaptiveLimit` per API
(reconciler.providers.pacing: `concurrency` in flight at most, halved while Proxmox answers 429
or 503), so observation and apply are concurrent but bounded.

What it knows of Proxmox, and relies on (the README's "Live" section says what it means for
an operator):
- the inventory of every guest is one `GET /cluster/resources` (every type: its node and
  storage items are the cluster facts of `observe_cluster`, at no extra call); a config read
  per guest that carries our tag fills in the rest;
- every guest takes its vmid, templates included: a template (`template: 1`) is observed as
  foreign, whatever its tags or mark say, and is never read further, changed or deleted;
- ownership is the owner tag plus a mark line in the description naming the platform and the
  resource address; nothing without both is ever changed. The mark is the description's last
  line (`with_mark` writes it there, `read_mark` reads nowhere else), so a mark quoted in a
  guest's notes claims nothing. A copy made by hand carries the mark too: two guests claim one
  address, and the planner makes that an error and touches neither;
- every mutating call that returns a task id (UPID) is awaited; the config `digest` read at
  observation is sent with every update, so a config changed since the plan is never overwritten;
- all client errors, and the exit status of every task that failed, are turned into ours in
  `classify`, the one place that decides what is temporary and what is not;
- temporary errors are retried with jittered exponential backoff, a config lock (`backup`,
  `migrate`, ...) is waited out up to `RetryPolicy.lock_timeout`, both on the injected `sleep`
  and `clock`; a guest whose create or destroy task is still running is waited for before it is
  judged ours or foreign (during a create Proxmox shows it without tags or description);
- volumes (a container's `mpN`; a VM's disks on every bus, `scsiN`, `virtioN`, `sataN`,
  `ideN`, its boot disk among them) are created with the guest or added in place in the
  allocation form (`local-lvm:50,mp=/data`), changed in place with their volume id kept,
  grown with `resize`; never moved (but by a VM's migration, `targetstorage`), never shrunk;
  detached (`delete`, Proxmox keeps the volume as `unusedN`) only in a change the planner
  allowed. A VM's CD-ROMs, cloud-init drive, `efidisk0`, `tpmstate0` and `unusedN` are none
  of its volumes: never compared, changed or detached. The disk it boots from is the first
  disk of `boot: order=` (model.disks), `boot_disk`: a VM is created booting from the spec's,
  and the order is rewritten (that disk moved first among the disks) when it differs;
- `protection` is set and healed like any setting, and lifted by the controller only in
  `destroy_guest`, right before an allowed destroy, and in `restore_in_place`, right before a
  restore asked for by hand; a protected container's mount points are left alone (Proxmox
  refuses) unless the spec lifts the flag in the same change;
- every backup it makes is one guest's `vzdump` (`backup_now`: the final backup before a
  destroy, `reconciler backup`); a restore writes our mark back (`mark_restored`);
- a guest whose node changes is migrated (`migrate_guest`), never recreated: a running
  container in restart mode, a running VM online with its local disks, a stopped VM offline,
  with the target storage when its disk's storage changes too. Where Proxmox says the guest is
  now decides: a migration already done (a run cut off) is not made again, one running is
  waited out like any lock. A replace destroys the guest observed (its vmid and node), never
  the one wanted;
- a QEMU VM is created empty (no template): its disks (the boot disk `scsi0` unless the spec
  says another bus, or none), virtio-scsi-single, virtio NICs, ostype l26. Its config is read
  with its pending values, what it runs with after its next
  start (a running VM takes cores and memory changes only then, unless hotplugged): Proxmox's
  config view merges them in (the simulator's `QemuConfigView` answers as it does), so one
  read per VM;
- a guest with `clone` is made by cloning its template (`clone_guest`), a foreign guest only
  read, with our mark in the clone's description from the start, then configured in one
  update, grown, started (`configure_clone`); a guest named like one the spec clones is read
  even without our tag (`wanted_clones`), so a clone cut off before its configuration is found
  by its mark and converged, never cloned twice. A VM's cloud-init keys and agent setting are
  written like any setting, the cloud-init drive regenerated after (`regenerate_cloud_init`);
  after a start, a VM with the agent is waited for (`wait_for_agent`), and a running one's
  addresses are read from its agent at observation (`addresses`). What these keys mean to
  Proxmox: reconciler.providers.proxmox_provisioning.

Errors (reconciler.model.errors), as `classify` hands them out:

    ProviderError
    ├── TemporaryError        429, 5xx from a proxy, 595, "no quorum", "can't lock file", no worker;
    │                         on a read, any 5xx but 501 (a read changes nothing: try again)
    │   └── LockedError       "CT is locked (backup)": waited out, not retried on a budget
    └── PermanentError        everything else: reported (a 403 names the privilege missing)
        ├── NotFoundError     "Configuration file ... does not exist" (here: the guest is gone)
        ├── ConflictError     stale digest, "already exists": re-observe and re-plan
        ├── TaskFailedError   a task's exit status, with the task log's last lines
        └── OwnershipError    raised by the provider itself: the guest lacks our mark
"""

from __future__ import annotations

import contextlib
import functools
import re
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote, unquote, urlparse

import anyio
import requests
from proxmoxer import ProxmoxAPI
from proxmoxer.core import AuthenticationError, ResourceException

from reconciler.model.disks import (
    DEFAULT_BUS,
    boot_disk,
    boot_key,
    is_vm_disk,
    is_vm_drive_key,
    storage_map,
    vm_disks,
    with_boot_disk,
)
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
from reconciler.model.observed import ClusterFacts, NodeFacts, ObservedResource, StorageFacts
from reconciler.model.plans import (
    HOLD_START,
    RESTORE_FROM,
    Action,
    Change,
    FinalBackup,
    refuse_blocked,
)
from reconciler.model.resources import Kind
from reconciler.model.spec import ProxmoxApi
from reconciler.model.units import parse_kv, parse_mib
from reconciler.providers import Observation
from reconciler.providers.backoff import backoff
from reconciler.providers.pacing import DEFAULT_LIMIT, AdaptiveLimit
from reconciler.providers.proxmox_provisioning import (
    agent_addresses,
    agent_enabled,
    agent_value,
    check_template_disks,
    clone_params,
    cloud_init_drive,
    cloud_init_params,
    find_template,
    new_cloud_init_drive,
    observed_cloud_init,
)
from reconciler.providers.secrets import read_secret

if TYPE_CHECKING:
    from reconciler.providers.pve_http import FastReads

MARK_PREFIX = "reconciler:v1"
# The whole of a description's last non-empty line, as `mark_line` writes it; a guest's address.
# Its fields in this order; `adopted` (the spec directory `adopt` read, percent-encoded) is
# provenance only: who owns the guest is the platform, address and vmid (`claimed`).
_MARK = re.compile(
    rf"{re.escape(MARK_PREFIX)} platform=(?P<platform>\S+) address=(?P<address>guest/[^\s/]+)"
    r"(?: vmid=(?P<vmid>[1-9][0-9]*))?(?: template=(?P<template>\S+))?"
    r"(?: adopted=(?P<adopted>\S+))?"
)
# What `adopted` keeps as it is; anything else (whitespace, `%`, non-ASCII) is percent-encoded.
_ADOPTED_SAFE = "/+,@:"

# A VM's boot disk when its spec names no bus (its disks are volumes by drive key, the boot disk
# `boot_disk`: model.disks), and what a VM is created with besides the spec's fields: an empty
# Linux VM on virtio-scsi, booting from its boot disk.
QEMU_DISK = boot_key(DEFAULT_BUS)
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
# PVE's refusal: "Permission check failed (/vms/100, VM.Config.CPU)"; `|` joins alternatives.
_DENIED = re.compile(r"Permission check failed \((?P<path>/[^,()]*), (?P<privs>[\w.|]+)\)")
_TASK_LOG_LINES = 5

_T = TypeVar("_T")


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


def _needs(detail: str) -> str:
    """What a 403 says is missing, for people: ": the token needs Sys.Audit on /"."""
    m = _DENIED.search(detail)
    if m is None:
        return ""
    privs = " or ".join(m.group("privs").split("|"))
    return f": the token needs {privs} on {m.group('path')}"


def classify(exc: BaseException, context: str = "", *, read: bool = False) -> ProviderError:
    """Turn any client exception, or a failed task, into ours: temporary (retry), locked (wait),
    conflict (re-plan), not found, task failed, or permanent (report). A `read` (a GET) changes
    nothing, so any server error but 501 (not implemented: it stays so) is temporary; a write
    that got a 500 may have half-happened, and only the messages known to be temporary retry."""
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
        if status == 429:
            return TemporaryError(message, status=status)  # too many requests: refused, not begun
        if status > 500 and status != 501:
            return TemporaryError(message, status=status)  # 502, 503, 504, 595 ...
        if status == 500 and (read or not detail):
            return TemporaryError(message, status=status)
        if status == 403:
            message += _needs(detail)
        return PermanentError(message, status=status)
    if isinstance(exc, AuthenticationError):
        return PermanentError(f"{prefix}authentication failed: {exc}")
    if isinstance(exc, requests.exceptions.SSLError | ssl.SSLCertVerificationError):
        # Retrying cannot fix a certificate we do not trust: say why, and how to fix it.
        return PermanentError(
            f"{prefix}TLS verification failed{_where(exc)}: {_tls_cause(exc)}; verify with the "
            "cluster's CA (/etc/pve/pve-root-ca.pem on a node) as ca_file or --ca-file, "
            "or --insecure in a lab"
        )
    if isinstance(exc, requests.Timeout | TimeoutError):
        return TemporaryError(f"{prefix}cannot reach Proxmox{_where(exc)}: no answer in time")
    if isinstance(exc, requests.ConnectionError | ConnectionError):
        return TemporaryError(f"{prefix}cannot reach Proxmox{_where(exc)}: {_os_cause(exc)}")
    return PermanentError(f"{prefix}{type(exc).__name__}: {exc}")


# The host a client's message names: requests' "host='h', port=8006", or our "https://h:8006/...".
_HOST = re.compile(r"host='(?P<host>[^']+)', port=(?P<port>\d+)|https://(?P<url>[^/\s:]+:\d+)")
_ERRNO = re.compile(r"\[Errno (?P<errno>-?\d+)\] (?P<text>[^'\")\]]+)")
_TLS = re.compile(r"certificate verify failed: (?P<why>[^(')\]]+)")


def _where(exc: BaseException) -> str:
    """ " for 127.0.0.1:8006" when the client's message names the host, else ""."""
    m = _HOST.search(str(exc))
    if m is None:
        return ""
    return f" for {m.group('url') or m.group('host') + ':' + m.group('port')}"


def _tls_cause(exc: BaseException) -> str:
    """ "certificate verify failed: self-signed certificate", not a nest of wrapped reprs."""
    m = _TLS.search(str(exc))
    return f"certificate verify failed: {m.group('why').strip()}" if m else "untrusted certificate"


def _os_cause(exc: BaseException) -> str:
    """ "connection refused", "name or service not known": the operating system's reason."""
    text = str(exc)
    m = _ERRNO.search(text)
    if m is not None:
        return m.group("text").strip().lower()
    _, _, tail = text.rpartition(": ")
    return tail.strip().lower() or type(exc).__name__


# --- connecting ----------------------------------------------------------------------------


def connect(api: ProxmoxApi, *, insecure: bool = False, timeout: float = 15.0) -> ProxmoxAPI:
    url = urlparse(api.url)
    if not url.hostname:
        raise ConfigurationError(f"proxmox url {api.url!r} has no host")
    verify: bool | str = api.verify_tls and not insecure
    if verify and api.ca_file:
        if not Path(api.ca_file).is_file():
            raise ConfigurationError(f"ca_file {api.ca_file}: no such file")
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
        # The client's error names the address (`classify` says it); when it does not, we do.
        context = f"logging in {'' if _where(exc) else f'to {api.url} '}as {api.user}"
        if isinstance(exc, requests.exceptions.SSLError):
            # Which CA said no: a ca_file that is set but wrong is told from one never given.
            checked = verify if isinstance(verify, str) else "the system's CAs"
            context += f" (TLS checked against {checked})"
        raise classify(exc, context) from None


# --- ownership mark ------------------------------------------------------------------------


def mark_line(
    platform: str,
    address: str,
    template: str | None,
    vmid: int | None = None,
    adopted: str | None = None,
) -> str:
    """`reconciler:v1 platform=.. address=.. [vmid=..] [template=..] [adopted=..]`, in that
    order. `adopted`: the spec directory `reconciler adopt` read, as it was given; written
    percent-encoded (`my%20specs`), so the line stays fields without whitespace, and
    `read_mark` gives it back as it was."""
    parts = [f"platform={platform}", f"address={address}"]
    if vmid is not None:
        parts.append(f"vmid={int(vmid)}")
    if template:
        parts.append(f"template={template}")
    if adopted:
        parts.append(f"adopted={encode_adopted(adopted)}")
    return f"{MARK_PREFIX} {' '.join(parts)}"


def encode_adopted(directory: str) -> str:
    """A directory as the mark's `adopted` field holds it (`decode_adopted` reverses it)."""
    return quote(directory, safe=_ADOPTED_SAFE, errors="surrogateescape")


def decode_adopted(field: str) -> str | None:
    """The mark's `adopted` field -> the directory; None when it decodes to text that is not
    printable (`str.isprintable`: a control character, a separator other than the space),
    which is never shown to people: the field is then left out, the mark read as without it."""
    directory = unquote(field, errors="surrogateescape")
    return directory if directory and directory.isprintable() else None


def with_mark(
    description: str,
    platform: str,
    address: str,
    template: str | None,
    vmid: int | None = None,
    adopted: str | None = None,
) -> str:
    """The description as sent: the spec's text, then the mark as its last line. The mark names
    the vmid it was written for, so a hand-made copy of the guest (a clone copies the
    description) is not a claim: see `claimed`. `adopted`: see `mark_line`."""
    body = description.rstrip("\n")
    mark = mark_line(platform, address, template, vmid, adopted)
    return f"{body}\n\n{mark}" if body else mark


def claimed(mark: Mapping[str, str], platform: str, vmid: int) -> str | None:
    """The address a guest's mark claims for this platform, or None: no mark, another
    platform's, or a mark written for another vmid (a copy made by hand: the controller never
    moves a guest to another vmid). A mark without a vmid (written before marks named one) is
    taken at its word; two guests claiming one address that way are a plan error."""
    if mark.get("platform") != platform or not mark.get("address"):
        return None
    if "vmid" in mark and mark["vmid"] != str(vmid):
        return None
    return mark["address"]


def read_mark(description: str | None) -> tuple[dict[str, str], str]:
    """Description -> (mark fields, the description without the mark). The mark is read from
    the last non-empty line only, where `with_mark` puts it: a mark-like line anywhere else
    (notes quoting another guest's mark) is description text, never a claim of ownership."""
    text = description or ""
    lines = text.split("\n")
    last = len(lines) - 1
    while last >= 0 and not lines[last].strip():
        last -= 1
    m = _MARK.fullmatch(lines[last].strip()) if last >= 0 else None
    if m is None:
        return {}, text
    fields = {k: v for k, v in m.groupdict().items() if v is not None}
    if "adopted" in fields:  # decoded; one that cannot be is left out, the mark still ours
        adopted = decode_adopted(fields.pop("adopted"))
        if adopted is not None:
            fields["adopted"] = adopted
    return fields, "\n".join(lines[:last]).strip("\n")


# --- observation ---------------------------------------------------------------------------


@dataclass
class Inventory:
    """One `/cluster/resources` answer, the cheap view of every guest (templates included), and
    of the cluster's nodes and storages (one item per storage and node)."""

    guests: list[dict[str, Any]]
    nodes: list[dict[str, Any]] = field(default_factory=list)
    storages: list[dict[str, Any]] = field(default_factory=list)


_MIB = 1024 * 1024


def cluster_facts(inventory: Inventory) -> ClusterFacts | None:
    """The nodes and their storages, as one inventory lists them; None when it lists no node
    (a token that may not audit nodes sees none: unknown, not an empty cluster)."""
    if not inventory.nodes:
        return None
    storages: dict[str, dict[str, StorageFacts]] = {}
    for item in inventory.storages:
        node, sid = item.get("node"), item.get("storage")
        if not node or not sid:
            continue
        storages.setdefault(str(node), {})[str(sid)] = StorageFacts(
            content=tuple(sorted({c for c in str(item.get("content") or "").split(",") if c})),
            shared=bool(int(item.get("shared") or 0)),
            active=item.get("status") == "available",
        )
    nodes: dict[str, NodeFacts] = {}
    for item in inventory.nodes:
        name = str(item.get("node") or "")
        if not name:
            continue
        nodes[name] = NodeFacts(
            online=item.get("status") == "online",
            maxcpu=int(item.get("maxcpu") or 0),
            maxmem=int(item.get("maxmem") or 0),
            storages=storages.get(name, {}) if inventory.storages else None,
        )
    return ClusterFacts(nodes=dict(sorted(nodes.items())))


def _refuse_offline(inventory: Inventory, owner_tag: str) -> None:
    """Guests with our tag on an offline node cannot be read (Proxmox answers 595 for any call
    routed to the node), so whether they are ours, and as what, is unknown. Planning without
    them could create a second copy elsewhere: the observation stops instead, naming them."""
    offline = {str(n.get("node")) for n in inventory.nodes if n.get("status") != "online"}
    stuck = sorted(
        (str(i.get("node")), int(i["vmid"]))
        for i in inventory.guests
        if i.get("node") in offline and not i.get("template") and owner_tag in _tags(i.get("tags"))
    )
    if stuck:
        nodes = ", ".join(sorted({node for node, _ in stuck}))
        vmids = ", ".join(str(vmid) for _, vmid in stuck)
        raise TemporaryError(
            f"node {nodes} is offline: guests {vmids} there carry the owner tag {owner_tag!r} "
            "and cannot be read; nothing is planned until the node is back"
        )


def _is_template(config: Mapping[str, Any]) -> bool:
    return str(config.get("template", 0)).lower() in ("1", "true")


def template_storage(template: str) -> str | None:
    """The storage a template volid names: `local` of `local:vztmpl/x.tar.zst`."""
    storage, sep, _ = template.partition(":")
    return storage if sep and storage else None


def _tags(value: Any) -> list[str]:
    return sorted({t for t in str(value or "").split(";") if t})


def _memory(value: Any) -> int:
    """MiB: QEMU answers with a string, `"2048"` or `"current=2048"`."""
    if isinstance(value, str):
        kv = parse_kv(value)
        value = kv.get("current") or kv.get("volume") or value
    return int(value)


# A container's mount points (its volumes); a VM's volumes are its disks (model.disks).
_LXC_VOLUME = re.compile(r"mp\d+")


_UNUSED = re.compile(r"unused\d+")


def observed_volumes(kind: str, config: Mapping[str, Any]) -> dict[str, str]:
    """A guest's volumes as Proxmox spells them, by key. A VM's are its disks on every bus,
    its boot disk among them (`scsi0`, `virtio0`, ...); its CD-ROMs and cloud-init drive are
    not volumes (`model.disks.is_vm_disk`), nor is a container's bind or device mount (`mp0:
    /host/dir,mp=/x`: on no storage, nothing of it is destroyed with the guest, and only root
    makes one); neither are `unusedN` (volumes detached from the guest: still on their
    storage, not mounted)."""
    if kind == "qemu":
        return vm_disks(config)
    out: dict[str, str] = {}
    for key, value in config.items():
        if not _LXC_VOLUME.fullmatch(key):
            continue
        if parse_kv(str(value)).get("volume", "").startswith("/"):
            continue
        out[key] = str(value)
    return out


def guest_attributes(item: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """A guest's Proxmox config -> our attribute shape (normalization finishes in planning). A
    VM has no template, swap, features, unprivileged flag or `rootfs`: its disks are its
    `volumes`, by drive key, and `boot_disk` names the one it boots from (None: none).
    `adopted`, only when the mark has it: the spec directory the guest was adopted from, for
    the planner's messages (never compared: no spec sets it)."""
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
        "protection": bool(int(config.get("protection", 0) or 0)),
        "volumes": observed_volumes(str(kind), config),
        # Detached volumes (`unusedN`): never compared (the spec cannot want one), but a
        # destroy of the guest destroys them too, so the plan must say so.
        "unused": {
            k: str(v).split(",", 1)[0] for k, v in sorted(config.items()) if _UNUSED.fullmatch(k)
        },
    }
    if kind == "lxc":
        attrs["swap"] = int(config.get("swap", 512))
        attrs["rootfs"] = config.get("rootfs")
        attrs["features"] = config.get("features", "")
        attrs["unprivileged"] = bool(int(config.get("unprivileged", 0)))
    else:
        del attrs["template"]
        attrs["boot_disk"] = boot_disk(config)
        attrs["agent"] = agent_enabled(config.get("agent"))
        attrs["cloud_init"] = observed_cloud_init(config)
    if mark.get("adopted"):
        attrs["adopted"] = mark["adopted"]
    return attrs


# --- the provider --------------------------------------------------------------------------

# What a migration changes by itself: the node, and the disks' storage (its target storage: a
# container's `rootfs.storage`, a VM's `volumes.<disk>.storage`).
_MIGRATED = frozenset({"node", "rootfs.storage"})


def _migrated(kind: str, path: str) -> bool:
    """A field a migration changes by itself (see `_MIGRATED`)."""
    moved = path.startswith("volumes.") and path.endswith(".storage") and path.count(".") == 2
    return path in _MIGRATED or (kind == "qemu" and moved)


def vm_storage_map(change: Change) -> dict[str, str]:
    """Where a VM's migration puts its disks, as `targetstorage` says it: storage to storage,
    from the disks whose storage the change moves (`model.disks.storage_map`; the planner
    allows no migration it cannot say). Empty: every disk stays where it is."""
    before = (change.before or {}).get("volumes") or {}
    after = (change.after or {}).get("volumes") or {}
    moves = []
    for key in sorted(set(before) & set(after)):
        source, target = _storage_of(before[key]), _storage_of(after[key])
        if source and target:
            moves.append((source, target))
    found = storage_map(moves)
    if found is None:
        raise PermanentError(
            f"{change.address}: its disks cannot move with it as the spec says: one storage's "
            "disks would go to two places; re-plan"
        )
    return found


def _storage_of(volume: Any) -> str | None:
    if isinstance(volume, Mapping):
        return volume.get("storage")
    head = parse_kv(str(volume or "")).get("volume", "")
    return head.split(":", 1)[0] if ":" in head else None


# Lookups of a guest that moves while we wait for its lock, before giving up for this run.
_RELOCATES = 5

# Locks held by a create, clone or destroy task: the guest's identity (our mark, or the guest
# itself) is only known once the task has ended, so observation waits for them. A VM clone in
# progress has a temporary config (no name, no description: qemu-server writes the clone's at
# the end); taken for a foreign guest it would be cloned again, under another vmid.
_TRANSIENT_LOCKS = frozenset({"create", "destroyed", "clone"})


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
    agent_timeout: float = 300.0  # after a start, how long a VM's guest agent is waited for
    agent_poll: float = 2.0


def _pace(limit: AdaptiveLimit, exc: Exception) -> None:
    """Tell the bound what a failed call says of the API's load: 429 or 503 (overloaded), or
    no answer in time (a burst of these is an overload too)."""
    status = int(exc.status_code) if isinstance(exc, ResourceException) else None
    if status in (429, 503):
        limit.overloaded()
    elif status == 504 or isinstance(exc, (requests.Timeout, TimeoutError)):
        limit.timed_out()


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
    concurrency: int = DEFAULT_LIMIT  # calls in flight at most (`proxmox.max_concurrency`)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    sleep: Sleep = anyio.sleep
    clock: Clock = time.monotonic
    # Guest address -> (node, template volid) the spec creates it from: `observe_cluster`
    # lists the templates of the storages that guests still to be created need.
    wanted_templates: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    # The names of the guests the spec makes by cloning: a clone carries its template's tags
    # (not ours) until it is configured, so a guest of such a name without our tag is read
    # too, and is ours if its mark says so (a run cut off after the clone: never cloned again).
    wanted_clones: frozenset[str] = frozenset()
    calls: int = 0  # Proxmox API calls made
    retries: int = 0  # calls (or tasks) repeated after a temporary error
    waits: int = 0  # polls while waiting for a lock to clear
    _pacing: AdaptiveLimit | None = None
    _threads: anyio.CapacityLimiter | None = None
    # The inventory the last `observe` read, for `observe_cluster` (no second call).
    _observed_inventory: Inventory | None = None
    _fast: FastReads | None = None  # the pooled read session, while `reading` is open
    _readers: int = 0

    kinds = frozenset({Kind.GUEST})
    needs = frozenset[Kind]()
    streams = frozenset[Kind]()
    optional = False  # the guests unknown: nothing is planned

    @property
    def pacing(self) -> AdaptiveLimit:
        """The one bound on this API's calls in flight, and its counters."""
        if self._pacing is None:
            self._pacing = AdaptiveLimit(self.concurrency, clock=self.clock)
        return self._pacing

    # Every Proxmox call goes through here: one slot, one thread hop, one count, one error
    # translation. `read`: the call only reads (a GET), so any server error is worth another try.
    # A retry's backoff (`retrying`) waits outside the slot.
    async def call(self, what: str, fn: Callable[[], Any], *, read: bool = False) -> Any:
        if self._threads is None:
            # Threads enough for the bound: anyio's shared default pool holds 40.
            self._threads = anyio.CapacityLimiter(self.concurrency)
        threads = self._threads
        return await self._send(
            what, lambda: anyio.to_thread.run_sync(fn, limiter=threads), read=read
        )

    async def _send(self, what: str, attempt: Callable[[], Awaitable[Any]], *, read: bool) -> Any:
        self.calls += 1
        async with self.pacing:
            try:
                return await attempt()
            except Exception as exc:
                _pace(self.pacing, exc)
                raise classify(exc, what, read=read) from None

    @contextlib.asynccontextmanager
    async def reading(self) -> AsyncIterator[None]:
        """While open, `get` reads over one pooled aiohttp session (`pve_http.FastReads`)
        instead of proxmoxer in a worker thread: an observation opens it around its reads.
        Nested and concurrent openings share the session; the last to leave closes it."""
        if self._readers == 0:
            from reconciler.providers.pve_http import FastReads

            reads = FastReads.of(self.client, self.concurrency)
            self._fast = await reads.__aenter__() if reads is not None else None
        self._readers += 1
        try:
            yield
        finally:
            self._readers -= 1
            if self._readers == 0 and self._fast is not None:
                fast, self._fast = self._fast, None
                with anyio.CancelScope(shield=True):
                    await fast.__aexit__(None, None, None)

    async def get(self, what: str, resource: Any, **params: Any) -> Any:
        """`resource.get(**params)` under the retry policy, as a read (`retrying(read=True)`):
        over the pooled session while `reading` is open, else through proxmoxer."""
        fast = self._fast
        tries = _Tries()
        while True:
            try:
                if fast is None:
                    return await self.call(what, lambda: resource.get(**params), read=True)
                return await self._send(what, lambda: fast.get(resource, params), read=True)
            except TemporaryError as exc:
                await self.again(exc, tries)

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

    async def retrying(self, what: str, fn: Callable[[], Any], *, read: bool = False) -> Any:
        """One call under the retry policy (see `again`); `read=True` for a call that only
        reads, which `classify` retries on any server error."""
        tries = _Tries()
        while True:
            try:
                return await self.call(what, fn, read=read)
            except TemporaryError as exc:
                await self.again(exc, tries)

    async def inventory(self) -> Inventory:
        """Every guest, node and storage: one `GET /cluster/resources`."""
        items = await self.get("read inventory", self.client.cluster.resources)
        return Inventory(
            guests=[i for i in items if i.get("type") in ("lxc", "qemu")],
            nodes=[i for i in items if i.get("type") == "node"],
            storages=[i for i in items if i.get("type") == "storage"],
        )

    async def settled_inventory(self) -> Inventory:
        """The inventory once no create or destroy task holds a guest. A guest being created
        shows neither our tag nor our mark yet: judged then, an interrupted create of ours
        would look foreign (an errored plan, or a second guest under another vmid). Gives up
        after `lock_timeout` and returns what it sees: a create stuck for good stays foreign.
        A clone still running then is a TemporaryError: nothing is planned for the guests until
        it ends, for a VM being cloned carries a temporary config (no name, no mark) and, taken
        for a foreign guest, would be cloned again under another vmid."""
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
                cloning = [g for g in busy if g.get("lock") == "clone"]
                if cloning:
                    g = cloning[0]
                    raise TemporaryError(
                        f"guest {g['vmid']} on {g.get('node')} is still being cloned (lock "
                        f"clone) after {self.retry.lock_timeout:g} s: the guests are planned "
                        "once it ends"
                    ) from None
                return inv

    async def observe(self, seen: Observation | None = None) -> list[ObservedResource]:
        """Every guest: inventory in one call, config only for guests carrying our tag. A
        template is foreign, whatever it carries: it holds its vmid and is never touched.
        With `seen`, each guest is published as soon as it is known (the firewall reads an
        owned guest's rules meanwhile), and the cluster's facts for the planner's placement
        checks go into `seen.cluster` (`observe_cluster`)."""
        async with self.reading():
            return await self._observe(seen)

    async def _observe(self, seen: Observation | None) -> list[ObservedResource]:
        inv = await self.settled_inventory()
        self._observed_inventory = inv
        _refuse_offline(inv, self.owner_tag)
        out: list[ObservedResource] = []

        def found(resource: ObservedResource) -> None:
            out.append(resource)
            if seen is not None:
                seen.publish(resource)

        async def read(item: dict[str, Any]) -> None:
            # Destroyed since the inventory was read: it is not there.
            with contextlib.suppress(NotFoundError):
                found(await self.observe_guest(item))

        async with anyio.create_task_group() as tg:
            for item in inv.guests:
                if not item.get("template") and (
                    self.owner_tag in _tags(item.get("tags")) or self._unfinished_clone(item)
                ):
                    tg.start_soon(read, item)
                else:
                    found(self._foreign(item))
        out.sort(key=lambda r: r.id["vmid"])
        if seen is not None:
            seen.cluster = await self.observe_cluster(out)
        return out

    def _unfinished_clone(self, item: Mapping[str, Any]) -> bool:
        """A guest that may be a clone of ours not yet configured: it has the name of a guest
        the spec clones (see `wanted_clones`). Its mark decides (`observe_guest`)."""
        return bool(self.wanted_clones) and str(item.get("name") or "") in self.wanted_clones

    def _foreign(self, item: Mapping[str, Any]) -> ObservedResource:
        """A guest that is not ours, from its inventory item: `template` says whether it is a
        Proxmox template, `memory` (MiB, its maxmem) counts toward its node's capacity."""
        attributes: dict[str, Any] = {
            "name": item.get("name"),
            "vmid": int(item["vmid"]),
            "node": item.get("node"),
            "type": item.get("type"),
            "state": "running" if item.get("status") == "running" else "stopped",
            "tags": _tags(item.get("tags")),
            "template": bool(int(item.get("template") or 0)),
        }
        if item.get("maxmem") is not None:
            attributes["memory"] = int(item["maxmem"]) // _MIB
        return ObservedResource(
            kind=Kind.GUEST,
            owned=False,
            id={"vmid": int(item["vmid"]), "node": item.get("node")},
            attributes=attributes,
        )

    async def observe_cluster(self, seen: Iterable[ObservedResource] = ()) -> ClusterFacts | None:
        """The cluster's nodes and storages, from the inventory the last `observe` read (or one
        call when none is at hand), and the container templates on the storages that guests
        still to be created need: one `GET .../storage/{storage}/content?content=vztmpl` per
        node and storage (once for a shared storage); none when every such guest exists
        (`seen`: what `observe` returned). A listing that fails is left unknown (None), so
        nothing is checked against it; a temporary failure is retried first."""
        inventory, self._observed_inventory = self._observed_inventory, None
        if inventory is None:
            inventory = await self.inventory()
        facts = cluster_facts(inventory)
        if facts is None:
            return None
        existing = {r.address for r in seen if r.kind is Kind.GUEST and r.owned}
        wanted: set[tuple[str, str]] = set()
        for address, (node, template) in self.wanted_templates.items():
            storage = template_storage(template)
            found = facts.nodes.get(node)
            if address in existing or storage is None or found is None or not found.online:
                continue
            st = (found.storages or {}).get(storage)
            if st is not None and st.active and "vztmpl" in st.content:
                wanted.add((node, storage))
        listed: dict[tuple[str, str], tuple[str, ...] | None] = {}
        shared: dict[str, tuple[str, ...] | None] = {}
        for node, storage in sorted(wanted):
            is_shared = (facts.nodes[node].storages or {})[storage].shared
            if is_shared and storage in shared:
                listed[node, storage] = shared[storage]
                continue
            listed[node, storage] = await self._templates_on(node, storage)
            if is_shared:
                shared[storage] = listed[node, storage]
        if not listed:
            return facts
        nodes = dict(facts.nodes)
        for (node, storage), templates in listed.items():
            found = nodes[node]
            storages = dict(found.storages or {})
            storages[storage] = storages[storage].model_copy(update={"templates": templates})
            nodes[node] = found.model_copy(update={"storages": storages})
        return ClusterFacts(nodes=nodes)

    async def _templates_on(self, node: str, storage: str) -> tuple[str, ...] | None:
        """The container templates on a node's storage (their volids), None when the listing
        fails (after retries)."""
        try:
            return await self._list_templates(node, storage)
        except ProviderError:
            return None

    async def _list_templates(self, node: str, storage: str) -> tuple[str, ...]:
        """One `GET .../storage/{storage}/content?content=vztmpl`, under the retry policy."""
        content = self.client.nodes(node).storage(storage).content
        items = await self.get(f"list templates on {node}/{storage}", content, content="vztmpl")
        return tuple(sorted(str(i["volid"]) for i in items if i.get("volid")))

    async def observe_guest(self, item: Mapping[str, Any]) -> ObservedResource:
        node, vmid, kind = item["node"], int(item["vmid"]), item.get("type", "lxc")
        guest = self.client.nodes(node)(kind)(vmid)
        config = await self.get(f"read config of {vmid}", guest.config)
        mark, _ = read_mark(config.get("description"))
        address = claimed(mark, self.platform, vmid)
        if address is None:
            return self._foreign(item)  # our tag alone, or a copy made by hand: not ours
        attributes = guest_attributes(item, config)
        if kind == "qemu" and item.get("status") == "running" and attributes.get("agent"):
            addresses = await self._agent_addresses(guest, vmid)
            if addresses is not None:
                attributes["addresses"] = addresses  # never compared: no spec sets it
        return ObservedResource(
            address=address,
            kind=Kind.GUEST,
            owned=True,
            id={"vmid": vmid, "node": node},
            attributes=attributes,
            version=config.get("digest"),
        )

    async def _agent_addresses(self, guest: Any, vmid: int) -> list[str] | None:
        """A running VM's addresses as its guest agent lists them (`agent_addresses`); None when
        the agent does not answer. One try, no retry: an agent that is not running (yet) is
        common, and costs the observation nothing."""
        what = f"read the addresses of {vmid} from its guest agent"
        resource = guest.agent("network-get-interfaces")
        fast = self._fast
        try:
            if fast is None:
                answer = await self.call(what, lambda: resource.get(), read=True)
            else:
                answer = await self._send(what, lambda: fast.get(resource, {}), read=True)
        except ProviderError:
            return None
        return agent_addresses(answer)

    # --- apply -----------------------------------------------------------------------------

    async def apply(self, change: Change) -> None:
        if change.kind is not Kind.GUEST:
            raise PermanentError(f"{change.address}: no provider for kind {change.kind.value}")
        _require_version(change)
        refuse_blocked(change)  # before anything moves: a migration, a replace's destroy
        match change.action:
            case Action.CREATE:
                await self.create_guest(change)
            case Action.UPDATE:
                await self.update_guest(change)
            case Action.MIGRATE:
                await self.migrate_guest(change)
            case Action.REPLACE:
                # Nothing is destroyed that could not be made again: the template first.
                await self.require_template(change)
                await self.destroy_guest(_observed_side(change))
                await self.create_guest(change)
            case Action.DELETE:
                await self.destroy_guest(change)
            case Action.NOOP:
                return

    async def require_template(self, change: Change) -> None:
        """A container to be recreated needs its template on the target node, or the replace
        would destroy it and then fail to create it. One content listing; a template that
        cannot be seen there (missing, or the listing refused) stops the replace before any
        destroy."""
        want = change.after or {}
        if want.get("clone") and not want.get(RESTORE_FROM):
            # A guest made by cloning: its template is there, and is one, before any destroy.
            guests = (await self.inventory()).guests
            try:
                find_template(guests, want["clone"], self._kind(change), change.address)
            except PermanentError as exc:
                raise PermanentError(f"not replaced: {exc}; nothing was destroyed") from None
            return
        template = want.get("template")
        if want.get("type", "lxc") != "lxc" or not template:
            return
        node, storage = change.id["node"], template_storage(str(template))
        if storage is None:
            raise PermanentError(f"{change.address}: template {template!r} names no storage")
        try:
            listed = await self._list_templates(node, storage)
        except ProviderError as exc:
            raise PermanentError(
                f"{change.address}: not replaced: its template {template!r} cannot be checked "
                f"on {node} ({exc}); nothing was destroyed"
            ) from None
        if template not in listed:
            raise PermanentError(
                f"{change.address}: not replaced: its template {template!r} is not on node "
                f"{node}; nothing was destroyed. Download it there first"
            )

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

        async def stopped() -> dict[str, Any] | None:
            status = await self.get(f"{what}: task status", task.status)
            return status if status.get("status") == "stopped" else None

        status = await self._poll(
            stopped,
            lambda: f"{what}: task {upid} still running after {self.retry.task_timeout:g} s",
        )
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
            config: dict[str, Any] = await self.get(what, guest.config)
            lock = config.get("lock")
            if not lock or (locks is not None and lock not in locks):
                return config
            await self.again(LockedError(f"{what}: CT is locked ({lock})"), tries)

    async def create_guest(self, change: Change) -> None:
        """Create the guest empty, or, when the plan says so (RESTORE_FROM), restore it from
        its backup and mark it ours; the next round converges the restored config."""
        assert change.after is not None
        want = change.after
        node, vmid = change.id["node"], change.id["vmid"]
        restoring = bool(want.get(RESTORE_FROM))
        if want.get("clone") and not restoring:
            await self.clone_guest(change)
            return
        if restoring:
            params = restore_params(want)
            what = f"restore {change.address} from {want[RESTORE_FROM]['volid']}"
        else:
            params = create_params(self.platform, change.address, want)
            what = f"create {change.address}"
        endpoint = self.client.nodes(node)(self._kind(change))
        try:
            await self.run_task(what, node, lambda: endpoint.post(**params))
            if restoring:
                await self.mark_restored(change)
        except ConflictError:
            # "already exists": done only if it is ours, for this very address (a retry after
            # a lost reply, or a run cancelled after the POST). Anything else is a race we lost.
            if await self._owned_by(change):
                return
            raise ConflictError(
                f"{change.address}: vmid {vmid} was taken by someone else while applying; re-plan"
            ) from None

    async def clone_guest(self, change: Change) -> None:
        """Create the guest by cloning its template (`clone`), then configure it as the spec
        says (`configure_clone`). The template, a foreign guest, is read and never changed.
        A guest already at the vmid that carries our mark for this address is a clone made by
        a run that was cut off: it is configured, never cloned again. Anything else there is
        a race lost (ConflictError)."""
        assert change.after is not None
        want = change.after
        vmid, kind = int(change.id["vmid"]), self._kind(change)
        inventory = await self.inventory()
        if any(int(g["vmid"]) == vmid for g in inventory.guests):
            if not await self._owned_by(change):
                raise ConflictError(
                    f"{change.address}: vmid {vmid} was taken by someone else; re-plan"
                )
        else:
            template = find_template(inventory.guests, want["clone"], kind, change.address)
            await self._clone(change, template)
        await self.configure_clone(change)

    async def _clone(self, change: Change, template: Mapping[str, Any]) -> None:
        """The clone call and its task, after checking the template's disks fit the spec."""
        assert change.after is not None
        want = change.after
        source_node, source = str(template["node"]), int(template["vmid"])
        endpoint = self.client.nodes(source_node)(self._kind(change))(source)
        config = await self.get(f"read config of template {source}", endpoint.config)
        disks = observed_volumes(self._kind(change), config)
        check_template_disks(change.address, want, config, disks)
        mark = with_mark(
            want.get("description", ""), self.platform, change.address, None, want["vmid"]
        )
        params = clone_params(want, template, change.id["node"], mark, root_storage(want))
        try:
            await self.run_task(
                f"clone {change.address} from template {source}",
                source_node,
                lambda: endpoint.clone.post(**params),
            )
        except ConflictError:
            # "already exists": ours if our mark is on it (a lost reply), else a race lost.
            if not await self._owned_by(change):
                raise ConflictError(
                    f"{change.address}: vmid {want['vmid']} was taken by someone else while "
                    "cloning; re-plan"
                ) from None

    async def configure_clone(self, change: Change) -> None:
        """A clone made as the spec says: one config update (cores, memory, name, tags, NICs,
        protection, the agent, cloud-init, a cloud-init drive if the template has none, the
        spec's volumes the template lacks, and the NICs and cloud-init keys of the template's
        the spec does not have, removed), its disks grown to the spec's sizes, cloud-init
        regenerated, then started when the spec wants it running. What is left (a disk of
        the template's the spec does not list) the next plan shows."""
        assert change.after is not None
        want, kind = change.after, self._kind(change)
        guest = self._guest(change)
        what = f"read config of {change.id['vmid']}"
        config = await self.config_when_unlocked(guest, what)
        self._check_mark(change, config)
        params, delete = clone_config_params(self.platform, change.address, want, config)
        if params or delete:
            if delete:
                params["delete"] = ",".join(delete)
            await self.run_task(
                f"configure {change.address}",
                change.id["node"],
                lambda: guest.config.put(**params),
            )
        for key in disks_to_grow(kind, want, config):
            await self.resize_disk(change, key, want["volumes"][key]["size"])
        if kind == "lxc":
            size = (want.get("rootfs") or {}).get("size")
            have = parse_kv(str(config.get("rootfs") or "")).get("size")
            if size and have and parse_mib(size, bare_unit="G") > parse_mib(have, bare_unit="G"):
                await self.resize_disk(change, "rootfs", size)
        if kind == "qemu" and want.get("cloud_init"):
            await self.regenerate_cloud_init(change)
        wanted_running = want.get("state") == "running" and not want.get(HOLD_START)
        if wanted_running and await self._power(change) != "running":
            await self.set_state(change, "running")

    async def regenerate_cloud_init(self, change: Change) -> None:
        """`PUT .../cloudinit`: Proxmox writes the VM's cloud-init drive from its config now
        (a start does too); the guest's cloud-init reads it at its next boot."""
        guest = self._guest(change)
        await self.retrying(
            f"regenerate the cloud-init drive of {change.address}",
            lambda: guest.cloudinit.put(),
        )

    async def wait_for_agent(self, change: Change) -> None:
        """After a VM's start, until its guest agent answers `agent/ping`, polling every
        `agent_poll` s on the injected clock and sleep; TemporaryError after `agent_timeout`
        (the guest started, but the agent is not installed, not running, or the guest did
        not boot). A refusal that waiting cannot change (403, the VM gone) is raised at once."""
        guest = self._guest(change)
        deadline = self.clock() + self.retry.agent_timeout
        what = f"ping the guest agent of {change.address}"
        while True:
            try:
                await self.call(what, lambda: guest.agent.ping.post())
                return
            except (NotFoundError, OwnershipError):
                raise
            except ProviderError as exc:
                if exc.status == 403:
                    raise
            if self.clock() >= deadline:
                raise TemporaryError(
                    f"{change.address}: started, but its QEMU guest agent did not answer within "
                    f"{self.retry.agent_timeout:g} s (is qemu-guest-agent installed and "
                    "running in the guest?)"
                )
            await self.sleep(self.retry.agent_poll)

    async def mark_restored(self, change: Change) -> None:
        """A restored guest carries the config its backup holds: write our mark for this
        address and vmid, and the owner tag, so it is observed as ours whatever the backup
        said (a backup made before the mark named its vmid, or under another address). After
        a missing guest's restore (`create_guest`) and a restore in place (`restore_in_place`);
        `change.after` is the desired guest, with the vmid restored to."""
        assert change.after is not None
        want = change.after
        config = await self.config_when_unlocked(
            self._guest(change), f"read restored config of {change.id['vmid']}"
        )
        mark, description = read_mark(config.get("description"))
        tags = sorted({*_tags(config.get("tags")), *want["tags"]})
        marked = {
            "description": with_mark(
                description,
                self.platform,
                change.address,
                want.get("template"),
                want["vmid"],
                adopted=mark.get("adopted"),  # where it was adopted into, kept
            ),
            "tags": ";".join(tags),
            "digest": config["digest"],
        }
        guest = self._guest(change)
        await self.run_task(
            f"mark restored {change.address}",
            change.id["node"],
            lambda: guest.config.put(**marked),
        )

    async def backup_guest(self, change: Change, backup: FinalBackup) -> None:
        """`vzdump` of the guest to `backup.storage`, waited for: the backup a destroy takes
        first. Raises if it fails, and then the destroy does not happen."""
        try:
            await self.backup_now(
                change.id["node"],
                int(change.id["vmid"]),
                backup.storage,
                mode=backup.mode,
                compress=backup.compress,
                notes=f"{{{{guestname}}}} final backup before {change.action.value}",
                what=f"final backup of {change.address}",
                find=False,  # made is enough: nobody reads which volume it is
            )
        except ProviderError as exc:
            raise PermanentError(
                f"{change.address}: not destroyed: its final backup to {backup.storage} "
                f"failed ({exc}); nothing was destroyed"
            ) from None

    async def backup_now(
        self,
        node: str,
        vmid: int,
        storage: str,
        *,
        mode: str = "snapshot",
        compress: str = "zstd",
        notes: str | None = None,
        what: str = "",
        find: bool = True,
    ) -> dict[str, Any] | None:
        """`vzdump` of one guest on its node to `storage`, waited for: the one path of every
        backup the controller makes (the final backup before a destroy, `reconciler backup`).
        `notes` is vzdump's `notes-template` ({{guestname}}, {{vmid}}, ...).

        With `find` (two listings of the guest's backups, before and after), returns the new
        backup as the storage lists it (`volid`, `size`, `ctime`, `notes`, ...): the one of
        this vmid there that was not there before. None without `find`, or when the listings
        cannot tell (one failed): the backup was made all the same. Raises when none was made:
        the task failed (its log's last lines say why: "ERROR: Backup of VM N failed - ..."),
        or vzdump answered without a task, which it does when it selected no guest on this
        node (the guest is not there)."""
        what = what or f"backup of {vmid} to {storage}"
        before = await self._backups_of(node, storage, vmid) if find else None
        params: dict[str, Any] = {
            "vmid": vmid,
            "storage": storage,
            "mode": mode,
            "compress": compress,
        }
        if notes:
            params["notes-template"] = notes
        vzdump = self.client.nodes(node).vzdump
        upid = await self.retrying(what, lambda: vzdump.post(**params))
        if not _is_upid(upid):
            raise PermanentError(
                f"{what}: vzdump made no backup (it answered {str(upid)[:40]!r}: "
                f"vmid {vmid} is not on {node})"
            )
        error = await self.wait_task(node, upid, what)
        if error is not None:
            raise error
        if before is None:
            return None
        after = await self._backups_of(node, storage, vmid)
        if after is None:
            return None
        made = [item for volid, item in after.items() if volid not in before]
        if not made:
            return None
        return max(made, key=lambda i: (int(i.get("ctime") or 0), str(i["volid"])))

    async def _backups_of(
        self, node: str, storage: str, vmid: int
    ) -> dict[str, dict[str, Any]] | None:
        """The backups of `vmid` on a storage, as the node lists them, by volid (one `GET
        .../content?content=backup&vmid=N`); None when the listing fails: it only tells which
        backup is new, and a backup is not failed for it."""
        content = self.client.nodes(node).storage(storage).content
        try:
            items = await self.retrying(
                f"list backups of {vmid} on {node}/{storage}",
                lambda: content.get(content="backup", vmid=vmid),
                read=True,
            )
        except ProviderError:
            return None
        return {str(i["volid"]): dict(i) for i in items if i.get("volid")}

    async def restore_in_place(self, change: Change, volid: str) -> None:
        """Overwrite a guest of ours with one of its backups (`reconciler restore`). Its mark
        is checked right before anything is done (OwnershipError, nothing changed); then its
        protection is lifted (the spec's to put back), it is stopped, restored over
        (`force=1`) onto the storage the spec puts its root disk on, and marked ours again.
        The caller converges it afterwards: the spec's config, firewall, protection and power.
        `change.after` is the desired guest with the vmid observed, `change.id` where it is.

        A failure leaves it stopped and unprotected, and as Proxmox left it: as it was when
        the restore failed before making its disks; after, a container is gone (PVE cleans
        up) and a VM is left as far as it got."""
        assert change.after is not None
        node = change.id["node"]
        config = await self._checked_config(change, any_version=True)
        # Proxmox refuses to overwrite a protected or running guest. Ours, and the restore was
        # asked for: the convergence that follows puts the spec's flag and power state back.
        await self._unprotect_and_stop(change, config)
        params = {**restore_params({**change.after, RESTORE_FROM: {"volid": volid}}), "force": 1}
        endpoint = self.client.nodes(node)(self._kind(change))
        await self.run_task(
            f"restore {change.address} from {volid}", node, lambda: endpoint.post(**params)
        )
        await self.mark_restored(change)

    async def _owned_by(self, change: Change) -> bool:
        """Does the guest at the change's vmid carry our mark for its address? A guest whose
        create task still runs has no description yet: wait for the task to end."""
        what = f"read config of {change.id['vmid']}"
        try:
            config = await self.config_when_unlocked(self._guest(change), what, _TRANSIENT_LOCKS)
        except (NotFoundError, LockedError):
            return False
        if _is_template(config):
            return False  # never ours, whatever mark it carries
        mark, _ = read_mark(config.get("description"))
        return claimed(mark, self.platform, int(change.id["vmid"])) == change.address

    def _check_mark(self, change: Change, config: Mapping[str, Any]) -> None:
        mark, _ = read_mark(config.get("description"))
        if _is_template(config):
            # A template is never ours, even with our mark (observation calls it foreign).
            raise OwnershipError(
                f"{change.address}: vmid {change.id['vmid']} is a template; it will not be touched"
            )
        if claimed(mark, self.platform, int(change.id["vmid"])) != change.address:
            raise OwnershipError(
                f"{change.address}: vmid {change.id['vmid']} does not carry "
                "our mark; it will not be touched"
            )

    async def _checked_config(self, change: Change, *, any_version: bool = False) -> dict[str, Any]:
        """Read the config fresh once no lock holds it, and refuse unless it is ours and
        unchanged since the plan. A lock that comes and goes is not a change: the digest is
        compared after it is gone, and if the plan itself saw the lock, the config must be the
        one it saw, less the lock. A change without the version it was planned against is
        refused (never a skip of the check); only `any_version`, the destroy's own re-read,
        leaves the digest out."""
        if not any_version:
            _require_version(change)
        guest = self._guest(change)
        what = f"read config of {change.id['vmid']}"
        seen: dict[str, Any] = await self.get(what, guest.config)
        self._check_mark(change, seen)
        config = seen
        if seen.get("lock"):
            config = await self.config_when_unlocked(guest, what)
            self._check_mark(change, config)
        if any_version or config.get("digest") == change.version:
            return config
        if seen.get("digest") == change.version and _without_lock(seen) == _without_lock(config):
            return config
        raise ConflictError(
            f"{change.address}: its config changed since the plan was made; re-plan"
        )

    async def update_guest(self, change: Change) -> None:
        assert change.after is not None
        refuse_blocked(change)
        paths = {f.path for f in change.fields}
        moved = sorted(p for p in paths if p.startswith("volumes.") and p.endswith(".storage"))
        if moved:
            # The planner makes this a plan error; a saved or hand-made plan gets here.
            raise PermanentError(
                f"{change.address}: {', '.join(moved)}: a volume is never moved by the "
                "controller; use Proxmox's move-volume"
            )
        config = await self._checked_config(change)
        guest = self._guest(change)
        node = change.id["node"]
        kind = self._kind(change)
        # The config as the VM will boot: Proxmox's config view has its pending changes applied.
        params, delete = update_params(self.platform, change.address, change.after, config, paths)
        mounts = [k for k in (*params, *delete) if _is_volume_key(kind, k)]
        if mounts and _protected(config):
            if change.after.get("protection"):
                _refuse_protected(change, kind, mounts, delete)
            else:
                # The spec lifts the protection along with the volume change: Proxmox checks
                # the flag it has before the PUT, so it goes first, on its own.
                params.pop("protection", None)
                lifted = {"protection": 0, "digest": config["digest"]}
                await self.run_task(
                    f"lift protection of {change.address}",
                    node,
                    lambda: guest.config.put(**lifted),
                )
                config = await self.get(f"read config of {change.id['vmid']}", guest.config)
        if params or delete:
            if delete:
                params["delete"] = ",".join(delete)
            params["digest"] = config["digest"]
            await self.run_task(
                f"update {change.address}", node, lambda: guest.config.put(**params)
            )
        if (
            kind == "qemu"
            and change.after.get("cloud_init")
            and any(p.startswith("cloud_init") for p in paths)
        ):
            await self.regenerate_cloud_init(change)  # read by the guest at its next boot
        if "rootfs.size" in paths:  # a container's root disk (a VM's disks are volumes)
            await self.resize_disk(change, "rootfs", change.after["rootfs"]["size"])
        for key in grown_volumes(paths, config):
            await self.resize_disk(change, key, change.after["volumes"][key]["size"])
        if "state" in paths and not change.after.get(HOLD_START):
            await self.set_state(change, change.after["state"])

    async def resize_disk(self, change: Change, disk: str, size: str) -> None:
        """Grow one disk of the guest (`rootfs`, `mp0`, `scsi0`, `virtio1`, ...) to `size`, in
        place: Proxmox refuses to shrink one (and the planner never asks). After an update's
        config PUT, and for a guest made by cloning (`disks_to_grow`)."""
        guest = self._guest(change)
        where = "" if disk == "rootfs" else f"{disk} of "
        await self.run_task(
            f"resize {where}{change.address}",
            change.id["node"],
            functools.partial(guest.resize.put, disk=disk, size=size),
        )

    async def set_state(self, change: Change, state: str) -> None:
        guest = self._guest(change)
        node = change.id["node"]
        if state == "running":
            try:
                await self.run_task(
                    f"start {change.address}", node, lambda: guest.status.start.post()
                )
            except TaskFailedError:
                # "VM 109 already running": started between our look and our start (a racing
                # run configuring the same clone, HA, a person). Done, if it runs.
                if await self._power(change) != "running":
                    raise
            if self._kind(change) == "qemu" and (change.after or {}).get("agent"):
                await self.wait_for_agent(change)
        else:
            await self.run_task(
                f"stop {change.address}",
                node,
                lambda: guest.status.shutdown.post(timeout=60, forceStop=1),
            )

    # --- migration ---------------------------------------------------------------------------

    async def migrate_guest(self, change: Change) -> None:
        """Move a guest to another node with Proxmox's own migration: it keeps its vmid, config
        and disks (moved to the desired `rootfs.storage` when that changes too). A running
        container restarts on the target (containers do not live-migrate); a running VM
        migrates online with its local disks, a stopped one offline.

        Where the guest is now decides, not the plan: one already on the target (a run cut off
        while Proxmox finished the migration) is not migrated again, and a migration still
        running (lock `migrate`) is waited out like any lock. The change's other fields are
        then made on the target, checked against the config the plan saw (a config changed
        since raises ConflictError, and the caller re-plans). When the plan saw the guest in
        the middle of something (locked, or already moved), they were judged against a state
        that has passed: they are left to the next plan (`converge` plans again after a
        migration)."""
        assert change.after is not None and change.moves is not None
        source, target = change.moves
        item, waited = await self._settled(change)
        if item["node"] != target:
            if item["node"] != source:
                raise ConflictError(
                    f"{change.address}: vmid {change.id['vmid']} is on {item['node']}, not on "
                    f"{source} as planned; re-plan"
                )
            await self._migrate(change, item, target)
        elif not waited:
            waited = True  # moved since the plan: by whom, and what else changed, is unknown
        kind = self._kind(change)
        rest = tuple(f for f in change.fields if not _migrated(kind, f.path))
        if rest and not waited:
            here = {"vmid": change.id["vmid"], "node": target}
            await self.update_guest(replace(change, action=Action.UPDATE, id=here, fields=rest))

    async def _settled(self, change: Change) -> tuple[dict[str, Any], bool]:
        """The guest's inventory entry (where it is, whether it runs) once no lock holds it,
        after checking it carries our mark for this address, and whether it had to be waited
        for. A guest that moves while we wait (a migration ending) is looked up again."""
        vmid = int(change.id["vmid"])
        what = f"read config of {vmid}"
        waited = False
        for _ in range(_RELOCATES):
            item = await self._locate(change)
            guest = self.client.nodes(item["node"])(item.get("type", "lxc"))(vmid)
            try:
                config = await self.config_when_unlocked(guest, what)
            except NotFoundError:
                waited = True
                continue  # gone from that node while we waited: it moved
            self._check_mark(change, config)
            if not item.get("lock"):
                return item, waited
            # Listed while locked: where it is and whether it runs may have changed since.
            waited = True
        raise TemporaryError(f"{change.address}: vmid {vmid} keeps moving; try again")

    async def _locate(self, change: Change) -> dict[str, Any]:
        """Where Proxmox says the guest is now: its `/cluster/resources` entry (one call)."""
        vmid = int(change.id["vmid"])
        for item in (await self.inventory()).guests:
            if int(item["vmid"]) == vmid:
                return item
        raise NotFoundError(f"{change.address}: vmid {vmid} is not in the cluster any more")

    async def _migrate(self, change: Change, item: Mapping[str, Any], target: str) -> None:
        """The migrate call, with what the guest's kind and power state need, and its task
        (a failed one reports its log's last lines)."""
        assert change.after is not None
        source, kind, vmid = item["node"], item.get("type", "lxc"), int(change.id["vmid"])
        guest = self.client.nodes(source)(kind)(vmid)
        running = item.get("status") == "running"
        storage = None
        if any(f.path == "rootfs.storage" for f in change.fields):
            storage = (change.after.get("rootfs") or {}).get("storage")
        params: dict[str, Any] = {"target": target}
        if kind == "qemu":
            if running:
                params.update({"online": 1, "with-local-disks": 1})
            moved = vm_storage_map(change)
            if moved:
                params["targetstorage"] = ",".join(f"{s}:{t}" for s, t in moved.items())
        else:
            if running:
                params["restart"] = 1
            if storage:
                params["target-storage"] = storage
        await self.run_task(
            f"migrate {change.address} to {target}",
            source,
            lambda: guest.migrate.post(**params),
        )
        await self._until_on(change, target)

    async def _until_on(self, change: Change, target: str) -> None:
        """Wait until the guest shows on `target`, unlocked. At once after a migrate task; an
        HA-managed guest's task only queues the request, and the HA manager moves it later."""
        last: list[dict[str, Any]] = []  # the latest inventory entry, for the timeout message

        async def arrived() -> bool | None:
            last[:] = [item := await self._locate(change)]
            return True if item["node"] == target and not item.get("lock") else None

        await self._poll(
            arrived, lambda: f"{change.address}: still on {last[0]['node']} after its migrate task"
        )

    async def destroy_guest(self, change: Change) -> None:
        """Stop, then destroy with purge; only a guest that carries our mark for this address.
        Its protection flag, if set, is lifted first: this is the allowed destroy it waits for.
        (Its detached volumes, `unusedN`, go with it.)"""
        guest = self._guest(change)
        node = change.id["node"]
        refuse_blocked(change)
        try:
            # The mark decides a destroy, not the digest: the whole guest goes, and a run cut
            # off after lifting its protection has changed its config since the plan.
            config = await self._checked_config(change, any_version=True)
        except NotFoundError:
            # Gone from its node: gone (a re-run after a crash), unless it moved (HA relocated
            # it, someone migrated it) since the plan: then it is planned again, not "done".
            inv = await self.inventory()
            vmid = int(change.id["vmid"])
            elsewhere = [g.get("node") for g in inv.guests if int(g.get("vmid", -1)) == vmid]
            if elsewhere:
                raise TemporaryError(
                    f"{change.address}: vmid {vmid} is on {elsewhere[0]} now, not {node} (moved "
                    "since the plan): not destroyed; observed and planned again"
                ) from None
            return
        if change.final_backup is not None:
            # Ours, and about to go: its last backup first. A failed one stops the destroy.
            await self.backup_guest(change, change.final_backup)
            # A backup can take minutes: the guest is read, and proven ours, once more.
            config = await self._checked_config(change, any_version=True)
        await self._refuse_foreign_backup_jobs(change)
        # Only here: this delete (or replace) was allowed by pruning, and Proxmox refuses to
        # destroy a protected or running guest. Lifted right before the destroy, in this apply.
        await self._unprotect_and_stop(change, config)
        # Not `destroy-unreferenced-disks`: it would also delete every volume named for this
        # vmid on every storage that no config names (a disk kept from an earlier guest of the
        # vmid, another cluster's on a shared storage): never observed, never in `destroys`,
        # never proven ours. What the config names (unusedN included) goes, as the plan said.
        await self.run_task(f"destroy {change.address}", node, lambda: guest.delete(purge=1))

    async def _refuse_foreign_backup_jobs(self, change: Change) -> None:
        """A destroy with `purge` takes the vmid out of every backup job that lists it, and
        deletes a job it leaves empty, or out of a job's `exclude` list (pve-guest-common's
        `remove_vmid_from_backup_jobs`): a job that is not this platform's is never changed
        so (a guest replaced at the same vmid would silently drop out of its operator's job,
        or into one that excluded it). Refused before anything is destroyed, naming the jobs."""
        from reconciler.providers.proxmox_backup import read_job_mark

        vmid = str(change.id["vmid"])
        jobs = await self.get("read the backup jobs", self.client.cluster.backup)
        foreign = []
        for job in jobs or ():
            field = "vmid" if job.get("vmid") is not None else "exclude"
            listed = {v.strip() for v in re.split(r"[,;\s]+", str(job.get(field) or ""))}
            claim, _ = read_job_mark(job.get("comment"), str(job.get("id")))
            if vmid in listed and (claim is None or claim.platform != self.platform):
                foreign.append(str(job.get("id")))
        if foreign:
            raise PermanentError(
                f"{change.address}: vmid {vmid} is listed in backup job(s) {', '.join(foreign)}, "
                "not this platform's (in its vmid or exclude list): destroying it would take it "
                "out of them (and delete a job left empty). Nothing destroyed: take the vmid out "
                "of those jobs first"
            )

    async def _unprotect_and_stop(self, change: Change, config: Mapping[str, Any]) -> None:
        """Before a destroy or a restore in place (both allowed, the guest checked ours): its
        protection flag lifted, against the config just read, and the guest stopped."""
        guest, node = self._guest(change), change.id["node"]
        if _protected(config):
            lifted = {"protection": 0, "digest": config["digest"]}
            await self.run_task(
                f"lift protection of {change.address}",
                node,
                lambda: guest.config.put(**lifted),
            )
        if await self._power(change) == "running":
            await self.run_task(f"stop {change.address}", node, lambda: guest.status.stop.post())
            await self._until_stopped(change)

    async def power(self, change: Change) -> str:
        """The guest's power state now: running, stopped (one status read)."""
        return await self._power(change)

    async def _power(self, change: Change) -> str:
        guest = self._guest(change)
        status = await self.get(f"status of {change.address}", guest.status.current)
        return str(status.get("status"))

    async def _until_stopped(self, change: Change) -> None:
        """The stop task of an HA-managed guest only asks the HA manager, which stops the guest
        later: destroying it before then fails ("container is running")."""

        async def stopped() -> bool | None:
            return True if await self._power(change) != "running" else None

        await self._poll(
            stopped, lambda: f"{change.address}: still running after its stop task", grow=False
        )

    async def _poll(
        self,
        probe: Callable[[], Awaitable[_T | None]],
        timeout: Callable[[], str],
        *,
        grow: bool = True,
    ) -> _T:
        """What `probe` returns once it is not None, polling every `task_poll` s (growing by
        half each time up to `task_poll_max` when `grow`); TemporaryError with `timeout()`'s
        message at `task_timeout`. The one wait for a task, a migration or a stop."""
        deadline = self.clock() + self.retry.task_timeout
        delay = self.retry.task_poll
        while True:
            got = await probe()
            if got is not None:
                return got
            if self.clock() >= deadline:
                raise TemporaryError(timeout())
            await self.sleep(delay)
            if grow:
                delay = min(delay * 1.5, self.retry.task_poll_max)


def _observed_side(change: Change) -> Change:
    """A replace's old guest, to destroy: its vmid, kind and node are what was observed (a kind
    or node change is what forced the replace), never what is wanted: the desired vmid or node
    may name another guest, or none."""
    before = change.before or {}
    ident = {
        **change.id,
        "vmid": before.get("vmid") or change.id["vmid"],
        "node": before.get("node") or change.id["node"],
    }
    return replace(change, after=None, id=ident)


# --- request parameters ----------------------------------------------------------------------


def _gib(size: str) -> str:
    mib = parse_mib(size, bare_unit="G")
    gib = mib / 1024
    return str(int(gib)) if gib == int(gib) else f"{gib:g}"


def restore_params(want: Mapping[str, Any]) -> dict[str, Any]:
    """A restore from a backup (RESTORE_FROM): the vmid, the archive, and the storage the
    spec puts the root disk on; everything else comes from the backup, then converges."""
    source = want[RESTORE_FROM]
    storage = root_storage(want)
    if want.get("type", "lxc") == "lxc":
        params = {"vmid": want["vmid"], "ostemplate": source["volid"], "restore": 1}
    else:
        params = {"vmid": want["vmid"], "archive": source["volid"]}
    if storage:
        params["storage"] = storage
    return params


def root_storage(want: Mapping[str, Any]) -> str | None:
    """The storage of a guest's root disk: a container's `rootfs`, a VM's boot disk (None for
    a VM without one)."""
    if want.get("type", "lxc") != "qemu":
        return (want.get("rootfs") or {}).get("storage")
    boot = want.get("boot_disk")
    disk = (want.get("volumes") or {}).get(boot) if boot else None
    return disk.get("storage") if isinstance(disk, Mapping) else None


def create_params(platform: str, address: str, want: Mapping[str, Any]) -> dict[str, Any]:
    kind = want.get("type", "lxc")
    params: dict[str, Any] = {
        "vmid": want["vmid"],
        "cores": want["cores"],
        "memory": want["memory"],
        "onboot": int(want["onboot"]),
        "tags": ";".join(want["tags"]),
        "description": with_mark(
            want.get("description", ""), platform, address, want.get("template"), want["vmid"]
        ),
        "start": int(want["state"] == "running" and not want.get(HOLD_START)),
    }
    if kind == "lxc":
        rootfs = want.get("rootfs") or {}
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
        params.update({"name": want["name"], **_QEMU_CREATE})
        params.update(dict(want.get("net") or {}))
        # Its disks are its volumes, the boot disk among them; it boots from that one, then
        # its first NIC: said, as PVE's default would boot the first disk in bus order.
        first = [want.get("boot_disk"), "net0" if "net0" in params else None]
        if any(first):
            params["boot"] = "order=" + ";".join(d for d in first if d)
        params.update(provisioning_params(want, {}, None)[0])  # the agent, cloud-init
    if want.get("protection"):
        params["protection"] = 1
    if want.get("pool"):
        params["pool"] = want["pool"]  # created into it (its pool's changes run before)
    for key, volume in sorted((want.get("volumes") or {}).items()):
        params[key] = volume_value(str(kind), volume, None)
    return params


_PLAIN_KEYS = ("cores", "memory", "swap", "features")
_MAC = re.compile(r"^[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){5}\Z")


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
            want.get("description", ""),
            platform,
            address,
            want.get("template"),
            want.get("vmid") or config.get("vmid"),
            # Where it was adopted into, kept (the plan names it should it leave the spec).
            adopted=read_mark(config.get("description"))[0].get("adopted"),
        )
    for path in sorted(p for p in paths if p.startswith("net.")):
        key = path.split(".", 1)[1]
        value = (want.get("net") or {}).get(key)
        if value is None:
            delete.append(key)
            continue
        params[key] = _keep_mac(kind, value, str(config.get(key, "")))
    if "protection" in paths:
        params["protection"] = int(bool(want.get("protection")))
    volumes = want.get("volumes") or {}
    for key in sorted({p.split(".")[1] for p in paths if p.startswith("volumes.")}):
        volume = volumes.get(key)
        current = config.get(key)
        fields = {p.split(".")[2] for p in paths if p.startswith(f"volumes.{key}.")}
        if kind == "qemu" and current is not None and not is_vm_disk(current):
            # A CD-ROM or the cloud-init drive: never a volume, never replaced by one.
            raise PermanentError(
                f"{address}: {key} holds {str(current).split(',', 1)[0]!r}, a CD-ROM or "
                "cloud-init drive, not a disk: give the spec's disk another key"
            )
        if volume is None:
            # Detached (the planner allowed it: pruning is on). Proxmox keeps the volume as
            # `unusedN`: its data stays on the storage until that unused volume is removed,
            # or the guest is destroyed (a purge destroys its unused volumes too). On a
            # running container the detach waits in `pending` until the next restart.
            if current is not None:
                delete.append(key)
        elif current is None:
            params[key] = volume_value(kind, volume, None)  # added: Proxmox allocates it
        elif fields - {"size", "storage"}:
            params[key] = volume_value(kind, volume, str(current))  # in place, same volume
    if kind == "qemu":
        more, gone = provisioning_params(want, config, paths)
        params.update(more)
        delete.extend(gone)
    if kind == "qemu" and "boot_disk" in paths:
        # The order as it will be: PVE refuses one naming a drive that is not there.
        after = {k: v for k, v in {**config, **params}.items() if k not in delete}
        params["boot"] = with_boot_disk(after, want.get("boot_disk"))
    return params, delete


def provisioning_params(
    want: Mapping[str, Any], config: Mapping[str, Any], paths: Iterable[str] | None
) -> tuple[dict[str, Any], list[str]]:
    """A VM's agent and cloud-init keys for the changed `paths` (None: all the spec sets, on
    a create), and a cloud-init drive on the root disk's storage when it has cloud-init and no
    drive yet. The cloud-init password is read from its reference here (`read_secret`)."""
    params: dict[str, Any] = {}
    delete: list[str] = []
    changed = None if paths is None else set(paths)
    if want.get("agent") is not None and (changed is None or "agent" in changed):
        params["agent"] = agent_value(bool(want["agent"]), config.get("agent"))
    fields = None
    if changed is not None:
        fields = [p for p in changed if p == "cloud_init" or p.startswith("cloud_init.")]
    if want.get("cloud_init") is None or fields == []:
        return params, delete
    more, delete = cloud_init_params(want, config, fields, read_secret)
    params.update(more)
    if cloud_init_drive(config) is None:
        volumes = want.get("volumes") or {}
        storage = root_storage(want) or next(
            (v.get("storage") for v in volumes.values() if isinstance(v, Mapping)), None
        )
        if storage is None:
            raise PermanentError("no storage for its cloud-init drive: give the VM a disk")
        key, value = new_cloud_init_drive({**config, **params}, str(storage))
        params[key] = value
    return params, delete


def clone_config_params(
    platform: str, address: str, want: Mapping[str, Any], config: Mapping[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """The one config update that makes a fresh clone what the spec says (`configure_clone`):
    every setting the spec manages, the NICs the template has and the spec does not removed,
    the spec's volumes the template lacks added. A key to remove that the clone does not
    hold is left out."""
    kind = str(want.get("type", "lxc"))
    paths = {"cores", "memory", "name", "tags", "onboot", "protection"}
    if kind == "lxc":
        paths |= {"swap", "features"}
    else:
        paths |= {"agent", "cloud_init"}
    nets = set(want.get("net") or {}) | {k for k in config if re.fullmatch(r"net\d+", k)}
    paths |= {f"net.{k}" for k in nets}
    volumes = want.get("volumes") or {}
    paths |= {f"volumes.{k}.storage" for k in volumes if config.get(k) is None}
    params, delete = update_params(platform, address, want, config, paths)
    return params, [k for k in delete if config.get(k) is not None]


# --- volumes and protection -------------------------------------------------------------------

# What the spec manages in a volume's property string; the rest (a VM disk's iothread, a mount
# point's size or idmap) is kept as Proxmox has it when the volume is changed in place.
_MANAGED_VOLUME_KEYS = {
    "lxc": ("mp", "backup", "acl", "quota", "ro", "replicate", "mountoptions"),
    "qemu": ("backup",),
}


def volume_value(kind: str, volume: Mapping[str, Any], current: str | None) -> str:
    """A volume's config value. New (`current` None): the allocation form, which makes
    Proxmox allocate it, `local-lvm:50,mp=/data,backup=1` (a VM disk: `local-lvm:50`, with
    `backup=0` when left out of backups). Existing: its volume id and what Proxmox holds
    beyond the spec, with the spec's settings: `local-lvm:vm-1001-disk-1,mp=/new,size=50G`."""
    props: dict[str, str] = {}
    if kind == "lxc":
        props["mp"] = str(volume["path"])
        if volume.get("backup"):
            props["backup"] = "1"
        for flag in ("acl", "quota", "ro", "replicate"):
            if flag in volume:
                props[flag] = str(int(bool(volume[flag])))
        if volume.get("mountoptions"):
            props["mountoptions"] = str(volume["mountoptions"])
    elif not volume.get("backup", True):
        props["backup"] = "0"
    if current is None:
        head = f"{volume['storage']}:{_gib(volume['size'])}"
    else:
        kv = parse_kv(current)
        head = kv.pop("volume", "")
        managed = _MANAGED_VOLUME_KEYS.get(kind, ())
        props.update({k: v for k, v in kv.items() if k not in managed})
    return ",".join([head, *(f"{k}={v}" for k, v in props.items())])


def grown_volumes(paths: Iterable[str], config: Mapping[str, Any]) -> list[str]:
    """The volumes of a change whose size changed and that exist already (a new one is
    allocated at its size). A VM's boot disk is one of its volumes."""
    keys = {p.split(".")[1] for p in paths if p.startswith("volumes.") and p.endswith(".size")}
    return sorted(k for k in keys if config.get(k) is not None)


def disks_to_grow(kind: str, want: Mapping[str, Any], config: Mapping[str, Any]) -> list[str]:
    """The volumes a config holds smaller than `want` says (the desired attributes): what a
    guest made another way than from the spec (a clone of a template, a restore) grows to.
    Never one that is larger: Proxmox cannot shrink, and the planner refuses to."""
    have = observed_volumes(kind, config)
    out = []
    for key, volume in sorted((want.get("volumes") or {}).items()):
        size = parse_kv(have.get(key, "")).get("size")
        if size is not None and parse_mib(volume["size"], bare_unit="G") > parse_mib(
            size, bare_unit="G"
        ):
            out.append(key)
    return out


def _is_volume_key(kind: str, key: str) -> bool:
    return is_vm_drive_key(key) if kind == "qemu" else bool(_LXC_VOLUME.fullmatch(key))


def _protected(config: Mapping[str, Any]) -> bool:
    return str(config.get("protection", 0)).lower() in ("1", "true")


# Changes to a guest that exists: each was planned against its config's digest.
_VERSIONED = frozenset({Action.UPDATE, Action.MIGRATE, Action.REPLACE, Action.DELETE})


def _require_version(change: Change) -> None:
    """A change to an existing guest without the version it was planned against (a saved plan
    edited to `version: null`, a hand-made change) is refused: nothing would tell whether the
    guest is still what the plan saw."""
    if change.action in _VERSIONED and change.version is None:
        raise PermanentError(f"{change.address}: no observed version: re-plan")


def _refuse_protected(
    change: Change, kind: str, mounts: Iterable[str], delete: Iterable[str]
) -> None:
    """A guest that stays protected keeps its volumes as they are where Proxmox says so: a
    container's mount points are not added, changed or detached ("protection mode enabled"),
    a VM's disks not detached. The controller does not lift the flag for that: the spec
    must (`protection: false` for this apply)."""
    refused = sorted(mounts) if kind == "lxc" else sorted(k for k in delete if k in mounts)
    if refused:
        raise PermanentError(
            f"{change.address}: {', '.join(refused)}: Proxmox refuses to change the volumes of "
            "a protected guest; set protection: false in the spec for this change (and back "
            "to true after it)"
        )
