"""Prompt-tuning throughput: ragpt's trainer step vs PEFT PromptTuningConfig + a plain loop.

With --depth N > 1: ragpt's deep prompt (N layers) vs PEFT PrefixTuningConfig (P-tuning v2,
every layer's keys and values) + the same loop; results in train_throughput_deep.{json,md}.

Same model (the embedded SmolLM2-135M-Instruct), same examples (sample-corpus questions with
retrieved context, built by ragpt's template), same batch, same sequence lengths, same dtype.
Each method runs in its own child process (so peak RSS is its own), alternating
ours/peft/ours/peft, and the medians are reported. Results: benchmarks/results/train_throughput.{json,md}.

    .venv/bin/python benchmarks/train_throughput.py [--steps 6] [--batch-size 8] [--dtype bf16|fp32] [--depth 30]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
RESULTS = Path(__file__).parent / "results"


def build_rows(n: int, k: int, max_context_tokens: int):
    """(ids, answer_start) for n sample questions, contexts from the real retriever."""
    from ragpt.config import load_settings
    from ragpt.data.ingest import ingest
    from ragpt.data.qa import QAExample
    from ragpt.data.sample import SAMPLE_DEPARTMENTS, department_dir, sample_questions
    from ragpt.lm.models import load_embedder, load_generator_model
    from ragpt.retrieval.search import Retriever
    from ragpt.training.trainer import TrainConfig, build_examples

    tmp = Path(tempfile.mkdtemp(prefix="ragpt-bench-"))
    settings = load_settings(index_dir=tmp)
    emb = load_embedder(settings)
    for d in SAMPLE_DEPARTMENTS:
        ingest(tmp, "bench", [department_dir(d)], [d], emb, source_root=department_dir(d).parent, progress=False)
    from ragpt.retrieval.index import DocumentIndex

    retriever = Retriever(DocumentIndex.open(tmp, "bench"), emb)
    _, tok = load_generator_model(settings)
    rows = []
    for d in SAMPLE_DEPARTMENTS:
        qas = [QAExample(q.question, q.answers, doc_id=q.source) for q in sample_questions(d)]
        cfg = TrainConfig(department=d, k=k, max_context_tokens=max_context_tokens)
        rows += [(e.ids, e.answer_start) for e in build_examples(qas, retriever, tok, cfg, progress=False)]
    return rows[:n]


def run_method(method: str, rows, steps: int, batch_size: int, dtype: str, n_tokens: int, depth: int,
               queue) -> None:
    import torch

    from ragpt.config import load_settings
    from ragpt.lm.models import load_generator_model

    torch.manual_seed(0)
    model, tok = load_generator_model(load_settings())
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if dtype == "bf16" else None
    batches = [rows[(i * batch_size) % len(rows):][:batch_size] for i in range(steps + 1)]
    batches = [b if len(b) == batch_size else rows[:batch_size] for b in batches]

    if method in ("ragpt", "ragpt_autocast", "ragpt_deep"):
        import contextlib

        from ragpt.data.qa import QAExample
        from ragpt.lm.models import inference_model
        from ragpt.softprompts.deep import deep_from_shallow
        from ragpt.training.trainer import PromptModule, TrainExample, answer_loss_sum

        init = model.get_input_embeddings().weight[:n_tokens].detach().clone()
        if method == "ragpt_deep":
            init = deep_from_shallow(model, init, depth)
        if method != "ragpt_autocast" and dtype == "bf16":  # what train_prompt does: a frozen bf16 weight copy
            model = inference_model(model, True)
            autocast = None
        module = PromptModule(init)
        opt = torch.optim.AdamW(module.parameters(), lr=1e-2)
        qa = QAExample("q", ["a"])
        ctx = autocast or contextlib.nullcontext

        def step(batch):
            ex = [TrainExample(ids, start, qa, ids[:start], True) for ids, start in batch]
            opt.zero_grad(set_to_none=True)
            loss, count = answer_loss_sum(model, module, ex, ctx)
            (loss / count).backward()
            opt.step()
    else:
        import contextlib

        from peft import PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model

        config_cls = PrefixTuningConfig if method == "peft_prefix" else PromptTuningConfig
        peft_model = get_peft_model(model, config_cls(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=n_tokens))
        opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
        ctx = autocast or contextlib.nullcontext

        def step(batch):
            T = max(len(ids) for ids, _ in batch)
            input_ids = torch.full((len(batch), T), tok.pad_token_id)
            mask = torch.zeros((len(batch), T), dtype=torch.long)
            labels = torch.full((len(batch), T), -100)
            for i, (ids, start) in enumerate(batch):  # right padding, as ragpt's trainer
                input_ids[i, :len(ids)] = torch.tensor(ids)
                mask[i, :len(ids)] = 1
                labels[i, start:len(ids)] = torch.tensor(ids[start:])
            opt.zero_grad(set_to_none=True)
            with ctx():
                out = peft_model(input_ids=input_ids, attention_mask=mask, labels=labels)
            out.loss.backward()
            opt.step()

    step(batches[0])  # warm-up (allocations, kernels)
    t0 = time.perf_counter()
    for b in batches[1:]:
        step(b)
    secs = time.perf_counter() - t0
    tokens = sum(len(ids) + n_tokens for b in batches[1:] for ids, _ in b)
    queue.put({
        "method": method, "seconds_per_step": secs / steps, "tokens_per_second": tokens / secs,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    })


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--n-tokens", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--max-context-tokens", type=int, default=768)
    ap.add_argument("--depth", type=int, default=1, help="> 1: deep prompts vs PEFT prefix tuning")
    args = ap.parse_args()

    rows = build_rows(60, args.k, args.max_context_tokens)
    ctx = mp.get_context("spawn")
    # ragpt_autocast: our loss on the fp32 weights under autocast, to separate what the answer-only
    # LM head + causal-only attention buy from what the bf16 weight copy buys.
    methods = ("ragpt", "peft", "ragpt_autocast") if args.dtype == "bf16" else ("ragpt", "peft")
    if args.depth > 1:
        methods = ("ragpt_deep", "peft_prefix")
    ours, theirs = methods[:2]
    name = "train_throughput" if args.depth == 1 else "train_throughput_deep"
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for _ in range(args.repeats):
        for method in methods:
            q = ctx.Queue()
            p = ctx.Process(target=run_method, args=(method, rows, args.steps, args.batch_size, args.dtype,
                                                     args.n_tokens, args.depth, q))
            p.start()
            res = q.get()
            p.join()
            runs[method].append(res)
            print(json.dumps(res), flush=True)
    summary = {m: {k: round(statistics.median(r[k] for r in rs), 3)
                   for k in ("seconds_per_step", "tokens_per_second", "peak_rss_mb")} for m, rs in runs.items()}
    speedup = summary[ours]["tokens_per_second"] / summary[theirs]["tokens_per_second"]
    mean_len = statistics.mean(len(ids) for ids, _ in rows)
    mean_answer = statistics.mean(len(ids) - s for ids, s in rows)
    out = {
        "config": {**vars(args), "mean_sequence_tokens": round(mean_len, 1),
                   "mean_answer_tokens": round(mean_answer, 1),
                   "torch_threads": __import__("torch").get_num_threads(), "python": sys.version.split()[0]},
        "median": summary, "speedup_tokens_per_second": round(speedup, 2), "runs": runs,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=2) + "\n")
    kind = "Deep-prompt" if args.depth > 1 else "Prompt"
    md = [f"# {kind}-tuning throughput ({args.dtype}, batch {args.batch_size}, {args.steps} steps, "
          f"mean {mean_len:.0f} tokens/row, {mean_answer:.1f} answer tokens)", "",
          "| method | tokens/s | s/step | peak RSS (MB) |", "|---|---|---|---|"]
    for m, s in summary.items():
        md.append(f"| {m} | {s['tokens_per_second']:.0f} | {s['seconds_per_step']:.2f} | {s['peak_rss_mb']:.0f} |")
    if args.depth > 1:
        md += ["", f"ragpt deep prompt ({args.depth} layers, trainer path) / PEFT prefix tuning "
                   f"({args.dtype}) tokens/s: **{speedup:.2f}x**"]
    elif args.dtype == "bf16":
        md += ["", f"ragpt (trainer path: bf16 weight copy, fp32 prompt) / PEFT (bf16 autocast, fp32 prompt) "
                   f"tokens/s: **{speedup:.2f}x**"]
        sp2 = summary["ragpt_autocast"]["tokens_per_second"] / summary["peft"]["tokens_per_second"]
        out["speedup_autocast_tokens_per_second"] = round(sp2, 2)
        (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=2) + "\n")
        md += [f"ragpt's loss under the same autocast as PEFT / PEFT: **{sp2:.2f}x**"]
    else:
        md += ["", f"ragpt / PEFT tokens/s (both fp32): **{speedup:.2f}x**"]
    md += ["",
           "Command: `.venv/bin/python benchmarks/train_throughput.py " + " ".join(sys.argv[1:]) + "`"]
    (RESULTS / f"{name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
