"""``DiffPOConfig`` + ``DiffPOTrainer``: a transformers ``Trainer`` that only changes the loss.

Built like a trl trainer so gradient accumulation, mixed precision, checkpoints and resume,
logging and multi-GPU (accelerate / torchrun with DDP, FSDP or DeepSpeed) come from the
stack unchanged.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments, get_scheduler
from transformers.trainer_utils import IntervalStrategy

from ..engine import templating
from .evaluate import as_saved, greedy_repetition, heldout_losses, long_repetition, refine_metrics, repetition_rate
from .loss import answer_mask, diffpo_loss, frontier_rows, pad_answer
from .recipes import CHOICES, DEFAULT_RECIPE, check_choice, recipe_values
from .reference import as_model, frozen_copy, prepare_reference, reference_model
from .states import EpochOrder, model_fingerprint

log = logging.getLogger(__name__)


def _recipe_help(text: str) -> dict[str, str]:
    return {"help": f"{text} (default: from --recipe)"}


@dataclass
class DiffPOConfig(TrainingArguments):
    """Every ``TrainingArguments`` flag, plus the DiffPO ones below (dash or underscore spellings).

    Options marked "default: from --recipe" are filled from the named recipe
    (:mod:`~diffpo_sdk.train.recipes`) unless given; every string-valued choice is checked
    here, once, before ``TrainingArguments`` sees the values.
    """

    recipe: Literal["paper", "fast", "sft-fast", "branches", "sft"] = field(default=DEFAULT_RECIPE, metadata={"help": (
        "named option set: paper (eq. 4-6 with the paper's settings) | fast (frontier branches, CE, KL hold: "
        "speed, not the paper) | sft-fast (sft, then fast held on the SFT'd model) | branches (one-token branches "
        "off the preferred target) | sft (the w = 0 control); explicit flags override it")})
    model: str = field(default="smollm2-135m-instruct", metadata={"help": "refiner to start from: hub id, folder, .gguf or smollm2-135m-instruct"})
    data: str | None = field(default=None, metadata={"help": "trajectories JSONL from `diffpo data build`"})
    eval_data: str | None = field(default=None, metadata={"help": "held-out trajectories; default: a split of --data by prompt"})
    transfer_eval_data: str | None = field(default=None, metadata={"help": "trajectories from a source the run never trains on (e.g. `diffpo data build --from-pairs` of HH-RLHF): the final table adds passes/token on their drafts (the first --max-eval-prompts)"})
    eval_fraction: float = field(default=0.1, metadata={"help": "share of prompts held out when --eval-data is not given"})
    max_train_prompts: int | None = field(default=None, metadata={"help": "use only the first N training prompts"})
    max_eval_prompts: int = field(default=16, metadata={"help": "cap on held-out prompts: every evaluation and both columns of the final table refine them (set 32 or more for figures you report)"})
    max_response_tokens: int = field(default=256, metadata={"help": "N: answers are cut or padded to N tokens like engine drafts (the paper: 256)"})
    max_prompt_tokens: int = field(default=512, metadata={"help": "prompts longer than this keep their last tokens"})
    consistency_weight: float | None = field(default=None, metadata=_recipe_help("w in L = L_AR + w * L_Con (0 = SFT-only control)"))
    consistency_warmup_ratio: float | None = field(default=None, metadata=_recipe_help("w ramps linearly from 0 over this share of the steps"))
    consistency_start: float | None = field(default=None, metadata=_recipe_help("share of the steps trained on L_AR alone before the consistency phase; when it starts, the model as it is then becomes the hold's reference, the frontier states' builder and the guards' baseline (evaluations before it are skipped)"))
    sft_max_epochs: float | None = field(default=None, metadata=_recipe_help("the SFT phase ends after this many epochs of the training data if --consistency-start's share of the steps is more (0: no cap): a second epoch of SFT overfits a small dataset"))
    consistency_mask: Literal["none", "prefix", "argmax"] | None = field(default=None, metadata=_recipe_help("which positions L_Con counts"))
    consistency_normalize: Literal["token", "sum"] | None = field(default=None, metadata=_recipe_help("sum (paper: L_AR and L_Con each summed over the N positions) | token (each a mean over its counted positions)"))
    consistency_loss: Literal["kl", "ce"] | None = field(default=None, metadata=_recipe_help("kl (paper: forward KL from the stop-gradient teacher) | ce (cross-entropy toward the teacher's greedy token)"))
    frontier_branches: int | None = field(default=None, metadata={"help": "frontier source: branch tokens per row (default N)"})
    frontier_depth: int = field(default=1, metadata={"help": "frontier source: wrong guesses per branch (1: the token right after a miss)"})
    fixed_point_weight: float | None = field(default=None, metadata=_recipe_help("frontier source: weight of the hold on the refiner's own greedy answer y* (see --fixed-point-anchor)"))
    target_hold_weight: float | None = field(default=None, metadata=_recipe_help("weight of a KL hold on the preferred target's path toward the model as training (or its consistency phase) started: keeps the branches' lesson off text that legitimately departs from y*, where L_AR is measured; costs one no-grad forward"))
    fixed_point_anchor: Literal["ce", "kl"] | None = field(default=None, metadata=_recipe_help("ce (L_AR on y*) | kl (KL from the model before training on y*'s path: holds the whole distribution; costs one no-grad forward and, without LoRA, a frozen copy of the model)"))
    kl_chunk: int = field(default=16, metadata={"help": "positions per vocabulary-sized softmax chunk (memory bound)"})
    trajectory_source: Literal["answers", "jacobi", "mix", "frontier", "target-branches"] | None = field(default=None, metadata=_recipe_help("answers (paper: other models' answers) | jacobi (own Jacobi states) | mix | frontier (one-token branches off the fixed point, from the Jacobi states) | target-branches (one-token branches off the preferred target, the wrong tokens from lower-ranked answers)"))
    jacobi_states_per_prompt: int = field(default=2, metadata={"help": "partial Jacobi states generated per training prompt"})
    jacobi_states_dir: str | None = field(default=None, metadata={"help": "where generated states are cached (default: output_dir); share it between runs"})
    jacobi_states_chunk: int = field(default=8, metadata={"help": "prompts whose fixed points and states are computed together when a batch first needs them: that prompt and the next ones of the training order (0: all before training)"})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank; 0 = full fine-tune"})
    lora_alpha: int | None = field(default=None, metadata={"help": "LoRA alpha (default 2 x r)"})
    lora_dropout: float = field(default=0.05)
    lora_target_modules: str = field(default="all-linear")
    merge_lora: bool = field(default=False, metadata={"help": "save a merged model instead of the adapter"})
    model_dtype: str = field(default="float32", metadata={"help": "dtype of the loaded weights (mixed precision: --bf16)"})
    guard: bool | None = field(default=None, metadata=_recipe_help("watch held-out L_AR and repetition at each evaluation (true/false)"))
    guard_ar_tolerance: float = field(default=0.1, metadata={"help": "max rise of held-out L_AR over the untrained model (nats)"})
    guard_repetition_tolerance: float = field(default=0.1, metadata={"help": "max rise of the repeated 3-gram share"})
    guard_long_repetition_tolerance: float | None = field(default=None, metadata={"help": "max rise of repeated 3-grams in the guard prompts' --eval-long-tokens greedy answers, where a refiner trained on N-token answers loops (use --guard-prompts 32: 8 missed the loops); off by default: every consistency stage measured trips it"})
    guard_action: Literal["stop", "warn"] = field(default="stop", metadata={"help": "stop (restore the last healthy weights) | warn"})
    guard_prompts: int = field(default=8, metadata={"help": "held-out prompts greedily refined for the repetition guard"})
    eval_block_size: str = field(default="full", metadata={"help": "block size for passes/token in the final table: full (=N), auto or an int"})
    eval_long_tokens: int = field(default=96, metadata={"help": "the final table's repeated 3-grams in greedy answers this long (past N: a refiner trained on N-token answers can loop after them); 0 or at most N: off"})
    final_eval: bool = field(default=True, metadata={"help": "print and write the before/after evaluation table"})
    eval_base_model: str | None = field(default=None, metadata={"help": "also measure this model (same tokenizer) in the final table, as its first column `base`: the base under a --model refiner trained further, so a stacked refiner is compared with its base at this run's N"})
    # TrainingArguments options a recipe sets (None here = take the recipe's value)
    learning_rate: float | None = field(default=None, metadata=_recipe_help("peak learning rate"))
    lr_scheduler_type: str | None = field(default=None, metadata=_recipe_help("learning-rate schedule (linear, cosine, ...)"))
    warmup_steps: float | None = field(default=None, metadata=_recipe_help("warm-up steps, or a share of the steps below 1"))
    gradient_accumulation_steps: int | None = field(default=None, metadata=_recipe_help("batches per optimizer step"))
    num_train_epochs: float | None = field(default=None, metadata=_recipe_help("epochs (max_steps wins when set)"))
    weight_decay: float | None = field(default=None, metadata=_recipe_help("AdamW weight decay"))
    # Defaults that differ from TrainingArguments:
    eval_strategy: IntervalStrategy | str = field(default="steps")
    eval_steps: float | None = field(default=50)
    logging_steps: float = field(default=10)
    save_steps: float = field(default=200)
    save_total_limit: int | None = field(default=2)
    per_device_train_batch_size: int = field(default=1)
    remove_unused_columns: bool = field(default=False)

    def __post_init__(self) -> None:
        values = recipe_values(self.recipe)
        #: options given explicitly that differ from the recipe's value (for the model card)
        self.recipe_overrides = {}
        for key, value in values.items():
            mine = getattr(self, key)
            if mine is None:
                setattr(self, key, value)
            elif mine != value:
                self.recipe_overrides[key] = mine
        for option in CHOICES:
            check_choice(option, getattr(self, option))
        if not 0.0 <= self.consistency_start < 1.0:
            raise ValueError(f"--consistency-start {self.consistency_start}: use a share of the steps in [0, 1)")
        if self.sft_max_epochs < 0:
            raise ValueError(f"--sft-max-epochs {self.sft_max_epochs}: use a number of epochs, or 0 for no cap")
        super().__post_init__()


def draft_of(record: dict) -> str:
    """The draft a trajectory stands for: its lowest-ranked other answer (the target if none)."""
    return (record.get("others") or [record["target"]])[0]


def draft_items(records: list[dict]) -> list[dict[str, Any]]:
    """Engine items ``{messages, draft}`` of trajectories (see :func:`draft_of`)."""
    return [{"messages": r["messages"], "draft": draft_of(r)} for r in records]


class TrajectoryDataset(Dataset):
    """Tokenized trajectories. Each access draws a student sequence y^(t) at random:

    - source ``answers`` (paper): a lower-ranked answer, teacher = the target y^(T);
    - source ``jacobi``: a partial Jacobi state of the refiner, teacher = its fixed point y*;
    - ``mix``: either, with equal odds;
    - ``frontier``: the fixed point y* plus branches (position d, wrong guesses) taken from
      the Jacobi states wherever a state's token differs from y*, at most ``branches``
      tokens, runs of ``depth``; the collator packs them into one forward
      (:func:`~diffpo_sdk.train.loss.frontier_rows`).
    - ``target-branches``: the same packing on the preferred target y^(T) instead of y*, the
      wrong guesses taken from the lower-ranked answers at the same positions (where a draft
      puts them). L_AR reads the target's logits off that one forward; no Jacobi states.
    """

    def __init__(self, records: list[dict], tokenizer: Any, n: int, max_prompt_tokens: int = 512,
                 source: str = "answers", states: Any = None, seed: int = 0,
                 stop_ids: set[int] | None = None, branches: int | None = None, depth: int = 1):
        check_choice("trajectory_source", source)
        if source not in ("answers", "target-branches") and states is None:
            raise ValueError(f"trajectory source {source!r} needs Jacobi states (see diffpo_sdk.train.states)")
        self.n, self.source, self.seed = n, source, seed
        #: draws so far per prompt: the k-th draw of prompt i depends only on (seed, i, k), so
        #: a prompt gets the same y^(t) whichever process or batch it lands in
        self.draws = [0] * len(records)
        self.branches, self.depth = branches or n, max(1, depth)
        self.pad = templating.ensure_pad_token(tokenizer)
        self.stop_ids = stop_ids or templating.stop_token_ids(tokenizer)
        # the engine's filler: the pad token when it is a stop token, else the smallest stop id
        self.eot = self.pad if self.pad in self.stop_ids else min(self.stop_ids)
        self.records = records
        self.items = []
        for k, rec in enumerate(records):
            prompt = templating.prompt_ids(tokenizer, rec["messages"])[-max_prompt_tokens:]
            item = {"prompt": prompt, "target": self._answer(tokenizer, rec["target"]),
                    "others": [self._answer(tokenizer, o) for o in rec.get("others", []) if o.strip()]}
            self.items.append(item)
        #: per prompt ``{"fixed_point", "states"}``: a list, or a ``LazyStates`` that builds them on first use
        self.states = states

    def _answer(self, tokenizer: Any, text: str) -> list[int]:
        """Answer tokens + the stop token; ``padded`` then cuts/pads to N like an engine draft."""
        return templating.draft_ids(tokenizer, text) + [self.eot]

    def draft_items(self, k: int | None = None) -> list[dict[str, Any]]:
        """Engine items for the first ``k`` prompts: the lowest-ranked other answer as the draft."""
        return draft_items(self.records[:k] if k is not None else self.records)

    def padded(self, ids: list[int]) -> list[int]:
        return pad_answer(ids, self.n, self.eot)

    def answer_mask(self, ids: list[int]) -> list[int]:
        return answer_mask(min(len(ids) - 1, self.n), self.n)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.get(i)

    def get(self, i: int, deterministic: bool = False) -> dict[str, Any]:
        item = self.items[i]
        if self.states is not None and self.source not in ("answers", "target-branches"):
            st = self.states[i]
            item = {**item, "fixed_point": st["fixed_point"], "states": st["states"]}
        if deterministic:
            rng = random.Random(i)
        else:
            rng = random.Random(f"{self.seed}:{i}:{self.draws[i]}")
            self.draws[i] += 1
        if self.source == "frontier":
            return {"prompt": item["prompt"], "target": self.padded(item["target"]),
                    "target_mask": self.answer_mask(item["target"]), **self.frontier(item, rng)}
        if self.source == "target-branches":
            on_target = {"fixed_point": None, "states": [self.padded(o) for o in item["others"]]}
            return {"prompt": item["prompt"], "target": self.padded(item["target"]),
                    "target_mask": self.answer_mask(item["target"]), "on_target": True,
                    **self.frontier({**item, **on_target}, rng)}
        use_states = self.source == "jacobi" or (self.source == "mix" and rng.random() < 0.5)
        if (use_states and item.get("states")) or not item["others"]:
            fixed = item.get("fixed_point") or item["target"]
            student = rng.choice(item["states"]) if item.get("states") else self.padded(item["target"])
            teacher, is_target = fixed, False
        else:
            student = self.padded(rng.choice(item["others"]))
            teacher, is_target = item["target"], True
        return {"prompt": item["prompt"], "target": self.padded(item["target"]),
                "target_mask": self.answer_mask(item["target"]), "student": self.padded(student)[: self.n],
                "teacher": self.padded(teacher), "teacher_mask": self.answer_mask(teacher),
                "teacher_is_target": is_target}

    def frontier(self, item: dict[str, Any], rng: random.Random) -> dict[str, Any]:
        """y* cut/padded to N and the branches: at every position d where a Jacobi state's
        token differs from y*_d (and d + 1 is still an answer position), the state's next
        ``depth`` tokens as a run; a random subset of at most ``branches`` tokens in all."""
        y = item.get("fixed_point") or item["target"]
        fixed = self.padded(y)
        last = min(len(y) - 2, self.n - 2)  # d + 1 must be an answer position (its stop included)
        runs = sorted({(d, tuple(int(t) for t in s[d:min(d + self.depth, last + 1)]))
                       for s in item.get("states", []) for d in range(min(last + 1, len(s))) if s[d] != fixed[d]})
        rng.shuffle(runs)
        chosen, used = [], 0
        for d, ws in runs:
            if used + len(ws) <= self.branches:
                chosen.append((d, list(ws)))
                used += len(ws)
        return {"fixed": fixed, "fixed_mask": self.answer_mask(y), "branches": sorted(chosen)}


class DiffPOCollator:
    """Left-pads ``[prompt, answer]`` rows so the N answer positions line up at the end."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def _rows(self, prompts: list[list[int]], answers: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        seqs = [p + a for p, a in zip(prompts, answers)]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[r, width - len(s):] = 1
        return ids, mask

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        prompts = [f["prompt"] for f in features]
        out: dict[str, torch.Tensor] = {}
        if "branches" in features[0]:  # the frontier sources: one packed forward for everything
            targets = [f["target"] for f in features]
            out["target_answer"] = torch.tensor(targets, dtype=torch.long)
            out["target_mask"] = torch.tensor([f["target_mask"] for f in features], dtype=torch.long)
            # on the target (``target-branches``) the clean path is the target: no target slots
            out.update(frontier_rows(prompts, [f["fixed"] for f in features], [f["branches"] for f in features],
                                     self.pad_id, None if features[0].get("on_target") else targets))
            out["frontier_fixed_mask"] = torch.tensor([f["fixed_mask"] for f in features], dtype=torch.long)
            return out
        for name in ("target", "student", "teacher"):
            answers = [f[name] for f in features]
            out[f"{name}_ids"], out[f"{name}_attention_mask"] = self._rows(prompts, answers)
            out[f"{name}_answer"] = torch.tensor(answers, dtype=torch.long)
        out["target_mask"] = torch.tensor([f["target_mask"] for f in features], dtype=torch.long)
        out["teacher_mask"] = torch.tensor([f["teacher_mask"] for f in features], dtype=torch.long)
        out["teacher_is_target"] = torch.tensor([f["teacher_is_target"] for f in features], dtype=torch.bool)
        return out


