"""Ingesting into an on-disk index (real embedder): manifest, updates, deletes, sharing, errors."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import faiss
import numpy as np
import pytest
from conftest import write

from ragpt.data.ingest import delete_documents, ingest
from ragpt.errors import (
    DocumentError,
    EmbedderMismatchError,
    EmptyQuestionError,
    IndexCorruptError,
    IndexNotFoundError,
    RagptError,
    UnknownDepartmentError,
)
from ragpt.retrieval.index import DocumentIndex
from ragpt.retrieval.search import Retriever

pytestmark = pytest.mark.integration

NAME = "test"

VACATION = """# Vacation Policy

Full-time employees receive 28 vacation days per calendar year. Requests go through the
HolidayDesk portal at least two weeks in advance. The approval code for vacation is ALPHA-7.

Unused vacation days may be carried over until 31 March of the following year.
"""

PASSWORDS = """Password Policy
Passwords must have at least 14 characters and are rotated every 180 days.
Never share your password with colleagues. Use the company password manager KeyVault.
"""

INVOICES = """<html><head><title>Invoice Approval Limits</title></head><body>
<p>Invoices up to EUR 5,000 are approved by the cost centre owner.</p>
<p>Invoices above EUR 50,000 need the CFO's signature.</p></body></html>"""


def _ingest(root, paths, departments, embedder, **kw):
    kw.setdefault("chunk_tokens", 64)
    kw.setdefault("chunk_overlap", 16)
    return ingest(root, NAME, [Path(p) for p in paths], departments, embedder, progress=False, **kw)


def _state(root: Path) -> tuple[str | None, list[str]]:
    """The live snapshot and every file of the index folder: 'nothing written' compares these."""
    folder = Path(root) / NAME
    current = (folder / "CURRENT").read_text() if (folder / "CURRENT").is_file() else None
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []
    return current, files


def _snapshot(root: Path) -> Path:
    folder = Path(root) / NAME
    return folder / (folder / "CURRENT").read_text().strip()


@pytest.fixture
def corpus(tmp_path):
    d = tmp_path / "docs"
    return {
        "vacation": write(d / "hr" / "vacation.md", VACATION),
        "passwords": write(d / "it" / "passwords.txt", PASSWORDS),
        "invoices": write(d / "finance" / "invoices.html", INVOICES),
    }


@pytest.fixture
def root(tmp_path):
    return tmp_path / "indexes"


# --------------------------------------------------------------------------- building


def test_ingest_writes_snapshot_manifest_and_checksums(root, corpus, real_embedder):
    rep = _ingest(root, [corpus["vacation"], corpus["passwords"]], ["hr"], real_embedder)
    assert sorted(rep.added) == sorted(corpus[k].name for k in ("vacation", "passwords"))
    assert rep.chunks_embedded > 0
    snap = _snapshot(root)
    for f in ("dense.faiss", "chunks.jsonl", "manifest.json"):
        assert (snap / f).is_file()
    m = json.loads((snap / "manifest.json").read_text())
    assert m["embedder"] == {"name": real_embedder.name, "dim": real_embedder.dim}
    lines = [json.loads(x) for x in (snap / "chunks.jsonl").read_text().splitlines() if x.strip()]
    vectors = faiss.read_index(str(snap / "dense.faiss"))
    assert m["n_chunks"] == len(lines) == vectors.ntotal == rep.chunks_embedded
    assert vectors.d == real_embedder.dim
    assert m["n_documents"] == 2
    assert m["departments"] == {"hr": len(lines)}
    for key in ("vacation", "passwords"):
        entry = m["documents"][corpus[key].name]
        assert entry["sha256"] == hashlib.sha256(corpus[key].read_bytes()).hexdigest()
        assert entry["departments"] == ["hr"]
        assert entry["n_chunks"] == sum(1 for x in lines if x["source"] == corpus[key].name)
    for fname, digest in m["files"].items():
        assert hashlib.sha256((snap / fname).read_bytes()).hexdigest() == digest
    # Vectors and chunks agree id for id.
    assert sorted(faiss.vector_to_array(vectors.id_map).tolist()) == sorted(x["id"] for x in lines)
    assert {x["title"] for x in lines} == {"Vacation Policy", "Password Policy"}


def test_stored_vectors_are_the_embeddings_of_the_chunk_texts(root, corpus, real_embedder):
    _ingest(root, [corpus["vacation"]], ["hr"], real_embedder)
    idx = DocumentIndex.open(root, NAME)
    ids = sorted(idx.chunks)
    stored = np.stack([idx.faiss.reconstruct(i) for i in ids])
    fresh = real_embedder.encode([idx.chunks[i].text for i in ids])
    np.testing.assert_allclose(stored, fresh, atol=1e-5)


