"""The chat service's edges: malformed input, auth order, what errors quote, enumeration, unsupported
OpenAI parameters, the OpenAPI document, a damaged registry, and `ragpt serve` with a config that
cannot work.

The bad-input suite runs against a live uvicorn on 127.0.0.1 (what a client sees on the wire: a
plain-text 500 or a reset connection would show), the rest in-process with TestClient; both use
the tiny generator with the real embedder and the sample index, as tests/test_service.py does.
"""

from __future__ import annotations

import json
import logging
import re
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
from test_service import HR_Q, IT_Q, KEYS, _auth, _config

from ragpt.lm.generator import Generator
from ragpt.softprompts.artifact import SoftPrompt, base_model_fingerprint
from ragpt.softprompts.registry import PromptRegistry
from ragpt_service.app import create_app
from ragpt_service.auth import hash_api_key

pytestmark = pytest.mark.integration  # real embedder and sample index

REPO = Path(__file__).resolve().parents[1]
MAX_TOKENS = 4


@pytest.fixture(scope="module", autouse=True)
def _threads(one_torch_thread_per_module):
    """See conftest.one_torch_thread_per_module."""


def _chat(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


def _ok_body(**more) -> dict:
    return {"model": "hr", "messages": _chat(HR_Q), "max_tokens": MAX_TOKENS, **more}


@pytest.fixture(scope="module")
def gen(tiny_tokenizer):
    return Generator(build_tiny_model(tiny_tokenizer), tiny_tokenizer)


@pytest.fixture(scope="module")
def settings(sample_index, gen, tmp_path_factory):
    """hr: v1 (active), v2 (approved); it: v1 (active); finance: no soft prompts."""
    s, _ = sample_index
    reg = PromptRegistry(tmp_path_factory.mktemp("prompts"))
    emb = gen.model.get_input_embeddings().weight
    for dept, n in (("hr", 2), ("it", 1)):
        for i in range(n):
            t = torch.randn(3, emb.shape[1], generator=torch.Generator().manual_seed(10 * n + i)) * float(emb.std())
            v = reg.register(SoftPrompt.create(t, department=dept, base_fingerprint=base_model_fingerprint(gen.model)),
                             actor="test")
            reg.approve(dept, v, actor="test")
        reg.activate(dept, "v1", actor="test")
    return s.model_copy(update={"prompt_dir": reg.root, "max_context_tokens": 2048, "k": 2})


def _app(settings, real_embedder, gen, **over):
    return create_app(_config(**over), settings, embedder=real_embedder, generator=gen, background_load=False)


@pytest.fixture(scope="module")
def client(settings, real_embedder, gen):
    # Default limits (64 KiB bodies): room for the 60,000-character inputs below.
    with TestClient(_app(settings, real_embedder, gen)) as c:
        yield c


@pytest.fixture(scope="module")
def live(settings, real_embedder, gen):
    app = _app(settings, real_embedder, gen, limits={"max_request_bytes": 32 * 1024})
    with live_server(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        yield c


def _error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json"), r.headers
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "code", "param"} and err["code"] == code and err["message"], err
    return err


# --------------------------------------------------------------------------- 1: malformed input, on the wire

JSON = {"content-type": "application/json"}
OPENAI = "/v1/chat/completions"
DEPT = "/v1/departments/hr/chat"
LONE = '"a \\ud800 b"'  # a JSON string escape of a lone surrogate: valid JSON, not Unicode text


def _raw(obj: dict, **strings: str) -> bytes:
    """`obj` as JSON with placeholders "@NAME@" replaced by raw JSON text (escapes kept as sent)."""
    text = json.dumps(obj)
    for name, value in strings.items():
        text = text.replace(f'"@{name}@"', value)
    return text.encode()


_MSG = [{"role": "user", "content": "@S@"}]
BAD_INPUT = [
    # (id, path, body bytes, status, code, param or None: not checked)
    ("surrogate-content", OPENAI, _raw({"model": "hr", "messages": _MSG}, S=LONE), 400, "invalid_text",
     "messages.0.content"),
    ("surrogate-content-auto", OPENAI, _raw({"model": "auto", "messages": _MSG}, S=LONE), 400, "invalid_text",
     "messages.0.content"),
    ("surrogate-content-stream", OPENAI, _raw({"model": "auto", "messages": _MSG, "stream": True}, S=LONE), 400,
     "invalid_text", "messages.0.content"),
    ("surrogate-dept-route", DEPT, _raw({"messages": _MSG}, S=LONE), 400, "invalid_text", "messages.0.content"),
    ("surrogate-model", OPENAI, _raw({"model": "@S@", "messages": _chat(HR_Q)}, S=LONE), 400, "invalid_text",
     "model"),
    ("surrogate-content-part", OPENAI, _raw({"model": "hr", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "@S@"}]}]}, S=LONE), 400, "invalid_text",
     "messages.0.content.0.text"),
    ("surrogate-contract-key", OPENAI, b'{"model": "hr", "messages": [{"role": "user", "content": "hi"}], '
                                       b'"contract": {"\\udc00": 1}}', 400, "invalid_text", "contract"),
    ("not-json", OPENAI, b"{not json", 400, "invalid_request", None),
    ("truncated-json", OPENAI, b'{"model": "hr", "messages": [', 400, "invalid_request", None),
    ("empty-body", OPENAI, b"", 400, "invalid_request", None),
    ("nan", OPENAI, _raw(_ok_body(temperature="@S@"), S="NaN"), 400, "invalid_request", None),
    ("too-deep", OPENAI, _raw(_ok_body(contract="@S@"), S="[" * 10000 + "]" * 10000), 400, "invalid_request", None),
    ("huge-integer", OPENAI, _raw(_ok_body(max_tokens="@S@"), S="9" * 5000), 400, "invalid_request", None),
    ("not-utf8", OPENAI, b'{"model": "hr\xff\xfe", "messages": []}', 400, "invalid_request", None),
    ("array-body", OPENAI, b"[]", 400, "invalid_request", None),
    ("form-content-type", OPENAI, _raw(_ok_body()), 400, "invalid_request", None),
    ("no-content-type", DEPT, _raw({"messages": _chat(HR_Q)}), 400, "invalid_request", None),
    ("string-body", DEPT, b'"hello"', 400, "invalid_request", None),
    ("no-messages", OPENAI, _raw({"model": "hr", "messages": []}), 400, "invalid_request", "messages"),
    ("no-messages-dept", DEPT, _raw({"messages": []}), 400, "invalid_request", "messages"),
    ("messages-not-a-list", OPENAI, _raw({"model": "hr", "messages": "hi"}), 400, "invalid_request", "messages"),
    ("no-model", OPENAI, _raw({"messages": _chat(HR_Q)}), 400, "invalid_request", "model"),
    ("model-not-a-string", OPENAI, _raw({"model": 7, "messages": _chat(HR_Q)}), 400, "invalid_request", "model"),
    ("empty-model", OPENAI, _raw({"model": "", "messages": _chat(HR_Q)}), 400, "invalid_request", "model"),
    ("max-tokens-a-string", OPENAI, _raw(_ok_body(max_tokens="ten")), 400, "invalid_request", "max_tokens"),
    ("max-tokens-zero", OPENAI, _raw(_ok_body(max_tokens=0)), 400, "invalid_request", "max_tokens"),
    ("temperature-negative", OPENAI, _raw(_ok_body(temperature=-1)), 400, "invalid_request", "temperature"),
    ("unknown-role", OPENAI, _raw({"model": "hr", "messages": [{"role": "robot", "content": "hi"}]}), 400,
     "invalid_request", "messages.0.role"),
    ("content-a-number", OPENAI, _raw({"model": "hr", "messages": [{"role": "user", "content": 5}]}), 400,
     "invalid_request", None),
    ("image-content", DEPT, _raw({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}), 400,
     "unsupported_content", "messages"),
    ("last-message-not-user", OPENAI, _raw({"model": "hr", "messages": [{"role": "assistant", "content": "x"}]}),
     400, "invalid_request", "messages"),
    ("blank-question", OPENAI, _raw({"model": "hr", "messages": _chat("  ")}), 400, "empty_question", "messages"),
    ("contract-a-list", OPENAI, _raw(_ok_body(contract=[1])), 400, "invalid_request", "contract"),
    ("contract-unknown-field", OPENAI, _raw(_ok_body(contract={"bogus": 1})), 400, "invalid_contract", "contract"),
    ("dept-extra-field", DEPT, _raw({"messages": _chat(HR_Q), "bogus": 1}), 400, "invalid_request", "bogus"),
    ("tools", OPENAI, _raw(_ok_body(tools=[{"type": "function", "function": {"name": "f"}}])), 400,
     "unsupported_parameter", "tools"),
    ("n-2", OPENAI, _raw(_ok_body(n=2)), 400, "unsupported_parameter", "n"),
    ("unknown-model", OPENAI, _raw(_ok_body(model="legal")), 404, "model_not_found", "model"),
    ("auto-pinned", OPENAI, _raw(_ok_body(model="auto@v1")), 400, "invalid_model", "model"),
    ("unknown-version", OPENAI, _raw(_ok_body(model="hr@v9")), 404, "model_not_found", "model"),
    ("too-large", OPENAI, _raw(_ok_body(user="u" * 40000)), 413, "request_too_large", None),
]


