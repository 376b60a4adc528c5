"""Prompt tuning: train a department's soft prompt end-to-end against the real retriever.

One readable loop, plain PyTorch (torchtune / nanoGPT style):

    examples --retrieve with the department's filter--> template (same as serving)
      --> [soft prompt ; token embeddings] --> frozen LM --> loss on answer tokens only

What makes it fast on a small model: the vocabulary projection (49k x 576 for SmolLM2) is
applied only at answer positions instead of at every context position; a frozen bf16 copy of
the weights (bf16 compute on AMX without autocast's per-call weight casts) with an fp32 master
copy of the prompt; causal-only attention (right padding needs no mask), computed in query
chunks with plain matmuls instead of the CPU flash kernel (`ragpt.training.causal_attention`); length buckets.

Data parallel: under `torchrun --nproc_per_node=N` each process takes 1/N of every global
batch; DDP all-reduces the prompt's gradient. The loss is normalised by the *global* number
of answer tokens, so N processes compute the same update as one (within float tolerance).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ragpt.atomic import atomic_write_json
from ragpt.config import CONTRACT_DEFAULTS, TRAIN_DEFAULTS
from ragpt.data.qa import QAExample, examples_sha256, select_dev
from ragpt.errors import RagptError
from ragpt.evaluation.metrics import answer_in_text, best_over, exact_match, paired_difference_ci, token_f1
from ragpt.lm.generator import Generator
from ragpt.lm.models import inference_model
from ragpt.lm.template import (
    SYSTEM_PROMPT,
    BuiltPrompt,
    ContextPassage,
    PromptTooLongError,
    QuestionTooLongError,
    Turn,
    training_ids,
)
from ragpt.retrieval.query_adapter import QueryAdapter
from ragpt.retrieval.search import Retriever
from ragpt.serving.contract import GOLD_CONTEXT_MODES, InputContract
from ragpt.serving.conversation import retrieval_query
from ragpt.serving.request import build_inputs, passages_from_hits, retrieve_many
from ragpt.softprompts.deep import decoder_layers, deep_from_shallow, deep_prompt_inputs
from ragpt.training import memory
from ragpt.training.causal_attention import chunked_causal_attention

INIT_MODES = ("text", "vocab", "random")


WARMUP_FRACTION = 0.1  # of the steps, when --warmup-steps is not given
MIN_DECISIVE_DEV = 30  # dev questions below which a paired interval rarely excludes 0


@dataclass
class TrainConfig:
    department: str
    n_tokens: int = 20
    # 0: a deep prompt over every decoder layer (the measured best recipe); 1: a plain prompt;
    # N: a deep prompt over the first N layers (ragpt.softprompts.deep). resolve() fills in 0.
    depth: int = TRAIN_DEFAULTS["depth"]
    init: str = "text"  # text: embeddings of init_text; vocab: sampled token embeddings; random
    init_text: str | None = None  # default: the template's system prompt for the department
    steps: int = TRAIN_DEFAULTS["steps"]
    batch_size: int = 8  # examples per optimizer step (global, across processes)
    grad_accum: int = 1  # micro-batches per step: micro-batch = batch_size / grad_accum
    lr: float = TRAIN_DEFAULTS["lr"]
    weight_decay: float = 0.0
    warmup_steps: int | None = None  # None: WARMUP_FRACTION of the steps (resolve())
    max_grad_norm: float = 1.0
    # How the inputs are built: recorded with the prompt as its input contract, applied when it is served.
    k: int = CONTRACT_DEFAULTS["k"]  # retrieved chunks per example
    max_context_tokens: int = CONTRACT_DEFAULTS["max_context_tokens"]
    max_question_tokens: int = CONTRACT_DEFAULTS["max_question_tokens"]
    max_history_tokens: int = CONTRACT_DEFAULTS["max_history_tokens"]
    query_rule: str = CONTRACT_DEFAULTS["query_rule"]
    # Put the gold passage in the context: never; when retrieval missed the answer; always.
    gold_context: str = "never"
    # Train a query adapter first (ragpt.retrieval.query_adapter) on the training questions and
    # build every example with it; kept with the prompt only where it beats the embedder as it is.
    query_adapter: bool = False
    max_answer_tokens: int = 64
    dev_fraction: float = TRAIN_DEFAULTS["dev_fraction"]  # of --data held out as dev (whole documents)
    dev_max: int = TRAIN_DEFAULTS["dev_max"]
    # How dev questions are picked: "spread" = seeded, documents taking turns (spread_sample).
    # Prompts trained before it existed took the first dev_max ("first").
    dev_selection: str = "spread"
    eval_every: int = 20  # 0: evaluate only at the end
    patience: int = 3  # evaluations without dev-F1 improvement before stopping
    eval_max_new_tokens: int = 48
    checkpoint_every: int = 20
    bf16: bool | None = None  # None: decided by the bf16 setting (auto: where the CPU has it)
    seed: int = 0
    bucket_factor: int = 8  # length-bucket over this many batches' worth of examples

    def check(self) -> None:
        if self.init not in INIT_MODES:
            raise RagptError(f"init must be one of {INIT_MODES}, got {self.init!r}")
        if self.gold_context not in GOLD_CONTEXT_MODES:
            raise RagptError(f"gold_context must be one of {GOLD_CONTEXT_MODES}, got {self.gold_context!r}")
        for name in ("n_tokens", "steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise RagptError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.depth < 0:
            raise RagptError(f"depth must be >= 0 (0: every layer), got {self.depth}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise RagptError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.dev_selection != "spread":
            raise RagptError(f"dev_selection must be 'spread', got {self.dev_selection!r}")
        if self.batch_size % self.grad_accum:
            raise RagptError(f"batch_size ({self.batch_size}) must be a multiple of grad_accum ({self.grad_accum})")

    def resolve(self, model, log: Callable[[str], None] = print) -> TrainConfig:
        """Fill in the defaults that depend on the model and the run: depth 0 -> every decoder
        layer (a plain prompt where the model cannot serve deep ones), warm-up -> a share of the
        steps. Idempotent; returns self."""
        if self.depth == 0:
            try:
                check_deep_support(model, 1)
                self.depth = len(decoder_layers(model))
            except RagptError as e:
                log(f"[train] a plain prompt instead of a deep one: {e}")
                self.depth = 1
        if self.warmup_steps is None:
            self.warmup_steps = max(1, round(WARMUP_FRACTION * self.steps))
        return self

    def warnings(self, n_train: int, n_dev: int) -> list[str]:
        """Settings that run but cannot do what they are meant to."""
        out = []
        if self.warmup_steps is not None and self.warmup_steps >= self.steps:
            out.append(f"warm-up ({self.warmup_steps} steps) is not shorter than the run ({self.steps} steps): "
                       f"the learning rate never reaches {self.lr:g}; lower --warmup-steps or leave it unset")
        if n_dev and self.eval_every and self.eval_every > self.steps:
            out.append(f"--eval-every {self.eval_every} exceeds --steps {self.steps}: the dev set is scored "
                       "only at the end, so the version cannot be chosen among steps")
        if 0 < n_dev < MIN_DECISIVE_DEV:
            out.append(f"{n_dev} dev questions are too few to tell a prompt from none (the interval will "
                       f"likely span 0); give at least {MIN_DECISIVE_DEV} with --dev-data or more --data")
        if not n_dev:
            out.append("no dev set (--dev-fraction 0): the last step is kept and no release verdict is given")
        if n_train and self.steps * self.batch_size < n_train:
            out.append(f"{self.steps} steps of {self.batch_size} see {self.steps * self.batch_size} of the "
                       f"{n_train} training examples: raise --steps to use them all")
        return out

    def contract(self, retriever: Retriever, *, query_adapter: bool = False) -> InputContract:
        """The input contract these settings and the retriever's mode build examples with
        (query_adapter: with a query adapter that was kept)."""
        return InputContract(k=self.k, max_context_tokens=self.max_context_tokens,
                             max_question_tokens=self.max_question_tokens, max_history_tokens=self.max_history_tokens,
                             dense=retriever.dense, bm25=retriever.bm25, rrf_k=retriever.rrf_k,
                             query_rule=self.query_rule, gold_context=self.gold_context,
                             query_adapter=query_adapter).check()

    def fingerprint(self) -> dict:
        """The settings that must match for a checkpoint to be resumed."""
        d = asdict(self)
        for volatile in ("eval_every", "patience", "checkpoint_every", "steps"):
            d.pop(volatile)
        if d["depth"] == 1:
            del d["depth"]  # plain prompts: same fingerprint (checkpoints, run folders) as before depth existed
        if not d["query_adapter"]:
            del d["query_adapter"]  # likewise for runs without a query adapter
        return d


@dataclass
class TrainExample:
    ids: list[int]
    answer_start: int  # loss on ids[answer_start:]
    qa: QAExample
    prompt_ids: list[int]  # the serving prompt (for generation-based dev eval)
    retrieval_hit: bool
    built: BuiltPrompt | None = None  # the serving prompt and what of the request is in it
    hits: tuple = ()  # what retrieval found (the gold passage, when put in, is not among them)
    query: str = ""  # what was retrieved with


@dataclass
class TrainResult:
    prompt: torch.Tensor  # best (by dev F1) soft prompt, float32
    metrics: dict
    loss_curve: list[dict]
    evals: list[dict]
    hyperparameters: dict
    data_sha256: str
    stopped_early: bool = False
    contract: dict = field(default_factory=dict)  # the input contract the examples were built with
    extra: dict = field(default_factory=dict)
    query_adapter: QueryAdapter | None = None  # the one the examples were retrieved with, if kept


# ---------------------------------------------------------------------------- distributed


def dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed_from_env() -> bool:
    """Join the process group when started by torchrun (gloo works on CPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="gloo")
        return True
    return False