def test_reingesting_unchanged_documents_writes_nothing(root, corpus, real_embedder):
    _ingest(root, list(corpus.values()), ["hr"], real_embedder)
    before = _state(root)
    rep = _ingest(root, list(corpus.values()), ["hr"], real_embedder)
    assert sorted(rep.unchanged) == sorted(p.name for p in corpus.values())
    assert (rep.added, rep.replaced, rep.relabelled, rep.chunks_embedded) == ([], [], [], 0)
    assert _state(root) == before


def test_modified_document_has_its_chunks_replaced(root, corpus, real_embedder):
    _ingest(root, [corpus["vacation"], corpus["passwords"]], ["hr"], real_embedder)
    first = DocumentIndex.open(root, NAME)
    pw_chunks = {c.id: c.text for c in first.chunks.values() if c.source == corpus["passwords"].name}
    before = _state(root)

    corpus["vacation"].write_text(VACATION.replace("ALPHA-7", "BRAVO-9").replace("28", "30"))
    rep = _ingest(root, [corpus["vacation"], corpus["passwords"]], ["hr"], real_embedder)
    assert rep.replaced == [corpus["vacation"].name]
    assert rep.unchanged == [corpus["passwords"].name]
    assert _state(root)[0] != before[0]

    idx = DocumentIndex.open(root, NAME)
    texts = [c.text for c in idx.chunks.values()]
    assert not any("ALPHA-7" in t for t in texts)
    assert any("BRAVO-9" in t for t in texts)
    # The unchanged document keeps its chunks (same ids, same text).
    assert {c.id: c.text for c in idx.chunks.values() if c.source in {corpus["passwords"].name}} == pw_chunks
    entry = idx.manifest["documents"][corpus["vacation"].name]
    assert entry["sha256"] == hashlib.sha256(corpus["vacation"].read_bytes()).hexdigest()
    assert entry["n_chunks"] == sum(1 for c in idx.chunks.values() if c.source == corpus["vacation"].name)
    assert idx.manifest["n_chunks"] == len(idx.chunks) == idx.faiss.ntotal
    assert sorted(faiss.vector_to_array(idx.faiss.id_map).tolist()) == sorted(idx.chunks)
    # The old wording is not retrievable any more, by either ranker.
    for dense, bm25 in ((True, False), (False, True), (True, True)):
        hits = Retriever(idx, real_embedder, dense=dense, bm25=bm25).search(
            "What is the approval code ALPHA-7 for vacation?", "hr", k=10)
        assert hits and not any("ALPHA-7" in h.chunk.text for h in hits)
        assert any("BRAVO-9" in h.chunk.text for h in hits)


def test_each_save_keeps_the_previous_snapshot_and_prunes_older_ones(root, tmp_path, real_embedder):
    # Several quick updates (often within the same second): after each one, the live snapshot
    # and the one it replaced must both exist, and nothing older.
    history = []
    for i in range(6):
        doc = write(tmp_path / "many" / f"note-{i}.txt", f"Note {i}\nRoom {i} is booked on day {i}.")
        _ingest(root, [doc], ["hr"], real_embedder)
        history.append(_snapshot(root))
        assert history[-1].is_dir()
        if i >= 1:
            assert history[-2].is_dir(), f"update {i}: the previous snapshot {history[-2].name} was pruned"
        kept = sorted(p.name for p in (root / NAME).glob("snap-*"))
        assert kept == sorted(p.name for p in history[-2:]), f"update {i}"
    assert len(set(history)) == 6


def test_delete_documents_removes_a_document(root, corpus, real_embedder):
    _ingest(root, list(corpus.values()), ["hr"], real_embedder)
    gone = corpus["vacation"].name
    rep = delete_documents(root, NAME, [gone])
    assert rep.deleted == [gone]
    idx = DocumentIndex.open(root, NAME)
    assert gone not in idx.manifest["documents"]
    assert all(c.source != gone for c in idx.chunks.values())
    assert idx.faiss.ntotal == len(idx.chunks) == idx.manifest["n_chunks"]
    hits = Retriever(idx, real_embedder).search("How many vacation days do employees get?", "hr", k=10)
    assert hits and all(h.chunk.source != gone for h in hits)


def test_delete_of_an_unknown_document_changes_nothing(root, corpus, real_embedder):
    _ingest(root, [corpus["vacation"], corpus["passwords"]], ["hr"], real_embedder)
    before = _state(root)
    with pytest.raises(RagptError, match="invoices.html"):
        # The known document is not deleted either: the whole request fails.
        delete_documents(root, NAME, [corpus["vacation"].name, str(corpus["invoices"])])
    assert _state(root) == before
    assert corpus["vacation"].name in DocumentIndex.open(root, NAME).manifest["documents"]