# What the message of a body that is not a JSON object of text says.
SAYS = {"not-json": "not valid JSON", "truncated-json": "not valid JSON", "empty-body": "empty", "nan": "NaN",
        "too-deep": "nested too deeply", "huge-integer": "not valid JSON", "not-utf8": "UTF-8",
        "array-body": "must be a JSON object", "string-body": "must be a JSON object",
        "form-content-type": "Content-Type: application/json", "no-content-type": "Content-Type: application/json"}
CONTENT_TYPES = {"form-content-type": "application/x-www-form-urlencoded", "no-content-type": None}


@pytest.mark.parametrize("case, path, body, status, code, param", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_malformed_input_gets_a_json_4xx_naming_the_problem_on_a_live_server(live, case, path, body, status, code,
                                                                             param):
    content_type = CONTENT_TYPES.get(case, "application/json")
    headers = {**_auth("all"), **({"content-type": content_type} if content_type else {})}
    r = live.post(path, content=body, headers=headers)
    err = _error(r, status, code)
    if param is not None:
        assert err["param"] == param, err
    if case in SAYS:
        assert SAYS[case] in err["message"], err
    assert len(err["message"]) <= 400
    assert live.get("/healthz").json() == {"status": "ok"}


def test_a_surrogate_message_is_named_in_the_error_and_the_next_request_is_answered(live):
    err = _error(live.post(OPENAI, content=_raw({"model": "auto", "messages": _MSG}, S=LONE),
                           headers={**_auth("all"), **JSON}), 400, "invalid_text")
    assert "surrogate" in err["message"] and "messages.0.content" in err["message"]
    r = live.post(OPENAI, json={"model": "auto", "messages": _chat(IT_Q), "max_tokens": MAX_TOKENS},
                  headers=_auth("all"))
    assert r.status_code == 200 and r.json()["department"] == "it"
    # A paired surrogate escape is a real character (here U+1F600): accepted.
    ok = live.post(OPENAI, content=_raw({"model": "hr", "messages": _MSG, "max_tokens": MAX_TOKENS},
                                        S='"vacation \\ud83d\\ude00"'), headers={**_auth("hr"), **JSON})
    assert ok.status_code == 200, ok.text


def test_wrong_methods_and_paths_get_json_errors(live):
    _error(live.get(OPENAI, headers=_auth("hr")), 405, "method_not_allowed")
    _error(live.get("/v1/nothing-here"), 404, "not_found")
    assert live.get("/healthz").status_code == 200


# --------------------------------------------------------------------------- 2: the key before the body


@pytest.mark.parametrize("path", [OPENAI, DEPT])
@pytest.mark.parametrize("body", [b"{not json", b"", b"[]", _raw({"model": "hr", "messages": _MSG}, S=LONE),
                                  _raw({"model": "hr", "messages": []})],
                         ids=["bad-json", "empty", "array", "surrogate", "no-messages"])
def test_the_api_key_is_checked_before_the_body(client, path, body):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEYS["hr"]}):
        _error(client.post(path, content=body, headers={**headers, **JSON}), 401, "invalid_api_key")
    assert client.post(path, content=body, headers={**_auth("hr"), **JSON}).status_code == 400


