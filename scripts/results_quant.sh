#!/usr/bin/env bash
# Quantization quality table (docs/results.md): fp, RTN and GPTQ at several grids on one
# model, BBC test perplexity at seqlen 2048. Usage: scripts/results_quant.sh OUTDIR [MODEL]
# Each step is a plain qtool command; every result lands in OUTDIR/*.json.
set -euo pipefail
out=${1:?usage: results_quant.sh OUTDIR [MODEL]}
model=${2:-smollm2-135m}
mkdir -p "$out"
qtool calibrate --model "$model" -o "$out/calib.safetensors" --n 128 --seqlen 2048 --overwrite -q
qtool eval "$model" --dtype float32 -q --json "$out/eval-fp.json"
for cfg in "4 128" "4 64" "3 64" "2 64" "4 channel"; do
    set -- $cfg
    for method in rtn gptq; do
        tag="$method-w$1g$2"
        qtool quantize --model "$model" --method "$method" --bits "$1" -g "$2" --calib "$out/calib.safetensors" \
            -o "$out/$tag" --overwrite -q --json "$out/quant-$tag.json"
        qtool eval "$out/$tag" --dtype float32 -q --json "$out/eval-$tag.json"
        rm -rf "$out/$tag"
    done
done
python3 scripts/results_table.py "$out"
