"""Named training recipes and the typed choices of the DiffPO options: the one home of their defaults.

A recipe is a set of option values. ``DiffPOConfig`` fills every option the user left unset
from its recipe (so explicit flags always win), and ``diffpo_loss`` fills its own unset
options from the default recipe: there is no second set of defaults anywhere.

- ``paper``: eq. 4-6 of the DiffPO paper with its appendix B.1 settings. y^(t) is a random
  lower-ranked answer of another model, y^(T) the best-scored one; L_Con is the forward KL
  from the stop-gradient target-prefix distribution to the trajectory-prefix distribution;
  both L_AR and L_Con are sums over the N answer positions (averaged over the batch), so
  w = 1000 weighs them on the same normalisation; lr 1e-9, cosine, 3 % warm-up, gradient
  accumulation 4, 1 epoch, no extra regulariser, guards off.
- ``fast``: the recipe measured fastest on CPU (docs/training.md): one-token branches off
  the refiner's own fixed point (``frontier``), cross-entropy toward the teacher's greedy
  token, a KL hold of the greedy path on the untrained model. A speed objective: it never
  looks at the preferred target in L_Con.
- ``branches``: one-token branches off the preferred target, the wrong token a lower-ranked
  answer's (``target-branches``), cross-entropy toward the model's own clean prediction. Both
  terms point at the target, but measured it cost more L_AR than it bought speed (docs/training.md).
- ``sft-fast``: ``sft`` for the first 60 % of the steps, at most one epoch (more SFT overfits
  the shared data: docs/training.md), then ``fast`` from the model that phase made: the
  hold's reference, the frontier states' builder and the guards' baseline become the SFT'd
  model (as DPO's reference is the SFT'd policy), so the speed is bought without undoing the
  preference signal; a second KL hold keeps the SFT'd model's distribution on the preferred
  targets' path too (``target_hold_weight``), and each phase runs the whole learning-rate
  schedule. The built-in refiner was made by the same two stages run as two commands
  (scripts/build-builtin-refiner.sh), without the target hold.
- ``sft``: the SFT-only control (w = 0): L_AR on the best answers, nothing else.

Pure Python: importing it pulls in neither torch nor transformers.
"""

from __future__ import annotations

from typing import Any

#: every string-valued DiffPO option and its allowed values (validated once, in DiffPOConfig)
CHOICES: dict[str, tuple[str, ...]] = {
    "trajectory_source": ("answers", "jacobi", "mix", "frontier", "target-branches"),
    "consistency_loss": ("kl", "ce"),
    "consistency_mask": ("none", "prefix", "argmax"),
    "consistency_normalize": ("token", "sum"),
    "fixed_point_anchor": ("ce", "kl"),
    "guard_action": ("stop", "warn"),
}

#: the options a recipe sets (DiffPO's own, then the TrainingArguments ones)
LOSS_KEYS = ("trajectory_source", "consistency_loss", "consistency_mask", "consistency_normalize",
             "consistency_weight", "consistency_warmup_ratio", "consistency_start", "sft_max_epochs",
             "fixed_point_weight", "fixed_point_anchor", "target_hold_weight")
TRAIN_KEYS = ("learning_rate", "lr_scheduler_type", "warmup_steps", "gradient_accumulation_steps",
              "num_train_epochs", "weight_decay", "guard")

_FAST: dict[str, Any] = {
    "trajectory_source": "frontier", "consistency_loss": "ce", "consistency_mask": "none",
    "consistency_normalize": "token", "consistency_weight": 2.0, "consistency_warmup_ratio": 0.1,
    "consistency_start": 0.0, "sft_max_epochs": 0.0, "fixed_point_weight": 5.0, "fixed_point_anchor": "kl",
    "target_hold_weight": 0.0, "learning_rate": 3e-5, "lr_scheduler_type": "linear", "warmup_steps": 0.0,
    "gradient_accumulation_steps": 1, "num_train_epochs": 3.0, "weight_decay": 0.0, "guard": True,
}

