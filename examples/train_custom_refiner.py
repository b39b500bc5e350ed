"""Train a tiny custom refiner end to end, offline, in a few minutes on CPU.

1. build trajectories from scored multi-model answers (the shared AlpacaEval file when this
   checkout has it, else a few inline examples);
2. train the built-in SmolLM2-135M-Instruct with LoRA for a handful of steps;
3. load the result in the engine and refine a draft.

For a real run, use many more steps: see docs/training.md.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from diffpo_sdk.shared_data import ALPACA_PREFERENCES, shared_file
from diffpo_sdk.train import data

INLINE = [
    {"instruction": "How do I boil an egg?", "responses": [
        {"output": "boil it", "preference": 1.0},
        {"output": "Put the egg in boiling water for 9 minutes, then cool it in cold water.", "preference": 1.8}]},
    {"instruction": "Name three primary colours.", "responses": [
        {"output": "Red, blue and yellow are the traditional primary colours.", "preference": 1.7},
        {"output": "colours are nice", "preference": 1.1}]},
] * 4


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="diffpo-example-"))
    shared = shared_file(ALPACA_PREFERENCES)
    src = shared if shared is not None else work / "scored.jsonl"
    if shared is None:
        src.write_text("".join(json.dumps(r) + "\n" for r in INLINE))
    traj = work / "traj.jsonl"
    data.main(["build", "--from-scored", str(src), "--output", str(traj), "--limit", "12"])

    from diffpo_sdk.train.__main__ import main as train

    out = work / "refiner"
    rc = train(["--recipe", "fast", "--model", "smollm2-135m-instruct", "--data", str(traj), "--output-dir", str(out),
                "--max-response-tokens", "16", "--max-steps", "2", "--lora-r", "8", "--learning-rate", "1e-4",
                "--eval-fraction", "0.25", "--max-eval-prompts", "2", "--eval-strategy", "no", "--guard", "false",
                "--final-eval", "false",  # the before/after table costs minutes on CPU: see docs/training.md
                "--jacobi-states-per-prompt", "1", "--dataloader-pin-memory", "false"])
    if rc:
        return rc

    from diffpo_sdk.engine import RefinerEngine

    engine = RefinerEngine.from_pretrained(str(out), device="cpu", dtype="float32", calibrate=False)
    res = engine.refine([{"prompt": "How do I boil an egg?", "draft": "boil it"}], block_size=16, max_new_tokens=48)[0]
    print(f"refined in {res.iterations} passes for {res.new_tokens} tokens:\n{res.text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
