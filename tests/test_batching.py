"""Prefix KV cache and cross-department micro-batching: batched answers equal answers computed alone."""

from __future__ import annotations

import asyncio

import pytest
import torch
from conftest import build_tiny_model

from ragpt.lm.generator import Generator, PrefixCache
from ragpt.lm.template import Turn, build_prompt
from ragpt.retrieval.index import DocumentIndex
from ragpt.serving.contract import InputContract
from ragpt.serving.pipeline import Pipeline
from ragpt.serving.request import ChatRequest, prepare_many
from ragpt.serving.scheduler import BatcherStopped, ChatJob, MicroBatcher, Overloaded
from ragpt.serving.streaming import Detokenizer
from ragpt.softprompts.artifact import SoftPrompt, base_model_fingerprint
from ragpt.softprompts.registry import PromptRegistry, UnknownVersionError

MAX_NEW = 10


@pytest.fixture(scope="module", autouse=True)
def _threads(one_torch_thread_per_module):
    """See conftest.one_torch_thread_per_module."""
TEXTS = [
    "Employees get 25 vacation days per year",
    "VPN",
    "Reset your password every 90 days; use at least 12 characters.",
    "Invoices above 10,000 EUR",
    "How many days of leave do I get?",
]


def _rows(tokenizer) -> list[list[int]]:
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]


