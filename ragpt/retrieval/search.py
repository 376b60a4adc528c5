"""Department-scoped hybrid retrieval: dense FAISS + BM25 (bm25s), fused by reciprocal rank.

Isolation is enforced *inside* both searches: FAISS gets an IDSelector of the chunks the
department may read (ragpt.retrieval.dense), and BM25 scores are masked to the same ids before ranking. So a
department always gets its own top-k, however rare its chunks are in a shared index, and
never sees another department's chunk.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import bm25s
import numpy as np

from ragpt.errors import EmptyQuestionError
from ragpt.lm.models import Embedder
from ragpt.retrieval.index import DocumentIndex, StoredChunk


@dataclass
class RetrievedChunk:
    chunk: StoredChunk
    score: float  # the ranking score: RRF when hybrid, else cosine or BM25
    rank: int  # 1-based
    dense_score: float | None = None
    bm25_score: float | None = None


def _bm25_tokenize(texts: list[str]) -> list[list[str]]:
    return bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)


def top_indices(scores: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n highest scores, best first, ties in index order: what a stable full sort
    gives, without sorting a large department's every score."""
    if len(scores) <= 4 * n:
        return np.argsort(-scores, kind="stable")[:n]
    cut = np.partition(-scores, n - 1)[n - 1]
    candidates = np.flatnonzero(-scores <= cut)  # every tie at the cut, in index order
    return candidates[np.argsort(-scores[candidates], kind="stable")[:n]]


class _Bm25:
    """BM25 over the index's chunks, rebuilt when the index changes (cheap next to embedding them)."""

    def __init__(self, index: DocumentIndex):
        self.version = index._version
        ordered = sorted(index.chunks)
        self.ids = np.asarray(ordered, dtype=np.int64)
        self.retriever = bm25s.BM25()
        corpus = [f"{index.chunks[i].title}\n{index.chunks[i].text}" for i in ordered]
        if corpus:
            self.retriever.index(_bm25_tokenize(corpus), show_progress=False)

    def scores(self, query: str) -> np.ndarray:
        tokens = _bm25_tokenize([query])[0]
        if not tokens or len(self.ids) == 0:
            return np.zeros(len(self.ids), dtype=np.float32)
        return np.asarray(self.retriever.get_scores(tokens), dtype=np.float32)


class Retriever:
    def __init__(
        self,
        index: DocumentIndex,
        embedder: Embedder,
        *,
        dense: bool = True,
        bm25: bool = True,
        rrf_k: int = 60,
    ):
        index.check_embedder(embedder.name, embedder.dim)
        if not (dense or bm25):
            raise ValueError("at least one of dense and bm25 must be on")
        self.index = index
        self.embedder = embedder
        self.dense = dense
        self.bm25 = bm25
        self.rrf_k = rrf_k
        self._bm25: _Bm25 | None = None

    def prepare(self) -> None:
        """Build the BM25 statistics now (when BM25 is on), not on the first query: a service
        calls this at start-up so that no request pays for it (about a minute per million chunks)."""
        if self.bm25:
            self._bm25_index()

    def _bm25_index(self) -> _Bm25:
        if self._bm25 is None or self._bm25.version != self.index._version:
            self._bm25 = _Bm25(self.index)
        return self._bm25

    def search(
        self,
        question: str,
        department: str,
        k: int = 3,
        filters: dict | None = None,
        *,
        query_vector: np.ndarray | None = None,
    ) -> list[RetrievedChunk]:
        return self.search_many([question], [department], k, filters, query_vectors=query_vector)[0]

    def search_many(
        self,
        questions: list[str],
        departments: list[str],
        k: int = 3,
        filters: dict | Sequence[dict | None] | None = None,
        *,
        query_vectors: np.ndarray | None = None,
        dense: bool | None = None,
        bm25: bool | None = None,
        rrf_k: int | None = None,
    ) -> list[list[RetrievedChunk]]:
        """Search several questions at once (one embedder batch), each with its own department
        and either shared filters (a dict) or one filter dict (or None) per question.

        `dense`, `bm25` and `rrf_k` override this retriever's mode for the call (a prompt
        version's input contract may name another mode than the settings)."""
        mode = (self.dense if dense is None else dense, self.bm25 if bm25 is None else bm25,
                self.rrf_k if rrf_k is None else rrf_k)
        if not (mode[0] or mode[1]):
            raise ValueError("at least one of dense and bm25 must be on")
        if len(questions) != len(departments):
            raise ValueError("one department per question expected")
        per_question = list(filters) if isinstance(filters, (list, tuple)) else [filters] * len(questions)
        if len(per_question) != len(questions):
            raise ValueError("one filter dict per question expected")
        for q in questions:
            if not isinstance(q, str) or not q.strip():
                raise EmptyQuestionError("the question is empty")
        for d in set(departments):
            self.index.check_department(d)
        vecs = None
        if mode[0]:
            vecs = query_vectors if query_vectors is not None else self.embedder.encode(list(questions))
            vecs = np.atleast_2d(vecs).astype(np.float32)
        return [
            self._search_one(q, d, k, f, None if vecs is None else vecs[i : i + 1], mode)
            for i, (q, d, f) in enumerate(zip(questions, departments, per_question))
        ]

    def _search_one(self, question, department, k, filters, qvec, mode) -> list[RetrievedChunk]:
        use_dense, use_bm25, rrf_k = mode
        allowed_set = self.index.allowed(department, filters)
        allowed = allowed_set.ids
        if len(allowed) == 0:
            return []
        # Candidates per ranker before fusion: deep enough that RRF can reorder them.
        n_cand = int(min(len(allowed), max(4 * k, 20)))
        dense_hits: list[tuple[int, float]] = []
        bm25_hits: list[tuple[int, float]] = []
        if use_dense:
            dense_hits = self.index.dense.search(qvec, n_cand, allowed_set)
        if use_bm25:
            bm = self._bm25_index()
            all_scores = bm.scores(question)
            pos = np.searchsorted(bm.ids, allowed)  # allowed ⊂ bm.ids, both sorted
            sub = all_scores[pos]
            top = top_indices(sub, n_cand)
            bm25_hits = [(int(allowed[j]), float(sub[j])) for j in top if sub[j] > 0]

        dense_map = dict(dense_hits)
        bm25_map = dict(bm25_hits)
        if use_dense and use_bm25:
            fused: dict[int, float] = {}
            for hits in (dense_hits, bm25_hits):
                for r, (cid, _) in enumerate(hits, start=1):
                    fused[cid] = fused.get(cid, 0.0) + 1.0 / (rrf_k + r)
            ranked = sorted(fused.items(), key=lambda kv: (-kv[1], kv[0]))
        else:
            ranked = dense_hits if use_dense else bm25_hits
        return [
            RetrievedChunk(
                chunk=self.index.chunks[cid],
                score=score,
                rank=r,
                dense_score=dense_map.get(cid),
                bm25_score=bm25_map.get(cid),
            )
            for r, (cid, score) in enumerate(ranked[:k], start=1)
        ]
