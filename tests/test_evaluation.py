"""Offline evaluation: the instruction method's equivalence, split hygiene, LoRA, and the whole
import -> ingest -> train -> eval flow on the tiny model, with its report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_model
from test_datasets import make_doc2dial
from typer.testing import CliRunner

from ragpt.data.datasets import TRAINING_QUESTIONS_META_KEY, question_hashes, reproduces_training_hash
from ragpt.data.qa import QAExample
from ragpt.data.sample import sample_questions as sample_corpus_questions
from ragpt.evaluation.runner import (
    EvalConfig,
    Method,
    TestSetLeakError,
    group_by_department,
    input_mismatch,
    instruction_ids,
    instruction_method,
    leak_check,
    prepare,
    run_evaluation,
    sample_questions,
)
from ragpt.lm.generator import Generator
from ragpt.serving.contract import InputContract
from ragpt.training.trainer import TrainConfig, TrainExample, train_prompt

runner = CliRunner()
VOLATILE = {"created", "latency_ms", "timing"}  # machine-dependent by design (see ragpt.evaluation.report)


def _sample_qas(dept: str) -> list[QAExample]:
    return [QAExample(q.question, q.answers, doc_id=q.source, department=dept) for q in sample_corpus_questions(dept)]


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------- units (tiny model only)


def test_instruction_method_equals_a_hard_text_prefix(tiny_model, tiny_tokenizer):
    """The claim the report makes: prepending the instruction's token embeddings is the same input
    as writing the instruction's tokens in front of the prompt."""
    gen = Generator(tiny_model, tiny_tokenizer)
    m = instruction_method(gen, "Copy the answer from the context.")
    ids = instruction_ids(tiny_tokenizer, "Copy the answer from the context.")
    assert tiny_tokenizer.decode(ids).startswith("<|im_start|>system\nCopy the answer")
    assert m.trainable_parameters == 0 and m.bytes == len("Copy the answer from the context.")
    prompts = [tiny_tokenizer("Context: vacation days\n\nQuestion: how many?")["input_ids"],
               tiny_tokenizer("Question: VPN?")["input_ids"]]
    as_soft = gen.generate(prompts, [m.soft_prompt] * 2, max_new_tokens=8)
    as_text = gen.generate([ids + p for p in prompts], max_new_tokens=8)
    assert [r.token_ids for r in as_soft] == [r.token_ids for r in as_text]
    cached = gen.generate(prompts, [m.soft_prompt] * 2, max_new_tokens=8, prefix_keys=[("eval", "instruction")] * 2)
    assert [r.token_ids for r in cached] == [r.token_ids for r in as_text]  # the path score_method takes
    without = gen.generate(prompts, max_new_tokens=8)
    assert [r.token_ids for r in without] != [r.token_ids for r in as_text]  # the prefix does matter


def test_leak_check_matches_normalised_questions_of_the_same_document():
    train = [QAExample("What is the fee?", ["10"], doc_id="dmv/a.txt")]
    m = Method("soft:v1", "soft", None, training_keys=set(question_hashes(train)), training_verified=True)
    test = [QAExample("what is THE fee", ["10"], doc_id="dmv/a.txt"), QAExample("What is the fee?", ["9"],
                                                                               doc_id="dmv/b.txt")]
    assert leak_check(test, m) == {"status": "overlap", "overlap": 1, "examples": ["what is THE fee"],
                                   "source": ""}
    assert leak_check(test[1:], m)["status"] == "clean"
    m.training_verified = False
    assert leak_check(test[1:], m)["status"] == "clean (unverified)"
    assert leak_check(test, Method("soft:v2", "soft", None))["status"] == "unchecked"
    assert leak_check(test, Method("none", "none", None))["status"] == "not trained"


