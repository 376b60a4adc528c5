"""Embedder precision (the embed_precision setting): bf16 weights where the CPU has native bf16,
vectors that agree with fp32's, and an index that treats the two precisions as one embedder
(ragpt.lm.models.Embedder says why). Speed is measured in benchmarks/ingest_throughput.py, not here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ragpt.config import Settings, load_settings
from ragpt.data.documents import Chunker, collect_documents, read_document
from ragpt.data.ingest import ingest
from ragpt.data.sample import SAMPLE_DEPARTMENTS, department_dir, sample_questions
from ragpt.errors import ConfigError, ModelLoadError
from ragpt.lm.generator import cpu_supports_bf16
from ragpt.lm.models import load_embedder, resolve_embed_precision
from ragpt.retrieval.index import DocumentIndex
from ragpt.retrieval.search import Retriever

# Measured on the doc2dial + PolicyQA chunks: min 0.9999 (benchmarks/results/ingest_throughput.md).
# 0.999 leaves room for other CPUs' bf16 kernels and still fails a wrong model or an unnormalised vector.
MIN_COSINE = 0.999


def test_setting_is_validated_and_read_from_the_environment(monkeypatch):
    assert Settings().embed_precision == "auto"
    assert Settings(embed_precision="BF16").embed_precision == "bf16"
    monkeypatch.setenv("RAGPT_EMBED_PRECISION", "fp32")
    assert load_settings().embed_precision == "fp32"
    with pytest.raises(ConfigError, match="embed_precision must be auto, fp32 or bf16"):
        load_settings(embed_precision="int8")


def test_auto_follows_the_cpu():
    assert resolve_embed_precision("auto") == ("bf16" if cpu_supports_bf16() else "fp32")
    assert resolve_embed_precision("fp32") == "fp32"
    assert resolve_embed_precision("bf16") == "bf16"
    with pytest.raises(ModelLoadError, match="embed_precision must be one of auto, fp32, bf16"):
        resolve_embed_precision("fp16")


@pytest.fixture(scope="module")
def embedders(real_settings):
    return {p: load_embedder(real_settings, precision=p) for p in ("fp32", "bf16")}


def _sample_texts(tokenizer) -> list[str]:
    chunker = Chunker(tokenizer, 200, 40)
    texts = []
    for d in SAMPLE_DEPARTMENTS:
        for f in collect_documents([department_dir(d)], department_dir(d).parent).files:
            texts += [c.text for c in chunker.split(read_document(f.path, source=f.source), [d])]
    return texts + [q.question for q in sample_questions()]


@pytest.mark.integration
def test_the_setting_selects_the_weights_dtype(real_settings):
    for setting, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        emb = load_embedder(real_settings.model_copy(update={"embed_precision": setting}))
        assert emb.precision == setting
        assert {p.dtype for p in emb.model.parameters()} == {dtype}
        assert emb.name == real_settings.embedder  # precision is not part of the identity
    default = load_embedder(real_settings)
    assert default.precision == ("bf16" if cpu_supports_bf16() else "fp32")


@pytest.mark.integration
def test_bf16_vectors_agree_with_fp32(embedders):
    texts = _sample_texts(embedders["fp32"].tokenizer)
    a = embedders["fp32"].encode(texts)
    b = embedders["bf16"].encode(texts, batch_size=16)
    assert a.dtype == b.dtype == np.float32 and a.shape == b.shape
    # Unit vectors, so that inner product stays cosine (bf16 normalisation alone is off by ~1e-3).
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    cos = (a * b).sum(1)
    assert cos.min() > MIN_COSINE, f"lowest cosine {cos.min():.6f} over {len(texts)} texts"
    assert not np.array_equal(a, b)  # it really computed in bf16


@pytest.mark.integration
def test_an_index_takes_both_precisions_and_retrieves_the_same(tmp_path, embedders):
    """fp32 documents queried with bf16 queries (an index built before the default changed) give the
    same hits as fp32 queries; bf16 can add documents to it; each entry records its precision."""
    fp32, bf16 = embedders["fp32"], embedders["bf16"]
    root = department_dir("hr").parent
    for d in ("hr", "it"):
        ingest(tmp_path, "mixed", [department_dir(d)], [d], fp32, source_root=root, progress=False)
    rep = ingest(tmp_path, "mixed", [department_dir("finance")], ["finance"], bf16, source_root=root,
                 progress=False)
    assert rep.added and rep.chunks_embedded > 0
    index = DocumentIndex.open(tmp_path, "mixed")
    assert index.embedder_name == fp32.name == bf16.name
    by_dept = {d: {e["embed_precision"] for e in index.documents.values() if d in e["departments"]}
               for d in SAMPLE_DEPARTMENTS}
    assert by_dept == {"hr": {"fp32"}, "it": {"fp32"}, "finance": {"bf16"}}

    qs = sample_questions()
    tops = {}
    for p, emb in embedders.items():
        r = Retriever(index, emb, dense=True, bm25=False)
        tops[p] = [[h.chunk.id for h in r.search(q.question, q.department, 2)] for q in qs]
    same_first = sum(a[0] == b[0] for a, b in zip(tops["fp32"], tops["bf16"]))
    assert same_first >= 0.95 * len(qs), f"top-1 differs for {len(qs) - same_first} of {len(qs)} questions"

    def hit2(ids: list[int], q) -> bool:
        return any(index.chunks[i].source == q.source for i in ids)

    hits = {p: sum(hit2(t, q) for t, q in zip(tops[p], qs)) for p in tops}
    assert abs(hits["bf16"] - hits["fp32"]) <= 1, hits
