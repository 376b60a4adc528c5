"""A department's query adapter: a linear map on question embeddings, learned from its own questions.

The embedder is general-purpose; a department asks about its documents in its own words. The
adapter maps a question's embedding before the dense search, q' = normalise(W q), with W
(dim x dim) starting at the identity. Chunk vectors are untouched: one index serves every
department, nothing is re-embedded, and a department without an adapter searches as before.

Training (`train_query_adapter`) uses the department's training questions and its chunks in the
index: a question's positive is the chunk that contains its answer (in its gold document when it
names one; the one nearest the question when several do); its negatives are the other questions'
positives in the batch and hard negatives, the department's best BM25 and dense chunks that do
not contain the answer. The loss is InfoNCE over those, plus a pull of W towards the identity. A
held-out slice of the training questions picks the epoch by the span hit rate of the product's
own hybrid search, and the identity is always a candidate: an adapter that does not beat the
embedder as it is comes back as the identity, with that said in the report.

What it is good for (benchmarks/query_adapter.py): new questions about the documents the
training questions were about find their answer more often; on documents no training question
touched it helps a little or not at all, and a faster learning rate makes it hurt there.

On disk an adapter is one safetensors tensor ("weight") with its sha256 recorded by whoever
stores it (ragpt.softprompts keeps it beside a prompt version).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ragpt.data.documents import source_matches
from ragpt.data.qa import QAExample, normalize_answer, split_by_document
from ragpt.errors import RagptError

ADAPTER_KEY = "weight"


class QueryAdapterError(RagptError):
    """A query adapter that cannot be trained, read or applied."""


@dataclass
class QueryAdapter:
    """q' = normalise(weight @ q) for each question embedding q (rows of a float32 matrix)."""

    weight: np.ndarray  # (dim, dim), float32

    def __post_init__(self):
        w = np.asarray(self.weight, dtype=np.float32)
        if w.ndim != 2 or w.shape[0] != w.shape[1] or w.shape[0] < 1:
            raise QueryAdapterError(f"a query adapter is a square matrix, got shape {tuple(w.shape)}")
        if not np.isfinite(w).all():
            raise QueryAdapterError("a query adapter has non-finite values")
        self.weight = np.ascontiguousarray(w)

    @classmethod
    def identity(cls, dim: int) -> QueryAdapter:
        return cls(np.eye(dim, dtype=np.float32))

    @property
    def dim(self) -> int:
        return int(self.weight.shape[0])

    def apply(self, vectors: np.ndarray) -> np.ndarray:
        v = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        if v.shape[1] != self.dim:
            raise QueryAdapterError(f"query vectors have {v.shape[1]} dimensions, the adapter {self.dim}")
        out = v @ self.weight.T
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)

    def to_bytes(self) -> bytes:
        import torch
        from safetensors.torch import save

        return save({ADAPTER_KEY: torch.from_numpy(self.weight.copy())}, metadata={"format": "pt"})

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "query adapter") -> QueryAdapter:
        from safetensors.numpy import load

        try:
            tensors = load(data)
        except Exception as e:  # noqa: BLE001 - safetensors raises several kinds for a bad header
            raise QueryAdapterError(f"{where}: not a readable safetensors file ({e})") from None
        if set(tensors) != {ADAPTER_KEY}:
            raise QueryAdapterError(f"{where}: expected one tensor {ADAPTER_KEY!r}, found {sorted(tensors)[:5]}")
        w = tensors[ADAPTER_KEY]
        if w.dtype != np.float32:
            raise QueryAdapterError(f"{where}: dtype {w.dtype} (float32 expected)")
        return cls(w)

    def sha256(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()

    def check_fits(self, index, trained_with: str | None, where: str) -> None:
        """Refuse an adapter learned in another embedder's space than the index's (`trained_with`:
        the embedder name recorded with it)."""
        if self.dim != index.dim or (trained_with and trained_with != index.embedder_name):
            raise QueryAdapterError(f"{where}: its query adapter was trained for the embedder {trained_with!r} "
                                    f"({self.dim} dimensions); the index's embedder is {index.embedder_name!r} "
                                    f"({index.dim})")


# ------------------------------------------------------------------------------------ training


@dataclass
class AdapterConfig:
    epochs: int = 40
    batch_size: int = 64
    lr: float = 1e-3  # chosen on dev in benchmarks/query_adapter.py, with holdout "question"
    temperature: float = 0.05  # MiniLM's cosines spread over about 0.2-0.8
    identity_weight: float = 1.0  # the pull of W towards I: squared Frobenius distance, times this
    hard_negatives: int = 8  # per question: half from BM25, half from the dense ranker
    holdout_fraction: float = 0.15  # of the training questions, for choosing the epoch
    # "document": whole documents held out (the adapter must carry over to documents no training
    # question asked about); "question": questions held out, their documents seen in training.
    holdout: str = "question"
    eval_every: int = 5  # epochs
    seed: int = 0


@dataclass
class AdapterReport:
    questions: int  # training questions given
    with_positive: int  # of them, those whose answer is in one of the department's chunks
    train: int
    holdout: int
    hit_at_k_identity: float | None  # span hit@k of the held-out questions with the embedder as it is
    hit_at_k: float | None  # with the adapter kept (None: nothing was held out)
    chosen_epoch: int  # 0: the identity was kept
    k: int = 2
    curve: list[dict] = field(default_factory=list)

    @property
    def improved(self) -> bool:
        return self.chosen_epoch > 0


def split_by_question(examples: Sequence[QAExample], fraction: float, seed: int) -> tuple[list, list]:
    """A seeded share of the questions held out, whatever their documents; copies of one question
    (the same words about the same document) stay on one side."""
    train, held = _question_split(list(examples), fraction, seed)
    return [examples[i] for i in train], [examples[i] for i in held]


def _question_split(examples: list[QAExample], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    groups: dict[tuple, list[int]] = {}
    for i, q in enumerate(examples):
        groups.setdefault((normalize_answer(q.question), q.doc_id), []).append(i)
    keys = list(groups)
    random.Random(seed).shuffle(keys)
    want = round(fraction * len(examples))
    held: list[int] = []
    for key in keys:
        if len(held) >= want:
            break
        held += groups[key]
    chosen = set(held)
    return [i for i in range(len(examples)) if i not in chosen], sorted(held)


def _document_split(examples: list[QAExample], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """split_by_document, as positions (an example object may occur more than once)."""
    slots: dict[int, list[int]] = {}
    for i, q in enumerate(examples):
        slots.setdefault(id(q), []).append(i)
    train, held = split_by_document(examples, fraction, seed)
    return sorted(slots[id(q)].pop() for q in train), sorted(slots[id(q)].pop() for q in held)


def _contains(answers: Sequence[str], text_norm: str) -> bool:
    return any(a and a in text_norm for a in answers)


def positives(index, department: str, qas: Sequence[QAExample], question_vectors: np.ndarray
              ) -> list[tuple[int, int, set[int]]]:
    """(question position, positive chunk id, every chunk id holding the answer) per question whose
    answer (normalised) is in one of the department's chunks; its gold document's chunks first."""
    ids = index.allowed_ids(department)
    norm = {int(i): normalize_answer(index.chunks[int(i)].text) for i in ids}
    vecs = index.dense.vectors(ids) if len(ids) else np.zeros((0, question_vectors.shape[1]), np.float32)
    row = {int(i): r for r, i in enumerate(ids)}
    out = []
    for qi, qa in enumerate(qas):
        answers = [normalize_answer(a) for a in qa.answers]
        holding = {i for i, t in norm.items() if _contains(answers, t)}
        if not holding:
            continue
        gold = {i for i in holding if qa.doc_id and source_matches(index.chunks[i].source, qa.doc_id)}
        pool = sorted(gold or holding)
        sims = vecs[[row[i] for i in pool]] @ question_vectors[qi]
        out.append((qi, pool[int(np.argmax(sims))], holding))
    return out


def span_hit_rate(retriever, department: str, qas: Sequence[QAExample], vectors: np.ndarray, k: int,
                  filters: Sequence[dict | None] | None = None,
                  queries: Sequence[str] | None = None) -> tuple[float, list[float]]:
    """The share of questions with an answer in the first k passages of the hybrid search, and each
    one's hit; `queries` are what is searched with (default: the questions)."""
    if not qas:
        return 0.0, []
    found = retriever.search_many(list(queries) if queries is not None else [q.question for q in qas],
                                  [department] * len(qas), k,
                                  list(filters) if filters else None, query_vectors=vectors)
    # (ragpt.evaluation.metrics.answer_in_text's rule; retrieval may not import evaluation)
    hits = [float(any(_contains([normalize_answer(a) for a in q.answers], normalize_answer(h.chunk.text))
                      for h in f)) for q, f in zip(qas, found)]
    return float(np.mean(hits)), hits


def _hard_negatives(retriever, department: str, queries: Sequence[str], vectors: np.ndarray,
                    holding: list[set[int]], n: int, filters) -> list[list[int]]:
    """Per question, the first n//2 BM25 and n - n//2 dense chunks of the department without its answer."""
    depth = 4 * n + 10
    qs, ds = list(queries), [department] * len(queries)
    fl = list(filters) if filters else None
    bm = retriever.search_many(qs, ds, depth, fl, dense=False, bm25=True)
    de = retriever.search_many(qs, ds, depth, fl, query_vectors=vectors, dense=True, bm25=False)
    out = []
    for b, d, h in zip(bm, de, holding):
        neg: list[int] = []
        for hits, want in ((b, n // 2), (d, n - n // 2)):
            got = 0
            for x in hits:
                cid = x.chunk.id
                if got < want and cid not in h and cid not in neg:
                    neg.append(cid)
                    got += 1
        out.append(neg)
    return out


def train_query_adapter(retriever, department: str, qas: Sequence[QAExample], *,
                        config: AdapterConfig | None = None, k: int = 2,
                        filters: Sequence[dict | None] | None = None,
                        queries: Sequence[str] | None = None,
                        log: Callable[[str], None] = lambda m: None) -> tuple[QueryAdapter, AdapterReport]:
    """An adapter for `department` from its training questions (see the module doc).

    `queries` (one per question) are the texts searched with, as serving builds them (a follow-up's
    retrieval query holds earlier turns; default: the questions); `filters` (one per question, or
    None) restrict each search as it will be served (for example to its own policy document); `k`
    is the number of passages the model is given."""
    import torch

    cfg = config or AdapterConfig()
    index, embedder = retriever.index, retriever.embedder
    index.check_department(department)
    qas = list(qas)
    if filters is not None and len(filters) != len(qas):
        raise QueryAdapterError("one filter dict per question expected")
    fl = list(filters) if filters is not None else [None] * len(qas)
    texts = list(queries) if queries is not None else [q.question for q in qas]
    if len(texts) != len(qas):
        raise QueryAdapterError("one query per question expected")
    qvecs = np.asarray(embedder.encode(texts), dtype=np.float32)
    pos = positives(index, department, qas, qvecs)
    if len(pos) < 8:
        raise QueryAdapterError(f"{department}: only {len(pos)} training question(s) have their answer in one of "
                                "the department's chunks; a query adapter needs at least 8")
    keep = [qi for qi, _, _ in pos]
    by_q = {qi: (cid, h) for qi, cid, h in pos}
    if cfg.holdout not in ("document", "question"):
        raise QueryAdapterError(f"holdout must be 'document' or 'question', got {cfg.holdout!r}")
    answerable = [qas[i] for i in keep]
    split = _document_split if cfg.holdout == "document" else _question_split
    tr_pos, ho_pos = split(answerable, cfg.holdout_fraction, cfg.seed)
    tr, ho = [keep[j] for j in tr_pos], [keep[j] for j in ho_pos]
    if len(tr) < 8:
        raise QueryAdapterError(f"{department}: {len(tr)} question(s) left to train on after holding out "
                                f"{len(ho)} by {cfg.holdout} (all in one document?); a query adapter needs at least 8")
    log(f"{department}: {len(pos)} of {len(qas)} questions have their answer in a chunk; "
        f"{len(tr)} train, {len(ho)} held out")

    negs = _hard_negatives(retriever, department, [texts[i] for i in tr], qvecs[tr], [by_q[i][1] for i in tr],
                           cfg.hard_negatives, [fl[i] for i in tr])
    pos_ids = np.asarray([by_q[i][0] for i in tr], dtype=np.int64)
    all_ids = sorted({*pos_ids.tolist(), *(c for n in negs for c in n)})
    col = {c: j for j, c in enumerate(all_ids)}
    chunk_vecs = torch.from_numpy(index.dense.vectors(np.asarray(all_ids, dtype=np.int64)).astype(np.float32))
    q_t = torch.from_numpy(qvecs[tr])
    pos_col = torch.tensor([col[int(c)] for c in pos_ids])
    width = cfg.hard_negatives
    neg_col = torch.full((len(tr), width), -1, dtype=torch.long)
    for r, n in enumerate(negs):
        if n:
            neg_col[r, : len(n)] = torch.tensor([col[c] for c in n])
    # chunk j holds question r's answer: never its negative, in the batch or among the hard ones
    holds = [{col[c] for c in by_q[i][1] if c in col} for i in tr]

    dim = qvecs.shape[1]
    torch.manual_seed(cfg.seed)
    delta = torch.zeros(dim, dim, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.lr)
    eye = torch.eye(dim)
    rng = random.Random(cfg.seed)

    def evaluate(w: np.ndarray) -> float:
        ad = QueryAdapter(w)
        return span_hit_rate(retriever, department, [qas[i] for i in ho], ad.apply(qvecs[ho]), k,
                             [fl[i] for i in ho], [texts[i] for i in ho])[0]

    base = evaluate(np.eye(dim, dtype=np.float32)) if ho else float("nan")
    best = (base, 0, np.eye(dim, dtype=np.float32))
    curve = [{"epoch": 0, "holdout_hit": round(100 * base, 2)}]
    order = list(range(len(tr)))
    for epoch in range(1, cfg.epochs + 1):
        rng.shuffle(order)
        total = 0.0
        for s in range(0, len(order), cfg.batch_size):
            b = torch.tensor(order[s : s + cfg.batch_size])
            w = eye + delta
            q = torch.nn.functional.normalize(q_t[b] @ w.T, dim=1)
            cand = torch.cat([pos_col[b], neg_col[b].flatten()])
            cand = cand[cand >= 0].unique()
            logits = q @ chunk_vecs[cand].T / cfg.temperature
            at = {c: j for j, c in enumerate(cand.tolist())}
            target = torch.tensor([at[int(pos_col[r])] for r in b])
            mask = torch.zeros_like(logits, dtype=torch.bool)
            for row, r in enumerate(b.tolist()):
                for c in holds[r]:
                    j = at.get(c)
                    if j is not None and c != int(pos_col[r]):
                        mask[row, j] = True
            logits = logits.masked_fill(mask, float("-inf"))
            loss = torch.nn.functional.cross_entropy(logits, target)
            loss = loss + cfg.identity_weight * (delta**2).sum() / dim
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(b)
        if ho and (epoch % cfg.eval_every == 0 or epoch == cfg.epochs):
            w_np = (eye + delta).detach().numpy().astype(np.float32)
            hit = evaluate(w_np)
            curve.append({"epoch": epoch, "loss": round(total / len(order), 4), "holdout_hit": round(100 * hit, 2)})
            log(f"{department}: epoch {epoch}, loss {total / len(order):.4f}, held-out span hit@{k} {100 * hit:.1f}")
            if hit > best[0]:
                best = (hit, epoch, w_np)
    if not ho:  # nothing to choose on (a single document): the last epoch, said in the report
        best = (float("nan"), cfg.epochs, (eye + delta).detach().numpy().astype(np.float32))
    report = AdapterReport(questions=len(qas), with_positive=len(pos), train=len(tr), holdout=len(ho),
                           hit_at_k_identity=round(100 * base, 2) if ho else None,
                           hit_at_k=round(100 * best[0], 2) if ho else None,
                           chosen_epoch=best[1], k=k, curve=curve)
    return QueryAdapter(best[2]), report
