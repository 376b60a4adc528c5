"""The packed engine: rows side by side without padding, each row's keys and values in its own
buffer. A row computes what it computes alone, whatever else is in the step (other rows' lengths,
prompts running beside decoding rows, rows joining and leaving), and what the padded path and
Hugging Face's own forward compute."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_model

from ragpt.config import load_settings
from ragpt.errors import ConfigError
from ragpt.lm.generator import Generator
from ragpt.lm.packed import PackedEngine, RowKV, Segment


@pytest.fixture(scope="module", autouse=True)
def _threads(one_torch_thread_per_module):
    """See conftest.one_torch_thread_per_module."""


def _rows(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, vocab, (length,), generator=g).tolist() for length in (3, 17, 9, 40)[:n]]


def _alone_logits(model, ids: list[int]) -> torch.Tensor:
    """Hugging Face's own forward of one unpadded row: the logits after its last id."""
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0, -1].float()


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    return build_tiny_model(tiny_tokenizer, seed=3)


@pytest.fixture(scope="module")
def engine(model):
    return PackedEngine(model)


def test_prompts_of_different_lengths_in_one_step_each_equal_the_model_alone(model, engine, tiny_tokenizer):
    rows = _rows(4, len(tiny_tokenizer))
    kv = [engine.new_row(len(r)) for r in rows]
    logits = engine.step([Segment(k, r) for k, r in zip(kv, rows)])
    assert logits.shape == (4, model.config.vocab_size)
    for i, r in enumerate(rows):
        torch.testing.assert_close(logits[i], _alone_logits(model, r), rtol=1e-4, atol=1e-4)
        assert kv[i].length == len(r)


def test_decoding_beside_a_running_prompt_and_rows_that_join_and_leave(model, engine, tiny_tokenizer):
    """Greedy continuation of each row, packed with whatever else runs that step, equals the model
    on the row alone (its prompt and the tokens chosen so far, recomputed from scratch)."""
    rows = _rows(4, len(tiny_tokenizer), seed=1)
    seqs = [list(r) for r in rows]
    kv = [engine.new_row(len(r) + 8) for r in rows]
    # Step 1: rows 0 and 1 run their prompts; step 2: they decode while row 2's prompt runs in two
    # chunks; step 4: row 3 joins; row 1 leaves after step 3.
    active: dict[int, list[int]] = {0: rows[0], 1: rows[1]}
    pending_chunks = {2: [rows[2][:5], rows[2][5:]]}
    for step in range(7):
        if step == 3:
            active[3] = rows[3]
        if step in (1, 2):
            active[2] = pending_chunks[2].pop(0)
        if step == 4:
            active.pop(1)
        order = sorted(active)
        segs = [Segment(kv[i], active[i], logits=not (i == 2 and step == 1)) for i in order]
        logits = engine.step(segs)
        j = 0
        for i, seg in zip(order, segs):
            if not seg.logits:
                continue
            want = _alone_logits(model, seqs[i])
            torch.testing.assert_close(logits[j], want, rtol=1e-4, atol=1e-4)
            tok = int(logits[j].argmax())
            assert tok == int(want.argmax())
            seqs[i].append(tok)
            active[i] = [tok]
            j += 1
    assert kv[1].length == len(seqs[1]) - 1  # it left: its buffer stopped growing
    assert kv[0].length == len(seqs[0]) - 1


def test_a_row_that_outgrows_its_reservation_keeps_what_it_holds(model, engine, tiny_tokenizer):
    (ids,) = _rows(1, len(tiny_tokenizer), seed=2)
    row = engine.new_row(1)
    engine.step([Segment(row, ids[:2], logits=False)])
    logits = engine.step([Segment(row, ids[2:])])
    assert row.capacity >= len(ids) and row.length == len(ids)
    torch.testing.assert_close(logits[0], _alone_logits(model, ids), rtol=1e-4, atol=1e-4)


