"""The main job (`ragpt demo`) end to end, with the real embedder and a tiny generator."""

from __future__ import annotations

import pytest
from conftest import build_tiny_model

pytestmark = pytest.mark.integration


def test_demo_ingests_the_sample_corpus_and_answers_with_cited_sources(tmp_path, tiny_tokenizer):
    from ragpt.cli.demo import run_demo
    from ragpt.config import Settings
    from ragpt.data.sample import SAMPLE_DEPARTMENTS
    from ragpt.retrieval.index import DocumentIndex

    gen_dir = tmp_path / "tiny-generator"
    build_tiny_model(tiny_tokenizer).save_pretrained(gen_dir)
    tiny_tokenizer.save_pretrained(gen_dir)
    # The tiny byte-level tokenizer needs ~4 tokens per word: a prompt budget that fits the k passages.
    settings = Settings(index_dir=tmp_path / "indexes", generator=str(gen_dir), max_new_tokens=4, bf16="off",
                        prompt_dir=tmp_path / "prompts", data_dir=tmp_path / "no-data", max_context_tokens=3000)
    lines: list[str] = []
    stats = run_demo(settings, index="demo", limit=2, progress=False, out=lines.append)

    assert stats["questions"] == 2 * len(SAMPLE_DEPARTMENTS)
    assert stats["source_in_top_k"] >= stats["questions"] - 1
    assert sum(line.startswith("\nQ: ") for line in lines) == stats["questions"]
    assert any("ragpt/data/sample_corpus/hr/" in line and "#chunk" in line for line in lines)
    assert stats["shipped"] == {} and any("no department prompts" in line for line in lines)
    index = DocumentIndex.open(settings.index_dir, "demo")
    assert index.departments == sorted(SAMPLE_DEPARTMENTS)
    assert index.manifest["n_documents"] == 36

    # Running it again re-uses the index: every document is reported unchanged.
    lines.clear()
    run_demo(settings, index="demo", limit=1, progress=False, out=lines.append)
    assert all("0 added" in line and "12 unchanged" in line for line in lines if line.startswith("[ingest]"))


def _shipped_setup(tmp_path, tiny_tokenizer):
    """Settings over a tiny generator and a doc2dial-shaped data_dir, the registry, and
    `release(dept, **extra)`: register, approve and activate a random prompt (extra: its meta's)."""
    import torch
    from test_datasets import make_doc2dial

    from ragpt.config import Settings
    from ragpt.lm.models import load_generator_model
    from ragpt.softprompts.artifact import SoftPrompt, base_model_fingerprint
    from ragpt.softprompts.registry import PromptRegistry

    gen_dir = tmp_path / "tiny-generator"
    model = build_tiny_model(tiny_tokenizer)
    model.save_pretrained(gen_dir)
    tiny_tokenizer.save_pretrained(gen_dir)
    settings = Settings(index_dir=tmp_path / "indexes", generator=str(gen_dir), max_new_tokens=4, bf16="off",
                        prompt_dir=tmp_path / "prompts", data_dir=make_doc2dial(tmp_path / "data"),
                        cache_dir=tmp_path / "cache")
    fp = base_model_fingerprint(load_generator_model(settings)[0])
    reg = PromptRegistry(settings.prompt_dir)

    def release(dept: str, **extra) -> str:
        v = reg.register(SoftPrompt.create(torch.randn(3, model.config.hidden_size), department=dept,
                                           base_fingerprint=fp, extra=extra), actor="test")
        reg.approve(dept, v, actor="test")
        reg.activate(dept, v, actor="test")
        return v

    return settings, reg, release


