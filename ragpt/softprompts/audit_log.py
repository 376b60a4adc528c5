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


def read_log(path: Path) -> LogContents:
    """Every complete line of the log, in order. A damaged complete line raises AuditLogError."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return LogContents([], [], 0, 0)
    end = data.rfind(b"\n") + 1
    records, numbers = [], []
    for n, line in enumerate(data[:end].split(b"\n")[:-1], 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise AuditLogError(f"{Path(path).name} line {n}: not valid JSON ({e.__class__.__name__})") from e
        if not isinstance(rec, dict) or not isinstance(rec.get("department"), str):
            raise AuditLogError(f"{Path(path).name} line {n}: not an audit record")
        records.append(rec)
        numbers.append(n)
    return LogContents(records, numbers, end, len(data) - end)


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


def replay(contents: LogContents) -> Replayed:
    """The state of every department that the log holds, from its format-2 lines.

    A line that records a change which cannot have happened (approving a version never
    registered, an activation whose "from" is not the active version) damages its department
    only: the others replay on.
    """
    out = Replayed({}, {})
    for rec, n in zip(contents.records, contents.line_numbers):
        dept = rec["department"]
        if rec.get("format") != LOG_FORMAT or dept in out.damaged:
            continue  # a line from before the log was the source of truth is trail only
        try:
            _apply(out.states.setdefault(dept, empty_state()), rec)
        except AuditLogError as e:
            out.damaged[dept] = f"audit.jsonl line {n}: {e}; the log was edited or damaged"
            out.states.pop(dept, None)
    return out


def touches(rec: dict[str, Any], version: str) -> bool:
    """Whether a record changed `version`'s state (incl. being replaced as the active one)."""
    return version in (rec.get("version"), rec.get("from"), rec.get("to"))
