"""The admin API behind the release console: read the registry, and approve / activate / roll back
/ deactivate soft-prompt versions, each change recorded in the audit log with the admin's name.

    GET  /admin/v1/departments                                    versions, states, verdicts, contracts
    GET  /admin/v1/departments/{dept}/versions/{version}          + hyperparameters, evaluations, loss curve
    GET  /admin/v1/audit?department=&last=                        the audit trail, oldest first
    POST /admin/v1/departments/{dept}/versions/{version}/approve  {"reason": "...", "force": false}
    POST /admin/v1/departments/{dept}/versions/{version}/activate {"reason": "..."}
    POST /admin/v1/departments/{dept}/rollback                    {"reason": "..."}
    POST /admin/v1/departments/{dept}/deactivate                  {"reason": "..."}

Authentication: `Authorization: Bearer <admin key>` or the console's admin session cookie (with
its CSRF header); a department key is refused with 403. A change takes effect in the running
service at once: every request resolves the active version from the registry's log.
"""

from __future__ import annotations

import asyncio
import json

from fastapi import FastAPI, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from ragpt.errors import RagptError
from ragpt.names import NAME_RE
from ragpt.softprompts.registry import (
    IllegalTransitionError,
    PromptRegistry,
    UnknownPromptDepartmentError,
    UnknownVersionError,
)
from ragpt_service.auth import KeyRing, hash_api_key
from ragpt_service.config import AdminConfig
from ragpt_service.errors import ApiError
from ragpt_service.sessions import SessionTable, session_from_cookie

MAX_REASON_CHARS = 2000
MAX_AUDIT_RECORDS = 1000


class AdminAuth:
    """Who an admin request comes from: an admin key's name, or 401/403."""

    def __init__(self, config: AdminConfig, department_keys: KeyRing):
        self._names = {digest: name for name, digest in config.keys.items()}
        self._department_keys = department_keys
        self.sessions = SessionTable("admin", config.session_hours * 3600)

    def name_for_key(self, key: str) -> str:
        digest = hash_api_key(key)
        name = self._names.get(digest)
        if name is not None:
            return name
        if self._department_keys.knows(key):
            raise ApiError(403, "a department key cannot use the release console or the admin API",
                           code="forbidden")
        raise ApiError(401, "invalid admin key", code="invalid_api_key")

    def actor(self, request: Request) -> str:
        authorization = request.headers.get("authorization")
        if authorization:
            scheme, _, key = authorization.partition(" ")
            if scheme.lower() != "bearer" or not key.strip():
                raise ApiError(401, "malformed Authorization header: expected 'Bearer <admin key>'",
                               code="invalid_api_key")
            return self.name_for_key(key.strip())
        session = session_from_cookie(request, self.sessions)
        if session is None:
            raise ApiError(401, "missing admin key: send 'Authorization: Bearer <admin key>' or log in at /console",
                           code="invalid_api_key")
        return session.admin or ""


class ChangeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(..., max_length=MAX_REASON_CHARS, description="Why; recorded in the audit log. Required.")


class ApproveRequest(ChangeRequest):
    force: bool = Field(False, description="Approve a draft whose dev verdict is 'worse' (audited).")


def _version_row(registry: PromptRegistry, dept: str, row: dict) -> dict:
    from ragpt.serving.contract import InputContract
    from ragpt.softprompts.artifact import read_meta

    folder = registry.root / dept / row["version"]
    try:
        meta = read_meta(folder)
        contract = InputContract.from_prompt_meta(meta).to_dict()
    except RagptError:
        meta, contract = {}, None  # listed anyway: a damaged version stays visible
    tensor = folder / "prompt.safetensors"
    return {**row, "bytes": tensor.stat().st_size if tensor.is_file() else None,
            "dev_verdict": (row.get("metrics") or {}).get("dev_verdict"), "contract": contract,
            "meta_ok": bool(meta)}


def _details(registry: PromptRegistry, dept: str, version: str) -> dict:
    from ragpt.softprompts.artifact import read_meta

    rows = {r["version"]: r for r in registry.versions(dept)}
    if version not in rows:
        raise UnknownVersionError(f"department {dept!r} has no version {version!r}")
    out = _version_row(registry, dept, rows[version])
    folder = registry.root / dept / version
    try:
        meta = read_meta(folder)
    except RagptError:
        meta = {}
    curve: list = []
    evals = meta.get("evals") or []
    try:  # written by training beside the prompt; not part of the checksummed artifact
        saved = json.loads((folder / "loss_curve.json").read_text(encoding="utf-8"))
        curve = [{"step": p["step"], "loss": p["loss"]} for p in saved.get("loss", [])
                 if isinstance(p, dict) and "step" in p and "loss" in p]
        evals = evals or saved.get("evals", [])
    except (OSError, ValueError, AttributeError, TypeError):
        pass
    return {**out, "hyperparameters": meta.get("hyperparameters") or {}, "evals": evals, "loss_curve": curve,
            "registry": registry.status(dept, version)}


