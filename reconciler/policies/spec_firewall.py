"""The spec's firewall, as the reach rules read it: each guest's inbound chain as written.

Built by `reconciler.loading.policies` for the spec's isolation and agent-port policies. Places
are spec paths: a finding about a rule points at the rule's `source` (what to narrow), one about
a switch that is off at that switch, one about the default policy at `policy_in`.
"""

from __future__ import annotations

from reconciler.model.spec import FirewallRule, PlatformSpec
from reconciler.policies.design import layer_of
from reconciler.policies.findings import Path, Place
from reconciler.policies.inbound import Inbound, Origin, RuleBook, Void, interface_ips
from reconciler.policies.reachability import Address, AddressBook


def _origin(path: Path, rule: FirewallRule) -> Origin:
    return Origin(Place(path), Place((*path, "source")), rule.model_dump())


class SpecFirewalls:
    """The spec's firewall, compiled once for every guest a policy looks at."""

    def __init__(self, spec: PlatformSpec) -> None:
        self.spec = spec
        fw = spec.firewall
        self.rules = RuleBook(
            AddressBook(
                aliases={name: alias.cidr for name, alias in fw.aliases.items()},
                ipsets={name: ipset.entries for name, ipset in fw.ipsets.items()},
            ),
            {
                name: [
                    _origin(("firewall", "groups", name, "rules", i), rule)
                    for i, rule in enumerate(group.rules)
                ]
                for name, group in fw.groups.items()
            },
        )

    def names(self) -> tuple[str, ...]:
        return tuple(self.spec.guests)

    def layer(self, name: str) -> str | None:
        return layer_of(self.spec, name)

    def ips(self, name: str) -> list[Address]:
        guest = self.spec.guests.get(name)
        return interface_ips(nic.ip for nic in guest.network) if guest is not None else []

    def inbound(self, name: str) -> Inbound:
        guest = self.spec.guests[name]
        at: Path = ("guests", name)
        void: list[Void] = []
        cluster = self.spec.firewall.cluster
        # Proxmox filters a guest's traffic only when the cluster firewall, the guest's firewall
        # and the NIC's firewall flag are all on; any one off voids every rule.
        if cluster is not None and not cluster.enable:
            void.append(
                Void(Place(("firewall", "cluster", "enable")), "the cluster firewall is disabled")
            )
        fw = guest.firewall
        if fw is None:
            void.append(Void(Place(at), "it has no firewall section, so Proxmox filters nothing"))
            return Inbound(tuple(void), "ACCEPT", Place(at), ())
        if not fw.enable:
            void.append(Void(Place((*at, "firewall", "enable")), "its firewall is disabled"))
        void.extend(
            Void(
                Place((*at, "network", i, "firewall")),
                f"interface {nic.name} has firewall: false, so no rule applies",
            )
            for i, nic in enumerate(guest.network)
            if not nic.firewall
        )
        chain = self.rules.chain(
            _origin((*at, "firewall", "rules", i), rule) for i, rule in enumerate(fw.rules)
        )
        return Inbound(tuple(void), fw.policy_in, Place((*at, "firewall", "policy_in")), chain)
