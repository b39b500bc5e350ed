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
