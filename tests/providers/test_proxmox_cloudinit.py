"""Cloud-init and the QEMU guest agent of a cloned VM, end to end on fakepve.

Cloud-init: set with the clone, read back without a perpetual diff (keys come back
URL-encoded, `ipconfigN` in any order, the password only as set or not), drifted by hand and
healed, the drive regenerated each time (`PUT .../cloudinit`, as fakepve's `GET
.../cloudinit` shows: nothing pending). The agent: waited for after a start, on the
provider's injected clock and sleep, bounded; the guest's addresses read from it into the
observed state (never compared), where the firewall checks and the agents' health find a DHCP
VM's address.
"""

from __future__ import annotations

import json
import logging
from typing import Any
from urllib.parse import quote

import anyio
import pytest

from reconciler.applying.connecting import agent_health_provider
from reconciler.applying.observing import observe_all
from reconciler.cli.render import render_change, render_text
from reconciler.model.plans import Action
from reconciler.model.spec import SecretRef
from reconciler.policies.live_firewall import LiveFirewalls
from reconciler.providers.proxmox import (
    ProxmoxProvider,
    RetryPolicy,
    read_secret,
)
from tests.fakepve_fixtures import request_bodies
from tests.guest_helpers import plan_now
from tests.providers.vm_provisioning import (
    GUESTS,
    KEY,
    NODE,
    converge_once,
    errors,
    load,
    make_template,
    with_clones,
)

SECRET = "hunter2-not-for-logs"
OTHER_KEY = (
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl "
    "root@elsewhere"
)
WITH_PASSWORD = (
    "      nameserver: 10.0.0.53\n",
    "      nameserver: 10.0.0.53\n"
    "      searchdomain: lab.example\n      password: {env: CI_PASSWORD}\n",
)