def test_inline_vectors_equal_the_same_positions_from_a_prefix(model, engine, tiny_tokenizer):
    """A soft prompt run inline in front of the ids, or loaded as its precomputed KV, gives the same logits."""
    gen = Generator(model, tiny_tokenizer)
    sp = torch.randn(4, gen.hidden_size) * float(gen.embedding.weight.std())
    (ids,) = _rows(1, len(tiny_tokenizer), seed=4)
    inline = engine.new_row(4 + len(ids))
    a = engine.step([Segment(inline, ids, embeds=sp)])
    row, embeds = gen.start_row(len(ids), sp, ("dept", "v1"), 0)
    assert embeds is None and row.length == 4  # the prefix is in the buffer
    b = engine.step([Segment(row, ids)])
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_packed_and_padded_generators_agree_with_mixed_soft_prompts(tiny_tokenizer):
    model = build_tiny_model(tiny_tokenizer, seed=5)
    packed, padded = Generator(model, tiny_tokenizer), Generator(model, tiny_tokenizer, packed=False)
    assert packed.engine is not None and padded.engine is None
    rows = _rows(4, len(tiny_tokenizer), seed=6)
    scale = float(packed.embedding.weight.std())
    g = torch.Generator().manual_seed(0)
    h = packed.hidden_size
    softs = [None, torch.randn(3, h, generator=g) * scale, torch.randn(2, 2, h, generator=g) * scale,
             torch.randn(5, h, generator=g)]
    keys = [None, None, ("it", "v1"), ("hr", "v2")]
    a = packed.generate(rows, softs, max_new_tokens=[6, 3, 8, 5], prefix_keys=keys)
    b = padded.generate(rows, softs, max_new_tokens=[6, 3, 8, 5], prefix_keys=keys)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.finish_reason for r in a] == [r.finish_reason for r in b]


