"""Trainer memory over a run: resident set size after every step, plain and deep prompts.

Each configuration trains in its own child process (so its RSS is its own) with `train_prompt`
as `ragpt train` runs it: real retriever contexts, dev evaluation every 20 steps, checkpoints
off. Per step it records the RSS after the step and the peak RSS so far. Heap modes
(ragpt.training.memory.HEAP_MODE): "default" is glibc as it is (the trainer before it managed
its heap), "trim" returns free heap memory after each step (what `ragpt train` does), "mmap"
fixes glibc's mmap threshold, "ragpt" both.

    .venv/bin/python benchmarks/train_memory.py                      # -> results/train_memory.{json,md,png}
    .venv/bin/python benchmarks/train_memory.py --steps 20 --configs deep:default deep:ragpt
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
RESULTS = Path(__file__).parent / "results"
QA = Path.home() / ".cache/ragpt/shared-qa/doc2dial/qa"


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(kind: str, heap: str, args: dict, queue) -> None:
    import torch

    from ragpt.config import load_settings
    from ragpt.data.qa import load_qa
    from ragpt.lm.models import load_embedder, load_generator_model
    from ragpt.retrieval.index import DocumentIndex
    from ragpt.retrieval.search import Retriever
    from ragpt.training import memory
    from ragpt.training.trainer import TrainConfig, train_prompt

    torch.set_num_threads(args["threads"])
    memory.HEAP_MODE = heap  # "default": what the trainer did before it tuned the heap
    settings = load_settings()
    retriever = Retriever(DocumentIndex.open(settings.index_dir, args["index"]), load_embedder(settings))
    model, tok = load_generator_model(settings)
    qas = load_qa(Path(args["data"]))
    dev = load_qa(Path(args["dev"]))
    cfg = TrainConfig(department=args["department"], depth=1 if kind == "plain" else 0, steps=args["steps"],
                      k=args["k"], max_context_tokens=args["max_context_tokens"], dev_max=args["dev_max"],
                      eval_every=20, patience=0, seed=0)
    curve = []
    t0 = time.perf_counter()
    start = rss_mb()

    def on_step(step: int, loss: float) -> None:
        curve.append({"step": step, "rss_mb": round(rss_mb(), 1),
                      "peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                      "loss": round(loss, 4), "seconds": round(time.perf_counter() - t0, 1)})

    result = train_prompt(model, tok, retriever, qas, cfg, dev_qas=dev, progress=False, log=lambda m: None,
                          on_step=on_step)
    queue.put({"kind": kind, "heap": heap, "depth": result.hyperparameters["depth"], "rss_start_mb": round(start, 1),
               "curve": curve, "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
               "tokens_per_second": result.metrics["tokens_per_second"]})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", default="shared")
    ap.add_argument("--department", default="dmv")
    ap.add_argument("--data", default=str(QA / "dmv.train.jsonl"))
    ap.add_argument("--dev", default=str(QA / "dmv.dev.jsonl"))
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--max-context-tokens", type=int, default=640)
    ap.add_argument("--dev-max", type=int, default=32, help="dev questions per evaluation (kept small: time)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--configs", nargs="+", default=["plain:default", "plain:trim", "deep:default", "deep:trim"])
    ap.add_argument("--out", default="train_memory")
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    runs = []
    for spec in args.configs:
        kind, heap = spec.split(":")
        q = ctx.Queue()
        p = ctx.Process(target=child, args=(kind, heap, vars(args), q))
        p.start()
        res = q.get()
        p.join()
        c = res["curve"]
        first = next((x for x in c if x["step"] >= 5), c[0])
        res["rss_growth_mb_from_step_5"] = round(c[-1]["rss_mb"] - first["rss_mb"], 1)
        res["peak_growth_mb_from_step_5"] = round(c[-1]["peak_mb"] - first["peak_mb"], 1)
        runs.append(res)
        print(f"{spec}: depth {res['depth']}, RSS step 5 {first['rss_mb']:.0f} MB -> step {c[-1]['step']} "
              f"{c[-1]['rss_mb']:.0f} MB, peak {first['peak_mb']:.0f} -> {c[-1]['peak_mb']:.0f} MB, "
              f"{res['tokens_per_second']:.0f} tok/s", flush=True)
    RESULTS.mkdir(exist_ok=True)
    meta = {k: v for k, v in vars(args).items() if k != "configs"}
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"settings": meta, "runs": runs}, indent=2) + "\n")
    lines = [f"# Trainer RSS over {args.steps} steps ({args.department}, k {args.k}, "
             f"max_context_tokens {args.max_context_tokens}, batch 8, dev {args.dev_max} every 20 steps)", "",
             "| prompt | heap | RSS after step 5 -> last (MB) | peak by step 5 -> last (MB) | tokens/s |",
             "|---|---|---|---|---|"]
    for r in runs:
        c = r["curve"]
        first = next((x for x in c if x["step"] >= 5), c[0])
        lines.append(f"| {r['kind']} (depth {r['depth']}) | {r['heap']} "
                     f"| {first['rss_mb']:.0f} -> {c[-1]['rss_mb']:.0f} "
                     f"| {first['peak_mb']:.0f} -> {c[-1]['peak_mb']:.0f} | {r['tokens_per_second']:.0f} |")
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for r in runs:
            ax.plot([x["step"] for x in r["curve"]], [x["rss_mb"] for x in r["curve"]],
                    label=f"{r['kind']} / {r['heap']}")
        ax.set_xlabel("step")
        ax.set_ylabel("RSS (MB)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(RESULTS / f"{args.out}.png", dpi=100)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
