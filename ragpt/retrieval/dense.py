"""The dense half of an index: chunk vectors in a FAISS structure, searched inside a department.

Two structures, chosen per index (the `index_type` setting, or `ragpt ingest --index-type`):

* flat: IndexIDMap2(IndexFlatIP), exact; its cost grows with the whole index.
* ivf: IndexIVFFlat (inner product, ids stored in the lists, a hashtable direct map so that
  vectors can be read back and removed by id). Approximate: a query scans the `nprobe` lists
  nearest to it. Built (k-means) from the index's own vectors, and rebuilt when the index has
  grown or shrunk far past the size it was trained at.
* auto: flat below AUTO_IVF_MIN chunks, ivf from there on (benchmarks/index_scale.py).

The department filter sits inside the search (a FAISS IDSelector over the ids the department may
read), so a department gets its own top-k however rare its chunks are. For ivf the number of
lists scanned grows as the filter gets more selective, so that the scan still meets enough of
the department's chunks; a department with few chunks is scored exactly from its own vectors
(flat is exact anyway).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import faiss
import numpy as np

DENSE_TYPES = ("flat", "ivf")
# Below this many chunks a flat scan is fast enough and exact; from here on auto builds ivf.
AUTO_IVF_MIN = 50_000
# ivf is rebuilt when the index has grown or shrunk by this factor since it was trained.
RETRAIN_FACTOR = 4
# ivf search: at least NPROBE_MIN lists, and enough lists to meet about MIN_MEMBERS of the
# department's chunks when they are spread evenly over the lists.
NPROBE_MIN = 32
MIN_MEMBERS = 1024
# A department with at most this many chunks is scored exactly from its own vectors.
EXACT_MAX = 2048
TRAIN_POINTS_PER_LIST = 40
# A department's selector is a bitmap over all ids up to this many (1 MB); past it, a department
# holding under 1/64 of the ids gets a hash set, which is smaller but slower to test.
BITMAP_MAX_BITS = 8 * 2**20


def ivf_lists(n: int) -> int:
    """The number of ivf lists for n vectors: the power of two nearest 4 * sqrt(n)."""
    want = 4 * math.sqrt(max(n, 1))
    return int(min(65536, max(16, 2 ** round(math.log2(want)))))


class AllowedIds:
    """The sorted ids a search may return, with the FAISS selector that enforces them.

    The selector is built here, once: a cached AllowedIds is shared by the threads of a service,
    and a selector built lazily by two of them at once could point into a freed bitmap."""

    def __init__(self, ids: np.ndarray, id_bound: int):
        self.ids = np.ascontiguousarray(ids, dtype=np.int64)
        bound = max(int(id_bound), int(self.ids[-1]) + 1 if len(self.ids) else 0, 1)
        if bound <= BITMAP_MAX_BITS or len(self.ids) * 64 >= bound:
            # A bitmap over every id: one bit test per scanned vector, the fastest check.
            bitmap = np.zeros((bound + 7) // 8, dtype=np.uint8)
            np.bitwise_or.at(bitmap, self.ids >> 3, (1 << (self.ids & 7)).astype(np.uint8))
            self._keep = bitmap  # the selector points into it: kept alive as long as the selector
            # FAISS's bitmap size is in bytes; an id past the bitmap is not selected.
            self.selector: faiss.IDSelector = faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))
        else:  # few ids: a hash set is smaller than the bitmap (it copies the ids)
            self._keep = None
            self.selector = faiss.IDSelectorBatch(self.ids)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class DenseIndex:
    """A FAISS structure over chunk ids; `kind` is "flat" or "ivf"."""

    index: faiss.Index
    trained_on: int = 0  # ivf: how many vectors its lists were trained on

    # ------------------------------------------------------------------ construction
    @classmethod
    def flat(cls, dim: int) -> DenseIndex:
        return cls(faiss.IndexIDMap2(faiss.IndexFlatIP(int(dim))))

    @classmethod
    def wrap(cls, index: faiss.Index, meta: dict | None = None) -> DenseIndex:
        """A structure read from disk, with the manifest's record of it."""
        # faiss.read_index returns the concrete class already. (downcast_index would make a second
        # wrapper that does not own the C++ object: the first one's collection would free it.)
        if isinstance(index, faiss.IndexIVF):
            index.set_direct_map_type(faiss.DirectMap.Hashtable)  # written with it; idempotent
        return cls(index, trained_on=int((meta or {}).get("trained_on", index.ntotal)))

    @classmethod
    def build(cls, kind: str, dim: int, ids: np.ndarray, vectors: np.ndarray, *, seed: int = 0) -> DenseIndex:
        """A new structure of `kind` holding `vectors` under `ids`."""
        if kind not in DENSE_TYPES:
            raise ValueError(f"unknown dense index type {kind!r}")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if kind == "flat":
            out = cls.flat(dim)
            if len(ids):
                out.index.add_with_ids(vectors, ids)
            return out
        nlist = ivf_lists(len(ids))
        quantizer = faiss.IndexFlatIP(int(dim))
        ivf = faiss.IndexIVFFlat(quantizer, int(dim), nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.cp.seed = seed
        ivf.cp.min_points_per_centroid = 1  # small indexes train on what they have, without a warning
        n_train = min(len(vectors), TRAIN_POINTS_PER_LIST * nlist)
        sample = vectors
        if n_train < len(vectors):
            sample = vectors[np.sort(np.random.default_rng(seed).choice(len(vectors), n_train, replace=False))]
        ivf.train(sample)
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
        ivf.add_with_ids(vectors, ids)
        return cls(ivf, trained_on=len(ids))

    # ------------------------------------------------------------------ facts
    @property
    def kind(self) -> str:
        return "ivf" if isinstance(self.index, faiss.IndexIVF) else "flat"

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def meta(self) -> dict:
        """What the manifest records about the structure."""
        out: dict = {"type": self.kind}
        if self.kind == "ivf":
            out.update(nlist=int(self.index.nlist), trained_on=self.trained_on)
        return out

    def ids(self) -> np.ndarray:
        """Every stored id (in storage order)."""
        if self.kind == "flat":
            return faiss.vector_to_array(self.index.id_map).astype(np.int64)
        invlists = self.index.invlists
        parts = [faiss.rev_swig_ptr(invlists.get_ids(i), invlists.list_size(i)).copy()
                 for i in range(self.index.nlist) if invlists.list_size(i)]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """The stored vectors of `ids` (KeyError-like RuntimeError from FAISS for an unknown id)."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.asarray(self.index.reconstruct_batch(ids), dtype=np.float32)

    # ------------------------------------------------------------------ mutation
    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32),
                                np.ascontiguousarray(ids, dtype=np.int64))

    def remove(self, ids: np.ndarray) -> None:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if not len(ids):
            return
        if self.kind == "ivf":
            # The ivf's hashtable direct map removes only through an IDSelectorArray (by lookup).
            self.index.remove_ids(faiss.IDSelectorArray(len(ids), faiss.swig_ptr(ids)))
        else:  # flat tests every stored id: a hash set, not a linear scan of `ids` per vector
            self.index.remove_ids(faiss.IDSelectorBatch(ids))

    def fitted(self, requested: str) -> DenseIndex:
        """This structure, or a rebuilt one, as `requested` (auto, flat, ivf) wants it now."""
        want = requested
        if requested == "auto":
            # Hysteresis: an auto ivf goes back to flat only well below the threshold.
            floor = AUTO_IVF_MIN // 2 if self.kind == "ivf" else AUTO_IVF_MIN
            want = "ivf" if self.ntotal >= floor else "flat"
        if want == "ivf" and self.ntotal < 2 * 16:
            want = "flat"  # too few vectors to train lists on
        if want == self.kind and (want == "flat" or not self._needs_retraining()):
            return self
        ids = self.ids()
        return DenseIndex.build(want, self.dim, ids, self.vectors(ids))

    def _needs_retraining(self) -> bool:
        n, t = self.ntotal, max(self.trained_on, 1)
        return n > RETRAIN_FACTOR * t or n * RETRAIN_FACTOR < t

    # ------------------------------------------------------------------ search
    def nprobe_for(self, n_allowed: int) -> int:
        """ivf: lists to scan so that about MIN_MEMBERS allowed chunks are met."""
        nlist = int(self.index.nlist)
        per_list = max(self.ntotal / nlist, 1e-9)
        share = max(n_allowed / max(self.ntotal, 1), 1e-12)
        need = math.ceil(MIN_MEMBERS / (per_list * share))
        return int(min(nlist, max(NPROBE_MIN, need)))

    def search(self, query: np.ndarray, k: int, allowed: AllowedIds) -> list[tuple[int, float]]:
        """The top `k` (id, inner product) among `allowed`, best first."""
        q = np.ascontiguousarray(np.atleast_2d(query), dtype=np.float32)
        n = len(allowed)
        if n == 0 or k <= 0:
            return []
        if n <= EXACT_MAX and self.kind == "ivf":
            scores = self.vectors(allowed.ids) @ q[0]
            top = np.argsort(-scores, kind="stable")[:k]
            return [(int(allowed.ids[j]), float(scores[j])) for j in top]
        want = int(min(k, n))
        if self.kind == "ivf":
            nprobe = self.nprobe_for(n)
            hits = self._search(q, want, faiss.SearchParametersIVF(sel=allowed.selector, nprobe=nprobe))
            if len(hits) < want and nprobe < self.index.nlist:
                # The lists nearest the query hold too few of the department's chunks (a department
                # whose documents sit elsewhere in the space): scan every list, which is exact.
                hits = self._search(q, want, faiss.SearchParametersIVF(sel=allowed.selector, nprobe=self.index.nlist))
            return hits
        return self._search(q, want, faiss.SearchParameters(sel=allowed.selector))

    def _search(self, q: np.ndarray, k: int, params) -> list[tuple[int, float]]:
        scores, ids = self.index.search(q, k, params=params)
        hits = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]
        # Equal scores (duplicate chunks) in id order, as the exact path and BM25 rank them.
        return sorted(hits, key=lambda h: (-h[1], h[0]))
