"""Summarise benchmarks/query_adapter_prompts.sh: one agency's prompt trained with and without a query
adapter on the same questions, evaluated as served on new questions about seen documents and on the
test split (documents no training question is about).

Per split, token-F1 (paired bootstrap 95% intervals by question id; * : excludes 0) of no prompt and
the prompt in each arm, the differences that matter (adapter arm - plain arm, with and without a
prompt), and each arm's span hit@2.

    .venv/bin/python benchmarks/query_adapter_prompts_table.py --dept dmv
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from department_table import format_ci, predictions_f1  # noqa: E402

from ragpt.evaluation.metrics import bootstrap_ci, paired_difference_ci  # noqa: E402

SPLITS = {"seen": "new questions about documents seen in training", "test": "test: documents no training "
                                                                             "question is about"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE / "results" / "query_adapter_prompts")
    ap.add_argument("--dept", default="dmv")
    ap.add_argument("--command", default=None, help="the command line that made the results (for the table)")
    args = ap.parse_args()
    root = args.out / args.dept
    res: dict = {"department": args.dept, "splits": {}}
    for arm in ("plain", "adapter"):
        log = (root / f"{arm}.train.log").read_text()
        summary = json.loads(log[log.rindex("\n{") + 1:]) if "\n{" in log else {}
        res[f"{arm}_training"] = {k: summary.get("metrics", {}).get(k) for k in ("dev_verdict", "query_adapter",
                                                                                  "best_step", "dev_f1")}
        res[f"{arm}_version"] = (root / f"{arm}.version").read_text().strip()
    for split in SPLITS:
        f1 = {arm: predictions_f1(root / f"{arm}-{split}" / "predictions.jsonl") for arm in ("plain", "adapter")}
        ids = sorted(f1["plain"]["none"])
        cols = {f"{arm} {m}": [f1[arm][m][i] for i in ids] for arm in ("plain", "adapter") for m in ("none", "soft")}
        span = {arm: json.loads((root / f"{arm}-{split}" / "results.json").read_text())["departments"][args.dept]
                ["retrieval"]["answer_span"]["hit_at_k"]["mean"] for arm in ("plain", "adapter")}
        res["splits"][split] = {
            "n": len(ids), "span_hit@2": span,
            "f1": {k: bootstrap_ci(v).to_dict() for k, v in cols.items()},
            "adapter - plain, prompt": paired_difference_ci(cols["adapter soft"], cols["plain soft"]).to_dict(),
            "adapter - plain, no prompt": paired_difference_ci(cols["adapter none"], cols["plain none"]).to_dict(),
            "plain prompt - none": paired_difference_ci(cols["plain soft"], cols["plain none"]).to_dict(),
            "adapter prompt - none": paired_difference_ci(cols["adapter soft"], cols["adapter none"]).to_dict(),
        }
    (args.out / f"{args.dept}.json").write_text(json.dumps(res, indent=2) + "\n")
    lines = [f"# A query adapter end to end: {args.dept}, prompts trained with and without one", "",
             f"Plain: {res['plain_version']}, adapter: {res['adapter_version']} (scratch registry), both `ragpt train` "
             "defaults on the same questions. Token-F1, paired bootstrap 95% intervals; * : excludes 0.", "",
             "| questions | n | span hit@2 plain → adapter | no prompt: plain → adapter | prompt: plain → adapter "
             "| adapter - plain, prompt | adapter - plain, no prompt |", "|---" * 7 + "|"]
    for split, title in SPLITS.items():
        c = res["splits"][split]
        f = c["f1"]
        lines.append(f"| {title} | {c['n']} | {c['span_hit@2']['plain']:.1f} → {c['span_hit@2']['adapter']:.1f} | "
                     f"{f['plain none']['mean']:.1f} → {f['adapter none']['mean']:.1f} | "
                     f"{f['plain soft']['mean']:.1f} → {f['adapter soft']['mean']:.1f} | "
                     f"{format_ci(c['adapter - plain, prompt'], True)} | "
                     f"{format_ci(c['adapter - plain, no prompt'], True)} |")
    qa = res["adapter_training"].get("query_adapter") or {}
    lines += ["", f"Training: plain dev verdict {json.dumps(res['plain_training'].get('dev_verdict'))}; adapter "
              f"dev verdict {json.dumps(res['adapter_training'].get('dev_verdict'))}; adapter {json.dumps(qa)}.", "",
              f"Command: `{args.command or f'DEPT={args.dept} benchmarks/query_adapter_prompts.sh'}`"]
    (args.out / f"{args.dept}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
