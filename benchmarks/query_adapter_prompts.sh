#!/usr/bin/env bash
# A query adapter end to end: one doc2dial agency's prompt trained with and without
# `ragpt train --query-adapter` on the same questions, each evaluated as served.
#
#   benchmarks/query_adapter_prompts.sh          # dmv, about 45 min on 2 cores (two trainings, four evals)
#   DEPT=ssa benchmarks/query_adapter_prompts.sh
#   STEPS=40 OUT=benchmarks/results/query_adapter_prompts_40 benchmarks/query_adapter_prompts.sh  # half the steps
#
# 1. The agency's training file is split by question (the seeded 20% of benchmarks/query_adapter.py):
#    `fit` to train on, `seen` = new questions about the documents the training questions cover.
# 2. `ragpt train` with no recipe flags on `fit`, once plain and once with --query-adapter, into a
#    scratch registry (nothing is released).
# 3. `ragpt eval` of each version on `seen` and on the test split (documents no training question is
#    about), no prompt and the prompt, every input from the version's contract (the adapter version's
#    no-prompt row searches with its adapter).
# 4. benchmarks/query_adapter_prompts_table.py writes results/query_adapter_prompts.{json,md}: every
#    agency run so far, and the agencies pooled.
# Every step is skipped when its output exists.
set -euo pipefail
cd "$(dirname "$0")/.."

RAGPT=${RAGPT:-.venv/bin/ragpt}
PY=${PY:-.venv/bin/python}
QA=${QA:-$HOME/.cache/ragpt/shared-qa}
DEPT=${DEPT:-dmv}
INDEX=${INDEX:-shared}
OUT=${OUT:-benchmarks/results/query_adapter_prompts}
STEPS=${STEPS:-}                             # empty: ragpt train's default
export RAGPT_PROMPT_DIR=${RAGPT_PROMPT_DIR:-.cache/adapter-prompts}
export HF_HUB_OFFLINE=1
qa="$QA/doc2dial/qa/$DEPT"
out="$OUT/$DEPT"
mkdir -p "$out"

if [ ! -f "$out/fit.jsonl" ]; then
  "$PY" - "$qa.train.jsonl" "$out" <<'EOF'
import sys
from pathlib import Path
from ragpt.data.qa import load_qa, save_jsonl
from ragpt.retrieval.query_adapter import split_by_question
fit, seen = split_by_question(load_qa(Path(sys.argv[1])), 0.2, seed=1)
save_jsonl(fit, Path(sys.argv[2]) / "fit.jsonl")
save_jsonl(seen, Path(sys.argv[2]) / "seen.jsonl")
print(f"fit {len(fit)}, seen {len(seen)}")
EOF
fi

for arm in plain adapter; do
  flags=()
  [ -n "$STEPS" ] && flags+=(--steps "$STEPS")
  [ "$arm" = adapter ] && flags+=(--query-adapter)
  if [ ! -f "$out/$arm.version" ]; then
    echo "== $DEPT: train $arm on $INDEX"
    "$RAGPT" train -q -d "$DEPT" -i "$INDEX" --data "$out/fit.jsonl" "${flags[@]}" --actor bench \
      > "$out/$arm.train.log" 2>&1
    grep -o '"folder": "[^"]*"' "$out/$arm.train.log" | tail -1 | sed 's|.*/\(v[0-9]*\)"$|\1|' > "$out/$arm.version"
  fi
  v=$(cat "$out/$arm.version")
  for split in seen test; do
    data="$out/seen.jsonl"
    [ "$split" = test ] && data="$qa.test.jsonl"
    if [ ! -f "$out/$arm-$split/results.json" ]; then
      echo "== $DEPT: eval $arm ($v) on $split"
      "$RAGPT" eval -q -i "$INDEX" -d "$DEPT" --data "$data" --prompt "$v" --method none --method soft \
        --out "$out/$arm-$split" > /dev/null
    fi
  done
done
# The table covers every agency run to the end under OUT, pooled where there are several.
"$PY" benchmarks/query_adapter_prompts_table.py --out "$OUT" \
  --command "${STEPS:+STEPS=$STEPS }DEPT=<agency> benchmarks/query_adapter_prompts.sh"
