"""How a guest is provisioned beyond its hardware: made by cloning a template (`clone`), set up
by cloud-init (`cloud_init`), watched through the QEMU guest agent (`agent`). The checks on
them, and their desired attributes in the shape the Proxmox provider observes.

`loading.checks` runs `check_provisioning` with the other structural checks; `loading.graph`
adds `provisioning_attributes` to each guest's attributes. Public keys given as `{file: PATH}`
are read here, when the graph is built (the path is absolute, or relative to the directory the
command runs in, like a secret's `file`): only lines that are OpenSSH public keys are taken,
and a line that is not one is an error that never quotes it (a spec could name any file).

Attributes (`planning.normalize` and the provider's `guest_attributes` write the same shape):

    clone:      {"from": 9000 | "debian-12-ci", "full": true, "storage": null}
                used once, to create the guest; never compared (Proxmox keeps no record)
    agent:      true | false (only when the spec says)
    cloud_init: {"user", "password": "set" | None, "ssh_keys": [...], "nameserver": [...],
                 "searchdomain": [...], "user_data", "ipconfig": {"ipconfig0": "ip=dhcp"}}
    cloud_init_password: {"env": NAME} | {"file": PATH}   the reference, read when applying;
                never compared (Proxmox answers `**********`: only set or not is seen)

A NIC's `ipconfigN` comes from the guest's `network` entry of the same index: `ip=dhcp`, or its
CIDR with `gw` (`ip6=`/`gw6=` for IPv6); a `manual` NIC gets none. One place holds a guest's
address, and everything that reads it (routes, Velocity, the agents, the firewall checks, the
duplicate-address check) sees a cloud-init VM's static address too.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from typing import Any

from reconciler.loading.sources import PathT, Source, dotted
from reconciler.model.diagnostics import Diagnostic, error
from reconciler.model.errors import ConfigurationError
from reconciler.model.spec import (
    CloudInitSpec,
    GuestSpec,
    NetworkInterface,
    PlatformSpec,
    SshKeyFile,
    check_ssh_public_key,
)

# An authorized_keys file is small; anything much bigger is not one.
KEY_FILE_LIMIT = 256 * 1024


def read_key_file(path: str) -> tuple[list[str], str | None]:
    """The public keys of a file (every line not empty and not a `#` comment), or the reason
    it cannot be used. The reason names the line, never its text."""
    try:
        with open(path, "rb") as f:
            data = f.read(KEY_FILE_LIMIT + 1)
    except OSError as exc:
        return [], f"cannot read {path}: {exc.strerror or exc}"
    if len(data) > KEY_FILE_LIMIT:
        return [], f"{path} is larger than {KEY_FILE_LIMIT // 1024} KiB: not a public key file"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return [], f"{path} is not text: not a public key file"
    keys: list[str] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            keys.append(check_ssh_public_key(line))
        except ValueError as exc:
            return [], f"{path} line {n}: {exc}"
    if not keys:
        return [], f"{path} holds no public key"
    return keys, None


def ssh_keys(cloud_init: CloudInitSpec) -> list[str]:
    """Every public key the spec gives, in order, files read. ConfigurationError when a file
    cannot be used (the checks report it first, at its line)."""
    out: list[str] = []
    for item in cloud_init.ssh_keys:
        if isinstance(item, SshKeyFile):
            keys, why = read_key_file(item.file)
            if why is not None:
                raise ConfigurationError(f"cloud_init.ssh_keys: {why}")
            out.extend(keys)
        else:
            out.append(item)
    return list(dict.fromkeys(out))  # each key once


def ipconfig(nic: NetworkInterface) -> str | None:
    """A NIC's `ipconfigN`, canonical (keys sorted): `ip=dhcp`, `gw=10.0.0.1,ip=10.0.0.5/24`,
    `gw6=..,ip6=..`; None for a `manual` NIC."""
    if nic.ip == "manual":
        return None
    if nic.ip == "dhcp":
        return "ip=dhcp"
    v6 = ipaddress.ip_interface(nic.ip).version == 6
    parts = {"ip6" if v6 else "ip": nic.ip}
    if nic.gw:
        parts["gw6" if v6 else "gw"] = nic.gw
    return ",".join(f"{k}={parts[k]}" for k in sorted(parts))


def cloud_init_attributes(guest: GuestSpec) -> dict[str, Any]:
    """The `cloud_init` attribute of a guest that has one (see the module docstring)."""
    ci = guest.cloud_init
    assert ci is not None
    configs = {f"ipconfig{i}": ipconfig(nic) for i, nic in enumerate(guest.network)}
    return {
        "user": ci.user,
        "password": "set" if ci.password is not None else None,
        "ssh_keys": ssh_keys(ci),
        "nameserver": list(ci.nameserver),
        "searchdomain": list(ci.searchdomain),
        "user_data": ci.user_data,
        "ipconfig": {k: v for k, v in configs.items() if v is not None},
    }


def provisioning_attributes(guest: GuestSpec) -> dict[str, Any]:
    """A guest's `clone`, `agent`, `cloud_init` and `cloud_init_password` attributes, those
    its spec sets."""
    out: dict[str, Any] = {}
    if guest.clone is not None:
        out["clone"] = {
            "from": guest.clone.source,
            "full": guest.clone.full,
            "storage": guest.clone.storage,
        }
    if guest.kind != "qemu":
        return out  # the checks refuse cloud-init and the agent on a container
    if guest.agent is not None:
        out["agent"] = guest.agent
    if guest.cloud_init is not None:
        out["cloud_init"] = cloud_init_attributes(guest)
        if guest.cloud_init.password is not None:
            out["cloud_init_password"] = guest.cloud_init.password.model_dump(exclude_none=True)
    return out


def check_provisioning(spec: PlatformSpec, source: Source) -> Iterator[Diagnostic]:
    """`clone` and `template` are not both given; cloud-init and the agent are for VMs only;
    every public key file is readable and holds public keys only. A value inherited from a
    profile is reported once, at the profile's line."""
    said: set[tuple[object, str]] = set()

    def once(path: PathT, code: str, message: str) -> Iterator[Diagnostic]:
        position = source.where(path, key=True)
        if (position, message) in said:
            return
        said.add((position, message))
        yield error(code, message, position=position, path=dotted(path))

    for gname, guest in spec.guests.items():
        at: PathT = ("guests", gname)
        if guest.clone is not None and guest.template:
            yield from once(
                (*at, "clone"),
                "invalid-value",
                "give either clone (a template guest to copy) or template (a container's "
                "ostemplate volume), not both",
            )
        cloned_to = guest.clone.storage if guest.clone is not None else None
        if cloned_to and guest.disk.storage and cloned_to != guest.disk.storage:
            yield from once(
                (*at, "clone", "storage"),
                "invalid-value",
                f"clone.storage {cloned_to} and disk.storage {guest.disk.storage} differ: a "
                "full clone's disks go to clone.storage (give one of them)",
            )
        if guest.kind == "lxc":
            for field in ("cloud_init", "agent"):
                if getattr(guest, field) is not None:
                    yield from once(
                        (*at, field),
                        "invalid-value",
                        f"{field} is for VMs (kind: qemu); a container has neither cloud-init "
                        "nor the QEMU guest agent",
                    )
            continue
        if guest.cloud_init is None:
            continue
        for i, item in enumerate(guest.cloud_init.ssh_keys):
            if isinstance(item, SshKeyFile):
                _, why = read_key_file(item.file)
                if why is not None:
                    path: PathT = (*at, "cloud_init", "ssh_keys", i, "file")
                    yield from once(path, "invalid-value", f"ssh key file {why}")
