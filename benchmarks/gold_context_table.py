"""Compare soft prompts trained with the gold passage in their contexts when retrieval missed it
(the shipped v1 prompts, `--gold-context missed`) with the ablation's (`never` or `always`).

`never` is compared on the retrieved-context test predictions, `always` on the gold-passage ones
(benchmarks/results/departments/<dept>/<context> vs benchmarks/results/gold_context_<mode>/<dept>/
<context>), paired by question; writes benchmarks/results/gold_context_<mode>.{json,md}: token-F1
per agency and pooled, paired bootstrap intervals.

    .venv/bin/python benchmarks/gold_context_table.py never|always
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from department_table import DOC2DIAL, format_ci, predictions_f1  # benchmarks/ is the script's folder

from ragpt.metrics import bootstrap_ci, paired_difference_ci

RESULTS = Path(__file__).parent / "results"


def compare(none: list[float], missed: list[float], other: list[float], mode: str) -> dict:
    return {"n": len(none), "none": bootstrap_ci(none).to_dict(), "missed": bootstrap_ci(missed).to_dict(),
            mode: bootstrap_ci(other).to_dict(),
            "missed - none": paired_difference_ci(missed, none).to_dict(),
            f"{mode} - none": paired_difference_ci(other, none).to_dict(),
            f"{mode} - missed": paired_difference_ci(other, missed).to_dict()}


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else "never"
    context = {"never": "retrieved", "always": "gold"}.get(mode)
    if context is None:
        raise SystemExit(f"mode must be never or always, not {mode!r}")
    rows, pooled, missing = {}, {"none": [], "missed": [], "other": []}, []
    for d in DOC2DIAL:
        ab_file = RESULTS / f"gold_context_{mode}" / d / context / "predictions.jsonl"
        if not ab_file.is_file():
            missing.append(d)
            continue
        v1 = predictions_f1(RESULTS / "departments" / d / context / "predictions.jsonl")
        ab = predictions_f1(ab_file)
        if v1["none"] != ab["none"]:  # same questions, contexts and model: the baseline must agree
            raise SystemExit(f"{d}: the two evaluations' no-prompt answers differ; not comparable")
        qids = sorted(v1["none"])
        cols = {"none": [v1["none"][q] for q in qids], "missed": [v1["soft"][q] for q in qids],
                "other": [ab["soft"][q] for q in qids]}
        rows[d] = compare(**cols, mode=mode)
        for k, v in cols.items():
            pooled[k] += v
    rows["pooled"] = compare(**pooled, mode=mode)
    (RESULTS / f"gold_context_{mode}.json").write_text(json.dumps(rows, indent=2) + "\n")
    trained = {"never": "trained on retrieved only", "always": "trained with gold always"}[mode]
    md = [f"# Gold passage in training contexts: `missed` (v1) vs `{mode}`, test F1 with {context} context", "",
          f"| agency | n | no prompt | trained with gold when missed (v1) | {trained} | "
          f"v1 - none | {mode} - none | {mode} - v1 |", "|---|---|---|---|---|---|---|---|"]
    for d, r in rows.items():
        md.append(f"| {d} | {r['n']} | {format_ci(r['none'])} | {format_ci(r['missed'])} | {format_ci(r[mode])} | "
                  f"{format_ci(r['missed - none'], True)} | {format_ci(r[f'{mode} - none'], True)} | "
                  f"{format_ci(r[f'{mode} - missed'], True)} |")
    if missing:
        md += ["", f"Not run (so not in the pooled row): {', '.join(missing)}."]
    md += ["", f"Commands: `MODE={mode} benchmarks/gold_context_ablation.sh`, then "
           f"`.venv/bin/python benchmarks/gold_context_table.py {mode}`"]
    (RESULTS / f"gold_context_{mode}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
