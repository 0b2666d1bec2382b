"""Normalization before the diff: what Proxmox stores differently from how a person may write
it is not drift; a real difference still is."""

from __future__ import annotations

from typing import Any

import pytest

from reconciler.model.resources import Kind
from reconciler.planning import diffing, normalize


def fields(kind: Kind, want: dict[str, Any], have: dict[str, Any]) -> list[str]:
    w, h = normalize.pair(kind, want, have)
    return [c.path for c in diffing.diff(kind, w, h)]


def rule(**kw: Any) -> dict[str, Any]:
    return {"type": "in", "action": "ACCEPT", "enable": 1, **kw}


def test_a_macro_in_any_case_is_the_macro_proxmox_stores() -> None:
    # fakepve (following PVE) stores "ssh", "Ssh" and "SSH" all as "SSH"
    want = {"rules": [rule(macro="ssh")]}
    have = {"rules": [rule(macro="SSH", pos=0, digest="x")]}
    assert fields(Kind.FIREWALL_GROUP, want, have) == []
    assert fields(Kind.FIREWALL_GROUP, {"rules": [rule(macro="http")]}, have) == ["rules[0].macro"]


@pytest.mark.parametrize(
    ("written", "stored"),
    [("10.0.0.5/32", "10.0.0.5"), ("fd00::1/128", "fd00::1"), ("10.0.1.0/24", "10.0.1.0/24")],
)
def test_an_ip_set_entry_for_one_address_is_stored_without_its_prefix(
    written: str, stored: str
) -> None:
    assert fields(Kind.FIREWALL_IPSET, {"entries": [written]}, {"entries": [stored]}) == []


def test_a_different_entry_is_still_drift() -> None:
    assert fields(Kind.FIREWALL_IPSET, {"entries": ["10.0.0.5/32"]}, {"entries": ["10.0.0.6"]})
