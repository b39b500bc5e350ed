#!/usr/bin/env bash
# One call on a bare machine with an NVIDIA GPU (about 8 minutes, install included):
#   exactness in bfloat16 and float32 against generate in the same dtype (diffpo bench check),
#   the adaptive policy's widths beside its measured pass cost,
#   diffpo bench speed at batch 1 and 8, real and fixed-point drafts, single and two-turn,
#   blocks 16 / 64 / auto, and diffpo bench train steps (float32 and bfloat16 autocast).
# Writes $OUT/gpu-check.json (everything) and $OUT/gpu-check.md (the tables); exits non-zero
# when an exactness or policy check fails.
#
#   OUT=/tmp/out scripts/gpu-check.sh                 # on the GPU
#   OUT=/tmp/out scripts/gpu-check.sh --device cpu    # dry run: CPU, float32 only, short settings
#
# PYTHON picks the interpreter (default python3); DIFFPO_SKIP_INSTALL=1 skips the pip install.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/gpu-env.sh "$@"
mkdir -p "$OUT/parts"

if [ "$device" = cpu ]; then  # the dry run: every step, on settings a 2-core CPU finishes
  dtypes="float32"; n=16; prompts=1; blocks=16; train_repeats=1
  speed_extra=(--official-prompts 0)
else
  dtypes="float32 bfloat16"; n=128; prompts=8; blocks=16,64; train_repeats=5
  speed_extra=(--official-prompts 1 --official-max-new-tokens 256 --official-blocks 32,256)
fi

status=0
for dtype in $dtypes; do
  "$PY" -m diffpo_sdk.bench check --device "$device" --dtype "$dtype" --num-prompts "$prompts" \
    --max-new-tokens "$(( n < 64 ? n : 64 ))" --out "$OUT/parts/check-$dtype.json" || status=1
done
for dtype in $dtypes; do
  "$PY" -m diffpo_sdk.bench speed --device "$device" --dtype "$dtype" --num-prompts "$prompts" \
    --max-new-tokens "$n" --blocks "$blocks" --drafts real,fixed --conversations single,two-turn \
    --batch-blocks "auto,$blocks" "${speed_extra[@]}" --out "$OUT/parts/speed-$dtype.json" --plot "$OUT/speed-$dtype.png" \
    | tee "$OUT/parts/speed-$dtype.txt" || status=1
done
train_data=()
if [ ! -f ../shared/data/alpaca_eval/multi_model_preferences.jsonl.gz ]; then  # a bare machine: one written record
  printf '%s\n' '{"messages": [{"role": "user", "content": "Give me three tips for staying healthy."}], "target": "1. Eat plenty of vegetables and fruit, and drink water through the day.\n2. Sleep seven to nine hours a night at regular times.\n3. Move every day: a brisk 30-minute walk counts.", "others": ["1. eat food 2. sleep 3. walk sometimes"]}' > "$OUT/parts/trajectories.jsonl"
  train_data=(--data "$OUT/parts/trajectories.jsonl")
fi
"$PY" -m diffpo_sdk.bench train --device "$device" --repeats "$train_repeats" --bf16 "${train_data[@]}" \
  --output "$OUT/parts/train.json" || status=1

"$PY" - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
parts = {p.stem: json.loads(p.read_text()) for p in sorted((out / "parts").glob("*.json"))}
(out / "gpu-check.json").write_text(json.dumps(parts, indent=2))
lines = ["# GPU check", ""]
for name, part in parts.items():
    if name.startswith("check-"):
        e, w = part["exactness"], part["policy"]
        lines += [f"## {name}: {part['model']} {part['dtype']} on {part['device']}", "",
                  f"- batch 1 mismatches vs generate, per block: {e['batch1_mismatches']}",
                  "- batched: " + ", ".join(f"block {b}: {len(v['tie_flips'])} tie flips, {len(v['failures'])} failures"
                                            for b, v in e["batched"].items()),
                  f"- policy pass cost (ms by tokens fed): {w['cost_ms']}",
                  f"- widths chosen, real drafts: {w.get('real')}; fixed-point drafts: {w.get('fixed')}",
                  f"- exact: {e['ok']}; policy ok: {w['ok']}", ""]
    elif name.startswith("speed-"):
        lines += [f"## {name}: {part['model']} {part['dtype']}, N={part['max_new_tokens']}, {part['machine']}", "",
                  "| config | turns | drafts | passes/token | tokens/s | vs generate |", "|---|---|---|---:|---:|---:|"]
        lines += [f"| {r['config']} | {r.get('conversations', 'single')} | {r['drafts']} | {r['passes_per_token']} | "
                  f"{r['tokens_per_s']} | {r['speedup_vs_generate']}x |" for r in part["rows"]]
        lines += ["", "8 batched vs one by one: " + ", ".join(f"block {b}: {v['ratio']}x" for b, v in part["batching"].items()),
                  f"outputs differing from generate: {part['outputs_differing_from_generate']}", ""]
    else:
        lines += [f"## {name}", "", "```", json.dumps(part, indent=2)[:3000], "```", ""]
(out / "gpu-check.md").write_text("\n".join(lines))
print("\n".join(lines))
PYEOF
echo "wrote $OUT/gpu-check.json and $OUT/gpu-check.md (status $status)"
exit $status
