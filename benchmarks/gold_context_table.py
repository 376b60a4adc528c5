"""Compare soft prompts trained with the gold passage in their contexts when retrieval missed it
(the shipped v1 prompts, `--gold-context missed`) with the ablation's (`never` or `always`).

`never` is compared on the retrieved-context test predictions, `always` on the gold-passage ones
(benchmarks/results/departments/<dept>/<context> vs benchmarks/results/gold_context_<mode>/<dept>/
<context>), paired by question; writes benchmarks/results/gold_context_<mode>.{json,md}: token-F1
per agency and pooled, paired bootstrap intervals.

    .venv/bin/python benchmarks/gold_context_table.py never|always
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from department_table import DOC2DIAL, paired_agencies, three_way_row  # benchmarks/ is the script's folder

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else "never"
    context = {"never": "retrieved", "always": "gold"}.get(mode)
    if context is None:
        raise SystemExit(f"mode must be never or always, not {mode!r}")
    rows, missing = paired_agencies(lambda d: RESULTS / "departments" / d,
                                    lambda d: RESULTS / f"gold_context_{mode}" / d, context, "missed", mode)
    if not rows:
        raise SystemExit(f"none of {', '.join(DOC2DIAL)} has results under {RESULTS / f'gold_context_{mode}'}")
    (RESULTS / f"gold_context_{mode}.json").write_text(json.dumps(rows, indent=2) + "\n")
    trained = {"never": "trained on retrieved only", "always": "trained with gold always"}[mode]
    md = [f"# Gold passage in training contexts: `missed` (v1) vs `{mode}`, test F1 with {context} context", "",
          f"| agency | n | no prompt | trained with gold when missed (v1) | {trained} | "
          f"v1 - none | {mode} - none | {mode} - v1 |", "|---|---|---|---|---|---|---|---|"]
    md += [three_way_row(d, r, "missed", mode) for d, r in rows.items()]
    if missing:
        md += ["", f"Not run (so not in the pooled row): {', '.join(missing)}."]
    md += ["", f"Commands: `MODE={mode} benchmarks/gold_context_ablation.sh`, then "
           f"`.venv/bin/python benchmarks/gold_context_table.py {mode}`"]
    (RESULTS / f"gold_context_{mode}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
