#!/usr/bin/env bash
# How should the gold passage enter training contexts? The shipped v1 prompts were trained with
# `--gold-context missed` (gold passage swapped in when retrieval missed it). This retrains each
# doc2dial agency's prompt with the same recipe but another setting and evaluates it in the
# matching test condition:
#   MODE=never  (retrieved contexts only)  -> test with retrieved context
#   MODE=always (gold passage in every context) -> test with the gold passage in the context
# benchmarks/gold_context_table.py pairs the results with v1's on the same questions. Prompts
# are registered as drafts (the release decisions stay with the v1 reports).
#
# DEPTH=30 (lr 1e-2 by default) trains deep prompts (every layer's prompt-position inputs, `--depth`)
# instead; at 3e-2 their loss diverged once warm-up reached about 2.5e-2.
#
#   RAGPT_DATA_DIR=../shared/data MODE=never benchmarks/gold_context_ablation.sh  # after department_prompts.sh
set -euo pipefail
cd "$(dirname "$0")/.."

RAGPT=${RAGPT:-.venv/bin/ragpt}
DATA=${DATA:-.cache/shared-qa}
MODE=${MODE:-never}
DEPTH=${DEPTH:-1}
if [ "$DEPTH" = 1 ]; then LR=${LR:-3e-2}; else LR=${LR:-1e-2}; fi  # deep diverged at 3e-2
if [ "$DEPTH" = 1 ]; then default_out=benchmarks/results/gold_context_$MODE
else default_out=benchmarks/results/deep${DEPTH}_$MODE; fi
OUT=${OUT:-$default_out}
DEPTS=${DEPTS:-"dmv ssa studentaid va"}
export HF_HUB_OFFLINE=1
COMMON=(-i shared --max-context-tokens 640)
case "$MODE" in
  never) context=retrieved; eval_gold=() ;;
  always) context=gold; eval_gold=(--gold-context always) ;;
  *) echo "MODE must be never or always, not $MODE" >&2; exit 2 ;;
esac

for d in $DEPTS; do
  qa="$DATA/doc2dial/qa/$d"
  mkdir -p "$OUT/$d"
  if [ ! -f "$OUT/$d/train.log" ]; then
    echo "== $d: train, --gold-context $MODE --depth $DEPTH"
    "$RAGPT" train -d "$d" "${COMMON[@]}" --data "$qa.train.jsonl" --dev-data "$qa.dev.jsonl" \
      --steps 80 --batch-size 8 --lr "$LR" --gold-context "$MODE" --eval-every 20 --dev-max 32 \
      --patience 0 --depth "$DEPTH" --actor ragpt-release -q > "$OUT/$d/train.log.tmp"
    mv "$OUT/$d/train.log.tmp" "$OUT/$d/train.log"  # only a finished run counts as done
  fi
  v=$(sed -n 's/^  "version": "\(v[0-9]*\)",$/\1/p' "$OUT/$d/train.log")
  if [ ! -f "$OUT/$d/$context/results.json" ]; then
    echo "== $d $v: eval, $context context"
    "$RAGPT" eval -q "${COMMON[@]}" -d "$d" --data "$qa.test.jsonl" "${eval_gold[@]}" \
      --train-data "$qa.train.jsonl" --dev-data "$qa.dev.jsonl" --prompt "$v" \
      --method none --method soft --out "$OUT/$d/$context" > /dev/null
  fi
done
