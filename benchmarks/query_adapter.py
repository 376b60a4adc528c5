"""Query adapters: does a per-department linear map on question embeddings put the answer in the passages?

One adapter per department (doc2dial's four agencies, PolicyQA's `legal`, TAT-QA's `finance`),
trained by `ragpt.retrieval.query_adapter.train_query_adapter` on the department's TRAINING
questions only, against its chunks in the retrieval-levers index (the same questions, scopes and
span-hit rule as benchmarks/retrieval_levers.py; run that first, it imports the data and builds the
index). The searches are the product's own (`Retriever.search_many` with the adapted question
vectors), hybrid as served and dense alone as a reference.

Two kinds of new question, both never trained on nor used for choosing:

* unseen documents: the sets' dev and test splits, whose documents no training question is about
  (doc2dial, PolicyQA and TAT-QA split by document);
* seen documents: a seeded 20% of each department's training questions, held out by question
  before the adapter is trained (new questions about documents the training questions covered:
  a deployment whose users keep asking about the same documents).

Each configuration (learning rate; the held-out slice the trainer picks its epoch on, whole
documents or single questions) is reported on every set with paired bootstrap 95% intervals
against no adapter on the same questions. One configuration is chosen on DEV (macro mean of the
three sets' hybrid span hit@2); for it, `--f1` also answers doc2dial's seen-document and test
questions without a soft prompt, through the request path's parts (retrieve_many with the
adapters, build_inputs under the default input contract, generate_answers), and reports
token-F1 with and without the adapter.

    .venv/bin/python benchmarks/query_adapter.py [--work-dir DIR] [--chunking 200/40]
Results: benchmarks/results/query_adapter.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))
from history_retrieval import _ci  # noqa: E402
from retrieval_levers import AGENCIES, SETS, Question, _hit, _tatqa_spans, load_questions  # noqa: E402
from retrieval_quality import _source_of  # noqa: E402

RESULTS = Path(__file__).parent / "results"
DEPARTMENTS = {**{d: "doc2dial" for d in AGENCIES}, "legal": "policyqa", "finance": "tatqa"}
SPLITS = ("seen", "dev", "test")
SEEN_FRACTION = 0.2
# name -> (learning rate, held-out rule for choosing the epoch)
CONFIGS = {"lr 1e-4 / epoch on held-out documents": (1e-4, "document"),
           "lr 1e-3 / epoch on held-out documents": (1e-3, "document"),
           "lr 1e-4 / epoch on held-out questions": (1e-4, "question"),
           "lr 1e-3 / epoch on held-out questions": (1e-3, "question")}


def training_questions(work: Path, data_dir: Path) -> dict[str, list]:
    """Each department's training questions (TAT-QA: its span questions, whose answers are text)."""
    from ragpt.data.qa import load_qa

    out = {d: load_qa(work / "doc2dial" / "qa" / f"{d}.train.jsonl") for d in AGENCIES}
    out["legal"] = load_qa(work / "policyqa" / "qa" / "legal.train.jsonl")
    spans = _tatqa_spans(data_dir)
    out["finance"] = [q for q in load_qa(work / "tatqa" / "qa" / "finance.train.jsonl")
                      if spans.get(q.id, ("", []))[0] == "span"]
    return out


def hits(retriever, qs: list[Question], vectors, k: int, dense_only: bool) -> list[float]:
    found = retriever.search_many([q.question for q in qs], [q.department for q in qs], k, [q.filters for q in qs],
                                  query_vectors=vectors, **({"dense": True, "bm25": False} if dense_only else {}))
    return [_hit(q, [h.chunk.text for h in f]) for q, f in zip(qs, found)]


