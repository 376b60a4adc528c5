"""Does the dev set decide as the test set would? Dev and test evaluations of the same prompts.

For each department (doc2dial's dmv, ssa, studentaid, va; PolicyQA's legal) a soft prompt is
trained with `ragpt train`'s defaults (deep prompt, its learning rate and steps, dev = 15% of the
training questions held out by document, at most 200, spread across documents), evaluating on dev
every 20 steps as the trainer does. At each of those evaluations the same prompt is also evaluated
on the department's test questions (never used for any choice; PolicyQA's 4,152 are spread-sampled
to 200), through the trainer's own `evaluate` (the served input contract), and both are compared
with no prompt (paired bootstrap 95% intervals). Reported per department and in all:

* sign agreement: at how many evaluations dev's difference from no prompt has the sign of test's;
* verdict agreement: dev's release verdict (better / no better / worse, the interval vs 0) and
  test's at the same step;
* the step chosen: dev's best step, and whether it is test's best step (and what test loses by it).

    .venv/bin/python benchmarks/dev_test_agreement.py                # all five, ~1.5 h on 2 cores
    .venv/bin/python benchmarks/dev_test_agreement.py --depts dmv legal

Needs the imported QA sets (`ragpt import-data doc2dial|policyqa --out DIR`, `--qa-dir`) and the
`shared` index with every department ingested (benchmarks/department_prompts.sh builds both).
Nothing is registered. Results: benchmarks/results/dev_test_agreement.{json,md} (rewritten after
each department, so an interrupted run keeps what it finished; a later run with the same settings
adds its departments to those, replacing any it runs again).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ragpt.config import load_settings  # noqa: E402
from ragpt.data.qa import load_qa, spread_sample  # noqa: E402
from ragpt.lm.generator import Generator, resolve_bf16  # noqa: E402
from ragpt.lm.models import inference_model, load_embedder, load_generator_model  # noqa: E402
from ragpt.retrieval.index import DocumentIndex  # noqa: E402
from ragpt.retrieval.search import Retriever  # noqa: E402
from ragpt.training.trainer import (  # noqa: E402
    TrainConfig,
    build_examples,
    evaluate,
    release_verdict,
    train_prompt,
    versus_no_prompt,
)

DEPTS = ("dmv", "ssa", "studentaid", "va", "legal")
TEST_MAX = 200


def data_set(dept: str) -> str:
    return "policyqa" if dept == "legal" else "doc2dial"


def sign(delta: float) -> int:
    return (delta > 0) - (delta < 0)


def run_department(dept: str, args, settings, embedder, model, tok) -> dict:
    qa_dir = args.qa_dir / data_set(dept) / "qa"
    train_qas = load_qa(qa_dir / f"{dept}.train.jsonl")
    test_qas = spread_sample(load_qa(qa_dir / f"{dept}.test.jsonl"), TEST_MAX, seed=0)
    index = DocumentIndex.open(settings.index_dir, args.index)
    retriever = Retriever(index, embedder, dense=settings.dense, bm25=settings.bm25, rrf_k=settings.rrf_k)
    cfg = TrainConfig(department=dept, steps=args.steps, eval_every=20, patience=0,
                      max_context_tokens=args.max_context_tokens, bf16=resolve_bf16(settings.bf16))
    cfg.resolve(model, print)
    test = build_examples(test_qas, retriever, tok, replace(cfg, gold_context="never"), progress=False,
                          on_skip=lambda qa, e: None)
    generator = Generator(inference_model(model, bool(cfg.bf16)), tok)  # as the trainer's dev evaluation
    base = evaluate(generator, test, None, cfg.eval_max_new_tokens)
    print(f"[agree] {dept}: {len(train_qas)} training questions, test n={len(test)}, "
          f"test F1 without a prompt {base['f1']:.1f}", flush=True)
    at_eval: dict[int, dict] = {}

    def on_eval(step: int, prompt: torch.Tensor, entry: dict) -> None:
        r = evaluate(generator, test, prompt, cfg.eval_max_new_tokens)
        at_eval[step] = {"f1": round(r["f1"], 3), "vs_none": versus_no_prompt(r["f1s"], base["f1s"], cfg.seed)}
        vs = at_eval[step]["vs_none"]
        print(f"[agree] {dept} step {step}: dev {entry['vs_none']['delta']:+.1f}, test {vs['delta']:+.1f} "
              f"[{vs['low']:+.1f}, {vs['high']:+.1f}]", flush=True)

    t0 = time.perf_counter()
    result = train_prompt(model, tok, retriever, train_qas, cfg, checkpoint_dir=None, progress=False,
                          log=lambda m: print(m, flush=True), on_eval=on_eval)
    evals = []
    for e in result.evals:
        t = at_eval[e["step"]]
        evals.append({"step": e["step"], "dev_f1": e["f1"], "dev_vs_none": e["vs_none"], "test_f1": t["f1"],
                      "test_vs_none": t["vs_none"],
                      "sign_agrees": sign(e["vs_none"]["delta"]) == sign(t["vs_none"]["delta"]),
                      "dev_verdict": release_verdict(e["vs_none"], e["step"])["verdict"],
                      "test_verdict": release_verdict(t["vs_none"], e["step"])["verdict"]})
    chosen = result.metrics["best_step"]
    test_best = max(evals, key=lambda e: (e["test_f1"], -e["step"]))["step"]
    kept = next(e for e in evals if e["step"] == chosen)
    best_test_f1 = max(e["test_f1"] for e in evals)
    return {
        "department": dept, "data_set": data_set(dept), "train_questions": result.metrics["train_examples"],
        "dev_questions": result.metrics["dev_examples"], "test_questions": len(test),
        "dev_f1_no_prompt": result.metrics.get("dev_f1_no_prompt"), "test_f1_no_prompt": round(base["f1"], 3),
        "evals": evals, "chosen_step": chosen, "test_best_step": test_best,
        "chosen_is_test_best": chosen == test_best,
        "test_f1_lost_by_choice": round(best_test_f1 - kept["test_f1"], 3),
        "kept": {"step": chosen, "dev_verdict": kept["dev_verdict"], "test_verdict": kept["test_verdict"],
                 "dev_vs_none": kept["dev_vs_none"], "test_vs_none": kept["test_vs_none"]},
        "hyperparameters": {"depth": cfg.depth, "lr": cfg.lr, "steps": cfg.steps, "warmup_steps": cfg.warmup_steps,
                            "dev_fraction": cfg.dev_fraction, "dev_max": cfg.dev_max,
                            "max_context_tokens": cfg.max_context_tokens},
        "train_seconds": round(time.perf_counter() - t0, 1),
    }


def ci(v: dict) -> str:
    return f"{v['delta']:+.1f} [{v['low']:+.1f}, {v['high']:+.1f}]"


def markdown(res: dict) -> str:
    rows = res["departments"]
    lines = ["# Dev and test agreement (benchmarks/dev_test_agreement.py)", "",
             "Each department's prompt trained with `ragpt train`'s defaults; at every dev evaluation the same "
             "prompt is evaluated on test too. Differences are prompt minus no prompt, token-F1, paired bootstrap "
             "95% intervals; a verdict is better / no better / worse by whether the interval excludes 0.", "",
             "| department | step | dev F1 (n) | dev - none | test F1 (n) | test - none | sign agrees "
             "| verdict dev / test |",
             "|---|---:|---|---|---|---|---|---|"]
    for d in rows:
        for e in d["evals"]:
            mark = " (kept)" if e["step"] == d["chosen_step"] else ""
            lines.append(f"| {d['department']} | {e['step']}{mark} | {e['dev_f1']:.1f} ({d['dev_questions']}) | "
                         f"{ci(e['dev_vs_none'])} | {e['test_f1']:.1f} ({d['test_questions']}) | "
                         f"{ci(e['test_vs_none'])} | {'yes' if e['sign_agrees'] else 'no'} | "
                         f"{e['dev_verdict']} / {e['test_verdict']} |")
    evals = [e for d in rows for e in d["evals"]]
    lines += ["", "| department | no prompt dev / test | step kept (test's best) | test F1 lost by the choice | "
              "kept: test - none | train min |", "|---|---|---|---|---|---|"]
    for d in rows:
        lines.append(f"| {d['department']} | {d['dev_f1_no_prompt']:.1f} / {d['test_f1_no_prompt']:.1f} | "
                     f"{d['chosen_step']} ({d['test_best_step']}) | {d['test_f1_lost_by_choice']:.1f} | "
                     f"{ci(d['kept']['test_vs_none'])} | {d['train_seconds'] / 60:.1f} |")
    if evals:
        agree = sum(e["sign_agrees"] for e in evals)
        verdicts = sum(e["dev_verdict"] == e["test_verdict"] for e in evals)
        kept = sum(d["kept"]["dev_verdict"] == d["kept"]["test_verdict"] for d in rows)
        best = sum(d["chosen_is_test_best"] for d in rows)
        lines += ["", f"Sign of dev's difference = sign of test's: {agree} of {len(evals)} evaluations. "
                  f"Same verdict: {verdicts} of {len(evals)} evaluations, {kept} of {len(rows)} kept prompts. "
                  f"The step dev chose is test's best step in {best} of {len(rows)} departments.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depts", nargs="+", default=list(DEPTS), choices=DEPTS)
    ap.add_argument("--qa-dir", type=Path, default=None, help="imported QA sets (default: cache_dir/shared-qa)")
    ap.add_argument("--index", default="shared")
    ap.add_argument("--steps", type=int, default=None, help="default: ragpt train's")
    ap.add_argument("--max-context-tokens", type=int, default=640)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    settings = load_settings()
    args.qa_dir = args.qa_dir or Path(settings.cache_dir) / "shared-qa"
    if args.steps is None:
        args.steps = TrainConfig(department="x").steps
    embedder = load_embedder(settings)
    model, tok = load_generator_model(settings)
    res = {"config": {"steps": args.steps, "max_context_tokens": args.max_context_tokens, "threads": args.threads,
                      "index": args.index, "test_max": TEST_MAX}, "departments": []}
    args.out.mkdir(parents=True, exist_ok=True)
    done = args.out / "dev_test_agreement.json"
    if done.is_file():  # an earlier run with the same settings: keep the departments it finished
        old = json.loads(done.read_text())
        if {k: v for k, v in old["config"].items() if k != "threads"} == {
                k: v for k, v in res["config"].items() if k != "threads"}:
            res["departments"] = [d for d in old["departments"] if d["department"] not in args.depts]
    for dept in args.depts:
        res["departments"].append(run_department(dept, args, settings, embedder, model, tok))
        evals = [e for d in res["departments"] for e in d["evals"]]
        res["sign_agreement"] = {"agree": sum(e["sign_agrees"] for e in evals), "evaluations": len(evals)}
        (args.out / "dev_test_agreement.json").write_text(json.dumps(res, indent=2) + "\n")
        (args.out / "dev_test_agreement.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
