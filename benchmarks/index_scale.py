"""Dense search at scale: a million chunks, 145 departments, each index type, one query at a time.

Vectors: the real all-MiniLM-L6-v2 embeddings of an existing index's chunks (default: the demo's
`shared` index, 2,970 chunks of doc2dial + PolicyQA documents), repeated with Gaussian noise
(sigma 0.045 per dimension, so a copy keeps a cosine of about 0.75 to its original) and
renormalised, up to --n vectors. Queries: real test questions of the imported QA sets, embedded
with the same model (or, without them, noisy chunk vectors).

Departments: 145, with skewed sizes, assigned to the chunks at random (so a department's chunks
are spread over the whole space: the hard case for a filtered approximate search): 2 x 20%,
1 x 10%, 2 x 5%, 20 x 1%, 20 x 0.5%, 100 x 0.1%.

For each index type: build time, memory (RSS growth while building), and per filter selectivity
(department size) p50/p95 latency of ragpt's own search (ragpt.retrieval.dense: the department's
IDSelector inside FAISS; nprobe chosen by selectivity for ivf), recall@10 against exact search
over the department's vectors, and the one-off cost of a department's selector. HNSW (FAISS
IndexHNSWFlat with the same selectors) is measured for comparison; ragpt does not offer it
(see docs/scale.md). BM25 (bm25s, as ragpt.retrieval.search uses it) is measured at --bm25-n
chunks: build time, memory, time per query.

    .venv/bin/python benchmarks/index_scale.py [--n 1000000] [--queries 200] [--no-hnsw]
Results: benchmarks/results/index_scale.{json,md}
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
RESULTS = Path(__file__).parent / "results"
SIGMA = 0.045
SIZES = [(2, 0.20), (1, 0.10), (2, 0.05), (20, 0.01), (20, 0.005), (100, 0.001)]
TARGET_P50_MS, TARGET_RECALL = 5.0, 0.95
K = 10


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def load_base(index_dir: Path, name: str):
    from ragpt.retrieval.index import DocumentIndex

    idx = DocumentIndex.open(index_dir, name)
    ids = np.asarray(sorted(idx.chunks), dtype=np.int64)
    texts = [f"{idx.chunks[i].title}\n{idx.chunks[i].text}" for i in ids]
    return idx.dense.vectors(ids), texts


def read_questions(qa_dir: Path) -> tuple[list[str], int]:
    """Every test question of the imported QA sets, and how many files they came from."""
    files = sorted(glob.glob(str(qa_dir / "*" / "qa" / "*.test.jsonl")))
    questions = []
    for f in files:
        with open(f, encoding="utf-8") as fh:
            questions += [json.loads(line)["question"] for line in fh if line.strip()]
    return questions, len(files)


def load_queries(qa_dir: Path, base: np.ndarray, n: int, rng) -> tuple[np.ndarray, str]:
    questions, n_files = read_questions(qa_dir)
    if len(questions) >= n:
        from ragpt.config import load_settings
        from ragpt.lm.models import load_embedder

        pick = [questions[i] for i in rng.permutation(len(questions))[:n]]
        return load_embedder(load_settings()).encode(pick), f"{n} real test questions from {n_files} QA files"
    q = base[rng.integers(0, len(base), n)] + 2 * SIGMA * rng.standard_normal((n, base.shape[1]), dtype=np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True), f"{n} noisy chunk vectors (no QA files found)"


def synthesise(base: np.ndarray, n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    x = np.empty((n, base.shape[1]), dtype=np.float32)
    origin = rng.integers(0, len(base), n)
    for s in range(0, n, 100_000):
        e = min(n, s + 100_000)
        v = base[origin[s:e]] + SIGMA * rng.standard_normal((e - s, base.shape[1]), dtype=np.float32)
        x[s:e] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return x, origin


def departments(n: int, rng) -> dict[str, np.ndarray]:
    perm = rng.permutation(n)
    out, off = {}, 0
    for count, share in SIZES:
        for j in range(count):
            size = max(1, int(round(n * share)))
            out[f"d{share * 100:g}pct_{j}"] = np.sort(perm[off:off + size]).astype(np.int64)
            off += size
    return out


def bucket(name: str) -> str:
    return name.split("_")[0][1:].replace("pct", "%")


def assignments(depts: dict[str, np.ndarray], n_queries: int) -> dict[str, list[str]]:
    """Selectivity bucket -> the department each query is asked in (round robin in the bucket)."""
    names = list(depts)
    out = {}
    for b in dict.fromkeys(bucket(n) for n in names):
        members = [n for n in names if bucket(n) == b]
        out[b] = [members[i % len(members)] for i in range(n_queries)]
    return out


def exact_truth(x: np.ndarray, depts, queries: np.ndarray, plan) -> dict[str, list[set[int]]]:
    """Exact top-10 of each query in its department (one matrix product per department)."""
    truth: dict[str, list[set[int]]] = {}
    for b, asked in plan.items():
        truth[b] = [set()] * len(asked)
        for m in dict.fromkeys(asked):
            rows = [i for i, a in enumerate(asked) if a == m]
            ids = depts[m]
            s = x[ids] @ queries[rows].T
            for j, i in enumerate(rows):
                col = s[:, j]
                top = np.argpartition(-col, K)[:K] if len(ids) > K else np.arange(len(ids))
                truth[b][i] = set(ids[top].tolist())
    return truth


def measure(search, n_total, depts, queries, plan, truth) -> dict:
    """search(q, allowed) -> ids; per selectivity bucket: latency, recall, selector build."""
    from ragpt.retrieval.dense import AllowedIds

    per: dict[str, dict] = {}
    for b, asked in plan.items():
        members = list(dict.fromkeys(asked))
        lat, rec, sel_ms = [], [], []
        allowed = {}
        for m in members:
            t = time.perf_counter()
            a = AllowedIds(depts[m], n_total)
            _ = a.selector
            sel_ms.append((time.perf_counter() - t) * 1000)
            allowed[m] = a
        for i, q in enumerate(queries):
            t = time.perf_counter()
            got = search(q[None], allowed[asked[i]])
            lat.append((time.perf_counter() - t) * 1000)
            rec.append(len(set(got) & truth[b][i]) / min(K, len(truth[b][i])))
        per[b] = {
            "departments": len(members), "chunks_per_department": int(len(depts[members[0]])),
            "p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
            "recall_at_10": float(np.mean(rec)), "selector_build_ms": float(np.median(sel_ms)),
        }
    return per


def bench_bm25(texts: list[str], n: int, queries: list[str], rng) -> dict:
    import bm25s

    from ragpt.retrieval.search import _bm25_tokenize

    corpus = [texts[i] for i in rng.integers(0, len(texts), n)]
    before = rss_mb()
    t = time.perf_counter()
    r = bm25s.BM25()
    r.index(_bm25_tokenize(corpus), show_progress=False)
    build = time.perf_counter() - t
    mem = rss_mb() - before
    del corpus
    share = 0.2
    allowed = np.sort(rng.choice(n, int(n * share), replace=False))
    lat = []
    for q in queries:
        t = time.perf_counter()
        tokens = _bm25_tokenize([q])[0]
        if tokens:
            s = np.asarray(r.get_scores(tokens), dtype=np.float32)[allowed]
            np.argpartition(-s, 20)[:20]
        lat.append((time.perf_counter() - t) * 1000)
    return {"chunks": n, "build_s": build, "memory_mb": mem, "p50_ms": float(np.percentile(lat, 50)),
            "p95_ms": float(np.percentile(lat, 95)), "department_share": share}


def main() -> None:
    import faiss

    from ragpt.config import load_settings
    from ragpt.retrieval.dense import DenseIndex

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="vectors in the index")
    ap.add_argument("--queries", type=int, default=200, help="queries per selectivity")
    ap.add_argument("--index", default="shared", help="index whose chunk embeddings seed the vectors")
    ap.add_argument("--qa-dir", type=Path, default=None, help="imported QA sets (default: cache_dir/shared-qa)")
    ap.add_argument("--no-hnsw", action="store_true", help="skip the HNSW comparison")
    ap.add_argument("--bm25-n", type=int, nargs="*", default=[100_000, 1_000_000], help="BM25 corpus sizes")
    ap.add_argument("--threads", type=int, default=1, help="FAISS threads for searching (building uses all)")
    ap.add_argument("--out", default="index_scale")
    args = ap.parse_args()
    settings = load_settings()
    rng = np.random.default_rng(0)
    base, texts = load_base(settings.index_dir, args.index)
    queries, query_note = load_queries(args.qa_dir or settings.cache_dir / "shared-qa", base, args.queries, rng)
    x, _ = synthesise(base, args.n, rng)
    depts = departments(args.n, rng)
    ids = np.arange(args.n, dtype=np.int64)
    plan = assignments(depts, len(queries))
    truth = exact_truth(x, depts, queries, plan)
    print(f"{args.n} vectors, {len(depts)} departments, {query_note}", flush=True)

    results: dict = {"n": args.n, "dim": int(x.shape[1]), "departments": len(depts), "queries": query_note,
                     "vectors": f"{len(base)} real chunk embeddings of index {args.index!r} + noise sigma {SIGMA}",
                     "threads_search": args.threads, "types": {}}
    kinds = ["flat", "ivf"] + ([] if args.no_hnsw else ["hnsw"])
    for kind in kinds:
        faiss.omp_set_num_threads(os.cpu_count() or 1)
        before = rss_mb()
        t = time.perf_counter()
        if kind == "hnsw":
            h = faiss.IndexHNSWFlat(x.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
            h.hnsw.efConstruction = 80
            h.add(x)
            structure = h
        else:
            dense = DenseIndex.build(kind, x.shape[1], ids, x)
            structure = dense.index
        build_s = time.perf_counter() - t
        mem = rss_mb() - before
        faiss.omp_set_num_threads(args.threads)
        print(f"{kind}: built in {build_s:.1f}s, +{mem:.0f} MB", flush=True)
        entry = {"build_s": build_s, "memory_mb": mem, "settings": {}}
        if kind == "hnsw":
            for ef in (64, 256):
                def search(q, allowed, ef=ef, h=structure):
                    p = faiss.SearchParametersHNSW(sel=allowed.selector, efSearch=ef)
                    _, ii = h.search(q, K, params=p)
                    return [int(i) for i in ii[0] if i >= 0]
                entry["settings"][f"efSearch {ef}"] = measure(search, args.n, depts, queries, plan, truth)
        else:
            if kind == "ivf":
                entry["nlist"] = int(structure.nlist)

            def search(q, allowed, dense=dense):
                return [i for i, _ in dense.search(q, K, allowed)]
            entry["settings"]["ragpt"] = measure(search, args.n, depts, queries, plan, truth)
        for name, per in entry["settings"].items():
            for b, r in per.items():
                print(f"  {kind:5s} {name:14s} {b:>5s}: p50 {r['p50_ms']:6.2f} ms  p95 {r['p95_ms']:6.2f} ms"
                      f"  recall@10 {r['recall_at_10']:.3f}", flush=True)
        results["types"][kind] = entry
        structure = dense = None  # freed before the next type is built
    del x
    questions = read_questions(args.qa_dir or settings.cache_dir / "shared-qa")[0][: args.queries]
    questions = questions or [t[:80] for t in texts[: args.queries]]
    results["bm25"] = []
    for n in args.bm25_n:
        r = bench_bm25(texts, n, questions, rng)
        print(f"bm25 {n}: build {r['build_s']:.1f}s, +{r['memory_mb']:.0f} MB, p50 {r['p50_ms']:.1f} ms", flush=True)
        results["bm25"].append(r)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / f"{args.out}.md").write_text(markdown(results))
    print(f"wrote {RESULTS / args.out}.{{json,md}}")


def markdown(r: dict) -> str:
    lines = [f"# Dense search at {r['n']:,} chunks, {r['departments']} departments", "",
             f"Vectors: {r['vectors']}, dim {r['dim']}. Queries: {r['queries']}. One query at a time, "
             f"{r['threads_search']} search thread(s). Target: p50 <= {TARGET_P50_MS:g} ms and recall@10 >= "
             f"{TARGET_RECALL} at every selectivity.", "",
             "| type | setting | build s | memory MB | selectivity | chunks/dept | p50 ms | p95 ms | recall@10 "
             "| selector ms | target |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for kind, e in r["types"].items():
        for name, per in e["settings"].items():
            for b, x in per.items():
                ok = x["p50_ms"] <= TARGET_P50_MS and x["recall_at_10"] >= TARGET_RECALL
                lines.append(f"| {kind} | {name} | {e['build_s']:.0f} | {e['memory_mb']:.0f} | {b} | "
                             f"{x['chunks_per_department']:,} | {x['p50_ms']:.2f} | {x['p95_ms']:.2f} | "
                             f"{x['recall_at_10']:.3f} | {x['selector_build_ms']:.2f} | {'met' if ok else 'missed'} |")
    lines += ["", "BM25 (bm25s, the whole index's statistics; scores masked to a department of the given share):", "",
              "| chunks | build s | memory MB | p50 ms/query | p95 ms/query |", "|---:|---:|---:|---:|---:|"]
    for b in r.get("bm25", []):
        lines.append(f"| {b['chunks']:,} | {b['build_s']:.0f} | {b['memory_mb']:.0f} | {b['p50_ms']:.1f} | "
                     f"{b['p95_ms']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
