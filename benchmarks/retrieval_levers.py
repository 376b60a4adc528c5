"""Retrieval levers: what puts a gold answer span into the chunks the model sees?

Three QA sets through the project's importers, ingested with ragpt's own ingest into one index per
chunking (all six departments in one index, as a shared deployment holds them):

* doc2dial first turns (dmv, ssa, studentaid, va), each question searched in its agency;
* PolicyQA (`legal`), each question searched within its own policy (a `source` filter inside the
  search, as benchmarks/retrieval_quality.py does); test capped at --policyqa-test questions;
* TAT-QA span / multi-span questions (`finance`), searched in the whole department (555 contexts).

Metrics per question: span hit@k (a gold answer occurs, normalised, in one of the first k passages;
for a TAT-QA multi-span question every span must occur in one of them), doc hit@2 (the gold
document is the source of one of the first 2 passages; not reported for PolicyQA, whose search is
already within the gold document), and the embedder tokens of the passages at k=2.

Levers, each a family of settings, the setting chosen on DEV only (macro mean of the three sets'
span hit@2; for the equal-budget family, of span hit at the budget's k), test reported for every
setting with a paired bootstrap 95% interval against today (200/40 chunks, k=2, index-wide BM25,
RRF k=60, 20 candidates per ranker, equal weights):

* chunking: chunk tokens / overlap (100/20, 150/30, 250/50; 300 exceeds MiniLM's 256-token
  window and ingest refuses it) and a sentence-packing splitter (overlap across paragraphs);
* equal budget: smaller chunks at a larger k within about 400 embedder tokens (k=4 x 100, ...);
* sentence window: 100-token chunks retrieved, the model given the hit plus its neighbouring
  chunk(s) of the same document;
* BM25 statistics per department instead of index-wide;
* fusion: RRF constant, dense vs BM25 weight, candidate depth per ranker (dense / BM25 alone as
  references).

The fusion is recomputed here from each question's dense and BM25 candidate lists (one search per
chunking, every fusion setting from the same lists); for today's setting it is checked against
`Retriever.search_many` on a sample of questions, so the benchmark measures what ragpt serves.

    .venv/bin/python benchmarks/retrieval_levers.py [--work-dir DIR] [--policyqa-test 1000]
Results: benchmarks/results/retrieval_levers.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))
from history_retrieval import _ci  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)
from retrieval_quality import _source_of  # noqa: E402

RESULTS = Path(__file__).parent / "results"
AGENCIES = ("dmv", "ssa", "studentaid", "va")
SETS = ("doc2dial", "policyqa", "tatqa")
SPLITS = ("dev", "test")
# chunking name -> (chunk_tokens, chunk_overlap, splitter); "today" is the default of ragpt.config.
CHUNKINGS = {"200/40": (200, 40, "recursive"), "100/20": (100, 20, "recursive"), "150/30": (150, 30, "recursive"),
             "250/50": (250, 50, "recursive"), "200/0": (200, 0, "recursive"), "200/80": (200, 80, "recursive"),
             "200/40 sentences": (200, 40, "sentences")}
TODAY = "200/40"
BUDGET = 400  # embedder tokens of context in the equal-budget family: today's k=2 x 200
N_CAND = 100  # candidates kept per ranker and question: the deepest fusion setting measured
KS = (1, 2, 5)


# ---------------------------------------------------------------------------------------- data


@dataclass
class Question:
    set: str
    split: str
    department: str
    question: str
    answers: list[str]  # alternatives (one must occur)
    doc_id: str
    all_spans: bool = False  # TAT-QA multi-span: every one of `answers` must occur
    filters: dict | None = None


def load_questions(work: Path, data_dir: Path, policyqa_test: int) -> tuple[dict[str, list[Question]], dict]:
    from ragpt.data.datasets import import_doc2dial, import_policyqa, import_tatqa
    from ragpt.data.qa import load_qa

    splits = {"doc2dial": import_doc2dial(data_dir, work / "doc2dial")["split"],
              "policyqa": import_policyqa(data_dir, work / "policyqa")["split"],
              "tatqa": import_tatqa(data_dir, work / "tatqa")["split"]}
    out: dict[str, list[Question]] = {s: [] for s in SPLITS}
    for s in SPLITS:
        for d in AGENCIES:
            out[s] += [Question("doc2dial", s, d, q.question, q.answers, q.doc_id)
                       for q in load_qa(work / "doc2dial" / "qa" / f"{d}.{s}.jsonl")]
        pq = load_qa(work / "policyqa" / "qa" / f"legal.{s}.jsonl")
        if s == "test":  # the same seeded sample as retrieval_quality.py's --limit
            random.Random(0).shuffle(pq)
            pq = pq[:policyqa_test]
        out[s] += [Question("policyqa", s, "legal", q.question, q.answers, q.doc_id) for q in pq]
        spans = _tatqa_spans(data_dir)
        for q in load_qa(work / "tatqa" / "qa" / f"finance.{s}.jsonl"):
            kind, parts = spans[q.id]
            out[s].append(Question("tatqa", s, "finance", q.question, parts if kind == "multi-span" else q.answers,
                                   q.doc_id, all_spans=kind == "multi-span"))
    return out, splits


def _tatqa_spans(data_dir: Path) -> dict[str, tuple[str, list[str]]]:
    """The importer joins a multi-span answer into one string (for token-F1); span hit needs the
    separate spans, read again from the raw files."""
    from ragpt.data.datasets import TATQA_FILES

    spans = {}
    for name, _ in TATQA_FILES:
        for ctx in json.loads((data_dir / "tatqa" / name).read_text()):
            for q in ctx["questions"]:
                ans = q["answer"] if isinstance(q["answer"], list) else [q["answer"]]
                spans[q["uid"]] = (q.get("answer_type"), [str(a).strip() for a in ans if str(a).strip()])
    return spans


def build_index(work: Path, name: str, emb, settings) -> tuple[object, dict]:
    from ragpt.data.ingest import ingest
    from ragpt.retrieval.index import DocumentIndex

    tokens, overlap, splitter = CHUNKINGS[name]
    root = work / "index" / name.replace("/", "-").replace(" ", "-")
    folders = [(work / "doc2dial" / "docs" / d, d, work / "doc2dial" / "docs") for d in AGENCIES]
    folders += [(work / "policyqa" / "docs" / "legal", "legal", work / "policyqa" / "docs"),
                (work / "tatqa" / "docs" / "finance", "finance", work / "tatqa" / "docs")]
    t, embedded = time.perf_counter(), 0
    for folder, dept, source_root in folders:
        rep = ingest(root, "levers", [folder], [dept], emb, source_root=source_root, chunk_tokens=tokens,
                     chunk_overlap=overlap, chunk_splitter=splitter, batch_size=settings.embed_batch_size,
                     progress=False)
        embedded += rep.chunks_embedded
    index = DocumentIndex.open(root, "levers")
    return index, {"chunks": len(index.chunks), "embedded_now": embedded, "seconds": round(time.perf_counter() - t, 1)}


# ------------------------------------------------------------------------------ candidate lists


class DepartmentBm25:
    """BM25 statistics (IDF, average length) from each department's own chunks, built lazily: the
    per-department lever. Same tokenizer and text (title + chunk) as ragpt's index-wide _Bm25."""

    def __init__(self, index):
        self.index = index
        self.by_dept: dict[str, tuple[object, object]] = {}

    def scores(self, department: str, query: str, allowed):
        import bm25s
        import numpy as np

        from ragpt.retrieval.search import _bm25_tokenize

        if department not in self.by_dept:
            ids = self.index.allowed_ids(department)
            r = bm25s.BM25()
            r.index(_bm25_tokenize([f"{self.index.chunks[i].title}\n{self.index.chunks[i].text}" for i in ids]),
                    show_progress=False)
            self.by_dept[department] = (ids, r)
        ids, r = self.by_dept[department]
        tokens = _bm25_tokenize([query])[0]
        full = np.zeros(len(ids), dtype=np.float32) if not tokens else np.asarray(r.get_scores(tokens), np.float32)
        return full[np.searchsorted(ids, allowed)]


