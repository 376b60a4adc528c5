"""A request's input as prompt embeddings (ragpt.serving.prompt_embeds), for vLLM's `prompt_embeds`.

The tensor must be what ragpt feeds its own model: given to the same transformers model as
`inputs_embeds` it gives ragpt's logits and ragpt's greedy answer (tiny random model, and the real
SmolLM2 with a shipped plain prompt). The base64 form must decode, with `torch.load(weights_only=True)`
as vLLM reads it, to the same tensor. Over HTTP (`POST /v1/prompt_embeds`, a live uvicorn from the
service tests' fixtures) the route returns the same tensor, enforces the keys, and a deep prompt
gets a clear 400.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load as st_load
from test_service import HR_Q, IT_Q, MAX_TOKENS, _app, _auth, client, gen, live, pipe, settings  # noqa: F401 - fixtures

from ragpt.errors import SoftPromptError
from ragpt.lm.generator import Generator
from ragpt.lm.template import ContextPassage
from ragpt.serving.contract import InputContract
from ragpt.serving.prompt_embeds import (
    DeepPromptEmbedsError,
    build_prompt_embeds,
    decode_prompt_embeds,
    encode_prompt_embeds,
    prompt_embeds_tensor,
)
from ragpt.serving.request import ChatRequest, PreparedRequest, build_inputs

REPO_PROMPTS = Path(__file__).resolve().parents[1] / "prompts"
PASSAGES = [ContextPassage(text="Employees get 25 vacation days per year and may carry over five days.",
                           source="hr/vacation-policy.txt", title="Vacation policy"),
            ContextPassage(text="Reset your password every 90 days; use at least 12 characters.",
                           source="it/passwords.md", title="Passwords")]


@pytest.fixture(scope="module", autouse=True)
def _threads(one_torch_thread_per_module):
    """See conftest.one_torch_thread_per_module."""


def _prepared(g: Generator, soft: torch.Tensor | None, question: str = "How many vacation days do I get?",
              max_new_tokens: int = 8) -> PreparedRequest:
    """A prepared row built by the request path's input builder (no index needed)."""
    contract = InputContract(max_context_tokens=2048)
    built = build_inputs(g.tokenizer, contract, question, PASSAGES, department="hr")
    return PreparedRequest(request=ChatRequest(question, "hr"), department="hr", prompt_version="v1",
                           soft_prompt=soft, prefix_key=None if soft is None else ("test", "hr", "v1"),
                           contract=contract, overrides={}, query=question, hits=[], built=built,
                           max_new_tokens=max_new_tokens, temperature=0.0)


def _soft(g: Generator, n: int, seed: int, depth: int | None = None) -> torch.Tensor:
    scale = float(g.embedding.weight.std())
    shape = (n, g.hidden_size) if depth is None else (depth, n, g.hidden_size)
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


@torch.inference_mode()
def _hf_last_logits(model, embeds: torch.Tensor) -> torch.Tensor:
    """What an engine computes from the tensor alone: the model on inputs_embeds, positions 0..T-1."""
    out = model(inputs_embeds=embeds[None].to(model.get_input_embeddings().weight.dtype),
                attention_mask=torch.ones((1, embeds.shape[0]), dtype=torch.long))
    return out.logits[0, -1].float()


@torch.inference_mode()
def _hf_greedy(model, embeds: torch.Tensor, n: int) -> list[int]:
    out = model.generate(inputs_embeds=embeds[None], attention_mask=torch.ones((1, embeds.shape[0]), dtype=torch.long),
                         max_new_tokens=n, do_sample=False)
    return out[0].tolist()  # with inputs_embeds only, generate returns the new tokens


def _same_answer(ragpt_tokens: list[int], hf_tokens: list[int], stop_ids: set[int]) -> None:
    """ragpt stops at its stop tokens and at loops; up to there the tokens must be the same."""
    assert ragpt_tokens, "ragpt generated nothing"
    assert hf_tokens[: len(ragpt_tokens)] == ragpt_tokens
    if ragpt_tokens[-1] not in stop_ids and len(ragpt_tokens) == len(hf_tokens):
        assert hf_tokens == ragpt_tokens


# --------------------------------------------------------------------------- the tensor (tiny model)


