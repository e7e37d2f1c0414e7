#!/usr/bin/env bash
# Quantization quality table (docs/results.md): fp, RTN and GPTQ at several grids on one
# model, BBC test perplexity at seqlen 2048. Usage: scripts/results/results_quant.sh OUTDIR [MODEL]
# Each step is a plain qtool command; every result lands in OUTDIR/*.json. The configs run
# as parallel processes: GPTQ's column sweep is launch-bound on a GPU, so they overlap well
# (each run's wall time in the table is therefore an upper bound of a solo run).
set -euo pipefail
out=${1:?usage: results_quant.sh OUTDIR [MODEL]}
model=${2:-smollm2-135m}
configs=${QTOOL_CONFIGS:-"4:128 4:64 3:64 2:64 4:channel"}
mkdir -p "$out"
qtool calibrate --model "$model" -o "$out/calib.safetensors" --n 128 --seqlen 2048 --overwrite -q
qtool eval "$model" --dtype float32 -q --json "$out/eval-fp.json" > "$out/log-fp.txt" 2>&1
one() {
    local bits=$1 group=$2 method=$3 tag="$3-w$1g$2"
    qtool quantize --model "$model" --method "$method" --bits "$bits" -g "$group" --calib "$out/calib.safetensors" \
        -o "$out/$tag" --overwrite -q --json "$out/quant-$tag.json"
    qtool eval "$out/$tag" --dtype float32 -q --json "$out/eval-$tag.json"
    rm -rf "${out:?}/$tag"
}
pids=()
for cfg in $configs; do
    for method in rtn gptq; do
        one "${cfg%%:*}" "${cfg##*:}" "$method" > "$out/log-$method-${cfg/:/-}.txt" 2>&1 &
        pids+=($!)
    done
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
python3 scripts/results/results_table.py "$out"
exit $status
