"""Admission that tells the truth: a request is taken only if it is expected to finish in its timeout.

The service measures its own speed from the answers it finishes (exponentially weighted moving
averages, `ServiceRate`): the fixed cost of a request (retrieval, prompt and first token), the time
of each further token of a row, the share of `max_tokens` answers actually use, and their prompt
length. With continuous batching the scheduler also measures its steps (`CapacityModel`: a decode
step's time by the number of rows, extrapolated along a line to row counts not seen yet, and the
time per prompt position), which predicts the speed at a load not seen yet, e.g. a burst into a
service measured at small batches. With `q` requests queued ahead and every one of the `slots`
rows busy, a request is then expected to finish after

    estimate = (q + 1) * work + row(own)

where `work` is the worker time one request costs with every row busy (its prompt and its share
of the decode steps: the service answers one request per `work` seconds) and `row(own)` its time
once it has a row; with a row free at once, only `row(own)` at that many rows. Without that model
(static batching) a request that asks for `max_tokens` is expected to take

    cost(max_tokens) = overhead_s + (max(1, fill * max_tokens) - 1) * token_s

and, with `live` requests queued or running ahead of it, to finish after

    estimate = cost(own) + (sum of the remaining cost of those ahead / slots   if live >= slots, else 0)

(a running request's remaining cost is its cost less the time it has run). Both are scaled by the
measured ratio of actual to predicted time of finished requests that had to wait (`calibration`).
When the estimate is over `limits.request_timeout_s` the request is refused with 503 `overloaded`
and a `Retry-After` of the seconds until the queue ahead would have drained enough for it to fit
(rounded up, at least 1). A request that would start at once is always taken (no one ahead to
wait for), and before any answer has been measured only the queue bound applies.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Protocol

ALPHA = 0.2  # weight of the newest observation in the moving averages


def _ewma(old: float | None, new: float, alpha: float = ALPHA) -> float:
    return new if old is None else (1 - alpha) * old + alpha * new


class ServiceRate:
    """The service's measured speed, from finished answers (updated on the event loop)."""

    def __init__(self, alpha: float = ALPHA):
        self.alpha = alpha
        self.overhead_s: float | None = None  # prepare + first token of a request
        self.token_s: float | None = None  # each further token of a row, at the batch sizes seen
        self.fill: float | None = None  # completion tokens / max_tokens
        self.prompt_tokens: float | None = None  # prompt positions of a request (soft prompt included)
        # Measured time from admission to answer over what was predicted then: the per-request speeds
        # above are measured at the batch sizes seen, and a full batch is slower per row than they say.
        self.calibration = 1.0
        self.answers = 0  # answers measured

    @property
    def measured(self) -> bool:
        return self.overhead_s is not None

    def observe(self, timings: dict, completion_tokens: int, max_new_tokens: int,
                prompt_tokens: int | None = None) -> None:
        """Learn from one finished answer: its `timings` (prepare_s, first_token_s, generate_s) and size."""
        if completion_tokens < 1:
            return
        if prompt_tokens:
            self.prompt_tokens = _ewma(self.prompt_tokens, float(prompt_tokens), self.alpha)
        first = float(timings.get("first_token_s", 0.0))
        generate = float(timings.get("generate_s", first))
        self.overhead_s = _ewma(self.overhead_s, float(timings.get("prepare_s", 0.0)) + first, self.alpha)
        if completion_tokens > 1:
            self.token_s = _ewma(self.token_s, max(0.0, generate - first) / (completion_tokens - 1), self.alpha)
        self.fill = _ewma(self.fill, min(1.0, completion_tokens / max(1, max_new_tokens)), self.alpha)
        self.answers += 1

    def observe_finish(self, predicted_s: float, actual_s: float) -> None:
        """Learn how far off the prediction made at admission of a request that had to wait was
        (clamped: one odd request must not swing admission far)."""
        if predicted_s > 0 and actual_s > 0:
            self.calibration = _ewma(self.calibration, min(2.0, max(0.75, actual_s / predicted_s)), self.alpha)

    def cost(self, max_tokens: int) -> float | None:
        """Expected seconds of work for a request asking for up to `max_tokens` (None: nothing measured)."""
        if self.overhead_s is None:
            return None
        tokens = max(1.0, (self.fill or 1.0) * max_tokens)
        return self.overhead_s + (tokens - 1.0) * (self.token_s or 0.0)

    def requests_per_s(self, slots: int, max_tokens: int) -> float | None:
        """Requests of `max_tokens` the service finishes per second with `slots` rows busy."""
        c = self.cost(max_tokens)
        return None if not c else slots / c


