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
else (a padding mask, a KV cache, a decode step, dropout, sliding windows) goes to transformers'
SDPA path with SDPA's own masks, so a model gives the same outputs inside the context as outside.
The context switches the model's config: do not generate with the same model object from
another thread while a training step runs (the trainer's dev evaluation runs between steps).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.autograd.function import once_differentiable
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

IMPLEMENTATION = "ragpt_chunked_causal"
CHUNK = 64  # queries per block; 32-64 measured best at ~530 tokens (fewer blocks = more masked work)


class _ChunkedCausalAttention(torch.autograd.Function):
    """softmax(Q K^T * scale + causal mask) V for q [B, KV, G, L, D], k and v [B, KV, L, D]."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, chunk: int) -> torch.Tensor:
        B, KV, G, L, D = q.shape
        acc = torch.promote_types(q.dtype, torch.float32)  # softmax precision: fp32, or fp64 for fp64
        out = torch.empty_like(q)
        probs = []
        for a in range(0, L, chunk):
            b = min(L, a + chunk)
            c = b - a
            qc = q[:, :, :, a:b].reshape(B, KV, G * c, D)
            scores = torch.matmul(qc, k[:, :, :b].transpose(-1, -2)).to(acc).mul_(scale)  # [B, KV, G*c, b]
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
    @once_differentiable  # saved probabilities are constants here: no second derivatives
    def backward(ctx, dout: torch.Tensor):
        q, k, v, out, *probs = ctx.saved_tensors
        scale, chunk = ctx.scale, ctx.chunk
        B, KV, G, L, D = q.shape
        acc = torch.promote_types(q.dtype, torch.float32)
        dout = dout.to(q.dtype)
        dq = torch.empty_like(q)
        dk = torch.zeros(k.shape, dtype=acc, device=k.device)  # accumulated over blocks at fp32 or more
        dv = torch.zeros(v.shape, dtype=acc, device=v.device)
        for i, a in enumerate(range(0, L, chunk)):
            b = min(L, a + chunk)
            c = b - a
            p = probs[i]
            do = dout[:, :, :, a:b].reshape(B, KV, G * c, D)
            oc = out[:, :, :, a:b].reshape(B, KV, G * c, D)
            qc = q[:, :, :, a:b].reshape(B, KV, G * c, D)
            dv[:, :, :b] += torch.matmul(p.transpose(-1, -2), do)
            dp = torch.matmul(do, v[:, :, :b].transpose(-1, -2)).to(acc)
            # softmax backward: dS = P * (dP - rowsum(dO * O)); rowsum(dO * O) = rowsum(P * dP)
            delta = (do.to(acc) * oc.to(acc)).sum(-1, keepdim=True)
            ds = dp.sub_(delta).mul_(p.to(acc)).mul_(scale).to(q.dtype)
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
    if H % KV or key.shape[2] != L or value.shape[:3] != key.shape[:3] or value.shape[-1] != D:
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
    return out.reshape(B, H, L, D)


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention interface: chunked causal attention where it applies, else SDPA."""
    plain_causal = (
        attention_mask is None and dropout == 0.0 and getattr(module, "is_causal", True)
        and kwargs.get("is_causal", True) is not False and query.shape[2] > 1 and key.shape[2] == query.shape[2]
        and query.shape[1] % key.shape[1] == 0 and value.shape[-1] == query.shape[-1]
        # what plain causal attention does not compute: soft-capping, biases, windows, sinks
        and not any(kwargs.get(k) is not None for k in ("softcap", "position_bias", "sliding_window", "s_aux"))
        and getattr(module, "sliding_window", None) is None
    )
    if not plain_causal:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    out = chunked_causal(query, key, value, scaling)
    return out.transpose(1, 2).contiguous(), None  # transformers expects [B, L, H, D]


AttentionInterface.register(IMPLEMENTATION, attention_forward)
# Masks built exactly as for SDPA: without this transformers treats the implementation as custom
# and hands it raw 2D masks (and no cache offsets), which the SDPA fallback would misread.
# For the trainer's mask-free forward this is None, so the chunked kernel runs.
AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


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
