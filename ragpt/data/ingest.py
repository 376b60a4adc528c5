"""Ingest documents into a named index: read, chunk, embed, write a new snapshot atomically.

Bad arguments (names, departments, missing paths, embedder mismatch, an ambiguous document)
fail before anything is written. A file that cannot be ingested (unsupported type, no text,
parse error, not UTF-8) is reported per file in the IngestReport and the rest is ingested;
with `strict=True` the first such file fails the whole ingest, nothing written.

Identity: a document is its root-relative source plus the departments that read it. Ingesting
a source again for departments overlapping its readers updates that document (unchanged,
replaced or relabelled); for other departments it is a separate document, unless it is the same
file (same location, recorded as a digest) or, for an old entry without one, the same bytes:
then it is relabelled. See ragpt.retrieval.index for old (format 1) indexes.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ragpt.config import CHUNKING_DEFAULTS, Settings
from ragpt.data.documents import (
    Chunker,
    Document,
    UnreadableDocumentError,
    collect_documents,
    is_glob,
    origin_of,
    read_document,
    source_matches,
)
from ragpt.errors import DocumentError, RagptError
from ragpt.lm.models import Embedder
from ragpt.names import check_name
from ragpt.retrieval.index import DocumentIndex, index_lock


@dataclass
class IngestReport:
    index: str
    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    relabelled: list[str] = field(default_factory=list)  # same content, new departments
    migrated: list[str] = field(default_factory=list)  # an old entry rekeyed to its relative source
    deleted: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source, reason): not a supported type
    failed: list[tuple[str, str]] = field(default_factory=list)  # (source, reason): supported, but unreadable
    chunks_embedded: int = 0
    seconds: float = 0.0
    embed_seconds: float = 0.0

    @property
    def chunks_per_second(self) -> float:
        return self.chunks_embedded / self.embed_seconds if self.embed_seconds > 0 else 0.0

    @property
    def problems(self) -> list[tuple[str, str]]:
        """Every file not ingested, with its reason (skipped, then failed)."""
        return self.skipped + self.failed


class ChunkingMismatchError(RagptError):
    """Documents asked to be chunked unlike the rest of their index."""


FLAGS = {"chunk_tokens": "--chunk-tokens", "chunk_overlap": "--chunk-overlap", "splitter": "--chunk-splitter"}


def index_chunking(index: DocumentIndex | None, chunk_tokens: int | None = None, chunk_overlap: int | None = None,
                   chunk_splitter: str | None = None, *, new_chunking: Mapping[str, Any] | None = None) -> dict:
    """The chunking an ingest into `index` uses: the index's own when it exists; for a new one
    (None) the values given, then `new_chunking` (e.g. the settings'), then the defaults.

    An index cuts every document one way, fixed when it is created: a prompt trained on its chunks
    sees the same kind of passage for every document, and re-ingesting an unchanged file changes
    nothing. A value given for an existing index that differs from its own is an error rather
    than a second chunking mixed into the index; `new_chunking` never is.
    """
    asked = {"chunk_tokens": chunk_tokens, "chunk_overlap": chunk_overlap, "splitter": chunk_splitter}
    if index is None:
        fallback = {**CHUNKING_DEFAULTS, **{k: v for k, v in (new_chunking or {}).items() if v is not None}}
        return {k: fallback[k] if v is None else v for k, v in asked.items()}
    own = index.chunking
    differ = [f"{FLAGS[k]} {v} (the index: {own[k]})" for k, v in asked.items() if v is not None and v != own[k]]
    if differ:
        raise ChunkingMismatchError(
            f"index {index.name!r} chunks its documents with {_chunking_text(own)}, fixed when it was created; "
            f"this ingest asked for {', '.join(differ)}. Leave the chunking options out to use the "
            "index's own, or ingest into a new index")
    return own


def settings_chunking(settings: Settings) -> dict:
    """The settings' chunking, for `ingest(new_chunking=...)`: what a new index gets."""
    return {"chunk_tokens": settings.chunk_tokens, "chunk_overlap": settings.chunk_overlap,
            "splitter": settings.chunk_splitter}


def _chunking_text(c: Mapping[str, Any]) -> str:
    return f"the {c['splitter']} splitter, {c['chunk_tokens']} tokens, overlap {c['chunk_overlap']}"


def _check_arguments(name: str, paths: Sequence[Path], departments: Sequence[str], embedder: Embedder,
                     chunk_tokens: int) -> list[str]:
    check_name("index", name)
    if not departments:
        raise RagptError("at least one --department is required")
    depts = sorted({check_name("department", d) for d in departments})
    if not paths:
        raise RagptError("no documents given")
    # The embedder adds its special tokens ([CLS], [SEP]) inside the same window.
    window = embedder.max_tokens - embedder.tokenizer.num_special_tokens_to_add(pair=False)
    if chunk_tokens > window:
        raise RagptError(
            f"chunk_tokens={chunk_tokens} exceeds the embedder's window of {window} text tokens "
            f"({embedder.max_tokens} including special tokens)"
        )
    return depts


def _read_all(paths: Sequence[Path], source_root: Path | None, report: IngestReport, strict: bool,
              progress: bool) -> list[Document]:
    found = collect_documents(paths, source_root)
    if strict and found.skipped:
        source, reason = found.skipped[0]
        raise DocumentError(f"{source}: {reason} (--strict: nothing ingested)")
    report.skipped.extend(found.skipped)
    docs = []
    for f in tqdm(found.files, desc="read", disable=not progress):
        try:
            docs.append(read_document(f.path, source=f.source))
        except UnreadableDocumentError as e:
            if strict:
                raise DocumentError(f"{f.source}: {e.reason} (--strict: nothing ingested)") from None
            (report.skipped if e.kind == "skipped" else report.failed).append((f.source, e.reason))
    return docs


def _candidates(index: DocumentIndex, doc: Document, claimed: set[str]) -> list[str]:
    """Keys of entries with this document's source; an old entry by its stored path."""
    real = doc.path.resolve().as_posix()
    out = []
    for key, entry in index.documents.items():
        legacy = entry.get("legacy_path")
        if key not in claimed and (entry["source"] == doc.source
                                   or (legacy and (legacy == real or source_matches(legacy, doc.source)))):
            out.append(key)
    return out


def _describe(index: DocumentIndex, keys: list[str]) -> str:
    return "; ".join(f"{index.documents[k]['source']} ({', '.join(index.documents[k]['departments'])})"
                     for k in keys)


def match_document(index: DocumentIndex, doc: Document, departments: list[str], claimed: set[str]) -> str | None:
    """The key of the document `doc` is an update of, or None for a new document (module docstring)."""
    cands = _candidates(index, doc, claimed)
    docs = index.documents
    overlap = [k for k in cands if set(docs[k]["departments"]) & set(departments)]
    if len(overlap) > 1:
        raise RagptError(
            f"{doc.source} for {', '.join(departments)} is ambiguous in index {index.name!r}: it matches "
            f"{len(overlap)} documents: {_describe(index, overlap)}. Ingest it for one of those departments, "
            f"or delete one first (`ragpt ingest -i {index.name} --delete {doc.source} -d DEPT`)"
        )
    origin = origin_of(doc.path)
    if overlap:
        entry = docs[overlap[0]]
        others = sorted(set(entry["departments"]) - set(departments))
        if entry.get("origin") not in (None, origin) and others:
            # Another file under the same name: taking the stored document's place would change
            # what those other departments read.
            raise RagptError(
                f"{doc.source} is stored in index {index.name!r} from another file, read by "
                f"{', '.join(entry['departments'])}; ingesting this one for {', '.join(departments)} would "
                f"replace it for {', '.join(others)} too. Give it a path of its own (--root), or ingest it "
                f"for {', '.join(entry['departments'])}"
            )
        return overlap[0]
    same_file = [k for k in cands if docs[k].get("origin") == origin]
    if len(same_file) == 1:
        return same_file[0]
    # The same file ingested with another root: the same document under a new source.
    moved = [k for k, e in docs.items() if k not in claimed and e.get("origin") == origin
             and set(e["departments"]) & set(departments)]
    if len(moved) == 1:
        return moved[0]
    same_bytes = [k for k in cands if "origin" not in docs[k] and docs[k]["sha256"] == doc.sha256]
    return same_bytes[0] if len(same_bytes) == 1 else None


def _entry(doc: Document, departments: list[str], n_chunks: int, embed_precision: str) -> dict:
    return {
        "source": doc.source,
        "origin": origin_of(doc.path),
        "sha256": doc.sha256,
        "title": doc.title,
        "departments": departments,
        "n_chunks": n_chunks,
        "chars": len(doc.text),
        "ingested": time.time(),
        # Provenance only: precision is not part of the embedder identity the index checks (bf16 and
        # fp32 vectors agree to cosine > 0.9999, see ragpt.lm.models.Embedder), so one index may hold
        # documents embedded at either; this says which, should a later backend need re-embedding.
        "embed_precision": embed_precision,
    }


def _open_or_create(root: Path, name: str, embedder: Embedder, chunking: dict, index_type: str):
    if DocumentIndex.exists(root, name):
        index = DocumentIndex.open(root, name)
        index.check_embedder(embedder.name, embedder.dim)
        return index
    return DocumentIndex.empty(root, name, embedder.name, embedder.dim,
                               chunking, index_type=index_type)


def ingest(
    root: Path,
    name: str,
    paths: Sequence[Path],
    departments: Sequence[str],
    embedder: Embedder,
    *,
    source_root: Path | None = None,
    strict: bool = False,
    chunk_tokens: int | None = None,
    chunk_overlap: int | None = None,
    chunk_splitter: str | None = None,
    new_chunking: Mapping[str, Any] | None = None,
    batch_size: int = 32,
    progress: bool = True,
    index_type: str | None = None,
    new_index_type: str = "auto",
) -> IngestReport:
    """Add or update documents, readable by `departments`, in index `name` under `root`.

    Sources are relative to `source_root` when given, else to each folder named (a file named
    directly: its parent folder). An unchanged document (same bytes, same departments) is skipped;
    a changed one has its chunks replaced; one ingested again with other departments is relabelled.
    The departments given replace the document's readers: to share a document, name them all.
    Files that cannot be ingested are listed in report.skipped / report.failed (strict: raise).
    `index_type` (auto, flat, ivf) changes the index's dense search structure from this save
    on; a new index gets `new_index_type` (the index_type setting) unless it is given.
    The chunk options set a new index's chunking (what is not given: `new_chunking`, such as
    `settings_chunking(settings)`, then 200/40 recursive); an existing index keeps its own, and
    a different chunk option given for it raises ChunkingMismatchError (`index_chunking`).
    """
    t0 = time.perf_counter()
    root = Path(root)
    check_name("index", name)
    existing = DocumentIndex.open(root, name) if DocumentIndex.exists(root, name) else None
    if existing is not None:  # fail on a mismatch before reading documents or taking the lock
        existing.check_embedder(embedder.name, embedder.dim)
    chunking = index_chunking(existing, chunk_tokens, chunk_overlap, chunk_splitter, new_chunking=new_chunking)
    del existing  # reopened under the lock: another ingest may have saved since
    departments = _check_arguments(name, paths, departments, embedder, chunking["chunk_tokens"])
    report = IngestReport(index=name)
    docs = _read_all(paths, source_root, report, strict, progress)
    if not docs:  # nothing readable: leave the index (or its absence) as it is
        report.seconds = time.perf_counter() - t0
        return report

    with index_lock(root, name):
        index = _open_or_create(root, name, embedder, chunking, new_index_type)
        if index.chunking != chunking:  # created by another ingest since the check above
            chunking = index_chunking(index, chunk_tokens, chunk_overlap, chunk_splitter)
        retyped = index_type is not None and index.set_index_type(index_type)
        plan = _plan(index, docs, departments, report)
        # Chunking stays ahead of embedding, not beside it: a producer thread chunking while the
        # previous chunks embed measured slower on 2 cores (it takes a core from the matmuls) and
        # chunking is ~12% of a bf16 ingest (benchmarks/results/ingest_throughput.md).
        chunker = Chunker(embedder.tokenizer, chunking["chunk_tokens"], chunking["chunk_overlap"],
                          splitter=chunking["splitter"])
        chunks = []
        for doc, old_key in plan:
            if old_key is not None:
                index.remove_document(old_key)
            key = index.new_key(doc.source)
            doc_chunks = chunker.split(doc, departments)
            for c in doc_chunks:
                c.doc = key
            chunks.extend(doc_chunks)
            index.documents[key] = _entry(doc, departments, len(doc_chunks), embedder.precision)
        if chunks:
            t_embed = time.perf_counter()
            vectors = embedder.encode([c.text for c in chunks], batch_size=batch_size, progress=progress)
            report.embed_seconds = time.perf_counter() - t_embed
            index.add(chunks, vectors)
            report.chunks_embedded = len(chunks)
        if plan or retyped or report.relabelled or report.migrated or not DocumentIndex.exists(root, name):
            index.save()
    report.seconds = time.perf_counter() - t0
    return report


def _plan(index: DocumentIndex, docs: list[Document], departments: list[str],
          report: IngestReport) -> list[tuple[Document, str | None]]:
    """Relabel and migrate in place; return the documents to (re-)embed with the key they replace.
    Every ambiguity is found here, before the index is changed."""
    matches = []
    claimed: set[str] = set()
    for doc in docs:
        key = match_document(index, doc, departments, claimed)
        if key is not None:
            claimed.add(key)
        matches.append((doc, key))
    to_embed = []
    for doc, key in matches:
        entry = index.documents.get(key) if key is not None else None
        if entry is None:
            report.added.append(doc.source)
            to_embed.append((doc, None))
            continue
        if entry["sha256"] != doc.sha256:
            report.replaced.append(doc.source)
            to_embed.append((doc, key))
            continue
        migrated = "legacy_path" in entry or entry["source"] != doc.source  # old entry, or another root
        if migrated:
            key = _migrate(index, key, doc)
            report.migrated.append(doc.source)
        if entry["departments"] != departments:
            index.set_departments(key, departments)
            report.relabelled.append(doc.source)
        elif not migrated:
            report.unchanged.append(doc.source)
    return to_embed


def _migrate(index: DocumentIndex, key: str, doc: Document) -> str:
    """Rekey an entry to the document's source (an old entry, or the same file ingested with
    another root); its chunks are kept as they are."""
    new = key if key == doc.source else index.new_key(doc.source)
    index.rekey(key, new, doc.source)
    index.documents[new]["origin"] = origin_of(doc.path)
    return new


def delete_documents(root: Path, name: str, sources: Sequence[str],
                     departments: Sequence[str] | None = None) -> IngestReport:
    """Remove documents named by relative path, glob or the path they were ingested from.

    With `departments`, only documents those departments read are selected, and a document also
    read by other departments is not removed but relabelled to those others (reported as
    relabelled). A plain path that names several documents, or a name that matches none, is an
    error and nothing is removed."""
    root = Path(root)
    check_name("index", name)  # before the lock file beside the index is created
    report = IngestReport(index=name)
    depts = sorted({check_name("department", d) for d in departments or ()})
    if not sources:
        raise RagptError("no documents given to delete")
    with index_lock(root, name):
        index = DocumentIndex.open(root, name)
        keys = _select(index, sources, depts)
        for key in keys:
            entry = index.documents[key]
            keep = [d for d in entry["departments"] if depts and d not in depts]
            if keep:
                index.set_departments(key, keep)
                report.relabelled.append(entry["source"])
            else:
                index.remove_document(key)
                report.deleted.append(entry["source"])
        index.save()
    return report


def _select(index: DocumentIndex, sources: Sequence[str], departments: list[str]) -> list[str]:
    scope = f" readable by {', '.join(departments)}" if departments else ""
    keys: list[str] = []
    for s in sources:
        s = str(s)
        found = _by_location(index, s, departments) or index.find_documents(s, departments)
        if not found:
            raise RagptError(f"document {s[:200]!r} is not in index {index.name!r}{scope}")
        if len(found) > 1 and not is_glob(s):
            raise RagptError(
                f"{s[:200]!r} names {len(found)} documents in index {index.name!r}: {_describe(index, found)}; "
                "add -d DEPT to choose, or use a glob to delete them all"
            )
        keys.extend(k for k in found if k not in keys)
    return keys


def _by_location(index: DocumentIndex, given: str, departments: list[str]) -> list[str]:
    """A path names exactly the document ingested from that file (it need not exist any more)."""
    if is_glob(given):
        return []
    path = Path(given)
    origin, real = origin_of(path), path.resolve().as_posix()
    return [k for k, e in index.documents.items()
            if (e.get("origin") == origin or e.get("legacy_path") == real)
            and (not departments or set(departments) & set(e["departments"]))]
