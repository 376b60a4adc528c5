"""The retrieval query of a follow-up question: which earlier turns go in, in which order."""

from __future__ import annotations

import pytest

from ragpt.config import CONTRACT_DEFAULTS
from ragpt.errors import RagptError
from ragpt.lm.template import Turn
from ragpt.serving.conversation import check_query_rule, retrieval_query

HISTORY = [  # oldest first, as the serving path and the importers give it
    Turn("user", "u1 renew my license"),
    Turn("assistant", "a1 online or in person?"),
    Turn("user", "u2 online"),
    Turn("assistant", "a2 you need your permit number"),
]
Q = "And how long does that take?"


def _lines(rule: str, history=HISTORY) -> list[str]:
    return retrieval_query(Q, history, rule).split("\n")


@pytest.mark.parametrize("rule", ["last", "user:1", "user:3", "turns:1", "turns:5"])
def test_empty_history_is_the_question(rule):
    assert retrieval_query(Q, [], rule) == Q


def test_last_ignores_history():
    assert retrieval_query(Q, HISTORY, "last") == Q
    assert check_query_rule(CONTRACT_DEFAULTS["query_rule"]) == CONTRACT_DEFAULTS["query_rule"]


def test_question_first_then_newest_turns_first():
    assert _lines("turns:3") == [Q, "a2 you need your permit number", "u2 online"]
    assert _lines("user:3") == [Q, "u2 online", "u1 renew my license"]


def test_n_counts_the_question():
    assert _lines("user:1") == [Q]
    assert _lines("turns:1") == [Q]
    assert _lines("user:2") == [Q, "u2 online"]
    assert _lines("turns:2") == [Q, "a2 you need your permit number"]


def test_n_beyond_history_takes_everything():
    assert _lines("turns:10") == [Q, *reversed([t.content for t in HISTORY])]
    assert _lines("user:10") == [Q, "u2 online", "u1 renew my license"]


def test_user_rule_skips_assistant_turns():
    only_assistant = [Turn("assistant", "welcome, how can I help?")]
    assert retrieval_query(Q, only_assistant, "user:5") == Q
    assert _lines("turns:5", only_assistant) == [Q, "welcome, how can I help?"]
    assert not any(line.startswith("a") for line in _lines("user:10"))


def test_history_not_modified():
    before = list(HISTORY)
    retrieval_query(Q, HISTORY, "turns:3")
    assert before == HISTORY


@pytest.mark.parametrize("rule", ["last", "user:1", "user:2", "turns:1", "turns:12", "user:007"])
def test_good_rules_pass(rule):
    assert check_query_rule(rule) == rule


@pytest.mark.parametrize("rule", ["", "LAST", "first", "user", "user:", "user:0", "user:-1", "user:x", "user:2.5",
                                  "user: 2", "user:2 ", "turns:0", "assistant:2", "all:3", "user:²", ":2", None, 3])
def test_bad_rules_raise_a_clear_error(rule):
    with pytest.raises(RagptError, match=r"unknown retrieval query rule .*use 'last', 'user:N' or 'turns:N'"):
        check_query_rule(rule)
    with pytest.raises(RagptError, match="unknown retrieval query rule"):
        retrieval_query(Q, HISTORY, rule)
    with pytest.raises(RagptError):  # checked even when there is no history to apply it to
        retrieval_query(Q, [], rule)


def test_error_message_is_bounded():
    with pytest.raises(RagptError) as e:
        check_query_rule("x" * 10_000)
    assert len(str(e.value)) < 200
