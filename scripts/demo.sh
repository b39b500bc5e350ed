#!/usr/bin/env bash
# The README's first command: set up, then run the whole path offline (`diffpo demo`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh all
. .venv/bin/activate
exec diffpo demo "$@"
