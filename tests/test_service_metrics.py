"""The service's /metrics (Prometheus, a registry per app, a metrics key only), admission from its
measured speed (503 with a computed Retry-After), and clients that go away freeing their slot.

Same models as tests/test_service.py: the tiny generator, the real embedder, the sample index.
"""

from __future__ import annotations

import asyncio
import math
import time

import httpx
import pytest
from conftest import live_server
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from test_service import (
    FIN_Q,
    HR_Q,
    IT_Q,
    KEYS,
    _auth,
    _chat,
    _config,
    _in_process,
    _make_registry,
    _tiny_generator,
    _wait_queued,
)

from ragpt_service.app import create_app
from ragpt_service.auth import hash_api_key

pytestmark = pytest.mark.integration  # real embedder and sample index

METRICS_KEY = "key-metrics"
METRICS = {"api_keys": [hash_api_key(METRICS_KEY)]}
MAX_TOKENS = 8


@pytest.fixture(scope="module", autouse=True)
def _threads(one_torch_thread_per_module):
    """See conftest.one_torch_thread_per_module."""


@pytest.fixture(scope="module")
def gen(tiny_tokenizer):
    return _tiny_generator(tiny_tokenizer)


@pytest.fixture(scope="module")
def settings(sample_index, gen, tmp_path_factory):
    """As in tests/test_service.py: hr v1 (active), v2, v3 (draft); it v1; finance without soft prompts."""
    s, _ = sample_index
    prompt_dir = _make_registry(tmp_path_factory.mktemp("prompts"), gen.model)
    return s.model_copy(update={"prompt_dir": prompt_dir, "max_context_tokens": 2048, "k": 2})


def _app(settings, real_embedder, gen, **over):
    over.setdefault("metrics", METRICS)
    return create_app(_config(**over), settings, embedder=real_embedder, generator=gen, background_load=False)


def _scrape(client) -> dict:
    """{(sample name, frozenset(labels)): value} of a /metrics answer, parsed by prometheus_client."""
    r = client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def _value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def _delta(before: dict, after: dict, name: str, **labels) -> float:
    return _value(after, name, **labels) - _value(before, name, **labels)


# --------------------------------------------------------------------------- /metrics


