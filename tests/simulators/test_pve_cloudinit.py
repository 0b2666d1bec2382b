"""The fake's booted cloud image: its guest agent reports the addresses cloud-init gave it."""

from __future__ import annotations

from reconciler.simulators.pve_cloudinit import configured_interfaces


def test_a_booted_image_reports_the_static_addresses_cloud_init_configured() -> None:
    config = {
        "net0": "virtio=BC:24:11:AA:BB:CC,bridge=vmbr0",
        "ipconfig0": "gw=10.10.0.1,ip=10.10.0.19/24",
        "net1": "virtio=BC:24:11:AA:BB:CD,bridge=vmbr1",
        "ipconfig1": "ip=dhcp",
    }
    found = configured_interfaces(config)
    assert [i["name"] for i in found] == ["lo", "eth0"]  # dhcp: not the fake's to invent
    (eth0,) = found[1:]
    assert eth0["hardware-address"] == "bc:24:11:aa:bb:cc"
    assert eth0["ip-addresses"] == [
        {"ip-address": "10.10.0.19", "ip-address-type": "ipv4", "prefix": 24}
    ]
    assert configured_interfaces({"net0": "virtio=BC:24:11:AA:BB:CC,bridge=vmbr0"}) == []
