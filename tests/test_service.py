"""The chat service over HTTP: in-process (TestClient, httpx ASGITransport), on a live uvicorn, and via `ragpt serve`.

Most tests use the tiny generator with the real embedder and the sample index; one uses the
real generator. Every answer is checked against `Pipeline.ask` on the same models: the service
must answer exactly what the library answers, whatever batch a request landed in.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from conftest import build_tiny_model, free_port, live_server
from fastapi.testclient import TestClient

from ragpt.lm.generator import Generator
from ragpt.lm.template import Turn, build_prompt, count_tokens
from ragpt.retrieval.index import DocumentIndex
from ragpt.serving.contract import InputContract
from ragpt.serving.pipeline import Pipeline
from ragpt.serving.request import ChatRequest, passages_from_hits, prepare
from ragpt.softprompts.artifact import SoftPrompt, base_model_fingerprint
from ragpt.softprompts.registry import PromptRegistry
from ragpt_service.app import create_app
from ragpt_service.auth import hash_api_key
from ragpt_service.config import ServiceConfig, load_service_config

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


def _chat(question: str, *, history: tuple[Turn, ...] = (), system: str | None = None) -> list[dict]:
    """OpenAI messages; a system message only when `system` is given (it is appended to the system turn)."""
    return ([{"role": "system", "content": system}] if system is not None else []) + \
        [{"role": t.role, "content": t.content} for t in history] + [{"role": "user", "content": question}]


# hr's versions record their input contract, as `ragpt train` writes it (the conversation is
# retrieved with: query_rule turns:4); it's v1 is an artifact from before contracts: its
# hyperparameters give k and the prompt budget, and it retrieves with the question alone.
HR_CONTRACT = InputContract(k=2, max_context_tokens=2048).to_dict()
IT_HYPERPARAMETERS = {"k": 2, "max_context_tokens": 2048}


def _make_registry(root: Path, model) -> Path:
    """hr: v1 (active), v2 (approved), v3 (draft); it: v1 (active); finance: none."""
    reg = PromptRegistry(root)
    fp = base_model_fingerprint(model)
    hidden = model.get_input_embeddings().weight.shape[1]
    scale = float(model.get_input_embeddings().weight.std())
    for dept, n in (("hr", 3), ("it", 1)):
        for i in range(n):
            t = torch.randn(3 + i, hidden, generator=torch.Generator().manual_seed(100 * n + i)) * scale
            meta = {"contract": HR_CONTRACT} if dept == "hr" else {"hyperparameters": IT_HYPERPARAMETERS}
            v = reg.register(SoftPrompt.create(t, department=dept, base_fingerprint=fp, **meta), actor="test")
            if i < 2:
                reg.approve(dept, v, actor="test")
        reg.activate(dept, "v1", actor="test")
    return root


def _tiny_generator(tokenizer) -> Generator:
    return Generator(build_tiny_model(tokenizer), tokenizer)


@pytest.fixture(scope="module")
def gen(tiny_tokenizer):
    return _tiny_generator(tiny_tokenizer)


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
    assert body["citations"] == [{"source": c.source, "title": c.title, "chunk": c.chunk, "score": c.score,
                                  "snippet": c.snippet} for c in ref.citations]


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
    # A department the key may not use answers like one that does not exist (no enumeration).
    _error(client.post("/v1/chat/completions", json=body, headers=_auth("hr")), 404, "model_not_found")
    _error(client.post("/v1/departments/it/chat", headers=_auth("hr"), json={"messages": _chat(IT_Q)}),
           404, "model_not_found")
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
                        json={"messages": _chat(q), "max_tokens": 2, "k": 5,
                              "contract": {"max_context_tokens": 3800}}).json()  # room for 5 passages
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


# --------------------------------------------------------------------------- what a request puts into the model


SYSTEM = "Answer in one short sentence and name the policy you used."
FOLLOW_UP = "What about Austin?"  # names nothing to search for: the conversation does
VACATION_HISTORY = (Turn("user", "How many vacation days do I get per year in Munich?"),
                    Turn("assistant", "Full-time employees in Munich get 30 working days."))


def _citations(answer) -> list[dict]:
    return [{"source": c.source, "title": c.title, "chunk": c.chunk, "score": c.score, "snippet": c.snippet}
            for c in answer.citations]


def _prompt_passages(pipe, question: str, dept: str, **kw) -> list:
    """The passages the library puts into this request's prompt, in rank order."""
    p = prepare(pipe, ChatRequest(question, dept, **kw))
    return passages_from_hits(p.hits[: p.built.passages])