# --------------------------------------------------------------------------- 3: what errors quote


def _quotes_at_most_a_prefix(message: str, sent: str) -> None:
    assert sent not in message and len(message) <= 400, message
    longest = max((len(m) for m in re.findall(r"x+", message)), default=0)
    assert 8 <= longest <= 64, message  # a recognisable prefix, no more


def test_errors_quote_only_a_short_prefix_of_what_was_sent(client):
    big = "x" * 60_000
    err = _error(client.post(OPENAI, headers=_auth("hr"), json={"model": big, "messages": _chat(HR_Q)}),
                 404, "model_not_found")
    _quotes_at_most_a_prefix(err["message"], big)
    assert "…" in err["message"]
    err = _error(client.post(OPENAI, headers=_auth("hr"), json={"model": f"hr@{big}", "messages": _chat(HR_Q)}),
                 404, "model_not_found")
    _quotes_at_most_a_prefix(err["message"], big)
    err = _error(client.post(DEPT, headers=_auth("hr"), json={"messages": _chat(HR_Q), "prompt_version": big}),
                 404, "model_not_found")
    _quotes_at_most_a_prefix(err["message"], big)
    err = _error(client.post(DEPT, headers=_auth("hr"), json={"messages": [{"role": "user", "content": [
        {"type": big}]}]}), 400, "unsupported_content")
    _quotes_at_most_a_prefix(err["message"], big)
    err = _error(client.post(DEPT, headers=_auth("hr"), json={"messages": _chat(HR_Q), big: 1}),
                 400, "invalid_request")
    _quotes_at_most_a_prefix(err["message"], big)
    assert len(err["param"]) <= 64
    err = _error(client.post(OPENAI, headers=_auth("hr"), json={**_ok_body(), "contract": {big: 1}}),
                 400, "invalid_contract")
    _quotes_at_most_a_prefix(err["message"], big)
    err = _error(client.post(OPENAI, headers=_auth("hr"), json=_ok_body(max_tokens=int("9" * 4000))),
                 400, "max_tokens_exceeded")
    assert len(err["message"]) < 120, err["message"]


