"""LangChain integration: ragpt's runnables composed with real langchain-core parts, no mocked model.

Most tests use the tiny random generator over the real sample index (real embedder, real FAISS);
answers are compared with what ragpt's own Pipeline/Generator produce for the same request (the
one request path, ragpt.serving.request).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from dataclasses import asdict

import pytest
import torch
from conftest import build_tiny_model
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import ConfigurableField, RunnableLambda, RunnableParallel

from ragpt.data.sample import SAMPLE_DEPARTMENTS, sample_questions
from ragpt.errors import EmptyQuestionError, UnknownDepartmentError
from ragpt.langchain import (
    RagptChain,
    RagptRetriever,
    RagptServiceChatModel,
    ServiceError,
    SoftPromptChatModel,
    rag_chain,
)
from ragpt.lm.generator import Generator
from ragpt.lm.template import Turn, build_prompt, count_tokens, system_text
from ragpt.retrieval.index import DocumentIndex
from ragpt.retrieval.router import DepartmentRouter
from ragpt.serving.contract import InputContract
from ragpt.serving.pipeline import Pipeline
from ragpt.serving.request import ChatRequest, prepare
from ragpt.serving.streaming import Detokenizer
from ragpt.softprompts.artifact import SoftPrompt, base_model_fingerprint
from ragpt.softprompts.registry import PromptRegistry

MAX_NEW = 12
N_SOFT = 4  # tokens of hr's soft prompt
# The tiny model states 512 positions, less than two ~500-token sample chunks need; its rotary
# positions work for any length, so the pipeline's model gets a window (and the prompt a budget)
# that fits the retrieved passages: otherwise no passage would ever make it into a prompt.
PROMPT_BUDGET = 2048
HR_QUERY_RULE = "user:2"  # hr v1's own contract: the question plus the user turn before it
Q_IT = sample_questions("it")[0].question
Q_HR = sample_questions("hr")[0].question
Q_FIN = sample_questions("finance")[0].question


@pytest.fixture(scope="module")
def pipe(sample_index, real_embedder, tiny_tokenizer, tmp_path_factory) -> Pipeline:
    """The sample index, the real embedder and the tiny generator; hr has an active soft prompt (v1)."""
    settings, name = sample_index
    gen = Generator(build_tiny_model(tiny_tokenizer), tiny_tokenizer)
    prompt_dir = tmp_path_factory.mktemp("prompts")
    s = settings.model_copy(update={"k": 2, "max_new_tokens": MAX_NEW, "max_context_tokens": PROMPT_BUDGET,
                                    "prompt_dir": prompt_dir})
    # hr v1 records the input contract it was trained with: the settings' one but for its query rule.
    contract = {**InputContract.from_settings(s).to_dict(), "query_rule": HR_QUERY_RULE}
    reg = PromptRegistry(prompt_dir)
    sp = SoftPrompt.create(torch.randn(N_SOFT, gen.hidden_size, generator=torch.Generator().manual_seed(1)),
                           department="hr", base_fingerprint=base_model_fingerprint(gen.model), contract=contract)
    v = reg.register(sp, actor="test")
    reg.approve("hr", v, actor="test")
    reg.activate("hr", v, actor="test")
    p = Pipeline(DocumentIndex.open(s.index_dir, name), s, embedder=real_embedder, generator=gen)
    # One search before any test runs branches in threads: the embedder's fast tokenizer sets its
    # truncation on first use, which must not happen in two threads at once.
    p.retrieve("warm up", "hr")
    return p


class Recorder(BaseCallbackHandler):
    """Records the chat-model callbacks LangChain fires, in order."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.tokens: list[str] = []
        self.messages = None
        self.response = None

    def on_chat_model_start(self, serialized, messages, **kwargs) -> None:
        self.events.append("start")
        self.messages = messages

    def on_llm_new_token(self, token, **kwargs) -> None:
        self.events.append("token")
        self.tokens.append(token)

    def on_llm_end(self, response, **kwargs) -> None:
        self.events.append("end")
        self.response = response


def _departments_of(pipe: Pipeline, source: str) -> list[str]:
    return pipe.index.manifest["documents"][source]["departments"]