def main() -> None:
    import numpy as np
    import torch

    from ragpt.config import load_settings
    from ragpt.evaluation.metrics import bootstrap_ci, paired_difference_ci
    from ragpt.lm.models import load_embedder
    from ragpt.retrieval.index import DocumentIndex
    from ragpt.retrieval.query_adapter import AdapterConfig, QueryAdapter, split_by_question, train_query_adapter
    from ragpt.retrieval.search import Retriever

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work-dir", type=Path, default=None, help="default: <settings.cache_dir>/retrieval-levers")
    ap.add_argument("--chunking", default="200/40", help="which retrieval-levers index (its folder name with - for /)")
    ap.add_argument("--policyqa-test", type=int, default=1000)
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names of CONFIGS to run")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--departments", default=",".join(DEPARTMENTS))
    ap.add_argument("--f1", action="store_true", help="token-F1 without a prompt on doc2dial, dev-chosen config")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--out", default="query_adapter")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    settings = load_settings()
    work = Path(args.work_dir or Path(settings.cache_dir) / "retrieval-levers")
    data_dir = Path(settings.data_dir)
    depts = [d.strip() for d in args.departments.split(",") if d.strip()]
    sets = [s for s in SETS if any(DEPARTMENTS[d] == s for d in depts)]
    t0 = time.perf_counter()

    questions, _ = load_questions(work, data_dir, args.policyqa_test)
    train = training_questions(work, data_dir)
    fit: dict[str, list] = {}
    questions["seen"] = []
    for d in depts:  # the seen-document questions: out of the adapter's training data from the start
        fit[d], held = split_by_question(train[d], SEEN_FRACTION, seed=1)
        questions["seen"] += [Question(DEPARTMENTS[d], "seen", d, q.question, q.answers, q.doc_id) for q in held]
    index = DocumentIndex.open(work / "index" / args.chunking.replace("/", "-").replace(" ", "-"), "levers")
    emb = load_embedder(settings)
    retriever = Retriever(index, emb, dense=True, bm25=True, rrf_k=60)
    retriever.prepare()
    evalq = {sp: [q for q in questions[sp] if q.department in depts] for sp in SPLITS}
    for sp in SPLITS:
        for q in evalq[sp]:
            q.filters = {"source": _source_of(index, q.doc_id)} if q.set == "policyqa" else None
    qvec = {sp: np.asarray(emb.encode([q.question for q in evalq[sp]], batch_size=64), np.float32) for sp in SPLITS}
    print(f"{sum(len(v) for v in evalq.values())} dev/test questions, {time.perf_counter() - t0:.0f}s", flush=True)

    def score(adapters: dict[str, QueryAdapter] | None) -> dict:
        """split -> set or agency -> {"hybrid": [...], "dense": [...]}, per question."""
        out: dict = {}
        for sp in SPLITS:
            vec = qvec[sp].copy()
            if adapters:
                for d, ad in adapters.items():
                    rows = [i for i, q in enumerate(evalq[sp]) if q.department == d]
                    if rows:
                        vec[rows] = ad.apply(vec[rows])
            hy = hits(retriever, evalq[sp], vec, args.k, False)
            de = hits(retriever, evalq[sp], vec, args.k, True)
            cell = {}
            for key, sel in [(s, lambda q, s=s: q.set == s) for s in sets] + \
                            [(f"doc2dial:{d}", lambda q, d=d: q.department == d) for d in depts if d in AGENCIES]:
                idx = [i for i, q in enumerate(evalq[sp]) if sel(q)]
                cell[key] = {"hybrid": [hy[i] for i in idx], "dense": [de[i] for i in idx]}
            out[sp] = cell
        return out

    runs: dict[str, dict] = {"none": {"scores": score(None), "reports": {}}}
    for name in [c.strip() for c in args.configs.split(",") if c.strip()]:
        lr, holdout = CONFIGS[name]
        cfg = AdapterConfig(epochs=args.epochs, lr=lr, holdout=holdout)
        adapters, reports = {}, {}
        for d in depts:
            t = time.perf_counter()
            qs = fit[d]
            filters = None
            if DEPARTMENTS[d] == "policyqa":  # searched within its own policy, as at test
                filters = [{"source": _source_of(index, q.doc_id)} for q in qs]
            ad, rep = train_query_adapter(retriever, d, qs, config=cfg, k=args.k, filters=filters)
            adapters[d] = ad
            reports[d] = {**rep.__dict__, "seconds": round(time.perf_counter() - t, 1)}
            print(f"{name}: {d}: {rep.with_positive}/{rep.questions} with a positive, held-out "
                  f"hit@{args.k} {rep.hit_at_k_identity:.1f} -> {rep.hit_at_k:.1f} (epoch {rep.chosen_epoch}), "
                  f"{reports[d]['seconds']}s", flush=True)
        runs[name] = {"scores": score(adapters), "reports": reports, "lr": lr, "holdout": holdout,
                      "adapters": adapters}

    def dev_macro(name: str) -> float:
        return float(np.mean([np.mean(runs[name]["scores"]["dev"][s]["hybrid"]) for s in sets]))

    chosen = max([n for n in runs if n != "none"], key=dev_macro)
    f1 = answer_f1(settings, retriever, evalq, qvec, runs[chosen]["adapters"], args) if args.f1 else None

    base = runs["none"]["scores"]
    table = []
    for name, run in runs.items():
        row = {"setting": name, "dev_macro": round(100 * dev_macro(name), 2), "chosen_on_dev": name == chosen}
        for sp in SPLITS:
            for key, vals in run["scores"][sp].items():
                for ranker in ("hybrid", "dense"):
                    c = {"mean": bootstrap_ci(vals[ranker]).scaled(100).to_dict(), "n": len(vals[ranker])}
                    if name != "none":
                        c["diff"] = paired_difference_ci(vals[ranker], base[sp][key][ranker]).scaled(100).to_dict()
                    row[f"{sp}/{key}/{ranker}"] = c
        table.append(row)
    res = {"config": {"chunking": args.chunking, "k": args.k, "epochs": args.epochs, "embedder": emb.name,
                      "policyqa_test": args.policyqa_test, "departments": depts, "seen_fraction": SEEN_FRACTION,
                      "n": {sp: len(evalq[sp]) for sp in SPLITS}},
           "rows": table, "chosen_on_dev": chosen, "f1": f1,
           "reports": {n: r["reports"] for n, r in runs.items()},
           "seconds": round(time.perf_counter() - t0, 1)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(res, indent=2) + "\n")
    (RESULTS / f"{args.out}.md").write_text(markdown(res, sets, depts, " ".join(sys.argv[1:])))
    print((RESULTS / f"{args.out}.md").read_text())


