"""Pipeline (real models): retrieve -> build input -> generate -> answer with citations."""

from __future__ import annotations

import pytest
import torch

from ragpt.data.sample import SAMPLE_DEPARTMENTS, sample_questions
from ragpt.errors import EmptyQuestionError, UnknownDepartmentError
from ragpt.lm.generator import Generator
from ragpt.lm.template import build_prompt
from ragpt.retrieval.index import DocumentIndex
from ragpt.serving.pipeline import Pipeline
from ragpt.serving.request import Answer, ChatRequest, passages_from_hits

pytestmark = pytest.mark.integration

MAX_NEW = 12
K = 2  # small prompts keep generation on 2 CPU cores quick


@pytest.fixture(scope="module")
def pipe(sample_index, real_embedder, real_generator):
    """A pipeline over the sample index sharing the session's models, in float32 (deterministic)."""
    settings, name = sample_index
    model, tok = real_generator
    return Pipeline(
        DocumentIndex.open(settings.index_dir, name),
        settings.model_copy(update={"k": K, "max_context_tokens": 2048}),
        embedder=real_embedder,
        generator=Generator(model, tok, bf16=False),
    )


def _departments_of(index: DocumentIndex, source: str) -> list[str]:
    return index.manifest["documents"][source]["departments"]


def test_pipeline_open_answers_with_citations_of_the_department(sample_index):
    settings, name = sample_index
    p = Pipeline.open(index=name, settings=settings)  # loads its own models lazily
    q = sample_questions("it")[0]
    ans = p.ask(q.question, "it", k=K, max_new_tokens=MAX_NEW)
    assert isinstance(ans, Answer)
    assert ans.text.strip()
    assert ans.department == "it"
    assert len(ans.citations) == K
    assert all(_departments_of(p.index, c.source) == ["it"] for c in ans.citations)
    assert 0 < ans.usage["completion_tokens"] <= MAX_NEW
    assert ans.usage["total_tokens"] == ans.usage["prompt_tokens"] + ans.usage["completion_tokens"]


@pytest.mark.parametrize("dept", SAMPLE_DEPARTMENTS)
def test_ask_cites_only_the_departments_documents_and_counts_tokens(pipe, dept):
    q = sample_questions(dept)[1]
    ans = pipe.ask(q.question, dept, k=3, max_new_tokens=MAX_NEW)
    assert ans.text.strip()
    assert ans.finish_reason in {"stop", "length"}
    assert len(ans.citations) == 3
    for c in ans.citations:
        assert dept in _departments_of(pipe.index, c.source)
        stored = next(x for x in pipe.index.chunks.values() if x.source == c.source and x.chunk == c.chunk)
        assert (c.title, c.start, c.end) == (stored.title, stored.start, stored.end)
    scores = [c.score for c in ans.citations]
    assert scores == sorted(scores, reverse=True)
    # Usage counts the prompt the template builds from exactly these retrieved chunks.
    hits = pipe.retrieve(q.question, dept, k=3)
    assert [(h.chunk.source, h.chunk.chunk) for h in hits] == [(c.source, c.chunk) for c in ans.citations]
    prompt = build_prompt(pipe.generator.tokenizer, q.question, passages_from_hits(hits), department=dept,
                          max_prompt_tokens=pipe.settings.max_context_tokens).ids
    assert ans.usage["prompt_tokens"] == len(prompt)
    assert 0 < ans.usage["completion_tokens"] <= MAX_NEW
    assert ans.usage["total_tokens"] == len(prompt) + ans.usage["completion_tokens"]
    d = ans.to_dict()
    assert d["text"] == ans.text and d["citations"][0]["source"] == ans.citations[0].source


def test_ask_many_on_mixed_departments_equals_asking_one_by_one(pipe):
    qs = [sample_questions(dept)[2] for dept in SAMPLE_DEPARTMENTS]
    batch = pipe.ask_many([ChatRequest(q.question, q.department, max_new_tokens=MAX_NEW) for q in qs])
    assert [a.department for a in batch] == [q.department for q in qs]
    for q, a in zip(qs, batch):
        alone = pipe.ask(q.question, q.department, max_new_tokens=MAX_NEW)
        assert a.text == alone.text, q.question
        assert a.citations == alone.citations
        assert a.usage == alone.usage


