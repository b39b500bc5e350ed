"""The sft-fast recipe in one run: an SFT phase, then the consistency phase held on the SFT'd model."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from diffpo_sdk.train.trainer import DiffPOConfig, DiffPOTrainer, TrajectoryDataset  # noqa: E402

RECORDS = [
    {"messages": [{"role": "user", "content": f"Question number {i}: name a colour."}],
     "target": f"The colour {c} is nice.", "others": [f"{c}? {c}!", "I do not know"]}
    for i, c in enumerate(["blue", "red", "green", "yellow", "white", "black"])
]


def tiny_model(tiny_llama_dir: str) -> tuple[object, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32), \
        AutoTokenizer.from_pretrained(tiny_llama_dir)


def frontier_data(records: list[dict], model: object, tok: object) -> TrajectoryDataset:
    """``records`` as frontier trajectories (N = 12) whose states ``model`` builds lazily, 3 prompts at a time."""
    from diffpo_sdk.train.states import LazyStates

    plain = TrajectoryDataset(records, tok, 12)
    states = LazyStates(model, tok, [it["prompt"] for it in plain.items], [it["others"][0] for it in plain.items],
                        12, plain.eot, plain.stop_ids, chunk=3, progress=False)
    return TrajectoryDataset(records, tok, 12, source="frontier", states=states)


def test_sft_phase_then_consistency_phase_held_on_the_sft_model(tiny_llama_dir: str, tmp_path: Path) -> None:
    from transformers import TrainerCallback

    from diffpo_sdk.train.states import EpochOrder

    model, tok = tiny_model(tiny_llama_dir)
    train, held = frontier_data(RECORDS, model, tok), frontier_data(RECORDS[:2], model, tok)
    args = DiffPOConfig(output_dir=str(tmp_path / "out"), recipe="sft-fast", max_response_tokens=12, max_steps=8,
                        consistency_start=0.75, sft_max_epochs=2,
                        learning_rate=3e-3, per_device_train_batch_size=2, per_device_eval_batch_size=4,
                        eval_strategy="steps", eval_steps=2, save_strategy="no", logging_steps=1, disable_tqdm=True,
                        use_cpu=True, seed=0, guard_prompts=2, guard_action="warn", dataloader_pin_memory=False)
    assert (args.consistency_start, args.trajectory_source, args.fixed_point_weight) == (0.75, "frontier", 10.0)
    assert args.target_hold_weight == 10.0
    seen: dict[str, object] = {}

    class Watch(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):  # noqa: ANN001, ANN201
            seen.setdefault("sources", {})[state.global_step] = train.source
            if state.global_step == 6:  # the SFT phase is over: the weights the consistency phase must hold
                seen["sft"] = {n: p.detach().clone() for n, p in model.named_parameters()}

        def on_evaluate(self, a, state, control, metrics=None, **kw):  # noqa: ANN001, ANN201
            seen.setdefault("evals", []).append(state.global_step)

    trainer = DiffPOTrainer(model=model, args=args, train_dataset=train, eval_dataset=held, processing_class=tok,
                            callbacks=[Watch()])
    assert trainer.ref_model is None and train.source == "answers"
    trainer.train()
    logged = [h for h in trainer.state.log_history if "consistency_weight" in h]
    weights = {h["step"]: h["consistency_weight"] for h in logged}
    assert all(weights[s] == 0.0 for s in range(1, 7)) and weights[8] > 0  # SFT phase: w = 0
    # each phase runs the whole linear schedule: 6 steps decaying from the peak, then 2 from the peak again
    # (the learning rate logged at step k is the one step k used)
    lrs = {h["step"]: h["learning_rate"] for h in logged}
    assert lrs[6] == pytest.approx(3e-3 / 6) and lrs[7] == pytest.approx(3e-3) and lrs[8] == pytest.approx(3e-3 / 2)
    assert all(h.get("con_loss", 0.0) == 0.0 and "fixed_point_loss" not in h for h in logged if h["step"] <= 6)
    assert any("fixed_point_loss" in h for h in logged if h["step"] > 6)
    # the target hold needs the SFT'd model as its reference: none before it exists, every step after
    assert all("target_hold_loss" not in h for h in logged if h["step"] <= 6)
    assert all(h["target_hold_loss"] > 0 for h in logged if h["step"] > 7)
    # evaluations during the SFT phase (steps 2, 4) are skipped; the consistency phase is judged against the
    # SFT'd model, first at the step that ended the SFT phase
    assert seen["evals"] == [6, 8] and held.source == "frontier"
    assert seen["sources"][5] == "answers" and seen["sources"][6] == seen["sources"][7] == "frontier"
    ref = dict(trainer.ref_model.named_parameters())
    assert all(torch.equal(ref[n], w) for n, w in seen["sft"].items())
    assert not all(torch.equal(p, seen["sft"][n]) for n, p in model.named_parameters())
    assert train.states.model is trainer.guard_reference and "sft step 6" in train.states.model_id
    assert trainer.guard_baseline is not None and trainer.untrained_metrics is None
    # the consistency phase (steps 7-8, the third epoch) built states for the prompts it consumed, in
    # the sampler's order, 3 at a time: the SFT'd model's first group is the epoch's first 3 prompts
    assert isinstance(trainer._get_train_sampler(), EpochOrder)
    epoch = EpochOrder(len(RECORDS), args.seed).order(2)
    assert train.states.groups == [epoch[:3], epoch[3:]]


def test_consistency_start_is_a_share_of_the_steps(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--consistency-start"):
        DiffPOConfig(output_dir=str(tmp_path), consistency_start=1.0, use_cpu=True)


def test_sft_phase_ends_after_one_epoch_when_the_share_is_more(tiny_llama_dir: str, tmp_path: Path) -> None:
    """The default recipe's 60 % of a long run would be several epochs of SFT, which overfits:
    its SFT phase stops at one epoch (6 prompts, batches of 2: 3 steps), unless told otherwise."""
    model, tok = tiny_model(tiny_llama_dir)
    train = frontier_data(RECORDS, model, tok)

    def config(**kw: object) -> DiffPOConfig:
        return DiffPOConfig(output_dir=str(tmp_path / "out"), max_response_tokens=12, max_steps=8,
                            learning_rate=3e-3, per_device_train_batch_size=2, eval_strategy="no", save_strategy="no",
                            logging_steps=1, disable_tqdm=True, use_cpu=True, seed=0, dataloader_pin_memory=False,
                            **kw)

    def start(**kw: object) -> int:
        return DiffPOTrainer(model=model, args=config(**kw), train_dataset=train,
                             processing_class=tok).consistency_start_step(8)

    assert config().sft_max_epochs == 1.0  # the default recipe's cap
    assert start() == 3  # 60 % of 8 steps is 4; one epoch is 3
    assert start(sft_max_epochs=0) == 4 and start(sft_max_epochs=2) == 4
    assert start(gradient_accumulation_steps=2) == 2  # 3 batches, 2 per step: one epoch is 2 steps
    assert start(consistency_start=0.25) == 2  # a share below one epoch is kept
    with pytest.raises(ValueError, match="--sft-max-epochs"):
        config(sft_max_epochs=-1)

    trainer = DiffPOTrainer(model=model, args=config(), train_dataset=train, processing_class=tok)
    trainer.train()
    weights = {h["step"]: h["consistency_weight"] for h in trainer.state.log_history if "consistency_weight" in h}
    assert all(weights[s] == 0.0 for s in range(1, 4)) and weights[5] > 0
    assert not trainer.sft_phase and "sft step 3" in train.states.model_id
