#!/usr/bin/env bash
# The main job on the default model: install, quantize SmolLM2-135M to 4 bits,
# and print its BBC test perplexity next to the original's.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# GPTQ on a GPU; on a CPU-only machine RTN (GPTQ's forward passes over the calibration set
# take tens of minutes on two cores; `qtool quantize --method gptq` works there all the same).
method=${QTOOL_METHOD:-$(python3 -c "import torch; print('gptq' if torch.cuda.is_available() else 'rtn')")}
out=${QTOOL_OUT:-runs/smollm2-$method-w4g128}
qtool quantize --method "$method" --bits 4 --group-size 128 -o "$out" --overwrite
qtool eval "$out" --baseline --seqlen 2048 --max-windows "${QTOOL_EVAL_WINDOWS:-16}" \
    --prompt "The BBC reported that" --max-new-tokens 24
