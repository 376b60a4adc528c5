"""Padding-free batched forward passes over per-row key/value storage.

A batch of rows is run as one packed sequence: the new tokens of every row side by side, each
with its own positions, so a row that decodes one token and a row whose prompt is being run
(whole or a chunk of it) share one pass over the weights, with no padding and no mask over other
rows. Each row keeps its keys and values in its own buffer (`RowKV`), allocated once for the
row's whole length: a row that joins or leaves a running batch copies nothing, and a decode step
appends in place instead of concatenating the cache.

Attention is per row: the model's own attention function (SDPA or eager) over that row's keys,
through a registered attention implementation that falls back to the original one for every
forward that is not a packed step. So a row computes what it would alone, whatever else is in
the batch, and the model's layers, norms and rotary embeddings are the model's own code.

Works for models whose layers keep a plain growing KV cache (no sliding window, no recurrent
state) and use SDPA or eager attention; `PackedEngine.supported` says whether a model qualifies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

_IMPLEMENTATIONS = ("sdpa", "eager")
_PREFIX = "ragpt_packed_"
# A 4-D mask makes the model skip building a causal mask for the packed sequence (packed
# attention needs none; each row's own mask is made below).
_NO_MASK = torch.ones((1, 1, 1, 1), dtype=torch.bool)


class RowKV:
    """One row's keys and values at every layer, (layers, 2, kv_heads, capacity, head_dim), and how
    many positions are filled. Grows by doubling if a row outruns its reservation."""

    __slots__ = ("buf", "length")

    def __init__(self, layers: int, kv_heads: int, head_dim: int, capacity: int, *,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.buf = torch.empty((layers, 2, kv_heads, max(1, capacity), head_dim), dtype=dtype, device=device)
        self.length = 0

    @property
    def capacity(self) -> int:
        return int(self.buf.shape[3])

    def reserve(self, total: int) -> None:
        """Make room for `total` positions in all (copying what is filled once, if it must grow)."""
        if total <= self.capacity:
            return
        cap = self.capacity
        while cap < total:
            cap *= 2
        new = self.buf.new_empty((*self.buf.shape[:3], cap, self.buf.shape[4]))
        new[:, :, :, :self.length] = self.buf[:, :, :, :self.length]
        self.buf = new

    def load_prefix(self, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> None:
        """Start the row with a precomputed prefix (e.g. a soft prompt's KV): per layer (1, kv_heads, n, head_dim)."""
        if self.length:
            raise ValueError("a prefix goes into an empty row")
        n = int(keys[0].shape[2])
        self.reserve(n)
        for layer, (k, v) in enumerate(zip(keys, values)):
            self.buf[layer, 0, :, :n] = k[0]
            self.buf[layer, 1, :, :n] = v[0]
        self.length = n


@dataclass(eq=False)
class Segment:
    """New positions for one row in a packed step: token ids, optionally preceded by input vectors
    (a soft prompt run inline). `logits`: return the logits after the segment's last position."""

    row: RowKV
    ids: Sequence[int]
    embeds: torch.Tensor | None = None  # (n, hidden), placed before the ids
    logits: bool = True

    @property
    def size(self) -> int:
        return len(self.ids) + (0 if self.embeds is None else int(self.embeds.shape[0]))


@dataclass
class _Plan:
    """What the attention function needs: per segment its row, its offset in the packed sequence and length."""

    rows: list[RowKV]
    offsets: list[int]
    sizes: list[int]


def _original_implementation(model) -> str:
    """The model's own attention implementation, also once the packed one wraps it."""
    impl = getattr(model.config, "_attn_implementation", None) or ""
    return impl[len(_PREFIX):] if impl.startswith(_PREFIX) else impl


def _register(original: str) -> str:
    """Register (once) the packed attention that wraps the model's `original` implementation."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = _PREFIX + original
    if name in ALL_ATTENTION_FUNCTIONS:
        return name
    if original == "eager":
        from transformers.models.llama.modeling_llama import eager_attention_forward as base
    else:
        base = ALL_ATTENTION_FUNCTIONS[original]

    def packed_attention(module, query, key, value, attention_mask, ragpt_plan: _Plan | None = None, **kwargs):
        if ragpt_plan is None:  # any other forward of this model: exactly the original implementation
            return base(module, query, key, value, attention_mask, **kwargs)
        layer = module.layer_idx
        outs = []
        for row, start, n in zip(ragpt_plan.rows, ragpt_plan.offsets, ragpt_plan.sizes):
            past = row.length
            kv = row.buf[layer]
            kv[0, :, past:past + n] = key[0, :, start:start + n]
            kv[1, :, past:past + n] = value[0, :, start:start + n]
            k, v = kv[0, :, :past + n][None], kv[1, :, :past + n][None]
            q = query[:, :, start:start + n]
            mask = None
            if n > 1 and past:  # a chunk after earlier positions: causal, shifted by them
                mask = (torch.arange(past + n, device=q.device)[None, :]
                        <= torch.arange(past, past + n, device=q.device)[:, None])[None, None]
                if original == "eager":
                    mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(
                        ~mask, torch.finfo(q.dtype).min)
            elif n > 1 and original == "eager":
                mask = torch.full((1, 1, n, n), torch.finfo(q.dtype).min, dtype=q.dtype, device=q.device).triu(1)
            out, _ = base(module, q, k, v, mask, **kwargs)
            outs.append(out)  # (1, n, heads, head_dim)
        return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0], None

    AttentionInterface.register(name, packed_attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    return name


class PackedEngine:
    """Runs packed steps (`step`) for a causal LM whose layers qualify (see the module docstring)."""

    def __init__(self, model):
        config = model.config
        if not self.supported(model):
            raise ValueError(f"packed decoding needs {' or '.join(_IMPLEMENTATIONS)} attention and a plain KV cache")
        self._implementation = config._attn_implementation = _register(_original_implementation(model))
        self.model = model
        self.embedding = model.get_input_embeddings()
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.layers = int(text.num_hidden_layers)
        self.kv_heads = int(getattr(text, "num_key_value_heads", None) or text.num_attention_heads)
        self.head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)

    @staticmethod
    def supported(model) -> bool:
        from ragpt.lm.generator import Generator

        if _original_implementation(model) not in _IMPLEMENTATIONS or not Generator.model_supports_prefix_cache(model):
            return False
        layers = getattr(getattr(model, "model", None), "layers", None)
        return bool(layers) and all(hasattr(getattr(layer, "self_attn", None), "layer_idx") for layer in layers)

    def new_row(self, capacity: int) -> RowKV:
        w = self.embedding.weight
        return RowKV(self.layers, self.kv_heads, self.head_dim, capacity, dtype=w.dtype, device=w.device)

    @torch.inference_mode()
    def step(self, segments: Sequence[Segment]) -> torch.Tensor:
        """One forward over the segments packed together; returns float32 logits (one row per
        segment with `logits`, in order). Each row's filled length grows by its segment's size."""
        if not segments:
            raise ValueError("a packed step needs at least one segment")
        if len({id(s.row) for s in segments}) != len(segments):
            raise ValueError("a row appears at most once in a packed step")
        if self.model.config._attn_implementation != self._implementation:
            # Another implementation would read the packed rows as one sequence: refuse, never mix rows.
            now = self.model.config._attn_implementation
            raise RuntimeError(f"the model's attention implementation is now {now!r}; packed steps need "
                               f"{self._implementation!r}")
        w = self.embedding.weight
        flat = [t for s in segments for t in s.ids]
        tok = self.embedding(torch.tensor(flat, dtype=torch.long, device=w.device)) if flat else None
        pieces, positions, offsets, keep = [], [], [], []
        at = used = 0
        for s in segments:
            n = s.size
            if n == 0:
                raise ValueError("every segment needs at least one position")
            s.row.reserve(s.row.length + n)
            if s.embeds is not None:
                pieces.append(s.embeds.to(device=w.device, dtype=w.dtype))
            if s.ids:
                pieces.append(tok[used:used + len(s.ids)])
                used += len(s.ids)
            positions.append(torch.arange(s.row.length, s.row.length + n, device=w.device))
            offsets.append(at)
            at += n
            if s.logits:
                keep.append(at - 1)
        x = (torch.cat(pieces) if len(pieces) > 1 else pieces[0])[None]
        plan = _Plan([s.row for s in segments], offsets, [s.size for s in segments])
        out = self.model(inputs_embeds=x, position_ids=torch.cat(positions)[None], attention_mask=_NO_MASK,
                         use_cache=False, logits_to_keep=torch.tensor(keep, dtype=torch.long, device=w.device),
                         ragpt_plan=plan)
        for s in segments:
            s.row.length += s.size
        return out.logits[0].float()