def _count_calls(monkeypatch, obj, name: str) -> list:
    """Wrap obj.name with a recorder that delegates to the real method (instrumentation, not a mock)."""
    real = getattr(obj, name)
    calls = []

    def counting(*args, **kwargs):
        calls.append((args, kwargs, threading.current_thread()))
        return real(*args, **kwargs)

    monkeypatch.setattr(obj, name, counting)
    return calls


# --------------------------------------------------------------------------- detokenisation


@pytest.mark.parametrize("text", ["Grüße aus München – 日本語 🙂 ok", "  leading and trailing spaces \n "])
def test_detokenizer_pieces_join_to_the_generated_text_and_never_split_a_character(tiny_tokenizer, text):
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    eos = tiny_tokenizer.eos_token_id
    assert len(ids) > len(text.split())  # multi-byte characters really span several tokens
    d = Detokenizer(tiny_tokenizer, {eos})
    pieces = [d.push(t) for t in ids + [eos]]
    pieces.append(d.finish())
    assert "".join(pieces) == tiny_tokenizer.decode(ids, skip_special_tokens=True).strip() == text.strip()
    assert not any("\ufffd" in p for p in pieces)
    assert sum(1 for p in pieces if p) > 3


# --------------------------------------------------------------------------- retriever


def test_retriever_returns_the_departments_chunks_as_documents(pipe):
    retriever = RagptRetriever(pipeline=pipe, department="it", k=3)
    docs = retriever.invoke(Q_IT)
    hits = pipe.retrieve(Q_IT, "it", 3)
    assert [(d.metadata["source"], d.metadata["chunk"]) for d in docs] == [(h.chunk.source, h.chunk.chunk)
                                                                           for h in hits]
    assert [d.page_content for d in docs] == [h.chunk.text for h in hits]
    for d in docs:
        assert d.metadata["department"] == "it"
        assert "it" in _departments_of(pipe, d.metadata["source"])
    scores = [d.metadata["score"] for d in docs]
    assert scores == sorted(scores, reverse=True) and len(docs) == 3
    assert asyncio.run(retriever.ainvoke(Q_IT)) == docs


def test_retriever_department_is_configurable_per_call(pipe):
    retriever = RagptRetriever(pipeline=pipe, department="it").configurable_fields(
        department=ConfigurableField(id="department"))
    for dept in SAMPLE_DEPARTMENTS:
        docs = retriever.with_config(configurable={"department": dept}).invoke(Q_HR)
        assert docs and {d.metadata["department"] for d in docs} == {dept}
        assert all(dept in _departments_of(pipe, d.metadata["source"]) for d in docs)


# --------------------------------------------------------------------------- chat model


def test_chat_model_answers_with_ragpts_template_and_reports_usage(pipe):
    model = SoftPromptChatModel(pipeline=pipe, department="it")
    tok = pipe.generator.tokenizer
    history = [HumanMessage("Hi"), AIMessage("Hello, how can I help?")]
    turns = [Turn("user", "Hi"), Turn("assistant", "Hello, how can I help?")]
    # System messages, wherever they stand, are joined (blank line) and appended to the department's system turn.
    msg = model.invoke([SystemMessage("You are a pirate."), *history, SystemMessage("Say arr."), HumanMessage(Q_IT)])
    # The same ids ragpt's one input builder makes, with no documents (retrieve=False), the history and the system text.
    ids = build_prompt(tok, Q_IT, [], department="it", history=turns, system="You are a pirate.\n\nSay arr.").ids
    assert f"<|im_start|>system\n{system_text('it')}\n\nYou are a pirate.\n\nSay arr.<|im_end|>" in tok.decode(ids)
    expected = pipe.generator.generate([ids], max_new_tokens=MAX_NEW)[0]
    assert msg.content == expected.text and msg.content
    assert msg.usage_metadata == {"input_tokens": len(ids), "output_tokens": len(expected.token_ids),
                                  "total_tokens": len(ids) + len(expected.token_ids)}
    assert msg.response_metadata["department"] == "it" and msg.response_metadata["prompt_version"] is None
    assert msg.response_metadata["citations"] == []
    # Without system messages the system turn is the department's alone: a shorter input, its own answer.
    plain = model.invoke([*history, HumanMessage(Q_IT)])
    plain_ids = build_prompt(tok, Q_IT, [], department="it", history=turns).ids
    assert plain.usage_metadata["input_tokens"] == len(plain_ids) < len(ids)
    assert plain.content == pipe.generator.generate([plain_ids], max_new_tokens=MAX_NEW)[0].text
    # The history matters, so the comparisons above are not trivial.
    assert model.invoke([HumanMessage(Q_IT)]).content != plain.content


