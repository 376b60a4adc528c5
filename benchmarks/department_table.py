"""Summarise the department evaluations written by benchmarks/department_prompts.sh.

Reads <out>/<dept>/{retrieved,gold}/results.json (from `ragpt eval`) and each soft prompt's
meta.json, writes <out>/../departments.{json,md}: per department, token-F1 with bootstrap 95%
intervals for no prompt / instruction / soft prompt / LoRA reference, and how the prompt was trained;
and the doc2dial agencies pooled (every first-turn test question once, each with its own agency's
prompt), which is what the issue's hand-run reference measured (its no-prompt F1s match ours).

    .venv/bin/python benchmarks/department_table.py [benchmarks/results/departments]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ORDER = ("none", "instruction", "soft", "lora")
DOC2DIAL = ("dmv", "ssa", "studentaid", "va")


def _f1(entry: dict | None) -> str:
    if entry is None:
        return "-"
    f = entry["f1"]
    return f"{f['mean']:.1f} [{f['low']:.1f}, {f['high']:.1f}]"


def format_ci(i: dict, signed: bool = False) -> str:
    """`mean [low, high]`; signed (a difference): with +/- and * when the interval excludes 0."""
    f = "+.1f" if signed else ".1f"
    star = "*" if signed and (i["low"] > 0 or i["high"] < 0) else ""
    return f"{i['mean']:{f}} [{i['low']:{f}}, {i['high']:{f}}]{star}"


def train_summary(log: Path) -> dict:
    """The JSON summary `ragpt train` prints last ({} when the run printed none)."""
    text = log.read_text()
    return json.loads(text[text.rindex("\n{") + 1:]) if "\n{" in text else {}


def predictions_f1(path: Path) -> dict[str, dict[str, float]]:
    """{method kind: {question id: token-F1 in %}} from a `ragpt eval` predictions.jsonl."""
    by: dict[str, dict[str, float]] = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        by.setdefault(r["method"].split(":")[0], {})[r["qid"]] = 100 * r["f1"]
    return by


def three_way(none: list[float], a: list[float], b: list[float], a_name: str, b_name: str) -> dict:
    """Per-question F1 of no prompt and two prompts `a`, `b`: CIs of each and paired differences."""
    from ragpt.evaluation.metrics import bootstrap_ci, paired_difference_ci

    return {"n": len(none), "none": bootstrap_ci(none).to_dict(), a_name: bootstrap_ci(a).to_dict(),
            b_name: bootstrap_ci(b).to_dict(),
            f"{a_name} - none": paired_difference_ci(a, none).to_dict(),
            f"{b_name} - none": paired_difference_ci(b, none).to_dict(),
            f"{b_name} - {a_name}": paired_difference_ci(b, a).to_dict()}


def paired_agencies(a_folder, b_folder, context: str, a_name: str, b_name: str) -> tuple[dict, list[str]]:
    """`three_way` per doc2dial agency and pooled, pairing the soft-prompt answers of two evaluations
    (`a_folder(agency)`, `b_folder(agency)` hold <context>/predictions.jsonl) by question.
    Returns (rows, agencies not run)."""
    rows, pooled, missing = {}, {"none": [], "a": [], "b": []}, []
    for d in DOC2DIAL:
        a_file, b_file = (f(d) / context / "predictions.jsonl" for f in (a_folder, b_folder))
        if not (a_file.is_file() and b_file.is_file()):
            missing.append(d)
            continue
        a, b = predictions_f1(a_file), predictions_f1(b_file)
        if a["none"] != b["none"]:  # same questions, contexts and model: the baseline must agree
            raise SystemExit(f"{d}: the two evaluations' no-prompt answers differ; not comparable")
        qids = sorted(a["none"])
        cols = {"none": [a["none"][q] for q in qids], "a": [a["soft"][q] for q in qids],
                "b": [b["soft"][q] for q in qids]}
        rows[d] = three_way(cols["none"], cols["a"], cols["b"], a_name, b_name)
        for k, v in cols.items():
            pooled[k] += v
    if rows:
        rows["pooled"] = three_way(pooled["none"], pooled["a"], pooled["b"], a_name, b_name)
    return rows, missing


def three_way_row(name: str, r: dict, a_name: str, b_name: str) -> str:
    """| name | n | none | a | b | a - none | b - none | b - a | (a markdown row, open at the end)"""
    return (f"| {name} | {r['n']} | {format_ci(r['none'])} | {format_ci(r[a_name])} | {format_ci(r[b_name])} | "
            f"{format_ci(r[f'{a_name} - none'], True)} | {format_ci(r[f'{b_name} - none'], True)} | "
            f"{format_ci(r[f'{b_name} - {a_name}'], True)} |")


def _diff(entry: dict | None) -> str:
    """Paired difference to no prompt on the same questions; * when its interval excludes 0."""
    if entry is None or "vs_none" not in entry:
        return "-"
    return format_ci(entry["vs_none"]["f1"], signed=True)


def _by_kind(methods: dict) -> dict[str, dict]:
    """Method results keyed by kind (none, instruction, soft, lora); soft keys carry a version."""
    return {m["method"]["kind"]: m for m in methods.values()}


def summarise(out: Path) -> dict:
    from ragpt.softprompts.registry import PromptRegistry

    registry = PromptRegistry("prompts")
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
        if soft and d in registry.departments():
            row["registry_state"] = registry.status(d, row["training"]["version"])["state"]
        rows[d] = row
    return rows


def pooled(out: Path, rows: dict) -> dict:
    """doc2dial agencies pooled: token-F1 none vs soft over all their test questions, paired.

    "all prompts": every agency with its evaluated prompt; "as served": an agency whose prompt is
    not active answers without one (what the registry serves now).
    """
    from ragpt.evaluation.metrics import bootstrap_ci, paired_difference_ci

    res = {}
    for context in ("retrieved", "gold"):
        none, soft, served = [], [], []
        for d in DOC2DIAL:
            f = out / d / context / "predictions.jsonl"
            if not f.is_file():
                return {}
            by = predictions_f1(f)
            active = rows.get(d, {}).get("registry_state") == "active"
            for qid, f1 in by["none"].items():
                none.append(f1)
                soft.append(by["soft"][qid])
                served.append(by["soft"][qid] if active else f1)
        res[context] = {"n": len(none), "none": bootstrap_ci(none).to_dict(),
                        "all prompts": bootstrap_ci(soft).to_dict(),
                        "all prompts - none": paired_difference_ci(soft, none).to_dict(),
                        "as served": bootstrap_ci(served).to_dict(),
                        "as served - none": paired_difference_ci(served, none).to_dict()}
    return res


def markdown(rows: dict, pool: dict | None = None) -> str:
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
    if pool:
        lines += ["", f"doc2dial pooled ({', '.join(DOC2DIAL)}; each question with its own agency's prompt):", "",
                  "| context | n | no prompt | every agency's prompt | paired diff | as served now | paired diff |",
                  "|---|---|---|---|---|---|---|"]
        for context, p in pool.items():
            lines.append(f"| {context} | {p['n']} | {format_ci(p['none'])} | {format_ci(p['all prompts'])} | "
                         f"{format_ci(p['all prompts - none'], True)} | {format_ci(p['as served'])} | "
                         f"{format_ci(p['as served - none'], True)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/departments")
    rows = summarise(out)
    pool = pooled(out, rows)
    (out.parent / "departments.json").write_text(json.dumps({**rows, "doc2dial_pooled": pool}, indent=2,
                                                            default=str) + "\n")
    md = markdown(rows, pool)
    (out.parent / "departments.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
