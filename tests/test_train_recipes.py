"""Named recipes: the paper recipe against eq. 4-6 written out here, resolved configurations,
typed choices, one source of defaults, and config files with nested mappings."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from diffpo_sdk.train.recipes import RECIPES  # noqa: E402
from diffpo_sdk.train.trainer import DiffPOCollator, DiffPOConfig, DiffPOTrainer, TrajectoryDataset  # noqa: E402

RECORDS = [
    {"messages": [{"role": "user", "content": "Name a colour."}], "target": "Blue is a colour.",
     "others": ["Red.", "I like trains and many other things"]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is two plus two?"}],
     "target": "Four.", "others": ["Two plus two is four, which is the answer to it."]},
    {"messages": [{"role": "user", "content": "Say hi."}], "target": "Hi there!", "others": ["hello hello hello"]},
]
N = 12


def cfg(tmp_path: Path, **kw) -> DiffPOConfig:
    return DiffPOConfig(output_dir=str(tmp_path / "out"), use_cpu=True, max_response_tokens=N, disable_tqdm=True,
                        eval_strategy="no", save_strategy="no", report_to="none", dataloader_pin_memory=False, **kw)


def eq_4_6(model, ds: TrajectoryDataset, feats: list[dict], w: float, stopgrad: bool = True) -> torch.Tensor:
    """The paper's loss, one unpadded sequence at a time with full softmaxes:
    L = E[ sum_i -log p(y^T_i | y^T_<i, x) + w * sum_i KL(p_stopgrad(. | y^T_<i, x) || p(. | y^t_<i, x)) ],
    i over the N answer positions that carry the target or its end-of-sequence token."""
    rows = []
    for f, item in zip(feats, ds.items):
        x = torch.tensor(item["prompt"])
        y_t = torch.tensor(item["target"][:N])  # target tokens and its stop, cut to N
        y_s = torch.tensor(f["student"])  # the lower-ranked answer padded/cut to N like a draft
        k = len(y_t)

        def next_token_logits(y: torch.Tensor) -> torch.Tensor:
            out = model(input_ids=torch.cat([x, y])[None]).logits[0]
            return out[len(x) - 1: len(x) - 1 + k]  # logits predicting answer positions 0..k-1

        target_logits = next_token_logits(y_t)
        ar = torch.nn.functional.cross_entropy(target_logits, y_t, reduction="sum")
        teacher = torch.log_softmax(target_logits.detach() if stopgrad else target_logits, -1)  # theta^-
        student = torch.log_softmax(next_token_logits(y_s), -1)
        kl = (teacher.exp() * (teacher - student)).sum()  # forward KL(teacher || student), summed over i
        rows.append(ar + w * kl)
    return torch.stack(rows).mean()


def test_paper_recipe_is_eq_4_6(tiny_llama_dir: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    args = cfg(tmp_path, recipe="paper")
    ds = TrajectoryDataset(RECORDS, tok, N, source=args.trajectory_source)
    feats = [ds.get(i, deterministic=True) for i in range(len(ds))]
    assert all(f["student"] != f["target"] for f in feats)
    trainer = DiffPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    trainer.state.max_steps = 10
    batch = DiffPOCollator(ds.pad)(feats)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(loss: torch.Tensor) -> list[torch.Tensor]:
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in params]

    ours = trainer.compute_loss(model, batch)
    g_ours = grads(ours)
    ref = eq_4_6(model, ds, feats, 1000.0)
    g_ref = grads(ref)
    g_through = grads(eq_4_6(model, ds, feats, 1000.0, stopgrad=False))
    assert float(ref.detach()) > 1000  # the consistency term is live, and weighed 1000x
    torch.testing.assert_close(ours.detach(), ref.detach(), rtol=1e-4, atol=1e-3)

    def rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
        diff = torch.cat([(x - y).flatten() for x, y in zip(a, b)]).norm()
        return float(diff / torch.cat([y.flatten() for y in b]).norm())

    assert rel(g_ours, g_ref) < 1e-4  # the same gradient: nothing flows through the teacher
    assert rel(g_through, g_ref) > 1e-2  # (a gradient through the teacher would be told apart)


def test_recipes_resolve(tmp_path: Path) -> None:
    paper = cfg(tmp_path, recipe="paper")
    assert (paper.trajectory_source, paper.consistency_loss, paper.consistency_normalize, paper.consistency_mask) == (
        "answers", "kl", "sum", "none")
    assert (paper.consistency_weight, paper.consistency_warmup_ratio, paper.fixed_point_weight) == (1000.0, 0.0, 0.0)
    assert paper.target_hold_weight == 0.0
    assert (paper.learning_rate, str(paper.lr_scheduler_type.value), paper.warmup_steps) == (1e-9, "cosine", 0.03)
    assert (paper.gradient_accumulation_steps, paper.num_train_epochs, paper.weight_decay) == (4, 1.0, 0.0)
    assert paper.guard is False and paper.recipe_overrides == {}

    fast = cfg(tmp_path, recipe="fast")
    assert (fast.trajectory_source, fast.consistency_loss, fast.consistency_weight) == ("frontier", "ce", 2.0)
    assert (fast.fixed_point_weight, fast.fixed_point_anchor, fast.learning_rate, fast.guard) == (5.0, "kl", 3e-5, True)

    phased = cfg(tmp_path)  # the default recipe, named
    assert phased.recipe == "sft-fast"
    assert (phased.consistency_start, phased.trajectory_source, phased.consistency_loss) == (0.6, "frontier", "ce")
    assert (phased.fixed_point_weight, phased.fixed_point_anchor, phased.guard) == (10.0, "kl", True)
    assert (phased.target_hold_weight, fast.target_hold_weight, phased.learning_rate) == (10.0, 0.0, 5e-5)
    assert (fast.consistency_start, fast.sft_max_epochs, phased.sft_max_epochs) == (0.0, 0.0, 1.0)

    sft = cfg(tmp_path, recipe="sft")
    assert (sft.consistency_weight, sft.trajectory_source, sft.fixed_point_weight) == (0.0, "answers", 0.0)

    # explicit values override the recipe's, and are recorded as such
    mine = cfg(tmp_path, recipe="paper", learning_rate=1e-6, guard=True)
    assert (mine.learning_rate, mine.guard, mine.consistency_weight) == (1e-6, True, 1000.0)
    assert mine.recipe_overrides == {"learning_rate": 1e-6, "guard": True}
    for name, values in RECIPES.items():
        resolved = cfg(tmp_path, recipe=name)
        assert all(getattr(resolved, k) == v or str(getattr(resolved, k).value) == v for k, v in values.items())


def test_choices_are_validated_once(tmp_path: Path) -> None:
    from diffpo_sdk.train.__main__ import parse_config

    with pytest.raises(ValueError, match="--guard-action 'stpo'"):
        cfg(tmp_path, guard_action="stpo")
    with pytest.raises(ValueError, match="--consistency-loss"):
        cfg(tmp_path, consistency_loss="KL")
    with pytest.raises(ValueError, match="recipe"):
        cfg(tmp_path, recipe="papper")
    for flag, bad in (("--guard-action", "stpo"), ("--trajectory-source", "answer"), ("--recipe", "Paper"),
                      ("--fixed-point-anchor", "mse"), ("--consistency-mask", "prefixes")):
        with pytest.raises(SystemExit):
            parse_config(["--data", "x.jsonl", "--output-dir", str(tmp_path), "--use-cpu", "true", flag, bad])
    ok = parse_config(["--data", "x.jsonl", "--output-dir", str(tmp_path), "--use-cpu", "true", "--guard-action", "warn"])
    assert ok.guard_action == "warn"
    bare = parse_config(["--data", "x.jsonl", "--recipe", "paper", "--guard", "--output-dir", str(tmp_path), "--use-cpu", "true"])
    assert bare.guard is True and bare.recipe_overrides.get("guard") is True
    off = parse_config(["--data", "x.jsonl", "--guard", "false", "--output-dir", str(tmp_path), "--use-cpu", "true"])
    assert off.guard is False


def test_loss_defaults_are_the_config_defaults(tiny_llama_dir: str, tmp_path: Path) -> None:
    """diffpo_loss called bare computes what the trainer's default configuration computes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from diffpo_sdk.train.loss import diffpo_loss
    from diffpo_sdk.train.trainer import loss_kwargs

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ds = TrajectoryDataset(RECORDS, tok, N, source="answers")
    batch = DiffPOCollator(ds.pad)([ds.get(i, deterministic=True) for i in range(len(ds))])
    kw = loss_kwargs(cfg(tmp_path))
    with torch.no_grad():
        bare = diffpo_loss(model, batch, 2.0)
        configured = diffpo_loss(model, batch, 2.0, **kw)
        other = diffpo_loss(model, batch, 2.0, **{**kw, "kind": "kl" if kw["kind"] == "ce" else "ce"})
    torch.testing.assert_close(bare.loss, configured.loss)
    assert not torch.allclose(bare.loss, other.loss)  # the comparison can tell options apart


