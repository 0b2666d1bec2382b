"""VMs made by cloning a template, end to end on fakepve through the real client.

A cloud-init template (vmid 9000, `debian-12-ci`, a 4 GiB `scsi0`, a cloud-init drive) sits on
pve-runtime, as an operator makes one (`qm create`, `qm template`). The spec's VM is cloned
from it (full, linked, by vmid or name), configured in one update, its disk grown, started. The
template is never changed; a clone cut off before its configuration is found again (its mark)
and converged, never cloned twice. Assertions read Proxmox's state or fakepve's request log.
"""

from __future__ import annotations

from typing import Any

import pytest

from reconciler.cli.render import render_change
from reconciler.model.plans import Action
from reconciler.providers.proxmox import ProxmoxProvider, read_mark
from reconciler.providers.proxmox_provisioning import clone_params
from tests.fakepve_fixtures import TEMPLATE, mutating_calls, request_bodies
from tests.guest_helpers import plan_now
from tests.providers.vm_provisioning import (
    GUESTS,
    NODE,
    TEMPLATE_VMID,
    assert_template_untouched,
    clone_posts,
    converge_once,
    errors,
    load,
    make_template,
    vm,
    with_clones,
)


@pytest.fixture
def template(provider: ProxmoxProvider, pve: Any) -> dict[str, Any]:
    """The template made; its config as it is before any run."""
    make_template(provider.client)
    pve.requests.clear()
    return dict(provider.client.nodes(NODE).qemu(TEMPLATE_VMID).config.get())


# --- the plan ------------------------------------------------------------------------------


def test_plan_shows_the_clone_and_its_template(
    provider: ProxmoxProvider, template: dict[str, Any]
) -> None:
    spec, graph = load()
    plan = plan_now(graph, with_clones(provider, spec))
    (change,) = plan.actions
    assert change.action is Action.CREATE
    assert change.after is not None and change.after["clone"]["vmid"] == TEMPLATE_VMID
    head = render_change(change)[0]
    assert head.startswith("+ guest/web-vm") and head.endswith("(clone of 9000)"), head


@pytest.mark.parametrize(
    ("source", "code"),
    [
        ("9001", "clone-source-missing"),
        ("debian-13-ci", "clone-source-missing"),
    ],
)
def test_a_missing_template_is_a_plan_error(
    provider: ProxmoxProvider, template: dict[str, Any], source: str, code: str
) -> None:
    spec, graph = load(GUESTS, (f"from: {TEMPLATE_VMID}", f"from: {source}"))
    plan = plan_now(graph, with_clones(provider, spec))
    assert plan.errored and not plan.actions
    assert [d.code for d in plan.diagnostics if d.severity.value == "error"] == [code]


def test_a_guest_that_is_no_template_is_refused(provider: ProxmoxProvider, pve: Any) -> None:
    client = provider.client
    upid = client.nodes(NODE).qemu.post(vmid=9000, name="plain", scsi0="local-lvm:4")
    assert client.nodes(NODE).tasks(upid).status.get()["exitstatus"] == "OK"
    spec, graph = load()
    plan = plan_now(graph, with_clones(provider, spec))
    assert [d.code for d in plan.diagnostics] == ["clone-not-template"]
    assert not plan.actions


# --- full and linked clones ------------------------------------------------------------------


def test_full_clone_is_configured_grown_started_and_stays_silent(
    provider: ProxmoxProvider, pve: Any, template: dict[str, Any]
) -> None:
    spec, graph = load()
    guests = with_clones(provider, spec)
    conv = converge_once(graph, guests)
    assert conv.ok, errors(conv)
    (body,) = request_bodies(pve, "POST", f"/qemu/{TEMPLATE_VMID}/clone")
    assert body["newid"] == "500" and body["full"] == "1" and body["name"] == "web-vm"
    assert "target" not in body  # the template is on the guest's node
    config = vm(guests)
    mark, _ = read_mark(config["description"])
    assert mark["address"] == "guest/web-vm" and mark["vmid"] == "500"
    assert config["tags"] == "reconciler" and int(config["cores"]) == 2
    assert int(config["memory"]) == 2048
    assert "size=16G" in config["scsi0"] and "base-" not in config["scsi0"]
    assert config["agent"] == "1" and config["ciuser"] == "ops"
    assert config["ipconfig0"] == "gw=10.0.20.1,ip=10.0.20.5/24"
    assert config["nameserver"] == "10.0.0.53"
    # Its own cloud-init drive (the template's, cloned), and no second one.
    assert config["ide2"].startswith("local-lvm:vm-500-cloudinit") and "ide0" not in config
    status = guests.client.nodes(NODE).qemu(500).status.current.get()
    assert status["status"] == "running"
    assert_template_untouched(guests, pve, template)
    # Converged: the next run plans nothing and writes nothing.
    pve.requests.clear()
    again = converge_once(graph, guests)
    assert not again.rounds[0].plan.has_changes, [
        (c.address, c.fields) for c in again.rounds[0].plan.actions
    ]
    assert mutating_calls(pve) == []