def test_departments_share_one_index(root, corpus, real_embedder):
    _ingest(root, [corpus["vacation"]], ["hr"], real_embedder)
    _ingest(root, [corpus["passwords"]], ["it"], real_embedder)
    _ingest(root, [corpus["invoices"]], ["finance"], real_embedder)
    idx = DocumentIndex.open(root, NAME)
    assert idx.departments == ["finance", "hr", "it"]
    by_dept = {d: sum(d in c.departments for c in idx.chunks.values()) for d in idx.departments}
    assert idx.manifest["departments"] == by_dept
    assert idx.manifest["n_documents"] == 3
    r = Retriever(idx, real_embedder)
    for dept, key in (("hr", "vacation"), ("it", "passwords"), ("finance", "invoices")):
        hits = r.search("What does the policy say?", dept, k=10)
        assert {h.chunk.source for h in hits} == {corpus[key].name}


def test_a_document_shared_by_two_departments(root, corpus, real_embedder):
    _ingest(root, [corpus["passwords"]], ["it"], real_embedder)
    _ingest(root, [corpus["vacation"]], ["hr", "it"], real_embedder)
    shared = corpus["vacation"].name
    idx = DocumentIndex.open(root, NAME)
    assert idx.manifest["documents"][shared]["departments"] == ["hr", "it"]
    r = Retriever(idx, real_embedder)
    for dept in ("hr", "it"):
        hits = r.search("How many vacation days?", dept, k=3)
        assert hits[0].chunk.source == shared

    # Naming only hr again relabels the document (no re-embedding): it loses access.
    before_vectors = idx.faiss.ntotal
    rep = _ingest(root, [corpus["vacation"]], ["hr"], real_embedder)
    assert rep.relabelled == [shared] and rep.chunks_embedded == 0
    idx = DocumentIndex.open(root, NAME)
    assert idx.faiss.ntotal == before_vectors
    assert idx.manifest["documents"][shared]["departments"] == ["hr"]
    r = Retriever(idx, real_embedder)
    assert all(h.chunk.source != shared for h in r.search("How many vacation days?", "it", k=10))
    assert r.search("How many vacation days?", "hr", k=1)[0].chunk.source == shared


# --------------------------------------------------------------------------- bad input


@pytest.fixture
def bad_inputs(tmp_path, corpus):
    return {
        "unsupported file": [write(tmp_path / "bad" / "table.csv", "a,b\n1,2\n")],
        "empty file": [write(tmp_path / "bad" / "empty.txt", "")],
        "whitespace-only file": [write(tmp_path / "bad" / "blank.md", " \n\n\t\n")],
        "good file with a bad one": [corpus["vacation"], write(tmp_path / "bad" / "empty2.txt", "")],
    }


CASES = ["unsupported file", "empty file", "whitespace-only file", "good file with a bad one"]


def test_missing_path_fails_before_anything_is_written(root, tmp_path, corpus, real_embedder):
    with pytest.raises(DocumentError, match="no-such-file.txt"):
        _ingest(root, [corpus["vacation"], tmp_path / "no-such-file.txt"], ["hr"], real_embedder)
    assert not (root / NAME).exists()


@pytest.mark.parametrize("case", CASES)
def test_a_bad_file_named_directly_is_reported_and_the_rest_ingested(root, bad_inputs, real_embedder, case):
    bad = Path(bad_inputs[case][-1])
    rep = _ingest(root, bad_inputs[case], ["hr"], real_embedder)
    assert [s for s, _ in rep.problems] == [bad.name]
    assert (rep.skipped if case == "unsupported file" else rep.failed) == rep.problems
    reason = rep.problems[0][1]
    assert ("unsupported" if case == "unsupported file" else "empty") in reason
    if case == "good file with a bad one":
        assert rep.added == ["vacation.md"]
    else:
        assert rep.added == [] and not (root / NAME).exists()  # nothing readable: no index created


@pytest.mark.parametrize("case", CASES)
def test_strict_ingest_of_a_bad_file_writes_nothing(root, corpus, bad_inputs, real_embedder, case):
    with pytest.raises(DocumentError, match=Path(bad_inputs[case][-1]).name):
        _ingest(root, bad_inputs[case], ["hr"], real_embedder, strict=True)
    assert not (root / NAME).exists()
    _ingest(root, [corpus["passwords"]], ["it"], real_embedder)
    before = _state(root)
    with pytest.raises(DocumentError):
        _ingest(root, bad_inputs[case], ["hr"], real_embedder, strict=True)
    assert _state(root) == before


def test_other_embedder_cannot_ingest_into_or_query_the_index(root, corpus, real_embedder):
    _ingest(root, [corpus["vacation"]], ["hr"], real_embedder)
    before = _state(root)
    other = dataclasses.replace(real_embedder, name="other-embedder")
    with pytest.raises(EmbedderMismatchError, match="other-embedder"):
        _ingest(root, [corpus["passwords"]], ["hr"], other)
    assert _state(root) == before
    idx = DocumentIndex.open(root, NAME)
    with pytest.raises(EmbedderMismatchError, match=real_embedder.name):
        Retriever(idx, other)


