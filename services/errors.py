"""Errors as OpenAI-style JSON: {"error": {"message", "type", "code", "param"}}, with the right status.

The official OpenAI client turns these into its typed exceptions (AuthenticationError,
NotFoundError, RateLimitError, ...), so callers handle them as they would OpenAI's.

Messages quote at most a short prefix of what the client sent (`quote`), never carry lone
surrogates (they would not encode), and a 500 never carries exception text: it names a request
id, and the server log has the details under that id.
"""

from __future__ import annotations

import logging
import re
import secrets

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from ragpt.errors import EmptyQuestionError, UnknownDepartmentError
from ragpt.serving.contract import ContractError
from ragpt.serving.messages import MessagesError
from ragpt.serving.request import PromptTooLongError, QuestionTooLongError

log = logging.getLogger("ragpt.service")

QUOTE_CHARS = 64  # the most of a client's input an error message repeats
MESSAGE_CHARS = 400  # the longest error message (library messages may quote input too)

_TYPES = {
    400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_error",
    404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
    422: "invalid_request_error", 503: "server_error", 504: "server_error",
}
_SURROGATES = re.compile("[\ud800-\udfff]")
_LONG_RUN = re.compile(rf"\S{{{QUOTE_CHARS + 1},}}")


def clip(text: object, limit: int = QUOTE_CHARS) -> str:
    """`text` as a str of at most `limit` characters (then ending in '…'), lone surrogates replaced."""
    s = _SURROGATES.sub("\ufffd", text if isinstance(text, str) else str(text))
    return s if len(s) <= limit else s[: limit - 1] + "…"


def quote(text: object, limit: int = QUOTE_CHARS) -> str:
    """A client's value for an error message: repr'd, at most `limit` characters of it."""
    return repr(clip(text, limit))


def new_request_id() -> str:
    return f"req_{secrets.token_hex(8)}"


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: str | None = None
    param: str | None = None


class ErrorBody(BaseModel):
    """The body of every error response (and of an in-band error event in a stream)."""

    error: ErrorDetail


class ApiError(Exception):
    """An error answered to the client with `status` and an OpenAI-style body."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        # Library messages may quote the client's input whole: shorten every long run of it.
        message = clip(_LONG_RUN.sub(lambda m: clip(m.group()), message), MESSAGE_CHARS)
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = clip(param) if param is not None else None
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.code, self.param)


def error_body(message: str, type: str, code: str | None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "code": code, "param": param}}


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def internal_error(e: BaseException, request_id: str | None = None) -> ApiError:
    """A 500 for an unexpected exception: logged here with its traceback, answered with a request id only."""
    rid = request_id or new_request_id()
    log.error("internal error %s: %s: %s", rid, type(e).__name__, e, exc_info=e)
    return ApiError(500, f"internal error (request id {rid}); the server log has the details",
                    code="internal_error", type="server_error", headers={"X-Request-Id": rid})


# A library error that is the client's fault: (error class, status, code, param), first match wins.
_CLIENT_ERRORS = (
    (EmptyQuestionError, 400, "empty_question", "messages"),
    (UnknownDepartmentError, 404, "model_not_found", "model"),
    (QuestionTooLongError, 400, "question_too_long", "messages"),
    (PromptTooLongError, 400, "prompt_too_long", "messages"),
    (ContractError, 400, "invalid_contract", "contract"),
    (MessagesError, 400, "invalid_request", "messages"),
)


def from_ragpt_error(e: Exception) -> ApiError:
    """The status a library error deserves: the client's fault (4xx) or the server's (5xx, logged)."""
    if isinstance(e, ApiError):
        return e
    for cls, status, code, param in _CLIENT_ERRORS:
        if isinstance(e, cls):
            return ApiError(status, str(e), code=code, param=param)
    return internal_error(e)


def validation_error(e: RequestValidationError) -> ApiError:
    errs = e.errors()
    first = errs[0] if errs else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = clip(".".join(loc)) if loc else None
    msg = first.get("msg", "invalid request")  # pydantic's messages name the rule, not the input
    more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
    return ApiError(400, f"{param + ': ' if param else ''}{msg}{more}", code="invalid_request", param=param)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(e))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
        if e.status_code >= 500:
            return error_response(internal_error(e))
        return error_response(ApiError(e.status_code, str(e.detail), code=codes.get(e.status_code, "http_error"),
                                       headers=dict(e.headers or {})))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        # The last resort (routes convert their own exceptions): Starlette still re-raises it to the server.
        return error_response(internal_error(e))