def _soft(n: int, hidden: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(n, hidden, generator=torch.Generator().manual_seed(seed)) * scale


# --------------------------------------------------------------------------- prefix KV cache


def test_rows_with_cached_prefixes_equal_each_row_alone_with_its_soft_prompt_inline(tiny_model, tiny_tokenizer):
    gen = Generator(tiny_model, tiny_tokenizer)
    h = gen.hidden_size
    rows = _rows(tiny_tokenizer)
    hr, it = _soft(4, h, 1), _soft(9, h, 2)
    # Mixed: two rows share hr's prefix, one uses it's, one has no soft prompt, one carries a soft
    # prompt inline (no key); prefixes of different lengths force left padding inside the prefix slots.
    softs = [hr, None, it, hr, _soft(2, h, 3)]
    keys = [("hr", "v1"), None, ("it", "v1"), ("hr", "v1"), None]
    batch = gen.generate(rows, softs, max_new_tokens=MAX_NEW, prefix_keys=keys)
    for i, (r, sp) in enumerate(zip(rows, softs)):
        alone = gen.generate([r], [sp], max_new_tokens=MAX_NEW)[0]
        assert batch[i].token_ids == alone.token_ids, f"row {i}"
        assert batch[i].prompt_tokens == alone.prompt_tokens
    # The soft prompts matter, so equality above is not trivial.
    plain = gen.generate([rows[0]], max_new_tokens=MAX_NEW)[0]
    assert plain.token_ids != batch[0].token_ids
    assert gen.prefix_cache.misses == 2 and len(gen.prefix_cache) == 2


def test_stream_with_prefix_keys_yields_what_generate_returns(tiny_model, tiny_tokenizer):
    gen = Generator(tiny_model, tiny_tokenizer)
    rows = _rows(tiny_tokenizer)[:3]
    softs = [_soft(3, gen.hidden_size, 4), _soft(5, gen.hidden_size, 5), None]
    keys = [("a", "v1"), ("b", "v1"), None]
    streamed: list[list[int]] = [[] for _ in rows]
    for step in gen.stream(rows, softs, max_new_tokens=MAX_NEW, prefix_keys=keys):
        for i, t in enumerate(step):
            if t is not None:
                streamed[i].append(t)
    assert streamed == [r.token_ids for r in gen.generate(rows, softs, max_new_tokens=MAX_NEW)]


def test_prefix_kv_equals_the_first_positions_of_a_full_run(tiny_model, tiny_tokenizer):
    from transformers import DynamicCache

    gen = Generator(tiny_model, tiny_tokenizer)
    soft = _soft(6, gen.hidden_size, 6)
    ids = _rows(tiny_tokenizer)[0]
    prefix = gen.compute_prefix(soft)
    with torch.no_grad():
        x = torch.cat([soft, gen.embedding(torch.tensor(ids))])[None]
        out = tiny_model(inputs_embeds=x, use_cache=True, **{gen._cache_kw: DynamicCache(config=tiny_model.config)})
    full = out.past_key_values if getattr(out, "cache", None) is None else out.cache
    assert prefix.n_tokens == 6 and len(prefix.keys) == tiny_model.config.num_hidden_layers
    for layer, (k, v) in enumerate(zip(prefix.keys, prefix.values)):
        torch.testing.assert_close(k, full.layers[layer].keys[:, :, :6])
        torch.testing.assert_close(v, full.layers[layer].values[:, :, :6])


def test_prefix_is_computed_once_per_key_and_recomputed_when_the_key_gets_another_tensor(tiny_model, tiny_tokenizer):
    gen = Generator(tiny_model, tiny_tokenizer)
    rows = _rows(tiny_tokenizer)[:2]
    a, b = _soft(4, gen.hidden_size, 7), _soft(4, gen.hidden_size, 8)
    gen.generate(rows, [a, a], max_new_tokens=2, prefix_keys=[("hr", "v1"), ("hr", "v1")])
    gen.generate(rows, [a, a], max_new_tokens=2, prefix_keys=[("hr", "v1"), ("hr", "v1")])
    assert (gen.prefix_cache.misses, gen.prefix_cache.hits) == (1, 3)
    # The same key with a different tensor must not serve the stale prefix.
    res = gen.generate(rows[:1], [b], max_new_tokens=MAX_NEW, prefix_keys=[("hr", "v1")])[0]
    assert gen.prefix_cache.misses == 2
    assert res.token_ids == gen.generate(rows[:1], [b], max_new_tokens=MAX_NEW)[0].token_ids


def test_prefix_cache_keeps_at_most_max_entries_least_recently_used_out():
    cache = PrefixCache(max_entries=2)
    made = []

    def compute(t):
        made.append(t)
        return type("P", (), {"source": t, "n_tokens": 1})()

    t1, t2, t3 = torch.zeros(1, 2), torch.ones(1, 2), torch.full((1, 2), 2.0)
    cache.get("a", t1, compute)
    cache.get("b", t2, compute)
    cache.get("a", t1, compute)  # a is now the most recent
    cache.get("c", t3, compute)  # evicts b
    assert len(cache) == 2 and "a" in cache and "c" in cache and "b" not in cache
    assert len(made) == 3
    with pytest.raises(ValueError):
        PrefixCache(max_entries=0)


def test_prefix_keys_must_match_the_rows(tiny_model, tiny_tokenizer):
    gen = Generator(tiny_model, tiny_tokenizer)
    with pytest.raises(ValueError, match="prefix key"):
        gen.generate(_rows(tiny_tokenizer)[:2], max_new_tokens=2, prefix_keys=[None])


def test_detokenizer_pieces_concatenate_to_the_stripped_decoded_text(tiny_tokenizer):
    ids = tiny_tokenizer("  Employees get 25 vacation days.  \n", add_special_tokens=False)["input_ids"]
    ts = Detokenizer(tiny_tokenizer, {tiny_tokenizer.eos_token_id})
    pieces = [ts.push(t) for t in ids] + [ts.push(tiny_tokenizer.eos_token_id)]
    final = tiny_tokenizer.decode(ids, skip_special_tokens=True).strip()
    assert "".join(pieces) + ts.finish() == final == "Employees get 25 vacation days."
    assert sum(1 for p in pieces if p) > 3  # it really streamed


@pytest.mark.integration
def test_real_generator_mixed_departments_with_prefix_cache_equal_each_request_alone(real_generator):
    from ragpt.data.sample import sample_questions

    model, tok = real_generator
    gen = Generator(model, tok, bf16=False)
    scale = float(gen.embedding.weight.std())
    softs = {"hr": _soft(6, gen.hidden_size, 20, scale), "it": _soft(3, gen.hidden_size, 21, scale)}
    depts = ["hr", "it", "finance", "hr"]
    rows = [build_prompt(tok, sample_questions(d)[i].question, [], department=d).ids
            for i, d in enumerate(depts)]
    sp = [softs.get(d) for d in depts]
    keys = [(d, "v1") if d in softs else None for d in depts]
    batch = gen.generate(rows, sp, max_new_tokens=8, prefix_keys=keys)
    for i, (r, s) in enumerate(zip(rows, sp)):
        alone = gen.generate([r], [s], max_new_tokens=8)[0]
        assert batch[i].token_ids == alone.token_ids, f"row {i} ({depts[i]})"


# --------------------------------------------------------------------------- micro-batcher


@pytest.fixture(scope="module")
def tiny_gen(tiny_tokenizer):
    return Generator(build_tiny_model(tiny_tokenizer), tiny_tokenizer)


@pytest.fixture(scope="module")
def pipe(sample_index, real_embedder, tiny_gen, tmp_path_factory):
    """The sample index with the tiny generator; hr has two approved versions (v1 active), it has v1.

    hr's versions record an input contract (retrieving with the conversation, turns:4); it's v1 is
    an artifact from before contracts (its hyperparameters give the budget; the question alone is
    retrieved with)."""
    settings, name = sample_index
    prompt_dir = tmp_path_factory.mktemp("prompts")
    reg = PromptRegistry(prompt_dir)
    fp = base_model_fingerprint(tiny_gen.model)
    meta = {"hr": {"contract": InputContract(max_context_tokens=2048).to_dict()},
            "it": {"hyperparameters": {"k": 2, "max_context_tokens": 2048}}}
    for dept, seeds in (("hr", (1, 2)), ("it", (3,))):
        for seed in seeds:
            v = reg.register(SoftPrompt.create(_soft(4 + seed, tiny_gen.hidden_size, seed), department=dept,
                                               base_fingerprint=fp, **meta[dept]), actor="test")
            reg.approve(dept, v, actor="test")
        reg.activate(dept, "v1", actor="test")
    s = settings.model_copy(update={"prompt_dir": prompt_dir, "max_context_tokens": 2048, "k": 2})
    return Pipeline(DocumentIndex.open(s.index_dir, name), s, embedder=real_embedder, generator=tiny_gen)


JOBS = [  # (department, question, prompt, history)
    ("hr", "How many vacation days do I get?", "active", ()),
    ("it", "How do I connect to the VPN?", "active", ()),
    ("finance", "Who approves invoices above 10,000 EUR?", "active", ()),
    ("hr", "What is the parental leave policy?", "v2", (Turn("user", "Hi"), Turn("assistant", "Hello!"))),
    ("it", "How long must my password be?", "none", ()),
]


def _job(pipe, dept, q, prompt, history, system=None, *, stream=False) -> ChatJob:
    return ChatJob(ChatRequest(q, dept, history=history, system=system, prompt=prompt, max_new_tokens=MAX_NEW),
                   pipe, stream=stream)


async def _queued(batcher: MicroBatcher, n: int) -> None:
    for _ in range(500):  # bounded: the worker is held, so this only waits for our own submissions
        if batcher.queued >= n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"expected {n} queued jobs, have {batcher.queued}")


