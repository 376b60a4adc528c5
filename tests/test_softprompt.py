"""SoftPrompt artifacts: bit-exact round trip, and every kind of damage refused with the file named."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save as st_save  # noqa: E402

from ragpt.errors import SoftPromptError  # noqa: E402
from ragpt.lm.generator import Generator  # noqa: E402
from ragpt.lm.models import model_fingerprint  # noqa: E402
from ragpt.softprompts.artifact import SoftPrompt, base_model_fingerprint  # noqa: E402

HIDDEN = 64
N_TOKENS = 4
VOCAB = 100


# --------------------------------------------------------------------------- fixtures


def build_word_tokenizer():
    """A real (fast) tokenizer over words "w3".."w99"; id 0 pads, id 1 ends a sequence."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


def build_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        eos_token_id=1, pad_token_id=0, bos_token_id=None, tie_word_embeddings=False,
        # Wider than the default 0.02, so the random model's output depends visibly on its input.
        initializer_range=0.5,
    )
    model = LlamaForCausalLM(config).eval()
    model.requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def tiny_llama():
    return build_llama(0)


@pytest.fixture(scope="module")
def fingerprint(tiny_llama) -> str:
    return base_model_fingerprint(tiny_llama)


def make_prompt(fingerprint: str, seed: int = 1, n_tokens: int = N_TOKENS) -> SoftPrompt:
    g = torch.Generator().manual_seed(seed)
    return SoftPrompt.create(
        torch.randn(n_tokens, HIDDEN, generator=g), department="hr", base_fingerprint=fingerprint,
        embedder="all-minilm-l6-v2", index_manifest_sha256="a" * 64, training_data_sha256="b" * 64,
        hyperparameters={"lr": 0.3, "steps": 10}, metrics={"em": 0.5}, author="alice",
        extra={"note": "unit test"},
    )


@pytest.fixture
def saved(tmp_path, fingerprint) -> tuple[SoftPrompt, Path]:
    prompt = make_prompt(fingerprint)
    folder = tmp_path / "hr-v1"
    prompt.save(folder)
    return prompt, folder


def rewrite_tensor(folder: Path, tensors: dict[str, torch.Tensor], **meta_updates) -> None:
    """Replace prompt.safetensors and keep meta.json's checksum consistent, so that only the
    check under test can fire (a forger who also rewrites the checksum)."""
    import hashlib

    data = st_save(tensors)
    (folder / "prompt.safetensors").write_bytes(data)
    edit_meta(folder, sha256=hashlib.sha256(data).hexdigest(), **meta_updates)


def edit_meta(folder: Path, **updates) -> None:
    path = folder / "meta.json"
    meta = json.loads(path.read_text())
    meta.update(updates)
    path.write_text(json.dumps(meta))


def refused(folder: Path, match: str, file: str = "prompt.safetensors", **kw) -> SoftPromptError:
    with pytest.raises(SoftPromptError, match=match) as err:
        SoftPrompt.load(folder, **kw)
    assert str(folder / file) in str(err.value), f"error does not name {file}: {err.value}"
    return err.value


# --------------------------------------------------------------------------- round trip


def test_create_records_provenance(fingerprint):
    p = make_prompt(fingerprint)
    m = p.meta
    assert p.tensor.dtype == torch.float32 and p.tensor.device.type == "cpu"
    assert (p.department, p.version, p.n_tokens, p.hidden_size) == ("hr", None, N_TOKENS, HIDDEN)
    assert p.base_fingerprint == fingerprint == m["base_model_fingerprint"]
    assert m["dtype"] == "float32" and m["format_version"] == 1
    assert m["embedder"] == "all-minilm-l6-v2" and m["author"] == "alice"
    assert m["index_manifest_sha256"] == "a" * 64 and m["training_data_sha256"] == "b" * 64
    assert m["hyperparameters"] == {"lr": 0.3, "steps": 10} and m["metrics"] == {"em": 0.5}
    assert m["created"].endswith("Z") and m["extra"] == {"note": "unit test"}


def test_create_copies_to_float32_and_rejects_bad_tensors(fingerprint):
    src = torch.randn(3, HIDDEN, dtype=torch.bfloat16)
    p = SoftPrompt.create(src, department="hr", base_fingerprint=fingerprint)
    assert p.tensor.dtype == torch.float32 and torch.equal(p.tensor, src.float())
    src.zero_()  # the prompt owns its copy
    assert p.tensor.abs().sum() > 0
    bad = torch.randn(3, HIDDEN)
    bad[1, 2] = float("nan")
    with pytest.raises(SoftPromptError, match="non-finite"):
        SoftPrompt.create(bad, department="hr", base_fingerprint=fingerprint)
    with pytest.raises(SoftPromptError, match="2-D"):
        SoftPrompt.create(torch.randn(HIDDEN), department="hr", base_fingerprint=fingerprint)


