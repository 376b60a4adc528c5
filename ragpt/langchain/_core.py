"""What the runnables share: LangChain messages -> (question, history, system text), and `auto` routing.

Everything else (prepare, generation, streaming, detokenisation, the thread -> asyncio bridge) is
the one request path in ragpt.serving, shared with `ragpt ask`, the HTTP service and `ragpt eval`.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence

from langchain_core.messages import AIMessage, BaseMessage, ChatMessage, HumanMessage, SystemMessage

from ragpt.lm.template import Turn
from ragpt.retrieval.router import DepartmentRouter
from ragpt.serving.messages import MessagesError, split_messages
from ragpt.serving.pipeline import Pipeline

AUTO = "auto"


# ---------------------------------------------------------------------- messages


def _role(m: BaseMessage) -> str:
    if isinstance(m, HumanMessage):
        return "user"
    if isinstance(m, AIMessage):
        return "assistant"
    if isinstance(m, SystemMessage):
        return "system"
    if isinstance(m, ChatMessage) and m.role in ("user", "assistant", "system", "developer"):
        return m.role
    raise MessagesError(f"ragpt cannot take {type(m).__name__} messages (only system, human and AI text)")


def split_lc_messages(messages: Sequence[BaseMessage]) -> tuple[str, tuple[Turn, ...], str | None]:
    """(question, history, system text) by ragpt.serving.messages' rule: the last human message is the
    question, earlier human/AI turns the history, system messages the client's system text."""
    return split_messages((_role(m), m.text) for m in messages)


def history_from(value) -> tuple[Turn, ...]:
    """A chain input's "history": LangChain messages or {"role", "content"} dicts, oldest first."""
    turns = []
    for item in value or ():
        if isinstance(item, BaseMessage):
            role, text = _role(item), item.text
        elif isinstance(item, dict) and isinstance(item.get("content"), str):
            role, text = item.get("role"), item["content"]
        else:
            raise MessagesError("history items must be LangChain messages or {'role', 'content'} dicts")
        if role not in ("user", "assistant"):
            raise MessagesError(f"history holds user and assistant turns only, got {str(role)[:20]!r}")
        turns.append(Turn(role, text))
    return tuple(turns)


# ---------------------------------------------------------------------- routing

_routers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_routers_lock = threading.Lock()


def route(pipeline: Pipeline, questions: Sequence[str]) -> list[str]:
    """Departments for `auto` questions, by ragpt.retrieval.router over the pipeline's index (one embedder batch).

    The router reads every chunk vector back from FAISS, so it is built once per index state
    (`_version` is the key the index's own caches use) and shared by all runnables of that index.
    """
    index = pipeline.index
    with _routers_lock:
        cached = _routers.get(index)
        if cached is None or cached[0] != index._version:
            cached = (index._version, DepartmentRouter.from_index(index, pipeline.embedder))
            _routers[index] = cached
    return [d.department for d in cached[1].route_many(list(questions))]
