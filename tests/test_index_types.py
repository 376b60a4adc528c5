"""Index types (flat, ivf, auto): the department filter inside approximate search, incremental
add/delete, snapshots and checksums, the automatic choice by size, and that an ivf index answers
a department's questions as the flat one does."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

from ragpt.data.documents import Chunk
from ragpt.errors import IndexCorruptError, RagptError
from ragpt.retrieval import dense as dense_mod
from ragpt.retrieval.dense import EXACT_MAX, AllowedIds, DenseIndex, ivf_lists
from ragpt.retrieval.index import DocumentIndex, index_lock
from ragpt.retrieval.search import Retriever

DIM = 32


def _clustered(n: int, seed: int = 0, centers: int = 40) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, DIM)).astype(np.float32)
    x = c[rng.integers(0, centers, n)] + 0.35 * rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _chunks(n: int, departments: list[list[str]], prefix: str = "doc") -> list[Chunk]:
    """n chunks, 50 to a document named prefix<N>.txt."""
    return [Chunk(text=f"chunk {i}", source=f"{prefix}{i // 50}.txt", title="", chunk=i % 50,
                  start=0, end=1, doc_sha256="0" * 64, departments=departments[i], doc=f"{prefix}{i // 50}.txt")
            for i in range(n)]


def _build(root, n: int, index_type: str, seed: int = 0) -> tuple[DocumentIndex, np.ndarray]:
    """n clustered vectors: department big (70%), mid (25%), rare (5%), assigned at random."""
    rng = np.random.default_rng(seed + 1)
    depts = [["big"], ["mid"], ["rare"]]
    assigned = [depts[j] for j in rng.choice(3, n, p=[0.70, 0.25, 0.05])]
    x = _clustered(n, seed)
    idx = DocumentIndex.empty(root, "t", "synthetic", DIM, {}, index_type=index_type)
    idx.add(_chunks(n, assigned), x)
    for key in {f"doc{i // 50}.txt" for i in range(n)}:
        idx.documents[key] = {"source": key, "departments": [], "sha256": "0" * 64}
    with index_lock(root, "t"):
        idx.save()
    return idx, x


def _exact_top(idx: DocumentIndex, x: np.ndarray, q: np.ndarray, dept: str, k: int) -> list[int]:
    ids = idx.allowed_ids(dept)
    s = x[ids] @ q
    return ids[np.argsort(-s, kind="stable")[:k]].tolist()


def test_ivf_keeps_each_department_inside_its_chunks_and_finds_its_top_k(tmp_path):
    idx, x = _build(tmp_path, 12000, "ivf")
    assert idx.dense.kind == "ivf" and idx.manifest["dense"]["type"] == "ivf"
    assert idx.manifest["dense"]["nlist"] == ivf_lists(12000)
    queries = _clustered(60, seed=7)
    for dept in ("big", "mid", "rare"):
        allowed = idx.allowed(dept)
        assert (len(allowed) > EXACT_MAX) == (dept != "rare")  # both search paths are exercised
        found = 0
        for q in queries:
            hits = idx.dense.search(q[None], 10, allowed)
            ids = [i for i, _ in hits]
            assert len(ids) == 10 and set(ids) <= set(allowed.ids.tolist())
            assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)
            found += len(set(ids) & set(_exact_top(idx, x, q, dept, 10)))
        recall = found / (10 * len(queries))
        assert recall >= (1.0 if dept == "rare" else 0.95), (dept, recall)


def test_nprobe_grows_as_the_filter_gets_more_selective_up_to_every_list(tmp_path):
    idx, _ = _build(tmp_path, 6000, "ivf")
    probes = [idx.dense.nprobe_for(n) for n in (6000, 1500, 300, 30, 1)]
    assert probes == sorted(probes) and probes[0] >= dense_mod.NPROBE_MIN and probes[-1] == idx.dense.index.nlist
    assert len(set(probes)) > 2


def test_ivf_index_survives_reopen_delete_and_add(tmp_path):
    idx, x = _build(tmp_path, 3000, "ivf")
    reopened = DocumentIndex.open(tmp_path, "t")
    assert reopened.dense.kind == "ivf"
    assert np.allclose(reopened.dense.vectors(np.array([5, 17])), x[[5, 17]])
    gone = reopened.remove_document("doc0.txt")
    assert gone == 50 and reopened.dense.ntotal == 2950
    q = x[3][None]  # doc0's own chunk: once deleted, no department may get it back
    for dept in ("big", "mid", "rare"):
        assert not {i for i, _ in reopened.dense.search(q, 20, reopened.allowed(dept))} & set(range(50))
    reopened.add(_chunks(10, [["rare"]] * 10, prefix="new"), _clustered(10, seed=9))
    with index_lock(tmp_path, "t"):
        reopened.save()
    again = DocumentIndex.open(tmp_path, "t")
    assert again.dense.kind == "ivf" and again.dense.ntotal == 2960
    assert set(again.dense.ids().tolist()) == set(again.chunks)


def test_auto_switches_to_ivf_past_the_threshold_and_back_well_below_it(tmp_path, monkeypatch):
    monkeypatch.setattr(dense_mod, "AUTO_IVF_MIN", 1000)
    idx, _ = _build(tmp_path, 900, "auto")
    assert idx.dense.kind == "flat" and idx.manifest["dense"] == {"requested": "auto", "type": "flat"}
    idx.add(_chunks(200, [["big"]] * 200, prefix="more"), _clustered(200, seed=3))
    with index_lock(tmp_path, "t"):
        idx.save()
    assert DocumentIndex.open(tmp_path, "t").dense.kind == "ivf"
    # Hysteresis: just below the threshold it stays ivf, well below it goes back to flat.
    idx.remove_document("doc0.txt")
    with index_lock(tmp_path, "t"):
        idx.save()
    assert idx.dense.ntotal == 1050 and idx.dense.kind == "ivf"
    for i in range(1, 13):
        idx.remove_document(f"doc{i}.txt")
    with index_lock(tmp_path, "t"):
        idx.save()
    assert idx.dense.ntotal == 450 and DocumentIndex.open(tmp_path, "t").dense.kind == "flat"


def test_ivf_retrains_when_the_index_has_grown_far_past_its_training(tmp_path):
    idx, _ = _build(tmp_path, 500, "ivf")
    first = idx.manifest["dense"]
    assert first["trained_on"] == 500
    idx.add(_chunks(2500, [["big"]] * 2500, prefix="more"), _clustered(2500, seed=4))
    with index_lock(tmp_path, "t"):
        idx.save()
    assert idx.manifest["dense"]["trained_on"] == 3000 and idx.manifest["dense"]["nlist"] == ivf_lists(3000)


def test_index_type_is_validated_and_a_damaged_dense_section_is_reported(tmp_path):
    with pytest.raises(RagptError, match="unknown index type"):
        DocumentIndex.empty(tmp_path, "t", "synthetic", DIM, {}, index_type="hnsw")
    _build(tmp_path, 100, "flat")
    folder = tmp_path / "t"
    snap = folder / (folder / "CURRENT").read_text().strip()
    manifest = json.loads((snap / "manifest.json").read_text())
    manifest["dense"] = {"requested": "annoy"}
    (snap / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexCorruptError, match="invalid dense section"):
        DocumentIndex.open(tmp_path, "t")


def test_allowed_ids_selectors_match_their_ids(monkeypatch):
    bound = 10_000
    monkeypatch.setattr(dense_mod, "BITMAP_MAX_BITS", 1000)  # so that a small set gets a hash set
    for ids in (np.arange(0, bound, 3), np.array([5, 77, 9000])):  # a bitmap, then a hash set
        allowed = AllowedIds(ids, bound)
        sel = allowed.selector
        assert isinstance(sel, faiss.IDSelectorBitmap) == (len(ids) > 1000)
        members = [i for i in range(0, bound, 7) if sel.is_member(i)]
        assert members == [i for i in range(0, bound, 7) if i in set(ids.tolist())]


@pytest.mark.integration
def test_an_ivf_index_of_the_sample_corpus_retrieves_what_the_flat_one_does(sample_index, real_embedder, tmp_path):
    settings, name = sample_index
    flat = DocumentIndex.open(settings.index_dir, name)
    ivf = DocumentIndex(tmp_path, name, dict(flat.manifest), DenseIndex.build(
        "ivf", flat.dim, flat.dense.ids(), flat.dense.vectors(flat.dense.ids())), list(flat.chunks.values()))
    questions = ["How many vacation days do I get?", "How long must a password be?",
                 "Who approves an invoice above EUR 50,000?"]
    for dept in flat.departments:
        a = Retriever(flat, real_embedder).search_many(questions, [dept] * 3, k=4)
        b = Retriever(ivf, real_embedder).search_many(questions, [dept] * 3, k=4)
        for ra, rb in zip(a, b):
            assert [r.chunk.id for r in ra] == [r.chunk.id for r in rb]
            assert np.allclose([r.dense_score or 0 for r in ra], [r.dense_score or 0 for r in rb], atol=1e-5)


def test_top_indices_is_the_stable_full_sort_ties_included():
    from ragpt.retrieval.search import top_indices

    rng = np.random.default_rng(0)
    for scores in (rng.integers(0, 5, 1000).astype(np.float32), rng.standard_normal(1000).astype(np.float32),
                   np.zeros(1000, dtype=np.float32), rng.standard_normal(30).astype(np.float32)):
        for n in (1, 7, 20):
            assert top_indices(scores, n).tolist() == np.argsort(-scores, kind="stable")[:n].tolist()


def test_a_department_far_from_the_query_still_gets_its_top_k_from_ivf(tmp_path):
    """A topical department (all its chunks in one region) asked an off-topic question: the lists
    nearest the query hold none of its chunks (the first pass finds 0 of 20), and the search widens
    to every list."""
    n = 12000
    x = _clustered(n, seed=5)
    far = _clustered(1, seed=99)[0]
    order = np.argsort(x @ far)  # the chunks least like `far` first
    depts = [["other"]] * n
    for i in order[:3000]:
        depts[i] = ["topical"]
    idx = DocumentIndex.empty(tmp_path, "t", "synthetic", DIM, {}, index_type="ivf")
    idx.add(_chunks(n, depts), x)
    for key in {f"doc{i // 50}.txt" for i in range(n)}:
        idx.documents[key] = {"source": key, "departments": [], "sha256": "0" * 64}
    with index_lock(tmp_path, "t"):
        idx.save()
    allowed = idx.allowed("topical")
    assert len(allowed) == 3000 > EXACT_MAX
    hits = idx.dense.search(far[None], 20, allowed)
    assert len(hits) == 20 and {i for i, _ in hits} <= set(allowed.ids.tolist())
    assert [i for i, _ in hits] == _exact_top(idx, x, far, "topical", 20)


def test_an_id_past_the_bitmap_is_not_selected():
    allowed = AllowedIds(np.array([0, 5]), 8)  # a one-byte bitmap
    assert [i for i in range(80) if allowed.selector.is_member(i)] == [0, 5]


def test_equal_scores_rank_in_id_order_on_every_path(tmp_path):
    v = _clustered(1, seed=3)
    x = np.repeat(v, 40, axis=0)  # 40 identical chunks
    for kind in ("flat", "ivf"):
        dense = DenseIndex.build(kind, DIM, np.arange(100, 140), x)
        hits = dense.search(v, 5, AllowedIds(np.arange(100, 140), 140))
        assert [i for i, _ in hits] == [100, 101, 102, 103, 104], kind


def test_an_index_that_asked_for_hnsw_opens_as_auto(tmp_path):
    _build(tmp_path, 100, "flat")
    folder = tmp_path / "t"
    snap = folder / (folder / "CURRENT").read_text().strip()
    manifest = json.loads((snap / "manifest.json").read_text())
    manifest["dense"]["requested"] = "hnsw"
    (snap / "manifest.json").write_text(json.dumps(manifest))
    idx = DocumentIndex.open(tmp_path, "t")
    assert idx.manifest["dense"]["requested"] == "auto" and idx.dense.kind == "flat"
