"""A department-aware RAG pipeline over one index: the parts a request needs, loaded lazily and once.

    from ragpt import Pipeline
    answer = Pipeline.open(index="sample").ask("How many vacation days?", department="hr")
    print(answer.text, answer.citations, answer.prompt_version, answer.contract)

Answers go through the one request path (`ragpt.serving.request`): the same prepare and finish
as the HTTP service, LangChain and `ragpt eval`.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ragpt.config import Settings, load_settings
from ragpt.errors import PromptMismatchError, SoftPromptError
from ragpt.lm.generator import Generator, load_generator
from ragpt.lm.models import Embedder, load_embedder
from ragpt.lm.template import Turn
from ragpt.retrieval.index import DocumentIndex
from ragpt.retrieval.search import RetrievedChunk, Retriever
from ragpt.serving.contract import InputContract
from ragpt.serving.request import (
    Answer,
    ChatRequest,
    generate_answers,
    prepare,
    prepare_many,
    stream_answer,
)

log = logging.getLogger(__name__)


class Pipeline:
    """An index, the models, the prompt registry, and the prompt versions loaded lately.

    At most `max_prompts` versions stay loaded (least recently used out), so that a pipeline
    serving many departments holds a bounded number of tensors (a deep prompt is about 1.4 MB for
    SmolLM2); a version is validated (checksums, shape, base model) whenever it is loaded.
    """

    def __init__(self, index: DocumentIndex, settings: Settings, *, embedder: Embedder | None = None,
                 generator: Generator | None = None, prefix_cache: bool = True, max_prompts: int = 64):
        if max_prompts < 1:
            raise ValueError("max_prompts must be at least 1")
        self.index = index
        self.settings = settings
        self.prefix_cache = prefix_cache  # soft prompts' KV computed once per version and reused
        self._embedder = embedder
        self._generator = generator
        self._retriever: Retriever | None = None
        self._registry = None
        self.max_prompts = max_prompts
        # (department, version) -> (tensor, contract, query adapter or None)
        self._prompts: OrderedDict[tuple[str, str], tuple[torch.Tensor, InputContract, Any]] = OrderedDict()
        self._prompts_lock = threading.Lock()
        self.default_contract = InputContract.from_settings(settings)
        if settings.threads:
            torch.set_num_threads(settings.threads)

    @classmethod
    def open(cls, index: str, settings: Settings | None = None, **overrides) -> Pipeline:
        settings = settings or load_settings(**overrides)
        return cls(DocumentIndex.open(settings.index_dir, index), settings)

    # ------------------------------------------------------------------ lazily loaded parts
    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = load_embedder(self.settings)
        return self._embedder

    @property
    def generator(self) -> Generator:
        if self._generator is None:
            self._generator = load_generator(self.settings)
        return self._generator

    @property
    def retriever(self) -> Retriever:
        if self._retriever is None:
            c = self.default_contract
            self._retriever = Retriever(self.index, self.embedder, dense=c.dense, bm25=c.bm25, rrf_k=c.rrf_k)
        return self._retriever

    @property
    def departments(self) -> list[str]:
        return self.index.departments

    @property
    def registry(self):
        if self._registry is None:
            from ragpt.softprompts.registry import PromptRegistry

            self._registry = PromptRegistry(self.settings.prompt_dir)
        return self._registry

    # ------------------------------------------------------------------ prompt versions
    def resolve(self, department: str, prompt: str = "active") -> tuple[torch.Tensor | None, str | None, InputContract]:
        """(tensor, version, input contract) of the soft prompt a request uses; validated and cached.

        The version is resolved once per request, so a request uses one version from start to end
        even if another is activated meanwhile. No prompt: the settings' contract.
        """
        if prompt in (None, "none"):
            return None, None, self.default_contract
        version = prompt
        if prompt == "active":
            version = self.registry.active_version_or_none(department)  # from the replayed log
            if version is None:
                return None, None, self.default_contract
        tensor, contract, _ = self._loaded(department, version)
        return tensor, version, contract

    def query_adapter(self, department: str, version: str | None):
        """The query adapter stored with a version (ragpt.retrieval.query_adapter), or None."""
        return None if version is None else self._loaded(department, version)[2]

    def _loaded(self, department: str, version: str) -> tuple[torch.Tensor, InputContract, Any]:
        key = (department, version)
        with self._prompts_lock:
            hit = self._prompts.get(key)
            if hit is not None:
                self._prompts.move_to_end(key)
                return hit
        entry = self.load_version(department, version, with_adapter=True)
        with self._prompts_lock:
            self._prompts[key] = entry
            self._prompts.move_to_end(key)
            while len(self._prompts) > self.max_prompts:
                self._prompts.popitem(last=False)
        return entry

    @property
    def loaded_prompts(self) -> list[tuple[str, str]]:
        """(department, version) of the prompt tensors held now, least recently used first."""
        with self._prompts_lock:
            return list(self._prompts)

    def load_version(self, department: str, version: str, *, with_adapter: bool = False) -> tuple:
        """(tensor, contract) of a version read from the registry and validated (checksums, shape,
        base model); with_adapter: (tensor, contract, query adapter or None)."""
        from ragpt.softprompts.artifact import base_model_fingerprint

        gen = self.generator
        sp = self.registry.load(department, version, base_fingerprint=base_model_fingerprint(gen.base_model),
                                hidden_size=gen.hidden_size, max_depth=gen.max_prompt_depth)
        trained_on = (sp.meta.get("extra") or {}).get("index")
        if trained_on and trained_on != self.index.name:
            # Served anyway (an operator may have renamed or rebuilt the index), but said once per
            # load: passages chunked or ranked otherwise than in training lower what the prompt does.
            log.warning("soft prompt %s %s was trained against index %r and is served from index %r: its "
                        "passages may differ from the ones it learned on", department, version, trained_on,
                        self.index.name)
        contract = InputContract.from_prompt_meta(sp.meta)
        adapter = sp.query_adapter
        if contract.query_adapter and adapter is None:
            raise SoftPromptError(f"{department} {version}: its contract uses a query adapter, but it has none")
        if adapter is not None:
            from ragpt.retrieval.query_adapter import QueryAdapterError

            try:
                adapter.check_fits(self.index, sp.meta["query_adapter"].get("embedder"), f"{department} {version}")
            except QueryAdapterError as e:  # a version that cannot be served from this index
                raise PromptMismatchError(str(e)) from None
        return (sp.tensor, contract, adapter) if with_adapter else (sp.tensor, contract)

    def prefix_key(self, department: str, version: str | None, soft_prompt: torch.Tensor | None) -> Hashable | None:
        """The prefix-cache key of a row's soft prompt (registry versions are immutable, so the key
        names one tensor for good; the cache still compares tensors on every hit)."""
        if soft_prompt is None or not self.prefix_cache:
            return None
        return (str(Path(self.settings.prompt_dir).resolve()), department, version)

    # ------------------------------------------------------------------ API
    def retrieve(self, question: str, department: str, k: int | None = None,
                 filters: dict | None = None) -> list[RetrievedChunk]:
        return self.retriever.search(question, department, k or self.default_contract.k, filters)

    def ask(self, question: str, department: str, *, history: Sequence[Turn] = (), system: str | None = None,
            prompt: str = "active", k: int | None = None, overrides: Mapping[str, Any] | None = None,
            filters: dict | None = None, max_new_tokens: int | None = None, temperature: float | None = None,
            seed: int | None = None) -> Answer:
        """Answer one question with the department's active prompt (or `prompt`: "none", "v3")."""
        over = {**(overrides or {}), **({"k": k} if k is not None else {})}
        req = ChatRequest(question, department, history=tuple(history), system=system, prompt=prompt,
                          overrides=over or None, filters=filters, max_new_tokens=max_new_tokens,
                          temperature=temperature)
        return self.ask_many([req], seed=seed)[0]

    def ask_many(self, requests: Sequence[ChatRequest], *, seed: int | None = None) -> list[Answer]:
        """Answer several requests (any departments and versions) in one batched generation.
        The first request that cannot be prepared raises its error."""
        prepared = prepare_many(self, requests)
        for p in prepared:
            if isinstance(p, Exception):
                raise p
        return generate_answers(self.generator, prepared, seed=seed)

    def stream(self, request: ChatRequest, *, seed: int | None = None) -> Iterator[str | Answer]:
        """Text pieces as they are generated, then the `Answer`."""
        return stream_answer(self.generator, prepare(self, request), seed=seed)
