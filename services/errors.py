"""Errors as OpenAI-style JSON: {"error": {"message", "type", "code", "param"}}, with the right status.

The official OpenAI client turns these into its typed exceptions (AuthenticationError,
NotFoundError, RateLimitError, ...), so callers handle them as they would OpenAI's.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ragpt.errors import EmptyQuestionError, RagptError, UnknownDepartmentError
from ragpt.serving.contract import ContractError
from ragpt.serving.messages import MessagesError
from ragpt.serving.request import PromptTooLongError, QuestionTooLongError

_TYPES = {
    400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_error",
    404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
    422: "invalid_request_error", 503: "server_error", 504: "server_error",
}


class ApiError(Exception):
    """An error answered to the client with `status` and an OpenAI-style body."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.code, self.param)


def error_body(message: str, type: str, code: str | None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "code": code, "param": param}}


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


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
    """The status a library error deserves: the client's fault (4xx) or the server's (5xx)."""
    if isinstance(e, ApiError):
        return e
    for cls, status, code, param in _CLIENT_ERRORS:
        if isinstance(e, cls):
            return ApiError(status, str(e), code=code, param=param)
    if isinstance(e, RagptError):
        return ApiError(500, f"{type(e).__name__}: {e}", code="internal_error", type="server_error")
    return ApiError(500, f"internal error ({type(e).__name__})", code="internal_error", type="server_error")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        msg = first.get("msg", "invalid request")
        more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
        return error_response(ApiError(400, f"{param + ': ' if param else ''}{msg}{more}",
                                       code="invalid_request", param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
        return error_response(ApiError(e.status_code, str(e.detail), code=codes.get(e.status_code, "http_error"),
                                       headers=dict(e.headers or {})))