def test_chat_model_uses_the_active_or_pinned_soft_prompt(pipe):
    active = SoftPromptChatModel(pipeline=pipe, department="hr").invoke(Q_HR)
    none = SoftPromptChatModel(pipeline=pipe, department="hr", prompt="none").invoke(Q_HR)
    pinned = SoftPromptChatModel(pipeline=pipe, department="hr", prompt="v1").invoke(Q_HR)
    assert active.response_metadata["prompt_version"] == pinned.response_metadata["prompt_version"] == "v1"
    assert none.response_metadata["prompt_version"] is None
    assert active.usage_metadata["input_tokens"] == none.usage_metadata["input_tokens"] + N_SOFT
    assert active.content == pinned.content != none.content


def test_chat_model_with_retrieval_answers_like_the_pipeline(pipe):
    model = SoftPromptChatModel(pipeline=pipe, department="finance", retrieve=True)
    msg = model.invoke(Q_FIN)
    answer = pipe.ask(Q_FIN, "finance")
    assert msg.content == answer.text
    assert msg.response_metadata["citations"] == [asdict(c) for c in answer.citations] and answer.citations
    assert msg.usage_metadata["input_tokens"] == answer.usage["prompt_tokens"]


def test_stream_yields_several_chunks_that_add_up_to_invoke_with_usage_on_the_last(pipe):
    model = SoftPromptChatModel(pipeline=pipe, department="hr")
    chunks = list(model.stream(Q_HR))
    msg = model.invoke(Q_HR)
    assert len([c for c in chunks if c.content]) > 1
    assert "".join(c.content for c in chunks) == msg.content
    last = chunks[-1]
    assert last.chunk_position == "last" and last.usage_metadata == msg.usage_metadata
    assert all(c.usage_metadata is None for c in chunks[:-1])
    merged = chunks[0]
    for c in chunks[1:]:
        merged += c
    assert merged.content == msg.content and merged.usage_metadata == msg.usage_metadata
    assert merged.response_metadata["prompt_version"] == "v1"


def test_callbacks_see_start_each_token_and_end(pipe):
    model = SoftPromptChatModel(pipeline=pipe, department="it")
    rec = Recorder()
    chunks = list(model.stream([SystemMessage("Be brief."), HumanMessage(Q_IT)], config={"callbacks": [rec]}))
    assert rec.events[0] == "start" and rec.events[-1] == "end"
    assert rec.events.count("token") == len(chunks) > 2
    assert rec.tokens == [c.content for c in chunks]
    assert [m.content for m in rec.messages[0]] == ["Be brief.", Q_IT]
    final = rec.response.generations[0][0]
    assert final.text == "".join(rec.tokens)
    assert final.message.usage_metadata == chunks[-1].usage_metadata


def test_lcel_pipe_with_prompt_template_parser_and_parallel_retriever(pipe):
    model = SoftPromptChatModel(pipeline=pipe, department="it")
    prompt = ChatPromptTemplate.from_messages([("system", "Be brief."), ("human", "{question}")])
    answer = RunnableLambda(lambda q: {"question": q.strip()}) | prompt | model | StrOutputParser()
    app = RunnableParallel(answer=answer, docs=RunnableLambda(str.strip) | RagptRetriever(pipeline=pipe,
                                                                                          department="it"))
    rec = Recorder()
    out = app.invoke(f"  {Q_IT} ", config={"callbacks": [rec]})
    # The template's system message reaches the model (appended to the department's system turn).
    assert out["answer"] == model.invoke([SystemMessage("Be brief."), HumanMessage(Q_IT)]).content
    used = rec.response.generations[0][0].message.usage_metadata["input_tokens"]
    assert used > model.invoke(Q_IT).usage_metadata["input_tokens"]
    assert [d.page_content for d in out["docs"]] == [h.chunk.text for h in pipe.retrieve(Q_IT, "it")]
    assert rec.events == ["start", "end"]  # invoked, not streamed: no token events
    # Streaming the composed chain streams the model's pieces through the parser.
    pieces = list(answer.stream(Q_IT))
    assert len(pieces) > 1 and "".join(pieces) == out["answer"]


