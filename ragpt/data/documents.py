"""Read documents (.txt, .md, .html, .pdf) and split them into token-aware chunks.

Text extraction uses pypdf and BeautifulSoup; chunking uses langchain-text-splitters'
recursive splitter measured in the *embedder's* tokens, so every chunk fits the embedder's
window and is embedded whole.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ragpt.errors import DocumentError

SUPPORTED_SUFFIXES = {".txt", ".md", ".markdown", ".html", ".htm", ".pdf"}


@dataclass
class Document:
    source: str  # display path, also the document's key in an index
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


def display_path(path: Path) -> str:
    """Path relative to the working directory when below it, else absolute (POSIX form)."""
    path = path.resolve()
    try:
        return path.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def _first_line_title(text: str, fallback: str) -> str:
    for line in text.splitlines():
        line = line.strip().lstrip("#").strip()
        if line:
            return line[:200]
    return fallback


def _read_pdf(path: Path) -> tuple[str, str | None]:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(str(path))
        pages = [page.extract_text() or "" for page in reader.pages]
        meta_title = reader.metadata.title if reader.metadata else None
    except (PdfReadError, OSError, ValueError) as e:
        raise DocumentError(f"{path}: not a readable PDF ({e})") from e
    return "\n\n".join(p.strip() for p in pages), meta_title


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


def read_document(path: Path) -> Document:
    """Extract one file's text and title; raise DocumentError naming the file on any problem."""
    path = Path(path)
    if not path.exists():
        raise DocumentError(f"{path}: no such file or folder")
    if not path.is_file():
        raise DocumentError(f"{path}: not a file")
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise DocumentError(
            f"{path}: unsupported file type {suffix or '(none)'!r}; "
            f"supported: {', '.join(sorted(SUPPORTED_SUFFIXES))}"
        )
    raw = path.read_bytes()
    sha = hashlib.sha256(raw).hexdigest()
    title: str | None = None
    if suffix == ".pdf":
        text, title = _read_pdf(path)
    else:
        try:
            decoded = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DocumentError(f"{path}: not UTF-8 text ({e})") from e
        if suffix in {".html", ".htm"}:
            text, title = _read_html(decoded)
        else:
            text = decoded
    text = _normalise(text)
    if not text:
        raise DocumentError(f"{path}: empty file (no text could be extracted)")
    return Document(
        source=display_path(path),
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


class Chunker:
    """Recursive splitting (paragraph > line > sentence > word) with a token budget and overlap."""

    def __init__(self, tokenizer, chunk_tokens: int, chunk_overlap: int):
        from langchain_text_splitters import RecursiveCharacterTextSplitter

        self.chunk_tokens = chunk_tokens
        self.chunk_overlap = chunk_overlap
        self._splitter = RecursiveCharacterTextSplitter.from_huggingface_tokenizer(
            tokenizer,
            chunk_size=chunk_tokens,
            chunk_overlap=chunk_overlap,
            separators=["\n\n", "\n", ". ", " ", ""],
            keep_separator="end",
            strip_whitespace=True,
        )

    def split(self, doc: Document, departments: list[str]) -> list[Chunk]:
        chunks = []
        prev_start = -1
        for i, piece in enumerate(self._splitter.split_text(doc.text)):
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


def source_matches(indexed_source: str, sample_source: str) -> bool:
    """An index stores display paths; compare by the trailing department/file part."""
    return indexed_source == sample_source or indexed_source.endswith("/" + sample_source)
