"""Ingest rate and answer latency on the sample corpus, embedded default models.

Measures, in one run: ingest (chunks/s, fresh index); retrieval latency; answer latency for
one question at a time and per answer in batches of 8, with bf16 (a bf16 copy of the frozen weights) off vs on
(alternating, same questions, so the ratio is measured side by side).

    .venv/bin/python benchmarks/sample_latency.py [--questions 12] [--max-tokens 48]
Results: benchmarks/results/sample_latency.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
RESULTS = Path(__file__).parent / "results"


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def main() -> None:
    import torch

    from ragpt.config import load_settings
    from ragpt.data.ingest import ingest
    from ragpt.data.sample import SAMPLE_DEPARTMENTS, department_dir, sample_questions
    from ragpt.lm.generator import Generator
    from ragpt.lm.models import load_embedder, load_generator_model
    from ragpt.retrieval.index import DocumentIndex
    from ragpt.serving.pipeline import Pipeline, Question

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=48)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="ragpt-latency-"))
    settings = load_settings(index_dir=tmp, max_new_tokens=args.max_tokens)
    t = time.perf_counter()
    emb = load_embedder(settings)
    load_embedder_s = time.perf_counter() - t
    chunks = 0
    embed_s = 0.0
    t = time.perf_counter()
    for d in SAMPLE_DEPARTMENTS:
        rep = ingest(tmp, "sample", [department_dir(d)], [d], emb, source_root=department_dir(d).parent,
                     progress=False)
        chunks += rep.chunks_embedded
        embed_s += rep.embed_seconds
    ingest_s = time.perf_counter() - t
    t = time.perf_counter()
    model, tok = load_generator_model(settings)
    load_gen_s = time.perf_counter() - t

    qs = sample_questions()[:: max(1, 60 // args.questions)][: args.questions]
    pipes = {}
    for name, bf16 in (("fp32", False), ("bf16", True)):
        pipes[name] = Pipeline(DocumentIndex.open(tmp, "sample"), settings, embedder=emb,
                               generator=Generator(model, tok, bf16=bf16))
    pipes["fp32"].ask(qs[0].question, qs[0].department)  # warm-up
    single = {n: [] for n in pipes}
    retrieve = []
    for q in qs:
        for name, pipe in pipes.items():  # alternate: both see the same machine state
            t = time.perf_counter()
            a = pipe.ask(q.question, q.department)
            single[name].append(time.perf_counter() - t)
            retrieve.append(a.timings["retrieve_s"])
    batched = {}
    for name, pipe in pipes.items():
        t = time.perf_counter()
        for i in range(0, len(qs), 8):
            pipe.ask_many([Question(q.question, q.department) for q in qs[i:i + 8]])
        batched[name] = (time.perf_counter() - t) / len(qs)

    out = {
        "config": {**vars(args), "torch_threads": torch.get_num_threads(), "chunk_tokens": settings.chunk_tokens,
                   "k": settings.k},
        "ingest": {"documents": 36, "chunks": chunks, "seconds_total": round(ingest_s, 2),
                   "embed_seconds": round(embed_s, 2), "chunks_per_second": round(chunks / embed_s, 1),
                   "chunks_per_second_incl_reading": round(chunks / ingest_s, 1)},
        "load_seconds": {"embedder": round(load_embedder_s, 2), "generator_cached": round(load_gen_s, 2)},
        "retrieve_ms_p50": round(1000 * statistics.median(retrieve), 1),
        "answer_seconds": {n: {"p50": round(statistics.median(v), 3), "p95": round(pct(v, 95), 3)}
                           for n, v in single.items()},
        "batched_8_seconds_per_answer": {n: round(v, 3) for n, v in batched.items()},
    }
    out["bf16_speedup_p50"] = round(out["answer_seconds"]["fp32"]["p50"] / out["answer_seconds"]["bf16"]["p50"], 2)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sample_latency.json").write_text(json.dumps(out, indent=2) + "\n")
    a = out["answer_seconds"]
    md = [
        "# Sample corpus: ingest rate and answer latency", "",
        f"- ingest: {chunks} chunks from 36 documents, {out['ingest']['chunks_per_second']} chunks/s embedding "
        f"({out['ingest']['chunks_per_second_incl_reading']} chunks/s including reading/chunking/writing)",
        f"- model load: embedder {out['load_seconds']['embedder']} s, generator (cached safetensors) "
        f"{out['load_seconds']['generator_cached']} s",
        f"- retrieval (hybrid, k={settings.k}): p50 {out['retrieve_ms_p50']} ms",
        f"- answer, one at a time (max {args.max_tokens} new tokens): fp32 p50 {a['fp32']['p50']} s / p95 "
        f"{a['fp32']['p95']} s; bf16 p50 {a['bf16']['p50']} s / p95 {a['bf16']['p95']} s "
        f"(bf16 speed-up {out['bf16_speedup_p50']}x)",
        f"- answer, batches of 8: fp32 {batched['fp32']:.3f} s/answer, bf16 {batched['bf16']:.3f} s/answer",
        "", "Command: `.venv/bin/python benchmarks/sample_latency.py " + " ".join(sys.argv[1:]) + "`",
    ]
    (RESULTS / "sample_latency.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
