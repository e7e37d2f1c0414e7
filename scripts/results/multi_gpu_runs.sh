#!/usr/bin/env bash
# The multi-GPU runs listed in docs/distributed.md ("GPU runs not yet made"), on a host with
# at least 4 GPUs: fine-tuning tokens/s of PEQA and QLoRA on 1, 2, 4 GPUs (scaling efficiency)
# and GPTQ calibration time on 1 vs 2 vs 4 GPUs, all on a random Llama of Llama-3-8B's shapes.
#   OUT=dist-runs bash scripts/results/multi_gpu_runs.sh
set -euo pipefail
OUT=${OUT:-dist-runs}
mkdir -p "$OUT" && cd "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee gpus.csv

[ -d llama3-8b-synth ] || python -c "from pathlib import Path; from qtool.models.synthetic import llama_config, write_model; write_model(Path('llama3-8b-synth'), llama_config())"
[ -d synth-w4 ] || qtool quantize -m llama3-8b-synth --method rtn --bits 4 --group-size 128 -o synth-w4 --quiet
[ -d synth-nf4 ] || qtool quantize -m llama3-8b-synth --method nf4 -o synth-nf4 --quiet

# Global batch 16 sequences of 1024 tokens per step (4 × 4), whatever the process count.
COMMON=(--task bbc-news --max-steps 20 --batch-size 4 --grad-accum 4 --seqlen 1024 --eval-every 0
        --eval-samples 16 --save-every 0 --grad-checkpoint --overwrite --quiet)
for n in 1 2 4; do
  qtool finetune synth-w4 --method peqa "${COMMON[@]}" --num-processes "$n" -o "peqa-$n.safetensors" \
    --json "peqa-$n.json"
  qtool finetune synth-nf4 --method qlora "${COMMON[@]}" --num-processes "$n" -o "qlora-$n" \
    --json "qlora-$n.json"
done
for n in 2 4; do
  qtool finetune synth-w4 --method peqa "${COMMON[@]}" --num-processes "$n" --fsdp -o "peqa-fsdp-$n.safetensors" \
    --json "peqa-fsdp-$n.json"
  qtool finetune synth-nf4 --method qlora "${COMMON[@]}" --num-processes "$n" --fsdp -o "qlora-fsdp-$n" \
    --json "qlora-fsdp-$n.json"
done

GPTQ=(quantize -m llama3-8b-synth --method gptq --bits 4 --group-size 128 --calib-n 128 --calib-seqlen 2048
      --overwrite --quiet)
qtool "${GPTQ[@]}" -o synth-gptq-1 --json gptq-1.json
for n in 2 4; do
  accelerate launch --multi_gpu --num_processes "$n" --num_machines 1 --mixed_precision no --dynamo_backend no \
    --main_process_port $((29600 + n)) -m qtool "${GPTQ[@]}" -o "synth-gptq-$n" --json "gptq-$n.json"
done

python - <<'EOF'
import json
for m in ("peqa", "qlora"):
    one = json.load(open(f"{m}-1.json"))["tokens_per_s"]
    for n in (1, 2, 4):
        t = json.load(open(f"{m}-{n}.json"))["tokens_per_s"]
        print(f"{m} {n} GPU(s): {t:,.0f} tokens/s, scaling efficiency {t / (n * one):.2f}")
    for n in (2, 4):
        r = json.load(open(f"{m}-fsdp-{n}.json"))
        print(f"{m} --fsdp {n} GPUs: {r['tokens_per_s']:,.0f} tokens/s, peak {r['peak_memory_bytes'] / 2**30:.2f} GiB per GPU")
for n in (1, 2, 4):
    st = json.load(open(f"gptq-{n}.json"))["stats"]
    print(f"gptq {n} GPU(s): {st['seconds']:.1f} s calibration + quantization, proxy loss {st['proxy_loss_total']:.6g}")
EOF
