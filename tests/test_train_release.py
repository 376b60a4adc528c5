"""From training to a release decision: the default recipe, a dev set that can decide (seeded,
spread across documents, with a paired interval against no prompt), the verdict each draft
carries, and the approval gate that refuses a draft that scored worse than no prompt."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import build_tiny_model  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from ragpt.data.qa import QAExample, select_dev, split_by_document, spread_sample  # noqa: E402
from ragpt.data.sample import sample_questions  # noqa: E402
from ragpt.softprompts.artifact import SoftPrompt  # noqa: E402
from ragpt.softprompts.registry import IllegalTransitionError, PromptRegistry, ReleaseGateError  # noqa: E402
from ragpt.training.trainer import TrainConfig, release_verdict, train_prompt, versus_no_prompt  # noqa: E402

FP = "0123456789abcdef" * 4


def _file_sorted_by_document(docs: int = 6, per_doc: int = 10) -> list[QAExample]:
    return [QAExample(f"question {d}.{i}?", [f"answer {d}.{i}"], doc_id=f"doc{d}") for d in range(docs)
            for i in range(per_doc)]


# --------------------------------------------------------------------------- the dev set


def test_a_dev_set_from_a_file_sorted_by_document_is_spread_across_its_documents():
    qas = _file_sorted_by_document()
    first = qas[:12]
    assert {q.doc_id for q in first} == {"doc0", "doc1"}  # what taking the first N gave
    dev = spread_sample(qas, 12, seed=0)
    assert len(dev) == 12 and {q.doc_id for q in dev} == {f"doc{d}" for d in range(6)}
    assert all(sum(q.doc_id == f"doc{d}" for q in dev) == 2 for d in range(6))
    assert spread_sample(qas, 12, seed=0) == dev  # seeded: the same every run
    assert spread_sample(qas, 12, seed=1) != dev
    assert spread_sample(qas, 100, seed=0) == qas  # fewer than n: all of them

    train, dev = select_dev(qas[:30], qas, dev_fraction=0.15, dev_max=12, seed=0)
    assert train == qas[:30] and len({q.doc_id for q in dev}) == 6
    _, old = select_dev(qas[:30], qas, dev_fraction=0.15, dev_max=12, seed=0, rule="first")
    assert old == first  # how prompts trained before spreading chose it, to recognise their data


def test_a_split_from_the_training_data_is_capped_and_keeps_documents_apart():
    qas = _file_sorted_by_document(docs=40, per_doc=10)
    train, dev = split_by_document(qas, 0.15, seed=0)
    assert len(dev) == 60 and len(train) == 340
    train, dev = select_dev(qas, None, dev_fraction=0.5, dev_max=45, seed=0)
    assert len(dev) == 45 and len(train) == 350  # 5 whole documents held out, 45 of them scored
    assert not {q.doc_id for q in dev} & {q.doc_id for q in train}


# --------------------------------------------------------------------------- the recipe


def test_the_default_recipe_is_a_deep_prompt_over_every_layer_with_scaled_warm_up(tiny_tokenizer):
    model = build_tiny_model(tiny_tokenizer, layers=3)
    cfg = TrainConfig(department="hr")
    assert (cfg.depth, cfg.steps, cfg.lr, cfg.warmup_steps) == (0, 80, 1e-2, None)
    cfg.resolve(model, log=lambda m: None)
    assert (cfg.depth, cfg.warmup_steps) == (3, 8)
    assert cfg.resolve(model).depth == 3  # idempotent
    short = TrainConfig(department="hr", steps=6).resolve(model)
    assert short.warmup_steps == 1 and not any("warm-up" in w for w in short.warnings(100, 40))
    plain = TrainConfig(department="hr", depth=1).resolve(model)
    assert plain.depth == 1


def test_settings_that_cannot_work_are_warned_about():
    cfg = TrainConfig(department="hr", steps=6, warmup_steps=10, eval_every=20, depth=1)
    text = " | ".join(cfg.warnings(n_train=200, n_dev=12))
    assert "warm-up (10 steps) is not shorter than the run (6 steps)" in text
    assert "--eval-every 20 exceeds --steps 6" in text
    assert "12 dev questions are too few" in text
    assert "6 steps of 8 see 48 of the 200 training examples" in text
    assert TrainConfig(department="hr", depth=1, warmup_steps=8).warnings(n_train=400, n_dev=60) == []
    assert "no release verdict" in TrainConfig(department="hr").warnings(100, 0)[0]


def test_the_verdict_is_the_side_of_zero_the_paired_interval_lies_on():
    assert release_verdict({"delta": 4.0, "low": 1.0, "high": 7.0, "n": 90}, 60)["verdict"] == "better"
    assert release_verdict({"delta": -4.0, "low": -7.0, "high": -1.0, "n": 90}, 60)["verdict"] == "worse"
    assert release_verdict({"delta": 1.0, "low": -2.0, "high": 4.0, "n": 90}, 60)["verdict"] == "no better"
    assert release_verdict(None, 60)["verdict"] == "unknown"
    vs = versus_no_prompt([100.0, 50.0, 0.0, 100.0], [0.0, 50.0, 0.0, 0.0], seed=0)
    assert vs["delta"] == 50.0 and vs["n"] == 4 and vs["low"] <= 50.0 <= vs["high"]


@pytest.mark.integration
def test_training_scores_every_evaluation_against_no_prompt_and_records_a_verdict(tiny_tokenizer, sample_index,
                                                                                    real_embedder):
    from ragpt.retrieval.index import DocumentIndex
    from ragpt.retrieval.search import Retriever

    settings, name = sample_index
    retriever = Retriever(DocumentIndex.open(settings.index_dir, name), real_embedder)
    qas = [QAExample(q.question, q.answers, doc_id=q.source) for q in sample_questions("hr")]
    logs: list[str] = []
    cfg = TrainConfig(department="hr", n_tokens=4, steps=4, batch_size=4, k=1, max_context_tokens=192,
                      eval_every=2, patience=0, dev_fraction=0.3, eval_max_new_tokens=4, lr=5e-2, bf16=False, seed=3)
    result = train_prompt(build_tiny_model(tiny_tokenizer), tiny_tokenizer, retriever, qas, cfg, progress=False,
                          log=logs.append)
    m = result.metrics
    assert result.hyperparameters["depth"] == 2 and result.hyperparameters["warmup_steps"] == 1
    assert [e["step"] for e in result.evals] == [2, 4]
    for e in result.evals:  # the paired mean difference is the difference of the two means
        assert e["vs_none"]["n"] == m["dev_examples"]
        assert e["vs_none"]["delta"] == pytest.approx(e["f1"] - m["dev_f1_no_prompt"], abs=0.02)
        assert e["vs_none"]["low"] <= e["vs_none"]["delta"] <= e["vs_none"]["high"]
    v = m["dev_verdict"]
    kept = next(e for e in result.evals if e["step"] == m["best_step"])
    assert v == release_verdict(kept["vs_none"], m["best_step"])
    assert any("dev questions are too few" in line for line in logs)  # a 6-question dev set is no decider


# --------------------------------------------------------------------------- the approval gate


def _draft(reg: PromptRegistry, verdict: str | None, seed: int = 0) -> str:
    metrics = {"dev_f1": 10.0}
    if verdict:
        delta = {"worse": -5.0, "better": 5.0, "no better": 0.5}[verdict]
        metrics["dev_verdict"] = {"verdict": verdict, "delta": delta, "low": delta - 2, "high": delta + 2,
                                  "n": 120, "step": 40}
    t = torch.randn(4, 8, generator=torch.Generator().manual_seed(seed))
    return reg.register(SoftPrompt.create(t, department="hr", base_fingerprint=FP, metrics=metrics), actor="trainer")


def test_approve_refuses_a_draft_that_scored_worse_unless_forced_with_a_reason(tmp_path):
    reg = PromptRegistry(tmp_path / "prompts")
    worse, better, unknown = _draft(reg, "worse"), _draft(reg, "better", 1), _draft(reg, None, 2)
    gate = r"worse than no prompt on its dev set \(-5.0 F1 \[-7.0, -3.0\], n=120\)"
    with pytest.raises(ReleaseGateError, match=gate):
        reg.approve("hr", worse, actor="rev")
    with pytest.raises(ReleaseGateError, match="needs a --reason"):
        reg.approve("hr", worse, actor="rev", force=True)
    reg.approve("hr", better, actor="rev")
    reg.approve("hr", unknown, actor="rev")  # no verdict recorded (older prompts): not gated
    reg.approve("hr", worse, actor="rev", force=True, reason="the dev set is off-topic; test set says +3")
    approvals = [r for r in reg.audit("hr") if r["action"] == "approve"]
    assert [(r["version"], r.get("forced"), (r.get("verdict") or {}).get("verdict")) for r in approvals] == [
        (better, None, "better"), (unknown, None, None), (worse, True, "worse")]
    assert isinstance(ReleaseGateError("x"), IllegalTransitionError)


def test_an_edited_verdict_is_not_trusted(tmp_path):
    reg = PromptRegistry(tmp_path / "prompts")
    v = _draft(reg, "worse")
    meta_path = reg.root / "hr" / v / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["metrics"]["dev_verdict"]["verdict"] = "better"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(Exception, match="changed since it was registered"):
        reg.approve("hr", v, actor="rev")


def test_cli_approve_force_and_list_shows_the_verdict(tmp_path):
    from ragpt.cli.main import app

    reg = PromptRegistry(tmp_path / "prompts")
    v = _draft(reg, "worse")
    runner = CliRunner()
    args = ["--prompt-dir", str(reg.root), "--cache-dir", str(tmp_path / "cache"), "prompts"]
    r = runner.invoke(app, [*args, "list"])
    assert r.exit_code == 0 and r.output.split()[:4] == ["hr", v, "draft", "worse"]
    r = runner.invoke(app, [*args, "approve", "hr", v])
    assert r.exit_code == 2 and "--force" in r.output
    r = runner.invoke(app, [*args, "approve", "hr", v, "--force", "--reason", "reviewed by hand"])
    assert r.exit_code == 0 and "approved (forced)" in r.output
    log = runner.invoke(app, [*args, "log", "--json"]).output.splitlines()
    assert json.loads(log[-1])["forced"] is True