def _soft_tokens(pipe, dept: str) -> int:
    return int(pipe.resolve(dept)[0].shape[-2])


def test_a_system_message_is_appended_to_the_departments_system_turn(client, pipe, gen):
    def ask(messages):
        r = client.post("/v1/chat/completions", headers=_auth("hr"),
                        json={"model": "hr", "messages": messages, "max_tokens": MAX_TOKENS})
        assert r.status_code == 200, r.text
        return r.json()

    plain, with_system = ask(_chat(HR_Q)), ask(_chat(HR_Q, system=SYSTEM))
    assert with_system["citations"] == plain["citations"] and len(plain["citations"]) == 2  # retrieval unchanged
    tok = gen.tokenizer
    passages = _prompt_passages(pipe, HR_Q, "hr")
    base = build_prompt(tok, HR_Q, passages, department="hr", max_prompt_tokens=10**6).ids
    ids = build_prompt(tok, HR_Q, passages, department="hr", system=SYSTEM, max_prompt_tokens=10**6).ids
    # The client's text goes at the end of the system turn (before its end token), after a blank line.
    end_of_system = base.index(tok.eos_token_id)
    added = tok("\n\n" + SYSTEM, add_special_tokens=False)["input_ids"]
    assert ids == base[:end_of_system] + added + base[end_of_system:]
    n_soft = _soft_tokens(pipe, "hr")
    assert plain["usage"]["prompt_tokens"] == len(base) + n_soft
    assert with_system["usage"]["prompt_tokens"] == len(base) + len(added) + n_soft
    ref = pipe.ask(HR_Q, "hr", system=SYSTEM, max_new_tokens=MAX_TOKENS)
    assert with_system["choices"][0]["message"]["content"] == ref.text and with_system["usage"] == ref.usage
    assert ref.text != pipe.ask(HR_Q, "hr", max_new_tokens=MAX_TOKENS).text  # the model sees it
    # Several system/developer messages are joined with blank lines; blank ones are dropped.
    two = ask([{"role": "system", "content": SYSTEM}, {"role": "developer", "content": "Be polite."},
               {"role": "user", "content": HR_Q}])
    ref2 = pipe.ask(HR_Q, "hr", system=SYSTEM + "\n\nBe polite.", max_new_tokens=MAX_TOKENS)
    assert (two["choices"][0]["message"]["content"], two["usage"]) == (ref2.text, ref2.usage)
    assert two["usage"]["prompt_tokens"] > with_system["usage"]["prompt_tokens"]
    assert ask(_chat(HR_Q, system="   "))["usage"] == plain["usage"]


