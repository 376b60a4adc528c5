"""`RagptChain`: question in, `{answer, sources, department, prompt_version}` out, as one LCEL runnable.

The department is chosen per call, first match wins:
    1. the input dict's "department" key,
    2. `config["configurable"]["department"]` (e.g. `chain.with_config(configurable={"department": "hr"})`),
    3. the chain's `department` field; "auto" routes the question with ragpt.retrieval.router.
`batch`/`abatch` answer all inputs, whatever their departments, in ONE batched generation in which
each row carries its own department's soft prompt. Requests go through the one request path
(ragpt.serving.request), as `ragpt ask`, the HTTP service and `ragpt eval` do.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import asdict
from typing import Any

from langchain_core.runnables import RunnableConfig, RunnableSerializable
from langchain_core.runnables.config import run_in_executor
from langchain_core.runnables.utils import AddableDict, ConfigurableFieldSpec
from pydantic import ConfigDict, Field

from ragpt.errors import EmptyQuestionError
from ragpt.langchain._core import AUTO, history_from, route
from ragpt.serving.pipeline import Pipeline
from ragpt.serving.request import Answer, ChatRequest, generate_answers, prepare, prepare_many, stream_answer
from ragpt.serving.streaming import aiter_in_thread

ChainInput = str | dict[str, Any]
ChainOutput = dict[str, Any]


class RagptChain(RunnableSerializable[ChainInput, ChainOutput]):
    """Retrieve -> department soft prompt -> frozen LM -> answer with its sources.

    Input: a question string, or `{"question": ..., "department": ..., "history": [...], "system": ...}`
    (all but the question optional; history as LangChain messages or {"role", "content"} dicts).
    Output: `{"answer": str, "sources": [citation dicts], "department": str, "prompt_version": str | None,
    "contract": dict, "contract_overrides": dict}`.
    `stream`/`astream` yield the sources first (retrieval is done before generation starts), then
    answer text pieces; the chunks add up to what `invoke` returns.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    pipeline: Pipeline = Field(exclude=True)
    department: str = AUTO  # the default when neither the input nor the config names one
    prompt: str = "active"  # "active", "none" or a pinned version; configurable as "prompt"
    k: int | None = None
    max_new_tokens: int | None = None
    temperature: float | None = None
    seed: int | None = None

    @property
    def config_specs(self) -> list[ConfigurableFieldSpec]:
        return [
            ConfigurableFieldSpec(id="department", annotation=str, name="Department", default=self.department,
                                  description="A department of the index, or 'auto' to route the question."),
            ConfigurableFieldSpec(id="prompt", annotation=str, name="Soft prompt", default=self.prompt,
                                  description="'active', 'none', or a pinned prompt version such as 'v3'."),
        ]

    # ------------------------------------------------------------------ requests and answers
    def _request(self, input: ChainInput, config: RunnableConfig | None) -> ChatRequest:
        configurable = (config or {}).get("configurable") or {}
        fields: Mapping[str, Any] = {}
        if isinstance(input, str):
            question = input
        elif isinstance(input, Mapping) and "question" in input:
            question, fields = input["question"], input
        else:
            raise TypeError(f"RagptChain takes a question string or {{'question': ...}}, got {type(input).__name__}")
        if not isinstance(question, str) or not question.strip():
            raise EmptyQuestionError("the question is empty")
        if fields.get("system") is not None and not isinstance(fields["system"], str):
            raise TypeError(f"'system' must be a string, got {type(fields['system']).__name__}")
        department = fields.get("department") or configurable.get("department") or self.department
        return ChatRequest(question, department, history=history_from(fields.get("history")),
                           system=fields.get("system"), prompt=configurable.get("prompt") or self.prompt,
                           overrides={"k": self.k} if self.k is not None else None,
                           max_new_tokens=self.max_new_tokens, temperature=self.temperature)

    def _route(self, requests: dict[int, ChatRequest]) -> None:
        auto = [i for i, r in requests.items() if r.department == AUTO]
        if auto:  # one embedder batch for all routed questions
            for i, dept in zip(auto, route(self.pipeline, [requests[i].question for i in auto])):
                requests[i].department = dept

    def _answer_many(self, inputs: list[ChainInput], configs: list[RunnableConfig]) -> list[ChainOutput | Exception]:
        """One output (or the exception of that input) per input, from one batched generation."""
        outputs: list[ChainOutput | Exception | None] = [None] * len(inputs)
        requests: dict[int, ChatRequest] = {}
        for i, (inp, cfg) in enumerate(zip(inputs, configs)):
            try:
                requests[i] = self._request(inp, cfg)
            except Exception as e:
                outputs[i] = e
        self._route(requests)
        order = list(requests)
        prepared = prepare_many(self.pipeline, [requests[i] for i in order])
        valid = []
        for i, p in zip(order, prepared):  # a bad department or prompt version fails its own input only
            if isinstance(p, Exception):
                outputs[i] = p
            else:
                valid.append((i, p))
        answers = generate_answers(self.pipeline.generator, [p for _, p in valid], seed=self.seed)
        for (i, _), answer in zip(valid, answers):
            outputs[i] = _output(answer)
        return outputs  # type: ignore[return-value]

    def _chunks(self, input: ChainInput, config: RunnableConfig | None) -> Iterator[AddableDict]:
        requests = {0: self._request(input, config)}
        self._route(requests)
        p = prepare(self.pipeline, requests[0])
        yield AddableDict(answer="", sources=[asdict(c) for c in p.citations], department=p.department,
                          prompt_version=p.prompt_version)
        for item in stream_answer(self.pipeline.generator, p, seed=self.seed):
            if isinstance(item, str):
                yield AddableDict(answer=item)
            else:
                yield AddableDict(contract=item.contract, contract_overrides=item.contract_overrides)

    # ------------------------------------------------------------------ Runnable: sync
    def _invoke(self, input: ChainInput, run_manager: Any, config: RunnableConfig) -> ChainOutput:
        (out,) = self._answer_many([input], [config])
        if isinstance(out, Exception):
            raise out
        return out

    def invoke(self, input: ChainInput, config: RunnableConfig | None = None, **kwargs: Any) -> ChainOutput:
        return self._call_with_config(self._invoke, input, config)

    def _batch(self, inputs: list[ChainInput], run_manager: Any, config: list[RunnableConfig]) -> list:
        return self._answer_many(inputs, config)

    def batch(self, inputs: list[ChainInput], config: RunnableConfig | list[RunnableConfig] | None = None, *,
              return_exceptions: bool = False, **kwargs: Any) -> list[ChainOutput]:
        return self._batch_with_config(self._batch, inputs, config, return_exceptions=return_exceptions)

    def _transform(self, inputs: Iterator[ChainInput], run_manager: Any, config: RunnableConfig
                   ) -> Iterator[AddableDict]:
        *_, last = inputs  # stream() passes one input; Runnable.transform has already merged chunks
        yield from self._chunks(last, config)

    def stream(self, input: ChainInput, config: RunnableConfig | None = None, **kwargs: Any
               ) -> Iterator[ChainOutput]:
        yield from self._transform_stream_with_config(iter([input]), self._transform, config)

    # ------------------------------------------------------------------ Runnable: async (model in a worker thread)
    async def _ainvoke(self, input: ChainInput, run_manager: Any, config: RunnableConfig) -> ChainOutput:
        return await run_in_executor(None, self._invoke, input, None, config)

    async def ainvoke(self, input: ChainInput, config: RunnableConfig | None = None, **kwargs: Any) -> ChainOutput:
        return await self._acall_with_config(self._ainvoke, input, config)

    async def _abatch(self, inputs: list[ChainInput], run_manager: Any, config: list[RunnableConfig]) -> list:
        return await run_in_executor(None, self._answer_many, inputs, config)

    async def abatch(self, inputs: list[ChainInput], config: RunnableConfig | list[RunnableConfig] | None = None,
                     *, return_exceptions: bool = False, **kwargs: Any) -> list[ChainOutput]:
        return await self._abatch_with_config(self._abatch, inputs, config, return_exceptions=return_exceptions)

    async def _atransform(self, inputs: AsyncIterator[ChainInput], run_manager: Any, config: RunnableConfig
                          ) -> AsyncIterator[AddableDict]:
        last = [x async for x in inputs][-1]
        async for chunk in aiter_in_thread(lambda: self._chunks(last, config)):
            yield chunk

    async def astream(self, input: ChainInput, config: RunnableConfig | None = None, **kwargs: Any
                      ) -> AsyncIterator[ChainOutput]:
        async def one() -> AsyncIterator[ChainInput]:
            yield input

        async for chunk in self._atransform_stream_with_config(one(), self._atransform, config):
            yield chunk


def _output(answer: Answer) -> ChainOutput:
    return {"answer": answer.text, "sources": [asdict(c) for c in answer.citations],
            "department": answer.department, "prompt_version": answer.prompt_version,
            "contract": answer.contract, "contract_overrides": answer.contract_overrides}


def rag_chain(pipeline: Pipeline | str, department: str = AUTO, **fields: Any) -> RagptChain:
    """A `RagptChain` over a pipeline, or over the named index with default settings (`rag_chain("sample")`)."""
    if isinstance(pipeline, str):
        pipeline = Pipeline.open(index=pipeline)
    return RagptChain(pipeline=pipeline, department=department, **fields)
