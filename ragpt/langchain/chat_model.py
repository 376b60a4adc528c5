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

from ragpt.langchain._core import AUTO, route, split_lc_messages
from ragpt.serving.pipeline import Pipeline
from ragpt.serving.request import Answer, ChatRequest, PreparedRequest, generate_answers, prepare, stream_answer
from ragpt.serving.streaming import aiter_in_thread

_GEN_KWARGS = ("max_new_tokens", "temperature", "seed")


class SoftPromptChatModel(BaseChatModel):
    """Answers as the department's assistant: ragpt's template, the department's soft prompt, the frozen LM.

    Messages follow ragpt's one rule (ragpt.serving.messages): the last human message is the
    question, earlier human/AI messages the history, and system messages are appended to the
    department's system turn. With `retrieve=True` the question is answered over the department's
    top-k chunks (their citations are in `response_metadata`); otherwise the prompt has no passages,
    so a system message can carry the context (LangChain's `create_stuff_documents_chain` puts
    `{context}` there). Inputs are built with the prompt version's input contract.

    `max_new_tokens`, `temperature` and `seed` can also be given per call (`model.invoke(m, seed=1)`).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    pipeline: Pipeline = Field(exclude=True)
    department: str  # a department of the pipeline's index, or "auto" (routed per question)
    prompt: str = "active"  # the active version, "none", or a pinned version such as "v3"
    retrieve: bool = False
    k: int | None = None  # chunks to retrieve; None: the prompt version's contract
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
    def _prepare(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]) -> PreparedRequest:
        if stop:
            raise ValueError("stop sequences are not supported: generation ends at the model's end-of-turn token")
        question, history, system = split_lc_messages(messages)
        department = route(self.pipeline, [question])[0] if self.department == AUTO else self.department
        g = self._gen_kwargs(kwargs)
        return prepare(self.pipeline, ChatRequest(
            question, department, history=history, system=system, prompt=self.prompt,
            overrides={"k": self.k} if self.k is not None else None, retrieve=self.retrieve,
            max_new_tokens=g["max_new_tokens"], temperature=g["temperature"]))

    def _gen_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        return {name: kwargs[name] if kwargs.get(name) is not None else getattr(self, name) for name in _GEN_KWARGS}

    @staticmethod
    def _metadata(answer: Answer) -> dict[str, Any]:
        return {"model_name": "ragpt", "department": answer.department, "prompt_version": answer.prompt_version,
                "finish_reason": answer.finish_reason, "citations": [asdict(c) for c in answer.citations],
                "contract": answer.contract, "contract_overrides": answer.contract_overrides}

    @staticmethod
    def _usage(answer: Answer) -> dict[str, int]:
        u = answer.usage
        return {"input_tokens": u["prompt_tokens"], "output_tokens": u["completion_tokens"],
                "total_tokens": u["total_tokens"]}

    # ------------------------------------------------------------------ sync
    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        p = self._prepare(messages, stop, kwargs)
        (answer,) = generate_answers(self.pipeline.generator, [p], seed=self._gen_kwargs(kwargs)["seed"])
        message = AIMessage(content=answer.text, usage_metadata=self._usage(answer),
                            response_metadata=self._metadata(answer))
        return ChatResult(generations=[ChatGeneration(message=message,
                                                      generation_info={"finish_reason": answer.finish_reason})])

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        # No run_manager.on_llm_new_token here: BaseChatModel reports every yielded chunk itself.
        p = self._prepare(messages, stop, kwargs)
        for item in stream_answer(self.pipeline.generator, p, seed=self._gen_kwargs(kwargs)["seed"]):
            if isinstance(item, str):
                yield ChatGenerationChunk(message=AIMessageChunk(content=item))
                continue
            # The last chunk carries what is only known at the end; "last" stops LangChain adding an empty one.
            yield ChatGenerationChunk(
                message=AIMessageChunk(content="", usage_metadata=self._usage(item), chunk_position="last",
                                       response_metadata=self._metadata(item)),
                generation_info={"finish_reason": item.finish_reason},
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
