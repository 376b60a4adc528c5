"""The trainer's chunked causal attention: same values and gradients as SDPA, SDPA where it does not apply."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from ragpt.training import causal_attention
from ragpt.training.causal_attention import IMPLEMENTATION, attention_forward, chunked_causal, chunked_causal_attention


def _qkv(B, H, KV, L, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, n, L, D, generator=g) for n in (H, KV, KV))
    return [t.to(dtype).requires_grad_() for t in (q, k, v)]


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def _value_and_grads(fn, q, k, v, dout):
    out = fn(q, k, v)
    out.backward(dout)
    return [out.detach().float()] + [t.grad.float() for t in (q, k, v)]


@pytest.mark.parametrize("B,H,KV,L,D,chunk", [
    (2, 4, 2, 37, 8, 8),    # L not a multiple of the chunk; 2 query heads per key/value head
    (1, 6, 2, 20, 16, 64),  # one chunk larger than the sequence
    (2, 3, 3, 9, 4, 1),     # one query per chunk; no grouping
    (1, 9, 3, 70, 8, 16),   # SmolLM2's 3 query heads per key/value head
])
def test_values_and_gradients_equal_sdpa_in_fp32(B, H, KV, L, D, chunk):
    dout = torch.randn(B, H, L, D, generator=torch.Generator().manual_seed(1))
    ref = _value_and_grads(_sdpa, *_qkv(B, H, KV, L, D), dout)
    got = _value_and_grads(lambda q, k, v: chunked_causal(q, k, v, chunk=chunk), *_qkv(B, H, KV, L, D), dout)
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
        torch.testing.assert_close(g, r, atol=2e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_gradcheck_in_fp64():
    q, k, v = (t.detach().double().requires_grad_() for t in _qkv(1, 4, 2, 11, 4))
    assert torch.autograd.gradcheck(lambda q, k, v: chunked_causal(q, k, v, chunk=4), (q, k, v))


def test_bf16_gradients_are_as_close_to_fp32_as_sdpa_bf16():
    B, H, KV, L, D = 2, 9, 3, 150, 64
    dout = torch.randn(B, H, L, D, generator=torch.Generator().manual_seed(1))
    ref = _value_and_grads(_sdpa, *_qkv(B, H, KV, L, D), dout)

    def error(fn):
        got = _value_and_grads(fn, *_qkv(B, H, KV, L, D, torch.bfloat16), dout.bfloat16())
        return [((g - r).norm() / r.norm()).item() for g, r in zip(got, ref)]

    ours, sdpa = error(lambda q, k, v: chunked_causal(q, k, v, chunk=32)), error(_sdpa)
    assert max(ours) < 0.02  # bf16 has 8 bits of mantissa: ~0.4% per rounding
    for name, o, s in zip(("out", "dq", "dk", "dv"), ours, sdpa):
        assert o < 2 * s + 1e-3, f"{name}: relative error {o:.4f} vs SDPA bf16 {s:.4f}"


def test_rejects_shapes_it_cannot_compute():
    q, k, v = _qkv(1, 4, 3, 10, 8)  # 4 query heads cannot share 3 key/value heads
    with pytest.raises(ValueError, match="shapes"):
        chunked_causal(q, k, v)
    q, k, v = _qkv(1, 4, 2, 10, 8)
    with pytest.raises(ValueError, match="shapes"):  # value head size other than the query's
        chunked_causal(q, k, torch.randn(1, 2, 10, 16))
    q, k, v = _qkv(1, 4, 2, 10, 8)
    with pytest.raises(ValueError, match="chunk"):
        chunked_causal(q, k, v, chunk=0)


class _Attn(torch.nn.Module):
    is_causal = True
    num_key_value_groups = 2


@pytest.fixture
def kernel_calls(monkeypatch) -> list[int]:
    """Counts the chunked kernel's invocations, to prove which path ran."""
    calls: list[int] = []
    original = causal_attention._ChunkedCausalAttention.apply

    def spy(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(causal_attention._ChunkedCausalAttention, "apply", spy)
    return calls


def test_masks_and_decoding_go_to_sdpa(kernel_calls):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = _Attn()
    q, k, v = (t.detach() for t in _qkv(2, 4, 2, 12, 8))
    mask = torch.ones(2, 1, 12, 12, dtype=torch.bool).tril()
    mask[0, :, :, :3] = False  # left padding in row 0: not expressible as plain causal attention
    mask[0, :, torch.arange(12), torch.arange(12)] = True
    cases = {
        "mask": (q, k, v, mask, {}),
        "decode": (q[:, :, -1:], k, v, None, {}),  # one new query against a cache
        "sliding window": (q, k, v, None, {"sliding_window": 4}),
    }
    for name, (qq, kk, vv, m, kw) in cases.items():
        got, _ = attention_forward(module, qq, kk, vv, m, scaling=8 ** -0.5, **kw)
        ref, _ = sdpa_attention_forward(module, qq, kk, vv, m, scaling=8 ** -0.5, **kw)
        torch.testing.assert_close(got, ref, msg=lambda s, n=name: f"{n}: {s}")
    assert kernel_calls == []
    # The plain causal case is computed by the chunked kernel, not handed on.
    got, _ = attention_forward(module, q, k, v, None, scaling=8 ** -0.5)
    assert kernel_calls == [1]
    torch.testing.assert_close(got, _sdpa(q, k, v).transpose(1, 2))


def test_model_outputs_are_unchanged_inside_the_context(tiny_model, kernel_calls):
    """Left padding, a KV cache continuation and a plain forward: same logits inside and outside."""
    from transformers import DynamicCache

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, tiny_model.config.vocab_size, (2, 10), generator=g)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :4] = 0  # row 0 left-padded, as the generator batches prompts

    def outputs():
        padded = tiny_model(input_ids=ids, attention_mask=mask).logits
        cache = DynamicCache(config=tiny_model.config)
        tiny_model(input_ids=ids[:, :6], cache=cache, use_cache=True)
        continued = tiny_model(input_ids=ids[:, 6:], cache=cache, use_cache=True).logits
        plain = tiny_model(input_ids=ids).logits
        return padded, continued, plain

    outside = outputs()
    with chunked_causal_attention(tiny_model):
        inside = outputs()
    for name, a, b in zip(("left padding", "cache continuation", "plain"), inside, outside):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda s, n=name: f"{n}: {s}")
    # Only the plain forward (and the cache's first, mask-free prefill) used the chunked kernel.
    assert len(kernel_calls) == 2 * tiny_model.config.num_hidden_layers


