"""Retrieval quality: dense vs BM25 vs hybrid (RRF), department/document-scoped, in one run.

* sample corpus: is the gold source document in the department's top-k? (60 questions)
* PolicyQA (shared data, test split): each question scoped to its own policy with a metadata
  filter inside the search; is a chunk containing the gold answer span in the top-k?

    .venv/bin/python benchmarks/retrieval_quality.py [--limit 1000] [--data-dir ../shared/data]
Results: benchmarks/results/retrieval_quality.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
RESULTS = Path(__file__).parent / "results"
MODES = {"dense": (True, False), "bm25": (False, True), "hybrid": (True, True)}


def main() -> None:
    from ragpt.config import load_settings
    from ragpt.data.datasets import import_policyqa
    from ragpt.data.documents import source_matches
    from ragpt.data.ingest import ingest
    from ragpt.data.qa import load_qa
    from ragpt.data.sample import SAMPLE_DEPARTMENTS, department_dir, sample_questions
    from ragpt.evaluation.metrics import answer_in_text
    from ragpt.lm.models import load_embedder
    from ragpt.retrieval.index import DocumentIndex
    from ragpt.retrieval.search import Retriever

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=1000, help="PolicyQA test questions (random sample, seed 0)")
    ap.add_argument("--data-dir", type=Path, default=None, help="shared data folder (default: settings.data_dir)")
    ap.add_argument("--ks", default="1,2,3,5")
    args = ap.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    settings = load_settings(**({"data_dir": args.data_dir} if args.data_dir else {}))
    tmp = Path(tempfile.mkdtemp(prefix="ragpt-retrieval-"))
    emb = load_embedder(settings)
    results: dict = {"config": {"ks": ks, "limit": args.limit, "chunk_tokens": settings.chunk_tokens,
                                "chunk_overlap": settings.chunk_overlap, "embedder": emb.name}}

    # --- sample corpus
    for d in SAMPLE_DEPARTMENTS:
        ingest(tmp, "sample", [department_dir(d)], [d], emb, source_root=department_dir(d).parent, progress=False)
    idx = DocumentIndex.open(tmp, "sample")
    qs = sample_questions()
    vecs = emb.encode([q.question for q in qs])
    res = {}
    for mode, (dense, bm25) in MODES.items():
        r = Retriever(idx, emb, dense=dense, bm25=bm25)
        hits = {k: 0 for k in ks}
        for q, v in zip(qs, vecs):
            found = r.search(q.question, q.department, max(ks), query_vector=v[None])
            for k in ks:
                hits[k] += any(source_matches(h.chunk.source, q.source) for h in found[:k])
        res[mode] = {f"hit@{k}": round(100 * hits[k] / len(qs), 1) for k in ks}
    results["sample_corpus"] = {"questions": len(qs), "metric": "gold source document in top-k", **res}
    print("sample corpus", json.dumps(res), flush=True)

    # --- PolicyQA, each question scoped to its policy
    out = tmp / "policyqa"
    import_policyqa(settings.data_dir, out)
    t0 = time.perf_counter()
    rep = ingest(tmp, "policyqa", [out / "docs" / "legal"], ["legal"], emb, source_root=out / "docs",
                 progress=False)
    results["policyqa_ingest"] = {"chunks": rep.chunks_embedded, "seconds": round(rep.seconds, 1),
                                  "chunks_per_second": round(rep.chunks_per_second, 1)}
    idx = DocumentIndex.open(tmp, "policyqa")
    qas = load_qa(out / "qa" / "legal.test.jsonl")
    random.Random(0).shuffle(qas)
    qas = qas[: args.limit]
    vecs = emb.encode([q.question for q in qas], batch_size=128)
    res = {}
    for mode, (dense, bm25) in MODES.items():
        r = Retriever(idx, emb, dense=dense, bm25=bm25)
        hits = {k: 0 for k in ks}
        t = time.perf_counter()
        for q, v in zip(qas, vecs):
            found = r.search(q.question, "legal", max(ks), {"source": _source_of(idx, q.doc_id)}, query_vector=v[None])
            for k in ks:
                hits[k] += any(answer_in_text(q.answers, h.chunk.text) for h in found[:k])
        res[mode] = {**{f"hit@{k}": round(100 * hits[k] / len(qas), 1) for k in ks},
                     "ms_per_query": round(1000 * (time.perf_counter() - t) / len(qas), 2)}
    results["policyqa"] = {"questions": len(qas), "chunks": len(idx.chunks),
                           "metric": "a chunk containing the gold answer span in top-k, search scoped to the "
                                     "question's policy", **res}
    print("policyqa", json.dumps(res), flush=True)
    results["seconds"] = round(time.perf_counter() - t0, 1)

    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "retrieval_quality.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["# Retrieval quality (dense vs BM25 vs hybrid RRF)", ""]
    for name in ("sample_corpus", "policyqa"):
        block = results[name]
        lines += [f"## {name} ({block['questions']} questions): {block['metric']}", "",
                  "| mode | " + " | ".join(f"hit@{k}" for k in ks) + " |", "|---" * (len(ks) + 1) + "|"]
        for mode in MODES:
            lines.append(f"| {mode} | " + " | ".join(f"{block[mode][f'hit@{k}']}" for k in ks) + " |")
        lines.append("")
    lines.append("Command: `.venv/bin/python benchmarks/retrieval_quality.py " + " ".join(sys.argv[1:]) + "`")
    (RESULTS / "retrieval_quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _source_of(idx, doc_id: str) -> str:
    """QA doc_id is '<dept>/<file>'; the index stores the ingested display path ending with it."""
    for src in idx.manifest["documents"]:
        if src.endswith("/" + doc_id.split("/", 1)[1]):
            return src
    raise KeyError(doc_id)


if __name__ == "__main__":
    main()