def test_demo_serves_departments_with_shipped_prompts(tmp_path, tiny_tokenizer):
    """A department with an active prompt and its data set under data_dir is imported, ingested
    into the index "shared" and answered with and without its prompt."""
    from ragpt.cli.demo import SHIPPED_INDEX, run_demo
    from ragpt.retrieval.index import DocumentIndex

    settings, reg, release = _shipped_setup(tmp_path, tiny_tokenizer)
    v = release("dmv")

    lines: list[str] = []
    stats = run_demo(settings, index="demo", limit=2, progress=False, out=lines.append)

    assert set(stats["shipped"]) == {"dmv"}  # ssa is in the data but has no prompt: not served
    assert stats["shipped"]["dmv"]["version"] == v and stats["shipped"]["dmv"]["questions"] == 2
    assert sum(line.startswith("\nQ: fee for") and f"A ({v}):" in line for line in lines) == 2
    assert DocumentIndex.open(settings.index_dir, SHIPPED_INDEX).departments == ["dmv"]

    # A pulled prompt: the department is still served, by the base model alone.
    reg.deactivate("dmv", actor="test", reason="worse on the test set")
    lines.clear()
    stats = run_demo(settings, index="demo", limit=1, progress=False, out=lines.append)
    assert stats["shipped"]["dmv"]["version"] is None and stats["shipped"]["dmv"]["questions"] == 1
    assert "f1_soft_prompt" not in stats["shipped"]["dmv"]
    assert any("dmv: no active soft prompt" in line for line in lines)


def test_demo_serves_each_prompt_on_the_index_it_was_trained_against(tmp_path, tiny_tokenizer):
    """A prompt trained on sentence-packed chunks is answered from an index chunked that way, one
    that records no index from "shared"; a prompt from an index the demo cannot rebuild is an error."""
    from ragpt.cli.demo import SHIPPED_INDEX, run_demo
    from ragpt.errors import RagptError
    from ragpt.retrieval.index import DocumentIndex

    settings, _, release = _shipped_setup(tmp_path, tiny_tokenizer)
    release("dmv", index="shared-sentences")
    release("ssa")
    lines: list[str] = []
    stats = run_demo(settings, index="demo", limit=1, progress=False, out=lines.append)
    assert set(stats["shipped"]) == {"dmv", "ssa"}
    assert stats["shipped"]["dmv"]["index"] == "shared-sentences" and stats["shipped"]["ssa"]["index"] == "shared"
    sentences = DocumentIndex.open(settings.index_dir, "shared-sentences")
    assert sentences.chunking["splitter"] == "sentences"
    assert DocumentIndex.open(settings.index_dir, SHIPPED_INDEX).chunking["splitter"] == "recursive"
    assert sentences.departments == DocumentIndex.open(settings.index_dir, SHIPPED_INDEX).departments == ["dmv", "ssa"]
    assert any(line.startswith("[ingest] dmv into shared-sentences") for line in lines)

    # Nothing in the demo rebuilds an index it does not know: that department is left out, said why.
    v = release("dmv", index="someone-elses")
    lines.clear()
    stats = run_demo(settings, index="demo", limit=1, progress=False, out=lines.append)
    assert set(stats["shipped"]) == {"ssa"}
    assert f"\n(dmv not demonstrated: dmv {v} was trained against index 'someone-elses', which the demo does not " \
           "know how to rebuild (it knows shared, shared-sentences))" in lines

    # An index of that name chunked otherwise is not silently reused: the error says how to rebuild it.
    release("dmv", index="shared-sentences")
    (settings.index_dir / "shared-sentences").rename(tmp_path / "kept")
    from ragpt.data.ingest import ingest
    from ragpt.lm.models import load_embedder

    (tmp_path / "other.txt").write_text("A document of another department.", encoding="utf-8")
    ingest(settings.index_dir, "shared-sentences", [tmp_path / "other.txt"], ["other"], load_embedder(settings),
           chunk_splitter="recursive", progress=False)
    with pytest.raises(RagptError, match="`ragpt index delete shared-sentences` and the demo rebuilds it"):
        run_demo(settings, index="demo", limit=1, progress=False, out=lines.append)
