"""``diffpo bench check``: exactness against ``generate`` in one dtype, and the policy's widths.

What ``scripts/gpu-check.sh`` runs per dtype on an accelerator (and dry-runs on a CPU):

- every item refined alone (batch 1), at blocks 1, 16, 64 and auto, must equal greedy
  ``generate`` in the same dtype, token for token;
- the same items in one batch. Policy for reduced precision: a batched row may differ from
  ``generate`` only where the top two logits at the first differing position are within
  ``--tie-ulps`` units of the dtype's precision (a tie that batched kernels round either way,
  as ``generate`` itself does between batch sizes); any other difference is a failure;
- the adaptive policy's chosen widths on real and fixed-point drafts, beside its measured
  cost curve: where a 16-token pass costs at most 1.25x a 1-token pass, real drafts must get
  passes wider than 1.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from ..engine import RefinerEngine
from ..engine.templating import prompt_ids
from ..protocol import RefineItem
from .speed import load_prompts, load_two_turn

BLOCKS: tuple[int | str, ...] = (1, 16, 64, "auto")


def tie_margin(engine: RefinerEngine, item: dict[str, Any], ref: list[int], got: list[int]) -> tuple[int, float, float]:
    """(first differing position, top-2 logit gap there, the dtype's spacing at that logit)."""
    k = next((n for n, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
    prompt = prompt_ids(engine.tokenizer, RefineItem.model_validate(item).conversation())
    with torch.inference_mode():
        logits = engine.model(input_ids=torch.tensor([prompt + ref[:k]], device=engine.device)).logits[0, -1]
    top = logits.float().topk(2).values.tolist()
    spacing = abs(top[0]) * torch.finfo(engine.model.dtype).eps
    return k, top[0] - top[1], max(spacing, torch.finfo(engine.model.dtype).tiny)


def exactness(engine: RefinerEngine, items: list[dict[str, Any]], n: int, tie_ulps: float) -> dict[str, Any]:
    refs = [engine.generate(it, max_new_tokens=n).token_ids for it in items]
    alone: dict[str, int] = {}
    batched: dict[str, dict[str, Any]] = {}
    for block in BLOCKS:
        alone[str(block)] = sum(engine.refine([it], block_size=block, max_new_tokens=n)[0].token_ids != ref
                                for it, ref in zip(items, refs))
        got = [r.token_ids for r in engine.refine(items, block_size=block, max_new_tokens=n)]
        ties, failures = [], []
        for it, ref, g in zip(items, refs, got):
            if g != ref:
                k, gap, spacing = tie_margin(engine, it, ref, g)
                (ties if gap <= tie_ulps * spacing else failures).append({"position": k, "gap": gap, "spacing": spacing})
        batched[str(block)] = {"tie_flips": ties, "failures": failures}
    ok = not any(alone.values()) and not any(b["failures"] for b in batched.values())
    return {"items": len(items), "max_new_tokens": n, "batch1_mismatches": alone, "batched": batched, "ok": ok}


def widths(engine: RefinerEngine, drafts: dict[str, list[dict[str, Any]]], n: int) -> dict[str, Any]:
    """The widths the adaptive policy chose per draft kind, and the pass cost it measured."""
    policy = engine.policy
    chosen: Counter[int] = Counter()
    choose = policy.choose

    def recording(*args: Any, **kwargs: Any) -> int:
        block = choose(*args, **kwargs)
        if not kwargs.get("first"):
            chosen[block] += 1
        return block

    policy.choose = recording  # type: ignore[method-assign]
    out: dict[str, Any] = {"cost_ms": {w: round(1000 * policy.cost(w), 3) for w in (1, 2, 8, 16, 64, 128)}}
    try:
        for kind, items in drafts.items():
            chosen.clear()
            for it in items:
                engine.refine([it], max_new_tokens=n)
            out[kind] = {str(w): c for w, c in sorted(chosen.items())}
    finally:
        del policy.choose
    cheap = policy.cost(16) <= 1.25 * policy.cost(1)
    wide_on_real = sum(c for w, c in out.get("real", {}).items() if int(w) > 1)
    out["wide_passes_nearly_free"] = cheap
    out["ok"] = (not cheap) or wide_on_real > 0
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    engine = RefinerEngine.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    data = Path(args.data) if args.data else None
    single = load_prompts(data, args.num_prompts)
    items = single + load_two_turn(data, max(1, args.num_prompts // 2), engine.tokenizer)
    fixed = [{**{k: v for k, v in it.items() if k != "draft"}, "draft": engine.generate(it, max_new_tokens=args.max_new_tokens).text}
             for it in single]
    return {
        "model": engine.model_name,
        "device": str(engine.device),
        "dtype": str(engine.model.dtype),
        "exactness": exactness(engine, items, args.max_new_tokens, args.tie_ulps),
        "policy": widths(engine, {"real": single, "fixed": fixed}, args.max_new_tokens),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="diffpo bench check", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--tie-ulps", type=float, default=4.0, help="a batched difference within this many units is a tie")
    p.add_argument("--data", default=None, help="AlpacaEval-format .jsonl.gz (default: ../shared/data, else the bundled drafts)")
    p.add_argument("--out", default="bench-out/check.json")
    args = p.parse_args(argv)
    report = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    e, w = report["exactness"], report["policy"]
    print(f"{report['model']} {report['dtype']} on {report['device']}: batch-1 mismatches {e['batch1_mismatches']}, "
          f"batched tie flips {sum(len(b['tie_flips']) for b in e['batched'].values())}, "
          f"failures {sum(len(b['failures']) for b in e['batched'].values())}; exact: {e['ok']}")
    print(f"policy cost (ms) {w['cost_ms']}; widths chosen real {w.get('real')}, fixed {w.get('fixed')}; ok: {w['ok']}")
    return 0 if e["ok"] and w["ok"] else 1
