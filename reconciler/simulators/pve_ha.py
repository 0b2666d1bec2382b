"""HA resources in the fake PVE: `/cluster/ha/resources`, and what the HA manager does to the
power of the guests it manages.

fakepve 0.5 answers `/cluster/ha/resources` from its schema and stores nothing; it does model
what HA does to a guest's status API (a guest whose `ha_state` is set gets `hastart`/`hastop`
tasks that only ask the HA manager, which acts `ha_delay` PVE seconds later) and shows
`hastate` in `/cluster/resources`. `HaApi`, mixed into `PlatformPve`
(reconciler/simulators/pve.py), stores the resources the way fakepve builds its own areas (a
`_routes_ha` table whose handlers run after fakepve's schema and permission checks) and keeps
each guest's `ha_state` in step with them, so fakepve's own power routes take the HA path
exactly for the guests HA manages. Each behaviour follows PVE's source:

Resources: pve-ha-manager `src/PVE/API2/HA/Resources.pm`, `src/PVE/HA/Config.pm`,
`src/PVE/HA/Resources.pm`, `Resources/PVEVM.pm`, `Resources/PVECT.pm`.
- `GET` lists every resource: `sid`, `type`, the cluster-wide `digest` (one for the whole
  resources.cfg) and the options set (`state`, `group`, `max_restart`, `max_relocate`,
  `comment`, `failback`); `group` is left out once HA groups have been migrated to rules (PVE
  9: `have_groups_been_migrated`, no group defined; `ha_groups` here), and a group that does
  not exist gets `errors.group`. `GET /{sid}` is one of them ("no such resource 'vm:100'").
- A sid is `ct:N` or `vm:N`, or a bare vmid whose guest says which (parse_sid: "unable to
  detect SID from VMID - VM/CT N does not exist", "unable to parse service id 'x'").
- `POST`: the quorum; `type` must match the sid's ("types does not match"); `group` once groups
  are rules: "invalid parameter 'group': ha groups have been migrated to rules"; the name is a
  vmid ("invalid VMID"); the guest exists and is of that type ("resource 'vm:100' does not
  exist in cluster", "resource 'ct:100' - guest with ID 100 is not a CT"); an existing sid:
  "create resource failed: resource ID 'ct:100' already defined".
- `PUT`: `digest` (assert_if_modified: "update resources config failed: detected modified
  configuration - file changed by other user? Try again."), `group` checks ("HA group 'x' does
  not exist"), `delete=` of options (`no such option 'x'`), an unknown sid: "update resources
  config failed: no such resource 'ct:100'".
- `DELETE`: "cannot delete service 'ct:100', not HA managed!" for one that is not there. The
  guest stays as it is.

What the HA manager does (pve-ha-manager `src/PVE/HA/Manager.pm`, `LRM.pm`): a requested state
`started` (or its alias `enabled`) starts the guest, `stopped` and `disabled` stop it, each
`ha_delay` PVE seconds after the request (scaled by `time_scale`; at once at 0), reading the
resource's state when it acts (a newer request wins); `ignored` takes the guest out of HA's
hands (`ha_state` None: the API acts on it directly, Config.pm "ignored service behave as if
they were not managed by HA"). A guest's start through its status API, while HA manages it,
sets the requested state to `started` (qemu-server `API2/Qemu.pm` vm_start, pve-container
`API2/LXC/Status.pm`: `ha-manager set SID --state started`); a stop or shutdown to `stopped`
(`ha-manager crm-command stop SID TIMEOUT`, which the CRM turns into `state: stopped`; here at
the request, not when the CRM reads it).

A guest destroyed with `purge=1` leaves the HA configuration (qemu-server destroy_vm, LXC
destroy: "NOTE: removed VM N from HA resource configuration."); fakepve refuses the destroy of
a guest HA manages without it. Here a resource whose guest is gone is dropped when the HA
routes are next asked (an `ignored` one too, which PVE would have refused to lose). A guest
created with `ha-managed=1` (fakepve sets its `ha_state`) is listed as the resource
`ha-manager add` makes.

Helpers for tests: `ha_resources` (sid -> options, as resources.cfg holds them), `ha_groups`
(HA groups that exist; empty: migrated to rules, PVE 9's default).

Not modelled: HA rules (node affinity), fencing, relocation on failure (`max_restart`,
`max_relocate` are stored only), the `error` service state, migrate/relocate requests through
`/cluster/ha/resources/{sid}/migrate`, `failback`.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any

from fakepve.model import PveError
from fakepve.routing import StatefulRoutes, check_digest, die, sha1, split_list

# The options a VM's or container's HA resource takes (Resources/PVEVM.pm, PVECT.pm `options`).
_OPTIONS = ("state", "group", "comment", "failback", "max_restart", "max_relocate")
_TYPES = {"vm": "qemu", "ct": "lxc"}


class HaApi(StatefulRoutes):  # type: ignore[misc]  # fakepve ships no types
    """Mixin for FakePve: `/cluster/ha/resources` and the HA manager (see the module
    docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # sid -> {"type": "ct"|"vm", option: value, ...}: what /etc/pve/ha/resources.cfg holds.
        self.ha_resources: dict[str, dict[str, Any]] = {}
        # HA groups that exist (PVE 8). None at all: they have been migrated to rules (PVE 9).
        self.ha_groups: set[str] = set()
        self._ha_jobs: set[asyncio.Future[None]] = set()

    def _routes_ha(self) -> list[tuple[str, str, Any]]:
        one = "/cluster/ha/resources/{sid}"
        return [
            ("GET", "/cluster/ha/resources", self._ha_index),
            ("POST", "/cluster/ha/resources", self._ha_create),
            ("GET", one, self._ha_read),
            ("PUT", one, self._ha_update),
            ("DELETE", one, self._ha_delete),
        ]

    # ------------------------------------------------------------------ state

    def _ha_migrated(self) -> bool:
        """Config.pm have_groups_been_migrated: no HA group left."""
        return not self.ha_groups

    def _ha_digest(self) -> str:
        return str(sha1(json.dumps(self.ha_resources, sort_keys=True)))

    def _ha_sync(self) -> None:
        """Resources of guests that are gone are dropped (destroyed with purge); guests fakepve
        made HA-managed on create (`ha-managed=1`) get the resource `ha-manager add` made."""
        for sid in list(self.ha_resources):
            if self.guest(int(sid.split(":", 1)[1])) is None:
                del self.ha_resources[sid]
        for guest in [*self.vms, *self.cts]:
            if guest.ha_state is None:
                continue
            sid = f"{'vm' if guest.guest.startswith('qemu/') else 'ct'}:{guest.vmid}"
            if sid not in self.ha_resources:
                state = "started" if guest.ha_state == "started" else "stopped"
                self.ha_resources[sid] = {"type": sid[:2], "state": state}

    def _ha_parse_sid(self, text: str) -> tuple[str, str, str]:
        """Config.pm parse_sid: (sid, type, name)."""
        if re.fullmatch(r"\d+", text):
            guest = self.guest(int(text))
            if guest is None:
                raise die(f"unable to detect SID from VMID - VM/CT {text} does not exist")
            kind = "vm" if guest.guest.startswith("qemu/") else "ct"
            return f"{kind}:{text}", kind, text
        m = re.fullmatch(r"(\S+):(\S+)", text)
        if m is None:
            raise die(f"unable to parse service id '{text}'")
        return text, m[1], m[2]

    def _ha_copy(self, sid: str) -> dict[str, Any]:
        """Resources.pm api_copy_config: the options, `sid`, the cluster-wide digest."""
        found = dict(self.ha_resources[sid])
        found.update(sid=sid, digest=self._ha_digest())
        if self._ha_migrated():
            found.pop("group", None)
        elif found.get("group") and found["group"] not in self.ha_groups:
            found["errors"] = {"group": f"group '{found['group']}' does not exist"}
        return found

    @staticmethod
    def _ha_options(v: dict[str, Any]) -> dict[str, Any]:
        """The options of a request, as resources.cfg keeps them (`enabled` is `started`)."""
        out = {k: v[k] for k in _OPTIONS if v.get(k) is not None}
        if out.get("state") == "enabled":
            out["state"] = "started"
        return out

    # ---------------------------------------------------------------- routes

    async def _ha_index(self, v: dict[str, Any], user: str) -> list[dict[str, Any]]:
        self._ha_sync()
        wanted = v.get("type")
        return [
            self._ha_copy(sid)
            for sid in sorted(self.ha_resources)
            if wanted in (None, self.ha_resources[sid]["type"])
        ]

    async def _ha_read(self, v: dict[str, Any], user: str) -> dict[str, Any]:
        self._ha_sync()
        sid, _kind, _name = self._ha_parse_sid(str(v["sid"]))
        if sid not in self.ha_resources:
            raise die(f"no such resource '{sid}'")
        return self._ha_copy(sid)

    async def _ha_create(self, v: dict[str, Any], user: str) -> None:
        self.need_quorum()
        self._ha_sync()
        sid, kind, name = self._ha_parse_sid(str(v["sid"]))
        if v.get("type") and v["type"] != kind:
            raise die("types does not match")
        if v.get("group") is not None and self._ha_migrated():
            raise die("invalid parameter 'group': ha groups have been migrated to rules")
        if kind not in _TYPES:
            raise die(f"unknown section type '{kind}'")
        if not re.fullmatch(r"[1-9][0-9]+", name):
            raise die("invalid VMID")
        guest = self.guest(int(name))
        if guest is None:
            raise die(f"resource '{sid}' does not exist in cluster")
        if not guest.guest.startswith(_TYPES[kind] + "/"):
            raise die(f"resource '{sid}' - guest with ID {name} is not a {kind.upper()}")
        if sid in self.ha_resources:
            raise die(f"create resource failed: resource ID '{sid}' already defined")
        self.ha_resources[sid] = {"type": kind, **self._ha_options(v)}
        await self._ha_manage(sid)

    async def _ha_update(self, v: dict[str, Any], user: str) -> None:
        self._ha_sync()
        sid, kind, _name = self._ha_parse_sid(str(v["sid"]))
        if v.get("type") and v["type"] != kind:
            raise die("types does not match")
        group = v.get("group")
        if group:
            if self._ha_migrated():
                raise die("invalid parameter 'group': ha groups have been migrated to rules")
            if group not in self.ha_groups:
                raise die(f"HA group '{group}' does not exist")
        fail = "update resources config failed: "
        try:
            check_digest(self._ha_digest(), v.get("digest"))
            found = self.ha_resources.get(sid)
            if found is None:
                raise die(f"no such resource '{sid}'")
            changed = {**found, **self._ha_options(v)}
            for key in split_list(v.get("delete")):
                if key not in _OPTIONS:
                    raise die(f"no such option '{key}'")
                changed.pop(key, None)
        except PveError as exc:
            raise die(fail + exc.message) from exc
        self.ha_resources[sid] = changed
        await self._ha_manage(sid)

    async def _ha_delete(self, v: dict[str, Any], user: str) -> None:
        self._ha_sync()
        sid, _kind, name = self._ha_parse_sid(str(v["sid"]))
        if sid not in self.ha_resources:
            raise die(f"cannot delete service '{sid}', not HA managed!")
        del self.ha_resources[sid]
        guest = self.guest(int(name))
        if guest is not None:
            guest.ha_state = None  # no longer HA's: as it is, and the API acts on it directly

    # ------------------------------------------------------------ the manager

    def _ha_requested(self, guest: Any, state: str) -> None:
        """A start or stop through the guest's status API, while HA manages it: the request
        becomes the resource's requested state."""
        self._ha_sync()
        sid = f"{'vm' if guest.guest.startswith('qemu/') else 'ct'}:{guest.vmid}"
        if sid in self.ha_resources:
            self.ha_resources[sid]["state"] = state

    async def _ha_request(self, vm: Any, user: str, state: str) -> Any:
        """fakepve's HA start or stop of a VM, with the request's state written (see above)."""
        self._ha_requested(vm, state)
        return await super()._ha_request(vm, user, state)

    async def _ct_ha(self, ct: Any, user: str, state: str, timeout: Any = None) -> Any:
        """fakepve's HA start or stop of a container, with the request's state written."""
        self._ha_requested(ct, state)
        return await super()._ct_ha(ct, user, state, timeout)

    async def _ha_manage(self, sid: str) -> None:
        """The CRM and LRM acting on a resource's requested state: `ha_state` at once (the
        API's requests take the HA path from now on), the power `ha_delay` later."""
        conf = self.ha_resources[sid]
        guest = self.guest(int(sid.split(":", 1)[1]))
        state = conf.get("state", "started")
        if guest is None:
            return
        if state == "ignored":
            guest.ha_state = None
            return
        guest.ha_state = "started" if state == "started" else "stopped"

        async def later() -> None:
            await self.pause(self.ha_delay)
            now = self.ha_resources.get(sid)
            if now is None or now.get("state", "started") == "ignored":
                return  # removed, or handed back to the API, meanwhile
            self._ha_power(guest, now.get("state", "started") == "started")

        if self.time_scale:
            job = asyncio.ensure_future(later())
            self._ha_jobs.add(job)  # held until done: the loop keeps only a weak reference
            job.add_done_callback(self._ha_jobs.discard)
        else:
            await later()

    def _ha_power(self, guest: Any, running: bool) -> None:
        """The LRM's start or stop, as fakepve's own start and stop leave the guest (its
        pending config applied at a start; a container gets a process)."""
        if (guest.status == "running") == running or guest.lock:
            return  # there already; a locked guest is left (PVE's LRM would try again)
        container = guest.guest.startswith("lxc/")
        if running:
            if container:
                self._apply(guest)
                guest.pid = next(self._ct_pids)
            else:
                guest.apply_pending()
                guest.qmpstatus = "running"
            guest.status = "running"
            guest.started_at = time.time()
        else:
            if container:
                guest.pid = None
            else:
                guest.qmpstatus = "stopped"
            guest.status = "stopped"
