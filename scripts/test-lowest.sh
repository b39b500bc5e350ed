#!/usr/bin/env bash
# The light client at the lowest versions pyproject.toml allows, in its own venv (.venv-lowest):
# every direct dependency resolved to its floor (uv's lowest-direct), no torch, then the tests
# marked `client`. A second step adds the `agents` extra at its floors for the agent tests.
# Proves the `>=` pins; .ci/run runs it after the main suite. Extra pytest args pass through.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-lowest
py="$venv/bin/python"
python3 -m venv --clear "$venv"
"$py" -m pip install -q --upgrade pip uv
# uv reads its own settings, not pip's: hand it the index pip is configured with, if any
index="${PIP_INDEX_URL:-$("$py" -m pip config get global.index-url 2>/dev/null || true)}"
[ -z "$index" ] || export UV_INDEX_URL="$index"
[ -z "${PIP_EXTRA_INDEX_URL:-}" ] || export UV_EXTRA_INDEX_URL="$PIP_EXTRA_INDEX_URL"
install() { "$py" -m uv pip install -q --python "$py" "$@"; }
floors() {
  "$py" -m uv pip list --python "$py" 2>/dev/null \
    | grep -iE '^(pydantic|pydantic-settings|httpx|tenacity|opentelemetry-api|langchain-core|litellm|langchain|langgraph) '
}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 LITELLM_LOCAL_MODEL_COST_MAP=True TOKENIZERS_PARALLELISM=false

install --resolution lowest-direct -e .
"$py" -m uv pip freeze --python "$py" 2>/dev/null | grep -v '^-e' > "$venv/floors.txt"
# test tools only, held to what is installed; the OpenTelemetry SDK (tests only) matches the API
otel=$("$py" -c "import importlib.metadata as m; print(m.version('opentelemetry-api'))")
install -c "$venv/floors.txt" pytest pytest-asyncio pytest-timeout "opentelemetry-sdk==$otel" fastapi uvicorn prometheus-client pyyaml
if "$py" -c "import torch" 2>/dev/null; then echo "torch must not be installed for the light client" >&2; exit 1; fi
echo "light client at its floors:"; floors
# the modules of CLIENT_MODULES in tests/conftest.py (others import torch or extras at the top)
client_tests=(tests/test_client.py tests/test_client_faults.py tests/test_runnable.py tests/test_tracing.py tests/test_litellm.py)
"$py" -m pytest -q -p no:cacheprovider -m "client and not agents" "${client_tests[@]}" "$@"

install --resolution lowest-direct -e ".[agents]"
echo "with the agents extra at its floors:"; floors
"$py" -m pytest -q -p no:cacheprovider -m "client and agents" "${client_tests[@]}" tests/test_agents.py "$@"
