"""Measure a refiner on a training run's held-out split, without training it.

A model made after training (an adapter extracted from a full fine-tune with
``train.extract``, a merge, a model trained elsewhere) needs the table a run prints, on the
same prompts, drafts and block size, before it ships. This takes the trainer's own flags, so
the split is the run's, and writes ``eval_results.json`` / ``.md`` in ``--output-dir``: an
``after`` column for ``--model`` and, with ``--eval-base-model``, a ``base`` column. Jacobi
guesses after a wrong token are counted on branches of the measured model's own greedy answers.

    python -m diffpo_sdk.train.measure $COMMON --model runs/fast-lora --eval-base-model smollm2-135m-instruct \\
        --output-dir runs/fast-lora-measured
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from .__main__ import build_datasets, check_base_tokenizer, evaluate_base, final_table_kwargs, parse_config, table_facts

log = logging.getLogger("diffpo_sdk.train.measure")


def measure(argv: list[str]) -> dict[str, Any]:
    """The columns and facts written for the trainer's flags ``argv`` (training flags ignored)."""
    import torch

    from ..engine.loading import load_model_and_tokenizer, resolve_dtype
    from .evaluate import evaluate_refiner, write_table

    cfg = parse_config(argv)
    model, tok, _ = load_model_and_tokenizer(cfg.model, device=torch.device("cpu"), dtype=resolve_dtype(cfg.model_dtype))
    if cfg.eval_base_model:
        check_base_tokenizer(cfg.eval_base_model, tok)
    _, eval_ds, _ = build_datasets(cfg, model, tok)
    kw = final_table_kwargs(cfg, eval_ds)
    columns = {"after": evaluate_refiner(model, tok, eval_ds, **kw)}
    if cfg.eval_base_model:
        columns = {"base": evaluate_base(cfg.eval_base_model, cfg.model_dtype, tok, eval_ds, kw), **columns}
    facts = {"measured": True, **table_facts(cfg, kw, torch)}
    print("\n" + write_table(cfg.output_dir, columns, facts) + "\n")
    return {"columns": columns, **facts}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    measure(list(sys.argv[1:] if argv is None else argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
