"""Prometheus metrics of one service app, on a registry of its own (several apps in one process
do not collide), exposed by `GET /metrics` to a metrics key only.

Recorded as requests finish (chat routes):

    ragpt_requests_total{department, status}         chat requests by HTTP status (a stream that failed
                                                       after it started: the in-band error's status;
                                                       499: the client went away first); department is
                                                       empty when the request failed before it named one
    ragpt_errors_total{code}                          error responses (and in-band stream errors) by code
    ragpt_generated_tokens_total{department}          completion tokens of answered requests: rate() = tokens/s
    ragpt_prompt_tokens_total{department}             their prompt tokens
    ragpt_time_to_first_token_seconds{department}     arrival -> first token, answered requests
    ragpt_request_duration_seconds{department}        arrival -> last byte, answered requests

Read at scrape time (a collector over the runtime):

    ragpt_ready                                       1 once models are loaded and the batcher runs
    ragpt_queue_depth                                 requests waiting in the batcher
    ragpt_inflight_requests                           requests the service is answering (queued or running)
    ragpt_running_rows, ragpt_prefilling_rows         rows decoding now; rows whose prompt is being run
    ragpt_batches_total, ragpt_batch_rows_total       batches (continuous: joins) run and their rows
    ragpt_prefix_cache_hits_total / _misses_total     soft-prompt KV cache of the generator
    ragpt_prefix_cache_entries
    ragpt_estimated_wait_seconds                      what admission expects a default request to take now
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ragpt_service.auth import hash_api_key
from ragpt_service.errors import ApiError

if TYPE_CHECKING:
    from ragpt.serving.request import Answer
    from ragpt_service.runtime import ServiceRuntime

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
CLIENT_GONE = 499  # nginx's "client closed request": the status recorded when the client left first


@dataclass
class RequestRecord:
    """One chat request as the metrics see it, finished once."""

    started: float  # time.perf_counter() at arrival
    department: str | None = None
    prepared_at: float | None = None  # when retrieval and prompt were done (the row is about to run)
    streaming: bool = False  # finished by the stream, not by the route
    done: bool = False


class ServiceMetrics:
    def __init__(self, runtime: ServiceRuntime):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("ragpt_requests", "Chat requests by department and HTTP status.",
                                ["department", "status"], registry=r)
        self.errors = Counter("ragpt_errors", "Error responses (and in-band stream errors) by error code.",
                              ["code"], registry=r)
        self.generated_tokens = Counter("ragpt_generated_tokens", "Completion tokens of answered requests.",
                                        ["department"], registry=r)
        self.prompt_tokens = Counter("ragpt_prompt_tokens", "Prompt tokens of answered requests.",
                                     ["department"], registry=r)
        self.ttft = Histogram("ragpt_time_to_first_token_seconds",
                              "Seconds from a request's arrival to its first generated token.",
                              ["department"], buckets=TTFT_BUCKETS, registry=r)
        self.latency = Histogram("ragpt_request_duration_seconds",
                                 "Seconds from a request's arrival to the end of its answer.",
                                 ["department"], buckets=LATENCY_BUCKETS, registry=r)
        r.register(_RuntimeCollector(runtime))
        self._keys = frozenset(runtime.config.metrics.api_keys)

    # -------------------------------------------------------------- recording
    @staticmethod
    def start() -> RequestRecord:
        return RequestRecord(started=time.perf_counter())

    def error(self, code: str | None) -> None:
        self.errors.labels(code or "unknown").inc()

    def finish(self, record: RequestRecord | None, status: int, code: str | None = None,
               answer: Answer | None = None) -> None:
        """Count a finished chat request once: its status, error code, and for an answer its tokens and times."""
        if code is not None:
            self.error(code)
        if record is None or record.done:
            return
        record.done = True
        dept = record.department or ""
        self.requests.labels(dept, str(status)).inc()
        if answer is None:
            return
        self.generated_tokens.labels(dept).inc(answer.usage.get("completion_tokens", 0))
        self.prompt_tokens.labels(dept).inc(answer.usage.get("prompt_tokens", 0))
        now = time.perf_counter()
        self.latency.labels(dept).observe(now - record.started)
        first = answer.timings.get("first_token_s")
        if first is not None and record.prepared_at is not None:
            # The row's decoder starts as the prepared event is sent; first_token_s counts from there.
            self.ttft.labels(dept).observe(min(now, record.prepared_at + first) - record.started)

    # -------------------------------------------------------------- exposing
    def check_key(self, authorization: str | None) -> None:
        """A metrics key, or a 401 (a department's key is no metrics key: the same 401 as a wrong one)."""
        scheme, _, key = (authorization or "").partition(" ")
        key = key.strip()
        if not authorization:
            raise ApiError(401, "missing API key: send 'Authorization: Bearer <metrics key>'", code="invalid_api_key")
        if scheme.lower() != "bearer" or not key:
            raise ApiError(401, "malformed Authorization header: expected 'Bearer <key>'", code="invalid_api_key")
        if hash_api_key(key) not in self._keys:
            raise ApiError(401, "invalid API key for /metrics", code="invalid_api_key")

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _RuntimeCollector:
    """Values read from the runtime at scrape time (the batcher and the generator keep them)."""

    def __init__(self, runtime: ServiceRuntime):
        self.runtime = runtime

    def describe(self):
        return []  # values depend on the load state: not checked for clashes at registration

    def collect(self):
        rt = self.runtime
        yield GaugeMetricFamily("ragpt_ready", "1 once the models are loaded and the batcher runs.",
                                value=1.0 if rt.status == "ready" else 0.0)
        yield GaugeMetricFamily("ragpt_inflight_requests",
                                "Requests the service is answering now (queued or running).", value=rt.inflight)
        b = rt.batcher
        if b is not None:
            yield GaugeMetricFamily("ragpt_queue_depth", "Requests waiting in the batcher.", value=b.queued)
            yield GaugeMetricFamily("ragpt_running_rows", "Rows being decoded now.", value=b.running_rows)
            yield GaugeMetricFamily("ragpt_prefilling_rows", "Admitted rows whose prompt is still being run.",
                                    value=getattr(b, "prefilling_rows", 0))
            yield GaugeMetricFamily("ragpt_max_batch_size", "Rows decoded together at most.", value=b.max_batch_size)
            yield CounterMetricFamily("ragpt_batches", "Batches run (continuous: groups of rows joining).",
                                      value=b.stats.batches)
            yield CounterMetricFamily("ragpt_batch_rows", "Rows run in those batches.", value=b.stats.rows)
        generators = {id(p.generator): p.generator for p in list(rt.pipelines.values())}
        caches = [g.prefix_cache for g in generators.values() if getattr(g, "prefix_cache", None) is not None]
        if caches:
            yield CounterMetricFamily("ragpt_prefix_cache_hits", "Soft-prompt KV cache hits.",
                                      value=sum(c.hits for c in caches))
            yield CounterMetricFamily("ragpt_prefix_cache_misses", "Soft-prompt KV cache misses (KV computed).",
                                      value=sum(c.misses for c in caches))
            yield GaugeMetricFamily("ragpt_prefix_cache_entries", "Soft-prompt KV entries held.",
                                    value=sum(len(c) for c in caches))
        est = rt.estimate()
        if est is not None:
            yield GaugeMetricFamily("ragpt_estimated_wait_seconds",
                                    "Expected seconds a default request would take if it arrived now.",
                                    value=est.total_s)
        yield CounterMetricFamily("ragpt_measured_answers", "Answers the admission estimate has learnt from.",
                                  value=rt.rate.answers)
