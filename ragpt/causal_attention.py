"""Causal self-attention for prompt-tuning steps on CPU, computed in query chunks.

Why: in a training step of the embedded 135M generator (8 rows x ~530 tokens) half the time was
PyTorch's CPU flash-attention kernel (forward + backward ~90 ms per layer, about a tenth of the
rate the same CPU reaches on the model's bf16 matmuls). This computes the same attention as
plain batched matmuls, which run on AMX, one block of `chunk` queries at a time:

- a query block attends only to the keys up to its own end, so the masked upper triangle is
  mostly never computed (causal work is ~L^2/2, not L^2);
- the query heads that share a key/value head (grouped-query attention) are stacked into one
  matmul against that head, so K and V are never repeated;
- the softmax runs in fp32; its bf16 output is kept for the backward pass (no recomputation).
  That is L^2/2 values per head and layer, ~20 MB per layer at the shape above.

Scores come out of bf16 matmuls, as in transformers' eager attention; against an fp32 reference
the gradients are as close as SDPA's bf16 flash kernel (tests/test_causal_attention.py).
`benchmarks/train_step_profile.py` measures the step with each.

Used only inside `chunked_causal_attention(model)`, and only for what it computes: causal self-
attention with no mask and no cache (the trainer's right-padded, causal-only forward). Anything
else (a mask, a KV cache, a single decode query, dropout) goes to transformers' SDPA path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

IMPLEMENTATION = "ragpt_chunked_causal"
CHUNK = 64  # queries per block; 32-64 measured best at ~530 tokens (fewer blocks = more masked work)


class _ChunkedCausalAttention(torch.autograd.Function):
    """softmax(Q K^T * scale + causal mask) V for q [B, KV, G, L, D], k and v [B, KV, L, D]."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, chunk: int) -> torch.Tensor:
        B, KV, G, L, D = q.shape
        out = torch.empty_like(q)
        probs = []
        for a in range(0, L, chunk):
            b = min(L, a + chunk)
            c = b - a
            qc = q[:, :, :, a:b].reshape(B, KV, G * c, D)
            scores = torch.matmul(qc, k[:, :, :b].transpose(-1, -2)).float().mul_(scale)  # [B, KV, G*c, b]
            # Only the block's own c x c square straddles the diagonal; keys before it are all visible.
            square = scores.view(B, KV, G, c, b)[..., a:b]
            square.masked_fill_(torch.ones(c, c, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
            p = torch.softmax(scores, -1).to(q.dtype)
            out[:, :, :, a:b] = torch.matmul(p, v[:, :, :b]).view(B, KV, G, c, D)
            probs.append(p)
        ctx.save_for_backward(q, k, v, out, *probs)
        ctx.scale, ctx.chunk = scale, chunk
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        q, k, v, out, *probs = ctx.saved_tensors
        scale, chunk = ctx.scale, ctx.chunk
        B, KV, G, L, D = q.shape
        dout = dout.to(q.dtype)
        dq = torch.empty_like(q)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)  # fp32: summed over blocks
        dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        for i, a in enumerate(range(0, L, chunk)):
            b = min(L, a + chunk)
            c = b - a
            p = probs[i]
            do = dout[:, :, :, a:b].reshape(B, KV, G * c, D)
            oc = out[:, :, :, a:b].reshape(B, KV, G * c, D)
            qc = q[:, :, :, a:b].reshape(B, KV, G * c, D)
            dv[:, :, :b] += torch.matmul(p.transpose(-1, -2), do)
            dp = torch.matmul(do, v[:, :, :b].transpose(-1, -2)).float()
            # softmax backward: dS = P * (dP - rowsum(dO * O)); rowsum(dO * O) = rowsum(P * dP)
            delta = (do.float() * oc.float()).sum(-1, keepdim=True)
            ds = dp.sub_(delta).mul_(p.float()).mul_(scale).to(q.dtype)
            dq[:, :, :, a:b] = torch.matmul(ds, k[:, :, :b]).view(B, KV, G, c, D)
            dk[:, :, :b] += torch.matmul(ds.transpose(-1, -2), qc)
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None


def chunked_causal(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None = None,
                   chunk: int | None = None) -> torch.Tensor:
    """Causal attention; query [B, H, L, D], key/value [B, KV, L, D] with H a multiple of KV.

    Returns [B, H, L, D], like `F.scaled_dot_product_attention(..., is_causal=True, enable_gqa=True)`.
    """
    B, H, L, D = query.shape
    KV = key.shape[1]
    if H % KV or key.shape[2] != L or value.shape[:3] != key.shape[:3]:
        raise ValueError(f"chunked_causal: shapes q {tuple(query.shape)}, k {tuple(key.shape)}, v {tuple(value.shape)}")
    chunk = CHUNK if chunk is None else chunk
    if chunk < 1:
        raise ValueError(f"chunked_causal: chunk must be >= 1, got {chunk}")
    scale = D ** -0.5 if scale is None else scale
    # One dtype for the kernel: under autocast the projections come out bf16 but rotary embeddings
    # can promote q and k back to fp32; the casts here are differentiable, so gradients still flow.
    device = query.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype
    query, key, value = (t.to(dtype) for t in (query, key, value))
    out = _ChunkedCausalAttention.apply(query.reshape(B, KV, H // KV, L, D), key, value, scale, chunk)
    return out.reshape(B, H, L, value.shape[-1])


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention interface: chunked causal attention where it applies, else SDPA."""
    plain_causal = (
        attention_mask is None and dropout == 0.0 and getattr(module, "is_causal", True)
        and kwargs.get("is_causal", True) is not False and query.shape[2] > 1 and key.shape[2] == query.shape[2]
        and kwargs.get("softcap") is None and kwargs.get("position_bias") is None
        and query.shape[1] % key.shape[1] == 0
    )
    if not plain_causal:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    out = chunked_causal(query, key, value, scaling)
    return out.transpose(1, 2).contiguous(), None  # transformers expects [B, L, H, D]


AttentionInterface.register(IMPLEMENTATION, attention_forward)


@contextlib.contextmanager
def chunked_causal_attention(model) -> Iterator[None]:
    """Run `model` with the chunked causal attention inside the block; restore its own after.

    A no-op for models that cannot switch attention implementation at run time.
    """
    set_impl = getattr(model, "set_attn_implementation", None)
    config = getattr(model, "config", None)
    before = getattr(config, "_attn_implementation", None)
    if set_impl is None or before is None or before == IMPLEMENTATION:
        yield
        return
    set_impl(IMPLEMENTATION)
    try:
        yield
    finally:
        set_impl(before)
