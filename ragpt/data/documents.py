"""Read documents (.txt, .md, .html, .pdf) and split them into token-aware chunks.

Text extraction uses pypdf and BeautifulSoup; chunking uses langchain-text-splitters'
recursive splitter measured in the *embedder's* tokens, so every chunk fits the embedder's
window and is embedded whole.

A document's `source` is its path relative to a root folder, in POSIX form: the folder given to
ingest, an explicit root, or (for a file named directly) its parent folder. It never depends on
the working directory, and it is what citations show: never a server's absolute path.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import logging
import os
import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ragpt.errors import DocumentError

SUPPORTED_SUFFIXES = {".txt", ".md", ".markdown", ".html", ".htm", ".pdf"}
SCANNED_PDF = "no extractable text (scanned? run OCR first)"
_MAX_REASON = 240  # reasons quote third-party messages: keep a report line bounded


class UnreadableDocumentError(DocumentError):
    """One file cannot be ingested. `reason` is fit for a per-file report; `kind` is "skipped"
    (not a type ragpt reads: never opened) or "failed" (opened, but no usable text)."""

    def __init__(self, path: Path, reason: str, kind: str = "failed"):
        reason = reason if len(reason) <= _MAX_REASON else reason[: _MAX_REASON - 3] + "..."
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason
        self.kind = kind


@dataclass
class Document:
    source: str  # path relative to its root (POSIX): what citations show, and how ingest matches it
    title: str
    text: str
    sha256: str  # of the file's bytes: unchanged file -> skip re-ingest
    path: Path = field(repr=False)


@dataclass
class Chunk:
    text: str
    source: str
    title: str
    chunk: int  # number of the chunk within its document, from 0
    start: int  # character span in the document's extracted text
    end: int
    doc_sha256: str
    departments: list[str]
    doc: str = ""  # key of the document in the index manifest ("" until ingest assigns it)


@dataclass(frozen=True)
class DocumentFile:
    """A file to ingest and its root-relative source."""

    path: Path
    source: str


@dataclass
class CollectedFiles:
    files: list[DocumentFile] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source, reason): not a supported type


def display_path(path: Path) -> str:
    """Path relative to the working directory when below it, else absolute (POSIX form).

    Only for messages to the local user and ad-hoc reads; index sources use `relative_source`."""
    path = path.resolve()
    try:
        return path.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def relative_source(path: Path, root: Path) -> str:
    """`path` relative to `root` in POSIX form. Compared lexically first (a symlink inside the root
    keeps its name inside the root), then with symlinks resolved."""
    path, root = Path(path), Path(root)
    try:
        return Path(os.path.abspath(path)).relative_to(os.path.abspath(root)).as_posix()
    except ValueError:
        pass
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        raise DocumentError(f"{path}: not inside the root folder {root}") from None


def origin_of(path: Path) -> str:
    """A digest of the file's absolute location: tells apart two files that have the same relative
    path under different roots, without storing a server path in the index."""
    return hashlib.sha256(Path(path).resolve().as_posix().encode("utf-8")).hexdigest()[:16]


def _is_hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def _unsupported(suffix: str) -> str:
    return f"unsupported file type {suffix or '(none)'!r}; supported: {', '.join(sorted(SUPPORTED_SUFFIXES))}"


def collect_documents(paths: Iterable[Path], root: Path | None = None) -> CollectedFiles:
    """The files to ingest with their sources, and the files skipped as not supported.

    A folder contributes its supported files recursively, relative to the folder (or to `root`);
    a file named directly is relative to its parent folder (or to `root`). Hidden files and folders
    are ignored silently. Raises DocumentError, before anything is read, for a missing path, a path
    outside `root`, or two different files that would get the same source."""
    out = CollectedFiles()
    seen: dict[Path, str] = {}
    by_source: dict[str, Path] = {}
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise DocumentError(f"{p}: no such file or folder")
        if p.is_dir():
            base = Path(root) if root is not None else p
            entries = sorted(f for f in p.rglob("*") if f.is_file() and not _is_hidden(f.relative_to(p)))
            if not entries:
                raise DocumentError(f"{p}: folder holds no documents")
        else:
            base = Path(root) if root is not None else p.parent
            entries = [p]
        for f in entries:
            source = relative_source(f, base)
            if f.suffix.lower() not in SUPPORTED_SUFFIXES:
                if source not in {s for s, _ in out.skipped}:
                    out.skipped.append((source, _unsupported(f.suffix.lower())))
                continue
            real = f.resolve()
            if real in seen:  # one document once, even if named twice
                continue
            if source in by_source:
                raise DocumentError(
                    f"{by_source[source]} and {f} would both be stored as {source!r}; ingest them "
                    "separately (for different departments) or give a root that tells them apart"
                )
            seen[real] = source
            by_source[source] = f
            out.files.append(DocumentFile(f, source))
    return out


def _first_line_title(text: str, fallback: str) -> str:
    for line in text.splitlines():
        line = line.strip().lstrip("#").strip()
        if line:
            return line[:200]
    return fallback


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _pypdf_messages() -> Iterator[list[str]]:
    """Keep pypdf's warnings off the console: for a file that reads they are recoverable issues
    pypdf has fixed up; for one that does not, the caller words them into its reason."""
    logger = logging.getLogger("pypdf")
    handler = _Collect()
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield handler.messages
            handler.messages.extend(str(w.message) for w in caught)
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def _read_pdf(path: Path) -> tuple[str, str | None]:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError, PdfStreamError

    with _pypdf_messages() as messages:
        try:
            reader = PdfReader(str(path))
            pages = [page.extract_text() or "" for page in reader.pages]
            meta_title = reader.metadata.title if reader.metadata else None
        except (PdfReadError, PdfStreamError, OSError, ValueError, KeyError, TypeError) as e:
            hint = f"; pypdf: {messages[0]}" if messages else ""
            raise UnreadableDocumentError(path, f"parse error: not a readable PDF ({e}){hint}") from e
        except Exception as e:  # noqa: BLE001 - pypdf raises many kinds on damaged or encrypted files
            kind = "encrypted" if e.__class__.__name__ == "DependencyError" else "parse error"
            raise UnreadableDocumentError(path, f"{kind}: pypdf could not read it ({e.__class__.__name__})") from e
    if not pages:
        raise UnreadableDocumentError(path, "parse error: the PDF has no pages")
    text = "\n\n".join(p.strip() for p in pages)
    if not text.strip():
        raise UnreadableDocumentError(path, SCANNED_PDF)
    return text, meta_title if isinstance(meta_title, str) else None


def _read_html(raw: str) -> tuple[str, str | None]:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(raw, "html.parser")
    title = soup.title.get_text(strip=True) if soup.title else None
    for tag in soup(["script", "style", "noscript", "head"]):
        tag.decompose()
    text = soup.get_text("\n")
    return text, title


def _normalise(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"[ \t\f\v]+", " ", text)
    text = re.sub(r" *\n *", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def read_document(path: Path, source: str | None = None) -> Document:
    """Extract one file's text and title; raise DocumentError naming the file on any problem
    (UnreadableDocumentError, with a reason for the per-file report, for a file that exists).

    `source` is the document's root-relative path (ingest passes it); without it the source is
    `display_path(path)`, which suits an ad-hoc read but depends on the working directory."""
    path = Path(path)
    if not path.exists():
        raise DocumentError(f"{path}: no such file or folder")
    if not path.is_file():
        raise DocumentError(f"{path}: not a file")
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise UnreadableDocumentError(path, _unsupported(suffix), kind="skipped")
    try:
        raw = path.read_bytes()
    except OSError as e:  # permissions, a file removed or locked meanwhile: that file, not the ingest
        raise UnreadableDocumentError(path, f"cannot be read ({e.strerror or e.__class__.__name__})") from e
    sha = hashlib.sha256(raw).hexdigest()
    title: str | None = None
    if suffix == ".pdf":
        text, title = _read_pdf(path)
    else:
        try:
            decoded = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UnreadableDocumentError(path, f"not UTF-8 text ({e.reason} at byte {e.start}); "
                                                "convert it to UTF-8") from e
        if suffix in {".html", ".htm"}:
            text, title = _read_html(decoded)
        else:
            text = decoded
    text = _normalise(text)
    if not text:
        raise UnreadableDocumentError(path, "empty file (no text could be extracted)")
    return Document(
        source=source if source is not None else display_path(path),
        title=(title or "").strip() or _first_line_title(text, path.stem),
        text=text,
        sha256=sha,
        path=path,
    )


def expand_paths(paths: Iterable[Path]) -> list[Path]:
    """Files named directly, plus supported files found recursively in named folders."""
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise DocumentError(f"{p}: no such file or folder")
        if p.is_dir():
            found = sorted(
                f for f in p.rglob("*")
                if f.is_file() and f.suffix.lower() in SUPPORTED_SUFFIXES and not f.name.startswith(".")
            )
            if not found:
                raise DocumentError(f"{p}: folder holds no supported documents")
            out.extend(found)
        else:
            out.append(p)
    # One document once, even if named twice.
    seen: set[Path] = set()
    unique = []
    for f in out:
        r = f.resolve()
        if r not in seen:
            seen.add(r)
            unique.append(f)
    return unique


class _DropLongSequenceWarning(logging.Filter):
    """The splitter measures whole documents in tokens to decide where to cut; transformers warns
    that such a sequence "will result in indexing errors", which is true only for the model."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token indices sequence length is longer")


