"""``diffpo bench train`` runs end to end on a real (tiny) model and reports every step it times."""

from __future__ import annotations

import json
from pathlib import Path

RECORDS = [
    {"messages": [{"role": "user", "content": "Name a colour."}], "target": "Blue is a colour of the sky.",
     "others": ["Red is nice, I think, or green."]},
]


def test_bench_train_times_every_step_and_writes_its_ratios(tiny_llama_dir: str, tmp_path: Path) -> None:
    from diffpo_sdk.bench.train import main

    data = tmp_path / "traj.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    out = tmp_path / "bench_train.json"
    assert main(["--model", tiny_llama_dir, "--data", str(data), "--max-response-tokens", "8", "--repeats", "2",
                 "--device", "cpu", "--bf16", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    steps = {"sft", "diffpo_answers", "diffpo_jacobi", "diffpo_frontier", "default_recipe", "default_target_apart",
             "sft_bf16", "default_recipe_bf16"}
    assert set(result["median_s"]) == steps and all(v > 0 for v in result["median_s"].values())
    assert result["ratio_default_recipe_vs_sft"] == result["median_s"]["default_recipe"] / result["median_s"]["sft"]
    assert result["ratio_target_apart_vs_packed"] > 0
    for step in ("sft", "default_recipe"):
        assert result[f"ratio_{step}_bf16_vs_float32"] == result["median_s"][f"{step}_bf16"] / result["median_s"][step]