def _to_api_error(e: RagptError) -> ApiError:
    if isinstance(e, (UnknownPromptDepartmentError, UnknownVersionError)):
        return ApiError(404, str(e), code="not_found")
    if isinstance(e, IllegalTransitionError):
        return ApiError(409, str(e), code="illegal_transition")
    raise e  # a damaged registry: a logged 500 with a request id


def install_admin_routes(app: FastAPI, errors) -> None:
    """Add the admin API to the service app (`errors(*statuses)` documents the error bodies)."""

    def runtime(request: Request):
        return request.app.state.runtime

    def department(request: Request, dept: str) -> str:
        if not NAME_RE.match(dept) or dept not in runtime(request).config.departments:
            raise ApiError(404, "no such department in this service", code="not_found")
        return dept

    def version_name(version: str) -> str:
        if not NAME_RE.match(version):
            raise ApiError(404, "no such version", code="not_found")
        return version

    def reason(body: ChangeRequest) -> str:
        text = body.reason.strip()
        if not text:
            raise ApiError(400, "a reason is required: it is recorded in the audit log", code="reason_required",
                           param="reason")
        return text

    async def change(request: Request, dept: str, do) -> dict:
        registry = runtime(request).admin_registry
        try:
            await asyncio.to_thread(do, registry, request.state.actor)
            return {"department": dept, "active": await asyncio.to_thread(registry.active_version, dept)}
        except RagptError as e:
            raise _to_api_error(e) from e

    @app.get("/admin/v1/departments", tags=["admin"], responses=errors(401, 403, 500))
    async def admin_departments(request: Request) -> dict:
        rt = runtime(request)
        registry = rt.admin_registry

        def listing() -> list[dict]:
            known = set(registry.departments())
            out = []
            for d in sorted(rt.config.departments):
                if d not in known:
                    out.append({"department": d, "active": None, "versions": []})
                    continue
                rows = registry.versions(d)
                out.append({"department": d, "active": registry.active_version(d),
                            "versions": [_version_row(registry, d, r) for r in rows]})
            return out

        return {"departments": await asyncio.to_thread(listing)}

    @app.get("/admin/v1/departments/{dept}/versions/{version}", tags=["admin"],
             responses=errors(401, 403, 404, 500))
    async def admin_version(request: Request, dept: str, version: str) -> dict:
        department(request, dept)
        version_name(version)
        try:
            return await asyncio.to_thread(_details, runtime(request).admin_registry, dept, version)
        except RagptError as e:
            raise _to_api_error(e) from e

    @app.get("/admin/v1/audit", tags=["admin"], responses=errors(400, 401, 403, 404, 500))
    async def admin_audit(request: Request, department_: str | None = Query(None, alias="department"),
                          last: int = Query(100, ge=1, le=MAX_AUDIT_RECORDS)) -> dict:
        if department_ is not None:
            department(request, department_)
        records = await asyncio.to_thread(runtime(request).admin_registry.audit, department_)
        # The migrate line carries a whole old state file: the trail shows that it happened.
        return {"records": [{k: v for k, v in r.items() if k != "state"} for r in records[-last:]]}

    @app.post("/admin/v1/departments/{dept}/versions/{version}/approve", tags=["admin"],
              responses=errors(400, 401, 403, 404, 409, 413, 500))
    async def admin_approve(request: Request, dept: str, version: str, body: ApproveRequest) -> dict:
        why, version = reason(body), version_name(version)
        return await change(request, department(request, dept), lambda reg, actor: reg.approve(
            dept, version, actor=actor, reason=why, force=body.force))

    @app.post("/admin/v1/departments/{dept}/versions/{version}/activate", tags=["admin"],
              responses=errors(400, 401, 403, 404, 409, 413, 500))
    async def admin_activate(request: Request, dept: str, version: str, body: ChangeRequest) -> dict:
        why, version = reason(body), version_name(version)
        return await change(request, department(request, dept), lambda reg, actor: reg.activate(
            dept, version, actor=actor, reason=why))

    @app.post("/admin/v1/departments/{dept}/rollback", tags=["admin"],
              responses=errors(400, 401, 403, 404, 409, 413, 500))
    async def admin_rollback(request: Request, dept: str, body: ChangeRequest) -> dict:
        why = reason(body)
        return await change(request, department(request, dept), lambda reg, actor: reg.rollback(
            dept, actor=actor, reason=why))

    @app.post("/admin/v1/departments/{dept}/deactivate", tags=["admin"],
              responses=errors(400, 401, 403, 404, 409, 413, 500))
    async def admin_deactivate(request: Request, dept: str, body: ChangeRequest) -> dict:
        why = reason(body)
        return await change(request, department(request, dept), lambda reg, actor: reg.deactivate(
            dept, actor=actor, reason=why))