def test_soft_prompt_rows_count_their_positions_and_mix_with_plain_rows(pipe):
    gen = pipe.generator
    soft = torch.randn(6, gen.hidden_size, generator=torch.Generator().manual_seed(0))
    soft = soft * float(gen.embedding.weight.std())
    q = sample_questions("hr")[0]
    plain = pipe.ask(q.question, "hr", k=1, max_new_tokens=6)
    (tuned,) = pipe.ask_many([ChatRequest(q.question, "hr", overrides={"k": 1}, soft_prompt=soft, prompt_label="v1",
                                          max_new_tokens=6)])
    assert tuned.usage["prompt_tokens"] == plain.usage["prompt_tokens"] + 6
    assert tuned.prompt_version == "v1"
    mixed = pipe.ask_many([ChatRequest(q.question, "hr", overrides={"k": 1}, max_new_tokens=6),
                           ChatRequest(q.question, "hr", overrides={"k": 1}, soft_prompt=soft, max_new_tokens=6)])
    assert [m.text for m in mixed] == [plain.text, tuned.text]


def test_model_weights_are_bit_identical_after_asking(pipe):
    model = pipe.generator.model
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    soft = torch.randn(4, pipe.generator.hidden_size, generator=torch.Generator().manual_seed(1)) * 0.05
    q = sample_questions("finance")[0]
    pipe.ask_many([ChatRequest(q.question, "finance", overrides={"k": 1}, max_new_tokens=4, temperature=0.7),
                   ChatRequest(q.question, "finance", overrides={"k": 1}, soft_prompt=soft, max_new_tokens=4,
                               temperature=0.7)], seed=0)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert [k for k in before if not torch.equal(before[k], after[k])] == []
    assert not any(p.requires_grad for p in model.parameters())


def test_bad_requests_are_refused_before_generating(pipe):
    with pytest.raises(EmptyQuestionError):
        pipe.ask("   ", "hr")
    with pytest.raises(UnknownDepartmentError, match="legal"):
        pipe.ask("How many vacation days?", "legal")
    with pytest.raises(UnknownDepartmentError):
        # One bad question fails the whole batch.
        pipe.ask_many([ChatRequest("How many vacation days?", "hr"), ChatRequest("Anything?", "legal")])
    assert pipe.ask_many([]) == []


def test_a_prompt_served_from_another_index_than_it_was_trained_on_is_logged_once(pipe, tmp_path, caplog):
    import logging

    from ragpt.softprompts.artifact import SoftPrompt, base_model_fingerprint
    from ragpt.softprompts.registry import PromptRegistry

    reg = PromptRegistry(tmp_path / "prompts")
    fp = base_model_fingerprint(pipe.generator.base_model)
    here = reg.register(SoftPrompt.create(torch.randn(3, pipe.generator.hidden_size), department="hr",
                                          base_fingerprint=fp, extra={"index": pipe.index.name}), actor="t")
    there = reg.register(SoftPrompt.create(torch.randn(3, pipe.generator.hidden_size), department="hr",
                                           base_fingerprint=fp, extra={"index": "shared-sentences"}), actor="t")
    p = Pipeline(pipe.index, pipe.settings.model_copy(update={"prompt_dir": tmp_path / "prompts"}),
                 embedder=pipe.embedder, generator=pipe.generator)
    with caplog.at_level(logging.WARNING, logger="ragpt.serving.pipeline"):
        p.resolve("hr", here)
        assert not caplog.records
        for _ in range(2):  # the second resolve is served from the loaded prompts
            assert p.resolve("hr", there)[1] == there
    warned = [r.getMessage() for r in caplog.records]
    assert warned == [f"soft prompt hr {there} was trained against index 'shared-sentences' and is served from "
                      f"index {pipe.index.name!r}: its passages may differ from the ones it learned on"]
