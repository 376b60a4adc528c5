"""Cross-department micro-batching: a scheduler over prepared requests.

Requests (`ChatJob`: a `ChatRequest` and the pipeline it is for) are queued; one worker thread
gathers them for at most `max_wait_ms` after the oldest arrived (or until `max_batch_size` are
waiting), prepares them with the one request path (`ragpt.serving.request.prepare_many`), runs
one `decode` over the rows, in which each row carries its own department's soft prompt from the
prefix KV cache, and finishes each row with `RowDecoder`. It never formats a prompt. The worker
is a thread so that an asyncio server's event loop stays free while the model runs; callers talk
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
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch

from ragpt.errors import RagptError
from ragpt.lm.generator import DecodeState, Generator
from ragpt.serving.pipeline import Pipeline
from ragpt.serving.request import Answer, ChatRequest, PreparedRequest, RowDecoder, decode, prepare_many
from ragpt.serving.streaming import LoopChannel

POLICIES = ("mixed", "per_department")


class Overloaded(RagptError):
    """The batcher's queue is full; retry later."""


class BatcherStopped(RagptError):
    """The batcher is not running (not started yet, or shut down)."""


@dataclass
class ChatJob:
    """One request to answer, the pipeline (index, registry) it is for, and whether to stream text deltas."""

    request: ChatRequest
    pipeline: Pipeline
    stream: bool = False

    @property
    def department(self) -> str:
        return self.request.department


class Ticket:
    """The submitter's handle on a job. Await `prepared()`, then iterate `deltas()` or await `answer()`.

    Events are produced by the worker thread and delivered on the submitter's event loop.
    """

    def __init__(self, job: ChatJob, loop: asyncio.AbstractEventLoop):
        self.job = job
        self.enqueued = time.perf_counter()
        self._channel = LoopChannel(loop)
        self._cancelled = self._channel.closed  # set by cancel() too
        self._prepared: PreparedRequest | None = None
        self._answer: Answer | None = None

    # -------------------------------------------------------------- worker side
    def _emit(self, kind: str, payload) -> None:
        self._channel.post(kind, payload)

    # -------------------------------------------------------------- submitter side
    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Stop working on this job (it is skipped if queued, its row ignored if running)."""
        self._cancelled.set()

    async def _next(self):
        kind, payload = await self._channel.get()
        if kind == "error":
            raise payload
        if kind == "prepared":
            self._prepared = payload
        elif kind == "done":
            self._answer = payload
        return kind, payload

    async def prepared(self) -> PreparedRequest:
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


class MicroBatcher:
    """Gathers concurrent `ChatJob`s into batched generations on one worker thread."""

    def __init__(self, generator: Generator, *, max_batch_size: int = 8, max_wait_ms: float = 5.0,
                 max_queue: int = 64, policy: str = "mixed"):
        if max_batch_size < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1 and max_wait_ms >= 0")
        if policy not in POLICIES:
            raise ValueError(f"unknown batching policy {policy!r}; use one of {', '.join(POLICIES)}")
        self.generator = generator
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.policy = policy
        self.stats = BatcherStats()
        self.running_rows = 0  # rows being decoded now (for metrics)
        self.prefilling_rows = 0  # continuous: admitted rows whose prompt is still being run
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
        try:
            rows = self._prepare(batch)
        except Exception as e:  # a bug, not a bad request: fail this batch, keep the worker alive
            for t in batch:
                t._emit("error", e)
            return
        if not rows:
            return
        self.stats.record([d.prepared.department for _, d in rows])
        self.running_rows = len(rows)
        try:
            self._generate(rows)
        except Exception as e:
            for t, d in rows:
                if not d.done:
                    t._emit("error", e)
        finally:
            self.running_rows = 0

    def _prepare(self, batch: list[Ticket]) -> list[tuple[Ticket, RowDecoder]]:
        """The one request path's prepare, one call per pipeline; a job that fails gets its own error.
        Each row's answer reports how long its job waited in the queue."""
        t0 = time.perf_counter()
        by_pipeline: dict[int, list[Ticket]] = {}
        for t in batch:
            by_pipeline.setdefault(id(t.job.pipeline), []).append(t)
        rows = []
        for group in by_pipeline.values():
            for t, p in zip(group, prepare_many(group[0].job.pipeline, [t.job.request for t in group])):
                if isinstance(p, Exception):
                    t._emit("error", p)
                    continue
                d = RowDecoder(p, self.generator, stream=t.job.stream)
                d.timings["queue_s"] = round(t0 - t.enqueued, 4)
                rows.append((t, d))
                t._emit("prepared", p)
        return rows

    def _generate(self, rows: list[tuple[Ticket, RowDecoder]]) -> None:
        steps = decode(self.generator, [d.prepared for _, d in rows])
        try:
            for step in steps:
                for (t, d), tok in zip(rows, step):
                    if tok is None or d.done:
                        continue
                    piece = d.push(tok)
                    if piece and not t.cancelled:
                        t._emit("delta", piece)
                    if d.done:
                        self._finish(t, d, len(rows))
                # Nobody is waiting for the remaining rows: stop spending compute on them.
                if all(d.done or t.cancelled for t, d in rows):
                    break
        finally:
            steps.close()

    @staticmethod
    def _finish(t: Ticket, d: RowDecoder, batch_size: int) -> None:
        """The row's last text piece (when streaming), then its answer."""
        if t.job.stream and (rest := d.rest()):
            t._emit("delta", rest)
        t._emit("done", d.answer(batch_size=batch_size))