def test_an_oversized_history_is_trimmed_oldest_first_and_a_too_long_question_is_refused(
        client, settings, real_embedder, gen, pipe):
    tok = gen.tokenizer
    budget = HR_CONTRACT["max_history_tokens"]
    history = tuple(Turn("user" if i % 2 == 0 else "assistant",
                         f"Turn {i}: " + "we talked about the Munich office, its teams and their plans. " * (2 + i % 2))
                    for i in range(6))
    sizes = [count_tokens(tok, t.content) for t in history]
    kept = next(n for n in range(6, -1, -1) if sum(sizes[6 - n:]) <= budget)  # the newest turns that fit
    assert sum(sizes) > budget and 1 < kept < 6  # trimming has to happen
    assert sum(sizes[:kept]) != sum(sizes[6 - kept:])  # keeping the oldest turns would show
    with TestClient(_app(settings, real_embedder, gen,
                         limits={"max_message_chars": 4000, "max_request_bytes": 64 * 1024})) as c:
        assert max(len(t.content) for t in history) < 4000
        r = c.post("/v1/departments/hr/chat", headers=_auth("hr"),
                   json={"messages": _chat(HR_Q, history=history), "max_tokens": MAX_TOKENS})
        assert r.status_code == 200, r.text
        body = r.json()
        passages = _prompt_passages(pipe, HR_Q, "hr", history=history)
        newest = build_prompt(tok, HR_Q, passages, department="hr", history=history[6 - kept:],
                              max_prompt_tokens=10**6).ids
        assert body["usage"]["prompt_tokens"] == len(newest) + _soft_tokens(pipe, "hr")
        ref = pipe.ask(HR_Q, "hr", history=history, max_new_tokens=MAX_TOKENS)
        assert (body["answer"], body["usage"], ref.history_turns) == (ref.text, ref.usage, kept)
        # A question over the contract's 256 question tokens: refused, not cut.
        long_q = "Please tell me everything about vacation days in Munich and in Austin. " * 12
        assert count_tokens(tok, long_q.strip()) > HR_CONTRACT["max_question_tokens"] and len(long_q) < 4000
        for stream in (False, True):
            r = c.post("/v1/chat/completions", headers=_auth("hr"),
                       json={"model": "hr", "messages": _chat(long_q), "max_tokens": MAX_TOKENS, "stream": stream})
            assert "limit is 256" in _error(r, 400, "question_too_long")["message"]
    # The same bound through the request's contract extension, within the client's small limits.
    err = _error(client.post("/v1/departments/hr/chat", headers=_auth("hr"),
                             json={"messages": _chat(HR_Q), "contract": {"max_question_tokens": 8}}),
                 400, "question_too_long")
    assert "limit is 8" in err["message"] and count_tokens(tok, HR_Q) > 8
    # Not even the system turn and the question fit 64 prompt tokens.
    _error(client.post("/v1/departments/hr/chat", headers=_auth("hr"),
                       json={"messages": _chat(HR_Q), "contract": {"max_context_tokens": 64}}),
           400, "prompt_too_long")


def test_answers_report_the_input_contract_and_the_callers_overrides(client, pipe, settings):
    def chat(dept, key="all", **extra):
        r = client.post(f"/v1/departments/{dept}/chat", headers=_auth(key),
                        json={"messages": _chat(HR_Q), "max_tokens": MAX_TOKENS, **extra})
        assert r.status_code == 200, r.text
        return r.json()

    hr = chat("hr")
    assert hr["contract"] == HR_CONTRACT and hr["contract_overrides"] == {}  # stored with the version
    assert set(hr["contract"]) >= {"k", "max_context_tokens", "max_question_tokens", "max_history_tokens",
                                   "template", "dense", "bm25", "rrf_k", "query_rule"}
    # it's v1 predates contracts: its hyperparameters, and the question alone as the retrieval query.
    assert chat("it")["contract"] == {**InputContract().to_dict(), **IT_HYPERPARAMETERS, "query_rule": "last"}
    # No prompt version: the settings' values.
    assert chat("finance")["contract"] == InputContract.from_settings(settings).to_dict()
    one = chat("hr", contract={"k": 1})
    assert one["contract_overrides"] == {"k": {"contract": 2, "used": 1}} and one["contract"]["k"] == 1
    assert len(one["citations"]) == 1 and len(hr["citations"]) == 2
    ref = pipe.ask(HR_Q, "hr", overrides={"k": 1}, max_new_tokens=MAX_TOKENS)
    assert (one["answer"], one["citations"], one["contract_overrides"]) == (ref.text, _citations(ref),
                                                                             ref.contract_overrides)
    assert chat("hr", k=1)["contract_overrides"] == one["contract_overrides"]
    assert chat("hr", contract={"k": 2})["contract_overrides"] == {}  # only what differs is listed
    r = client.post("/v1/chat/completions", headers=_auth("hr"),
                    json={"model": "hr", "messages": _chat(HR_Q), "max_tokens": MAX_TOKENS, "stream": True,
                          "contract": {"query_rule": "last", "k": 1}})
    first = _sse_events(r.text)[0]
    assert first["contract"] == {**HR_CONTRACT, "query_rule": "last", "k": 1}
    assert first["contract_overrides"] == {"k": {"contract": 2, "used": 1},
                                           "query_rule": {"contract": "turns:4", "used": "last"}}

    def bad(contract):
        return client.post("/v1/chat/completions", headers=_auth("hr"),
                           json={"model": "hr", "messages": _chat(HR_Q), "contract": contract})

    assert "bogus" in _error(bad({"bogus": 1}), 400, "invalid_contract")["message"]
    _error(bad({"template": "v2"}), 400, "invalid_contract")  # a fact about the training, not a knob
    _error(bad({"k": 2.5}), 400, "invalid_contract")
    _error(bad({"query_rule": "everything"}), 400, "invalid_contract")
    _error(bad({"dense": False, "bm25": False}), 400, "invalid_contract")
    _error(bad({"k": 11}), 400, "k_exceeded")  # the service's limit holds for the contract's k too


