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
from ragpt.lm.generator import Generator
from ragpt.lm.packed import RowKV, Segment
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
class _Row:
    """An admitted request: its KV storage, how much of its prompt has run, the token it feeds next."""

    ticket: Ticket
    decoder: RowDecoder
    kv: RowKV
    embeds: torch.Tensor | None  # a soft prompt run inline, before the ids (None once run, or none)
    long: bool = False  # its prompt is over the step budget: it runs in chunks
    offset: int = 0  # prompt ids already run
    next_token: int | None = None  # decoding: the token to feed in the next step

    @property
    def remaining(self) -> int:
        """Prompt positions still to run (0: the row decodes)."""
        inline = 0 if self.embeds is None else int(self.embeds.shape[0])
        return inline + len(self.decoder.prepared.ids) - self.offset


# The smallest chunk a long prompt advances by while other rows decode (so it always progresses).
MIN_LONG_CHUNK = 16


class StepTimes:
    """Measured seconds of decode-only steps by the number of rows, and of prompt positions, to size a
    long prompt's chunks and to predict the service's speed at loads not seen yet."""

    def __init__(self, alpha: float = 0.2):
        self.alpha = alpha
        self.by_rows: dict[int, float] = {}
        self.prompt_s: float | None = None  # seconds per prompt position, beyond the decode rows' step

    def _ewma(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.alpha) * old + self.alpha * new

    def observe(self, rows: int, seconds: float) -> None:
        self.by_rows[rows] = self._ewma(self.by_rows.get(rows), seconds)

    def observe_prompt(self, positions: int, seconds: float) -> None:
        if positions > 0 and seconds > 0:
            self.prompt_s = self._ewma(self.prompt_s, seconds / positions)

    def estimate(self, rows: int) -> float | None:
        """The measured time at this row count, else at the nearest one measured (None: none yet)."""
        if rows in self.by_rows:
            return self.by_rows[rows]
        if not self.by_rows:
            return None
        nearest = min(self.by_rows, key=lambda r: (abs(r - rows), r))
        return self.by_rows[nearest]

    def predict(self, rows: int) -> float | None:
        """A decode step's seconds with `rows` rows: measured, or on the straight line through the
        measured row counts (a step reads the weights once and adds about the same per row)."""
        if rows in self.by_rows or len(self.by_rows) < 2:
            return self.estimate(rows)
        xs, ys = list(self.by_rows), list(self.by_rows.values())
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        var = sum((x - mx) ** 2 for x in xs)
        slope = max(0.0, sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var) if var else 0.0
        return max(min(ys), my + slope * (rows - mx))


