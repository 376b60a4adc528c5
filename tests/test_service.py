"""The chat service over HTTP: in-process (TestClient, httpx ASGITransport), on a live uvicorn, and via `ragpt serve`.

Most tests use the tiny generator with the real embedder and the sample index; one uses the
real generator. Every answer is checked against `Pipeline.ask` on the same models: the service
must answer exactly what the library answers, whatever batch a request landed in.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
from conftest import build_tiny_model
from fastapi.testclient import TestClient
from ragpt_service.app import create_app
from ragpt_service.auth import hash_api_key
from ragpt_service.config import ServiceConfig, load_service_config

from ragpt.lm.generator import Generator
from ragpt.lm.template import Turn
from ragpt.retrieval.index import DocumentIndex
from ragpt.serving.pipeline import Pipeline
from ragpt.softprompts.artifact import SoftPrompt, base_model_fingerprint
from ragpt.softprompts.registry import PromptRegistry

pytestmark = pytest.mark.integration  # real embedder and sample index

MAX_TOKENS = 8
KEYS = {"hr": "key-hr", "itfin": "key-it-and-finance", "all": "key-all"}
HR_Q = "How many vacation days does a full-time employee in Munich get per year?"
IT_Q = "How do I connect to the VPN from home?"
FIN_Q = "Who has to approve an invoice above 10,000 EUR?"


@pytest.fixture(scope="module", autouse=True)
def _threads(one_torch_thread_per_module):
    """See conftest.one_torch_thread_per_module."""


def _auth(key: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[key]}"}


def _config(**over) -> ServiceConfig:
    depts = {
        "hr": {"api_keys": [hash_api_key(KEYS["hr"]), hash_api_key(KEYS["all"])]},
        "it": {"api_keys": [hash_api_key(KEYS["itfin"]), hash_api_key(KEYS["all"])]},
        "finance": {"api_keys": [hash_api_key(KEYS["itfin"]), hash_api_key(KEYS["all"])]},
    }
    data = {"index": "sample", "departments": depts}
    for section, values in over.items():
        data[section] = values
    return ServiceConfig.model_validate(data)


def _chat(question: str, *, history: tuple[Turn, ...] = ()) -> list[dict]:
    return [{"role": "system", "content": "ignored"}] + [{"role": t.role, "content": t.content} for t in history] + \
        [{"role": "user", "content": question}]


def _make_registry(root: Path, model) -> Path:
    """hr: v1 (active), v2 (approved), v3 (draft); it: v1 (active); finance: none."""
    reg = PromptRegistry(root)
    fp = base_model_fingerprint(model)
    hidden = model.get_input_embeddings().weight.shape[1]
    scale = float(model.get_input_embeddings().weight.std())
    for dept, n in (("hr", 3), ("it", 1)):
        for i in range(n):
            t = torch.randn(3 + i, hidden, generator=torch.Generator().manual_seed(100 * n + i)) * scale
            v = reg.register(SoftPrompt.create(t, department=dept, base_fingerprint=fp), actor="test")
            if i < 2:
                reg.approve(dept, v, actor="test")
        reg.activate(dept, "v1", actor="test")
    return root


@pytest.fixture(scope="module")
def gen(tiny_tokenizer):
    return Generator(build_tiny_model(tiny_tokenizer), tiny_tokenizer)


@pytest.fixture(scope="module")
def settings(sample_index, gen, tmp_path_factory):
    s, _ = sample_index
    prompt_dir = _make_registry(tmp_path_factory.mktemp("prompts"), gen.model)
    return s.model_copy(update={"prompt_dir": prompt_dir, "max_context_tokens": 2048, "k": 2})


@pytest.fixture(scope="module")
def pipe(settings, real_embedder, gen):
    """The library's answers, for comparison."""
    return Pipeline(DocumentIndex.open(settings.index_dir, "sample"), settings, embedder=real_embedder, generator=gen)


