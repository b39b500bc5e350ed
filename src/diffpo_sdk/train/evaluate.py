"""Held-out measures that tell whether a refiner got better or just degenerate.

- ``ar_loss``: next-token loss on the held-out target (best) answers; rises when the model
  forgets how to write good answers.
- ``repetition``: share of repeated 3-grams in refined outputs; the signature of collapse
  (a model that ignores its prefix loops).
- ``repetition_long``: the same on greedy answers longer than N (``--eval-long-tokens``):
  a refiner trained on N-token answers can write them well and loop after them.
- ``guess_accuracy``: share of the consistency term's student positions (after a wrong
  token) whose greedy token is already the teacher's: the skill Jacobi speed rests on,
  measured on every branch of every held-out prompt rather than a few refined answers.
- ``passes_per_token``: forward passes per refined token when the engine refines held-out
  drafts (other models' answers), and drafts from a source the run never trained on;
  1.0 = autoregressive.
- ``preference_accuracy``: how often the target gets a higher length-normalised
  log-likelihood than a lower-ranked answer. Only meaningful beside an SFT-only control.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .loss import token_nll


def repetition_rate(sequences: list[list[int]], n: int = 3) -> float:
    """Share of n-grams that repeat an earlier n-gram of the same sequence, over all sequences."""
    total = repeated = 0
    for seq in sequences:
        grams = [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]
        total += len(grams)
        repeated += len(grams) - len(set(grams))
    return repeated / total if total else 0.0


@contextmanager
def as_saved(model: Any) -> Iterator[Any]:
    """``model`` running as its weights are saved and served, without mixed precision's autocast.

    Under ``--bf16`` or ``--fp16`` accelerate replaces the trained model's ``forward`` on the
    instance with an autocast wrapper (a copy made during training inherits it; the untrained
    copy made before training has none). Measured through it, a column would mix precisions and
    would not say what the saved model does. Here the class's own ``forward`` runs, for the
    duration."""
    patched = model.__dict__.pop("forward", None)
    try:
        yield model
    finally:
        if patched is not None:
            model.forward = patched


@torch.no_grad()
def heldout_losses(model: Any, dataset: Any, collator: Any, batch_size: int = 8,
                   weight: float = 1.0, **loss_kw: Any) -> dict[str, float]:
    """Token-weighted L_AR on the targets, L_Con (deterministic students) and the guess
    accuracy (student positions after a wrong token that already predict the teacher's token).

    Both losses are per-token means whatever normalisation the training used (the paper
    recipe's sums grow with N), so every recipe's numbers compare."""
    from .loss import diffpo_loss

    was = model.training
    model.eval()
    device = next(model.parameters()).device
    ar_sum = ar_n = con_sum = batches = 0.0
    guesses = right = 0
    for i in range(0, len(dataset), batch_size):
        batch = collator([dataset.get(j, deterministic=True) for j in range(i, min(i + batch_size, len(dataset)))])
        batch = {k: v.to(device) for k, v in batch.items()}
        out = diffpo_loss(model, batch, weight, **{**loss_kw, "normalize": "token"})
        n = float(batch["target_mask"].sum())
        ar_sum += float(out.ar_loss) * n
        ar_n += n
        con_sum += float(out.con_loss)
        batches += 1
        guesses += out.guesses
        right += out.guesses_right
    model.train(was)
    metrics = {"ar_loss": ar_sum / max(ar_n, 1), "con_loss": con_sum / max(batches, 1)}
    if guesses:
        metrics["guess_accuracy"] = right / guesses
    return metrics


@torch.no_grad()
def answer_scores(model: Any, prompt: list[int], answers: list[list[int]], masks: list[list[int]]) -> list[float]:
    """Mean log-likelihood per answer token of each (N-long, padded) answer after ``prompt``.

    The prompt runs once; every answer continues from its KV cache, so a prompt with k answers
    costs one prompt and k answers instead of k prompts."""
    from transformers import DynamicCache

    from ..engine.kvcache import cache_kwarg

    device = next(model.parameters()).device
    k, n = len(answers), len(answers[0])
    cache = DynamicCache(config=model.config)  # the prompt's keys and values, filled in place
    name = cache_kwarg(model)
    head = model(input_ids=torch.tensor([prompt], device=device), use_cache=True, **{name: cache})
    cache.batch_repeat_interleave(k)
    ids = torch.tensor(answers, device=device)
    positions = torch.arange(len(prompt), len(prompt) + n - 1, device=device).expand(k, -1)
    rest = model(input_ids=ids[:, :-1], position_ids=positions, use_cache=False, **{name: cache}).logits
    logits = torch.cat([head.logits[:, -1:].expand(k, -1, -1), rest], dim=1)  # predicts answer tokens 0..N-1
    mask = torch.tensor(masks, device=device, dtype=torch.float)
    return (-(token_nll(logits, ids) * mask).sum(-1) / mask.sum(-1)).tolist()


@torch.no_grad()
def preference_accuracy(model: Any, dataset: Any) -> float:
    """Pairwise: target vs each lower-ranked answer, by mean log-likelihood per answer token."""
    was = model.training
    model.eval()
    wins = []
    for item in dataset.items:
        if not item["others"]:
            continue
        answers = [item["target"], *item["others"]]
        best, *others = answer_scores(model, item["prompt"], [dataset.padded(a) for a in answers],
                                      [dataset.answer_mask(a) for a in answers])
        wins += [best > s for s in others]
    model.train(was)
    return sum(wins) / len(wins) if wins else float("nan")


def refine_metrics(model: Any, tokenizer: Any, items: list[dict], n: int, block_size: int | str) -> dict[str, float]:
    """Refine ``items`` ({messages, draft}) with the engine: passes per token and repetition."""
    from ..engine import RefinerEngine

    was = model.training
    engine = RefinerEngine(model, tokenizer, name="eval", max_batch_size=8)
    results = engine.refine(items, block_size=block_size, max_new_tokens=n)
    model.train(was)
    passes = sum(r.iterations for r in results)
    tokens = sum(r.new_tokens for r in results)
    return {"passes_per_token": passes / max(tokens, 1), "repetition": repetition_rate([r.token_ids for r in results]),
            "converged": sum(r.converged for r in results) / max(len(results), 1)}


def greedy_repetition(model: Any, dataset: Any, new_tokens: int, batch_size: int = 8, limit: int | None = None) -> float:
    """Repeated 3-grams in greedy answers of up to ``new_tokens`` tokens to the held-out prompts
    (the first ``limit``, default all): what the refiner returns at that length, its output
    being greedy. Past N it shows loops that N-token answers hide (``repetition_long``)."""
    from .states import greedy_answers

    was = model.training
    model.eval()
    answers = greedy_answers(model, [it["prompt"] for it in dataset.items[:limit]], new_tokens, dataset.stop_ids,
                             dataset.pad, batch_size)
    model.train(was)
    return repetition_rate([[t for t in a if t not in dataset.stop_ids] for a in answers])


def long_repetition(model: Any, dataset: Any, long_tokens: int, batch_size: int = 8,
                    limit: int | None = None) -> float | None:
    """``repetition_long``: :func:`greedy_repetition` at ``long_tokens``, measured only past N
    (``None`` otherwise: at most N tokens, the refined outputs' own repetition says it)."""
    return greedy_repetition(model, dataset, long_tokens, batch_size, limit) if long_tokens > dataset.n else None


def evaluate_refiner(model: Any, tokenizer: Any, dataset: Any, *, draft_items: list[dict], block_size: int | str,
                     batch_size: int = 8, transfer_items: list[dict] | None = None, long_tokens: int = 0,
                     losses: dict[str, float] | None = None, **loss_kw: Any) -> dict[str, float]:
    """The before/after table for one model; ``transfer_items`` are drafts from a source the
    run never trained on (the speed that matters is the one that transfers). ``losses``: this
    model's :func:`heldout_losses` on ``dataset`` (or a dict holding them) when the run already
    measured them (the guard's baseline, the last evaluation), so they are not computed twice."""
    from .trainer import DiffPOCollator

    with as_saved(model):
        if losses is None:
            losses = heldout_losses(model, dataset, DiffPOCollator(dataset.pad), batch_size, **loss_kw)
        out = {"heldout_ar_loss": losses["ar_loss"]}
        if "guess_accuracy" in losses:
            out["guess_accuracy"] = losses["guess_accuracy"]
        drafts = refine_metrics(model, tokenizer, draft_items, dataset.n, block_size)
        out["repetition"] = drafts["repetition"]
        if (long := long_repetition(model, dataset, long_tokens, batch_size)) is not None:
            out["repetition_long"] = long
        out["passes_per_token_drafts"] = drafts["passes_per_token"]
        if transfer_items:
            out["passes_per_token_transfer"] = refine_metrics(model, tokenizer, transfer_items, dataset.n,
                                                              block_size)["passes_per_token"]
        out["preference_accuracy"] = preference_accuracy(model, dataset)
        return out


LABELS = {
    "heldout_ar_loss": "held-out L_AR on targets",
    "repetition": "repeated 3-grams in refined outputs",
    "repetition_long": "repeated 3-grams, longer greedy answers",
    "guess_accuracy": "Jacobi guesses right after a wrong token",
    "passes_per_token_drafts": "passes/token, held-out drafts",
    "passes_per_token_transfer": "passes/token, drafts from another source",
    "preference_accuracy": "preference accuracy",
}


def format_table(columns: dict[str, dict[str, float]]) -> str:
    """A Markdown table: one row per measure, one column per model (before, after, ...)."""
    names = list(columns)
    lines = ["| measure | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key, label in LABELS.items():
        if any(key in c for c in columns.values()):
            cells = [f"{columns[c][key]:.3f}" if key in columns[c] else "-" for c in names]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


RESULTS = "eval_results.json"


def write_table(out_dir: str | Path, columns: dict[str, dict[str, float]], extra: dict | None = None) -> str:
    table = format_table(columns)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS).write_text(json.dumps({"columns": columns, **(extra or {})}, indent=2))
    (out / "eval_results.md").write_text(table + "\n")
    return table


def read_results(out_dir: str | Path) -> dict[str, Any]:
    """What :func:`write_table` wrote in ``out_dir``: the columns and the facts beside them."""
    return json.loads((Path(out_dir) / RESULTS).read_text())


__all__ = ["answer_scores", "as_saved", "evaluate_refiner", "format_table", "greedy_repetition", "heldout_losses",
           "long_repetition", "preference_accuracy", "read_results", "refine_metrics", "repetition_rate", "write_table"]
