#!/usr/bin/env bash
# Train, gate and evaluate the sample corpus's department prompts (hr, it, finance) with ragpt's CLI.
#
#   benchmarks/sample_prompts.sh              # all three; DEPTS="hr" for one
#
# Per department: ingest its documents into the index "sample" (as `ragpt demo` does), train a
# soft prompt with the defaults on ragpt/data/sample_corpus/train.jsonl (dev.jsonl chooses the
# step and gives the release verdict), approve + activate it only when the verdict is "better"
# than no prompt, then `ragpt eval` on the 60 demo questions (questions.jsonl, never used for
# training or selection): no prompt vs the soft prompt, paired. A department that already has an
# active prompt is only evaluated; delete prompts/<dept> to retrain it.
set -euo pipefail
cd "$(dirname "$0")/.."

RAGPT=${RAGPT:-.venv/bin/ragpt}
PY=${PY:-.venv/bin/python}
DEPTS=${DEPTS:-"hr it finance"}
OUT=${OUT:-benchmarks/results/sample_prompts}
ACTOR=${ACTOR:-ragpt-release}
CORPUS=ragpt/data/sample_corpus
export HF_HUB_OFFLINE=1

for d in hr it finance; do
  "$RAGPT" ingest -q -i sample -d "$d" --root . "$CORPUS/$d" > /dev/null
done

for d in $DEPTS; do
  mkdir -p "$OUT/$d"
  active=$("$RAGPT" prompts list -d "$d" --json 2>/dev/null | "$PY" -c \
    'import json,sys; print(next((r["version"] for r in json.load(sys.stdin) if r["state"] == "active"), ""))' \
    2>/dev/null || true)
  if [ -z "$active" ]; then
    echo "== $d: train"
    "$RAGPT" train -d "$d" -i sample --data "$CORPUS/train.jsonl" --dev-data "$CORPUS/dev.jsonl" \
      --patience 0 --actor "$ACTOR" -q > "$OUT/$d/train.log" 2>&1
    read -r v verdict < <("$RAGPT" prompts list -d "$d" --json | "$PY" -c '
import json, sys
r = [r for r in json.load(sys.stdin) if r["state"] == "draft"][-1]
print(r["version"], r["metrics"]["dev_verdict"]["verdict"].replace(" ", "_"))')
    echo "== $d: $v dev verdict $verdict"
    if [ "$verdict" = better ]; then
      why=$("$PY" -c 'import json,sys; v=json.load(sys.stdin)["metrics"]["dev_verdict"]; print("dev verdict better: F1 %+.1f [%+.1f, %+.1f] vs no prompt on %d dev questions" % (v["delta"], v["low"], v["high"], v["n"]))' \
        < <("$RAGPT" prompts show "$d" "$v"))
      "$RAGPT" prompts approve "$d" "$v" --actor "$ACTOR" --reason "$why"
      "$RAGPT" prompts activate "$d" "$v" --actor "$ACTOR" --reason "sample corpus release: $why"
      active=$v
    else
      echo "== $d: $v stays a draft (not better than no prompt on dev)"
    fi
  fi
  spec=${active:-$v}
  echo "== $d: eval $spec on the demo questions"
  "$RAGPT" eval -q -i sample -d "$d" --data "$CORPUS/questions.jsonl" --train-data "$CORPUS/train.jsonl" \
    --dev-data "$CORPUS/dev.jsonl" --method none --method soft --prompt "$spec" --out "$OUT/$d" > /dev/null
done
