"""The chat service's config file (TOML): departments, their index, API keys, router, batching, limits.

Example (`serve.toml`; relative paths are relative to this file):

    index = "sample"              # default index of the departments
    index_dir = "indexes"         # optional: overrides ragpt's index_dir
    prompt_dir = "prompts"        # optional: the soft-prompt registry, overrides ragpt's prompt_dir

    [departments.hr]
    api_keys = ["9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"]  # sha256 hex
    [departments.it]
    api_keys = ["..."]
    [departments.legal]
    index = "legal-docs"          # a department may live in another index
    examples = ["Is my data sold?"]  # optional example questions for the router

    [router]                      # `model: "auto"`
    min_confidence = 0.5
    below_threshold = "no_prompt" # or "refuse"

    [batching]
    max_batch_size = 8
    max_wait_ms = 5
    prefix_cache_size = 64        # soft-prompt prefixes (and prompt tensors) held at once

    [limits]
    max_tokens = 512
    request_timeout_s = 60

    [metrics]                     # GET /metrics (Prometheus); 404 while no key is listed
    api_keys = ["..."]            # sha256 hex; never a department's key

    [admin.keys]                  # the release console and admin API; the name is the audit actor
    alice = "..."                 # sha256 hex; never a department's or a metrics key

API keys are stored only as sha256 hex digests: `ragpt_service.auth.hash_api_key("the key")`.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ragpt.errors import ConfigError
from ragpt.names import NAME_RE

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - pydantic-settings pulls in tomli on 3.10
    import tomli as tomllib

SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
RESERVED_MODELS = {"auto"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _hashed_keys(keys: list[str]) -> list[str]:
    out = []
    for k in keys:
        k = k.strip().lower()
        if not SHA256_HEX.match(k):
            raise ValueError("api_keys must be sha256 hex digests (64 hex characters), never plain keys; "
                             "compute them with ragpt_service.auth.hash_api_key")
        out.append(k)
    return out


class DepartmentConfig(_Strict):
    index: str | None = None  # default: the top-level `index`
    api_keys: list[str] = Field(default_factory=list)  # sha256 hex digests of the keys
    examples: list[str] = Field(default_factory=list)  # example questions: the router uses them if given

    @field_validator("api_keys")
    @classmethod
    def _hashed(cls, keys: list[str]) -> list[str]:
        return _hashed_keys(keys)


class MetricsConfig(_Strict):
    """GET /metrics, the Prometheus text format. It answers only a metrics key (never a department's
    key, nor `require_api_key = false`); with no key listed, or `enabled = false`, it is a 404."""

    enabled: bool = True
    api_keys: list[str] = Field(default_factory=list)  # sha256 hex digests of the metrics keys

    @field_validator("api_keys")
    @classmethod
    def _hashed(cls, keys: list[str]) -> list[str]:
        return _hashed_keys(keys)

    @property
    def served(self) -> bool:
        return self.enabled and bool(self.api_keys)


class AdminConfig(_Strict):
    """The release console (/console) and the admin API (/admin/v1/...): keys by admin name, the
    name recorded as the actor of every change. No key listed: both answer 401 to everyone."""

    keys: dict[str, str] = Field(default_factory=dict)  # name -> sha256 hex digest of the key
    session_hours: float = Field(8.0, gt=0, le=24 * 7)  # a browser session's idle lifetime

    @field_validator("keys")
    @classmethod
    def _named_and_hashed(cls, keys: dict[str, str]) -> dict[str, str]:
        for name in keys:
            if not NAME_RE.match(name):
                raise ValueError(f"invalid admin name {name!r} (letters, digits, '_', '-', '.')")
        return dict(zip(keys, _hashed_keys(list(keys.values()))))


class RouterConfig(_Strict):
    enabled: bool = True
    method: Literal["nearest", "centroid"] = "nearest"
    top_m: int = Field(3, ge=1, le=100)
    temperature: float = Field(0.05, gt=0, le=10)
    # Below this confidence an `auto` request is answered without a soft prompt, or refused.
    min_confidence: float = Field(0.5, ge=0, le=1)
    below_threshold: Literal["no_prompt", "refuse"] = "no_prompt"


class BatchingConfig(_Strict):
    # continuous: requests join the running batch between decode steps (max_prefill_tokens per step);
    # static: a batch gathered for max_wait_ms runs until its last row finishes.
    scheduler: Literal["continuous", "static"] = "continuous"
    max_batch_size: int = Field(8, ge=1, le=256)  # rows decoded together
    # continuous: prompt positions run per step; a prompt over it runs in chunks
    max_prefill_tokens: int = Field(512, ge=16, le=65536)
    # continuous: while rows decode, a prompt over max_prefill_tokens runs in chunks that make steps
    # at most this many times a decode step on average (sized and spaced from measured step times)
    long_prompt_slowdown: float = Field(1.3, gt=1.0, le=100.0)
    max_wait_ms: float = Field(5.0, ge=0, le=1000)  # static: how long a batch gathers
    max_queue: int = Field(64, ge=1)
    policy: Literal["mixed", "per_department"] = "mixed"  # static only
    prefix_cache: bool = True
    # Soft-prompt prefixes (KV) held at once, least recently used out; also how many departments'
    # prompt tensors stay loaded. Memory is bounded by it however many departments there are; a
    # department beyond it computes its prefix again at its next request.
    prefix_cache_size: int = Field(64, ge=1, le=100_000)


class LimitsConfig(_Strict):
    max_request_bytes: int = Field(64 * 1024, ge=256)
    max_messages: int = Field(32, ge=1)
    max_message_chars: int = Field(8000, ge=1)
    max_tokens: int = Field(512, ge=1)  # the largest max_tokens a request may ask for
    default_max_tokens: int | None = Field(None, ge=1)  # None: ragpt's max_new_tokens setting
    max_k: int = Field(10, ge=1, le=100)
    request_timeout_s: float = Field(60.0, gt=0)
    # Retry-After of a 503 when the queue is full before any answer was measured; afterwards the
    # service computes it from its measured speed.
    retry_after_s: int = Field(1, ge=1)
    # /v1/prompt_embeds requests built at once (each retrieves and embeds in a worker thread, beside
    # the generation queue); one more is a 503 `overloaded` rather than a wait in an unbounded line.
    max_prompt_embeds_in_flight: int = Field(4, ge=1)


class ServiceConfig(_Strict):
    index: str = "sample"
    index_dir: Path | None = None
    prompt_dir: Path | None = None
    require_api_key: bool = True  # false: no authentication at all (local development only)
    departments: dict[str, DepartmentConfig]
    router: RouterConfig = Field(default_factory=RouterConfig)
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    admin: AdminConfig = Field(default_factory=AdminConfig)

    @model_validator(mode="after")
    def _check(self) -> ServiceConfig:
        if not self.departments:
            raise ValueError("list at least one department under [departments.NAME]")
        shared = set(self.metrics.api_keys) & {k for d in self.departments.values() for k in d.api_keys}
        if shared:
            raise ValueError("a metrics key must not also be a department's key: give /metrics keys of its own")
        admin = set(self.admin.keys.values())
        if admin & ({k for d in self.departments.values() for k in d.api_keys} | set(self.metrics.api_keys)):
            raise ValueError("an admin key must not also be a department's or a metrics key: give admins keys of "
                             "their own")
        for name, dept in self.departments.items():
            if not NAME_RE.match(name) or name in RESERVED_MODELS:
                raise ValueError(f"invalid department name {name!r} (letters, digits, '_', '-', '.'; not 'auto')")
            index = dept.index or self.index
            if not NAME_RE.match(index):
                raise ValueError(f"department {name!r}: invalid index name {index!r}")
        if self.limits.default_max_tokens and self.limits.default_max_tokens > self.limits.max_tokens:
            raise ValueError("limits.default_max_tokens must not exceed limits.max_tokens")
        return self

    def index_of(self, department: str) -> str:
        return self.departments[department].index or self.index


def load_service_config(path: Path | str) -> ServiceConfig:
    """Read and validate a service config; relative paths are resolved against the file's folder."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"service config {path} does not exist")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"service config {path}: not valid TOML ({e})") from e
    try:
        cfg = ServiceConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"service config {path}: {e}") from e
    base = path.resolve().parent
    for field in ("index_dir", "prompt_dir"):
        value = getattr(cfg, field)
        if value is not None and not value.is_absolute():
            setattr(cfg, field, base / value)
    return cfg