def test_a_500_names_a_request_id_and_no_server_detail(settings, real_embedder, gen, tmp_path, caplog):
    prompt_dir = shutil.copytree(settings.prompt_dir, tmp_path / "prompts")
    _damage_log(prompt_dir, IMPOSSIBLE_CHANGE)
    s = settings.model_copy(update={"prompt_dir": prompt_dir})
    with TestClient(_app(s, real_embedder, gen)) as c, caplog.at_level(logging.ERROR, logger="ragpt.service"):
        for body in (_ok_body(), _ok_body(model="hr@v2"), _ok_body(stream=True)):
            r = c.post(OPENAI, headers=_auth("hr"), json=body)
            err = _error(r, 500, "internal_error")
            assert err["type"] == "server_error"
            rid = r.headers["x-request-id"]
            assert rid in err["message"] and re.fullmatch(r"req_[0-9a-f]{16}", rid)
            assert "/" not in err["message"] and "audit" not in err["message"] and "Error" not in err["message"]
            # The detail is in the server log, under the same id.
            logged = [rec for rec in caplog.records if rid in rec.getMessage()]
            assert logged and "audit.jsonl line" in logged[0].getMessage()
        assert c.get("/healthz").status_code == 200
        assert c.post(OPENAI, headers=_auth("itfin"), json=_ok_body(model="it")).status_code == 200


# --------------------------------------------------------------------------- 4: no enumeration


def test_readyz_without_a_key_tells_only_the_status(client):
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json() == {"status": "ready"}
    assert client.get("/readyz", headers={"Authorization": "Bearer wrong"}).json() == {"status": "ready"}
    hr = client.get("/readyz", headers=_auth("hr")).json()
    assert hr["status"] == "ready" and hr["departments"] == ["hr"]
    assert client.get("/readyz", headers=_auth("all")).json()["departments"] == ["finance", "hr", "it"]


def test_a_failed_load_is_explained_only_to_a_key(settings, real_embedder, gen):
    app = create_app(_config(index="no-such-index"), settings, embedder=real_embedder, generator=gen)
    with TestClient(app) as c:
        for _ in range(500):  # bounded wait for the background load to finish failing
            if c.get("/readyz").json()["status"] != "loading":
                break
            time.sleep(0.02)
        assert c.get("/readyz").status_code == 503 and c.get("/readyz").json() == {"status": "failed"}
        with_key = c.get("/readyz", headers=_auth("hr")).json()
        assert with_key["status"] == "failed" and "no-such-index" in with_key["error"]


def _shape(r: httpx.Response, name: str) -> tuple:
    err = r.json()["error"]
    return r.status_code, err["type"], err["code"], err["param"], err["message"].replace(repr(name), "'NAME'")