class PromptModule(torch.nn.Module):
    """The only trainable part: prepends the soft prompt to a batch of token embeddings.

    A deep prompt (depth x n x hidden) prepends its slice 0; its other slices enter the decoder
    layers through `deep_prompt_inputs`, around the model call.

    Per-layer scale: hidden states grow with depth (SmolLM2: RMS 0.1 in the embeddings, 2-26 in
    layers 1-29), while AdamW moves every element by about lr per step. The parameter is the
    prompt divided by a fixed per-layer scale (the layer's median RMS over the RMS of slice 0),
    so one lr changes every layer's vectors by the same relative amount as a plain prompt's.
    Slice 0 has scale 1: a depth-1 prompt trains exactly as before.
    """

    def __init__(self, init: torch.Tensor):
        super().__init__()
        init = init.detach().float()
        scale = torch.ones(1 if init.dim() == 2 else init.shape[0])
        if init.dim() == 3:
            rms = init.pow(2).mean(-1).sqrt().median(-1).values.clamp(min=1e-6)
            scale = rms / rms[0]
        self.register_buffer("scale", scale, persistent=False)
        view = scale.view(-1, 1, 1) if init.dim() == 3 else scale
        self.prompt = torch.nn.Parameter((init / view).clone())

    def effective(self) -> torch.Tensor:
        """The soft prompt the model sees (what is evaluated, checkpointed as best and saved)."""
        return self.prompt * self.scale.view(-1, 1, 1) if self.prompt.dim() == 3 else self.prompt

    def forward(self, token_embeds: torch.Tensor) -> torch.Tensor:
        B = token_embeds.shape[0]
        first = self.prompt if self.prompt.dim() == 2 else self.prompt[0] * self.scale[0]
        p = first.to(token_embeds.dtype).unsqueeze(0).expand(B, -1, -1)
        return torch.cat([p, token_embeds], dim=1)


