"""Defects seen in review (issue 13.5), each with a test that would have caught it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from diffpo_sdk.train import data  # noqa: E402
from diffpo_sdk.train.trainer import DiffPOConfig, DiffPOTrainer, TrajectoryDataset  # noqa: E402

RECORDS = [
    {"messages": [{"role": "user", "content": f"Question number {i}: name a colour."}],
     "target": f"The colour {c} is nice.", "others": [f"{c}? {c}!", "I do not know"]}
    for i, c in enumerate(["blue", "red", "green", "yellow"])
]


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_precomputed_scorer_refuses_models_before_calling_them(tmp_path: Path) -> None:
    prompts = write(tmp_path / "p.jsonl", [{"prompt": "hi", "responses": [
        {"output": "hello", "preference": 1.0}, {"output": "hello there, friend", "preference": 2.0}]}])
    calls: list[str] = []

    def answer(model: str, messages: list[dict]) -> str:
        calls.append(model)
        return "an answer nobody could score"

    with pytest.raises(data.DataError, match="precomputed"):
        list(data.from_live(prompts, ["m1", "m2"], "precomputed", tmp_path / "c.jsonl", answer_fn=answer))
    assert calls == []
    assert data.main(["build", "--prompts", str(prompts), "--models", "m1", "--output", str(tmp_path / "o.jsonl")]) == 2
    assert not (tmp_path / "o.jsonl").exists()
    # without --models the precomputed answers are used as they are
    (rec,) = data.from_live(prompts, [], "precomputed", tmp_path / "c.jsonl", answer_fn=answer)
    assert rec["target"] == "hello there, friend" and calls == []


REMOTE_CODE = '''
import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput


class LengthRMConfig(PretrainedConfig):
    model_type = "diffpo-test-length-rm"


class LengthRM(PreTrainedModel):
    """Scores an answer by its token count: a reward model that exists only as shipped code."""

    config_class = LengthRMConfig

    def __init__(self, config):
        super().__init__(config)
        self.scale = torch.nn.Parameter(torch.ones(1))
        self.post_init()

    def _init_weights(self, module):
        pass

    def forward(self, input_ids=None, attention_mask=None, **kw):
        score = attention_mask.sum(-1, keepdim=True).float() * self.scale
        return SequenceClassifierOutput(logits=score)
'''


def test_reward_model_scorer_trusts_remote_code_only_when_asked(tiny_llama_dir: str, tmp_path: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    folder = tmp_path / "length-rm"
    folder.mkdir()
    (folder / "length_rm.py").write_text(REMOTE_CODE)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "diffpo-test-length-rm", "architectures": ["LengthRM"],
        "auto_map": {"AutoConfig": "length_rm.LengthRMConfig",
                     "AutoModelForSequenceClassification": "length_rm.LengthRM"}}))
    save_file({"scale": torch.ones(1)}, str(folder / "model.safetensors"))
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(folder)
    with pytest.raises(ValueError, match="trust_remote_code"):
        data.make_scorer(f"reward-model:{folder}")
    scorer = data.make_scorer(f"reward-model:{folder}", trust_remote_code=True)
    short, long = scorer([{"role": "user", "content": "hi"}], ["ok", "a much longer answer than the other"])
    assert long > short
    parser = data.build_parser()
    assert parser.parse_args(["--prompts", "p", "--output", "o", "--trust-remote-code"]).trust_remote_code is True
    assert parser.parse_args(["--prompts", "p", "--output", "o"]).trust_remote_code is False


def test_evaluate_uses_the_dataset_it_is_given(tiny_llama_dir: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    own = TrajectoryDataset(RECORDS[:2], tok, 10)
    other = TrajectoryDataset(RECORDS[2:], tok, 10)
    args = DiffPOConfig(output_dir=str(tmp_path), recipe="fast", use_cpu=True, max_response_tokens=10, guard_prompts=1,
                        eval_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True,
                        trajectory_source="answers", per_device_eval_batch_size=2)
    trainer = DiffPOTrainer(model=model, args=args, train_dataset=own, eval_dataset=own, processing_class=tok)
    on_own = trainer.evaluate()
    on_other = trainer.evaluate(eval_dataset=other, metric_key_prefix="other")
    assert on_other["other_ar_loss"] == pytest.approx(trainer.heldout_metrics(other)["ar_loss"])
    assert on_other["other_ar_loss"] != pytest.approx(on_own["eval_ar_loss"])


def test_push_to_hub_gets_the_project_card(tiny_llama_dir: str, tmp_path: Path) -> None:
    """``push_to_hub`` uploads what ``create_model_card`` writes: the project's card, not Trainer's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from diffpo_sdk.train.__main__ import model_card

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    args = DiffPOConfig(output_dir=str(tmp_path), use_cpu=True, recipe="paper", learning_rate=1e-8, data="traj.jsonl",
                        eval_strategy="no", save_strategy="no", report_to="none")
    trainer = DiffPOTrainer(model=model, args=args, train_dataset=TrajectoryDataset(RECORDS, tok, 10),
                            processing_class=tok)
    trainer.model_card = model_card(args, "| measure | before |", None)
    trainer.create_model_card(model_name="x")
    card = (tmp_path / "README.md").read_text()
    assert "**Recipe:** `paper`" in card and "`learning_rate` = 1e-08" in card
    assert "How the recipe differs from the paper" in card and "Collapse guards were off" in card
