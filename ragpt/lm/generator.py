"""Batched generation with the frozen model, each row optionally carrying its own soft prompt.

A soft prompt is an (n_tokens x hidden) tensor placed before the row's input embeddings.
Rows run packed side by side (`ragpt.lm.packed`: no padding, each row's keys and values in its
own buffer), or, for models that engine does not take, left-padded to a common length with an
attention mask hiding the padding and position ids counting only real positions. Either way
each row computes what it would alone; with no soft prompt the output equals `model.generate`
on the same ids (tested).

A deep soft prompt (depth x n_tokens x hidden, `ragpt.softprompts.deep`) also sets the inputs of
the prompt positions at the first `depth` decoder layers; it always enters through its prefix
KV (computed with those inputs in place), never inline.

A soft prompt is a fixed prefix, so its key/value cache can be computed once per prompt
version and reused (`PrefixCache`, keyed e.g. by (department, version)). A packed row starts
with that KV in its buffer; a padded batch lays out its cache as [left pad | prefix KV] in the
first S slots and [pad | token ids] after, row i's tokens at positions n_i + 0..L_i-1, exactly
where they would sit after their n_i soft-prompt positions in an unbatched run.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ragpt.errors import SoftPromptError
from ragpt.lm.models import inference_model
from ragpt.lm.packed import PackedEngine, RowKV, Segment
from ragpt.lm.repetition import RepetitionGuard
from ragpt.softprompts.deep import decoder_layers, deep_prompt_inputs, input_slice, prompt_tokens


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
class DecodeState:
    """A batch being decoded: its KV cache, attention mask, each row's last position and next-token logits."""

    cache: object  # a transformers DynamicCache, (B, kv_heads, S, head_dim) per layer
    mask: torch.Tensor  # (B, S): 1 where a row has a real position
    pos: torch.Tensor  # (B, 1): position id of each row's last token
    logits: torch.Tensor  # (B, vocab) float32

    @property
    def size(self) -> int:
        return int(self.mask.shape[0])


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (end token), "length" (max_new_tokens) or "repetition" (ragpt.lm.repetition)
    prompt_tokens: int  # including soft-prompt positions


def cache_kwarg(model) -> str:
    """transformers 5.2x renamed `past_key_values` to `cache`; support both."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


@dataclass(frozen=True, eq=False)
class PrefixKV:
    """Per-layer keys and values of one soft prompt at positions 0..n-1 (batch dimension 1)."""

    n_tokens: int
    keys: tuple[torch.Tensor, ...]  # each (1, kv_heads, n_tokens, head_dim)
    values: tuple[torch.Tensor, ...]
    source: torch.Tensor  # the soft prompt it was computed from, to detect a reused key


@torch.inference_mode()
def prompt_kv(model, soft_prompt: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Every layer's keys and values, (1, kv_heads, n, head_dim) each, at positions 0..n-1 of a
    plain or deep soft prompt run alone (a deep prompt's layer inputs put in place)."""
    from transformers import DynamicCache

    weight = model.get_input_embeddings().weight
    x = input_slice(soft_prompt).to(device=weight.device, dtype=weight.dtype)[None]
    n = x.shape[1]
    with deep_prompt_inputs(model, soft_prompt.to(device=weight.device)):
        out = model(
            inputs_embeds=x, attention_mask=torch.ones((1, n), dtype=torch.long, device=weight.device),
            position_ids=torch.arange(n, device=weight.device)[None], use_cache=True, logits_to_keep=1,
            **{cache_kwarg(model): DynamicCache(config=model.config)},
        )
    layers = output_cache(out).layers
    return tuple(layer.keys.detach() for layer in layers), tuple(layer.values.detach() for layer in layers)


