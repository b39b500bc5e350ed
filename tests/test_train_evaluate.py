"""The before/after measures: preference accuracy scored from a shared prompt cache equals the
definition computed one full sequence at a time."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")

from diffpo_sdk.train.evaluate import answer_scores, preference_accuracy  # noqa: E402
from diffpo_sdk.train.trainer import TrajectoryDataset  # noqa: E402

RECORDS = [
    {"messages": [{"role": "user", "content": f"Question {i}: which colour do you like, and why?"}],
     "target": f"I like {c} because it is calm.", "others": [f"{c}? {c}!", "No.", "I do not know any colours at all"]}
    for i, c in enumerate(["blue", "red", "green"])
]


def load(path: str, lora: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    return model.eval(), AutoTokenizer.from_pretrained(path)


def full_sequence_score(model, prompt: list[int], answer: list[int], mask: list[int]) -> float:
    """Straight from the definition: one forward of [prompt, answer], mean log p of the counted answer tokens."""
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0, len(prompt) - 1:-1].log_softmax(-1)
    token_logp = logp.gather(-1, torch.tensor(answer)[:, None])[:, 0]
    m = torch.tensor(mask, dtype=torch.float)
    return float((token_logp * m).sum() / m.sum())


@pytest.mark.parametrize("lora", [False, True])
def test_shared_prompt_scores_equal_full_sequences(tiny_llama_dir: str, lora: bool) -> None:
    model, tok = load(tiny_llama_dir, lora)
    ds = TrajectoryDataset(RECORDS, tok, 10)
    wins = []
    for item in ds.items:
        answers = [item["target"], *item["others"]]
        padded = [ds.padded(a) for a in answers]
        masks = [ds.answer_mask(a) for a in answers]
        assert len(set(map(sum, masks))) > 1  # answers of different lengths: the mask matters
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            got = answer_scores(model, item["prompt"], padded, masks)
        # the cache goes in under the keyword this transformers takes, also through a peft wrapper
        assert not [w for w in seen if "past_key_values" in str(w.message)]
        want = [full_sequence_score(model, item["prompt"], a, m) for a, m in zip(padded, masks)]
        assert got == pytest.approx(want, abs=1e-4)
        wins += [want[0] > s for s in want[1:]]
    assert preference_accuracy(model, ds) == pytest.approx(sum(wins) / len(wins))


def test_greedy_repetition_is_measured_on_greedy_answers_past_n(smollm2_path: str) -> None:
    from diffpo_sdk.train.evaluate import greedy_repetition, long_repetition, repetition_rate

    model, tok = load(smollm2_path, lora=False)
    records = [{"messages": [{"role": "user", "content": q}], "target": "A fine answer.", "others": ["No."]}
               for q in ["What are the names of some famous actors that started their careers on Broadway?",
                         "Name three primary colors."]]
    ds = TrajectoryDataset(records, tok, 8)
    want = []
    for item in ds.items:  # one prompt at a time, no padding: plain greedy generate, stop tokens dropped
        out = model.generate(torch.tensor([item["prompt"]]), max_new_tokens=64, do_sample=False,
                             pad_token_id=ds.pad)[0, len(item["prompt"]):].tolist()
        cut = next((i for i, t in enumerate(out) if t in ds.stop_ids), len(out))
        want.append(out[:cut])
    assert repetition_rate(want) > 0.05  # SmolLM2 lists the same actor again and again: something to count
    assert greedy_repetition(model, ds, 64, batch_size=1) == pytest.approx(repetition_rate(want))
    # the long row exists only past N = 8: at or below it the refined outputs' own row says it
    assert long_repetition(model, ds, 64, batch_size=1) == pytest.approx(repetition_rate(want))
    assert long_repetition(model, ds, 8) is None
