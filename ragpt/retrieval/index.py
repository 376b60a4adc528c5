"""A department-aware document index on disk: FAISS vectors + chunk store + manifest.

Layout of `indexes/NAME/`:
    CURRENT               name of the live snapshot (replaced atomically)
    snap-<id>/dense.faiss FAISS IndexIDMap2(IndexFlatIP) over normalised embeddings
    snap-<id>/chunks.jsonl one chunk per line: id, text and metadata
    snap-<id>/manifest.json embedder, counts, per-document checksums, file checksums
Every change builds a new snapshot and then flips CURRENT, so readers never see a torn index
and a crash mid-write leaves the previous snapshot live. The previous snapshot is kept.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np

from ragpt.atomic import atomic_write_json, atomic_write_text, sha256_file
from ragpt.data.documents import Chunk
from ragpt.errors import (
    EmbedderMismatchError,
    IndexCorruptError,
    IndexNotFoundError,
    RagptError,
    UnknownDepartmentError,
)
from ragpt.names import check_name

FORMAT_VERSION = 1
FILTER_FIELDS = ("source", "title", "doc_sha256")


@dataclass
class StoredChunk:
    id: int
    text: str
    source: str
    title: str
    chunk: int
    start: int
    end: int
    doc_sha256: str
    departments: list[str]


class DocumentIndex:
    """Chunks, their vectors and metadata for one named index; search lives in ragpt.retrieval.search."""

    def __init__(self, root: Path, name: str, manifest: dict, faiss_index, chunks: list[StoredChunk]):
        self.root = Path(root)
        self.name = name
        self.manifest = manifest
        self.faiss = faiss_index
        self.chunks: dict[int, StoredChunk] = {c.id: c for c in chunks}
        self._version = 0  # bumped on every in-memory change; caches key on it
        self._dept_ids: dict[str, tuple[int, np.ndarray]] = {}

    # ------------------------------------------------------------------ properties
    @property
    def path(self) -> Path:
        return self.root / self.name

    @property
    def embedder_name(self) -> str:
        return self.manifest["embedder"]["name"]

    @property
    def dim(self) -> int:
        return int(self.manifest["embedder"]["dim"])

    @property
    def departments(self) -> list[str]:
        return sorted({d for c in self.chunks.values() for d in c.departments})

    @property
    def snapshot_id(self) -> str | None:
        return self.manifest.get("snapshot")

    def manifest_sha256(self) -> str:
        """Hash identifying this exact index content (recorded by soft prompts trained on it)."""
        import hashlib

        files = self.manifest.get("files", {})
        return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()

    # ------------------------------------------------------------------ checks
    def check_embedder(self, name: str, dim: int) -> None:
        if name != self.embedder_name or int(dim) != self.dim:
            raise EmbedderMismatchError(
                f"index {self.name!r} was built with embedder {self.embedder_name!r} "
                f"(dim {self.dim}) but the query uses {name!r} (dim {dim}); "
                "query with the same embedder or re-ingest the documents"
            )

    def check_department(self, department: str) -> None:
        if department not in self.departments:
            known = ", ".join(self.departments) or "(none: the index is empty)"
            raise UnknownDepartmentError(
                f"department {department!r} has no documents in index {self.name!r}; known: {known}"
            )

    # ------------------------------------------------------------------ filtering
    def allowed_ids(self, department: str, filters: dict | None = None) -> np.ndarray:
        """Ids of chunks `department` may read and that match every metadata filter.

        Filters map a field (source, title, doc_sha256) to a value or list of values.
        """
        filters = filters or {}
        if not filters:
            cached = self._dept_ids.get(department)
            if cached is not None and cached[0] == self._version:
                return cached[1]
        for key in filters:
            if key not in FILTER_FIELDS:
                raise RagptError(f"unknown filter field {key!r}; allowed: {', '.join(FILTER_FIELDS)}")
        wanted = {k: ({v} if isinstance(v, str) else set(v)) for k, v in filters.items()}
        ids = [
            c.id
            for c in self.chunks.values()
            if department in c.departments and all(getattr(c, k) in vs for k, vs in wanted.items())
        ]
        out = np.asarray(sorted(ids), dtype=np.int64)
        if not filters:
            self._dept_ids[department] = (self._version, out)
        return out

    # ------------------------------------------------------------------ mutation
    def add(self, chunks: list[Chunk], vectors: np.ndarray) -> None:
        if len(chunks) != len(vectors):
            raise ValueError("one vector per chunk expected")
        if len(chunks) == 0:
            return
        start = int(self.manifest["next_id"])
        ids = np.arange(start, start + len(chunks), dtype=np.int64)
        self.faiss.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids)
        for i, c in zip(ids.tolist(), chunks):
            self.chunks[i] = StoredChunk(id=i, **asdict(c))
        self.manifest["next_id"] = start + len(chunks)
        self._version += 1

    def remove_source(self, source: str) -> int:
        ids = [c.id for c in self.chunks.values() if c.source == source]
        if ids:
            self.faiss.remove_ids(faiss.IDSelectorBatch(np.asarray(ids, dtype=np.int64)))
            for i in ids:
                del self.chunks[i]
            self._version += 1
        self.manifest["documents"].pop(source, None)
        return len(ids)

    def set_departments(self, source: str, departments: list[str]) -> None:
        for c in self.chunks.values():
            if c.source == source:
                c.departments = list(departments)
        self.manifest["documents"][source]["departments"] = list(departments)
        self._version += 1

    # ------------------------------------------------------------------ persistence
    @classmethod
    def empty(cls, root: Path, name: str, embedder_name: str, dim: int, chunking: dict) -> DocumentIndex:
        check_name("index", name)
        manifest = {
            "format": FORMAT_VERSION,
            "name": name,
            "embedder": {"name": embedder_name, "dim": int(dim)},
            "chunking": chunking,
            "created": time.time(),
            "documents": {},
            "next_id": 0,
        }
        return cls(root, name, manifest, faiss.IndexIDMap2(faiss.IndexFlatIP(int(dim))), [])

    @staticmethod
    def exists(root: Path, name: str) -> bool:
        return (Path(root) / name / "CURRENT").is_file()

    @classmethod
    def open(cls, root: Path, name: str) -> DocumentIndex:
        check_name("index", name)
        path = Path(root) / name
        current = path / "CURRENT"
        if not current.is_file():
            names = sorted(p.parent.name for p in Path(root).glob("*/CURRENT")) if Path(root).is_dir() else []
            raise IndexNotFoundError(
                f"index {name!r} not found in {root}; existing: {', '.join(names) or '(none)'}. "
                "Create it with `ragpt ingest --index NAME --department D PATH`"
            )
        snap = path / current.read_text().strip()
        manifest_path = snap / "manifest.json"
        if not manifest_path.is_file():
            raise IndexCorruptError(f"index {name!r}: snapshot {snap} has no manifest.json")
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format") != FORMAT_VERSION:
            raise IndexCorruptError(f"index {name!r}: unsupported format {manifest.get('format')!r}")
        for fname, want in manifest["files"].items():
            f = snap / fname
            if not f.is_file() or sha256_file(f) != want:
                raise IndexCorruptError(f"index {name!r}: {f} is missing or fails its sha256 checksum")
        chunks = [
            StoredChunk(**json.loads(line))
            for line in (snap / "chunks.jsonl").read_text(encoding="utf-8").splitlines()
            if line.strip()
        ]
        index = faiss.read_index(str(snap / "dense.faiss"))
        if index.ntotal != len(chunks):
            raise IndexCorruptError(f"index {name!r}: {index.ntotal} vectors but {len(chunks)} chunks")
        return cls(root, name, manifest, index, chunks)

    def save(self) -> Path:
        """Write a new snapshot and make it current; return its folder."""
        self.path.mkdir(parents=True, exist_ok=True)
        snap_id = f"snap-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"
        tmp = self.path / f".tmp-{snap_id}"
        tmp.mkdir()
        try:
            faiss.write_index(self.faiss, str(tmp / "dense.faiss"))
            ordered = sorted(self.chunks.values(), key=lambda c: c.id)
            lines = [json.dumps(asdict(c), ensure_ascii=False) for c in ordered]
            atomic_write_text(tmp / "chunks.jsonl", "\n".join(lines) + ("\n" if lines else ""))
            counts: dict[str, int] = {}
            for c in self.chunks.values():
                for d in c.departments:
                    counts[d] = counts.get(d, 0) + 1
            self.manifest.update(
                snapshot=snap_id,
                updated=time.time(),
                n_chunks=len(self.chunks),
                n_documents=len(self.manifest["documents"]),
                departments=dict(sorted(counts.items())),
                files={f: sha256_file(tmp / f) for f in ("dense.faiss", "chunks.jsonl")},
            )
            atomic_write_json(tmp / "manifest.json", self.manifest)
            os.replace(tmp, self.path / snap_id)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        current = self.path / "CURRENT"
        previous = current.read_text().strip() if current.is_file() else None
        atomic_write_text(current, snap_id + "\n")
        self._prune(keep={snap_id, previous})
        return self.path / snap_id

    def _prune(self, keep: set[str | None]) -> None:
        """Delete snapshots other than the new one and the one it replaced (kept for a reader
        that opened it just before the flip, and for inspection)."""
        for old in self.path.glob("snap-*"):
            if old.is_dir() and old.name not in keep:
                shutil.rmtree(old, ignore_errors=True)
