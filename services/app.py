"""The chat service: FastAPI routes over ragpt's pipeline, batcher and router.

Routes
    POST /v1/departments/{dept}/chat   ragpt's own shape: answer, citations, department, version, usage
    POST /v1/chat/completions          OpenAI-compatible; model = "dept", "dept@v3", "dept@none" or "auto"
    POST /v1/prompt_embeds             the chat completion body, answered with the request's input as prompt
                                       embeddings (base64 of torch.save) for vLLM's prompt_embeds; plain prompts
    GET  /v1/models                    the departments this key may use, with their active prompt versions
    GET  /healthz                      the process is up
    GET  /readyz                       models loaded, batcher running (503 until then); with a valid key
                                       also the key's departments and why loading failed
    GET  /metrics                      Prometheus text format, to a metrics key only (ragpt_service.metrics);
                                       a 404 unless [metrics] lists a key
    /chat, /console, /ui/session       the browser pages and their key-for-session exchange (ragpt_service.ui)
    /admin/v1/...                      the release console's admin API, admin keys only (ragpt_service.admin)
Both chat routes stream OpenAI-format SSE chunks with `"stream": true`, ending with `data: [DONE]`.

Every error is an OpenAI-style JSON body (ragpt_service.errors) with a 4xx for the client's mistakes.
The API key is checked before the body is read; the body must be a JSON object of valid Unicode text.
A department that does not exist and one the key may not use answer the same 404.
A request is admitted only if it is expected to finish within its timeout (ragpt_service.admission),
and a client that goes away, streaming or not, stops its request's work at once.

    from ragpt_service.app import create_app
    app = create_app(load_service_config("serve.toml"), load_settings())
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from ragpt.config import Settings
from ragpt.lm.generator import Generator
from ragpt.lm.models import Embedder
from ragpt.serving.prompt_embeds import DeepPromptEmbedsError, build_prompt_embeds
from ragpt.serving.request import Answer, ChatRequest
from ragpt.serving.scheduler import Ticket
from ragpt_service.admin import install_admin_routes
from ragpt_service.config import ServiceConfig
from ragpt_service.errors import (
    ApiError,
    ErrorBody,
    from_ragpt_error,
    install_error_handlers,
    internal_error,
    quote,
)
from ragpt_service.limits import BodySizeLimit
from ragpt_service.metrics import CLIENT_GONE, RequestRecord
from ragpt_service.runtime import ServiceRuntime
from ragpt_service.schemas import (
    ChatCompletionRequest,
    ChatMessage,
    DepartmentChatRequest,
    PromptEmbedsRequest,
    PromptEmbedsResponse,
    check_generation_limits,
    check_supported,
    citations_json,
    split_chat,
)
from ragpt_service.sessions import COOKIES, session_from_cookie
from ragpt_service.ui import install_ui_routes


@dataclass
class ChatCall:
    """One chat request, validated and resolved: what to answer, for whom, how."""

    department: str
    prompt: str
    routing: dict | None
    question: str
    history: tuple
    system: str | None
    overrides: dict | None  # input-contract fields the client changes (k included)
    max_tokens: int | None
    temperature: float | None
    stream: bool
    include_usage: bool
    openai: bool  # response shape: OpenAI chat.completion or ragpt's own


def _runtime(request: Request) -> ServiceRuntime:
    return request.app.state.runtime


def _allowed(request: Request) -> frozenset[str]:
    return request.state.allowed  # set by _ServiceRoute before the body is read


# ---------------------------------------------------------------------- before a route runs

_SURROGATE = re.compile("[\ud800-\udfff]")


def _no_constants(name: str):
    raise ValueError(f"{name} is not JSON")


def _parse_body(raw: bytes) -> Any:
    """The request body as JSON, or a 400 that says what is wrong with it (never quoting it)."""
    if not raw.strip():
        raise ApiError(400, "the request body is empty; send a JSON object", code="invalid_request")
    try:
        return json.loads(raw, parse_constant=_no_constants)
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply", code="invalid_request") from None
    except UnicodeDecodeError:
        raise ApiError(400, "the request body is not UTF-8 text", code="invalid_request") from None
    except json.JSONDecodeError as e:
        raise ApiError(400, f"the request body is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})",
                       code="invalid_request") from None
    except ValueError as e:  # NaN/Infinity, an integer with too many digits
        raise ApiError(400, f"the request body is not valid JSON: {str(e)[:80]}", code="invalid_request") from None


def _surrogate_at(data: Any) -> str | None:
    """Where in parsed JSON a string (or key) holds a lone surrogate ("\\ud800"): not Unicode text."""
    stack: list[tuple[Any, str]] = [(data, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                return path or "body"
        elif isinstance(value, dict):
            for key, item in value.items():
                where = f"{path}.{key}" if path else str(key)
                if _SURROGATE.search(key):
                    return path or "body"
                stack.append((item, where))
        elif isinstance(value, list):
            stack.extend((item, f"{path}.{i}") for i, item in enumerate(value))
    return None


def _is_json(content_type: str | None) -> bool:
    media = (content_type or "").split(";", 1)[0].strip().lower()
    main, _, sub = media.partition("/")
    return main == "application" and (sub == "json" or sub.endswith("+json"))


def _check_body(content_type: str | None, raw: bytes) -> None:
    if not _is_json(content_type):
        got = f"got {quote(content_type, 40)}" if content_type else "none sent"
        raise ApiError(400, f"the request body must be JSON: send 'Content-Type: application/json' ({got})",
                       code="invalid_request")
    data = _parse_body(raw)
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {type(data).__name__}",
                       code="invalid_request")
    where = _surrogate_at(data)
    if where is not None:
        raise ApiError(400, f"{where} holds a lone surrogate (an unpaired \\ud800-\\udfff escape), "
                            "which is not valid Unicode text", code="invalid_text", param=where)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def _departments(request: Request, rt: ServiceRuntime) -> frozenset[str]:
    """What the request may use: its Bearer key's departments, or (no Authorization header) the
    chat page's session cookie, checked against cross-site use (ragpt_service.sessions)."""
    authorization = request.headers.get("authorization")
    if authorization is None and COOKIES["department"] in request.cookies:
        session = session_from_cookie(request, rt.chat_sessions)
        if session is not None:
            return session.departments
    return rt.keys.departments_for(authorization)


