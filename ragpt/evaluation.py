"""Offline evaluation of answer quality: no soft prompt vs registry versions, on a QA set.

Inputs are built exactly as training and serving build them (ragpt.train.build_examples ->
the one template), so a score here is the score the endpoint would get.
"""

from __future__ import annotations

import time

import torch

from ragpt.generator import Generator
from ragpt.qa import QAExample
from ragpt.retrieval import Retriever
from ragpt.train import TrainConfig, build_examples, evaluate


def evaluate_methods(
    generator: Generator,
    retriever: Retriever,
    qas: list[QAExample],
    department: str,
    prompts: dict[str, torch.Tensor | None],
    *,
    k: int = 2,
    gold_context: str = "never",
    max_context_tokens: int = 768,
    max_new_tokens: int = 48,
    progress: bool = True,
) -> dict:
    """Score every method (name -> soft prompt or None) on the same inputs."""
    cfg = TrainConfig(department=department, k=k, gold_context=gold_context, max_context_tokens=max_context_tokens)
    cfg.check()
    examples = build_examples(qas, retriever, generator.tokenizer, cfg, progress)
    out = {
        "department": department, "n": len(examples), "k": k, "gold_context": gold_context,
        "retrieval_hit_rate": round(100 * sum(e.retrieval_hit for e in examples) / max(1, len(examples)), 2),
        "methods": {},
    }
    for name, prompt in prompts.items():
        t0 = time.perf_counter()
        r = evaluate(generator, examples, prompt, max_new_tokens)
        out["methods"][name] = {
            "f1": round(r["f1"], 2), "em": round(r["em"], 2),
            "seconds_per_answer": round((time.perf_counter() - t0) / max(1, len(examples)), 3),
            "examples": [
                {"question": e.qa.question, "prediction": p, "answers": e.qa.answers[:2]}
                for e, p in list(zip(examples, r["predictions"]))[:5]
            ],
        }
    return out