def test_a_missing_and_a_forbidden_department_look_the_same(client):
    def openai_route(model):
        return client.post(OPENAI, headers=_auth("hr"), json={"model": model, "messages": _chat(IT_Q)})

    def dept_route(dept, **more):
        return client.post(f"/v1/departments/{dept}/chat", headers=_auth("hr"),
                           json={"messages": _chat(IT_Q), **more})

    forbidden, missing = openai_route("it"), openai_route("legal")
    _error(forbidden, 404, "model_not_found")
    assert "not found for this key" in forbidden.json()["error"]["message"]
    assert _shape(forbidden, "it") == _shape(missing, "legal")
    assert _shape(openai_route("it@v1"), "it@v1") == _shape(openai_route("legal@v1"), "legal@v1") \
        == _shape(forbidden, "it")
    assert _shape(dept_route("it"), "it") == _shape(dept_route("legal"), "legal") == _shape(forbidden, "it")
    assert _shape(dept_route("it", prompt_version="v1"), "it@v1") == _shape(dept_route("legal", prompt_version="v1"),
                                                                            "legal@v1")
    assert "finance" not in forbidden.text + missing.text  # names no other department either
    assert [m["id"] for m in client.get("/v1/models", headers=_auth("hr")).json()["data"]] == ["hr", "auto"]


# --------------------------------------------------------------------------- 5: unsupported OpenAI parameters

UNSUPPORTED = [
    {"tools": [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]}, {"tool_choice": "auto"},
    {"functions": [{"name": "lookup"}]}, {"function_call": "auto"}, {"response_format": {"type": "json_object"}},
    {"logprobs": True}, {"top_logprobs": 3}, {"stop": ["\n"]}, {"stop": "END"}, {"presence_penalty": 0.5},
    {"frequency_penalty": -1}, {"logit_bias": {"50256": -100}}, {"seed": 7}, {"n": 3}, {"top_p": 0.5},
]
HARMLESS = [
    {"user": "alice"}, {"top_p": 1}, {"top_p": None}, {"stream_options": {"include_usage": True}},
    {"metadata": {"ticket": "42"}}, {"n": 1}, {"presence_penalty": 0}, {"frequency_penalty": 0.0},
    {"logprobs": False}, {"tools": []}, {"tool_choice": "none"}, {"stop": None}, {"seed": None},
    {"response_format": {"type": "text"}}, {"logit_bias": {}}, {"store": False}, {"service_tier": "auto"},
]


@pytest.mark.parametrize("extra", UNSUPPORTED, ids=lambda e: "-".join(f"{k}={v}" for k, v in e.items())[:40])
def test_unsupported_openai_parameters_are_refused_by_name(client, extra):
    err = _error(client.post(OPENAI, headers=_auth("hr"), json=_ok_body(**extra)), 400, "unsupported_parameter")
    (name,) = extra
    assert err["param"] == name and name in err["message"]


def test_harmless_openai_parameters_are_accepted(client):
    for extra in HARMLESS:
        r = client.post(OPENAI, headers=_auth("hr"), json=_ok_body(**extra))
        assert r.status_code == 200, (extra, r.text)
    err = _error(client.post(OPENAI, headers=_auth("hr"), json=_ok_body(tools=[{"type": "function"}], seed=1,
                                                                           stop="x")), 400, "unsupported_parameter")
    assert all(n in err["message"] for n in ("tools", "stop", "seed"))


def test_the_openai_client_gets_bad_request_for_unsupported_parameters(settings, real_embedder, gen):
    import openai

    with live_server(_app(settings, real_embedder, gen)) as url:
        oc = openai.OpenAI(base_url=f"{url}/v1", api_key=KEYS["hr"], max_retries=0, timeout=60)
        out = oc.chat.completions.create(model="hr", messages=_chat(HR_Q), max_tokens=MAX_TOKENS, user="alice",
                                         top_p=1, metadata={"ticket": "42"})
        assert out.choices[0].message.content is not None and out.model == "hr@v1"
        with pytest.raises(openai.BadRequestError, match="response_format"):
            oc.chat.completions.create(model="hr", messages=_chat(HR_Q), response_format={"type": "json_object"})
        with pytest.raises(openai.BadRequestError, match="tools"):
            oc.chat.completions.create(model="hr", messages=_chat(HR_Q), tools=[
                {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}])
        with pytest.raises(openai.NotFoundError, match="not found for this key"):
            oc.chat.completions.create(model="it", messages=_chat(IT_Q))