def test_group_by_department_and_seeded_sampling():
    qas = [QAExample(f"q{i}", ["a"], department="hr" if i % 2 else None) for i in range(10)]
    with pytest.raises(Exception, match="exactly one --department"):
        group_by_department(qas)
    groups = group_by_department(qas, ["hr"])
    assert len(groups["hr"]) == 10  # unnamed records go to the one department given
    with pytest.raises(Exception, match="no questions for department"):
        group_by_department([QAExample("q", ["a"], department="hr")], ["it"])
    a = sample_questions(qas, 4, seed=1)
    assert a == sample_questions(qas, 4, seed=1) and len(a) == 4
    assert [qas.index(q) for q in a] == sorted(qas.index(q) for q in a)  # file order kept
    assert sample_questions(qas, 4, seed=2) != a


def test_lora_trains_a_private_copy_and_leaves_the_base_untouched(tiny_model, tiny_tokenizer, tmp_path):
    from ragpt.training.lora import LoraSettings, train_lora

    rows = []
    for i in range(4):
        prompt = tiny_tokenizer(f"question {i} about vacation days", add_special_tokens=False)["input_ids"]
        answer = tiny_tokenizer(f"{5 * (i + 1)} days", add_special_tokens=False)["input_ids"]
        rows.append(TrainExample(ids=prompt + answer + [tiny_tokenizer.eos_token_id], answer_start=len(prompt),
                                 qa=QAExample("q", ["a"]), prompt_ids=prompt, retrieval_hit=True))
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    settings = LoraSettings(steps=3, batch_size=2, lr=1e-2, warmup_steps=1, seed=4)
    res = train_lora(tiny_model, rows, settings, out_dir=tmp_path / "adapter", progress=False)
    assert all(torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())
    # rank 8 on q_proj (64 -> 64) and v_proj (64 -> 2 kv heads x 16 = 32), 2 layers: 2 * 8 * (128 + 96)
    assert res.trainable_parameters == 2 * 8 * ((64 + 64) + (64 + 32))
    assert res.adapter_bytes == (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size
    merged = res.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], merged[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)
    assert [p["step"] for p in res.loss_curve] == [1, 2, 3]
    again = train_lora(tiny_model, rows, settings, progress=False)
    assert again.loss_curve == res.loss_curve  # a pure function of the seed


# ---------------------------------------------------------------------------- against the sample index


@pytest.fixture(scope="module")
def retriever(sample_index, real_embedder):
    from ragpt.retrieval.index import DocumentIndex
    from ragpt.retrieval.search import Retriever

    settings, name = sample_index
    return Retriever(DocumentIndex.open(settings.index_dir, name), real_embedder)


@pytest.mark.integration
def test_training_hash_is_reproduced_exactly_as_train_prompt_makes_it(tiny_tokenizer, retriever):
    model = build_tiny_model(tiny_tokenizer)
    qas = _sample_qas("hr")
    cfg = TrainConfig(department="hr", n_tokens=2, steps=1, batch_size=2, k=1, max_context_tokens=192,
                      eval_every=0, patience=0, dev_fraction=0.2, dev_max=3, eval_max_new_tokens=2,
                      warmup_steps=1, bf16=False, seed=5)
    result = train_prompt(model, tiny_tokenizer, retriever, qas, cfg, progress=False, log=lambda m: None)
    meta = {"training_data_sha256": result.data_sha256, "hyperparameters": result.hyperparameters}
    assert reproduces_training_hash(meta, qas, None)
    assert not reproduces_training_hash(meta, qas[:-1], None)
    assert not reproduces_training_hash({**meta, "hyperparameters": {**result.hyperparameters, "seed": 6}}, qas, None)


def _registry_with_prompt(tmp_path, model, extra: dict | None = None):
    from ragpt.softprompts.artifact import SoftPrompt, base_model_fingerprint
    from ragpt.softprompts.registry import PromptRegistry

    registry = PromptRegistry(tmp_path / "prompts")
    prompt = SoftPrompt.create(torch.randn(3, model.config.hidden_size), department="hr",
                               base_fingerprint=base_model_fingerprint(model), training_data_sha256="0" * 64,
                               extra=extra)
    return registry, registry.register(prompt, actor="test")


