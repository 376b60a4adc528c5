"""History retrieval: which conversation turns should a follow-up question retrieve with?

doc2dial (shared data, all turns in every split) through the project's importer; the four agencies
(dmv, ssa, studentaid, va) ingested one department each; every NON-first-turn dev and test question
searched, in its agency, with the query `ragpt.serving.conversation.retrieval_query` builds under each
rule, by the hybrid retriever (dense + BM25, RRF k=60) at k=2 (the chunks the model sees):

* span hit@2: a gold answer text occurs (normalised) in one of the 2 chunks
* doc hit@2:  the gold document is the source of one of the 2 chunks

The rule is chosen on dev (pooled span hit@2, doc hit@2 to break ties); test reports it. Each rule is
compared with `last` (the question alone) by a paired bootstrap interval on the same questions.

    .venv/bin/python benchmarks/history_retrieval.py [--rules last,user:2,...] [--work-dir DIR] [--data-dir DIR]
Results: benchmarks/results/history_retrieval.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
RESULTS = Path(__file__).parent / "results"
AGENCIES = ("dmv", "ssa", "studentaid", "va")
SPLITS = ("dev", "test")
RULES = "last,user:2,user:3,user:4,user:10,turns:2,turns:3,turns:4,turns:6,turns:10"
METRICS = ("span", "doc")
METRIC_NAMES = {"span": "span hit@2", "doc": "doc hit@2"}


def main() -> None:
    import numpy as np
    import torch

    from ragpt.config import load_settings
    from ragpt.data.datasets import import_doc2dial
    from ragpt.data.documents import source_matches
    from ragpt.data.ingest import ingest
    from ragpt.data.qa import load_qa
    from ragpt.evaluation.metrics import answer_in_text, bootstrap_ci, paired_difference_ci
    from ragpt.lm.models import load_embedder
    from ragpt.lm.template import Turn
    from ragpt.retrieval.index import DocumentIndex
    from ragpt.retrieval.search import Retriever
    from ragpt.serving.conversation import check_query_rule, retrieval_query

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rules", default=RULES, help=f"comma-separated query rules, 'last' first (default {RULES})")
    ap.add_argument("--k", type=int, default=2, help="chunks retrieved per question (default 2, what the model sees)")
    ap.add_argument("--data-dir", type=Path, default=None, help="shared data folder (default: settings.data_dir)")
    ap.add_argument("--work-dir", type=Path, default=None,
                    help="imported data and index (default: <settings.cache_dir>/history-retrieval; reused)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rules = [check_query_rule(r.strip()) for r in args.rules.split(",") if r.strip()]
    if rules[0] != "last":
        rules = ["last", *[r for r in rules if r != "last"]]
    settings = load_settings(**({"data_dir": args.data_dir} if args.data_dir else {}))
    work = Path(args.work_dir or Path(settings.cache_dir) / "history-retrieval")
    t_start = time.perf_counter()

    # --- data and index
    summary = import_doc2dial(Path(settings.data_dir), work / "doc2dial", first_turn_eval=False)
    emb = load_embedder(settings)
    t = time.perf_counter()
    ingested = {}
    for d in AGENCIES:
        rep = ingest(work / "index", "doc2dial", [work / "doc2dial" / "docs" / d], [d], emb,
                     source_root=work / "doc2dial" / "docs",
                     chunk_tokens=settings.chunk_tokens, chunk_overlap=settings.chunk_overlap,
                     batch_size=settings.embed_batch_size, progress=False)
        ingested[d] = {"added": len(rep.added), "unchanged": len(rep.unchanged), "chunks": rep.chunks_embedded}
    ingest_s = time.perf_counter() - t
    index = DocumentIndex.open(work / "index", "doc2dial")
    retriever = Retriever(index, emb, dense=True, bm25=True, rrf_k=60)
    print(f"index: {len(index.chunks)} chunks, ingest {ingest_s:.0f}s "
          f"({sum(v['added'] for v in ingested.values())} documents added)", flush=True)

    questions = {s: {d: [q for q in load_qa(work / "doc2dial" / "qa" / f"{d}.{s}.jsonl") if q.history]
                     for d in AGENCIES} for s in SPLITS}

    # --- score: hits[split][agency][rule][metric] = 0/1 per question
    cache: dict[str, object] = {}  # query text -> vector: rules often build the same text
    hits: dict = {s: {d: {} for d in AGENCIES} for s in SPLITS}
    query_chars: dict[str, list[int]] = {r: [] for r in rules}
    t = time.perf_counter()
    for s in SPLITS:
        for d in AGENCIES:
            qs = questions[s][d]
            for rule in rules:
                queries = [retrieval_query(q.question, [Turn(**h) for h in q.history], rule) for q in qs]
                query_chars[rule] += [len(x) for x in queries]
                new = sorted({x for x in queries if x not in cache})
                if new:
                    cache.update(zip(new, emb.encode(new, batch_size=64)))
                found = retriever.search_many(queries, [d] * len(qs), k=args.k,
                                              query_vectors=np.stack([cache[x] for x in queries]))
                hits[s][d][rule] = {
                    "span": [float(any(answer_in_text(q.answers, h.chunk.text) for h in f)) for q, f in zip(qs, found)],
                    "doc": [float(any(source_matches(h.chunk.source, q.doc_id) for h in f)) for q, f in zip(qs, found)],
                }
        print(f"{s}: scored {sum(len(v) for v in questions[s].values())} questions x {len(rules)} rules", flush=True)
    search_s = time.perf_counter() - t

    # --- per agency and pooled: rate with interval, paired difference to `last`
    table: dict = {}
    for s in SPLITS:
        table[s] = {}
        for d in (*AGENCIES, "pooled"):
            table[s][d] = {}
            for rule in rules:
                cell: dict = {}
                for m in METRICS:
                    a = _values(hits[s], d, rule, m)
                    b = _values(hits[s], d, "last", m)
                    cell[m] = bootstrap_ci(a).scaled(100).to_dict()
                    if rule != "last":
                        cell[f"{m} - last"] = paired_difference_ci(a, b).scaled(100).to_dict()
                cell["n"] = len(_values(hits[s], d, rule, "span"))
                table[s][d][rule] = cell
    dev = table["dev"]["pooled"]
    chosen = max(rules, key=lambda r: (round(dev[r]["span"]["mean"], 6), round(dev[r]["doc"]["mean"], 6),
                                       -rules.index(r)))
    for s in SPLITS:  # is the chosen rule better than the other concatenations, or only than `last`?
        for rule in rules:
            if rule != chosen:
                table[s]["pooled"][rule]["span - chosen"] = paired_difference_ci(
                    _values(hits[s], "pooled", rule, "span"), _values(hits[s], "pooled", chosen, "span")
                ).scaled(100).to_dict()

    results = {
        "config": {"rules": rules, "k": args.k, "retriever": "hybrid dense+BM25, RRF k=60", "embedder": emb.name,
                   "chunk_tokens": settings.chunk_tokens, "chunk_overlap": settings.chunk_overlap,
                   "questions": "doc2dial non-first-turn (history non-empty), searched in their agency",
                   "choice": "best dev pooled span hit@2 (then doc hit@2)"},
        "split": summary["split"],
        "n": {s: {d: len(questions[s][d]) for d in AGENCIES} for s in SPLITS},
        "index": {"chunks": len(index.chunks), "ingest": ingested, "ingest_seconds": round(ingest_s, 1)},
        "query_chars_mean": {r: round(sum(v) / len(v), 1) for r, v in query_chars.items()},
        "chosen_on_dev": chosen,
        "results": table,
        "seconds": {"search": round(search_s, 1), "total": round(time.perf_counter() - t_start, 1)},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "history_retrieval.json").write_text(json.dumps(results, indent=2) + "\n")
    md = markdown(results, " ".join(sys.argv[1:]))
    (RESULTS / "history_retrieval.md").write_text(md)
    print(f"chosen on dev: {chosen}; {results['seconds']['total']:.0f}s; "
          f"results in {RESULTS / 'history_retrieval.md'}")


def _values(by_agency: dict, agency: str, rule: str, metric: str) -> list[float]:
    names = AGENCIES if agency == "pooled" else (agency,)
    return [v for d in names for v in by_agency[d][rule][metric]]


def _ci(i: dict, signed: bool = False) -> str:
    f = "+.1f" if signed else ".1f"
    star = "*" if signed and (i["low"] > 0 or i["high"] < 0) else ""
    return f"{i['mean']:{f}} [{i['low']:{f}}, {i['high']:{f}}]{star}"


def markdown(res: dict, argv: str) -> str:
    rules, table = res["config"]["rules"], res["results"]
    lines = ["# History retrieval: the query a follow-up question retrieves with", "",
             f"doc2dial non-first-turn questions, each searched in its own agency by the hybrid retriever "
             f"(dense {res['config']['embedder']} + BM25, RRF k=60), k={res['config']['k']}. "
             "Span hit: a gold answer text in the chunks; doc hit: the gold document among their sources. "
             "% with bootstrap 95% intervals; `- last`: paired difference to the question alone on the same "
             "questions (* : its interval excludes 0). Rule chosen on dev pooled span hit@2: "
             f"**{res['chosen_on_dev']}**.", ""]
    summary = ["## Summary (pooled over the four agencies)", "",
               "| rule | mean query chars | dev span hit@2 | dev - last | test span hit@2 | test - last "
               f"| test - {res['chosen_on_dev']} | test doc hit@2 | test - last |", "|---" * 9 + "|"]
    for r in rules:
        dv, te = table["dev"]["pooled"][r], table["test"]["pooled"][r]
        summary.append(f"| {r} | {res['query_chars_mean'][r]:.0f} | {_ci(dv['span'])} | "
                       f"{_ci(dv['span - last'], True) if r != 'last' else '-'} | {_ci(te['span'])} | "
                       f"{_ci(te['span - last'], True) if r != 'last' else '-'} | "
                       f"{_ci(te['span - chosen'], True) if 'span - chosen' in te else '-'} | {_ci(te['doc'])} | "
                       f"{_ci(te['doc - last'], True) if r != 'last' else '-'} |")
    lines += summary + [""]
    for m in METRICS:
        lines += [f"## {METRIC_NAMES[m]} by agency (test, with dev for choosing; n per cell in the header)", "",
                  "| rule | " + " | ".join(f"{d} test (n={table['test'][d]['last']['n']})"
                                           for d in (*AGENCIES, "pooled"))
                  + f" | pooled dev (n={table['dev']['pooled']['last']['n']}) |", "|---" * 7 + "|"]
        for r in rules:
            cells = []
            for d in (*AGENCIES, "pooled"):
                c = table["test"][d][r]
                cells.append(f"{c[m]['mean']:.1f}" + (f" ({c[f'{m} - last']['mean']:+.1f}"
                                                       f"{_star(c[f'{m} - last'])})" if r != "last" else ""))
            c = table["dev"]["pooled"][r]
            cells.append(f"{c[m]['mean']:.1f}" + (f" ({c[f'{m} - last']['mean']:+.1f}{_star(c[f'{m} - last'])})"
                                                   if r != "last" else ""))
            lines.append(f"| {r} | " + " | ".join(cells) + " |")
        lines += ["", "(in brackets: paired difference to `last`; * : its 95% interval excludes 0)", ""]
    lines += ["## Dev by agency (span hit@2 / doc hit@2)", "",
              "| rule | " + " | ".join(f"{d} (n={table['dev'][d]['last']['n']})" for d in AGENCIES) + " |",
              "|---" * 5 + "|"]
    for r in rules:
        lines.append(f"| {r} | " + " | ".join(f"{table['dev'][d][r]['span']['mean']:.1f} / "
                                             f"{table['dev'][d][r]['doc']['mean']:.1f}" for d in AGENCIES) + " |")
    lines += ["", f"Split: {res['split']}. Index: {res['index']['chunks']} chunks. "
              f"Run time {res['seconds']['total']:.0f}s (search {res['seconds']['search']:.0f}s).", "",
              "Command: `.venv/bin/python benchmarks/history_retrieval.py" + (f" {argv}" if argv else "") + "`"]
    return "\n".join(lines) + "\n"


def _star(i: dict) -> str:
    return "*" if i["low"] > 0 or i["high"] < 0 else ""


if __name__ == "__main__":
    main()
