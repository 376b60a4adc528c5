"""What the runnables share: chat messages -> (question, history), one prepared request, token streaming
with incremental detokenisation, `auto` routing, and the thread -> asyncio bridge.

A request is prepared exactly as `Pipeline.ask_many` prepares it (retrieve, resolve the prompt version
once, `build_prompt_ids`), so a streamed answer is the same text `Pipeline.ask` returns.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextvars import copy_context
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from langchain_core.messages import AIMessage, BaseMessage, ChatMessage, HumanMessage, SystemMessage

from ragpt.errors import EmptyQuestionError
from ragpt.lm.template import Turn, build_prompt_ids
from ragpt.retrieval.router import DepartmentRouter
from ragpt.retrieval.search import RetrievedChunk
from ragpt.serving.pipeline import Citation, Pipeline, passages_from_hits
from ragpt.softprompts.deep import prompt_tokens

T = TypeVar("T")
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
    raise ValueError(f"ragpt cannot take {type(m).__name__} messages (only system, human and AI text)")


def question_and_history(messages: Sequence[BaseMessage]) -> tuple[str, tuple[Turn, ...]]:
    """The last human message is the question; earlier human/AI turns are the history.

    System messages are dropped on purpose: the department's system prompt is part of ragpt's
    template, the one the soft prompt was trained with (the HTTP service follows the same rule).
    """
    turns = [Turn(role, m.text) for m in messages if (role := _role(m)) in ("user", "assistant")]
    if not turns or turns[-1].role != "user":
        raise ValueError("the last (non-system) message must be the human's question")
    if not turns[-1].content.strip():
        raise EmptyQuestionError("the question is empty")
    return turns[-1].content, tuple(turns[:-1])


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


# ---------------------------------------------------------------------- one prepared request


@dataclass
class Prepared:
    """Everything fixed before the first token: the row's ids, its soft prompt and what to report."""

    department: str
    ids: list[int]
    soft_prompt: torch.Tensor | None
    prompt_version: str | None
    hits: list[RetrievedChunk]

    @property
    def prompt_tokens(self) -> int:  # counted as Pipeline counts them: soft-prompt positions included
        return len(self.ids) + prompt_tokens(self.soft_prompt)

    @property
    def citations(self) -> list[Citation]:
        return [Citation.from_hit(h) for h in self.hits]


def prepare(pipeline: Pipeline, question: str, department: str, *, history: Sequence[Turn] = (),
            prompt: str = "active", k: int | None = None, retrieve: bool = True) -> Prepared:
    """The same steps, in the same order, as `Pipeline.ask_many` for one question."""
    if not isinstance(question, str) or not question.strip():
        raise EmptyQuestionError("the question is empty")
    if department == AUTO:
        department = route(pipeline, [question])[0]
    pipeline.index.check_department(department)
    # Without retrieval the template writes its "(no documents found)" context.
    hits = pipeline.retrieve(question, department, k) if retrieve else []
    soft, version = pipeline.resolve_prompt(department, prompt)
    ids = build_prompt_ids(pipeline.generator.tokenizer, question, passages_from_hits(hits), department=department,
                           history=history, max_context_tokens=pipeline.settings.max_context_tokens)
    return Prepared(department, ids, soft, version, hits)


@dataclass
class Completion:
    """Filled in while `stream_text` runs: the generated ids (end token included) and why it stopped."""

    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"

    def usage(self, prepared: Prepared) -> dict[str, int]:
        """LangChain's UsageMetadata keys, with Pipeline's counts (the end token is an output token)."""
        n_in, n_out = prepared.prompt_tokens, len(self.token_ids)
        return {"input_tokens": n_in, "output_tokens": n_out, "total_tokens": n_in + n_out}


