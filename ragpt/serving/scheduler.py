"""Cross-department micro-batching: concurrent requests share one batched generation.

Requests (`ChatJob`) are queued; one worker thread gathers them for at most `max_wait_ms`
after the oldest arrived (or until `max_batch_size` are waiting), then answers them together:
one retrieval batch per pipeline, one `Generator.stream` call in which each row carries its
own department's soft prompt, taken from the generator's prefix KV cache. The worker is a
thread so that an asyncio server's event loop stays free while the model runs; callers talk
to it through a `Ticket`, whose events (prepared, text deltas, answer) arrive on their loop.

Policies: "mixed" puts any departments in one batch (the point of per-row soft prompts);
"per_department" batches only requests of one department (what one model copy per
department, or a server without per-row prompts, could do). `max_batch_size=1` is one
request at a time. The benchmark compares the three.

A batch runs until its last row finishes; requests arriving meanwhile wait for the next one
(no admission into a running batch). The queue is bounded: `submit` raises `Overloaded`
instead of letting latency grow without limit.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import torch

from ragpt.errors import RagptError
from ragpt.lm.generator import Generator
from ragpt.lm.template import Turn, build_prompt_ids
from ragpt.retrieval.search import RetrievedChunk
from ragpt.serving.pipeline import Answer, Citation, Pipeline, passages_from_hits
from ragpt.softprompts.deep import prompt_tokens

POLICIES = ("mixed", "per_department")


class Overloaded(RagptError):
    """The batcher's queue is full; retry later."""


class BatcherStopped(RagptError):
    """The batcher is not running (not started yet, or shut down)."""


@dataclass
class ChatJob:
    """One question to answer: what `Pipeline.ask` takes, plus whether to stream text deltas."""

    question: str
    department: str
    pipeline: Pipeline
    history: Sequence[Turn] = ()
    prompt: str = "active"  # "active", "none" or a registry version such as "v3"
    k: int | None = None
    max_new_tokens: int | None = None
    temperature: float | None = None
    stream: bool = False


@dataclass
class Prepared:
    """What is fixed before generation starts: the prompt version, the citations, the prompt size."""

    department: str
    prompt_version: str | None
    citations: list[Citation]
    prompt_tokens: int  # including soft-prompt positions