class PrefixCache:
    """Soft-prompt KV per key (e.g. (department, version)), computed once, least recently used out.

    Registry versions are immutable, so a key names one tensor for good; the tensor is still
    compared on every hit (it is small) so that reusing a key for another tensor recomputes
    instead of silently serving the old prefix. Thread-safe.

    At most `max_entries` prefixes are held (`resize` changes the bound, e.g. the service's
    `[batching] prefix_cache_size`): with a thousand departments their KV would not fit, so memory
    stays bounded by the entries held, and a department whose prefix was evicted computes it
    again at its next request (one miss). `hits`, `misses` and `evictions` count what happened.
    """

    def __init__(self, max_entries: int = 64):
        self.max_entries = self._checked(max_entries)
        self._entries: OrderedDict[Hashable, PrefixKV] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @staticmethod
    def _checked(max_entries: int) -> int:
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"max_entries must be an integer of at least 1, got {max_entries!r}")
        return max_entries

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def resize(self, max_entries: int) -> None:
        """Hold at most `max_entries` from now on; the least recently used beyond it go now."""
        with self._lock:
            self.max_entries = self._checked(max_entries)
            self._evict()

    def _evict(self) -> None:  # holding the lock
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
            self.evictions += 1

    def get(self, key: Hashable, soft_prompt: torch.Tensor, compute) -> PrefixKV:
        """The cached prefix for `key`, or `compute(soft_prompt)` stored under it."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and (entry.source is soft_prompt or (
                    entry.source.shape == soft_prompt.shape and torch.equal(entry.source, soft_prompt))):
                self._entries.move_to_end(key)
                self.hits += 1
                return entry
        # Computed outside the lock: a forward pass must not block other readers.
        entry = compute(soft_prompt)
        with self._lock:
            self.misses += 1
            self._entries[key] = entry
            self._entries.move_to_end(key)
            self._evict()
        return entry


def load_generator(settings) -> Generator:
    """The configured generator, the one way every surface builds it: the model loaded (converted
    once if it is the embedded default) and, where the `bf16` setting says so, a bf16 inference copy."""
    from ragpt.lm.models import load_generator_model

    model, tokenizer = load_generator_model(settings)
    engine = settings.decode_engine
    if engine == "packed" and not PackedEngine.supported(inference_model(model, resolve_bf16(settings.bf16))):
        raise ValueError("decode_engine = packed needs a model with a plain KV cache and SDPA or eager attention; "
                         "use auto or padded")
    return Generator(model, tokenizer, bf16=resolve_bf16(settings.bf16), packed=engine != "padded")


class Generator:
    def __init__(self, model, tokenizer, *, bf16: bool = False, prefix_cache_size: int = 64,
                 stop_repetition: bool = True, packed: bool = True):
        # bf16 runs on a bf16 copy of the frozen weights (see models.inference_model for why not
        # autocast); the fp32 original stays the base model's identity (fingerprints).
        self.base_model = model
        model = inference_model(model, bool(bf16))
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
        self.prefix_cache = PrefixCache(prefix_cache_size)
        self._prefix_ok: bool | None = None
        self.stop_repetition = stop_repetition  # see ragpt.lm.repetition; off only to measure it
        # Packed decoding (ragpt.lm.packed) where the model allows it; the padded path otherwise.
        self.engine = PackedEngine(model) if packed and PackedEngine.supported(model) else None

    def repetition_guard(self) -> RepetitionGuard | None:
        """A fresh loop detector for one row, or None when the rule is switched off."""
        return RepetitionGuard(self.tokenizer) if self.stop_repetition else None

    # ------------------------------------------------------------------ helpers
    def autocast(self):
        # Weights already in bf16 (the inference copy) need no autocast; kept for fp32 weights
        # on devices where autocast pays (e.g. a GPU deployment that passes bf16 without a copy).
        if not self.bf16 or self.embedding.weight.dtype == torch.bfloat16:
            return contextlib.nullcontext()
        device = self.embedding.weight.device.type
        return torch.autocast(device_type=device, dtype=torch.bfloat16)

    @property
    def max_positions(self) -> int | None:
        """The model's context window (positions), if its config states one."""
        n = getattr(self.model.config, "max_position_embeddings", None)
        return int(n) if isinstance(n, int) and n > 0 else None

    @property
    def max_prompt_depth(self) -> int:
        """The deepest soft prompt this model takes: its decoder layer count (1 if they cannot be hooked)."""
        try:
            return len(decoder_layers(self.model))
        except SoftPromptError:
            return 1

    def check_soft_prompt(self, sp: torch.Tensor) -> torch.Tensor:
        """A plain (n_tokens x hidden) or deep (depth x n_tokens x hidden) prompt, validated."""
        ok = isinstance(sp, torch.Tensor) and sp.dim() in (2, 3) and sp.shape[-1] == self.hidden_size
        if ok and sp.dim() == 3:
            ok = 1 <= sp.shape[0] <= self.max_prompt_depth
        if not ok:
            shape = tuple(sp.shape) if isinstance(sp, torch.Tensor) else type(sp).__name__
            raise SoftPromptError(
                f"soft prompt must be a (n_tokens x {self.hidden_size}) tensor or a deep "
                f"(depth x n_tokens x {self.hidden_size}) one with depth <= the model's layers, got {shape}"
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
                if self.check_soft_prompt(sp).dim() == 3:
                    raise SoftPromptError("a deep soft prompt enters through its prefix KV, not inline")
                e = torch.cat([sp.to(device=weight.device, dtype=e.dtype), e], 0)
            pieces.append(e)
        lengths = [p.shape[0] for p in pieces]
        T = max(lengths)
        x = weight.new_zeros((len(pieces), T, self.hidden_size))
        mask = torch.zeros((len(pieces), T), dtype=torch.long, device=weight.device)
        for i, p in enumerate(pieces):
            x[i, T - p.shape[0]:] = p
            mask[i, T - p.shape[0]:] = 1
        return x, mask, lengths

    # ------------------------------------------------------------------ soft-prompt prefix KV
    @property
    def supports_prefix_cache(self) -> bool:
        """True when every layer keeps a plain, growing KV cache (no sliding window, no recurrence).

        Only then does a precomputed prefix sit unchanged in the first cache slots.
        """
        if self._prefix_ok is None:
            self._prefix_ok = self.model_supports_prefix_cache(self.model)
        return self._prefix_ok

    @staticmethod
    def model_supports_prefix_cache(model) -> bool:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        layers = getattr(DynamicCache(config=model.config), "layers", None)
        return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)

    @torch.inference_mode()
    def compute_prefix(self, soft_prompt: torch.Tensor) -> PrefixKV:
        """Run the model on the soft prompt alone and keep every layer's KV (`prompt_kv`)."""
        sp = self.check_soft_prompt(soft_prompt)
        with self.autocast():
            keys, values = prompt_kv(self.model, sp)
        return PrefixKV(n_tokens=sp.shape[-2], keys=keys, values=values, source=soft_prompt)

    def prefix_for(self, key: Hashable, soft_prompt: torch.Tensor) -> PrefixKV:
        return self.prefix_cache.get(key, soft_prompt, self.compute_prefix)

    def _prefilled_cache(self, prefixes: Sequence[PrefixKV | None]):
        """(DynamicCache holding [left pad | prefix KV] per row, its mask, S) for a batch."""
        from transformers import DynamicCache

        device = self.embedding.weight.device
        S = max((p.n_tokens for p in prefixes if p is not None), default=0)
        B = len(prefixes)
        mask = torch.zeros((B, S), dtype=torch.long, device=device)
        first = next(p for p in prefixes if p is not None)
        data = []
        for layer in range(len(first.keys)):
            k0, v0 = first.keys[layer], first.values[layer]
            k = k0.new_zeros((B, k0.shape[1], S, k0.shape[3]))
            v = v0.new_zeros((B, v0.shape[1], S, v0.shape[3]))
            for i, p in enumerate(prefixes):
                if p is not None:
                    k[i, :, S - p.n_tokens:] = p.keys[layer][0]
                    v[i, :, S - p.n_tokens:] = p.values[layer][0]
            data.append((k, v))
        for i, p in enumerate(prefixes):
            if p is not None:
                mask[i, S - p.n_tokens:] = 1
        return DynamicCache(data, config=self.model.config), mask, S

    # ------------------------------------------------------------------ padded decoding
    # The path for models the packed engine does not take (and for `decode_engine = padded`):
    # `prefill` rows left-padded into one batch, `pick` each row's next token, `advance` them one
    # token. `stream` composes them when the generator has no packed engine.

    @torch.inference_mode()
    def prefill(self, rows: Sequence[Sequence[int]], soft_prompts: Sequence[torch.Tensor | None] | None = None,
                prefix_keys: Sequence[Hashable | None] | None = None) -> DecodeState:
        """Run the prompts of `rows` (left-padded into one batch) and return their decode state.

        `prefix_keys[i]` (e.g. (department, version)) lets row i's soft prompt come from the prefix
        KV cache under that key instead of being run through the model again. Rows with no key, or
        no soft prompt, are embedded as before. Greedy output is the same either way."""
        from transformers import DynamicCache

        B = len(rows)
        if B == 0 or any(len(r) == 0 for r in rows):
            raise ValueError("prefill needs at least one row, each with at least one token")
        soft_prompts = list(soft_prompts) if soft_prompts is not None else [None] * B
        if prefix_keys is not None and len(prefix_keys) != B:
            raise ValueError("one prefix key (or None) per row expected")
        keys = list(prefix_keys) if prefix_keys is not None else [None] * B
        prefixes: list[PrefixKV | None] = [None] * B
        uncached: dict[int, PrefixKV] = {}  # deep prompts without a key: computed once per call
        for i, sp in enumerate(soft_prompts):
            if sp is None:
                continue
            deep = self.check_soft_prompt(sp).dim() == 3
            if (keys[i] is not None or deep) and not self.supports_prefix_cache:
                if deep:
                    raise SoftPromptError("deep soft prompts need a model whose layers keep a plain KV cache")
                continue
            if keys[i] is not None:
                prefixes[i] = self.prefix_for(keys[i], sp)
            elif deep:
                if id(sp) not in uncached:
                    uncached[id(sp)] = self.compute_prefix(sp)
                prefixes[i] = uncached[id(sp)]
        # Rows with a cached prefix feed only their token ids; the others carry their soft prompt inline.
        inline = [None if p is not None else sp for p, sp in zip(prefixes, soft_prompts)]
        x, mask, _ = self.embed_rows(rows, inline)
        if any(p is not None for p in prefixes):
            cache, prefix_mask, _ = self._prefilled_cache(prefixes)
            offsets = torch.tensor([0 if p is None else p.n_tokens for p in prefixes], device=mask.device)
            pos = (offsets[:, None] + mask.cumsum(-1) - 1).clamp(min=0)
            mask = torch.cat([prefix_mask, mask], dim=1)
        else:
            cache = DynamicCache(config=self.model.config)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with self.autocast():
            out = self.model(inputs_embeds=x, attention_mask=mask, position_ids=pos, use_cache=True,
                             logits_to_keep=1, **{self._cache_kw: cache})
        return DecodeState(output_cache(out), mask, pos[:, -1:], out.logits[:, -1, :].float())

    @torch.inference_mode()
    def advance(self, state: DecodeState, tokens: torch.Tensor) -> DecodeState:
        """One decoding step: every row takes its token (B,) and gets the logits of the next."""
        mask = torch.cat([state.mask, torch.ones((state.size, 1), dtype=state.mask.dtype,
                                                 device=state.mask.device)], dim=1)
        pos = state.pos + 1
        with self.autocast():
            out = self.model(input_ids=tokens[:, None].to(state.mask.device), attention_mask=mask,
                             position_ids=pos, use_cache=True, **{self._cache_kw: state.cache})
        return DecodeState(output_cache(out), mask, pos, out.logits[:, -1, :].float())

    # ------------------------------------------------------------------ packed rows (ragpt.lm.packed)
    # A row's storage is made once with its soft prompt in place (`start_row`); its prompt then runs
    # in one or more packed steps and it decodes one token per step beside any other rows.

    def start_row(self, n_ids: int, soft_prompt: torch.Tensor | None, prefix_key: Hashable | None,
                  max_new_tokens: int) -> tuple[RowKV, torch.Tensor | None]:
        """A new row's KV storage, sized for its whole length, and the vectors to run before its ids.

        Its soft prompt comes from the prefix KV cache when it has a key (or is deep), exactly as in
        `prefill`; otherwise it is returned to be run inline, in front of the ids."""
        if self.engine is None:
            raise RuntimeError("this generator has no packed engine (decode_engine = padded, or the model "
                               "lacks support)")
        n_soft = 0 if soft_prompt is None else int(self.check_soft_prompt(soft_prompt).shape[-2])
        row = self.engine.new_row(n_soft + n_ids + max_new_tokens)
        if soft_prompt is None:
            return row, None
        if prefix_key is not None:
            prefix = self.prefix_for(prefix_key, soft_prompt)
        elif soft_prompt.dim() == 3:
            prefix = self.compute_prefix(soft_prompt)
        else:
            return row, soft_prompt
        row.load_prefix(prefix.keys, prefix.values)
        return row, None

    # Prompt tokens run in one packed forward at most (longer batches of prompts run in several).
    PACKED_PREFILL_TOKENS = 4096

    def run_prompts(self, segments: Sequence[Segment], budget: int | None = None) -> torch.Tensor:
        """Run whole prompts (one segment per row) in packed steps of at most `budget` positions;
        returns each row's next-token logits (float32, one per segment, in order)."""
        budget = budget or self.PACKED_PREFILL_TOKENS
        out: list[torch.Tensor | None] = [None] * len(segments)
        step: list[tuple[int | None, Segment]] = []
        used = 0

        def flush():
            nonlocal step, used
            if step:
                logits = self.engine.step([s for _, s in step])
                wanted = [i for i, s in step if s.logits]
                for j, i in enumerate(wanted):
                    out[i] = logits[j]
            step, used = [], 0

        for i, seg in enumerate(segments):
            ids, embeds = list(seg.ids), seg.embeds
            while True:
                room = budget - used
                n_embeds = 0 if embeds is None else int(embeds.shape[0])
                if n_embeds + len(ids) <= room:
                    step.append((i, Segment(seg.row, ids, embeds)))
                    used += n_embeds + len(ids)
                    break
                take = room - n_embeds
                if take < 1 and step:  # not even the inline vectors and one id fit: next step
                    flush()
                    continue
                take = max(1, take)  # inline vectors longer than a step's budget run whole
                step.append((None, Segment(seg.row, ids[:take], embeds, logits=False)))
                ids, embeds = ids[take:], None
                flush()
        flush()
        return torch.stack(out)  # type: ignore[arg-type]

    def _stream_packed(self, rows, soft_prompts, max_new, temps, gen, prefix_keys) -> Iterator[list[int | None]]:
        B = len(rows)
        kv, segments = [], []
        for i, ids in enumerate(rows):
            row, embeds = self.start_row(len(ids), soft_prompts[i], prefix_keys[i], max_new[i])
            kv.append(row)
            segments.append(Segment(row, list(ids), embeds))
        logits = self.run_prompts(segments)
        temps_t = torch.tensor(temps, dtype=torch.float32)
        live = list(range(B))  # rows still generating, in the order of `logits`
        produced = [0] * B
        guards = [self.repetition_guard() for _ in range(B)]
        while live:
            nxt = self.pick(logits, temps_t[live], gen).tolist()
            step: list[int | None] = [None] * B
            going = []
            for i, t in zip(live, nxt):
                step[i] = t
                produced[i] += 1
                looping = guards[i] is not None and guards[i].push(t)
                if not (t in self.stop_ids or produced[i] >= max_new[i] or looping):
                    going.append((i, t))
            yield step
            live = [i for i, _ in going]
            if live:
                logits = self.engine.step([Segment(kv[i], [t]) for i, t in going])

    @torch.inference_mode()
    def stream(
        self,
        rows: Sequence[Sequence[int]],
        soft_prompts: Sequence[torch.Tensor | None] | None = None,
        *,
        max_new_tokens: int | Sequence[int] = 128,
        temperature: float | Sequence[float] = 0.0,
        seed: int | None = None,
        prefix_keys: Sequence[Hashable | None] | None = None,
    ) -> Iterator[list[int | None]]:
        """Yield, per decoding step, the new token of each row (None once a row has finished)."""
        B = len(rows)
        if B == 0:
            return
        if any(len(r) == 0 for r in rows):
            raise ValueError("every row needs at least one token")
        max_new = [max_new_tokens] * B if isinstance(max_new_tokens, int) else list(max_new_tokens)
        temps = [float(temperature)] * B if isinstance(temperature, (int, float)) else list(temperature)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        if self.engine is not None:
            soft = list(soft_prompts) if soft_prompts is not None else [None] * B
            keys = list(prefix_keys) if prefix_keys is not None else [None] * B
            if len(keys) != B or len(soft) != B:
                raise ValueError("one soft prompt and one prefix key (or None) per row expected")
            yield from self._stream_packed(rows, soft, max_new, temps, gen, keys)
            return
        temps_t = torch.tensor(temps, dtype=torch.float32)
        state = self.prefill(rows, soft_prompts, prefix_keys)
        done = torch.zeros(B, dtype=torch.bool)
        produced = [0] * B
        guards = [self.repetition_guard() for _ in range(B)]
        for _step in range(max(max_new)):
            nxt = self.pick(state.logits, temps_t, gen)
            step: list[int | None] = []
            for i in range(B):
                if done[i]:
                    step.append(None)
                    continue
                t = int(nxt[i])
                step.append(t)
                produced[i] += 1
                looping = guards[i] is not None and guards[i].push(t)
                if t in self.stop_ids or produced[i] >= max_new[i] or looping:
                    done[i] = True
            yield step
            if bool(done.all()):
                return
            state = self.advance(state, torch.where(done, torch.full_like(nxt, self.pad_id), nxt))

    @staticmethod
    def pick(logits: torch.Tensor, temps: torch.Tensor, gen=None) -> torch.Tensor:
        """Each row's next token: greedy where its temperature is 0, sampled otherwise."""
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
        prefix_keys: Sequence[Hashable | None] | None = None,
    ) -> list[GenerationResult]:
        B = len(rows)
        soft_prompts = list(soft_prompts) if soft_prompts is not None else [None] * B
        tokens: list[list[int]] = [[] for _ in range(B)]
        for step in self.stream(
            rows, soft_prompts, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
            prefix_keys=prefix_keys,
        ):
            for i, t in enumerate(step):
                if t is not None:
                    tokens[i].append(t)
        results = []
        for i, toks in enumerate(tokens):
            stopped = bool(toks) and toks[-1] in self.stop_ids
            body = toks[:-1] if stopped else toks
            n_soft = prompt_tokens(soft_prompts[i])
            cap = max_new_tokens if isinstance(max_new_tokens, int) else max_new_tokens[i]
            results.append(
                GenerationResult(
                    token_ids=toks,
                    text=self.tokenizer.decode(body, skip_special_tokens=True).strip(),
                    finish_reason="stop" if stopped else "length" if len(toks) >= cap else "repetition",
                    prompt_tokens=len(rows[i]) + n_soft,
                )
            )
        return results
