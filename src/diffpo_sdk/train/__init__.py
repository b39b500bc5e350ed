"""Training DiffPO refiners: trajectories, the L_AR + w * L_Con loss, a transformers Trainer.

Needs the ``train`` extra. ``python -m diffpo_sdk.train --help`` lists every flag. Imports
are lazy so ``diffpo data build`` does not pull in torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DiffPOCollator", "DiffPOConfig", "DiffPOTrainer", "TrajectoryDataset", "diffpo_loss"]


def __getattr__(name: str) -> Any:
    if name in ("DiffPOCollator", "DiffPOConfig", "DiffPOTrainer", "TrajectoryDataset"):
        from . import trainer

        return getattr(trainer, name)
    if name == "diffpo_loss":
        from .loss import diffpo_loss

        return diffpo_loss
    raise AttributeError(name)
