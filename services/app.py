"""The chat service: FastAPI routes over ragpt's pipeline, batcher and router.

Routes
    POST /v1/departments/{dept}/chat   ragpt's own shape: answer, citations, department, version, usage
    POST /v1/chat/completions          OpenAI-compatible; model = "dept", "dept@v3", "dept@none" or "auto"
    GET  /v1/models                    the departments this key may use, with their active prompt versions
    GET  /healthz                      the process is up
    GET  /readyz                       models loaded, batcher running (503 until then)
Both chat routes stream OpenAI-format SSE chunks with `"stream": true`, ending with `data: [DONE]`.

    from ragpt_service.app import create_app
    app = create_app(load_service_config("serve.toml"), load_settings())
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ragpt.config import Settings
from ragpt.lm.generator import Generator
from ragpt.lm.models import Embedder
from ragpt.serving.request import Answer
from ragpt.serving.scheduler import Ticket
from ragpt_service.config import ServiceConfig
from ragpt_service.errors import ApiError, from_ragpt_error, install_error_handlers
from ragpt_service.limits import BodySizeLimit
from ragpt_service.runtime import ServiceRuntime
from ragpt_service.schemas import (
    ChatCompletionRequest,
    ChatMessage,
    DepartmentChatRequest,
    check_generation_limits,
    citations_json,
    split_chat,
)


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


def _allowed(request: Request, rt: ServiceRuntime = Depends(_runtime)) -> frozenset[str]:
    return rt.keys.departments_for(request.headers.get("authorization"))


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


async def _stream(call: ChatCall, ticket: Ticket, prepared, rid: str, created: int,
                  deadline: float) -> AsyncIterator[bytes]:
    model = _model_label(prepared.department, prepared.prompt_version)

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
        usage = {"usage": answer.usage} if not call.openai else {}
        yield _sse(chunk({}, answer.finish_reason, **usage))
        if call.include_usage:
            yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": [], "usage": answer.usage})
    except ApiError as e:  # the status line is gone: report in-band, as OpenAI does
        yield _sse(e.body())
    finally:
        ticket.cancel()  # no-op when done; stops the row when the client went away
    yield b"data: [DONE]\n\n"


async def _answer(rt: ServiceRuntime, call: ChatCall):
    rid = f"chatcmpl-{secrets.token_hex(12)}"
    created = int(time.time())
    deadline = time.monotonic() + rt.config.limits.request_timeout_s
    ticket = rt.submit(department=call.department, prompt=call.prompt, question=call.question,
                       history=call.history, system=call.system, overrides=call.overrides,
                       max_tokens=call.max_tokens, temperature=call.temperature, stream=call.stream)
    # Wait for retrieval and prompt resolution before answering, so their errors get a real status.
    prepared = await _with_deadline(ticket, ticket.prepared(), deadline, "waiting in the queue")
    if call.stream:
        return StreamingResponse(_stream(call, ticket, prepared, rid, created, deadline),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    answer = await _with_deadline(ticket, ticket.answer(), deadline, "while generating")
    return JSONResponse(completion_json(call, answer, rid, created))


# ---------------------------------------------------------------------- the app


def create_app(config: ServiceConfig, settings: Settings, *, embedder: Embedder | None = None,
               generator: Generator | None = None, background_load: bool = True) -> FastAPI:
    """The service app. Models load at startup: in a background thread (readyz says when), or before
    serving with `background_load=False`. Pass `embedder`/`generator` to share already loaded ones."""
    runtime = ServiceRuntime(config, settings, embedder=embedder, generator=generator)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if background_load:
            threading.Thread(target=_load_quietly, args=(runtime,), name="ragpt-load", daemon=True).start()
        else:
            await asyncio.to_thread(runtime.load)
        yield
        await asyncio.to_thread(runtime.close)

    app = FastAPI(title="ragpt chat service", version="0.1.0", lifespan=lifespan)
    app.state.runtime = runtime
    app.add_middleware(BodySizeLimit, max_bytes=config.limits.max_request_bytes)
    install_error_handlers(app)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(rt: ServiceRuntime = Depends(_runtime)):
        body = {"status": rt.status, "departments": sorted(rt.pipelines), "error": rt.error}
        if rt.batcher is not None:
            body["queued"] = rt.batcher.queued
        return JSONResponse(body, status_code=200 if rt.status == "ready" else 503)

    @app.get("/v1/models")
    async def models(allowed: frozenset[str] = Depends(_allowed), rt: ServiceRuntime = Depends(_runtime)) -> dict:
        rt.check_ready()
        return {"object": "list", "data": await asyncio.to_thread(rt.models, allowed)}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, allowed: frozenset[str] = Depends(_allowed),
                               rt: ServiceRuntime = Depends(_runtime)):
        if body.n not in (None, 1):
            raise ApiError(400, "n > 1 is not supported", code="unsupported_parameter", param="n")
        call = await _resolve(
            rt, allowed, body.model, body.messages, k=body.k, contract=body.contract,
            max_tokens=body.max_completion_tokens or body.max_tokens, temperature=body.temperature,
            stream=body.stream, include_usage=bool(body.stream_options and body.stream_options.include_usage),
            openai=True,
        )
        return await _answer(rt, call)

    @app.post("/v1/departments/{dept}/chat")
    async def department_chat(dept: str, body: DepartmentChatRequest, allowed: frozenset[str] = Depends(_allowed),
                              rt: ServiceRuntime = Depends(_runtime)):
        model = f"{dept}@{body.prompt_version}" if body.prompt_version else dept
        call = await _resolve(rt, allowed, model, body.messages, k=body.k, contract=body.contract,
                              max_tokens=body.max_tokens,
                              temperature=body.temperature, stream=body.stream, include_usage=False, openai=False)
        return await _answer(rt, call)

    return app


def _load_quietly(runtime: ServiceRuntime) -> None:
    # A failure is recorded in runtime.status/error, which /readyz and every chat request report.
    with contextlib.suppress(Exception):
        runtime.load()