def test_metrics_count_requests_tokens_latency_and_prefix_cache_per_department(settings, real_embedder, gen):
    with TestClient(_app(settings, real_embedder, gen)) as c:
        before = _scrape(c)
        usage = []
        for _ in range(2):  # the second hr request finds hr v1's KV in the prefix cache
            r = c.post("/v1/chat/completions", headers=_auth("hr"),
                       json={"model": "hr", "messages": _chat(HR_Q), "max_tokens": MAX_TOKENS})
            assert r.status_code == 200, r.text
            usage.append(r.json()["usage"])
        streamed = c.post("/v1/departments/it/chat", headers=_auth("itfin"),
                          json={"messages": _chat(IT_Q), "max_tokens": MAX_TOKENS, "stream": True})
        assert streamed.status_code == 200 and "data: [DONE]" in streamed.text
        it_tokens = [e for e in streamed.text.split("\n") if '"usage"' in e]
        assert len(it_tokens) == 1  # ragpt's own shape carries usage in the last chunk
        finance = c.post("/v1/chat/completions", headers=_auth("itfin"),
                         json={"model": "finance", "messages": _chat(FIN_Q), "max_tokens": MAX_TOKENS})
        assert finance.status_code == 200
        assert c.post("/v1/chat/completions", headers=_auth("hr"),
                      json={"model": "hr", "messages": _chat(HR_Q), "max_tokens": 10_000}).status_code == 400
        assert c.post("/v1/chat/completions", headers=_auth("hr"),
                      json={"model": "finance", "messages": _chat(FIN_Q)}).status_code == 404
        assert c.post("/v1/chat/completions", json={"model": "hr", "messages": _chat(HR_Q)}).status_code == 401
        assert c.get("/v1/models").status_code == 401  # an error, but no chat request
        after = _scrape(c)
    gen_cache = gen.prefix_cache

    def d(name, **labels):
        return _delta(before, after, name, **labels)

    assert d("ragpt_requests_total", department="hr", status="200") == 2
    assert d("ragpt_requests_total", department="it", status="200") == 1
    assert d("ragpt_requests_total", department="finance", status="200") == 1
    for status in ("400", "404", "401"):  # refused before a department was settled
        assert d("ragpt_requests_total", department="", status=status) == 1
    assert sum(v for (n, _), v in after.items() if n == "ragpt_requests_total") - \
        sum(v for (n, _), v in before.items() if n == "ragpt_requests_total") == 7
    assert d("ragpt_errors_total", code="max_tokens_exceeded") == 1
    assert d("ragpt_errors_total", code="model_not_found") == 1
    assert d("ragpt_errors_total", code="invalid_api_key") == 2

    assert d("ragpt_generated_tokens_total", department="hr") == sum(u["completion_tokens"] for u in usage)
    assert d("ragpt_prompt_tokens_total", department="hr") == sum(u["prompt_tokens"] for u in usage)
    assert d("ragpt_generated_tokens_total", department="finance") == finance.json()["usage"]["completion_tokens"]
    assert d("ragpt_generated_tokens_total", department="it") > 0
    for dept, n in (("hr", 2), ("it", 1), ("finance", 1)):
        assert d("ragpt_time_to_first_token_seconds_count", department=dept) == n
        assert d("ragpt_request_duration_seconds_count", department=dept) == n
        assert _value(after, "ragpt_request_duration_seconds_bucket", department=dept, le="+Inf") >= n
    # Each answer's first token comes before its end.
    assert 0 < d("ragpt_time_to_first_token_seconds_sum", department="hr") \
        <= d("ragpt_request_duration_seconds_sum", department="hr")

    # Read at scrape time from the generator's prefix cache (one generator for every department).
    assert _value(after, "ragpt_prefix_cache_hits_total") == gen_cache.hits
    assert _value(after, "ragpt_prefix_cache_misses_total") == gen_cache.misses
    assert d("ragpt_prefix_cache_hits_total") >= 1 and _value(after, "ragpt_prefix_cache_misses_total") >= 1
    assert _value(after, "ragpt_ready") == 1 and _value(after, "ragpt_inflight_requests") == 0
    assert _value(after, "ragpt_queue_depth") == 0 and _value(after, "ragpt_running_rows") == 0
    assert ("ragpt_prefilling_rows", frozenset()) in after
    assert d("ragpt_batch_rows_total") == 4 and d("ragpt_measured_answers_total") == 4
    assert _value(after, "ragpt_estimated_wait_seconds") > 0  # measured now


