"""Department routing for `auto` requests: which department's documents is a query nearest to?

Each department is represented by unit vectors in the embedder's space: the embeddings of the
chunks it may read (read back from FAISS by id, so nothing is
re-embedded), or of example questions when the department supplies them. Two scores:

- "nearest" (default): the mean cosine similarity of the query to the department's `top_m`
  most similar vectors. Departments cover many unrelated topics, so their mean vector sits
  between topics; the nearest few chunks say more. On the sample questions it routes 95%
  correctly against 87% for centroids, on doc2dial agencies 93% against 83%.
- "centroid": cosine similarity to the normalised mean vector (one vector per department).

Confidence is ABSOLUTE: how close the question is to the chosen department's material at all,
sigmoid((similarity - CONFIDENCE_CENTER) / CONFIDENCE_SCALE), where similarity is the winner's raw
score above. A question no department covers ("What is the capital of France?") scores low for
every department, so it gets a low confidence however the candidates compare. The calibration was
measured (benchmarks/routing_accuracy.py): on-topic questions score 0.30-0.95 (sample corpus and
doc2dial), 30 off-topic questions 0.04-0.23, so the centre 0.27 puts the service's default
`min_confidence` 0.5 between them. The old relative confidence, a softmax over the candidates'
scores divided by `temperature` (1/len(candidates) for a tie, near 1 for a clear margin, always 1
with one candidate), is kept as `share`. Candidates can be restricted per call, so an API key that
may use two departments only ever routes between those two.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ragpt.errors import EmptyQuestionError, RagptError, UnknownDepartmentError
from ragpt.lm.models import Embedder
from ragpt.retrieval.index import DocumentIndex

METHODS = ("nearest", "centroid")
DEFAULT_TEMPERATURE = 0.05
DEFAULT_TOP_M = 3
# confidence = sigmoid((similarity - CENTER) / SCALE): 0.5 at similarity 0.27, 0.8 at ~0.33, 0.2 at ~0.21.
CONFIDENCE_CENTER = 0.27
CONFIDENCE_SCALE = 0.04


def absolute_confidence(similarity: float, center: float = CONFIDENCE_CENTER,
                        scale: float = CONFIDENCE_SCALE) -> float:
    """A raw cosine score mapped to (0, 1); 0.5 at `center`."""
    return float(1.0 / (1.0 + np.exp(-(float(similarity) - center) / scale)))


@dataclass
class RouteDecision:
    department: str  # the best-scoring department among the candidates
    confidence: float  # absolute: its similarity mapped to (0, 1), see absolute_confidence
    scores: dict[str, float] = field(default_factory=dict)  # similarity score per candidate
    share: float = 1.0  # relative: its softmax share among the candidates, in (0, 1]

    @property
    def similarity(self) -> float:
        """The chosen department's raw score."""
        return self.scores.get(self.department, 0.0)

    def to_dict(self) -> dict:
        # A confidence below 1 never reads as 1 after rounding (a threshold of 1.0 stays unreachable).
        conf = round(self.confidence, 4)
        if conf >= 1.0 > self.confidence:
            conf = 0.9999
        return {"department": self.department, "confidence": conf, "share": round(self.share, 4),
                "similarity": round(self.similarity, 4),
                "scores": {d: round(s, 4) for d, s in self.scores.items()}}


def _unit_rows(m: np.ndarray) -> np.ndarray:
    m = np.atleast_2d(np.asarray(m, dtype=np.float32))
    norms = np.linalg.norm(m, axis=1, keepdims=True)
    if m.size == 0 or not np.all(np.isfinite(norms)) or np.any(norms == 0):
        raise RagptError("routing vectors must be non-empty, finite and non-zero")
    return m / norms


def chunk_vectors(index: DocumentIndex, department: str) -> np.ndarray:
    """The stored (normalised) embeddings of every chunk `department` may read."""
    ids = index.allowed_ids(department)
    if len(ids) == 0:
        raise UnknownDepartmentError(f"department {department!r} has no chunks in index {index.name!r}")
    return index.dense.vectors(ids)