@pytest.mark.parametrize("k", ["2", [2], True, 2.5, {"v": 2}])
def test_a_contract_k_of_the_wrong_type_is_an_invalid_contract(client, k):
    r = client.post("/v1/chat/completions", headers=_auth("hr"),
                    json={"model": "hr", "messages": _chat(HR_Q), "contract": {"k": k}})
    _error(r, 400, "invalid_contract")


def test_a_follow_up_retrieves_with_the_conversation(client, pipe):
    def chat(**extra):
        r = client.post("/v1/departments/hr/chat", headers=_auth("hr"),
                        json={"messages": _chat(FOLLOW_UP, history=VACATION_HISTORY), "max_tokens": MAX_TOKENS,
                              **extra})
        assert r.status_code == 200, r.text
        return r.json()

    with_conversation, alone = chat(), chat(contract={"query_rule": "last"})
    assert with_conversation["contract"]["query_rule"] == "turns:4"
    ref = pipe.ask(FOLLOW_UP, "hr", history=VACATION_HISTORY, max_new_tokens=MAX_TOKENS)
    assert with_conversation["citations"] == _citations(ref) and with_conversation["answer"] == ref.text
    assert with_conversation["citations"] != alone["citations"]
    # "What about Austin?" alone finds nothing about vacation; with the conversation it finds the policy.
    assert {c["source"].rsplit("/", 1)[-1] for c in with_conversation["citations"]} == {"vacation-policy.txt"}
    assert all(not c["source"].endswith("vacation-policy.txt") for c in alone["citations"])
    assert alone["citations"] == _citations(pipe.ask(FOLLOW_UP, "hr", max_new_tokens=1))  # the question alone
    assert alone["contract_overrides"] == {"query_rule": {"contract": "turns:4", "used": "last"}}


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
        assert "no-such-index" in c.get("/readyz", headers=_auth("hr")).json()["error"]  # why: to a key only
        err = _error(c.post("/v1/chat/completions", headers=_auth("hr"),
                            json={"model": "hr", "messages": _chat(HR_Q)}), 503, "not_ready")
        assert "no-such-index" in err["message"]
        assert c.get("/healthz").status_code == 200


# --------------------------------------------------------------------------- live server


@pytest.fixture(scope="module")
def live(settings, real_embedder, gen):
    app = _app(settings, real_embedder, gen)
    with live_server(app) as url:
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
    with pytest.raises(openai.NotFoundError):  # not permitted looks like not there
        hr_only.chat.completions.create(model="finance", messages=_chat(FIN_Q))
    with pytest.raises(openai.NotFoundError):
        hr_only.chat.completions.create(model="hr@v9", messages=_chat(HR_Q))
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError):
        hr_only.chat.completions.create(model="hr", messages=_chat(HR_Q), max_tokens=10_000)