def test_the_tensor_is_the_soft_prompt_then_the_prompts_token_embeddings(gen):  # noqa: F811 - the imported fixture
    soft = _soft(gen, 5, seed=1)
    p = _prepared(gen, soft)
    t = prompt_embeds_tensor(gen, p)
    assert t.shape == (5 + len(p.ids), gen.hidden_size) and t.dtype == torch.float32
    torch.testing.assert_close(t[:5], soft, rtol=0, atol=0)
    with torch.inference_mode():
        tokens = gen.embedding(torch.tensor(p.ids))
    torch.testing.assert_close(t[5:], tokens, rtol=0, atol=0)
    # No soft prompt: the token embeddings alone.
    torch.testing.assert_close(prompt_embeds_tensor(gen, _prepared(gen, None)), tokens, rtol=0, atol=0)


def test_fed_as_inputs_embeds_the_tensor_gives_ragpts_logits_and_greedy_answer(gen):  # noqa: F811 - the imported fixture
    soft = _soft(gen, 5, seed=2)
    p = _prepared(gen, soft, max_new_tokens=10)
    t = prompt_embeds_tensor(gen, p)
    # ragpt as served: the soft prompt's KV from the prefix cache, then the token ids.
    served = gen.prefill([p.ids], [soft], [p.prefix_key]).logits[0]
    torch.testing.assert_close(_hf_last_logits(gen.model, t), served, rtol=1e-4, atol=1e-4)
    ragpt = gen.generate([p.ids], [soft], max_new_tokens=10, prefix_keys=[p.prefix_key])[0].token_ids
    _same_answer(ragpt, _hf_greedy(gen.model, t, 10), gen.stop_ids)
    # And a different soft prompt gives different logits: the test can tell inputs apart.
    other = prompt_embeds_tensor(gen, _prepared(gen, _soft(gen, 5, seed=3)))
    assert not torch.allclose(_hf_last_logits(gen.model, other), served, atol=1e-2)


def test_a_reduced_precision_tensor_is_the_same_tensor_cast(gen):  # noqa: F811 - the imported fixture
    p = _prepared(gen, _soft(gen, 4, seed=4))
    full = prompt_embeds_tensor(gen, p)
    for name, dtype in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        t = prompt_embeds_tensor(gen, p, dtype=name)
        assert t.dtype == dtype and torch.equal(t, full.to(dtype))
    with pytest.raises(SoftPromptError, match="dtype must be one of float32, bfloat16, float16"):
        prompt_embeds_tensor(gen, p, dtype="int8")


def test_a_deep_prompt_is_refused_with_what_to_do_instead(gen):  # noqa: F811 - the imported fixture
    deep = _soft(gen, 4, seed=5, depth=2)
    with pytest.raises(DeepPromptEmbedsError) as e:
        prompt_embeds_tensor(gen, _prepared(gen, deep))
    msg = str(e.value)
    assert "hr v1 is a deep prompt (2 layers x 4 positions)" in msg
    assert "hr@none" in msg and "ragpt prompts export" in msg and "docs/scale-out.md" in msg
    # Depth 1 is a plain prompt in a deep prompt's shape: accepted, the same tensor as the plain one.
    plain = deep[:1]
    torch.testing.assert_close(prompt_embeds_tensor(gen, _prepared(gen, plain)),
                               prompt_embeds_tensor(gen, _prepared(gen, plain[0])), rtol=0, atol=0)


# --------------------------------------------------------------------------- the base64 form


