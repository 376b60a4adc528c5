"""Continuous batching: requests join the running batch between decode steps, long prompts are run
in chunks under a per-step token budget, finished rows leave at once, and every answer equals the
request answered alone (mixed departments, plain and deep soft prompts, lengths, arrival times)."""

from __future__ import annotations

import asyncio

import pytest
import torch
from conftest import build_tiny_model

from ragpt.lm.generator import Generator
from ragpt.lm.template import Turn
from ragpt.retrieval.index import DocumentIndex
from ragpt.serving.contract import InputContract
from ragpt.serving.pipeline import Pipeline
from ragpt.serving.request import ChatRequest
from ragpt.serving.scheduler import ChatJob, ContinuousBatcher
from ragpt.softprompts.artifact import SoftPrompt, base_model_fingerprint
from ragpt.softprompts.registry import PromptRegistry

pytestmark = pytest.mark.integration  # the sample index is embedded with the real embedder


@pytest.fixture(scope="module", autouse=True)
def _threads(one_torch_thread_per_module):
    """See conftest.one_torch_thread_per_module."""


@pytest.fixture(scope="module")
def gen(tiny_tokenizer):
    return Generator(build_tiny_model(tiny_tokenizer, seed=7), tiny_tokenizer)


@pytest.fixture(scope="module")
def pipe(sample_index, real_embedder, gen, tmp_path_factory):
    """hr: a plain prompt (v1), it: a deep prompt over both layers (v1), finance: none."""
    settings, name = sample_index
    reg = PromptRegistry(tmp_path_factory.mktemp("prompts"))
    fp = base_model_fingerprint(gen.model)
    scale = float(gen.embedding.weight.std())
    g = torch.Generator().manual_seed(0)
    tensors = {"hr": torch.randn(5, gen.hidden_size, generator=g) * scale,
               "it": torch.randn(gen.max_prompt_depth, 3, gen.hidden_size, generator=g) * scale}
    for dept, tensor in tensors.items():
        sp = SoftPrompt.create(tensor, department=dept, base_fingerprint=fp,
                               contract=InputContract(k=1, max_context_tokens=3000).to_dict())
        reg.register(sp, actor="test")
        reg.approve(dept, "v1", actor="test")
        reg.activate(dept, "v1", actor="test")
    s = settings.model_copy(update={"prompt_dir": reg.root, "k": 1, "max_context_tokens": 3000})
    return Pipeline(DocumentIndex.open(s.index_dir, name), s, embedder=real_embedder, generator=gen)


LONG_SYSTEM = " ".join(["Answer carefully and cite the policy that applies."] * 40)
REQUESTS = [
    ChatRequest("How many vacation days do I get?", "hr", max_new_tokens=12),
    ChatRequest("How do I connect to the VPN?", "it", max_new_tokens=3),
    ChatRequest("Who approves invoices above 10,000 EUR?", "finance", max_new_tokens=9),
    ChatRequest("And how many can I carry over?", "hr", max_new_tokens=7,
                history=(Turn("user", "How many vacation days do I get?"), Turn("assistant", "30 days."))),
    ChatRequest("Which laptop do I get?", "it", system=LONG_SYSTEM, max_new_tokens=10),
    ChatRequest("When is payday?", "finance", prompt="none", max_new_tokens=5),
]


def _alone(pipe: Pipeline, req: ChatRequest):
    return pipe.ask_many([req])[0]


async def _answers(batcher: ContinuousBatcher, pipe: Pipeline, schedule: list[tuple[int, ChatRequest]]):
    """Submit each request once the batcher has run `steps` decode steps (staggered arrivals)."""
    tickets = []
    for steps, req in schedule:
        for _ in range(2000):  # bounded wait for the worker to reach the step
            if batcher.steps >= steps:
                break
            await asyncio.sleep(0.005)
        tickets.append(batcher.submit(ChatJob(req, pipe)))
    return await asyncio.gather(*(t.answer() for t in tickets))


def _run(batcher: ContinuousBatcher, pipe: Pipeline, schedule):
    batcher.start()
    try:
        return asyncio.run(_answers(batcher, pipe, schedule))
    finally:
        batcher.stop()


@pytest.mark.parametrize("budget", [4096, 64], ids=["whole-prompts", "chunked-prompts"])
def test_staggered_mixed_requests_each_equal_the_request_alone(pipe, gen, budget):
    expected = [_alone(pipe, r) for r in REQUESTS]
    assert len({e.text for e in expected}) > 1  # the requests really differ
    batcher = ContinuousBatcher(gen, max_batch_size=4, max_prefill_tokens=budget)
    schedule = [(0, REQUESTS[0]), (0, REQUESTS[1]), (2, REQUESTS[2]), (3, REQUESTS[3]), (5, REQUESTS[4]),
                (6, REQUESTS[5])]
    answers = _run(batcher, pipe, schedule)
    for req, got, want in zip(REQUESTS, answers, expected):
        assert got.text == want.text, req.question
        assert got.citations == want.citations and got.usage == want.usage
        assert got.prompt_version == want.prompt_version and got.finish_reason == want.finish_reason
    # Requests joined a batch that was already running: more rows were admitted than the first step had.
    assert batcher.stats.batches >= 3
    assert max(a.timings["batch_size"] for a in answers) > 1


def test_a_huge_prompt_is_chunked_and_does_not_stall_a_short_request(pipe, gen):
    huge = ChatRequest("Summarise the rules.", "hr", system=" ".join(["Read every word of this."] * 140),
                       max_new_tokens=4)
    short = ChatRequest("How do I connect to the VPN?", "it", max_new_tokens=3)
    want_huge, want_short = _alone(pipe, huge), _alone(pipe, short)
    assert want_huge.usage["prompt_tokens"] > 10 * 64  # ten and more chunks of the budget below
    batcher = ContinuousBatcher(gen, max_batch_size=4, max_prefill_tokens=64)
    order: list[str] = []

    async def main():
        th = batcher.submit(ChatJob(huge, pipe))
        await asyncio.sleep(0)
        ts = batcher.submit(ChatJob(short, pipe))

        async def done(t, name):
            a = await t.answer()
            order.append(name)
            return a

        return await asyncio.gather(done(th, "huge"), done(ts, "short"))

    batcher.start()
    try:
        got_huge, got_short = asyncio.run(main())
    finally:
        batcher.stop()
    assert order == ["short", "huge"]  # the short request finished while the huge prompt was still being run
    assert got_huge.text == want_huge.text and got_short.text == want_short.text


def test_finished_and_cancelled_rows_free_their_slot_at_once(pipe, gen):
    batcher = ContinuousBatcher(gen, max_batch_size=1, max_prefill_tokens=4096)
    slow = ChatRequest("How many vacation days do I get?", "hr", max_new_tokens=400)
    quick = ChatRequest("How do I connect to the VPN?", "it", max_new_tokens=3)

    async def main():
        t_slow = batcher.submit(ChatJob(slow, pipe, stream=True))
        pieces = t_slow.deltas()
        await anext(pieces)  # it is running, and holds the only slot
        t_quick = batcher.submit(ChatJob(quick, pipe))
        steps = batcher.steps
        t_slow.cancel()  # a client that goes away frees its slot for the next step
        answer = await asyncio.wait_for(t_quick.answer(), 60)
        return answer, batcher.steps - steps

    batcher.start()
    try:
        answer, steps = asyncio.run(main())
    finally:
        batcher.stop()
    assert answer.text == _alone(pipe, quick).text
    assert steps < 50  # the cancelled 400-token row did not run to its end first
