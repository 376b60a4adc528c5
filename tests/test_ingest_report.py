"""Forgiving, explicit ingest: a folder is ingested as far as it can be, every file left out is
reported with its reason (API and CLI, exit 1), --strict writes nothing, third-party noise is
kept off the console (real embedder, real pypdf)."""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path

import pytest
from conftest import write
from typer.testing import CliRunner

from ragpt.cli.main import app
from ragpt.data.documents import SCANNED_PDF, read_document
from ragpt.data.ingest import ingest
from ragpt.data.sample import SAMPLE_DIR
from ragpt.errors import DocumentError
from ragpt.retrieval.index import DocumentIndex

pytestmark = pytest.mark.integration

NAME = "mixed"
runner = CliRunner()


def _blank_pdf() -> bytes:
    from pypdf import PdfWriter

    w = PdfWriter()
    w.add_blank_page(width=595, height=842)
    buf = io.BytesIO()
    w.write(buf)
    return buf.getvalue()


@pytest.fixture
def mixed(tmp_path) -> Path:
    d = tmp_path / "mixed"
    write(d / "guide.md", "# Travel Guide\n\nBook trains for trips under 500 km.\n")
    write(d / "sub" / "notes.txt", "Meeting Notes\nThe budget review is on Friday.\n")
    write(d / "scan.pdf", _blank_pdf())
    write(d / "report.docx", b"PK\x03\x04 not really a word document")
    write(d / ".hidden.txt", "Hidden\nNever ingested, never mentioned.\n")
    write(d / ".git" / "config.txt", "Hidden folder\n")
    return d


def _ingest(root, paths, embedder, **kw):
    return ingest(root, NAME, [Path(p) for p in paths], ["hr"], embedder, chunk_tokens=64, chunk_overlap=16,
                  progress=False, **kw)


def test_a_mixed_folder_ingests_the_good_files_and_reports_the_rest(tmp_path, mixed, real_embedder):
    root = tmp_path / "idx"
    rep = _ingest(root, [mixed], real_embedder)
    assert sorted(rep.added) == ["guide.md", "sub/notes.txt"]
    assert rep.failed == [("scan.pdf", SCANNED_PDF)]
    assert [s for s, _ in rep.skipped] == ["report.docx"]
    assert "unsupported file type '.docx'" in rep.skipped[0][1]
    assert sorted(e["source"] for e in DocumentIndex.open(root, NAME).documents.values()) == [
        "guide.md", "sub/notes.txt"]
    # Again: the good files are unchanged, the bad ones reported again (they are still not ingested).
    again = _ingest(root, [mixed], real_embedder)
    assert sorted(again.unchanged) == ["guide.md", "sub/notes.txt"] and len(again.problems) == 2


def test_strict_stops_at_the_first_problem_and_writes_nothing(tmp_path, mixed, real_embedder):
    with pytest.raises(DocumentError, match="report.docx"):
        _ingest(tmp_path / "idx", [mixed], real_embedder, strict=True)
    (mixed / "report.docx").unlink()
    with pytest.raises(DocumentError, match=re.escape(f"scan.pdf: {SCANNED_PDF}")):
        _ingest(tmp_path / "idx", [mixed], real_embedder, strict=True)
    assert not (tmp_path / "idx" / NAME).exists()


def test_cli_lists_each_file_left_out_on_stderr_and_exits_1(tmp_path, mixed, monkeypatch):
    monkeypatch.chdir(tmp_path)
    idx = str(tmp_path / "idx")
    res = runner.invoke(app, ["--index-dir", idx, "ingest", "-q", "-i", NAME, "-d", "hr", str(mixed)])
    assert res.exit_code == 1, res.output
    assert "2 added" in res.stdout
    assert f"failed scan.pdf: {SCANNED_PDF}" in res.stderr
    assert "skipped report.docx: unsupported file type '.docx'" in res.stderr
    assert "hidden" not in res.output.lower()
    assert "Traceback" not in res.output and str(tmp_path) not in res.stderr

    # A file named directly that is unsupported is reported the same way.
    res = runner.invoke(app, ["--index-dir", idx, "ingest", "-q", "-i", NAME, "-d", "hr", str(mixed / "report.docx")])
    assert res.exit_code == 1 and "skipped report.docx: unsupported" in res.stderr

    before = sorted(p.name for p in (tmp_path / "idx" / NAME).iterdir())
    write(mixed / "new.md", "# New\n\nA new page.\n")
    res = runner.invoke(app, ["--index-dir", idx, "ingest", "-q", "--strict", "-i", NAME, "-d", "hr", str(mixed)])
    assert res.exit_code == 2 and "error:" in res.output and "--strict" in res.output
    assert sorted(p.name for p in (tmp_path / "idx" / NAME).iterdir()) == before
    assert "new.md" not in {e["source"] for e in DocumentIndex.open(tmp_path / "idx", NAME).documents.values()}


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [
        ("latin1.txt", "Gebühren für Überstunden".encode("latin-1"), "not UTF-8"),
        ("broken.pdf", b"%PDF-1.4 this is not a pdf at all\n", "parse error"),
        ("empty.md", "", "empty file"),
    ],
)
def test_each_kind_of_unreadable_file_has_its_reason(tmp_path, real_embedder, name, content, needle):
    d = tmp_path / "docs"
    write(d / "ok.txt", "Fine\nThis one reads.\n")
    write(d / name, content)
    rep = _ingest(tmp_path / "idx", [d], real_embedder)
    assert rep.added == ["ok.txt"]
    assert [s for s, _ in rep.failed] == [name] and needle in rep.failed[0][1]


def test_recoverable_pdf_problems_stay_off_the_console(tmp_path, capfd, caplog):
    # A real PDF whose cross-reference offset is wrong: pypdf repairs it and, left alone, logs
    # "incorrect startxref pointer" to stderr.
    src = (SAMPLE_DIR / "hr" / "relocation-assistance-policy.pdf").read_bytes()
    m = re.search(rb"startxref\s+(\d+)", src)
    bad = write(tmp_path / "repaired.pdf", src[: m.start(1)] + str(int(m.group(1)) + 7).encode() + src[m.end(1):])
    caplog.set_level(logging.WARNING)
    doc = read_document(bad, source="repaired.pdf")
    assert doc.title == "Relocation Assistance Policy"
    out = capfd.readouterr()
    assert out.out == "" and out.err == ""
    assert not [r for r in caplog.records if r.name.startswith("pypdf")]
