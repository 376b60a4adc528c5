"""What a follow-up question retrieves with: the retrieval query built from the conversation.

A follow-up such as "And how long does that take?" names nothing to search for; the turns
before it do. A query rule says which turns go into the query:

    last        the question alone
    user:N      the question and the N-1 user turns before it
    turns:N     the question and the N-1 turns (either role) before it

The question comes first and earlier turns follow, newest first, so an embedder that truncates
long input drops the oldest turns, never the question. benchmarks/history_retrieval.py measures
the rules on doc2dial follow-ups (results in benchmarks/results/history_retrieval.md).
"""

from __future__ import annotations

from collections.abc import Sequence

from ragpt.errors import RagptError
from ragpt.lm.template import Turn


def check_query_rule(rule: str) -> str:
    """The rule, validated; a clear error naming the accepted forms otherwise."""
    if rule == "last":
        return rule
    kind, sep, n = str(rule).partition(":")
    if sep and kind in ("user", "turns") and n.isascii() and n.isdigit() and int(n) >= 1:
        return rule
    raise RagptError(f"unknown retrieval query rule {str(rule)[:40]!r}; use 'last', 'user:N' or 'turns:N' (N >= 1)")


def retrieval_query(question: str, history: Sequence[Turn], rule: str) -> str:
    """The text to retrieve with for `question` asked after `history` (oldest turn first)."""
    check_query_rule(rule)
    if rule == "last" or not history:
        return question
    kind, _, n = rule.partition(":")
    earlier = [t.content for t in history if kind == "turns" or t.role == "user"]
    keep = earlier[-(int(n) - 1):] if int(n) > 1 else []
    return "\n".join([question, *reversed(keep)])
