"""`RagptServiceChatModel`: a running ragpt service, through its OpenAI-compatible API, as a chat model.

POST {base_url}/v1/chat/completions with `model` = a department, "dept@version" or "auto". ragpt's
extra response fields (citations, department, prompt_version, routing) land in `response_metadata`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ChatMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import SecretStr

from ragpt.errors import RagptError

_EXTRAS = ("department", "prompt_version", "citations", "routing", "contract", "contract_overrides")
_ROLES = {"human": "user", "ai": "assistant", "system": "system"}


class ServiceError(RagptError):
    """The service answered with an error (HTTP status, or an error event inside a stream)."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code


def _usage(u: dict | None) -> dict[str, int] | None:
    if not u:
        return None
    return {"input_tokens": u["prompt_tokens"], "output_tokens": u["completion_tokens"],
            "total_tokens": u["total_tokens"]}


def _error(body: Any, status: int | None) -> ServiceError:
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        return ServiceError(f"ragpt service error ({status or 'in stream'}): {err.get('message')}", status,
                            err.get("code"))
    return ServiceError(f"ragpt service error ({status}): {str(body)[:500]}", status)


def _json_or_text(r: httpx.Response) -> Any:
    try:
        return r.json()
    except ValueError:
        return r.text


class _StreamState:
    """Turns OpenAI SSE lines into chunks; what arrives beside the text is kept for the final chunk."""

    def __init__(self) -> None:
        self.meta: dict[str, Any] = {}
        self.usage: dict[str, int] | None = None
        self.finish_reason: str | None = None
        self.done = False

    def feed(self, line: str) -> ChatGenerationChunk | None:
        if not line.startswith("data:"):
            return None  # blank separators, comments, event names
        data = line[5:].strip()
        if data == "[DONE]":
            self.done = True
            return None
        event = json.loads(data)
        if "error" in event:  # the status line was already sent: the service reports errors in-band
            raise _error(event, None)
        self.meta.update({k: event[k] for k in _EXTRAS if k in event})
        if "model" in event:
            self.meta["model_name"] = event["model"]
        self.usage = _usage(event.get("usage")) or self.usage
        piece = ""
        for choice in event.get("choices") or []:
            piece += (choice.get("delta") or {}).get("content") or ""
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
        return ChatGenerationChunk(message=AIMessageChunk(content=piece)) if piece else None

    def last(self) -> ChatGenerationChunk:
        if not self.done:
            raise ServiceError("the ragpt service closed the stream before 'data: [DONE]'")
        return ChatGenerationChunk(
            message=AIMessageChunk(content="", usage_metadata=self.usage, chunk_position="last",
                                   response_metadata={**self.meta, "finish_reason": self.finish_reason}),
            generation_info={"finish_reason": self.finish_reason},
        )


class RagptServiceChatModel(BaseChatModel):
    """A ragpt service's department assistant over HTTP (sync and async, streaming included).

        chat = RagptServiceChatModel(base_url="http://127.0.0.1:8000", api_key="...", model="hr")
        chat.invoke("How many vacation days do I get?").response_metadata["citations"]
    """

    base_url: str
    api_key: SecretStr | None = None
    model: str = "auto"  # a department, "dept@v3" (pinned prompt), "dept@none", or "auto"
    max_tokens: int | None = None
    temperature: float | None = None
    k: int | None = None  # ragpt extension: chunks to retrieve
    contract: dict[str, Any] | None = None  # ragpt extension: input-contract fields to override
    timeout: float = 120.0

    @property
    def _llm_type(self) -> str:
        return "ragpt-service"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"base_url": self.base_url, "model": self.model, "max_tokens": self.max_tokens,
                "temperature": self.temperature, "k": self.k, "contract": self.contract}

    # ------------------------------------------------------------------ request
    @property
    def _url(self) -> str:
        return self.base_url.rstrip("/") + "/v1/chat/completions"

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key.get_secret_value()}"} if self.api_key else {}

    def _body(self, messages: list[BaseMessage], stop: list[str] | None, stream: bool,
              kwargs: dict[str, Any]) -> dict[str, Any]:
        if stop:
            raise ValueError("stop sequences are not supported by the ragpt service")
        out = []
        for m in messages:
            role = m.role if isinstance(m, ChatMessage) else _ROLES.get(m.type)
            if role is None:
                raise ValueError(f"the ragpt service cannot take {type(m).__name__} messages")
            out.append({"role": role, "content": m.text})
        body: dict[str, Any] = {"model": self.model, "messages": out, "stream": stream}
        for name in ("max_tokens", "temperature", "k", "contract"):
            value = kwargs.get(name, getattr(self, name))
            if value is not None:
                body[name] = value
        if stream:  # OpenAI sends usage in an extra last chunk only when asked to
            body["stream_options"] = {"include_usage": True}
        return body

    @staticmethod
    def _result(r: httpx.Response) -> ChatResult:
        if r.status_code >= 400:
            raise _error(_json_or_text(r), r.status_code)
        data = r.json()
        choice = data["choices"][0]
        finish = choice.get("finish_reason")
        meta = {"model_name": data.get("model"), "finish_reason": finish,
                **{k: data[k] for k in _EXTRAS if k in data}}
        message = AIMessage(content=choice["message"].get("content") or "", usage_metadata=_usage(data.get("usage")),
                            response_metadata=meta, id=data.get("id"))
        return ChatResult(generations=[ChatGeneration(message=message, generation_info={"finish_reason": finish})])

    # ------------------------------------------------------------------ sync
    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        with httpx.Client(timeout=self.timeout) as client:
            r = client.post(self._url, json=self._body(messages, stop, False, kwargs), headers=self._headers())
        return self._result(r)

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        state = _StreamState()
        body = self._body(messages, stop, True, kwargs)
        with httpx.Client(timeout=self.timeout) as client, \
                client.stream("POST", self._url, json=body, headers=self._headers()) as r:
            if r.status_code >= 400:
                r.read()
                raise _error(_json_or_text(r), r.status_code)
            for line in r.iter_lines():
                if chunk := state.feed(line):
                    yield chunk
                if state.done:
                    break
        yield state.last()

    # ------------------------------------------------------------------ async
    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        async with httpx.AsyncClient(timeout=self.timeout) as client:
            r = await client.post(self._url, json=self._body(messages, stop, False, kwargs), headers=self._headers())
        return self._result(r)

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        state = _StreamState()
        body = self._body(messages, stop, True, kwargs)
        async with httpx.AsyncClient(timeout=self.timeout) as client, \
                client.stream("POST", self._url, json=body, headers=self._headers()) as r:
            if r.status_code >= 400:
                await r.aread()
                raise _error(_json_or_text(r), r.status_code)
            async for line in r.aiter_lines():
                if chunk := state.feed(line):
                    yield chunk
                if state.done:
                    break
        yield state.last()
