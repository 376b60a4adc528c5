"""The soft-prompt registry: numbered versions per department, a review state, an audit log.

Layout under `root` (settings.prompt_dir):

    <dept>/<version>/      a SoftPrompt folder (prompt.safetensors + meta.json), never rewritten
    audit.jsonl            one JSON line per change: time, actor, action, department, version,
                           reason (+ checksums for registrations, from/to for activations).
                           It is the registry's state: see ragpt.softprompts.audit_log.
    .registry.lock         the lock every change holds

Life cycle: register -> draft; approve -> approved; activate -> the department's one active
version. Approving twice is an error (IllegalTransitionError), so the audit log never shows a
second approval that changed nothing; so is activating the version that is already active.
Rollback undoes the latest activation that is still in force: activations form a stack
(activate pushes, rollback pops), so after v1, v2, v3 two rollbacks give v2 then v1.

Crash safety: a change is one line appended to the log and fsynced, under one FileLock over the
registry. Registering first writes the version folder (temp folder + rename) and then the line,
so a crash leaves either a complete registered version or an unregistered folder whose number is
never reused. The next change removes the temp files that killed writers left in the registry's
folder, and the next change of a department the temp folders and files left in its folder.

Readers take no lock: they replay the log (cached until the file changes; a change of the file
parses only the lines appended since) and ignore a torn last line; version folders are immutable
once registered.

Scale: what a request needs (the active version, a version's state) comes from the replayed log
alone, without listing folders or reading version files (`active_version_or_none`, `states`);
`versions` reads each version's meta.json (the listing shows provenance) but never a tensor, and
imports no torch. Checksums are verified when a version is loaded (`load`), at its first use.

Registries from before the log was the state kept it in <dept>/state.json. Such a department is
read from state.json until its next change, which first appends a "migrate" line carrying that
state and then removes the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock, Timeout

from ragpt.atomic import fsync_path, sha256_file
from ragpt.errors import RagptError, SoftPromptError, UnknownDepartmentError
from ragpt.names import check_name
from ragpt.softprompts.audit_log import (
    LOG_FORMAT,
    AuditLogError,
    LogContents,
    Replayed,
    append_record,
    empty_state,
    read_log,
    replay,
    touches,
    utc_now,
)

if TYPE_CHECKING:  # torch loads only for the operations that read or write tensors
    from ragpt.softprompts.artifact import SoftPrompt

LEGACY_STATE_FILE = "state.json"
AUDIT_FILE = "audit.jsonl"
LOCK_FILE = ".registry.lock"
LOCK_TIMEOUT_S = 60.0
VERSION_RE = re.compile(r"^v([1-9][0-9]*)$")
META_FILE = "meta.json"  # artifact.META_FILE, not imported from there so that torch stays unloaded
# The newest artifact format this code reads (artifact.FORMAT_VERSION is this number): meta.json is
# read and checked here, without torch, so that listing a thousand versions costs no torch import.
ARTIFACT_FORMAT_VERSION = 2


class RegistryError(RagptError):
    """The registry cannot do what was asked, or its files are damaged."""


class RegistryDamagedError(RegistryError, AuditLogError):
    """The audit log or a legacy state file cannot be read as registry state."""


class UnknownPromptDepartmentError(RegistryError, UnknownDepartmentError):
    """The department has no soft prompts in the registry."""


class UnknownVersionError(RegistryError):
    """The department has no such version."""


class IllegalTransitionError(RegistryError):
    """A state change the life cycle does not allow (e.g. activating a draft)."""


class ReleaseGateError(IllegalTransitionError):
    """Approving a draft that its dev evaluation found worse than no prompt, without --force."""


class NoActivePromptError(RegistryError):
    """The department has no active version (none activated yet)."""


def _version_number(v: str) -> int:
    m = VERSION_RE.match(v)
    return int(m.group(1)) if m else 0


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or SoftPromptError naming the file and what is wrong."""
    if not path.is_file():
        raise SoftPromptError(f"{path}: missing")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SoftPromptError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(obj, dict):
        raise SoftPromptError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def read_meta(folder: Path | str) -> dict[str, Any]:
    """meta.json of a prompt folder, checked for the keys `SoftPrompt.load` relies on (no tensor
    read, no torch import; `ragpt.softprompts.artifact.read_meta` is this function)."""
    path = Path(folder) / META_FILE
    meta = read_json_object(path)
    fv = meta.get("format_version", 1)  # files from before the field existed were format 1
    if not isinstance(fv, int) or isinstance(fv, bool):
        raise SoftPromptError(f"{path}: format_version {fv!r} is not an integer")
    if fv > ARTIFACT_FORMAT_VERSION:
        raise SoftPromptError(
            f"{path}: format_version {meta['format_version']} is newer than this ragpt "
            f"understands ({ARTIFACT_FORMAT_VERSION}); upgrade ragpt"
        )
    for key, typ in (("n_tokens", int), ("hidden_size", int), ("sha256", str),
                     ("department", str), ("base_model_fingerprint", str)):
        if not isinstance(meta.get(key), typ) or isinstance(meta.get(key), bool):
            raise SoftPromptError(f"{path}: field {key!r} missing or not a {typ.__name__}")
    depth = meta.get("depth", 1)
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
        raise SoftPromptError(f"{path}: field 'depth' {depth!r} is not a positive integer")
    if depth > 1 and fv < 2:
        raise SoftPromptError(f"{path}: a deep prompt (depth {depth}) needs format_version 2, not {fv}")
    return meta