class ContinuousBatcher(MicroBatcher):
    """Iteration-level scheduling over prepared requests, on the packed engine (`ragpt.lm.packed`).

    Each step is one packed forward: every running row's next token, and prompt positions under a
    per-step budget (`max_prefill_tokens`). A waiting request is admitted (prepared with the one
    request path) as soon as a row is free; its prompt joins the next step whole when it fits the
    budget (shortest first), so short requests start decoding at once. A prompt longer than the
    budget runs in chunks, one such prompt per step (the one closest to done; every other step the
    oldest, which so always progresses), in steps without a whole prompt. While other rows decode,
    chunks are sized from measured step times to cost about one decode step and run only as often
    as keeps steps at `long_prompt_slowdown` times a decode step on average (a time credit); with
    nothing decoding a chunk is a quarter of the budget (a request arriving then waits at most
    that). A finished or
    cancelled row leaves at once and its storage is dropped; nothing else is copied. Each row keeps
    its own department's soft prompt (prefix KV cache), and greedy output equals the request alone.
    """

    def __init__(self, generator: Generator, *, max_batch_size: int = 8, max_queue: int = 64,
                 max_prefill_tokens: int = 512, long_prompt_slowdown: float = 1.3, policy: str = "mixed"):
        super().__init__(generator, max_batch_size=max_batch_size, max_wait_ms=0, max_queue=max_queue,
                         policy=policy)
        if generator.engine is None:
            raise ValueError("continuous batching needs the packed engine (decode_engine auto or packed, and a "
                             "model with a plain KV cache and SDPA or eager attention); use scheduler = static")
        if max_prefill_tokens < MIN_LONG_CHUNK or long_prompt_slowdown <= 1.0:
            raise ValueError(f"max_prefill_tokens must be >= {MIN_LONG_CHUNK} and long_prompt_slowdown > 1")
        self.max_prefill_tokens = max_prefill_tokens
        self.long_prompt_slowdown = long_prompt_slowdown
        self.steps = 0  # packed steps run (for tests and metrics)
        self.step_times = StepTimes()
        self._long_chunk = max(MIN_LONG_CHUNK, max_prefill_tokens // 8)
        # Seconds of step time a long prompt may still take beside decoding rows: each step with
        # decoding rows adds (long_prompt_slowdown - 1) x its decode time, each chunk spends what it
        # cost. A chunk runs only when it is not in debt, so over time steps take at most
        # long_prompt_slowdown times a decode step, however little a chunk can be made to cost.
        self._credit = 0.0

    def _loop(self) -> None:
        rows: list[_Row] = []
        while True:
            with self._cond:
                while self._running and not rows and (self._held or not self._waiting):
                    self._cond.wait()
                if not self._running:
                    break
                room = self.max_batch_size - len(rows)
                admitted = self._admit(room) if room > 0 and not self._held and self._waiting else []
            try:
                if admitted:
                    rows.extend(self._start(admitted))
                rows = [r for r in rows if not r.ticket.cancelled]
                if rows:
                    rows = self._step(rows)
                self.running_rows = sum(1 for r in rows if not r.remaining)
                self.prefilling_rows = len(rows) - self.running_rows
            except Exception as e:  # a bug, not a bad request: fail what is in flight, keep the worker alive
                for r in rows:
                    r.ticket._emit("error", e)
                rows = []
                self.running_rows = self.prefilling_rows = 0
        for r in rows:
            r.ticket._emit("error", BatcherStopped("the service is shutting down"))

    def _admit(self, room: int) -> list[Ticket]:
        live = [t for t in self._waiting if not t.cancelled][:room]
        chosen = {id(t) for t in live}
        self._waiting = deque(t for t in self._waiting if id(t) not in chosen and not t.cancelled)
        return live

    def _start(self, admitted: list[Ticket]) -> list[_Row]:
        out = []
        for t, d in self._prepare(admitted):
            p = d.prepared
            try:
                kv, embeds = self.generator.start_row(len(p.ids), p.soft_prompt, p.prefix_key, p.max_new_tokens)
            except Exception as e:  # noqa: BLE001 - this request's soft prompt, not the batch
                t._emit("error", e)
                continue
            row = _Row(t, d, kv, embeds)
            row.long = row.remaining > self.max_prefill_tokens
            out.append(row)
        if out:
            self.stats.record([r.decoder.prepared.department for r in out])
        return out

    def _plan(self, rows: list[_Row]) -> list[tuple[_Row, Segment]]:
        """This step's segments: every decoding row's token, then prompt positions within the budget."""
        plan = [(r, Segment(r.kv, [r.next_token])) for r in rows if not r.remaining]
        decoding = len(plan)
        left = self.max_prefill_tokens
        prompts = sorted((r for r in rows if r.remaining), key=lambda r: r.remaining)
        for r in prompts:  # whole prompts, shortest first
            if not r.long and r.remaining <= left:
                plan.append((r, self._prompt_segment(r, r.remaining)))
                left -= r.remaining
        if len(plan) == decoding:  # no whole prompt this step: maybe a chunk of one long prompt
            longs = [r for r in rows if r.long and r.remaining]
            # Until a decode-only step has been measured, every other step leaves the chunk out (to measure one).
            known = self.step_times.estimate(decoding) is not None
            if longs and (not decoding or (self._credit >= 0 if known else self.steps % 2 == 0)):
                # the one closest to done; every other step the oldest, so that it always progresses
                long = longs[0] if self.steps % 2 else min(longs, key=lambda r: r.remaining)
                cap = self._long_chunk if decoding else self.max_prefill_tokens // 4
                plan.append((long, self._prompt_segment(long, min(long.remaining, cap))))
        return plan

    @staticmethod
    def _prompt_segment(r: _Row, n: int) -> Segment:
        """The next `n` prompt positions of `r` (its inline soft prompt first); logits if they end it."""
        embeds = r.embeds
        n_ids = n - (0 if embeds is None else int(embeds.shape[0]))
        if n_ids < 0:  # a chunk never splits the inline vectors: they run together
            n_ids = 0
        ids = r.decoder.prepared.ids[r.offset:r.offset + n_ids]
        return Segment(r.kv, ids, embeds, logits=(n_ids == len(r.decoder.prepared.ids) - r.offset))

    def _step(self, rows: list[_Row]) -> list[_Row]:
        """Run one packed step; rows that finished leave. Returns the rows still in flight."""
        plan = self._plan(rows)
        if not plan:
            return rows
        decoding = sum(1 for r, _ in plan if not r.remaining)
        prompt_positions = sum(s.size for r, s in plan if r.remaining)
        long_chunk = any(r.long and r.remaining for r, _ in plan)
        t0 = time.perf_counter()
        logits = self.generator.engine.step([s for _, s in plan])
        elapsed = time.perf_counter() - t0
        self.steps += 1
        self._learn(decoding, prompt_positions, long_chunk, elapsed)
        wanted = []
        for r, seg in plan:
            if r.remaining:  # a prompt segment
                r.embeds = None
                r.offset += len(seg.ids)
            if seg.logits:
                wanted.append(r)
        if wanted:
            temps = torch.tensor([r.decoder.prepared.temperature for r in wanted], dtype=torch.float32)
            tokens = self.generator.pick(logits, temps).tolist()
            n_rows = len(rows)
            for r, tok in zip(wanted, tokens):
                t, d = r.ticket, r.decoder
                piece = d.push(tok)
                if piece and not t.cancelled:
                    t._emit("delta", piece)
                if d.done:
                    self._finish(t, d, n_rows)
                else:
                    r.next_token = tok
        return [r for r in rows if not r.decoder.done and not r.ticket.cancelled]

    def _learn(self, decoding: int, prompt_positions: int, long_chunk: bool, elapsed: float) -> None:
        """Decode-only steps teach the step time. Beside decoding rows, a step adds to the long prompts'
        time credit and a step with a long prompt's chunk spends what the chunk cost; the next chunk
        is resized so that it costs about one decode step."""
        if decoding and not prompt_positions:
            self.step_times.observe(decoding, elapsed)
        base = self.step_times.estimate(decoding) if decoding else 0.0
        if base is None:
            return
        if prompt_positions and not long_chunk:  # whole prompts: their cost per position
            self.step_times.observe_prompt(prompt_positions, elapsed - base)
        if not decoding:
            return
        self._credit = min(base, self._credit + (self.long_prompt_slowdown - 1.0) * base)
        if long_chunk:
            extra = max(0.0, elapsed - base)
            self._credit = max(-60.0, self._credit - extra)
            factor = 2.0 if extra <= 0 else min(2.0, max(0.5, base / extra))
            self._long_chunk = int(min(self.max_prefill_tokens,
                                       max(MIN_LONG_CHUNK, round(self._long_chunk * factor))))

    # -------------------------------------------------------------- capacity (for admission)
    def row_seconds(self, prompt_positions: float, new_tokens: float, rows: int) -> float | None:
        """Seconds a request takes once it has a row, with `rows` rows running: its prompt, then a
        decode step per further token, each step also carrying the prompts of rows that join
        meanwhile (one for each of the other rows, as they turn over). None before measurements."""
        step, prompt_s = self.step_times.predict(max(1, rows)), self.step_times.prompt_s
        if step is None or prompt_s is None:
            return None
        return prompt_positions * prompt_s * max(1, rows) + max(0.0, new_tokens - 1) * step

    def work_seconds(self, prompt_positions: float, new_tokens: float) -> float | None:
        """Seconds of the worker's time one request costs when every row is busy: its prompt and its
        share of the decode steps (the service answers one such request per this many seconds)."""
        step, prompt_s = self.step_times.predict(self.max_batch_size), self.step_times.prompt_s
        if step is None or prompt_s is None:
            return None
        return prompt_positions * prompt_s + max(1.0, new_tokens) * step / self.max_batch_size
