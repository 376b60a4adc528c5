"""Are the published doc2dial numbers what the service gives? Re-evaluate the active prompts as served.

The deep prompts' results in benchmarks/results/deep30_never/ were measured with explicit
`--max-context-tokens 640` (and k 2). This reruns `ragpt eval` for each agency's active prompt
with NO input flags, so every input comes from the prompt version's input contract, exactly
as `ragpt serve`, `ragpt ask` and LangChain build it, and compares token-F1 (none and soft)
with the stored results. Needs the shared index and the imported QA files (`./run demo` makes both).

    .venv/bin/python benchmarks/served_contract_check.py            # -> results/served_contract_check.{json,md}
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
AGENCIES = ("dmv", "ssa", "studentaid", "va")


def eval_as_served(agency: str, version: str, qa_dir: Path, out: Path, rerun: bool = False) -> dict:
    """`ragpt eval` of an agency's version and no prompt with no input flags (every input from the
    version's contract, as served) into `out`, unless a report is there already; its results."""
    qa = qa_dir / agency
    cmd = [sys.executable, "-m", "ragpt.cli", "eval", "-q", "-i", "shared", "-d", agency, "--data", f"{qa}.test.jsonl",
           "--train-data", f"{qa}.train.jsonl", "--dev-data", f"{qa}.dev.jsonl", "--prompt", version,
           "--method", "none", "--method", "soft", "--out", str(out)]
    if rerun or not (out / "results.json").is_file():
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "results.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--qa-dir", type=Path, default=Path.home() / ".cache/ragpt/shared-qa/doc2dial/qa")
    ap.add_argument("--stored", type=Path, default=RESULTS / "deep30_never")
    ap.add_argument("--work", type=Path, default=RESULTS / "served_contract_check")
    ap.add_argument("--agencies", nargs="+", default=list(AGENCIES))
    ap.add_argument("--rerun", action="store_true", help="evaluate again even where a report exists")
    args = ap.parse_args()
    rows = []
    for d in args.agencies:
        stored = json.loads((args.stored / d / "retrieved" / "results.json").read_text())
        version = stored["run"]["prompt_specs"][0]
        out = args.work / d
        now = eval_as_served(d, version, args.qa_dir, out, args.rerun)
        dept_now, dept_then = now["departments"][d], stored["departments"][d]
        row = {"agency": d, "version": version, "n": dept_now["n"], "contract": dept_now["contract"],
               "contract_source": dept_now["contract_source"]}
        for m in ("none", f"soft:{version}"):
            row[m.split(":")[0]] = {"stored": dept_then["methods"][m]["f1"]["mean"],
                                    "served": dept_now["methods"][m]["f1"]["mean"]}
        row["soft_minus_none_served"] = dept_now["methods"][f"soft:{version}"]["vs_none"]["f1"]
        preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
        row["f1_per_question"] = {m.split(":")[0]: [100 * r["f1"] for r in preds if r["method"] == m]
                                  for m in ("none", f"soft:{version}")}
        rows.append(row)
        print(d, version, row["none"], row["soft"], flush=True)
    from ragpt.evaluation.metrics import bootstrap_ci, paired_difference_ci

    none = [x for r in rows for x in r["f1_per_question"]["none"]]
    soft = [x for r in rows for x in r["f1_per_question"]["soft"]]
    pooled = {"n": len(none), "none": bootstrap_ci(none).to_dict(), "soft": bootstrap_ci(soft).to_dict(),
              "soft - none": paired_difference_ci(soft, none).to_dict()}
    for r in rows:
        del r["f1_per_question"]
    args.work.mkdir(parents=True, exist_ok=True)
    (RESULTS / "served_contract_check.json").write_text(json.dumps({"agencies": rows, "pooled": pooled}, indent=2)
                                                        + "\n")
    lines = ["# doc2dial deep prompts re-evaluated with the input contract the service applies", "",
             "`ragpt eval` with no input flags: k, prompt budget, retrieval mode and query rule come from each "
             "prompt version's contract. Token-F1 (%) on the retrieved-context test questions, stored "
             "(measured with explicit `-k 2 --max-context-tokens 640`) vs served.", "",
             "| agency | version | n | contract (k, budget, query rule) | none: stored / served | "
             "soft: stored / served |", "|---|---|---|---|---|---|"]
    for r in rows:
        c = r["contract"]
        lines.append(f"| {r['agency']} | {r['version']} | {r['n']} | {c['k']}, {c['max_context_tokens']}, "
                     f"{c['query_rule']} | {r['none']['stored']} / {r['none']['served']} | "
                     f"{r['soft']['stored']} / {r['soft']['served']} |")
    d = pooled["soft - none"]
    lines += ["", f"Pooled (n={pooled['n']}), served: none {pooled['none']['mean']:.1f}, soft "
              f"{pooled['soft']['mean']:.1f}, soft - none {d['mean']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}] "
              "(paired bootstrap 95%).", "", "Command: `.venv/bin/python benchmarks/served_contract_check.py`", ""]
    (RESULTS / "served_contract_check.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