def test_create_retrieval_chain_stuffs_the_retrieved_documents_into_the_system_turn(pipe):
    """LangChain's standard RAG pattern: its own retrieval and stuff-documents chains around ragpt's parts."""
    from langchain_classic.chains import create_retrieval_chain
    from langchain_classic.chains.combine_documents import create_stuff_documents_chain

    retriever = RagptRetriever(pipeline=pipe, department="hr")
    model = SoftPromptChatModel(pipeline=pipe, department="hr", retrieve=False)
    prompt = ChatPromptTemplate.from_messages([("system", "Answer from this context:\n\n{context}"),
                                               ("human", "{input}")])
    rag = create_retrieval_chain(retriever, create_stuff_documents_chain(model, prompt))
    rec = Recorder()
    out = rag.invoke({"input": Q_HR}, config={"callbacks": [rec]})
    docs = retriever.invoke(Q_HR)
    assert len(docs) == 2 and [d.page_content for d in out["context"]] == [d.page_content for d in docs]
    # The stuffed documents arrive as the system message; ragpt appends it to hr's system turn.
    system = "Answer from this context:\n\n" + "\n\n".join(d.page_content for d in docs)
    assert [(type(m), m.content) for m in rec.messages[0]] == [(SystemMessage, system), (HumanMessage, Q_HR)]
    req = ChatRequest(Q_HR, "hr", system=system, retrieve=False)
    (expected,) = pipe.ask_many([req])
    assert out["answer"] == expected.text and out["answer"] and expected.prompt_version == "v1"
    # The model's input holds the documents' text, in the system turn; ragpt added no passages of its own.
    tok = pipe.generator.tokenizer
    prepared = prepare(pipe, req)
    text = tok.decode(prepared.ids)
    assert f"<|im_start|>system\n{system_text('hr', system)}<|im_end|>" in text
    assert all(d.page_content.strip() in text for d in docs) and "Context: (no documents found)" in text
    usage = rec.response.generations[0][0].message.usage_metadata
    assert usage["input_tokens"] == prepared.prompt_tokens == expected.usage["prompt_tokens"]
    (bare,) = pipe.ask_many([ChatRequest(Q_HR, "hr", retrieve=False)])
    assert bare.text != expected.text  # so the answer comparison above tells the context was used
    doc_tokens = sum(count_tokens(tok, d.page_content) for d in docs)
    assert usage["input_tokens"] - bare.usage["prompt_tokens"] > 0.9 * doc_tokens > 500


def test_one_config_switches_the_department_of_model_and_retriever_together(pipe):
    field = {"department": ConfigurableField(id="department")}
    model = SoftPromptChatModel(pipeline=pipe, department="it").configurable_fields(**field)
    retriever = RagptRetriever(pipeline=pipe, department="it").configurable_fields(**field)
    app = RunnableParallel(msg=model, docs=retriever)
    out = app.with_config(configurable={"department": "hr"}).invoke(Q_HR)
    assert out["msg"].response_metadata["department"] == "hr"
    assert out["msg"].response_metadata["prompt_version"] == "v1"
    assert {d.metadata["department"] for d in out["docs"]} == {"hr"}
    assert app.invoke(Q_HR)["msg"].response_metadata["department"] == "it"


def test_async_paths_run_the_model_off_the_event_loop_and_match_sync(pipe, monkeypatch):
    model = SoftPromptChatModel(pipeline=pipe, department="hr")
    sync_msg, sync_it = model.invoke(Q_HR), model.invoke(Q_IT)
    streams = _count_calls(monkeypatch, pipe.generator, "stream")

    async def main():
        loop_thread = threading.current_thread()
        msg = await model.ainvoke(Q_HR)
        chunks = [c async for c in model.astream(Q_HR)]
        batch = await model.abatch([Q_HR, Q_IT])
        return loop_thread, msg, chunks, batch

    loop_thread, msg, chunks, batch = asyncio.run(main())
    assert msg.content == sync_msg.content and msg.usage_metadata == sync_msg.usage_metadata
    assert msg.response_metadata["prompt_version"] == "v1"
    assert len([c for c in chunks if c.content]) > 1 and "".join(c.content for c in chunks) == sync_msg.content
    assert chunks[-1].usage_metadata == sync_msg.usage_metadata
    assert batch[0].content == sync_msg.content and batch[1].content == sync_it.content
    # Every generation ran in a worker thread: the event loop was never blocked by the model.
    assert len(streams) == 4 and all(t is not loop_thread for *_, t in streams)