# ---------------------------------------------------------------------------- data


def gold_passage(qa: QAExample, max_chars: int = 900) -> ContextPassage | None:
    """A window of the gold context around the answer (the whole context when short)."""
    if not qa.context:
        return None
    text = qa.context
    if len(text) > max_chars:
        pos = text.lower().find(qa.answers[0].lower())
        centre = pos + len(qa.answers[0]) // 2 if pos >= 0 else 0
        start = max(0, min(len(text) - max_chars, centre - max_chars // 2))
        text = text[start:start + max_chars]
    return ContextPassage(text=text, source=qa.doc_id or "gold", title=qa.doc_id or "")


def build_examples(
    qas: list[QAExample],
    retriever: Retriever,
    tokenizer,
    cfg: TrainConfig,
    progress: bool = True,
    on_skip: Callable[[QAExample, Exception], None] | None = None,
    adapter: QueryAdapter | None = None,
) -> list[TrainExample]:
    """The request path's two halves (`retrieve_many`, `build_inputs`) under the config's input
    contract, plus the answer; with `adapter`, retrieval maps each question as serving will. An
    example over the question or prompt budget raises, or is handed to `on_skip` and left out."""
    contract = cfg.contract(retriever, query_adapter=adapter is not None)
    out: list[TrainExample] = []
    batch = 64
    for i in tqdm(range(0, len(qas), batch), desc="retrieve", disable=not progress, leave=False):
        chunk = qas[i:i + batch]
        histories = [tuple(Turn(t["role"], t["content"]) for t in q.history) for q in chunk]
        queries = [retrieval_query(q.question, h, contract.query_rule) for q, h in zip(chunk, histories)]
        hits_list = retrieve_many(retriever, queries, [cfg.department] * len(chunk), contract,
                                  adapters=[adapter] * len(chunk) if adapter is not None else None)
        for qa, history, hits, query in zip(chunk, histories, hits_list, queries):
            passages = passages_from_hits(hits)
            hit = any(answer_in_text(qa.answers, p.text) for p in passages)
            gold = gold_passage(qa)
            if gold is not None and (cfg.gold_context == "always" or (cfg.gold_context == "missed" and not hit)):
                # Replace the lowest-ranked passage: the prompt length stays what serving sees.
                passages = [gold] + passages[: max(0, cfg.k - 1)]
            ans_ids = tokenizer(qa.answers[0], add_special_tokens=False)["input_ids"][: cfg.max_answer_tokens]
            try:
                built = build_inputs(tokenizer, contract, qa.question, passages, department=cfg.department,
                                     history=history, system=qa.system)
            except (QuestionTooLongError, PromptTooLongError) as e:
                if on_skip is None:
                    raise RagptError(f"example {qa.id or qa.question[:40]!r}: {e}") from e
                on_skip(qa, e)
                continue
            ids, start = training_ids(tokenizer, built, tokenizer.decode(ans_ids))
            out.append(TrainExample(ids=ids, answer_start=start, qa=qa, prompt_ids=ids[:start], retrieval_hit=hit,
                                    built=built, hits=tuple(hits), query=query))
    return out


def batch_schedule(n_examples: int, cfg: TrainConfig, lengths: list[int], step: int) -> list[int]:
    """Example indices of optimizer step `step`; a pure function of (seed, step) so that a
    resumed run sees exactly the batches an uninterrupted one would."""
    per_epoch = max(1, n_examples // cfg.batch_size)
    epoch, within = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    perm = torch.randperm(n_examples, generator=g).tolist()
    # Length bucketing: sort each window of bucket_factor batches by length, then shuffle batches,
    # so rows in a batch have similar lengths (less padding) but batch order stays random.
    window = cfg.batch_size * cfg.bucket_factor
    batches: list[list[int]] = []
    for w in range(0, per_epoch * cfg.batch_size, window):
        part = sorted(perm[w:min(w + window, per_epoch * cfg.batch_size)], key=lambda i: lengths[i])
        batches += [part[j:j + cfg.batch_size] for j in range(0, len(part), cfg.batch_size)]
    order = torch.randperm(len(batches), generator=g).tolist()
    return batches[order[within]]


# ---------------------------------------------------------------------------- model pieces


def init_prompt(model, tokenizer, cfg: TrainConfig) -> torch.Tensor:
    emb = model.get_input_embeddings().weight.detach().float()
    g = torch.Generator().manual_seed(cfg.seed)
    if cfg.init == "random":
        return torch.randn(cfg.n_tokens, emb.shape[1], generator=g) * emb.std()
    if cfg.init == "vocab":
        # Sample from the first 5000 ids: in BPE vocabularies these are the frequent, well-trained tokens.
        ids = torch.randint(0, min(5000, emb.shape[0]), (cfg.n_tokens,), generator=g)
        return emb[ids].clone()
    text = cfg.init_text or SYSTEM_PROMPT.format(department=cfg.department)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise RagptError("init_text tokenizes to nothing")
    ids = (ids * math.ceil(cfg.n_tokens / len(ids)))[: cfg.n_tokens]
    return emb[torch.tensor(ids)].clone()


# A forward/backward call's fixed cost, in padded-token equivalents: splitting a batch into
# length groups pays off only when it saves more padding than this per extra group.
GROUP_OVERHEAD_TOKENS = 256


def length_groups(lengths: list[int], overhead: int) -> list[list[int]]:
    """Partition row indices into runs of similar length that minimise padded tokens + overhead.

    Rows are sorted by length; an exact dynamic programme over cut points (n <= batch size, so
    O(n^2) is nothing) picks the groups. Each group is padded only to its own longest row.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sorted_lengths = [lengths[i] for i in order]
    n = len(order)
    cost = [0.0] + [math.inf] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):  # group = sorted rows i..j-1, padded to sorted_lengths[j-1]
            c = cost[i] + (j - i) * sorted_lengths[j - 1] + overhead
            if c < cost[j]:
                cost[j], cut[j] = c, i
    groups, j = [], n
    while j > 0:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


def answer_loss_sum(model, prompt_module, rows: list[TrainExample], autocast) -> tuple[torch.Tensor, int]:
    """Sum of token cross-entropies over the rows' answer tokens, and the token count.

    The decoder runs over every position, but the LM head only over positions that predict an
    answer token: for a 135M model with a 49k vocabulary that projection dominates otherwise.
    Rows of very different lengths run as separate length groups (`length_groups`), so short
    rows are not padded to the longest one. `model` is the fp32 base model under a bf16
    `autocast`, or any model with a no-op `autocast`.
    """
    total, count = None, 0
    for group in length_groups([len(r.ids) for r in rows], GROUP_OVERHEAD_TOKENS):
        loss, c = _group_loss_sum(model, prompt_module, [rows[i] for i in group], autocast)
        total = loss if total is None else total + loss
        count += c
    return total, count


def _group_loss_sum(model, prompt_module, rows: list[TrainExample], autocast) -> tuple[torch.Tensor, int]:
    device = model.get_input_embeddings().weight.device
    inner = getattr(prompt_module, "module", prompt_module)  # DDP wraps the module
    n = inner.prompt.shape[-2]
    deep = inner.effective() if inner.prompt.dim() == 3 else None
    T = max(len(r.ids) for r in rows)
    pad = 0
    ids = torch.full((len(rows), T), pad, dtype=torch.long, device=device)
    for i, r in enumerate(rows):  # right padding: positions stay 0..len-1, as in serving
        ids[i, : len(r.ids)] = torch.tensor(r.ids)
    row_idx, pos_idx, targets = [], [], []
    for i, r in enumerate(rows):
        for t in range(r.answer_start, len(r.ids)):
            row_idx.append(i)
            pos_idx.append(n + t - 1)  # hidden state at position p predicts the token at p+1
            targets.append(r.ids[t])
    with autocast():
        embeds = prompt_module(model.get_input_embeddings()(ids))
        positions = torch.arange(T + n, device=device).unsqueeze(0).expand(len(rows), -1)
        # No attention mask, on purpose: with right padding and causal attention no real position
        # ever attends to a pad, so the causal-only path gives the same answer-position states
        # (13% faster than a padding mask even with SDPA). It also lets the chunked causal attention
        # replace SDPA's CPU flash kernel: 5.75 -> 3.72 s per step in benchmarks/train_step_profile.py.
        with chunked_causal_attention(model), deep_prompt_inputs(model, deep):
            hidden = model.base_model(inputs_embeds=embeds, attention_mask=None, position_ids=positions,
                                      use_cache=False).last_hidden_state
        h = hidden[torch.tensor(row_idx), torch.tensor(pos_idx)]
        logits = model.get_output_embeddings()(h)
    loss = F.cross_entropy(logits.float(), torch.tensor(targets, device=device), reduction="sum")
    return loss, len(targets)


def check_deep_support(model, depth: int) -> None:
    """Refuse, before any work, a deep prompt the model cannot train or serve."""
    try:
        n_layers = len(decoder_layers(model))
    except RagptError as e:
        raise RagptError(f"--depth {depth}: {e}") from e
    if depth > n_layers:
        raise RagptError(f"--depth {depth} exceeds the model's {n_layers} decoder layers")
    if not Generator.model_supports_prefix_cache(model):
        raise RagptError(f"--depth {depth}: deep prompts are served through a plain KV cache, which "
                         f"{type(model).__name__} does not keep (sliding-window or hybrid layers)")


def evaluate(generator: Generator, examples: list[TrainExample], prompt: torch.Tensor | None,
             max_new_tokens: int, batch: int = 8) -> dict:
    """Token-F1 / EM of greedy answers generated exactly as served (same prompt ids)."""
    f1s, ems, preds = [], [], []
    for i in range(0, len(examples), batch):
        part = examples[i:i + batch]
        res = generator.generate([e.prompt_ids for e in part], [prompt] * len(part), max_new_tokens=max_new_tokens)
        for e, r in zip(part, res):
            f1s.append(100 * best_over(token_f1, r.text, e.qa.answers))
            ems.append(100 * best_over(exact_match, r.text, e.qa.answers))
            preds.append(r.text)
    n = max(1, len(examples))
    return {"f1": sum(f1s) / n, "em": sum(ems) / n, "n": len(examples), "f1s": f1s, "predictions": preds}


def versus_no_prompt(f1s: list[float], baseline_f1s: list[float], seed: int) -> dict:
    """Paired bootstrap interval of dev token-F1 with the prompt minus without, per question."""
    ci = paired_difference_ci(f1s, baseline_f1s, seed=seed)
    return {"delta": round(ci.mean, 2), "low": round(ci.low, 2), "high": round(ci.high, 2), "n": ci.n}


def release_verdict(vs_none: dict | None, step: int) -> dict:
    """better / no better / worse than no prompt, by whether the 95% interval excludes 0.

    The interval is that of the version kept, which was chosen as the best of the evaluations
    on the same questions: slightly optimistic, so "better" is the claim to read with care."""
    if not vs_none:
        return {"verdict": "unknown", "step": step, "why": "no dev set or no baseline"}
    verdict = "better" if vs_none["low"] > 0 else "worse" if vs_none["high"] < 0 else "no better"
    return {"verdict": verdict, "step": step, **vs_none}


def describe_verdict(v: dict) -> str:
    if v.get("verdict") == "unknown":
        return f"unknown ({v.get('why', 'no dev evaluation')})"
    return (f"{v['verdict']} than no prompt: dev token-F1 {v['delta']:+.1f} [{v['low']:+.1f}, {v['high']:+.1f}] "
            f"on {v['n']} questions (step {v['step']})")


# ---------------------------------------------------------------------------- checkpoints


def save_checkpoint(folder: Path, state: dict, tensors: dict[str, torch.Tensor]) -> None:
    """safetensors for tensors + JSON for the rest, each written atomically (never pickle)."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".state.safetensors.tmp"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, folder / "state.safetensors")
    atomic_write_json(folder / "state.json", state)  # written last: marks the checkpoint complete


def load_checkpoint(folder: Path) -> tuple[dict, dict[str, torch.Tensor]] | None:
    if not (folder / "state.json").is_file() or not (folder / "state.safetensors").is_file():
        return None
    state = json.loads((folder / "state.json").read_text())
    tensors = load_file(str(folder / "state.safetensors"))
    if int(tensors["step"].item()) != state["step"]:
        return None  # the two files are from different saves (killed between them): start over
    return state, tensors


# ---------------------------------------------------------------------------- the loop


def train_prompt(
    model,
    tokenizer,
    retriever: Retriever,
    qas: list[QAExample],
    cfg: TrainConfig,
    *,
    checkpoint_dir: Path | None = None,
    resume: bool = True,
    progress: bool = True,
    log: Callable[[str], None] = print,
    dev_qas: list[QAExample] | None = None,
    on_step: Callable[[int, float], None] | None = None,
    on_eval: Callable[[int, torch.Tensor, dict], None] | None = None,
) -> TrainResult:
    """Optimise a soft prompt for `cfg.department`; return the best one by dev token-F1.

    `on_step(step, loss)` is called after each step is complete and checkpointed (progress
    reporting; raising from it interrupts the run, which can then be resumed). `on_eval(step,
    prompt, entry)` is called on the main process after each dev evaluation with the prompt
    evaluated and its dev entry (e.g. to evaluate the same prompt on held-out questions too).
    """
    cfg.check()
    cfg.resolve(model, log)
    memory.fix_mmap_threshold()
    rank, world = dist_info()
    main = rank == 0
    if cfg.batch_size % (world * cfg.grad_accum):
        raise RagptError(
            f"batch_size ({cfg.batch_size}) must be divisible by processes x grad_accum ({world} x {cfg.grad_accum})"
        )
    for p in model.parameters():
        p.requires_grad_(False)  # frozen, provably: only the soft prompt is ever optimised
    torch.manual_seed(cfg.seed)

    train_qas, dev_qas = select_dev(qas, dev_qas, dev_fraction=cfg.dev_fraction, dev_max=cfg.dev_max,
                                    seed=cfg.seed, rule=cfg.dev_selection)
    _check_no_leak(train_qas, dev_qas)
    if not train_qas:
        raise RagptError("no training examples left after the dev split")
    if cfg.depth > 1:
        check_deep_support(model, cfg.depth)
    skipped: list[str] = []

    def skip(qa: QAExample, e: Exception) -> None:
        skipped.append(qa.id or qa.question[:40])
        if main and len(skipped) <= 3:
            log(f"skipping example {skipped[-1]!r}: {e}")

    adapter, adapter_report = None, None
    if cfg.query_adapter:  # on the training questions only: dev judges the prompt and the adapter together
        adapter, adapter_report = fit_query_adapter(retriever, cfg, train_qas, log if main else lambda m: None)
    train = build_examples(train_qas, retriever, tokenizer, cfg, progress and main, on_skip=skip, adapter=adapter)
    dev = build_examples(dev_qas, retriever, tokenizer, cfg, progress and main, on_skip=skip,
                         adapter=adapter) if dev_qas else []
    if skipped and main:
        log(f"{len(skipped)} example(s) left out: over the question or prompt budget of the input contract")
    lengths = [len(e.ids) for e in train]
    if len(train) < cfg.batch_size:
        raise RagptError(f"{len(train)} training examples, fewer than batch_size={cfg.batch_size}")
    if main:
        for warning in cfg.warnings(len(train), len(dev)):
            log(f"[train] warning: {warning}")

    # bf16: one frozen bf16 copy of the weights serves both the training forward/backward and
    # dev generation. Autocast would re-cast every fp32 weight on every forward (it caches casts
    # only for weights that require grad); the copy casts once. The prompt's master copy stays
    # fp32 (PromptModule casts it per step), so AdamW updates are full precision.
    compute_model = inference_model(model, bool(cfg.bf16))
    generator = Generator(compute_model, tokenizer)  # for dev evaluation

    init = init_prompt(model, tokenizer, cfg)
    if cfg.depth > 1:  # starts as exactly the plain prompt's function (see deep_from_shallow)
        init = deep_from_shallow(model, init, cfg.depth)
    module = PromptModule(init)
    trainable = module
    if world > 1:
        trainable = torch.nn.parallel.DistributedDataParallel(module)
    opt = torch.optim.AdamW(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def lr_at(step: int) -> float:  # linear warm-up, then cosine decay to 10%
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))

    start_step, loss_curve, evals = 0, [], []
    best = {"f1": -1.0, "step": 0}
    best_prompt = module.effective().detach().clone()
    bad_evals = 0
    config_fp = cfg.fingerprint()
    ckpt = load_checkpoint(checkpoint_dir) if (checkpoint_dir and resume) else None
    if ckpt is not None:
        state, tensors = ckpt
        if state["config"] != config_fp or state["data_sha256"] != examples_sha256(train_qas):
            raise RagptError(
                f"checkpoint in {checkpoint_dir} was made with other settings or data; "
                "use another --checkpoint-dir or --no-resume"
            )
        with torch.no_grad():
            module.prompt.copy_(tensors["prompt"])
            if "scale" in tensors:  # the per-layer scale of the run, not a recomputation of it
                module.scale.copy_(tensors["scale"])
        best_prompt = tensors["best_prompt"].clone()
        opt.state[module.prompt] = {
            "step": tensors["adam_step"].clone(), "exp_avg": tensors["exp_avg"].clone(),
            "exp_avg_sq": tensors["exp_avg_sq"].clone(),
        }
        start_step = state["step"]
        loss_curve, evals, best, bad_evals = state["loss_curve"], state["evals"], state["best"], state["bad_evals"]
        if main:
            log(f"[train] resumed from {checkpoint_dir} at step {start_step}")

    baseline = None
    if dev and main and ckpt is None:
        baseline = evaluate(generator, dev, None, cfg.eval_max_new_tokens)
        best = {"f1": -1.0, "step": 0}
        log(f"[train] dev F1 without soft prompt: {baseline['f1']:.1f} (n={len(dev)})")
    elif ckpt is not None:
        baseline = state.get("baseline")

    micro = cfg.batch_size // (world * cfg.grad_accum)
    t_start = time.perf_counter()
    tokens_seen = 0
    stopped_early = False
    bar = tqdm(total=cfg.steps, initial=start_step, desc=f"train {cfg.department}", disable=not (progress and main))
    step = start_step
    for step in range(start_step, cfg.steps):
        batch_idx = batch_schedule(len(train), cfg, lengths, step)
        mine = batch_idx[rank::world]  # this process's share of the global batch
        global_tokens = sum(len(train[i].ids) - train[i].answer_start for i in batch_idx)
        for group in opt.param_groups:  # the schedule is a pure function of the step: resumable as is
            group["lr"] = cfg.lr * lr_at(step)
        opt.zero_grad(set_to_none=True)
        step_loss = 0.0
        for m in range(cfg.grad_accum):
            rows = [train[i] for i in mine[m * micro:(m + 1) * micro]]
            sync = m == cfg.grad_accum - 1
            ctx = trainable.no_sync() if (world > 1 and not sync) else contextlib.nullcontext()
            with ctx:
                loss_sum, _ = answer_loss_sum(compute_model, trainable, rows, contextlib.nullcontext)
                # DDP averages gradients over processes; scale so the result is sum / global tokens.
                (loss_sum * world / global_tokens).backward()
            step_loss += loss_sum.item()
            tokens_seen += sum(len(r.ids) + cfg.n_tokens for r in rows)
        if world > 1:
            t = torch.tensor([step_loss])
            dist.all_reduce(t)
            step_loss = t.item()
        torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.max_grad_norm)
        opt.step()
        mean_loss = step_loss / global_tokens
        loss_curve.append({"step": step + 1, "loss": round(mean_loss, 5), "lr": opt.param_groups[0]["lr"]})
        elapsed = time.perf_counter() - t_start
        bar.set_postfix(loss=f"{mean_loss:.3f}", tok_s=f"{tokens_seen * world / max(elapsed, 1e-9):.0f}")
        bar.update(1)

        last = step + 1 == cfg.steps
        if dev and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or last):
            f1 = torch.tensor([0.0])
            if main:
                r = evaluate(generator, dev, module.effective().detach(), cfg.eval_max_new_tokens)
                f1 = torch.tensor([r["f1"]])
                entry = {"step": step + 1, "f1": round(r["f1"], 3), "em": round(r["em"], 3)}
                if baseline and baseline.get("f1s"):
                    entry["vs_none"] = versus_no_prompt(r["f1s"], baseline["f1s"], cfg.seed)
                evals.append(entry)
                if on_eval is not None:
                    on_eval(step + 1, module.effective().detach(), entry)
            if world > 1:
                dist.broadcast(f1, src=0)  # every process takes the same early-stopping decision
            if f1.item() > best["f1"]:
                best = {"f1": f1.item(), "step": step + 1}
                best_prompt = module.effective().detach().clone()
                bad_evals = 0
            else:
                bad_evals += 1
            if main:
                vs = evals[-1].get("vs_none")
                vs_text = f", vs none {vs['delta']:+.1f} [{vs['low']:+.1f}, {vs['high']:+.1f}]" if vs else ""
                bar.write(f"[train] step {step + 1}: loss {mean_loss:.4f}, dev F1 {f1.item():.1f}{vs_text} "
                          f"(best {best['f1']:.1f} at {best['step']})")
            if cfg.patience and bad_evals >= cfg.patience:
                stopped_early = True
        elif not dev:
            best_prompt = module.effective().detach().clone()
            best = {"f1": float("nan"), "step": step + 1}

        if checkpoint_dir and main and ((step + 1) % cfg.checkpoint_every == 0 or last or stopped_early):
            st = opt.state[module.prompt]
            save_checkpoint(
                checkpoint_dir,
                {"step": step + 1, "config": config_fp, "data_sha256": examples_sha256(train_qas),
                 "loss_curve": loss_curve, "evals": evals, "best": best, "bad_evals": bad_evals,
                 "baseline": baseline and {k: v for k, v in baseline.items() if k != "predictions"}},
                {"prompt": module.prompt.detach(), "scale": module.scale, "best_prompt": best_prompt,
                 "exp_avg": st["exp_avg"], "exp_avg_sq": st["exp_avg_sq"],
                 "adam_step": torch.as_tensor(st["step"], dtype=torch.float32).reshape(()),
                 "step": torch.tensor(step + 1)},
            )
        memory.trim_heap(step + 1)
        if on_step is not None:
            on_step(step + 1, mean_loss)
        if stopped_early:
            if main:
                bar.write(f"[train] early stop: no dev improvement in {cfg.patience} evaluations")
            break
    bar.close()
    seconds = time.perf_counter() - t_start
    metrics = {
        "best_step": best["step"],
        "steps_run": step + 1,
        "train_examples": len(train),
        "dev_examples": len(dev),
        "train_retrieval_hit_rate": round(sum(e.retrieval_hit for e in train) / len(train), 4),
        "train_seconds": round(seconds, 1),
        "tokens_per_second": round(tokens_seen * world / max(seconds, 1e-9), 1),
        "processes": world,
        "examples_over_budget": len(skipped),
    }
    if adapter_report is not None:
        metrics["query_adapter"] = adapter_report
    if dev:
        metrics["dev_f1"] = round(best["f1"], 3)
        if baseline:
            metrics["dev_f1_no_prompt"] = round(baseline["f1"], 3)
            metrics["dev_em_no_prompt"] = round(baseline["em"], 3)
        metrics["dev_retrieval_hit_rate"] = round(sum(e.retrieval_hit for e in dev) / len(dev), 4)
        kept = next((e for e in evals if e["step"] == best["step"]), {})
        metrics["dev_verdict"] = release_verdict(kept.get("vs_none"), best["step"])
    return TrainResult(
        prompt=best_prompt.float().contiguous(),
        metrics=metrics,
        loss_curve=loss_curve,
        evals=evals,
        # Runs without a query adapter record their hyperparameters as before the option existed.
        hyperparameters={k: v for k, v in asdict(cfg).items() if k != "query_adapter" or v},
        data_sha256=examples_sha256(train_qas + dev_qas),
        stopped_early=stopped_early,
        contract=cfg.contract(retriever, query_adapter=adapter is not None).to_dict(),
        query_adapter=adapter,
    )


