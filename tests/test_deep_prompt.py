"""Deep soft prompts: layer inputs replaced at the prompt positions, in training and in serving."""

from __future__ import annotations

import contextlib
import copy
import threading

import pytest
import torch
from conftest import build_tiny_model

from ragpt.data.qa import QAExample
from ragpt.errors import SoftPromptError
from ragpt.lm.generator import Generator
from ragpt.softprompts.deep import deep_from_shallow, deep_prompt_inputs, prompt_depth, prompt_tokens
from ragpt.training.trainer import PromptModule, TrainExample, answer_loss_sum

LAYERS = 3
N = 4


@pytest.fixture
def model(tiny_tokenizer):
    return build_tiny_model(tiny_tokenizer, seed=0, layers=LAYERS)


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _shallow(hidden: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(N, hidden, generator=torch.Generator().manual_seed(seed)) * 0.5


def _perturbed(deep: torch.Tensor, seed: int = 2) -> torch.Tensor:
    """Another direction at every deep slice (RMSNorm makes a layer input's scale irrelevant)."""
    g = torch.Generator().manual_seed(seed)
    out = deep.clone()
    for layer in range(1, deep.shape[0]):
        noise = torch.randn(deep.shape[1:], generator=g)
        out[layer] = noise * deep[layer].norm(dim=-1, keepdim=True) / noise.norm(dim=-1, keepdim=True)
    return out


def _reference_greedy(model, deep: torch.Tensor, ids: list[int], steps: int, eos: int) -> list[int]:
    """Decode without any cache: the full [deep[0] ; ids] sequence every step, layer inputs replaced."""
    emb = model.get_input_embeddings()
    x = torch.cat([deep[0][None], emb(torch.tensor([ids]))], 1)
    out: list[int] = []
    for _ in range(steps):
        with torch.no_grad(), deep_prompt_inputs(model, deep):
            t = int(model(inputs_embeds=x, use_cache=False).logits[0, -1].argmax())
        out.append(t)
        if t == eos:
            break
        x = torch.cat([x, emb(torch.tensor([[t]]))], 1)
    return out


def _last_logits(model, deep, ids):
    x = torch.cat([deep[0][None], model.get_input_embeddings()(torch.tensor([ids]))], 1)
    with torch.no_grad(), deep_prompt_inputs(model, deep):
        return model(inputs_embeds=x, use_cache=False).logits[0, -1]


def test_shapes_and_helpers(model):
    sp = _shallow(model.config.hidden_size)
    deep = deep_from_shallow(model, sp, LAYERS)
    assert deep.shape == (LAYERS, N, model.config.hidden_size)
    assert torch.equal(deep[0], sp)
    assert (prompt_depth(sp), prompt_depth(deep), prompt_tokens(deep), prompt_tokens(None)) == (1, LAYERS, N, 0)


def test_deep_prompt_from_a_plain_one_computes_the_same(model, tiny_tokenizer):
    sp = _shallow(model.config.hidden_size)
    deep = deep_from_shallow(model, sp, LAYERS)
    ids = _ids(tiny_tokenizer, "how many vacation days")
    x = torch.cat([sp[None], model.get_input_embeddings()(torch.tensor([ids]))], 1)
    plain = model(inputs_embeds=x).logits[0, -1]
    torch.testing.assert_close(_last_logits(model, deep, ids), plain, rtol=1e-5, atol=1e-5)


def test_deep_slices_change_the_output_and_the_hooks_are_idle_outside_the_block(model, tiny_tokenizer):
    sp = _shallow(model.config.hidden_size)
    deep = deep_from_shallow(model, sp, LAYERS)
    ids = _ids(tiny_tokenizer, "how many vacation days")
    other = _last_logits(model, _perturbed(deep), ids)
    assert (other - _last_logits(model, deep, ids)).abs().max() > 1e-2
    # The hooks stay installed after the block, but act only inside it.
    x = torch.cat([deep[0][None], model.get_input_embeddings()(torch.tensor([ids]))], 1)
    fresh = build_tiny_model(tiny_tokenizer, seed=0, layers=LAYERS)  # never hooked
    torch.testing.assert_close(model(inputs_embeds=x).logits, fresh(inputs_embeds=x).logits, rtol=0, atol=0)


def test_hooks_act_only_in_the_thread_that_entered_the_block(model, tiny_tokenizer):
    sp = _shallow(model.config.hidden_size)
    deep = _perturbed(deep_from_shallow(model, sp, LAYERS))
    ids = _ids(tiny_tokenizer, "vacation")
    x = torch.cat([deep[0][None], model.get_input_embeddings()(torch.tensor([ids]))], 1)
    with torch.no_grad():
        plain = model(inputs_embeds=x).logits
    seen = {}
    entered, release = threading.Event(), threading.Event()

    def hold_the_block():
        with deep_prompt_inputs(model, deep):
            with torch.no_grad():
                seen["inside"] = model(inputs_embeds=x).logits
            entered.set()
            release.wait(10)

    t = threading.Thread(target=hold_the_block)
    t.start()
    entered.wait(10)
    with torch.no_grad():
        seen["other thread"] = model(inputs_embeds=x).logits
    release.set()
    t.join()
    torch.testing.assert_close(seen["other thread"], plain, rtol=0, atol=0)
    assert (seen["inside"] - plain).abs().max() > 1e-2  # the block itself did replace the inputs


def test_generator_with_a_deep_prompt_equals_cache_free_decoding(model, tiny_tokenizer):
    gen = Generator(model, tiny_tokenizer)
    deep = _perturbed(deep_from_shallow(model, _shallow(gen.hidden_size), LAYERS))
    rows = [_ids(tiny_tokenizer, "how many vacation days do I get"), _ids(tiny_tokenizer, "VPN")]
    eos = tiny_tokenizer.eos_token_id
    # Mixed batch: a deep prompt, a plain prompt and no prompt, rows of different lengths.
    plain = _shallow(gen.hidden_size, 5)
    out = gen.generate(rows + [rows[0]], [deep, plain, None], max_new_tokens=6)
    assert out[0].token_ids == _reference_greedy(model, deep, rows[0], 6, eos)
    assert out[0].prompt_tokens == len(rows[0]) + N
    # The other rows are unaffected by sharing a batch with a deep prompt.
    assert out[1].token_ids == gen.generate([rows[1]], [plain], max_new_tokens=6)[0].token_ids
    assert out[1].token_ids == _reference_greedy(model, plain[None], rows[1], 6, eos)
    assert out[2].token_ids == gen.generate([rows[0]], max_new_tokens=6)[0].token_ids
    alone = gen.generate([rows[1]], [deep], max_new_tokens=6)[0]
    assert alone.token_ids == _reference_greedy(model, deep, rows[1], 6, eos)
    # The same deep prompt from the prefix KV cache, under a key: the same tokens; the second call hits.
    keyed = gen.generate(rows, [deep, deep], max_new_tokens=6, prefix_keys=[("hr", "v9"), ("hr", "v9")])
    assert [r.token_ids for r in keyed] == [out[0].token_ids, alone.token_ids]
    assert gen.prefix_cache.misses == 1 and gen.prefix_cache.hits == 1


def test_deep_prompt_is_not_accepted_inline(model, tiny_tokenizer):
    gen = Generator(model, tiny_tokenizer)
    deep = deep_from_shallow(model, _shallow(gen.hidden_size), 2)
    with pytest.raises(SoftPromptError, match="prefix KV"):
        gen.embed_rows([[1, 2]], [deep])


def test_too_deep_a_prompt_is_refused(model):
    sp = _shallow(model.config.hidden_size)
    with pytest.raises(SoftPromptError, match="depth"):
        deep_from_shallow(model, sp, LAYERS + 1)
    with pytest.raises(SoftPromptError, match="layers"), deep_prompt_inputs(model, torch.zeros(LAYERS + 1, N, 64)):
        pass


def _rows(tok) -> list[TrainExample]:
    rows = []
    for i, q in enumerate(["vacation days", "the VPN and laptops please", "parking"]):
        prompt = _ids(tok, f"question about {q}")
        answer = _ids(tok, f"{5 * (i + 1)} days") + [tok.eos_token_id]
        rows.append(TrainExample(ids=prompt + answer, answer_start=len(prompt), qa=QAExample("q", ["a"]),
                                 prompt_ids=prompt, retrieval_hit=True))
    return rows


def test_training_loss_of_a_fresh_deep_prompt_equals_its_plain_prompt(model, tiny_tokenizer):
    sp = _shallow(model.config.hidden_size)
    rows = _rows(tiny_tokenizer)
    plain, n = answer_loss_sum(model, PromptModule(sp), rows, contextlib.nullcontext)
    deep_module = PromptModule(deep_from_shallow(model, sp, LAYERS))
    deep, n2 = answer_loss_sum(model, deep_module, rows, contextlib.nullcontext)
    assert n == n2
    assert deep.item() == pytest.approx(plain.item(), rel=1e-5)


def test_training_loss_equals_the_serving_forward_and_gradients_reach_every_slice(model, tiny_tokenizer):
    """The trainer's mask-free chunked forward with hooks = the plain model forward with hooks."""
    deep = _perturbed(deep_from_shallow(model, _shallow(model.config.hidden_size), LAYERS))
    module = PromptModule(deep)
    torch.testing.assert_close(module.effective(), deep, rtol=1e-6, atol=1e-6)
    rows = _rows(tiny_tokenizer)
    loss, _ = answer_loss_sum(model, module, rows, contextlib.nullcontext)
    loss.backward()
    ref = 0.0
    for r in rows:
        x = torch.cat([deep[0][None], model.get_input_embeddings()(torch.tensor([r.ids]))], 1)
        labels = torch.full((1, x.shape[1]), -100)
        labels[0, N + r.answer_start:] = torch.tensor(r.ids[r.answer_start:])
        with torch.no_grad(), deep_prompt_inputs(model, deep):
            ref += model(inputs_embeds=x, labels=labels).loss.item() * (len(r.ids) - r.answer_start)
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    grad = module.prompt.grad
    assert all(float(grad[layer].abs().sum()) > 0 for layer in range(LAYERS))
    assert all(p.grad is None for p in model.parameters())


def test_per_layer_scale_makes_one_lr_a_relative_step_per_layer(model):
    """Layer inputs differ in scale by orders of magnitude; one AdamW step must move every
    slice by the same amount relative to its own scale (and a plain prompt is untouched)."""
    deep = deep_from_shallow(model, _shallow(model.config.hidden_size), LAYERS)
    rms = deep.pow(2).mean(-1).sqrt().median(-1).values
    assert rms.max() / rms.min() > 10  # the situation the scale is for
    module = PromptModule(deep)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-2, weight_decay=0.0)
    module.prompt.grad = torch.randn(deep.shape, generator=torch.Generator().manual_seed(0))
    before = module.effective().detach().clone()
    opt.step()
    relative = (module.effective().detach() - before).pow(2).mean((-1, -2)).sqrt() / rms
    torch.testing.assert_close(relative, relative[0].expand(LAYERS), rtol=1e-3, atol=0)
    plain = PromptModule(deep[0])
    assert torch.equal(plain.prompt.detach(), deep[0]) and torch.equal(plain.effective(), plain.prompt)