@dataclass(eq=False)
class _Prefill:
    """A prepared row whose prompt is being run, possibly in chunks over several steps."""

    ticket: Ticket
    decoder: RowDecoder
    offset: int = 0  # prompt tokens already run
    state: DecodeState | None = None

    @property
    def remaining(self) -> int:
        return len(self.decoder.prepared.ids) - self.offset


# Rows whose prompt is longer decode in a group of their own: one batch pads every row to its longest
# cache, so a near-window prompt among short ones would make every short row attend over its length.
LONG_PROMPT_TOKENS = 2048


@dataclass(eq=False)
class _Group:
    """Rows decoded together; a row that has left stays (as None) until the group is next rebuilt."""

    state: DecodeState | None = None
    rows: list = field(default_factory=list)  # (ticket, decoder) per state row, None once it has left

    @property
    def alive(self) -> list[int]:
        return [i for i, r in enumerate(self.rows) if r is not None]


class ContinuousBatcher(MicroBatcher):
    """Iteration-level scheduling over prepared requests.

    Each step of the worker: admit waiting requests while the batch has room (prepared with the
    one request path), run prompts under a per-step token budget (`max_prefill_tokens`: short
    prompts whole and batched, a long one in chunks, so it never stalls the others for more than
    one chunk per step), add the rows whose prompt is done to the running batch, then give every
    running row its next token. A finished or cancelled row frees its slot at once; its cache rows
    are dropped when the batch is next rebuilt (when rows join, or when half of it has left), so
    that each rebuild copies the cache once. Prompts over `LONG_PROMPT_TOKENS` decode in a group of
    their own. Each row keeps its own department's soft prompt (prefix KV cache), and greedy
    output equals running the request alone.
    """

    def __init__(self, generator: Generator, *, max_batch_size: int = 8, max_queue: int = 64,
                 max_prefill_tokens: int = 1024, max_join_wait_ms: float = 200.0, policy: str = "mixed"):
        super().__init__(generator, max_batch_size=max_batch_size, max_wait_ms=0, max_queue=max_queue,
                         policy=policy)
        if max_prefill_tokens < 1 or max_join_wait_ms < 0:
            raise ValueError("max_prefill_tokens must be >= 1 and max_join_wait_ms >= 0")
        self.max_prefill_tokens = max_prefill_tokens
        # Rows join a running batch a few at a time (each join copies its cache once): when a quarter
        # of the slots are free, or when the oldest waiting request has waited this long.
        self.max_join_wait_s = max_join_wait_ms / 1000.0
        self.steps = 0  # decode steps run (for tests and metrics)

    def _loop(self) -> None:
        groups = {"short": _Group(), "long": _Group()}
        prefilling: deque[_Prefill] = deque()
        while True:
            with self._cond:
                while self._running and not self.running_rows and not prefilling and (
                        self._held or not self._waiting):
                    self._cond.wait()
                if not self._running:
                    break
                room = self.max_batch_size - self.running_rows - len(prefilling)
                admitted = self._admit(room) if room > 0 and not self._held and self._may_join(room) else []
            try:
                if admitted:
                    prefilling.extend(_Prefill(t, d) for t, d in self._prepare(admitted))
                self._join(groups, self._prefill_step(prefilling))
                for g in groups.values():
                    if g.alive:
                        self._decode_step(g)
                self.running_rows = sum(len(g.alive) for g in groups.values())
                self.prefilling_rows = len(prefilling)
            except Exception as e:  # a bug, not a bad request: fail what is in flight, keep the worker alive
                for g in groups.values():
                    for i in g.alive:
                        g.rows[i][0]._emit("error", e)
                for p in prefilling:
                    p.ticket._emit("error", e)
                groups = {"short": _Group(), "long": _Group()}
                prefilling = deque()
                self.running_rows = self.prefilling_rows = 0
        for g in groups.values():
            for i in g.alive:
                g.rows[i][0]._emit("error", BatcherStopped("the service is shutting down"))
        for p in prefilling:
            p.ticket._emit("error", BatcherStopped("the service is shutting down"))

    def _may_join(self, room: int) -> bool:
        if not self._waiting:
            return False
        if not self.running_rows or room >= max(1, self.max_batch_size // 4):
            return True
        return time.perf_counter() - self._waiting[0].enqueued >= self.max_join_wait_s

    def _join(self, groups: dict[str, _Group], ready: list[tuple[DecodeState, list[tuple[Ticket, RowDecoder]]]]
              ) -> None:
        """Add the rows whose prompt is done to their group; rebuild a group (one copy of its cache) when
        rows join it or half of its rows have left."""
        joining: dict[str, list[tuple[DecodeState, list[int], list]]] = {name: [] for name in groups}
        for state, rows in ready:
            for name in groups:
                idx = [i for i, (_, d) in enumerate(rows)
                       if (len(d.prepared.ids) > LONG_PROMPT_TOKENS) == (name == "long")]
                if idx:
                    joining[name].append((state, idx, [rows[i] for i in idx]))
        for name, g in groups.items():
            new = joining[name]
            alive = g.alive
            if not new and not (g.rows and 2 * (len(g.rows) - len(alive)) >= len(g.rows)):
                continue
            parts = ([(g.state, alive)] if alive else []) + [(s, idx) for s, idx, _ in new]
            g.rows = [g.rows[i] for i in alive] + [r for _, _, rows in new for r in rows]
            g.state = self.generator.regroup(parts) if parts else None
            if new:
                self.stats.record([d.prepared.department for _, _, rows in new for _, d in rows])

    def _decode_step(self, g: _Group) -> None:
        """Every running row of the group takes its next token; finished and cancelled rows leave."""
        gen = self.generator
        temps = torch.tensor([0.0 if r is None else r[1].prepared.temperature for r in g.rows], dtype=torch.float32)
        tokens = gen.pick(g.state.logits, temps)
        n_alive = len(g.alive)
        for i, tok in enumerate(tokens.tolist()):
            if g.rows[i] is None:
                continue
            t, d = g.rows[i]
            if t.cancelled:
                g.rows[i] = None
                continue
            piece = d.push(tok)
            if piece:
                t._emit("delta", piece)
            if d.done:
                self._finish(t, d, n_alive)
                g.rows[i] = None
        self.steps += 1
        if not g.alive:
            g.state, g.rows = None, []
            return
        left = torch.tensor([r is None for r in g.rows])
        g.state = gen.advance(g.state, torch.where(left, torch.full_like(tokens, gen.pad_id), tokens))

    def _admit(self, room: int) -> list[Ticket]:
        live = [t for t in self._waiting if not t.cancelled][:room]
        chosen = {id(t) for t in live}
        self._waiting = deque(t for t in self._waiting if id(t) not in chosen and not t.cancelled)
        return live

    def _prefill_step(self, prefilling: deque[_Prefill]) -> list[tuple[DecodeState, list[tuple[Ticket, RowDecoder]]]]:
        """Run prompts within this step's token budget; return (state, rows) of the prompts now complete.

        The budget goes to the prompts with the fewest tokens left first (short prompts start decoding
        soon), except that the oldest prompt, when it is long, keeps half of it (it always progresses).
        Prompts run whole from the start share one batched prefill; the others advance by a chunk."""
        for p in [p for p in prefilling if p.ticket.cancelled]:
            prefilling.remove(p)
        if not prefilling:
            return []
        oldest = prefilling[0]
        reserve = self.max_prefill_tokens // 2 if oldest.remaining > self.max_prefill_tokens // 2 else 0
        left = self.max_prefill_tokens - reserve
        plan: dict[int, int] = {}  # id(prefill) -> tokens this step
        for p in sorted(prefilling, key=lambda p: p.remaining):
            if left <= 0:
                break
            if p is oldest and reserve:
                continue
            plan[id(p)] = min(p.remaining, left)
            left -= plan[id(p)]
        if reserve:
            plan[id(oldest)] = min(oldest.remaining, reserve + left)
        gen = self.generator
        ready = []
        whole = [p for p in prefilling if id(p) in plan and p.offset == 0 and plan[id(p)] == p.remaining]
        if whole:
            rows = [p.decoder.prepared for p in whole]
            state = gen.prefill([r.ids for r in rows], [r.soft_prompt for r in rows], [r.prefix_key for r in rows])
            ready.append((state, [(p.ticket, p.decoder) for p in whole]))
            for p in whole:
                p.offset = len(p.decoder.prepared.ids)
        for p in [p for p in prefilling if id(p) in plan and p.remaining > 0]:
            r = p.decoder.prepared
            piece = r.ids[p.offset:p.offset + plan[id(p)]]
            if p.offset == 0:
                p.state = gen.prefill([piece], [r.soft_prompt], [r.prefix_key])
            else:
                p.state = gen.extend(p.state, piece)
            p.offset += len(piece)
            if p.remaining == 0:
                ready.append((p.state, [(p.ticket, p.decoder)]))
        for p in [p for p in prefilling if p.remaining == 0]:
            prefilling.remove(p)
        return ready
