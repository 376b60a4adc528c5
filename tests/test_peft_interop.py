"""PEFT prompt-tuning interop, checked against peft itself (a dev dependency).

An exported prompt loaded by peft computes exactly what ragpt's generator computes
(logits of the frozen model on [prompt ; token embeddings]), and adapters saved by peft
import back to the identical tensor.
"""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from ragpt.errors import SoftPromptError  # noqa: E402
from ragpt.softprompts.artifact import SoftPrompt, base_model_fingerprint, export_peft, import_peft  # noqa: E402

peft = pytest.importorskip("peft")

HIDDEN = 64
N_TOKENS = 5
IDS = [[7, 21, 3, 55, 90, 12], [4, 4, 81, 16, 2, 33]]


def build_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=100, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    model.requires_grad_(False)
    return model


@pytest.fixture
def tiny_llama():
    # Function scope: PeftModel wraps (and may modify) the base model it is given.
    return build_llama(0)


@pytest.fixture
def prompt(tiny_llama) -> SoftPrompt:
    g = torch.Generator().manual_seed(3)
    return SoftPrompt.create(torch.randn(N_TOKENS, HIDDEN, generator=g), department="legal",
                             base_fingerprint=base_model_fingerprint(tiny_llama), author="bob")


@torch.no_grad()
def ragpt_logits(model, prompt: torch.Tensor, ids: list[list[int]]) -> torch.Tensor:
    """What ragpt's generator feeds the frozen model: [soft prompt ; embed(ids)] per row."""
    emb = model.get_input_embeddings()(torch.tensor(ids))
    x = torch.cat([prompt.expand(len(ids), -1, -1), emb], dim=1)
    return model(inputs_embeds=x).logits


def test_exported_prompt_loads_in_peft_and_computes_the_same_logits(tmp_path, tiny_llama, prompt):
    out = tmp_path / "peft-legal"
    export_peft(prompt, out, base_model_name_or_path="tiny-llama", model_config=tiny_llama.config)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "PROMPT_TUNING" and cfg["task_type"] == "CAUSAL_LM"
    assert (cfg["num_virtual_tokens"], cfg["token_dim"]) == (N_TOKENS, HIDDEN)
    assert (cfg["num_layers"], cfg["num_attention_heads"]) == (2, 4)
    assert set(load_file(out / "adapter_model.safetensors")) == {"prompt_embeddings"}

    expected = ragpt_logits(tiny_llama, prompt.tensor, IDS)
    peft_model = peft.PeftModel.from_pretrained(tiny_llama, str(out)).eval()
    with torch.no_grad():
        got = peft_model(input_ids=torch.tensor(IDS)).logits
    assert got.shape == expected.shape == (2, N_TOKENS + len(IDS[0]), 100)
    assert torch.allclose(got, expected, atol=1e-5)
    # Not trivially equal: a different prompt gives different logits.
    assert not torch.allclose(ragpt_logits(tiny_llama, prompt.tensor + 1.0, IDS), expected,
                              atol=1e-3)


def test_export_then_import_gives_back_the_identical_tensor(tmp_path, tiny_llama, prompt):
    out = tmp_path / "peft"
    export_peft(prompt, out, base_model_name_or_path=None, model_config=tiny_llama.config.to_dict())
    back = import_peft(out, department="legal", base_fingerprint=prompt.base_fingerprint,
                       author="carol", hidden_size=HIDDEN)
    assert torch.equal(back.tensor, prompt.tensor)
    assert (back.department, back.version, back.meta["author"]) == ("legal", None, "carol")
    assert back.meta["extra"]["imported_from"] == "peft"


def test_adapter_saved_by_peft_imports(tmp_path, tiny_llama):
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N_TOKENS)
    peft_model = peft.get_peft_model(tiny_llama, config)
    with torch.no_grad():  # give it trained-looking (non-initial) values
        peft_model.prompt_encoder["default"].embedding.weight.normal_(0, 2.0)
    peft_model.save_pretrained(str(tmp_path / "by-peft"))
    saved = load_file(tmp_path / "by-peft" / "adapter_model.safetensors")["prompt_embeddings"]

    base = build_llama(0)
    imported = import_peft(tmp_path / "by-peft", department="it",
                           base_fingerprint=base_model_fingerprint(base), hidden_size=HIDDEN)
    assert torch.equal(imported.tensor, saved)
    # ...and it steers the base model exactly as the PEFT model does.
    peft_model.eval()
    with torch.no_grad():
        want = peft_model(input_ids=torch.tensor(IDS)).logits
    assert torch.allclose(ragpt_logits(base, imported.tensor, IDS), want, atol=1e-5)


def _adapter(folder: Path, cfg_updates: dict | None = None, tensors: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": N_TOKENS,
           "token_dim": HIDDEN, "num_transformer_submodules": 1, **(cfg_updates or {})}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    if tensors is None:
        tensors = {"prompt_embeddings": torch.randn(N_TOKENS, HIDDEN)}
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


