"""A LoRA adapter trained on a department's examples: the upper-bound reference in evaluations.

Soft prompts change ~10k numbers per department; LoRA on the attention's q/v projections
changes ~0.5M and reaches into every layer, so it shows how much a department could gain from
any light fine-tuning. It is a reference, not a serving option: ragpt serves one frozen model.

The loop mirrors ragpt.training.trainer (same examples from `build_examples`, same batch schedule, loss on
answer tokens only through `answer_loss_sum`), written out plainly; peft only injects and
merges the low-rank matrices. peft is a dev dependency, imported when this runs.

The base model is never touched: LoRA trains on a private copy, whose adapter is then merged
into that copy's weights, so generating with it is an ordinary forward pass (same Generator,
same template, same decoding as every other method).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ragpt.errors import RagptError
from ragpt.training.trainer import TrainConfig, TrainExample, answer_loss_sum, batch_schedule


@dataclass
class LoraSettings:
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0  # 0: the run is a pure function of the seed
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    steps: int = 40  # a reference, not a tuned model: few steps keep evaluations cheap
    batch_size: int = 4
    lr: float = 5e-4
    warmup_steps: int = 4
    max_grad_norm: float = 1.0
    seed: int = 0
    bf16: bool = False

    def check(self) -> None:
        if self.rank < 1 or self.steps < 1 or self.batch_size < 1:
            raise RagptError("LoRA rank, steps and batch_size must be >= 1")


@dataclass
class LoraResult:
    model: torch.nn.Module  # a private copy of the base model with the adapter merged in, frozen
    trainable_parameters: int
    adapter_bytes: int  # size of adapter_model.safetensors (fp32 parameter bytes when not saved)
    loss_curve: list[dict]
    settings: dict
    adapter_dir: str | None = None
    train_examples: int = 0
    seconds: float = 0.0


def _peft():
    try:
        import peft
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RagptError(
            "the LoRA reference needs peft, a dev dependency: pip install 'ragpt[dev]' (or pip install peft)"
        ) from e
    return peft


class _NoPrompt(torch.nn.Module):
    """Stands in for ragpt.training.trainer.PromptModule so `answer_loss_sum` runs on plain token embeddings."""

    def __init__(self, hidden: int):
        super().__init__()
        self.prompt = torch.zeros(0, hidden)

    def forward(self, token_embeds: torch.Tensor) -> torch.Tensor:
        return token_embeds


def private_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy without ragpt's memos (the base fingerprint, the bf16 inference copy): they
    describe the base model, and the copy is about to stop being it."""
    memo = {id(v): None for k, v in vars(model).items() if k.startswith("_ragpt_") and not isinstance(v, str)}
    twin = copy.deepcopy(model, memo)
    for k in [k for k in vars(twin) if k.startswith("_ragpt_")]:
        del twin.__dict__[k]
    return twin


def train_lora(
    base_model: torch.nn.Module,
    examples: list[TrainExample],
    settings: LoraSettings,
    *,
    out_dir: Path | None = None,
    progress: bool = True,
) -> LoraResult:
    """Train a LoRA adapter on `examples` (answer-token loss), save it, return the merged copy."""
    settings.check()
    if not examples:
        raise RagptError("no training examples for the LoRA reference")
    peft = _peft()
    model = private_copy(base_model).float()
    model.requires_grad_(False)
    model.eval()  # no dropout anywhere: the run is a pure function of the seed
    torch.manual_seed(settings.seed)
    config = peft.LoraConfig(
        r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules), bias="none", task_type="CAUSAL_LM",
    )
    # peft injects the low-rank layers into `model` in place; `wrapped` is only for save/merge.
    with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5: not the user's concern
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        wrapped = peft.get_peft_model(model, config)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    # The soft-prompt trainer's schedule (seeded, length-bucketed), so both see batches alike.
    schedule = TrainConfig(department="lora", batch_size=min(settings.batch_size, len(examples)),
                           seed=settings.seed)
    lengths = [len(e.ids) for e in examples]
    no_prompt = _NoPrompt(int(model.get_input_embeddings().weight.shape[1]))

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16) if settings.bf16 else contextlib.nullcontext()

    def lr_at(step: int) -> float:  # linear warm-up, then cosine decay to 10%, as ragpt.training.trainer
        if step < settings.warmup_steps:
            return (step + 1) / settings.warmup_steps
        frac = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))

    curve: list[dict] = []
    t0 = time.perf_counter()
    for step in tqdm(range(settings.steps), desc="train lora", disable=not progress, leave=False):
        rows = [examples[i] for i in batch_schedule(len(examples), schedule, lengths, step)]
        for group in opt.param_groups:
            group["lr"] = settings.lr * lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss_sum, n_tokens = answer_loss_sum(model, no_prompt, rows, autocast)
        (loss_sum / max(1, n_tokens)).backward()
        torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        opt.step()
        curve.append({"step": step + 1, "loss": round(loss_sum.item() / max(1, n_tokens), 5),
                      "lr": opt.param_groups[0]["lr"]})
    seconds = time.perf_counter() - t0

    adapter_bytes = 4 * n_trainable
    saved = None
    if out_dir is not None:
        out_dir = Path(out_dir)
        wrapped.save_pretrained(str(out_dir), safe_serialization=True)
        weights = out_dir / "adapter_model.safetensors"
        if weights.is_file():
            adapter_bytes = weights.stat().st_size
        saved = str(out_dir)
    merged = wrapped.merge_and_unload()
    merged.requires_grad_(False)
    merged.eval()
    return LoraResult(
        model=merged, trainable_parameters=n_trainable, adapter_bytes=adapter_bytes, loss_curve=curve,
        settings={**asdict(settings), "target_modules": list(settings.target_modules)},
        adapter_dir=saved, train_examples=len(examples), seconds=round(seconds, 1),
    )
