"""retrieve -> build input -> generate -> answer with citations. The CLI and services call this.

    from ragpt import Pipeline
    answer = Pipeline.open(index="sample").ask("How many vacation days?", department="hr")
    print(answer.text, answer.citations)
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from ragpt.config import Settings, load_settings
from ragpt.errors import EmptyQuestionError
from ragpt.lm.generator import Generator, resolve_bf16
from ragpt.lm.models import Embedder, inference_model, load_embedder, load_generator_model
from ragpt.lm.template import ContextPassage, Turn, build_prompt_ids
from ragpt.retrieval.index import DocumentIndex
from ragpt.retrieval.search import RetrievedChunk, Retriever


@dataclass
class Citation:
    source: str
    title: str
    chunk: int
    score: float
    start: int
    end: int

    @classmethod
    def from_hit(cls, hit: RetrievedChunk) -> Citation:
        c = hit.chunk
        return cls(source=c.source, title=c.title, chunk=c.chunk, score=round(hit.score, 6),
                   start=c.start, end=c.end)


@dataclass
class Answer:
    text: str
    citations: list[Citation]
    department: str
    prompt_version: str | None = None
    finish_reason: str = "stop"
    usage: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Question:
    """One request for `Pipeline.ask_many`."""

    text: str
    department: str
    history: Sequence[Turn] = ()
    soft_prompt: torch.Tensor | None = None  # an explicit tensor wins over `prompt`
    prompt_version: str | None = None  # label reported with an explicit tensor
    filters: dict | None = None
    # Which registry prompt to use: "active" (the department's active version, if any),
    # "none", or a version such as "v3".
    prompt: str = "active"


def passages_from_hits(hits: Sequence[RetrievedChunk]) -> list[ContextPassage]:
    return [ContextPassage(text=h.chunk.text, source=h.chunk.source, title=h.chunk.title) for h in hits]


class Pipeline:
    """A department-aware RAG pipeline over one index. Models load lazily and once."""

    def __init__(
        self,
        index: DocumentIndex,
        settings: Settings,
        *,
        embedder: Embedder | None = None,
        generator: Generator | None = None,
    ):
        self.index = index
        self.settings = settings
        self._embedder = embedder
        self._generator = generator
        self._retriever: Retriever | None = None
        self._registry = None
        self._base_model = generator.base_model if generator is not None else None
        self._prompt_cache: dict[tuple[str, str], torch.Tensor] = {}
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
            model, tok = load_generator_model(self.settings)
            self._generator = Generator(inference_model(model, resolve_bf16(self.settings.bf16)), tok)
            self._base_model = model  # fp32 original: its fingerprint identifies the base model
        return self._generator

    @property
    def retriever(self) -> Retriever:
        if self._retriever is None:
            s = self.settings
            self._retriever = Retriever(self.index, self.embedder, dense=s.dense, bm25=s.bm25, rrf_k=s.rrf_k)
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

    def resolve_prompt(self, department: str, prompt: str = "active") -> tuple[torch.Tensor | None, str | None]:
        """(tensor, version) of the soft prompt a request uses; validated and cached per version.

        The version is resolved once here, so a request uses one version from start to end even
        if another is activated meanwhile.
        """
        if prompt in (None, "none"):
            return None, None
        if prompt == "active":
            if department not in self.registry.departments():
                return None, None
            version = self.registry.active_version(department)
            if version is None:
                return None, None
        else:
            version = prompt
        key = (department, version)
        if key not in self._prompt_cache:
            from ragpt.softprompts.artifact import base_model_fingerprint

            gen = self.generator
            base = self._base_model or gen.base_model
            sp = self.registry.load(department, version, base_fingerprint=base_model_fingerprint(base),
                                    hidden_size=gen.hidden_size, max_depth=gen.max_prompt_depth)
            self._prompt_cache[key] = sp.tensor
        return self._prompt_cache[key], version

    # ------------------------------------------------------------------ API
    def retrieve(
        self, question: str, department: str, k: int | None = None, filters: dict | None = None
    ) -> list[RetrievedChunk]:
        return self.retriever.search(question, department, k or self.settings.k, filters)

    def ask(
        self,
        question: str,
        department: str,
        *,
        k: int | None = None,
        history: Sequence[Turn] = (),
        soft_prompt: torch.Tensor | None = None,
        prompt_version: str | None = None,
        filters: dict | None = None,
        prompt: str = "active",
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        seed: int | None = None,
    ) -> Answer:
        q = Question(question, department, history, soft_prompt, prompt_version, filters, prompt)
        return self.ask_many([q], k=k, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)[0]

    def ask_many(
        self,
        questions: Sequence[Question],
        *,
        k: int | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        seed: int | None = None,
    ) -> list[Answer]:
        """Answer several questions (any departments) in one batched generation."""
        if not questions:
            return []
        for q in questions:
            if not isinstance(q.text, str) or not q.text.strip():
                raise EmptyQuestionError("the question is empty")
            self.index.check_department(q.department)
        s = self.settings
        k = k or s.k
        t0 = time.perf_counter()
        # One embedder batch for all questions, each with its own department and filters.
        all_hits = self.retriever.search_many(
            [q.text for q in questions], [q.department for q in questions], k, [q.filters for q in questions]
        )
        t1 = time.perf_counter()
        gen = self.generator
        prompts = [
            (q.soft_prompt, q.prompt_version) if q.soft_prompt is not None
            else self.resolve_prompt(q.department, q.prompt)
            for q in questions
        ]
        rows = [
            build_prompt_ids(
                gen.tokenizer, q.text, passages_from_hits(hits), department=q.department,
                history=q.history, max_context_tokens=s.max_context_tokens,
            )
            for q, hits in zip(questions, all_hits)
        ]
        results = gen.generate(
            rows,
            [p for p, _ in prompts],
            max_new_tokens=max_new_tokens or s.max_new_tokens,
            temperature=s.temperature if temperature is None else temperature,
            seed=seed,
        )
        t2 = time.perf_counter()
        answers = []
        for q, hits, res, (_, version) in zip(questions, all_hits, results, prompts):
            answers.append(
                Answer(
                    text=res.text,
                    citations=[Citation.from_hit(h) for h in hits],
                    department=q.department,
                    prompt_version=version,
                    finish_reason=res.finish_reason,
                    usage={
                        "prompt_tokens": res.prompt_tokens,
                        "completion_tokens": len(res.token_ids),
                        "total_tokens": res.prompt_tokens + len(res.token_ids),
                    },
                    timings={"retrieve_s": round(t1 - t0, 4), "generate_s": round(t2 - t1, 4)},
                )
            )
        return answers
