"""The browser pages (chat per department, release console), their static files, the key-for-
session exchange, and the security headers every response carries.

    GET /             -> /chat
    GET /chat, /chat/{dept}   the chat page (static/chat.html)
    GET /console              the release console (static/console.html)
    GET /static/...           the pages' scripts and style, served by the service (no CDN)
    POST /ui/session {"key", "kind"}   a session cookie for a department or an admin key
    GET /ui/session?kind=              this browser's session (and its CSRF token), or 401
    DELETE /ui/session?kind=           log out
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Query, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import MutableHeaders

from ragpt_service.errors import ApiError
from ragpt_service.sessions import COOKIES, Session, SessionTable, session_from_cookie, set_cookie

STATIC_DIR = Path(__file__).parent / "static"
# Scripts and styles from this service only; no inline code, no framing, no form posts elsewhere.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
MAX_KEY_CHARS = 512


class SecurityHeaders:
    """Adds the headers to every response. A plain ASGI middleware (not BaseHTTPMiddleware, which
    would hide a client's disconnect from the routes that stop work on it)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        no_store = scope.get("path", "").startswith(("/ui/", "/admin/"))

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("Content-Security-Policy", CSP)
                headers.setdefault("X-Content-Type-Options", "nosniff")
                headers.setdefault("X-Frame-Options", "DENY")
                headers.setdefault("Referrer-Policy", "no-referrer")
                if no_store:
                    headers["Cache-Control"] = "no-store"
            await send(message)

        await self.app(scope, receive, send_with_headers)


class SessionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    key: str = Field(..., min_length=1, max_length=MAX_KEY_CHARS)
    kind: Literal["department", "admin"] = "department"


def install_ui_routes(app: FastAPI, errors) -> None:
    """Add the pages and session routes (`errors(*statuses)` documents the error bodies)."""
    app.add_middleware(SecurityHeaders)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    def runtime(request: Request):
        return request.app.state.runtime

    def table(request: Request, kind: str) -> SessionTable:
        rt = runtime(request)
        return rt.admin.sessions if kind == "admin" else rt.chat_sessions

    @app.get("/", include_in_schema=False)
    async def root() -> Response:
        return RedirectResponse("/chat")

    @app.get("/chat", include_in_schema=False)
    @app.get("/chat/{dept}", include_in_schema=False)
    async def chat_page(dept: str | None = None) -> Response:
        return FileResponse(STATIC_DIR / "chat.html", media_type="text/html")

    @app.get("/console", include_in_schema=False)
    async def console_page() -> Response:
        return FileResponse(STATIC_DIR / "console.html", media_type="text/html")

    @app.post("/ui/session", tags=["ui"], responses=errors(400, 401, 403, 413, 500))
    async def open_session(request: Request, body: SessionRequest) -> Response:
        """Exchange a key for a session cookie (HttpOnly, SameSite=Strict); the answer carries the
        session's CSRF token, to send as X-CSRF-Token with every cookie-authenticated request."""
        rt = runtime(request)
        if body.kind == "admin":
            session = Session("admin", admin=rt.admin.name_for_key(body.key))
        elif not rt.config.require_api_key:  # local development: every department, as without the page
            session = Session("department", departments=rt.keys.all_departments)
        elif rt.keys.knows(body.key):
            session = Session("department", departments=rt.keys.departments_for(f"Bearer {body.key}"))
        else:
            raise ApiError(401, "invalid department key", code="invalid_api_key")
        token = table(request, body.kind).create(session)
        response = JSONResponse(session.public())
        set_cookie(response, request, body.kind, token)
        return response

    @app.get("/ui/session", tags=["ui"], responses=errors(400, 401, 500))
    async def current_session(request: Request, kind: Literal["department", "admin"] = Query("department")) -> dict:
        session = table(request, kind).get(request.cookies.get(COOKIES[kind]))
        if session is None:
            raise ApiError(401, "no session in this browser: enter your key", code="no_session")
        return session.public()

    @app.delete("/ui/session", tags=["ui"], status_code=204, response_class=Response,
                responses=errors(400, 401, 403, 500))
    async def close_session(request: Request, kind: Literal["department", "admin"] = Query("department")) -> Response:
        t = table(request, kind)
        session_from_cookie(request, t)  # only this browser's own pages may log it out
        t.drop(request.cookies.get(COOKIES[kind]))
        response = Response(status_code=204)
        response.delete_cookie(COOKIES[kind], path="/")
        return response