@dataclass
class Live:
    """A submitted request the service still answers: its size, and since when it runs (None: queued)."""

    max_tokens: int
    started: float | None = None
    admitted: float = 0.0  # time.monotonic() at admission
    predicted_s: float | None = None  # the estimate it was admitted with (calibrated)


@dataclass
class Estimate:
    cost_s: float  # this request's own expected seconds of work
    wait_s: float  # expected seconds before it gets a row
    ahead: int  # requests queued or running ahead of it

    @property
    def total_s(self) -> float:
        return self.cost_s + self.wait_s


class CapacityModel(Protocol):
    """What a scheduler that measures its steps predicts (`ragpt.serving.scheduler.ContinuousBatcher`)."""

    def row_seconds(self, prompt_positions: float, new_tokens: float, rows: int) -> float | None: ...

    def work_seconds(self, prompt_positions: float, new_tokens: float) -> float | None: ...


def estimate(rate: ServiceRate, live: list[Live], slots: int, max_tokens: int,
             now: float | None = None, model: CapacityModel | None = None) -> Estimate | None:
    """The expected finish of a new request of `max_tokens` behind `live`; None before any measurement."""
    own = rate.cost(max_tokens)
    if own is None:
        return None
    if model is not None and rate.prompt_tokens is not None:
        fitted = _model_estimate(rate, live, slots, max_tokens, model)
        if fitted is not None:
            return fitted
    own *= rate.calibration
    if len(live) < slots:
        return Estimate(own, 0.0, len(live))
    now = time.monotonic() if now is None else now
    ahead = 0.0
    for r in live:
        c = rate.cost(r.max_tokens) or 0.0
        ahead += max(0.0, c - (now - r.started)) if r.started is not None else c
    return Estimate(own, rate.calibration * ahead / slots, len(live))


def _model_estimate(rate: ServiceRate, live: list[Live], slots: int, max_tokens: int,
                    model: CapacityModel) -> Estimate | None:
    def tokens(m: int) -> float:
        return max(1.0, (rate.fill or 1.0) * m)

    prompt = rate.prompt_tokens or 0.0
    rows = min(slots, len(live) + 1)
    own = model.row_seconds(prompt, tokens(max_tokens), rows)
    if own is None:
        return None
    own *= rate.calibration
    if len(live) < slots:
        return Estimate(own, 0.0, len(live))
    queued = [r for r in live if r.started is None]
    # A row frees each time a request leaves: one per `work` seconds of the requests ahead.
    work = [model.work_seconds(prompt, tokens(r.max_tokens)) for r in queued]
    first = model.work_seconds(prompt, tokens(max_tokens))
    if first is None or any(w is None for w in work):
        return None
    wait = sum(work) + first  # type: ignore[arg-type]
    return Estimate(own, rate.calibration * wait, len(live))


def retry_after_s(est: Estimate, timeout_s: float) -> int:
    """Seconds until the queue ahead has drained enough for `est` to fit `timeout_s` (at least 1)."""
    return max(1, math.ceil(est.total_s - timeout_s))


def full_queue_retry_after_s(est: Estimate, timeout_s: float) -> int:
    """Retry-After for a full queue: until the request would fit, and at least until one request
    ahead has left (the average remaining work of a request ahead, over the rows)."""
    one_leaves = est.wait_s / est.ahead if est.ahead else est.cost_s
    return max(1, math.ceil(max(est.total_s - timeout_s, one_leaves)))
