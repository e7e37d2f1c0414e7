#!/usr/bin/env bash
# The main job on the default model: install, quantize SmolLM2-135M to 4 bits with GPTQ,
# and print its BBC test perplexity next to the original's.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
out=${QTOOL_OUT:-runs/smollm2-gptq-w4g128}
qtool quantize --method gptq --bits 4 --group-size 128 --calib-n 32 --calib-seqlen 2048 -o "$out" --overwrite
qtool eval "$out" --baseline --seqlen 2048 --max-windows "${QTOOL_EVAL_WINDOWS:-16}" \
    --prompt "The BBC reported that" --max-new-tokens 24