def test_round_trip_is_bit_exact(saved, fingerprint):
    prompt, folder = saved
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "prompt.safetensors"]
    loaded = SoftPrompt.load(folder, base_fingerprint=fingerprint, hidden_size=HIDDEN)
    assert torch.equal(loaded.tensor, prompt.tensor)
    assert loaded.tensor.dtype == torch.float32
    for key in ("department", "version", "base_model_fingerprint", "embedder", "metrics",
                "hyperparameters", "author", "created", "extra", "n_tokens", "hidden_size"):
        assert loaded.meta[key] == prompt.meta[key], key
    assert len(loaded.meta["sha256"]) == 64


def test_save_keeps_other_files_in_the_folder(tmp_path, fingerprint):
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "loss_curve.json").write_text("[3.2, 2.1, 1.7]")
    make_prompt(fingerprint, seed=1).save(folder)
    second = make_prompt(fingerprint, seed=2)
    second.save(folder)  # overwriting a prompt also leaves the loss curve alone
    assert (folder / "loss_curve.json").read_text() == "[3.2, 2.1, 1.7]"
    assert torch.equal(SoftPrompt.load(folder).tensor, second.tensor)
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temp files left


# --------------------------------------------------------------------------- refused on load


def test_nan_refused(saved):
    _, folder = saved
    t = torch.randn(N_TOKENS, HIDDEN)
    t[2, 5] = float("nan")
    rewrite_tensor(folder, {"prompt": t})
    refused(folder, "non-finite")


def test_inf_refused(saved):
    _, folder = saved
    t = torch.randn(N_TOKENS, HIDDEN)
    t[0, 0] = float("-inf")
    rewrite_tensor(folder, {"prompt": t})
    refused(folder, "non-finite")


def test_shape_disagreeing_with_meta_refused(saved):
    _, folder = saved
    rewrite_tensor(folder, {"prompt": torch.randn(N_TOKENS + 1, HIDDEN)})
    refused(folder, r"shape \(5, 64\) disagrees with meta.json \(4, 64\)")


def test_three_d_tensor_refused(saved):
    _, folder = saved
    rewrite_tensor(folder, {"prompt": torch.randn(1, N_TOKENS, HIDDEN)})
    refused(folder, "shape")


def test_hidden_size_of_another_model_refused(saved):
    _, folder = saved
    refused(folder, "hidden size 64 does not match the model's 32", hidden_size=32)


def test_integer_dtype_refused(saved):
    _, folder = saved
    rewrite_tensor(folder, {"prompt": torch.ones(N_TOKENS, HIDDEN, dtype=torch.int32)})
    refused(folder, "dtype int32 is not allowed")


def test_dtype_disagreeing_with_meta_refused(saved):
    _, folder = saved
    rewrite_tensor(folder, {"prompt": torch.randn(N_TOKENS, HIDDEN).half()})  # meta says float32
    refused(folder, "dtype float16 disagrees with meta.json")


def test_half_precision_file_loads_as_float32(saved):
    _, folder = saved
    t = torch.randn(N_TOKENS, HIDDEN).bfloat16()
    rewrite_tensor(folder, {"prompt": t}, dtype="bfloat16")
    loaded = SoftPrompt.load(folder)
    assert loaded.tensor.dtype == torch.float32 and torch.equal(loaded.tensor, t.float())


def test_truncated_file_refused_by_checksum(saved):
    _, folder = saved
    path = folder / "prompt.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    refused(folder, "sha256 mismatch.*modified or truncated")


def test_truncated_file_with_forged_checksum_refused_as_unreadable(saved):
    import hashlib

    _, folder = saved
    path = folder / "prompt.safetensors"
    data = path.read_bytes()[:-100]
    path.write_bytes(data)
    edit_meta(folder, sha256=hashlib.sha256(data).hexdigest())
    refused(folder, "not a readable safetensors file")


def test_one_flipped_byte_refused(saved):
    _, folder = saved
    path = folder / "prompt.safetensors"
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x01  # inside the tensor data: still parses, but the values changed
    path.write_bytes(bytes(data))
    refused(folder, "sha256 mismatch")