@pytest.mark.parametrize("full", [True, False])
def test_a_clone_by_name_is_full_or_linked(provider: ProxmoxProvider, pve: Any, full: bool) -> None:
    """On a directory storage (qcow2 files) a linked clone's disk is an overlay on the
    template's base volume, named after it, as PVE names it; a full clone's is a copy."""
    client = provider.client
    client.storage.post(storage="vmdir", type="dir", path="/mnt/vmdir", content="images")
    make_template(client, "vmdir", "qcow2")
    before = vm(provider, TEMPLATE_VMID)
    assert "base-9000-disk-0" in before["scsi0"], before
    pve.requests.clear()
    spec, graph = load(
        GUESTS,
        (
            f"clone: {{from: {TEMPLATE_VMID}}}",
            f"clone: {{from: debian-12-ci, full: {str(full).lower()}}}",
        ),
        ("disk: {size: 16G}", "disk: {size: 16G, storage: vmdir}"),
    )
    guests = with_clones(provider, spec)
    conv = converge_once(graph, guests)
    assert conv.ok, errors(conv)
    (body,) = request_bodies(pve, "POST", f"/qemu/{TEMPLATE_VMID}/clone")
    assert body["full"] == str(int(full))
    # A full copy goes to the spec's disk storage; a linked one stays on the template's.
    assert body.get("storage") == ("vmdir" if full else None)
    disk = vm(guests)["scsi0"]
    assert disk.startswith("vmdir:") and "size=16G" in disk
    assert ("base-9000-disk-0" in disk) is (not full), disk
    assert_template_untouched(guests, pve, before)
    assert not plan_now(graph, guests).has_changes


def test_full_clone_to_another_storage(
    provider: ProxmoxProvider, pve: Any, template: dict[str, Any]
) -> None:
    provider.client.storage.post(
        storage="fast", type="lvmthin", vgname="fast", thinpool="data", content="images"
    )
    pve.requests.clear()
    spec, graph = load(
        GUESTS,
        (f"clone: {{from: {TEMPLATE_VMID}}}", f"clone: {{from: {TEMPLATE_VMID}, storage: fast}}"),
    )
    guests = with_clones(provider, spec)
    conv = converge_once(graph, guests)
    assert conv.ok, errors(conv)
    (body,) = request_bodies(pve, "POST", f"/qemu/{TEMPLATE_VMID}/clone")
    assert body["storage"] == "fast" and body["full"] == "1"
    assert vm(guests)["scsi0"].startswith("fast:vm-500-disk")
    assert not plan_now(graph, guests).has_changes


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        (
            (
                "clone: {from: 9000}",
                "clone: {from: 9000, full: false}\n    disk: {size: 16G, storage: fast}",
            ),
            "a linked clone's disks stay on the template's storage",
        ),
        (("disk: {size: 16G}", "disk: {size: 2G}"), "a disk cannot shrink"),
        (("disk: {size: 16G}", "disk: {size: 16G, bus: virtio}"), "not virtio0"),
    ],
)
def test_a_template_whose_disks_do_not_fit_is_not_cloned(
    provider: ProxmoxProvider, pve: Any, template: dict[str, Any], edit: tuple[str, str], says: str
) -> None:
    provider.client.storage.post(
        storage="fast", type="lvmthin", vgname="fast", thinpool="data", content="images"
    )
    pve.requests.clear()
    guests = GUESTS.replace("    disk: {size: 16G}\n", "") if "fast" in edit[1] else GUESTS
    spec, graph = load(guests, edit)
    conv = converge_once(graph, with_clones(provider, spec))
    why = errors(conv)["guest/web-vm"]
    assert says in why and "nothing was cloned" in why.lower(), why
    assert clone_posts(pve) == []
    assert_template_untouched(provider, pve, template)


# --- a clone cut off -----------------------------------------------------------------------


