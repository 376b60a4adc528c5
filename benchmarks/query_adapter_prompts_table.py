"""Summarise benchmarks/query_adapter_prompts.sh: each agency's prompt trained with and without a
query adapter on the same questions, evaluated as served on new questions about seen documents and
on the test split (documents no training question is about).

Per agency and split, and pooled over the agencies run: token-F1 (paired bootstrap 95% intervals
over questions; * : excludes 0) of no prompt and the prompt in each arm, the differences that matter
(adapter arm - plain arm, with and without a prompt) and each arm's span hit@2. Writes
<out>.{json,md} beside the results folder.

    .venv/bin/python benchmarks/query_adapter_prompts_table.py              # every agency run
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

from department_table import format_ci, predictions_f1, train_summary  # noqa: E402

from ragpt.evaluation.metrics import bootstrap_ci, paired_difference_ci  # noqa: E402

ARMS = ("plain", "adapter")
SPLITS = {"seen": "new questions, seen documents", "test": "test: unseen documents"}


def finished(root: Path) -> bool:
    return all((root / f"{arm}-{split}" / "predictions.jsonl").is_file() for arm in ARMS for split in SPLITS)


def training(root: Path, arm: str) -> dict:
    """The version a run registered and its training metrics, from `ragpt train`'s JSON summary."""
    metrics = train_summary(root / f"{arm}.train.log").get("metrics", {})
    return {"version": (root / f"{arm}.version").read_text().strip(),
            **{k: metrics.get(k) for k in ("dev_verdict", "query_adapter", "best_step", "dev_f1")}}


def columns(root: Path, dept: str, split: str) -> tuple[dict[str, list[float]], dict[str, float], list[str]]:
    """Per-question F1 of {arm} {none|soft}, each arm's span hit@2 and the question ids."""
    f1 = {arm: predictions_f1(root / f"{arm}-{split}" / "predictions.jsonl") for arm in ARMS}
    ids = sorted(f1["plain"]["none"])
    if any(sorted(f1[arm][m]) != ids for arm in ARMS for m in ("none", "soft")):
        raise SystemExit(f"{dept} {split}: the arms were not evaluated on the same questions")
    cols = {f"{arm} {m}": [f1[arm][m][i] for i in ids] for arm in ARMS for m in ("none", "soft")}
    span = {arm: json.loads((root / f"{arm}-{split}" / "results.json").read_text())["departments"][dept]
            ["retrieval"]["answer_span"]["hit_at_k"]["mean"] for arm in ARMS}
    return cols, span, ids


def compare(cols: dict[str, list[float]], span: dict[str, float]) -> dict:
    return {
        "n": len(cols["plain none"]), "span_hit@2": span,
        "f1": {k: bootstrap_ci(v).to_dict() for k, v in cols.items()},
        "adapter - plain, prompt": paired_difference_ci(cols["adapter soft"], cols["plain soft"]).to_dict(),
        "adapter - plain, no prompt": paired_difference_ci(cols["adapter none"], cols["plain none"]).to_dict(),
        "plain prompt - none": paired_difference_ci(cols["plain soft"], cols["plain none"]).to_dict(),
        "adapter prompt - none": paired_difference_ci(cols["adapter soft"], cols["adapter none"]).to_dict(),
    }


def row(name: str, c: dict) -> str:
    f = c["f1"]
    return (f"| {name} | {c['n']} | {c['span_hit@2']['plain']:.1f} → {c['span_hit@2']['adapter']:.1f} | "
            f"{f['plain none']['mean']:.1f} → {f['adapter none']['mean']:.1f} | "
            f"{f['plain soft']['mean']:.1f} → {f['adapter soft']['mean']:.1f} | "
            f"{format_ci(c['adapter - plain, prompt'], True)} | {format_ci(c['adapter - plain, no prompt'], True)} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE / "results" / "query_adapter_prompts")
    ap.add_argument("--dept", action="append", help="an agency (repeatable; default: every one run to the end)")
    ap.add_argument("--command", default=None, help="the command line that made the results (for the table)")
    args = ap.parse_args()
    depts = args.dept or sorted(p.name for p in args.out.iterdir() if p.is_dir() and finished(p))
    if not depts:
        raise SystemExit(f"no agency under {args.out} has both arms evaluated on both splits")
    res: dict = {"departments": {}, "pooled": {}}
    pooled: dict[str, dict] = {s: {"cols": {}, "hits": {arm: 0.0 for arm in ARMS}, "n": 0} for s in SPLITS}
    for d in depts:
        root = args.out / d
        res["departments"][d] = {"training": {arm: training(root, arm) for arm in ARMS}, "splits": {}}
        for split in SPLITS:
            cols, span, ids = columns(root, d, split)
            res["departments"][d]["splits"][split] = compare(cols, span)
            p = pooled[split]
            for k, v in cols.items():
                p["cols"].setdefault(k, []).extend(v)
            for arm in ARMS:
                p["hits"][arm] += span[arm] * len(ids)
            p["n"] += len(ids)
    if len(depts) > 1:
        for split, p in pooled.items():
            res["pooled"][split] = compare(p["cols"], {arm: p["hits"][arm] / p["n"] for arm in ARMS})
    out_json, out_md = args.out.with_suffix(".json"), args.out.with_suffix(".md")
    out_json.write_text(json.dumps(res, indent=2) + "\n")
    lines = ["# A query adapter end to end: prompts trained with and without one", "",
             "Per agency, `ragpt train` defaults on the same questions, once plain and once with `--query-adapter` "
             "(scratch registry), each evaluated as served (every input from its version's contract; the adapter "
             "arm's no-prompt row searches with its adapter). Token-F1, paired bootstrap 95% intervals; "
             "* : excludes 0. Pooled span hit@2 is weighted by questions.", "",
             "| agency, questions | n | span hit@2 plain → adapter | no prompt: plain → adapter "
             "| prompt: plain → adapter | adapter - plain, prompt | adapter - plain, no prompt |", "|---" * 7 + "|"]
    for split, title in SPLITS.items():
        for d in depts:
            lines.append(row(f"{d}, {title}", res["departments"][d]["splits"][split]))
        if split in res["pooled"]:
            lines.append(row(f"**pooled**, {title}", res["pooled"][split]))
    lines += ["", "Training (dev verdicts: each arm's prompt against no prompt on its dev questions, held out by "
              "document; the adapter's own held-out choice):", ""]
    for d in depts:
        t = res["departments"][d]["training"]
        for arm in ARMS:
            v = t[arm]["dev_verdict"] or {}
            line = (f"- {d} {arm} ({t[arm]['version']}): {v.get('verdict', '-')}, dev F1 {t[arm]['dev_f1']}, "
                    f"{v.get('delta', 0):+.1f} [{v.get('low', 0):+.1f}, {v.get('high', 0):+.1f}] vs no prompt, "
                    f"best step {t[arm]['best_step']}")
            if arm == "adapter":
                line += f"; adapter {json.dumps(t[arm]['query_adapter'])}"
            lines.append(line)
    cmd = args.command or "benchmarks/query_adapter_prompts.sh (DEPT=<agency> for another)"
    lines += ["", f"Command: `{cmd}`"]
    out_md.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
