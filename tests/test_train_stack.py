"""Two LoRA adapters trained one after the other ship as one: the stacked adapter on the base
gives the same logits as the first merged and the second applied on top."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")


def random_lora(model, r: int, alpha: int, seed: int):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    m = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # PEFT starts B at zero: make the adapter do something
    return m


def test_stacked_adapter_equals_the_two_in_sequence(tiny_llama_dir: str, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from diffpo_sdk.train.stack import stack_adapters

    load = lambda: AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)  # noqa: E731
    first = random_lora(load(), r=4, alpha=8, seed=1)
    first.save_pretrained(tmp_path / "first")
    second = random_lora(first.merge_and_unload(), r=2, alpha=6, seed=2)  # trained on the merged first
    second.save_pretrained(tmp_path / "second")
    ids = torch.tensor([[1, 5, 9, 200, 17, 4]])
    with torch.no_grad():
        expected = second(input_ids=ids).logits
        stacked_dir = stack_adapters(tmp_path / "first", tmp_path / "second", tmp_path / "both", base="tiny")
        stacked = PeftModel.from_pretrained(load(), stacked_dir)
        got = stacked(input_ids=ids).logits
        base = load()(input_ids=ids).logits
    assert stacked.peft_config["default"].r == 6 and stacked.peft_config["default"].base_model_name_or_path == "tiny"
    assert (expected - base).abs().max() > 1e-2  # the adapters change the model
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_stacked_card_is_written_from_both_runs(tiny_llama_dir: str, tmp_path: Path) -> None:
    """The built-in's model card comes from what its two runs measured, so a rebuild keeps it true."""
    import json

    from diffpo_sdk.train.__main__ import main as train
    from diffpo_sdk.train.card import refiner_card
    from diffpo_sdk.train.stack import main as stack

    data = tmp_path / "traj.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Question {i}: name a colour."}],
                                        "target": f"The colour {c} is nice.", "others": [f"{c}? {c}!", "No idea"]})
                            + "\n" for i, c in enumerate(["blue", "red", "green", "yellow"] * 2)))
    common = ["--data", str(data), "--max-response-tokens", "8", "--max-steps", "2", "--learning-rate", "1e-3",
              "--use-cpu", "true", "--eval-fraction", "0.25", "--eval-steps", "2", "--per-device-eval-batch-size", "4",
              "--disable-tqdm", "true", "--guard-prompts", "1", "--jacobi-states-per-prompt", "1",
              "--dataloader-pin-memory", "false", "--lora-r", "4", "--eval-long-tokens", "16"]
    assert train([*common, "--model", tiny_llama_dir, "--recipe", "sft", "--output-dir", str(tmp_path / "one")]) == 0
    assert train([*common, "--model", str(tmp_path / "one"), "--recipe", "fast", "--eval-base-model", tiny_llama_dir,
                  "--output-dir", str(tmp_path / "two")]) == 0
    assert stack([str(tmp_path / "one"), str(tmp_path / "two"), str(tmp_path / "both"), "--card", "tiny-diffpo",
                  "--command", "make tiny"]) == 0
    card = (tmp_path / "both" / "README.md").read_text()
    runs = [json.loads((tmp_path / d / "eval_results.json").read_text()) for d in ("one", "two")]
    base, final = runs[1]["columns"]["base"], runs[1]["columns"]["after"]
    assert list(runs[1]["columns"]) == ["base", "before", "after"]
    # run 2's base column is the model run 1 started from, measured again on the same prompts
    for key in ("heldout_ar_loss", "passes_per_token_drafts", "preference_accuracy"):
        assert base[key] == pytest.approx(runs[0]["columns"]["before"][key], rel=1e-4)
    assert [r["recipe"] for r in runs] == ["sft", "fast"] and "Built by `make tiny`" in card
    row = next(line for line in card.splitlines() if line.startswith("| held-out L_AR on targets | "))
    assert row.split(" | ")[1:3] == [f"{base['heldout_ar_loss']:.3f}", f"{final['heldout_ar_loss']:.3f}"]
    assert ("Known limitation" in card) == (final["repetition_long"] - base["repetition_long"] > 0.05)
    assert f"## Run 1: recipe `sft` from `{tiny_llama_dir}`" in card and "## Run 2: recipe `fast` from run 1's model" in card
    assert str(tmp_path) not in card  # no path of the machine that built it
    # a first run at another block size (the built-in's stage 1 at N = 96): run 2's own base
    # column still gives the comparison; without it, no mixed one
    runs[0]["block_size"] = 24
    (tmp_path / "one" / "eval_results.json").write_text(json.dumps(runs[0]))
    both = [tmp_path / "one", tmp_path / "two"]
    assert row in refiner_card("tiny-diffpo", "tiny", "stacked", tmp_path / "two", both)
    del runs[1]["columns"]["base"]
    (tmp_path / "two" / "eval_results.json").write_text(json.dumps(runs[1]))
    mixed = refiner_card("tiny-diffpo", "tiny", "stacked", tmp_path / "two", both)
    assert "Against the base" not in mixed and "measured at block size N = 8 without the base" in mixed
    assert "run 1 at N = 24" in mixed


def test_base_column_needs_the_same_tokenizer(tiny_llama_dir: str, tmp_path: Path) -> None:
    """A base model with another vocabulary would score other token ids: refused before training
    starts, so a wrong name costs seconds, not a whole run."""
    import json
    import shutil

    from transformers import AutoTokenizer

    from diffpo_sdk.train.__main__ import main as train

    other = tmp_path / "other"
    shutil.copytree(tiny_llama_dir, other)
    extended = AutoTokenizer.from_pretrained(tiny_llama_dir)
    extended.add_tokens(["<extra>"])
    extended.save_pretrained(other)
    data = tmp_path / "traj.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Question {i}?"}],
                                        "target": "An answer.", "others": ["No."]}) + "\n" for i in range(4)))
    argv = ["--model", tiny_llama_dir, "--data", str(data), "--output-dir", str(tmp_path / "out"), "--recipe", "sft",
            "--max-response-tokens", "8", "--max-steps", "2", "--use-cpu", "true", "--disable-tqdm", "true",
            "--eval-fraction", "0.25", "--dataloader-pin-memory", "false"]
    with pytest.raises(SystemExit, match="another tokenizer"):
        train([*argv, "--eval-base-model", str(other)])
    assert not (tmp_path / "out").exists()  # nothing trained, nothing measured
    # the same vocabulary passes the check (the tokenizer alone is loaded for it)
    from diffpo_sdk.train.__main__ import check_base_tokenizer

    check_base_tokenizer(tiny_llama_dir, AutoTokenizer.from_pretrained(tiny_llama_dir))
