"""A soft prompt's input contract: how the inputs it was trained on were built.

A prompt learns the inputs it is trained with: how many passages, how long a prompt, which
template, which retriever, which retrieval query for a follow-up. Served any other way it
scores lower, so every prompt version records its contract and every surface (ragpt ask, the
HTTP service, LangChain, ragpt eval) applies it by default. A caller may override fields; the
answer then lists the fields that differ from the version's contract.

Default values come from one place, `ragpt.config.CONTRACT_DEFAULTS`, which `Settings` uses too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from ragpt.config import CONTRACT_DEFAULTS
from ragpt.errors import RagptError
from ragpt.lm.template import TEMPLATE_VERSION
from ragpt.serving.conversation import check_query_rule

GOLD_CONTEXT_MODES = ("never", "missed", "always")
# Fields a request may change; the template and the training-only gold-context mode are facts
# about how the prompt was trained, not knobs of a request.
OVERRIDABLE = ("k", "max_context_tokens", "max_question_tokens", "max_history_tokens", "dense", "bm25", "rrf_k",
               "query_rule", "query_adapter")
# Overridable fields that are facts of a version, not settings: a request without a version has none.
NOT_SETTINGS = ("query_adapter",)


class ContractError(RagptError):
    """An input contract (or an override of one) that cannot be applied."""


@dataclass(frozen=True)
class InputContract:
    k: int = CONTRACT_DEFAULTS["k"]  # retrieved passages per question
    max_context_tokens: int = CONTRACT_DEFAULTS["max_context_tokens"]  # the whole prompt, generator tokens
    max_question_tokens: int = CONTRACT_DEFAULTS["max_question_tokens"]  # the question; longer ones are refused
    max_history_tokens: int = CONTRACT_DEFAULTS["max_history_tokens"]  # earlier turns; the oldest dropped to fit
    template: str = TEMPLATE_VERSION
    dense: bool = CONTRACT_DEFAULTS["dense"]  # retrieval: dense (FAISS) ranker
    bm25: bool = CONTRACT_DEFAULTS["bm25"]  # BM25 ranker; both on = reciprocal-rank fusion
    rrf_k: int = CONTRACT_DEFAULTS["rrf_k"]  # fusion constant
    query_rule: str = CONTRACT_DEFAULTS["query_rule"]  # retrieval query of a follow-up (ragpt.serving.conversation)
    gold_context: str = "never"  # training only: was the gold passage put into the context
    # The dense search maps the question's embedding with the version's query adapter
    # (ragpt.retrieval.query_adapter); a request may turn it off, not on.
    query_adapter: bool = False

    def check(self) -> InputContract:
        if not 1 <= self.k <= 100:
            raise ContractError(f"k must be between 1 and 100, got {self.k}")
        for name in ("max_context_tokens", "max_question_tokens", "max_history_tokens"):
            if getattr(self, name) < 0 or (name == "max_context_tokens" and self.max_context_tokens < 64):
                raise ContractError(f"{name} must be >= {64 if name == 'max_context_tokens' else 0}, "
                                    f"got {getattr(self, name)}")
        if not (self.dense or self.bm25):
            raise ContractError("at least one of dense and bm25 retrieval must be on")
        if self.rrf_k < 1:
            raise ContractError(f"rrf_k must be >= 1, got {self.rrf_k}")
        if self.template != TEMPLATE_VERSION:
            raise ContractError(f"template {self.template!r} is not known to this ragpt (it has {TEMPLATE_VERSION!r})")
        if self.query_adapter and not self.dense:
            raise ContractError("query_adapter needs the dense ranker (dense true)")
        if self.gold_context not in GOLD_CONTEXT_MODES:
            raise ContractError(f"gold_context must be one of {GOLD_CONTEXT_MODES}, got {self.gold_context!r}")
        try:
            check_query_rule(self.query_rule)
        except RagptError as e:
            raise ContractError(str(e)) from None
        return self

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if not d["query_adapter"]:  # a version without one records its contract as before the field existed
            del d["query_adapter"]
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InputContract:
        """A contract from its JSON form; unknown fields are an error (a newer ragpt wrote it)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ContractError(f"unknown input-contract field(s) {unknown[:5]}")
        return _typed(cls(), dict(data)).check()

    @classmethod
    def from_settings(cls, settings) -> InputContract:
        """What a request without a prompt version gets: the configured values."""
        return cls(**{name: getattr(settings, name) for name in OVERRIDABLE if name not in NOT_SETTINGS}).check()

    @classmethod
    def from_prompt_meta(cls, meta: Mapping[str, Any]) -> InputContract:
        """A prompt version's contract: stored with it, or read from an older artifact's hyperparameters.

        Artifacts written before contracts existed record k, the prompt budget and the gold-context
        mode in their hyperparameters; their other inputs were built as these defaults build them
        (template v1, fusion with rrf_k 60, the question alone as the retrieval query).
        """
        stored = meta.get("contract")
        if isinstance(stored, Mapping):
            return cls.from_dict(stored)
        hp = meta.get("hyperparameters") or {}
        given = {k: hp[k] for k in ("k", "max_context_tokens", "gold_context") if k in hp}
        return _typed(cls(query_rule="last"), given).check()

    def apply(self, overrides: Mapping[str, Any] | None) -> tuple[InputContract, dict[str, dict]]:
        """(the contract with `overrides` applied, {field: {"contract": old, "used": new}} for changed fields)."""
        if not overrides:
            return self, {}
        bad = sorted(set(overrides) - set(OVERRIDABLE))
        if bad:
            raise ContractError(f"cannot override input-contract field(s) {bad[:5]}; "
                                f"overridable: {', '.join(OVERRIDABLE)}")
        values = {k: v for k, v in overrides.items() if v is not None}
        if values.get("dense") is False and "query_adapter" not in values:
            values["query_adapter"] = False  # no dense search, nothing for the adapter to map
        used = _typed(self, values).check()
        if used.query_adapter and not self.query_adapter:
            raise ContractError("query_adapter can only be turned off: this prompt version has no query adapter")
        diff = {name: {"contract": getattr(self, name), "used": getattr(used, name)}
                for name in OVERRIDABLE if getattr(self, name) != getattr(used, name)}
        return used, diff


def _typed(base: InputContract, values: dict[str, Any]) -> InputContract:
    """`base` with `values` put in, each checked against the field's type (JSON gives no guarantees)."""
    out = {}
    for f in fields(InputContract):
        if f.name not in values:
            continue
        v, want = values[f.name], type(getattr(base, f.name))
        ok = isinstance(v, want) and (want is bool or not isinstance(v, bool))
        if not ok:
            raise ContractError(f"input-contract field {f.name} must be {want.__name__}, got {type(v).__name__}")
        out[f.name] = v
    return replace(base, **out)
