#!/usr/bin/env bash
# ApiQ table (docs/results.md, issue 5): fp, RTN, GPTQ, LoftQ, OmniQuant, ApiQ-lw, ApiQ-bw at
# W2 g64, W3 g64 and W4 g128 on one model. BBC test perplexity at seqlen 2048 (methods that
# write a LoRA init are scored with and without it), calibration 128 windows × 2048 tokens,
# quantize time and peak GPU/host memory from each manifest. Then one Llama-2-7B-shaped block
# through ApiQ (`qtool bench apiq-block`) for the 7B time/memory projection.
#
# Usage: scripts/results/results_apiq.sh OUTDIR [MODEL]
# Env:   QTOOL_CONFIGS  bits:group list           (default "2:64 3:64 4:128")
#        QTOOL_METHODS  methods                   (default "rtn gptq loftq omniquant apiq-lw apiq-bw")
#        QTOOL_EPOCHS   ApiQ/OmniQuant epochs      (default 20, the paper's)
#        QTOOL_CALIB_N  calibration windows       (default 128)
#        QTOOL_JOBS     quantize+eval runs at once (default 1: solo timings. A 135M model leaves an
#                       H100 mostly idle, so 4-9 jobs finish far sooner; times are then upper bounds)
#        QTOOL_BENCH_7B 0 skips the 7B block bench (default 1)
#        QTOOL_KEEP     1 keeps each checkpoint dir after its eval (the fine-tuning table starts from them)
# Every result lands in OUTDIR/*.json; the table is OUTDIR/results.md + OUTDIR/results.json.
# Re-running skips what is done and continues an interrupted ApiQ/OmniQuant run (--resume).
set -euo pipefail
out=${1:?usage: results_apiq.sh OUTDIR [MODEL]}
model=${2:-smollm2-135m}
configs=${QTOOL_CONFIGS:-"2:64 3:64 4:128"}
methods=${QTOOL_METHODS:-"rtn gptq loftq omniquant apiq-lw apiq-bw"}
epochs=${QTOOL_EPOCHS:-20}
calib_n=${QTOOL_CALIB_N:-128}
jobs=${QTOOL_JOBS:-1}
mkdir -p "$out"
[ -f "$out/calib.safetensors" ] ||
    qtool calibrate --model "$model" -o "$out/calib.safetensors" --n "$calib_n" --seqlen 2048 -q
[ -f "$out/eval-fp.json" ] ||
    qtool eval "$model" --dtype float32 -q --json "$out/eval-fp.json" > "$out/log-fp.txt" 2>&1

one() {
    local bits=$1 group=$2 method=$3 tag="$3-w$1g$2"
    [ -f "$out/eval-$tag.json" ] && return 0
    if [ ! -f "$out/quant-$tag.json" ]; then
        local extra=()
        case $method in
            apiq-*|omniquant) extra=(--epochs "$epochs" --resume) ;;  # --resume: no state = fresh start
        esac
        rm -rf "${out:?}/$tag"  # a finished quantize always has its json; anything else is partial
        qtool quantize --model "$model" --method "$method" --bits "$bits" -g "$group" \
            --calib "$out/calib.safetensors" -o "$out/$tag" --json "$out/quant-$tag.json" "${extra[@]}"
    fi
    local adapter=()
    [ -d "$out/$tag/adapter" ] && adapter=(--adapter "$out/$tag/adapter")
    qtool eval "$out/$tag" --dtype float32 -q --json "$out/eval-$tag.json" "${adapter[@]}"
    [ "${QTOOL_KEEP:-0}" = 1 ] || rm -rf "${out:?}/$tag"
}

status=0
running=0
for cfg in $configs; do
    for method in $methods; do
        one "${cfg%%:*}" "${cfg##*:}" "$method" > "$out/log-$method-${cfg/:/-}.txt" 2>&1 &
        running=$((running + 1))
        if [ "$running" -ge "$jobs" ]; then
            wait -n || status=1
            running=$((running - 1))
        fi
    done
done
while [ "$running" -gt 0 ]; do
    wait -n || status=1
    running=$((running - 1))
done

if [ "${QTOOL_BENCH_7B:-1}" = 1 ]; then
    for m in apiq-bw apiq-lw; do
        [ -f "$out/bench-7b-$m.json" ] ||
            qtool bench apiq-block --method "$m" --windows 8 --epochs 1 --offload gpu > "$out/bench-7b-$m.json" ||
            status=1
    done
    [ -f "$out/bench-7b-apiq-bw-offload.json" ] ||
        qtool bench apiq-block --method apiq-bw --windows 8 --epochs 1 --offload cpu \
            > "$out/bench-7b-apiq-bw-offload.json" || status=1
fi
python3 "$(dirname "$0")/results_apiq.py" "$out"
exit $status