@dataclass
class Candidates:
    dense: list[tuple[int, float]]  # best first, N_CAND deep, within the allowed ids
    bm25: list[tuple[int, float]]  # index-wide statistics (today), score > 0 only
    bm25_dept: list[tuple[int, float]]  # the department's own statistics


def candidates(index, retriever, dept_bm25: DepartmentBm25, q: Question, qvec) -> Candidates:
    import numpy as np

    from ragpt.retrieval.search import top_indices

    allowed_set = index.allowed(q.department, q.filters)
    allowed = allowed_set.ids
    n = int(min(len(allowed), N_CAND))
    dense = index.dense.search(qvec[None], n, allowed_set)
    bm = retriever._bm25_index()
    pos = np.searchsorted(bm.ids, allowed)
    lists = []
    for sub in (bm.scores(q.question)[pos], dept_bm25.scores(q.department, q.question, allowed)):
        lists.append([(int(allowed[j]), float(sub[j])) for j in top_indices(sub, n) if sub[j] > 0])
    return Candidates(dense, lists[0], lists[1])


@dataclass(frozen=True)
class Fusion:
    rrf_k: int = 60
    depth: int | None = None  # candidates per ranker; None: today's max(4k, 20)
    dense_weight: float = 0.5  # RRF weights dense w, BM25 1-w (today equal)
    bm25_scope: str = "index"  # index | department
    rankers: str = "hybrid"  # hybrid | dense | bm25