# --------------------------------------------------------------------------- 6: the OpenAPI document


def test_the_openapi_document_states_the_real_status_codes(client):
    doc = client.get("/openapi.json").json()
    text = json.dumps(doc)
    assert "HTTPValidationError" not in text and "ValidationError" not in doc["components"]["schemas"]
    error_ref = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    paths = doc["paths"]
    want = {(OPENAI, "post"): {"400", "401", "404", "413", "422", "500", "503", "504"},
            ("/v1/departments/{dept}/chat", "post"): {"400", "401", "404", "413", "500", "503", "504"},
            ("/v1/prompt_embeds", "post"): {"400", "401", "404", "413", "422", "500", "503", "504"},
            ("/v1/models", "get"): {"401", "500", "503"}}
    for (path, method), statuses in want.items():
        responses = paths[path][method]["responses"]
        assert set(responses) == statuses | {"200"}, (path, sorted(responses))
        for status in statuses:
            assert responses[status]["content"] == error_ref, (path, status)
            assert responses[status]["description"]
    assert set(paths["/readyz"]["get"]["responses"]) == {"200", "503"}
    # 422 is an `auto` request no department is confident about: only the routes that take `auto`.
    assert "422" not in json.dumps({p: paths[p] for p in paths if p not in (OPENAI, "/v1/prompt_embeds")})
    detail = doc["components"]["schemas"]["ErrorDetail"]
    assert set(detail["required"]) == {"message", "type"} and set(detail["properties"]) >= {"code", "param"}
    for name in ("ChatCompletionRequest", "DepartmentChatRequest"):
        messages = doc["components"]["schemas"][name]["properties"]["messages"]
        assert messages["type"] == "array" and messages["minItems"] == 1, messages


def test_the_documented_codes_are_the_ones_answered(client):
    # A validation error is a 400 with the documented body, never FastAPI's 422 {"detail": [...]}.
    r = client.post(OPENAI, headers=_auth("hr"), json={"model": "hr", "messages": [], "temperature": "hot"})
    assert r.status_code == 400 and set(r.json()) == {"error"}
    assert r.json()["error"]["message"].endswith("(and 1 more)")


# --------------------------------------------------------------------------- 7: a damaged registry


# Lines a hand edit or a damaged disk could leave in the audit log (the registry's state).
IMPOSSIBLE_CHANGE = {"format": 2, "action": "approve", "department": "hr", "version": "v9",
                     "actor": "x", "reason": "", "time": "2026-01-01T00:00:00.000Z"}
WRONG_FROM = {"format": 2, "action": "activate", "department": "hr", "version": "v1", "from": "v7",
              "to": "v1", "actor": "x", "reason": "", "time": "2026-01-01T00:00:00.000Z"}


def _damage_log(prompt_dir: Path, line: dict | str) -> None:
    with open(prompt_dir / "audit.jsonl", "a", encoding="utf-8") as f:
        f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")


@pytest.mark.parametrize("line", [IMPOSSIBLE_CHANGE, WRONG_FROM], ids=["impossible-change", "wrong-from"])
def test_models_with_a_damaged_department_in_the_log_answer_json(settings, real_embedder, gen, tmp_path, line):
    prompt_dir = shutil.copytree(settings.prompt_dir, tmp_path / "prompts")
    _damage_log(prompt_dir, line)
    s = settings.model_copy(update={"prompt_dir": prompt_dir})
    with TestClient(_app(s, real_embedder, gen)) as c:
        r = c.get("/v1/models", headers=_auth("all"))
        assert r.status_code == 200, r.text
        models = {m["id"]: m for m in r.json()["data"]}
        assert set(models) == {"hr", "it", "finance", "auto"}
        assert models["hr"]["prompt_versions"] == [] and models["hr"]["active_prompt_version"] is None
        assert "cannot be read" in models["hr"]["error"] and "audit" not in r.text
        # The damage is the department's own: the others replay on.
        assert models["it"]["prompt_versions"] == ["v1"] and "error" not in models["it"]
        _error(c.post(OPENAI, headers=_auth("hr"), json=_ok_body()), 500, "internal_error")
        assert c.post(OPENAI, headers=_auth("itfin"), json=_ok_body(model="it")).status_code == 200
        assert c.get("/healthz").status_code == 200


