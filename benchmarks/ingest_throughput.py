"""Ingest throughput: embedding chunks/s per precision and backend, side by side, at equal retrieval quality.

Real documents: doc2dial (dmv, ssa, studentaid, va) and PolicyQA (legal) from the shared data, through
the project's importers, read and chunked as `ragpt ingest` does (chunk_tokens/chunk_overlap settings).
Every variant embeds the SAME chunks in one run. The chunks are cut into rounds and each round runs every
variant in turn, so that load from other processes on a shared machine falls on all variants alike;
chunks/s is all chunks over all the variant's time, "best round" the least disturbed round.

Variants: today's fp32 at batch 64 (the embed_batch_size default) and 16; bf16 autocast over fp32 weights;
bf16 weights (embed_precision=bf16: AMX/AVX-512-BF16 matmuls through oneDNN) at batch 16/32/64 and with one
torch thread; int8 (torch dynamic quantization of the Linear layers); and, where installed (they are no
project dependencies: sentence-transformers' own onnx/openvino backends need optimum-onnx, which pins
transformers<4.58, or optimum-intel, which pulls another torch), ONNX Runtime fp32/int8 and OpenVINO bf16
on the same model exported with torch.onnx.

Quality, per variant, with documents and questions embedded by that variant (dense search only, so the
embedder is all that differs): hit@k = a chunk containing a gold answer span is in the top k, PolicyQA test
questions searched within their own policy, doc2dial first-turn dev+test questions within their agency.
Difference to fp32 per question, paired bootstrap 95% interval; "mixed": questions by the variant against
fp32 documents (an index built before the change, queried after it). Cosine agreement of every chunk and
question vector with fp32's.

End to end: `ingest()` itself at fp32/batch 64 (before) and at the default settings (after), and whether
chunking in a producer thread while the previous chunks embed (pipelined) beats chunk-then-embed.

    .venv/bin/python benchmarks/ingest_throughput.py [--data-dir ../shared/data] [--rounds 3] [--questions 300]
Results: benchmarks/results/ingest_throughput.{json,md}
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import queue
import random
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
RESULTS = Path(__file__).parent / "results"
BASELINE = "fp32-b64"
DOC2DIAL_AGENCIES = ("dmv", "ssa", "studentaid", "va")


def main() -> None:
    import numpy as np
    import torch

    from ragpt.config import load_settings
    from ragpt.data.datasets import import_doc2dial, import_policyqa
    from ragpt.data.documents import Chunker, collect_documents, read_document
    from ragpt.data.qa import load_qa
    from ragpt.lm.models import load_embedder

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=None, help="shared data folder (default: settings.data_dir)")
    ap.add_argument("--work-dir", type=Path, default=None,
                    help="imported data and exported models (default: <settings.cache_dir>/ingest-throughput; reused)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (default 3)")
    ap.add_argument("--max-chunks", type=int, default=0, help="time at most this many chunks (0: all)")
    ap.add_argument("--questions", type=int, default=300, help="PolicyQA test questions (random, seed 0)")
    ap.add_argument("--ks", default="1,2,5")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2, the machine's cores)")
    ap.add_argument("--variants", default="", help="comma-separated subset of the variants (default: all)")
    ap.add_argument("--skip-end-to-end", action="store_true", help="skip the ingest() and pipelining runs")
    args = ap.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    torch.set_num_threads(args.threads)
    settings = load_settings(**({"data_dir": args.data_dir} if args.data_dir else {}))
    work = Path(args.work_dir or Path(settings.cache_dir) / "ingest-throughput")
    t_start = time.perf_counter()

    # --- data: the shared sets through the importers, chunked as ingest chunks them
    import_doc2dial(Path(settings.data_dir), work / "doc2dial")
    import_policyqa(Path(settings.data_dir), work / "policyqa")
    fp32 = load_embedder(settings, precision="fp32")
    bf16 = load_embedder(settings, precision="bf16")
    chunker = Chunker(fp32.tokenizer, settings.chunk_tokens, settings.chunk_overlap)
    docs, chunks = [], []
    t = time.perf_counter()
    for corpus in ("doc2dial", "policyqa"):
        found = collect_documents([work / corpus / "docs"], work / corpus / "docs")
        for f in found.files:
            doc = read_document(f.path, source=f.source)
            docs.append(doc)
            chunks.extend(chunker.split(doc, [doc.source.split("/", 1)[0]]))
    read_chunk_s = time.perf_counter() - t
    texts = [c.text for c in chunks]
    print(f"{len(docs)} documents, {len(chunks)} chunks, read+chunked in {read_chunk_s:.1f}s", flush=True)

    questions = _questions(work, load_qa, args.questions)
    q_texts = [q.question for q, _ in questions]
    scopes = _scopes(chunks, questions)

    # --- variants: each a function texts -> normalised float32 vectors
    variants = _variants(fp32, bf16, work / "onnx", args.threads)
    if args.variants:
        wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = set(wanted) - set(variants)
        if unknown:
            sys.exit(f"unknown variants {sorted(unknown)}; known: {sorted(variants)}")
        variants = {k: v for k, v in variants.items() if k in wanted or k == BASELINE}
    unavailable = {k: v for k, v in variants.items() if isinstance(v[1], str)}
    runnable = {k: v for k, v in variants.items() if not isinstance(v[1], str)}
    for k, (_desc, why) in unavailable.items():
        print(f"{k}: skipped ({why})", flush=True)

    timed = texts[: args.max_chunks] if args.max_chunks else texts
    for _k, (_d, fn) in runnable.items():
        fn(timed[:32])  # warm-up: oneDNN primitive creation, ONNX/OpenVINO compilation
    seconds = {k: 0.0 for k in runnable}
    rounds: dict[str, list[float]] = {k: [] for k in runnable}
    timed_vecs: dict[str, list] = {k: [] for k in runnable}
    parts = np.array_split(np.arange(len(timed)), args.rounds)
    load_before = os.getloadavg()
    for part in parts:
        batch = [timed[i] for i in part]
        for k, (_d, fn) in runnable.items():
            t = time.perf_counter()
            timed_vecs[k].append(fn(batch))
            dt = time.perf_counter() - t
            seconds[k] += dt
            rounds[k].append(len(batch) / dt)
        print("round:", {k: round(r[-1], 1) for k, r in rounds.items()}, flush=True)
    load_after = os.getloadavg()

    # --- quality: all chunks (those timed are not embedded again) and the questions, per variant
    rest = texts[len(timed):]
    vectors = {k: (np.concatenate(timed_vecs[k] + ([fn(rest)] if rest else [])), fn(q_texts))
               for k, (_d, fn) in runnable.items()}
    ref_docs, ref_q = vectors[BASELINE]
    ref_hits = _hits(ref_docs, ref_q, chunks, questions, scopes, ks)
    base_rate = len(timed) / seconds[BASELINE]
    table = {}
    for k, (desc, _fn) in runnable.items():
        dv, qv = vectors[k]
        hits = _hits(dv, qv, chunks, questions, scopes, ks)
        mixed = _hits(ref_docs, qv, chunks, questions, scopes, ks)
        cos_d, cos_q = (dv * ref_docs).sum(1), (qv * ref_q).sum(1)
        table[k] = {
            "what": desc,
            "chunks_per_second": round(len(timed) / seconds[k], 1),
            "best_round": round(max(rounds[k]), 1),
            "speedup": round(len(timed) / seconds[k] / base_rate, 2),
            "cosine_vs_fp32": {"chunks_min": round(float(cos_d.min()), 6),
                               "chunks_p01": round(float(np.quantile(cos_d, 0.01)), 6),
                               "chunks_mean": round(float(cos_d.mean()), 6),
                               "questions_min": round(float(cos_q.min()), 6)},
            "quality": _compare(hits, ref_hits, questions, ks),
            "mixed_quality": _compare(mixed, ref_hits, questions, ks),
        }
        print(k, json.dumps({x: table[k][x] for x in ("chunks_per_second", "speedup", "cosine_vs_fp32")}),
              flush=True)

    results: dict = {
        "config": {"documents": len(docs), "chunks": len(chunks), "timed_chunks": len(timed),
                   "rounds": args.rounds, "threads": args.threads, "chunk_tokens": settings.chunk_tokens,
                   "chunk_overlap": settings.chunk_overlap, "embedder": fp32.name,
                   "questions": {"policyqa": sum(1 for _q, s in questions if s == "policyqa"),
                                 "doc2dial": sum(1 for _q, s in questions if s == "doc2dial")},
                   "ks": ks, "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                   "cpus": os.cpu_count(), "python": platform.python_version(),
                   "optional_packages": _optional_versions(),
                   "load_average_before_after": [round(load_before[0], 2), round(load_after[0], 2)]},
        "read_and_chunk_seconds": round(read_chunk_s, 2),
        "variants": table,
        "unavailable": {k: why for k, (_d, why) in unavailable.items()},
    }
    if not args.skip_end_to_end:
        results["end_to_end"] = _end_to_end(work, settings, fp32, load_embedder(settings), docs)
    results["seconds"] = round(time.perf_counter() - t_start, 1)
    _write(results, ks)


# --------------------------------------------------------------------------- variants


def _variants(fp32, bf16, onnx_dir: Path, threads: int) -> dict[str, tuple[str, Callable | str]]:
    """name -> (description, encode function, or the reason it cannot run here)."""
    import numpy as np
    import torch

    def st_encode(emb, bs: int, autocast: bool = False, n_threads: int | None = None):
        def f(texts):
            before = torch.get_num_threads()
            if n_threads:
                torch.set_num_threads(n_threads)
            try:
                if autocast:
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        return _normalise(emb.encode(texts, batch_size=bs))
                return emb.encode(texts, batch_size=bs)
            finally:
                torch.set_num_threads(before)
        return f

    out: dict[str, tuple[str, Callable | str]] = {
        BASELINE: ("today: fp32, batch 64", st_encode(fp32, 64)),
        "fp32-b16": ("fp32, batch 16", st_encode(fp32, 16)),
        "autocast-bf16-b32": ("fp32 weights under torch.autocast(bf16), batch 32", st_encode(fp32, 32, True)),
        "bf16-b16": ("bf16 weights (embed_precision=bf16), batch 16", st_encode(bf16, 16)),
        "bf16-b32": ("bf16 weights (embed_precision=bf16), batch 32", st_encode(bf16, 32)),
        "bf16-b64": ("bf16 weights (embed_precision=bf16), batch 64", st_encode(bf16, 64)),
        "bf16-b32-1thread": ("bf16 weights, batch 32, one torch thread", st_encode(bf16, 32, n_threads=1)),
    }
    from ragpt.lm.models import Embedder

    q = Embedder(name=fp32.name, model=copy.deepcopy(fp32.model), dim=fp32.dim, max_tokens=fp32.max_tokens)
    q.model[0].model = torch.ao.quantization.quantize_dynamic(q.model[0].model, {torch.nn.Linear},
                                                              dtype=torch.qint8)
    out["int8-dynamic-b32"] = ("torch dynamic int8 quantization of the Linear layers, batch 32", st_encode(q, 32))

    tok = fp32.tokenizer

    def manual(run, bs: int = 32):
        """Tokenise longest-first in batches as sentence-transformers does, mean-pool, normalise."""
        def f(texts):
            order = np.argsort([-len(s) for s in texts], kind="stable")
            vecs = np.zeros((len(texts), fp32.dim), np.float32)
            for i in range(0, len(texts), bs):
                idx = order[i:i + bs]
                b = tok([texts[j] for j in idx], padding=True, truncation=True, max_length=fp32.max_tokens,
                        return_tensors="np")
                feeds = {n: b[n].astype(np.int64) for n in ("input_ids", "attention_mask", "token_type_ids")}
                h = np.asarray(run(feeds), dtype=np.float32)
                m = feeds["attention_mask"][..., None].astype(np.float32)
                vecs[idx] = (h * m).sum(1) / m.sum(1)
            return _normalise(vecs)
        return f

    try:
        import onnxruntime as ort
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        why = "onnxruntime not installed (pip install onnxruntime onnx)"
        out["onnxruntime-fp32-b32"] = ("ONNX Runtime fp32", why)
        out["onnxruntime-int8-b32"] = ("ONNX Runtime dynamic int8", why)
    else:
        path = _export_onnx(fp32, onnx_dir)
        qpath = onnx_dir / "model.int8.onnx"
        if not qpath.is_file():
            quantize_dynamic(str(path), str(qpath), weight_type=QuantType.QInt8)
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        for name, p, desc in (("onnxruntime-fp32-b32", path, "ONNX Runtime fp32, batch 32"),
                              ("onnxruntime-int8-b32", qpath, "ONNX Runtime dynamic int8, batch 32")):
            sess = ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
            out[name] = (desc, manual(lambda feeds, s=sess: s.run(None, feeds)[0]))
    try:
        import openvino as ov
    except ImportError:
        out["openvino-bf16-b32"] = ("OpenVINO bf16", "openvino not installed (pip install openvino onnx)")
    else:
        compiled = ov.Core().compile_model(str(_export_onnx(fp32, onnx_dir)), "CPU",
                                           {"INFERENCE_PRECISION_HINT": "bf16", "INFERENCE_NUM_THREADS": threads})
        request = compiled.create_infer_request()
        out["openvino-bf16-b32"] = ("OpenVINO, bf16 inference precision, batch 32",
                                    manual(lambda feeds: request.infer(feeds)[0]))
    return out


def _export_onnx(emb, onnx_dir: Path) -> Path:
    import torch

    path = onnx_dir / "model.onnx"
    if path.is_file():
        return path
    onnx_dir.mkdir(parents=True, exist_ok=True)
    bert = emb.model[0].model.eval()

    class Hidden(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.m(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state

    names = ["input_ids", "attention_mask", "token_type_ids"]
    ex = emb.tokenizer(["an example", "another example sentence"], padding=True, return_tensors="pt")
    tmp = onnx_dir / "model.onnx.tmp"
    torch.onnx.export(Hidden(bert), tuple(ex[n] for n in names), str(tmp), dynamo=False, input_names=names,
                      output_names=["hidden"], opset_version=17,
                      dynamic_axes={n: {0: "batch", 1: "seq"} for n in [*names, "hidden"]})
    os.replace(tmp, path)
    return path


def _optional_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("onnxruntime", "openvino"):
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    return out


def _normalise(v):
    import numpy as np

    v = np.ascontiguousarray(v, dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


# --------------------------------------------------------------------------- quality


def _questions(work: Path, load_qa, n_policyqa: int) -> list:
    """(QAExample, set name): PolicyQA test (random sample), doc2dial first-turn dev + test."""
    pq = load_qa(work / "policyqa" / "qa" / "legal.test.jsonl")
    random.Random(0).shuffle(pq)
    out = [(q, "policyqa") for q in pq[:n_policyqa]]
    for agency in DOC2DIAL_AGENCIES:
        for split in ("dev", "test"):
            out += [(q, "doc2dial") for q in load_qa(work / "doc2dial" / "qa" / f"{agency}.{split}.jsonl")]
    return out


def _scopes(chunks, questions):
    """Per question, the chunk rows it is searched among: its own policy (PolicyQA), its agency (doc2dial)."""
    import numpy as np

    by_source: dict[str, list[int]] = {}
    by_dept: dict[str, list[int]] = {}
    for i, c in enumerate(chunks):
        by_source.setdefault(c.source, []).append(i)
        by_dept.setdefault(c.source.split("/", 1)[0], []).append(i)
    out = []
    for q, name in questions:
        rows = by_source.get(q.doc_id) if name == "policyqa" else by_dept.get(q.doc_id.split("/", 1)[0])
        if not rows:
            raise KeyError(f"no chunks for {q.doc_id}")
        out.append(np.asarray(rows))
    return out


def _hits(doc_vecs, q_vecs, chunks, questions, scopes, ks) -> dict[int, list[int]]:
    """k -> per question 1 if a chunk containing a gold answer is in the dense top k of its scope."""
    import numpy as np

    from ragpt.evaluation.metrics import answer_in_text

    out: dict[int, list[int]] = {k: [] for k in ks}
    for (q, _name), qv, rows in zip(questions, q_vecs, scopes):
        order = rows[np.argsort(-(doc_vecs[rows] @ qv), kind="stable")][: max(ks)]
        found = [answer_in_text(q.answers, chunks[i].text) for i in order]
        for k in ks:
            out[k].append(int(any(found[:k])))
    return out


def _compare(hits, ref, questions, ks) -> dict:
    """hit@k in % per set and pooled, and the paired difference to fp32 with its bootstrap interval."""
    from ragpt.evaluation.metrics import paired_difference_ci

    out = {}
    for name in ("policyqa", "doc2dial", "pooled"):
        sel = [i for i, (_q, s) in enumerate(questions) if name == "pooled" or s == name]
        block = {}
        for k in ks:
            a, b = [hits[k][i] for i in sel], [ref[k][i] for i in sel]
            ci = paired_difference_ci(a, b).scaled(100)
            block[f"hit@{k}"] = round(100 * sum(a) / len(a), 1)
            block[f"diff@{k}"] = [round(ci.mean, 1), round(ci.low, 1), round(ci.high, 1)]
            block[f"changed@{k}"] = sum(x != y for x, y in zip(a, b))
        out[name] = {"n": len(sel), **block}
    return out


# --------------------------------------------------------------------------- end to end


def _end_to_end(work: Path, settings, fp32, default_emb, docs) -> dict:
    """ingest() before (fp32, batch 64) and after (the default settings); sequential vs pipelined chunking."""
    import torch

    from ragpt.data.documents import Chunker
    from ragpt.data.ingest import ingest

    out: dict = {}
    for label, emb, bs in (("before: fp32, batch 64", fp32, 64),
                           (f"after: embed_precision={settings.embed_precision} ({default_emb.precision}), "
                            f"batch {settings.embed_batch_size}", default_emb, settings.embed_batch_size)):
        tmp = Path(tempfile.mkdtemp(prefix="ragpt-ingest-throughput-"))
        n = embed_s = total_s = 0.0
        for corpus, depts in (("doc2dial", DOC2DIAL_AGENCIES), ("policyqa", ("legal",))):
            for d in depts:
                rep = ingest(tmp, "bench", [work / corpus / "docs" / d], [d], emb, source_root=work / corpus / "docs",
                             chunk_tokens=settings.chunk_tokens, chunk_overlap=settings.chunk_overlap,
                             batch_size=bs, progress=False)
                n, embed_s, total_s = n + rep.chunks_embedded, embed_s + rep.embed_seconds, total_s + rep.seconds
        out[label] = {"chunks": int(n), "embed_chunks_per_second": round(n / embed_s, 1),
                      "ingest_seconds": round(total_s, 1), "ingest_chunks_per_second": round(n / total_s, 1)}
        print("ingest", label, out[label], flush=True)

    # Chunk-then-embed (what ingest does) vs a producer thread chunking while the previous chunks embed.
    # The producer gets its own tokenizer: a Rust tokenizer must not be used by two threads at once.
    emb, bs = default_emb, settings.embed_batch_size

    def sequential() -> int:
        ch = Chunker(emb.tokenizer, settings.chunk_tokens, settings.chunk_overlap)
        cs = [c for d in docs for c in ch.split(d, ["x"])]
        emb.encode([c.text for c in cs], batch_size=bs)
        return len(cs)

    def pipelined(group: int = 256) -> int:
        ch = Chunker(copy.deepcopy(emb.tokenizer), settings.chunk_tokens, settings.chunk_overlap)
        q: queue.Queue = queue.Queue(maxsize=8)
        threading.Thread(target=lambda: [q.put(ch.split(d, ["x"])) for d in docs] + [q.put(None)],
                         daemon=True).start()
        pending: list = []
        n = 0
        while True:
            got = q.get()
            if got is not None:
                pending.extend(got)
            if pending and (got is None or len(pending) >= group):
                emb.encode([c.text for c in pending], batch_size=bs)
                n, pending = n + len(pending), []
            if got is None:
                return n

    times: dict[str, list[float]] = {"sequential": [], "pipelined": []}
    for _ in range(2):
        for name, fn in (("sequential", sequential), ("pipelined", pipelined)):
            t = time.perf_counter()
            n = fn()
            times[name].append(time.perf_counter() - t)
    out["chunk_and_embed"] = {name: {"chunks": n, "seconds": [round(s, 2) for s in ts],
                                     "chunks_per_second": round(n / min(ts), 1)} for name, ts in times.items()}
    out["chunk_and_embed"]["threads"] = torch.get_num_threads()
    print("chunk and embed", out["chunk_and_embed"], flush=True)
    return out


# --------------------------------------------------------------------------- output


def _write(results: dict, ks: list[int]) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ingest_throughput.json").write_text(json.dumps(results, indent=2) + "\n")
    cfg = results["config"]
    lines = [
        "# Ingest throughput: embedding chunks/s per precision and backend, at equal retrieval quality", "",
        f"{cfg['timed_chunks']} chunks of {cfg['documents']} real documents (doc2dial + PolicyQA, "
        f"{cfg['chunk_tokens']}/{cfg['chunk_overlap']}-token chunks), every variant on the same chunks in "
        f"{cfg['rounds']} interleaved rounds; {cfg['threads']} torch threads on {cfg['cpus']} CPUs "
        f"({cfg['cpu_capability']}), torch {cfg['torch']}; load average {cfg['load_average_before_after'][0]} "
        f"before, {cfg['load_average_before_after'][1]} after (a shared machine: rates vary, the ratios less). "
        f"Reading and chunking all documents: {results['read_and_chunk_seconds']} s.", "",
        "| variant | what | chunks/s | best round | vs today | cosine to fp32 (chunks min / p01, questions min) |",
        "|---|---|---|---|---|---|",
    ]
    for k, v in results["variants"].items():
        c = v["cosine_vs_fp32"]
        lines.append(f"| {k} | {v['what']} | {v['chunks_per_second']} | {v['best_round']} | {v['speedup']}x | "
                     f"{c['chunks_min']:.5f} / {c['chunks_p01']:.5f}, {c['questions_min']:.5f} |")
    for k, why in results["unavailable"].items():
        lines.append(f"| {k} | not run: {why} | | | | |")
    qn = cfg["questions"]
    lines += ["", f"## Retrieval quality (dense; PolicyQA {qn['policyqa']} test questions within their policy, "
              f"doc2dial {qn['doc2dial']} first-turn dev+test questions within their agency)", "",
              "hit@k: a chunk containing a gold answer span is in the top k. Difference to fp32 on the same "
              "questions, paired bootstrap 95% interval; changed = questions whose hit differs. Mixed: the "
              "variant's questions against fp32 documents.", "",
              "| variant | " + " | ".join(f"pooled hit@{k} (diff [95% CI], changed)" for k in ks)
              + " | mixed pooled " + " / ".join(f"hit@{k}" for k in ks) + " |",
              "|---" * (len(ks) + 2) + "|"]
    for k, v in results["variants"].items():
        p, m = v["quality"]["pooled"], v["mixed_quality"]["pooled"]
        cells = [f"{p[f'hit@{x}']} ({p[f'diff@{x}'][0]:+.1f} [{p[f'diff@{x}'][1]:+.1f}, {p[f'diff@{x}'][2]:+.1f}], "
                 f"{p[f'changed@{x}']})" for x in ks]
        lines.append(f"| {k} | " + " | ".join(cells) + " | " + " / ".join(str(m[f"hit@{x}"]) for x in ks) + " |")
    lines += ["", "Per set (PolicyQA / doc2dial) hit@k: " + "; ".join(
        f"{k} " + ", ".join(f"@{x} {v['quality']['policyqa'][f'hit@{x}']}/{v['quality']['doc2dial'][f'hit@{x}']}"
                            for x in ks) for k, v in results["variants"].items())]
    if "end_to_end" in results:
        e2e = results["end_to_end"]
        lines += ["", "## End to end: `ingest()` of the same documents into a new index", "",
                  "| run | chunks | embedding chunks/s | ingest seconds | ingest chunks/s |", "|---|---|---|---|---|"]
        for label, r in e2e.items():
            if label != "chunk_and_embed":
                lines.append(f"| {label} | {r['chunks']} | {r['embed_chunks_per_second']} | {r['ingest_seconds']} | "
                             f"{r['ingest_chunks_per_second']} |")
        ce = e2e["chunk_and_embed"]
        lines += ["", f"Chunking while embedding ({ce['threads']} torch threads, best of 2): chunk-then-embed "
                  f"{ce['sequential']['chunks_per_second']} chunks/s {ce['sequential']['seconds']} s, pipelined "
                  f"(producer thread) {ce['pipelined']['chunks_per_second']} chunks/s {ce['pipelined']['seconds']} s."]
    extra = ", ".join(f"{k} {v}" for k, v in cfg["optional_packages"].items())
    lines += ["", f"Total {results['seconds']} s. Optional packages present: {extra or 'none'}. "
              "Command: `.venv/bin/python benchmarks/ingest_throughput.py "
              + " ".join(sys.argv[1:]) + "`"]
    (RESULTS / "ingest_throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
