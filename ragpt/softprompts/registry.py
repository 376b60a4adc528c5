"""The soft-prompt registry: numbered versions per department, a review state, an audit log.

Layout under `root` (settings.prompt_dir):

    <dept>/<version>/      a SoftPrompt folder (prompt.safetensors + meta.json), never rewritten
    <dept>/state.json      {"versions": {v: {"state": "draft"|"approved", ...}},
                            "active": v | null,
                            "activations": [{"version": v, "action": "activate"|"rollback",
                                             "time": ..., "actor": ...}, ...]}
    audit.jsonl            one JSON object per state change: time, actor, action,
                           department, version, reason (+ from/to for activations)
    .registry.lock         the lock every mutation holds

Life cycle: register -> draft; approve -> approved; activate -> the department's one active
version. Approving twice is an error (IllegalTransitionError), so the audit log never shows a
second approval that changed nothing; so is activating the version that is already active.
Rollback undoes the latest activation that is still in force: activations form a stack
(activate pushes, rollback pops), so after v1, v2, v3 two rollbacks give v2 then v1.

Concurrency: every mutation takes one FileLock over the whole registry, re-reads state.json
inside it, writes state.json atomically (temp + rename) and appends its audit line (write,
flush, fsync) before releasing. Readers take no lock: state.json is replaced atomically and
version folders are immutable once registered.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from ragpt.atomic import atomic_write_json, sha256_file
from ragpt.errors import RagptError, SoftPromptError, UnknownDepartmentError
from ragpt.names import check_name
from ragpt.softprompts.artifact import (
    META_FILE,
    SoftPrompt,
    read_meta,
    tensor_comparison,
    utc_now,
)
from ragpt.softprompts.artifact import export_peft as _export_peft
from ragpt.softprompts.artifact import import_peft as _import_peft

STATE_FILE = "state.json"
AUDIT_FILE = "audit.jsonl"
LOCK_FILE = ".registry.lock"
LOCK_TIMEOUT_S = 60.0
VERSION_RE = re.compile(r"^v([1-9][0-9]*)$")


class RegistryError(RagptError):
    """The registry cannot do what was asked, or its files are damaged."""


class UnknownPromptDepartmentError(RegistryError, UnknownDepartmentError):
    """The department has no soft prompts in the registry."""


class UnknownVersionError(RegistryError):
    """The department has no such version."""


class IllegalTransitionError(RegistryError):
    """A state change the life cycle does not allow (e.g. activating a draft)."""


class NoActivePromptError(RegistryError):
    """The department has no active version (none activated yet)."""


def _version_number(v: str) -> int:
    m = VERSION_RE.match(v)
    return int(m.group(1)) if m else 0


def _empty_state() -> dict[str, Any]:
    return {"versions": {}, "active": None, "activations": []}


class PromptRegistry:
    """Versions, states and audit log of department soft prompts under one folder."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    # ------------------------------------------------------------------ paths and files
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

    def _read_state(self, dept: str, *, must_exist: bool = True) -> dict[str, Any]:
        path = self._dept_dir(dept) / STATE_FILE
        if not path.is_file():
            if must_exist:
                known = ", ".join(self.departments()) or "none"
                raise UnknownPromptDepartmentError(
                    f"department {dept!r} has no soft prompts in {self.root} (known: {known})"
                )
            return _empty_state()
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RegistryError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(state, dict) or not isinstance(state.get("versions"), dict):
            raise RegistryError(f"{path}: not a registry state file")
        state.setdefault("active", None)
        state.setdefault("activations", [])
        return state

    def _write_state(self, dept: str, state: dict[str, Any]) -> None:
        atomic_write_json(self._dept_dir(dept) / STATE_FILE, state)

    def _append_audit(self, record: dict[str, Any]) -> None:
        # One write of one line in append mode, then fsync: a reader sees whole lines only.
        line = json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n"
        with open(self.root / AUDIT_FILE, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def _audit(self, action: str, dept: str, version: str | None, actor: str, reason: str,
               **more: Any) -> None:
        self._append_audit({"time": utc_now(), "actor": actor, "action": action,
                            "department": dept, "version": version, "reason": reason, **more})

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
        self._check_actor(actor, reason)
        dept = prompt.department
        dept_dir = self._dept_dir(dept)
        with self._locked():
            state = self._read_state(dept, must_exist=False)
            # Next free number: folders left by a crash before state.json was written count
            # as taken, so a version name is never reused for different bytes.
            taken = [_version_number(v) for v in state["versions"]]
            if dept_dir.is_dir():
                taken += [_version_number(p.name) for p in dept_dir.iterdir() if p.is_dir()]
            version = f"v{max(taken, default=0) + 1}"
            stored = SoftPrompt(tensor=prompt.tensor, meta={**prompt.meta, "version": version})
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
            state["versions"][version] = {
                "state": "draft",
                "registered": utc_now(),
                "registered_by": actor,
                "sha256": stored.meta["sha256"],
                "meta_sha256": meta_sha,
            }
            self._write_state(dept, state)
            self._audit(action, dept, version, actor, reason, **audit_more)
        return version

    def approve(self, dept: str, version: str, *, actor: str, reason: str = "") -> None:
        """draft -> approved. Approving an approved version raises IllegalTransitionError."""
        self._check_actor(actor, reason)
        with self._locked():
            state = self._read_state(dept)
            entry = self._entry(state, dept, version)
            if entry["state"] != "draft":
                raise IllegalTransitionError(
                    f"{dept} {version} is already {entry['state']}; only drafts can be approved"
                )
            entry.update(state="approved", approved=utc_now(), approved_by=actor)
            self._write_state(dept, state)
            self._audit("approve", dept, version, actor, reason)

    def activate(self, dept: str, version: str, *, actor: str, reason: str = "") -> None:
        """Make an approved version the department's one active prompt."""
        self._check_actor(actor, reason)
        with self._locked():
            state = self._read_state(dept)
            entry = self._entry(state, dept, version)
            if entry["state"] != "approved":
                raise IllegalTransitionError(
                    f"{dept} {version} is a {entry['state']}; approve it before activating it"
                )
            if state["active"] == version:
                raise IllegalTransitionError(f"{dept} {version} is already active")
            previous = state["active"]
            self._set_active(state, version, "activate", actor)
            self._write_state(dept, state)
            self._audit("activate", dept, version, actor, reason, **{"from": previous, "to": version})

    def rollback(self, dept: str, *, actor: str, reason: str = "") -> str:
        """Re-activate the approved version that was active before the current one."""
        self._check_actor(actor, reason)
        with self._locked():
            state = self._read_state(dept)
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
            self._set_active(state, target, "rollback", actor)
            self._write_state(dept, state)
            self._audit("rollback", dept, target, actor, reason, **{"from": current, "to": target})
        return target

    def deactivate(self, dept: str, *, actor: str, reason: str = "") -> str:
        """Take the active version out of service: the department then answers without a soft
        prompt. The version stays approved (it can be activated again); rollback will not return
        to it. For pulling a version that has no earlier approved version to roll back to."""
        self._check_actor(actor, reason)
        with self._locked():
            state = self._read_state(dept)
            current = state["active"]
            if current is None:
                raise IllegalTransitionError(f"{dept} has no active version to deactivate")
            state["active"] = None
            state["activations"].append({"version": current, "action": "deactivate", "time": utc_now(),
                                         "actor": actor})
            self._write_state(dept, state)
            self._audit("deactivate", dept, current, actor, reason, **{"from": current, "to": None})
        return current

    @staticmethod
    def _set_active(state: dict[str, Any], version: str, action: str, actor: str) -> None:
        state["active"] = version
        state["activations"].append(
            {"version": version, "action": action, "time": utc_now(), "actor": actor}
        )

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
        return sorted(p.name for p in self.root.iterdir() if (p / STATE_FILE).is_file())

    def active_version(self, dept: str) -> str | None:
        return self._read_state(dept)["active"]

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
        state = self._read_state(dept)
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
            raise SoftPromptError(f"{meta_path}: changed since it was registered")
        prompt = SoftPrompt.load(folder, base_fingerprint=base_fingerprint, hidden_size=hidden_size,
                                 max_depth=max_depth)
        if prompt.meta.get("sha256") != entry.get("sha256", prompt.meta.get("sha256")):
            raise SoftPromptError(f"{folder}: tensor differs from the one registered")
        if prompt.department != dept or prompt.version != version:
            raise SoftPromptError(
                f"{meta_path}: says {prompt.department} {prompt.version}, "
                f"but sits at {dept}/{version}"
            )
        return prompt

    def versions(self, dept: str) -> list[dict[str, Any]]:
        """One row per version, oldest first: version, state (draft/approved/active), provenance."""
        state = self._read_state(dept)
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

    def diff(self, dept: str, a: str, b: str) -> dict[str, Any]:
        """Metadata keys whose values differ, and a numeric comparison of the two tensors."""
        pa, pb = self.load(dept, a), self.load(dept, b)
        keys = sorted(set(pa.meta) | set(pb.meta))
        changed = {k: {"a": pa.meta.get(k), "b": pb.meta.get(k)}
                   for k in keys if pa.meta.get(k) != pb.meta.get(k)}
        return {"department": dept, "a": a, "b": b, "metadata": changed,
                "tensor": tensor_comparison(pa.tensor, pb.tensor)}

    def audit(self, dept: str | None = None) -> list[dict[str, Any]]:
        """Audit records in the order they were written, optionally for one department."""
        path = self.root / AUDIT_FILE
        if not path.is_file():
            return []
        records = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise RegistryError(f"{path}: line {n} is not valid JSON ({e})") from e
                if dept is None or rec.get("department") == dept:
                    records.append(rec)
        return records

    # ------------------------------------------------------------------ PEFT
    def export_peft(self, dept: str, version: str, folder: Path | str, *,
                    base_model_name_or_path: str | None, model_config: Any) -> Path:
        """Write a version in PEFT prompt-tuning format (a read: no state change, no audit)."""
        return _export_peft(self.load(dept, version), folder,
                            base_model_name_or_path=base_model_name_or_path,
                            model_config=model_config)

    def import_peft(self, folder: Path | str, dept: str, *, actor: str, base_fingerprint: str,
                    reason: str = "", hidden_size: int | None = None) -> str:
        """Register a PEFT prompt-tuning adapter as the department's next version (a draft)."""
        check_name("department", dept)
        prompt = _import_peft(folder, department=dept, base_fingerprint=base_fingerprint,
                              author=actor, hidden_size=hidden_size)
        return self._register(prompt, actor=actor, reason=reason, action="import",
                              source=str(Path(folder).resolve()))