def _run_held(batcher: MicroBatcher, jobs: list[ChatJob], cancel: tuple[int, ...] = ()):
    """Queue all jobs while the worker is held, then release: they are batched deterministically."""

    async def main():
        batcher.hold()
        tickets = [batcher.submit(j) for j in jobs]
        for i in cancel:
            tickets[i].cancel()
        batcher.release()
        return await asyncio.gather(*(t.answer() for i, t in enumerate(tickets) if i not in cancel),
                                    return_exceptions=True)

    batcher.start()
    try:
        return asyncio.run(main())
    finally:
        batcher.stop()


def test_mixed_departments_run_as_one_batch_and_each_answer_equals_asking_alone(pipe, tiny_gen):
    batcher = MicroBatcher(tiny_gen, max_batch_size=8, max_wait_ms=50)
    answers = _run_held(batcher, [_job(pipe, *j) for j in JOBS])
    assert batcher.stats.batch_sizes == [len(JOBS)]
    assert batcher.stats.departments == [[j[0] for j in JOBS]]
    for (dept, q, prompt, history), a in zip(JOBS, answers):
        alone = pipe.ask(q, dept, prompt=prompt, history=history, max_new_tokens=MAX_NEW)
        assert a.text == alone.text, dept
        assert a.prompt_version == alone.prompt_version
        assert a.citations == alone.citations
        assert a.usage == alone.usage
        assert a.timings["batch_size"] == len(JOBS)
    assert [a.prompt_version for a in answers] == ["v1", "v1", None, "v2", None]
    assert len({a.text for a in answers}) == len(answers)


