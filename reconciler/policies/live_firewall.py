"""The firewall observed on Proxmox, as the reach rules read it: each guest's chain as it is live.

Built by `reconciler.planning.observed_policies` for the live plan's isolation warnings. What is
seen: the firewall of every guest the controller owns (only those are read, so a hand-made rule
on a guest it does not own is not seen, and such a guest is not looked at), and every
cluster-level object (cluster options, aliases, IP sets, security groups) those rules refer to,
owned or not. A guest's addresses are those observed, else the spec's, else those a VM's
guest agent reports.

Places are live objects: `Place(("rules", 3), "firewall/guest/mc-x")` for a rule,
`("enable",)`, `("net", "net0")` or `("policy_in",)` for a switch or the default policy. An
object the controller does not own has no address and is named by its label, such as
`firewall/group/debug (not owned)`. Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from reconciler.model.observed import ObservedResource, ObservedState
from reconciler.model.resources import Kind
from reconciler.model.spec import PlatformSpec
from reconciler.model.units import parse_kv
from reconciler.policies.design import layer_of
from reconciler.policies.findings import Place
from reconciler.policies.inbound import Inbound, Origin, RuleBook, Void, interface_ips
from reconciler.policies.reachability import Address, AddressBook, Rule


def name_of(r: ObservedResource) -> str:
    if r.address:
        return r.address.removeprefix(r.kind.value + "/")
    return str(r.attributes.get("name", r.id.get("name", "?")))


def label(r: ObservedResource) -> str:
    """How a finding names a cluster-level object: its address, or that it is not ours."""
    if r.address:
        return r.address
    if r.kind is Kind.FIREWALL_CLUSTER:
        return f"{r.kind.value} (not owned)"
    return f"{r.kind.value}/{name_of(r)} (not owned)"


def _rules(owner: str, raws: Iterable[Mapping[str, Any]]) -> list[Origin]:
    return [
        Origin(Place(("rules", i), owner), Place(("rules", i), owner), raw)
        for i, raw in enumerate(raws)
    ]


class LiveFirewalls:
    """The observed firewall, compiled once for every owned guest."""

    def __init__(self, spec: PlatformSpec, observed: ObservedState) -> None:
        self.spec = spec
        self.cluster: ObservedResource | None = None
        self.objects: dict[tuple[Kind, str], ObservedResource] = {}
        self.guests: dict[str, ObservedResource] = {}
        self.firewalls: dict[str, ObservedResource] = {}
        for r in observed.resources:
            if r.kind is Kind.FIREWALL_CLUSTER:
                self.cluster = r
            elif r.kind in (Kind.FIREWALL_ALIAS, Kind.FIREWALL_IPSET, Kind.FIREWALL_GROUP):
                self.objects[(r.kind, name_of(r).lower())] = r
            elif r.owned and r.address and r.kind is Kind.GUEST:
                self.guests[name_of(r)] = r
            elif r.owned and r.address and r.kind is Kind.FIREWALL_GUEST:
                self.firewalls[name_of(r)] = r
        self.rules = RuleBook(
            AddressBook(
                aliases={
                    name_of(r): str(r.attributes.get("cidr"))
                    for r in self._all(Kind.FIREWALL_ALIAS)
                },
                ipsets={
                    name_of(r): tuple(r.attributes["entries"])
                    for r in self._all(Kind.FIREWALL_IPSET)
                    if "entries" in r.attributes
                },
            ),
            {
                name_of(r): _rules(label(r), r.attributes["rules"])
                for r in self._all(Kind.FIREWALL_GROUP)
                if "rules" in r.attributes
            },
        )

    def _all(self, kind: Kind) -> list[ObservedResource]:
        return [r for (k, _), r in self.objects.items() if k is kind]

    def names(self) -> list[str]:
        return sorted(self.guests)

    def layer(self, name: str) -> str | None:
        # A guest gone from the spec but still live has the layer its vmid's range says.
        found = layer_of(self.spec, name)
        if found is not None:
            return found
        vmid = self.guests[name].id.get("vmid") if name in self.guests else None
        for rng in self.spec.ranges.values():
            if vmid in rng:
                return rng.layer
        return None

    def ips(self, name: str) -> list[Address]:
        """A guest's addresses as observed; the spec's when it is not live or its NICs carry
        none (a VM's address belongs to its OS, not to its netN); else, for a VM, those its
        QEMU guest agent reports (`addresses`: a DHCP VM's)."""
        texts: list[str] = []
        if name in self.guests:
            nets = self.guests[name].attributes.get("net") or {}
            texts = [parse_kv(str(v)).get("ip", "") for _, v in sorted(nets.items())]
        if not any("/" in t for t in texts) and name in self.spec.guests:
            texts = [nic.ip for nic in self.spec.guests[name].network]
        if not any("/" in t for t in texts) and name in self.guests:
            texts = [str(a) for a in self.guests[name].attributes.get("addresses") or ()]
        return interface_ips(texts)

    def inbound(self, name: str) -> Inbound | None:
        fw = self.firewalls.get(name)
        if fw is None or fw.address is None:
            return None  # not observed: nothing known
        void: list[Void] = []
        if self.cluster is not None and not int(self.cluster.attributes.get("enable", 0)):
            void.append(
                Void(Place(("enable",), label(self.cluster)), "the cluster firewall is off")
            )
        if not int(fw.attributes.get("enable", 0)):
            void.append(Void(Place(("enable",), fw.address), "its firewall is off"))
        guest = self.guests[name]
        void.extend(
            Void(
                Place(("net", key), guest.address or name),
                f"interface {key} has firewall=0, so no rule applies to it",
            )
            for key, value in sorted((guest.attributes.get("net") or {}).items())
            if parse_kv(str(value)).get("firewall") != "1"
        )
        chain = self.rules.chain(_rules(fw.address, fw.attributes.get("rules") or ()))
        policy = str(fw.attributes.get("policy_in") or "DROP")
        return Inbound(tuple(void), policy, Place(("policy_in",), fw.address), chain)

    def source_objects(self, rule: Rule[Origin]) -> list[ObservedResource]:
        """The aliases and IP sets a rule's source names."""
        found: list[ObservedResource] = []
        for part in str(rule.origin.fields.get("source") or "").split(","):
            part = part.strip()
            kind = Kind.FIREWALL_IPSET if part.startswith("+") else Kind.FIREWALL_ALIAS
            name = part.removeprefix("+").removeprefix("dc/").lower()
            if (kind, name) in self.objects:
                found.append(self.objects[(kind, name)])
        return found
