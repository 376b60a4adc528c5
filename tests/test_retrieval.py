"""Department-scoped retrieval (real embedder): quality on the sample corpus, isolation, filters."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import write

from ragpt.data.documents import source_matches
from ragpt.data.ingest import ingest
from ragpt.data.sample import SAMPLE_DEPARTMENTS, sample_questions
from ragpt.errors import RagptError
from ragpt.retrieval.index import DocumentIndex
from ragpt.retrieval.search import Retriever

pytestmark = pytest.mark.integration

MODES = {"hybrid": (True, True), "dense only": (True, False), "bm25 only": (False, True)}


@pytest.fixture(scope="module")
def sample(sample_index, real_embedder):
    settings, name = sample_index
    return DocumentIndex.open(settings.index_dir, name)


def test_sample_index_holds_every_department(sample):
    assert sample.departments == sorted(SAMPLE_DEPARTMENTS)
    for q in sample_questions():
        assert any(source_matches(s, q.source) for s in sample.manifest["documents"]), q.source


def test_gold_source_is_in_top_3_for_90_percent_of_sample_questions(sample, real_embedder):
    questions = sample_questions()
    assert len(questions) == 60
    rates = {}
    misses = {}
    for mode, (dense, bm25) in MODES.items():
        r = Retriever(sample, real_embedder, dense=dense, bm25=bm25)
        results = r.search_many([q.question for q in questions], [q.department for q in questions], k=3)
        hit = [any(source_matches(h.chunk.source, q.source) for h in hits) for q, hits in zip(questions, results)]
        rates[mode] = sum(hit) / len(hit)
        misses[mode] = [q.question for q, ok in zip(questions, hit) if not ok]
        for q, hits in zip(questions, results):
            assert len(hits) == 3
            assert all(q.department in h.chunk.departments for h in hits)
    report = ", ".join(f"{m}: {100 * v:.0f}%" for m, v in rates.items())
    assert rates["hybrid"] >= 0.9, f"gold source in top-3: {report}; hybrid misses: {misses['hybrid']}"
    assert min(rates.values()) >= 0.75, f"gold source in top-3: {report}"
    print(f"\ngold source in top-3 over {len(questions)} sample questions: {report}")


def test_search_many_equals_search_one_by_one(sample, real_embedder):
    questions = sample_questions()[::7]
    r = Retriever(sample, real_embedder)
    batch = r.search_many([q.question for q in questions], [q.department for q in questions], k=4)
    for q, hits in zip(questions, batch):
        single = r.search(q.question, q.department, k=4)
        assert [h.chunk.id for h in hits] == [h.chunk.id for h in single]
        assert [h.rank for h in hits] == [1, 2, 3, 4]
        scores = [h.score for h in hits]
        assert scores == sorted(scores, reverse=True)


# --------------------------------------------------------------------------- isolation

QUERY = "What is the quarterly revenue forecast for the robotics division?"


@pytest.fixture(scope="module")
def isolation_index(tmp_path_factory, real_embedder):
    """'big' holds 30 documents that literally contain the query; 'small' two weak matches."""
    tmp = tmp_path_factory.mktemp("isolation")
    big = [
        write(tmp / "big" / f"forecast-{i:02d}.txt",
              f"Forecast note {i}\n{QUERY} The quarterly revenue forecast for the robotics "
              f"division is EUR {10 + i} million for quarter {i % 4 + 1}.")
        for i in range(30)
    ]
    small = [
        write(tmp / "small" / "cafeteria.txt",
              "Cafeteria\nThe cafeteria of the robotics division serves soup on Mondays."),
        write(tmp / "small" / "parking.txt",
              "Parking\nVisitors of the division park on garage level 2."),
    ]
    root = tmp / "indexes"
    ingest(root, "iso", big, ["big"], real_embedder, chunk_tokens=64, chunk_overlap=16, progress=False)
    ingest(root, "iso", small, ["small"], real_embedder, chunk_tokens=64, chunk_overlap=16, progress=False)
    idx = DocumentIndex.open(root, "iso")
    small_ids = {c.id for c in idx.chunks.values() if "small" in c.departments}
    big_ids = {c.id for c in idx.chunks.values() if "big" in c.departments}
    assert len(small_ids) == 2 and len(big_ids) == 30 and not small_ids & big_ids
    return idx, small_ids, big_ids


@pytest.mark.parametrize("mode", list(MODES))
def test_small_department_gets_all_and_only_its_own_chunks(isolation_index, real_embedder, mode):
    idx, small_ids, big_ids = isolation_index
    dense, bm25 = MODES[mode]
    r = Retriever(idx, real_embedder, dense=dense, bm25=bm25)
    # Unfiltered, the big department's chunks are far more similar to the query.
    assert {h.chunk.id for h in r.search(QUERY, "big", k=3)} <= big_ids
    hits = r.search(QUERY, "small", k=3)
    assert {h.chunk.id for h in hits} == small_ids  # both of its 2 chunks, nothing else
    assert [h.rank for h in hits] == [1, 2]


@pytest.mark.parametrize("mode", list(MODES))
def test_big_department_never_gets_the_small_departments_chunks(isolation_index, real_embedder, mode):
    idx, small_ids, big_ids = isolation_index
    dense, bm25 = MODES[mode]
    r = Retriever(idx, real_embedder, dense=dense, bm25=bm25)
    for query in (QUERY, "cafeteria soup on Mondays", "visitors park on garage level 2"):
        for k in (3, 50):
            hits = r.search(query, "big", k=k)
            assert {h.chunk.id for h in hits} <= big_ids, (query, k)
            if dense or query == QUERY:  # BM25 returns only chunks sharing a query term
                assert hits, (query, k)
    # Asked for more than it has, big gets all of its chunks that match (all 30 contain the query).
    assert {h.chunk.id for h in r.search(QUERY, "big", k=50)} == big_ids


# --------------------------------------------------------------------------- metadata filters


def _doc_with_most_chunks(idx: DocumentIndex, department: str) -> str:
    counts: dict[str, int] = {}
    for c in idx.chunks.values():
        if department in c.departments:
            counts[c.source] = counts.get(c.source, 0) + 1
    return max(sorted(counts), key=counts.get)


@pytest.mark.parametrize("mode", list(MODES))
def test_source_filter_returns_only_that_documents_chunks_and_still_k(sample, real_embedder, mode):
    dense, bm25 = MODES[mode]
    r = Retriever(sample, real_embedder, dense=dense, bm25=bm25)
    source = _doc_with_most_chunks(sample, "hr")
    n_doc = sum(c.source == source for c in sample.chunks.values())
    assert n_doc >= 3
    title = sample.manifest["documents"][source]["title"]
    # A question about the document, phrased with its title, so BM25 scores all its chunks.
    hits = r.search(f"{title} {title}: what does it say?", "hr", k=3, filters={"source": source})
    assert len(hits) == 3
    assert {h.chunk.source for h in hits} == {source}
    # Off-topic question: the filter still applies before top-k (dense gives all k).
    off = r.search("How do I connect to the VPN from home?", "hr", k=3, filters={"source": source})
    assert {h.chunk.source for h in off} <= {source}
    if dense:
        assert len(off) == 3


def test_filter_by_title_and_by_several_sources(sample, real_embedder):
    r = Retriever(sample, real_embedder)
    docs = sample.manifest["documents"]
    hr_docs = sorted(s for s, d in docs.items() if d["departments"] == ["hr"])[:2]
    hits = r.search("What is the policy?", "hr", k=20, filters={"source": hr_docs})
    assert {h.chunk.source for h in hits} == set(hr_docs)
    assert len(hits) == sum(c.source in hr_docs for c in sample.chunks.values())
    title = docs[hr_docs[0]]["title"]
    assert {h.chunk.title for h in r.search("policy", "hr", k=5, filters={"title": title})} == {title}


def test_filter_cannot_reach_another_departments_document(sample, real_embedder):
    r = Retriever(sample, real_embedder)
    it_doc = _doc_with_most_chunks(sample, "it")
    assert r.search("How do I reset my password?", "hr", k=3, filters={"source": it_doc}) == []


def test_unknown_filter_field_is_an_error(sample, real_embedder):
    r = Retriever(sample, real_embedder)
    with pytest.raises(RagptError, match="departments"):
        r.search("anything", "hr", filters={"departments": "it"})


def test_retriever_needs_a_ranker(sample, real_embedder):
    with pytest.raises(ValueError):
        Retriever(sample, real_embedder, dense=False, bm25=False)


def test_retrieval_sees_in_memory_index_changes(tmp_path, real_embedder):
    # BM25 is rebuilt when the index changes; dense search follows FAISS directly.
    a = write(tmp_path / "a.txt", "Kiosk\nThe kiosk sells pretzels.")
    root = tmp_path / "idx"
    ingest(root, "x", [a], ["hr"], real_embedder, chunk_tokens=64, chunk_overlap=16, progress=False)
    idx = DocumentIndex.open(root, "x")
    r = Retriever(idx, real_embedder, dense=False, bm25=True)
    assert [h.chunk.source for h in r.search("pretzels", "hr")] == [idx.chunks[0].source]
    idx.remove_source(idx.chunks[0].source)
    with pytest.raises(RagptError):
        r.search("pretzels", "hr")  # the department has no documents left
    assert Path(root / "x" / "CURRENT").is_file()  # in-memory change: nothing written