def test_the_scheduler_answers_prepared_requests_exactly_as_ask_many(pipe, tiny_gen):
    """Mixed departments, versions, history, client system text and an override: one ChatJob each."""
    history = (Turn("user", "How many vacation days do I get in Munich?"), Turn("assistant", "30 working days."))
    requests = [
        ChatRequest("What about Austin?", "hr", history=history, system="Answer in one sentence.",
                    max_new_tokens=MAX_NEW),
        ChatRequest("How do I connect to the VPN?", "it", system="You talk to a new starter.", max_new_tokens=MAX_NEW),
        ChatRequest("And who approves it?", "finance",
                    history=(Turn("user", "I have an invoice of 12,000 EUR."),
                             Turn("assistant", "Invoices that large need approval.")), max_new_tokens=MAX_NEW),
        ChatRequest("What is the parental leave policy?", "hr", prompt="v2", history=history,
                    system="Be brief.", overrides={"k": 1}, max_new_tokens=MAX_NEW),
        ChatRequest("How long must my password be?", "it", prompt="none", history=history[:1],
                    system="Name the document.", max_new_tokens=MAX_NEW),
    ]
    batcher = MicroBatcher(tiny_gen, max_batch_size=8, max_wait_ms=50)
    answers = _run_held(batcher, [ChatJob(r, pipe) for r in requests])
    assert batcher.stats.batch_sizes == [len(requests)]
    expected = pipe.ask_many(requests)

    def fields(a):
        return (a.text, a.citations, a.department, a.prompt_version, a.finish_reason, a.usage, a.contract,
                a.contract_overrides, a.history_turns)

    assert [fields(a) for a in answers] == [fields(e) for e in expected]
    assert [a.prompt_version for a in answers] == ["v1", "v1", None, "v2", None]
    assert [a.history_turns for a in answers] == [2, 0, 2, 2, 1]
    assert answers[3].contract_overrides == {"k": {"contract": 2, "used": 1}} and len(answers[3].citations) == 1
    # The system text and the history are in the model's input, so the equality covers them.
    for r, p in zip(requests, prepare_many(pipe, requests)):
        text = tiny_gen.tokenizer.decode(p.ids)
        assert all(t.content in text for t in r.history) and (r.system is None or r.system in text)


def test_per_department_policy_batches_one_department_at_a_time(pipe, tiny_gen):
    batcher = MicroBatcher(tiny_gen, max_batch_size=8, max_wait_ms=50, policy="per_department")
    answers = _run_held(batcher, [_job(pipe, *j) for j in JOBS])
    assert batcher.stats.departments == [["hr", "hr"], ["it", "it"], ["finance"]]
    assert [a.department for a in answers] == [j[0] for j in JOBS]


def test_max_batch_size_one_answers_one_request_at_a_time(pipe, tiny_gen):
    batcher = MicroBatcher(tiny_gen, max_batch_size=1, max_wait_ms=0)
    answers = _run_held(batcher, [_job(pipe, *j) for j in JOBS[:3]])
    assert batcher.stats.batch_sizes == [1, 1, 1]
    assert [a.department for a in answers] == ["hr", "it", "finance"]


def test_a_bad_job_fails_alone_and_a_cancelled_job_is_skipped(pipe, tiny_gen):
    batcher = MicroBatcher(tiny_gen, max_batch_size=8, max_wait_ms=50)
    jobs = [_job(pipe, *JOBS[0]), _job(pipe, "hr", "Vacation?", "v99", ()), _job(pipe, *JOBS[1])]
    res = _run_held(batcher, jobs, cancel=(2,))
    assert isinstance(res[1], UnknownVersionError)
    assert res[0].text == pipe.ask(JOBS[0][1], "hr", max_new_tokens=MAX_NEW).text
    assert batcher.stats.batch_sizes == [1]  # the bad job never reached generation, the cancelled one was dropped


def test_streamed_deltas_concatenate_to_the_answer(pipe, tiny_gen):
    batcher = MicroBatcher(tiny_gen)

    async def main():
        t = batcher.submit(_job(pipe, *JOBS[0], stream=True))
        prepared = await t.prepared()
        pieces = [p async for p in t.deltas()]
        return prepared, pieces, await t.answer()

    batcher.start()
    try:
        prepared, pieces, answer = asyncio.run(main())
    finally:
        batcher.stop()
    assert prepared.prompt_version == "v1" and prepared.citations == answer.citations
    assert len(pieces) > 1
    assert "".join(pieces) == answer.text


def test_the_queue_is_bounded_and_a_stopped_batcher_refuses(pipe, tiny_gen):
    batcher = MicroBatcher(tiny_gen, max_queue=2)

    async def main():
        with pytest.raises(BatcherStopped):
            batcher.submit(_job(pipe, *JOBS[0]))
        batcher.start()
        batcher.hold()
        tickets = [batcher.submit(_job(pipe, *JOBS[i])) for i in range(2)]
        with pytest.raises(Overloaded):
            batcher.submit(_job(pipe, *JOBS[2]))
        batcher.release()
        return await asyncio.gather(*(t.answer() for t in tickets))

    try:
        answers = asyncio.run(main())
    finally:
        batcher.stop()
    assert [a.department for a in answers] == ["hr", "it"]


def test_jobs_must_use_the_batchers_generator(pipe, tiny_tokenizer):
    other = Generator(build_tiny_model(tiny_tokenizer, seed=1), tiny_tokenizer)
    batcher = MicroBatcher(other)
    batcher.start()
    try:
        async def main():
            batcher.submit(_job(pipe, *JOBS[0]))

        with pytest.raises(ValueError, match="generator"):
            asyncio.run(main())
    finally:
        batcher.stop()