class _ServiceRoute(APIRoute):
    """Checks the API key (routes under /v1/) and then the JSON body, before FastAPI parses and
    validates it; an unexpected exception becomes a logged 500 with a request id, in JSON.
    Counts every error by code, and each chat request (POST under /v1/) by department and status."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()
        needs_key = self.path.startswith("/v1/")
        needs_admin = self.path.startswith("/admin/")
        is_chat = needs_key and "POST" in (self.methods or ())

        async def route(request: Request) -> Response:
            metrics = request.app.state.runtime.metrics
            record = request.state.record = metrics.start() if is_chat else None
            try:
                rt = request.app.state.runtime
                if needs_key:
                    request.state.allowed = _departments(request, rt)
                if needs_admin:
                    request.state.actor = rt.admin.actor(request)
                if request.method in ("POST", "PUT", "PATCH"):
                    # Starlette keeps the bytes for FastAPI, which parses them again.
                    _check_body(request.headers.get("content-type"), await request.body())
                response = await handler(request)
            except ApiError as e:
                metrics.finish(record, e.status, e.code)
                raise
            except RequestValidationError:
                metrics.finish(record, 400, "invalid_request")
                raise
            except StarletteHTTPException as e:
                metrics.finish(record, e.status_code, _HTTP_CODES.get(e.status_code, "http_error"))
                raise
            except asyncio.CancelledError:
                metrics.finish(record, CLIENT_GONE, "client_disconnected")
                raise
            except Exception as e:
                err = internal_error(e)
                metrics.finish(record, err.status, err.code)
                raise err from e
            if record is not None and not record.streaming:
                metrics.finish(record, response.status_code,
                               "client_disconnected" if response.status_code == CLIENT_GONE else None,
                               answer=getattr(request.state, "answer", None))
            return response

        return route


async def _resolve(rt: ServiceRuntime, allowed: frozenset[str], model: str, messages: list[ChatMessage],
                   k: int | None, contract: dict | None, **call) -> ChatCall:
    rt.check_ready()
    limits = rt.config.limits
    overrides = {**(contract or {}), **({"k": k} if k is not None else {})} or None
    check_generation_limits(call["max_tokens"], (overrides or {}).get("k"), limits)
    question, history, system = split_chat(messages, limits)
    dept, prompt = rt.resolve_model(model, allowed)
    routing = None
    if dept is None:
        dept, prompt, routing = await rt.route(question, allowed)
    return ChatCall(department=dept, prompt=prompt, routing=routing, question=question, history=history,
                    system=system, overrides=overrides, **call)


# ---------------------------------------------------------------------- response shapes


def _model_label(department: str, version: str | None) -> str:
    return f"{department}@{version}" if version else department


def _extras(department: str, version: str | None, citations, routing: dict | None, contract: dict,
            overrides: dict, history_turns: int) -> dict:
    return {"department": department, "prompt_version": version, "citations": citations_json(citations),
            "routing": routing, "contract": contract, "contract_overrides": overrides,
            "history_turns": history_turns}


def completion_json(call: ChatCall, answer: Answer, rid: str, created: int) -> dict:
    extras = _extras(answer.department, answer.prompt_version, answer, call.routing, answer.contract,
                     answer.contract_overrides, answer.history_turns)
    if not call.openai:
        return {"id": rid, "object": "department.chat", "created": created, "answer": answer.text,
                "finish_reason": answer.finish_reason, "usage": answer.usage, **extras, "timings": answer.timings}
    return {
        "id": rid, "object": "chat.completion", "created": created,
        "model": _model_label(answer.department, answer.prompt_version),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text},
                     "logprobs": None, "finish_reason": answer.finish_reason}],
        "usage": answer.usage, **extras,
    }


def _sse(obj) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


async def _with_deadline(ticket: Ticket, awaitable, deadline: float, what: str):
    remaining = deadline - time.monotonic()
    try:
        if remaining <= 0:
            awaitable.close()  # never awaited: close it rather than leak a warning
            raise asyncio.TimeoutError
        return await asyncio.wait_for(awaitable, remaining)
    except asyncio.TimeoutError:
        ticket.cancel()
        raise ApiError(504, f"the request timed out {what}", code="timeout") from None
    except (ApiError, StopAsyncIteration):
        raise
    except Exception as e:
        raise from_ragpt_error(e) from e


async def _stream(rt: ServiceRuntime, record: RequestRecord, call: ChatCall, ticket: Ticket, prepared, rid: str,
                  created: int, deadline: float) -> AsyncIterator[bytes]:
    model = _model_label(prepared.department, prepared.prompt_version)
    status, code, answer = CLIENT_GONE, "client_disconnected", None  # unless the stream gets to its end

    def chunk(delta: dict, finish: str | None = None, **more) -> dict:
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **more}

    try:
        yield _sse(chunk({"role": "assistant", "content": ""},
                         **_extras(prepared.department, prepared.prompt_version, prepared.citations, call.routing,
                                   prepared.contract.to_dict(), prepared.overrides, prepared.built.history)))
        pieces = ticket.deltas()
        while True:
            try:
                piece = await _with_deadline(ticket, anext(pieces), deadline, "while streaming")
            except StopAsyncIteration:
                break
            yield _sse(chunk({"content": piece}))
        answer = await ticket.answer()
        rt.answered(ticket, answer)
        usage = {"usage": answer.usage} if not call.openai else {}
        yield _sse(chunk({}, answer.finish_reason, **usage))
        if call.include_usage:
            yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": [], "usage": answer.usage})
        status, code = 200, None
    except ApiError as e:  # the status line is gone: report in-band, as OpenAI does
        status, code, answer = e.status, e.code, None
        yield _sse(e.body())
    except Exception as e:
        err = internal_error(e)
        status, code, answer = err.status, err.code, None
        yield _sse(err.body())
    finally:
        rt.release(ticket)  # stops the row when the client went away (a no-op when done)
        rt.metrics.finish(record, status, code, answer=answer)
    yield b"data: [DONE]\n\n"


DISCONNECT_POLL_S = 0.05  # how often a waiting non-streaming request checks that its client is still there


class _ClientGone(Exception):
    pass


async def _watched(request: Request, ticket: Ticket, awaitable, deadline: float, what: str):
    """`_with_deadline`, but a client that disconnects meanwhile cancels the ticket at once (_ClientGone)."""
    task = asyncio.ensure_future(_with_deadline(ticket, awaitable, deadline, what))
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                ticket.cancel()
                raise _ClientGone
    finally:
        if not task.done():
            task.cancel()


async def _answer(request: Request, rt: ServiceRuntime, call: ChatCall):
    rid = f"chatcmpl-{secrets.token_hex(12)}"
    created = int(time.time())
    deadline = time.monotonic() + rt.config.limits.request_timeout_s
    record: RequestRecord = request.state.record
    record.department = call.department
    ticket = rt.submit(department=call.department, prompt=call.prompt, question=call.question,
                       history=call.history, system=call.system, overrides=call.overrides,
                       max_tokens=call.max_tokens, temperature=call.temperature, stream=call.stream)
    streaming = False
    try:
        # Wait for retrieval and prompt resolution before answering, so their errors get a real status.
        prepared = await _watched(request, ticket, ticket.prepared(), deadline, "waiting in the queue")
        record.prepared_at = time.perf_counter()
        rt.running(ticket)
        if call.stream:
            record.streaming = streaming = True  # the stream releases the ticket and counts the request
            return StreamingResponse(_stream(rt, record, call, ticket, prepared, rid, created, deadline),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        answer = await _watched(request, ticket, ticket.answer(), deadline, "while generating")
        rt.answered(ticket, answer)
        request.state.answer = answer
        return JSONResponse(completion_json(call, answer, rid, created))
    except _ClientGone:
        return Response(status_code=CLIENT_GONE)  # nobody reads it; the metrics count it
    finally:
        if not streaming:
            rt.release(ticket)  # whatever happened (a timeout, an error, the client gone): its work stops


async def _prompt_embeds(rt: ServiceRuntime, call: ChatCall, dtype: str | None) -> dict:
    """The call's input as prompt embeddings, built by the one request path in a worker thread (it
    retrieves and embeds: no generation, so it does not queue behind the batcher's rows); at most
    `limits.max_prompt_embeds_in_flight` at once, a request more is a 503 `overloaded`."""
    request = ChatRequest(call.question, call.department, history=call.history, system=call.system,
                          prompt=call.prompt, overrides=call.overrides,
                          max_new_tokens=call.max_tokens or rt.default_max_tokens, temperature=call.temperature)

    def build() -> tuple:
        pe = build_prompt_embeds(rt.pipelines[call.department], request, dtype=dtype)
        return pe, pe.encoded()  # base64 of a few MB: off the event loop too

    job = rt.prompt_embeds_builds.submit(build)
    if job is None:  # bounded: not a wait in an unbounded line beside the generation queue
        retry = rt.config.limits.retry_after_s
        raise ApiError(503, f"overloaded: {rt.prompt_embeds_builds.limit} prompt-embeds requests are being built; "
                            f"retry in {retry}s", code="overloaded", headers={"Retry-After": str(retry)})
    try:
        pe, encoded = await asyncio.wait_for(job, rt.config.limits.request_timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(504, "the request timed out while building its input", code="timeout") from None
    except DeepPromptEmbedsError as e:
        raise ApiError(400, str(e), code="deep_prompt_unsupported", param="model") from None
    except Exception as e:
        raise from_ragpt_error(e) from e
    p = pe.prepared
    return {"id": f"pe-{secrets.token_hex(12)}", "object": "prompt_embeds", "created": int(time.time()),
            "model": _model_label(p.department, p.prompt_version), "prompt_embeds": encoded,
            "encoding": "base64-torch-save", "shape": list(pe.tensor.shape),
            "dtype": str(pe.tensor.dtype).removeprefix("torch."), "prompt_tokens": pe.prompt_tokens,
            "soft_prompt_tokens": pe.soft_prompt_tokens, "max_tokens": p.max_new_tokens,
            "temperature": float(p.temperature), "stop_token_ids": pe.stop_token_ids,
            **_extras(p.department, p.prompt_version, p.citations, call.routing, p.contract.to_dict(), p.overrides,
                      p.built.history)}


# ---------------------------------------------------------------------- the app


class Readiness(BaseModel):
    status: str  # loading, ready or failed
    departments: list[str] | None = None  # with a valid key: those of its departments that are loaded
    error: str | None = None  # with a valid key: why loading failed
    queued: int | None = None


_WHY = {
    400: "Invalid request: malformed JSON, a wrong type, a value over a limit, an unsupported parameter.",
    401: "Missing, malformed or unknown API key (or an expired browser session).",
    403: "A key that may not use this route (a department key on the admin API), or a cross-site request.",
    404: "No such model for this key: unknown or not permitted department, unknown or unapproved version.",
    409: "A change the soft-prompt life cycle does not allow (e.g. activating a draft, approving a worse one).",
    413: "The request body is over the size limit.",
    422: "`auto` could not tell the department (router.below_threshold = \"refuse\").",
    500: "Internal error; the message names a request id to find in the server log.",
    503: "Not ready (loading or failed to load) or overloaded (see Retry-After).",
    504: "The request timed out in the queue or while generating.",
}


def _errors(*statuses: int) -> dict:
    return {s: {"model": ErrorBody, "description": _WHY[s]} for s in statuses}


# With "stream": true a chat route answers OpenAI-style server-sent events instead of one JSON body.
_STREAMED = {200: {"content": {"text/event-stream": {"schema": {}}},  # chunks, then the text [DONE]
                   "description": "The answer; with \"stream\": true, server-sent events ending with `data: [DONE]`."}}


def _openapi_without_422(app: FastAPI) -> Callable[[], dict]:
    """FastAPI documents a 422 HTTPValidationError on every route with a body; this service answers
    validation errors with 400 and an ErrorBody (documented per route), so drop those entries."""

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for item in schema.get("paths", {}).values():
            for op in item.values():
                responses = op.get("responses", {})
                if "HTTPValidationError" in json.dumps(responses.get("422", {})):
                    del responses["422"]
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
        return schema

    return openapi


def create_app(config: ServiceConfig, settings: Settings, *, embedder: Embedder | None = None,
               generator: Generator | None = None, background_load: bool = True,
               on_load_error: Callable[[str], None] | None = None) -> FastAPI:
    """The service app. Models load at startup: in a background thread (readyz says when), or before
    serving with `background_load=False`. Pass `embedder`/`generator` to share already loaded ones.
    `on_load_error(reason)` is called when a background load fails (`ragpt serve` then stops)."""
    runtime = ServiceRuntime(config, settings, embedder=embedder, generator=generator)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if background_load:
            threading.Thread(target=_load_quietly, args=(runtime, on_load_error), name="ragpt-load",
                             daemon=True).start()
        else:
            await asyncio.to_thread(runtime.load)
        yield
        await asyncio.to_thread(runtime.close)

    app = FastAPI(title="ragpt chat service", version="0.1.0", lifespan=lifespan)
    app.router.route_class = _ServiceRoute
    app.openapi = _openapi_without_422(app)
    app.state.runtime = runtime
    app.add_middleware(BodySizeLimit, max_bytes=config.limits.max_request_bytes,
                       on_reject=lambda: runtime.metrics.error("request_too_large"))
    install_error_handlers(app)
    install_ui_routes(app, _errors)
    install_admin_routes(app, _errors)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", response_model=Readiness, response_model_exclude_none=True,
             responses={503: {"model": Readiness, "description": "Loading, or failed to load."}})
    async def readyz(request: Request, rt: ServiceRuntime = Depends(_runtime)):
        """The status to anyone; with a valid API key also its loaded departments and any load error."""
        try:
            allowed = rt.keys.departments_for(request.headers.get("authorization"))
        except ApiError:
            allowed = None
        body = Readiness(**rt.readiness(allowed)).model_dump(exclude_none=True)
        return JSONResponse(body, status_code=200 if rt.status == "ready" else 503)

    if config.metrics.served:  # otherwise /metrics is a 404 like any unknown path

        @app.get("/metrics", include_in_schema=False)
        async def metrics(request: Request, rt: ServiceRuntime = Depends(_runtime)):
            """Prometheus text format (ragpt_service.metrics), to a metrics key only."""
            rt.metrics.check_key(request.headers.get("authorization"))
            body, content_type = rt.metrics.render()
            return Response(body, media_type=content_type)

    @app.get("/v1/models", responses=_errors(401, 500, 503))
    async def models(allowed: frozenset[str] = Depends(_allowed), rt: ServiceRuntime = Depends(_runtime)) -> dict:
        rt.check_ready()
        return {"object": "list", "data": await asyncio.to_thread(rt.models, allowed)}

    @app.post("/v1/chat/completions", responses={**_STREAMED, **_errors(400, 401, 404, 413, 422, 500, 503, 504)})
    async def chat_completions(request: Request, body: ChatCompletionRequest,
                               allowed: frozenset[str] = Depends(_allowed), rt: ServiceRuntime = Depends(_runtime)):
        check_supported(body)
        call = await _resolve(
            rt, allowed, body.model, body.messages, k=body.k, contract=body.contract,
            max_tokens=body.max_completion_tokens or body.max_tokens, temperature=body.temperature,
            stream=body.stream, include_usage=bool(body.stream_options and body.stream_options.include_usage),
            openai=True,
        )
        return await _answer(request, rt, call)

    @app.post("/v1/departments/{dept}/chat", responses={**_STREAMED, **_errors(400, 401, 404, 413, 500, 503, 504)})
    async def department_chat(request: Request, dept: str, body: DepartmentChatRequest,
                              allowed: frozenset[str] = Depends(_allowed), rt: ServiceRuntime = Depends(_runtime)):
        model = f"{dept}@{body.prompt_version}" if body.prompt_version else dept
        call = await _resolve(rt, allowed, model, body.messages, k=body.k, contract=body.contract,
                              max_tokens=body.max_tokens,
                              temperature=body.temperature, stream=body.stream, include_usage=False, openai=False)
        return await _answer(request, rt, call)

    @app.post("/v1/prompt_embeds", response_model=PromptEmbedsResponse,
              responses=_errors(400, 401, 404, 413, 422, 500, 503, 504))
    async def prompt_embeds(request: Request, body: PromptEmbedsRequest, allowed: frozenset[str] = Depends(_allowed),
                            rt: ServiceRuntime = Depends(_runtime)):
        """The chat completion body, answered with the request's input as prompt embeddings instead of an
        answer: the soft prompt, then the prompt's token embeddings, as ragpt feeds its model (same department,
        version, contract, retrieval and budgets as `/v1/chat/completions`). For vLLM's `prompt_embeds`; a deep
        prompt cannot be sent that way (400 `deep_prompt_unsupported`)."""
        check_supported(body)
        if body.stream:
            raise ApiError(400, "stream is not supported here: the answer is one tensor", code="unsupported_parameter",
                           param="stream")
        call = await _resolve(rt, allowed, body.model, body.messages, k=body.k, contract=body.contract,
                              max_tokens=body.max_completion_tokens or body.max_tokens, temperature=body.temperature,
                              stream=False, include_usage=False, openai=True)
        request.state.record.department = call.department
        return JSONResponse(await _prompt_embeds(rt, call, body.dtype))

    return app


def _load_quietly(runtime: ServiceRuntime, on_error: Callable[[str], None] | None) -> None:
    # A failure is recorded in runtime.status/error, which /readyz (with a key) and every chat request report.
    try:
        runtime.load()
    except Exception:
        if on_error is not None:
            on_error(runtime.error or "loading failed")