def _vllm_load(text: str) -> torch.Tensor:
    """vLLM's reader (vllm/entrypoints/renderer.py, BaseRenderer.load_prompt_embeds), with the standard
    base64 module in place of pybase64 (the same alphabet and validation)."""
    return torch.load(io.BytesIO(base64.b64decode(text, validate=True)), weights_only=True,
                      map_location=torch.device("cpu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_the_base64_form_decodes_to_the_same_tensor(gen, dtype):  # noqa: F811 - the imported fixture
    t = prompt_embeds_tensor(gen, _prepared(gen, _soft(gen, 3, seed=6)), dtype=dtype)
    text = encode_prompt_embeds(t)
    assert isinstance(text, str) and text.isascii()
    for back in (decode_prompt_embeds(text), _vllm_load(text)):
        assert back.dtype == dtype and torch.equal(back, t)


def test_a_slice_is_encoded_without_the_rest_of_its_storage():
    big = torch.randn(1000, 64)
    assert len(encode_prompt_embeds(big[:2])) < len(encode_prompt_embeds(big)) / 100


class _NotATensor:
    def __reduce__(self):
        return (print, ("pickled code ran",))


@pytest.mark.parametrize("payload, why", [
    (b"not base64 at all!", "not valid base64"),
    (base64.b64encode(b"plain bytes"), "not a torch.save'd tensor"),
], ids=["bad-base64", "not-torch"])
def test_decoding_refuses_what_is_not_base64_of_a_saved_tensor(payload, why):
    with pytest.raises(SoftPromptError, match=why):
        decode_prompt_embeds(payload)


def test_decoding_never_unpickles_objects_and_refuses_sparse_or_misshapen_tensors(capsys):
    def enc(obj) -> str:
        buf = io.BytesIO()
        torch.save(obj, buf)
        return base64.b64encode(buf.getvalue()).decode()

    with pytest.raises(SoftPromptError, match="not a torch.save'd tensor"):
        decode_prompt_embeds(enc(_NotATensor()))
    assert "pickled code ran" not in capsys.readouterr().out
    sparse = torch.sparse_coo_tensor(torch.tensor([[0], [0]]), torch.tensor([1.0]), size=(4, 8))
    for bad in (sparse, torch.zeros(2, 3, 4), torch.zeros(3, 4, dtype=torch.int64), {"t": torch.zeros(3, 4)}):
        with pytest.raises(SoftPromptError, match="one dense 2-D float"):
            decode_prompt_embeds(enc(bad))


# --------------------------------------------------------------------------- through the request path
# The service tests' fixtures: the tiny generator (`gen`), the sample index with their registry (hr v1
# active, v2 approved, v3 draft: plain prompts), the library pipeline (`pipe`) and a live uvicorn (`live`).


def _hf_text(g: Generator, embeds: torch.Tensor, n: int) -> str:
    """The greedy answer an engine given only the tensor produces, cut and decoded as ragpt does."""
    tokens = _hf_greedy(g.model, embeds, n)
    stop = next((i for i, t in enumerate(tokens) if t in g.stop_ids), len(tokens))
    return g.tokenizer.decode(tokens[:stop], skip_special_tokens=True).strip()


@pytest.mark.integration
def test_the_request_paths_tensor_gives_the_pipelines_logits_answer_and_citations(pipe, gen):  # noqa: F811
    req = ChatRequest(HR_Q, "hr", max_new_tokens=MAX_TOKENS)
    pe = build_prompt_embeds(pipe, req)
    p = pe.prepared
    assert (p.department, p.prompt_version, pe.soft_prompt_tokens) == ("hr", "v1", 3)
    assert pe.prompt_tokens == 3 + len(p.ids) == pe.tensor.shape[0]
    served = gen.prefill([p.ids], [p.soft_prompt], [p.prefix_key]).logits[0]
    torch.testing.assert_close(_hf_last_logits(gen.model, pe.tensor), served, rtol=1e-4, atol=1e-4)
    answer = pipe.ask(HR_Q, "hr", max_new_tokens=MAX_TOKENS)
    assert _hf_text(gen, pe.tensor, MAX_TOKENS) == answer.text
    assert p.citations == answer.citations and p.citations
    body = pe.completion_body(model="smollm2")
    assert body["model"] == "smollm2" and body["max_tokens"] == MAX_TOKENS and body["stop_token_ids"]
    assert torch.equal(decode_prompt_embeds(body["prompt_embeds"]), pe.tensor)


@pytest.mark.integration
def test_the_real_model_with_a_shipped_plain_prompt_answers_from_the_tensor_as_ragpt_does(
        sample_index, real_embedder, real_generator):
    """SmolLM2-135M-Instruct and dmv v4, a plain prompt shipped in prompts/ (checksum and base model
    checked on load), on an hr question of the sample index."""
    from ragpt.retrieval.index import DocumentIndex
    from ragpt.serving.pipeline import Pipeline
    from ragpt.softprompts.artifact import base_model_fingerprint
    from ragpt.softprompts.registry import PromptRegistry

    s, name = sample_index
    model, tokenizer = real_generator
    real_gen = Generator(model, tokenizer)
    shipped = PromptRegistry(REPO_PROMPTS).load("dmv", "v4", base_fingerprint=base_model_fingerprint(model),
                                                hidden_size=real_gen.hidden_size, max_depth=real_gen.max_prompt_depth)
    assert shipped.tensor.dim() == 2 and shipped.tensor.shape == (20, 576)
    real_pipe = Pipeline(DocumentIndex.open(s.index_dir, name), s, embedder=real_embedder, generator=real_gen)
    req = ChatRequest(HR_Q, "hr", soft_prompt=shipped.tensor, prompt_label="dmv-v4", max_new_tokens=16)
    pe = build_prompt_embeds(real_pipe, req)
    p = pe.prepared
    assert pe.soft_prompt_tokens == 20 and p.citations
    served = real_gen.prefill([p.ids], [p.soft_prompt], [p.prefix_key]).logits[0]
    torch.testing.assert_close(_hf_last_logits(model, pe.tensor), served, rtol=1e-3, atol=1e-3)
    answer = real_pipe.ask_many([req])[0]
    assert answer.text and _hf_text(real_gen, pe.tensor, 16) == answer.text
    # The shipped hr prompt is a deep one: the same request with it is refused, saying why.
    deep_pipe = Pipeline(real_pipe.index, s.model_copy(update={"prompt_dir": REPO_PROMPTS}),
                         embedder=real_embedder, generator=real_gen)
    with pytest.raises(DeepPromptEmbedsError, match=r"hr v1 is a deep prompt \(30 layers x 20 positions\)"):
        build_prompt_embeds(deep_pipe, ChatRequest(HR_Q, "hr"))


# --------------------------------------------------------------------------- over HTTP


def _body(model: str = "hr", question: str = HR_Q, **more) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": MAX_TOKENS, **more}


@pytest.mark.integration
def test_the_live_route_returns_the_request_paths_tensor_which_answers_as_the_service_does(live, pipe, gen):  # noqa: F811
    url, _ = live
    r = httpx.post(f"{url}/v1/prompt_embeds", headers=_auth("hr"), json=_body(), timeout=60)
    assert r.status_code == 200, r.text
    data = r.json()
    expected = build_prompt_embeds(pipe, ChatRequest(HR_Q, "hr", max_new_tokens=MAX_TOKENS))
    tensor = decode_prompt_embeds(data["prompt_embeds"])
    assert torch.equal(tensor, expected.tensor)
    assert data["shape"] == list(tensor.shape) and data["dtype"] == "float32"
    assert data["encoding"] == "base64-torch-save" and data["object"] == "prompt_embeds"
    assert (data["model"], data["department"], data["prompt_version"]) == ("hr@v1", "hr", "v1")
    assert (data["soft_prompt_tokens"], data["prompt_tokens"]) == (3, expected.prompt_tokens)
    assert data["max_tokens"] == MAX_TOKENS and data["stop_token_ids"] == expected.stop_token_ids
    assert [(c["source"], c["chunk"]) for c in data["citations"]] == [(c.source, c.chunk)
                                                                     for c in expected.prepared.citations]
    assert data["contract"] == expected.prepared.contract.to_dict() and data["contract_overrides"] == {}
    # What an engine answers from the tensor is what the same service answers to the same body.
    chat = httpx.post(f"{url}/v1/chat/completions", headers=_auth("hr"), json=_body(), timeout=60).json()
    assert _hf_text(gen, tensor, MAX_TOKENS) == chat["choices"][0]["message"]["content"]
    # Same body options as a chat completion: a pinned version, a contract override, bfloat16.
    r = httpx.post(f"{url}/v1/prompt_embeds", headers=_auth("hr"),
                   json=_body("hr@v2", contract={"k": 1}, dtype="bfloat16"), timeout=60)
    assert r.status_code == 200, r.text
    data = r.json()
    v2 = build_prompt_embeds(pipe, ChatRequest(HR_Q, "hr", prompt="v2", overrides={"k": 1},
                                               max_new_tokens=MAX_TOKENS), dtype="bfloat16")
    assert data["model"] == "hr@v2" and data["dtype"] == "bfloat16" and len(data["citations"]) == 1
    assert data["contract_overrides"] == {"k": {"contract": 2, "used": 1}}
    assert torch.equal(decode_prompt_embeds(data["prompt_embeds"]), v2.tensor)


@pytest.mark.integration
@pytest.mark.parametrize("headers, model, status, code", [
    ({}, "hr", 401, "invalid_api_key"),
    ({"Authorization": "Bearer not-a-key"}, "hr", 401, "invalid_api_key"),
    ({"Authorization": "Basic a2V5"}, "hr", 401, "invalid_api_key"),
    ("hr", "it", 404, "model_not_found"),  # a key of hr only
    ("itfin", "hr", 404, "model_not_found"),
    ("hr", "hr@v3", 404, "model_not_found"),  # a draft is not served
], ids=["no-key", "unknown-key", "not-bearer", "other-department", "other-key", "draft"])
def test_the_live_route_enforces_the_keys_and_versions_like_the_chat_routes(live, headers, model, status,  # noqa: F811
                                                                             code):
    url, _ = live
    headers = _auth(headers) if isinstance(headers, str) else headers
    r = httpx.post(f"{url}/v1/prompt_embeds", headers=headers, json=_body(model), timeout=60)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code and "prompt_embeds" not in r.json()


@pytest.mark.integration
@pytest.mark.parametrize("body, code, param", [
    (_body(stream=True), "unsupported_parameter", "stream"),
    (_body(dtype="int8"), "invalid_request", "dtype"),
    (_body(tools=[{"type": "function"}]), "unsupported_parameter", "tools"),
    (_body(max_tokens=10_000), "max_tokens_exceeded", "max_tokens"),
    (_body(question="x " * 3000), "question_too_long", "messages"),
], ids=["stream", "dtype", "tools", "max-tokens", "long-question"])
def test_the_live_route_refuses_bad_bodies_with_the_chat_routes_errors(live, body, code, param):  # noqa: F811
    url, _ = live
    r = httpx.post(f"{url}/v1/prompt_embeds", headers=_auth("hr"), json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["param"] == param and len(err["message"]) <= 400


@pytest.mark.integration
def test_a_deep_prompt_version_gets_a_clear_400_and_is_still_answered_by_the_chat_route(
        settings, real_embedder, gen, tmp_path):  # noqa: F811
    from ragpt.softprompts.artifact import SoftPrompt, base_model_fingerprint
    from ragpt.softprompts.registry import PromptRegistry

    root = shutil.copytree(settings.prompt_dir, tmp_path / "prompts")
    reg = PromptRegistry(root)
    deep = _soft(gen, 3, seed=7, depth=2)
    v = reg.register(SoftPrompt.create(deep, department="hr", base_fingerprint=base_model_fingerprint(gen.model)),
                     actor="test")
    reg.approve("hr", v, actor="test")
    s = settings.model_copy(update={"prompt_dir": root})
    with TestClient(_app(s, real_embedder, gen)) as c:
        r = c.post("/v1/prompt_embeds", headers=_auth("hr"), json=_body(f"hr@{v}"))
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["code"] == "deep_prompt_unsupported" and err["param"] == "model"
        assert f"hr {v} is a deep prompt (2 layers x 3 positions)" in err["message"]
        assert "hr@none" in err["message"] and str(root) not in err["message"]
        assert c.post("/v1/chat/completions", headers=_auth("hr"), json=_body(f"hr@{v}")).status_code == 200
        assert c.post("/v1/prompt_embeds", headers=_auth("hr"), json=_body("hr@none")).json()["soft_prompt_tokens"] == 0


@pytest.mark.integration
def test_auto_routes_as_the_chat_route_does_and_a_refusal_is_the_documented_422(
        settings, real_embedder, gen, pipe):  # noqa: F811
    body = _body("auto", IT_Q)
    with TestClient(_app(settings, real_embedder, gen)) as c:
        data = c.post("/v1/prompt_embeds", headers=_auth("all"), json=body).json()
        assert data["department"] == "it" and data["routing"]["soft_prompt"] is True
        expected = build_prompt_embeds(pipe, ChatRequest(IT_Q, "it", max_new_tokens=MAX_TOKENS))
        assert torch.equal(decode_prompt_embeds(data["prompt_embeds"]), expected.tensor)
    refuse = {"min_confidence": 1.0, "below_threshold": "refuse"}
    with TestClient(_app(settings, real_embedder, gen, router=refuse)) as c:
        r = c.post("/v1/prompt_embeds", headers=_auth("all"), json=body)
        assert r.status_code == 422 and r.json()["error"]["code"] == "routing_uncertain"


@pytest.mark.integration
def test_the_route_is_documented_with_the_statuses_it_answers(client):  # noqa: F811
    op = client.get("/openapi.json").json()["paths"]["/v1/prompt_embeds"]["post"]
    assert set(op["responses"]) == {"200", "400", "401", "404", "413", "422", "500", "503", "504"}
    ok = op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    assert ok.endswith("/PromptEmbedsResponse")
    assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/PromptEmbedsRequest")


# --------------------------------------------------------------------------- ragpt ask --prompt-embeds-out


@pytest.mark.integration
def test_ask_writes_the_tensor_or_a_vllm_completions_body_and_refuses_a_deep_prompt(
        sample_index, real_embedder, real_generator, tmp_path):
    """The CLI on the real model: a plain prompt registered for hr (the shipped dmv v4 tensor)."""
    from typer.testing import CliRunner

    from ragpt.cli.main import app
    from ragpt.retrieval.index import DocumentIndex
    from ragpt.serving.pipeline import Pipeline
    from ragpt.softprompts.artifact import SoftPrompt, base_model_fingerprint
    from ragpt.softprompts.registry import PromptRegistry

    s, name = sample_index
    model, tokenizer = real_generator
    fp = base_model_fingerprint(model)
    plain = PromptRegistry(REPO_PROMPTS).load("dmv", "v4", base_fingerprint=fp).tensor
    reg = PromptRegistry(tmp_path / "prompts")
    version = reg.register(SoftPrompt.create(plain, department="hr", base_fingerprint=fp), actor="test")
    common = ["--index-dir", str(s.index_dir), "--prompt-dir", str(reg.root), "--bf16", "off"]
    ask = ["ask", HR_Q, "-d", "hr", "-i", name, "--prompt", version, "--max-tokens", "12"]
    runner = CliRunner()
    res = runner.invoke(app, [*common, *ask, "--prompt-embeds-out", str(tmp_path / "req.json")])
    assert res.exit_code == 0, res.output
    assert f"(hr {version}: 20 soft-prompt positions + " in res.output and "[1] hr/" in res.output
    body = json.loads((tmp_path / "req.json").read_text())
    assert set(body) == {"prompt", "prompt_embeds", "max_tokens", "temperature", "stop_token_ids"}
    assert body["max_tokens"] == 12 and body["prompt"] == ""
    real_pipe = Pipeline(DocumentIndex.open(s.index_dir, name),
                    s.model_copy(update={"prompt_dir": reg.root, "max_new_tokens": 12}),
                    embedder=real_embedder, generator=Generator(model, tokenizer))
    expected = build_prompt_embeds(real_pipe, ChatRequest(HR_Q, "hr", prompt=version))
    assert torch.equal(decode_prompt_embeds(body["prompt_embeds"]), expected.tensor)

    res = runner.invoke(app, [*common, *ask, "--prompt-embeds-out", str(tmp_path / "x.safetensors"),
                              "--prompt-embeds-dtype", "bfloat16", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["dtype"] == "bfloat16" and summary["prompt_version"] == version
    loaded = st_load((tmp_path / "x.safetensors").read_bytes())["prompt_embeds"]
    assert torch.equal(loaded, expected.tensor.to(torch.bfloat16))

    res = runner.invoke(app, ["--index-dir", str(s.index_dir), "--prompt-dir", str(REPO_PROMPTS),
                              "ask", HR_Q, "-d", "hr", "-i", name, "--prompt-embeds-out", str(tmp_path / "d.json")])
    assert res.exit_code == 2 and "is a deep prompt (30 layers x 20 positions)" in res.output
    assert not (tmp_path / "d.json").exists()


@pytest.mark.integration
def test_a_build_beyond_the_limit_is_refused_at_once(settings, real_embedder, gen):  # noqa: F811
    """One build at a time: while it runs (held here on its pipeline's prompt lock, which every build
    with a soft prompt takes), a second request is a 503 `overloaded` with Retry-After, not a wait;
    once the first has finished, the next is built."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    from conftest import live_server

    app = _app(settings, real_embedder, gen, limits={"max_prompt_embeds_in_flight": 1, "retry_after_s": 2})
    with live_server(app) as url:
        rt = app.state.runtime
        lock = rt.pipelines["hr"]._prompts_lock

        def post(timeout: float = 60) -> httpx.Response:
            return httpx.post(f"{url}/v1/prompt_embeds", headers=_auth("hr"), json=_body(), timeout=timeout)

        with ThreadPoolExecutor(1) as pool:
            lock.acquire()
            try:
                first = pool.submit(post)
                deadline = time.monotonic() + 30
                while rt.prompt_embeds_builds.count < 1 and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert rt.prompt_embeds_builds.count == 1
                second = post(timeout=10)  # refused at once; a wait behind the held build would time out
                assert second.status_code == 503, second.text
                assert second.json()["error"]["code"] == "overloaded" and second.headers["Retry-After"] == "2"
                assert not first.done()
            finally:
                lock.release()
            assert first.result().status_code == 200
        deadline = time.monotonic() + 30
        while rt.prompt_embeds_builds.count and time.monotonic() < deadline:
            time.sleep(0.01)
        assert rt.prompt_embeds_builds.count == 0
        assert post().status_code == 200