class Ticket:
    """The submitter's handle on a job. Await `prepared()`, then iterate `deltas()` or await `answer()`.

    Events are produced by the worker thread and delivered on the submitter's event loop.
    """

    def __init__(self, job: ChatJob, loop: asyncio.AbstractEventLoop):
        self.job = job
        self.enqueued = time.perf_counter()
        self._loop = loop
        self._events: asyncio.Queue = asyncio.Queue()
        self._cancelled = threading.Event()
        self._prepared: Prepared | None = None
        self._answer: Answer | None = None

    # -------------------------------------------------------------- worker side
    def _emit(self, kind: str, payload) -> None:
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, (kind, payload))
        except RuntimeError:  # the submitter's loop is closed: nobody is listening any more
            self._cancelled.set()

    # -------------------------------------------------------------- submitter side
    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Stop working on this job (it is skipped if queued, its row ignored if running)."""
        self._cancelled.set()

    async def _next(self):
        kind, payload = await self._events.get()
        if kind == "error":
            raise payload
        if kind == "prepared":
            self._prepared = payload
        elif kind == "done":
            self._answer = payload
        return kind, payload

    async def prepared(self) -> Prepared:
        """Wait until retrieval and prompt resolution are done (errors of this job are raised here)."""
        while self._prepared is None:
            await self._next()
        return self._prepared

    async def deltas(self) -> AsyncIterator[str]:
        """Text as it is generated (needs `job.stream`); afterwards `answer()` returns at once."""
        await self.prepared()
        while self._answer is None:
            kind, payload = await self._next()
            if kind == "delta":
                yield payload

    async def answer(self) -> Answer:
        await self.prepared()
        while self._answer is None:
            await self._next()
        return self._answer


class TextStream:
    """Incremental detokenisation whose pieces concatenate to the final answer text.

    The answer is `decode(tokens).strip()`; pieces are emitted only up to the last
    non-whitespace character, and never while a multi-byte character is incomplete.
    """

    def __init__(self, tokenizer, stop_ids: set[int]):
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids
        self.tokens: list[int] = []
        self.sent = ""

    def push(self, token: int) -> str:
        if token in self.stop_ids:
            return ""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True).strip()
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return ""
        piece, self.sent = text[len(self.sent):], text
        return piece

    def rest(self, final_text: str) -> str:
        """Whatever of the final text has not been sent yet."""
        if not final_text.startswith(self.sent):
            return ""
        piece, self.sent = final_text[len(self.sent):], final_text
        return piece


@dataclass
class BatcherStats:
    batches: int = 0
    rows: int = 0
    batch_sizes: list[int] = field(default_factory=list)  # of the most recent batches
    departments: list[list[str]] = field(default_factory=list)  # per recent batch, in row order

    def record(self, departments: list[str], keep: int = 256) -> None:
        self.batches += 1
        self.rows += len(departments)
        self.batch_sizes = (self.batch_sizes + [len(departments)])[-keep:]
        self.departments = (self.departments + [departments])[-keep:]


@dataclass
class _Row:
    ticket: Ticket
    ids: list[int]
    soft: torch.Tensor | None
    prefix_key: tuple | None
    prepared: Prepared
    max_new: int
    temperature: float
    text: TextStream | None
    tokens: list[int] = field(default_factory=list)
    done: bool = False


class MicroBatcher:
    """Gathers concurrent `ChatJob`s into batched generations on one worker thread."""

    def __init__(self, generator: Generator, *, max_batch_size: int = 8, max_wait_ms: float = 5.0,
                 max_queue: int = 64, policy: str = "mixed", prefix_cache: bool = True):
        if max_batch_size < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1 and max_wait_ms >= 0")
        if policy not in POLICIES:
            raise ValueError(f"unknown batching policy {policy!r}; use one of {', '.join(POLICIES)}")
        self.generator = generator
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.policy = policy
        self.prefix_cache = prefix_cache
        self.stats = BatcherStats()
        self._waiting: deque[Ticket] = deque()
        self._cond = threading.Condition()
        self._held = False
        self._running = False
        self._thread: threading.Thread | None = None

    # -------------------------------------------------------------- lifecycle
    def start(self) -> None:
        with self._cond:
            if self._running:
                return
            self._running = True
        self._thread = threading.Thread(target=self._loop, name="ragpt-batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking batches; queued jobs fail with BatcherStopped. Waits for the running batch."""
        with self._cond:
            self._running = False
            left = list(self._waiting)
            self._waiting.clear()
            self._cond.notify_all()
        for t in left:
            t._emit("error", BatcherStopped("the service is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._running

    def hold(self) -> None:
        """Take no new batch until `release()` (requests keep queueing): for draining or maintenance."""
        with self._cond:
            self._held = True

    def release(self) -> None:
        with self._cond:
            self._held = False
            self._cond.notify_all()

    @property
    def queued(self) -> int:
        return len(self._waiting)

    # -------------------------------------------------------------- submission (event loop side)
    def submit(self, job: ChatJob) -> Ticket:
        """Queue a job; call from a running event loop. Raises Overloaded when the queue is full."""
        if job.pipeline.generator is not self.generator:
            raise ValueError("the job's pipeline must use the batcher's generator")
        ticket = Ticket(job, asyncio.get_running_loop())
        with self._cond:
            if not self._running:
                raise BatcherStopped("the batcher is not running")
            if len(self._waiting) >= self.max_queue:
                raise Overloaded(f"{len(self._waiting)} requests are already waiting (limit {self.max_queue})")
            self._waiting.append(ticket)
            self._cond.notify_all()
        return ticket

    # -------------------------------------------------------------- worker
    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            if batch:
                self._run(batch)

    def _take_batch(self) -> list[Ticket] | None:
        with self._cond:
            while self._running and (self._held or not self._waiting):
                self._cond.wait()
            if not self._running:
                return None
            # Gather: wait for a full batch, but never longer than max_wait after the oldest arrival.
            deadline = self._waiting[0].enqueued + self.max_wait_s
            while self._running and not self._held and len(self._waiting) < self.max_batch_size:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            if not self._running or self._held:
                return [] if self._running else None
            return self._select()

    def _select(self) -> list[Ticket]:
        """Remove and return the next batch from the queue (cancelled jobs are dropped)."""
        live = [t for t in self._waiting if not t.cancelled]
        if not live:
            self._waiting.clear()
            return []
        if self.policy == "per_department":
            dept = live[0].job.department
            live = [t for t in live if t.job.department == dept]
        batch = live[: self.max_batch_size]
        chosen = {id(t) for t in batch}
        self._waiting = deque(t for t in self._waiting if id(t) not in chosen and not t.cancelled)
        return batch

    def _run(self, batch: list[Ticket]) -> None:
        t0 = time.perf_counter()
        try:
            rows = self._prepare(batch)
        except Exception as e:  # a bug, not a bad request: fail this batch, keep the worker alive
            for t in batch:
                t._emit("error", e)
            return
        if not rows:
            return
        t1 = time.perf_counter()
        self.stats.record([r.prepared.department for r in rows])
        try:
            self._generate(rows, t0, t1)
        except Exception as e:
            for r in rows:
                if not r.done:
                    r.ticket._emit("error", e)

    def _prepare(self, batch: list[Ticket]) -> list[_Row]:
        """Retrieve (one embedder batch per pipeline and k), resolve prompts, build prompt ids.

        A job whose preparation fails gets its own error; the others go on.
        """
        gen = self.generator
        hits: dict[int, list[RetrievedChunk]] = {}
        groups: dict[tuple[int, int], list[Ticket]] = {}
        for t in batch:
            k = t.job.k or t.job.pipeline.settings.k
            groups.setdefault((id(t.job.pipeline), k), []).append(t)
        for (_, k), group in groups.items():
            retriever = group[0].job.pipeline.retriever
            try:
                found = retriever.search_many([t.job.question for t in group], [t.job.department for t in group], k)
                hits.update({id(t): h for t, h in zip(group, found)})
            except Exception:  # find which job is at fault: retry one by one
                for t in group:
                    try:
                        hits[id(t)] = retriever.search(t.job.question, t.job.department, k)
                    except Exception as e:
                        t._emit("error", e)
        rows = []
        for t in batch:
            if id(t) not in hits:
                continue
            job, pipe = t.job, t.job.pipeline
            try:
                # The version is resolved once, here: the request uses it from start to end.
                soft, version = pipe.resolve_prompt(job.department, job.prompt)
                ids = build_prompt_ids(
                    gen.tokenizer, job.question, passages_from_hits(hits[id(t)]), department=job.department,
                    history=job.history, max_context_tokens=pipe.settings.max_context_tokens,
                )
            except Exception as e:
                t._emit("error", e)
                continue
            n_soft = prompt_tokens(soft)
            prepared = Prepared(department=job.department, prompt_version=version,
                                citations=[Citation.from_hit(h) for h in hits[id(t)]],
                                prompt_tokens=len(ids) + n_soft)
            key = (str(pipe.settings.prompt_dir), job.department, version) \
                if self.prefix_cache and soft is not None else None
            rows.append(_Row(
                ticket=t, ids=ids, soft=soft, prefix_key=key, prepared=prepared,
                max_new=job.max_new_tokens or pipe.settings.max_new_tokens,
                temperature=pipe.settings.temperature if job.temperature is None else job.temperature,
                text=TextStream(gen.tokenizer, gen.stop_ids) if job.stream else None,
            ))
            t._emit("prepared", prepared)
        return rows

    def _generate(self, rows: list[_Row], t0: float, t1: float) -> None:
        gen = self.generator
        steps = gen.stream(
            [r.ids for r in rows], [r.soft for r in rows],
            max_new_tokens=[r.max_new for r in rows], temperature=[r.temperature for r in rows],
            prefix_keys=[r.prefix_key for r in rows],
        )
        try:
            for step in steps:
                for r, tok in zip(rows, step):
                    if tok is None or r.done:
                        continue
                    r.tokens.append(tok)
                    if r.text is not None and not r.ticket.cancelled:
                        piece = r.text.push(tok)
                        if piece:
                            r.ticket._emit("delta", piece)
                    if tok in gen.stop_ids or len(r.tokens) >= r.max_new:
                        self._finish(r, t0, t1, len(rows))
                # Nobody is waiting for the remaining rows: stop spending compute on them.
                if all(r.done or r.ticket.cancelled for r in rows):
                    break
        finally:
            steps.close()

    def _finish(self, r: _Row, t0: float, t1: float, batch_size: int) -> None:
        r.done = True
        gen = self.generator
        stopped = bool(r.tokens) and r.tokens[-1] in gen.stop_ids
        body = r.tokens[:-1] if stopped else r.tokens
        text = gen.tokenizer.decode(body, skip_special_tokens=True).strip()
        if r.text is not None:
            rest = r.text.rest(text)
            if rest:
                r.ticket._emit("delta", rest)
        p = r.prepared
        now = time.perf_counter()
        r.ticket._emit("done", Answer(
            text=text, citations=p.citations, department=p.department, prompt_version=p.prompt_version,
            finish_reason="stop" if stopped else "length",
            usage={"prompt_tokens": p.prompt_tokens, "completion_tokens": len(r.tokens),
                   "total_tokens": p.prompt_tokens + len(r.tokens)},
            timings={"queue_s": round(t0 - r.ticket.enqueued, 4), "prepare_s": round(t1 - t0, 4),
                     "generate_s": round(now - t1, 4), "batch_size": batch_size},
        ))
