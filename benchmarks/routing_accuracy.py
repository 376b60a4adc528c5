"""Routing (`model: "auto"`): accuracy, and what the absolute confidence threshold refuses.

* sample corpus: the 60 sample questions, routed among hr / it / finance (index built here);
* doc2dial: the first-turn test questions, routed among the four agencies of the demo's "shared"
  index (skipped with a note when that index or the QA files are absent);
* off-topic: 30 questions no department covers (capital of France, recipes, sports...), routed
  against both indexes; every one of them should be refused.

For each set: accuracy, the refusal rate at the service's default `min_confidence` (0.5), and a
threshold table; the old relative confidence (`share`) is shown too, for comparison.

    .venv/bin/python benchmarks/routing_accuracy.py [--index-dir indexes] [--qa-dir DOC2DIAL_QA_DIR]
Results: benchmarks/results/routing_accuracy.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
RESULTS = Path(__file__).parent / "results"
DEFAULT_THRESHOLD = 0.5
THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
AGENCIES = ("dmv", "ssa", "studentaid", "va")

OFF_TOPIC = [
    "What is the capital of France?",
    "How do I bake sourdough bread at home?",
    "Who won the 2018 FIFA World Cup?",
    "What is the boiling point of water at sea level?",
    "Can you recommend a good science fiction novel?",
    "How many legs does a spider have?",
    "What's a good recipe for chocolate chip cookies?",
    "Who painted the Mona Lisa?",
    "How tall is Mount Everest?",
    "What is the speed of light in a vacuum?",
    "How do I make a classic Italian carbonara?",
    "Who holds the record for the most Olympic gold medals?",
    "What is the plot of Romeo and Juliet?",
    "How far is the Moon from the Earth?",
    "What is the best way to train a puppy to sit?",
    "Which planet is the largest in the solar system?",
    "How many players are on a basketball team on the court?",
    "What year did the Berlin Wall fall?",
    "How do I grow tomatoes on a balcony?",
    "What is the chemical formula of table salt?",
    "Who wrote the symphony known as Beethoven's Fifth?",
    "What are the rules of chess castling?",
    "How long should I boil an egg for a soft yolk?",
    "What is the tallest animal in the world?",
    "Which team won the last Super Bowl?",
    "How do volcanoes form?",
    "What language is spoken in Brazil?",
    "Tell me a joke about penguins.",
    "What is the difference between a crocodile and an alligator?",
    "How do I tune a guitar to standard tuning?",
]


def _measure(router, pairs, allowed=None):
    """Per question: gold (None for off-topic), routed department, confidence, share, similarity."""
    out = []
    qs = [q for q, _ in pairs]
    for i in range(0, len(qs), 64):
        for (_, gold), d in zip(pairs[i:i + 64], router.route_many(qs[i:i + 64], allowed)):
            out.append({"gold": gold, "department": d.department, "confidence": d.confidence,
                        "share": d.share, "similarity": d.similarity})
    return out


def _summary(rows, on_topic: bool) -> dict:
    n = len(rows)
    s = {"n": n,
         "refused_at_default": round(sum(r["confidence"] < DEFAULT_THRESHOLD for r in rows) / n, 4),
         "refused_at_default_old_share": round(sum(r["share"] < DEFAULT_THRESHOLD for r in rows) / n, 4),
         "similarity": {"min": round(min(r["similarity"] for r in rows), 4),
                        "max": round(max(r["similarity"] for r in rows), 4)},
         "mean_confidence": round(sum(r["confidence"] for r in rows) / n, 4),
         "mean_share": round(sum(r["share"] for r in rows) / n, 4)}
    if on_topic:
        s["accuracy"] = round(sum(r["department"] == r["gold"] for r in rows) / n, 4)
    table = {}
    for t in THRESHOLDS:
        kept = [r for r in rows if r["confidence"] >= t]
        row = {"refused": round(1 - len(kept) / n, 4)}
        if on_topic:
            hits = sum(r["department"] == r["gold"] for r in kept)
            row["accuracy_kept"] = round(hits / len(kept), 4) if kept else None
        table[str(t)] = row
    s["thresholds"] = table
    return s


def main() -> None:
    from ragpt.config import load_settings
    from ragpt.data.ingest import ingest
    from ragpt.data.qa import load_qa
    from ragpt.data.sample import SAMPLE_DEPARTMENTS, department_dir, sample_questions
    from ragpt.lm.models import load_embedder
    from ragpt.retrieval.index import DocumentIndex
    from ragpt.retrieval.router import CONFIDENCE_CENTER, CONFIDENCE_SCALE, DepartmentRouter

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index-dir", type=Path, default=Path(__file__).resolve().parents[1] / "indexes")
    ap.add_argument("--index", default="shared")
    ap.add_argument("--qa-dir", type=Path, default=Path.home() / ".cache/ragpt/shared-qa/doc2dial/qa")
    args = ap.parse_args()

    settings = load_settings()
    emb = load_embedder(settings)
    tmp = Path(tempfile.mkdtemp(prefix="ragpt-routing-"))
    for d in SAMPLE_DEPARTMENTS:
        ingest(tmp, "sample", [department_dir(d)], [d], emb, source_root=department_dir(d).parent,
               chunk_tokens=settings.chunk_tokens,
               chunk_overlap=settings.chunk_overlap, progress=False)
    sample_router = DepartmentRouter.from_index(DocumentIndex.open(tmp, "sample"), emb)
    off = [(q, None) for q in OFF_TOPIC]
    res: dict = {"config": {"embedder": emb.name, "method": sample_router.method, "top_m": sample_router.top_m,
                            "confidence": f"sigmoid((similarity - {CONFIDENCE_CENTER}) / {CONFIDENCE_SCALE})",
                            "default_threshold": DEFAULT_THRESHOLD},
                 "sets": {}, "notes": []}
    res["sets"]["sample (hr/it/finance)"] = _summary(
        _measure(sample_router, [(q.question, q.department) for q in sample_questions()]), True)
    res["sets"]["off-topic vs sample"] = _summary(_measure(sample_router, off), False)

    files = sorted(args.qa_dir.glob("*.test.jsonl")) if args.qa_dir.is_dir() else []
    if (args.index_dir / args.index).exists() and files:
        idx = DocumentIndex.open(args.index_dir, args.index)
        agencies = [a for a in AGENCIES if a in idx.departments]
        pairs = [(q.question, q.department) for f in files for q in load_qa(f) if q.department in agencies]
        r = DepartmentRouter.from_index(idx, emb, agencies)
        res["sets"][f"doc2dial first-turn test ({'/'.join(agencies)})"] = _summary(_measure(r, pairs), True)
        res["sets"]["off-topic vs doc2dial"] = _summary(_measure(r, off), False)
    else:
        res["notes"].append(f"doc2dial skipped: index {args.index_dir / args.index} "
                            f"or QA files in {args.qa_dir} absent")

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "routing_accuracy.json").write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    md = ["# Routing accuracy and refusals (`model: \"auto\"`)", "",
          f"Embedder {emb.name}; nearest (top-{sample_router.top_m}) routing; confidence = "
          f"{res['config']['confidence']}, default min_confidence {DEFAULT_THRESHOLD}. "
          "`share` is the old relative softmax confidence.", "",
          "| set | n | accuracy | refused @0.5 | refused @0.5 by old share | similarity min-max |",
          "|---|---|---|---|---|---|"]
    for name, s in res["sets"].items():
        acc = f"{100 * s['accuracy']:.1f}%" if "accuracy" in s else "-"
        md.append(f"| {name} | {s['n']} | {acc} | {100 * s['refused_at_default']:.1f}% | "
                  f"{100 * s['refused_at_default_old_share']:.1f}% | "
                  f"{s['similarity']['min']:.3f}-{s['similarity']['max']:.3f} |")
    md += ["", "Refusal rate (and accuracy on what is kept) by threshold:", "",
           "| threshold | " + " | ".join(res["sets"]) + " |", "|---" * (len(res["sets"]) + 1) + "|"]
    for t in THRESHOLDS:
        cells = []
        for s in res["sets"].values():
            row = s["thresholds"][str(t)]
            c = f"{100 * row['refused']:.1f}%"
            if row.get("accuracy_kept") is not None:
                c += f" ({100 * row['accuracy_kept']:.1f}%)"
            cells.append(c)
        md.append(f"| {t} | " + " | ".join(cells) + " |")
    md += [""] + [f"Note: {n}" for n in res["notes"]]
    (RESULTS / "routing_accuracy.md").write_text("\n".join(md).rstrip() + "\n", encoding="utf-8")
    print("\n".join(md))


if __name__ == "__main__":
    main()
