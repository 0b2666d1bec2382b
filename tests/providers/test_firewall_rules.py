"""Rule lists: the edit script (`rule_ops`), Proxmox's semantics of each step (`apply_op`,
checked against fakepve), the plan's view of a list (inserted, moved, changed, removed), and
the comment mark that says which cluster objects are ours."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.model.resources import Kind
from reconciler.planning.diffing import diff
from reconciler.providers.firewall import (
    RuleOp,
    apply_op,
    clean_rule,
    read_comment_mark,
    rule_ops,
    with_comment_mark,
)
from reconciler.providers.proxmox import ProxmoxProvider

AGENT = {"type": "group", "action": "agent", "enable": 1}
GAME = {"type": "in", "action": "ACCEPT", "proto": "tcp", "dport": "25565", "enable": 1}
MAP = {"type": "in", "action": "ACCEPT", "proto": "tcp", "dport": "8100", "enable": 1}
SSH = {"type": "in", "action": "ACCEPT", "proto": "tcp", "dport": "22", "source": "10.0.0.0/8"}
POOL = [AGENT, GAME, MAP, {**SSH, "enable": 1}, {**SSH, "enable": 0}, {**GAME, "log": "info"}]


def run_ops(have: list[dict[str, Any]], ops: list[RuleOp]) -> list[dict[str, Any]]:
    cur = [clean_rule(r) for r in have]
    for op in ops:
        cur = apply_op(cur, op)
    return cur


rule_lists = st.lists(st.sampled_from(POOL), max_size=7)


@settings(max_examples=400, deadline=None)
@given(have=rule_lists, want=rule_lists)
def test_the_edit_script_turns_any_list_into_any_other(
    have: list[dict[str, Any]], want: list[dict[str, Any]]
) -> None:
    ops = rule_ops(have, want)
    assert run_ops(have, ops) == [clean_rule(r) for r in want]
    assert len(ops) <= len(have) + 2 * len(want)
    if [clean_rule(r) for r in have] == [clean_rule(r) for r in want]:
        assert ops == []
    for op in ops:
        if op.verb == "move":
            assert op.params()["moveto"] != op.pos  # Proxmox would read it as an edit
        if op.verb in ("post", "put"):
            assert "enable" in op.params()  # never left to Proxmox's default of 0


@pytest.mark.parametrize(
    ("have", "want", "steps"),
    [
        ([], [AGENT, GAME, MAP], ["insert a rule at 0"] * 3),  # last first: no moves
        ([AGENT, MAP], [AGENT, GAME, MAP], ["insert a rule at 0", "move rule 0 to 1"]),
        ([AGENT, {**GAME, "enable": 0}, MAP], [AGENT, GAME, MAP], ["rewrite rule 1"]),
        ([MAP, AGENT, GAME], [AGENT, GAME, MAP], ["move rule 0 to 2"]),
        ([GAME, MAP, AGENT], [AGENT, GAME, MAP], ["move rule 2 to 0"]),
        ([{**GAME, "source": "0.0.0.0/0"}], [GAME], ["rewrite rule 0"]),
        ([SSH, AGENT, GAME, MAP], [AGENT, GAME, MAP], ["delete rule 0"]),
        ([AGENT, GAME, MAP], [AGENT], ["delete rule 2", "delete rule 1"]),
        ([AGENT, GAME], [], ["delete rule 1", "delete rule 0"]),
    ],
)
def test_a_hand_edit_is_undone_in_few_steps(
    have: list[dict[str, Any]], want: list[dict[str, Any]], steps: list[str]
) -> None:
    ops = rule_ops(have, want)
    assert [op.describe() for op in ops] == steps
    assert run_ops(have, ops) == [clean_rule(r) for r in want]


def test_a_rewrite_removes_the_fields_that_went_away() -> None:
    [op] = rule_ops([{**GAME, "source": "velocity", "log": "info"}], [GAME])
    assert op.params() == {**GAME, "delete": "log,source"}


def test_apply_op_is_what_proxmox_does(provider: ProxmoxProvider) -> None:
    """The semantics the provider checks the list against, step by step, are fakepve's (which
    follows pve-firewall's Rules.pm): POST at 0, moveto counted before the move."""
    rules = provider.client.nodes("pve-runtime").lxc(999).firewall.rules
    ops = [
        RuleOp("post", rule=MAP),
        RuleOp("post", rule=GAME),
        RuleOp("post", rule=AGENT),
        RuleOp("move", pos=0, to=2),
        RuleOp("move", pos=2, to=1),
        RuleOp("put", pos=0, rule={**SSH, "enable": 1}),
        RuleOp("put", pos=0, rule=GAME, delete=("source",)),
        RuleOp("move", pos=1, to=2),
        RuleOp("delete", pos=1),
    ]
    expected: list[dict[str, Any]] = []
    for op in ops:
        if op.verb == "post":
            rules.post(**op.params())
        elif op.verb == "delete":
            rules(op.pos).delete()
        else:
            rules(op.pos).put(**op.params())
        expected = apply_op(expected, op)
        assert [clean_rule(r) for r in rules.get()] == expected, op


# --- the plan's view ---------------------------------------------------------------------------


def fields(have: list[dict[str, Any]], want: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [
        (f.path, f.moved_from, f.before is None, f.after is None)
        for f in diff(Kind.FIREWALL_GUEST, {"rules": want}, {"rules": have})
    ]


@pytest.mark.parametrize(
    ("have", "want", "shown"),
    [
        ([AGENT, MAP], [AGENT, GAME, MAP], [("rules[1]", None, True, False)]),  # inserted
        ([AGENT, GAME, MAP], [AGENT, MAP], [("rules[1]", None, False, True)]),  # removed
        ([MAP, AGENT, GAME], [AGENT, GAME, MAP], [("rules[2]", "rules[0]", False, False)]),
        ([GAME, AGENT], [AGENT, GAME], [("rules[0]", "rules[1]", False, False)]),
        ([AGENT, {**GAME, "enable": 0}], [AGENT, GAME], [("rules[1].enable", None, False, False)]),
        ([{**GAME, "source": "0.0.0.0/0"}], [GAME], [("rules[0].source", None, False, True)]),
    ],
)
def test_the_plan_shows_inserted_moved_changed_and_removed_rules(
    have: list[dict[str, Any]], want: list[dict[str, Any]], shown: list[tuple[Any, ...]]
) -> None:
    assert fields(have, want) == shown


# --- the mark ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("comment", "platform", "rest"),
    [
        ("platform API [reconciler:zpack]", "zpack", "platform API"),
        ("[reconciler:zpack]", "zpack", ""),
        ("someone else's [reconciler:other]", "other", "someone else's"),
        ("made by hand", None, "made by hand"),
        ("[reconciler:zpack] then more words", None, "[reconciler:zpack] then more words"),
        (None, None, ""),
    ],
)
def test_the_comment_mark(comment: str | None, platform: str | None, rest: str) -> None:
    assert read_comment_mark(comment) == (platform, rest)


def test_the_mark_round_trips() -> None:
    assert read_comment_mark(with_comment_mark("", "zpack")) == ("zpack", "")
    assert read_comment_mark(with_comment_mark("ops net", "zpack")) == ("zpack", "ops net")
