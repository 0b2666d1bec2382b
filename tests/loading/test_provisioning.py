"""The spec of a VM's provisioning: `clone`, `cloud_init`, `agent`, checked with file and line,
inherited from profiles, and turned into the attributes the Proxmox provider observes."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from reconciler.loading.graph import build_graph
from reconciler.loading.loader import load_texts
from tests.guest_helpers import platform_yaml


def _key(kind: str = "ssh-ed25519", comment: str = "ops@lab") -> str:
    name = kind.encode()
    blob = len(name).to_bytes(4, "big") + name + (32).to_bytes(4, "big") + bytes(range(32))
    return f"{kind} {base64.b64encode(blob).decode()} {comment}"


KEY = _key()
PLATFORM = platform_yaml("build: {first: 500, last: 599, layer: runtime}")


def guest(body: str, name: str = "vm") -> str:
    lines = "\n".join("    " + line for line in body.strip("\n").split("\n"))
    return f"guests:\n  {name}:\n    role: build\n    host: pve-runtime\n{lines}\n"


def problems(guests: str, profiles: str = "") -> list[str]:
    loaded = load_texts({"platform.yaml": PLATFORM + profiles, "guests.yaml": guests})
    return [
        f"{d.position.file}:{d.position.line} {d.code}: {d.message}"
        for d in loaded.diagnostics
        if d.position is not None
    ]


@pytest.mark.parametrize(
    ("body", "line", "says"),
    [
        (
            "kind: qemu\nclone: {from: 9000, full: false, storage: fast}",
            6,
            "storage is for full clones only",
        ),
        ("kind: qemu\nclone: {from: 'my template'}", 6, "neither a vmid nor a guest name"),
        ("kind: qemu\nclone: {from: 42}", 6, "outside 100-999999999"),
        (
            "kind: qemu\nclone: {from: 9000, storage: fast}\ndisk: {storage: slow}",
            6,
            "clone.storage fast and disk.storage slow differ",
        ),
        (
            "template: local:vztmpl/d.tar.zst\nclone: {from: 9000}",
            6,
            "give either clone (a template guest to copy) or template",
        ),
        ("template: local:vztmpl/d.tar.zst\nagent: true", 6, "agent is for VMs"),
        ("template: local:vztmpl/d.tar.zst\ncloud_init: {user: ops}", 6, "cloud_init is for VMs"),
        ("kind: qemu\ncloud_init: {user: Root}", 6, "is not a Linux user name"),
        ("kind: qemu\ncloud_init: {ssh_keys: [not a key]}", 6, "not an SSH public key"),
        (
            "kind: qemu\ncloud_init:\n  ssh_keys:\n    - '-----BEGIN OPENSSH PRIVATE KEY----- x'",
            8,
            "this is a private key",
        ),
        (
            f"kind: qemu\ncloud_init:\n  ssh_keys: ['{KEY.replace('ssh-ed25519', 'ssh-rsa', 1)}']",
            7,
            "its key data is not an ssh-rsa key",
        ),
        ("kind: qemu\ncloud_init: {nameserver: [10.0.0.1, dns.example]}", 6, "is not an IP"),
        ("kind: qemu\ncloud_init: {password: hunter2}", 6, "a literal secret is not allowed"),
        ("kind: qemu\ncloud_init: {user_data: local:user.yaml}", 6, "is not a snippet volume"),
    ],
)
def test_wrong_shapes_are_errors_at_their_line(body: str, line: int, says: str) -> None:
    found = problems(guest(body))
    assert any(p.startswith(f"guests.yaml:{line} ") and says in p for p in found), found


def test_a_secret_never_shows_in_a_message() -> None:
    found = problems(guest("kind: qemu\ncloud_init: {password: hunter2}"))
    assert found and not any("hunter2" in p for p in found)


def test_key_files_are_read_and_anything_else_in_them_refused(tmp_path: Path) -> None:
    good = tmp_path / "ops.pub"
    good.write_text(f"# the ops team\n{KEY}\n\n{_key(comment='backup@lab')}\n")
    bad = tmp_path / "shadow"
    bad.write_text(f"{KEY}\nroot:$6$secret-hash:19000:0:99999:7:::\n")
    body = f"kind: qemu\ncloud_init:\n  ssh_keys:\n    - {{file: {good}}}\n    - {KEY}"
    loaded = load_texts({"platform.yaml": PLATFORM, "guests.yaml": guest(body)})
    assert loaded.ok and loaded.spec is not None, [str(d) for d in loaded.diagnostics]
    attrs = build_graph(loaded.spec, loaded.source).resources["guest/vm"].attributes
    assert attrs["cloud_init"]["ssh_keys"] == [KEY, _key(comment="backup@lab")]  # each once
    found = problems(guest(f"kind: qemu\ncloud_init:\n  ssh_keys:\n    - {{file: {bad}}}"))
    assert any("guests.yaml:8 " in p and "line 2: not an SSH public key" in p for p in found)
    assert not any("secret-hash" in p for p in found)
    missing = problems(guest(f"kind: qemu\ncloud_init: {{ssh_keys: [{{file: {tmp_path}/no}}]}}"))
    assert any("cannot read" in p for p in missing), missing


def test_attributes_and_profiles() -> None:
    profiles = (
        "profiles:\n  ci-vm:\n    kind: qemu\n    agent: true\n    clone: {from: debian-12-ci}\n"
        f"    cloud_init: {{user: ops, ssh_keys: ['{KEY}'], nameserver: 10.0.0.53}}\n"
    )
    body = (
        "profile: ci-vm\ncloud_init: {searchdomain: lab.example, password: {env: CI_PW}}\n"
        "network:\n  - {bridge: vmbr0, ip: 10.0.20.5/24, gw: 10.0.20.1}\n"
        "  - {name: eth1, bridge: vmbr1}\n  - {name: eth2, bridge: vmbr2, ip: manual}\n"
        "  - {name: eth3, bridge: vmbr3, ip: 'fd00::5/64', gw: 'fd00::1'}"
    )
    loaded = load_texts({"platform.yaml": PLATFORM + profiles, "guests.yaml": guest(body)})
    assert loaded.ok and loaded.spec is not None, [str(d) for d in loaded.diagnostics]
    attrs = build_graph(loaded.spec, loaded.source).resources["guest/vm"].attributes
    assert attrs["clone"] == {"from": "debian-12-ci", "full": True, "storage": None}
    assert attrs["agent"] is True
    assert attrs["cloud_init"] == {
        "user": "ops",
        "password": "set",
        "ssh_keys": [KEY],
        "nameserver": ["10.0.0.53"],
        "searchdomain": ["lab.example"],
        "user_data": None,
        "ipconfig": {
            "ipconfig0": "gw=10.0.20.1,ip=10.0.20.5/24",
            "ipconfig1": "ip=dhcp",
            "ipconfig3": "gw6=fd00::1,ip6=fd00::5/64",
        },
    }
    assert attrs["cloud_init_password"] == {"env": "CI_PW"}
