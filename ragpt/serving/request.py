"""The one request path: prepare -> generate -> finish, for every surface.

    prepare   check the department; resolve the prompt version (active / pinned / none) and its
              input contract, apply the caller's overrides; build the retrieval query from the
              conversation; retrieve inside the department filter; apply the token budgets
              (question, history trimmed oldest-first, passages, the model's window); build ids
    generate  `decode`: one `Generator.stream` over prepared rows, soft prompts from the prefix cache
    finish    `RowDecoder.answer`: the stop rule, detokenisation, citations, usage, the contract used

`ragpt ask` and `Pipeline`, the HTTP service's scheduler, LangChain and `ragpt eval` all call
these functions; the trainer builds its examples with `retrieve_many` and `build_inputs`, the
two halves of `prepare`, plus the answer. Surfaces differ only in how they schedule rows.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from ragpt.errors import EmptyQuestionError, RagptError
from ragpt.lm.template import (
    BuiltPrompt,
    ContextPassage,
    PromptTooLongError,
    QuestionTooLongError,
    Turn,
    build_prompt,
)
from ragpt.serving.contract import InputContract
from ragpt.serving.conversation import retrieval_query
from ragpt.serving.streaming import Detokenizer

__all__ = ["Answer", "ChatRequest", "Citation", "PreparedRequest", "PromptTooLongError", "QuestionTooLongError",
           "RowDecoder", "Turn", "build_inputs", "decode", "generate_answers", "prepare", "prepare_many",
           "retrieve_many", "stream_answer"]

if TYPE_CHECKING:
    import torch

    from ragpt.lm.generator import Generator
    from ragpt.retrieval.query_adapter import QueryAdapter
    from ragpt.retrieval.search import RetrievedChunk, Retriever
    from ragpt.serving.pipeline import Pipeline


# ---------------------------------------------------------------------- what goes in and comes out


@dataclass
class ChatRequest:
    """One question as any surface hands it in."""

    question: str
    department: str
    history: Sequence[Turn] = ()  # earlier turns, oldest first
    system: str | None = None  # the client's system text (appended to the department's system turn)
    prompt: str = "active"  # "active", "none" or a registry version such as "v3"
    overrides: Mapping[str, Any] | None = None  # input-contract fields to change (InputContract.apply)
    filters: dict | None = None  # metadata filters inside the department (source, title, doc_sha256)
    retrieve: bool = True  # False: no passages ("no documents found", or the client's system text)
    max_new_tokens: int | None = None  # None: settings.max_new_tokens
    temperature: float | None = None  # None: settings.temperature
    # An explicit tensor instead of a registry version (evaluation methods, experiments), reported
    # as `prompt_label`.
    soft_prompt: torch.Tensor | None = None
    prompt_label: str | None = None
    # Build with this contract instead of the version's (or, without a prompt, the settings'): for
    # example no prompt with a version's inputs, for a paired comparison.
    contract: InputContract | None = None
    # Search with this registry version's query adapter (when the contract uses one) although the
    # answer uses another prompt or none: the no-prompt side of such a comparison.
    query_adapter_of: str | None = None


SNIPPET_CHARS = 240


@dataclass
class Citation:
    source: str
    title: str
    chunk: int
    score: float
    start: int
    end: int
    snippet: str = ""  # the passage's first SNIPPET_CHARS characters, for showing under an answer

    @classmethod
    def from_hit(cls, hit: RetrievedChunk) -> Citation:
        c = hit.chunk
        return cls(source=c.source, title=c.title, chunk=c.chunk, score=round(hit.score, 6), start=c.start, end=c.end,
                   snippet=c.text[:SNIPPET_CHARS])


@dataclass
class Answer:
    text: str
    citations: list[Citation]  # the passages that were in the prompt, in rank order
    department: str
    prompt_version: str | None = None
    finish_reason: str = "stop"  # OpenAI's: "stop" (end token or a loop stopped, see stopped_by) or "length"
    stopped_by: str | None = None  # "end_token", "repetition" (ragpt.lm.repetition), None at the length limit
    usage: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    contract: dict = field(default_factory=dict)  # the input contract this answer was built with
    contract_overrides: dict = field(default_factory=dict)  # fields that differ from the version's contract
    history_turns: int = 0  # earlier turns that fitted the history budget

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PreparedRequest:
    """Everything fixed before the first token. The scheduler runs it; it never formats a prompt."""

    request: ChatRequest
    department: str
    prompt_version: str | None
    soft_prompt: torch.Tensor | None
    prefix_key: Hashable | None  # where the soft prompt's KV lives in the generator's prefix cache
    contract: InputContract
    overrides: dict
    query: str  # what was retrieved with
    hits: list[RetrievedChunk]
    built: BuiltPrompt
    max_new_tokens: int
    temperature: float
    prepare_s: float = 0.0

    @property
    def ids(self) -> list[int]:
        return self.built.ids

    @property
    def prompt_tokens(self) -> int:
        """Positions the model attends to before the answer: soft-prompt positions included."""
        return len(self.built.ids) + (0 if self.soft_prompt is None else int(self.soft_prompt.shape[-2]))

    @property
    def citations(self) -> list[Citation]:
        return [Citation.from_hit(h) for h in self.hits[: self.built.passages]]


# ---------------------------------------------------------------------- prepare, in two halves


def passages_from_hits(hits: Sequence[RetrievedChunk]) -> list[ContextPassage]:
    return [ContextPassage(text=h.chunk.text, source=h.chunk.source, title=h.chunk.title) for h in hits]


def retrieve_many(retriever: Retriever, queries: Sequence[str], departments: Sequence[str], contract: InputContract,
                  filters: Sequence[dict | None] | None = None,
                  adapters: Sequence[QueryAdapter | None] | None = None) -> list[list[RetrievedChunk]]:
    """Top-k for each query inside its department, with the contract's k and retrieval mode; a
    query with a query adapter (one per query, or None) is searched with its mapped embedding."""
    vectors = None
    if contract.dense and adapters is not None and any(a is not None for a in adapters):
        if len(adapters) != len(queries):
            raise ValueError("one query adapter (or None) per query expected")
        for q in queries:
            if not isinstance(q, str) or not q.strip():
                raise EmptyQuestionError("the question is empty")
        vectors = retriever.embedder.encode(list(queries))
        vectors = np.stack([v if a is None else a.apply(v[None])[0] for v, a in zip(vectors, adapters)])
    return retriever.search_many(list(queries), list(departments), contract.k, list(filters or [None] * len(queries)),
                                 query_vectors=vectors, dense=contract.dense, bm25=contract.bm25, rrf_k=contract.rrf_k)


def build_inputs(tokenizer, contract: InputContract, question: str, passages: Sequence[ContextPassage], *,
                 department: str, history: Sequence[Turn] = (), system: str | None = None,
                 window: int | None = None) -> BuiltPrompt:
    """The input builder under the contract's budgets; `window` (the model's positions left for the
    prompt, after the answer and the soft prompt) caps the prompt budget."""
    budget = contract.max_context_tokens if window is None else min(contract.max_context_tokens, window)
    if budget < 1:
        raise RagptError(f"no room for a prompt: the model's window leaves {window} positions")
    return build_prompt(tokenizer, question, passages, department=department, history=history, system=system,
                        max_prompt_tokens=budget, max_question_tokens=contract.max_question_tokens,
                        max_history_tokens=contract.max_history_tokens)


class _Resolved(NamedTuple):
    soft: Any  # the soft-prompt tensor, or None
    version: str | None
    contract: InputContract  # the one used: the version's (or given) with the overrides applied
    overrides: dict  # the fields that differ from the version's contract
    query: str  # what to retrieve with
    adapter: Any = None  # the version's query adapter, when its contract uses one


def _resolve(pipeline: Pipeline, req: ChatRequest) -> _Resolved:
    """The prompt version, its contract with the caller's overrides, and the retrieval query of one request."""
    if not isinstance(req.question, str) or not req.question.strip():
        raise EmptyQuestionError("the question is empty")
    pipeline.index.check_department(req.department)
    registry_version = None  # the version whose query adapter the search may use
    if req.soft_prompt is not None:
        soft, version, base = req.soft_prompt, req.prompt_label, pipeline.default_contract
    else:
        soft, version, base = pipeline.resolve(req.department, req.prompt)
        registry_version = version
    if req.query_adapter_of is not None:
        registry_version = req.query_adapter_of
    if req.contract is not None:
        base = req.contract
    used, diff = base.apply(req.overrides)
    adapter = pipeline.query_adapter(req.department, registry_version) if used.query_adapter else None
    if used.query_adapter and adapter is None:
        # A contract that uses an adapter, on a request with no version to take it from (an explicit
        # tensor, no prompt without query_adapter_of): searched without one, and the answer says so.
        used = replace(used, query_adapter=False)
        diff = {**diff, "query_adapter": {"contract": True, "used": False}}
    return _Resolved(soft, version, used, diff, retrieval_query(req.question, req.history, used.query_rule), adapter)