def fuse(c: Candidates, f: Fusion, k: int) -> list[int]:
    """Ranked chunk ids, as ragpt.retrieval.search.Retriever._search_one ranks them."""
    depth = f.depth or max(4 * k, 20)
    dense = c.dense[:depth]
    bm25 = (c.bm25 if f.bm25_scope == "index" else c.bm25_dept)[:depth]
    if f.rankers == "dense":
        return [i for i, _ in dense][:k]
    if f.rankers == "bm25":
        return [i for i, _ in bm25][:k]
    fused: dict[int, float] = {}
    for hits, w in ((dense, 2 * f.dense_weight), (bm25, 2 * (1 - f.dense_weight))):
        for r, (cid, _) in enumerate(hits, start=1):
            fused[cid] = fused.get(cid, 0.0) + w / (f.rrf_k + r)
    return [cid for cid, _ in sorted(fused.items(), key=lambda kv: (-kv[1], kv[0]))][:k]


# ------------------------------------------------------------------------------ what the model sees


class Passages:
    """Chunk ids -> the texts the model is given: the chunks themselves, or each hit widened to its
    neighbouring chunks of the same document (the sentence-window lever; overlapping windows of one
    document are merged into one passage)."""

    def __init__(self, index):
        self.index = index
        self.by_doc: dict[str, dict[int, object]] = {}
        for c in index.chunks.values():
            self.by_doc.setdefault(c.doc or c.source, {})[c.chunk] = c
        self.doc_text: dict[str, str] = {}

    def _text(self, doc: str) -> str:
        """The document's text rebuilt from its chunks at their offsets (the gaps between chunks are
        the whitespace the splitter stripped)."""
        if doc not in self.doc_text:
            chunks = self.by_doc[doc]
            buf = [" "] * max(c.end for c in chunks.values())
            for c in chunks.values():
                buf[c.start:c.end] = c.text
            self.doc_text[doc] = "".join(buf)
        return self.doc_text[doc]

    def texts(self, ids: list[int], before: int = 0, after: int = 0) -> list[str]:
        if not (before or after):
            return [self.index.chunks[i].text for i in ids]
        spans: list[list] = []  # [doc, start, end] in rank order
        for i in ids:
            c = self.index.chunks[i]
            doc = c.doc or c.source
            nb = self.by_doc[doc]
            lo, hi = nb[max(0, c.chunk - before)], nb[min(max(nb), c.chunk + after)]
            for s in spans:
                if s[0] == doc and lo.start <= s[2] and hi.end >= s[1]:
                    s[1], s[2] = min(s[1], lo.start), max(s[2], hi.end)
                    break
            else:
                spans.append([doc, lo.start, hi.end])
        return [self._text(d)[a:b] for d, a, b in spans]