def fit_query_adapter(retriever: Retriever, cfg: TrainConfig, train_qas: list[QAExample],
                      log: Callable[[str], None]) -> tuple[QueryAdapter | None, dict]:
    """The department's query adapter from its training questions, searched with the retrieval
    queries the examples are built with, or None where it does not beat the embedder as it is on
    the questions it holds out (the report says which)."""
    from ragpt.retrieval.query_adapter import AdapterConfig, QueryAdapterError, train_query_adapter

    if not retriever.dense:
        raise RagptError("a query adapter maps the dense search's question embedding: turn the dense ranker on")
    queries = [retrieval_query(q.question, tuple(Turn(t["role"], t["content"]) for t in q.history), cfg.query_rule)
               for q in train_qas]
    try:
        adapter, rep = train_query_adapter(retriever, cfg.department, train_qas, config=AdapterConfig(seed=cfg.seed),
                                           k=cfg.k, queries=queries)
    except QueryAdapterError as e:
        log(f"[train] no query adapter: {e}")
        return None, {"kept": False, "reason": str(e)}
    report = {"kept": rep.improved, "questions_with_positive": rep.with_positive, "train": rep.train,
              "holdout": rep.holdout, f"holdout_hit@{rep.k}_without": rep.hit_at_k_identity,
              f"holdout_hit@{rep.k}_with": rep.hit_at_k, "epoch": rep.chosen_epoch}
    where = f"span hit@{rep.k} on {rep.holdout} held-out training questions"
    if rep.improved and not rep.holdout:
        log("[train] query adapter kept without a held-out check (nothing was held out)")
        return adapter, report
    if rep.improved:
        log(f"[train] query adapter kept: {where} {rep.hit_at_k_identity} -> {rep.hit_at_k}")
        return adapter, report
    log(f"[train] query adapter not kept: no better than the embedder as it is ({where}: {rep.hit_at_k_identity})")
    return None, report


def _check_no_leak(train: list[QAExample], dev: list[QAExample]) -> None:
    """No dev question may also be a training question (split hygiene, checked not assumed)."""
    seen = {(q.question.strip().lower(), q.doc_id) for q in train}
    leaked = [q.question for q in dev if (q.question.strip().lower(), q.doc_id) in seen]
    if leaked:
        raise RagptError(f"{len(leaked)} dev question(s) also in the training data, e.g. {leaked[0]!r}")
