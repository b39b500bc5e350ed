"""DiffPOTrainer on a tiny model: learning, the collapse guard, resume, and the saved output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from diffpo_sdk.train.trainer import DiffPOCollator, DiffPOConfig, DiffPOTrainer, TrajectoryDataset  # noqa: E402

RECORDS = [
    {"messages": [{"role": "user", "content": f"Question number {i}: name a colour."}],
     "target": f"The colour {c} is nice.", "others": [f"{c}? {c}!", "I do not know"]}
    for i, c in enumerate(["blue", "red", "green", "yellow", "white", "black"])
]


def load(path: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)


def config(tmp_path: Path, **kw) -> DiffPOConfig:
    base = dict(output_dir=str(tmp_path / "out"), max_response_tokens=12, max_steps=10, learning_rate=3e-3,
                per_device_train_batch_size=2, per_device_eval_batch_size=4, eval_strategy="no", save_strategy="no",
                logging_steps=5, disable_tqdm=True, use_cpu=True, seed=0, guard_prompts=2,
                trajectory_source="answers", consistency_warmup_ratio=0.0, dataloader_pin_memory=False, recipe="fast")
    base.update(kw)
    return DiffPOConfig(**base)


def test_few_steps_lower_both_losses(tiny_llama_dir: str, tmp_path: Path) -> None:
    from diffpo_sdk.train.evaluate import heldout_losses

    torch.manual_seed(0)
    model, tok = load(tiny_llama_dir)
    ds = TrajectoryDataset(RECORDS[:2], tok, 12)
    collate = DiffPOCollator(ds.pad)
    before = heldout_losses(model, ds, collate, mask="none")
    args = config(tmp_path, consistency_weight=1.0, consistency_mask="none", max_steps=8, learning_rate=1e-2)
    trainer = DiffPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    trainer.train()
    after = heldout_losses(model, ds, collate, mask="none")
    assert after["ar_loss"] < before["ar_loss"] - 1.0
    assert after["con_loss"] < before["con_loss"]
    logged = [h for h in trainer.state.log_history if "ar_loss" in h]
    assert logged and {"ar_loss", "con_loss", "consistency_weight"} <= set(logged[0])


@pytest.mark.parametrize("kind,depth,fixed_point_weight,anchor",
                         [("kl", 1, 0.0, "ce"), ("ce", 2, 1.0, "ce"), ("ce", 1, 1.0, "kl")])
def test_frontier_source_lowers_its_consistency_loss(tiny_llama_dir: str, tmp_path: Path, kind: str,
                                                     depth: int, fixed_point_weight: float, anchor: str) -> None:
    from diffpo_sdk.train.evaluate import heldout_losses
    from diffpo_sdk.train.states import build_states

    torch.manual_seed(0)
    model, tok = load(tiny_llama_dir)
    plain = TrajectoryDataset(RECORDS, tok, 12)
    states = build_states(model, tok, [it["prompt"] for it in plain.items], [it["others"][0] for it in plain.items],
                          12, plain.eot, plain.stop_ids, states_per_prompt=2, progress=False)
    ds = TrajectoryDataset(RECORDS, tok, 12, source="frontier", states=states, depth=depth)
    feats = [ds.get(i, deterministic=True) for i in range(len(ds))]
    assert sum(len(f["branches"]) for f in feats) > len(ds)
    assert all(sum(len(ws) for _, ws in f["branches"]) <= 12 for f in feats)
    assert max(len(ws) for f in feats for _, ws in f["branches"]) == depth
    collate = DiffPOCollator(ds.pad)
    before = heldout_losses(model, ds, collate, mask="none", kind=kind)
    args = config(tmp_path, consistency_weight=1.0, consistency_mask="none", consistency_loss=kind,
                  trajectory_source="frontier", frontier_depth=depth, max_steps=8, learning_rate=1e-2,
                  fixed_point_weight=fixed_point_weight, fixed_point_anchor=anchor)
    trainer = DiffPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    assert (trainer.ref_model is not None) == (anchor == "kl")
    trainer.train()
    after = heldout_losses(model, ds, collate, mask="none", kind=kind)
    assert after["con_loss"] < 0.8 * before["con_loss"]
    assert after["ar_loss"] < before["ar_loss"]
    assert after["guess_accuracy"] > before["guess_accuracy"]
    logged = [h for h in trainer.state.log_history if "ar_loss" in h]
    assert ("fixed_point_loss" in logged[0]) == bool(fixed_point_weight)
    if anchor == "kl":  # the reference stayed the untrained model while the model moved
        assert logged[0]["fixed_point_loss"] > 0  # 0 at the first step, then the model moves off the reference
        moved = [not torch.equal(p, q) for p, q in zip(model.parameters(), trainer.ref_model.parameters())]
        assert any(moved)
        from diffpo_sdk.train.loss import diffpo_loss
        from diffpo_sdk.train.trainer import loss_kwargs

        batch = collate(feats[:2])
        model.eval()
        with torch.no_grad():
            used = trainer.compute_loss(model, batch)
            kw = loss_kwargs(args)  # the run's options (diffpo_loss's own defaults are the default recipe's)
            torch.testing.assert_close(used, diffpo_loss(model, batch, 1.0, reference=trainer.ref_model, **kw).loss)
            assert not torch.allclose(used, diffpo_loss(model, batch, 1.0, **kw).loss)


def test_collapse_guard_stops_and_restores(tiny_llama_dir: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, tok = load(tiny_llama_dir)
    ds = TrajectoryDataset(RECORDS, tok, 12)
    held = TrajectoryDataset(RECORDS[:2], tok, 12)
    # a deliberately collapsing run: a huge consistency weight and learning rate
    args = config(tmp_path, consistency_weight=1000.0, learning_rate=0.5, max_steps=30, eval_strategy="steps",
                  eval_steps=3, guard_ar_tolerance=0.05)
    trainer = DiffPOTrainer(model=model, args=args, train_dataset=ds, eval_dataset=held, processing_class=tok)
    with pytest.warns(RuntimeWarning, match="COLLAPSE GUARD.*ignore its prefix"):
        trainer.train()
    assert trainer.guard_tripped and trainer.state.global_step < 30
    healthy = trainer._healthy
    assert healthy is not None
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), healthy[name])
    m = trainer.heldout_metrics()
    assert m["ar_loss"] <= trainer.guard_baseline["ar_loss"] + 0.05


def test_long_answer_guard_is_opt_in_and_judges_longer_greedy_answers(tiny_llama_dir: str, tmp_path: Path) -> None:
    """--guard-long-repetition-tolerance watches the guard prompts' --eval-long-tokens answers
    (past N, where a refiner trained on N-token answers loops); off, it costs nothing."""
    from diffpo_sdk.train.evaluate import greedy_repetition

    torch.manual_seed(0)
    model, tok = load(tiny_llama_dir)
    ds, held = TrajectoryDataset(RECORDS, tok, 12), TrajectoryDataset(RECORDS[:3], tok, 12)
    off = DiffPOTrainer(model=model, args=config(tmp_path, eval_long_tokens=24), train_dataset=ds,
                        eval_dataset=held, processing_class=tok)
    assert "repetition_long" not in off.heldout_metrics()
    # a tolerance below zero fails any run: only this guard can fire, the others are wide open
    args = config(tmp_path, max_steps=6, eval_strategy="steps", eval_steps=3, eval_long_tokens=24,
                  guard_long_repetition_tolerance=-1.0, guard_ar_tolerance=100.0, guard_repetition_tolerance=1.0)
    trainer = DiffPOTrainer(model=model, args=args, train_dataset=ds, eval_dataset=held, processing_class=tok)
    with pytest.warns(RuntimeWarning, match="repetition in 24-token answers"):
        trainer.train()
    assert trainer.state.global_step == 3 and "L_AR" not in trainer.guard_tripped
    measured = trainer.heldout_metrics()["repetition_long"]  # the restored (starting) weights
    assert measured == pytest.approx(greedy_repetition(model, held, 24, limit=2))
    assert measured == pytest.approx(trainer.guard_baseline["repetition_long"])


def test_repetition_without_a_tokenizer_is_that_of_the_greedy_answers(tiny_llama_dir: str, tmp_path: Path) -> None:
    """With no tokenizer the engine cannot refine drafts; the guard's repetition is then measured
    on the greedy answers themselves, in eval mode and without the stop token, as everywhere else."""
    from diffpo_sdk.train.evaluate import greedy_repetition, repetition_rate
    from diffpo_sdk.train.states import greedy_answers

    torch.manual_seed(0)
    model, tok = load(tiny_llama_dir)
    ds, held = TrajectoryDataset(RECORDS, tok, 12), TrajectoryDataset(RECORDS[:3], tok, 12)
    # a head that can say only four words and the stop token, so the answers repeat 3-grams
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-1e4)
        words = torch.tensor([300, 301, 302, 303, tok.eos_token_id])
        head.weight[words] = model.model.embed_tokens.weight[words] * 5
        head.bias[words] = torch.tensor([0.0, 0.0, 0.0, 0.0, -3.0])
    # and in train mode (dropout, say) says only the one word: its answers then repeat throughout
    bump = torch.zeros(model.config.vocab_size)
    bump[303] = 100.0
    head.register_forward_hook(lambda module, args, out: out + bump if module.training else out)
    model.lm_head = head
    model.train()
    trainer = DiffPOTrainer(model=model, args=config(tmp_path), train_dataset=ds, eval_dataset=held)
    measured = trainer.heldout_metrics()["repetition"]
    assert model.training  # left as it was
    model.eval()
    answers = greedy_answers(model, [it["prompt"] for it in held.items[:2]], 12, held.stop_ids, held.pad)
    expected = repetition_rate([[t for t in a if t not in held.stop_ids] for a in answers])
    assert expected > 0 and measured == pytest.approx(expected)
    assert measured == pytest.approx(greedy_repetition(model, held, 12, limit=2))


def test_resume_continues_from_checkpoint(tiny_llama_dir: str, tmp_path: Path) -> None:
    def run(out: str, resume: str | None = None, stop_at: int | None = None):
        from transformers import TrainerCallback

        class Interrupt(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
                if stop_at is not None and state.global_step >= stop_at:
                    control.should_training_stop = True

        torch.manual_seed(0)
        model, tok = load(tiny_llama_dir)
        # one lower-ranked answer per prompt: the random draw of y^(t) is not part of the checkpoint
        recs = [{**r, "others": r["others"][:1]} for r in RECORDS]
        ds = TrajectoryDataset(recs, tok, 12, seed=0)
        args = config(tmp_path, output_dir=out, max_steps=4, save_strategy="steps", save_steps=2,
                      consistency_mask="none")
        trainer = DiffPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[Interrupt()])
        trainer.train(resume_from_checkpoint=resume)
        return model, trainer

    full, _ = run(str(tmp_path / "a"))
    _, t = run(str(tmp_path / "b"), stop_at=3)  # "interrupted" after step 3; last checkpoint at step 2
    assert t.state.global_step == 3
    resumed, t2 = run(str(tmp_path / "b"), resume=str(tmp_path / "b" / "checkpoint-2"))
    assert t2.state.global_step == 4
    for (n, a), (_, b) in zip(full.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=n)


def oracle_check(out_dir: str, base_dir: str) -> None:
    """The saved refiner loads in the engine and refines exactly like its own greedy generate."""
    from diffpo_sdk.engine import RefinerEngine
    from diffpo_sdk.engine.templating import prompt_ids

    engine = RefinerEngine.from_pretrained(out_dir, device="cpu", dtype="float32", calibrate=False)
    msgs = [{"role": "user", "content": "Name a colour."}]
    for block in (4, 12):
        res = engine.refine([{"messages": msgs, "draft": "The colour blue is nice."}], block_size=block,
                            max_new_tokens=12)[0]
        ids = torch.tensor([prompt_ids(engine.tokenizer, msgs)])
        gen = engine.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                    do_sample=False, eos_token_id=sorted(engine.stop_ids),
                                    pad_token_id=engine.pad_id)[0, ids.shape[1]:].tolist()
        gen = gen[: next((i for i, t in enumerate(gen) if t in engine.stop_ids), len(gen))]
        assert res.token_ids == gen


@pytest.mark.parametrize("lora", [False, True])
def test_cli_output_loads_in_engine(tiny_llama_dir: str, tmp_path: Path, lora: bool) -> None:
    import yaml

    from diffpo_sdk.train.__main__ import main

    data = tmp_path / "traj.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS * 2))
    cfg = tmp_path / "train.yaml"
    cfg.write_text(yaml.safe_dump({"model": tiny_llama_dir, "data": str(data), "max_response_tokens": 12,
                                   "max_steps": 2, "learning_rate": 1e-3, "use_cpu": True}))
    out = tmp_path / "out"
    argv = ["--config", str(cfg), "--output_dir", str(out), "--eval-fraction", "0.3", "--eval_steps", "2",
            "--per-device-eval-batch-size", "4", "--disable-tqdm", "true", "--guard-prompts", "1",
            "--jacobi_states_per_prompt", "1", "--dataloader-pin-memory", "false"]
    if lora:  # the table is checked once, in the full fine-tune variant
        argv += ["--lora-r", "4", "--final-eval", "false"]
    assert main(argv) == 0
    assert (out / ("adapter_config.json" if lora else "config.json")).is_file()
    card = (out / "README.md").read_text()
    assert "base_model:" in card
    if not lora:
        results = json.loads((out / "eval_results.json").read_text())
        assert set(results["columns"]) == {"before", "after"}
        assert "passes_per_token_drafts" in results["columns"]["after"]
        assert "passes/token" in card
    oracle_check(str(out), tiny_llama_dir)


def test_lora_reference_is_the_model_with_its_adapter_off(tiny_llama_dir: str) -> None:
    """With LoRA the KL anchor's reference costs no copy: the same model, adapter switched off."""
    from peft import LoraConfig, get_peft_model

    from diffpo_sdk.train.trainer import reference_model

    torch.manual_seed(0)
    base, _ = load(tiny_llama_dir)
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    with torch.no_grad():
        before = base(input_ids=ids).logits
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    ref = reference_model(model)
    with torch.no_grad():
        adapted, off = model(input_ids=ids).logits, ref(input_ids=ids).logits
    assert not torch.allclose(adapted, before, atol=1e-4)
    torch.testing.assert_close(off, before)
    assert sum(p.numel() for p in ref.parameters()) == sum(p.numel() for p in model.parameters())
