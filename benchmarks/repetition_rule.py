"""Does the loop rule (ragpt.lm.repetition) cost token-F1 anywhere? Paired, question by question.

Re-runs `ragpt eval` exactly as benchmarks/served_contract_check.py does (each agency's active
prompt and no prompt, inputs from the prompt's contract) with the rule on, and compares every
prediction with the one stored in results/served_contract_check/, made before the rule existed.
The rule only ever stops a row early, so each new prediction must be the stored one or a prefix
of it; questions where it did not fire must score exactly the same. Reports how often it fired
and the paired bootstrap interval of the F1 difference, overall and where it fired.

    .venv/bin/python benchmarks/repetition_rule.py      # -> results/repetition_rule.{json,md}
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from served_contract_check import eval_as_served  # benchmarks/ is the script's folder

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
AGENCIES = ("dmv", "ssa", "studentaid", "va")


def _predictions(folder: Path) -> dict[tuple[str, str], dict]:
    rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines() if line.strip()]
    return {(r["method"].split(":")[0], r["qid"]): r for r in rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--qa-dir", type=Path, default=Path.home() / ".cache/ragpt/shared-qa/doc2dial/qa")
    ap.add_argument("--before", type=Path, default=RESULTS / "served_contract_check")
    ap.add_argument("--work", type=Path, default=RESULTS / "repetition_rule")
    ap.add_argument("--agencies", nargs="+", default=list(AGENCIES))
    ap.add_argument("--rerun", action="store_true", help="evaluate again even where a report exists")
    args = ap.parse_args()
    from ragpt.evaluation.metrics import paired_difference_ci

    pairs = []  # (agency, method, qid, f1 before, f1 after, fired, is_prefix)
    for d in args.agencies:
        stored = json.loads((args.before / d / "results.json").read_text())
        out = args.work / d
        eval_as_served(d, stored["run"]["prompt_specs"][0], args.qa_dir, out, args.rerun)
        before, after = _predictions(args.before / d), _predictions(out)
        if set(before) != set(after):
            raise SystemExit(f"{d}: the two runs scored different questions")
        for key, b in before.items():
            a = after[key]
            fired = a.get("stopped_by") == "repetition"
            prefix = b["prediction"].strip().startswith(a["prediction"].strip())
            pairs.append({"agency": d, "method": key[0], "qid": key[1], "before": 100 * b["f1"],
                          "after": 100 * a["f1"], "fired": fired, "same_text": a["prediction"] == b["prediction"],
                          "prefix": prefix, "tokens_before": b.get("completion_tokens"),
                          "tokens_after": a.get("completion_tokens")})
        print(d, sum(p["fired"] for p in pairs if p["agency"] == d), "fired", flush=True)

    def summary(rows: list[dict]) -> dict:
        ci = paired_difference_ci([r["after"] for r in rows], [r["before"] for r in rows])
        return {"n": len(rows), "fired": sum(r["fired"] for r in rows),
                "f1_before": round(sum(r["before"] for r in rows) / max(1, len(rows)), 2),
                "f1_after": round(sum(r["after"] for r in rows) / max(1, len(rows)), 2),
                "difference": ci.to_dict()}

    unchanged_differ = [p for p in pairs if not p["fired"] and not p["same_text"]]
    result = {
        "all": summary(pairs),
        "by_method": {m: summary([p for p in pairs if p["method"] == m]) for m in ("none", "soft")},
        "where_fired": summary([p for p in pairs if p["fired"]]),
        "not_fired_but_text_differs": len(unchanged_differ),
        "fired_not_a_prefix": sum(p["fired"] and not p["prefix"] for p in pairs),
        "pairs": pairs,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "repetition_rule.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# The loop rule on doc2dial test (active prompts and no prompt, as served)", "",
             "| questions | rule fired | F1 before | F1 after | difference [95% CI] |", "|---|---|---|---|---|"]
    for name, s in [("all", result["all"]), *result["by_method"].items(), ("where it fired", result["where_fired"])]:
        diff = s["difference"]
        lines.append(f"| {name} (n={s['n']}) | {s['fired']} | {s['f1_before']} | {s['f1_after']} | "
                     f"{diff['mean']:+.2f} [{diff['low']:+.2f}, {diff['high']:+.2f}] |")
    lines += ["", f"Questions where the rule did not fire but the text differs: {len(unchanged_differ)} "
              "(other changes since the stored run; 0 means the comparison isolates the rule).",
              f"Fired where the new text is not a prefix of the old: {result['fired_not_a_prefix']}."]
    (RESULTS / "repetition_rule.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
