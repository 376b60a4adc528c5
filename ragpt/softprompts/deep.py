"""Deep soft prompts: a learned input for the prompt positions of every decoder layer.

A plain soft prompt is (n_tokens x hidden): vectors at the prompt positions of the input
embeddings. A deep prompt is (depth x n_tokens x hidden): slice 0 is that input, and slice l
(1 <= l < depth) *replaces* the hidden states at the prompt positions where they enter decoder
layer l. Every layer then attends to keys and values of the department's own choosing, as in
P-tuning v2 / deep prompt tuning, which is where small models gain most over input-only
prompts (Liu et al., 2022). Unlike prefix tuning it needs no attention change: the prompt
positions stay ordinary positions 0..n-1, so the trainer's mask-free chunked attention and
the generator's prefix KV cache work unchanged.

`deep_from_shallow` initialises the deeper slices with the hidden states a plain prompt
produces there, so a fresh deep prompt computes exactly what its plain prompt does and
training starts from the same function, with more freedom.

The replacement runs in forward pre-hooks installed once per decoder layer. They act only
inside `deep_prompt_inputs(...)` and only in the thread that entered it (a thread-local
table), so a serving thread generating with the same model is never affected. (Gradient
checkpointing would re-run layers after the block has exited, without the replacement; the
trainer does not use it.)
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

from ragpt.errors import SoftPromptError

_ACTIVE = threading.local()  # .table: {id(decoder layer): (deep prompt, layer index)}
_HOOKED = "_ragpt_deep_prompt_hook"


def prompt_depth(prompt: torch.Tensor) -> int:
    """1 for a plain (n x hidden) prompt, the first dimension for a deep one."""
    return 1 if prompt.dim() == 2 else int(prompt.shape[0])


def prompt_tokens(prompt: torch.Tensor | None) -> int:
    """Positions a prompt occupies (plain or deep)."""
    return 0 if prompt is None else int(prompt.shape[-2])


def input_slice(prompt: torch.Tensor) -> torch.Tensor:
    """The part that goes in as input embeddings: the prompt itself, or a deep prompt's slice 0."""
    return prompt if prompt.dim() == 2 else prompt[0]


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layers of a transformers causal LM (Llama-style `model.model.layers`)."""
    base = getattr(model, "base_model", model)
    layers = getattr(base, "layers", None)
    if layers is None and hasattr(base, "model"):
        layers = getattr(base.model, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise SoftPromptError(f"deep prompts need a decoder with a `layers` list; {type(model).__name__} has none")
    return layers


def _replace_prompt_positions(layer, args, kwargs):
    entry = getattr(_ACTIVE, "table", {}).get(id(layer))
    if entry is None:
        return None
    deep, index = entry
    if args:
        hidden, rest = args[0], args[1:]
    else:
        hidden, rest = kwargs.pop("hidden_states"), ()
    n = deep.shape[1]
    if hidden.shape[1] < n:
        raise SoftPromptError(f"deep prompt of {n} positions, but the layer input has only {hidden.shape[1]}")
    p = deep[index].to(hidden).unsqueeze(0).expand(hidden.shape[0], -1, -1)
    hidden = torch.cat([p, hidden[:, n:]], dim=1)  # cat, not in-place: gradients reach the prompt
    if args:
        return (hidden, *rest), kwargs
    kwargs["hidden_states"] = hidden
    return args, kwargs


_INSTALL_LOCK = threading.Lock()


def _install(layers: torch.nn.ModuleList) -> None:
    with _INSTALL_LOCK:  # two threads must not hook a layer twice
        for layer in layers:
            if not getattr(layer, _HOOKED, False):
                layer.register_forward_pre_hook(_replace_prompt_positions, with_kwargs=True)
                setattr(layer, _HOOKED, True)


@contextlib.contextmanager
def deep_prompt_inputs(model, deep: torch.Tensor | None) -> Iterator[None]:
    """Within the block, forwards of `model` in this thread take `deep[l]` as the input of
    decoder layer l (1 <= l < depth) at positions 0..n-1 of every row. The caller puts `deep[0]`
    in the input embeddings. A plain prompt or None: nothing to do."""
    if deep is None or deep.dim() == 2 or deep.shape[0] == 1:
        yield
        return
    layers = decoder_layers(model)
    if deep.shape[0] > len(layers):
        raise SoftPromptError(f"deep prompt of depth {deep.shape[0]}, but the model has {len(layers)} layers")
    _install(layers)
    table = getattr(_ACTIVE, "table", None)
    if table is None:
        table = _ACTIVE.table = {}
    mine = {id(layers[i]): (deep, i) for i in range(1, deep.shape[0])}
    clash = set(mine) & set(table)
    if clash:
        raise SoftPromptError("deep_prompt_inputs is already active for this model in this thread")
    table.update(mine)
    try:
        yield
    finally:
        for key in mine:
            table.pop(key, None)


@torch.no_grad()
def deep_from_shallow(model, shallow: torch.Tensor, depth: int) -> torch.Tensor:
    """(depth x n x hidden): `shallow` and the inputs it produces at decoder layers 1..depth-1.

    A deep prompt made so computes exactly what `shallow` computes (tested), so training a
    deep prompt starts from its plain prompt's function.
    """
    layers = decoder_layers(model)
    if not 1 <= depth <= len(layers):
        raise SoftPromptError(f"depth must be between 1 and the model's {len(layers)} layers, got {depth}")
    if shallow.dim() != 2:
        raise SoftPromptError(f"expected a plain (n x hidden) prompt to deepen, got shape {tuple(shallow.shape)}")
    weight = model.get_input_embeddings().weight
    captured: dict[int, torch.Tensor] = {}

    def capture(index):
        def hook(_layer, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            captured[index] = hidden[0].detach().float().clone()
        return hook

    handles = [layers[i].register_forward_pre_hook(capture(i), with_kwargs=True) for i in range(1, depth)]
    try:
        n = shallow.shape[0]
        x = shallow.to(device=weight.device, dtype=weight.dtype)[None]
        model(inputs_embeds=x, attention_mask=torch.ones((1, n), dtype=torch.long, device=weight.device),
              position_ids=torch.arange(n, device=weight.device)[None], use_cache=False, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    return torch.stack([shallow.detach().float().cpu()] + [captured[i].cpu() for i in range(1, depth)])
