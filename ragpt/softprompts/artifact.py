"""Soft prompts as governed artifacts: a safetensors tensor plus JSON metadata, validated on load.

A soft prompt is an (n_tokens x hidden_size) float tensor that the generator prepends to a
row's input embeddings, or a deep prompt (depth x n_tokens x hidden_size, `ragpt.softprompts.deep`)
that also sets the inputs of the first `depth` decoder layers at those positions. Plain
prompts are written as format_version 1 (unchanged); deep ones as 2, with a "depth" field,
so an older ragpt refuses them by name instead of misreading them. On disk a prompt is a folder:

    prompt.safetensors   one tensor under the key "prompt" (safetensors: no pickle, ever)
    meta.json            department, version, base-model fingerprint, provenance, metrics,
                         and the sha256 of prompt.safetensors

    query_adapter.safetensors   optional: the department's query adapter
                         (ragpt.retrieval.query_adapter), its sha256 in meta.json's "query_adapter"

Other files (a loss curve, an eval report) may sit beside them; saving never touches them.
`load` refuses anything it cannot vouch for: a tampered or truncated file, a shape that
disagrees with the metadata or with the model, non-finite values, or a prompt trained for
another base model (its embeddings would mean nothing to this one).

PEFT interop (`export_peft` / `import_peft`) reads and writes the PEFT prompt-tuning format
(adapter_config.json + adapter_model.safetensors, key "prompt_embeddings") by hand, so peft
stays a dev-only dependency: its tests load our exports with peft itself.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ragpt.atomic import atomic_write_bytes, atomic_write_json
from ragpt.errors import PromptMismatchError, SoftPromptError
from ragpt.softprompts.audit_log import utc_now
from ragpt.softprompts.deep import prompt_depth

# meta.json is read and checked by the registry module, which imports no torch (listing versions
# reads every meta.json and must not pay for torch); the names stay importable from here.
from ragpt.softprompts.registry import ARTIFACT_FORMAT_VERSION, META_FILE, read_meta  # noqa: F401
from ragpt.softprompts.registry import read_json_object as _read_json_object

FORMAT = "ragpt.softprompts.artifact"
FORMAT_VERSION = ARTIFACT_FORMAT_VERSION  # the newest this code reads; plain prompts are still written as 1
TENSOR_FILE = "prompt.safetensors"
TENSOR_KEY = "prompt"
ADAPTER_FILE = "query_adapter.safetensors"

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_KEY = "prompt_embeddings"

# Half precisions are accepted on load (a prompt trained under autocast may be stored so);
# the tensor is always handed out as float32, which is what the frozen model computes in.
ALLOWED_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_NAMES = {v: k for k, v in ALLOWED_DTYPES.items()}


def _dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def _shape_fields(t: torch.Tensor) -> dict[str, Any]:
    """meta.json's description of a tensor: plain prompts keep format 1's fields exactly."""
    fields: dict[str, Any] = {"format_version": 1, "n_tokens": int(t.shape[-2]), "hidden_size": int(t.shape[-1])}
    if prompt_depth(t) > 1:
        fields.update(format_version=2, depth=prompt_depth(t))
    return fields


def _plain_if_shallow(t: torch.Tensor) -> torch.Tensor:
    """A (1 x n x hidden) deep prompt is a plain prompt: stored and served as one."""
    return t[0] if t.dim() == 3 and t.shape[0] == 1 else t


def _check_tensor(t: Any, where: str) -> torch.Tensor:
    """The checks every tensor passes, whether created in memory, loaded or imported."""
    if not isinstance(t, torch.Tensor):
        raise SoftPromptError(f"{where}: expected a tensor, got {type(t).__name__}")
    if t.dtype not in _DTYPE_NAMES:
        raise SoftPromptError(
            f"{where}: dtype {_dtype_name(t.dtype)} is not allowed (use one of "
            f"{', '.join(ALLOWED_DTYPES)})"
        )
    if t.dim() not in (2, 3) or any(d < 1 for d in t.shape):
        raise SoftPromptError(
            f"{where}: expected a 2-D (n_tokens x hidden_size) or, for a deep prompt, 3-D "
            f"(depth x n_tokens x hidden_size) tensor, got shape {tuple(t.shape)}"
        )
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise SoftPromptError(f"{where}: {bad} non-finite value(s) (NaN or inf)")
    return t


@dataclass
class SoftPrompt:
    """A soft-prompt tensor (float32, CPU) and its metadata (see `create` for the keys)."""

    tensor: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)
    # The query adapter trained with it (ragpt.retrieval.query_adapter.QueryAdapter), or None.
    query_adapter: Any = None

    # ------------------------------------------------------------------ properties
    @property
    def department(self) -> str:
        return self.meta["department"]

    @property
    def version(self) -> str | None:
        return self.meta.get("version")

    @property
    def n_tokens(self) -> int:
        return int(self.tensor.shape[-2])

    @property
    def hidden_size(self) -> int:
        return int(self.tensor.shape[-1])

    @property
    def depth(self) -> int:
        """1 for a plain prompt; the number of decoder layers a deep prompt sets."""
        return prompt_depth(self.tensor)

    @property
    def base_fingerprint(self) -> str:
        return self.meta["base_model_fingerprint"]

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(
        cls,
        tensor: torch.Tensor,
        *,
        department: str,
        base_fingerprint: str,
        embedder: str | None = None,
        index_manifest_sha256: str | None = None,
        training_data_sha256: str | None = None,
        hyperparameters: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
        author: str | None = None,
        extra: dict[str, Any] | None = None,
        contract: dict[str, Any] | None = None,
        query_adapter: Any = None,
    ) -> SoftPrompt:
        """A new, unregistered prompt (version None). The tensor is copied to float32 CPU.

        `contract` is the input contract its training inputs were built with (ragpt.serving.contract);
        serving applies it. Stored as given: this module does not interpret it."""
        t = _plain_if_shallow(_check_tensor(tensor.detach(), "soft prompt"))
        t = t.to(device="cpu", dtype=torch.float32).contiguous().clone()
        if not isinstance(department, str) or not department:
            raise SoftPromptError("department must be a non-empty string")
        if not isinstance(base_fingerprint, str) or not base_fingerprint:
            raise SoftPromptError("base_fingerprint must be a non-empty string")
        meta: dict[str, Any] = {
            "format": FORMAT,
            "department": department,
            "version": None,  # the registry assigns it
            **_shape_fields(t),
            "dtype": "float32",
            "base_model_fingerprint": base_fingerprint,
            "embedder": embedder,
            "index_manifest_sha256": index_manifest_sha256,
            "training_data_sha256": training_data_sha256,
            "hyperparameters": dict(hyperparameters or {}),
            **({"contract": dict(contract)} if contract else {}),
            "metrics": dict(metrics or {}),
            "author": author,
            "created": utc_now(),
            "extra": dict(extra or {}),
        }
        return cls(tensor=t, meta=meta, query_adapter=query_adapter)

    # ------------------------------------------------------------------ disk
    def save(self, folder: Path | str) -> Path:
        """Write prompt.safetensors then meta.json (with the tensor file's sha256), atomically each.

        The tensor is written first: a crash between the two leaves a checksum mismatch that
        `load` reports, never a prompt that loads with stale metadata. `self.meta` is replaced
        by what was written (it gains "sha256").
        """
        folder = Path(folder)
        t = _plain_if_shallow(_check_tensor(self.tensor, "soft prompt"))
        t = t.detach().to(device="cpu", dtype=torch.float32).contiguous()
        data = st_save({TENSOR_KEY: t}, metadata={"format": "pt"})
        meta = {k: v for k, v in self.meta.items() if k not in ("depth", "query_adapter")}
        meta.update(format=FORMAT, **_shape_fields(t), dtype="float32", sha256=hashlib.sha256(data).hexdigest())
        if self.query_adapter is None and _contract_uses_adapter(meta):
            raise SoftPromptError("the prompt's input contract uses a query adapter, but it has none")
        if self.query_adapter is not None:
            adapter = self.query_adapter.to_bytes()
            meta["query_adapter"] = {"file": ADAPTER_FILE, "sha256": hashlib.sha256(adapter).hexdigest(),
                                     "dim": self.query_adapter.dim,
                                     "embedder": _embedder_name(meta.get("embedder"))}
            atomic_write_bytes(folder / ADAPTER_FILE, adapter)
        atomic_write_bytes(folder / TENSOR_FILE, data)
        atomic_write_json(folder / META_FILE, meta)
        self.meta = meta
        return folder

    @classmethod
    def load(
        cls,
        folder: Path | str,
        *,
        base_fingerprint: str | None = None,
        hidden_size: int | None = None,
        max_depth: int | None = None,
    ) -> SoftPrompt:
        """Read and validate a prompt folder; every failure is a SoftPromptError naming the file.

        `hidden_size` and `max_depth` (the model's decoder layer count) check it fits the model."""
        folder = Path(folder)
        meta = read_meta(folder)
        meta_path = folder / META_FILE
        tensor_path = folder / TENSOR_FILE

        if base_fingerprint is not None and meta["base_model_fingerprint"] != base_fingerprint:
            raise PromptMismatchError(
                f"{meta_path}: trained for another base model (fingerprint "
                f"{str(meta['base_model_fingerprint'])[:12]}..., this model is "
                f"{base_fingerprint[:12]}...)"
            )
        if not tensor_path.is_file():
            raise SoftPromptError(f"{tensor_path}: missing")
        data = tensor_path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest != meta["sha256"]:
            raise SoftPromptError(
                f"{tensor_path}: sha256 mismatch (file {digest[:12]}..., meta.json says "
                f"{str(meta['sha256'])[:12]}...): the file was modified or truncated"
            )
        t = _read_single_tensor(data, tensor_path, TENSOR_KEY)
        want_dtype = meta.get("dtype", "float32")
        if _dtype_name(t.dtype) != want_dtype:
            raise SoftPromptError(
                f"{tensor_path}: dtype {_dtype_name(t.dtype)} disagrees with meta.json ({want_dtype})"
            )
        depth = meta.get("depth", 1)
        want_shape = (meta["n_tokens"], meta["hidden_size"])
        if depth > 1:
            want_shape = (depth, *want_shape)
        if tuple(t.shape) != want_shape:
            raise SoftPromptError(
                f"{tensor_path}: shape {tuple(t.shape)} disagrees with meta.json {want_shape}"
            )
        if hidden_size is not None and t.shape[-1] != hidden_size:
            raise PromptMismatchError(
                f"{tensor_path}: hidden size {t.shape[-1]} does not match the model's {hidden_size}"
            )
        if max_depth is not None and depth > max_depth:
            raise PromptMismatchError(
                f"{tensor_path}: deep prompt of depth {depth}, but the model has {max_depth} layers")
        t = _check_tensor(t, str(tensor_path))
        return cls(tensor=t.to(torch.float32).contiguous(), meta=meta, query_adapter=_load_adapter(folder, meta))


def _embedder_name(embedder: Any) -> str | None:
    """meta.json's "embedder": {"name", "dim"} as `ragpt train` writes it, or a bare name."""
    return embedder.get("name") if isinstance(embedder, dict) else embedder


def _contract_uses_adapter(meta: dict[str, Any]) -> bool:
    contract = meta.get("contract")
    return isinstance(contract, dict) and contract.get("query_adapter") is True


def _load_adapter(folder: Path, meta: dict[str, Any]) -> Any:
    """The version's query adapter, checked against the sha256 in meta.json; None without one."""
    info = meta.get("query_adapter")
    if info is None:
        if _contract_uses_adapter(meta):
            raise SoftPromptError(f"{folder / META_FILE}: the input contract uses a query adapter, but the "
                                  "version has none")
        return None
    from ragpt.retrieval.query_adapter import QueryAdapter, QueryAdapterError

    path = folder / ADAPTER_FILE
    if not isinstance(info, dict) or not isinstance(info.get("sha256"), str):
        raise SoftPromptError(f"{folder / META_FILE}: field 'query_adapter' is not an object with a sha256")
    if not path.is_file():
        raise SoftPromptError(f"{path}: missing")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != info["sha256"]:
        raise SoftPromptError(f"{path}: sha256 mismatch with meta.json: the file was modified or truncated")
    try:
        adapter = QueryAdapter.from_bytes(data, str(path))
    except QueryAdapterError as e:
        raise SoftPromptError(str(e)) from None
    if adapter.dim != info.get("dim"):
        raise SoftPromptError(f"{path}: {adapter.dim} dimensions, meta.json says {info.get('dim')}")
    return adapter


def _read_single_tensor(data: bytes, path: Path, key: str) -> torch.Tensor:
    """Parse safetensors bytes that must hold exactly one tensor under `key`."""
    try:
        tensors = st_load(data)
    except Exception as e:  # safetensors raises SafetensorError and others for bad headers
        raise SoftPromptError(f"{path}: not a readable safetensors file ({e})") from e
    if key not in tensors:
        raise SoftPromptError(f"{path}: no tensor under key {key!r} (found {sorted(tensors)})")
    if len(tensors) != 1:
        others = sorted(k for k in tensors if k != key)
        raise SoftPromptError(f"{path}: unexpected extra tensor key(s) {others}")
    t = tensors[key]
    if t.dtype not in _DTYPE_NAMES:
        raise SoftPromptError(
            f"{path}: dtype {_dtype_name(t.dtype)} is not allowed (use one of "
            f"{', '.join(ALLOWED_DTYPES)})"
        )
    return t


# --------------------------------------------------------------------------- base model identity

_FINGERPRINT_ATTR = "_ragpt_base_fingerprint"


def base_model_fingerprint(model: torch.nn.Module) -> str:
    """`models.model_fingerprint`, memoised on the model: hashing every weight takes ~0.5 s.

    Memoising is sound because the base model is frozen (DESIGN principle 2): its weights
    never change after loading.
    """
    fp = model.__dict__.get(_FINGERPRINT_ATTR)
    if fp is None:
        from ragpt.lm.models import model_fingerprint

        fp = model_fingerprint(model)
        model.__dict__[_FINGERPRINT_ATTR] = fp
    return fp


# --------------------------------------------------------------------------- PEFT interop


def _config_value(model_config: Any, *names: str) -> Any:
    """First of `names` found on a transformers config (attribute) or its dict form.

    Mirrors peft's own lookup (_prepare_prompt_learning_config), including the text_config
    of multimodal models.
    """
    d = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
    if isinstance(d.get("text_config"), dict):
        d = d["text_config"]
    for name in names:
        v = getattr(model_config, name, None) if not isinstance(model_config, dict) else None
        if v is None:
            v = d.get(name)
        if v is not None:
            return v
    return None


def export_peft(
    prompt: SoftPrompt,
    folder: Path | str,
    *,
    base_model_name_or_path: str | None,
    model_config: Any,
) -> Path:
    """Write `prompt` as a PEFT prompt-tuning adapter that `PeftModel.from_pretrained` loads.

    `model_config` is the base model's transformers config (or its dict). The keys are those
    peft 0.21's PromptTuningConfig.save_pretrained writes, minus peft_version (peft fills it).
    """
    folder = Path(folder)
    t = _plain_if_shallow(_check_tensor(prompt.tensor, "soft prompt")).detach().to("cpu", torch.float32).contiguous()
    if t.dim() == 3:
        raise SoftPromptError(
            f"a deep soft prompt (depth {t.shape[0]}) has no PEFT prompt-tuning equivalent: PEFT's "
            "prompt tuning learns only the input embeddings. Export it as a prefix-tuning adapter "
            "(ragpt.softprompts.peft_prefix, `ragpt prompts export --peft-type prefix-tuning`)"
        )
    model_hidden = _config_value(model_config, "hidden_size", "n_embd", "d_model")
    if model_hidden is not None and int(model_hidden) != t.shape[1]:
        raise SoftPromptError(
            f"soft prompt hidden size {t.shape[1]} does not match the model config's {model_hidden}"
        )
    config = {
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "modules_to_save": None,
        "num_attention_heads": _config_value(model_config, "num_attention_heads", "n_head",
                                             "num_heads"),
        "num_layers": _config_value(model_config, "num_hidden_layers", "num_layers", "n_layer"),
        "num_transformer_submodules": 1,
        "num_virtual_tokens": int(t.shape[0]),
        "peft_type": "PROMPT_TUNING",
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None,
        "revision": None,
        "task_type": "CAUSAL_LM",
        "token_dim": int(t.shape[1]),
        "tokenizer_kwargs": None,
        "tokenizer_name_or_path": None,
    }
    # Provenance travels in the safetensors header (string -> string), invisible to peft.
    header = {"format": "pt", "ragpt_meta": json.dumps(prompt.meta, sort_keys=True, default=str)}
    atomic_write_bytes(folder / PEFT_WEIGHTS_FILE, st_save({PEFT_KEY: t}, metadata=header))
    atomic_write_json(folder / PEFT_CONFIG_FILE, config)
    return folder


def import_peft(
    folder: Path | str,
    *,
    department: str,
    base_fingerprint: str,
    author: str | None = None,
    hidden_size: int | None = None,
) -> SoftPrompt:
    """A SoftPrompt (unregistered) from a PEFT prompt-tuning adapter folder, validated.

    PEFT's format carries no base-model fingerprint, so the caller vouches for it: pass the
    fingerprint of the model the adapter was trained on (and `hidden_size` to check the shape).
    """
    folder = Path(folder)
    cfg_path = folder / PEFT_CONFIG_FILE
    w_path = folder / PEFT_WEIGHTS_FILE
    cfg = _read_json_object(cfg_path)
    if cfg.get("peft_type") == "PREFIX_TUNING":
        raise SoftPromptError(
            f"{cfg_path}: a prefix-tuning adapter holds each layer's keys and values, which cannot be "
            "turned back into a soft prompt; only PROMPT_TUNING adapters are imported"
        )
    if cfg.get("peft_type") != "PROMPT_TUNING":
        raise SoftPromptError(
            f"{cfg_path}: peft_type is {cfg.get('peft_type')!r}, only PROMPT_TUNING is supported"
        )
    if cfg.get("task_type") not in (None, "CAUSAL_LM"):
        raise SoftPromptError(f"{cfg_path}: task_type {cfg['task_type']!r} is not CAUSAL_LM")
    if cfg.get("num_transformer_submodules") not in (None, 1):
        raise SoftPromptError(
            f"{cfg_path}: num_transformer_submodules {cfg['num_transformer_submodules']} "
            "(encoder-decoder prompts are not supported)"
        )
    n_virtual, token_dim = cfg.get("num_virtual_tokens"), cfg.get("token_dim")
    for name, v in (("num_virtual_tokens", n_virtual), ("token_dim", token_dim)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise SoftPromptError(f"{cfg_path}: {name} missing or not a positive integer")
    if hidden_size is not None and token_dim != hidden_size:
        raise SoftPromptError(
            f"{cfg_path}: token_dim {token_dim} does not match the model's hidden size {hidden_size}"
        )
    if not w_path.is_file():
        hint = " (adapter_model.bin is pickle and is never loaded)" if (
            folder / "adapter_model.bin").exists() else ""
        raise SoftPromptError(f"{w_path}: missing{hint}")
    data = w_path.read_bytes()
    t = _read_single_tensor(data, w_path, PEFT_KEY)
    if tuple(t.shape) != (n_virtual, token_dim):
        raise SoftPromptError(
            f"{w_path}: shape {tuple(t.shape)} disagrees with adapter_config.json "
            f"({n_virtual}, {token_dim})"
        )
    t = _check_tensor(t, str(w_path))
    return SoftPrompt.create(
        t, department=department, base_fingerprint=base_fingerprint, author=author,
        extra={
            "imported_from": "peft",
            "peft_base_model_name_or_path": cfg.get("base_model_name_or_path"),
            "peft_version": cfg.get("peft_version"),
            "peft_weights_sha256": hashlib.sha256(data).hexdigest(),
        },
    )


def tensor_comparison(a: torch.Tensor, b: torch.Tensor) -> dict[str, Any]:
    """Numbers a reviewer wants when comparing two prompts: norms, distance, per-token cosine."""
    a, b = a.detach().float(), b.detach().float()  # plain or deep: token vectors are the last dim
    out: dict[str, Any] = {
        "shape_a": list(a.shape), "shape_b": list(b.shape),
        "same_shape": a.shape == b.shape,
        "norm_a": float(a.norm()), "norm_b": float(b.norm()),
        "l2_distance": None, "mean_token_cosine": None, "max_abs_difference": None,
    }
    if a.shape == b.shape:
        out["l2_distance"] = float((a - b).norm())
        out["max_abs_difference"] = float((a - b).abs().max())
        cos = torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12)
        out["mean_token_cosine"] = float(cos.mean())
    # JSON has no NaN; a zero-norm token would give one.
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}