@pytest.mark.integration
def test_eval_refuses_test_questions_in_the_prompts_training_data(tiny_tokenizer, retriever, tmp_path):
    model = build_tiny_model(tiny_tokenizer)
    qas = _sample_qas("hr")
    train, test = qas[:10], qas[10:14]
    leaked = QAExample(train[0].question.upper() + "!!", train[0].answers, doc_id=train[0].doc_id, department="hr")
    registry, version = _registry_with_prompt(tmp_path, model, {TRAINING_QUESTIONS_META_KEY: question_hashes(train)})
    gen = Generator(model, tiny_tokenizer)
    cfg = EvalConfig(k=1, depth=2, max_context_tokens=192, max_new_tokens=2, n_bootstrap=50)
    kw = dict(methods=["none", "soft"], prompt_specs=[version], registry=registry, cfg=cfg, progress=False)
    with pytest.raises(TestSetLeakError, match="1 hr test question"):
        run_evaluation(gen, model, retriever, {"hr": test + [leaked]}, **kw)

    flagged = run_evaluation(gen, model, retriever, {"hr": test + [leaked]}, allow_overlap=True, **kw).results
    check = flagged["departments"]["hr"]["hygiene"]["methods"][f"soft:{version}"]
    assert check["status"] == "overlap" and check["overlap"] == 1
    assert any("despite" in n for n in flagged["notes"])

    clean = run_evaluation(gen, model, retriever, {"hr": test}, **kw).results
    assert clean["departments"]["hr"]["hygiene"]["methods"][f"soft:{version}"]["status"] == "clean"
    assert clean["departments"]["hr"]["n"] == 4


@pytest.mark.integration
def test_without_hashes_in_the_metadata_the_train_data_is_checked_and_marked_unverified(
        tiny_tokenizer, retriever, tmp_path):
    model = build_tiny_model(tiny_tokenizer)
    qas = _sample_qas("hr")
    registry, version = _registry_with_prompt(tmp_path, model)
    gen = Generator(model, tiny_tokenizer)
    kw = dict(methods=["soft"], prompt_specs=[version], registry=registry, progress=False,
              cfg=EvalConfig(k=1, depth=1, max_context_tokens=192, max_new_tokens=2, n_bootstrap=0))
    unchecked = run_evaluation(gen, model, retriever, {"hr": qas[10:12]}, **kw).results
    assert unchecked["departments"]["hr"]["hygiene"]["methods"][f"soft:{version}"]["status"] == "unchecked"
    with pytest.raises(TestSetLeakError):
        run_evaluation(gen, model, retriever, {"hr": qas[8:12]}, train_qas=qas[:10], **kw)
    res = run_evaluation(gen, model, retriever, {"hr": qas[10:12]}, train_qas=qas[:10], **kw).results
    check = res["departments"]["hr"]["hygiene"]["methods"][f"soft:{version}"]
    assert check["status"] == "clean (unverified)" and "does NOT reproduce" in check["source"]


@pytest.mark.integration
def test_prepare_scores_retrieval_and_keeps_the_context_the_model_saw(tiny_tokenizer, retriever):
    qa = QAExample("How many vacation days does a full-time employee in Munich get per year?", ["30 working days"],
                   doc_id="hr/vacation-policy.txt", department="hr",
                   context="Staff in Munich get zebra-unicorn-42 extra days.")
    elsewhere = QAExample("How many vacation days?", ["30"], doc_id="hr/no-such-file.txt", department="hr")
    # The tiny tokenizer needs ~4 tokens per word: a budget that fits both chunks, then one that fits one.
    cfg = EvalConfig(k=2, depth=5, max_context_tokens=4000)
    plain, missing = prepare(retriever, tiny_tokenizer, [qa, elsewhere], "hr", cfg, progress=False)
    served = [h.chunk.text.strip() for h in retriever.search(qa.question, "hr", 2)]
    assert plain.context == "\n\n".join(served)
    one_fits = len(plain.example.prompt_ids) - 10
    (cut,) = prepare(retriever, tiny_tokenizer, [qa], "hr", EvalConfig(k=2, depth=5, max_context_tokens=one_fits),
                     progress=False)
    assert cut.context == served[0]  # truncation dropped the second chunk from the prompt, and from the context
    assert plain.doc_in_index and plain.doc_rank == 1 and plain.served_doc_hit  # the policy is found first
    assert plain.served_span_hit == plain.example.retrieval_hit
    assert not missing.doc_in_index and missing.doc_rank is None and not missing.served_doc_hit
    (gold,) = prepare(retriever, tiny_tokenizer, [qa], "hr", EvalConfig(k=2, depth=5, gold_context="always",
                                                                         max_context_tokens=4000), progress=False)
    assert "zebra-unicorn-42" in gold.context and "zebra-unicorn-42" not in plain.context


