"""The registry's audit log: an append-only JSON-lines file that is also its source of truth.

Every registry change is one line, written with one `write` and fsynced before the change is
reported done; the state of a department (its versions, their review state, the active version
and the activation history) is a replay of its lines. Nothing else holds state, so there is
nothing that a crash could leave disagreeing with the log.

A crash can cut short only the line being appended: a tail without its newline. Readers ignore
it (the change never happened) and the next writer truncates it before appending.

Lines written before the log was the source of truth (no "format" key) stay in the file as the
trail; a department from that time is adopted by one "migrate" line carrying its old state.json,
after which its lines are replayed from there.

This module imports no torch: the registry's life-cycle changes run without it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ragpt.atomic import fsync_path
from ragpt.errors import RagptError

LOG_FORMAT = 2
ACTIONS = ("register", "import", "approve", "activate", "rollback", "deactivate", "migrate")


class AuditLogError(RagptError):
    """The audit log is damaged: a line that is not a record, or a change that cannot have happened."""


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class LogContents:
    records: list[dict[str, Any]]
    line_numbers: list[int]  # of each record, from 1
    committed_bytes: int  # up to and including the last newline
    torn_bytes: int  # after it: an append a crash cut short
    lines: int = 0  # complete lines (blank ones included), so a later read numbers on from here
    digest: bytes = b""  # sha256 of the committed bytes: a later read checks they are still there
    carried: int = 0  # records taken over unparsed from the read this one extended (read_log's `after`)


def _parse_lines(data: bytes, first_line: int, name: str) -> tuple[list[dict[str, Any]], list[int], int]:
    """Records and their line numbers in `data` (complete lines only), numbering from `first_line`."""
    records, numbers = [], []
    lines = data.split(b"\n")[:-1]
    for n, line in enumerate(lines, first_line):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise AuditLogError(f"{name} line {n}: not valid JSON ({e.__class__.__name__})") from e
        if not isinstance(rec, dict) or not isinstance(rec.get("department"), str):
            raise AuditLogError(f"{name} line {n}: not an audit record")
        records.append(rec)
        numbers.append(n)
    return records, numbers, len(lines)


def read_log(path: Path, after: LogContents | None = None) -> LogContents:
    """Every complete line of the log, in order. A damaged complete line raises AuditLogError.

    With `after` (an earlier read of the same file) only the lines appended since are parsed, when
    the bytes `after` read are still the file's first bytes (checked by their sha256); otherwise
    (the file was edited, replaced or cut) it is read whole. A registry with a thousand departments
    has thousands of lines, and every change re-reads the log under the lock: parsing only the new
    lines keeps a change from costing a parse of the whole history.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return LogContents([], [], 0, 0)
    end = data.rfind(b"\n") + 1
    view = memoryview(data)
    if after is not None and after.digest and after.committed_bytes <= end and \
            hashlib.sha256(view[:after.committed_bytes]).digest() == after.digest:
        records, numbers, lines = _parse_lines(data[after.committed_bytes:end], after.lines + 1, path.name)
        return LogContents(after.records + records, after.line_numbers + numbers, end, len(data) - end,
                           after.lines + lines, hashlib.sha256(view[:end]).digest(), len(after.records))
    records, numbers, lines = _parse_lines(data[:end], 1, path.name)
    return LogContents(records, numbers, end, len(data) - end, lines, hashlib.sha256(view[:end]).digest())


def append_record(path: Path, record: dict[str, Any], contents: LogContents) -> None:
    """Append one record durably. Call it holding the registry lock, with what read_log returned
    under that lock: a torn tail left by a crashed writer is cut off first."""
    path = Path(path)
    created = not path.exists()
    line = (json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")
    with open(path, "ab") as f:
        if contents.torn_bytes:
            f.truncate(contents.committed_bytes)
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
    if created:
        fsync_path(path.parent)  # the file's name, not only its bytes, must survive a power cut


def empty_state() -> dict[str, Any]:
    return {"versions": {}, "active": None, "activations": [], "last_change": None}


def _damaged(rec: dict[str, Any], why: str) -> AuditLogError:
    return AuditLogError(f"{rec.get('action')!r} of {rec.get('version')} at {rec.get('time')} {why}")


def _apply(state: dict[str, Any], rec: dict[str, Any]) -> None:
    action, version = rec.get("action"), rec.get("version")
    if action == "migrate":
        old = rec.get("state")
        if not isinstance(old, dict) or not isinstance(old.get("versions"), dict):
            raise _damaged(rec, "carries no state")
        state.clear()
        state.update(empty_state(), **copy.deepcopy(old))
        state.setdefault("activations", [])
        state["last_change"] = rec
        return
    versions = state["versions"]
    if action in ("register", "import"):
        if not isinstance(version, str) or version in versions:
            raise _damaged(rec, "registers a version that exists")
        versions[version] = {"state": "draft", "registered": rec.get("time"),
                             "registered_by": rec.get("actor"), "sha256": rec.get("sha256"),
                             "meta_sha256": rec.get("meta_sha256")}
    elif action == "approve":
        if versions.get(version, {}).get("state") != "draft":
            raise _damaged(rec, "approves a version that is not a draft")
        versions[version].update(state="approved", approved=rec.get("time"), approved_by=rec.get("actor"))
    elif action in ("activate", "rollback", "deactivate"):
        if versions.get(version, {}).get("state") != "approved":
            raise _damaged(rec, "changes the activation of a version that is not approved")
        if rec.get("from") != state["active"]:
            raise _damaged(rec, f"says the active version was {rec.get('from')} but it was {state['active']}")
        state["active"] = None if action == "deactivate" else version
        state["activations"].append({"version": version, "action": action, "time": rec.get("time"),
                                     "actor": rec.get("actor")})
    else:
        raise _damaged(rec, "is not a known action")
    state["last_change"] = rec


@dataclass
class Replayed:
    states: dict[str, dict[str, Any]]  # department -> versions, active, activations, last_change
    damaged: dict[str, str]  # department -> why its lines cannot be replayed


def replay(contents: LogContents, base: Replayed | None = None) -> Replayed:
    """The state of every department that the log holds, from its format-2 lines.

    A line that records a change which cannot have happened (approving a version never
    registered, an activation whose "from" is not the active version) damages its department
    only: the others replay on.

    `base`, the replay of the read that `contents` extended (`contents.carried` records), is
    carried forward and only the new records are applied; `base` itself is left as it was (the
    departments the new records change are copied first), so a state handed out earlier never
    changes under its reader.
    """
    if base is None or not contents.carried:
        out, start = Replayed({}, {}), 0
    else:
        out, start = Replayed(dict(base.states), dict(base.damaged)), contents.carried
    copied: set[str] = set()
    for rec, n in zip(contents.records[start:], contents.line_numbers[start:]):
        dept = rec["department"]
        if rec.get("format") != LOG_FORMAT or dept in out.damaged:
            continue  # a line from before the log was the source of truth is trail only
        if dept not in copied:
            if dept in out.states and start:
                out.states[dept] = copy.deepcopy(out.states[dept])
            copied.add(dept)
        try:
            _apply(out.states.setdefault(dept, empty_state()), rec)
        except AuditLogError as e:
            out.damaged[dept] = f"audit.jsonl line {n}: {e}; the log was edited or damaged"
            out.states.pop(dept, None)
    return out


def touches(rec: dict[str, Any], version: str) -> bool:
    """Whether a record changed `version`'s state (incl. being replaced as the active one)."""
    return version in (rec.get("version"), rec.get("from"), rec.get("to"))