@dataclass(frozen=True)
class Setting:
    family: str
    name: str
    chunking: str = TODAY
    fusion: Fusion = field(default_factory=Fusion)
    window: tuple[int, int] = (0, 0)  # neighbouring chunks before / after each hit
    k: int = 2  # the k whose span hit this family is chosen by (equal budget: the budget's k)


def settings_list() -> list[Setting]:
    s = [Setting("today", "today: 200/40, k=2, index-wide BM25, RRF 60, depth 20")]
    for name in CHUNKINGS:
        if name != TODAY:
            s.append(Setting("chunking", f"chunks {name}, k=2", chunking=name))
    for name, k in (("100/20", 4), ("150/30", 3), ("200/40 sentences", 2)):
        s.append(Setting("equal budget", f"chunks {name}, k={k}", chunking=name, k=k))
    for name, window in (("100/20", (1, 1)), ("100/20", (0, 1)), ("150/30", (1, 1)), ("150/30", (0, 1))):
        s.append(Setting("sentence window", f"chunks {name}, k=2, hit {_window_name(window)}", chunking=name,
                         window=window))
    s.append(Setting("bm25 statistics", "per-department BM25 statistics", fusion=Fusion(bm25_scope="department")))
    for rk in (5, 10, 30, 100, 200):
        s.append(Setting("fusion", f"RRF k={rk}", fusion=Fusion(rrf_k=rk)))
    for w in (0.3, 0.4, 0.6, 0.7):
        s.append(Setting("fusion", f"dense weight {w}", fusion=Fusion(dense_weight=w)))
    for depth in (10, 50, 100):
        s.append(Setting("fusion", f"depth {depth}", fusion=Fusion(depth=depth)))
    for rankers in ("dense", "bm25"):
        s.append(Setting("fusion", f"{rankers} only", fusion=Fusion(rankers=rankers)))
    return s


def _window_name(window: tuple[int, int]) -> str:
    return {(1, 1): "+/- 1 neighbour", (0, 1): "+ next chunk"}.get(window, f"-{window[0]}/+{window[1]}")


# ------------------------------------------------------------------------------ scoring


_NORMALISED: dict[str, str] = {}


def _hit(q: Question, texts: list[str]) -> float:
    """ragpt.evaluation.metrics.answer_in_text, with each passage normalised once (passages recur
    across settings); multi-span: every span in one of the passages."""
    from ragpt.data.qa import normalize_answer

    norms = []
    for t in texts:
        if t not in _NORMALISED:
            _NORMALISED[t] = normalize_answer(t)
        norms.append(_NORMALISED[t])
    answers = [a for a in (normalize_answer(a) for a in q.answers) if a]
    if q.all_spans:
        return float(bool(answers) and all(any(a in n for n in norms) for a in answers))
    return float(any(a in n for a in answers for n in norms))


def score(setting: Setting, qs: list[Question], cands: list[Candidates], index, passages: Passages,
          count_tokens: Callable[[list[str]], int]) -> dict[str, list[float]]:
    from ragpt.data.documents import source_matches

    ks = sorted({*KS, setting.k})
    out: dict[str, list[float]] = {f"span@{k}": [] for k in ks}
    out.update({"doc@2": [], "tokens@2": [], f"tokens@{setting.k}": []})
    for q, c in zip(qs, cands):
        for k in ks:
            ids = fuse(c, setting.fusion, k)  # depth follows k, as in the product
            texts = passages.texts(ids, *setting.window)
            out[f"span@{k}"].append(_hit(q, texts))
            if k == 2:
                out["doc@2"].append(float(any(source_matches(index.chunks[i].source, q.doc_id) for i in ids)))
            if k in (2, setting.k):
                out[f"tokens@{k}"].append(float(count_tokens(texts)))
    return out


