"""`SoftPromptChatModel`: the frozen generator with a department's soft prompt, as a LangChain chat model."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.language_models.chat_models import agenerate_from_stream
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import ConfigDict, Field

from ragpt.langchain._core import Completion, Prepared, aiter_in_thread, prepare, question_and_history, stream_text
from ragpt.serving.pipeline import Pipeline

_GEN_KWARGS = ("max_new_tokens", "temperature", "seed")


class SoftPromptChatModel(BaseChatModel):
    """Answers as the department's assistant: ragpt's template, the department's soft prompt, the frozen LM.

    Messages map onto ragpt's one input builder: the last human message is the question, earlier
    human/AI messages the history; system messages are ignored (the department's system prompt
    is part of the template its soft prompt was trained with). With `retrieve=True` the question
    is answered over the department's top-k chunks (their citations are in `response_metadata`),
    otherwise the template says that no documents were found.

    `max_new_tokens`, `temperature` and `seed` can also be given per call (`model.invoke(m, seed=1)`).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    pipeline: Pipeline = Field(exclude=True)
    department: str  # a department of the pipeline's index, or "auto" (routed per question)
    prompt: str = "active"  # the active version, "none", or a pinned version such as "v3"
    retrieve: bool = False
    k: int | None = None  # chunks to retrieve; None: settings.k
    max_new_tokens: int | None = None  # None: settings.max_new_tokens
    temperature: float | None = None  # None: settings.temperature
    seed: int | None = None

    @property
    def _llm_type(self) -> str:
        return "ragpt-soft-prompt"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"department": self.department, "prompt": self.prompt, "retrieve": self.retrieve, "k": self.k,
                "max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "seed": self.seed}

    # ------------------------------------------------------------------ helpers
    def _prepare(self, messages: list[BaseMessage], stop: list[str] | None) -> Prepared:
        if stop:
            raise ValueError("stop sequences are not supported: generation ends at the model's end-of-turn token")
        question, history = question_and_history(messages)
        return prepare(self.pipeline, question, self.department, history=history, prompt=self.prompt, k=self.k,
                       retrieve=self.retrieve)

    def _gen_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        return {name: kwargs[name] if kwargs.get(name) is not None else getattr(self, name) for name in _GEN_KWARGS}

    @staticmethod
    def _metadata(p: Prepared, finish_reason: str) -> dict[str, Any]:
        return {"model_name": "ragpt", "department": p.department, "prompt_version": p.prompt_version,
                "finish_reason": finish_reason, "citations": [asdict(c) for c in p.citations]}

    # ------------------------------------------------------------------ sync
    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        p = self._prepare(messages, stop)
        g = self._gen_kwargs(kwargs)
        s = self.pipeline.settings
        (res,) = self.pipeline.generator.generate(
            [p.ids], [p.soft_prompt], max_new_tokens=g["max_new_tokens"] or s.max_new_tokens,
            temperature=s.temperature if g["temperature"] is None else g["temperature"], seed=g["seed"],
        )
        done = Completion(token_ids=res.token_ids, finish_reason=res.finish_reason)
        message = AIMessage(content=res.text, usage_metadata=done.usage(p),
                            response_metadata=self._metadata(p, res.finish_reason))
        return ChatResult(generations=[ChatGeneration(message=message,
                                                      generation_info={"finish_reason": res.finish_reason})])

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        # No run_manager.on_llm_new_token here: BaseChatModel reports every yielded chunk itself.
        p = self._prepare(messages, stop)
        done = Completion()
        for piece in stream_text(self.pipeline, p, done, **self._gen_kwargs(kwargs)):
            yield ChatGenerationChunk(message=AIMessageChunk(content=piece))
        # The last chunk carries what is only known at the end; "last" stops LangChain adding an empty one.
        yield ChatGenerationChunk(
            message=AIMessageChunk(content="", usage_metadata=done.usage(p), chunk_position="last",
                                   response_metadata=self._metadata(p, done.finish_reason)),
            generation_info={"finish_reason": done.finish_reason},
        )

    # ------------------------------------------------------------------ async: the model runs in a worker thread
    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        async for chunk in aiter_in_thread(lambda: self._stream(messages, stop, **kwargs)):
            yield chunk

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        return await agenerate_from_stream(self._astream(messages, stop, **kwargs))
