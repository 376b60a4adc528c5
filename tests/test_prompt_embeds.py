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
from pathlib import Path

import pytest
import torch

from ragpt.errors import SoftPromptError
from ragpt.lm.generator import Generator
from ragpt.lm.template import ContextPassage
from ragpt.serving.contract import InputContract
from ragpt.serving.prompt_embeds import (
    DeepPromptEmbedsError,
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


def _prepared(gen: Generator, soft: torch.Tensor | None, question: str = "How many vacation days do I get?",
              max_new_tokens: int = 8) -> PreparedRequest:
    """A prepared row built by the request path's input builder (no index needed)."""
    contract = InputContract(max_context_tokens=2048)
    built = build_inputs(gen.tokenizer, contract, question, PASSAGES, department="hr")
    return PreparedRequest(request=ChatRequest(question, "hr"), department="hr", prompt_version="v1",
                           soft_prompt=soft, prefix_key=None if soft is None else ("test", "hr", "v1"),
                           contract=contract, overrides={}, query=question, hits=[], built=built,
                           max_new_tokens=max_new_tokens, temperature=0.0)


def _soft(gen: Generator, n: int, seed: int, depth: int | None = None) -> torch.Tensor:
    scale = float(gen.embedding.weight.std())
    shape = (n, gen.hidden_size) if depth is None else (depth, n, gen.hidden_size)
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


@pytest.fixture(scope="module")
def tiny_gen(tiny_tokenizer):
    from conftest import build_tiny_model

    return Generator(build_tiny_model(tiny_tokenizer), tiny_tokenizer)


def test_the_tensor_is_the_soft_prompt_then_the_prompts_token_embeddings(tiny_gen):
    soft = _soft(tiny_gen, 5, seed=1)
    p = _prepared(tiny_gen, soft)
    t = prompt_embeds_tensor(tiny_gen, p)
    assert t.shape == (5 + len(p.ids), tiny_gen.hidden_size) and t.dtype == torch.float32
    torch.testing.assert_close(t[:5], soft, rtol=0, atol=0)
    with torch.inference_mode():
        tokens = tiny_gen.embedding(torch.tensor(p.ids))
    torch.testing.assert_close(t[5:], tokens, rtol=0, atol=0)
    # No soft prompt: the token embeddings alone.
    torch.testing.assert_close(prompt_embeds_tensor(tiny_gen, _prepared(tiny_gen, None)), tokens, rtol=0, atol=0)


def test_fed_as_inputs_embeds_the_tensor_gives_ragpts_logits_and_greedy_answer(tiny_gen):
    soft = _soft(tiny_gen, 5, seed=2)
    p = _prepared(tiny_gen, soft, max_new_tokens=10)
    t = prompt_embeds_tensor(tiny_gen, p)
    # ragpt as served: the soft prompt's KV from the prefix cache, then the token ids.
    served = tiny_gen.prefill([p.ids], [soft], [p.prefix_key]).logits[0]
    torch.testing.assert_close(_hf_last_logits(tiny_gen.model, t), served, rtol=1e-4, atol=1e-4)
    ragpt = tiny_gen.generate([p.ids], [soft], max_new_tokens=10, prefix_keys=[p.prefix_key])[0].token_ids
    _same_answer(ragpt, _hf_greedy(tiny_gen.model, t, 10), tiny_gen.stop_ids)
    # And a different soft prompt gives different logits: the test can tell inputs apart.
    other = prompt_embeds_tensor(tiny_gen, _prepared(tiny_gen, _soft(tiny_gen, 5, seed=3)))
    assert not torch.allclose(_hf_last_logits(tiny_gen.model, other), served, atol=1e-2)


def test_a_reduced_precision_tensor_is_the_same_tensor_cast(tiny_gen):
    p = _prepared(tiny_gen, _soft(tiny_gen, 4, seed=4))
    full = prompt_embeds_tensor(tiny_gen, p)
    for name, dtype in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        t = prompt_embeds_tensor(tiny_gen, p, dtype=name)
        assert t.dtype == dtype and torch.equal(t, full.to(dtype))
    with pytest.raises(SoftPromptError, match="dtype must be one of float32, bfloat16, float16"):
        prompt_embeds_tensor(tiny_gen, p, dtype="int8")


def test_a_deep_prompt_is_refused_with_what_to_do_instead(tiny_gen):
    deep = _soft(tiny_gen, 4, seed=5, depth=2)
    with pytest.raises(DeepPromptEmbedsError) as e:
        prompt_embeds_tensor(tiny_gen, _prepared(tiny_gen, deep))
    msg = str(e.value)
    assert "hr v1 is a deep prompt (2 layers x 4 positions)" in msg
    assert "hr@none" in msg and "ragpt prompts export" in msg and "docs/scale-out.md" in msg
    # Depth 1 is a plain prompt in a deep prompt's shape: accepted, the same tensor as the plain one.
    plain = deep[:1]
    torch.testing.assert_close(prompt_embeds_tensor(tiny_gen, _prepared(tiny_gen, plain)),
                               prompt_embeds_tensor(tiny_gen, _prepared(tiny_gen, plain[0])), rtol=0, atol=0)


# --------------------------------------------------------------------------- the base64 form


def _vllm_load(text: str) -> torch.Tensor:
    """vLLM's reader (vllm/entrypoints/renderer.py, BaseRenderer.load_prompt_embeds), with the standard
    base64 module in place of pybase64 (the same alphabet and validation)."""
    return torch.load(io.BytesIO(base64.b64decode(text, validate=True)), weights_only=True,
                      map_location=torch.device("cpu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_the_base64_form_decodes_to_the_same_tensor(tiny_gen, dtype):
    t = prompt_embeds_tensor(tiny_gen, _prepared(tiny_gen, _soft(tiny_gen, 3, seed=6)), dtype=dtype)
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