@pytest.mark.parametrize(
    ("cfg", "tensors", "file", "match"),
    [
        ({"peft_type": "LORA"}, None, "adapter_config.json", "only PROMPT_TUNING"),
        ({"token_dim": 32}, None, "adapter_config.json", "token_dim 32 does not match"),
        ({"num_virtual_tokens": None}, None, "adapter_config.json", "num_virtual_tokens"),
        ({"num_transformer_submodules": 2}, None, "adapter_config.json", "encoder-decoder"),
        ({}, {"prompt": torch.randn(N_TOKENS, HIDDEN)}, "adapter_model.safetensors",
         "no tensor under key 'prompt_embeddings'"),
        ({}, {"prompt_embeddings": torch.randn(N_TOKENS, HIDDEN), "x": torch.zeros(1)},
         "adapter_model.safetensors", "extra tensor key"),
        ({}, {"prompt_embeddings": torch.randn(N_TOKENS + 2, HIDDEN)},
         "adapter_model.safetensors", "disagrees with adapter_config.json"),
        ({}, {"prompt_embeddings": torch.full((N_TOKENS, HIDDEN), float("nan"))},
         "adapter_model.safetensors", "non-finite"),
    ],
)
def test_bad_adapters_refused(tmp_path, cfg, tensors, file, match):
    folder = _adapter(tmp_path / "a", cfg, tensors)
    with pytest.raises(SoftPromptError, match=match) as err:
        import_peft(folder, department="it", base_fingerprint="f" * 64, hidden_size=HIDDEN)
    assert str(folder / file) in str(err.value)


def test_pickled_adapter_is_not_loaded(tmp_path):
    folder = _adapter(tmp_path / "a")
    (folder / "adapter_model.safetensors").unlink()
    torch.save({"prompt_embeddings": torch.randn(N_TOKENS, HIDDEN)}, folder / "adapter_model.bin")
    with pytest.raises(SoftPromptError, match="pickle and is never loaded"):
        import_peft(folder, department="it", base_fingerprint="f" * 64)


def test_export_refuses_a_config_of_another_width(tmp_path, tiny_llama, prompt):
    cfg = tiny_llama.config.to_dict() | {"hidden_size": 128}
    with pytest.raises(SoftPromptError, match="hidden size 64 does not match"):
        export_peft(prompt, tmp_path / "x", base_model_name_or_path=None, model_config=cfg)
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- prefix tuning (deep prompts)


def _deep(model, seed: int = 4) -> torch.Tensor:
    """A deep prompt whose deeper slices differ from what its slice 0 would produce there."""
    from ragpt.softprompts.deep import deep_from_shallow

    g = torch.Generator().manual_seed(seed)
    deep = deep_from_shallow(model, torch.randn(N_TOKENS, HIDDEN, generator=g), 2)
    deep[1] = torch.randn(N_TOKENS, HIDDEN, generator=g) * deep[1].norm(dim=-1, keepdim=True) / HIDDEN ** 0.5
    return deep


@torch.no_grad()
def ragpt_deep_logits(model, deep: torch.Tensor, ids: list[list[int]]) -> torch.Tensor:
    """Logits at the token positions, with the deep prompt's layer inputs in place."""
    from ragpt.softprompts.deep import deep_prompt_inputs

    x = torch.cat([deep[0].expand(len(ids), -1, -1), model.get_input_embeddings()(torch.tensor(ids))], dim=1)
    with deep_prompt_inputs(model, deep):
        return model(inputs_embeds=x).logits[:, deep.shape[1]:]


@pytest.mark.parametrize("kind", ["deep", "plain"])
def test_prompt_exported_as_prefix_tuning_computes_the_same_logits_in_peft(tmp_path, tiny_llama, kind):
    from ragpt.softprompts.peft_prefix import export_peft_prefix

    fp = base_model_fingerprint(tiny_llama)
    tensor = _deep(tiny_llama) if kind == "deep" else torch.randn(N_TOKENS, HIDDEN)
    sp = SoftPrompt.create(tensor, department="legal", base_fingerprint=fp)
    export_peft_prefix(sp, tmp_path / "a", model=tiny_llama, base_model_name_or_path="tiny-llama")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["num_virtual_tokens"], cfg["num_layers"]) == ("PREFIX_TUNING", N_TOKENS, 2)
    # Two kv heads of 16 dims, keys and values, two layers.
    assert load_file(tmp_path / "a" / "adapter_model.safetensors")["prompt_embeddings"].shape == (N_TOKENS, 2 * 2 * 32)

    deep = sp.tensor if kind == "deep" else sp.tensor[None]
    expected = ragpt_deep_logits(tiny_llama, deep, IDS)
    peft_model = peft.PeftModel.from_pretrained(build_llama(0), str(tmp_path / "a")).eval()
    with torch.no_grad():
        got = peft_model(input_ids=torch.tensor(IDS)).logits
    assert got.shape == expected.shape == (2, len(IDS[0]), 100)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    if kind == "deep":  # the deeper slice matters: without it the logits differ
        assert not torch.allclose(ragpt_deep_logits(tiny_llama, deep[:1], IDS), expected, atol=1e-3)


def test_prefix_export_refuses_another_base_model(tmp_path, tiny_llama):
    from ragpt.softprompts.peft_prefix import export_peft_prefix

    sp = SoftPrompt.create(_deep(tiny_llama), department="legal", base_fingerprint="0" * 64)
    with pytest.raises(SoftPromptError, match="another base model"):
        export_peft_prefix(sp, tmp_path / "a", model=tiny_llama, base_model_name_or_path=None)
    assert not (tmp_path / "a").exists()


def test_prefix_tuning_adapter_is_not_imported(tmp_path, tiny_llama):
    from ragpt.softprompts.peft_prefix import export_peft_prefix

    sp = SoftPrompt.create(_deep(tiny_llama), department="legal", base_fingerprint=base_model_fingerprint(tiny_llama))
    export_peft_prefix(sp, tmp_path / "a", model=tiny_llama, base_model_name_or_path=None)
    with pytest.raises(SoftPromptError, match="cannot be turned back"):
        import_peft(tmp_path / "a", department="legal", base_fingerprint="f" * 64)