def test_other_forwards_of_the_model_are_untouched(tiny_tokenizer):
    """The registered attention falls back to the model's original one outside packed steps
    (training, the prefix KV, the padded path): same logits as before the engine existed."""
    model = build_tiny_model(tiny_tokenizer, seed=8)
    ids = torch.tensor([[7, 8, 9, 10, 11], [0, 0, 12, 13, 14]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    with torch.inference_mode():
        before = model(input_ids=ids, attention_mask=mask).logits
    PackedEngine(model)
    assert model.config._attn_implementation.startswith("ragpt_packed_")
    with torch.inference_mode():
        after = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(before, after)
    assert model.config.to_dict() == build_tiny_model(tiny_tokenizer, seed=8).config.to_dict()  # fingerprints


def test_eager_attention_models_are_packed_too(tiny_tokenizer):
    model = build_tiny_model(tiny_tokenizer, seed=9)
    model.config._attn_implementation = "eager"
    engine = PackedEngine(model)
    rows = _rows(3, len(tiny_tokenizer), seed=10)
    kv = [engine.new_row(len(r)) for r in rows]
    engine.step([Segment(kv[0], rows[0][:2], logits=False)])  # a chunk after earlier positions too
    logits = engine.step([Segment(kv[0], rows[0][2:]), Segment(kv[1], rows[1]), Segment(kv[2], rows[2])])
    model.config._attn_implementation = "eager"
    for i, r in enumerate(rows):
        torch.testing.assert_close(logits[i], _alone_logits(model, r), rtol=1e-4, atol=1e-4)


def test_models_the_engine_cannot_take_use_the_padded_path(tiny_tokenizer):
    model = build_tiny_model(tiny_tokenizer, seed=11)
    model.config._attn_implementation = "flex_attention"
    assert not PackedEngine.supported(model)
    with pytest.raises(ValueError, match="packed decoding needs"):
        PackedEngine(model)
    gen = Generator(model, tiny_tokenizer)
    assert gen.engine is None
    with pytest.raises(RuntimeError, match="no packed engine"):
        gen.start_row(3, None, None, 1)


def test_bad_steps_are_refused(engine):
    row = engine.new_row(4)
    with pytest.raises(ValueError, match="at least one segment"):
        engine.step([])
    with pytest.raises(ValueError, match="at most once"):
        engine.step([Segment(row, [5]), Segment(row, [6])])
    with pytest.raises(ValueError, match="at least one position"):
        engine.step([Segment(row, [])])
    with pytest.raises(ValueError, match="empty row"):
        full = engine.new_row(2)
        engine.step([Segment(full, [5])])
        full.load_prefix(*_prefix(full))


def _prefix(row: RowKV):
    k = row.buf[:, 0, :, :1][:, None]
    return list(k), list(k)


def test_decode_engine_setting():
    assert load_settings(decode_engine="PADDED").decode_engine == "padded"
    with pytest.raises(ConfigError, match="decode_engine must be auto, packed or padded"):
        load_settings(decode_engine="paged")


def test_continuous_batching_needs_the_packed_engine(tiny_tokenizer):
    from ragpt.serving.scheduler import ContinuousBatcher

    padded = Generator(build_tiny_model(tiny_tokenizer, seed=12), tiny_tokenizer, packed=False)
    with pytest.raises(ValueError, match="needs the packed engine"):
        ContinuousBatcher(padded)


def test_long_prompt_chunks_are_spaced_to_the_configured_slowdown(tiny_tokenizer):
    """With decode steps of 0.1 s and chunk steps of 0.3 s, a slowdown of 1.25 allows one chunk per
    eight decode steps (0.2 s extra, earned at 0.025 s a step), and the next chunk is halved."""
    from ragpt.serving.scheduler import ContinuousBatcher

    b = ContinuousBatcher(Generator(build_tiny_model(tiny_tokenizer, seed=13), tiny_tokenizer),
                          max_prefill_tokens=512, long_prompt_slowdown=1.25)
    for _ in range(5):
        b._learn(decoding=4, prompt_positions=0, long_chunk=False, elapsed=0.1)
    assert b.step_times.estimate(4) == pytest.approx(0.1) and b.step_times.estimate(3) == pytest.approx(0.1)
    assert b._credit == pytest.approx(0.1)  # capped at one decode step: no burst of chunks
    chunk = b._long_chunk
    b._learn(decoding=4, prompt_positions=chunk, long_chunk=True, elapsed=0.3)
    assert b._credit < 0 and b._long_chunk == chunk // 2
    # Steady state: a chunk step whenever the credit allows; the steps average 1.25 x a decode step.
    times = []
    for _ in range(800):
        chunk_step = b._credit >= 0
        times.append(0.3 if chunk_step else 0.1)
        b._learn(decoding=4, prompt_positions=64 if chunk_step else 0, long_chunk=chunk_step, elapsed=times[-1])
    assert sum(t == 0.3 for t in times[-80:]) == 10  # one step in eight
    assert sum(times[-80:]) / 80 == pytest.approx(0.125)


def test_a_step_refuses_to_run_under_another_attention_implementation(tiny_tokenizer):
    """E.g. the trainer's chunked causal attention switched on around a step: it would read the packed
    rows as one sequence, so the step refuses instead of mixing rows."""
    model = build_tiny_model(tiny_tokenizer, seed=14)
    engine = PackedEngine(model)
    mine = model.config._attn_implementation
    model.config._attn_implementation = "sdpa"
    with pytest.raises(RuntimeError, match="packed steps need"):
        engine.step([Segment(engine.new_row(2), [5, 6])])
    model.config._attn_implementation = mine
    assert engine.step([Segment(engine.new_row(2), [5, 6])]).shape[0] == 1


def test_prompts_over_the_step_budget_run_in_several_steps_with_the_same_logits(model, tiny_tokenizer):
    gen = Generator(model, tiny_tokenizer)
    rows = _rows(4, len(tiny_tokenizer), seed=15)
    sp = torch.randn(6, gen.hidden_size) * float(gen.embedding.weight.std())

    def logits(budget):
        segs = [Segment(gen.engine.new_row(len(r) + 6), r, sp if i == 3 else None) for i, r in enumerate(rows)]
        return gen.run_prompts(segs, budget=budget)

    whole = logits(4096)
    for budget in (16, 5, 1):  # 5 and 1: the inline vectors alone are over the budget
        torch.testing.assert_close(logits(budget), whole, rtol=1e-4, atol=1e-4)
