#!/usr/bin/env bash
# The test suite (CPU). GPU tests are deselected here; on a GPU machine: pytest -m gpu.
set -euo pipefail
cd "$(dirname "$0")/.."
export TOKENIZERS_PARALLELISM=false
python3 -m pytest -q -m "not gpu" --durations=15 "$@"