def score_all(st: Setting, all_qs: list[Question], built: tuple, count_tokens) -> dict[str, dict[str, list[float]]]:
    """split/set (and split/doc2dial:agency, span hit@2 only) -> metric -> one value per question."""
    index, passages, cands = built
    out: dict[str, dict[str, list[float]]] = {}
    for split in SPLITS:
        for s in SETS:
            idx = [i for i, q in enumerate(all_qs) if q.split == split and q.set == s]
            out[f"{split}/{s}"] = score(st, [all_qs[i] for i in idx], [cands[i] for i in idx], index, passages,
                                        count_tokens)
        idx = [i for i, q in enumerate(all_qs) if q.split == split and q.set == "doc2dial"]
        for d in AGENCIES:  # per agency, span hit@2 only (the 39-74% spread)
            out[f"{split}/doc2dial:{d}"] = {"span@2": [v for i, v in zip(idx, out[f"{split}/doc2dial"]["span@2"])
                                                       if all_qs[i].department == d]}
    return out


def macro_paired_ci(a: dict[str, list[float]], b: dict[str, list[float]], n_resamples: int = 1000, seed: int = 0):
    """Mean over the sets of each set's mean(a - b), with a bootstrap resampling questions within each
    set (paired: a and b on the same questions)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    diffs = [np.asarray(a[s]) - np.asarray(b[s]) for s in a]
    point = float(np.mean([d.mean() for d in diffs]))
    boots = np.mean([[d[rng.integers(0, len(d), len(d))].mean() for _ in range(n_resamples)] for d in diffs], axis=0)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return {"mean": 100 * point, "low": 100 * float(lo), "high": 100 * float(hi)}


# ------------------------------------------------------------------------------ main


def main() -> None:
    import numpy as np
    import torch

    from ragpt.config import load_settings
    from ragpt.evaluation.metrics import bootstrap_ci, paired_difference_ci
    from ragpt.lm.models import load_embedder
    from ragpt.retrieval.search import Retriever

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=None, help="shared data folder (default: settings.data_dir)")
    ap.add_argument("--work-dir", type=Path, default=None,
                    help="imported data and indexes (default: <settings.cache_dir>/retrieval-levers; reused)")
    ap.add_argument("--policyqa-test", type=int, default=1000, help="PolicyQA test questions (seeded sample)")
    ap.add_argument("--check", type=int, default=300, help="questions whose today-fusion is checked against "
                                                           "Retriever.search_many")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--chunkings", default=",".join(CHUNKINGS),
                    help="comma-separated chunkings to run (a smoke run; settings on others are left out)")
    ap.add_argument("--max-questions", type=int, default=0, help="per split and set (0: all; a smoke run)")
    args = ap.parse_args()
    run_chunkings = [c.strip() for c in args.chunkings.split(",") if c.strip()]
    torch.set_num_threads(args.threads)
    settings = load_settings(**({"data_dir": args.data_dir} if args.data_dir else {}))
    work = Path(args.work_dir or Path(settings.cache_dir) / "retrieval-levers")
    t_start = time.perf_counter()

    questions, split_notes = load_questions(work, Path(settings.data_dir), args.policyqa_test)
    emb = load_embedder(settings)
    if args.max_questions:
        questions = {sp: [q for s in SETS for q in [x for x in qs if x.set == s][: args.max_questions]]
                     for sp, qs in questions.items()}
    all_qs = questions["dev"] + questions["test"]
    qvecs = emb.encode([q.question for q in all_qs], batch_size=64)
    print(f"{len(all_qs)} questions embedded, {time.perf_counter() - t_start:.0f}s", flush=True)
    tok = emb.tokenizer

    n_tokens: dict[str, int] = {}

    def count_tokens(texts: list[str]) -> int:
        new = [t for t in dict.fromkeys(texts) if t not in n_tokens]
        if new:
            n_tokens.update(zip(new, (len(ids) for ids in tok(new, add_special_tokens=False)["input_ids"])))
        return sum(n_tokens[t] for t in texts)

    setts = [st for st in settings_list() if st.chunking in run_chunkings]
    per_q: dict[str, dict[str, dict[str, list[float]]]] = {}  # setting -> split/set -> metric -> values
    indexes: dict[str, dict] = {}
    built: dict[str, tuple] = {}  # chunking -> (index, passages, candidates per question)
    timings: dict[str, float] = {}
    for name in run_chunkings:
        index, info = build_index(work, name, emb, settings)
        indexes[name] = info
        print(f"index {name}: {info}", flush=True)
        retriever = Retriever(index, emb, dense=True, bm25=True, rrf_k=60)
        retriever.prepare()
        dept_bm25 = DepartmentBm25(index)
        for q in all_qs:
            q.filters = {"source": _source_of(index, q.doc_id)} if q.set == "policyqa" else None
        t = time.perf_counter()
        cands = [candidates(index, retriever, dept_bm25, q, v) for q, v in zip(all_qs, qvecs)]
        timings[f"candidates {name}"] = round(time.perf_counter() - t, 1)
        if name == TODAY:  # the fusion here is the product's: same top-5 on a sample of questions
            sample = random.Random(0).sample(range(len(all_qs)), min(args.check, len(all_qs)))
            found = retriever.search_many([all_qs[i].question for i in sample], [all_qs[i].department for i in sample],
                                          k=5, filters=[all_qs[i].filters for i in sample],
                                          query_vectors=qvecs[sample])
            mismatch = [i for i, f in zip(sample, found) if [h.chunk.id for h in f] != fuse(cands[i], Fusion(), 5)]
            if mismatch:
                raise SystemExit(f"fusion differs from Retriever.search_many on {len(mismatch)} of {len(sample)}")
            print(f"fusion check: {len(sample)} questions, top-5 identical to Retriever.search_many", flush=True)
        built[name] = (index, Passages(index), cands)
        for st in setts:
            if st.chunking == name:
                per_q[st.name] = score_all(st, all_qs, built[name], count_tokens)
        print(f"scored {sum(st.chunking == name for st in setts)} settings on {name}, "
              f"{time.perf_counter() - t_start:.0f}s", flush=True)

    # --- choose on dev (today is a candidate of every family: "no change" can win), report on test
    today = setts[0].name

    def dev_macro(st: Setting) -> float:
        return round(float(np.mean([np.mean(per_q[st.name][f"dev/{s}"][f"span@{st.k}"]) for s in SETS])), 6)

    chosen: dict[str, str] = {}
    for fam in dict.fromkeys(st.family for st in setts if st.family != "today"):
        group = [setts[0]] + [st for st in setts if st.family == fam]
        chosen[fam] = max(group, key=lambda st: (dev_macro(st), -group.index(st))).name
    # the dev choices together: chunking (or window) and BM25 statistics and fusion, each where it won
    by_name = {st.name: st for st in setts}
    chunk_pick = max((by_name[chosen[f]] for f in ("chunking", "sentence window") if f in chosen),
                     key=dev_macro, default=setts[0])
    if dev_macro(chunk_pick) <= dev_macro(setts[0]):
        chunk_pick = setts[0]
    fusion = Fusion(**{**by_name[chosen.get("fusion", today)].fusion.__dict__,
                       "bm25_scope": by_name[chosen.get("bm25 statistics", today)].fusion.bm25_scope})
    combined = Setting("combined", f"dev choices together: {chunk_pick.chunking} chunks"
                       + (f", hit {_window_name(chunk_pick.window)}" if chunk_pick.window != (0, 0) else "")
                       + f", {fusion.bm25_scope} BM25, RRF {fusion.rrf_k}, dense weight {fusion.dense_weight}, "
                       f"depth {fusion.depth or 20}", chunking=chunk_pick.chunking, fusion=fusion,
                       window=chunk_pick.window)
    if combined.chunking in built:
        setts.append(combined)
        per_q[combined.name] = score_all(combined, all_qs, built[combined.chunking], count_tokens)

    rows = []
    for st in setts:
        row: dict = {"family": st.family, "setting": st.name, "k": st.k, "chunking": st.chunking,
                     "fusion": st.fusion.__dict__, "window": list(st.window),
                     "chosen_on_dev": chosen.get(st.family) == st.name}
        for split in SPLITS:
            cell: dict = {}
            for s in SETS:
                m = per_q[st.name][f"{split}/{s}"]
                base = per_q[today][f"{split}/{s}"]
                c = {"n": len(m["span@2"])}
                for key in [f"span@{k}" for k in sorted({*KS, st.k})] + ["doc@2"]:
                    if key == "doc@2" and s == "policyqa":
                        continue
                    c[key] = bootstrap_ci(m[key]).scaled(100).to_dict()
                    if st.name != today and key in base:
                        c[f"{key} - today"] = paired_difference_ci(m[key], base[key]).scaled(100).to_dict()
                if st.k != 2:  # equal budget: against today's span hit@2 (today's budget)
                    c[f"span@{st.k} - today@2"] = paired_difference_ci(m[f"span@{st.k}"],
                                                                       base["span@2"]).scaled(100).to_dict()
                c["tokens@k"] = round(float(np.mean(m[f"tokens@{st.k}"])), 1)
                cell[s] = c
            sel = f"span@{st.k}"
            cell["macro"] = {sel: round(100 * float(np.mean([np.mean(per_q[st.name][f"{split}/{s}"][sel])
                                                             for s in SETS])), 2)}
            if st.name != today:
                cell["macro"][f"{sel} - today@2"] = macro_paired_ci(
                    {s: per_q[st.name][f"{split}/{s}"][sel] for s in SETS},
                    {s: per_q[today][f"{split}/{s}"]["span@2"] for s in SETS})
            cell["agencies span@2"] = {d: round(100 * float(np.mean(per_q[st.name][f"{split}/doc2dial:{d}"]["span@2"])),
                                                1) for d in AGENCIES}
            row[split] = cell
        rows.append(row)

    results = {
        "config": {"today": {"chunk_tokens": 200, "chunk_overlap": 40, "k": 2, "rrf_k": 60, "bm25": "index-wide",
                             "depth": "max(4k, 20)"},
                   "embedder": emb.name, "embed_precision": getattr(emb, "precision", "fp32"),
                   "budget_tokens": BUDGET, "policyqa_test": args.policyqa_test,
                   "scope": {"doc2dial": "first-turn questions, searched in their agency",
                             "policyqa": "searched within the question's own policy (source filter)",
                             "tatqa": "span and multi-span questions, searched in the whole finance department"},
                   "choice": "per family, the best dev macro mean over the three sets of span hit@k "
                             "(k=2; the budget's k for the equal-budget family)"},
        "split": split_notes,
        "n": {split: {s: sum(1 for q in questions[split] if q.set == s) for s in SETS} for split in SPLITS},
        "indexes": indexes,
        "chosen_on_dev": chosen,
        "rows": rows,
        "seconds": {**timings, "total": round(time.perf_counter() - t_start, 1)},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "retrieval_levers.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "retrieval_levers.md").write_text(markdown(results, " ".join(sys.argv[1:])))
    print(f"chosen on dev: {chosen}; {results['seconds']['total']:.0f}s; results in {RESULTS / 'retrieval_levers.md'}")


def _d(c: dict, key: str) -> str:
    return _ci(c[key], True) if key in c else "-"


def markdown(res: dict, argv: str) -> str:
    n = res["n"]
    lines = [
        "# Retrieval levers: span hit@2 on doc2dial, PolicyQA and TAT-QA", "",
        "Span hit@k: a gold answer occurs (normalised) in one of the first k passages the model is given "
        "(TAT-QA multi-span: every span). " + "; ".join(f"{s}: {v}" for s, v in res["config"]["scope"].items())
        + ". n dev / test: " + ", ".join(f"{s} {n['dev'][s]} / {n['test'][s]}" for s in SETS)
        + f" (PolicyQA test: a seeded sample of {res['config']['policyqa_test']}). "
        "Each family's setting is chosen on dev (macro mean over the three sets of span hit@2, or of span hit "
        "at the family's k for the equal-budget family) and marked **bold**; test is never used for choosing. "
        "Differences are paired against today (200/40-token chunks, k=2, index-wide BM25, RRF k=60, 20 candidates "
        "per ranker) on the same questions, bootstrap 95% intervals (* : the interval excludes 0); the macro "
        "interval resamples questions within each set.", ""]
    lines += ["## Summary (span hit at the family's k; difference to today's span hit@2)", "",
              "| family | setting | k | tokens@k (d2d/pqa/tat) | dev macro | dev - today | test doc2dial "
              "| test policyqa | test tatqa | test macro | test - today (macro) |", "|---" * 11 + "|"]
    for r in res["rows"]:
        k = r["k"]
        sel = f"span@{k}"
        dif = f"span@{k} - today@2" if k != 2 else "span@2 - today"
        te, dv = r["test"], r["dev"]
        bold = "**" if r["chosen_on_dev"] else ""

        def cell(c: dict, sel=sel, dif=dif) -> str:
            return f"{c[sel]['mean']:.1f}" + (f" ({_d(c, dif)})" if dif in c else "")

        lines.append(
            f"| {r['family']} | {bold}{r['setting']}{bold} | {k} | "
            + "/".join(f"{te[s]['tokens@k']:.0f}" for s in SETS)
            + f" | {dv['macro'][sel]:.1f} | {_d(dv['macro'], f'{sel} - today@2')} | "
            + " | ".join(cell(te[s]) for s in SETS)
            + f" | {te['macro'][sel]:.1f} | {_d(te['macro'], f'{sel} - today@2')} |")
    lines += ["", "## Every metric at k=1/2/5 (test; dev span hit@2 in the last column)", ""]
    for s in SETS:
        lines += [f"### {s} (test n={n['test'][s]}, dev n={n['dev'][s]})", "",
                  "| setting | span hit@1 | span hit@2 | span@2 - today | span hit@5 | doc hit@2 | dev span hit@2 "
                  "| dev - today |", "|---" * 8 + "|"]
        for r in res["rows"]:
            c, dv = r["test"][s], r["dev"][s]
            lines.append(f"| {r['setting']} | {c['span@1']['mean']:.1f} | {_ci(c['span@2'])} | "
                         f"{_d(c, 'span@2 - today')} | {c['span@5']['mean']:.1f} | "
                         + (f"{c['doc@2']['mean']:.1f}" if "doc@2" in c else "-")
                         + f" | {dv['span@2']['mean']:.1f} | {_d(dv, 'span@2 - today')} |")
        lines.append("")
    lines += ["## doc2dial span hit@2 by agency (test / dev)", "",
              "| setting | " + " | ".join(AGENCIES) + " |", "|---" * (len(AGENCIES) + 1) + "|"]
    for r in res["rows"]:
        lines.append(f"| {r['setting']} | " + " | ".join(
            f"{r['test']['agencies span@2'][d]:.1f} / {r['dev']['agencies span@2'][d]:.1f}" for d in AGENCIES) + " |")
    idx = "; ".join(f"{k}: {v['chunks']} chunks" for k, v in res["indexes"].items())
    lines += ["", f"Indexes (one per chunking, six departments): {idx}. Chosen on dev: "
              + "; ".join(f"{f}: {s}" for f, s in res["chosen_on_dev"].items())
              + f". Run time {res['seconds']['total']:.0f}s.", "",
              "Command: `.venv/bin/python benchmarks/retrieval_levers.py" + (f" {argv}" if argv else "") + "`"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
