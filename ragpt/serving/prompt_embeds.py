"""A request's whole input as embeddings, for an engine that takes prompt embeddings (vLLM).

ragpt feeds its model `[soft prompt ; token embeddings]`: the soft prompt's n vectors at
positions 0..n-1, then the embeddings of the prepared token ids at positions n.. (one row of
`Generator.embed_rows`). An engine that accepts a prompt as a (positions x hidden) tensor of
input embeddings, such as vLLM with `--enable-prompt-embeds`, computes exactly what ragpt does
when it is given that tensor, so a plain soft prompt can be served there unchanged:

    from ragpt.serving.prompt_embeds import build_prompt_embeds
    pe = build_prompt_embeds(pipeline, ChatRequest("How many vacation days?", "hr"))
    body = pe.completion_body()        # POST to vLLM's /v1/completions (prompt_embeds: base64)
    citations = pe.prepared.citations  # what the answer may cite, from ragpt's retrieval

The input is built by the one request path (`ragpt.serving.request.prepare`: the version and its
input contract, retrieval inside the department, the budgets, the template), so the tensor holds
exactly what ragpt would have fed its own model for the same request.

vLLM's OpenAI-compatible server reads `prompt_embeds` as base64 of a `torch.save`d tensor and
loads it with `torch.load(..., weights_only=True)` (vllm/entrypoints/renderer.py,
`BaseRenderer.load_prompt_embeds`); `encode_prompt_embeds` writes that form, and
`decode_prompt_embeds` reads it back the same safe way (never pickle).

A deep prompt cannot go this way: its slices 1..depth-1 replace hidden states inside the model
(`ragpt.softprompts.deep`), and an input-embeddings tensor carries only slice 0. Building one is
a `DeepPromptEmbedsError` saying what to do instead (docs/scale-out.md).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ragpt.errors import SoftPromptError
from ragpt.serving.request import ChatRequest, PreparedRequest, prepare
from ragpt.softprompts.deep import input_slice, prompt_depth

if TYPE_CHECKING:
    from ragpt.lm.generator import Generator
    from ragpt.serving.pipeline import Pipeline

__all__ = ["DTYPES", "DeepPromptEmbedsError", "PromptEmbeds", "build_prompt_embeds", "decode_prompt_embeds",
           "encode_prompt_embeds", "prompt_embeds_tensor"]

# The dtypes vLLM's loader accepts (it casts to the model's dtype itself).
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAFETENSORS_KEY = "prompt_embeds"


class DeepPromptEmbedsError(SoftPromptError):
    """The request's soft prompt is a deep prompt: input embeddings cannot carry it."""


def _check_plain(prepared: PreparedRequest) -> torch.Tensor | None:
    sp = prepared.soft_prompt
    if sp is None or prompt_depth(sp) == 1:
        return None if sp is None else input_slice(sp)  # a (1 x n x hidden) deep prompt is a plain one
    label = f"{prepared.department} {prepared.prompt_version or 'soft prompt'}"
    raise DeepPromptEmbedsError(
        f"{label} is a deep prompt ({prompt_depth(sp)} layers x {int(sp.shape[-2])} positions): its layers "
        f"1..{prompt_depth(sp) - 1} replace hidden states inside the model, which prompt embeddings cannot "
        f"carry. Serve it with ragpt, use a plain version or '{prepared.department}@none', or export its "
        "per-layer keys and values (`ragpt prompts export`) for an engine that loads KV prefixes "
        "(docs/scale-out.md)"
    )


def prompt_embeds_tensor(generator: Generator, prepared: PreparedRequest, *,
                         dtype: torch.dtype | str | None = None) -> torch.Tensor:
    """(soft-prompt positions + prompt tokens, hidden): a prepared row as ragpt feeds its model.

    `dtype` defaults to the generator's embedding dtype (what ragpt computes with). The layout is
    `Generator.embed_rows` of the one row, so it cannot drift from the generator's own."""
    soft = _check_plain(prepared)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise SoftPromptError(f"prompt-embeds dtype must be one of {', '.join(DTYPES)}, not {dtype[:32]!r}")
        dtype = DTYPES[dtype]
    with torch.inference_mode():
        x, _, lengths = generator.embed_rows([prepared.ids], [soft])
    # One row has no padding. clone(): torch.save writes a view's whole storage, and the row must
    # not pin (or leak) the batch buffer it came from.
    row = x[0, x.shape[1] - lengths[0]:]
    return row.detach().to(device="cpu", dtype=dtype or row.dtype).clone()


