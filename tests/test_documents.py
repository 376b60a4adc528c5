"""Reading documents (.txt .md .html .pdf), their titles and errors, and token-aware chunking."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import write

from ragpt.data.documents import (
    Chunker,
    display_path,
    expand_paths,
    read_document,
)
from ragpt.data.sample import SAMPLE_DIR, sample_questions
from ragpt.errors import DocumentError


@pytest.fixture(scope="module")
def embedder_tokenizer():
    """The embedded embedder's own tokenizer (just the tokenizer: cheap, no model weights)."""
    from transformers import AutoTokenizer

    from ragpt.lm.models import embedded_embedder_dir

    return AutoTokenizer.from_pretrained(str(embedded_embedder_dir()))


# --------------------------------------------------------------------------- reading


def test_txt_title_is_its_first_non_empty_line(tmp_path):
    p = write(tmp_path / "notes.txt", "\n\n  Travel Rules  \nBook trains, not flights.\r\nSecond line.\n")
    doc = read_document(p)
    assert doc.title == "Travel Rules"
    assert "Book trains, not flights.\nSecond line." in doc.text
    assert "\r" not in doc.text


def test_md_title_is_its_heading(tmp_path):
    p = write(tmp_path / "guide.md", "# VPN Access Guide\n\nInstall the   client first.\n")
    doc = read_document(p)
    assert doc.title == "VPN Access Guide"
    assert "Install the client first." in doc.text  # runs of spaces collapse


def test_html_title_and_text_without_script_or_style(tmp_path):
    html = """<!doctype html><html><head><title>Payroll Calendar</title>
    <style>body { color: red; } .secret-style {}</style>
    <script>var secretScript = "do not index";</script></head>
    <body><h1>Payroll dates</h1><p>Salaries are paid on the <b>25th</b>.</p>
    <script>alert("also not text")</script><noscript>enable js</noscript></body></html>"""
    doc = read_document(write(tmp_path / "pay.html", html))
    assert doc.title == "Payroll Calendar"
    assert "Payroll dates" in doc.text
    assert "25th" in doc.text
    for hidden in ("secretScript", "do not index", "color: red", "secret-style", "also not text"):
        assert hidden not in doc.text


def test_html_without_title_uses_first_line(tmp_path):
    doc = read_document(write(tmp_path / "page.htm", "<body><p>Guest Wi-Fi</p><p>Ask reception.</p></body>"))
    assert doc.title == "Guest Wi-Fi"


def test_sha256_is_of_the_file_bytes(tmp_path):
    import hashlib

    p = write(tmp_path / "a.txt", "Same words.\n")
    q = write(tmp_path / "b.txt", "Same words.\n\n")  # same text after normalising, other bytes
    assert read_document(p).sha256 == hashlib.sha256(p.read_bytes()).hexdigest()
    assert read_document(p).text == read_document(q).text
    assert read_document(p).sha256 != read_document(q).sha256


@pytest.mark.parametrize("pdf", sorted(SAMPLE_DIR.rglob("*.pdf")), ids=lambda p: p.name)
def test_sample_pdfs_are_read_with_their_facts(pdf):
    doc = read_document(pdf)
    assert doc.title
    assert doc.title in doc.text.splitlines()[0]
    rel = pdf.relative_to(SAMPLE_DIR).as_posix()
    facts = [q.answers[0] for q in sample_questions() if q.source == rel]
    assert facts, f"no sample question cites {rel}"
    flat = " ".join(doc.text.split())
    for fact in facts:
        assert fact in flat


@pytest.mark.parametrize("path", sorted(p for p in SAMPLE_DIR.rglob("*") if p.suffix in {".txt", ".md", ".html"}),
                         ids=lambda p: p.name)
def test_every_sample_document_holds_the_answers_of_its_questions(path):
    doc = read_document(path)
    rel = path.relative_to(SAMPLE_DIR).as_posix()
    flat = " ".join(doc.text.split())
    for q in sample_questions():
        if q.source == rel:
            assert any(a in flat for a in q.answers), (q.question, q.answers)


# --------------------------------------------------------------------------- errors


def test_missing_path_raises_naming_it(tmp_path):
    p = tmp_path / "nope.txt"
    with pytest.raises(DocumentError, match="nope.txt"):
        read_document(p)
    with pytest.raises(DocumentError, match="nope.txt"):
        expand_paths([p])


@pytest.mark.parametrize("name", ["table.csv", "slides.docx", "README"])
def test_unsupported_suffix_raises_naming_file_and_type(tmp_path, name):
    p = write(tmp_path / name, "some text\n")
    with pytest.raises(DocumentError, match="unsupported") as e:
        read_document(p)
    assert name in str(e.value)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("empty.txt", ""),
        ("blank.md", "  \n\t\n   \r\n"),
        ("only-script.html", "<html><head><title></title><script>x=1</script></head><body> </body></html>"),
    ],
)
def test_file_without_text_raises(tmp_path, name, content):
    with pytest.raises(DocumentError, match="empty") as e:
        read_document(write(tmp_path / name, content))
    assert name in str(e.value)


def test_non_utf8_file_raises(tmp_path):
    p = write(tmp_path / "latin1.txt", "Gebühren für Überstunden".encode("latin-1"))
    with pytest.raises(DocumentError, match="UTF-8") as e:
        read_document(p)
    assert "latin1.txt" in str(e.value)


def test_corrupt_pdf_raises_document_error(tmp_path):
    p = write(tmp_path / "broken.pdf", b"this is not a pdf at all\n")
    with pytest.raises(DocumentError, match="broken.pdf"):
        read_document(p)


