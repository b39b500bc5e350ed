"""A full fine-tune as a LoRA adapter on its base: the truncated SVD of each weight's change.

The consistency objective buys its speed with a full fine-tune (a rank-8 LoRA barely moves;
docs/training.md, Results), but a refiner ships as a small adapter on the built-in weights.
For each linear layer LoRA targets, ``W_tuned - W_base = U S Vh`` and the best rank-r
approximation of that change is ``B = U_r S_r``, ``A = Vh_r`` with scaling 1. The share of
the change's energy (squared singular values) kept is reported; norms cannot ride on a LoRA
and are reported as dropped. The token embedding's change is dropped too unless
``--embedding-rank`` asks for it: on a model that ties its output head to the embedding (the
built-in SmolLM2 does) one low-rank embedding LoRA then changes both, as the fine-tune did
(peft's ``ensure_weight_tying``).

    python -m diffpo_sdk.train.extract runs/fast runs/fast-lora --base smollm2-135m-instruct --rank 32
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from .stack import WEIGHTS

LINEAR_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EMBEDDING = "embed_tokens"
OUTPUT_HEAD = "lm_head"  # what a tied Llama-style head is called


@dataclass
class Extraction:
    """What the adapter keeps of the fine-tune's change, and what it drops."""

    rank: int
    energy_kept: float  # share of the targeted layers' squared change the adapter reproduces
    dropped: dict[str, float] = field(default_factory=dict)  # untargeted weight -> norm of its change
    size_bytes: int = 0
    embedding_kept: float | None = None  # the same share for the token embedding, when it rides along


def model_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved model folder (one or several safetensors files)."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no .safetensors weights")
    return {k: v for f in files for k, v in load_file(str(f)).items()}


