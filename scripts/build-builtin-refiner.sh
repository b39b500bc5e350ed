#!/usr/bin/env bash
# Rebuild the built-in trained refiner `smollm2-135m-diffpo` from the shared AlpacaEval data.
#
# Two stages, each a LoRA (r = 8) on the built-in SmolLM2-135M-Instruct (docs/training.md,
# "Built-in trained refiner"): 1000 steps of the `sft` recipe on the preferred answers cut to
# 96 tokens (longer answers than the refiner's N = 32 blocks: it loops less past N), then up to
# 300 steps of the `fast` recipe with the paper's KL consistency loss at N = 32 (lr 5e-5, hold
# weight 10) started from that model, whose KL hold then keeps the SFT'd model's distribution
# (not the untrained one's); its collapse guards keep the last evaluation within 0.05 of
# stage 1's held-out L_AR and repetition. Stage 2 also measures the untrained model at its
# N = 32 (--eval-base-model), so the card compares the refiner with its base. The two adapters
# are stacked exactly into one of rank 16 in src/diffpo_sdk/models/smollm2-135m-diffpo, with
# both stages' evaluation tables (held-out AlpacaEval prompts, and HH-RLHF drafts the runs never
# trained on) in its card.
#
# Usage: bash scripts/build-builtin-refiner.sh   (about 75 min on 2 CPU cores; RUNS=dir to keep
# the stages elsewhere; a stage whose eval_results.json is in RUNS already is not run again)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
RUNS=${RUNS:-runs/builtin}
DATA=${DATA:-../shared/data}
OUT=src/diffpo_sdk/models/smollm2-135m-diffpo
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false DIFFPO_TRAIN_THREADS=${DIFFPO_TRAIN_THREADS:-2}
mkdir -p "$RUNS"
$PY -m diffpo_sdk.apps.cli data build --from-scored "$DATA/alpaca_eval/multi_model_preferences.jsonl.gz" --output "$RUNS/traj.jsonl"
$PY -m diffpo_sdk.apps.cli data build --from-pairs "$DATA/hh_rlhf/harmless_base_pairs.jsonl.gz" --limit 32 --output "$RUNS/hh32.jsonl"
COMMON=(--data "$RUNS/traj.jsonl" --transfer-eval-data "$RUNS/hh32.jsonl" --max-train-prompts 600
        --max-eval-prompts 32 --max-prompt-tokens 256 --max-response-tokens 32 --per-device-eval-batch-size 8
        --guard-ar-tolerance 0.05 --guard-repetition-tolerance 0.05 --save-strategy no --lora-r 8
        --learning-rate 2e-4 --logging-steps 50 --disable-tqdm true)
[ -f "$RUNS/sft/eval_results.json" ] || $PY -m diffpo_sdk.train "${COMMON[@]}" --model smollm2-135m-instruct --recipe sft --max-steps 1000 \
    --max-response-tokens 96 --eval-strategy no --guard false --output-dir "$RUNS/sft"
[ -f "$RUNS/sft-fast/eval_results.json" ] || $PY -m diffpo_sdk.train "${COMMON[@]}" --model "$RUNS/sft" \
    --recipe fast --consistency-loss kl --max-steps 300 \
    --eval-steps 100 --learning-rate 5e-5 --fixed-point-weight 10 --eval-base-model smollm2-135m-instruct \
    --output-dir "$RUNS/sft-fast"
rm -rf "$OUT"
# one rank-16 adapter, with a model card written from both runs' eval_results.json; no tokenizer
# ships with it: it is the base model's
$PY -m diffpo_sdk.train.stack "$RUNS/sft" "$RUNS/sft-fast" "$OUT" --base smollm2-135m-instruct --dtype float16 \
    --card smollm2-135m-diffpo --command "bash scripts/build-builtin-refiner.sh"
du -sh "$OUT"