def test_tampered_meta_refused(saved):
    _, folder = saved
    edit_meta(folder, n_tokens=N_TOKENS + 3)
    refused(folder, "disagrees with meta.json")
    edit_meta(folder, n_tokens=N_TOKENS, sha256="0" * 64)
    refused(folder, "sha256 mismatch")
    edit_meta(folder, sha256=None)
    refused(folder, "'sha256' missing", file="meta.json")
    (folder / "meta.json").write_text('{"department": "hr", ')
    refused(folder, "not valid JSON", file="meta.json")
    (folder / "meta.json").write_text("[1, 2]")
    refused(folder, "expected a JSON object", file="meta.json")


@pytest.mark.parametrize("missing", ["prompt.safetensors", "meta.json"])
def test_missing_file_refused(saved, missing):
    _, folder = saved
    (folder / missing).unlink()
    refused(folder, "missing", file=missing)


def test_trained_for_another_base_model_refused(saved, fingerprint):
    _, folder = saved
    other = base_model_fingerprint(build_llama(seed=7))
    assert other != fingerprint
    refused(folder, "trained for another base model", file="meta.json", base_fingerprint=other)
    assert SoftPrompt.load(folder, base_fingerprint=fingerprint) is not None


def test_extra_keys_refused(saved):
    _, folder = saved
    rewrite_tensor(folder, {"prompt": torch.randn(N_TOKENS, HIDDEN), "payload": torch.zeros(1)})
    refused(folder, r"unexpected extra tensor key\(s\) \['payload'\]")


def test_missing_key_refused(saved):
    _, folder = saved
    rewrite_tensor(folder, {"prompt_embeddings": torch.randn(N_TOKENS, HIDDEN)})
    refused(folder, "no tensor under key 'prompt'")


def test_pickle_is_never_loaded(saved):
    """A torch.save (pickle) file put in place of the safetensors file is refused, not run."""
    import hashlib
    import io

    _, folder = saved
    buf = io.BytesIO()
    torch.save({"prompt": torch.randn(N_TOKENS, HIDDEN)}, buf)
    (folder / "prompt.safetensors").write_bytes(buf.getvalue())
    edit_meta(folder, sha256=hashlib.sha256(buf.getvalue()).hexdigest())
    refused(folder, "not a readable safetensors file")


# --------------------------------------------------------------------------- base model identity


def test_base_model_fingerprint_is_model_fingerprint_memoised():
    model = build_llama(0)
    fp = base_model_fingerprint(model)
    assert fp == model_fingerprint(model)
    assert fp == base_model_fingerprint(build_llama(0))  # same weights, same fingerprint
    assert fp != base_model_fingerprint(build_llama(1))
    # Memoised on the object: the frozen model is hashed once, later calls reuse the value.
    with torch.no_grad():
        model.get_input_embeddings().weight[0, 0] += 1.0
    assert base_model_fingerprint(model) == fp
    assert model_fingerprint(model) != fp


# --------------------------------------------------------------------------- used by the generator


@torch.no_grad()
def _greedy_reference(model, prompt: torch.Tensor, ids: list[int], max_new: int) -> list[int]:
    """Greedy decoding from [prompt ; embed(ids)] with full forwards, no cache, no padding."""
    emb = model.get_input_embeddings()
    x = torch.cat([prompt, emb(torch.tensor(ids))])[None]
    out: list[int] = []
    for _ in range(max_new):
        t = int(model(inputs_embeds=x, use_cache=False).logits[0, -1].argmax())
        out.append(t)
        if t == 1:
            break
        x = torch.cat([x, emb(torch.tensor([[t]]))], dim=1)
    return out


def test_loaded_prompt_drives_the_generator(saved, tiny_llama, fingerprint):
    prompt, folder = saved
    tok = build_word_tokenizer()
    gen = Generator(tiny_llama, tok)
    loaded = SoftPrompt.load(folder, base_fingerprint=fingerprint, hidden_size=gen.hidden_size)
    rows = [tok("w5 w17 w42 w8", add_special_tokens=False)["input_ids"], [9, 10, 11]]
    with_prompt = gen.generate(rows, [loaded.tensor, None], max_new_tokens=8)
    assert with_prompt[0].prompt_tokens == 4 + N_TOKENS
    assert with_prompt[0].token_ids == _greedy_reference(tiny_llama, prompt.tensor, rows[0], 8)
    # The prompt changes what the model says: without it the same row continues differently.
    plain = gen.generate(rows[:1], max_new_tokens=8)
    assert plain[0].token_ids != with_prompt[0].token_ids


# --------------------------------------------------------------------------- deep prompts