def test_astream_stopped_early_closes_the_generation(pipe):
    model = SoftPromptChatModel(pipeline=pipe, department="it")

    async def first_chunk():
        stream = model.astream(Q_IT)
        chunk = await anext(stream)
        await stream.aclose()
        return chunk

    assert asyncio.run(first_chunk()).content  # and returns at all: no worker left waiting on the queue


def test_chat_model_rejects_what_it_cannot_do(pipe):
    model = SoftPromptChatModel(pipeline=pipe, department="it")
    with pytest.raises(ValueError, match="last"):
        model.invoke([HumanMessage(Q_IT), AIMessage("an answer")])
    with pytest.raises(EmptyQuestionError):
        model.invoke("   ")
    with pytest.raises(ValueError, match="stop"):
        model.invoke(Q_IT, stop=["."])
    with pytest.raises(UnknownDepartmentError):
        SoftPromptChatModel(pipeline=pipe, department="legal").invoke(Q_IT)


# --------------------------------------------------------------------------- chain


def _expected(pipe: Pipeline, question: str, dept: str, **ask) -> dict:
    a = pipe.ask(question, dept, **ask)
    return {"answer": a.text, "sources": [asdict(c) for c in a.citations], "department": dept,
            "prompt_version": a.prompt_version, "contract": a.contract, "contract_overrides": a.contract_overrides}


def test_chain_invoke_with_configurable_department(pipe):
    chain = rag_chain(pipe)
    assert {s.id for s in chain.config_specs} == {"department", "prompt"}
    for dept, q in (("it", Q_IT), ("hr", Q_HR)):
        out = chain.with_config(configurable={"department": dept}).invoke(q)
        assert out == _expected(pipe, q, dept)
        assert out["sources"] and all(dept in _departments_of(pipe, s["source"]) for s in out["sources"])
    assert chain.with_config(configurable={"department": "hr"}).invoke({"question": Q_HR})["prompt_version"] == "v1"
    # The input's own department wins over the config's; "prompt" pins or drops the soft prompt.
    assert chain.with_config(configurable={"department": "hr"}).invoke(
        {"question": Q_IT, "department": "it"})["department"] == "it"
    assert chain.with_config(configurable={"department": "hr", "prompt": "none"}).invoke(Q_HR)["prompt_version"] is None


# A follow-up that names nothing; hr v1's query rule (the question and the user turn before it) finds
# the parental-leave policy through the history, the follow-up alone finds other documents.
EARLIER_Q = "How many weeks of paid parental leave do fathers in Austin get?"
EARLIER_A = "10 weeks."
FOLLOW_UP = "And how do I request it?"
PARENTAL = "hr/parental-leave-policy.md"


def test_chain_input_with_history_and_system_answers_like_the_pipeline(pipe):
    chain = rag_chain(pipe)
    turns = (Turn("user", EARLIER_Q), Turn("assistant", EARLIER_A))
    history = [{"role": "user", "content": EARLIER_Q}, {"role": "assistant", "content": EARLIER_A}]
    out = chain.invoke({"question": FOLLOW_UP, "department": "hr", "history": history})
    assert out == _expected(pipe, FOLLOW_UP, "hr", history=turns)
    assert out["contract"]["query_rule"] == HR_QUERY_RULE
    # LangChain messages work as history too.
    assert chain.invoke({"question": FOLLOW_UP, "department": "hr",
                         "history": [HumanMessage(EARLIER_Q), AIMessage(EARLIER_A)]}) == out
    # The history changes what is retrieved: the follow-up alone finds other chunks.
    alone = chain.invoke({"question": FOLLOW_UP, "department": "hr"})
    assert alone == _expected(pipe, FOLLOW_UP, "hr")
    assert out["sources"] and all(s["source"].endswith(PARENTAL) for s in out["sources"])
    assert alone["sources"] and not any(s["source"].endswith(PARENTAL) for s in alone["sources"])
    # "system" is appended to the department's system turn, as Pipeline.ask(system=...) does.
    with_system = chain.invoke({"question": Q_HR, "department": "hr", "system": "Answer in English."})
    assert with_system == _expected(pipe, Q_HR, "hr", system="Answer in English.")
    assert with_system["answer"] != chain.invoke({"question": Q_HR, "department": "hr"})["answer"]
    with pytest.raises(ValueError, match="history"):
        chain.invoke({"question": FOLLOW_UP, "department": "hr", "history": [{"role": "system", "content": "x"}]})


