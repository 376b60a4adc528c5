"""Ingest documents into a named index: read, chunk, embed, write a new snapshot atomically.

Everything that can fail on bad input (missing path, unsupported or empty file, bad names,
embedder mismatch) fails before anything is written.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock
from tqdm.auto import tqdm

from ragpt.data.documents import Chunker, Document, display_path, expand_paths, read_document
from ragpt.errors import RagptError
from ragpt.lm.models import Embedder
from ragpt.names import check_name
from ragpt.retrieval.index import DocumentIndex


@dataclass
class IngestReport:
    index: str
    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    relabelled: list[str] = field(default_factory=list)  # same content, new departments
    deleted: list[str] = field(default_factory=list)
    chunks_embedded: int = 0
    seconds: float = 0.0
    embed_seconds: float = 0.0

    @property
    def chunks_per_second(self) -> float:
        return self.chunks_embedded / self.embed_seconds if self.embed_seconds > 0 else 0.0


def _lock(root: Path, name: str) -> FileLock:
    # Beside the index folder, not inside it: taking the lock must not create the index.
    root.mkdir(parents=True, exist_ok=True)
    return FileLock(str(root / f".{name}.lock"), timeout=600)


def ingest(
    root: Path,
    name: str,
    paths: Sequence[Path],
    departments: Sequence[str],
    embedder: Embedder,
    *,
    chunk_tokens: int = 200,
    chunk_overlap: int = 40,
    batch_size: int = 64,
    progress: bool = True,
) -> IngestReport:
    """Add or update documents, readable by `departments`, in index `name` under `root`.

    An unchanged document (same bytes, same departments) is skipped; a changed one has its
    chunks replaced; a document ingested again with other departments is relabelled.
    The departments given replace the document's readers: to share a document, name them all.
    """
    t0 = time.perf_counter()
    root = Path(root)
    check_name("index", name)
    if not departments:
        raise RagptError("at least one --department is required")
    departments = sorted({check_name("department", d) for d in departments})
    if not paths:
        raise RagptError("no documents given")
    # The embedder adds its special tokens ([CLS], [SEP]) inside the same window.
    window = embedder.max_tokens - embedder.tokenizer.num_special_tokens_to_add(pair=False)
    if chunk_tokens > window:
        raise RagptError(
            f"chunk_tokens={chunk_tokens} exceeds the embedder's window of {window} text tokens "
            f"({embedder.max_tokens} including special tokens)"
        )
    files = expand_paths(paths)
    docs: list[Document] = [read_document(f) for f in tqdm(files, desc="read", disable=not progress)]
    if DocumentIndex.exists(root, name):  # fail on a mismatch before taking the lock
        DocumentIndex.open(root, name).check_embedder(embedder.name, embedder.dim)

    report = IngestReport(index=name)
    with _lock(root, name):
        if DocumentIndex.exists(root, name):
            index = DocumentIndex.open(root, name)
            index.check_embedder(embedder.name, embedder.dim)
        else:
            index = DocumentIndex.empty(
                root, name, embedder.name, embedder.dim,
                {"chunk_tokens": chunk_tokens, "chunk_overlap": chunk_overlap},
            )
        chunker = Chunker(embedder.tokenizer, chunk_tokens, chunk_overlap)
        to_embed: list[Document] = []
        for doc in docs:
            known = index.manifest["documents"].get(doc.source)
            if known and known["sha256"] == doc.sha256:
                if known["departments"] == departments:
                    report.unchanged.append(doc.source)
                else:
                    index.set_departments(doc.source, departments)
                    report.relabelled.append(doc.source)
                continue
            (report.replaced if known else report.added).append(doc.source)
            to_embed.append(doc)

        chunks = []
        for doc in to_embed:
            doc_chunks = chunker.split(doc, departments)
            chunks.extend(doc_chunks)
            index.remove_source(doc.source)
            index.manifest["documents"][doc.source] = {
                "sha256": doc.sha256,
                "title": doc.title,
                "departments": departments,
                "n_chunks": len(doc_chunks),
                "chars": len(doc.text),
                "ingested": time.time(),
            }
        if chunks:
            t_embed = time.perf_counter()
            vectors = embedder.encode([c.text for c in chunks], batch_size=batch_size, progress=progress)
            report.embed_seconds = time.perf_counter() - t_embed
            index.add(chunks, vectors)
            report.chunks_embedded = len(chunks)
        if to_embed or report.relabelled or not DocumentIndex.exists(root, name):
            index.save()
    report.seconds = time.perf_counter() - t0
    return report


def delete_documents(root: Path, name: str, sources: Sequence[str]) -> IngestReport:
    """Remove documents (by source path as ingested, or a path that resolves to it)."""
    root = Path(root)
    report = IngestReport(index=name)
    with _lock(root, name):
        index = DocumentIndex.open(root, name)
        for s in sources:
            key = s if s in index.manifest["documents"] else display_path(Path(s))
            if key not in index.manifest["documents"]:
                raise RagptError(f"document {s!r} is not in index {name!r}")
        for s in sources:
            key = s if s in index.manifest["documents"] else display_path(Path(s))
            index.remove_source(key)
            report.deleted.append(key)
        index.save()
    return report