def low_rank(change: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """``(U_r S_r, Vh_r, kept, total)``: the best rank-``rank`` factors of ``change`` and the
    squared singular values they keep out of all of them."""
    u, s, vh = torch.linalg.svd(change, full_matrices=False)
    return u[:, :rank] * s[:rank], vh[:rank], float((s[:rank] ** 2).sum()), float((s ** 2).sum())


def extract_lora(tuned: str | Path, base: str | Path, out: str | Path, rank: int, *, base_name: str | None = None,
                 dtype: torch.dtype = torch.float16, targets: tuple[str, ...] = LINEAR_TARGETS,
                 embedding_rank: int = 0) -> Extraction:
    """Write to ``out`` a rank-``rank`` LoRA adapter that turns ``base``'s weights into about
    ``tuned``'s; ``base_name`` is the base the adapter names (default: the ``base`` folder).
    ``embedding_rank`` > 0 adds a LoRA of that rank for the token embedding's change."""
    tuned_w, base_w = model_weights(tuned), model_weights(base)
    adapter: dict[str, torch.Tensor] = {}
    kept = total = 0.0
    dropped: dict[str, float] = {}
    embedding_kept = None
    for name, weight in sorted(tuned_w.items()):
        if name not in base_w:
            raise ValueError(f"{name} is not in the base model: not a fine-tune of it")
        change = weight.double() - base_w[name].double()  # float64: the SVD adds no error of its own
        module, _, kind = name.rpartition(".")
        leaf, key = module.rpartition(".")[2], f"base_model.model.{module}"
        if kind == "weight" and leaf == EMBEDDING and embedding_rank > 0:
            # peft's embedding LoRA adds (B @ A)^T with A: (r, vocab) and B: (hidden, r)
            left, right, part, whole = low_rank(change, embedding_rank)
            embedding_kept = part / whole if whole else 1.0
            adapter[f"{key}.lora_embedding_A"] = left.T.to(dtype).contiguous()
            adapter[f"{key}.lora_embedding_B"] = right.T.to(dtype).contiguous()
        elif kind == "weight" and leaf in targets:
            left, right, part, whole = low_rank(change, rank)
            kept, total = kept + part, total + whole
            adapter[f"{key}.lora_A.weight"] = right.to(dtype).contiguous()
            adapter[f"{key}.lora_B.weight"] = left.to(dtype).contiguous()
        elif change.abs().max() > 0:
            dropped[name] = float(change.norm())
    if embedding_rank > 0 and embedding_kept is None:
        raise ValueError(f"--embedding-rank: the tuned model has no {EMBEDDING} weight")
    extra = {}
    if embedding_kept is not None:
        tied = bool(json.loads(Path(tuned, "config.json").read_text()).get("tie_word_embeddings"))
        # the tied head's LoRA is the embedding's, transposed: it needs the same rank and scaling
        pattern = {name: embedding_rank for name in (EMBEDDING, *([OUTPUT_HEAD] if tied else []))}
        extra = {"rank_pattern": pattern, "alpha_pattern": pattern, "ensure_weight_tying": tied}
    out = Path(out)
    LoraConfig(r=rank, lora_alpha=rank, target_modules=[*targets, *([EMBEDDING] if extra else [])],
               task_type="CAUSAL_LM", base_model_name_or_path=base_name or str(base), **extra).save_pretrained(str(out))
    save_file(adapter, str(out / WEIGHTS))
    return Extraction(rank, kept / total if total else 1.0, dropped, (out / WEIGHTS).stat().st_size, embedding_kept)


def copy_tokenizer_changes(tuned: str | Path, base: str | Path, out: str | Path) -> list[str]:
    """Copy the tuned model's tokenizer files that differ from the base's into ``out``.

    The engine loads an adapter's own tokenizer when it has one, else its base's; an unchanged
    tokenizer is left out so the adapter stays small. Returns the names copied."""
    copied = []
    for f in sorted([*Path(tuned).glob("tokenizer*"), *Path(tuned).glob("chat_template.jinja")]):
        same = Path(base, f.name)
        if not (same.is_file() and same.read_bytes() == f.read_bytes()):
            shutil.copy2(f, out)
            copied.append(f.name)
    return copied


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffpo_sdk.train.extract", description=__doc__.split("\n\n")[0])
    parser.add_argument("tuned", help="the fully fine-tuned model folder (what the trainer writes without --lora-r)")
    parser.add_argument("out", help="where to write the adapter (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("--base", required=True, help="the model it was tuned from: a folder or a built-in name")
    parser.add_argument("--rank", type=int, default=32, help="LoRA rank (size grows with it; 32 on SmolLM2-135M: ~20 MB)")
    parser.add_argument("--embedding-rank", type=int, default=0,
                        help="LoRA rank for the token embedding's change (0: dropped; tied to the output head when the "
                             "model ties them; 1 on SmolLM2-135M: 0.1 MB)")
    args = parser.parse_args(argv)
    from ..engine.loading import resolve_model_path

    base_folder, _ = resolve_model_path(args.base)
    done = extract_lora(args.tuned, base_folder, args.out, args.rank, base_name=args.base,
                        embedding_rank=args.embedding_rank)
    copied = copy_tokenizer_changes(args.tuned, base_folder, args.out)
    parts = [f"rank {done.rank}: {100 * done.energy_kept:.1f} % of the linear layers' change kept"]
    if done.embedding_kept is not None:
        parts.append(f"rank {args.embedding_rank}: {100 * done.embedding_kept:.1f} % of the embedding's")
    parts.append(f"{done.size_bytes / 1e6:.1f} MB")
    parts.append(f"tokenizer files that differ from the base's: {', '.join(copied)}" if copied
                 else "the base's tokenizer, unchanged")
    print("; ".join(parts))
    if done.dropped:
        print("changes the adapter does not carry (dropped): "
              + ", ".join(f"{k} ({v:.3g})" for k, v in sorted(done.dropped.items(), key=lambda kv: -kv[1])[:5])
              + (f" and {len(done.dropped) - 5} more" if len(done.dropped) > 5 else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