SPLIT_TITLES = {"seen": "new questions about documents seen in training (20% of each department's training "
                         "questions, held out by question)",
                "test": "test: documents no training question is about", "dev": "dev: documents no training "
                                                                                "question is about"}


def answer_f1(settings, retriever, evalq, qvec, adapters, args) -> dict:
    """doc2dial token-F1 without a soft prompt, passages found with and without the adapters."""
    import numpy as np

    from ragpt.evaluation.metrics import best_over, paired_difference_ci, token_f1
    from ragpt.lm.generator import load_generator
    from ragpt.serving.contract import InputContract
    from ragpt.serving.request import ChatRequest, PreparedRequest, build_inputs, generate_answers, passages_from_hits

    gen = load_generator(settings)
    contract = InputContract.from_settings(settings)
    out: dict = {"contract": contract.to_dict(), "max_new_tokens": args.max_new_tokens}
    for sp in ("seen", "test"):
        idx = [i for i, q in enumerate(evalq[sp]) if q.set == "doc2dial"]
        qs = [evalq[sp][i] for i in idx]
        scores = {}
        for label, use in (("without", False), ("with", True)):
            vec = qvec[sp][idx].copy()
            if use:
                for j, q in enumerate(qs):
                    vec[j] = adapters[q.department].apply(vec[j][None])[0]
            found = retriever.search_many([q.question for q in qs], [q.department for q in qs], contract.k,
                                          query_vectors=vec)
            rows = []
            for q, hits in zip(qs, found):
                built = build_inputs(gen.tokenizer, contract, q.question, passages_from_hits(hits),
                                     department=q.department)
                rows.append(PreparedRequest(request=ChatRequest(q.question, q.department), department=q.department,
                                            prompt_version=None, soft_prompt=None, prefix_key=None, contract=contract,
                                            overrides={}, query=q.question, hits=hits, built=built,
                                            max_new_tokens=args.max_new_tokens, temperature=0.0))
            texts = []
            for b in range(0, len(rows), 8):
                texts += [a.text for a in generate_answers(gen, rows[b:b + 8])]
            scores[label] = [best_over(token_f1, t, q.answers) for t, q in zip(texts, qs)]
            print(f"f1 {sp} {label} adapter: {100 * np.mean(scores[label]):.1f} (n={len(qs)})", flush=True)
        out[sp] = {"n": len(qs), "without": round(100 * float(np.mean(scores["without"])), 2),
                   "with": round(100 * float(np.mean(scores["with"])), 2),
                   "diff": paired_difference_ci(scores["with"], scores["without"]).scaled(100).to_dict()}
    return out


