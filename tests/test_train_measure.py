"""A refiner changed after training is measured on its run's own split before it ships, and its
card is written from that measurement and the runs that made it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")


def tiny_data(path: Path) -> Path:
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Question {i}: name a colour."}],
                                        "target": f"The colour {c} is nice.", "others": [f"{c}? {c}!", "No idea"]})
                            + "\n" for i, c in enumerate(["blue", "red", "green", "yellow"] * 2)))
    return path


def run_flags(data: Path) -> list[str]:
    """A `fast` run of a tiny model on ``data``, its held-out quarter measured (training and measuring alike)."""
    return ["--data", str(data), "--transfer-eval-data", str(data), "--max-response-tokens", "8", "--use-cpu", "true",
            "--eval-fraction", "0.25", "--per-device-eval-batch-size", "4", "--disable-tqdm", "true", "--guard", "false",
            "--jacobi-states-per-prompt", "1", "--dataloader-pin-memory", "false", "--recipe", "fast"]


def test_measure_reproduces_the_runs_table_and_the_card_cites_it(tiny_llama_dir: str, tmp_path: Path) -> None:
    from diffpo_sdk.train.__main__ import main as train
    from diffpo_sdk.train.card import main as card
    from diffpo_sdk.train.extract import extract_lora
    from diffpo_sdk.train.measure import measure

    common = [*run_flags(tiny_data(tmp_path / "traj.jsonl")), "--eval-long-tokens", "16"]
    run = tmp_path / "full"
    assert train([*common, "--model", tiny_llama_dir, "--max-steps", "2", "--learning-rate", "1e-3",
                  "--eval-strategy", "no", "--output-dir", str(run)]) == 0
    trained = json.loads((run / "eval_results.json").read_text())["columns"]["after"]

    # the full fine-tune measured again, with the training flags left in: the run's own numbers
    got = measure([*common, "--model", str(run), "--max-steps", "2", "--eval-base-model", tiny_llama_dir,
                   "--output-dir", str(tmp_path / "again")])
    assert list(got["columns"]) == ["base", "after"] and got["measured"] and got["block_size"] == 8
    for key, value in trained.items():
        if key != "guess_accuracy":  # counted on the measured model's own branches, not the starting model's
            assert got["columns"]["after"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert (got["columns"]["base"]["heldout_ar_loss"] != pytest.approx(trained["heldout_ar_loss"], rel=1e-3))

    # an adapter extracted from it is measured itself, and its card cites that table and the run
    adapter = tmp_path / "lora"
    extract_lora(run, tiny_llama_dir, adapter, rank=2, base_name=tiny_llama_dir)
    got = measure([*common, "--model", str(adapter), "--eval-base-model", tiny_llama_dir,
                   "--output-dir", str(tmp_path / "measured")])
    assert card([str(adapter), "--name", "tiny-diffpo", "--measured", str(tmp_path / "measured"),
                 "--runs", str(run), "--command", "make tiny"]) == 0
    text = (adapter / "README.md").read_text()
    after, base = got["columns"]["after"], got["columns"]["base"]
    row = next(line for line in text.splitlines() if line.startswith("| held-out L_AR on targets | "))
    assert row.split(" | ")[1:3] == [f"{base['heldout_ar_loss']:.3f}", f"{after['heldout_ar_loss']:.3f}"]
    assert f"a rank-2 LoRA on {tiny_llama_dir}" in text and "Built by `make tiny`" in text
    assert f"## Run 1: recipe `fast` from `{tiny_llama_dir}`" in text and str(tmp_path) not in text


def test_a_mixed_precision_run_measures_its_weights_as_saved(tiny_llama_dir: str, tmp_path: Path) -> None:
    """Under ``--bf16`` accelerate runs the trained model's forward under autocast. The run's own
    evaluations and final table must still measure the weights as the saved model runs them (in
    float32, as the untrained column is), so they equal a measurement of the saved model."""
    from diffpo_sdk.train.__main__ import main as train
    from diffpo_sdk.train.measure import measure

    common = run_flags(tiny_data(tmp_path / "traj.jsonl"))
    run = tmp_path / "bf16"
    # an evaluation at the last step: the after column reuses its held-out losses
    assert train([*common, "--model", tiny_llama_dir, "--max-steps", "2", "--eval-steps", "2", "--learning-rate",
                  "1e-3", "--bf16", "true", "--output-dir", str(run)]) == 0
    results = json.loads((run / "eval_results.json").read_text())["columns"]
    got = measure([*common, "--model", str(run), "--eval-base-model", tiny_llama_dir,
                   "--output-dir", str(tmp_path / "again")])["columns"]
    for column, measured in (("before", "base"), ("after", "after")):
        for key, value in results[column].items():
            if key != "guess_accuracy":  # counted on each model's own branches
                assert got[measured][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (column, key)
