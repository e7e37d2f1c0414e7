#!/usr/bin/env bash
# The zero-shot table of docs/eval.md: SmolLM2-135M-Instruct (the built-in model) as shipped
# and RTN W4/W3/W2 g128, optionally GPTQ W3/W2 g128 (GPTQ=1), on ApiQ's eight commonsense
# tasks through lm-evaluation-harness, offline.
# Usage: LIMIT=50 OUT=zs bash scripts/results/results_zero_shot.sh   (LIMIT empty: the full sets)
set -euo pipefail
LIMIT=${LIMIT-50}
OUT=${OUT:-zero-shot}
TASKS=${TASKS:-commonsense}
mkdir -p "$OUT"
lim=()
[ -n "$LIMIT" ] && lim=(--limit "$LIMIT")
run() {  # run NAME MODEL
    [ -f "$OUT/$1.json" ] || qtool eval "$2" --tasks "$TASKS" "${lim[@]}" --json "$OUT/$1.json" -q
}
run fp smollm2-135m
for b in 4 3 2; do
    [ -d "$OUT/rtn-w$b" ] || qtool quantize --method rtn --bits "$b" -g 128 -o "$OUT/rtn-w$b" -q
    run "rtn-w$b" "$OUT/rtn-w$b"
done
if [ "${GPTQ:-0}" = 1 ]; then
    [ -f "$OUT/calib.safetensors" ] || qtool calibrate --corpus c4 --n 128 --seqlen 2048 -o "$OUT/calib.safetensors" -q
    for b in 3 2; do
        [ -d "$OUT/gptq-w$b" ] || qtool quantize --method gptq --bits "$b" -g 128 --calib "$OUT/calib.safetensors" \
            -o "$OUT/gptq-w$b" -q
        run "gptq-w$b" "$OUT/gptq-w$b"
    done
fi
python3 "$(dirname "$0")/eval_table.py" "$OUT"/*.json