def _is_temp(p: Path) -> bool:
    """A leftover of a killed write: a version's temp folder or an atomic write's temp file."""
    return p.name.startswith(".") and (p.is_dir() or p.name.endswith(".tmp"))


class PromptRegistry:
    """Versions, states and audit log of department soft prompts under one folder."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self._cache: tuple[tuple[int, int, int], LogContents, Replayed] | None = None

    # ------------------------------------------------------------------ paths and files
    @property
    def log_path(self) -> Path:
        return self.root / AUDIT_FILE

    def _dept_dir(self, dept: str) -> Path:
        return self.root / check_name("department", dept)

    def _version_dir(self, dept: str, version: str) -> Path:
        return self._dept_dir(dept) / check_name("version", version)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.root / LOCK_FILE), timeout=LOCK_TIMEOUT_S)
        try:
            with lock:
                yield
        except Timeout as e:
            raise RegistryError(
                f"registry {self.root} is busy: could not lock {LOCK_FILE} in {LOCK_TIMEOUT_S:.0f} s"
            ) from e

    def _log(self, *, reread: bool = False) -> tuple[LogContents, Replayed]:
        """The log and the state it implies, re-read only when the file changed (or `reread`:
        under the lock, where a change by another process must be seen even if it left the
        file's size and time as they were). A re-read parses and replays only the lines appended
        since the last read when the earlier bytes are unchanged (`read_log`'s `after`)."""
        try:
            st = os.stat(self.log_path)
            key = (st.st_ino, st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            key = (0, 0, 0)
        if reread or self._cache is None or self._cache[0] != key:
            # A new file (another inode: replaced, or deleted and recreated) is read whole.
            prev = self._cache if self._cache is not None and self._cache[0][0] == key[0] else None
            try:
                contents = read_log(self.log_path, after=prev[1] if prev else None)
            except AuditLogError as e:
                raise RegistryDamagedError(f"the registry's {e}") from e
            self._cache = (key, contents, replay(contents, base=prev[2] if prev else None))
        return self._cache[1], self._cache[2]

    def _legacy_state(self, dept: str) -> dict[str, Any] | None:
        path = self._dept_dir(dept) / LEGACY_STATE_FILE
        if not path.is_file():
            return None
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RegistryDamagedError(f"{dept}/{LEGACY_STATE_FILE}: not valid JSON ({e})") from e
        if not isinstance(state, dict) or not isinstance(state.get("versions"), dict) or not all(
                isinstance(e, dict) and isinstance(e.get("state"), str) for e in state["versions"].values()):
            raise RegistryDamagedError(f"{dept}/{LEGACY_STATE_FILE}: not a registry state file")
        return {**empty_state(), **state}

    def _state(self, dept: str, *, must_exist: bool = True) -> dict[str, Any]:
        check_name("department", dept)
        replayed = self._log()[1]
        if dept in replayed.damaged:
            raise RegistryDamagedError(f"department {dept!r}: {replayed.damaged[dept]}")
        if dept in replayed.states:
            return replayed.states[dept]
        legacy = self._legacy_state(dept)
        if legacy is not None:
            return legacy
        if must_exist:
            known = ", ".join(self.departments()) or "none"
            raise UnknownPromptDepartmentError(
                f"department {dept!r} has no soft prompts in the registry (known: {known})"
            )
        return empty_state()

    def _clean_leftovers(self, dept: str) -> None:
        """Remove what killed writers left in the registry's folder and in `dept`'s (under the lock,
        so no live writer owns any of it). Only the changed department's folder is searched: with
        a thousand departments, listing every folder on every change made each change cost as
        much as all departments together. A killed registration leaves its temp folder in its own
        department, whose next change (the only one that picks a version number there) removes it."""
        dept_dir = self._dept_dir(dept)
        for folder in [self.root, *([dept_dir] if dept_dir.is_dir() else [])]:
            for p in folder.iterdir():
                if p.name != LOCK_FILE and _is_temp(p):
                    if p.is_dir():
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        with suppress(FileNotFoundError):
                            p.unlink()

    @contextmanager
    def _change(self, dept: str, *, must_exist: bool = True) -> Iterator[tuple[dict[str, Any], Any]]:
        """Lock, clean up, adopt a legacy department, and hand out its state and a `commit`
        that appends one record (the change happens exactly when its line is on disk)."""
        with self._locked():
            self._clean_leftovers(dept)
            contents, replayed = self._log(reread=True)  # under the lock: another process may have written
            logged = dept in replayed.states or dept in replayed.damaged
            legacy = None if logged else self._legacy_state(dept)
            if logged:  # a migration that was killed before it removed the old file
                with suppress(FileNotFoundError, RagptError):
                    (self._dept_dir(dept) / LEGACY_STATE_FILE).unlink()

            def commit(record: dict[str, Any]) -> None:
                nonlocal contents
                append_record(self.log_path, {"format": LOG_FORMAT, "time": utc_now(), **record}, contents)
                contents = self._log(reread=True)[0]

            if legacy is not None:
                commit({"action": "migrate", "department": dept, "version": legacy["active"],
                        "actor": "ragpt", "reason": f"adopted {LEGACY_STATE_FILE} into the audit log",
                        "state": {k: legacy[k] for k in ("versions", "active", "activations")}})
                with suppress(FileNotFoundError):
                    (self._dept_dir(dept) / LEGACY_STATE_FILE).unlink()
            yield self._state(dept, must_exist=must_exist), commit

    @staticmethod
    def _check_actor(actor: str, reason: str) -> None:
        if not isinstance(actor, str) or not actor.strip():
            raise RegistryError("actor must be a non-empty name (who makes this change)")
        if not isinstance(reason, str):
            raise RegistryError("reason must be a string")

    @staticmethod
    def _entry(state: dict[str, Any], dept: str, version: str) -> dict[str, Any]:
        check_name("version", version)
        entry = state["versions"].get(version)
        if entry is None:
            known = ", ".join(sorted(state["versions"], key=_version_number)) or "none"
            raise UnknownVersionError(
                f"department {dept!r} has no version {version!r} (known: {known})"
            )
        return entry

    # ------------------------------------------------------------------ mutations
    def register(self, prompt: SoftPrompt, *, actor: str, reason: str = "") -> str:
        """Save `prompt` as the department's next version ("v1", "v2", ...), in state draft.

        The caller's object is left as it is; `load` returns the stored copy with its version.
        """
        return self._register(prompt, actor=actor, reason=reason, action="register")

    def _register(self, prompt: SoftPrompt, *, actor: str, reason: str, action: str,
                  **audit_more: Any) -> str:
        from ragpt.softprompts.artifact import SoftPrompt

        self._check_actor(actor, reason)
        dept = prompt.department
        dept_dir = self._dept_dir(dept)
        with self._change(dept, must_exist=False) as (state, commit):
            # Next free number: folders left by a crash before the log line was written count
            # as taken, so a version name is never reused for different bytes.
            taken = [_version_number(v) for v in state["versions"]]
            if dept_dir.is_dir():
                taken += [_version_number(p.name) for p in dept_dir.iterdir() if p.is_dir()]
            version = f"v{max(taken, default=0) + 1}"
            stored = SoftPrompt(tensor=prompt.tensor, meta={**prompt.meta, "version": version},
                                query_adapter=prompt.query_adapter)
            # Write into a hidden temp folder and rename: a version folder appears complete.
            dept_dir.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=dept_dir))
            try:
                stored.save(tmp)
                meta_sha = sha256_file(tmp / META_FILE)
                os.replace(tmp, dept_dir / version)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            fsync_path(dept_dir)  # the folder's name is on disk before the line that names it
            commit({"action": action, "department": dept, "version": version, "actor": actor,
                    "reason": reason, "sha256": stored.meta["sha256"], "meta_sha256": meta_sha,
                    **audit_more})
        return version

    def approve(self, dept: str, version: str, *, actor: str, reason: str = "", force: bool = False) -> None:
        """draft -> approved. Approving an approved version raises IllegalTransitionError.

        A draft whose dev verdict (recorded by `ragpt train`) is "worse" than no prompt is
        refused unless `force`, with a reason; the audit line carries the verdict and the force.
        """
        self._check_actor(actor, reason)
        with self._change(dept) as (state, commit):
            entry = self._entry(state, dept, version)
            if entry["state"] != "draft":
                raise IllegalTransitionError(
                    f"{dept} {version} is already {entry['state']}; only drafts can be approved"
                )
            verdict = self._dev_verdict(dept, version, entry)
            worse = (verdict or {}).get("verdict") == "worse"
            if worse and not force:
                raise ReleaseGateError(
                    f"{dept} {version} scored worse than no prompt on its dev set "
                    f"({verdict.get('delta'):+} F1 [{verdict.get('low'):+}, {verdict.get('high'):+}], "
                    f"n={verdict.get('n')}); approve it anyway with --force and a --reason"
                )
            if worse and not reason.strip():
                raise ReleaseGateError("approving a draft that scored worse than no prompt needs a --reason")
            more = {"verdict": verdict} if verdict else {}
            if worse:
                more["forced"] = True
            commit({"action": "approve", "department": dept, "version": version, "actor": actor,
                    "reason": reason, **more})

    def _dev_verdict(self, dept: str, version: str, entry: dict[str, Any]) -> dict[str, Any] | None:
        """The release verdict training recorded in the version's meta.json (JSON only, checked
        against the hash registered with it: an edited verdict is not trusted)."""
        path = self._version_dir(dept, version) / META_FILE
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise SoftPromptError(f"{dept}/{version}/{META_FILE}: cannot be read ({e.strerror})") from e
        if entry.get("meta_sha256") and hashlib.sha256(raw).hexdigest() != entry["meta_sha256"]:
            raise SoftPromptError(f"{dept}/{version}/{META_FILE}: changed since it was registered")
        try:
            meta = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SoftPromptError(f"{dept}/{version}/{META_FILE}: not valid JSON") from e
        verdict = (meta.get("metrics") or {}).get("dev_verdict") if isinstance(meta, dict) else None
        return verdict if isinstance(verdict, dict) else None

    def activate(self, dept: str, version: str, *, actor: str, reason: str = "") -> None:
        """Make an approved version the department's one active prompt."""
        self._check_actor(actor, reason)
        with self._change(dept) as (state, commit):
            entry = self._entry(state, dept, version)
            if entry["state"] != "approved":
                raise IllegalTransitionError(
                    f"{dept} {version} is a {entry['state']}; approve it before activating it"
                )
            if state["active"] == version:
                raise IllegalTransitionError(f"{dept} {version} is already active")
            commit({"action": "activate", "department": dept, "version": version, "actor": actor,
                    "reason": reason, "from": state["active"], "to": version})

    def rollback(self, dept: str, *, actor: str, reason: str = "") -> str:
        """Re-activate the approved version that was active before the current one."""
        self._check_actor(actor, reason)
        with self._change(dept) as (state, commit):
            current = state["active"]
            if current is None:
                raise IllegalTransitionError(f"{dept} has no active version to roll back")
            stack = self._activation_stack(state)
            # The top is the current version; below it, the one it replaced.
            while stack and stack[-1] == current:
                stack.pop()
            target = next((v for v in reversed(stack)
                           if state["versions"].get(v, {}).get("state") == "approved"), None)
            if target is None:
                raise IllegalTransitionError(
                    f"{dept} has no earlier approved version to roll back to (active: {current})"
                )
            commit({"action": "rollback", "department": dept, "version": target, "actor": actor,
                    "reason": reason, "from": current, "to": target})
        return target

    def deactivate(self, dept: str, *, actor: str, reason: str = "") -> str:
        """Take the active version out of service: the department then answers without a soft
        prompt. The version stays approved (it can be activated again); rollback will not return
        to it. For pulling a version that has no earlier approved version to roll back to."""
        self._check_actor(actor, reason)
        with self._change(dept) as (state, commit):
            current = state["active"]
            if current is None:
                raise IllegalTransitionError(f"{dept} has no active version to deactivate")
            commit({"action": "deactivate", "department": dept, "version": current, "actor": actor,
                    "reason": reason, "from": current, "to": None})
        return current

    def migrate_legacy(self) -> list[str]:
        """Adopt every department still kept in a state.json into the log now, rather than at
        its next change; returns those departments."""
        legacy = [d for d in self.departments() if (self._dept_dir(d) / LEGACY_STATE_FILE).is_file()]
        for dept in legacy:
            with self._change(dept):
                pass
        return legacy

    @staticmethod
    def _activation_stack(state: dict[str, Any]) -> list[str]:
        """Replay the activation history: activate pushes a version, rollback pops back to one,
        deactivate pops the version it took out of service."""
        stack: list[str] = []
        for rec in state["activations"]:
            if rec.get("action") == "deactivate":
                if stack and stack[-1] == rec["version"]:
                    stack.pop()
            elif rec.get("action") == "rollback":
                while stack and stack[-1] != rec["version"]:
                    stack.pop()
                if not stack:  # history edited by hand; keep going from the rolled-back-to one
                    stack.append(rec["version"])
            else:
                stack.append(rec["version"])
        return stack

    # ------------------------------------------------------------------ reads
    def departments(self) -> list[str]:
        if not self.root.is_dir():
            return []
        legacy = {p.name for p in self.root.iterdir() if (p / LEGACY_STATE_FILE).is_file()}
        replayed = self._log()[1]
        return sorted(set(replayed.states) | set(replayed.damaged) | legacy)

    def active_version(self, dept: str) -> str | None:
        return self._state(dept)["active"]

    def active_version_or_none(self, dept: str) -> str | None:
        """The active version, or None when the department has none or no soft prompts at all.

        `active_version(d) if d in departments() else None` without listing the registry's
        folders: the log's replay (and, for a department not in the log, one look for its legacy
        state.json) answers it, whatever the number of departments. A damaged department still
        raises RegistryDamagedError."""
        return self._state(dept, must_exist=False)["active"]

    def states(self, dept: str) -> dict[str, str]:
        """Version -> "draft", "approved" or "active", oldest first, from the log alone (no version
        file is read): what serving needs to tell which versions it may serve."""
        state = self._state(dept)
        return {v: "active" if state["active"] == v else state["versions"][v]["state"]
                for v in sorted(state["versions"], key=_version_number)}

    def load(
        self,
        dept: str,
        version: str | None = None,
        *,
        base_fingerprint: str | None = None,
        hidden_size: int | None = None,
        max_depth: int | None = None,
    ) -> SoftPrompt:
        """A validated prompt: `version`, or the active one when None."""
        from ragpt.softprompts.artifact import SoftPrompt

        state = self._state(dept)
        if version is None:
            version = state["active"]
            if version is None:
                raise NoActivePromptError(
                    f"department {dept!r} has no active soft prompt; approve and activate a "
                    "version first (ragpt prompts list)"
                )
        entry = self._entry(state, dept, version)
        folder = self._version_dir(dept, version)
        # meta.json is not covered by the tensor checksum; its hash recorded at registration
        # catches edits to it (a changed fingerprint, department or metric).
        meta_path = folder / META_FILE
        if meta_path.is_file() and entry.get("meta_sha256") and \
                sha256_file(meta_path) != entry["meta_sha256"]:
            raise SoftPromptError(f"{dept}/{version}/{META_FILE}: changed since it was registered")
        prompt = SoftPrompt.load(folder, base_fingerprint=base_fingerprint, hidden_size=hidden_size,
                                 max_depth=max_depth)
        if prompt.meta.get("sha256") != entry.get("sha256", prompt.meta.get("sha256")):
            raise SoftPromptError(f"{dept}/{version}: tensor differs from the one registered")
        if prompt.department != dept or prompt.version != version:
            raise SoftPromptError(
                f"{dept}/{version}/{META_FILE}: says {prompt.department} {prompt.version}, "
                f"but sits at {dept}/{version}"
            )
        return prompt

    def versions(self, dept: str) -> list[dict[str, Any]]:
        """One row per version, oldest first: version, state (draft/approved/active), provenance."""
        state = self._state(dept)
        rows = []
        for v in sorted(state["versions"], key=_version_number):
            entry = state["versions"][v]
            try:
                meta = read_meta(self._version_dir(dept, v))
            except SoftPromptError:
                meta = {}  # listed anyway, so a damaged version is visible; load() says why
            rows.append({
                "version": v,
                "state": "active" if state["active"] == v else entry["state"],
                "created": meta.get("created"),
                "registered": entry.get("registered"),
                "author": meta.get("author"),
                "n_tokens": meta.get("n_tokens"),
                "depth": meta.get("depth", 1),
                "metrics": meta.get("metrics", {}),
            })
        return rows

    def meta(self, dept: str, version: str) -> dict[str, Any]:
        """A registered version's metadata (meta.json: provenance, contract, metrics), without its tensor."""
        self._entry(self._state(dept), dept, version)
        return read_meta(self._version_dir(dept, version))

    def status(self, dept: str, version: str) -> dict[str, Any]:
        """A version's state and the latest change that touched it (who, when, what, why)."""
        state = self._state(dept)
        entry = self._entry(state, dept, version)
        last = next((r for r in reversed(self.audit(dept)) if touches(r, version)), None)
        return {"state": "active" if state["active"] == version else entry["state"],
                "registered": entry.get("registered"), "registered_by": entry.get("registered_by"),
                "approved": entry.get("approved"), "approved_by": entry.get("approved_by"),
                "last_change": None if last is None else
                {k: last.get(k) for k in ("time", "actor", "action", "from", "to", "reason") if k in last}}

    def diff(self, dept: str, a: str, b: str) -> dict[str, Any]:
        """Metadata keys whose values differ, and a numeric comparison of the two tensors."""
        from ragpt.softprompts.artifact import tensor_comparison

        pa, pb = self.load(dept, a), self.load(dept, b)
        keys = sorted(set(pa.meta) | set(pb.meta))
        changed = {k: {"a": pa.meta.get(k), "b": pb.meta.get(k)}
                   for k in keys if pa.meta.get(k) != pb.meta.get(k)}
        return {"department": dept, "a": a, "b": b, "metadata": changed,
                "tensor": tensor_comparison(pa.tensor, pb.tensor)}

    def audit(self, dept: str | None = None) -> list[dict[str, Any]]:
        """Audit records in the order they were written, optionally for one department
        (lines from before the log was the state included: they are the trail)."""
        records = self._log()[0].records
        return [r for r in records if dept is None or r.get("department") == dept]

    # ------------------------------------------------------------------ PEFT
    def export_peft(self, dept: str, version: str, folder: Path | str, *,
                    base_model_name_or_path: str | None, model_config: Any) -> Path:
        """Write a version in PEFT prompt-tuning format (a read: no state change, no audit)."""
        from ragpt.softprompts.artifact import export_peft

        return export_peft(self.load(dept, version), folder,
                           base_model_name_or_path=base_model_name_or_path, model_config=model_config)

    def import_peft(self, folder: Path | str, dept: str, *, actor: str, base_fingerprint: str,
                    reason: str = "", hidden_size: int | None = None) -> str:
        """Register a PEFT prompt-tuning adapter as the department's next version (a draft)."""
        from ragpt.softprompts.artifact import import_peft

        check_name("department", dept)
        prompt = import_peft(folder, department=dept, base_fingerprint=base_fingerprint,
                             author=actor, hidden_size=hidden_size)
        return self._register(prompt, actor=actor, reason=reason, action="import",
                              source=str(Path(folder).resolve()))
