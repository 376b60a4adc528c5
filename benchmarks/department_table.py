"""Summarise the department evaluations written by benchmarks/department_prompts.sh.

Reads <out>/<dept>/{retrieved,gold}/results.json (from `ragpt eval`) and each soft prompt's
meta.json, writes <out>/../departments.{json,md}: per department, token-F1 with bootstrap 95%
intervals for no prompt / instruction / soft prompt / LoRA reference, and how the prompt was trained.

    .venv/bin/python benchmarks/department_table.py [benchmarks/results/departments]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ORDER = ("none", "instruction", "soft", "lora")


def _f1(entry: dict | None) -> str:
    if entry is None:
        return "-"
    f = entry["f1"]
    return f"{f['mean']:.1f} [{f['low']:.1f}, {f['high']:.1f}]"


def _diff(entry: dict | None) -> str:
    """Paired difference to no prompt on the same questions; * when its interval excludes 0."""
    if entry is None or "vs_none" not in entry:
        return "-"
    f = entry["vs_none"]["f1"]
    star = "*" if f["low"] > 0 or f["high"] < 0 else ""
    return f"{f['mean']:+.1f} [{f['low']:+.1f}, {f['high']:+.1f}]{star}"


def _by_kind(methods: dict) -> dict[str, dict]:
    """Method results keyed by kind (none, instruction, soft, lora); soft keys carry a version."""
    return {m["method"]["kind"]: m for m in methods.values()}


def summarise(out: Path) -> dict:
    rows = {}
    for dept_dir in sorted(p for p in out.iterdir() if p.is_dir()):
        d = dept_dir.name
        row: dict = {}
        for context in ("retrieved", "gold"):
            f = dept_dir / context / "results.json"
            if not f.is_file():
                continue
            res = json.loads(f.read_text())
            dep = res["departments"][d]
            row[context] = {"n": dep["n"], "methods": _by_kind(dep["methods"]),
                            "answer_in_top_k": dep["retrieval"]["answer_span"]["hit_at_k"]["mean"]}
        soft = row.get("retrieved", {}).get("methods", {}).get("soft")
        if soft:
            det = soft["method"]["details"]
            tm = det["training_metrics"]
            row["training"] = {"version": det["version"], "state": det["state"], "steps_run": tm["steps_run"],
                               "best_step": tm["best_step"], "minutes": round(tm["train_seconds"] / 60, 1),
                               "lr": det["hyperparameters"]["lr"], "n_tokens": det["n_tokens"],
                               "dev_f1": tm.get("dev_f1"), "dev_f1_no_prompt": tm.get("dev_f1_no_prompt"),
                               "parameters": soft["method"]["trainable_parameters"],
                               "bytes": soft["method"]["bytes"]}
        lora = row.get("retrieved", {}).get("methods", {}).get("lora")
        if lora:
            row["lora"] = {"parameters": lora["method"]["trainable_parameters"], "bytes": lora["method"]["bytes"]}
        state_file = Path("prompts") / d / "state.json"
        if soft and state_file.is_file():
            st = json.loads(state_file.read_text())
            v = row["training"]["version"]
            row["registry_state"] = "active" if st.get("active") == v else st["versions"][v]["state"]
        rows[d] = row
    return rows


def markdown(rows: dict) -> str:
    lines = [
        "Token-F1 (SQuAD normalisation) on each department's held-out test questions, bootstrap 95% intervals;",
        "the last column is the paired difference on the same questions (* : its interval excludes 0).",
        "",
        "| department | context | n | answer in top-2 | no prompt | instruction | soft prompt | LoRA reference "
        "| soft - none (paired) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for d, row in rows.items():
        for context in ("retrieved", "gold"):
            if context not in row:
                continue
            c = row[context]
            m = c["methods"]
            hit = f"{c['answer_in_top_k']:.0f}%" if context == "retrieved" else "gold passage"
            lines.append(f"| {d} | {context} | {c['n']} | {hit} | " + " | ".join(_f1(m.get(k)) for k in ORDER)
                         + f" | {_diff(m.get('soft'))} |")
    lines += ["", "| department | prompt (state now) | steps (best) | train minutes | dev F1 none -> soft | "
                  "soft params / bytes | LoRA params / bytes |", "|---|---|---|---|---|---|---|"]
    for d, row in rows.items():
        t = row.get("training")
        if not t:
            continue
        lo = row.get("lora")
        lora = f"{lo['parameters']:,} / {lo['bytes']:,}" if lo else "-"
        state = row.get("registry_state", t["state"])
        lines.append(f"| {d} | {t['version']} ({state}) | {t['steps_run']} ({t['best_step']}) | {t['minutes']} | "
                     f"{t['dev_f1_no_prompt']:.1f} -> {t['dev_f1']:.1f} | {t['parameters']:,} / {t['bytes']:,} | "
                     f"{lora} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/departments")
    rows = summarise(out)
    (out.parent / "departments.json").write_text(json.dumps(rows, indent=2, default=str) + "\n")
    md = markdown(rows)
    (out.parent / "departments.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
