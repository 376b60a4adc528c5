"""Request and response bodies; OpenAI messages -> (question, history, system text).

Messages follow ragpt's one rule (ragpt.serving.messages): the last message must be the user's
question, earlier user/assistant turns are the history, and system/developer messages are
appended to the department's system turn (they cannot replace it: the soft prompt was trained
with it).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ragpt.errors import EmptyQuestionError
from ragpt.serving.messages import MessagesError, split_messages
from ragpt.serving.request import Answer, Turn
from ragpt_service.config import LimitsConfig
from ragpt_service.errors import ApiError, clip, quote

CONTRACT_FIELD = Field(None, description="ragpt extension: input-contract fields to override for this request "
                                         "(k, max_context_tokens, max_question_tokens, max_history_tokens, dense, "
                                         "bm25, rrf_k, query_rule, query_adapter: false); the answer lists what "
                                         "differs from the "
                                         "prompt version's contract.")


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        for part in self.content:
            if part.type != "text":
                raise ApiError(400, f"message content of type {quote(part.type)} is not supported (text only)",
                               code="unsupported_content", param="messages")
        return "".join(p.text or "" for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


MESSAGES_FIELD = Field(min_length=1, description="OpenAI chat messages; the last one is the user's question.")


def _is(*harmless):
    """Passes a value that asks for nothing: None or one of `harmless`."""
    return lambda v: v is None or any(v == h for h in harmless)


# OpenAI parameters ragpt cannot honour, and the values of each that ask for nothing (those pass).
UNSUPPORTED = {
    "tools": _is([]), "tool_choice": _is("none"), "functions": _is([]), "function_call": _is("none"),
    "response_format": _is({"type": "text"}), "logprobs": _is(False), "top_logprobs": _is(0),
    "stop": _is([], ""), "presence_penalty": _is(0), "frequency_penalty": _is(0), "logit_bias": _is({}),
    # Requests are batched with others: one seed per batch, so a request's seed could not be honoured.
    "seed": _is(), "audio": _is(), "modalities": _is(["text"]), "prediction": _is(), "web_search_options": _is(),
    "reasoning_effort": _is(), "top_p": _is(1), "n": _is(1),
}


class ChatCompletionRequest(BaseModel):
    """OpenAI's chat completion request. Parameters ragpt cannot honour (tools, response_format, stop,
    logprobs, penalties, logit_bias, seed, n > 1, top_p < 1, ...) are refused with a 400 naming them
    (`unsupported_parameters`); harmless ones (user, metadata, store, ...) and unknown ones are ignored."""

    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1, description="A department, 'dept@version' for a pinned prompt version, "
                                                 "or 'auto'.")
    messages: list[ChatMessage] = MESSAGES_FIELD
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1, description="Accepted as 1 only (no nucleus sampling).")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, description="Accepted as 1 only.")
    user: str | None = Field(None, description="Accepted and ignored.")
    metadata: dict[str, Any] | None = Field(None, description="Accepted and ignored.")
    k: int | None = Field(None, ge=1, description="ragpt extension: chunks to retrieve.")
    contract: dict[str, Any] | None = CONTRACT_FIELD

    def unsupported_parameters(self) -> list[str]:
        """The parameters of this request that ask for something ragpt does not do, in a stable order."""
        given = {**(self.model_extra or {}), "top_p": self.top_p, "n": self.n}
        return [name for name, harmless in UNSUPPORTED.items() if name in given and not harmless(given[name])]


def check_supported(body: ChatCompletionRequest) -> None:
    names = body.unsupported_parameters()
    if names:
        raise ApiError(400, f"unsupported parameter{'s' if len(names) > 1 else ''}: {', '.join(names)} "
                            "(ragpt answers with one text completion from retrieved passages: no tools, structured "
                            "output, logprobs, stop sequences, penalties, logit_bias, seed, n > 1 or top_p < 1)",
                       code="unsupported_parameter", param=names[0])


class DepartmentChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    messages: list[ChatMessage] = MESSAGES_FIELD
    k: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    stream: bool = False
    prompt_version: str | None = Field(None, description="Pin a prompt version; default: the active one.")
    contract: dict[str, Any] | None = CONTRACT_FIELD


PROMPT_EMBEDS_DTYPES = ("float32", "bfloat16", "float16")


class PromptEmbedsRequest(ChatCompletionRequest):
    """The chat completion body, answered with the request's input as prompt embeddings (for an engine
    such as vLLM with `--enable-prompt-embeds`) instead of an answer. `stream` must be false."""

    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="Element type of the tensor (default: the one ragpt computes with). vLLM accepts all "
                          "three and casts to its model's dtype; bfloat16 halves the response.")


class CitationOut(BaseModel):
    source: str
    title: str
    chunk: int
    score: float
    snippet: str


class PromptEmbedsResponse(BaseModel):
    """A request's whole input as one (positions x hidden) tensor: the soft prompt's vectors, then the
    embeddings of the prompt's tokens, exactly what ragpt feeds its model. Send `prompt_embeds` to
    vLLM's `POST /v1/completions` with `max_tokens`, `temperature` and `stop_token_ids` from here."""

    id: str
    object: Literal["prompt_embeds"]
    created: int
    model: str = Field(description="'dept' or 'dept@version': the department and prompt version it was built with.")
    prompt_embeds: str = Field(description="Base64 of torch.save(tensor), the form vLLM's prompt_embeds field takes.")
    encoding: Literal["base64-torch-save"]
    shape: list[int] = Field(description="[positions, hidden size]; positions = soft prompt + prompt tokens.")
    dtype: Literal["float32", "bfloat16", "float16"]
    prompt_tokens: int = Field(description="Positions of the input, soft prompt included (the usage an answer counts).")
    soft_prompt_tokens: int
    max_tokens: int = Field(description="The answer budget the prompt was fitted for (the model's window minus it).")
    temperature: float
    stop_token_ids: list[int] = Field(description="ragpt's stop tokens; pass them on so the engine stops where ragpt "
                                                  "does (ragpt's loop rule is not applied by the engine).")
    department: str
    prompt_version: str | None
    citations: list[CitationOut] = Field(description="The passages in the prompt, in rank order.")
    routing: dict[str, Any] | None
    contract: dict[str, Any]
    contract_overrides: dict[str, Any]
    history_turns: int


