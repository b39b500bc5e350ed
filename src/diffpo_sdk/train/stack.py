"""Stack two LoRA adapters trained one after the other into one adapter on the first one's base.

A second run started from ``--model <first adapter>`` trains its own adapter on the merged
weights W0 + s1·B1·A1, so the model it ends with is W0 + s1·B1·A1 + s2·B2·A2. That sum is
exactly one LoRA of rank r1 + r2: A = [A1; A2], B = [s1·B1, s2·B2] with scaling 1. This is
how a two-stage LoRA recipe ships as a single adapter (a full fine-tune ships through ``train.extract``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .card import write_card

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
    if args.card:  # stacking is exact: the second run's final table measured this very adapter
        write_card(out, args.card, args.second, [args.first, args.second],
                   "two training runs stacked exactly into one adapter", args.command)
    print(f"stacked adapter: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
