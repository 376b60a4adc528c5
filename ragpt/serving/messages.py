"""The one rule that turns chat messages into (question, history, client system text).

    the last user/assistant message must be the user's: it is the question;
    earlier user and assistant messages are the conversation history, oldest first;
    system and developer messages, wherever they stand, are the client's system text: joined in
    order with blank lines and appended to the department's system turn (ragpt.lm.template).

The HTTP service (OpenAI messages) and LangChain (BaseMessage) convert their messages to
(role, text) pairs and call `split_messages`; training examples carry the same three parts.
"""

from __future__ import annotations

from collections.abc import Iterable

from ragpt.errors import EmptyQuestionError, RagptError
from ragpt.lm.template import Turn

SYSTEM_ROLES = ("system", "developer")
ROLES = ("user", "assistant", *SYSTEM_ROLES)


class MessagesError(RagptError, ValueError):
    """Messages that do not make a question (no user message last, an unknown role)."""


def split_messages(messages: Iterable[tuple[str, str]]) -> tuple[str, tuple[Turn, ...], str | None]:
    turns: list[Turn] = []
    system: list[str] = []
    for role, text in messages:
        if role not in ROLES:
            raise MessagesError(f"unknown message role {str(role)[:20]!r}; use one of {', '.join(ROLES)}")
        if role in SYSTEM_ROLES:
            if text.strip():
                system.append(text.strip())
        else:
            turns.append(Turn(role, text))
    if not turns or turns[-1].role != "user":
        raise MessagesError("the last (non-system) message must be the user's question")
    if not turns[-1].content.strip():
        raise EmptyQuestionError("the question (last user message) is empty")
    return turns[-1].content, tuple(turns[:-1]), "\n\n".join(system) or None