def split_chat(messages: list[ChatMessage], limits: LimitsConfig) -> tuple[str, tuple[Turn, ...], str | None]:
    """(question, history, system text) from chat messages, enforcing the message limits."""
    if not messages:
        raise ApiError(400, "messages must hold at least one user message", code="invalid_request", param="messages")
    if len(messages) > limits.max_messages:
        raise ApiError(400, f"too many messages: {len(messages)} (limit {limits.max_messages})",
                       code="too_many_messages", param="messages")
    pairs = []
    for i, m in enumerate(messages):
        text = m.text()
        if len(text) > limits.max_message_chars:
            raise ApiError(400, f"message {i} has {len(text)} characters (limit {limits.max_message_chars})",
                           code="message_too_long", param=f"messages.{i}.content")
        pairs.append((m.role, text))
    try:
        return split_messages(pairs)
    except EmptyQuestionError as e:
        raise ApiError(400, str(e), code="empty_question", param="messages") from None
    except MessagesError as e:
        raise ApiError(400, str(e), code="invalid_request", param="messages") from None


def check_generation_limits(max_tokens: int | None, k: object, limits: LimitsConfig) -> None:
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise ApiError(400, f"max_tokens {clip(max_tokens, 24)} exceeds the limit of {limits.max_tokens}",
                       code="max_tokens_exceeded", param="max_tokens")
    # A k that is not an integer is the input contract's to refuse (400 invalid_contract), later.
    if isinstance(k, int) and not isinstance(k, bool) and k > limits.max_k:
        raise ApiError(400, f"k {clip(k, 24)} exceeds the limit of {limits.max_k}", code="k_exceeded", param="k")


def citations_json(answer_or_citations) -> list[dict]:
    cites = answer_or_citations.citations if isinstance(answer_or_citations, Answer) else answer_or_citations
    return [{"source": c.source, "title": c.title, "chunk": c.chunk, "score": c.score, "snippet": c.snippet}
            for c in cites]
