"""Query adapters (ragpt.retrieval.query_adapter): the map, its file form, and training on real retrieval."""

from __future__ import annotations

import numpy as np
import pytest

from ragpt.data.qa import QAExample
from ragpt.errors import RagptError
from ragpt.retrieval.query_adapter import (
    AdapterConfig,
    QueryAdapter,
    QueryAdapterError,
    positives,
    span_hit_rate,
    train_query_adapter,
)


def test_identity_leaves_normalised_vectors_as_they_are():
    v = np.random.default_rng(0).normal(size=(5, 16)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    np.testing.assert_allclose(QueryAdapter.identity(16).apply(v), v, atol=1e-6)


def test_apply_returns_unit_rows_of_the_mapped_vectors():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(8, 8)).astype(np.float32)
    v = rng.normal(size=(3, 8)).astype(np.float32)
    out = QueryAdapter(w).apply(v)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    want = v @ w.T
    np.testing.assert_allclose(out, want / np.linalg.norm(want, axis=1, keepdims=True), atol=1e-5)


def test_bytes_round_trip_and_checksum():
    w = np.random.default_rng(2).normal(size=(6, 6)).astype(np.float32)
    ad = QueryAdapter(w)
    back = QueryAdapter.from_bytes(ad.to_bytes())
    np.testing.assert_array_equal(back.weight, w)
    assert back.sha256() == ad.sha256()
    assert QueryAdapter(w + 1).sha256() != ad.sha256()


@pytest.mark.parametrize("bad, match", [
    (np.zeros((3, 4), np.float32), "square"),
    (np.full((2, 2), np.nan, np.float32), "non-finite"),
])
def test_bad_weights_are_refused(bad, match):
    with pytest.raises(QueryAdapterError, match=match):
        QueryAdapter(bad)


def test_unreadable_or_foreign_files_are_refused():
    with pytest.raises(QueryAdapterError, match="not a readable safetensors"):
        QueryAdapter.from_bytes(b"not safetensors at all")
    import torch
    from safetensors.torch import save

    with pytest.raises(QueryAdapterError, match="expected one tensor"):
        QueryAdapter.from_bytes(save({"other": torch.eye(3)}))
    with pytest.raises(QueryAdapterError, match="dimensions"):
        QueryAdapter.identity(4).apply(np.ones((1, 5), np.float32))


# ------------------------------------------------------------------------- training, real retrieval


@pytest.fixture(scope="module")
def hr(sample_index, real_embedder):
    from ragpt.retrieval.index import DocumentIndex
    from ragpt.retrieval.search import Retriever

    settings, name = sample_index
    return Retriever(DocumentIndex.open(settings.index_dir, name), real_embedder)


def _hr_questions(retriever) -> list[QAExample]:
    """Questions whose answer is a sentence of one of hr's chunks (each chunk's second sentence)."""
    index = retriever.index
    out = []
    for cid in index.allowed_ids("hr"):
        c = index.chunks[int(cid)]
        sentences = [s.strip() for s in c.text.replace("\n", " ").split(". ") if len(s.split()) >= 6]
        if len(sentences) >= 2:
            words = sentences[1].split()
            out.append(QAExample(question=f"What does the policy say about {' '.join(words[:6])}?",
                                 answers=[" ".join(words[:8])], doc_id=c.source, department="hr"))
    return out


@pytest.mark.integration
def test_positives_are_chunks_that_hold_the_answer(hr):
    from ragpt.data.qa import normalize_answer

    qas = _hr_questions(hr)
    assert len(qas) >= 8
    vecs = hr.embedder.encode([q.question for q in qas])
    found = positives(hr.index, "hr", qas, vecs)
    assert found, "every question was written from a chunk"
    for qi, cid, holding in found:
        assert cid in holding
        assert normalize_answer(qas[qi].answers[0]) in normalize_answer(hr.index.chunks[cid].text)
        assert "hr" in hr.index.chunks[cid].departments