def test_outputs_and_metadata_carry_the_input_contract(pipe):
    hr_contract = pipe.resolve("hr")[2].to_dict()  # hr v1's stored contract
    assert hr_contract == {**pipe.default_contract.to_dict(), "query_rule": HR_QUERY_RULE}
    assert {"k", "max_context_tokens", "max_question_tokens", "max_history_tokens", "template", "dense", "bm25",
            "rrf_k", "query_rule", "gold_context"} <= set(hr_contract)
    out = rag_chain(pipe, department="hr").invoke(Q_HR)
    assert out["contract"] == hr_contract and out["contract_overrides"] == {} and len(out["sources"]) == 2
    # Without a prompt version the settings' contract applies.
    none = rag_chain(pipe, department="hr").with_config(configurable={"prompt": "none"}).invoke(Q_HR)
    assert none["contract"] == pipe.default_contract.to_dict() and none["contract"]["query_rule"] == "turns:4"
    # A field set on the chain overrides the version's contract, and the output says so.
    one = rag_chain(pipe, department="hr", k=1)
    out1 = one.invoke(Q_HR)
    assert out1["contract_overrides"] == {"k": {"contract": 2, "used": 1}}
    assert out1["contract"] == {**hr_contract, "k": 1} and len(out1["sources"]) == 1
    streamed = None
    for chunk in one.stream(Q_HR):
        streamed = chunk if streamed is None else streamed + chunk
    assert streamed == out1
    # The chat model reports the same in response_metadata, on invoke and on the stream's last chunk.
    meta = SoftPromptChatModel(pipeline=pipe, department="hr").invoke(Q_HR).response_metadata
    assert meta["contract"] == hr_contract and meta["contract_overrides"] == {}
    model1 = SoftPromptChatModel(pipeline=pipe, department="hr", retrieve=True, k=1)
    meta1 = model1.invoke(Q_HR).response_metadata
    assert meta1["contract_overrides"] == {"k": {"contract": 2, "used": 1}} and meta1["contract"]["k"] == 1
    assert len(meta1["citations"]) == 1
    last = list(model1.stream(Q_HR))[-1].response_metadata
    assert last["contract"] == meta1["contract"] and last["contract_overrides"] == meta1["contract_overrides"]


def test_auto_department_is_the_routers_choice(pipe):
    router = DepartmentRouter.from_index(pipe.index, pipe.embedder)
    chain = RagptChain(pipeline=pipe)  # department defaults to "auto"
    for q in (Q_IT, Q_HR, Q_FIN):
        expected = router.route(q).department
        out = chain.invoke(q)
        assert out["department"] == expected
        assert out == _expected(pipe, q, expected)
    assert [chain.invoke(q)["department"] for q in (Q_IT, Q_HR, Q_FIN)] == ["it", "hr", "finance"]
    # The chat model and the retriever route the same way.
    assert SoftPromptChatModel(pipeline=pipe, department="auto").invoke(Q_FIN).response_metadata[
        "department"] == "finance"
    assert {d.metadata["department"] for d in RagptRetriever(pipeline=pipe, department="auto").invoke(Q_IT)} == {"it"}