def prepare_many(pipeline: Pipeline, requests: Sequence[ChatRequest]) -> list[PreparedRequest | Exception]:
    """Prepare several requests (any departments, versions, contracts); one embedder batch per
    retrieval mode. A request that cannot be prepared gets its own exception; the others go on."""
    t0 = time.perf_counter()
    out: list[PreparedRequest | Exception | None] = [None] * len(requests)
    resolved: dict[int, _Resolved] = {}
    for i, req in enumerate(requests):
        try:
            resolved[i] = _resolve(pipeline, req)
        except Exception as e:  # noqa: BLE001 - the request's own error, raised to its caller
            out[i] = e
    hits = _retrieve_groups(pipeline, requests, resolved, out)
    gen = pipeline.generator
    for i, r in resolved.items():
        if out[i] is not None:
            continue
        req = requests[i]
        try:
            max_new = req.max_new_tokens or pipeline.settings.max_new_tokens
            n_soft = 0 if r.soft is None else int(gen.check_soft_prompt(r.soft).shape[-2])
            window = None if gen.max_positions is None else gen.max_positions - max_new - n_soft
            built = build_inputs(gen.tokenizer, r.contract, req.question, passages_from_hits(hits[i]),
                                 department=req.department, history=req.history, system=req.system, window=window)
            out[i] = PreparedRequest(
                request=req, department=req.department, prompt_version=r.version, soft_prompt=r.soft,
                prefix_key=pipeline.prefix_key(req.department, r.version, r.soft), contract=r.contract,
                overrides=r.overrides, query=r.query, hits=hits[i], built=built, max_new_tokens=max_new,
                temperature=pipeline.settings.temperature if req.temperature is None else req.temperature,
                prepare_s=round(time.perf_counter() - t0, 4),
            )
        except Exception as e:  # noqa: BLE001
            out[i] = e
    return out  # type: ignore[return-value]


