#!/usr/bin/env bash
# The default recipe with far more steps than a CPU budget allows, beside the SFT control, on a
# machine with an NVIDIA GPU (docs/training.md, "The default recipe with far more steps"). One call,
# install included:
#   the `sft` control (one epoch of the preferred answers), then `sft-fast` (the same epoch of
#   SFT, then STEPS - 600 consistency steps), both as full fine-tunes of SmolLM2-135M-Instruct at
#   N = 32 on the shared AlpacaEval trajectories, each printing its final table (untrained vs
#   trained: held-out L_AR, preference accuracy, passes/token on held-out and HH-RLHF drafts,
#   repetition). The settings are the CPU Results' (docs/training.md) but the step count.
#
#   OUT=/tmp/out scripts/gpu-train.sh                 # on the GPU (STEPS=3000 by default)
#   OUT=/tmp/out scripts/gpu-train.sh --device cpu    # dry run: a few steps on a few prompts
#
# DATA is the folder of the shared data (alpaca_eval/ and hh_rlhf/; default $DIFFPO_SHARED_DATA,
# else ../shared/data); PYTHON picks the interpreter (default python3); DIFFPO_SKIP_INSTALL=1
# skips the pip install.
# Writes $OUT/gpu-train.md (both tables) and each run's folder under $OUT/runs.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/gpu-env.sh "$@"
DATA="${DATA:-$("$PY" -c "from diffpo_sdk.shared_data import shared_data_dir as d; print(d() or '../shared/data')")}"
mkdir -p "$OUT/runs"
if [ "$device" = cuda ]; then
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: use --device cpu')"
fi

"$PY" -m diffpo_sdk.apps.cli data build --from-scored "$DATA/alpaca_eval/multi_model_preferences.jsonl.gz" \
  --output "$OUT/traj.jsonl"
"$PY" -m diffpo_sdk.apps.cli data build --from-pairs "$DATA/hh_rlhf/harmless_base_pairs.jsonl.gz" --limit 32 \
  --output "$OUT/hh32.jsonl"

if [ "$device" = cpu ]; then  # the dry run: every step of the GPU run, on settings a 2-core CPU finishes
  steps=${STEPS:-6}; sft_steps=4; prompts=4; held=2; n=8; eval_steps=3; extra=(--use-cpu true)
else
  steps=${STEPS:-3000}; sft_steps=600; prompts=600; held=32; n=32; eval_steps=600; extra=()
fi
COMMON=(--data "$OUT/traj.jsonl" --transfer-eval-data "$OUT/hh32.jsonl" --max-train-prompts "$prompts"
        --max-eval-prompts "$held" --max-prompt-tokens 256 --max-response-tokens "$n" --per-device-eval-batch-size 8
        --save-strategy no --model smollm2-135m-instruct --lora-r 0 --learning-rate 5e-5 --logging-steps 50
        --disable-tqdm true "${extra[@]}")
"$PY" -m diffpo_sdk.train "${COMMON[@]}" --recipe sft --max-steps "$sft_steps" --eval-strategy no --guard false \
  --output-dir "$OUT/runs/sft"
"$PY" -m diffpo_sdk.train "${COMMON[@]}" --recipe sft-fast --max-steps "$steps" --eval-steps "$eval_steps" \
  --guard-ar-tolerance 0.15 --guard-repetition-tolerance 0.08 --output-dir "$OUT/runs/sft-fast"

{
  echo "# GPU training: the sft control and sft-fast ($steps steps), $device"
  for run in sft sft-fast; do
    echo; echo "## $run"; echo; cat "$OUT/runs/$run/eval_results.md"
  done
} > "$OUT/gpu-train.md"
cat "$OUT/gpu-train.md"
echo "wrote $OUT/gpu-train.md"