def test_mixed_department_batch_is_one_generation_equal_to_per_item_invoke(pipe, monkeypatch):
    chain = rag_chain(pipe, department="it")
    inputs = [Q_HR, Q_IT, {"question": Q_FIN, "department": "finance"}, sample_questions("hr")[1].question, Q_FIN]
    configs = [{"configurable": {"department": "hr"}}, {}, {}, {"configurable": {"department": "hr"}},
               {"configurable": {"department": "auto"}}]
    generate = _count_calls(monkeypatch, pipe.generator, "stream")  # every answer is one Generator.stream
    batch = chain.batch(inputs, configs)
    assert len(generate) == 1 and len(generate[0][0][0]) == len(inputs)  # one call, one row per input
    assert [o["department"] for o in batch] == ["hr", "it", "finance", "hr", "finance"]
    assert [o["prompt_version"] for o in batch] == ["v1", None, None, "v1", None]
    singles = [chain.invoke(i, c) for i, c in zip(inputs, configs)]
    assert len(generate) == 1 + len(inputs)
    assert batch == singles
    assert len({o["answer"] for o in batch}) > 1  # the rows really differ


def test_abatch_is_one_generation_too_and_matches_ainvoke(pipe, monkeypatch):
    chain = rag_chain(pipe)
    inputs = [{"question": Q_HR, "department": "hr"}, {"question": Q_IT, "department": "it"}]
    expected = [chain.invoke(i) for i in inputs]
    generate = _count_calls(monkeypatch, pipe.generator, "stream")

    async def main():
        return await chain.abatch(inputs), [await chain.ainvoke(i) for i in inputs]

    batch, singles = asyncio.run(main())
    assert batch == singles == expected
    assert len(generate) == 1 + len(inputs)


def test_chain_stream_and_astream_add_up_to_invoke(pipe):
    chain = rag_chain(pipe).with_config(configurable={"department": "hr"})
    expected = chain.invoke(Q_HR)
    chunks = list(chain.stream(Q_HR))
    # Sources come first, before any answer text; then the answer arrives in several pieces.
    assert chunks[0]["sources"] == expected["sources"] and chunks[0]["answer"] == ""
    assert len([c for c in chunks if c.get("answer")]) > 1
    total = chunks[0]
    for c in chunks[1:]:
        total = total + c
    assert total == expected

    async def collect():
        out = None
        async for c in chain.astream(Q_HR):
            out = c if out is None else out + c
        return out

    assert asyncio.run(collect()) == expected


def test_chain_composes_and_reports_bad_inputs_per_item(pipe):
    app = RunnableLambda(lambda text: {"question": text.upper()}) | rag_chain(pipe, department="it") | (
        lambda out: out["answer"])
    assert app.invoke(Q_IT.lower()) == _expected(pipe, Q_IT.upper(), "it")["answer"]
    chain = rag_chain(pipe, department="it")
    out = chain.batch([Q_IT, "  ", {"question": Q_HR, "department": "legal"}], return_exceptions=True)
    assert out[0] == _expected(pipe, Q_IT, "it")
    assert isinstance(out[1], EmptyQuestionError) and isinstance(out[2], UnknownDepartmentError)
    with pytest.raises(EmptyQuestionError):
        chain.invoke("")
    with pytest.raises(TypeError):
        chain.invoke({"text": Q_IT})


# --------------------------------------------------------------------------- HTTP service


API_KEY = "lc-test-key"


@pytest.fixture(scope="module")
def service_url(pipe, real_embedder):
    """The real ragpt service app (ragpt_service.app.create_app) on a live uvicorn, sharing pipe's models."""
    import uvicorn

    from ragpt_service.app import create_app
    from ragpt_service.auth import hash_api_key
    from ragpt_service.config import ServiceConfig

    s = pipe.settings
    cfg = ServiceConfig(index=pipe.index.name, index_dir=s.index_dir, prompt_dir=s.prompt_dir,
                        departments={d: {"api_keys": [hash_api_key(API_KEY)]} for d in SAMPLE_DEPARTMENTS})
    app = create_app(cfg, s, embedder=real_embedder, generator=pipe.generator, background_load=False)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the service did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(30)
    sock.close()