@pytest.mark.integration
def test_real_generator_deep_prompt_and_its_peft_prefix_export(real_generator, tmp_path):
    """SmolLM2: a deep prompt made from the text-initialised plain prompt answers exactly as the
    plain one; after changing its deeper slices, the PEFT prefix-tuning export gives the same
    next-token logits in peft as ragpt's prefix path."""
    from peft import PeftModel

    from ragpt.lm.template import build_prompt
    from ragpt.softprompts.artifact import SoftPrompt, base_model_fingerprint
    from ragpt.softprompts.peft_prefix import export_peft_prefix
    from ragpt.training.trainer import TrainConfig, init_prompt

    model, tok = real_generator
    gen = Generator(model, tok)  # float32: the comparison is exact up to float summation order
    sp = init_prompt(model, tok, TrainConfig(department="hr"))
    deep = deep_from_shallow(model, sp, model.config.num_hidden_layers)
    ids = build_prompt(tok, "How many vacation days do I get?", [], department="hr").ids
    plain_answer, deep_answer = gen.generate([ids, ids], [sp, deep], max_new_tokens=12)
    assert deep_answer.token_ids == plain_answer.token_ids

    changed = _perturbed(deep)
    prompt = SoftPrompt.create(changed, department="hr", base_fingerprint=base_model_fingerprint(model))
    export_peft_prefix(prompt, tmp_path / "peft", model=model, base_model_name_or_path=None)
    with torch.no_grad():
        ours = _last_logits(model, changed, ids)
        # A copy: PeftModel wraps the model it is given, and this one is shared by the session.
        peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "peft")).eval()
        theirs = peft_model(input_ids=torch.tensor([ids])).logits[0, -1]
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-3)
    assert (ours - _last_logits(model, deep, ids)).abs().max() > 1e-2  # the deeper slices mattered


def test_deep_support_is_checked_before_training(model):
    from ragpt.errors import RagptError
    from ragpt.training.trainer import check_deep_support

    check_deep_support(model, LAYERS)
    with pytest.raises(RagptError, match=f"--depth {LAYERS + 1} exceeds the model's {LAYERS} decoder layers"):
        check_deep_support(model, LAYERS + 1)
