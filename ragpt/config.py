"""Settings: defaults < config file (TOML) < environment (RAGPT_*) < explicit arguments (CLI flags).

The config file is `ragpt.toml` in the working directory, or the file named by RAGPT_CONFIG.
Every path the project uses outside itself (model cache, data) comes from here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from ragpt.errors import ConfigError

EMBEDDED_GENERATOR = "smollm2-135m-instruct"
EMBEDDED_EMBEDDER = "all-minilm-l6-v2"

# The input-contract defaults (ragpt.serving.contract), defined once, here: what a request without
# a prompt version is built with, and what training and evaluation start from. A trained prompt
# records its own values and is served with them.
CONTRACT_DEFAULTS: dict[str, Any] = {
    "k": 2, "max_context_tokens": 768, "max_question_tokens": 256, "max_history_tokens": 384,
    "dense": True, "bm25": True, "rrf_k": 60, "query_rule": "turns:4",
}

# The training recipe `ragpt train` starts from (ragpt.training.trainer.TrainConfig): the best
# measured on doc2dial, a deep prompt over every layer (depth 0) at lr 1e-2 for 80 steps.
TRAIN_DEFAULTS: dict[str, Any] = {"depth": 0, "steps": 80, "lr": 1e-2, "dev_fraction": 0.15, "dev_max": 200}

# How a new index cuts documents (ragpt.data.ingest), defined once, here: chunk size and overlap in
# embedder tokens (200 fits MiniLM's 256-token window) and the splitter. An index records its own
# when it is created; indexes made before the splitter was recorded read as these.
CHUNKING_DEFAULTS: dict[str, Any] = {"chunk_tokens": 200, "chunk_overlap": 40, "splitter": "recursive"}


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ragpt"


def config_file_path() -> Path:
    return Path(os.environ.get("RAGPT_CONFIG", "ragpt.toml"))


# Settings that take one of a few words (any case), and those words.
_CHOICES: dict[str, tuple[str, ...]] = {
    "chunk_splitter": ("recursive", "sentences"),
    "decode_engine": ("auto", "packed", "padded"),
    "embed_precision": ("auto", "fp32", "bf16"),
    "index_type": ("auto", "flat", "ivf"),
}


class Settings(BaseSettings):
    """All knobs of ragpt in one place; see README "Configuration"."""

    model_config = SettingsConfigDict(env_prefix="RAGPT_", extra="forbid")

    # Where things live.
    index_dir: Path = Path("indexes")
    prompt_dir: Path = Path("prompts")
    cache_dir: Path = Field(default_factory=_default_cache_dir)
    # The shared public QA sets (importers only; never needed to run ragpt itself).
    data_dir: Path = Path("../shared/data")

    # Models: the embedded defaults, or any local Hugging Face folder / cached hub name.
    generator: str = EMBEDDED_GENERATOR
    embedder: str = EMBEDDED_EMBEDDER

    # Ingestion. Chunks are measured in embedder tokens so that none is truncated when embedded.
    chunk_tokens: int = Field(CHUNKING_DEFAULTS["chunk_tokens"], ge=16, le=4096)
    chunk_overlap: int = Field(CHUNKING_DEFAULTS["chunk_overlap"], ge=0)
    # How a document is cut: "recursive" (paragraphs first) or "sentences" (whole sentences packed up
    # to the budget, overlap across paragraphs; higher span hit@2, benchmarks/retrieval_levers.py).
    chunk_splitter: str = CHUNKING_DEFAULTS["splitter"]
    embed_batch_size: int = Field(32, ge=1)  # bf16 and fp32 both embed fastest near 32 (ingest_throughput.py)
    # What the embedder computes in: fp32, bf16 (weights in bfloat16: several times the chunks/s on
    # AVX-512-BF16 / AMX at the same retrieval quality), or auto (bf16 where the CPU has native bf16).
    embed_precision: str = "auto"
    # Dense search structure of a new index: flat (exact), ivf (approximate, the department
    # filter inside the search), or auto (flat while small, ivf past a size; ragpt.retrieval.dense).
    index_type: str = "auto"

    # Retrieval (part of the input contract of requests without a prompt version).
    k: int = Field(CONTRACT_DEFAULTS["k"], ge=1, le=100)
    dense: bool = CONTRACT_DEFAULTS["dense"]
    bm25: bool = CONTRACT_DEFAULTS["bm25"]
    rrf_k: int = Field(CONTRACT_DEFAULTS["rrf_k"], ge=1)
    query_rule: str = CONTRACT_DEFAULTS["query_rule"]  # retrieval query of a follow-up: last, user:N, turns:N

    # Generation.
    max_new_tokens: int = Field(128, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0.0, le=5.0)
    # Token budgets: the whole prompt, the question alone (refused beyond), the history (trimmed).
    max_context_tokens: int = Field(CONTRACT_DEFAULTS["max_context_tokens"], ge=64)
    max_question_tokens: int = Field(CONTRACT_DEFAULTS["max_question_tokens"], ge=1)
    max_history_tokens: int = Field(CONTRACT_DEFAULTS["max_history_tokens"], ge=0)
    # bf16 autocast for the frozen model's forward passes (CPU with AVX-512/AMX, or GPU).
    # "auto" turns it on where the CPU supports bf16 natively.
    bf16: str = "auto"
    # How batched rows run through the model: "packed" (rows side by side without padding, each
    # row's keys and values in its own buffer: rows join and leave a running batch without copies;
    # ragpt.lm.packed), "padded" (rows left-padded to one length), or "auto" (packed where the
    # model supports it: plain KV cache, SDPA or eager attention).
    decode_engine: str = "auto"
    threads: int = Field(0, ge=0)  # 0: leave torch's default

    @field_validator(*_CHOICES)
    @classmethod
    def _check_choice(cls, v: str, info: ValidationInfo) -> str:
        v = str(v).lower()
        choices = _CHOICES[info.field_name]
        if v not in choices:
            raise ValueError(f"{info.field_name} must be {', '.join(choices[:-1])} or {choices[-1]}")
        return v

    @field_validator("bf16")
    @classmethod
    def _check_bf16(cls, v: str) -> str:
        v = str(v).lower()
        if v not in {"auto", "true", "false", "on", "off", "1", "0"}:
            raise ValueError("bf16 must be auto, on or off")
        return v

    @model_validator(mode="after")
    def _check_overlap(self) -> Settings:
        if self.chunk_overlap >= self.chunk_tokens:
            raise ValueError(
                f"chunk_overlap ({self.chunk_overlap}) must be smaller than "
                f"chunk_tokens ({self.chunk_tokens})"
            )
        if not (self.dense or self.bm25):
            raise ValueError("at least one of dense and bm25 retrieval must be on")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # First wins: explicit arguments, then environment, then the TOML file, then defaults.
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls, config_file_path()))


def load_settings(**overrides: Any) -> Settings:
    """Build Settings, dropping overrides that are None (flags the user did not give)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    path = config_file_path()
    if "RAGPT_CONFIG" in os.environ and not path.is_file():
        raise ConfigError(f"config file {path} (from RAGPT_CONFIG) does not exist")
    try:
        return Settings(**given)
    except ValueError as e:  # pydantic's ValidationError and TOML errors
        raise ConfigError(f"invalid settings (config file {path}): {e}") from e