def _app(settings, real_embedder, gen, **over):
    return create_app(_config(**over), settings, embedder=real_embedder, generator=gen, background_load=False)


@pytest.fixture(scope="module")
def client(settings, real_embedder, gen):
    with TestClient(_app(settings, real_embedder, gen, limits={"max_tokens": 64, "max_messages": 6,
                                                                "max_message_chars": 500,
                                                                "max_request_bytes": 2048})) as c:
        yield c


def settings_max_new_tokens(client: TestClient) -> int:
    return client.app.state.runtime.settings.max_new_tokens


def _error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "code"} and err["code"] == code and err["message"]
    return err


def _sse_events(text: str) -> list:
    lines = [ln for ln in text.split("\n") if ln]
    assert all(ln.startswith("data: ") for ln in lines), text
    assert lines[-1] == "data: [DONE]"
    return [json.loads(ln[len("data: "):]) for ln in lines[:-1]]


# --------------------------------------------------------------------------- basics


def test_health_readiness_and_models_per_key(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    hr = client.get("/v1/models", headers=_auth("hr")).json()["data"]
    assert [m["id"] for m in hr] == ["hr", "auto"]
    assert hr[0]["active_prompt_version"] == "v1" and hr[0]["prompt_versions"] == ["v1", "v2"]  # v3 is a draft
    everyone = {m["id"]: m for m in client.get("/v1/models", headers=_auth("all")).json()["data"]}
    assert set(everyone) == {"hr", "it", "finance", "auto"}
    assert everyone["finance"]["active_prompt_version"] is None
    _error(client.get("/v1/models"), 401, "invalid_api_key")


def test_openai_route_answers_exactly_like_the_pipeline(client, pipe):
    r = client.post("/v1/chat/completions", headers=_auth("hr"),
                    json={"model": "hr", "messages": _chat(HR_Q), "max_tokens": MAX_TOKENS})
    assert r.status_code == 200, r.text
    body = r.json()
    ref = pipe.ask(HR_Q, "hr", max_new_tokens=MAX_TOKENS)
    assert body["object"] == "chat.completion" and body["model"] == "hr@v1"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": ref.text}
    assert body["choices"][0]["finish_reason"] == ref.finish_reason
    assert body["usage"] == ref.usage
    assert (body["department"], body["prompt_version"], body["routing"]) == ("hr", "v1", None)
    assert body["citations"] == [{"source": c.source, "title": c.title, "chunk": c.chunk, "score": c.score}
                                 for c in ref.citations]


def test_department_route_turns_earlier_messages_into_history(client, pipe):
    history = (Turn("user", "Hi, I work in Munich."), Turn("assistant", "Hello! How can I help?"))
    r = client.post("/v1/departments/hr/chat", headers=_auth("hr"),
                    json={"messages": _chat(HR_Q, history=history), "max_tokens": MAX_TOKENS, "k": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    ref = pipe.ask(HR_Q, "hr", history=history, k=1, max_new_tokens=MAX_TOKENS)
    no_history = pipe.ask(HR_Q, "hr", k=1, max_new_tokens=MAX_TOKENS)
    assert body["object"] == "department.chat"
    assert (body["answer"], body["usage"]) == (ref.text, ref.usage)
    assert body["usage"]["prompt_tokens"] > no_history.usage["prompt_tokens"]
    assert len(body["citations"]) == 1 and body["department"] == "hr" and body["prompt_version"] == "v1"


def test_pinned_prompt_versions(client, pipe):
    def ask(model, **extra):
        return client.post("/v1/chat/completions", headers=_auth("hr"),
                           json={"model": model, "messages": _chat(HR_Q), "max_tokens": MAX_TOKENS, **extra})

    v2 = ask("hr@v2").json()
    assert (v2["model"], v2["prompt_version"]) == ("hr@v2", "v2")
    assert v2["choices"][0]["message"]["content"] == pipe.ask(HR_Q, "hr", prompt="v2", max_new_tokens=MAX_TOKENS).text
    assert v2["choices"][0]["message"]["content"] != ask("hr").json()["choices"][0]["message"]["content"]
    none = ask("hr@none").json()
    assert none["prompt_version"] is None and none["model"] == "hr"
    assert none["choices"][0]["message"]["content"] == pipe.ask(HR_Q, "hr", prompt="none",
                                                                  max_new_tokens=MAX_TOKENS).text
    assert "draft" in _error(ask("hr@v3"), 404, "model_not_found")["message"]
    _error(ask("hr@v9"), 404, "model_not_found")
    dept = client.post("/v1/departments/hr/chat", headers=_auth("hr"),
                       json={"messages": _chat(HR_Q), "max_tokens": MAX_TOKENS, "prompt_version": "v2"}).json()
    assert dept["prompt_version"] == "v2" and dept["answer"] == v2["choices"][0]["message"]["content"]


def test_a_key_reaches_only_its_departments(client):
    body = {"model": "it", "messages": _chat(IT_Q), "max_tokens": MAX_TOKENS}
    _error(client.post("/v1/chat/completions", json=body), 401, "invalid_api_key")
    _error(client.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer nope"}),
           401, "invalid_api_key")
    _error(client.post("/v1/chat/completions", json=body, headers={"Authorization": KEYS["hr"]}),
           401, "invalid_api_key")
    assert _error(client.post("/v1/chat/completions", json=body, headers=_auth("hr")),
                  403, "permission_denied")["type"] == "permission_error"
    _error(client.post("/v1/departments/it/chat", headers=_auth("hr"), json={"messages": _chat(IT_Q)}),
           403, "permission_denied")
    _error(client.post("/v1/chat/completions", headers=_auth("hr"), json={**body, "model": "legal"}),
           404, "model_not_found")
    assert client.post("/v1/chat/completions", json=body, headers=_auth("itfin")).status_code == 200


def test_auto_routes_only_among_the_keys_departments(client, pipe):
    r = client.post("/v1/chat/completions", headers=_auth("all"),
                    json={"model": "auto", "messages": _chat(IT_Q), "max_tokens": MAX_TOKENS}).json()
    assert (r["department"], r["prompt_version"], r["model"]) == ("it", "v1", "it@v1")
    assert r["routing"]["department"] == "it" and r["routing"]["soft_prompt"] is True
    assert r["routing"]["confidence"] >= r["routing"]["min_confidence"]
    assert set(r["routing"]["scores"]) == {"hr", "it", "finance"}
    assert r["choices"][0]["message"]["content"] == pipe.ask(IT_Q, "it", max_new_tokens=MAX_TOKENS).text
    # An HR question from a key without HR: routed between its own departments only.
    r = client.post("/v1/chat/completions", headers=_auth("itfin"),
                    json={"model": "auto", "messages": _chat(HR_Q), "max_tokens": MAX_TOKENS}).json()
    assert r["department"] in {"it", "finance"} and set(r["routing"]["scores"]) == {"it", "finance"}
    _error(client.post("/v1/chat/completions", headers=_auth("hr"),
                       json={"model": "auto@v1", "messages": _chat(HR_Q)}), 400, "invalid_model")


def test_answers_cite_only_the_departments_own_documents(client, pipe):
    manifest = pipe.index.manifest["documents"]
    for dept, q in (("it", HR_Q), ("finance", IT_Q), ("hr", FIN_Q)):  # questions about another department
        r = client.post(f"/v1/departments/{dept}/chat", headers=_auth("all"),
                        json={"messages": _chat(q), "max_tokens": 2, "k": 5}).json()
        assert len(r["citations"]) == 5
        assert all(dept in manifest[c["source"]]["departments"] for c in r["citations"]), r["citations"]


def test_limits_and_malformed_requests_get_clear_4xx_errors(client):
    def post(body, **kw):
        return client.post("/v1/chat/completions", headers=_auth("hr"), json=body, **kw)

    ok = {"model": "hr", "messages": _chat(HR_Q)}
    # No max_tokens: the default (ragpt's max_new_tokens, 128) is capped at the limit (64).
    usage = post({**ok, "k": 1}).json()["usage"]
    assert 0 < usage["completion_tokens"] <= 64 and settings_max_new_tokens(client) > 64
    assert "64" in _error(post({**ok, "max_tokens": 65}), 400, "max_tokens_exceeded")["message"]
    _error(post({**ok, "max_completion_tokens": 65}), 400, "max_tokens_exceeded")
    _error(post({**ok, "k": 11}), 400, "k_exceeded")
    _error(post({**ok, "messages": [{"role": "user", "content": "hi"}] * 7}), 400, "too_many_messages")
    _error(post({**ok, "messages": _chat("x" * 501)}), 400, "message_too_long")
    _error(post({**ok, "messages": _chat(HR_Q) + [{"role": "assistant", "content": "ok"}]}), 400, "invalid_request")
    _error(post({**ok, "messages": _chat("   ")}), 400, "empty_question")
    _error(post({**ok, "messages": []}), 400, "invalid_request")
    _error(post({**ok, "n": 2}), 400, "unsupported_parameter")
    assert _error(post({"messages": _chat(HR_Q)}), 400, "invalid_request")["param"] == "model"
    _error(post({**ok, "temperature": 9}), 400, "invalid_request")
    _error(post({**ok, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
           400, "unsupported_content")
    _error(client.post("/v1/chat/completions", headers={**_auth("hr"), "content-type": "application/json"},
                       content=b"{not json"), 400, "invalid_request")
    # Each message and their count are within limits; together they exceed the 2048-byte body limit.
    _error(post({**ok, "messages": [{"role": "user", "content": "y" * 450}] * 5}), 413, "request_too_large")
    big = json.dumps({**ok, "messages": [{"role": "user", "content": "y" * 450}] * 5}).encode()
    chunked = client.post("/v1/chat/completions", headers={**_auth("hr"), "content-type": "application/json"},
                          content=(big[i:i + 512] for i in range(0, len(big), 512)))  # no Content-Length
    _error(chunked, 413, "request_too_large")
    _error(client.get("/v1/nothing-here"), 404, "not_found")
    _error(client.post("/v1/departments/hr/chat", headers=_auth("hr"), json={"messages": _chat(HR_Q), "bogus": 1}),
           400, "invalid_request")


def test_streaming_sends_openai_chunks_that_add_up_to_the_answer(client, pipe):
    ref = pipe.ask(IT_Q, "it", max_new_tokens=MAX_TOKENS)
    r = client.post("/v1/chat/completions", headers=_auth("itfin"),
                    json={"model": "it", "messages": _chat(IT_Q), "max_tokens": MAX_TOKENS, "stream": True,
                          "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = _sse_events(r.text)
    assert all(e["object"] == "chat.completion.chunk" and e["model"] == "it@v1" for e in events)
    first, final, usage = events[0], events[-2], events[-1]
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert first["department"] == "it" and len(first["citations"]) == 2
    content = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert content == ref.text and len(events) > 4
    assert final["choices"][0]["finish_reason"] == ref.finish_reason
    assert usage["choices"] == [] and usage["usage"] == ref.usage
    dept = client.post("/v1/departments/it/chat", headers=_auth("itfin"),
                       json={"messages": _chat(IT_Q), "max_tokens": MAX_TOKENS, "stream": True})
    events = _sse_events(dept.text)
    assert events[-1]["usage"] == ref.usage and events[-1]["choices"][0]["finish_reason"] == ref.finish_reason


# --------------------------------------------------------------------------- configured behaviour


def test_auto_below_the_confidence_threshold_answers_without_a_soft_prompt_or_refuses(
        settings, real_embedder, gen, pipe):
    body = {"model": "auto", "messages": _chat(IT_Q), "max_tokens": MAX_TOKENS}
    # min_confidence 1.0: no routing among several departments is that sure.
    with TestClient(_app(settings, real_embedder, gen, router={"min_confidence": 1.0})) as c:
        r = c.post("/v1/chat/completions", headers=_auth("all"), json=body).json()
        assert r["department"] == "it" and r["prompt_version"] is None
        assert r["routing"]["soft_prompt"] is False and r["routing"]["confidence"] < 1.0
        assert r["choices"][0]["message"]["content"] == pipe.ask(IT_Q, "it", prompt="none",
                                                                  max_new_tokens=MAX_TOKENS).text
    with TestClient(_app(settings, real_embedder, gen,
                         router={"min_confidence": 1.0, "below_threshold": "refuse"})) as c:
        _error(c.post("/v1/chat/completions", headers=_auth("all"), json=body), 422, "routing_uncertain")
    with TestClient(_app(settings, real_embedder, gen, router={"enabled": False})) as c:
        _error(c.post("/v1/chat/completions", headers=_auth("all"), json=body), 400, "invalid_model")
        assert [m["id"] for m in c.get("/v1/models", headers=_auth("hr")).json()["data"]] == ["hr"]


def test_activating_a_version_takes_effect_without_a_restart(settings, real_embedder, gen, tmp_path):
    prompt_dir = shutil.copytree(settings.prompt_dir, tmp_path / "prompts")
    s = settings.model_copy(update={"prompt_dir": prompt_dir})
    reg = PromptRegistry(prompt_dir)
    body = {"model": "hr", "messages": _chat(HR_Q), "max_tokens": MAX_TOKENS}
    with TestClient(_app(s, real_embedder, gen)) as c:
        def version():
            return c.post("/v1/chat/completions", headers=_auth("hr"), json=body).json()["prompt_version"]

        assert version() == "v1"
        reg.activate("hr", "v2", actor="test")
        assert version() == "v2"
        assert c.get("/v1/models", headers=_auth("hr")).json()["data"][0]["active_prompt_version"] == "v2"
        reg.rollback("hr", actor="test")
        assert version() == "v1"


def _in_process(app, scenario):
    """Run `scenario(client, runtime)` against the app in-process, with its lifespan, on one event loop."""

    async def main():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://service") as c:
                return await scenario(c, app.state.runtime)

    return asyncio.run(main())


async def _wait_queued(runtime, n: int) -> None:
    for _ in range(1000):  # bounded; the worker is held, so only our own requests fill the queue
        if runtime.batcher.queued >= n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"expected {n} queued requests, have {runtime.batcher.queued}")


def test_a_full_queue_answers_503_with_retry_after(settings, real_embedder, gen):
    app = _app(settings, real_embedder, gen, batching={"max_queue": 2}, limits={"retry_after_s": 3})
    body = {"model": "hr", "messages": _chat(HR_Q), "max_tokens": MAX_TOKENS}

    async def scenario(c, rt):
        rt.batcher.hold()
        waiting = [asyncio.create_task(c.post("/v1/chat/completions", headers=_auth("hr"), json=body))
                   for _ in range(2)]
        await _wait_queued(rt, 2)
        over = await c.post("/v1/chat/completions", headers=_auth("hr"), json=body)
        rt.batcher.release()
        return over, await asyncio.gather(*waiting)

    over, served = _in_process(app, scenario)
    assert _error(over, 503, "overloaded")["type"] == "server_error"
    assert over.headers["retry-after"] == "3"
    assert [r.status_code for r in served] == [200, 200]


def test_a_request_that_waits_too_long_times_out_with_504(settings, real_embedder, gen):
    app = _app(settings, real_embedder, gen, limits={"request_timeout_s": 0.3})

    async def scenario(c, rt):
        rt.batcher.hold()
        r = await c.post("/v1/chat/completions", headers=_auth("hr"),
                         json={"model": "hr", "messages": _chat(HR_Q), "max_tokens": MAX_TOKENS})
        rt.batcher.release()
        # The abandoned job is dropped, not generated: the next request runs alone in the first batch.
        ok = await c.post("/v1/chat/completions", headers=_auth("hr"),
                          json={"model": "hr", "messages": _chat(HR_Q), "max_tokens": 2})
        return r, ok, rt.batcher.stats.batch_sizes

    r, ok, sizes = _in_process(app, scenario)
    _error(r, 504, "timeout")
    assert ok.status_code == 200 and sizes == [1]


def test_a_service_that_cannot_load_is_not_ready_and_says_why(settings, real_embedder, gen):
    cfg = _config(index="no-such-index")
    app = create_app(cfg, settings, embedder=real_embedder, generator=gen, background_load=True)
    with TestClient(app) as c:
        for _ in range(500):  # bounded wait for the background load to finish failing
            ready = c.get("/readyz")
            if ready.json()["status"] != "loading":
                break
            time.sleep(0.02)
        assert ready.status_code == 503 and ready.json()["status"] == "failed"
        assert "no-such-index" in ready.json()["error"]
        err = _error(c.post("/v1/chat/completions", headers=_auth("hr"),
                            json={"model": "hr", "messages": _chat(HR_Q)}), 503, "not_ready")
        assert "no-such-index" in err["message"]
        assert c.get("/healthz").status_code == 200


# --------------------------------------------------------------------------- live server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _live(app):
    """uvicorn on 127.0.0.1 in a thread; stops when the block ends (bounded waits both ways)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=_free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(600):
            if server.started:
                break
            time.sleep(0.05)
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def live(settings, real_embedder, gen):
    app = _app(settings, real_embedder, gen)
    with _live(app) as url:
        yield url, app.state.runtime


def test_the_unmodified_openai_client_works_against_the_live_server(live, pipe):
    import openai

    url, _ = live
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEYS["all"], max_retries=0, timeout=60)
    ref = pipe.ask(FIN_Q, "finance", max_new_tokens=MAX_TOKENS)
    out = client.chat.completions.create(model="finance", messages=_chat(FIN_Q), max_tokens=MAX_TOKENS)
    assert out.choices[0].message.content == ref.text
    assert out.usage.completion_tokens == ref.usage["completion_tokens"]
    assert out.model == "finance" and out.model_extra["department"] == "finance"
    assert [c["source"] for c in out.model_extra["citations"]] == [c.source for c in ref.citations]

    stream = client.chat.completions.create(model="finance", messages=_chat(FIN_Q), max_tokens=MAX_TOKENS,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == ref.finish_reason
    assert chunks[-1].usage.total_tokens == ref.usage["total_tokens"]

    assert {m.id for m in client.models.list()} == {"hr", "it", "finance", "auto"}
    hr_only = openai.OpenAI(base_url=f"{url}/v1", api_key=KEYS["hr"], max_retries=0, timeout=60)
    with pytest.raises(openai.PermissionDeniedError):
        hr_only.chat.completions.create(model="finance", messages=_chat(FIN_Q))
    with pytest.raises(openai.NotFoundError):
        hr_only.chat.completions.create(model="hr@v9", messages=_chat(HR_Q))
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError):
        hr_only.chat.completions.create(model="hr", messages=_chat(HR_Q), max_tokens=10_000)


def test_concurrent_requests_of_three_departments_share_one_batch_on_the_live_server(live, pipe):
    url, rt = live
    asks = [("hr", HR_Q, "hr"), ("it", IT_Q, "itfin"), ("finance", FIN_Q, "itfin")]

    async def main():
        rt.batcher.hold()
        before = rt.batcher.stats.batches
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            tasks = [asyncio.create_task(c.post(f"/v1/departments/{d}/chat", headers=_auth(key),
                                                json={"messages": _chat(q), "max_tokens": MAX_TOKENS}))
                     for d, q, key in asks]
            await _wait_queued(rt, 3)
            rt.batcher.release()
            return before, await asyncio.gather(*tasks)

    before, responses = asyncio.run(main())
    assert rt.batcher.stats.batches == before + 1
    assert sorted(rt.batcher.stats.departments[-1]) == ["finance", "hr", "it"]
    for (dept, q, _), r in zip(asks, responses):
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["timings"]["batch_size"] == 3
        assert body["answer"] == pipe.ask(q, dept, max_new_tokens=MAX_TOKENS).text


def test_ragpt_serve_starts_the_service_from_a_config_file(settings, gen, tmp_path):
    gen.model.save_pretrained(tmp_path / "tiny")
    gen.tokenizer.save_pretrained(tmp_path / "tiny")
    config = tmp_path / "serve.toml"
    config.write_text(
        'index = "sample"\n'
        f'index_dir = "{settings.index_dir}"\n'
        'prompt_dir = "prompts"\n'  # relative to the config file: an empty registry
        "[departments.hr]\n"
        f'api_keys = ["{hash_api_key(KEYS["hr"])}"]\n'
        "[batching]\nmax_wait_ms = 2\n"
    )
    assert load_service_config(config).prompt_dir == tmp_path / "prompts"
    port = _free_port()
    # Registers the command the way ragpt.cli.main mounts it (unless it already is).
    script = ("from ragpt.cli.main import app; from ragpt.cli.serve import serve\n"
              "if not any(c.callback is serve for c in app.registered_commands): app.command()(serve)\n"
              "app()")
    proc = subprocess.Popen(
        [sys.executable, "-c", script, "--generator", str(tmp_path / "tiny"), "--bf16", "off", "--threads", "1",
         "serve", "--config", str(config), "--port", str(port), "--log-level", "warning"],
        cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        status = None
        for _ in range(600):  # up to ~2 min to load the embedder on a busy machine
            if proc.poll() is not None:
                break
            try:
                status = httpx.get(f"{url}/readyz", timeout=2).json()["status"]
            except httpx.HTTPError:
                status = None
            if status in ("ready", "failed"):
                break
            time.sleep(0.2)
        assert status == "ready", proc.stdout.read().decode() if proc.poll() is not None else status
        r = httpx.post(f"{url}/v1/chat/completions", headers=_auth("hr"), timeout=60,
                       json={"model": "hr", "messages": _chat(HR_Q), "max_tokens": 4})
        assert r.status_code == 200, r.text
        assert r.json()["department"] == "hr" and r.json()["prompt_version"] is None
        assert httpx.get(f"{url}/v1/models", headers=_auth("itfin")).status_code == 401
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# --------------------------------------------------------------------------- real generator


def test_real_generator_through_the_service_equals_the_pipeline(sample_index, real_embedder, real_generator,
                                                                  tmp_path):
    model, tok = real_generator
    real = Generator(model, tok, bf16=False)
    s, _ = sample_index
    s = s.model_copy(update={"prompt_dir": _make_registry(tmp_path / "prompts", model), "k": 1})
    ref_pipe = Pipeline(DocumentIndex.open(s.index_dir, "sample"), s, embedder=real_embedder, generator=real)
    app = create_app(_config(), s, embedder=real_embedder, generator=real, background_load=False)
    with TestClient(app) as c:
        r = c.post("/v1/chat/completions", headers=_auth("all"),
                   json={"model": "hr", "messages": _chat(HR_Q), "max_tokens": MAX_TOKENS})
        assert r.status_code == 200, r.text
        body = r.json()
    ref = ref_pipe.ask(HR_Q, "hr", max_new_tokens=MAX_TOKENS)  # soft prompt inline, no prefix cache
    assert body["prompt_version"] == ref.prompt_version == "v1"
    assert body["choices"][0]["message"]["content"] == ref.text and ref.text
    assert real.prefix_cache.misses == 1  # the service used the cached prefix