def markdown(res: dict, sets: list[str], depts: list[str], argv: str) -> str:
    keys = sets + [f"doc2dial:{d}" for d in depts if d in AGENCIES]
    n = res["config"]["n"]
    lines = ["# Query adapters: span hit@2 with a per-department linear map on question embeddings", "",
             f"Index: the retrieval-levers index {res['config']['chunking']} (six departments); k "
             f"{res['config']['k']}; scopes and span-hit rule as in retrieval_levers.md. One adapter per department "
             "and configuration, trained on the department's training questions less the seen-document set. "
             "Cells: span hit@2 (difference to no adapter on the same questions, paired bootstrap 95%; "
             "* : excludes 0). **Bold**: the configuration chosen on dev (macro hybrid span hit@2). "
             "Questions: " + ", ".join(f"{sp} {n[sp]}" for sp in SPLITS) + ".", ""]
    for sp in SPLITS:
        for ranker in ("hybrid", "dense"):
            if ranker == "dense" and sp == "dev":
                continue
            lines += [f"## {SPLIT_TITLES[sp]}; {'hybrid, as served' if ranker == 'hybrid' else 'dense ranker alone'}",
                      "", "| setting | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
            for r in res["rows"]:
                b = "**" if r.get("chosen_on_dev") else ""
                cells = []
                for k in keys:
                    c = r.get(f"{sp}/{k}/{ranker}")
                    cells.append("-" if c is None else f"{c['mean']['mean']:.1f}"
                                 + (f" ({_ci(c['diff'], True)})" if "diff" in c else "") + f" n={c['n']}"
                                 if r["setting"] == "none" else "-" if c is None else f"{c['mean']['mean']:.1f}"
                                 + (f" ({_ci(c['diff'], True)})" if "diff" in c else ""))
                lines.append(f"| {b}{r['setting']}{b} | " + " | ".join(cells) + " |")
            lines.append("")
    if res.get("f1"):
        f = res["f1"]
        lines += [f"## doc2dial token-F1 without a soft prompt ({res['chosen_on_dev']}, the dev choice)", "",
                  "| questions | n | without adapter | with adapter | difference |", "|---|---|---|---|---|"]
        for sp in ("seen", "test"):
            lines.append(f"| {SPLIT_TITLES[sp]} | {f[sp]['n']} | {f[sp]['without']:.1f} | {f[sp]['with']:.1f} "
                         f"| {_ci(f[sp]['diff'], True)} |")
        lines.append("")
    lines += ["## Training (the trainer's own held-out slice, hybrid span hit@2)", "",
              "| setting | department | questions with a positive | train / held out | identity -> adapter "
              "| epoch kept | held-out hit per 5 epochs | seconds |", "|---" * 8 + "|"]
    for name, reps in res["reports"].items():
        for d, rep in reps.items():
            curve = " ".join(f"{c['holdout_hit']:.0f}" for c in rep["curve"])
            lines.append(f"| {name} | {d} | {rep['with_positive']}/{rep['questions']} | {rep['train']} / "
                         f"{rep['holdout']} | {rep['hit_at_k_identity']:.1f} -> {rep['hit_at_k']:.1f} | "
                         f"{rep['chosen_epoch']} | {curve} | {rep['seconds']} |")
    lines += ["", f"Run time {res['seconds']:.0f}s. Command: `.venv/bin/python benchmarks/query_adapter.py"
              + (f" {argv}" if argv else "") + "`"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