def test_service_chat_model_invoke_stream_and_async_over_http(pipe, service_url):
    model = RagptServiceChatModel(base_url=service_url, api_key=API_KEY, model="it")
    # The service appends system messages to the department's system turn, as Pipeline.ask(system=...) does.
    with_system = pipe.ask(Q_IT, "it", system="Be brief.")
    sys_msg = model.invoke([SystemMessage("Be brief."), HumanMessage(Q_IT)])
    assert sys_msg.content == with_system.text
    assert sys_msg.usage_metadata["input_tokens"] == with_system.usage["prompt_tokens"]
    answer = pipe.ask(Q_IT, "it")
    assert answer.usage["prompt_tokens"] < with_system.usage["prompt_tokens"]
    msg = model.invoke(Q_IT)
    assert msg.content == answer.text
    assert msg.usage_metadata == {"input_tokens": answer.usage["prompt_tokens"],
                                  "output_tokens": answer.usage["completion_tokens"],
                                  "total_tokens": answer.usage["total_tokens"]}
    meta = msg.response_metadata
    assert meta["department"] == "it" and meta["prompt_version"] is None
    assert [(c["source"], c["chunk"]) for c in meta["citations"]] == [(c.source, c.chunk) for c in answer.citations]
    assert meta["citations"]

    rec = Recorder()
    chunks = list(model.stream(Q_IT, config={"callbacks": [rec]}))
    assert len([c for c in chunks if c.content]) > 1
    assert "".join(c.content for c in chunks) == answer.text
    assert chunks[-1].usage_metadata == msg.usage_metadata and chunks[-1].chunk_position == "last"
    assert chunks[-1].response_metadata["citations"] == meta["citations"]
    assert rec.events[0] == "start" and rec.events[-1] == "end" and rec.tokens == [c.content for c in chunks]

    async def main():
        return await model.ainvoke(Q_IT), [c async for c in model.astream(Q_IT)]

    amsg, achunks = asyncio.run(main())
    assert amsg.content == answer.text and amsg.usage_metadata == msg.usage_metadata
    assert "".join(c.content for c in achunks) == answer.text and achunks[-1].usage_metadata == msg.usage_metadata


def test_service_chat_model_pins_versions_routes_and_reports_errors(pipe, service_url):
    pinned = RagptServiceChatModel(base_url=service_url, api_key=API_KEY, model="hr@v1").invoke(Q_HR)
    assert pinned.response_metadata["department"] == "hr" and pinned.response_metadata["prompt_version"] == "v1"
    assert pinned.response_metadata["model_name"] == "hr@v1"
    auto = RagptServiceChatModel(base_url=service_url, api_key=API_KEY, model="auto", max_tokens=3).invoke(Q_FIN)
    assert auto.response_metadata["department"] == "finance" and auto.usage_metadata["output_tokens"] <= 3
    bad_key = RagptServiceChatModel(base_url=service_url, api_key="wrong", model="it")
    with pytest.raises(ServiceError) as e:
        bad_key.invoke(Q_IT)
    assert e.value.status == 401
    with pytest.raises(ServiceError) as e:
        list(bad_key.stream(Q_IT))
    assert e.value.status == 401
    with pytest.raises(ServiceError) as e:
        RagptServiceChatModel(base_url=service_url, api_key=API_KEY, model="legal").invoke(Q_IT)
    assert e.value.status == 404


# --------------------------------------------------------------------------- real generator


@pytest.mark.integration
def test_real_generator_chain_and_streaming_chat_model(sample_index, real_embedder, real_generator):
    settings, name = sample_index
    model, tok = real_generator
    s = settings.model_copy(update={"k": 2, "max_new_tokens": 16})
    real = Pipeline(DocumentIndex.open(s.index_dir, name), s, embedder=real_embedder,
                    generator=Generator(model, tok, bf16=False))
    q = sample_questions("hr")[0]
    chain = rag_chain(real).with_config(configurable={"department": "hr"})
    out = chain.invoke(q.question)
    assert out["answer"].strip() and out["department"] == "hr"
    assert all("hr" in _departments_of(real, s["source"]) for s in out["sources"])
    total = None
    for c in chain.stream(q.question):
        total = c if total is None else total + c
    assert total == out
    chat = SoftPromptChatModel(pipeline=real, department="hr", retrieve=True)
    chunks = list(chat.stream(q.question))
    assert len(chunks) > 2 and "".join(c.content for c in chunks) == out["answer"]
    # The real byte-level tokenizer splits multi-byte characters; pieces never cut one in half.
    ids = tok("Grüße aus München – 日本語 🙂", add_special_tokens=False)["input_ids"]
    d = Detokenizer(tok, set())
    pieces = [d.push(t) for t in ids] + [d.finish()]
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True).strip()
    assert not any("\ufffd" in p for p in pieces)
