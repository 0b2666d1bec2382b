"""`templates:` for `reconciler import`: the templates the imported guests use, so the spec
declares what its hosts need. Called by `writer.render_specs`, which writes the section at the
end of `platform.yaml`, next to the hosts; pure.

What is "in use": a container's template where the import knows it (a guest the platform
already owns keeps its mark's template; any other gets the import's `unknown:` placeholder,
which is no file and is left out), and each ISO a VM has in a CD-ROM drive (`ide2:
local:iso/x.iso,media=cdrom`). One entry per file, on the hosts of the guests using it.

Proxmox keeps no record of where a file came from, so every entry has `url: null` (with a
comment saying so): the spec validates, the file is checked for on its hosts and never
downloaded, and a plan warns (`template-missing`) only where a host lacks it.
A file whose name the spec language refuses (one Proxmox would not store under that name) is a
note instead.

A VM made from a template guest is not a file: what `templates:` cannot hold, the guest's
`clone:` says (`clone_of`), where Proxmox keeps a trace of it. A linked clone's disks are
overlays on its template's base volumes and carry their name (`local-lvm:base-9000-disk-0/
vm-500-disk-0`, `local:9000/base-9000-disk-0.qcow2/500/vm-500-disk-0.qcow2`): such a VM gets
`clone: {from: <the template's name>, full: false}`. A full clone's disks are copies, and a
container's config keeps no ostemplate: Proxmox records neither, so nothing is written for
them (a container the platform owns keeps its mark's template, as above).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from reconciler.importing.yamltext import Commented, unique_name
from reconciler.model.spec import TEMPLATE_EXTENSIONS, CloneSpec, TemplateSpec
from reconciler.planning.provenance import IMPORT_TEMPLATE

TEMPLATES_HEADER = [
    "Templates the imported guests use. Proxmox keeps no record of where a file came from, so",
    "each has `url: null`: checked on its hosts, never downloaded. Give it its url and checksum",
    "(sha256:...) to have a missing copy downloaded before the guests that need it.",
]
URL_NOTE = "unknown: set url and checksum to have it downloaded"
_VOLID = re.compile(r"^(?P<storage>[^:\s]+):(?P<content>vztmpl|iso|import)/(?P<file>[^/\s]+)\Z")
_DRIVE = re.compile(r"^(ide|sata|scsi)\d+\Z")
_VM_DISK = re.compile(r"^(ide|sata|scsi|virtio)\d+\Z")
# A linked clone's volume: its template's base volume, then its own (`base-9000-disk-0/...`).
_LINKED = re.compile(r"(?:^|[:/])base-(?P<vmid>[1-9]\d*)-disk-\d+[^/]*/[^/]")
# The import's own placeholder names a storage that does not exist: no file to declare.
_PLACEHOLDER = IMPORT_TEMPLATE.partition(":")[0] + ":"


@dataclass
class RenderedTemplates:
    section: dict[str, Any] = field(default_factory=dict)  # name -> entry
    notes: list[str] = field(default_factory=list)


def volids_in_use(template: str | None, config: Mapping[str, Any]) -> list[str]:
    """The template volumes one guest uses: its container template, its CD-ROM ISOs."""
    found: list[str] = []
    if template and _VOLID.match(template) and not template.startswith(_PLACEHOLDER):
        found.append(template)
    for key, value in sorted(config.items()):
        if not _DRIVE.match(key):
            continue
        volume, *options = str(value).split(",")
        if "media=cdrom" in options and _VOLID.match(volume):
            found.append(volume)
    return found


def render_templates(
    guests: Iterable[tuple[str, str, str | None, Mapping[str, Any]]],
) -> RenderedTemplates:
    """`templates:` for the guests, each given as (name, host, template, Proxmox config)."""
    hosts: dict[str, set[str]] = {}
    users: dict[str, list[str]] = {}
    for name, host, template, config in guests:
        for volid in volids_in_use(template, config):
            hosts.setdefault(volid, set()).add(host)
            users.setdefault(volid, []).append(name)
    out = RenderedTemplates()
    taken: set[str] = set()
    for volid in sorted(hosts):
        m = _VOLID.match(volid)
        assert m is not None
        entry: dict[str, Any] = {
            "url": None,
            "storage": m["storage"],
            "content": m["content"],
            "filename": m["file"],
            "hosts": sorted(hosts[volid]),
        }
        try:
            TemplateSpec.model_validate(entry)
        except ValidationError as exc:
            why = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
            who = ", ".join(sorted(users[volid]))
            out.notes.append(f"template {volid} (used by {who}) is not declared: {why}")
            continue
        out.section[_name(m["file"], m["content"], taken)] = {
            **entry,
            "url": Commented(None, URL_NOTE),
        }
    return out


def linked_template(config: Mapping[str, Any]) -> int | None:
    """The vmid of the template a VM is a linked clone of, read from its disks' volume names;
    None for any other VM (a full clone's disks name nothing)."""
    for key, value in sorted(config.items()):
        if not _VM_DISK.match(key):
            continue
        volume, *options = str(value).split(",")
        found = _LINKED.search(volume)
        if found and "media=cdrom" not in options:
            return int(found["vmid"])
    return None


def clone_of(
    kind: str, config: Mapping[str, Any], templates: Iterable[Mapping[str, Any]]
) -> dict[str, Any] | None:
    """A VM's `clone:` when it is a linked clone: `from` its template's name when no other
    template has it (else its vmid), `full: false`. None for a container or any other VM."""
    vmid = linked_template(config) if kind == "qemu" else None
    if vmid is None:
        return None
    names = [str(t.get("name") or "") for t in templates]
    name = next((str(t.get("name") or "") for t in templates if int(t["vmid"]) == vmid), "")
    unique = bool(name) and names.count(name) == 1 and not name.isdigit()
    if unique:
        try:
            CloneSpec.model_validate({"from": name})  # a name the spec takes
        except ValidationError:
            unique = False
    return {"from": name if unique else vmid, "full": False}


def _name(filename: str, content: str, taken: set[str]) -> str:
    """A DNS label from the file name, its extension left out: `debian-12-standard-12-7-1-amd64`
    for `debian-12-standard_12.7-1_amd64.tar.zst`; `-2` and on when taken."""
    pattern, _ = TEMPLATE_EXTENSIONS[content]
    stem = re.sub(rf"{pattern}\Z", "", filename, flags=re.IGNORECASE)
    base = re.sub(r"[^a-z0-9-]+", "-", stem.lower()).strip("-")[:60].rstrip("-") or "template"
    return unique_name(base, taken)
