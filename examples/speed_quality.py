"""The speed–quality knobs: block size and iteration cap, measured and plotted.

For each setting the same refiner refines the same real drafts (other models' answers
from the shared AlpacaEval file, or the bundled ``drafts.jsonl``). Reported per setting:

- passes per token (forward passes / tokens decided; plain decoding is 1.0),
- seconds for the whole set,
- agreement: the share of answer tokens equal to the refiner's converged answer (its
  greedy decoding). Uncapped runs are exact (1.0) at every block size; an iteration cap
  trades exactness for fewer passes.

    python examples/speed_quality.py [--num-prompts 4] [--max-new-tokens 64] [--out speed_quality.png]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import time
from pathlib import Path

from diffpo_sdk.protocol import parse_block_size
from diffpo_sdk.shared_data import shared_file

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = Path(__file__).resolve().parent


def load_items(n: int) -> list[dict]:
    """Real drafts: another model's answer per prompt (shared data), else the bundled file."""
    shared = shared_file()  # ../shared/data beside the checkout, or $DIFFPO_SHARED_DATA
    if shared is not None:
        items = []
        with gzip.open(shared, "rt", encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                items.append({"prompt": row["instruction"], "draft": row["responses"][0]["output"]})
                if len(items) >= n:
                    return items
    with open(HERE / "drafts.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()][:n]


def agreement(a: list[int], b: list[int]) -> float:
    """Share of positions (over the longer answer) where the two answers hold the same token."""
    n = max(len(a), len(b), 1)
    return sum(x == y for x, y in zip(a, b)) / n


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--num-prompts", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--block-sizes", default="1,8,32,auto")
    p.add_argument("--caps", default="none,1,2,4", help="iteration caps per block; 'none' runs to convergence")
    p.add_argument("--out", default="speed_quality.png")
    args = p.parse_args()

    from diffpo_sdk.engine import RefinerEngine

    engine = RefinerEngine.from_pretrained("smollm2-135m-instruct", device="cpu", dtype="float32")
    items = load_items(args.num_prompts)
    n = args.max_new_tokens
    exact = [r.token_ids for r in engine.refine(items, block_size=1, max_new_tokens=n)]  # = greedy decoding

    rows = []
    blocks = [parse_block_size(b) for b in args.block_sizes.split(",")]
    caps = [None if c == "none" else int(c) for c in args.caps.split(",")]
    print(f"{'block':>5} {'cap':>4} {'passes/token':>12} {'seconds':>8} {'agreement':>9}")
    for block in blocks:
        for cap in caps:
            if block == 1 and cap is not None:
                continue  # a 1-token block always converges in one pass: a cap changes nothing
            t = time.perf_counter()
            out = engine.refine(items, block_size=block, max_new_tokens=n, max_iterations=cap)
            secs = time.perf_counter() - t
            ppt = sum(r.iterations for r in out) / max(sum(r.new_tokens for r in out), 1)
            agree = sum(agreement(r.token_ids, e) for r, e in zip(out, exact)) / len(out)
            rows.append({"block": block, "cap": cap, "passes_per_token": ppt, "seconds": secs, "agreement": agree})
            print(f"{block!s:>5} {cap!s:>4} {ppt:>12.3f} {secs:>8.2f} {agree:>9.3f}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for block in blocks:
        pts = [r for r in rows if r["block"] == block]
        ax.plot([r["passes_per_token"] for r in pts], [r["agreement"] for r in pts], "o-", label=f"block {block}")
        for r in pts:
            ax.annotate("no cap" if r["cap"] is None else f"cap {r['cap']}", (r["passes_per_token"], r["agreement"]),
                        fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("forward passes per token (lower is faster)")
    ax.set_ylabel("agreement with the converged answer")
    ax.set_title(f"{len(items)} real drafts, N={n}, SmolLM2-135M-Instruct refiner")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.json')}")


if __name__ == "__main__":
    main()
