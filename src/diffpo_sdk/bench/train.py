"""``diffpo bench train``: one DiffPO training step against a plain SFT step on the same batch.

Both steps are full optimizer steps (forward, backward, AdamW update) on the same model,
batch and machine, interleaved and repeated; the figure is the ratio of medians. The SFT
step is transformers' own causal-LM loss on ``[prompt, target]``, nothing of ours. With
``--bf16`` the SFT and default-recipe steps are timed again with their forwards under
bfloat16 autocast, as ``train --bf16`` runs them, beside the float32 ones.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any

#: a step's forward runs inside one of these: ``nullcontext`` (float32) or a bfloat16 autocast
Precision = Callable[[], AbstractContextManager[Any]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="diffpo bench train", description=__doc__)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--data", default=None, help="trajectories JSONL (default: built from ../shared/data AlpacaEval)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--max-response-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--device", default="auto")
    p.add_argument("--bf16", action="store_true", help="also time the SFT and default-recipe steps under bfloat16 "
                   "autocast (what `train --bf16` does), beside float32")
    p.add_argument("--output", default="bench_train.json")
    args = p.parse_args(argv)

    import torch

    from ..engine.loading import load_model_and_tokenizer, resolve_device
    from ..shared_data import ALPACA_PREFERENCES, shared_file
    from ..train.data import from_scored, load_trajectories
    from ..train.loss import diffpo_loss, frontier_rows
    from ..train.reference import frozen_copy
    from ..train.trainer import DiffPOCollator, TrajectoryDataset

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.data:
        records = load_trajectories(args.data)[: args.batch_size]
    else:
        path = shared_file(ALPACA_PREFERENCES)
        if path is None:
            print(f"no --data given and the shared data's {ALPACA_PREFERENCES} is missing", file=sys.stderr)
            return 2
        records = [r for _, r in zip(range(args.batch_size), from_scored(path))]
    model, tok, _ = load_model_and_tokenizer(args.model, device=device, dtype=torch.float32)
    model.requires_grad_(True).train()
    ds = TrajectoryDataset(records, tok, args.max_response_tokens, source="answers")
    batch = {k: v.to(device) for k, v in DiffPOCollator(ds.pad)([ds.get(i, True) for i in range(len(ds))]).items()}
    labels = batch["target_ids"].clone()
    labels[:, : -args.max_response_tokens] = -100
    labels[:, -args.max_response_tokens:][batch["target_mask"] == 0] = -100
    labels[batch["target_attention_mask"] == 0] = -100
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-7)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    bf16: Precision = partial(torch.autocast, device.type, dtype=torch.bfloat16)

    def sft(precision: Precision = nullcontext) -> None:
        with precision():
            loss = model(input_ids=batch["target_ids"], attention_mask=batch["target_attention_mask"],
                         labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def diffpo() -> None:
        diffpo_loss(model, batch, 1.0, kind="kl", mask="prefix").loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def jacobi_row() -> None:  # a Jacobi-state row: the teacher is the fixed point, one more no-grad forward
        b = dict(batch, teacher_is_target=torch.zeros_like(batch["teacher_is_target"]))
        diffpo_loss(model, b, 1.0, kind="kl", mask="prefix").loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    # a frontier-source batch of the same shape: y* = the lower-ranked answer, one branch per
    # position where the target differs from it (up to N), the target packed into the same rows
    # (as the collator packs it) or, for comparison, in rows of its own
    prompts = [ds.items[i]["prompt"] for i in range(len(ds))]
    targets = batch["target_answer"].tolist()
    fixed = batch["student_answer"].tolist()
    branches = [[(d, t[d]) for d in range(args.max_response_tokens - 1) if t[d] != y[d]]
                for y, t in zip(fixed, targets)]
    answer_keys = ("target_answer", "target_mask")
    packed = dict(frontier_rows(prompts, fixed, branches, ds.pad, targets), **{k: batch[k] for k in answer_keys})
    separate = dict(frontier_rows(prompts, fixed, branches, ds.pad),
                    **{k: batch[k] for k in (*answer_keys, "target_ids", "target_attention_mask")})
    packed, separate = ({k: v.to(device) for k, v in b.items()} for b in (packed, separate))
    reference = frozen_copy(model)  # the default recipe's holds compare against a frozen model

    def frontier() -> None:
        diffpo_loss(model, packed, 1.0, kind="ce", mask="none", fixed_point_weight=0.0).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def default_step(rows: dict[str, torch.Tensor], precision: Precision = nullcontext) -> None:
        with precision():  # diffpo_loss's options default to that recipe's
            loss = diffpo_loss(model, rows, 1.0, reference=reference).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    steps = {"sft": sft, "diffpo_answers": diffpo, "diffpo_jacobi": jacobi_row, "diffpo_frontier": frontier,
             "default_recipe": partial(default_step, packed), "default_target_apart": partial(default_step, separate)}
    twice = ("sft", "default_recipe") if args.bf16 else ()  # timed again under bfloat16 autocast
    steps |= {f"{k}_bf16": partial(steps[k], precision=bf16) for k in twice}
    times: dict[str, list[float]] = {k: [] for k in steps}
    for fn in steps.values():  # warm-up (allocator, optimizer state)
        fn()
    for _ in range(args.repeats):
        for name, fn in steps.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "model": args.model, "device": str(device), "threads": torch.get_num_threads(), "batch_size": args.batch_size,
        "max_response_tokens": args.max_response_tokens, "repeats": args.repeats, "median_s": med,
        "ratio_answers_vs_sft": med["diffpo_answers"] / med["sft"],
        "ratio_jacobi_vs_sft": med["diffpo_jacobi"] / med["sft"],
        "ratio_frontier_vs_sft": med["diffpo_frontier"] / med["sft"],
        "ratio_default_recipe_vs_sft": med["default_recipe"] / med["sft"],
        # what packing the target into the frontier rows saves the default recipe's step
        "ratio_target_apart_vs_packed": med["default_target_apart"] / med["default_recipe"], "target_ratio": 2.3,
    }
    result |= {f"ratio_{k}_bf16_vs_float32": med[f"{k}_bf16"] / med[k] for k in twice}  # below 1: bf16 is faster
    print(f"train step on {device} ({torch.get_num_threads()} threads), batch {args.batch_size}, N={args.max_response_tokens}")
    for k, v in med.items():
        print(f"  {k:21s} {v * 1000:8.0f} ms  ({v / med['sft']:.2f}x SFT)")
    ok = max(result[f"ratio_{k}_vs_sft"] for k in ("answers", "jacobi", "frontier", "default_recipe")) <= 2.3
    print(f"  target <= 2.3x SFT: {'met' if ok else 'NOT met'}")
    if twice:
        print("  bfloat16 autocast against float32: " + ", ".join(
            f"{k} {result[f'ratio_{k}_bf16_vs_float32']:.2f}x" for k in twice))
    Path(args.output).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