@pytest.mark.integration
def test_training_fits_its_questions_and_reports_the_held_out_choice(hr):
    qas = _hr_questions(hr)
    cfg = AdapterConfig(epochs=30, lr=1e-2, identity_weight=0.01, holdout_fraction=0.0, eval_every=10)
    ad, rep = train_query_adapter(hr, "hr", qas, config=cfg, k=1)
    assert rep.with_positive == len(qas) and rep.holdout == 0 and rep.chosen_epoch == cfg.epochs
    assert not np.allclose(ad.weight, np.eye(ad.dim))
    vecs = hr.embedder.encode([q.question for q in qas])
    before, _ = span_hit_rate(hr, "hr", qas, vecs, 1)
    after, _ = span_hit_rate(hr, "hr", qas, ad.apply(vecs), 1)
    assert after > before, (before, after)  # a strong map learns the questions it was trained on


@pytest.mark.integration
def test_an_adapter_that_never_beats_the_embedder_is_the_identity(hr):
    qas = _hr_questions(hr)
    # Zero learning rate: every epoch is the identity again, so none is better than epoch 0.
    ad, rep = train_query_adapter(hr, "hr", qas, config=AdapterConfig(epochs=5, lr=0.0, eval_every=5), k=2)
    assert rep.holdout > 0 and rep.chosen_epoch == 0 and not rep.improved
    np.testing.assert_array_equal(ad.weight, np.eye(ad.dim, dtype=np.float32))


@pytest.mark.integration
def test_too_few_answerable_questions_is_a_clear_error(hr):
    qas = [QAExample(question="Is there a gym?", answers=["zebra crossing at midnight"], department="hr")] * 3
    with pytest.raises(QueryAdapterError, match="only 0 training question"):
        train_query_adapter(hr, "hr", qas)


# ------------------------------------------------------------------ stored with a version, served, trained with