def test_a_clone_cut_off_before_its_configuration_converges_without_a_second_clone(
    provider: ProxmoxProvider, pve: Any, template: dict[str, Any]
) -> None:
    spec, graph = load()
    guests = with_clones(provider, spec)
    pve.fail("PUT", f"/nodes/{NODE}/qemu/500/config", 500, "boom", times=1)
    first = converge_once(graph, guests)
    assert not first.ok and "boom" in errors(first)["guest/web-vm"]
    # Cloned, marked ours, and still as the template made it: its tags, not ours.
    cut = vm(guests)
    assert read_mark(cut["description"])[0]["address"] == "guest/web-vm"
    assert "reconciler" not in cut.get("tags", "")
    # The next run finds it (its name, then its mark) and converges it in place.
    plan = plan_now(graph, guests)
    assert [(c.address, c.action) for c in plan.actions] == [("guest/web-vm", Action.UPDATE)]
    second = converge_once(graph, guests)
    assert second.ok, errors(second)
    assert len(clone_posts(pve)) == 1
    config = vm(guests)
    assert config["tags"] == "reconciler" and "size=16G" in config["scsi0"]
    assert config["ciuser"] == "ops" and config["agent"] == "1"
    assert guests.client.nodes(NODE).qemu(500).status.current.get()["status"] == "running"
    assert not plan_now(graph, guests).has_changes
    assert_template_untouched(guests, pve, template)


def test_a_guest_of_that_name_without_our_mark_stays_foreign(
    provider: ProxmoxProvider, pve: Any, template: dict[str, Any]
) -> None:
    """Its name only makes it worth a look: without our mark, it is not ours, and the planner
    refuses to create the spec's guest over the vmid it holds."""
    client = provider.client
    upid = client.nodes(NODE).qemu.post(vmid=500, name="web-vm", scsi0="local-lvm:4")
    assert client.nodes(NODE).tasks(upid).status.get()["exitstatus"] == "OK"
    spec, graph = load(GUESTS, ("cores: 2", "vmid: 500\n    cores: 2"))
    plan = plan_now(graph, with_clones(provider, spec))
    assert not plan.actions
    assert [d.code for d in plan.diagnostics] == ["adoption-pending"]


# --- a container -----------------------------------------------------------------------------

CT_GUESTS = """
guests:
  app-ct:
    role: build
    host: pve-runtime
    clone: {from: 9100, full: false}
    memory: 1G
    disk: {size: 4G}
    network:
      - {name: eth0, bridge: vmbr0, ip: 10.0.20.6/24, gw: 10.0.20.1}
"""


def test_a_container_is_cloned_from_a_container_template(
    provider: ProxmoxProvider, pve: Any
) -> None:
    client = provider.client
    upid = client.nodes(NODE).lxc.post(
        vmid=9100,
        hostname="ct-base",
        ostemplate=f"local:vztmpl/{TEMPLATE}",
        rootfs="local-lvm:2",
        net0="name=eth0,bridge=vmbr0,ip=dhcp",
        unprivileged=1,
    )
    assert client.nodes(NODE).tasks(upid).status.get()["exitstatus"] == "OK"
    upid = client.nodes(NODE).lxc(9100).template.post()
    assert client.nodes(NODE).tasks(upid).status.get()["exitstatus"] == "OK"
    before = dict(client.nodes(NODE).lxc(9100).config.get())
    pve.requests.clear()
    spec, graph = load(CT_GUESTS)
    guests = with_clones(provider, spec)
    conv = converge_once(graph, guests)
    assert conv.ok, errors(conv)
    (body,) = request_bodies(pve, "POST", "/lxc/9100/clone")
    assert body["hostname"] == "app-ct" and body["full"] == "0" and body["newid"] == "500"
    config = dict(client.nodes(NODE).lxc(500).config.get())
    assert read_mark(config["description"])[0]["address"] == "guest/app-ct"
    assert config["tags"] == "reconciler" and int(config["memory"]) == 1024
    assert "size=4G" in config["rootfs"] and "ip=10.0.20.6/24" in config["net0"]
    assert client.nodes(NODE).lxc(500).status.current.get()["status"] == "running"
    assert dict(client.nodes(NODE).lxc(9100).config.get()) == before
    assert not plan_now(graph, guests).has_changes


@pytest.mark.parametrize("pool", ["mgmt", None])
def test_a_clone_joins_its_pool_with_the_clone_request(pool: str | None) -> None:
    """As a create sends `pool`: a guest cloned into a pool is never a member of none."""
    want = {"vmid": 500, "name": "web-vm", "type": "qemu", "clone": {"from": 9000}, "pool": pool}
    params = clone_params(want, {"node": "pve-runtime"}, "pve-runtime", "notes", "local-lvm")
    assert params.get("pool") == pool
    assert params["newid"] == 500 and "target" not in params
