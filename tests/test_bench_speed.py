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


@pytest.mark.timeout(300)
def test_bench_speed_puts_a_second_refiner_beside_the_first(tiny_llama_dir, tmp_path, capsys):
    """``--compare-model``: an adapter folder (as the built-in trained refiner is) beside its base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from diffpo_sdk.bench.speed import main

    adapter = tmp_path / "adapter"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                           LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False))
    model.peft_config["default"].base_model_name_or_path = tiny_llama_dir
    model.save_pretrained(adapter)
    out = tmp_path / "speed.json"
    assert main(["--model", tiny_llama_dir, "--compare-model", str(adapter), "--device", "cpu", "--dtype", "float32",
                 "--num-prompts", "2", "--max-new-tokens", "16", "--blocks", "4,N", "--drafts", "real",
                 "--batch-blocks", "", "--official-prompts", "0", "--out", str(out), "--plot", ""]) == 0
    report = json.loads(out.read_text())
    assert report["outputs_differing_from_generate"] == 0
    rows = report["compare"]
    assert [(r["config"], r["model"]) for r in rows] == [
        (f"engine block={b}", m) for b in (4, 16, "auto") for m in (tiny_llama_dir, str(adapter))]
    assert all(r["drafts"] == "real" and r["passes_per_token"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    printed = capsys.readouterr().out
    assert "refiners side by side on the same real drafts" in printed and str(adapter) in printed
