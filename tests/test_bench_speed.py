"""``diffpo bench speed`` end to end on a tiny model: every comparison runs and agrees with greedy."""

from __future__ import annotations

import json

import pytest


@pytest.mark.timeout(300)
def test_bench_speed_smoke(tiny_llama_dir, tmp_path, capsys):
    from diffpo_sdk.bench.speed import main

    out, png = tmp_path / "speed.json", tmp_path / "speed.png"
    assert main(["--model", tiny_llama_dir, "--device", "cpu", "--dtype", "float32", "--num-prompts", "2",
                 "--max-new-tokens", "16", "--blocks", "4,N", "--drafts", "real,fixed", "--batch-blocks", "auto", "--conversations", "single,two-turn",
                 "--official-prompts", "1", "--official-max-new-tokens", "24", "--official-blocks", "8,24",
                 "--out", str(out), "--plot", str(png)]) == 0
    report = json.loads(out.read_text())
    assert report["outputs_differing_from_generate"] == 0
    configs = {(r["config"], r["drafts"], r["conversations"]) for r in report["rows"]}
    for turns in ("single", "two-turn"):
        assert ("hf-generate", "-", turns) in configs
        for kind in ("real", "fixed"):
            assert {(f"engine block={b}", kind, turns) for b in (4, 16, "auto")} <= configs
    assert set(report["batching"]) == {"auto"} and report["batching"]["auto"]["ratio"] > 0
    official = report["official"]
    assert set(official["baselines"]) == {"8", "24"} and official["max_new_tokens"] == 24
    for b in official["baselines"].values():
        assert b["seconds"] > 0 and b["passes_per_token"] > 0
    assert png.stat().st_size > 0
    assert "no-cache official Jacobi (block 24" in capsys.readouterr().out