def _rotation(dim: int, seed: int = 0) -> QueryAdapter:
    """A random rotation: a map strong enough to change what the dense ranker finds."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(dim, dim)))
    return QueryAdapter(q.astype(np.float32))


def _prompt_with_adapter(model, adapter, contract: dict, department: str = "hr"):
    import torch

    from ragpt.softprompts.artifact import SoftPrompt, base_model_fingerprint

    tensor = torch.randn(4, model.config.hidden_size, generator=torch.Generator().manual_seed(0)) * 0.01
    return SoftPrompt.create(tensor, department=department, base_fingerprint=base_model_fingerprint(model),
                             contract=contract, query_adapter=adapter)


def test_a_version_keeps_its_adapter_and_refuses_a_changed_one(tmp_path, tiny_model):
    from ragpt.errors import SoftPromptError
    from ragpt.softprompts.artifact import ADAPTER_FILE
    from ragpt.softprompts.registry import PromptRegistry

    reg = PromptRegistry(tmp_path / "prompts")
    ad = _rotation(16)
    v = reg.register(_prompt_with_adapter(tiny_model, ad, {"query_adapter": True}), actor="t")
    back = reg.load("hr", v)
    np.testing.assert_array_equal(back.query_adapter.weight, ad.weight)
    assert back.meta["query_adapter"]["sha256"] == ad.sha256()
    plain = reg.register(_prompt_with_adapter(tiny_model, None, {}), actor="t")
    assert reg.load("hr", plain).query_adapter is None and "query_adapter" not in reg.load("hr", plain).meta

    path = tmp_path / "prompts" / "hr" / v / ADAPTER_FILE
    path.write_bytes(_rotation(16, seed=1).to_bytes())
    with pytest.raises(SoftPromptError, match="sha256 mismatch"):
        reg.load("hr", v)
    path.unlink()
    with pytest.raises(SoftPromptError, match="missing"):
        reg.load("hr", v)


def test_contract_turns_an_adapter_off_never_on():
    from ragpt.serving.contract import ContractError, InputContract

    with_adapter = InputContract(query_adapter=True).check()
    used, diff = with_adapter.apply({"query_adapter": False})
    assert not used.query_adapter and diff == {"query_adapter": {"contract": True, "used": False}}
    with pytest.raises(ContractError, match="only be turned off"):
        InputContract().apply({"query_adapter": True})
    with pytest.raises(ContractError, match="dense"):
        InputContract(query_adapter=True, dense=False).check()
    assert "query_adapter" not in InputContract().to_dict()  # versions without one: contracts as before


@pytest.fixture(scope="module")
def served(sample_index, real_embedder, real_generator, tmp_path_factory):
    """A pipeline over the sample index whose hr version v1 carries a rotation as its query adapter."""
    from ragpt.retrieval.index import DocumentIndex
    from ragpt.serving.contract import InputContract
    from ragpt.serving.pipeline import Pipeline
    from ragpt.softprompts.registry import PromptRegistry

    settings, name = sample_index
    model, tok = real_generator
    prompts = tmp_path_factory.mktemp("adapter-prompts")
    adapter = _rotation(real_embedder.dim)
    contract = InputContract(k=2, max_context_tokens=1024, query_adapter=True).check()
    reg = PromptRegistry(prompts)
    v = reg.register(_prompt_with_adapter(model, adapter, contract.to_dict()), actor="t")
    from ragpt.lm.generator import Generator

    pipe = Pipeline(DocumentIndex.open(settings.index_dir, name), settings.model_copy(update={"prompt_dir": prompts}),
                    embedder=real_embedder, generator=Generator(model, tok, bf16=False))
    return pipe, v, adapter


@pytest.mark.integration
def test_the_request_path_searches_with_the_versions_adapter(served):
    from ragpt.data.sample import sample_questions
    from ragpt.serving.request import ChatRequest, prepare

    pipe, v, adapter = served
    changed = 0
    for q in sample_questions("hr")[:8]:
        p = prepare(pipe, ChatRequest(q.question, "hr", prompt=v))
        vec = adapter.apply(pipe.embedder.encode([q.question]))
        want = pipe.retriever.search_many([q.question], ["hr"], 2, query_vectors=vec)[0]
        assert [h.chunk.id for h in p.hits] == [h.chunk.id for h in want]
        assert p.contract.query_adapter
        off = prepare(pipe, ChatRequest(q.question, "hr", prompt=v, overrides={"query_adapter": False}))
        plain = pipe.retriever.search_many([q.question], ["hr"], 2)[0]
        assert [h.chunk.id for h in off.hits] == [h.chunk.id for h in plain]
        assert off.overrides == {"query_adapter": {"contract": True, "used": False}}
        changed += [h.chunk.id for h in off.hits] != [h.chunk.id for h in p.hits]
    assert changed, "a rotation changes what the dense ranker finds for some question"
    # No prompt beside the version's contract (a paired comparison): the version's adapter when named...
    q0 = sample_questions("hr")[0].question
    contract = pipe.resolve("hr", v)[2]
    paired = prepare(pipe, ChatRequest(q0, "hr", prompt="none", contract=contract, query_adapter_of=v))
    assert paired.contract.query_adapter and paired.soft_prompt is None
    served_hits = prepare(pipe, ChatRequest(q0, "hr", prompt=v)).hits
    assert [h.chunk.id for h in paired.hits] == [h.chunk.id for h in served_hits]
    # ...and without one to take it from, searched without it, which the answer's overrides say.
    none = prepare(pipe, ChatRequest(q0, "hr", prompt="none", contract=contract))
    assert not none.contract.query_adapter
    assert none.overrides == {"query_adapter": {"contract": True, "used": False}}
    # Turning the dense ranker off turns the adapter off with it.
    bm25 = prepare(pipe, ChatRequest(q0, "hr", prompt=v, overrides={"dense": False}))
    assert not bm25.contract.query_adapter and not bm25.contract.dense


@pytest.mark.integration
def test_training_examples_retrieve_what_the_version_is_served_with(served):
    """Train as you serve: build_examples with the adapter finds what prepare finds for the version."""
    from ragpt.data.sample import sample_questions
    from ragpt.serving.request import ChatRequest, prepare
    from ragpt.training.trainer import TrainConfig, build_examples

    pipe, v, adapter = served
    contract = pipe.resolve("hr", v)[2]
    cfg = TrainConfig(department="hr", k=contract.k, max_context_tokens=contract.max_context_tokens,
                      max_question_tokens=contract.max_question_tokens,
                      max_history_tokens=contract.max_history_tokens, query_rule=contract.query_rule)
    qas = [QAExample(q.question, q.answers, doc_id=q.source, department="hr") for q in sample_questions("hr")[:6]]
    examples = build_examples(qas, pipe.retriever, pipe.generator.tokenizer, cfg, progress=False, adapter=adapter)
    for qa, ex in zip(qas, examples):
        p = prepare(pipe, ChatRequest(qa.question, "hr", prompt=v))
        assert [h.chunk.id for h in ex.hits] == [h.chunk.id for h in p.hits]
        assert ex.built.ids == p.built.ids
    assert cfg.contract(pipe.retriever, query_adapter=True) == contract


@pytest.mark.integration
def test_train_prompt_retrieves_its_examples_with_the_adapter_it_keeps(hr, tiny_model, tiny_tokenizer,
                                                                     monkeypatch):
    import ragpt.training.trainer as trainer
    from ragpt.serving.contract import InputContract
    from ragpt.serving.request import retrieve_many
    from ragpt.training.trainer import TrainConfig, train_prompt

    qas = _hr_questions(hr)
    seen: dict = {}
    real_build = trainer.build_examples

    def build(qs, retriever, tok, cfg, progress=True, on_skip=None, adapter=None):
        out = real_build(qs, retriever, tok, cfg, progress, on_skip, adapter=adapter)
        seen["adapter"], seen["examples"] = adapter, out
        return out

    monkeypatch.setattr(trainer, "build_examples", build)
    cfg = TrainConfig(department="hr", depth=1, steps=1, batch_size=4, k=2, max_context_tokens=512, dev_fraction=0.0,
                      eval_every=0, query_adapter=True)
    result = train_prompt(tiny_model, tiny_tokenizer, hr, qas, cfg, progress=False, log=lambda m: None)
    report = result.metrics["query_adapter"]
    assert report["questions_with_positive"] == len(qas) and report["holdout"] > 0
    assert seen["adapter"] is result.query_adapter
    assert result.contract.get("query_adapter", False) == (result.query_adapter is not None) == report["kept"]
    if result.query_adapter is not None:  # the examples were searched as the version will be served
        contract = InputContract.from_dict(result.contract)
        for ex in seen["examples"][:5]:
            want = retrieve_many(hr, [ex.query], ["hr"], contract, adapters=[result.query_adapter])[0]
            assert [h.chunk.id for h in ex.hits] == [h.chunk.id for h in want]


@pytest.mark.integration
def test_one_document_leaves_nothing_to_train_on_and_says_so(hr):
    qas = [q for q in _hr_questions(hr)]
    for q in qas:
        q.doc_id = "one.md"  # every question about one document: holding out documents holds out all
    with pytest.raises(QueryAdapterError, match="left to train on"):
        train_query_adapter(hr, "hr", qas * 3, config=AdapterConfig(holdout="document"))


def test_copies_of_a_question_stay_on_one_side_of_the_split():
    from ragpt.retrieval.query_adapter import split_by_question

    qs = [QAExample(f"Question {i}?", ["a"], doc_id=f"d{i % 3}") for i in range(20)]
    train, held = split_by_question(qs + qs, 0.3, seed=0)
    assert held and not {id(q) for q in train} & {id(q) for q in held}
    assert len(train) + len(held) == 40


def test_a_contract_that_names_a_missing_adapter_is_refused(tmp_path, tiny_model):
    from ragpt.errors import SoftPromptError

    with pytest.raises(SoftPromptError, match="has none"):
        _prompt_with_adapter(tiny_model, None, {"query_adapter": True}).save(tmp_path / "v")


@pytest.mark.integration
def test_eval_searches_with_the_versions_adapter_and_refuses_two_different_ones(served):
    from ragpt.data.sample import sample_questions
    from ragpt.evaluation.runner import EvalConfig, Method, department_adapter, input_mismatch, prepare
    from ragpt.serving.request import ChatRequest
    from ragpt.serving.request import prepare as prepare_request

    pipe, v, adapter = served
    contract = pipe.resolve("hr", v)[2]
    qas = [QAExample(q.question, q.answers, doc_id=q.source, department="hr") for q in sample_questions("hr")[:4]]
    cfg = EvalConfig(k=contract.k, max_context_tokens=contract.max_context_tokens)
    rows = prepare(pipe.retriever, pipe.generator.tokenizer, qas, "hr", cfg, False, contract, adapter)
    for qa, row in zip(qas, rows):
        served_hits = prepare_request(pipe, ChatRequest(qa.question, "hr", prompt=v)).hits
        assert [h.chunk.id for h in row.example.hits] == [h.chunk.id for h in served_hits]

    def soft(name, ad, c):
        return Method(name, "soft", None, details={"contract": c.to_dict()}, query_adapter=ad)

    plain_contract = contract.apply({"query_adapter": False})[0]
    assert department_adapter([soft("v2", adapter, contract), soft("v1", None, plain_contract)], contract,
                              "hr") is adapter
    assert "query_adapter True (evaluated with False)" in input_mismatch(soft("v2", adapter, contract), plain_contract)
    with pytest.raises(RagptError, match="different query adapters"):
        department_adapter([soft("v2", adapter, contract), soft("v3", _rotation(adapter.dim, 5), contract)],
                           contract, "hr")


@pytest.mark.integration
def test_an_adapter_for_another_embedder_is_refused(hr):
    ad = QueryAdapter.identity(hr.index.dim)
    ad.check_fits(hr.index, hr.index.embedder_name, "hr v1")  # its own embedder: fine
    with pytest.raises(QueryAdapterError, match="trained for the embedder 'other-model'"):
        ad.check_fits(hr.index, "other-model", "hr v1")
    with pytest.raises(QueryAdapterError, match="16 dimensions"):
        QueryAdapter.identity(16).check_fits(hr.index, None, "hr v1")


@pytest.mark.integration
def test_eval_refuses_conflicting_adapters_before_it_generates_anything(sample_index, real_embedder, tiny_model,
                                                                         tiny_tokenizer, tmp_path):
    """A conflict in the last department evaluated is found before the first one is decoded."""
    from ragpt.data.sample import sample_questions
    from ragpt.evaluation.runner import EvalConfig, run_evaluation
    from ragpt.lm.generator import Generator
    from ragpt.retrieval.index import DocumentIndex
    from ragpt.retrieval.search import Retriever
    from ragpt.serving.contract import InputContract
    from ragpt.softprompts.registry import PromptRegistry

    class CountingGenerator(Generator):
        streams = 0

        def stream(self, *args, **kwargs):
            CountingGenerator.streams += 1
            return super().stream(*args, **kwargs)

    settings, name = sample_index
    reg = PromptRegistry(tmp_path / "prompts")
    contract = InputContract(k=2, max_context_tokens=512, query_adapter=True).check().to_dict()
    same, other = _rotation(real_embedder.dim), _rotation(real_embedder.dim, 5)
    for dept, second in (("finance", same), ("it", other)):  # finance (evaluated first) agrees with itself
        for adapter in (same, second):
            reg.register(_prompt_with_adapter(tiny_model, adapter, contract, dept), actor="t")
    qas = {d: [QAExample(q.question, q.answers, doc_id=q.source, department=d) for q in sample_questions(d)[:2]]
           for d in ("finance", "it")}
    gen = CountingGenerator(tiny_model, tiny_tokenizer, bf16=False)
    retriever = Retriever(DocumentIndex.open(settings.index_dir, name), real_embedder)
    with pytest.raises(RagptError, match="it: soft:v1, soft:v2 search with different query adapters"):
        run_evaluation(gen, tiny_model, retriever, qas, methods=("none", "soft"), prompt_specs=("v1", "v2"),
                       registry=reg, cfg=EvalConfig(max_new_tokens=4), progress=False)
    assert CountingGenerator.streams == 0
