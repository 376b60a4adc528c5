"""Old indexes (format 1) keyed documents by the path as ingested: relative to the ingesting
process's working directory, or absolute. They open and serve as they are, upgraded in memory:
an absolute path is shown relative to the deepest folder common to the index's absolute paths
(one document: its parent folder), and at most its last LEGACY_DISPLAY_PARTS components; a
relative one as it was stored. The stored path is kept as
`legacy_path` so the next ingest of the same file recognises it and rekeys the document to its
root-relative source ("migrated", nothing re-embedded). The next save writes format 2.
"""

from __future__ import annotations

import posixpath
import re

LEGACY_DISPLAY_PARTS = 3  # components of an old absolute path shown in citations (folder/folder/file)


def _is_absolute(p: str) -> bool:
    return p.startswith("/") or bool(re.match(r"[A-Za-z]:/", p))


def _legacy_display(paths: list[str]) -> dict[str, str]:
    """Old stored path -> the source shown for it (see the module docstring)."""
    absolute = [p for p in paths if _is_absolute(p)]
    try:
        base = posixpath.commonpath([posixpath.dirname(p) for p in absolute]) if absolute else ""
    except ValueError:  # mixed kinds of absolute path (drive letters and /): no common folder
        base = ""

    def shown(p: str) -> str:
        rel = posixpath.relpath(p, base) if base else p.lstrip("/")
        # At most the last LEGACY_DISPLAY_PARTS components: a shallow common folder ("/") must not
        # turn the rest of a server path (home folders, user names) into a citation.
        return "/".join(rel.split("/")[-LEGACY_DISPLAY_PARTS:])

    return {p: shown(p) if p in absolute else p for p in paths}


def upgrade_format_1(manifest: dict, chunks: list) -> None:
    """In memory: entries without a source (format 1, keyed by the path as ingested) get one,
    and a key that shows no absolute path; chunks get their document's key."""
    docs = manifest["documents"]
    old = [k for k, e in docs.items() if "source" not in e]
    if old:
        display = _legacy_display(old)
        upgraded: dict[str, dict] = {k: e for k, e in docs.items() if k not in display}
        keys: dict[str, str] = {}
        for k in old:
            new = display[k]
            n = 2
            while new in upgraded:
                new = f"{display[k]}@{n}"
                n += 1
            keys[k] = new
            upgraded[new] = {**docs[k], "source": display[k], "legacy_path": k}
        manifest["documents"] = upgraded
        for c in chunks:
            if not c.doc and c.source in keys:
                c.doc, c.source = keys[c.source], display[c.source]
    for c in chunks:
        c.doc = c.doc or c.source
