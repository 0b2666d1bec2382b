"""Changes a saved plan could forge, handed to the providers directly (fakepve, the real client):
the providers hold their own line whatever a plan says (issue 13 item 3).

- A guest update, migration, replace or delete without the config digest it was planned
  against is refused before any call that changes anything: a missing version is never a
  skip of the digest check. A destroy's own re-read (any version, the mark decides) still works.
- An alias is updated or deleted only while its comment carries our mark, as IP sets and
  groups are: a change naming a hand-made alias, even with the digest Proxmox shows, is refused.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import anyio
import pytest

from reconciler.applying.observing import observe_all
from reconciler.model.errors import ConflictError, OwnershipError, PermanentError
from reconciler.model.plans import Action, Change, FieldChange
from reconciler.model.resources import DesiredGraph, Kind
from reconciler.providers.firewall import FirewallProvider, join_version, read_comment_mark
from reconciler.providers.proxmox import ProxmoxProvider
from tests.fakepve_fixtures import mutating_calls
from tests.guest_helpers import run

LOBBY = "guest/mc-lobby"
MARK = "[reconciler:zpack]"


@pytest.fixture
def lobby(graph: DesiredGraph, provider: ProxmoxProvider, pve: Any) -> Change:
    """mc-lobby created and observed: a no-op change carrying what was observed."""
    conv = run(graph, provider, targets=[LOBBY])
    assert conv.ok
    observed = anyio.run(lambda: observe_all([provider], graph.platform))
    seen = observed.owned()[LOBBY]
    assert seen.version
    pve.requests.clear()
    attrs = dict(seen.attributes)
    return Change(
        LOBBY, Kind.GUEST, Action.NOOP, 0, dict(seen.id), attrs, attrs, version=seen.version
    )


def forged(lobby: Change, action: Action) -> Change:
    attrs = dict(lobby.before or {})
    match action:
        case Action.UPDATE:
            field = FieldChange("memory", attrs["memory"], 65536)
            return replace(lobby, action=action, after={**attrs, "memory": 65536}, fields=(field,))
        case Action.MIGRATE:
            field = FieldChange("node", "pve-runtime", "pve-core", forces_replace=True)
            ident = {**lobby.id, "node": "pve-core", "from": "pve-runtime"}
            return replace(
                lobby, action=action, id=ident, after={**attrs, "node": "pve-core"}, fields=(field,)
            )
        case Action.REPLACE:
            field = FieldChange("unprivileged", True, False, forces_replace=True)
            after = {**attrs, "unprivileged": False}
            return replace(lobby, action=action, after=after, fields=(field,), destroys=("rootfs",))
        case _:
            return replace(lobby, action=action, after=None, destroys=("rootfs 16 GiB",))


@pytest.mark.parametrize(
    "action", [Action.UPDATE, Action.MIGRATE, Action.REPLACE, Action.DELETE], ids=str
)
def test_a_guest_change_without_its_version_is_refused_before_anything_changes(
    action: Action, lobby: Change, provider: ProxmoxProvider, pve: Any
) -> None:
    change = replace(forged(lobby, action), version=None)
    with pytest.raises(PermanentError, match="no observed version: re-plan"):
        anyio.run(provider.apply, change)
    assert mutating_calls(pve) == []
    assert provider.client.nodes("pve-runtime").lxc(1000).config.get()["memory"] == 2048


def test_an_update_reached_directly_without_its_version_is_refused_too(
    lobby: Change, provider: ProxmoxProvider, pve: Any
) -> None:
    with pytest.raises(PermanentError, match="no observed version"):
        anyio.run(provider.update_guest, replace(forged(lobby, Action.UPDATE), version=None))
    assert mutating_calls(pve) == []


def test_with_its_version_the_same_update_applies_and_a_delete_rereads_for_the_mark(
    lobby: Change, provider: ProxmoxProvider, pve: Any
) -> None:
    anyio.run(provider.apply, forged(lobby, Action.UPDATE))
    config = provider.client.nodes("pve-runtime").lxc(1000).config.get()
    assert config["memory"] == 65536
    # The config changed since `lobby` was observed: a destroy goes by the mark, not the digest.
    anyio.run(provider.apply, forged(lobby, Action.DELETE))
    guests = provider.client.cluster.resources.get(type="vm")
    assert [int(g["vmid"]) for g in guests if not g.get("template")] == []  # the VM template stays


# --- aliases ---------------------------------------------------------------------------------


def alias_change(provider: ProxmoxProvider, name: str, action: Action, **after: Any) -> Change:
    """A change as a plan would carry it, with the digest Proxmox shows for the aliases now."""
    items = {a["name"]: a for a in provider.client.cluster.firewall.aliases.get()}
    item = items[name]
    before = {"cidr": item["cidr"], "comment": read_comment_mark(item.get("comment"))[1]}
    return Change(
        f"firewall/alias/{name}",
        Kind.FIREWALL_ALIAS,
        action,
        0,
        {"name": name},
        before,
        {**before, **after} if action is not Action.DELETE else None,
        version=join_version(aliases=item.get("digest")),
    )


@pytest.mark.parametrize("action", [Action.UPDATE, Action.DELETE], ids=str)
def test_an_alias_without_our_mark_is_never_updated_or_deleted(
    action: Action, provider: ProxmoxProvider, pve: Any
) -> None:
    aliases = provider.client.cluster.firewall.aliases
    aliases.post(name="office", cidr="192.0.2.10", comment="kept by hand")
    change = alias_change(provider, "office", action, cidr="0.0.0.0/0", comment="opened")
    firewall = FirewallProvider(pve=provider)
    pve.requests.clear()
    with pytest.raises(OwnershipError, match="does not carry our mark"):
        anyio.run(firewall.apply, change)
    assert mutating_calls(pve) == []
    [office] = aliases.get()
    assert (office["cidr"], office["comment"]) == ("192.0.2.10", "kept by hand")


def test_an_alias_of_ours_is_updated_after_its_mark_is_read_and_a_gone_one_is_a_conflict(
    provider: ProxmoxProvider, pve: Any
) -> None:
    aliases = provider.client.cluster.firewall.aliases
    aliases.post(name="api", cidr="10.10.0.11", comment=f"platform API {MARK}")
    firewall = FirewallProvider(pve=provider)
    change = alias_change(provider, "api", Action.UPDATE, cidr="10.10.0.12")
    anyio.run(firewall.apply, change)
    [api] = aliases.get()
    assert (api["cidr"], api["comment"]) == ("10.10.0.12", f"platform API {MARK}")
    aliases("api").delete()
    pve.requests.clear()
    with pytest.raises(ConflictError, match="gone since the plan was made"):
        anyio.run(firewall.apply, replace(change, action=Action.DELETE, after=None))
    assert mutating_calls(pve) == []
