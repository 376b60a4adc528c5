"""Damaged indexes get a clear IndexCorruptError (API and CLI, no traceback), killed saves leave
nothing behind after the next save, and old-format indexes (sources stored as absolute or
working-directory-relative paths) open, serve without absolute paths and migrate on re-ingest."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from conftest import write
from typer.testing import CliRunner

from ragpt.cli.main import app
from ragpt.data.ingest import delete_documents, ingest
from ragpt.errors import IndexCorruptError
from ragpt.retrieval.index import DocumentIndex
from ragpt.retrieval.search import Retriever

pytestmark = pytest.mark.integration

NAME = "old"
runner = CliRunner()

VACATION = "# Vacation Policy\n\nFull-time employees receive 28 vacation days per year.\n"
PASSWORDS = "Password Policy\nPasswords must have at least 14 characters.\n"


def _ingest(root, paths, departments, embedder, **kw):
    return ingest(root, NAME, [Path(p) for p in paths], departments, embedder, chunk_tokens=64, chunk_overlap=16,
                  progress=False, **kw)


@pytest.fixture
def built(tmp_path, real_embedder):
    """An index with hr/vacation.md (hr) and it/passwords.txt (it); returns (index root, docs folder)."""
    docs = tmp_path / "docs"
    write(docs / "hr" / "vacation.md", VACATION)
    write(docs / "it" / "passwords.txt", PASSWORDS)
    root = tmp_path / "indexes"
    _ingest(root, [docs / "hr"], ["hr"], real_embedder)
    _ingest(root, [docs / "it"], ["it"], real_embedder)
    return root, docs


def _snap(root: Path) -> Path:
    return root / NAME / (root / NAME / "CURRENT").read_text().strip()


def _cli_fails_clearly(root: Path, *cmd: str) -> str:
    res = runner.invoke(app, ["--index-dir", str(root), *cmd])
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    assert "error:" in res.output and f"index {NAME!r}" in res.output
    assert "Traceback" not in res.output and str(root) not in res.output
    return res.output


# --------------------------------------------------------------------------- damaged files


@pytest.mark.parametrize(
    ("case", "what"),
    [("garbage bytes", "not valid JSON"), ("a JSON list", "not a JSON object"), ("no files", "files")],
)
def test_a_damaged_manifest_is_a_clear_error(built, case, what):
    root, _ = built
    f = _snap(root) / "manifest.json"
    good = json.loads(f.read_text())
    if case == "garbage bytes":
        f.write_bytes(b"\x00\xffnot json{{")
    elif case == "a JSON list":
        f.write_text(json.dumps([good]))
    else:
        good.pop("files")
        f.write_text(json.dumps(good))
    with pytest.raises(IndexCorruptError) as e:
        DocumentIndex.open(root, NAME)
    msg = str(e.value)
    assert f"index {NAME!r}" in msg and what in msg and "re-ingest" in msg
    assert f"{_snap(root).name}/manifest.json" in msg and str(root) not in msg
    for cmd in (["index", "info", NAME], ["index", "docs", "-i", NAME], ["retrieve", "days", "-d", "hr", "-i", NAME]):
        assert what in _cli_fails_clearly(root, *cmd)


def test_current_naming_a_missing_snapshot_is_a_clear_error(built):
    root, _ = built
    (root / NAME / "CURRENT").write_text("snap-20990101T000000-abcdef\n")
    with pytest.raises(IndexCorruptError, match="snap-20990101T000000-abcdef, which does not exist"):
        DocumentIndex.open(root, NAME)
    (root / NAME / "CURRENT").write_text("../../etc\n")
    with pytest.raises(IndexCorruptError, match="does not name a snapshot"):
        DocumentIndex.open(root, NAME)
    _cli_fails_clearly(root, "index", "info", NAME)


@pytest.mark.parametrize("line", ["{not json", "[1, 2, 3]", '{"id": 0, "text": "only two fields"}'])
def test_a_bad_chunk_line_is_a_clear_error(built, line):
    root, _ = built
    snap = _snap(root)
    lines = (snap / "chunks.jsonl").read_text().splitlines()
    lines[1] = line
    (snap / "chunks.jsonl").write_text("\n".join(lines) + "\n")
    _rechecksum(snap)  # past the checksum: the line itself must be refused
    with pytest.raises(IndexCorruptError, match=f"{snap.name}/chunks.jsonl line 2") as e:
        DocumentIndex.open(root, NAME)
    assert str(root) not in str(e.value)
    _cli_fails_clearly(root, "retrieve", "days", "-d", "hr", "-i", NAME)


def _rechecksum(snap: Path) -> None:
    m = json.loads((snap / "manifest.json").read_text())
    m["files"] = {f: hashlib.sha256((snap / f).read_bytes()).hexdigest() for f in m["files"]}
    (snap / "manifest.json").write_text(json.dumps(m))


def test_chunk_ids_that_are_not_the_vectors_ids_are_a_clear_error(built):
    root, _ = built
    snap = _snap(root)
    lines = [json.loads(x) for x in (snap / "chunks.jsonl").read_text().splitlines()]
    lines[0]["id"] = 10_000  # as many chunks as vectors, but one no vector has
    (snap / "chunks.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    _rechecksum(snap)
    with pytest.raises(IndexCorruptError, match="ids differ"):
        DocumentIndex.open(root, NAME)


def test_a_reader_whose_snapshot_is_replaced_twice_while_it_reads_opens_the_new_one(built, real_embedder,
                                                                                        monkeypatch):
    root, docs = built
    first = _snap(root).name
    real = DocumentIndex._open_snapshot.__func__
    calls = []

    def racing(cls, root_, name, path, snap_id):
        calls.append(snap_id)
        if len(calls) == 1:  # two saves land between this reader's CURRENT read and its hashing
            write(docs / "hr" / "extra.md", "Extra\n\nA second hr document.")
            _ingest(root, [docs / "hr"], ["hr"], real_embedder)
            (docs / "hr" / "extra.md").unlink()
            write(docs / "hr" / "extra2.md", "Extra two\n\nA third hr document.")
            _ingest(root, [docs / "hr"], ["hr"], real_embedder)
        return real(cls, root_, name, path, snap_id)

    monkeypatch.setattr(DocumentIndex, "_open_snapshot", classmethod(racing))
    idx = DocumentIndex.open(root, NAME)
    assert calls[0] == first and not (root / NAME / first).exists()  # pruned under the reader
    assert idx.snapshot_id == calls[-1] != first and idx.manifest["n_documents"] == 4


def test_leftovers_of_a_killed_save_are_removed_by_the_next_save(built, real_embedder, tmp_path):
    root, docs = built
    folder = root / NAME
    # What a save killed after mkdir / mid-write / before the rename of CURRENT leaves behind.
    write(folder / ".tmp-snap-20240101T000000-dead01" / "chunks.jsonl", "partial")
    (folder / ".tmp-snap-20240101T000000-dead02").mkdir()
    write(folder / ".CURRENT.abc123.tmp", "snap-x")
    assert DocumentIndex.open(root, NAME).manifest["n_documents"] == 2  # readers do not mind them
    write(docs / "hr" / "sick.txt", "Sick Leave\nReport sick leave before 9:00.\n")
    _ingest(root, [docs / "hr"], ["hr"], real_embedder)
    assert not list(folder.glob(".tmp-*")) and not list(folder.glob(".CURRENT.*"))
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith("snap-")) == ["CURRENT"]


# --------------------------------------------------------------------------- old-format indexes


def _make_old_format(root: Path, key_of) -> None:
    """Rewrite the live snapshot as the old code wrote it: format 1, documents keyed by the path
    as ingested (`key_of(source of a new entry, departments)`), chunks with that path as source
    and no document key."""
    snap = _snap(root)
    m = json.loads((snap / "manifest.json").read_text())
    old_keys = {}
    docs = {}
    for key, e in m["documents"].items():
        old_keys[key] = key_of(e["source"], e["departments"])
        docs[old_keys[key]] = {k: v for k, v in e.items() if k not in ("source", "origin")}
    m["documents"], m["format"] = docs, 1
    lines = []
    for line in (snap / "chunks.jsonl").read_text().splitlines():
        c = json.loads(line)
        c["source"] = old_keys[c.pop("doc")]
        lines.append(json.dumps(c))
    (snap / "chunks.jsonl").write_text("\n".join(lines) + "\n")
    (snap / "manifest.json").write_text(json.dumps(m))
    _rechecksum(snap)


def test_an_old_index_with_absolute_paths_serves_them_root_relative_and_migrates(built, real_embedder):
    root, docs = built
    folder = {"hr": docs / "hr", "it": docs / "it"}
    _make_old_format(root, lambda source, depts: (folder[depts[0]] / source).resolve().as_posix())
    stored = (_snap(root) / "chunks.jsonl").read_text()
    assert str(docs.resolve()) in stored  # really the old form

    idx = DocumentIndex.open(root, NAME)
    # Shown relative to the folder the old absolute paths have in common (docs/).
    assert sorted(e["source"] for e in idx.documents.values()) == ["hr/vacation.md", "it/passwords.txt"]
    hits = Retriever(idx, real_embedder).search("How many vacation days?", "hr", k=3)
    assert hits and {h.chunk.source for h in hits} == {"hr/vacation.md"}
    res = runner.invoke(app, ["--index-dir", str(root), "retrieve", "vacation days", "-d", "hr", "-i", NAME])
    assert res.exit_code == 0 and "hr/vacation.md" in res.output and str(docs.resolve()) not in res.output
    info = runner.invoke(app, ["--index-dir", str(root), "index", "info", NAME])
    assert info.exit_code == 0 and str(docs.resolve()) not in info.output

    # Re-ingesting the same files (from their folders, as the new code names them): migrated, not duplicated.
    n_chunks = idx.faiss.ntotal
    for dept in ("hr", "it"):
        rep = _ingest(root, [folder[dept]], [dept], real_embedder)
        assert rep.migrated == [{"hr": "vacation.md", "it": "passwords.txt"}[dept]]
        assert rep.added == rep.replaced == [] and rep.chunks_embedded == 0
    idx = DocumentIndex.open(root, NAME)
    assert idx.manifest["format"] == 2 and idx.faiss.ntotal == n_chunks and idx.manifest["n_documents"] == 2
    assert sorted(idx.documents) == ["passwords.txt", "vacation.md"]
    assert {c.source for c in idx.chunks.values()} == {"passwords.txt", "vacation.md"}
    assert str(docs.resolve()) not in (_snap(root) / "chunks.jsonl").read_text()
    assert str(docs.resolve()) not in (_snap(root) / "manifest.json").read_text()
    # ... and from then on it is simply unchanged.
    assert _ingest(root, [folder["hr"]], ["hr"], real_embedder).unchanged == ["vacation.md"]


def test_old_absolute_paths_from_unrelated_trees_show_at_most_their_last_components(built, real_embedder):
    root, _docs = built
    trees = {"hr": "/home/alice/private/hr-docs", "it": "/srv/it"}  # common folder: "/"
    _make_old_format(root, lambda source, depts: f"{trees[depts[0]]}/{source}")
    idx = DocumentIndex.open(root, NAME)
    shown = sorted(e["source"] for e in idx.documents.values())
    assert shown == ["private/hr-docs/vacation.md", "srv/it/passwords.txt"]
    assert not any("alice" in c.source or c.source.startswith("/") for c in idx.chunks.values())


def test_an_old_index_with_cwd_relative_paths_migrates_from_any_directory(built, real_embedder, monkeypatch):
    root, docs = built
    _make_old_format(root, lambda source, depts: f"docs/{depts[0]}/{source}")  # ingested from tmp_path
    idx = DocumentIndex.open(root, NAME)
    assert sorted(e["source"] for e in idx.documents.values()) == ["docs/hr/vacation.md", "docs/it/passwords.txt"]
    monkeypatch.chdir(docs / "it")
    rep = _ingest(root, [Path("../hr")], ["hr"], real_embedder)
    assert rep.migrated == ["vacation.md"] and rep.chunks_embedded == 0
    # A changed file of an old entry is replaced under its new source, the old entry gone.
    (docs / "it" / "passwords.txt").write_text(PASSWORDS.replace("14", "16"))
    rep = _ingest(root, [Path(".")], ["it"], real_embedder)
    assert rep.replaced == ["passwords.txt"]
    idx = DocumentIndex.open(root, NAME)
    assert sorted(idx.documents) == ["passwords.txt", "vacation.md"] and idx.manifest["n_documents"] == 2


def test_an_old_document_can_be_deleted_by_its_old_path_or_new_name(built, real_embedder):
    root, docs = built
    _make_old_format(root, lambda source, depts: (docs / depts[0] / source).resolve().as_posix())
    rep = delete_documents(root, NAME, [(docs / "hr" / "vacation.md").resolve().as_posix()])
    assert rep.deleted == ["hr/vacation.md"]
    rep = delete_documents(root, NAME, ["passwords.txt"])
    assert rep.deleted == ["it/passwords.txt"]
    assert DocumentIndex.open(root, NAME).documents == {}


def test_a_damaged_index_can_be_deleted_but_not_a_folder_that_is_no_index(built):
    root, _ = built
    (root / NAME / "CURRENT").unlink()
    (root / "notes").mkdir()
    res = runner.invoke(app, ["--index-dir", str(root), "index", "delete", "notes", "--yes"])
    assert res.exit_code == 2 and "not found" in res.output and (root / "notes").is_dir()
    res = runner.invoke(app, ["--index-dir", str(root), "index", "delete", NAME, "--yes"])
    assert res.exit_code == 0, res.output
    assert not (root / NAME).exists()
