#!/usr/bin/env bash
# Rebuild the built-in trained refiner `smollm2-135m-diffpo` from the shared AlpacaEval data.
#
# Two training stages on the built-in SmolLM2-135M-Instruct (docs/training.md, "Built-in trained
# refiner"): 1000 steps of the `sft` recipe as a LoRA (r = 8) on the preferred answers cut to 96
# tokens (longer answers than the refiner's N = 32 blocks: it loops less past N), then 1000 steps
# of the `fast` recipe as a full fine-tune at N = 32 started from that model (lr 5e-5, hold
# weight 10), whose KL hold keeps the SFT'd model's distribution (not the untrained one's); its
# collapse guards stop it if held-out L_AR rises 0.2 above stage 1's or repetition 0.08. A LoRA of
# the full fine-tune's reach is what makes the speed carry over to other sources' drafts. Stage 2
# also measures the untrained model at its N = 32 (--eval-base-model). The change both stages made
# is then extracted into one rank-32 LoRA of the linear layers plus a rank-3 LoRA of the token
# embedding, tied to the output head as the model ties them (truncated SVD, train.extract), in
# src/diffpo_sdk/models/smollm2-135m-diffpo, that adapter itself is measured on the same held-out
# prompts (train.measure), and its card is written from that table and both runs' (train.card):
# held-out AlpacaEval prompts, and HH-RLHF drafts the runs never trained on.
#
# Usage: bash scripts/build-builtin-refiner.sh   (about 100 min on 2 CPU cores; RUNS=dir to keep
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
    --recipe fast --lora-r 0 --learning-rate 5e-5 --fixed-point-weight 10 --max-steps 1000 --eval-steps 200 \
    --guard-ar-tolerance 0.2 --guard-repetition-tolerance 0.08 --eval-base-model smollm2-135m-instruct \
    --output-dir "$RUNS/sft-fast"
rm -rf "$OUT"
# one adapter (float16, under 20 MB) on the untrained weights; the tokenizer is the base model's,
# so extract ships none
$PY -m diffpo_sdk.train.extract "$RUNS/sft-fast" "$OUT" --base smollm2-135m-instruct --rank 32 --embedding-rank 3
$PY -m diffpo_sdk.train.measure "${COMMON[@]}" --model "$OUT" --eval-base-model smollm2-135m-instruct \
    --output-dir "$RUNS/measured"
$PY -m diffpo_sdk.train.card "$OUT" --name smollm2-135m-diffpo --measured "$RUNS/measured" --runs "$RUNS/sft" \
    "$RUNS/sft-fast" --command "bash scripts/build-builtin-refiner.sh" --made "the truncated SVD \
(\`train.extract\`) of the change its two training runs made, an \`sft\` LoRA and then a \`fast\` full \
fine-tune; the table below measured this adapter itself"
du -sh "$OUT"
