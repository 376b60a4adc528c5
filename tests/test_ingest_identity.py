"""Document identity: root-relative sources, same-named files of two departments, --source and
--delete by relative path or glob, `ragpt index docs` and `ragpt index delete` (real embedder)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write
from typer.testing import CliRunner

from ragpt.cli.main import app
from ragpt.data.ingest import delete_documents, ingest
from ragpt.errors import DocumentError, RagptError
from ragpt.retrieval.index import DocumentIndex
from ragpt.retrieval.search import Retriever

pytestmark = pytest.mark.integration

NAME = "ids"
runner = CliRunner()

TENDER = "# Tender Procedure\n\nPurchases above EUR 140,000 go to a public tender on the TenderBoard portal.\n"
SUPPLIERS = "Supplier Audits\nEvery supplier is audited once a year by the procurement office.\n"
HR_POLICY = "# HR Policy\n\nEmployees may work from home two days a week after the probation period.\n"
IT_POLICY = "# IT Policy\n\nLaptops are encrypted with BitLocker and locked after five minutes idle.\n"


def _ingest(root, paths, departments, embedder, **kw):
    return ingest(root, NAME, [Path(p) for p in paths], departments, embedder, chunk_tokens=64, chunk_overlap=16,
                  progress=False, **kw)


def _state(root: Path) -> tuple[str | None, list[str]]:
    folder = Path(root) / NAME
    current = (folder / "CURRENT").read_text() if (folder / "CURRENT").is_file() else None
    return current, sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


@pytest.fixture
def docs(tmp_path):
    d = tmp_path / "docs"
    write(d / "procurement" / "tender-procedure.md", TENDER)
    write(d / "procurement" / "audits" / "suppliers.txt", SUPPLIERS)
    write(d / "hr" / "policy.md", HR_POLICY)
    write(d / "it" / "policy.md", IT_POLICY)
    return d


@pytest.fixture
def root(tmp_path):
    return tmp_path / "indexes"


def _cli(*args: str):
    return runner.invoke(app, list(args))


# --------------------------------------------------------------------------- sources


def test_sources_are_relative_to_the_folder_given(root, docs, real_embedder):
    rep = _ingest(root, [docs / "procurement"], ["procurement"], real_embedder)
    assert sorted(rep.added) == ["audits/suppliers.txt", "tender-procedure.md"]
    idx = DocumentIndex.open(root, NAME)
    assert sorted(e["source"] for e in idx.documents.values()) == ["audits/suppliers.txt", "tender-procedure.md"]
    assert {c.source for c in idx.chunks.values()} == {"audits/suppliers.txt", "tender-procedure.md"}
    assert str(docs) not in json.dumps(idx.manifest)  # no server path in the manifest either


def test_explicit_root_and_a_file_named_directly(root, docs, real_embedder, tmp_path):
    rep = _ingest(root, [docs / "procurement" / "tender-procedure.md"], ["procurement"], real_embedder)
    assert rep.added == ["tender-procedure.md"]  # a file named directly: relative to its folder
    rep = _ingest(root, [docs / "procurement"], ["procurement"], real_embedder, source_root=docs)
    # The same file under another root is the same document, renamed; the other file is new.
    assert rep.added == ["procurement/audits/suppliers.txt"] and rep.migrated == ["procurement/tender-procedure.md"]
    with pytest.raises(DocumentError, match="not inside the root"):
        _ingest(root, [docs / "hr" / "policy.md"], ["hr"], real_embedder, source_root=docs / "it")


def test_reingest_from_another_working_directory_is_unchanged(root, docs, real_embedder, monkeypatch):
    monkeypatch.chdir(docs.parent)
    first = _ingest(root, [Path("docs/procurement")], ["procurement"], real_embedder)
    assert len(first.added) == 2
    before = _state(root)
    monkeypatch.chdir(docs)
    again = _ingest(root, [Path("procurement")], ["procurement"], real_embedder)
    assert sorted(again.unchanged) == sorted(first.added) and again.added == [] and again.chunks_embedded == 0
    monkeypatch.chdir(docs / "procurement" / "audits")
    again = _ingest(root, [Path("..")], ["procurement"], real_embedder)
    assert sorted(again.unchanged) == sorted(first.added)
    assert _state(root) == before
    assert DocumentIndex.open(root, NAME).manifest["n_documents"] == 2


def test_cli_reingest_from_another_cwd_is_unchanged_and_prints_no_tokenizer_warning(tmp_path, docs):
    # A document longer than the embedder's 512-token window: the chunker measures it whole.
    write(docs / "procurement" / "handbook.txt", "Handbook\n" + " ".join(
        f"Rule {i}: orders of class {i} need form P-{i} signed by the buyer." for i in range(300)))
    idx = tmp_path / "idx"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def run(cwd: Path, path: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "ragpt.cli", "--index-dir", str(idx), "ingest", "-q", "-i", NAME,
             "-d", "procurement", path], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)

    first = run(tmp_path, "docs/procurement")
    assert first.returncode == 0, first.stderr
    assert "3 added" in first.stdout
    second = run(docs, "procurement")
    assert second.returncode == 0, second.stderr
    assert "0 added" in second.stdout and "3 unchanged" in second.stdout
    for out in (first, second):
        assert "Token indices sequence length" not in out.stdout + out.stderr
        assert "indexing errors" not in out.stdout + out.stderr


# --------------------------------------------------------------------------- two departments, one name


def test_same_named_files_of_two_departments_both_survive(root, docs, real_embedder):
    assert _ingest(root, [docs / "hr"], ["hr"], real_embedder).added == ["policy.md"]
    assert _ingest(root, [docs / "it"], ["it"], real_embedder).added == ["policy.md"]
    idx = DocumentIndex.open(root, NAME)
    assert sorted((e["source"], tuple(e["departments"])) for e in idx.documents.values()) == [
        ("policy.md", ("hr",)), ("policy.md", ("it",))]
    r = Retriever(idx, real_embedder)
    assert {h.chunk.text.split("\n")[0] for h in r.search("What is the policy?", "hr", k=5)} == {"# HR Policy"}
    assert {h.chunk.text.split("\n")[0] for h in r.search("What is the policy?", "it", k=5)} == {"# IT Policy"}
    # Each is still its own document: re-ingesting either is unchanged, a change replaces only it.
    before = _state(root)
    assert _ingest(root, [docs / "hr"], ["hr"], real_embedder).unchanged == ["policy.md"]
    assert _ingest(root, [docs / "it"], ["it"], real_embedder).unchanged == ["policy.md"]
    assert _state(root) == before
    (docs / "it" / "policy.md").write_text(IT_POLICY.replace("five", "three"))
    assert _ingest(root, [docs / "it"], ["it"], real_embedder).replaced == ["policy.md"]
    idx = DocumentIndex.open(root, NAME)
    assert idx.manifest["n_documents"] == 2
    texts = {d: " ".join(c.text for c in idx.chunks.values() if d in c.departments) for d in ("hr", "it")}
    assert "two days a week" in texts["hr"] and "three minutes" in texts["it"] and "five" not in texts["it"]


def test_reingest_with_another_root_renames_instead_of_duplicating(root, docs, real_embedder):
    first = _ingest(root, [docs / "procurement"], ["procurement"], real_embedder)
    n_chunks = DocumentIndex.open(root, NAME).faiss.ntotal
    rep = _ingest(root, [docs / "procurement"], ["procurement"], real_embedder, source_root=docs)
    assert rep.added == rep.replaced == [] and rep.chunks_embedded == 0
    assert sorted(rep.migrated) == ["procurement/" + s for s in sorted(first.added)]
    idx = DocumentIndex.open(root, NAME)
    assert idx.manifest["n_documents"] == 2 and idx.faiss.ntotal == n_chunks
    assert {c.source for c in idx.chunks.values()} == {"procurement/tender-procedure.md",
                                                     "procurement/audits/suppliers.txt"}
    hits = Retriever(idx, real_embedder).search("public tender threshold", "procurement", k=4)
    assert len({(h.chunk.source, h.chunk.chunk) for h in hits}) == len(hits)  # no duplicate in the top-k


def test_another_file_cannot_take_a_shared_documents_place_for_one_department(root, docs, real_embedder):
    _ingest(root, [docs / "hr"], ["hr", "it"], real_embedder)  # hr's policy.md, shared with it
    before = _state(root)
    with pytest.raises(RagptError, match=r"from another file, read by hr, it; .* would replace it for hr too"):
        _ingest(root, [docs / "it"], ["it"], real_embedder)  # it's own policy.md, same source
    assert _state(root) == before
    hits = Retriever(DocumentIndex.open(root, NAME), real_embedder).search("policy", "hr", k=3)
    assert hits and all("two days a week" in h.chunk.text for h in hits)
    rep = _ingest(root, [docs / "it"], ["it"], real_embedder, source_root=docs)  # a path of its own: fine
    assert rep.added == ["it/policy.md"]


def test_delete_by_a_path_to_another_file_of_the_same_name_removes_nothing(root, docs, real_embedder, tmp_path):
    _ingest(root, [docs / "hr"], ["hr"], real_embedder)
    before = _state(root)
    other = write(tmp_path / "elsewhere" / "hr" / "policy.md", "not the ingested file")
    for given in (other, tmp_path / "gone" / "policy.md"):  # an existing file, and one that is not there
        with pytest.raises(RagptError, match="is not in index"):
            delete_documents(root, NAME, [str(given)])
    assert _state(root) == before
    assert delete_documents(root, NAME, [str(docs / "hr" / "policy.md")]).deleted == ["policy.md"]


def test_the_same_file_for_other_departments_is_relabelled(root, docs, real_embedder):
    _ingest(root, [docs / "hr"], ["hr"], real_embedder)
    rep = _ingest(root, [docs / "hr" / "policy.md"], ["legal"], real_embedder)
    assert rep.relabelled == ["policy.md"] and rep.chunks_embedded == 0
    idx = DocumentIndex.open(root, NAME)
    assert [e["departments"] for e in idx.documents.values()] == [["legal"]]


def test_an_ambiguous_ingest_is_refused_and_writes_nothing(root, docs, real_embedder):
    _ingest(root, [docs / "hr"], ["hr"], real_embedder)
    _ingest(root, [docs / "it"], ["it"], real_embedder)
    before = _state(root)
    with pytest.raises(RagptError, match="ambiguous") as e:
        _ingest(root, [docs / "hr" / "policy.md"], ["hr", "it"], real_embedder)
    assert "policy.md (hr)" in str(e.value) and "policy.md (it)" in str(e.value)
    assert _state(root) == before


def test_two_files_with_the_same_source_in_one_ingest_are_refused(root, docs, real_embedder):
    with pytest.raises(DocumentError, match="policy.md"):
        _ingest(root, [docs / "hr" / "policy.md", docs / "it" / "policy.md"], ["hr"], real_embedder)
    assert not (root / NAME).exists()


# --------------------------------------------------------------------------- naming documents


def test_source_filter_takes_a_relative_path_or_a_glob(root, docs, real_embedder):
    _ingest(root, [docs / "procurement"], ["procurement"], real_embedder, source_root=docs)
    r = Retriever(DocumentIndex.open(root, NAME), real_embedder)
    q = "Who audits suppliers and when is a tender needed?"
    for pattern, want in [("tender-procedure.md", {"procurement/tender-procedure.md"}),
                          ("procurement/tender-procedure.md", {"procurement/tender-procedure.md"}),
                          ("*.txt", {"procurement/audits/suppliers.txt"}),
                          ("audits/*", {"procurement/audits/suppliers.txt"}),
                          ("procurement/*", {"procurement/tender-procedure.md", "procurement/audits/suppliers.txt"}),
                          ("ender-procedure.md", set()), ("*.pdf", set())]:
        assert {h.chunk.source for h in r.search(q, "procurement", k=10, filters={"source": pattern})} == want, pattern


def test_cli_retrieve_source_by_file_name(tmp_path, docs):
    idx = str(tmp_path / "idx")
    assert _cli("--index-dir", idx, "ingest", "-q", "-i", NAME, "-d", "procurement", "--root", str(docs),
                str(docs / "procurement")).exit_code == 0
    res = _cli("--index-dir", idx, "retrieve", "tender", "-d", "procurement", "-i", NAME,
               "--source", "tender-procedure.md")
    assert res.exit_code == 0, res.output
    ranked = [x for x in res.output.splitlines() if x.startswith("[")]
    assert ranked and all("procurement/tender-procedure.md" in x for x in ranked)
    assert str(tmp_path) not in res.output  # citations carry no absolute path


def test_delete_by_relative_path_glob_and_department(root, docs, real_embedder):
    _ingest(root, [docs / "hr"], ["hr"], real_embedder)
    _ingest(root, [docs / "it"], ["it"], real_embedder)
    _ingest(root, [docs / "procurement"], ["procurement"], real_embedder)
    before = _state(root)
    with pytest.raises(RagptError, match="2 documents"):  # two departments' policy.md: say which
        delete_documents(root, NAME, ["policy.md"])
    with pytest.raises(RagptError, match="not in index"):
        delete_documents(root, NAME, ["*.pdf"])
    assert _state(root) == before
    rep = delete_documents(root, NAME, ["policy.md"], departments=["it"])
    assert rep.deleted == ["policy.md"]
    idx = DocumentIndex.open(root, NAME)
    assert [e["departments"] for e in idx.documents.values() if e["source"] == "policy.md"] == [["hr"]]
    rep = delete_documents(root, NAME, ["audits/*.txt"])
    assert rep.deleted == ["audits/suppliers.txt"]
    # A path to the file as ingested names it too (whatever the working directory).
    rep = delete_documents(root, NAME, [str(docs / "procurement" / "tender-procedure.md")])
    assert rep.deleted == ["tender-procedure.md"]
    assert sorted(e["source"] for e in DocumentIndex.open(root, NAME).documents.values()) == ["policy.md"]


def test_delete_for_one_department_keeps_a_shared_document_for_the_others(root, docs, real_embedder):
    _ingest(root, [docs / "hr"], ["hr", "legal"], real_embedder)
    rep = delete_documents(root, NAME, ["policy.md"], departments=["legal"])
    assert rep.deleted == [] and rep.relabelled == ["policy.md"]
    assert [e["departments"] for e in DocumentIndex.open(root, NAME).documents.values()] == [["hr"]]


# --------------------------------------------------------------------------- index docs / index delete


def test_cli_index_docs_and_index_delete(tmp_path, docs):
    idx = str(tmp_path / "idx")
    for dept in ("hr", "it"):
        res = _cli("--index-dir", idx, "ingest", "-q", "-i", NAME, "-d", dept, str(docs / dept))
        assert res.exit_code == 0, res.output
    res = _cli("--index-dir", idx, "index", "docs", "-i", NAME, "--json")
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert sorted((r["source"], r["departments"], r["chunks"] > 0) for r in rows) == [
        ("policy.md", ["hr"], True), ("policy.md", ["it"], True)]
    assert {len(r["sha256"]) for r in rows} == {64}
    text = _cli("--index-dir", idx, "index", "docs", "-i", NAME, "-d", "it")
    assert text.exit_code == 0 and len(text.output.splitlines()) == 1
    assert text.output.startswith("policy.md\tit\t") and "sha256:" in text.output

    res = _cli("--index-dir", idx, "index", "delete", NAME)  # no terminal, no --yes: refused
    assert res.exit_code == 2 and "--yes" in res.output
    assert (tmp_path / "idx" / NAME / "CURRENT").is_file()
    res = _cli("--index-dir", idx, "index", "delete", "nosuch", "--yes")
    assert res.exit_code == 2 and "nosuch" in res.output and NAME in res.output  # lists the existing ones
    res = _cli("--index-dir", idx, "index", "delete", NAME, "--yes")
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "idx" / NAME).exists()
    assert _cli("--index-dir", idx, "index", "list").output.strip() == ""
    res = _cli("--index-dir", idx, "index", "docs", "-i", NAME)
    assert res.exit_code == 2 and "not found" in res.output
