"""Summarise benchmarks/default_prompts.sh: the doc2dial prompts trained with `ragpt train`'s defaults
on sentence-packed chunks, against no prompt and against the prompts shipped before them.

Per agency and pooled (every first-turn test question once, each with its own agency's prompt),
token-F1 with paired bootstrap 95% intervals (* : excludes 0):

* the splitter alone: no prompt on the recursive-chunk index vs no prompt on the sentence index
  (same contract), and span hit@2 on each;
* the new prompt vs no prompt, on the sentence index (what the README's department table shows);
* the new prompt vs the prompt shipped before it, each as served on its own index with its own
  contract (benchmarks/served_contract_check.py's predictions; same questions, paired by id);
* when the same recipe was also run on the recursive-chunk index (--recursive-out), the
  splitter's effect with a prompt trained on each: sentences vs recursive, paired.

    .venv/bin/python benchmarks/default_prompts_table.py   # -> results/default_prompts.{json,md}
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
from ragpt.softprompts.registry import PromptRegistry  # noqa: E402

AGENCIES = ("dmv", "ssa", "studentaid", "va")


def _span_hit(results: Path, dept: str) -> float:
    return json.loads(results.read_text())["departments"][dept]["retrieval"]["answer_span"]["hit_at_k"]["mean"]


def _columns(out: Path, shipped: Path, recursive: Path | None, dept: str, index: str,
             base: str) -> dict[str, dict[str, float]] | None:
    files = {"new": out / dept / index / "predictions.jsonl", "base": out / dept / base / "predictions.jsonl",
             "shipped": shipped / dept / "predictions.jsonl"}
    if not all(f.is_file() for f in files.values()):
        return None
    if recursive is not None and (recursive / dept / base / "predictions.jsonl").is_file():
        files["recursive"] = recursive / dept / base / "predictions.jsonl"
    got = {k: predictions_f1(f) for k, f in files.items()}
    cols = {"none_sentences": got["new"]["none"], "soft_new": got["new"]["soft"],
            "none_recursive": got["base"]["none"], "soft_shipped": got["shipped"]["soft"]}
    if "recursive" in got:
        if sorted(got["recursive"]["none"]) != sorted(got["base"]["none"]):
            raise SystemExit(f"{dept}: the two no-prompt evaluations on {base} asked other questions")
        # Same index, contract and model; batched with other rows, a bf16 near-tie may still flip a token.
        differ = sum(abs(got["recursive"]["none"][q] - f) > 1e-9 for q, f in got["base"]["none"].items())
        if differ:
            print(f"note: {dept}: {differ} of {len(got['base']['none'])} no-prompt answers on {base} differ "
                  "between the two runs", file=sys.stderr)
        cols["soft_recursive"] = got["recursive"]["soft"]
    return cols


PAIRS = {"splitter (no prompt)": ("none_sentences", "none_recursive"),
         "new - none": ("soft_new", "none_sentences"),
         "new - shipped": ("soft_new", "soft_shipped"),
         "recursive prompt - none": ("soft_recursive", "none_recursive"),
         "splitter (with prompt)": ("soft_new", "soft_recursive")}


def _compare(cols: dict[str, list[float]]) -> dict:
    ci = {k: bootstrap_ci(v).to_dict() for k, v in cols.items()}
    ci.update({name: paired_difference_ci(cols[a], cols[b]).to_dict() for name, (a, b) in PAIRS.items()
               if a in cols and b in cols})
    ci["n"] = len(cols["none_sentences"])
    return ci


def _verdict(prompt_dir: Path, d: str, version: str) -> tuple[dict, dict]:
    meta = json.loads((prompt_dir / d / version / "meta.json").read_text())
    return meta, meta["metrics"]["dev_verdict"]


def summarise(out: Path, shipped: Path, index: str, base: str, prompt_dir: Path,
              recursive: Path | None = None) -> dict:
    registry = PromptRegistry(prompt_dir)
    rows, pooled, pooled_r = {}, {}, {}
    for d in AGENCIES:
        by = _columns(out, shipped, recursive, d, index, base)
        if by is None:
            continue
        qids = sorted(by["none_sentences"])
        if any(sorted(v) != qids for v in by.values()):
            raise SystemExit(f"{d}: the evaluations did not answer the same questions; not comparable")
        cols = {k: [v[q] for q in qids] for k, v in by.items()}
        runs = {name: json.loads((out / d / name / "results.json").read_text())["departments"][d]
                for name in (index, base)}
        if runs[index]["contract"] != runs[base]["contract"]:
            raise SystemExit(f"{d}: no prompt was evaluated with other inputs on {index} than on {base}")
        version = (out / d / "version").read_text().strip()
        meta, verdict = _verdict(prompt_dir, d, version)
        row = _compare(cols)
        row.update(version=version, state=registry.status(d, version)["state"],
                   shipped_version=json.loads((shipped / d / "results.json").read_text())["run"]["prompt_specs"][0],
                   dev_verdict=verdict, best_step=meta["metrics"]["best_step"],
                   train_minutes=round(meta["metrics"]["train_seconds"] / 60, 1),
                   k=runs[index]["contract"]["k"],
                   span_hit_at_2={"recursive": _span_hit(out / d / base / "results.json", d),
                                  "sentences": _span_hit(out / d / index / "results.json", d)})
        if "soft_recursive" in cols:
            # From the run's own log: the scratch registry it trained into is not kept.
            rmetrics = train_summary(recursive / d / "train.log")["metrics"]
            row.update(recursive_dev_verdict=rmetrics["dev_verdict"], recursive_best_step=rmetrics["best_step"],
                       recursive_train_minutes=round(rmetrics["train_seconds"] / 60, 1))
        rows[d] = row
        for k, v in cols.items():
            if k != "soft_recursive":
                pooled.setdefault(k, []).extend(v)
            if "soft_recursive" in cols:  # the agencies the recursive run reached, pooled apart
                pooled_r.setdefault(k, []).extend(v)
    if pooled:
        rows["pooled"] = _compare(pooled)
        agencies = [r for r in rows.values() if "span_hit_at_2" in r]
        rows["pooled"]["span_hit_at_2"] = {
            s: round(sum(r["n"] * r["span_hit_at_2"][s] for r in agencies) / sum(r["n"] for r in agencies), 2)
            for s in ("recursive", "sentences")}
    if pooled_r:
        rows["pooled (recursive run)"] = _compare(pooled_r)
    return rows


def _v(v: dict) -> str:
    return f"{v['verdict']} {v['delta']:+.1f} [{v['low']:+.1f}, {v['high']:+.1f}]"


def markdown(rows: dict, index: str, base: str) -> str:
    lines = ["# doc2dial prompts with `ragpt train`'s defaults on sentence-packed chunks "
             "(benchmarks/default_prompts.sh)", "",
             f"Token-F1 on each agency's first-turn test questions; `{index}`: sentences splitter, "
             f"`{base}`: recursive splitter (both 200/40 tokens, k=2). Differences are paired bootstrap "
             "95% intervals (* : excludes 0). New prompts: `ragpt train` with no recipe flags (deep prompt, "
             "lr 1e-2, 80 steps, dev = 15% of the training file held out by document), evaluated with "
             "their own contract; shipped prompts as served on their index with theirs "
             "(benchmarks/served_contract_check.py).", "",
             "| agency | n | span hit@2 recursive → sentences | no prompt, recursive → sentences | new prompt | "
             "new - no prompt | shipped prompt | new - shipped | dev verdict (state) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for d, r in rows.items():
        if d == "pooled (recursive run)":
            continue
        h = r["span_hit_at_2"]
        hit = f"{h['recursive']:.1f} → {h['sentences']:.1f}"
        if d == "pooled":
            verdict, name = "", "**pooled**"
        else:
            verdict = f"{_v(r['dev_verdict'])} ({r['state']})"
            name = f"{d} {r['version']}"
        shipped = f"{r['soft_shipped']['mean']:.1f}" + (f" ({r['shipped_version']})" if d != "pooled" else "")
        lines.append(f"| {name} | {r['n']} | {hit} | {r['none_recursive']['mean']:.1f} → "
                     f"{r['none_sentences']['mean']:.1f}: {format_ci(r['splitter (no prompt)'], True)} | "
                     f"{r['soft_new']['mean']:.1f} | {format_ci(r['new - none'], True)} | {shipped} | "
                     f"{format_ci(r['new - shipped'], True)} | {verdict} |")
    if "pooled (recursive run)" in rows:
        lines += ["", "The same recipe trained on the recursive-chunk index (a scratch registry, released nowhere), "
                  "so the splitter's effect with a prompt is paired on the same questions:", "",
                  "| agency | n | no prompt, recursive | prompt on recursive | - no prompt | prompt on sentences | "
                  "sentences - recursive (with prompts) | recursive prompt's dev verdict |",
                  "|---|---|---|---|---|---|---|---|"]
        for d, r in rows.items():
            if "soft_recursive" not in r:
                continue
            pool = d.startswith("pooled")
            verdict = "" if pool else _v(r["recursive_dev_verdict"])
            lines.append(f"| {'**pooled**' if pool else d} | {r['n']} | {r['none_recursive']['mean']:.1f} | "
                         f"{r['soft_recursive']['mean']:.1f} | {format_ci(r['recursive prompt - none'], True)} | "
                         f"{r['soft_new']['mean']:.1f} | {format_ci(r['splitter (with prompt)'], True)} | {verdict} |")
    per = [f"{d} {r['train_minutes']} min (step {r['best_step']} kept)" for d, r in rows.items()
           if not d.startswith("pooled")]
    lines += ["", "Training: " + ", ".join(per) + ".", "",
              "Command: `benchmarks/default_prompts.sh` (then this script).", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE / "results" / "default_prompts")
    ap.add_argument("--shipped", type=Path, default=HERE / "results" / "served_contract_check")
    ap.add_argument("--index", default="shared-sentences")
    ap.add_argument("--base-index", default="shared")
    ap.add_argument("--prompt-dir", type=Path, default=HERE.parent / "prompts")
    ap.add_argument("--recursive-out", type=Path, default=HERE / "results" / "default_prompts_recursive",
                    help="the same recipe's run on the recursive-chunk index (used when it is there)")
    args = ap.parse_args()
    recursive = args.recursive_out if args.recursive_out.is_dir() else None
    rows = summarise(args.out, args.shipped, args.index, args.base_index, args.prompt_dir, recursive)
    if not rows:
        raise SystemExit(f"no finished department under {args.out}")
    (args.out.parent / "default_prompts.json").write_text(json.dumps(rows, indent=1) + "\n")
    md = markdown(rows, args.index, args.base_index)
    (args.out.parent / "default_prompts.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
