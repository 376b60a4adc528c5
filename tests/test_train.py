"""The prompt-tuning loop: frozen base, answer-only loss, determinism, resume, 2 processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_model
from safetensors.torch import load_file

from ragpt.data.qa import QAExample
from ragpt.data.sample import sample_questions
from ragpt.errors import RagptError
from ragpt.training.trainer import (
    PromptModule,
    TrainConfig,
    TrainExample,
    answer_loss_sum,
    batch_schedule,
    build_examples,
    train_prompt,
)


def _hr_examples() -> list[QAExample]:
    return [QAExample(q.question, q.answers, doc_id=q.source, department=q.department)
            for q in sample_questions("hr")]


def _cfg(**kw) -> TrainConfig:
    base = dict(department="hr", n_tokens=4, steps=4, batch_size=4, k=1, max_context_tokens=192,
                eval_every=0, patience=0, dev_fraction=0.2, dev_max=4, eval_max_new_tokens=4,
                warmup_steps=2, lr=5e-2, bf16=False, checkpoint_every=1, seed=3)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def retriever(sample_index, real_embedder):
    from ragpt.retrieval.index import DocumentIndex
    from ragpt.retrieval.search import Retriever

    settings, name = sample_index
    return Retriever(DocumentIndex.open(settings.index_dir, name), real_embedder)


def _rows(tok, n=3) -> list[TrainExample]:
    rows = []
    for i in range(n):
        prompt = tok(f"question {i} about vacation days and the VPN", add_special_tokens=False)["input_ids"]
        answer = tok(f"{5 * (i + 1)} days", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        qa = QAExample("q", ["a"])
        rows.append(TrainExample(ids=prompt + answer, answer_start=len(prompt), qa=qa,
                                 prompt_ids=prompt, retrieval_hit=True))
    return rows


def test_answer_only_loss_equals_full_vocab_loss_with_masked_labels(tiny_model, tiny_tokenizer):
    """Applying the LM head at answer positions only must give exactly the standard loss."""
    rows = _rows(tiny_tokenizer)
    module = PromptModule(torch.randn(4, tiny_model.config.hidden_size) * 0.1)
    loss_sum, count = answer_loss_sum(tiny_model, module, rows, _nullctx)
    assert count == sum(len(r.ids) - r.answer_start for r in rows)

    # Reference: the whole model, full logits, labels -100 everywhere but the answer, row by row.
    ref = 0.0
    for r in rows:
        emb = tiny_model.get_input_embeddings()(torch.tensor([r.ids]))
        x = torch.cat([module.prompt.detach()[None], emb], 1)
        labels = torch.full((1, x.shape[1]), -100)
        labels[0, 4 + r.answer_start:] = torch.tensor(r.ids[r.answer_start:])
        out = tiny_model(inputs_embeds=x, labels=labels)
        ref += out.loss.item() * (len(r.ids) - r.answer_start)
    assert loss_sum.item() == pytest.approx(ref, rel=1e-5)


def test_length_groups_partition_rows_and_cut_padding():
    from ragpt.training.trainer import length_groups

    lengths = [500, 120, 510, 130, 505, 125, 498, 700]
    groups = length_groups(lengths, overhead=256)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))  # a partition
    padded = sum(len(g) * max(lengths[i] for i in g) for g in groups)
    assert padded < len(lengths) * max(lengths)  # short rows no longer padded to 700
    assert [sorted(lengths[i] for i in g) for g in groups][0] == [120, 125, 130]
    # Similar lengths: one group, since a split would cost more overhead than it saves.
    assert length_groups([500, 505, 510, 498], overhead=256) == [[3, 0, 1, 2]]
    # Mixed-length rows: the grouped loss is the one-batch loss (same sum, other float order).
    assert length_groups([], overhead=256) == []


def test_grouped_loss_equals_one_padded_batch(tiny_model, tiny_tokenizer, monkeypatch):
    import ragpt.training.trainer as train

    rows = _rows(tiny_tokenizer)
    assert len({len(r.ids) for r in rows}) > 1
    module = PromptModule(torch.randn(4, tiny_model.config.hidden_size) * 0.1)
    monkeypatch.setattr(train, "GROUP_OVERHEAD_TOKENS", 0)  # one group per distinct length
    split, n_split = answer_loss_sum(tiny_model, module, rows, _nullctx)
    monkeypatch.setattr(train, "GROUP_OVERHEAD_TOKENS", 10**9)  # everything in one padded batch
    whole, n_whole = answer_loss_sum(tiny_model, module, rows, _nullctx)
    assert n_split == n_whole
    assert split.item() == pytest.approx(whole.item(), rel=1e-5)


def _nullctx():
    import contextlib

    return contextlib.nullcontext()


def test_gradients_reach_only_the_prompt(tiny_model, tiny_tokenizer):
    for p in tiny_model.parameters():
        p.requires_grad_(False)
    module = PromptModule(torch.randn(4, tiny_model.config.hidden_size))
    loss, _ = answer_loss_sum(tiny_model, module, _rows(tiny_tokenizer), _nullctx)
    loss.backward()
    assert module.prompt.grad is not None and module.prompt.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_model.parameters())


def test_batch_schedule_is_a_pure_function_of_seed_and_step():
    cfg = _cfg(batch_size=4, bucket_factor=2)
    lengths = [(i * 37) % 50 for i in range(20)]
    a = [batch_schedule(20, cfg, lengths, s) for s in range(10)]
    b = [batch_schedule(20, cfg, lengths, s) for s in range(10)]
    assert a == b
    epoch0 = sorted(i for s in range(5) for i in a[s])
    assert epoch0 == list(range(20))  # one epoch covers every example exactly once
    assert a[:5] != a[5:10]  # the next epoch is reshuffled


@pytest.mark.integration
@pytest.mark.parametrize("depth", [1, 2], ids=["plain", "deep"])
def test_training_leaves_base_weights_bit_identical_and_is_deterministic(tiny_tokenizer, retriever, tmp_path, depth):
    model = build_tiny_model(tiny_tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = _cfg(depth=depth)
    r1 = train_prompt(model, tiny_tokenizer, retriever, _hr_examples(), cfg, progress=False, log=lambda m: None)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"base weight {k} changed"
    r2 = train_prompt(model, tiny_tokenizer, retriever, _hr_examples(), cfg, progress=False, log=lambda m: None)
    assert r1.prompt.shape == ((4, 64) if depth == 1 else (2, 4, 64))
    assert torch.equal(r1.prompt, r2.prompt)
    assert r1.loss_curve == r2.loss_curve
    assert len(r1.loss_curve) == 4 and r1.loss_curve[-1]["loss"] < r1.loss_curve[0]["loss"] * 1.5


@pytest.mark.integration
@pytest.mark.parametrize("depth", [1, 2], ids=["plain", "deep"])
def test_resume_after_interruption_equals_uninterrupted_run(tiny_tokenizer, retriever, tmp_path, depth):
    model = build_tiny_model(tiny_tokenizer)
    cfg = _cfg(steps=6, eval_every=2, depth=depth)
    full = train_prompt(model, tiny_tokenizer, retriever, _hr_examples(), cfg, checkpoint_dir=tmp_path / "a",
                        progress=False, log=lambda m: None)

    class Killed(Exception):
        pass

    def kill_at_3(step, loss):
        if step == 3:
            raise Killed

    with pytest.raises(Killed):
        train_prompt(model, tiny_tokenizer, retriever, _hr_examples(), cfg, checkpoint_dir=tmp_path / "b",
                     progress=False, log=lambda m: None, on_step=kill_at_3)
    assert json.loads((tmp_path / "b" / "state.json").read_text())["step"] == 3
    # The per-layer scale is part of the checkpoint: a resumed run uses the run's own, not a recomputation.
    assert load_file(str(tmp_path / "b" / "state.safetensors"))["scale"].shape == (depth,)
    resumed = train_prompt(model, tiny_tokenizer, retriever, _hr_examples(), cfg, checkpoint_dir=tmp_path / "b",
                           progress=False, log=lambda m: None)
    assert torch.equal(resumed.prompt, full.prompt)
    assert resumed.loss_curve == full.loss_curve
    assert resumed.evals == full.evals


@pytest.mark.integration
def test_resume_refuses_a_checkpoint_from_other_settings(tiny_tokenizer, retriever, tmp_path):
    model = build_tiny_model(tiny_tokenizer)
    train_prompt(model, tiny_tokenizer, retriever, _hr_examples(), _cfg(steps=1), checkpoint_dir=tmp_path,
                 progress=False, log=lambda m: None)
    with pytest.raises(RagptError, match="other settings"):
        train_prompt(model, tiny_tokenizer, retriever, _hr_examples(), _cfg(steps=2, lr=0.5),
                     checkpoint_dir=tmp_path, progress=False, log=lambda m: None)


@pytest.mark.integration
def test_gold_context_is_injected_only_when_retrieval_misses(tiny_tokenizer, retriever):
    qa = QAExample("How many vacation days?", ["zebra-unicorn-42"], doc_id="x",
                   context="The secret answer is zebra-unicorn-42 for everyone.")
    never = build_examples([qa], retriever, tiny_tokenizer, _cfg(gold_context="never", k=2), progress=False)[0]
    missed = build_examples([qa], retriever, tiny_tokenizer, _cfg(gold_context="missed", k=2), progress=False)[0]
    assert not never.retrieval_hit
    assert "zebra-unicorn-42" not in tiny_tokenizer.decode(never.prompt_ids)
    assert "zebra-unicorn-42" in tiny_tokenizer.decode(missed.prompt_ids)


def _tiny_generator_and_data(tokenizer, tmp_path: Path) -> tuple[Path, Path]:
    """A tiny generator saved as a model folder (what `generator=` points to) and the hr QA file."""
    from ragpt.data.qa import save_jsonl

    model_dir = tmp_path / "tiny-generator"
    build_tiny_model(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = tmp_path / "hr.jsonl"
    save_jsonl(_hr_examples(), data)
    return model_dir, data


@pytest.mark.integration
@pytest.mark.parametrize("depth", [1, 2], ids=["plain", "deep"])
def test_two_processes_under_torchrun_match_one_process(tiny_tokenizer, sample_index, tmp_path, depth):
    """torchrun --nproc_per_node=2 (gloo) gives the same prompt as one process, same global batch.

    Deep: the prompt's deeper slices enter through layer hooks, outside DDP's forward call; DDP
    still all-reduces the whole parameter's gradient."""
    from ragpt.config import Settings
    from ragpt.training.job import run_training

    settings, index = sample_index
    model_dir, data = _tiny_generator_and_data(tiny_tokenizer, tmp_path)
    common = ["--department", "hr", "--index", index, "--data", str(data), "--steps", "3", "--batch-size", "4",
              "--n-tokens", "4", "-k", "1", "--max-context-tokens", "192", "--eval-every", "0",
              "--patience", "0", "--lr", "0.05", "--warmup-steps", "1", "--seed", "5", "--no-register", "-q",
              "--depth", str(depth)]
    env = {**os.environ, "RAGPT_INDEX_DIR": str(settings.index_dir), "RAGPT_CACHE_DIR": str(settings.cache_dir),
           "RAGPT_GENERATOR": str(model_dir), "RAGPT_BF16": "off", "RAGPT_PROMPT_DIR": str(tmp_path / "prompts"),
           "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    two = subprocess.run(
        [*torchrun, "-m", "ragpt.cli", "train", *common, "--checkpoint-dir", str(tmp_path / "two")],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    s1 = Settings(index_dir=settings.index_dir, cache_dir=settings.cache_dir, generator=str(model_dir), bf16="off",
                  prompt_dir=tmp_path / "prompts")
    cfg = TrainConfig(department="hr", steps=3, batch_size=4, n_tokens=4, k=1, max_context_tokens=192,
                      eval_every=0, patience=0, lr=0.05, warmup_steps=1, seed=5, checkpoint_every=1, depth=depth)
    one = run_training(s1, index=index, data=data, cfg=cfg, checkpoint_dir=tmp_path / "one", register=False,
                       progress=False, log=lambda m: None)
    assert one["processes"] == 1
    p_one = load_file(str(Path(one["folder"]) / "prompt.safetensors"))["prompt"]
    p_two = load_file(str(tmp_path / "two" / "result" / "prompt.safetensors"))["prompt"]
    meta_two = json.loads((tmp_path / "two" / "result" / "meta.json").read_text())
    assert meta_two["metrics"]["processes"] == 2
    assert not torch.equal(p_one, torch.zeros_like(p_one))
    # Float tolerance: each process sums its half of the batch, so reduction order differs; Adam's
    # normalised update turns that into ~1e-5 absolute noise on near-zero coordinates. In the
    # trained parameter's units, that is: a deep slice is optimised divided by its layer's scale.
    scale = torch.ones(1)
    if depth > 1:
        rms = p_one.pow(2).mean(-1).sqrt().median(-1).values
        scale = (rms / rms[0]).view(-1, 1, 1)
    torch.testing.assert_close(p_two / scale, p_one / scale, rtol=1e-4, atol=1e-4)


@pytest.mark.integration
def test_default_checkpoints_resume_the_same_run_and_keep_other_runs_apart(tiny_tokenizer, sample_index, tmp_path):
    """Re-running a command resumes it; a run with another lr no longer trips over the last one's checkpoint."""
    from ragpt.config import Settings
    from ragpt.training.job import run_training

    settings, index = sample_index
    model_dir, data = _tiny_generator_and_data(tiny_tokenizer, tmp_path)
    s = Settings(index_dir=settings.index_dir, cache_dir=tmp_path / "cache", generator=str(model_dir), bf16="off",
                 prompt_dir=tmp_path / "prompts")

    def train(lr: float) -> list[str]:
        logs: list[str] = []
        cfg = TrainConfig(department="hr", steps=2, batch_size=4, n_tokens=4, k=1, max_context_tokens=192,
                          eval_every=0, patience=0, lr=lr, warmup_steps=1, seed=5, checkpoint_every=1)
        run_training(s, index=index, data=data, cfg=cfg, register=False, progress=False, log=logs.append)
        return logs

    assert not any("resumed" in m for m in train(0.05))
    assert not any("resumed" in m for m in train(0.2))  # other settings: its own folder, no error
    assert any("resumed" in m for m in train(0.05))  # the first command again: its checkpoint
    assert len(list((tmp_path / "cache" / "checkpoints" / "hr").iterdir())) == 2