def test_chunk_tokens_beyond_the_embedder_window_is_refused(root, corpus, real_embedder):
    with pytest.raises(RagptError, match="chunk_tokens") as e:
        _ingest(root, [corpus["vacation"]], ["hr"], real_embedder, chunk_tokens=real_embedder.max_tokens + 1)
    assert str(real_embedder.max_tokens) in str(e.value)
    assert not (root / NAME).exists()


def test_largest_accepted_chunk_size_is_embedded_without_truncation(root, tmp_path, real_embedder):
    # Chunks are measured in embedder tokens "so that none is truncated when embedded": at the
    # largest chunk_tokens ingest accepts, every chunk, with the tokenizer's special tokens,
    # must still fit in the embedder's window.
    text = " ".join(f"Clause {i} requires approval {i * 7} by the board." for i in range(400))
    doc = write(tmp_path / "long.txt", text)
    window = real_embedder.max_tokens
    tok = real_embedder.tokenizer
    largest = window - tok.num_special_tokens_to_add(pair=False)
    with pytest.raises(RagptError, match="window"):
        _ingest(root, [doc], ["hr"], real_embedder, chunk_tokens=largest + 1, chunk_overlap=16)
    _ingest(root, [doc], ["hr"], real_embedder, chunk_tokens=largest, chunk_overlap=16)
    idx = DocumentIndex.open(root, NAME)
    lengths = [len(tok(c.text)["input_ids"]) for c in idx.chunks.values()]
    assert max(lengths) <= window, f"chunk of {max(lengths)} tokens > window {window}: truncated"


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"departments": []}, "department"),
        ({"departments": ["bad name!"]}, "department"),
        ({"departments": ["../escape"]}, "department"),
        ({"name": "../escape"}, "index"),
        ({"name": ""}, "index"),
        ({"paths": []}, "no documents"),
    ],
)
def test_bad_names_and_arguments_write_nothing(root, corpus, real_embedder, kwargs, needle):
    args = {"name": NAME, "paths": [corpus["vacation"]], "departments": ["hr"]}
    args.update(kwargs)
    with pytest.raises(RagptError, match=needle):
        ingest(root, args["name"], args["paths"], args["departments"], real_embedder,
               chunk_tokens=64, chunk_overlap=16, progress=False)
    assert not (root / NAME).exists()
    assert not (root.parent / "escape").exists()


# --------------------------------------------------------------------------- bad queries


def test_unknown_department_and_empty_question_at_query_time(root, corpus, real_embedder):
    _ingest(root, [corpus["vacation"]], ["hr"], real_embedder)
    before = _state(root)
    r = Retriever(DocumentIndex.open(root, NAME), real_embedder)
    with pytest.raises(UnknownDepartmentError, match="legal") as e:
        r.search("How many vacation days?", "legal")
    assert "hr" in str(e.value)  # names the departments that do exist
    for q in ("", "   \n"):
        with pytest.raises(EmptyQuestionError):
            r.search(q, "hr")
    assert _state(root) == before


def test_missing_index_raises_index_not_found(root, corpus, real_embedder):
    _ingest(root, [corpus["vacation"]], ["hr"], real_embedder)
    with pytest.raises(IndexNotFoundError, match="other") as e:
        DocumentIndex.open(root, "other")
    assert NAME in str(e.value)  # lists the indexes that exist


# --------------------------------------------------------------------------- corruption


@pytest.mark.parametrize("fname", ["chunks.jsonl", "dense.faiss"])
def test_tampered_snapshot_file_is_refused_on_open(root, corpus, real_embedder, fname):
    _ingest(root, [corpus["vacation"]], ["hr"], real_embedder)
    f = _snapshot(root) / fname
    data = bytearray(f.read_bytes())
    if fname == "chunks.jsonl":
        data = bytearray(bytes(data).replace(b"28 vacation days", b"99 vacation days"))
    else:
        data[-1] ^= 0xFF
    assert bytes(data) != f.read_bytes()
    f.write_bytes(bytes(data))
    with pytest.raises(IndexCorruptError, match=fname):
        DocumentIndex.open(root, NAME)


def test_missing_snapshot_file_is_refused_on_open(root, corpus, real_embedder):
    _ingest(root, [corpus["vacation"]], ["hr"], real_embedder)
    (_snapshot(root) / "chunks.jsonl").unlink()
    with pytest.raises(IndexCorruptError, match="chunks.jsonl"):
        DocumentIndex.open(root, NAME)
    (_snapshot(root) / "manifest.json").unlink()
    with pytest.raises(IndexCorruptError, match="manifest"):
        DocumentIndex.open(root, NAME)