def test_metrics_answer_only_a_metrics_key_and_each_app_has_its_own(settings, real_embedder, gen):
    with TestClient(_app(settings, real_embedder, gen)) as c, \
            TestClient(_app(settings, real_embedder, gen)) as other:
        for headers in ({}, _auth("all"), _auth("hr"), {"Authorization": "Bearer wrong"},
                        {"Authorization": f"Basic {METRICS_KEY}"}):
            r = c.get("/metrics", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", headers
            assert "ragpt_" not in r.text
        assert c.post("/v1/chat/completions", headers=_auth("hr"),
                      json={"model": "hr", "messages": _chat(HR_Q), "max_tokens": 2}).status_code == 200
        mine, theirs = _scrape(c), _scrape(other)
        assert _value(mine, "ragpt_requests_total", department="hr", status="200") == 1
        assert _value(theirs, "ragpt_requests_total", department="hr", status="200") == 0
        assert _value(mine, "ragpt_errors_total", code="invalid_api_key") == 5
        assert _value(theirs, "ragpt_errors_total", code="invalid_api_key") == 0
        assert "/metrics" not in c.get("/openapi.json").text
    # No metrics key configured, or metrics disabled: /metrics does not exist, whatever key is sent.
    for metrics in ({"api_keys": []}, {"enabled": False, **METRICS}):
        with TestClient(_app(settings, real_embedder, gen, metrics=metrics)) as c:
            for headers in ({}, _auth("all"), {"Authorization": f"Bearer {METRICS_KEY}"}):
                r = c.get("/metrics", headers=headers)
                assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    with pytest.raises(ValueError, match="metrics key must not also be a department's key"):
        _config(metrics={"api_keys": [hash_api_key(KEYS["hr"])]})


# --------------------------------------------------------------------------- admission


def test_a_burst_over_the_measured_capacity_gets_503_with_a_retry_after_that_grows_with_the_queue(
        settings, real_embedder, gen):
    timeout = 3.0
    # One row at a time, so the expected wait is the work queued ahead; a queue bound far above it.
    app = _app(settings, real_embedder, gen, batching={"max_batch_size": 1, "max_queue": 1000},
               limits={"request_timeout_s": timeout, "max_tokens": 1_000_000})

    def body(max_tokens: int) -> dict:
        return {"model": "hr", "messages": _chat(HR_Q), "max_tokens": max_tokens}

    async def scenario(c, rt):
        post = c.post
        rt.batcher.hold()
        # Nothing measured yet: only the queue bound applies, however much is queued.
        early = [asyncio.create_task(post("/v1/chat/completions", headers=_auth("hr"), json=body(MAX_TOKENS)))
                 for _ in range(3)]
        await _wait_queued(rt, 3)
        rt.batcher.release()
        assert [r.status_code for r in await asyncio.gather(*early)] == [200, 200, 200]
        cost = rt.rate.cost(MAX_TOKENS)  # what the service measured from those answers
        assert cost is not None and cost > 0
        # A probe too big to wait behind anyone: sized from the measured speed to take timeout + 1s.
        big = 2
        while rt.rate.cost(big) < timeout + 1:
            big *= 2

        rt.batcher.hold()
        waiting, probes, refused = [], [], None
        while refused is None and len(waiting) < 1000:
            r = asyncio.create_task(post("/v1/chat/completions", headers=_auth("hr"), json=body(MAX_TOKENS)))
            await asyncio.sleep(0)
            for _ in range(200):  # until it is queued or answered (refused)
                if rt.batcher.queued > len(waiting) or r.done():
                    break
                await asyncio.sleep(0.005)
            if r.done():
                refused = r.result()
                r = None
            else:
                waiting.append(r)
            if len(waiting) % 3 == 1:
                probe = await post("/v1/chat/completions", headers=_auth("hr"), json=body(big))
                probes.append((len(waiting), probe))
                if probe.status_code != 503:
                    break  # admitted (and timed out): the assertions below say so
        queued = rt.batcher.queued
        for t in waiting:  # the clients go away: their tickets are released, the queue is dropped
            t.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        inflight = rt.inflight
        rt.batcher.release()
        ok = await post("/v1/chat/completions", headers=_auth("hr"), json=body(2))
        return cost, len(waiting), queued, refused, probes, inflight, ok

    cost, admitted, queued, refused, probes, inflight, ok = _in_process(app, scenario)
    # Admitted while the work ahead plus its own fits the timeout: k ahead need (k + 1) * cost <= timeout.
    assert queued == admitted and admitted < 1000
    assert abs(admitted - timeout / cost) <= 1.5, (admitted, cost)
    assert refused is not None and refused.status_code == 503, refused
    err = refused.json()["error"]
    assert err["code"] == "overloaded" and "timeout" in err["message"]
    assert int(refused.headers["retry-after"]) >= 1
    # The probe's Retry-After: when the queue ahead will have drained enough for it, growing with it.
    after = [int(p.headers["retry-after"]) for _, p in probes]
    assert all(p.status_code == 503 and p.json()["error"]["code"] == "overloaded" for _, p in probes)
    assert after == sorted(after) and after[-1] > after[0] >= 1, [(n, a) for (n, _), a in zip(probes, after)]
    _, first = probes[0]
    big_cost = float(first.json()["error"]["message"].split("finish in ")[1].split("s,")[0])
    assert math.ceil(big_cost - timeout) - 1 <= after[0] <= math.ceil(big_cost - timeout) + 1
    assert inflight == 0 and ok.status_code == 200


def test_a_full_queue_after_measuring_computes_its_retry_after(settings, real_embedder, gen):
    # retry_after_s is only for a full queue before anything was measured (tests/test_service.py).
    app = _app(settings, real_embedder, gen, batching={"max_batch_size": 1, "max_queue": 2},
               limits={"retry_after_s": 30})
    body = {"model": "hr", "messages": _chat(HR_Q), "max_tokens": MAX_TOKENS}

    async def scenario(c, rt):
        assert (await c.post("/v1/chat/completions", headers=_auth("hr"), json=body)).status_code == 200
        rt.batcher.hold()
        waiting = [asyncio.create_task(c.post("/v1/chat/completions", headers=_auth("hr"), json=body))
                   for _ in range(2)]
        await _wait_queued(rt, 2)
        over = await c.post("/v1/chat/completions", headers=_auth("hr"), json=body)
        est = rt.estimate(MAX_TOKENS)
        rt.batcher.release()
        return over, est, await asyncio.gather(*waiting)

    over, est, served = _in_process(app, scenario)
    assert over.status_code == 503 and over.json()["error"]["code"] == "overloaded"
    # Until one of the two ahead has left (tiny model: well under a second), not the configured 30.
    assert over.headers["retry-after"] == str(max(1, math.ceil(est.wait_s / est.ahead))) == "1"
    assert [r.status_code for r in served] == [200, 200]


# --------------------------------------------------------------------------- clients that go away


def test_a_non_streaming_client_that_disconnects_while_queued_frees_its_slot(settings, real_embedder, gen):
    app = _app(settings, real_embedder, gen)
    rt = app.state.runtime

    async def main(url):
        rt.batcher.hold()
        rows = rt.batcher.stats.rows
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            task = asyncio.create_task(c.post("/v1/chat/completions", headers=_auth("hr"),
                                              json={"model": "hr", "messages": _chat(HR_Q), "max_tokens": 4}))
            await _wait_queued(rt, 1)
            assert rt.inflight == 1
            task.cancel()  # the client goes away: httpx closes the connection
            await asyncio.gather(task, return_exceptions=True)
            t0 = time.monotonic()
            while rt.inflight and time.monotonic() - t0 < 5:
                await asyncio.sleep(0.01)
            freed_s = time.monotonic() - t0
            inflight = rt.inflight
            rt.batcher.release()
            ok = await c.post("/v1/chat/completions", headers=_auth("hr"),
                              json={"model": "hr", "messages": _chat(HR_Q), "max_tokens": 4})
            scraped = await c.get("/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"})
        return rows, inflight, freed_s, ok, scraped

    with live_server(app) as url:
        rows, inflight, freed_s, ok, scraped = asyncio.run(main(url))
    assert inflight == 0 and freed_s < 1.0
    # The abandoned request was dropped from the queue: only the next one ran.
    assert ok.status_code == 200 and rt.batcher.stats.rows == rows + 1
    samples = {(s.name, frozenset(s.labels.items())): s.value
               for f in text_string_to_metric_families(scraped.text) for s in f.samples}
    assert _value(samples, "ragpt_requests_total", department="hr", status="499") == 1
    assert _value(samples, "ragpt_errors_total", code="client_disconnected") == 1


