"""HA resources in the fake PVE (reconciler/simulators/pve_ha.py), through the real proxmoxer
client against PlatformPve: the resources stored and listed, PVE's refusals with its words,
what the HA manager does to a guest's power when its requested state changes, and what a start
or stop through the guest's status API does to the resource while HA manages the guest.
"""

from __future__ import annotations

from typing import Any

import pytest
from proxmoxer import ProxmoxAPI
from proxmoxer.core import ResourceException

from reconciler.model.spec import ProxmoxApi
from reconciler.providers.proxmox import connect
from tests.waiting import until, wait_for

NODE = "pve-runtime"


@pytest.fixture
def client(pve_api: ProxmoxApi) -> ProxmoxAPI:
    return connect(pve_api)


@pytest.fixture
def ct(pve: Any) -> Any:
    """Container 1000, stopped, on pve-runtime."""
    return pve.add_ct(1000, "mc-lobby", node=NODE, status="stopped")


def refused(call: Any) -> str:
    with pytest.raises(ResourceException) as caught:
        call()
    return f"{caught.value.status_code} {caught.value.content}"


def resources(client: ProxmoxAPI) -> dict[str, dict[str, Any]]:
    return {r["sid"]: r for r in client.cluster.ha.resources.get()}


def tasks_of(pve: Any, vmid: int) -> list[str]:
    return [t["type"] for t in pve.tasklog if t["id"] == str(vmid)]


def test_create_lists_and_reads_a_resource(pve: Any, client: ProxmoxAPI, ct: Any) -> None:
    client.cluster.ha.resources.post(sid="1000", state="stopped", max_restart=2, comment="x")
    listed = resources(client)
    assert list(listed) == ["ct:1000"]
    one = listed["ct:1000"]
    assert (one["type"], one["state"], one["max_restart"], one["comment"]) == (
        "ct",
        "stopped",
        2,
        "x",
    )
    assert one["digest"] == client.cluster.ha.resources("ct:1000").get()["digest"]
    assert "max_relocate" not in one  # only what was set: PVE's default applies
    assert client.cluster.ha.resources.get(type="vm") == []
    # /cluster/resources shows the guest's HA state, as fakepve does for what HA manages
    item = next(i for i in client.cluster.resources.get(type="vm") if i["vmid"] == 1000)
    assert item["hastate"] == "stopped"


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"sid": "ct:1001"}, "resource 'ct:1001' does not exist in cluster"),
        ({"sid": "vm:1000"}, "resource 'vm:1000' - guest with ID 1000 is not a VM"),
        ({"sid": "1001"}, "unable to detect SID from VMID - VM/CT 1001 does not exist"),
        ({"sid": "ct:1000", "type": "vm"}, "types does not match"),
        (
            {"sid": "ct:1000", "group": "prefer-runtime"},
            "invalid parameter 'group': ha groups have been migrated to rules",
        ),
    ],
)
def test_create_refusals(client: ProxmoxAPI, ct: Any, params: dict[str, str], message: str) -> None:
    assert message in refused(lambda: client.cluster.ha.resources.post(**params))
    assert resources(client) == {}


def test_create_twice_and_groups(pve: Any, client: ProxmoxAPI, ct: Any) -> None:
    pve.ha_groups.add("prefer-runtime")  # a PVE 8 cluster: groups are still groups
    client.cluster.ha.resources.post(sid="ct:1000", group="prefer-runtime")
    assert resources(client)["ct:1000"]["group"] == "prefer-runtime"
    again = refused(lambda: client.cluster.ha.resources.post(sid="ct:1000"))
    assert "create resource failed: resource ID 'ct:1000' already defined" in again
    put = refused(lambda: client.cluster.ha.resources("ct:1000").put(group="nowhere"))
    assert "HA group 'nowhere' does not exist" in put
    pve.ha_groups.clear()  # migrated to rules: the group is no longer shown
    assert "group" not in resources(client)["ct:1000"]


