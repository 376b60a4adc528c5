"""Settings: defaults < config file (TOML) < environment (RAGPT_*) < explicit arguments (CLI flags).

The config file is `ragpt.toml` in the working directory, or the file named by RAGPT_CONFIG.
Every path the project uses outside itself (model cache, data) comes from here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from ragpt.errors import ConfigError

EMBEDDED_GENERATOR = "smollm2-135m-instruct"
EMBEDDED_EMBEDDER = "all-minilm-l6-v2"


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ragpt"


def config_file_path() -> Path:
    return Path(os.environ.get("RAGPT_CONFIG", "ragpt.toml"))


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
    chunk_tokens: int = Field(200, ge=16, le=4096)
    chunk_overlap: int = Field(40, ge=0)
    embed_batch_size: int = Field(64, ge=1)

    # Retrieval.
    k: int = Field(3, ge=1, le=100)
    dense: bool = True
    bm25: bool = True
    rrf_k: int = Field(60, ge=1)

    # Generation.
    max_new_tokens: int = Field(128, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0.0, le=5.0)
    max_context_tokens: int = Field(1536, ge=64)
    # bf16 autocast for the frozen model's forward passes (CPU with AVX-512/AMX, or GPU).
    # "auto" turns it on where the CPU supports bf16 natively.
    bf16: str = "auto"
    threads: int = Field(0, ge=0)  # 0: leave torch's default

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