def make_deep(fingerprint: str, depth: int = 2) -> SoftPrompt:
    g = torch.Generator().manual_seed(7)
    return SoftPrompt.create(torch.randn(depth, N_TOKENS, HIDDEN, generator=g), department="hr",
                             base_fingerprint=fingerprint, hyperparameters={"depth": depth})


def test_deep_prompt_round_trip_is_bit_exact_and_marked_format_2(tmp_path, fingerprint):
    deep = make_deep(fingerprint)
    assert (deep.depth, deep.n_tokens, deep.hidden_size) == (2, N_TOKENS, HIDDEN)
    deep.save(tmp_path / "d")
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert (meta["format_version"], meta["depth"], meta["n_tokens"], meta["hidden_size"]) == (2, 2, N_TOKENS, HIDDEN)
    loaded = SoftPrompt.load(tmp_path / "d", base_fingerprint=fingerprint, hidden_size=HIDDEN)
    assert torch.equal(loaded.tensor, deep.tensor) and loaded.depth == 2


def test_plain_prompts_stay_format_1_without_a_depth_field(saved):
    _, folder = saved
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["format_version"] == 1 and "depth" not in meta


def test_depth_one_deep_tensor_is_stored_as_a_plain_prompt(tmp_path, fingerprint):
    one = SoftPrompt.create(torch.randn(1, N_TOKENS, HIDDEN), department="hr", base_fingerprint=fingerprint)
    assert one.tensor.shape == (N_TOKENS, HIDDEN) and one.depth == 1 and one.meta["format_version"] == 1


def test_deep_prompt_with_its_depth_field_removed_is_refused(tmp_path, fingerprint):
    make_deep(fingerprint).save(tmp_path / "d")
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    del meta["depth"]
    (tmp_path / "d" / "meta.json").write_text(json.dumps(meta))
    refused(tmp_path / "d", r"shape \(2, 4, 64\) disagrees with meta.json \(4, 64\)")


def test_deep_prompt_claiming_format_1_is_refused(tmp_path, fingerprint):
    make_deep(fingerprint).save(tmp_path / "d")
    edit_meta(tmp_path / "d", format_version=1)
    refused(tmp_path / "d", "needs format_version 2", file="meta.json")


def test_deep_prompt_is_not_exported_to_peft_prompt_tuning(tmp_path, tiny_llama, fingerprint):
    from ragpt.softprompts.artifact import export_peft

    with pytest.raises(SoftPromptError, match="deep soft prompt"):
        export_peft(make_deep(fingerprint), tmp_path / "x", base_model_name_or_path=None,
                    model_config=tiny_llama.config)
    assert not (tmp_path / "x").exists()


def test_loaded_deep_prompt_drives_the_generator(tmp_path, tiny_llama, fingerprint):
    from ragpt.softprompts.deep import deep_from_shallow, deep_prompt_inputs

    tok = build_word_tokenizer()
    gen = Generator(tiny_llama, tok)
    plain = make_prompt(fingerprint)
    tensor = deep_from_shallow(tiny_llama, plain.tensor, 2)
    tensor[1] = tensor[1].flip(0)  # layer 1 sees the prompt positions' inputs in reverse order
    SoftPrompt.create(tensor, department="hr", base_fingerprint=fingerprint).save(tmp_path / "d")
    loaded = SoftPrompt.load(tmp_path / "d", base_fingerprint=fingerprint, hidden_size=gen.hidden_size,
                             max_depth=2)
    row = tok("w5 w17 w42 w8", add_special_tokens=False)["input_ids"]
    with deep_prompt_inputs(tiny_llama, tensor):  # the reference decodes with the layer inputs replaced
        expected = _greedy_reference(tiny_llama, tensor[0], row, 8)
    got = gen.generate([row], [loaded.tensor], max_new_tokens=8)[0].token_ids
    assert got == expected
    assert got != gen.generate([row], [plain.tensor], max_new_tokens=8)[0].token_ids  # slice 1 mattered


def test_deep_prompt_deeper_than_the_model_is_refused_on_load(tmp_path, fingerprint):
    make_deep(fingerprint, depth=3).save(tmp_path / "d")
    refused(tmp_path / "d", "depth 3, but the model has 2 layers", max_depth=2)


def test_meta_without_format_version_is_read_as_format_1(tmp_path, fingerprint):
    make_deep(fingerprint).save(tmp_path / "d")
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    del meta["format_version"]
    (tmp_path / "d" / "meta.json").write_text(json.dumps(meta))
    refused(tmp_path / "d", "needs format_version 2", file="meta.json")