@contextlib.contextmanager
def _quiet_length_measuring() -> Iterator[None]:
    logger = logging.getLogger("transformers.tokenization_utils_base")
    quiet = _DropLongSequenceWarning()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


SPLITTERS = ("recursive", "sentences")
# "sentences": every line break and sentence end is a first-level split, so chunks are packed with
# whole sentences up to the budget and the overlap carries across paragraph boundaries. "recursive"
# splits at paragraphs first: a paragraph longer than a chunk is cut on its own (its last piece is
# often short) and overlap happens only inside it. Measured (benchmarks/retrieval_levers.py):
# "sentences" puts a gold span in the top 2 chunks more often on doc2dial, PolicyQA and TAT-QA.
_SEPARATORS = {"recursive": (["\n\n", "\n", ". ", " ", ""], False),
               "sentences": ([r"\n+|(?<=[.!?:;])\s+", " ", ""], True)}


class Chunker:
    """Recursive splitting (paragraph > line > sentence > word, or sentence/line > word) with a
    token budget and overlap."""

    def __init__(self, tokenizer, chunk_tokens: int, chunk_overlap: int, splitter: str = "recursive"):
        from langchain_text_splitters import RecursiveCharacterTextSplitter

        if splitter not in SPLITTERS:
            raise ValueError(f"splitter must be one of {', '.join(SPLITTERS)}")
        self.chunk_tokens = chunk_tokens
        self.chunk_overlap = chunk_overlap
        self.splitter = splitter
        separators, is_regex = _SEPARATORS[splitter]
        self._splitter = RecursiveCharacterTextSplitter.from_huggingface_tokenizer(
            tokenizer,
            chunk_size=chunk_tokens,
            chunk_overlap=chunk_overlap,
            separators=separators,
            is_separator_regex=is_regex,
            keep_separator="end",
            strip_whitespace=True,
        )

    def split(self, doc: Document, departments: list[str]) -> list[Chunk]:
        chunks = []
        prev_start = -1
        with _quiet_length_measuring():
            pieces = self._splitter.split_text(doc.text)
        for i, piece in enumerate(pieces):
            # Locate each piece ourselves: langchain's add_start_index subtracts the overlap
            # (in tokens) from a length in characters and can miss. Pieces are in order and
            # each starts after the previous one's start.
            start = doc.text.find(piece, prev_start + 1)
            if start < 0:
                raise DocumentError(f"{doc.source}: internal error locating chunk {i} in the text")
            prev_start = start
            chunks.append(
                Chunk(
                    text=piece,
                    source=doc.source,
                    title=doc.title,
                    chunk=i,
                    start=start,
                    end=start + len(piece),
                    doc_sha256=doc.sha256,
                    departments=list(departments),
                )
            )
        return chunks


