"""Where a prompt-tuning step's time goes, and what the trainer's choices buy.

(a) One forward + backward of ragpt's answer-only loss on the embedded generator (batch 8 rows of
~500 random tokens, 20-token prompt): padding mask vs causal-only attention, bf16 autocast vs a
bf16 weight copy, SDPA's CPU flash kernel vs ragpt's chunked causal attention. (b) Attention alone
at that shape (8 rows, 9 query heads sharing 3 key/value heads, 520 x 64, causal, fwd + bwd): SDPA's
flash kernel in bf16 / fp32, an explicit matmul-softmax over the whole square, and ragpt's chunked
causal attention. Minimum of 3 timed repeats after a warm-up. Results: benchmarks/results/train_step_profile.{json,md}.

    .venv/bin/python benchmarks/train_step_profile.py
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
RESULTS = Path(__file__).parent / "results"
LENGTHS = [500, 510, 490, 505, 495, 500, 508, 498]
N_PROMPT, ANSWER = 20, 7


def _best(fn, repeats: int = 3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def step_variants() -> dict[str, float]:
    from ragpt.config import load_settings
    from ragpt.lm.models import inference_model, load_generator_model
    from ragpt.training.causal_attention import chunked_causal_attention

    torch.manual_seed(0)
    model, _ = load_generator_model(load_settings())
    model.requires_grad_(False)
    bf16_copy = inference_model(model, True)
    rows = [torch.randint(100, 40000, (n,)) for n in LENGTHS]
    T = max(LENGTHS)
    ids = torch.zeros((len(rows), T), dtype=torch.long)
    mask = torch.zeros((len(rows), T + N_PROMPT), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
        mask[i, :N_PROMPT + len(r)] = 1
    pos = [(i, N_PROMPT + t - 1, int(r[t])) for i, r in enumerate(rows) for t in range(len(r) - ANSWER, len(r))]
    ri, pi, tg = (torch.tensor(x) for x in zip(*pos))

    def run(m, use_mask: bool, autocast: bool, chunked: bool = False):
        prompt = torch.nn.Parameter(m.get_input_embeddings().weight[:N_PROMPT].detach().float().clone())
        ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast else contextlib.nullcontext
        attention = (lambda: chunked_causal_attention(m)) if chunked else contextlib.nullcontext

        def step():
            with ctx(), attention():
                te = m.get_input_embeddings()(ids)
                x = torch.cat([prompt.to(te.dtype).unsqueeze(0).expand(len(rows), -1, -1), te], 1)
                positions = torch.arange(T + N_PROMPT).unsqueeze(0).expand(len(rows), -1)
                h = m.base_model(inputs_embeds=x, attention_mask=mask if use_mask else None,
                                 position_ids=positions, use_cache=False).last_hidden_state
                logits = m.get_output_embeddings()(h[ri, pi])
            F.cross_entropy(logits.float(), tg, reduction="sum").backward()
        return _best(step)

    return {
        "autocast, padding mask": run(model, True, True),
        "autocast, causal only": run(model, False, True),
        "bf16 weight copy, padding mask": run(bf16_copy, True, False),
        "bf16 weight copy, causal only, SDPA flash": run(bf16_copy, False, False),
        "bf16 weight copy, causal only, chunked attention (trainer)": run(bf16_copy, False, False, True),
    }


def attention_variants() -> dict[str, float]:
    from ragpt.training.causal_attention import chunked_causal

    B, H, KV, L, D = 8, 9, 3, 520, 64
    causal = torch.ones(L, L, dtype=torch.bool).tril()

    def explicit(q, k, v):  # the whole L x L square, as transformers' eager attention computes it
        k, v = (t.repeat_interleave(H // KV, 1) for t in (k, v))
        s = (q @ k.transpose(-1, -2)).float() * D ** -0.5
        return torch.softmax(s.masked_fill(~causal, float("-inf")), -1).to(q.dtype) @ v

    def flash(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    out = {}
    for name, fn, dtype in (("SDPA flash, bf16", flash, torch.bfloat16), ("SDPA flash, fp32", flash, torch.float32),
                            ("explicit matmul + softmax, bf16", explicit, torch.bfloat16),
                            ("ragpt chunked causal, bf16", chunked_causal, torch.bfloat16)):
        q, k, v = (torch.randn(B, n, L, D, dtype=dtype, requires_grad=True) for n in (H, KV, KV))
        out[name] = _best(lambda fn=fn, q=q, k=k, v=v: fn(q, k, v).sum().backward())
    return out


def main() -> None:
    steps = step_variants()
    attn = attention_variants()
    res = {"step_seconds": steps, "attention_fwd_bwd_seconds_per_layer": attn,
           "shape": {"rows": len(LENGTHS), "tokens_per_row": LENGTHS, "prompt_tokens": N_PROMPT,
                     "answer_tokens": ANSWER, "layers": 30}, "torch_threads": torch.get_num_threads()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "train_step_profile.json").write_text(json.dumps(res, indent=2) + "\n")
    md = ["# Prompt-tuning step profile (SmolLM2-135M, 8 rows x ~500 tokens, minimum of 3)", "",
          "| training step variant | s/step |", "|---|---|"]
    md += [f"| {k} | {v:.2f} |" for k, v in steps.items()]
    md += ["", "| attention alone, fwd + bwd, one layer (8 rows, 9 query / 3 kv heads, 520 x 64, causal) | ms |",
           "|---|---|"]
    md += [f"| {k} | {1000 * v:.0f} |" for k, v in attn.items()]
    md += ["", "Command: `.venv/bin/python benchmarks/train_step_profile.py`"]
    (RESULTS / "train_step_profile.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
