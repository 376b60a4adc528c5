"""The sentence splitter (Chunker(splitter="sentences")): chunks packed with whole sentences whose
overlap carries across paragraph boundaries, where the default splitter overlaps only inside a
paragraph (benchmarks/retrieval_levers.py measures what it does to retrieval)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ragpt.data.documents import Chunker, Document


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from ragpt.lm.models import embedded_embedder_dir

    return AutoTokenizer.from_pretrained(str(embedded_embedder_dir()))


def _doc(text: str) -> Document:
    return Document(source="d.txt", title="T", text=text, sha256="0" * 64, path=Path("d.txt"))


# Paragraphs of three ~10-token sentences each: with 40-token chunks and 12 tokens of overlap a
# paragraph never fills a chunk on its own, so only packing across paragraphs can share text.
PARAGRAPHS = [" ".join(f"Paragraph {p} sentence {s} says something about topic {p}{s}." for s in range(3))
              for p in range(6)]
TEXT = "\n\n".join(PARAGRAPHS)


def _ntok(tokenizer, text: str) -> int:
    return len(tokenizer.tokenize(text))


def test_sentence_chunks_overlap_across_paragraphs(tokenizer):
    chunks = Chunker(tokenizer, 40, 12, splitter="sentences").split(_doc(TEXT), ["hr"])
    assert len(chunks) > 1
    shared = 0
    for a, b in zip(chunks, chunks[1:]):
        assert b.start < a.end  # the next chunk starts inside the previous one: overlap
        if "\n\n" in TEXT[b.start:a.end] or TEXT[a.start:a.end].count("Paragraph") > 1:
            shared += 1
    assert shared > 0  # some overlaps span a paragraph break
    for c in chunks:
        assert TEXT[c.start:c.end] == c.text  # offsets locate each chunk in the document
        assert 0 < _ntok(tokenizer, c.text) <= 40
        assert c.text.rstrip().endswith(".")  # whole sentences, never cut mid-sentence here


def test_default_splitter_keeps_paragraphs_apart(tokenizer):
    """Today's behaviour, unchanged: paragraphs that do not fit together start a new chunk with no
    text of the previous paragraph."""
    chunks = Chunker(tokenizer, 40, 12).split(_doc(TEXT), ["hr"])
    assert all(b.start >= a.end for a, b in zip(chunks, chunks[1:]))
    assert {c.text for c in chunks} <= set(PARAGRAPHS) | {p for p in TEXT.split("\n\n")}


def test_sentence_chunks_are_fuller(tokenizer):
    """A paragraph longer than a chunk leaves a short last piece under the default splitter; packing
    sentences fills chunks closer to the budget: fewer chunks for the same text."""
    text = "\n\n".join(" ".join(f"Paragraph {p} sentence {s} says something about topic {p}{s}." for s in range(5))
                       for p in range(6))
    default = Chunker(tokenizer, 48, 0).split(_doc(text), ["hr"])
    sentences = Chunker(tokenizer, 48, 0, splitter="sentences").split(_doc(text), ["hr"])
    assert len(sentences) < len(default)
    assert "".join(c.text for c in sentences).replace(" ", "").replace("\n", "") == \
        text.replace(" ", "").replace("\n", "")  # without overlap, every character exactly once


def test_unknown_splitter_is_refused(tokenizer):
    with pytest.raises(ValueError, match="splitter"):
        Chunker(tokenizer, 40, 0, splitter="words")


@pytest.mark.integration
def test_ragpt_ingest_chunk_splitter_reaches_the_chunks_and_the_manifest(tmp_path, monkeypatch, tokenizer):
    from typer.testing import CliRunner

    from ragpt.cli.main import app
    from ragpt.retrieval.index import DocumentIndex

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "d.txt").write_text(TEXT, encoding="utf-8")
    monkeypatch.setenv("RAGPT_INDEX_DIR", str(tmp_path / "indexes"))
    texts = {}
    for splitter in ("recursive", "sentences"):
        r = CliRunner().invoke(app, ["ingest", "-i", splitter, "-d", "hr", str(docs), "-q", "--chunk-tokens", "40",
                                     "--chunk-overlap", "12", "--chunk-splitter", splitter])
        assert r.exit_code == 0, r.output
        idx = DocumentIndex.open(tmp_path / "indexes", splitter)
        assert idx.manifest["chunking"] == {"chunk_tokens": 40, "chunk_overlap": 12, "splitter": splitter}
        texts[splitter] = [idx.chunks[i].text for i in sorted(idx.chunks)]
        want = Chunker(tokenizer, 40, 12, splitter=splitter).split(_doc(TEXT), ["hr"])
        assert texts[splitter] == [c.text for c in want]
    assert texts["sentences"] != texts["recursive"]
    bad = CliRunner().invoke(app, ["ingest", "-i", "x", "-d", "hr", str(docs), "--chunk-splitter", "words"])
    assert bad.exit_code == 2 and "chunk_splitter must be recursive or sentences" in bad.output


@pytest.mark.integration
def test_an_index_keeps_the_chunking_it_was_created_with(tmp_path, monkeypatch, tokenizer):
    """A later ingest without chunk options chunks like the index's first; one asking for other
    chunking is refused with the index's own named, and writes nothing."""
    from typer.testing import CliRunner

    from ragpt.cli.main import app
    from ragpt.retrieval.index import DocumentIndex

    docs, more = tmp_path / "docs", tmp_path / "more"
    for folder in (docs, more):
        folder.mkdir()
        (folder / f"{folder.name}.txt").write_text(TEXT, encoding="utf-8")
    monkeypatch.setenv("RAGPT_INDEX_DIR", str(tmp_path / "indexes"))
    # The settings ask for recursive 200/40; the index was made with sentences 40/12.
    monkeypatch.setenv("RAGPT_CHUNK_SPLITTER", "recursive")
    ok = CliRunner().invoke(app, ["ingest", "-i", "s", "-d", "hr", str(docs), "-q", "--chunk-tokens", "40",
                                  "--chunk-overlap", "12", "--chunk-splitter", "sentences"])
    assert ok.exit_code == 0, ok.output
    ok = CliRunner().invoke(app, ["ingest", "-i", "s", "-d", "hr", str(more), "-q"])
    assert ok.exit_code == 0, ok.output
    idx = DocumentIndex.open(tmp_path / "indexes", "s")
    want = [c.text for c in Chunker(tokenizer, 40, 12, splitter="sentences").split(_doc(TEXT), ["hr"])]
    by_doc = {}
    for i in sorted(idx.chunks):
        by_doc.setdefault(idx.chunks[i].doc, []).append(idx.chunks[i].text)
    assert sorted(by_doc) == ["docs.txt", "more.txt"] and all(texts == want for texts in by_doc.values())
    snapshot = (tmp_path / "indexes" / "s" / "CURRENT").read_text()

    (more / "new.txt").write_text("A third document.", encoding="utf-8")
    bad = CliRunner().invoke(app, ["ingest", "-i", "s", "-d", "hr", str(more), "--chunk-splitter", "recursive"])
    assert bad.exit_code == 2
    assert "recursive (the index: sentences)" in bad.output and "fixed when it was created" in bad.output
    assert str(tmp_path) not in bad.output
    assert (tmp_path / "indexes" / "s" / "CURRENT").read_text() == snapshot
    assert "new.txt" not in DocumentIndex.open(tmp_path / "indexes", "s").documents
