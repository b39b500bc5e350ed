"""A full fine-tune ships as a LoRA adapter: the extracted adapter on the base gives the tuned
model's logits when the change has the adapter's rank, and says what it cannot carry."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")


def tuned_copy(tiny_llama_dir: str, out: Path, rank: int, norm_change: float = 0.0) -> Path:
    """The tiny model with a random rank-``rank`` change in every linear layer LoRA targets."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from diffpo_sdk.train.extract import LINEAR_TARGETS

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".weight") and name.split(".")[-2] in LINEAR_TARGETS:
                p += 0.05 * torch.randn(p.shape[0], rank) @ torch.randn(rank, p.shape[1])
        model.model.norm.weight += norm_change
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(out)
    return out


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_extracted_adapter_reproduces_a_change_of_its_rank(tiny_llama_dir: str, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from diffpo_sdk.train.extract import extract_lora

    tuned = tuned_copy(tiny_llama_dir, tmp_path / "tuned", rank=2)
    done = extract_lora(tuned, tiny_llama_dir, tmp_path / "lora", rank=2, base_name="tiny", dtype=torch.float32)
    assert done.energy_kept == pytest.approx(1.0, abs=1e-6) and done.dropped == {}
    base = lambda: AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)  # noqa: E731
    ids = torch.tensor([[1, 5, 9, 200, 17, 4]])
    want = logits(AutoModelForCausalLM.from_pretrained(tuned, dtype=torch.float32), ids)
    adapted = PeftModel.from_pretrained(base(), tmp_path / "lora")
    assert adapted.peft_config["default"].base_model_name_or_path == "tiny"
    assert (want - logits(base(), ids)).abs().max() > 1e-2  # the change does something
    torch.testing.assert_close(logits(adapted, ids), want, rtol=1e-4, atol=1e-4)
    # a lower rank keeps only part of the change, and says so
    part = extract_lora(tuned, tiny_llama_dir, tmp_path / "lora1", rank=1, dtype=torch.float32)
    assert 0.3 < part.energy_kept < 0.99


def test_changes_outside_linear_layers_are_reported_dropped(tiny_llama_dir: str, tmp_path: Path, capsys) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from diffpo_sdk.engine.loading import load_model_and_tokenizer
    from diffpo_sdk.train.extract import main

    tuned = tuned_copy(tiny_llama_dir, tmp_path / "tuned", rank=1, norm_change=0.1)
    assert main([str(tuned), str(tmp_path / "lora"), "--base", tiny_llama_dir, "--rank", "1"]) == 0
    out = capsys.readouterr().out
    assert "100.0 % of the linear layers' change kept" in out and "model.norm.weight" in out
    # the folder loads by path in the engine's loader, on the base it names, with the base's tokenizer
    assert not list((tmp_path / "lora").glob("tokenizer*")) and "tokenizer, unchanged" in out
    model, tok, _ = load_model_and_tokenizer(str(tmp_path / "lora"), device=torch.device("cpu"), dtype=torch.float32)
    assert tok.get_vocab() == AutoTokenizer.from_pretrained(tiny_llama_dir).get_vocab()
    ids = torch.tensor([[1, 5, 9, 200, 17, 4]])
    assert (logits(model, ids) - logits(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), ids)).abs().max() > 1e-2


def test_a_changed_tokenizer_ships_with_the_adapter(tiny_llama_dir: str, tmp_path: Path, capsys) -> None:
    from transformers import AutoTokenizer

    from diffpo_sdk.engine.loading import load_tokenizer
    from diffpo_sdk.train.extract import main

    tuned = tuned_copy(tiny_llama_dir, tmp_path / "tuned", rank=1)
    tok = AutoTokenizer.from_pretrained(tuned)
    tok.add_special_tokens({"additional_special_tokens": ["<refine>"]})
    tok.save_pretrained(tuned)
    assert main([str(tuned), str(tmp_path / "lora"), "--base", tiny_llama_dir, "--rank", "1"]) == 0
    assert "tokenizer files that differ from the base's: " in capsys.readouterr().out
    assert "<refine>" in load_tokenizer(str(tmp_path / "lora")).get_vocab()


def test_an_embedding_change_rides_on_a_tied_embedding_lora(tiny_llama_dir: str, tmp_path: Path, capsys) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from diffpo_sdk.engine.loading import load_model_and_tokenizer
    from diffpo_sdk.train.extract import extract_lora, main

    tuned = tuned_copy(tiny_llama_dir, tmp_path / "tuned", rank=1)
    model = AutoModelForCausalLM.from_pretrained(tuned, dtype=torch.float32)
    assert model.config.tie_word_embeddings
    emb = model.get_input_embeddings().weight
    with torch.no_grad():  # a rank-2 change of the tied matrix: input embedding and output head alike
        emb += 0.05 * torch.randn(emb.shape[0], 2) @ torch.randn(2, emb.shape[1])
    model.save_pretrained(tuned)
    ids = torch.tensor([[1, 5, 9, 200, 17, 4]])
    want = logits(AutoModelForCausalLM.from_pretrained(tuned, dtype=torch.float32), ids)
    load = lambda p: load_model_and_tokenizer(str(p), device=torch.device("cpu"), dtype=torch.float32)[0]  # noqa: E731
    # without it the embedding's change is dropped (and said so)
    assert main([str(tuned), str(tmp_path / "lora"), "--base", tiny_llama_dir, "--rank", "1"]) == 0
    assert "model.embed_tokens.weight" in capsys.readouterr().out
    assert (logits(load(tmp_path / "lora"), ids) - want).abs().max() > 1e-2
    assert main([str(tuned), str(tmp_path / "lora-e"), "--base", tiny_llama_dir, "--rank", "1",
                 "--embedding-rank", "2"]) == 0
    out = capsys.readouterr().out
    assert "rank 2: 100.0 % of the embedding's" in out and "embed_tokens" not in out
    # with it, the adapter gives the tuned logits: on the base as peft applies it, and merged by the
    # engine's loader (which must not add the tied change twice), and the merged head stays tied
    extract_lora(tuned, tiny_llama_dir, tmp_path / "lora-f", rank=1, embedding_rank=2, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    torch.testing.assert_close(logits(PeftModel.from_pretrained(base, tmp_path / "lora-f"), ids), want,
                               rtol=1e-4, atol=1e-4)
    with warnings.catch_warnings(record=True) as seen:  # nor warns of keys it does not need
        warnings.simplefilter("always")
        merged = load(tmp_path / "lora-f")
    assert not [str(w.message)[:300] for w in seen if "adapter keys" in str(w.message) or "tie_word" in str(w.message)]
    torch.testing.assert_close(logits(merged, ids), want, rtol=1e-4, atol=1e-4)
    assert merged.get_output_embeddings().weight is merged.get_input_embeddings().weight
    assert merged.config.tie_word_embeddings