def test_a_non_streaming_client_that_disconnects_while_generating_stops_its_row(settings, real_embedder, gen):
    # The tiny model answers IT_Q with a long greedy text: first measured to its end, then abandoned.
    app = _app(settings, real_embedder, gen, batching={"scheduler": "continuous"},
               limits={"max_tokens": 2500})
    rt = app.state.runtime
    body = {"model": "it", "messages": _chat(IT_Q), "max_tokens": 2500}

    async def main(url):
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            steps = rt.batcher.steps
            full = await c.post("/v1/chat/completions", headers=_auth("itfin"), json=body)
            full_steps = rt.batcher.steps - steps
            steps = rt.batcher.steps
            task = asyncio.create_task(c.post("/v1/chat/completions", headers=_auth("itfin"), json=body))
            for _ in range(2000):
                if rt.batcher.running_rows:
                    break
                await asyncio.sleep(0.005)
            running = rt.batcher.running_rows
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            t0 = time.monotonic()
            while (rt.batcher.running_rows or rt.inflight) and time.monotonic() - t0 < 30:
                await asyncio.sleep(0.005)
            return full, full_steps, running, rt.batcher.steps - steps, rt.inflight

    with live_server(app) as url:
        full, full_steps, running, cut_steps, inflight = asyncio.run(main(url))
    assert full.status_code == 200
    n = full.json()["usage"]["completion_tokens"]
    assert n >= 200 and full_steps >= n - 1, (n, full_steps)  # a long answer: room to stop it early
    assert running == 1 and inflight == 0
    assert cut_steps < n / 2, (cut_steps, n)  # the row left long before its answer would have ended