def _ends_with_path(longer: str, shorter: str) -> bool:
    return longer == shorter or longer.endswith("/" + shorter)


def source_matches(indexed_source: str, sample_source: str) -> bool:
    """Whether an indexed source is the document a QA set names (e.g. "hr/vacation-policy.txt").

    Either may be the longer path: an index ingested from the department folder stores
    "vacation-policy.txt", one ingested with the corpus folder as root "hr/vacation-policy.txt",
    an old index a cwd-relative or absolute path; they match on whole trailing path components.
    Callers compare within one department's documents, where the file name part is unique."""
    return _ends_with_path(indexed_source, sample_source) or _ends_with_path(sample_source, indexed_source)


def is_glob(pattern: str) -> bool:
    return any(ch in pattern for ch in "*?[")


def source_matches_pattern(source: str, pattern: str) -> bool:
    """How users name documents (retrieve --source, search filters, ingest --delete).

    A glob (fnmatch: * ? [..]; * also crosses "/") must match the whole source or its trailing
    components ("*.pdf", "procurement/*"); a plain path matches the source or its trailing
    components on a folder boundary ("tender-procedure.md" matches "procurement/tender-procedure.md")."""
    pattern = pattern.replace("\\", "/").removeprefix("./")
    if is_glob(pattern):
        return fnmatch.fnmatchcase(source, pattern) or fnmatch.fnmatchcase(source, "*/" + pattern)
    return _ends_with_path(source, pattern)
