"""Stack two LoRA adapters trained one after the other into one adapter on the first one's base.

A second run started from ``--model <first adapter>`` trains its own adapter on the merged
weights W0 + s1·B1·A1, so the model it ends with is W0 + s1·B1·A1 + s2·B2·A2. That sum is
exactly one LoRA of rank r1 + r2: A = [A1; A2], B = [s1·B1, s2·B2] with scaling 1. This is
how a two-stage recipe ships as a single adapter (the built-in ``smollm2-135m-diffpo``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .evaluate import LABELS, format_table

LOOP_TOLERANCE = 0.05  # a rise in long-answer repetition the card reports (the built-in's guard tolerance)
MINUS = "\u2212"
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def _scaling(cfg: dict) -> float:
    if cfg.get("use_rslora"):
        return cfg["lora_alpha"] / cfg["r"] ** 0.5
    return cfg["lora_alpha"] / cfg["r"]


def stack_adapters(first: str | Path, second: str | Path, out: str | Path, base: str | None = None,
                   dtype: torch.dtype = torch.float32) -> Path:
    """Write to ``out`` one adapter equal to ``first`` then ``second`` applied on top of it.

    ``base`` names the combined adapter's base model (default: ``first``'s base)."""
    first, second, out = Path(first), Path(second), Path(out)
    cfgs = [json.loads((p / CONFIG).read_text()) for p in (first, second)]
    for c in cfgs:
        if c.get("peft_type", "LORA") != "LORA" or c.get("lora_dropout", 0) < 0:
            raise ValueError("only LoRA adapters stack")
    weights = [load_file(str(p / WEIGHTS)) for p in (first, second)]
    ranks, scales = [c["r"] for c in cfgs], [_scaling(c) for c in cfgs]
    modules = sorted({k.rsplit(".lora_", 1)[0] for w in weights for k in w if ".lora_" in k})
    stacked: dict[str, torch.Tensor] = {}
    for m in modules:
        a_parts, b_parts = [], []
        for w, r, s in zip(weights, ranks, scales):
            a, b = w.get(f"{m}.lora_A.weight"), w.get(f"{m}.lora_B.weight")
            if a is None or b is None:  # a module only one adapter trains: the other adds zero
                ref = next(x for x in weights if f"{m}.lora_A.weight" in x)
                a = torch.zeros(r, ref[f"{m}.lora_A.weight"].shape[1])
                b = torch.zeros(ref[f"{m}.lora_B.weight"].shape[0], r)
            a_parts.append(a.float())
            b_parts.append(b.float() * s)
        stacked[f"{m}.lora_A.weight"] = torch.cat(a_parts, 0).to(dtype).contiguous()
        stacked[f"{m}.lora_B.weight"] = torch.cat(b_parts, 1).to(dtype).contiguous()
    rank = sum(ranks)
    cfg = {**cfgs[0], "r": rank, "lora_alpha": rank, "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {},
           "target_modules": sorted(set(_targets(cfgs[0])) | set(_targets(cfgs[1])))}
    if base is not None:
        cfg["base_model_name_or_path"] = base
    out.mkdir(parents=True, exist_ok=True)
    save_file(stacked, str(out / WEIGHTS), metadata={"format": "pt"})
    (out / CONFIG).write_text(json.dumps(cfg, indent=2))
    return out


def stacked_model_card(first: str | Path, second: str | Path, name: str, base: str, rank: int,
                       command: str | None = None) -> str:
    """A model card for the stacked adapter, written only from what the two runs measured.

    Both stages' ``eval_results.json`` give their tables. The second's "after" (the stacked
    refiner) is compared against the base: the second run's own `base` column when it measured
    one (``--eval-base-model``), else the first run's "before" when both ran at one block size.
    A rise of repeated 3-grams in longer answers is said."""
    runs = [json.loads((Path(p) / "eval_results.json").read_text()) for p in (first, second)]
    lines = ["---", f"base_model: {base}", "library_name: peft", "tags: [diffpo, refiner]", "---", "",
             f"# {name}", "", f"A DiffPO refiner: a rank-{rank} LoRA on {base}, two training runs stacked "
             f'exactly into one adapter. Load it with `RefinerEngine.from_pretrained("{name}")`.']
    if command:
        lines += ["", f"Built by `{command}`."]
    final_cols = runs[1]["columns"]["after"]
    # the base measured by run 2 itself (--eval-base-model), else run 1's starting model at one N
    base_cols = runs[1]["columns"].get("base")
    if base_cols is None and runs[0].get("block_size") == runs[1].get("block_size"):
        base_cols = runs[0]["columns"]["before"]
    if base_cols is not None:
        lines += ["", f"## Against the base model (block size N = {runs[1].get('block_size')})", "",
                  f"| measure | base | {name} | change |", "|---|---:|---:|---:|"]
        for key, label in LABELS.items():
            if key in base_cols and key in final_cols:
                b, a = base_cols[key], final_cols[key]
                change = f"{(a - b) / b:+.1%}" if key.startswith("passes_per_token") and b else f"{a - b:+.3f}"
                lines.append(f"| {label} | {b:.3f} | {a:.3f} | {change.replace('-', MINUS)} |")
        lines += ["", "On the held-out prompts of the runs' data (prompts neither run trained on): L_AR on their "
                  "preferred answers; passes/token refining their lower-ranked answers as drafts (1.0: one "
                  "token per pass) and, for \"another source\", the drafts of `--transfer-eval-data`, a "
                  "source neither run trained on; preference accuracy: how often the preferred answer scores "
                  "above a lower-ranked one. The refiner's output equals greedy decoding of base plus adapter."]
        longs = (base_cols.get("repetition_long"), final_cols.get("repetition_long"))
        if None not in longs and longs[1] - longs[0] > LOOP_TOLERANCE:
            lines += ["", f"**Known limitation.** In greedy answers of {runs[1].get('long_tokens')} tokens, "
                      f"repeated 3-grams rise from {longs[0]:.3f} (base) to {longs[1]:.3f}: past the answer "
                      "length it trained on, it loops more than its base."]
    else:
        lines += ["", f"Run 1 was measured at block size N = {runs[0].get('block_size')} and run 2 at "
                  f"N = {runs[1].get('block_size')} without the base (`--eval-base-model`), so this card has "
                  "no comparison against the base at one block size: each run's table compares it with the "
                  "model it started from."]
    for i, run in enumerate(runs, 1):
        guard = run.get("guard")
        stop = (f". The collapse guard fired ({guard.rstrip('.')}) and kept the last weights that passed"
                if guard else "")
        start = run.get("model", "?")
        # run 2 starts from run 1's output folder: named as such, not by a path of the build machine
        start = "run 1's model" if i == 2 and Path(start).resolve() == Path(first).resolve() else f"`{start}`"
        lines += ["", f"## Run {i}: recipe `{run.get('recipe', '?')}` from {start} (before = its starting model)", "",
                  f"{run.get('steps', '?')} steps, {run.get('train_seconds', 0):.0f} s of training on "
                  f"{run.get('device', '?')}, {run.get('date', '?')}, block size N = {run.get('block_size')}{stop}.",
                  "", format_table(run["columns"])]
    return "\n".join(lines) + "\n"


def _targets(cfg: dict) -> list[str]:
    t = cfg.get("target_modules") or []
    return [t] if isinstance(t, str) else list(t)


def main(argv: list[str] | None = None) -> int:
    """``python -m diffpo_sdk.train.stack FIRST SECOND OUT [--base NAME] [--dtype float16]``."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m diffpo_sdk.train.stack", description=__doc__.split("\n")[0])
    p.add_argument("first", help="the adapter trained first (its base is the stacked adapter's base)")
    p.add_argument("second", help="the adapter trained on the first one merged (--model FIRST)")
    p.add_argument("out")
    p.add_argument("--base", default=None, help="base model name to record (default: the first adapter's)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--card", metavar="NAME", default=None,
                   help="write OUT/README.md named NAME from both runs' eval_results.json")
    p.add_argument("--command", default=None, help="the command that built it, for the card")
    args = p.parse_args(argv)
    out = stack_adapters(args.first, args.second, args.out, args.base, getattr(torch, args.dtype))
    if args.card:
        cfg = json.loads((out / CONFIG).read_text())
        card = stacked_model_card(args.first, args.second, args.card, cfg.get("base_model_name_or_path", "?"),
                                  cfg["r"], args.command)
        (out / "README.md").write_text(card)
    print(f"stacked adapter: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