def test_update_delete_and_digest(pve: Any, client: ProxmoxAPI, ct: Any) -> None:
    client.cluster.ha.resources.post(sid="ct:1000", state="stopped", max_relocate=3)
    digest = resources(client)["ct:1000"]["digest"]
    client.cluster.ha.resources("ct:1000").put(max_restart=4, delete="max_relocate")
    one = resources(client)["ct:1000"]
    assert (one["max_restart"], "max_relocate" in one) == (4, False)
    stale = refused(
        lambda: client.cluster.ha.resources("ct:1000").put(state="stopped", digest=digest)
    )
    assert "update resources config failed: detected modified configuration" in stale
    unknown = refused(lambda: client.cluster.ha.resources("ct:1001").put(state="stopped"))
    assert "update resources config failed: no such resource 'ct:1001'" in unknown
    client.cluster.ha.resources("ct:1000").delete()
    assert resources(client) == {}
    gone = refused(lambda: client.cluster.ha.resources("ct:1000").delete())
    assert "cannot delete service 'ct:1000', not HA managed!" in gone
    assert ct.ha_state is None  # the API acts on it directly again


def test_requested_state_drives_the_power(pve: Any, client: ProxmoxAPI, ct: Any) -> None:
    ha = client.cluster.ha.resources
    ha.post(sid="ct:1000", state="started")
    assert ct.status == "running"  # the HA manager started it (time scale 0: at once)
    assert "vzstart" not in tasks_of(pve, 1000)  # not through the API: HA's own LRM
    ha("ct:1000").put(state="disabled")
    assert ct.status == "stopped"
    ha("ct:1000").put(state="enabled")  # the alias of started
    assert (ct.status, resources(client)["ct:1000"]["state"]) == ("running", "started")
    ha("ct:1000").put(state="ignored")
    assert ct.ha_state is None and ct.status == "running"  # left as it is, and to the API


def test_status_api_of_a_managed_guest_requests_ha(pve: Any, client: ProxmoxAPI, ct: Any) -> None:
    """A start or stop through the guest's status API becomes an HA request that rewrites the
    resource's requested state (qemu-server/pve-container: `ha-manager set`, `crm-command
    stop`)."""
    ha = client.cluster.ha.resources
    ha.post(sid="ct:1000", state="stopped")
    guest = client.nodes(NODE).lxc(1000)
    guest.status.start.post()
    assert resources(client)["ct:1000"]["state"] == "started"
    until(lambda: guest.status.current.get()["status"] == "running")
    guest.status.shutdown.post(timeout=30)
    assert resources(client)["ct:1000"]["state"] == "stopped"
    until(lambda: guest.status.current.get()["status"] == "stopped")
    assert tasks_of(pve, 1000)[-2:] == ["hastart", "hastop"]
    ha("ct:1000").put(state="ignored")
    guest.status.start.post()  # ignored: straight to the guest, the resource as it was
    assert tasks_of(pve, 1000)[-1] == "vzstart"
    assert resources(client)["ct:1000"]["state"] == "ignored"


def test_a_vm_and_its_destroy_with_purge(pve: Any, client: ProxmoxAPI) -> None:
    vm = pve.add_vm(100, "bastion", node=NODE, status="stopped")
    client.cluster.ha.resources.post(sid="vm:100", state="started")
    assert vm.status == "running"
    qm = client.nodes(NODE).qemu(100)
    qm.status.stop.post()
    assert resources(client)["vm:100"]["state"] == "stopped"
    until(lambda: qm.status.current.get()["status"] == "stopped")
    kept = refused(lambda: qm.delete())
    assert "used in HA resources and purge parameter not set" in kept
    upid = qm.delete(purge=1)
    status = wait_for(
        lambda: (s := client.nodes(NODE).tasks(upid).status.get())["status"] == "stopped" and s,
        "destroy",
    )
    assert status["exitstatus"] == "OK"
    assert resources(client) == {}  # purged from the HA configuration with its guest


@pytest.mark.fakepve(time_scale=0.01)
def test_the_manager_acts_later_and_reads_the_latest_request(
    pve: Any, client: ProxmoxAPI, ct: Any
) -> None:
    """With time running, HA acts `ha_delay` PVE seconds after a request, on the state the
    resource asks for then: a request overtaken by a newer one is not carried out."""
    ha = client.cluster.ha.resources
    ha.post(sid="ct:1000", state="started")
    assert ct.status == "stopped"  # not yet: the manager acts later
    ha("ct:1000").put(state="stopped")
    until(lambda: not pve._ha_jobs)  # both requests acted on
    assert ct.status == "stopped"
    ha("ct:1000").put(state="started")
    until(lambda: ct.status == "running")
