"""Deep vs plain soft prompts, each trained with the same gold-context setting and tested in the
matching condition (`always`: gold passage in the context; `never`: retrieved context only).

Pairs benchmarks/results/gold_context_<mode>/<dept>/<context> (plain prompts, depth 1) with
benchmarks/results/deep<depth>_<mode>/<dept>/<context> by question; writes
benchmarks/results/deep<depth>_<mode>.{json,md}: token-F1 per agency and pooled, paired
bootstrap intervals.

    .venv/bin/python benchmarks/deep_prompt_table.py always 30
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from department_table import paired_agencies, three_way_row  # benchmarks/ is the script's folder

RESULTS = Path(__file__).parent / "results"


def train_minutes(folder: Path) -> float | None:
    """Training wall time from the `ragpt train` summary that ends train.log (JSON after the log lines)."""
    try:
        text = (folder / "train.log").read_text()
        return round(json.loads(text[text.index("\n{") + 1:])["metrics"]["train_seconds"] / 60, 1)
    except (OSError, ValueError, KeyError):
        return None


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else "always"
    depth = int(sys.argv[2]) if len(sys.argv) > 2 else 30
    context = {"never": "retrieved", "always": "gold"}.get(mode)
    if context is None:
        raise SystemExit(f"mode must be never or always, not {mode!r}")
    name = f"deep{depth}_{mode}"
    rows, missing = paired_agencies(lambda d: RESULTS / f"gold_context_{mode}" / d, lambda d: RESULTS / name / d,
                                    context, "plain", "deep")
    if not rows:
        raise SystemExit(f"no results under {RESULTS / name}")
    minutes = {d: (train_minutes(RESULTS / f"gold_context_{mode}" / d), train_minutes(RESULTS / name / d))
               for d in rows if d != "pooled"}
    (RESULTS / f"{name}.json").write_text(json.dumps({"rows": rows, "train_minutes": minutes}, indent=2) + "\n")
    md = [f"# Deep (depth {depth}) vs plain soft prompts, trained with `--gold-context {mode}`, "
          f"test F1 with {context} context", "",
          "| agency | n | no prompt | plain | deep | plain - none | deep - none | deep - plain "
          "| train min plain / deep |",
          "|---|---|---|---|---|---|---|---|---|"]
    for d, r in rows.items():
        mins = " / ".join("?" if m is None else f"{m:.1f}" for m in minutes.get(d, ())) or ""
        md.append(f"{three_way_row(d, r, 'plain', 'deep')} {mins} |")
    if missing:
        md += ["", f"Not run (so not in the pooled row): {', '.join(missing)}."]
    md += ["", f"Commands: `MODE={mode} benchmarks/gold_context_ablation.sh` (plain), "
           f"`MODE={mode} DEPTH={depth} LR=1e-2 benchmarks/gold_context_ablation.sh` (deep), then "
           f"`.venv/bin/python benchmarks/deep_prompt_table.py {mode} {depth}`"]
    (RESULTS / f"{name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