def test_context_switches_the_model_and_restores_it_even_on_error(tiny_model):
    before = tiny_model.config._attn_implementation
    with chunked_causal_attention(tiny_model):
        assert tiny_model.config._attn_implementation == IMPLEMENTATION
        with chunked_causal_attention(tiny_model):  # nested: stays on, restores nothing early
            pass
        assert tiny_model.config._attn_implementation == IMPLEMENTATION
    assert tiny_model.config._attn_implementation == before
    with pytest.raises(RuntimeError), chunked_causal_attention(tiny_model):
        raise RuntimeError("boom")
    assert tiny_model.config._attn_implementation == before


def test_trainer_loss_and_prompt_gradient_equal_the_sdpa_path(tiny_model, tiny_tokenizer, monkeypatch, kernel_calls):
    """answer_loss_sum over several query chunks gives what the model computes with SDPA."""
    import ragpt.training.trainer as train
    from ragpt.data.qa import QAExample
    from ragpt.training.trainer import PromptModule, TrainExample, answer_loss_sum

    tok = tiny_tokenizer
    rows = []
    for i in range(3):
        text = f"question {i} " + "about vacation days and the VPN " * (i + 2)
        prompt = tok(text, add_special_tokens=False)["input_ids"]
        answer = tok(f"{5 * (i + 1)} days", add_special_tokens=False)["input_ids"]
        rows.append(TrainExample(prompt + answer, len(prompt), QAExample("q", ["a"]), prompt, True))
    monkeypatch.setattr(causal_attention, "CHUNK", 5)  # many chunks on short rows

    def run(attention):
        monkeypatch.setattr(train, "chunked_causal_attention", attention)
        module = PromptModule(torch.randn(4, tiny_model.config.hidden_size, generator=torch.Generator().manual_seed(0)))
        loss, _ = answer_loss_sum(tiny_model, module, rows, contextlib.nullcontext)
        loss.backward()
        return loss.item(), module.prompt.grad

    chunked_loss, chunked_grad = run(chunked_causal_attention)
    assert len(kernel_calls) == tiny_model.config.num_hidden_layers  # one padded group, every layer
    sdpa_loss, sdpa_grad = run(lambda model: contextlib.nullcontext())
    assert len(kernel_calls) == tiny_model.config.num_hidden_layers
    assert chunked_loss == pytest.approx(sdpa_loss, rel=1e-5)
    torch.testing.assert_close(chunked_grad, sdpa_grad, atol=1e-5, rtol=1e-4)


def test_under_autocast_with_mixed_input_dtypes(tiny_model, tiny_tokenizer):
    """Under bf16 autocast rotary embeddings can hand over fp32 q/k with a bf16 v: still works."""
    q, k, v = _qkv(1, 4, 2, 30, 8)
    vb = v.detach().bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = chunked_causal(q, k, vb, chunk=7)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert q.grad.dtype == torch.float32 and vb.grad.dtype == torch.bfloat16
    ref = _sdpa(*(t.detach() for t in (q, k, v)))
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.05)
    # And a whole trainer loss under autocast on the fp32 model, as the throughput benchmark runs it.
    from ragpt.data.qa import QAExample
    from ragpt.training.trainer import PromptModule, TrainExample, answer_loss_sum

    ids = tiny_tokenizer("vacation days and the VPN " * 20, add_special_tokens=False)["input_ids"]
    row = TrainExample(ids, len(ids) - 3, QAExample("q", ["a"]), ids[:-3], True)
    module = PromptModule(torch.randn(4, tiny_model.config.hidden_size))
    loss, _ = answer_loss_sum(tiny_model, module, [row, row],
                              lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    loss.backward()
    assert torch.isfinite(module.prompt.grad).all() and module.prompt.grad.abs().sum() > 0
