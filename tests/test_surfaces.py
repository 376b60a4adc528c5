"""Train as you serve, provably: one question gives one answer on every surface.

The same question, for a plain and a deep soft prompt, with and without conversation history,
goes through `ragpt eval`'s predictions, `ragpt ask`, `Pipeline`, a live `ragpt serve` on
127.0.0.1 (the unmodified `openai` client) and LangChain (`RagptChain`, `SoftPromptChatModel`).
Each must give the same answer text and the same citations, built with the prompt version's
input contract, which differs from the settings on purpose (so a surface that ignored it would
retrieve a different number of passages and answer differently).

Real parts throughout: the sample index with the real embedder and FAISS, a tiny random
generator saved as a Hugging Face folder that every surface loads through the settings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from conftest import build_tiny_model, free_port
from typer.testing import CliRunner

from ragpt.config import Settings
from ragpt.lm.generator import load_generator
from ragpt.retrieval.index import DocumentIndex
from ragpt.serving.contract import InputContract
from ragpt.serving.pipeline import Pipeline
from ragpt.softprompts.artifact import SoftPrompt, base_model_fingerprint
from ragpt.softprompts.registry import PromptRegistry
from ragpt_service.auth import hash_api_key

pytestmark = pytest.mark.integration

MAX_NEW = 10
KEY = "surfaces-key"
QUESTION = "And can I carry unused days over into next year?"
HISTORY = [{"role": "user", "content": "How many vacation days do I get per year?"},
           {"role": "assistant", "content": "Full-time employees get 30 working days."}]
# The versions' contracts differ from the settings (k=2, max_context_tokens=768 by default) and from each other.
CONTRACTS = {"v1": InputContract(k=1, max_context_tokens=2500, query_rule="turns:4"),
             "v2": InputContract(k=2, max_context_tokens=3000, query_rule="last")}


@pytest.fixture(scope="module")
def world(sample_index, tiny_tokenizer, tmp_path_factory):
    """The settings every surface uses: the sample index, a saved tiny generator, a registry with
    hr v1 (plain, active) and v2 (deep, approved)."""
    index_settings, index = sample_index
    root = tmp_path_factory.mktemp("surfaces")
    gen_dir = root / "tiny-generator"
    build_tiny_model(tiny_tokenizer, seed=3).save_pretrained(gen_dir)
    tiny_tokenizer.save_pretrained(gen_dir)
    settings = Settings(index_dir=index_settings.index_dir, prompt_dir=root / "prompts", generator=str(gen_dir),
                        cache_dir=index_settings.cache_dir, bf16="off", max_new_tokens=MAX_NEW)
    gen = load_generator(settings)
    fp = base_model_fingerprint(gen.base_model)
    scale = float(gen.embedding.weight.std())
    reg = PromptRegistry(settings.prompt_dir)
    torch.manual_seed(5)
    plain = torch.randn(4, gen.hidden_size) * scale
    deep = torch.randn(gen.max_prompt_depth, 4, gen.hidden_size) * scale
    for tensor, version in ((plain, "v1"), (deep, "v2")):
        sp = SoftPrompt.create(tensor, department="hr", base_fingerprint=fp, contract=CONTRACTS[version].to_dict())
        assert reg.register(sp, actor="test") == version
        reg.approve("hr", version, actor="test")
    reg.activate("hr", "v1", actor="test")
    pipe = Pipeline(DocumentIndex.open(settings.index_dir, index), settings, generator=gen)
    return settings, index, pipe, root


def _cites(citations) -> list[tuple[str, int]]:
    return [(c["source"], c["chunk"]) if isinstance(c, dict) else (c.source, c.chunk) for c in citations]


def _cli_flags(settings: Settings) -> list[str]:
    return ["--index-dir", str(settings.index_dir), "--prompt-dir", str(settings.prompt_dir),
            "--generator", settings.generator, "--bf16", "off", "--cache-dir", str(settings.cache_dir)]


@pytest.fixture(scope="module")
def served(world):
    """`ragpt serve` as a user starts it, on 127.0.0.1, until the module ends (bounded waits)."""
    settings, index, _, root = world
    config = root / "serve.toml"
    config.write_text(f'index = "{index}"\n[departments.hr]\napi_keys = ["{hash_api_key(KEY)}"]\n'
                      "[batching]\nmax_wait_ms = 1\n", encoding="utf-8")
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAGPT_MAX_NEW_TOKENS": str(MAX_NEW)}
    proc = subprocess.Popen([sys.executable, "-m", "ragpt.cli", *_cli_flags(settings), "serve", "--config",
                             str(config), "--port", str(port), "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            proc.kill()
            pytest.fail(f"ragpt serve did not become ready: {proc.communicate(timeout=10)[0][-2000:]}")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _eval_predictions(world, version: str, with_history: bool, tmp_path: Path) -> dict:
    from ragpt.cli.main import app

    settings, index, _, _ = world
    data = tmp_path / "test.jsonl"
    record = {"question": QUESTION, "answers": ["30 days"], "department": "hr", "doc_id": "hr/vacation-policy.txt",
              "history": HISTORY if with_history else []}
    data.write_text(json.dumps(record) + "\n", encoding="utf-8")
    r = CliRunner().invoke(app, [*_cli_flags(settings), "eval", "-d", "hr", "-i", index, "--data", str(data),
                                 "--method", "soft", "--prompt", version, "--max-tokens", str(MAX_NEW),
                                 "--batch-size", "1", "--bootstrap", "0", "--out", str(tmp_path / "report"), "-q"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in (tmp_path / "report" / "predictions.jsonl").read_text().splitlines()]
    (row,) = [x for x in rows if x["method"] == f"soft:{version}"]
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    assert results["departments"]["hr"]["contract"] == CONTRACTS[version].to_dict()
    return {"text": row["prediction"], "citations": _cites(row["citations"])}


@pytest.mark.parametrize("with_history", [False, True], ids=["first-turn", "follow-up"])
@pytest.mark.parametrize("version", ["v1", "v2"], ids=["plain", "deep"])
def test_the_same_question_gets_the_same_answer_on_every_surface(world, served, version, with_history, tmp_path):
    import openai
    from langchain_core.messages import AIMessage, HumanMessage

    from ragpt.cli.main import app
    from ragpt.langchain import RagptChain, SoftPromptChatModel
    from ragpt.serving.request import Turn

    settings, index, pipe, _ = world
    history = HISTORY if with_history else []
    turns = tuple(Turn(t["role"], t["content"]) for t in history)
    answers: dict[str, dict] = {}

    ref = pipe.ask(QUESTION, "hr", history=turns, prompt=version)
    answers["Pipeline"] = {"text": ref.text, "citations": _cites(ref.citations)}
    assert ref.prompt_version == version and ref.contract == CONTRACTS[version].to_dict()
    assert ref.contract_overrides == {} and len(ref.citations) == CONTRACTS[version].k
    assert ref.history_turns == len(history)

    r = CliRunner().invoke(app, [*_cli_flags(settings), "ask", QUESTION, "-d", "hr", "-i", index, "--prompt", version,
                                 "--history", json.dumps(history), "--max-tokens", str(MAX_NEW), "--json"])
    assert r.exit_code == 0, r.output
    cli = json.loads(r.output.strip().splitlines()[-1])
    answers["ragpt ask"] = {"text": cli["text"], "citations": _cites(cli["citations"])}
    assert cli["prompt_version"] == version and cli["contract"] == CONTRACTS[version].to_dict()

    answers["ragpt eval"] = _eval_predictions(world, version, with_history, tmp_path)

    client = openai.OpenAI(base_url=f"{served}/v1", api_key=KEY, max_retries=0, timeout=60)
    resp = client.chat.completions.create(model=f"hr@{version}", max_tokens=MAX_NEW,
                                          messages=[*history, {"role": "user", "content": QUESTION}])
    extra = resp.model_extra
    answers["HTTP (openai client)"] = {"text": resp.choices[0].message.content,
                                       "citations": _cites(extra["citations"])}
    assert extra["prompt_version"] == version and extra["contract"] == CONTRACTS[version].to_dict()
    assert resp.model == f"hr@{version}"

    chain = RagptChain(pipeline=pipe, department="hr", prompt=version, max_new_tokens=MAX_NEW)
    out = chain.invoke({"question": QUESTION, "history": history})
    answers["LangChain RagptChain"] = {"text": out["answer"], "citations": _cites(out["sources"])}
    chat = SoftPromptChatModel(pipeline=pipe, department="hr", prompt=version, retrieve=True, max_new_tokens=MAX_NEW)
    lc_msgs = [HumanMessage(t["content"]) if t["role"] == "user" else AIMessage(t["content"]) for t in history]
    msg = chat.invoke([*lc_msgs, HumanMessage(QUESTION)])
    answers["LangChain SoftPromptChatModel"] = {"text": msg.content,
                                               "citations": _cites(msg.response_metadata["citations"])}

    expected = answers["Pipeline"]
    assert expected["text"], "the tiny model answered nothing: the comparison would prove little"
    for surface, got in answers.items():
        assert got == expected, f"{surface} differs from Pipeline"


def test_a_follow_up_retrieves_with_the_conversation_on_every_surface(world):
    """v1's contract says query_rule turns:4: the follow-up's citations come from the conversation's
    query, not from the follow-up alone (which the same contract with query_rule "last" retrieves)."""
    _, _, pipe, _ = world
    from ragpt.serving.request import Turn

    turns = tuple(Turn(t["role"], t["content"]) for t in HISTORY)
    with_history = pipe.ask(QUESTION, "hr", history=turns, prompt="v1")
    last_only = pipe.ask(QUESTION, "hr", history=turns, prompt="v1", overrides={"query_rule": "last"})
    assert last_only.contract_overrides == {"query_rule": {"contract": "turns:4", "used": "last"}}
    alone = pipe.ask(QUESTION, "hr", prompt="v1")
    assert _cites(last_only.citations) == _cites(alone.citations)
    hits = pipe.retriever.search("\n".join([QUESTION, HISTORY[1]["content"], HISTORY[0]["content"]]), "hr", 1)
    assert _cites(with_history.citations) == [(h.chunk.source, h.chunk.chunk) for h in hits]
