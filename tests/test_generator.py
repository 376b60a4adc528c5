"""Generator: batched greedy decoding with per-row soft prompts equals the reference decoders."""

from __future__ import annotations

import pytest
import torch

from ragpt.errors import SoftPromptError
from ragpt.lm.generator import Generator

MAX_NEW = 12

TEXTS = [
    "Employees get 25 vacation days per year",
    "VPN",
    "Reset your password every 90 days; use at least 12 characters.",
    "Invoices above 10,000 EUR",
]


def _rows(tokenizer, texts=TEXTS) -> list[list[int]]:
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def _cut_at_stop(tokens: list[int], stop_ids: set[int]) -> list[int]:
    """Tokens up to and including the first stop token (what Generator reports)."""
    for i, t in enumerate(tokens):
        if t in stop_ids:
            return tokens[: i + 1]
    return tokens


def _hf_generate_left_padded(model, rows, pad_id, max_new) -> list[list[int]]:
    """transformers' own generate on a left-padded batch: the reference for plain rows."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.tensor(r)
        mask[i, T - len(r):] = 1
    out = model.generate(
        input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new,
        pad_token_id=pad_id,
    )
    return [row[T:].tolist() for row in out]


@torch.no_grad()
def _manual_greedy(model, embeds: torch.Tensor, max_new: int, stop_ids: set[int]) -> list[int]:
    """Greedy decoding of one unpadded row from input embeddings, no KV cache: full forward each step."""
    emb = model.get_input_embeddings()
    x = embeds[None]
    out: list[int] = []
    for _ in range(max_new):
        logits = model(inputs_embeds=x, use_cache=False).logits[0, -1]
        t = int(logits.argmax())
        out.append(t)
        if t in stop_ids:
            break
        x = torch.cat([x, emb(torch.tensor([[t]]))], dim=1)
    return out


def _embed(model, ids: list[int]) -> torch.Tensor:
    return model.get_input_embeddings()(torch.tensor(ids, dtype=torch.long))


def _soft(n: int, hidden: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, hidden, generator=g)


def test_batch_of_plain_rows_equals_hf_generate_left_padded(tiny_model, tiny_tokenizer):
    gen = Generator(tiny_model, tiny_tokenizer)
    rows = _rows(tiny_tokenizer)
    assert len({len(r) for r in rows}) == len(rows), "rows must have different lengths"
    ours = gen.generate(rows, max_new_tokens=MAX_NEW)
    ref = _hf_generate_left_padded(tiny_model, rows, tiny_tokenizer.pad_token_id, MAX_NEW)
    for i, (res, r) in enumerate(zip(ours, ref)):
        assert res.token_ids == _cut_at_stop(r, gen.stop_ids), f"row {i}"
        assert res.prompt_tokens == len(rows[i])
        assert res.finish_reason == ("stop" if res.token_ids[-1] in gen.stop_ids else "length")


def test_each_row_of_a_batch_equals_the_row_generated_alone(tiny_model, tiny_tokenizer):
    gen = Generator(tiny_model, tiny_tokenizer)
    rows = _rows(tiny_tokenizer)
    batch = gen.generate(rows, max_new_tokens=MAX_NEW)
    for i, r in enumerate(rows):
        alone = gen.generate([r], max_new_tokens=MAX_NEW)[0]
        assert batch[i].token_ids == alone.token_ids, f"row {i}"
        assert batch[i].text == alone.text


def test_different_inputs_give_different_outputs(tiny_model, tiny_tokenizer):
    # Guards the equality tests above: the tiny model must not ignore its input.
    gen = Generator(tiny_model, tiny_tokenizer)
    outs = [r.token_ids for r in gen.generate(_rows(tiny_tokenizer), max_new_tokens=MAX_NEW)]
    assert len({tuple(o) for o in outs}) == len(outs)


def test_soft_prompt_row_equals_manual_decoding_of_concatenated_embeddings(tiny_model, tiny_tokenizer):
    gen = Generator(tiny_model, tiny_tokenizer)
    ids = _rows(tiny_tokenizer)[0]
    soft = _soft(5, gen.hidden_size, seed=1)
    res = gen.generate([ids], [soft], max_new_tokens=MAX_NEW)[0]
    with torch.no_grad():
        ref = _manual_greedy(tiny_model, torch.cat([soft, _embed(tiny_model, ids)]), MAX_NEW, gen.stop_ids)
    assert res.token_ids == ref
    assert res.prompt_tokens == len(ids) + 5
    # The soft prompt has an effect: without it the same ids decode differently.
    plain = gen.generate([ids], max_new_tokens=MAX_NEW)[0]
    assert plain.token_ids != res.token_ids


def test_soft_prompt_row_equals_hf_generate_from_inputs_embeds(tiny_model, tiny_tokenizer):
    gen = Generator(tiny_model, tiny_tokenizer)
    ids = _rows(tiny_tokenizer)[2]
    soft = _soft(3, gen.hidden_size, seed=2)
    res = gen.generate([ids], [soft], max_new_tokens=MAX_NEW)[0]
    with torch.no_grad():
        x = torch.cat([soft, _embed(tiny_model, ids)])[None]
        out = tiny_model.generate(
            inputs_embeds=x, attention_mask=torch.ones(x.shape[:2], dtype=torch.long),
            do_sample=False, max_new_tokens=MAX_NEW, pad_token_id=tiny_tokenizer.pad_token_id,
        )
    assert res.token_ids == _cut_at_stop(out[0, -MAX_NEW:].tolist(), gen.stop_ids)


def test_mixed_batch_with_and_without_soft_prompts_equals_each_row_alone(tiny_model, tiny_tokenizer):
    gen = Generator(tiny_model, tiny_tokenizer)
    rows = _rows(tiny_tokenizer)
    softs = [_soft(4, gen.hidden_size, 10), None, _soft(9, gen.hidden_size, 11), _soft(1, gen.hidden_size, 12)]
    batch = gen.generate(rows, softs, max_new_tokens=MAX_NEW)
    for i, (r, sp) in enumerate(zip(rows, softs)):
        alone = gen.generate([r], [sp], max_new_tokens=MAX_NEW)[0]
        assert batch[i].token_ids == alone.token_ids, f"row {i}"
        e = _embed(tiny_model, r) if sp is None else torch.cat([sp, _embed(tiny_model, r)])
        with torch.no_grad():
            assert batch[i].token_ids == _manual_greedy(tiny_model, e, MAX_NEW, gen.stop_ids), f"row {i}"
        assert batch[i].prompt_tokens == len(r) + (0 if sp is None else sp.shape[0])


def test_per_row_max_new_tokens_are_respected(tiny_model, tiny_tokenizer):
    gen = Generator(tiny_model, tiny_tokenizer)
    rows = _rows(tiny_tokenizer)[:3]
    res = gen.generate(rows, max_new_tokens=[2, 7, 4])
    full = gen.generate(rows, max_new_tokens=7)
    for r, f, n in zip(res, full, [2, 7, 4]):
        assert len(r.token_ids) <= n
        assert r.token_ids == f.token_ids[:n]


def test_stream_yields_the_same_tokens_as_generate(tiny_model, tiny_tokenizer):
    gen = Generator(tiny_model, tiny_tokenizer)
    rows = _rows(tiny_tokenizer)
    streamed: list[list[int]] = [[] for _ in rows]
    for step in gen.stream(rows, max_new_tokens=MAX_NEW):
        assert len(step) == len(rows)
        for i, t in enumerate(step):
            if t is not None:
                streamed[i].append(t)
    assert streamed == [r.token_ids for r in gen.generate(rows, max_new_tokens=MAX_NEW)]


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(lambda h: torch.zeros(4, h + 1), id="wrong-hidden-size"),
        pytest.param(lambda h: torch.zeros(h), id="1-d"),
        pytest.param(lambda h: torch.zeros(1, 1, 4, h), id="4-d"),
        pytest.param(lambda h: torch.zeros(9, 4, h), id="deeper-than-the-model"),
        pytest.param(lambda h: torch.full((4, h), float("nan")), id="nan"),
        pytest.param(lambda h: torch.tensor([[float("inf")] * h]), id="inf"),
        pytest.param(lambda h: torch.zeros(4, h, dtype=torch.long), id="integer"),
        pytest.param(lambda h: [[0.0] * h], id="not-a-tensor"),
    ],
)
def test_invalid_soft_prompt_raises_soft_prompt_error(tiny_model, tiny_tokenizer, bad):
    gen = Generator(tiny_model, tiny_tokenizer)
    rows = _rows(tiny_tokenizer)[:2]
    with pytest.raises(SoftPromptError):
        gen.generate(rows, [None, bad(gen.hidden_size)], max_new_tokens=2)


def test_soft_prompt_error_names_the_expected_shape(tiny_model, tiny_tokenizer):
    gen = Generator(tiny_model, tiny_tokenizer)
    with pytest.raises(SoftPromptError, match=str(gen.hidden_size)):
        gen.generate(_rows(tiny_tokenizer)[:1], [torch.zeros(3, 7)], max_new_tokens=2)


def test_weights_are_bit_identical_after_generating(tiny_model, tiny_tokenizer):
    before = {k: v.detach().clone() for k, v in tiny_model.state_dict().items()}
    gen = Generator(tiny_model, tiny_tokenizer)
    rows = _rows(tiny_tokenizer)
    gen.generate(rows, [_soft(4, gen.hidden_size, 3), None, None, _soft(2, gen.hidden_size, 4)],
                 max_new_tokens=MAX_NEW)
    gen.generate(rows, max_new_tokens=MAX_NEW, temperature=0.8, seed=0)
    after = tiny_model.state_dict()
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == []
    assert all(not p.requires_grad for p in tiny_model.parameters())


def test_sampling_with_a_seed_is_reproducible(tiny_model, tiny_tokenizer):
    gen = Generator(tiny_model, tiny_tokenizer)
    rows = _rows(tiny_tokenizer)
    a = gen.generate(rows, max_new_tokens=MAX_NEW, temperature=1.0, seed=123)
    b = gen.generate(rows, max_new_tokens=MAX_NEW, temperature=1.0, seed=123)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]


def test_empty_row_is_rejected(tiny_model, tiny_tokenizer):
    gen = Generator(tiny_model, tiny_tokenizer)
    with pytest.raises(ValueError):
        gen.generate([[], [5, 6]], max_new_tokens=2)


def test_rows_stop_at_their_end_token_and_the_batch_matches_hf(tiny_model, tiny_tokenizer):
    # Make a token the plain run produces mid-answer an end token, so row 0 stops early
    # while the other rows keep going.
    rows = _rows(tiny_tokenizer)
    plain = Generator(tiny_model, tiny_tokenizer).generate(rows, max_new_tokens=MAX_NEW)
    stop_token = plain[0].token_ids[3]
    tiny_model.generation_config.eos_token_id = [tiny_tokenizer.eos_token_id, stop_token]
    gen = Generator(tiny_model, tiny_tokenizer)
    assert stop_token in gen.stop_ids
    res = gen.generate(rows, max_new_tokens=MAX_NEW)
    first = plain[0].token_ids.index(stop_token)
    assert res[0].token_ids == plain[0].token_ids[: first + 1]
    assert res[0].finish_reason == "stop"
    assert res[0].text == tiny_tokenizer.decode(plain[0].token_ids[:first], skip_special_tokens=True).strip()
    ref = _hf_generate_left_padded(tiny_model, rows, tiny_tokenizer.pad_token_id, MAX_NEW)
    for i, (r, f) in enumerate(zip(res, ref)):
        assert r.token_ids == _cut_at_stop(f, gen.stop_ids), f"row {i}"
        alone = gen.generate([rows[i]], max_new_tokens=MAX_NEW)[0]
        assert r.token_ids == alone.token_ids, f"row {i}"


# --------------------------------------------------------------------------- real generator


@pytest.fixture(scope="module")
def real_prompts(sample_index, real_embedder, real_generator):
    """Prompt ids of three sample questions (different departments), built as serving builds them."""
    from ragpt.data.sample import SAMPLE_DEPARTMENTS, sample_questions
    from ragpt.lm.template import build_prompt
    from ragpt.retrieval.index import DocumentIndex
    from ragpt.retrieval.search import Retriever
    from ragpt.serving.request import passages_from_hits

    settings, name = sample_index
    retriever = Retriever(DocumentIndex.open(settings.index_dir, name), real_embedder)
    _, tok = real_generator
    rows = []
    for dept in SAMPLE_DEPARTMENTS:
        q = sample_questions(dept)[0]
        hits = retriever.search(q.question, dept, k=1)
        rows.append(build_prompt(tok, q.question, passages_from_hits(hits), department=dept).ids)
    return rows


@pytest.mark.integration
def test_real_generator_greedy_answer_equals_hf_generate(real_generator, real_prompts):
    model, tok = real_generator
    gen = Generator(model, tok, bf16=False)
    n = 16
    ids = real_prompts[0]
    ours = gen.generate([ids], max_new_tokens=n)[0]
    ref = model.generate(
        input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        do_sample=False, max_new_tokens=n, pad_token_id=gen.pad_id,
    )[0, len(ids):].tolist()
    assert ours.token_ids == _cut_at_stop(ref, gen.stop_ids)
    assert ours.text  # the instruct model answers something


@pytest.mark.integration
def test_real_generator_batch_equals_each_row_alone(real_generator, real_prompts):
    model, tok = real_generator
    gen = Generator(model, tok, bf16=False)
    assert len({len(r) for r in real_prompts}) == len(real_prompts)
    soft = _soft(4, gen.hidden_size, seed=5) * float(gen.embedding.weight.std())
    softs = [None, soft, None]
    batch = gen.generate(real_prompts, softs, max_new_tokens=MAX_NEW)
    for i, (r, sp) in enumerate(zip(real_prompts, softs)):
        alone = gen.generate([r], [sp], max_new_tokens=MAX_NEW)[0]
        assert batch[i].token_ids == alone.token_ids, f"row {i}"
