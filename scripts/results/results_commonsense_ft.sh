#!/usr/bin/env bash
# ApiQ Table 8's fine-tuning protocol on the offline data (docs/eval.md): every commonsense task's
# set is split into seeded disjoint halves; each method fine-tunes once on the union of the train
# halves (`finetune --task commonsense`) and is scored on every test half
# (`eval --tasks commonsense_heldout`, lm-eval acc / acc_norm). Needs a CUDA GPU for sensible times.
#
# Usage: scripts/results/results_commonsense_ft.sh OUTDIR [MODEL]
# Env:   QTOOL_BITS    bit-widths, group 64           (default "4 3 2")
#        QTOOL_METHODS methods                        (default "lora-w8 qlora rtn-lora gptq-lora loftq apiq-bw peqa")
#        QTOOL_SEEDS   fine-tuning seeds              (default "0")
#        QTOOL_EPOCHS  fine-tuning epochs             (default 3, ApiQ's)
#        QTOOL_LIMIT   documents per test half scored (default: all)
# Methods: lora-w8 = LoRA on an RTN W8 g64 base (the ≈ fp upper bound: qtool fine-tunes quantized
# bases only), once; qlora = QLoRA on NF4 (4 bits only); rtn-lora / gptq-lora = LoRA on an RTN /
# GPTQ base; loftq, apiq-bw = LoRA started from the method's adapter; peqa = PEQA scales on RTN.
# Results: OUTDIR/eval-<method>-w<bits>-s<seed>.json; table: scripts/results/eval_table.py OUTDIR/eval-*.json
set -euo pipefail
out=${1:?usage: results_commonsense_ft.sh OUTDIR [MODEL]}
model=${2:-smollm2-135m}
bits_list=${QTOOL_BITS:-"4 3 2"}
methods=${QTOOL_METHODS:-"lora-w8 qlora rtn-lora gptq-lora loftq apiq-bw peqa"}
seeds=${QTOOL_SEEDS:-0}
epochs=${QTOOL_EPOCHS:-3}
lim=()
[ -n "${QTOOL_LIMIT:-}" ] && lim=(--limit "$QTOOL_LIMIT")
mkdir -p "$out"
[ -f "$out/calib.safetensors" ] || qtool calibrate --model "$model" --corpus c4 -o "$out/calib.safetensors" -q

base() {  # base METHOD BITS -> checkpoint dir (quantized once, reused across seeds)
    local q=$1 b=$2 dir="$out/base-$1-w$2"
    if [ ! -f "$dir/qtool.json" ]; then
        rm -rf "$dir"
        case $q in
            nf4) qtool quantize --model "$model" --method nf4 -o "$dir" -q ;;
            *) qtool quantize --model "$model" --method "$q" --bits "$b" -g 64 --calib "$out/calib.safetensors" \
                   -o "$dir" -q ;;
        esac
    fi
    echo "$dir"
}

one() {  # one METHOD BITS SEED
    local m=$1 b=$2 s=$3 tag="$1-w$2-s$3" ck ft=(--method lora) start=()
    [ -f "$out/eval-$tag.json" ] && return 0
    case $m in
        lora-w8) ck=$(base rtn 8) ;;
        qlora) ck=$(base nf4 4); ft=(--method qlora) ;;
        rtn-lora) ck=$(base rtn "$b") ;;
        gptq-lora) ck=$(base gptq "$b") ;;
        loftq) ck=$(base loftq "$b"); start=(--adapter "$ck/adapter") ;;
        apiq-bw) ck=$(base apiq-bw "$b"); start=(--adapter "$ck/adapter") ;;
        peqa) ck=$(base rtn "$b"); ft=(--method peqa) ;;
    esac
    local res="$out/ft-$tag"
    [ "$m" = peqa ] && res="$out/ft-$tag.safetensors"
    [ -e "$res" ] || qtool finetune "$ck" "${ft[@]}" "${start[@]}" --task commonsense --epochs "$epochs" \
        --batch-size 16 --seqlen 1024 --seed "$s" -o "$res" --json "$out/ft-$tag.json" -q
    local apply=(--adapter "$res")
    [ "$m" = peqa ] && apply=(--delta "$res")
    qtool eval "$ck" "${apply[@]}" --tasks commonsense_heldout "${lim[@]}" --json "$out/eval-$tag.json" -q
}

for s in $seeds; do
    for m in $methods; do
        case $m in
            lora-w8) one lora-w8 8 "$s" ;;
            qlora) one qlora 4 "$s" ;;
            *) for b in $bits_list; do one "$m" "$b" "$s"; done ;;
        esac
    done
done
python3 "$(dirname "$0")/eval_table.py" "$out"/eval-*.json > "$out/results.md"
cat "$out/results.md"
