"""Browser sessions for the chat page and the release console.

A key is typed once per browser session and exchanged (POST /ui/session) for a random session
token in an HttpOnly, SameSite=Strict cookie: the key itself is never stored by the browser,
never in a URL, and never on the server's disk (the table is in memory; a restart logs everyone
out). Department sessions and admin sessions use separate cookies and separate tables, so a
department key can never become an admin session.

Cross-site requests: a request authenticated by the cookie must also carry the session's CSRF
token in `X-CSRF-Token` (a custom header, which another site cannot send without a CORS grant the
service never gives), and, when the browser sends `Origin`, come from the service's own origin.
Requests with `Authorization: Bearer` (scripts, the OpenAI client) do not use cookies at all.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Literal

from starlette.requests import Request

from ragpt_service.errors import ApiError

Kind = Literal["department", "admin"]
COOKIES: dict[str, str] = {"department": "ragpt_chat", "admin": "ragpt_admin"}
CSRF_HEADER = "x-csrf-token"
MAX_SESSIONS = 10_000  # per kind; the oldest is dropped beyond it


@dataclass
class Session:
    kind: Kind
    departments: frozenset[str] = frozenset()  # kind "department"
    admin: str | None = None  # kind "admin": the admin's name (the audit actor)
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    last_seen: float = field(default_factory=time.monotonic)

    def public(self) -> dict:
        if self.kind == "admin":
            return {"kind": "admin", "admin": self.admin, "csrf": self.csrf}
        return {"kind": "department", "departments": sorted(self.departments), "csrf": self.csrf}


class SessionTable:
    """Session tokens of one kind, in memory, expiring after `idle_s` without use."""

    def __init__(self, kind: Kind, idle_s: float):
        self.kind = kind
        self.idle_s = idle_s
        self._by_token: OrderedDict[str, Session] = OrderedDict()

    def create(self, session: Session) -> str:
        token = secrets.token_urlsafe(32)
        self._by_token[token] = session
        while len(self._by_token) > MAX_SESSIONS:
            self._by_token.popitem(last=False)
        return token

    def get(self, token: str | None) -> Session | None:
        if not token:
            return None
        s = self._by_token.get(token)
        now = time.monotonic()
        if s is None or now - s.last_seen > self.idle_s:
            self._by_token.pop(token, None)
            return None
        s.last_seen = now
        self._by_token.move_to_end(token)
        return s

    def drop(self, token: str | None) -> None:
        if token:
            self._by_token.pop(token, None)


def same_origin(request: Request) -> bool:
    """No Origin header (same-origin GETs, non-browser clients) or one equal to this service's."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    host = request.headers.get("host", "")
    return origin in (f"http://{host}", f"https://{host}")


def session_from_cookie(request: Request, table: SessionTable) -> Session | None:
    """The cookie's session, checked against cross-site use; None when the request has no cookie.
    A cookie without a valid session, or without the CSRF header, is a 401/403 ApiError."""
    token = request.cookies.get(COOKIES[table.kind])
    if token is None:
        return None
    session = table.get(token)
    if session is None:
        raise ApiError(401, "your session has expired or was ended: enter your key again", code="session_expired")
    sent = request.headers.get(CSRF_HEADER, "")
    if not same_origin(request) or not hmac.compare_digest(sent.encode(), session.csrf.encode()):
        raise ApiError(403, f"cross-site request refused: send the session's {CSRF_HEADER} header from this "
                            "service's own pages", code="csrf_failed")
    return session


def set_cookie(response, request: Request, kind: Kind, token: str) -> None:
    response.set_cookie(COOKIES[kind], token, httponly=True, samesite="strict", path="/",
                        secure=request.url.scheme == "https")
