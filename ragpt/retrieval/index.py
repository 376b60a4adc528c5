"""A department-aware document index on disk: FAISS vectors + chunk store + manifest.

Layout of `indexes/NAME/`:
    CURRENT               name of the live snapshot (replaced atomically)
    snap-<id>/dense.faiss FAISS structure over normalised embeddings (ragpt.retrieval.dense)
    snap-<id>/chunks.jsonl one chunk per line: id, text and metadata
    snap-<id>/manifest.json embedder, counts, per-document checksums, file checksums
Every change builds a new snapshot and then flips CURRENT, so readers never see a torn index
and a crash mid-write leaves the previous snapshot live. The previous snapshot is kept.

Documents. `manifest["documents"]` maps a document key to its entry: source (path relative to
the ingest root, what citations show), departments, sha256, origin (a digest of the file's
absolute location, never the path itself), title, counts. The key is the source, or
"source@N" when another document with the same source (readable by other departments) was
there first; every chunk names its document's key in `doc`.

Old indexes (format 1) open and serve as they are, upgraded in memory: see
ragpt.retrieval.legacy_format.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import faiss
import numpy as np
from filelock import FileLock

from ragpt.atomic import atomic_write_json, atomic_write_text, fsync_path, sha256_file
from ragpt.config import CHUNKING_DEFAULTS
from ragpt.data.documents import Chunk, is_glob, source_matches, source_matches_pattern
from ragpt.errors import (
    EmbedderMismatchError,
    IndexCorruptError,
    IndexNotFoundError,
    RagptError,
    UnknownDepartmentError,
)
from ragpt.names import check_name
from ragpt.retrieval.dense import AllowedIds, DenseIndex
from ragpt.retrieval.legacy_format import upgrade_format_1

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)  # 1: documents keyed by the path as ingested (see the module docstring)
OPEN_ATTEMPTS = 3  # reads of CURRENT when saves replace the snapshot during an open
FILTER_FIELDS = ("source", "title", "doc_sha256")
INDEX_TYPES = ("auto", "flat", "ivf")
DEPARTMENT_CACHE = 256  # departments whose allowed-id selectors are kept between queries
_SNAPSHOT_NAME = re.compile(r"snap-[A-Za-z0-9_-]+")
_MANIFEST_KEYS = {"format": int, "embedder": dict, "documents": dict, "files": dict, "next_id": int}


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
    doc: str = ""  # the document's key in the manifest (format 1 chunks have none: their source is it)


_CHUNK_FIELDS = {f.name for f in fields(StoredChunk)}
_CHUNK_REQUIRED = _CHUNK_FIELDS - {"doc"}


def index_lock(root: Path, name: str) -> FileLock:
    """The lock every writer of index `name` holds (ingest, delete, save, removing the index)."""
    # Beside the index folder, not inside it: taking the lock must not create the index.
    Path(root).mkdir(parents=True, exist_ok=True)
    return FileLock(str(Path(root) / f".{name}.lock"), timeout=600)


def _damaged(name: str, what: str) -> IndexCorruptError:
    return IndexCorruptError(
        f"index {name!r}: {what}; the index is damaged: re-ingest its documents "
        f"(`ragpt index delete {name} --yes`, then `ragpt ingest -i {name} -d DEPT PATH`)"
    )


def _not_found(root: Path, name: str) -> IndexNotFoundError:
    names = sorted(p.parent.name for p in Path(root).glob("*/CURRENT")) if Path(root).is_dir() else []
    return IndexNotFoundError(
        f"index {name!r} not found in the index_dir setting's folder; existing: {', '.join(names) or '(none)'}. "
        "Create it with `ragpt ingest --index NAME --department D PATH`"
    )


class DocumentIndex:
    """Chunks, their vectors and metadata for one named index; search lives in ragpt.retrieval.search."""

    def __init__(self, root: Path, name: str, manifest: dict, dense: DenseIndex, chunks: list[StoredChunk]):
        self.root = Path(root)
        self.name = name
        self.manifest = manifest
        self.dense = dense
        self.chunks: dict[int, StoredChunk] = {c.id: c for c in chunks}
        self._version = 0  # bumped on every in-memory change; caches key on it
        # department -> its readable ids, built for all departments in one pass per version
        self._dept_ids: tuple[int, dict[str, np.ndarray]] = (-1, {})
        self._allowed: OrderedDict[str, AllowedIds] = OrderedDict()  # LRU, same version
        self._allowed_lock = threading.Lock()  # searches run in several threads of a service

    @property
    def faiss(self):
        """The raw FAISS structure (IndexIDMap2 over a flat index, or an IndexIVFFlat)."""
        return self.dense.index

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
    def chunking(self) -> dict:
        """How this index cuts documents into chunks, fixed when it was created: chunk_tokens,
        chunk_overlap, splitter (indexes made before the splitter was recorded: recursive)."""
        c = {**CHUNKING_DEFAULTS, **(self.manifest.get("chunking") or {})}
        return {"chunk_tokens": int(c["chunk_tokens"]), "chunk_overlap": int(c["chunk_overlap"]),
                "splitter": c["splitter"]}

    @property
    def departments(self) -> list[str]:
        return sorted(self._department_ids())

    @property
    def documents(self) -> dict[str, dict]:
        """Document key -> manifest entry (source, departments, sha256, n_chunks, ...)."""
        return self.manifest["documents"]

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
        if department not in self._department_ids():
            known = ", ".join(self.departments) or "(none: the index is empty)"
            raise UnknownDepartmentError(
                f"department {department!r} has no documents in index {self.name!r}; known: {known}"
            )

    # ------------------------------------------------------------------ filtering
    def allowed_ids(self, department: str, filters: dict | None = None) -> np.ndarray:
        """Ids (sorted) of chunks `department` may read and that match every metadata filter.

        Filters map a field (source, title, doc_sha256) to a value or list of values. A source
        value is a relative path or a glob (`source_matches_pattern`); the others match exactly.
        """
        filters = filters or {}
        if not filters:
            return self._department_ids().get(department, np.zeros(0, dtype=np.int64))
        for key in filters:
            if key not in FILTER_FIELDS:
                raise RagptError(f"unknown filter field {key!r}; allowed: {', '.join(FILTER_FIELDS)}")
        wanted = {k: ({v} if isinstance(v, str) else set(v)) for k, v in filters.items()}
        ids = [
            c.id
            for c in self.chunks.values()
            if department in c.departments and all(_field_matches(c, k, vs) for k, vs in wanted.items())
        ]
        return np.asarray(sorted(ids), dtype=np.int64)

    def allowed(self, department: str, filters: dict | None = None) -> AllowedIds:
        """`allowed_ids` with the FAISS selector that enforces them (kept for recent departments)."""
        if filters:
            return AllowedIds(self.allowed_ids(department, filters), self.manifest["next_id"])
        ids = self.allowed_ids(department)  # a new version drops the selectors of the older one
        with self._allowed_lock:
            hit = self._allowed.get(department)
            if hit is None or hit.ids is not ids:
                hit = self._allowed[department] = AllowedIds(ids, self.manifest["next_id"])
                while len(self._allowed) > DEPARTMENT_CACHE:
                    self._allowed.popitem(last=False)
            self._allowed.move_to_end(department)
            return hit

    def _department_ids(self) -> dict[str, np.ndarray]:
        version, by_dept = self._dept_ids
        if version != self._version:
            lists: dict[str, list[int]] = {}
            for c in self.chunks.values():
                for d in c.departments:
                    lists.setdefault(d, []).append(c.id)
            by_dept = {d: np.sort(np.asarray(ids, dtype=np.int64)) for d, ids in lists.items()}
            self._dept_ids = (self._version, by_dept)
            with self._allowed_lock:
                self._allowed.clear()
        return by_dept

    def find_documents(self, pattern: str, departments: Iterable[str] | None = None) -> list[str]:
        """Keys of the documents `pattern` names, readable by one of `departments` when given.

        A pattern matches sources as `source_matches_pattern` says (the source or its trailing
        components, or a glob). An old document also matches by the path it was stored under,
        or by a longer path ending in it. (A path to the file itself is matched by location, in
        ragpt.data.ingest, not by name: a longer path ending in "policy.md" may be another file.)"""
        wanted = set(departments or ())
        plain = not is_glob(pattern)
        out = []
        for key, entry in self.documents.items():
            if wanted and not wanted & set(entry["departments"]):
                continue
            legacy = entry.get("legacy_path")
            if source_matches_pattern(entry["source"], pattern) or (legacy and (
                    source_matches_pattern(legacy, pattern) or (plain and source_matches(pattern, legacy)))):
                out.append(key)
        return out

    # ------------------------------------------------------------------ mutation
    def add(self, chunks: list[Chunk], vectors: np.ndarray) -> None:
        if len(chunks) != len(vectors):
            raise ValueError("one vector per chunk expected")
        if len(chunks) == 0:
            return
        start = int(self.manifest["next_id"])
        ids = np.arange(start, start + len(chunks), dtype=np.int64)
        self.dense.add(vectors, ids)
        for i, c in zip(ids.tolist(), chunks):
            stored = StoredChunk(id=i, **asdict(c))
            stored.doc = stored.doc or stored.source
            self.chunks[i] = stored
        self.manifest["next_id"] = start + len(chunks)
        self._version += 1

    def remove_document(self, key: str) -> int:
        """Remove one document (by key) and its chunks; return how many chunks went."""
        ids = [c.id for c in self.chunks.values() if c.doc == key]
        if ids:
            self.dense.remove(np.asarray(ids, dtype=np.int64))
            for i in ids:
                del self.chunks[i]
            self._version += 1
        self.documents.pop(key, None)
        return len(ids)

    def remove_source(self, source: str) -> int:
        """Remove every document whose key or source is `source`."""
        keys = [k for k, e in self.documents.items() if source in (k, e["source"])]
        keys += sorted({c.doc for c in self.chunks.values() if c.source == source} - set(keys))
        return sum(self.remove_document(k) for k in keys)

    def set_departments(self, key: str, departments: list[str]) -> None:
        for c in self.chunks.values():
            if c.doc == key:
                c.departments = list(departments)
        self.documents[key]["departments"] = list(departments)
        self._version += 1

    def rekey(self, old: str, new: str, source: str) -> None:
        """Give document `old` the key `new` and the source `source` (migrating an old entry)."""
        entry = self.documents.pop(old)
        entry.pop("legacy_path", None)
        entry["source"] = source
        self.documents[new] = entry
        for c in self.chunks.values():
            if c.doc == old:
                c.doc, c.source = new, source
        self._version += 1

    def set_index_type(self, index_type: str) -> bool:
        """Ask for dense search structure `index_type` (auto, flat, ivf, hnsw) from the next save
        on; True when that changes what was asked before."""
        index_type = str(index_type).lower()
        if index_type not in INDEX_TYPES:
            raise RagptError(f"unknown index type {index_type[:20]!r}; choose one of {', '.join(INDEX_TYPES)}")
        before = self.manifest.get("dense", {}).get("requested", "auto")
        self.manifest.setdefault("dense", {})["requested"] = index_type
        return before != index_type

    def new_key(self, source: str) -> str:
        """A key for a new document: its source, or source@N when that is taken."""
        if source not in self.documents:
            return source
        n = 2
        while f"{source}@{n}" in self.documents:
            n += 1
        return f"{source}@{n}"

    # ------------------------------------------------------------------ persistence
    @classmethod
    def empty(cls, root: Path, name: str, embedder_name: str, dim: int, chunking: dict,
              *, index_type: str = "auto") -> DocumentIndex:
        check_name("index", name)
        manifest = {
            "format": FORMAT_VERSION,
            "name": name,
            "embedder": {"name": embedder_name, "dim": int(dim)},
            "chunking": chunking,
            "created": time.time(),
            "documents": {},
            "files": {},
            "next_id": 0,
        }
        index = cls(root, name, manifest, DenseIndex.flat(dim), [])
        index.set_index_type(index_type)
        return index

    @staticmethod
    def exists(root: Path, name: str) -> bool:
        return (Path(root) / name / "CURRENT").is_file()

    @classmethod
    def open(cls, root: Path, name: str) -> DocumentIndex:
        """Open the live snapshot; IndexCorruptError (naming the file relative to the index folder)
        for anything that is not what save() writes."""
        check_name("index", name)
        path = Path(root) / name
        for _attempt in range(OPEN_ATTEMPTS):
            if not (path / "CURRENT").is_file():
                raise _not_found(root, name)
            snap_id = _read_current(path, name)
            try:
                return cls._open_snapshot(root, name, path, snap_id)
            except IndexCorruptError:
                # Two saves while this reader was hashing can prune the snapshot it started on:
                # then CURRENT names a newer one, which is read instead. Damage stays damage.
                if not (path / "CURRENT").is_file() or _read_current(path, name) == snap_id:
                    raise
        raise _damaged(name, f"the live snapshot changed {OPEN_ATTEMPTS} times while it was being read")

    @classmethod
    def _open_snapshot(cls, root: Path, name: str, path: Path, snap_id: str) -> DocumentIndex:
        manifest = _read_manifest(path, snap_id, name)
        snap = path / snap_id
        for fname, want in manifest["files"].items():
            f = snap / fname
            if fname not in ("dense.faiss", "chunks.jsonl") or not f.is_file() or sha256_file(f) != want:
                raise _damaged(name, f"{snap_id}/{fname} is missing or fails its sha256 checksum")
        for fname in ("dense.faiss", "chunks.jsonl"):
            if fname not in manifest["files"]:
                raise _damaged(name, f"{snap_id}/manifest.json lists no checksum for {fname}")
        chunks = _read_chunks(snap / "chunks.jsonl", f"{snap_id}/chunks.jsonl", name)
        try:
            index = faiss.read_index(str(snap / "dense.faiss"))
        except RuntimeError:
            raise _damaged(name, f"{snap_id}/dense.faiss is not a FAISS index") from None
        if index.ntotal != len(chunks):
            raise _damaged(name, f"{index.ntotal} vectors but {len(chunks)} chunks in {snap_id}")
        if (not isinstance(index, (faiss.IndexIDMap2, faiss.IndexIVFFlat)) or index.d != manifest["embedder"]["dim"]
                or index.metric_type != faiss.METRIC_INNER_PRODUCT):
            raise _damaged(name, f"{snap_id}/dense.faiss is not a structure ragpt writes for this embedder")
        dense = DenseIndex.wrap(index, manifest.get("dense"))
        if set(dense.ids().tolist()) != {c.id for c in chunks}:
            raise _damaged(name, f"the vectors' ids and the chunks' ids differ in {snap_id}")
        upgrade_format_1(manifest, chunks)
        return cls(root, name, manifest, dense, chunks)

    def save(self) -> Path:
        """Write a new snapshot and make it current; return its folder.

        Call it holding `index_lock(root, name)`: it first removes what killed saves left behind
        (.tmp-snap-* folders, CURRENT's temp files), which only a save running unlocked could still
        be writing."""
        self.path.mkdir(parents=True, exist_ok=True)
        self._remove_leftovers()
        snap_id = f"snap-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"
        tmp = self.path / f".tmp-{snap_id}"
        tmp.mkdir()
        try:
            requested = self.manifest.get("dense", {}).get("requested", "auto")
            self.dense = self.dense.fitted(requested)  # builds or retrains the structure when due
            self.manifest["dense"] = {"requested": requested, **self.dense.meta()}
            faiss.write_index(self.dense.index, str(tmp / "dense.faiss"))
            fsync_path(tmp / "dense.faiss")  # the other files are written by ragpt.atomic, which fsyncs
            ordered = sorted(self.chunks.values(), key=lambda c: c.id)
            lines = [json.dumps(asdict(c), ensure_ascii=False) for c in ordered]
            atomic_write_text(tmp / "chunks.jsonl", "\n".join(lines) + ("\n" if lines else ""))
            counts: dict[str, int] = {}
            for c in self.chunks.values():
                for d in c.departments:
                    counts[d] = counts.get(d, 0) + 1
            self.manifest.update(
                format=FORMAT_VERSION,
                snapshot=snap_id,
                updated=time.time(),
                n_chunks=len(self.chunks),
                n_documents=len(self.manifest["documents"]),
                departments=dict(sorted(counts.items())),
                files={f: sha256_file(tmp / f) for f in ("dense.faiss", "chunks.jsonl")},
            )
            atomic_write_json(tmp / "manifest.json", self.manifest)
            fsync_path(tmp)
            os.replace(tmp, self.path / snap_id)
            fsync_path(self.path)  # the snapshot's name is on disk before CURRENT names it
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        current = self.path / "CURRENT"
        previous = current.read_text().strip() if current.is_file() else None
        atomic_write_text(current, snap_id + "\n")
        self._prune(keep={snap_id, previous})
        return self.path / snap_id

    def _remove_leftovers(self) -> None:
        for tmp in self.path.glob(".tmp-snap-*"):
            shutil.rmtree(tmp, ignore_errors=True)
        for tmp in self.path.glob(".CURRENT.*.tmp"):  # ragpt.atomic's temp name for CURRENT
            tmp.unlink(missing_ok=True)

    def _prune(self, keep: set[str | None]) -> None:
        """Delete snapshots other than the new one and the one it replaced (kept for a reader
        that opened it just before the flip, and for inspection)."""
        for old in self.path.glob("snap-*"):
            if old.is_dir() and old.name not in keep:
                shutil.rmtree(old, ignore_errors=True)


def index_folder(root: Path, name: str) -> Path:
    """The folder of index `name`, damaged or not (IndexNotFoundError when there is none)."""
    check_name("index", name)
    path = Path(root) / name
    # A damaged index (CURRENT lost) counts, a folder that never was an index does not.
    if not (path / "CURRENT").is_file() and not any(path.glob("snap-*")):
        raise _not_found(root, name)
    return path


def delete_index(root: Path, name: str) -> None:
    """Remove index `name` and all its snapshots (IndexNotFoundError if there is none)."""
    path = index_folder(root, name)
    with index_lock(root, name):
        # Renamed away first: the index disappears at once, never half-deleted under its name.
        doomed = Path(root) / f".deleted-{name}-{secrets.token_hex(3)}"
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


# ---------------------------------------------------------------------- reading a snapshot


def _field_matches(c: StoredChunk, key: str, values: set[str]) -> bool:
    value = getattr(c, key)
    if value in values:
        return True
    return key == "source" and any(source_matches_pattern(value, p) for p in values)


def _read_current(path: Path, name: str) -> str:
    try:
        snap_id = (path / "CURRENT").read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        raise _damaged(name, "CURRENT cannot be read") from None
    if not _SNAPSHOT_NAME.fullmatch(snap_id):
        raise _damaged(name, "CURRENT does not name a snapshot")
    if not (path / snap_id).is_dir():
        raise _damaged(name, f"CURRENT names snapshot {snap_id}, which does not exist")
    return snap_id


def _read_manifest(path: Path, snap_id: str, name: str) -> dict:
    rel = f"{snap_id}/manifest.json"
    f = path / snap_id / "manifest.json"
    if not f.is_file():
        raise _damaged(name, f"{rel} is missing")
    try:
        manifest = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        where = f" (line {e.lineno} column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
        raise _damaged(name, f"{rel} is not valid JSON{where}") from None
    if not isinstance(manifest, dict):
        raise _damaged(name, f"{rel} is not a JSON object")
    if manifest.get("format") not in READABLE_FORMATS:
        raise IndexCorruptError(
            f"index {name!r}: unsupported format {str(manifest.get('format'))[:20]!r} in {rel} "
            f"(this ragpt reads {', '.join(map(str, READABLE_FORMATS))})"
        )
    bad = sorted(k for k, t in _MANIFEST_KEYS.items() if not isinstance(manifest.get(k), t))
    if bad:
        raise _damaged(name, f"{rel} lacks or has a wrong type for {', '.join(bad)}")
    dense = manifest.get("dense", {})
    if isinstance(dense, dict) and dense.get("requested") == "hnsw":
        dense["requested"] = "auto"  # asked for before hnsw was dropped; the next save records auto
    if not isinstance(dense, dict) or dense.get("requested", "auto") not in INDEX_TYPES:
        raise _damaged(name, f"{rel} has an invalid dense section")
    emb = manifest["embedder"]
    if not isinstance(emb.get("name"), str) or not isinstance(emb.get("dim"), int):
        raise _damaged(name, f"{rel} has no valid embedder name and dim")
    docs = manifest["documents"]
    if not all(isinstance(e, dict) and isinstance(e.get("departments"), list) and isinstance(e.get("sha256"), str)
               for e in docs.values()):
        raise _damaged(name, f"{rel} has a document entry without departments or sha256")
    if not all(isinstance(v, str) for v in manifest["files"].values()):
        raise _damaged(name, f"{rel} has a file checksum that is not a string")
    return manifest


def _read_chunks(f: Path, rel: str, name: str) -> list[StoredChunk]:
    chunks = []
    for n, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            raise _damaged(name, f"{rel} line {n} is not valid JSON") from None
        if not (isinstance(item, dict) and _CHUNK_REQUIRED <= item.keys() <= _CHUNK_FIELDS
                and isinstance(item["id"], int) and isinstance(item["departments"], list)):
            raise _damaged(name, f"{rel} line {n} is not a chunk record")
        chunks.append(StoredChunk(**item))
    if len({c.id for c in chunks}) != len(chunks):
        raise _damaged(name, f"{rel} repeats a chunk id")
    return chunks