class DepartmentRouter:
    """Picks a department for a question among the allowed candidates."""

    def __init__(self, embedder: Embedder, vectors: Mapping[str, np.ndarray], *, method: str = "nearest",
                 top_m: int = DEFAULT_TOP_M, temperature: float = DEFAULT_TEMPERATURE,
                 confidence_center: float = CONFIDENCE_CENTER, confidence_scale: float = CONFIDENCE_SCALE):
        if not vectors:
            raise RagptError("a router needs at least one department")
        if method not in METHODS:
            raise ValueError(f"unknown routing method {method!r}; use one of {', '.join(METHODS)}")
        if temperature <= 0 or top_m < 1 or confidence_scale <= 0:
            raise ValueError("temperature and confidence_scale must be positive and top_m at least 1")
        self.confidence_center = float(confidence_center)
        self.confidence_scale = float(confidence_scale)
        self.embedder = embedder
        self.method = method
        self.top_m = 1 if method == "centroid" else int(top_m)
        self.temperature = float(temperature)
        self.departments = sorted(vectors)
        self.vectors: dict[str, np.ndarray] = {}
        for d in self.departments:
            m = _unit_rows(vectors[d])
            if m.shape[1] != embedder.dim:
                raise RagptError(f"department {d!r}: vectors have dimension {m.shape[1]}, "
                                 f"the embedder {embedder.dim}")
            self.vectors[d] = _unit_rows(m.mean(axis=0)) if method == "centroid" else m

    @classmethod
    def from_index(cls, index: DocumentIndex, embedder: Embedder, departments: Iterable[str] | None = None,
                   *, examples: Mapping[str, Sequence[str]] | None = None, **kwargs) -> DepartmentRouter:
        """Vectors from the index's chunks (shared chunks count for each reader); departments with
        `examples` use the embedded example questions instead."""
        index.check_embedder(embedder.name, embedder.dim)
        depts = list(departments) if departments is not None else index.departments
        vectors = {}
        for d in depts:
            qs = [q for q in (examples or {}).get(d, []) if isinstance(q, str) and q.strip()]
            vectors[d] = embedder.encode(qs) if qs else chunk_vectors(index, d)
        return cls(embedder, vectors, **kwargs)

    def _candidates(self, allowed: Iterable[str] | None) -> list[str]:
        if allowed is None:
            return list(self.departments)
        allowed = set(allowed)
        unknown = allowed - set(self.departments)
        if unknown:
            raise UnknownDepartmentError(f"router knows no department {sorted(unknown)}; known: {self.departments}")
        if not allowed:
            raise RagptError("no candidate departments to route between")
        return [d for d in self.departments if d in allowed]

    def route_many(self, questions: Sequence[str], allowed: Iterable[str] | None = None) -> list[RouteDecision]:
        for q in questions:
            if not isinstance(q, str) or not q.strip():
                raise EmptyQuestionError("the question is empty")
        names = self._candidates(allowed)
        if not questions:
            return []
        q = self.embedder.encode(list(questions))
        scores = np.empty((len(questions), len(names)), dtype=np.float32)
        for j, d in enumerate(names):
            sims = q @ self.vectors[d].T  # (n, vectors of d)
            m = min(self.top_m, sims.shape[1])
            scores[:, j] = np.sort(sims, axis=1)[:, -m:].mean(axis=1)
        z = scores / self.temperature
        probs = np.exp(z - z.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        out = []
        for row, p in zip(scores, probs):
            best = int(np.argmax(row))
            conf = absolute_confidence(row[best], self.confidence_center, self.confidence_scale)
            out.append(RouteDecision(department=names[best], confidence=conf, share=float(p[best]),
                                     scores={n: float(s) for n, s in zip(names, row)}))
        return out

    def route(self, question: str, allowed: Iterable[str] | None = None) -> RouteDecision:
        return self.route_many([question], allowed)[0]


def routing_accuracy(router: DepartmentRouter, labelled: Iterable[tuple[str, str]], *,
                     thresholds: Sequence[float] = (0.5, 0.8), batch_size: int = 64) -> dict:
    """Accuracy of `router` on (question, department) pairs, per department and as a confusion table.

    For each threshold t it also reports coverage (share of questions routed with (absolute) confidence >= t)
    and the accuracy on those: what a `min_confidence` setting trades.
    """
    pairs = list(labelled)
    if not pairs:
        raise RagptError("no labelled questions to measure routing accuracy on")
    decisions: list[RouteDecision] = []
    for i in range(0, len(pairs), batch_size):
        decisions += router.route_many([q for q, _ in pairs[i:i + batch_size]])
    per: dict[str, dict] = {}
    confusion: dict[str, dict[str, int]] = {}
    for (_, gold), d in zip(pairs, decisions):
        row = per.setdefault(gold, {"n": 0, "correct": 0})
        row["n"] += 1
        row["correct"] += d.department == gold
        confusion.setdefault(gold, {})
        confusion[gold][d.department] = confusion[gold].get(d.department, 0) + 1
    for row in per.values():
        row["accuracy"] = round(row["correct"] / row["n"], 4)
    correct = sum(d.department == gold for (_, gold), d in zip(pairs, decisions))
    at = {}
    for t in thresholds:
        kept = [(gold, d) for (_, gold), d in zip(pairs, decisions) if d.confidence >= t]
        at[str(t)] = {"coverage": round(len(kept) / len(pairs), 4),
                      "accuracy": round(sum(d.department == g for g, d in kept) / len(kept), 4) if kept else None}
    return {
        "n": len(pairs),
        "accuracy": round(correct / len(pairs), 4),
        "mean_confidence": round(float(np.mean([d.confidence for d in decisions])), 4),
        "mean_share": round(float(np.mean([d.share for d in decisions])), 4),
        "per_department": dict(sorted(per.items())),
        "confusion": {g: dict(sorted(c.items())) for g, c in sorted(confusion.items())},
        "at_confidence": at,
    }
