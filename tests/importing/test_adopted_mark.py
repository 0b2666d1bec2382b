"""The mark's `adopted=` field, offline: what `with_mark` writes `read_mark` reads back, with
and without the field (a hypothesis property); the field sits last, percent-encoded, and a mark
without it reads as before; it never changes whose a guest is (`claimed`); and observed, it is
never a difference the planner acts on.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reconciler.model.resources import Kind
from reconciler.planning import diffing, normalize
from reconciler.providers.proxmox import (
    claimed,
    guest_attributes,
    mark_line,
    read_mark,
    update_params,
    with_mark,
)

PLATFORMS = st.from_regex(r"[a-z][a-z0-9-]{0,12}", fullmatch=True)
ADDRESSES = st.from_regex(r"guest/[a-z0-9][a-z0-9-]{0,20}", fullmatch=True)
TEMPLATES = st.none() | st.from_regex(r"[a-z]+:vztmpl/[\w.-]{1,30}", fullmatch=True)
VMIDS = st.none() | st.integers(min_value=100, max_value=999_999_999)
# Directories as people name them: any printable text, spaces, `%` and `=` and non-ASCII too.
DIRECTORIES = st.none() | st.text(
    st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1, max_size=40
).filter(str.isprintable)
BODIES = st.sampled_from(["", "the lobby", "notes\n\nreconciler:v1 platform=x address=guest/y"])


@given(PLATFORMS, ADDRESSES, TEMPLATES, VMIDS, DIRECTORIES, BODIES)
def test_what_with_mark_writes_reads_back_with_and_without_the_field(
    platform: str,
    address: str,
    template: str | None,
    vmid: int | None,
    adopted: str | None,
    body: str,
) -> None:
    written = with_mark(body, platform, address, template, vmid, adopted)
    expected = {"platform": platform, "address": address}
    if vmid is not None:
        expected["vmid"] = str(vmid)
    if template:
        expected["template"] = template
    if adopted:
        expected["adopted"] = adopted
    assert read_mark(written) == (expected, body)
    line = written.rsplit("\n", 1)[-1]
    assert line == mark_line(platform, address, template, vmid, adopted)
    # One line of fields: no whitespace inside a value, whatever the directory holds.
    assert len(line.split(" ")) == 1 + len(expected)
    # Whose it is does not depend on where it was adopted from.
    without = with_mark(body, platform, address, template, vmid)
    for seen_at in (vmid or 100, (vmid or 100) + 1):
        assert claimed(read_mark(written)[0], platform, seen_at) == (
            claimed(read_mark(without)[0], platform, seen_at)
        )


@pytest.mark.parametrize(
    ("line", "fields"),
    [
        (
            "reconciler:v1 platform=zpack address=guest/a vmid=7 template=t:vztmpl/x adopted=imp",
            {
                "platform": "zpack",
                "address": "guest/a",
                "vmid": "7",
                "template": "t:vztmpl/x",
                "adopted": "imp",
            },
        ),
        (  # a VM: no template
            "reconciler:v1 platform=zpack address=guest/a vmid=7 adopted=/srv/my%20specs",
            {"platform": "zpack", "address": "guest/a", "vmid": "7", "adopted": "/srv/my specs"},
        ),
        (  # written before the field: as before
            "reconciler:v1 platform=zpack address=guest/a vmid=7 template=t:vztmpl/x",
            {"platform": "zpack", "address": "guest/a", "vmid": "7", "template": "t:vztmpl/x"},
        ),
        (  # one that decodes to a control character: left out, the mark still ours
            "reconciler:v1 platform=zpack address=guest/a vmid=7 adopted=x%1B%5B2J",
            {"platform": "zpack", "address": "guest/a", "vmid": "7"},
        ),
        # Out of order, or twice: not the line `mark_line` writes, so not a mark.
        ("reconciler:v1 platform=zpack address=guest/a adopted=imp vmid=7", {}),
        ("reconciler:v1 platform=zpack address=guest/a adopted=imp adopted=specs", {}),
    ],
    ids=["container", "vm-encoded", "old", "control", "out-of-order", "twice"],
)
def test_the_field_is_read_last_and_decoded(line: str, fields: dict[str, str]) -> None:
    assert read_mark(f"notes\n\n{line}")[0] == fields


def guest(description: str, kind: str = "lxc") -> dict[str, Any]:
    item = {"vmid": 1000, "node": "pve1", "type": kind, "status": "running"}
    config = {"hostname": "a", "cores": 2, "memory": 2048, "description": description}
    return guest_attributes(item, config)


@pytest.mark.parametrize("kind", ["lxc", "qemu"])
def test_observed_it_is_an_attribute_the_diff_never_compares(kind: str) -> None:
    marked = "text\n\n" + mark_line("zpack", "guest/a", None, 1000, "imported")
    have = guest(marked, kind)
    assert have["adopted"] == "imported" and have["description"] == "text"
    assert "adopted" not in guest("text\n\n" + mark_line("zpack", "guest/a", None, 1000), kind)
    # Even a desired side that named it (no spec can) would see no difference.
    desired = {k: v for k, v in have.items() if k != "adopted"}
    for want in (desired, {**desired, "adopted": "specs"}):
        w, h = normalize.pair(Kind.GUEST, want, have)
        assert diffing.diff(Kind.GUEST, w, h) == []


@pytest.mark.parametrize("adopted", ["imported", "my specs", None])
def test_a_new_description_keeps_where_the_guest_was_adopted_into(adopted: str | None) -> None:
    """The spec changes a guest's description (or its template): the controller writes its
    mark again, and the directory it was adopted into stays in it, so the plan can still name
    it should the guest leave the spec."""
    before = with_mark("old notes", "zpack", "guest/mc", "local:vztmpl/a.tar.zst", 1001, adopted)
    want = {"description": "new notes", "template": "local:vztmpl/a.tar.zst", "vmid": 1001}
    params, _ = update_params(
        "zpack", "guest/mc", want, {"description": before, "vmid": 1001}, ["description"]
    )
    mark, text = read_mark(params["description"])
    assert text == "new notes"
    assert mark.get("adopted") == adopted
    assert claimed(mark, "zpack", 1001) == "guest/mc"