def test_input_mismatch_names_what_differs_from_training():
    m = Method("soft:v2", "soft", None, details={"contract": InputContract(k=3, query_rule="last").to_dict()})
    assert input_mismatch(m, InputContract(k=2, query_rule="last")) == "soft:v2 was trained with k 3 (evaluated with 2)"
    assert input_mismatch(m, InputContract(k=3, query_rule="last")) is None
    assert input_mismatch(m, InputContract(k=3, query_rule="turns:4")) == \
        "soft:v2 was trained with query_rule last (evaluated with turns:4)"
    assert input_mismatch(Method("none", "none", None), InputContract()) is None


# ---------------------------------------------------------------------------- the whole flow, by CLI


def _eval_app():
    """ragpt's CLI with this module's commands registered as ragpt.cli.main registers them."""
    import typer

    from ragpt.cli.eval import eval_cmd, import_data
    from ragpt.cli.main import app as ragpt_app
    from ragpt.cli.main import main

    app = typer.Typer(pretty_exceptions_enable=False)
    app.callback()(main)
    app.command("eval")(eval_cmd)
    app.command("import-data")(import_data)
    return app, ragpt_app


def _png_ok(path: Path) -> None:
    from PIL import Image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100


@pytest.mark.integration
def test_import_ingest_train_eval_writes_a_reproducible_report(tiny_tokenizer, tmp_path, monkeypatch):
    app, ragpt_app = _eval_app()
    model_dir = tmp_path / "tiny-generator"
    build_tiny_model(tiny_tokenizer).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    for key, value in {"RAGPT_DATA_DIR": make_doc2dial(tmp_path / "data", per_agency=6),
                       "RAGPT_INDEX_DIR": tmp_path / "indexes", "RAGPT_PROMPT_DIR": tmp_path / "prompts",
                       "RAGPT_GENERATOR": model_dir, "RAGPT_BF16": "off"}.items():
        monkeypatch.setenv(key, str(value))
    monkeypatch.chdir(tmp_path)

    def ok(application, *args):
        res = runner.invoke(application, [str(a) for a in args])
        assert res.exit_code == 0, res.output + repr(res.exception)
        return res.output

    d = tmp_path / "d2d"
    ok(app, "import-data", "doc2dial", "--out", d)
    for agency in ("dmv", "ssa"):
        ok(ragpt_app, "ingest", "-q", "-i", "d2d", "-d", agency, d / "docs" / agency)
    ok(ragpt_app, "train", "-q", "-d", "dmv", "-i", "d2d", "--data", d / "qa" / "dmv.train.jsonl", "--steps", 2,
       "--batch-size", 2, "--n-tokens", 4, "--depth", 1, "-k", 1, "--max-context-tokens", 192, "--eval-every", 0,
       "--patience", 0, "--dev-max", 2, "--checkpoint-dir", tmp_path / "ckpt")
    common = ["eval", "-q", "-i", "d2d", "--train-data", d / "qa" / "dmv.train.jsonl",
              "--train-data", d / "qa" / "ssa.train.jsonl", "--prompt", "dmv=v1", "-k", 1, "--depth", 3,
              "--max-context-tokens", 192, "--limit", 2, "--max-tokens", 3, "--lora-steps", 2,
              "--lora-batch-size", 2, "--bootstrap", 100, "--out", "report"]
    methods = ["--method", "none", "--method", "instruction", "--method", "soft", "--method", "lora"]
    args = [*common, *methods, "--data", d / "qa" / "dmv.test.jsonl", "--data", d / "qa" / "ssa.test.jsonl"]
    printed = ok(app, *args)
    out = tmp_path / "report"
    assert "report:" in printed and "soft:v1" in printed

    results = json.loads((out / "results.json").read_text())
    assert set(results["departments"]) == {"dmv", "ssa"}
    dmv, ssa = results["departments"]["dmv"], results["departments"]["ssa"]
    assert list(dmv["methods"]) == ["none", "instruction", "soft:v1", "lora"]
    assert list(ssa["methods"]) == ["none", "instruction", "lora"]  # dmv=v1 applies to dmv only
    assert dmv["methods"]["soft:v1"]["method"]["trainable_parameters"] == 4 * 64
    assert dmv["methods"]["soft:v1"]["method"]["details"]["version"] == "v1"
    check = dmv["hygiene"]["methods"]["soft:v1"]
    assert check["status"] == "clean" and "question hashes" in check["source"]  # recorded by ragpt train
    assert dmv["hygiene"]["documents"]["shared_with_training_data"] == 0  # split by document
    for m in ("em", "f1", "rouge_l", "vs_none"):
        assert m in dmv["methods"]["lora"]
    assert results["overall"]["methods"]["soft:v1"]["n"] == 2 and results["overall"]["methods"]["none"]["n"] == 4
    assert dmv["retrieval"]["n_with_gold_document"] == 2  # doc_ids resolve to ingested sources
    assert len(dmv["retrieval"]["document"]["recall_at"]) == 3
    assert set(results["loss_curves"]) == {"dmv/soft:v1", "dmv/lora", "ssa/lora"}
    assert "by document" in results["data"]["split"]
    assert results["notes"] == []  # evaluated with the inputs v1 was trained on
    assert [f["role"] for f in results["data"]["test_files"] + results["data"]["train_files"]] == \
        ["test", "test", "train", "train"]
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 2 * 4 + 2 * 3

    md = (out / "report.md").read_text()
    for needle in ("## Summary", "## Split hygiene", "by document", "| dmv | soft:v1 | 256 |", "| dmv | lora | 3,584 |",
                   "exactly equivalent to a hard text prompt", "## Retrieval", "## Latency", "## Training loss",
                   "![scores by department and method](scores.png)", "training data sha256"):
        assert needle in md, needle
    for png in ("scores.png", "recall_at_k.png", "loss_curves.png"):
        _png_ok(out / png)

    # Same seed, same files (apart from what measures the machine); the plots byte for byte.
    first = {p: (out / p).read_bytes() for p in ("results.json", "predictions.jsonl", "scores.png",
                                                  "recall_at_k.png", "loss_curves.png")}
    shutil.rmtree(out)
    ok(app, *args)
    assert _strip(json.loads(first["results.json"])) == _strip(json.loads((out / "results.json").read_text()))
    rows = [_strip(json.loads(line)) for line in first["predictions.jsonl"].decode().splitlines()]
    assert rows == [_strip(json.loads(line)) for line in (out / "predictions.jsonl").read_text().splitlines()]
    for png in ("scores.png", "recall_at_k.png", "loss_curves.png"):
        assert (out / png).read_bytes() == first[png], png

    # The training file as test set: refused, then reported with a flag when allowed.
    leak_args = [*common, "--method", "soft", "--data", d / "qa" / "dmv.train.jsonl"]
    res = runner.invoke(app, [str(a) for a in leak_args])
    assert res.exit_code == 2 and "training data of" in res.output
    ok(app, *leak_args, "--allow-overlap")
    assert "**OVERLAP**" in (out / "report.md").read_text()

    # On another index than the one it was trained against: evaluated, and the report says so.
    ok(ragpt_app, "ingest", "-q", "-i", "d2d-other", "-d", "dmv", d / "docs" / "dmv")
    other = [a if a != "d2d" else "d2d-other" for a in common]
    ok(app, *other, "--method", "soft", "--data", d / "qa" / "dmv.test.jsonl")
    assert json.loads((out / "results.json").read_text())["notes"] == [
        "dmv: soft:v1 was trained against index 'd2d' and is evaluated on 'd2d-other'; its passages here may "
        "differ from the ones it learned on"]