def test_folder_is_not_a_file(tmp_path):
    (tmp_path / "dir.txt").mkdir()
    with pytest.raises(DocumentError, match="not a file"):
        read_document(tmp_path / "dir.txt")


# --------------------------------------------------------------------------- expanding paths


def test_expand_paths_finds_supported_files_recursively_once(tmp_path):
    a = write(tmp_path / "docs" / "a.txt", "A\n")
    b = write(tmp_path / "docs" / "sub" / "b.MD", "B\n")
    write(tmp_path / "docs" / "sub" / "c.csv", "C\n")
    write(tmp_path / "docs" / ".hidden.txt", "H\n")
    got = expand_paths([tmp_path / "docs", a, tmp_path / "docs" / "sub" / ".." / "a.txt"])
    assert [p.resolve() for p in got] == [a.resolve(), b.resolve()]


def test_expand_paths_rejects_a_folder_without_documents(tmp_path):
    write(tmp_path / "empty" / "data.csv", "x\n")
    with pytest.raises(DocumentError, match="no supported documents"):
        expand_paths([tmp_path / "empty"])


def test_display_path_is_relative_below_cwd_else_absolute(tmp_path, monkeypatch):
    p = write(tmp_path / "x" / "doc.txt", "Doc\n")
    monkeypatch.chdir(tmp_path)
    assert display_path(p) == "x/doc.txt"
    assert read_document(Path("x/doc.txt")).source == "x/doc.txt"
    monkeypatch.chdir(tmp_path / "x")
    other = write(tmp_path / "y.txt", "Y\n")
    assert display_path(other) == other.resolve().as_posix()


# --------------------------------------------------------------------------- chunking


def _long_paragraph(n: int = 60) -> str:
    """One paragraph of short, distinct sentences: the splitter can overlap at sentence level."""
    return " ".join(f"Item {i} costs {i + 3} euros." for i in range(n))


def _ntok(tokenizer, text: str) -> int:
    return len(tokenizer.tokenize(text))


def _sample_docs():
    return [read_document(p) for p in sorted(SAMPLE_DIR.rglob("*")) if p.suffix in {".txt", ".md", ".html", ".pdf"}]


@pytest.mark.parametrize(("size", "overlap"), [(32, 8), (64, 16), (200, 40)])
def test_chunks_stay_within_the_token_budget(embedder_tokenizer, size, overlap):
    chunker = Chunker(embedder_tokenizer, size, overlap)
    for doc in _sample_docs():
        chunks = chunker.split(doc, ["hr"])
        assert chunks
        for c in chunks:
            assert 0 < _ntok(embedder_tokenizer, c.text) <= size, (doc.source, c.chunk)


def test_chunks_carry_document_metadata_in_order(tmp_path, embedder_tokenizer):
    body = _long_paragraph()
    doc = read_document(write(tmp_path / "rules.txt", "Rules\n\n" + body))
    chunks = Chunker(embedder_tokenizer, 48, 16).split(doc, ["it", "hr"])
    assert len(chunks) > 3
    assert [c.chunk for c in chunks] == list(range(len(chunks)))
    for c in chunks:
        assert (c.source, c.title, c.doc_sha256, c.departments) == (doc.source, "Rules", doc.sha256, ["it", "hr"])
    # Every sentence of the document is in some chunk: nothing is lost between chunks.
    for sentence in body.split(". "):
        assert any(sentence.strip(". ") in c.text for c in chunks), sentence


def test_consecutive_chunks_overlap_by_at_most_the_overlap_budget(tmp_path, embedder_tokenizer):
    doc = read_document(write(tmp_path / "rules.txt", _long_paragraph()))
    size, overlap = 48, 16
    chunks = Chunker(embedder_tokenizer, size, overlap).split(doc, ["hr"])
    assert len(chunks) > 3
    for a, b in zip(chunks, chunks[1:]):
        shared = max((n for n in range(1, min(len(a.text), len(b.text)) + 1) if a.text.endswith(b.text[:n])),
                     default=0)
        assert shared >= 10, f"chunks {a.chunk} and {b.chunk} do not overlap"
        assert _ntok(embedder_tokenizer, b.text[:shared]) <= overlap


@pytest.mark.parametrize(("size", "overlap"), [(48, 16), (200, 40)])
def test_character_spans_slice_the_document_back_to_each_chunk(tmp_path, embedder_tokenizer, size, overlap):
    docs = [read_document(write(tmp_path / "rules.txt", _long_paragraph(120)))] + _sample_docs()
    bad = []
    for doc in docs:
        for c in Chunker(embedder_tokenizer, size, overlap).split(doc, ["hr"]):
            if not (0 <= c.start < c.end <= len(doc.text)) or doc.text[c.start:c.end] != c.text:
                bad.append(f"{doc.source}#{c.chunk} start={c.start} end={c.end}")
    assert not bad, f"{len(bad)} chunk spans do not slice back to their text, e.g. {bad[:5]}"


def test_spans_of_consecutive_overlapping_chunks_overlap(tmp_path, embedder_tokenizer):
    doc = read_document(write(tmp_path / "rules.txt", _long_paragraph()))
    chunks = Chunker(embedder_tokenizer, 48, 16).split(doc, ["hr"])
    for a, b in zip(chunks, chunks[1:]):
        assert a.start < b.start < a.end <= b.end, (a.chunk, a.start, a.end, b.start, b.end)
