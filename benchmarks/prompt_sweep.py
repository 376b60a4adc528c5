"""What helps a 135M model's soft prompt most? A small sweep with `ragpt train`, one knob at a time.

Each variant trains a prompt for one department (default: dmv) on its doc2dial train split and
reports the best dev token-F1 (greedy answers, exactly as served) and the step it was reached,
against the same no-prompt baseline. Runs are not registered. Needs the data and index that
benchmarks/department_prompts.sh prepares (.cache/shared-qa, index "shared").

    .venv/bin/python benchmarks/prompt_sweep.py [--department dmv] [--steps 40]

Results: benchmarks/results/prompt_sweep.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

BASE = {"n-tokens": "20", "init": "text", "lr": "3e-2"}
VARIANTS = {  # name -> overrides of BASE
    "base: 20 tokens, text init, lr 3e-2": {},
    "50 tokens": {"n-tokens": "50"},
    "init: sampled vocabulary": {"init": "vocab"},
    "lr 1e-2": {"lr": "1e-2"},
    "lr 1e-1": {"lr": "1e-1"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--department", default="dmv")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--data", type=Path, default=ROOT / ".cache" / "shared-qa" / "doc2dial" / "qa")
    ap.add_argument("--index", default="shared")
    ap.add_argument("--only", nargs="*", help="Run only these variant names.")
    args = ap.parse_args()
    ragpt = [sys.executable, "-m", "ragpt.cli"]
    d = args.department
    out_json = RESULTS / "prompt_sweep.json"
    results = json.loads(out_json.read_text()) if out_json.is_file() else {}
    runs = results.setdefault(d, {})
    for name, override in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        opts = {**BASE, **override}
        ckpt = ROOT / ".cache" / "sweep" / d / "-".join(f"{k}{v}" for k, v in opts.items())
        cmd = [*ragpt, "train", "-d", d, "-i", args.index, "--data", str(args.data / f"{d}.train.jsonl"),
               "--dev-data", str(args.data / f"{d}.dev.jsonl"), "--steps", str(args.steps), "--batch-size", "8",
               "--gold-context", "missed", "--max-context-tokens", "640", "--eval-every", "20", "--dev-max", "32",
               "--patience", "0", "--no-register", "--checkpoint-dir", str(ckpt), "-q"]
        for k, v in opts.items():
            cmd += [f"--{k}", v]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                       stdout=subprocess.DEVNULL)
        meta = json.loads((ckpt / "result" / "meta.json").read_text())
        m = meta["metrics"]
        runs[name] = {"options": opts, "steps": args.steps, "dev_f1": m["dev_f1"],
                      "dev_f1_no_prompt": m.get("dev_f1_no_prompt"), "best_step": m["best_step"],
                      "dev_examples": m["dev_examples"], "minutes": round((time.perf_counter() - t0) / 60, 1),
                      "evals": json.loads((ckpt / "result" / "loss_curve.json").read_text())["evals"]}
        print(f"{name}: dev F1 {m['dev_f1']:.1f} (step {m['best_step']})", flush=True)
        RESULTS.mkdir(exist_ok=True)
        out_json.write_text(json.dumps(results, indent=2) + "\n")

    md = ["# Soft-prompt sweep (one knob at a time; best dev token-F1 over evaluations every 20 steps)", ""]
    for dept, rs in results.items():
        base = next((r["dev_f1_no_prompt"] for r in rs.values() if r.get("dev_f1_no_prompt") is not None), None)
        n = next(iter(rs.values()))["dev_examples"] if rs else 0
        md += [f"## {dept} (dev questions: {n}; no prompt: {base:.1f})" if base is not None else f"## {dept}", "",
               "| variant | steps | best dev F1 | at step | dev F1 by step | minutes |", "|---|---|---|---|---|---|"]
        for name, r in rs.items():
            curve = ", ".join(f"{e['f1']:.0f}" for e in r["evals"])
            md.append(f"| {name} | {r['steps']} | {r['dev_f1']:.1f} | {r['best_step']} | {curve} | {r['minutes']} |")
        md.append("")
    md.append("Command: `.venv/bin/python benchmarks/prompt_sweep.py " + " ".join(sys.argv[1:]) + "`")
    (RESULTS / "prompt_sweep.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
