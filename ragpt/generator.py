"""Batched generation with the frozen model, each row optionally carrying its own soft prompt.

A soft prompt is an (n_tokens x hidden) tensor prepended to the row's input embeddings.
Rows are left-padded to a common length; the attention mask hides the padding and position
ids count only real positions, so each row computes exactly what it would alone.
With no soft prompt the output equals `model.generate` on the same ids (tested).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ragpt.errors import SoftPromptError


def cpu_supports_bf16() -> bool:
    """True where bf16 matmuls are native (AVX-512 BF16 / AMX), so autocast speeds things up."""
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except Exception:
        return False
    if cap in {"AVX512", "AMX"} or "AMX" in str(cap):
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
        return "avx512_bf16" in flags or "amx_bf16" in flags
    return False


def resolve_bf16(setting: str | bool) -> bool:
    s = str(setting).lower()
    if s == "auto":
        return cpu_supports_bf16()
    return s in {"true", "on", "1"}


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (end token) or "length" (max_new_tokens)
    prompt_tokens: int  # including soft-prompt positions


def cache_kwarg(model) -> str:
    """transformers 5.2x renamed `past_key_values` to `cache`; support both."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


class Generator:
    def __init__(self, model, tokenizer, *, bf16: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.bf16 = bool(bf16)
        self.embedding = model.get_input_embeddings()
        self.hidden_size = int(self.embedding.weight.shape[1])
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        stop = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            stop.add(tokenizer.eos_token_id)
        self.stop_ids = stop
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._cache_kw = cache_kwarg(model)

    # ------------------------------------------------------------------ helpers
    def autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        device = self.embedding.weight.device.type
        return torch.autocast(device_type=device, dtype=torch.bfloat16)

    def check_soft_prompt(self, sp: torch.Tensor) -> torch.Tensor:
        if not isinstance(sp, torch.Tensor) or sp.dim() != 2 or sp.shape[1] != self.hidden_size:
            shape = tuple(sp.shape) if isinstance(sp, torch.Tensor) else type(sp).__name__
            raise SoftPromptError(
                f"soft prompt must be a (n_tokens x {self.hidden_size}) tensor, got {shape}"
            )
        if not sp.is_floating_point() or not torch.isfinite(sp).all():
            raise SoftPromptError("soft prompt must hold finite floating-point values")
        return sp

    def embed_rows(
        self, rows: Sequence[Sequence[int]], soft_prompts: Sequence[torch.Tensor | None]
    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Left-padded [soft prompt ; token embeddings], attention mask and per-row lengths."""
        weight = self.embedding.weight
        pieces = []
        for ids, sp in zip(rows, soft_prompts):
            e = self.embedding(torch.as_tensor(list(ids), dtype=torch.long, device=weight.device))
            if sp is not None:
                e = torch.cat([self.check_soft_prompt(sp).to(device=weight.device, dtype=e.dtype), e], 0)
            pieces.append(e)
        lengths = [p.shape[0] for p in pieces]
        T = max(lengths)
        x = weight.new_zeros((len(pieces), T, self.hidden_size))
        mask = torch.zeros((len(pieces), T), dtype=torch.long, device=weight.device)
        for i, p in enumerate(pieces):
            x[i, T - p.shape[0]:] = p
            mask[i, T - p.shape[0]:] = 1
        return x, mask, lengths

    # ------------------------------------------------------------------ decoding
    @torch.inference_mode()
    def stream(
        self,
        rows: Sequence[Sequence[int]],
        soft_prompts: Sequence[torch.Tensor | None] | None = None,
        *,
        max_new_tokens: int | Sequence[int] = 128,
        temperature: float | Sequence[float] = 0.0,
        seed: int | None = None,
    ) -> Iterator[list[int | None]]:
        """Yield, per decoding step, the new token of each row (None once a row has finished)."""
        from transformers import DynamicCache

        B = len(rows)
        if B == 0:
            return
        if any(len(r) == 0 for r in rows):
            raise ValueError("every row needs at least one token")
        soft_prompts = list(soft_prompts) if soft_prompts is not None else [None] * B
        max_new = [max_new_tokens] * B if isinstance(max_new_tokens, int) else list(max_new_tokens)
        temps = [float(temperature)] * B if isinstance(temperature, (int, float)) else list(temperature)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        temps_t = torch.tensor(temps, dtype=torch.float32)

        x, mask, _ = self.embed_rows(rows, soft_prompts)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        done = torch.zeros(B, dtype=torch.bool)
        produced = [0] * B
        with self.autocast():
            out = self.model(
                inputs_embeds=x, attention_mask=mask, position_ids=pos,
                use_cache=True, logits_to_keep=1,
                **{self._cache_kw: DynamicCache(config=self.model.config)},
            )
        cache = output_cache(out)
        logits = out.logits[:, -1, :].float()
        for _step in range(max(max_new)):
            nxt = self._pick(logits, temps_t, gen)
            step: list[int | None] = []
            for i in range(B):
                if done[i]:
                    step.append(None)
                    continue
                t = int(nxt[i])
                step.append(t)
                produced[i] += 1
                if t in self.stop_ids or produced[i] >= max_new[i]:
                    done[i] = True
            yield step
            if bool(done.all()):
                return
            nxt = torch.where(done, torch.full_like(nxt, self.pad_id), nxt)
            mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype)], dim=1)
            pos = pos[:, -1:] + 1
            with self.autocast():
                out = self.model(
                    input_ids=nxt[:, None], attention_mask=mask, position_ids=pos,
                    use_cache=True, **{self._cache_kw: cache},
                )
            cache = output_cache(out)
            logits = out.logits[:, -1, :].float()

    @staticmethod
    def _pick(logits: torch.Tensor, temps: torch.Tensor, gen) -> torch.Tensor:
        greedy = logits.argmax(-1)
        if not bool((temps > 0).any()):
            return greedy
        probs = torch.softmax(logits / temps.clamp(min=1e-5)[:, None], dim=-1)
        sampled = torch.multinomial(probs, 1, generator=gen)[:, 0]
        return torch.where(temps > 0, sampled, greedy)

    def generate(
        self,
        rows: Sequence[Sequence[int]],
        soft_prompts: Sequence[torch.Tensor | None] | None = None,
        *,
        max_new_tokens: int | Sequence[int] = 128,
        temperature: float | Sequence[float] = 0.0,
        seed: int | None = None,
    ) -> list[GenerationResult]:
        B = len(rows)
        soft_prompts = list(soft_prompts) if soft_prompts is not None else [None] * B
        tokens: list[list[int]] = [[] for _ in range(B)]
        for step in self.stream(
            rows, soft_prompts, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed
        ):
            for i, t in enumerate(step):
                if t is not None:
                    tokens[i].append(t)
        results = []
        for i, toks in enumerate(tokens):
            stopped = bool(toks) and toks[-1] in self.stop_ids
            body = toks[:-1] if stopped else toks
            n_soft = 0 if soft_prompts[i] is None else int(soft_prompts[i].shape[0])
            results.append(
                GenerationResult(
                    token_ids=toks,
                    text=self.tokenizer.decode(body, skip_special_tokens=True).strip(),
                    finish_reason="stop" if stopped else "length",
                    prompt_tokens=len(rows[i]) + n_soft,
                )
            )
        return results