@pytest.mark.parametrize("line", ["{garbage", "[1, 2]"], ids=["not-json", "not-a-record"])
def test_an_unreadable_log_fails_every_department_clearly(settings, real_embedder, gen, tmp_path, line):
    prompt_dir = shutil.copytree(settings.prompt_dir, tmp_path / "prompts")
    _damage_log(prompt_dir, line)
    s = settings.model_copy(update={"prompt_dir": prompt_dir})
    with TestClient(_app(s, real_embedder, gen)) as c:
        models = {m["id"]: m for m in c.get("/v1/models", headers=_auth("all")).json()["data"]}
        assert all("cannot be read" in models[d]["error"] for d in ("hr", "it", "finance"))
        _error(c.post(OPENAI, headers=_auth("itfin"), json=_ok_body(model="it")), 500, "internal_error")
        assert c.get("/healthz").status_code == 200


# --------------------------------------------------------------------------- 8: ragpt serve with a bad config


def _serve(tmp_path: Path, settings, gen, toml: str, *more: str, generator: Path | None = None):
    tiny = generator or tmp_path / "tiny"
    if generator is None:
        gen.model.save_pretrained(tiny)
        gen.tokenizer.save_pretrained(tiny)
    config = tmp_path / "serve.toml"
    config.write_text(f'index_dir = "{settings.index_dir}"\n' + toml)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ragpt.cli", "--generator", str(tiny), "--bf16", "off", "--threads", "1",
         "serve", "--config", str(config), "--port", str(port), "--log-level", "warning", *more],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    return proc, f"http://127.0.0.1:{port}", config


def _finish(proc) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=30)
        raise AssertionError("ragpt serve kept running with a config that cannot work") from None
    return proc.returncode, err


def _hr(key: str = "hr") -> str:
    return f'[departments.hr]\napi_keys = ["{hash_api_key(KEYS[key])}"]\n'


@pytest.mark.parametrize("toml, named", [
    ('index = "no-such-index"\n' + _hr(), "no-such-index"),
    ('index = "sample"\n' + _hr() + '[departments.legal]\napi_keys = []\n', "'legal'"),
], ids=["missing-index", "department-not-in-index"])
def test_ragpt_serve_refuses_a_config_that_cannot_work(settings, gen, tmp_path, toml, named):
    proc, url, config = _serve(tmp_path, settings, gen, toml)
    code, err = _finish(proc)
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: ") and named in lines[-1] and "--degraded" in lines[-1], err
    assert str(config) in lines[-1] and "Traceback" not in err


def test_ragpt_serve_stops_when_the_models_fail_to_load(settings, gen, tmp_path):
    # The config is fine; the generator is not (an empty folder): the load fails after the port opens.
    (tmp_path / "empty").mkdir()
    proc, url, _ = _serve(tmp_path, settings, gen, 'index = "sample"\n' + _hr(), generator=tmp_path / "empty")
    code, err = _finish(proc)
    assert code == 2, err
    last = [ln for ln in err.splitlines() if ln.strip()][-1]
    assert last.startswith("error: the service failed to load") and "--degraded" in last, err


def test_ragpt_serve_degraded_keeps_running_and_readyz_says_why(settings, gen, tmp_path):
    proc, url, _ = _serve(tmp_path, settings, gen, 'index = "no-such-index"\n' + _hr(), "--degraded")
    try:
        status = None
        for _ in range(900):  # bounded: up to ~3 min for the embedder to load on a busy machine
            assert proc.poll() is None, proc.communicate()[1]
            try:
                status = httpx.get(f"{url}/readyz", timeout=2).json()["status"]
            except httpx.HTTPError:
                status = None
            if status == "failed":
                break
            time.sleep(0.2)
        assert status == "failed"
        assert httpx.get(f"{url}/readyz").json() == {"status": "failed"}
        assert "no-such-index" in httpx.get(f"{url}/readyz", headers=_auth("hr")).json()["error"]
        assert httpx.get(f"{url}/healthz").status_code == 200
        _error(httpx.post(f"{url}{OPENAI}", headers=_auth("hr"), json=_ok_body()), 503, "not_ready")
        time.sleep(1)
        assert proc.poll() is None  # still serving
    finally:
        proc.terminate()
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate(timeout=10)