@pytest.mark.parametrize("scheduler", ["static", "continuous"])
def test_concurrent_requests_of_three_departments_share_one_batch_on_the_live_server(settings, real_embedder, gen,
                                                                                     pipe, scheduler):
    # A prompt budget per step that fits all three prompts: the continuous scheduler admits them together.
    app = _app(settings, real_embedder, gen, batching={"scheduler": scheduler, "max_prefill_tokens": 65536})
    asks = [("hr", HR_Q, "hr"), ("it", IT_Q, "itfin"), ("finance", FIN_Q, "itfin")]

    async def main(url, rt):
        rt.batcher.hold()
        before = rt.batcher.stats.batches
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            tasks = [asyncio.create_task(c.post(f"/v1/departments/{d}/chat", headers=_auth(key),
                                                json={"messages": _chat(q), "max_tokens": MAX_TOKENS}))
                     for d, q, key in asks]
            await _wait_queued(rt, 3)
            rt.batcher.release()
            return before, await asyncio.gather(*tasks)

    with live_server(app) as url:
        rt = app.state.runtime
        assert type(rt.batcher).__name__ == {"static": "MicroBatcher", "continuous": "ContinuousBatcher"}[scheduler]
        before, responses = asyncio.run(main(url, rt))
    assert rt.batcher.stats.batches == before + 1
    assert sorted(rt.batcher.stats.departments[-1]) == ["finance", "hr", "it"]
    sizes = []
    for (dept, q, _), r in zip(asks, responses):
        assert r.status_code == 200, r.text
        body = r.json()
        sizes.append(body["timings"]["batch_size"])
        assert body["answer"] == pipe.ask(q, dept, max_new_tokens=MAX_TOKENS).text
    # Static: the batch holds its three rows to the end. Continuous: a finished row leaves at once.
    assert max(sizes) == 3 and (scheduler == "continuous" or sizes == [3, 3, 3])


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
    port = free_port()
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
    s = s.model_copy(update={"prompt_dir": _make_registry(tmp_path / "prompts", model)})
    ref_pipe = Pipeline(DocumentIndex.open(s.index_dir, "sample"), s, embedder=real_embedder, generator=real,
                        prefix_cache=False)
    app = create_app(_config(), s, embedder=real_embedder, generator=real, background_load=False)
    with TestClient(app) as c:
        r = c.post("/v1/chat/completions", headers=_auth("all"),
                   json={"model": "hr", "messages": _chat(HR_Q), "max_tokens": MAX_TOKENS, "k": 1})
        assert r.status_code == 200, r.text
        body = r.json()
    # The soft prompt inline, no prefix cache; k=1 as in the request (hr's contract says 2).
    ref = ref_pipe.ask(HR_Q, "hr", k=1, max_new_tokens=MAX_TOKENS)
    assert body["prompt_version"] == ref.prompt_version == "v1"
    assert body["choices"][0]["message"]["content"] == ref.text and ref.text
    assert real.prefix_cache.misses == 1  # the service used the cached prefix


def test_a_generator_without_the_packed_engine_is_batched_statically(settings, real_embedder, gen, pipe, caplog):
    """`decode_engine = padded` (or a model the packed engine cannot take): the configured continuous
    scheduler falls back to static batching with a warning, and answers as the library does."""
    from ragpt.serving.scheduler import ContinuousBatcher, MicroBatcher

    padded = Generator(gen.model, gen.tokenizer, packed=False)
    with caplog.at_level("WARNING", logger="ragpt.service"):
        app = _app(settings, real_embedder, padded, batching={"scheduler": "continuous"})
        with TestClient(app) as c:
            batcher = app.state.runtime.batcher
            r = c.post("/v1/chat/completions", headers=_auth("hr"),
                       json={"model": "hr", "messages": _chat(HR_Q), "max_tokens": MAX_TOKENS})
    assert type(batcher) is MicroBatcher and not isinstance(batcher, ContinuousBatcher)
    assert any("batching statically" in rec.getMessage() for rec in caplog.records)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == pipe.ask(HR_Q, "hr", max_new_tokens=MAX_TOKENS).text
