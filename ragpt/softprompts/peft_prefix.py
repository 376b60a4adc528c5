"""Export any soft prompt, plain or deep, as a PEFT prefix-tuning adapter.

PEFT's prompt tuning holds only input embeddings, so a deep prompt has no prompt-tuning form.
What any soft prompt does to the frozen model is fully described by the keys and values it
leaves in every layer's cache at positions 0..n-1, and that is exactly what a PEFT
prefix-tuning adapter (P-tuning v2, no projection) stores: `prompt_embeddings` of shape
(n_tokens, layers x 2 x kv_heads x head_dim), per token [layer 0 keys, layer 0 values, layer 1
keys, ...]. PEFT then runs the user's tokens at positions n.., as ragpt serves them, so
`PeftModel.from_pretrained` gives the same logits (tested). The keys are taken after RoPE, as
PEFT inserts its prefix into the cache as is.

The export needs the base model itself (the prefix is computed), and is one-way: keys and
values cannot be turned back into prompt inputs, so `import` takes prompt-tuning adapters only.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save as st_save

from ragpt.atomic import atomic_write_bytes, atomic_write_json
from ragpt.errors import SoftPromptError
from ragpt.lm.generator import prompt_kv
from ragpt.softprompts.artifact import PEFT_CONFIG_FILE, PEFT_KEY, PEFT_WEIGHTS_FILE, SoftPrompt, base_model_fingerprint


def prefix_embeddings(model, prompt: torch.Tensor) -> torch.Tensor:
    """(n_tokens, layers * 2 * kv_heads * head_dim) in PEFT's prefix layout, computed in float32."""
    keys, values = prompt_kv(model, prompt.float())
    parts = []
    for k, v in zip(keys, values):  # each (1, kv_heads, n, head_dim) -> (n, kv_heads * head_dim)
        parts += [k[0].permute(1, 0, 2).reshape(k.shape[2], -1), v[0].permute(1, 0, 2).reshape(v.shape[2], -1)]
    return torch.cat(parts, dim=1).float().contiguous()


def export_peft_prefix(prompt: SoftPrompt, folder: Path | str, *, model, base_model_name_or_path: str | None) -> Path:
    """Write `prompt` as a PEFT prefix-tuning adapter for `model` (the float32 base model it was
    trained on: checked by fingerprint). The keys are those peft 0.21's PrefixTuningConfig
    writes, minus peft_version."""
    folder = Path(folder)
    if model.get_input_embeddings().weight.dtype != torch.float32:
        raise SoftPromptError("export the prefix from the float32 base model, not a reduced-precision copy")
    if prompt.base_fingerprint != base_model_fingerprint(model):
        raise SoftPromptError(
            f"{prompt.department} {prompt.version}: trained for another base model than the one given "
            "(fingerprints differ); the exported keys and values would mean nothing"
        )
    if prompt.hidden_size != model.get_input_embeddings().weight.shape[1]:
        raise SoftPromptError(f"soft prompt hidden size {prompt.hidden_size} does not match the model's")
    emb = prefix_embeddings(model, prompt.tensor)
    cfg = model.config
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    layers = cfg.num_hidden_layers
    token_dim = emb.shape[1] // (2 * layers)
    config = {
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "encoder_hidden_size": token_dim,
        "inference_mode": True,
        "init_weights": None,
        "modules_to_save": None,
        "num_attention_heads": int(kv_heads),
        "num_layers": int(layers),
        "num_transformer_submodules": 1,
        "num_virtual_tokens": prompt.n_tokens,
        "peft_type": "PREFIX_TUNING",
        "prefix_projection": False,
        "revision": None,
        "task_type": "CAUSAL_LM",
        "token_dim": int(token_dim),
    }
    header = {"format": "pt", "ragpt_meta": json.dumps(prompt.meta, sort_keys=True, default=str)}
    atomic_write_bytes(folder / PEFT_WEIGHTS_FILE, st_save({PEFT_KEY: emb}, metadata=header))
    atomic_write_json(folder / PEFT_CONFIG_FILE, config)
    return folder