RECIPES: dict[str, dict[str, Any]] = {
    "paper": {
        "trajectory_source": "answers", "consistency_loss": "kl", "consistency_mask": "none",
        "consistency_normalize": "sum", "consistency_weight": 1000.0, "consistency_warmup_ratio": 0.0,
        "consistency_start": 0.0, "sft_max_epochs": 0.0, "fixed_point_weight": 0.0, "fixed_point_anchor": "kl",
        "target_hold_weight": 0.0, "learning_rate": 1e-9, "lr_scheduler_type": "cosine", "warmup_steps": 0.03,
        "gradient_accumulation_steps": 4, "num_train_epochs": 1.0, "weight_decay": 0.0, "guard": False,
    },
    "fast": _FAST,
    "branches": {**_FAST, "trajectory_source": "target-branches", "consistency_weight": 0.3,
                "consistency_warmup_ratio": 0.0, "fixed_point_weight": 0.0},
    "sft-fast": {**_FAST, "consistency_start": 0.6, "sft_max_epochs": 1.0, "fixed_point_weight": 10.0,
                 "target_hold_weight": 10.0, "learning_rate": 5e-5},
    "sft": {**_FAST, "trajectory_source": "answers", "consistency_weight": 0.0, "consistency_warmup_ratio": 0.0,
            "fixed_point_weight": 0.0},
}

#: the recipe a run uses unless ``--recipe`` names another: the one measured to keep the most
#: preference signal while it buys speed (docs/training.md, Results)
DEFAULT_RECIPE = "sft-fast"

#: how each recipe departs from the paper (for --help, the docs and the model card)
DIFFERS_FROM_PAPER: dict[str, str] = {
    "paper": "none in the loss (eq. 4-6, N-position sums, w = 1000, forward KL, stop-gradient teacher); "
             "batch size and hardware are yours, the paper used 8 GPUs",
    "fast": "not the paper's objective: L_Con is cross-entropy toward the teacher's greedy token on one-token "
            "branches off the refiner's own greedy answer (never another model's answer), mean over positions, "
            "w = 2, plus a KL hold (weight 5) on the untrained model's greedy path, lr 3e-5, guards on",
    "branches": "L_Con is not the paper's KL over other models' whole answers: it is cross-entropy toward the "
               "model's own greedy token on the preferred target's path, after one wrong token taken from a "
               "lower-ranked answer at that position (a one-token branch off y^(T)); mean over positions, w = 0.3, "
                "lr 3e-5, guards on",
    "sft-fast": "the first 60 % of the steps, at most one epoch, are L_AR alone (SFT); the rest is the fast "
                "recipe (not the paper's objective: cross-entropy on one-token branches off the refiner's own "
                "greedy answer, w = 2 ramped over the first 10 % of that phase, a KL hold of weight 10 on its "
                "greedy path) with the SFT'd model as the hold's reference, the branches' source and the guards' "
                "baseline, plus a KL hold (weight 10) toward the SFT'd model on the preferred targets' path; each "
                "phase runs the whole learning-rate schedule",
    "sft": "the SFT-only control: L_AR alone on the best answers (w = 0), no consistency term",
}


def recipe_values(name: str) -> dict[str, Any]:
    """The option values of recipe ``name`` (a copy); unknown names raise with the choices."""
    if name not in RECIPES:
        raise ValueError(f"recipe {name!r}: use one of {tuple(RECIPES)}")
    return dict(RECIPES[name])


def check_choice(option: str, value: Any) -> None:
    """Raise ValueError naming the flag when ``value`` is not one of ``option``'s choices."""
    allowed = CHOICES[option]
    if value not in allowed:
        flag = "--" + option.replace("_", "-")
        raise ValueError(f"{flag} {value!r}: use one of {allowed}")


def loss_default(option: str) -> Any:
    """The default recipe's value of a loss option (what ``diffpo_loss`` uses when not told)."""
    return RECIPES[DEFAULT_RECIPE][option]