@dataclass
class PromptEmbeds:
    """A request's input as embeddings, with the prepared request it was built from."""

    tensor: torch.Tensor  # (positions, hidden): soft prompt, then the prompt's token embeddings
    prepared: PreparedRequest  # department, version, contract, citations, token ids, max_new_tokens
    stop_token_ids: list[int]  # the generator's stop tokens, for the engine to stop where ragpt does

    @property
    def soft_prompt_tokens(self) -> int:
        sp = self.prepared.soft_prompt
        return 0 if sp is None else int(sp.shape[-2])

    @property
    def prompt_tokens(self) -> int:
        """Positions of the input (soft prompt included), what an answer's usage counts."""
        return int(self.tensor.shape[0])

    def encoded(self) -> str:
        return encode_prompt_embeds(self.tensor)

    def completion_body(self, model: str | None = None) -> dict[str, Any]:
        """A body for vLLM's OpenAI-compatible `POST /v1/completions` (server started with
        `--enable-prompt-embeds`). `prompt` is "" because the OpenAI client requires one; vLLM
        then serves the embeddings alone. Without `model` vLLM answers with the model it serves."""
        p = self.prepared
        body: dict[str, Any] = {"prompt": "", "prompt_embeds": self.encoded(), "max_tokens": p.max_new_tokens,
                                "temperature": p.temperature, "stop_token_ids": self.stop_token_ids}
        if model is not None:
            body = {"model": model, **body}
        return body

    def metadata(self) -> dict[str, str]:
        """What the tensor is, as string metadata (safetensors header)."""
        p = self.prepared
        return {"department": p.department, "prompt_version": p.prompt_version or "none",
                "soft_prompt_tokens": str(self.soft_prompt_tokens), "max_new_tokens": str(p.max_new_tokens),
                "stop_token_ids": json.dumps(self.stop_token_ids), "contract": json.dumps(p.contract.to_dict()),
                "citations": json.dumps([[c.source, c.chunk] for c in p.citations], ensure_ascii=False)}

    def safetensors_bytes(self) -> bytes:
        """The tensor under "prompt_embeds" with `metadata()`: for offline `LLM.generate({"prompt_embeds": t})`."""
        from safetensors.torch import save

        return save({SAFETENSORS_KEY: self.tensor.contiguous()}, metadata=self.metadata())


def build_prompt_embeds(pipeline: Pipeline, request: ChatRequest, *,
                        dtype: torch.dtype | str | None = None) -> PromptEmbeds:
    """Prepare `request` with the one request path and return its input as embeddings.

    Raises what `prepare` raises (unknown department, question too long, ...) and
    `DeepPromptEmbedsError` when the request's prompt version is a deep prompt."""
    prepared = prepare(pipeline, request)
    gen = pipeline.generator
    return PromptEmbeds(prompt_embeds_tensor(gen, prepared, dtype=dtype), prepared, sorted(gen.stop_ids))


def encode_prompt_embeds(tensor: torch.Tensor) -> str:
    """Base64 of `torch.save(tensor)`: the form vLLM's `prompt_embeds` field takes."""
    if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided or tensor.dim() != 2:
        raise SoftPromptError("prompt embeddings must be a dense (positions x hidden) tensor")
    buf = io.BytesIO()
    torch.save(tensor.detach().cpu().contiguous().clone(), buf)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_prompt_embeds(data: str | bytes) -> torch.Tensor:
    """The tensor of an `encode_prompt_embeds` string, read with `torch.load(weights_only=True)`
    (no pickled code runs) and checked as vLLM checks it: one dense 2-D float tensor."""
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise SoftPromptError("prompt embeddings are not valid base64") from None
    try:
        tensor = torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - any unreadable payload is the same error to the caller
        raise SoftPromptError(f"prompt embeddings are not a torch.save'd tensor ({type(e).__name__})") from None
    # A sparse tensor would be densified to whatever size it declares (vLLM's CVE-2025-62164): refuse it.
    if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided or tensor.dim() != 2 \
            or tensor.dtype not in DTYPES.values():
        raise SoftPromptError("prompt embeddings must be one dense 2-D float32/bfloat16/float16 tensor")
    return tensor
