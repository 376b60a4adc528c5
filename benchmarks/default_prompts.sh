#!/usr/bin/env bash
# The doc2dial departments' prompts trained with `ragpt train`'s defaults on sentence-packed chunks:
# the README's department table.
#
#   benchmarks/default_prompts.sh              # dmv ssa studentaid va, ~1.5 h on 2 cores
#   DEPTS="dmv" benchmarks/default_prompts.sh
#   # the same recipe on the recursive-chunk index, into a scratch registry, released nowhere:
#   RAGPT_PROMPT_DIR=.cache/recursive-prompts RELEASE=0 INDEX=shared SPLITTER=recursive \
#     OUT=benchmarks/results/default_prompts_recursive benchmarks/default_prompts.sh
#
# 1. Ingest all five departments (doc2dial's agencies, PolicyQA's legal: BM25's statistics are
#    index-wide) into INDEX with --chunk-splitter SPLITTER.
# 2. Per department: `ragpt train` with no recipe flags (deep prompt, its learning rate and steps,
#    dev = 15% of the training file held out by document), registered with its dev verdict;
#    approved and activated only when that verdict is "better" than no prompt (RELEASE=0: never).
# 3. `ragpt eval` on the test split with no input flags (every input from the version's contract):
#    no prompt and the soft prompt on INDEX, and no prompt on the recursive-chunk index `shared`
#    (the splitter's end-to-end effect without a prompt, same contract).
# 4. benchmarks/default_prompts_table.py writes results/default_prompts.{json,md}.
# Every step is skipped when its output exists; delete results/default_prompts/<dept> to redo one.
set -euo pipefail
cd "$(dirname "$0")/.."

RAGPT=${RAGPT:-.venv/bin/ragpt}
PY=${PY:-.venv/bin/python}
QA=${QA:-$HOME/.cache/ragpt/shared-qa}   # `ragpt import-data` output (./run demo makes it)
INDEX=${INDEX:-shared-sentences}
SPLITTER=${SPLITTER:-sentences}
BASE_INDEX=${BASE_INDEX:-shared}          # recursive chunks, the shipped prompts' index
DEPTS=${DEPTS:-"dmv ssa studentaid va"}
OUT=${OUT:-benchmarks/results/default_prompts}
ACTOR=${ACTOR:-ragpt-release}
RELEASE=${RELEASE:-1}
CHUNKS=(--chunk-tokens 200 --chunk-overlap 40)   # the defaults, pinned: a config file may say otherwise
export HF_HUB_OFFLINE=1

data_set() { if [ "$1" = legal ]; then echo policyqa; else echo doc2dial; fi; }

for d in dmv ssa va studentaid legal; do
  s=$(data_set "$d")
  [ -f "$QA/$s/summary.json" ] || "$RAGPT" import-data "$s" --out "$QA/$s" > /dev/null
  "$RAGPT" ingest -q -i "$INDEX" -d "$d" --root "$QA/$s/docs" "${CHUNKS[@]}" --chunk-splitter "$SPLITTER" \
    "$QA/$s/docs/$d"
  "$RAGPT" ingest -q -i "$BASE_INDEX" -d "$d" --root "$QA/$s/docs" "${CHUNKS[@]}" --chunk-splitter recursive \
    "$QA/$s/docs/$d"
done

for d in $DEPTS; do
  qa="$QA/$(data_set "$d")/qa/$d"
  mkdir -p "$OUT/$d"
  if [ ! -f "$OUT/$d/version" ]; then
    echo "== $d: train on $INDEX"
    "$RAGPT" train -q -d "$d" -i "$INDEX" --data "$qa.train.jsonl" --actor "$ACTOR" > "$OUT/$d/train.log" 2>&1
    # The version this run registered (its summary's last line naming the folder), not the newest draft.
    v=$(grep -o '"folder": "[^"]*"' "$OUT/$d/train.log" | tail -1 | sed 's|.*/\(v[0-9]*\)"$|\1|')
    verdict=$("$RAGPT" prompts show "$d" "$v" | "$PY" -c \
      'import json,sys; print(json.load(sys.stdin)["metrics"]["dev_verdict"]["verdict"].replace(" ", "_"))')
    echo "== $d: $v dev verdict $verdict"
    if [ "$verdict" = better ] && [ "$RELEASE" = 1 ]; then
      why=$("$PY" -c 'import json,sys; v=json.load(sys.stdin)["metrics"]["dev_verdict"]; print("dev verdict better: F1 %+.1f [%+.1f, %+.1f] vs no prompt on %d dev questions" % (v["delta"], v["low"], v["high"], v["n"]))' \
        < <("$RAGPT" prompts show "$d" "$v"))
      "$RAGPT" prompts approve "$d" "$v" --actor "$ACTOR" --reason "$why"
      "$RAGPT" prompts activate "$d" "$v" --actor "$ACTOR" --reason "ragpt train defaults on $SPLITTER chunks: $why"
    else
      echo "== $d: $v stays a draft"
    fi
    echo "$v" > "$OUT/$d/version"
  fi
  v=$(cat "$OUT/$d/version")
  if [ ! -f "$OUT/$d/$INDEX/results.json" ]; then
    echo "== $d: eval $v on $INDEX"
    "$RAGPT" eval -q -i "$INDEX" -d "$d" --data "$qa.test.jsonl" --train-data "$qa.train.jsonl" \
      --dev-data "$qa.dev.jsonl" --prompt "$v" --method none --method soft --out "$OUT/$d/$INDEX" > /dev/null
  fi
  if [ "$INDEX" != "$BASE_INDEX" ] && [ ! -f "$OUT/$d/$BASE_INDEX/results.json" ]; then
    echo "== $d: eval no prompt on $BASE_INDEX"
    "$RAGPT" eval -q -i "$BASE_INDEX" -d "$d" --data "$qa.test.jsonl" --method none \
      --out "$OUT/$d/$BASE_INDEX" > /dev/null
  fi
done
[ "$INDEX" = "$BASE_INDEX" ] || "$PY" benchmarks/default_prompts_table.py --out "$OUT" --index "$INDEX" \
  --base-index "$BASE_INDEX"