def test_config_file_keeps_nested_mappings(tmp_path: Path) -> None:
    import yaml

    from diffpo_sdk.train.__main__ import parse_config

    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump({"data": "x.jsonl", "use_cpu": True, "recipe": "paper", "guard-action": "warn",
                                    "fsdp_config": {"min_num_params": 1000, "xla": False},
                                    "lr_scheduler_kwargs": {"num_cycles": 0.5}}))
    c = parse_config(["--config", str(path), "--output-dir", str(tmp_path), "--learning-rate", "2e-9"])
    assert c.fsdp_config["min_num_params"] == 1000 and c.fsdp_config["xla"] is False
    assert c.lr_scheduler_kwargs == {"num_cycles": 0.5}
    assert (c.recipe, c.guard_action, c.learning_rate, c.consistency_weight) == ("paper", "warn", 2e-9, 1000.0)
    path.write_text(yaml.safe_dump({"data": "x.jsonl", "guard_actoin": "warn"}))
    with pytest.raises(SystemExit, match="guard_actoin"):
        parse_config(["--config", str(path), "--output-dir", str(tmp_path)])


def test_heldout_measures_are_per_token_under_every_recipe(tiny_llama_dir: str, tmp_path: Path) -> None:
    """The paper recipe trains on N-position sums; its held-out L_AR must still be the per-token
    figure every table reports, so recipes compare."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from diffpo_sdk.train.evaluate import heldout_losses
    from diffpo_sdk.train.trainer import loss_kwargs

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ds = TrajectoryDataset(RECORDS, tok, N, source="answers")
    collate = DiffPOCollator(ds.pad)
    paper = heldout_losses(model, ds, collate, **loss_kwargs(cfg(tmp_path, recipe="paper")))
    sft = heldout_losses(model, ds, collate, **loss_kwargs(cfg(tmp_path, recipe="sft")))
    assert paper["ar_loss"] == pytest.approx(sft["ar_loss"], rel=1e-5)
    assert paper["ar_loss"] < 3 * torch.log(torch.tensor(float(len(tok)))).item()  # a per-token cross-entropy


def test_typed_choices_are_the_validated_ones() -> None:
    """The Literal types argparse shows in --help list exactly the choices DiffPOConfig checks."""
    import typing

    from diffpo_sdk.train.recipes import CHOICES

    hints = typing.get_type_hints(DiffPOConfig)

    def literal(tp: typing.Any) -> tuple:
        if typing.get_origin(tp) is typing.Literal:
            return typing.get_args(tp)
        return next(typing.get_args(a) for a in typing.get_args(tp) if typing.get_origin(a) is typing.Literal)

    for option, allowed in CHOICES.items():
        assert set(literal(hints[option])) == set(allowed), option
    assert set(literal(hints["recipe"])) == set(RECIPES)


def test_target_branches_loss_written_out(tiny_llama_dir: str, tmp_path: Path) -> None:
    """The ``branches`` recipe's source, against its definition written out here one branch at a
    time: L_AR on the target y^(T) + w * mean over branches (d, w_d) of the cross-entropy of
    p(. | x, y^T_<d, w_d) toward the greedy token of the stop-gradient p(. | x, y^T_<=d), where
    w_d is a lower-ranked answer's token at position d (and differs from y^T_d)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    args = cfg(tmp_path, recipe="branches")
    assert (args.trajectory_source, args.consistency_loss, args.fixed_point_weight) == ("target-branches", "ce", 0.0)
    ds = TrajectoryDataset(RECORDS, tok, N, source=args.trajectory_source)
    feats = [ds.get(i, deterministic=True) for i in range(len(ds))]
    trainer = DiffPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    trainer.state.max_steps = 10
    batch = DiffPOCollator(ds.pad)(feats)
    assert "target_ids" not in batch  # L_AR reads the packed forward's clean path
    model.eval()

    ar_terms, con_terms = [], []
    for f, item in zip(feats, ds.items):
        x, y = item["prompt"], item["target"][:N]
        others = [ds.padded(o) for o in item["others"]]
        assert f["branches"], "every record has a lower-ranked answer that differs somewhere"
        for d, ws in f["branches"]:
            assert ws[0] != y[d] and any(o[d] == ws[0] for o in others) and d + 1 < len(y)
        clean = model(input_ids=torch.tensor([x + y])).logits[0, len(x) - 1:len(x) - 1 + len(y)]
        ar_terms.append(torch.nn.functional.cross_entropy(clean, torch.tensor(y), reduction="none"))
        for d, ws in f["branches"]:
            student = model(input_ids=torch.tensor([x + y[:d] + ws[:1]])).logits[0, -1]
            teacher = int(clean[d + 1].argmax())
            con_terms.append(torch.nn.functional.cross_entropy(student[None], torch.tensor([teacher])))
    expected = torch.cat(ar_terms).mean() + args.consistency_weight * torch.stack(con_terms).mean()
    with torch.no_grad():
        ours = trainer.compute_loss(model, batch)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