def loss_kwargs(cfg: DiffPOConfig) -> dict[str, Any]:
    """The :func:`~diffpo_sdk.train.loss.diffpo_loss` options a configuration sets."""
    return {"mask": cfg.consistency_mask, "normalize": cfg.consistency_normalize, "chunk": cfg.kl_chunk,
            "kind": cfg.consistency_loss, "fixed_point_weight": cfg.fixed_point_weight,
            "target_hold_weight": cfg.target_hold_weight}


class ConsistencyPhase(TrainerCallback):
    """Ends the SFT phase at :meth:`DiffPOTrainer.consistency_start_step` (see
    :meth:`DiffPOTrainer.start_consistency_phase`); a run resumed past it switches after its first step."""

    def __init__(self, trainer: DiffPOTrainer):
        self.trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        log.info("SFT phase: the first %d of %d steps (one epoch: %d steps)", self.trainer.consistency_start_step(),
                 state.max_steps, self.trainer.steps_per_epoch())

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        t = self.trainer
        if t.sft_phase and state.global_step >= t.consistency_start_step():
            t.start_consistency_phase()


class DiffPOTrainer(Trainer):
    """``Trainer`` with the DiffPO loss, per-loss logging and the collapse guards."""

    def __init__(self, model: Any = None, args: DiffPOConfig | None = None, train_dataset: Any = None,
                 eval_dataset: Any = None, processing_class: Any = None, data_collator: Any = None,
                 ref_model: Any = None, **kw: Any):
        """``ref_model``: the model as training starts, frozen (a copy, or with LoRA the same
        model with its adapter off). The KL hold compares against it (default: such a copy made
        here), and when given, the guards' baseline is measured on it at the first evaluation
        instead of before the first step."""
        args = args or DiffPOConfig(output_dir="diffpo-out")
        pad = templating.ensure_pad_token(processing_class) if processing_class is not None else 0
        super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, data_collator=data_collator or DiffPOCollator(pad), **kw)
        # The loss is normalised here, not by the model: let Trainer scale for gradient accumulation.
        self.model_accepts_loss_kwargs = False
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self.guard_baseline: dict[str, float] | None = None
        self.guard_tripped: str | None = None
        self._healthy: dict[str, torch.Tensor] | None = None
        #: an SFT phase first (``--consistency-start``): L_AR alone on the targets, no evaluations
        self.sft_phase = args.consistency_start > 0
        #: held-out metrics already measured on ``eval_dataset``, so the final table does not
        #: compute them again: the untrained model's (the guard's baseline), and the trained
        #: model's at the last evaluation (step, metrics), dropped when the guard restores older weights
        self.untrained_metrics: dict[str, float] | None = None
        self.last_eval: tuple[int, dict[str, float]] | None = None
        anchored = (args.fixed_point_anchor == "kl" and args.fixed_point_weight > 0
                    and args.trajectory_source == "frontier") or args.target_hold_weight > 0
        #: the project's model card (set by ``python -m diffpo_sdk.train``); pushed instead of Trainer's
        self.model_card: str | None = None
        self.untrained = ref_model
        #: what the guards measure their baseline on: the model as training (or its consistency phase) started
        self.guard_reference = ref_model
        self.anchored = anchored
        self.ref_model = None
        if anchored and not self.sft_phase:
            ref = ref_model if ref_model is not None else reference_model(self.model)
            self.ref_model = prepare_reference(ref, self.accelerator)
        elif isinstance(ref_model, torch.nn.Module):  # a frozen copy kept to measure: where the model trains
            ref_model.to(next(self.model.parameters()).device)
        if self.sft_phase:  # the SFT phase trains on the targets alone: no branches, no states yet
            for ds in (self.train_dataset, self.eval_dataset):
                if ds is not None:
                    ds.source = "answers"
            self.add_callback(ConsistencyPhase(self))

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """Write the project's model card (recipe, differences from the paper, evaluation) where
        ``push_to_hub`` looks for one; Trainer's generic card only when there is none."""
        if self.model_card is None:
            return super().create_model_card(*args, **kwargs)
        if self.is_world_process_zero():
            from pathlib import Path

            Path(self.args.output_dir).mkdir(parents=True, exist_ok=True)
            (Path(self.args.output_dir) / "README.md").write_text(self.model_card)
        return None

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        """A random order per epoch known before the epoch runs: lazily built states follow it,
        so they are built for the prompts the run consumes next, in batches (``EpochOrder``).
        Every process draws the same order, and accelerate shards its batches as it would Trainer's."""
        ds = self.train_dataset if train_dataset is None else train_dataset
        if ds is None or self.args.train_sampling_strategy != "random":
            return super()._get_train_sampler(train_dataset)
        args = self.args
        seed = args.data_seed if args.data_seed is not None else args.seed
        return EpochOrder(len(ds), seed, getattr(getattr(ds, "states", None), "follow", None),
                          batch_size=args.per_device_train_batch_size, rank=args.process_index, world=args.world_size)

    # -- loss ------------------------------------------------------------------------------

    def consistency_start_step(self, num_training_steps: int | None = None) -> int:
        """The step at which the consistency phase starts (of ``num_training_steps``, default the
        run's): ``--consistency-start`` of the steps, or ``--sft-max-epochs`` epochs if fewer."""
        steps = self.state.max_steps if num_training_steps is None else num_training_steps
        start = int(self.args.consistency_start * steps)
        cap = self.args.sft_max_epochs
        if start > 0 and cap > 0 and self.train_dataset is not None:
            start = min(start, max(1, math.ceil(cap * self.steps_per_epoch())))
        return start

    def steps_per_epoch(self) -> int:
        """Optimizer steps in one epoch of the training data, counted as ``Trainer`` counts them."""
        args = self.args
        batch = args.per_device_train_batch_size * args.world_size
        batches = len(self.train_dataset) // batch if args.dataloader_drop_last else \
            math.ceil(len(self.train_dataset) / batch)
        return max(1, math.ceil(batches / args.gradient_accumulation_steps))

    def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
        """With an SFT phase, each phase runs the whole schedule (warm-up, then decay) over its
        own steps, as two runs would: the consistency phase starts at the peak learning rate,
        not where the SFT phase's decay left it."""
        fresh = self.lr_scheduler is None
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        start = self.consistency_start_step(num_training_steps)
        if not fresh or not 0 < start < num_training_steps or \
                not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):  # e.g. reduce_lr_on_plateau
            return scheduler
        scratch = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)  # the real optimizer stays as it is
        sft, consistency = (get_scheduler(self.args.lr_scheduler_type, optimizer=scratch,
                                          num_warmup_steps=self.args.get_warmup_steps(steps), num_training_steps=steps,
                                          scheduler_specific_kwargs=self.args.lr_scheduler_kwargs).lr_lambdas[0]
                            for steps in (start, num_training_steps - start))

        def phased(step: int) -> float:
            return sft(step) if step < start else consistency(step - start)

        scheduler.lr_lambdas = [phased] * len(scheduler.lr_lambdas)
        for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base * phased(scheduler.last_epoch)
        return scheduler

    def consistency_weight_at(self, step: int) -> float:
        """w: 0 during an SFT phase, then ramped linearly from 0 over the first
        ``consistency_warmup_ratio`` of the consistency phase's steps."""
        w, start = self.args.consistency_weight, self.consistency_start_step()
        if step < start:
            return 0.0
        ramp = self.args.consistency_warmup_ratio * max(self.state.max_steps - start, 1)
        return w if ramp <= 0 else w * min(1.0, (step - start) / ramp)

    def start_consistency_phase(self) -> None:
        """The SFT phase is over. The model as it is now, frozen (a real copy, LoRA included: the
        adapter is what moved), becomes the KL hold's reference, the builder of the frontier
        states (built lazily from here on) and the guards' baseline: the speed is then bought
        around the SFT'd policy, as DPO's reference is the SFT'd policy, not the untrained one."""
        self.sft_phase = False
        frozen = frozen_copy(self.model)
        if self.anchored:
            self.ref_model = prepare_reference(frozen, self.accelerator)
        for ds in (self.train_dataset, self.eval_dataset):
            if ds is None:
                continue
            ds.source = self.args.trajectory_source
            if hasattr(ds.states, "rebase"):
                ds.states.rebase(frozen, f"{self.args.model}|sft step {self.state.global_step}|"
                                         f"{model_fingerprint(frozen)}")
        self.guard_reference, self.guard_baseline = frozen, None
        self._healthy = self._snapshot()
        log.info("step %d: the SFT phase is over; consistency phase from the model as it is now",
                 self.state.global_step)

    def loss_kwargs(self) -> dict[str, Any]:
        return loss_kwargs(self.args)

    def compute_loss(self, model: Any, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        weight = self.consistency_weight_at(self.state.global_step) if model.training else self.args.consistency_weight
        if self.args.consistency_start > 0 and "frontier_ids" not in inputs and \
                self.args.trajectory_source in ("frontier", "target-branches"):
            weight = 0.0  # a batch the data loader fetched before the SFT phase ended
        out = diffpo_loss(model, inputs, weight, reference=self.ref_model, count_guesses=not model.training,
                          **self.loss_kwargs())
        if model.training:
            self._metrics["ar_loss"].append(float(out.ar_loss))
            self._metrics["con_loss"].append(float(out.con_loss))
            self._metrics["consistency_weight"].append(weight)
            if out.fixed_loss is not None:
                self._metrics["fixed_point_loss"].append(float(out.fixed_loss))
            if out.target_hold_loss is not None:
                self._metrics["target_hold_loss"].append(float(out.target_hold_loss))
        return (out.loss, {"ar_loss": out.ar_loss, "con_loss": out.con_loss}) if return_outputs else out.loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._metrics:
            logs.update({k: sum(v) / len(v) for k, v in self._metrics.items() if v})
            self._metrics.clear()
        super().log(logs, start_time)

    # -- evaluation and guards -------------------------------------------------------------

    def heldout_metrics(self, dataset: Any = None, model: Any = None) -> dict[str, float]:
        """Held-out L_AR / L_Con, and repetition of greedy (= fully refined) outputs, of
        ``model`` (default: the trained one) on ``dataset`` (default: ``eval_dataset``)."""
        ds = self.eval_dataset if dataset is None else dataset
        model = self.model if model is None else model
        with as_saved(model):  # measured as saved, not under --bf16's autocast
            # weight 1: L_Con and the guesses are measured even for the w = 0 control (the weight
            # scales only the training loss, which is not reported here)
            metrics = heldout_losses(model, ds, self.data_collator, self.args.per_device_eval_batch_size,
                                     **self.loss_kwargs())
            k = min(self.args.guard_prompts, len(ds))
            items = ds.draft_items(k) if self.processing_class is not None else []
            if items:
                # the engine refining held-out drafts at full Jacobi: its output is the greedy answer
                # (repetition), and the passes it takes are the speed we train for
                refined = refine_metrics(model, self.processing_class, items, ds.n, ds.n)
                metrics["repetition"] = refined["repetition"]
                metrics["passes_per_token_drafts"] = refined["passes_per_token"]
            elif k:  # no tokenizer for the engine: the greedy answers themselves
                metrics["repetition"] = greedy_repetition(model, ds, ds.n, self.args.per_device_eval_batch_size,
                                                          limit=k)
            if k and self.args.guard_long_repetition_tolerance is not None:
                long = long_repetition(model, ds, self.args.eval_long_tokens, self.args.per_device_eval_batch_size,
                                       limit=k)
                if long is not None:
                    metrics["repetition_long"] = long
            return metrics

    def evaluate(self, eval_dataset: Any = None, ignore_keys: Any = None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """The held-out measures on ``eval_dataset`` (default: the trainer's); the collapse guard
        judges only the trainer's own held-out set, against which its baseline was taken."""
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        if dataset is None or (self.sft_phase and eval_dataset is None):
            return {}
        raw = self.heldout_metrics(dataset)
        if eval_dataset is None:
            self.last_eval = (self.state.global_step, raw)
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in raw.items()}
        self.log(metrics)
        if self.args.guard and eval_dataset is None:
            self._check_guard(raw)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().to("cpu", copy=True) for n, p in self.model.named_parameters() if p.requires_grad}

    def _restore(self, snap: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                if n in snap:
                    p.copy_(snap[n].to(p.device))

    def _guard_hint(self) -> str:
        args = self.args
        if args.consistency_weight == 0:
            return ("The consistency term is off, so the targets themselves moved the model this far: lower "
                    "--learning-rate, or raise the guard's tolerance if that drift is wanted.")
        if args.trajectory_source == "frontier":
            return ("The branches are probably teaching the model to ignore its last token: raise "
                    "--fixed-point-weight, or lower --consistency-weight or --learning-rate.")
        return ("The consistency loss is probably teaching the model to ignore its prefix: lower "
                "--consistency-weight or --learning-rate, or use --trajectory-source jacobi.")

    def target_repetition(self) -> float:
        """Repeated 3-grams in the guard prompts' target answers (cut to N): the rate the data asks for."""
        ds = self.eval_dataset
        k = min(self.args.guard_prompts, len(ds))
        return repetition_rate([ds.items[i]["target"][:ds.n] for i in range(k)])

    def _check_guard(self, m: dict[str, float]) -> None:
        if self.guard_baseline is None and self.guard_reference is not None:
            with as_model(self.guard_reference) as reference:
                self.guard_baseline = self.heldout_metrics(model=reference)
            log.info("guard baseline (the model as training, or its consistency phase, started): %s",
                     self.guard_baseline)
            if self.guard_reference is self.untrained:
                self.untrained_metrics = self.guard_baseline
        base = self.guard_baseline
        if base is None:
            return
        problems = []
        if m["ar_loss"] > base["ar_loss"] + self.args.guard_ar_tolerance:
            problems.append(f"held-out L_AR {m['ar_loss']:.3f} > {base['ar_loss']:.3f} + {self.args.guard_ar_tolerance}")
        # a list-formatted target repeats its own 3-grams: the guard allows the targets' own rate
        allowed = max(base.get("repetition", 0), self.target_repetition())
        if "repetition" in m and m["repetition"] > allowed + self.args.guard_repetition_tolerance:
            problems.append(f"repetition {m['repetition']:.3f} > {allowed:.3f} + "
                            f"{self.args.guard_repetition_tolerance} (the larger of the untrained model's "
                            "and the target answers' own rate)")
        # measured only when its tolerance is set (heldout_metrics), so its presence is the switch
        long_now, long_base = m.get("repetition_long"), base.get("repetition_long")
        if None not in (long_now, long_base) and long_now > long_base + self.args.guard_long_repetition_tolerance:
            problems.append(f"repetition in {self.args.eval_long_tokens}-token answers {long_now:.3f} > "
                            f"{long_base:.3f} + {self.args.guard_long_repetition_tolerance}")
        if not problems:
            self._healthy = self._snapshot()
            return
        msg = f"COLLAPSE GUARD at step {self.state.global_step}: " + "; ".join(problems) + ". " + self._guard_hint()
        self.guard_tripped = msg
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        log.warning(msg)
        if self.args.guard_action == "stop":
            self.control.should_training_stop = True
            if self._healthy is not None:
                self._restore(self._healthy)
                self.last_eval = None
                log.warning("restored the weights of the last evaluation that passed the guards")

    def train(self, *args: Any, **kwargs: Any) -> Any:
        if self.args.guard and self.eval_dataset is not None and self.guard_baseline is None:
            self._healthy = self._snapshot()
            if self.untrained is None and not self.sft_phase:  # no frozen starting model to measure later
                self.guard_baseline = self.heldout_metrics()
                self.untrained_metrics = self.guard_baseline
                log.info("guard baseline: %s", self.guard_baseline)
        return super().train(*args, **kwargs)


def split_by_prompt(records: list[dict], fraction: float, max_eval: int | None = None) -> tuple[list[dict], list[dict]]:
    """A stable held-out split by prompt (hash of the conversation), so reruns agree."""
    train, held = [], []
    for rec in records:
        h = int(hashlib.sha256(repr(rec["messages"]).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        (held if h < fraction else train).append(rec)
    if max_eval is not None and len(held) > max_eval:
        train += held[max_eval:]
        held = held[:max_eval]
    return train, held