def stream_text(pipeline: Pipeline, prepared: Prepared, out: Completion, *, max_new_tokens: int | None = None,
                temperature: float | None = None, seed: int | None = None) -> Iterator[str]:
    """Text pieces of the answer as `Generator.stream` produces tokens; they join to `Answer.text`."""
    s, gen = pipeline.settings, pipeline.generator
    detok = Detokenizer(gen.tokenizer, gen.stop_ids)
    steps = gen.stream([prepared.ids], [prepared.soft_prompt], max_new_tokens=max_new_tokens or s.max_new_tokens,
                       temperature=s.temperature if temperature is None else temperature, seed=seed)
    try:
        for (tok,) in steps:
            if tok is None:
                continue
            out.token_ids.append(tok)
            if piece := detok.push(tok):
                yield piece
    finally:
        steps.close()  # a consumer that stops early stops the forward passes too
    if tail := detok.finish():
        yield tail
    out.finish_reason = "stop" if out.token_ids and out.token_ids[-1] in gen.stop_ids else "length"


# ---------------------------------------------------------------------- detokenisation


class Detokenizer:
    """Incremental decoding whose pieces concatenate to `decode(ids, skip_special_tokens=True).strip()`,
    the text `Generator.generate` returns.

    Each step decodes only a short window (the previous piece's tokens plus the new ones) and
    emits the difference: decoding a window alone can drop a leading space (SentencePiece) or
    split a character, but both the window with and without the new tokens have the same
    start, so their difference is exact. Nothing is emitted while the text ends in an
    incomplete multi-byte character (U+FFFD), and leading/trailing whitespace is held back,
    as `.strip()` would remove it.
    """

    def __init__(self, tokenizer, stop_ids: set[int]):
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids
        self.ids: list[int] = []
        self.prefix = 0  # window start
        self.read = 0  # tokens up to here have been emitted
        self.sent = ""
        self._held = ""  # whitespace that .strip() would drop if nothing follows it

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        if token in self.stop_ids:
            return ""
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        if len(now) <= len(before) or now.endswith("\ufffd") or not now.startswith(before):
            return ""  # no new text yet, or a character still incomplete
        self.prefix, self.read = self.read, len(self.ids)
        return self._strip(now[len(before):])

    def _strip(self, text: str) -> str:
        if not self.sent:
            text = text.lstrip()
        text = self._held + text
        body = text.rstrip()
        self._held = text[len(body):]
        self.sent += body
        return body

    def finish(self) -> str:
        """What the windows have not emitted yet (a trailing incomplete character, say)."""
        full = self._decode(self.ids).strip()
        if not full.startswith(self.sent):  # cannot happen with byte-level or SentencePiece tokenizers
            return ""
        rest, self.sent = full[len(self.sent):], full
        return rest


# ---------------------------------------------------------------------- thread -> asyncio


async def aiter_in_thread(make_iterator: Callable[[], Iterator[T]]) -> AsyncIterator[T]:
    """Run a blocking iterator in a worker thread; its items reach the event loop through a queue.

    The loop stays free while the model runs. If the consumer stops early (break, cancellation),
    the worker is told to stop after its current item and the iterator is closed in the worker.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    stop = threading.Event()

    def post(kind: str, value: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))
        except RuntimeError:  # the loop is closed: nobody is listening any more
            stop.set()

    def work() -> None:
        try:
            it = make_iterator()
            try:
                for item in it:
                    post("item", item)
                    if stop.is_set():
                        break
            finally:
                close = getattr(it, "close", None)
                if close is not None:
                    close()
        except BaseException as e:  # handed to the consumer, raised there
            post("error", e)
            return
        post("done", None)

    # copy_context: callbacks and tracing read context variables set by the caller.
    worker = loop.run_in_executor(None, copy_context().run, work)
    try:
        while True:
            kind, value = await queue.get()
            if kind == "item":
                yield value
            elif kind == "error":
                raise value
            else:
                return
    finally:
        stop.set()
        await asyncio.shield(worker)  # never leave a thread running the model behind