def _retrieve_groups(pipeline: Pipeline, requests: Sequence[ChatRequest], resolved: dict[int, _Resolved],
                     out: list) -> dict[int, list]:
    """Hits per request: one search batch per (k, retrieval mode); a failing batch is retried one by one
    so that only the request at fault fails."""
    hits: dict[int, list] = {i: [] for i in resolved}
    groups: dict[tuple, list[int]] = {}
    for i, r in resolved.items():
        if requests[i].retrieve:
            groups.setdefault((r.contract.k, r.contract.dense, r.contract.bm25, r.contract.rrf_k), []).append(i)
    for members in groups.values():
        contract = resolved[members[0]].contract
        try:
            found = retrieve_many(pipeline.retriever, [resolved[i].query for i in members],
                                  [requests[i].department for i in members], contract,
                                  [requests[i].filters for i in members], [resolved[i].adapter for i in members])
            hits.update(zip(members, found))
        except Exception:  # noqa: BLE001 - find which request is at fault
            for i in members:
                try:
                    hits[i] = retrieve_many(pipeline.retriever, [resolved[i].query], [requests[i].department],
                                            contract, [requests[i].filters], [resolved[i].adapter])[0]
                except Exception as e:  # noqa: BLE001
                    out[i] = e
    return hits


def prepare(pipeline: Pipeline, request: ChatRequest) -> PreparedRequest:
    (p,) = prepare_many(pipeline, [request])
    if isinstance(p, Exception):
        raise p
    return p


