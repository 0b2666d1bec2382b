"""The spec writer on hand-built estates (no Proxmox): awkward names, vmids outside every range,
guests of other platforms, VMs, settings the spec language cannot hold. Whatever it meets, the
output validates, and what it could not carry over is said in a note."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from reconciler.importing.estate import Estate, GuestRecord, NamedObject
from reconciler.importing.writer import Base, Commented, dump, render_specs

NET = "name=eth0,bridge=vmbr0,firewall=1,ip=10.20.0.{n}/24,type=veth"


def ct(vmid: int, name: str, node: str = "pve-runtime", **config: Any) -> GuestRecord:
    config.setdefault("hostname", name)
    config.setdefault("memory", 1024)
    config.setdefault("rootfs", f"local-lvm:vm-{vmid}-disk-0,size=8G")
    config.setdefault("ostype", "debian")
    config.setdefault("unprivileged", 1)
    item = {"vmid": vmid, "node": node, "type": "lxc", "name": name, "status": "running"}
    return GuestRecord(item=item, config=config, firewall_options={}, firewall_rules=())


def vm(vmid: int, name: str, **config: Any) -> GuestRecord:
    config.setdefault("name", name)
    config.setdefault("memory", "2048")
    config.setdefault("scsi0", f"local-lvm:vm-{vmid}-disk-0,size=32G")
    item = {"vmid": vmid, "node": "pve-runtime", "type": "qemu", "name": name, "status": "stopped"}
    return GuestRecord(item=item, config=config, firewall_options={}, firewall_rules=())


def estate(*guests: GuestRecord, **kw: Any) -> Estate:
    nodes = {n: {"maxcpu": 8, "maxmem": 32 << 30} for n in ("pve-core", "pve-runtime")}
    return Estate(
        source="https://pve.example:8006",
        read_at="2026-01-01T00:00:00Z",
        guests=guests,
        nodes=nodes,
        cluster_options={},
        aliases=kw.get("aliases", ()),
        ipsets=kw.get("ipsets", ()),
        groups=kw.get("groups", ()),
    )


def guests_of(files: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, text in files.items():
        if name not in ("platform.yaml", "profiles.yaml", "firewall.yaml"):
            out.update(yaml.safe_load(text)["guests"])
    return out


def test_names_become_unique_dns_labels_and_renames_are_noted() -> None:
    result = render_specs(
        estate(
            ct(1000, "MC_Lobby", net0=NET.format(n=10)),
            ct(1001, "mc-lobby", net0=NET.format(n=11)),
        ),
        Base.default("zpack"),
    )
    assert result.ok, result.load.diagnostics if result.load else None
    assert result.guests == {"mc-lobby": 1000, "mc-lobby-1001": 1001}
    assert any("would rename it" in n and "'MC_Lobby'" in n for n in result.notes)
    assert "guest/mc-lobby" in result.drift and "name" in result.drift["guest/mc-lobby"]


def test_a_vmid_outside_every_range_gets_a_range_of_its_own() -> None:
    result = render_specs(estate(ct(500, "odd", node="pve-new")), Base.default("zpack"))
    assert result.ok
    platform = yaml.safe_load(result.files["platform.yaml"])
    assert platform["ranges"]["unassigned-500"] == {
        "first": 500,
        "last": 500,
        "layer": "unassigned",
    }
    assert platform["hosts"]["pve-new"] == {
        "layers": ["unassigned"],
        "capacity": {"cores": 1, "memory": "1G"},
    }


def test_owned_guests_keep_their_names_and_templates_and_other_platforms_are_skipped() -> None:
    ours = "keep\n\nreconciler:v1 platform=zpack address=guest/lobby template=local:vztmpl/d.tar"
    theirs = "reconciler:v1 platform=other address=guest/x"
    result = render_specs(
        estate(
            ct(1000, "lobby-host", description=ours, tags="reconciler"),
            ct(1001, "foreign", description=theirs, tags="reconciler"),
        ),
        Base.default("zpack"),
    )
    assert result.ok
    guests = guests_of(result.files)
    assert list(guests) == ["lobby"]
    assert guests["lobby"]["template"] == "local:vztmpl/d.tar"
    assert guests["lobby"]["description"] == "keep"
    assert any("mark of platform 'other'" in n for n in result.notes)


def test_a_vm_is_written_without_container_settings() -> None:
    result = render_specs(
        estate(vm(1100, "win", cores=4, net0="virtio=BC:24:11:00:00:01,bridge=vmbr0,tag=20")),
        Base.default("zpack"),
    )
    assert result.ok, result.load.diagnostics if result.load else None
    win = guests_of(result.files)["win"]
    assert win["kind"] == "qemu" and "template" not in win and "swap" not in win
    assert win["disk"] == {"size": "32G"} and win["memory"] == "2G"
    assert win["network"] == [{"bridge": "vmbr0", "tag": 20, "firewall": False}]
    assert result.drift == {}


def test_what_the_spec_cannot_hold_is_noted() -> None:
    group = NamedObject(
        "icmp", "", rules=({"type": "in", "action": "ACCEPT", "proto": "icmp", "icmp-type": "8"},)
    )
    ipset = NamedObject(
        "mixed", "", entries=({"cidr": "10.0.0.0/8"}, {"cidr": "10.1.0.0/16", "nomatch": 1})
    )
    result = render_specs(
        estate(
            ct(1000, "a", net0=NET.format(n=10) + ",rate=10", features="nesting=1,mount=nfs"),
            groups=(group,),
            ipsets=(ipset,),
        ),
        Base.default("zpack"),
    )
    assert result.ok
    notes = "\n".join(result.notes)
    assert "net0 options the spec cannot hold: rate" in notes
    assert "features the spec cannot hold: mount" in notes
    assert "icmp-type" in notes and "nomatch" in notes
    # An unknown feature is neither compared nor sent: kept. An unknown NIC option is lost.
    assert result.drift == {"guest/a": ["net.net0"]}


def test_text_the_spec_refuses_is_left_out_and_noted() -> None:
    """Mark-like text and line breaks: the controller's own trailing mark goes silently (it
    writes it again), every other such line or comment is left out and named in a note."""
    mark = "reconciler:v1 platform=zpack address=guest/lobby"
    description = f"keep\n[reconciler:zpack] quoted\n{mark}\n\n{mark}"
    group = NamedObject(
        "ops",
        "ops\tteam",
        rules=({"type": "in", "action": "ACCEPT", "dport": "22", "comment": "ssh [reconciler:x]"},),
    )
    ipset = NamedObject("admins", "operators [reconciler:zpack]", entries=({"cidr": "10.0.0.0/8"},))
    alias = NamedObject("api", "api\u0085host", cidr="10.0.0.5")
    result = render_specs(
        estate(
            ct(1000, "lobby", description=description, tags="reconciler"),
            groups=(group,),
            ipsets=(ipset,),
            aliases=(alias,),
        ),
        Base.default("zpack"),
    )
    assert result.ok, result.load.diagnostics if result.load else None
    assert guests_of(result.files)["lobby"]["description"] == "keep"
    firewall = yaml.safe_load(result.files["firewall.yaml"])["firewall"]
    assert firewall["groups"]["ops"] == {
        "rules": [{"type": "in", "action": "ACCEPT", "dport": "22"}]
    }
    assert firewall["ipsets"]["admins"] == {"entries": ["10.0.0.0/8"], "comment": "operators"}
    assert firewall["aliases"]["api"] == {"cidr": "10.0.0.5"}
    notes = "\n".join(result.notes)
    assert (
        "lxc 1000 (lobby): description lines that read as the controller's ownership mark left "
        f"out (only the controller writes its mark; once adopted, it writes the description "
        f"without them): '[reconciler:zpack] quoted'; {mark!r}" in notes
    )
    assert "security group ops: comment 'ops\\tteam' left out: the spec holds a comment of one" in (
        notes
    )
    assert "group ops: rule 0: comment 'ssh [reconciler:x]' left out: it reads as the" in notes
    assert "alias api: comment 'api\\x85host' left out" in notes
    assert "admins" not in notes
    # The guest is ours already: the next apply writes the description the spec holds.
    assert result.drift == {"guest/lobby": ["description"]}


@pytest.mark.parametrize(
    "text",
    [
        "yes",
        "1.0",
        "12:30",
        "a: b",
        "#x",
        "x #y",
        " lead",
        "trail ",
        "{x}",
        "a,b",
        "@at",
        "",
        "null",
    ],
)
def test_scalars_that_yaml_would_misread_are_quoted(text: str) -> None:
    data = {"k": text, "list": [{"c": text}], "note": Commented(text, "why")}
    assert yaml.safe_load(dump(data, ["h"])) == {"k": text, "list": [{"c": text}], "note": text}