@pytest.fixture
def secret(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("CI_PASSWORD", SECRET)
    return SECRET


@pytest.fixture
def guests(provider: ProxmoxProvider, pve: Any, secret: str) -> ProxmoxProvider:
    """The template, and the provider for the spec with a cloud-init password."""
    make_template(provider.client)
    pve.requests.clear()
    spec, _ = load(GUESTS, WITH_PASSWORD)
    return with_clones(provider, spec)


def api(guests: ProxmoxProvider, vmid: int = 500) -> Any:
    return guests.client.nodes(NODE).qemu(vmid)


def effective(guests: ProxmoxProvider) -> dict[str, Any]:
    """The VM's config with its pending values, as Proxmox's config view answers it: what it
    runs with after its next start (a running VM's cloud-init changes wait there)."""
    config: dict[str, Any] = api(guests).config.get()
    return config


def pending_cloud_init(guests: ProxmoxProvider) -> list[dict[str, Any]]:
    """What `GET .../cloudinit` lists as not yet on the drive."""
    return [i for i in api(guests).cloudinit.get() if "pending" in i or i.get("delete")]


def by_hand(guests: ProxmoxProvider, **params: Any) -> None:
    """A change made by a person, as the GUI or `qm set` makes it."""
    api(guests).config.put(**params)


# --- set, and read back as sent ---------------------------------------------------------------


def test_cloud_init_is_set_regenerated_and_reads_back_without_a_diff(
    guests: ProxmoxProvider, pve: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    _, graph = load(GUESTS, WITH_PASSWORD)
    plan = plan_now(graph, guests)
    shown = render_text(plan) + json.dumps(plan.to_json())
    assert SECRET not in shown
    conv = converge_once(graph, guests)
    assert conv.ok, errors(conv)
    config = effective(guests)
    assert config["ciuser"] == "ops" and config["cipassword"]
    assert config["sshkeys"] == quote(KEY, safe="")
    assert config["searchdomain"] == "lab.example"
    assert pending_cloud_init(guests) == []  # the drive holds what the config says
    assert SECRET not in caplog.text
    assert not plan_now(graph, guests).has_changes


def test_the_same_settings_spelled_otherwise_are_no_change(
    guests: ProxmoxProvider, pve: Any
) -> None:
    _, graph = load(GUESTS, WITH_PASSWORD)
    assert converge_once(graph, guests).ok
    # As the GUI writes them: encodeURIComponent's alphabet, a trailing newline; the address
    # before the gateway; nameservers comma-separated.
    by_hand(
        guests,
        sshkeys=quote(KEY + "\n", safe="-_.!~*'()"),
        ipconfig0="ip=10.0.20.5/24,gw=10.0.20.1",
        searchdomain=" lab.example ",
    )
    assert not plan_now(graph, guests).has_changes


# --- drift ----------------------------------------------------------------------------------


def test_cloud_init_drifted_by_hand_is_healed_and_regenerated(
    guests: ProxmoxProvider, pve: Any
) -> None:
    _, graph = load(GUESTS, WITH_PASSWORD)
    assert converge_once(graph, guests).ok
    by_hand(
        guests,
        ciuser="root",
        sshkeys=quote(OTHER_KEY, safe=""),
        ipconfig0="ip=dhcp",
        delete="nameserver,cipassword",
    )
    plan = plan_now(graph, guests)
    (change,) = plan.actions
    assert change.action is Action.UPDATE
    assert {f.path for f in change.fields} == {
        "cloud_init.user",
        "cloud_init.password",
        "cloud_init.ssh_keys",
        "cloud_init.nameserver",
        "cloud_init.ipconfig.ipconfig0",
    }
    text = "\n".join(render_change(change))
    assert "applied at the guest's next start" in text and SECRET not in text
    pve.requests.clear()
    conv = converge_once(graph, guests)
    assert conv.ok, errors(conv)
    config = effective(guests)
    assert config["ciuser"] == "ops" and config["sshkeys"] == quote(KEY, safe="")
    assert config["ipconfig0"] == "gw=10.0.20.1,ip=10.0.20.5/24"
    assert config["nameserver"] == "10.0.0.53" and config["cipassword"]
    assert len(request_bodies(pve, "PUT", "/qemu/500/cloudinit")) == 1
    assert pending_cloud_init(guests) == []
    assert not plan_now(graph, guests).has_changes


def test_a_password_dropped_from_the_spec_is_removed(guests: ProxmoxProvider, pve: Any) -> None:
    _, graph = load(GUESTS, WITH_PASSWORD)
    assert converge_once(graph, guests).ok
    _, without = load()
    plan = plan_now(without, guests)
    (change,) = plan.actions
    fields = {f.path: (f.before, f.after) for f in change.fields}
    assert fields["cloud_init.password"] == ("set", None)
    assert converge_once(without, guests).ok
    assert "cipassword" not in effective(guests)


def test_the_password_is_read_from_its_reference_only_when_applying(
    guests: ProxmoxProvider, pve: Any
) -> None:
    _, graph = load(GUESTS, WITH_PASSWORD)
    change = plan_now(graph, guests).actions[0]
    assert change.after is not None
    assert change.after["cloud_init"]["password"] == "set"
    assert change.after["cloud_init_password"] == {"env": "CI_PASSWORD"}
    assert converge_once(graph, guests).ok
    (body,) = [b for b in request_bodies(pve, "PUT", "/qemu/500/config") if "cipassword" in b]
    assert body["cipassword"] == read_secret(SecretRef(env="CI_PASSWORD")) == SECRET


# --- the guest agent ----------------------------------------------------------------------------


class FakeTime:
    """The provider's injected clock and sleep: sleeping moves the clock, nothing waits."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_the_agent_is_waited_for_after_the_start(provider: ProxmoxProvider, pve: Any) -> None:
    make_template(provider.client)
    spec, graph = load()
    fake = FakeTime()
    guests = with_clones(provider, spec, clock=fake.clock, sleep=fake.sleep)
    # The guest boots slowly: its agent answers the fourth ping.
    pve.fail(
        "POST",
        f"/nodes/{NODE}/qemu/500/agent/ping",
        500,
        "QEMU guest agent is not running",
        times=3,
    )
    pve.requests.clear()
    conv = converge_once(graph, guests)
    assert conv.ok, errors(conv)
    pings = [p for m, p, _ in pve.requests if m == "POST" and p.endswith("/agent/ping")]
    assert len(pings) == 4
    assert fake.slept.count(guests.retry.agent_poll) == 3


def test_an_agent_that_never_answers_is_waited_for_a_bounded_time(
    provider: ProxmoxProvider, pve: Any
) -> None:
    make_template(provider.client)
    pve.agent_boots = False  # an image without qemu-guest-agent
    spec, graph = load()
    fake = FakeTime()
    retry = RetryPolicy(initial=0.0, maximum=0.0, agent_timeout=30.0, agent_poll=2.0)
    guests = with_clones(provider, spec, clock=fake.clock, sleep=fake.sleep, retry=retry)
    conv = converge_once(graph, guests)
    assert not conv.ok
    why = errors(conv)["guest/web-vm"]
    assert "guest agent did not answer within 30 s" in why
    assert 30.0 <= fake.now - 1000.0 <= 32.0  # the bound, on the injected clock
    # Started all the same: it runs as the spec says, so the next plan has nothing to do.
    assert guests.client.nodes(NODE).qemu(500).status.current.get()["status"] == "running"
    assert not plan_now(graph, guests).has_changes


INTERFACES = [
    {
        "name": "lo",
        "ip-addresses": [{"ip-address": "127.0.0.1", "ip-address-type": "ipv4", "prefix": 8}],
    },
    {
        "name": "eth0",
        "hardware-address": "bc:24:11:00:00:05",
        "ip-addresses": [
            {"ip-address": "fe80::be24:11ff:fe00:5", "ip-address-type": "ipv6", "prefix": 64},
            {"ip-address": "2001:db8::5", "ip-address-type": "ipv6", "prefix": 64},
            {"ip-address": "10.0.20.77", "ip-address-type": "ipv4", "prefix": 24},
        ],
    },
]
DHCP = ("- {bridge: vmbr0, ip: 10.0.20.5/24, gw: 10.0.20.1}", "- {bridge: vmbr0, ip: dhcp}")


def test_the_addresses_the_agent_reports_are_observed_and_never_compared(
    provider: ProxmoxProvider, pve: Any
) -> None:
    make_template(provider.client)
    pve.agent_answers[500] = {"interfaces": INTERFACES}
    spec, graph = load(GUESTS, DHCP)
    guests = with_clones(provider, spec)
    assert converge_once(graph, guests).ok
    observed = anyio.run(lambda: observe_all([guests], graph.platform))
    (vm_seen,) = [r for r in observed.resources if r.address == "guest/web-vm"]
    assert vm_seen.attributes["addresses"] == ["10.0.20.77/24", "2001:db8::5/64"]
    assert vm_seen.attributes["cloud_init"]["ipconfig"] == {"ipconfig0": "ip=dhcp"}
    assert not plan_now(graph, guests).has_changes
    # Where the firewall checks look for a guest's address: a DHCP VM's is its agent's.
    ips = LiveFirewalls(spec, observed).ips("web-vm")
    assert [str(ip) for ip in ips] == ["10.0.20.77", "2001:db8::5"]
    # And where the agents' health is asked: at that address.
    health = agent_health_provider(spec)
    assert health.endpoints.get("guest/web-vm", ("?", 0))[0] == ""


def test_a_stopped_vm_has_no_addresses_and_nothing_is_asked(
    provider: ProxmoxProvider, pve: Any
) -> None:
    make_template(provider.client)
    spec, graph = load(GUESTS, ("    agent: true\n", "    agent: true\n    state: stopped\n"))
    guests = with_clones(provider, spec)
    assert converge_once(graph, guests).ok
    pve.requests.clear()
    observed = anyio.run(lambda: observe_all([guests], graph.platform))
    (vm_seen,) = [r for r in observed.resources if r.address == "guest/web-vm"]
    assert "addresses" not in vm_seen.attributes
    assert not [p for _, p, _ in pve.requests if "/agent/" in p]