# ---------------------------------------------------------------------- generate and finish


class RowDecoder:
    """One prepared request being generated: collects its tokens, streams text, finishes the answer."""

    def __init__(self, prepared: PreparedRequest, generator: Generator, *, stream: bool = False):
        self.prepared = prepared
        self.stop_ids = generator.stop_ids
        self.tokenizer = generator.tokenizer
        self.tokens: list[int] = []
        self.done = False
        self.timings: dict[str, float] = {}  # a scheduler's own (queue time); the answer reports them
        self._t0 = time.perf_counter()
        self._text = Detokenizer(generator.tokenizer, generator.stop_ids) if stream else None
        self._guard = generator.repetition_guard()
        self.looped = False

    def push(self, token: int) -> str:
        """Add the row's next token; returns the new text piece (always "" unless streaming)."""
        if not self.tokens:
            self.timings["first_token_s"] = round(time.perf_counter() - self._t0, 4)
        self.tokens.append(token)
        self.looped = self._guard is not None and token not in self.stop_ids and self._guard.push(token)
        if token in self.stop_ids or len(self.tokens) >= self.prepared.max_new_tokens or self.looped:
            self.done = True
        return self._text.push(token) if self._text is not None else ""

    def rest(self) -> str:
        """The text the streamed pieces have not covered yet (call once, at the end)."""
        return self._text.finish() if self._text is not None else ""

    def answer(self, **timings: Any) -> Answer:
        """The stop rule (the end token ends the answer and is not text), text, citations, usage."""
        p = self.prepared
        stopped = bool(self.tokens) and self.tokens[-1] in self.stop_ids
        body = self.tokens[:-1] if stopped else self.tokens
        n_in, n_out = p.prompt_tokens, len(self.tokens)
        return Answer(
            text=self.tokenizer.decode(body, skip_special_tokens=True).strip(),
            citations=p.citations, department=p.department, prompt_version=p.prompt_version,
            finish_reason="stop" if stopped or self.looped else "length",
            stopped_by="end_token" if stopped else "repetition" if self.looped else None,
            usage={"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out},
            timings={"prepare_s": p.prepare_s, "generate_s": round(time.perf_counter() - self._t0, 4),
                     **self.timings, **timings},
            contract=p.contract.to_dict(), contract_overrides=p.overrides, history_turns=p.built.history,
        )


def decode(generator: Generator, rows: Sequence[PreparedRequest], *, seed: int | None = None
           ) -> Iterator[list[int | None]]:
    """`Generator.stream` over prepared rows: per step, each row's new token (None once finished)."""
    return generator.stream([r.ids for r in rows], [r.soft_prompt for r in rows],
                            max_new_tokens=[r.max_new_tokens for r in rows],
                            temperature=[r.temperature for r in rows], seed=seed,
                            prefix_keys=[r.prefix_key for r in rows])


def generate_answers(generator: Generator, rows: Sequence[PreparedRequest], *, seed: int | None = None
                     ) -> list[Answer]:
    """Answer prepared rows in one batched generation."""
    if not rows:
        return []
    decoders = [RowDecoder(r, generator) for r in rows]
    steps = decode(generator, rows, seed=seed)
    try:
        for step in steps:
            for d, tok in zip(decoders, step):
                if tok is not None and not d.done:
                    d.push(tok)
    finally:
        steps.close()
    return [d.answer() for d in decoders]


def stream_answer(generator: Generator, row: PreparedRequest, *, seed: int | None = None) -> Iterator[str | Answer]:
    """Text pieces of one answer as they are generated, then the `Answer` (its text = the pieces joined)."""
    d = RowDecoder(row, generator, stream=True)
    steps = decode(generator, [row], seed=seed)
    try:
        for (tok,) in steps:
            if tok is not None and not d.done and (piece := d.push(tok)):
                yield piece
    finally:
        steps.close()  # a consumer that stops early stops the forward passes too
    if tail := d.rest():
        yield tail
    yield d.answer()
