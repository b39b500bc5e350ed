"""``diffpo demo``: the whole path, for real and offline, in a few minutes on a laptop CPU.

1. A base LLM writes drafts through a LiteLLM call. By default that LLM is local:
   SmolLM2-135M-Instruct sampled at temperature 0.7 behind a LiteLLM custom provider
   (:mod:`diffpo_sdk.apps.local_llm`), so no key or network is needed; ``--drafter`` takes any
   LiteLLM model id instead (``gpt-4o-mini`` with ``OPENAI_API_KEY`` set, ...).
2. ``DiffPORefiner`` (in-process backend) refines each draft with the refiner.
3. The same refiner's plain greedy decoding (``model.generate``, one pass per token) answers
   the same prompt, as the baseline: the refined answer must equal it when run to
   convergence, and the time and passes are compared against it.

Nothing is canned: prompts come from the shared AlpacaEval file (or the bundled
``drafts.jsonl`` prompts when it is absent) and every answer is generated on the spot.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..builtin_refiners import BUILTIN_REFINER
from ..protocol import parse_block_size
from ..shared_data import ALPACA_PREFERENCES, BUNDLED_DRAFTS, shared_file

LOCAL_DRAFTER = "local/smollm2-135m-instruct"


@dataclass
class Row:
    """Everything shown for one prompt."""

    prompt: str
    draft: str
    draft_s: float
    refined: str
    passes: int
    new_tokens: int
    converged: bool
    refine_s: float
    greedy: str
    greedy_passes: int
    greedy_s: float

    @property
    def tokens_per_pass(self) -> float:
        return self.new_tokens / max(self.passes, 1)

    @property
    def speedup(self) -> float:
        return self.greedy_s / max(self.refine_s, 1e-9)


# -- prompts --------------------------------------------------------------------------------


def shared_alpaca_file() -> Path | None:
    """The shared AlpacaEval file (see :mod:`diffpo_sdk.shared_data`), or ``None``."""
    return shared_file(ALPACA_PREFERENCES)


def load_prompts(n: int) -> tuple[list[str], str]:
    """``n`` short real user prompts and where they came from (first ones, so runs repeat)."""
    path = shared_alpaca_file()
    prompts: list[str] = []
    if path is not None:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                text = json.loads(line)["instruction"].strip()
                if len(text) < 90 and "\n" not in text:  # short prompts keep the side-by-side readable
                    prompts.append(text)
                if len(prompts) >= n:
                    return prompts, str(path)
    with open(BUNDLED_DRAFTS, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    prompts = [r["prompt"] for r in rows if isinstance(r.get("prompt"), str)]  # one-turn items only
    return prompts[:n], str(BUNDLED_DRAFTS)


# -- output ---------------------------------------------------------------------------------


def side_by_side(left: str, right: str, width: int, titles: tuple[str, str]) -> str:
    """Two texts in two columns, each wrapped to half the width, paragraphs kept."""
    col = (width - 3) // 2

    def wrap(text: str) -> list[str]:
        lines: list[str] = []
        for para in text.splitlines() or [""]:
            lines += textwrap.wrap(para, col, replace_whitespace=False) or [""]
        return lines

    a, b = wrap(left), wrap(right)
    out = [f"{titles[0][:col]:<{col}} | {titles[1][:col]}", f"{'-' * col}-+-{'-' * col}"]
    for i in range(max(len(a), len(b))):
        out.append(f"{a[i] if i < len(a) else '':<{col}} | {b[i] if i < len(b) else ''}".rstrip())
    return "\n".join(out)


def summary_table(rows: list[Row]) -> str:
    head = f"{'#':>2}  {'passes':>6}  {'tokens':>6}  {'tok/pass':>8}  {'refine s':>8}  {'greedy s':>8}  {'speed':>6}  same as greedy"
    lines = [head, "-" * len(head)]
    for i, r in enumerate(rows, 1):
        same = "yes" if r.refined == r.greedy else ("no (capped)" if not r.converged else "no")
        lines.append(f"{i:>2}  {r.passes:>6}  {r.new_tokens:>6}  {r.tokens_per_pass:>8.2f}  {r.refine_s:>8.2f}  "
                     f"{r.greedy_s:>8.2f}  {r.speedup:>5.2f}x  {same}")
    passes, tokens = sum(r.passes for r in rows), sum(r.new_tokens for r in rows)
    rs, gs = sum(r.refine_s for r in rows), sum(r.greedy_s for r in rows)
    lines.append("-" * len(head))
    lines.append(f"{'all':>3} {passes:>6}  {tokens:>6}  {tokens / max(passes, 1):>8.2f}  {rs:>8.2f}  {gs:>8.2f}  "
                 f"{gs / max(rs, 1e-9):>5.2f}x")
    return "\n".join(lines)


def _status(msg: str) -> None:
    print(f"... {msg}", file=sys.stderr, flush=True)


# -- the run --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffpo demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--num-prompts", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=96, help="answer budget N for drafts and refinement")
    p.add_argument("--drafter", default=LOCAL_DRAFTER,
                   help=f"LiteLLM model id of the base LLM (default {LOCAL_DRAFTER}: local, offline)")
    p.add_argument("--temperature", type=float, default=0.7, help="the drafter's sampling temperature")
    p.add_argument("--seed", type=int, default=0, help="seed of the local drafter's sampling")
    p.add_argument("--model", default=BUILTIN_REFINER, help=f"the refiner (built-in name, folder, hub id; default {BUILTIN_REFINER})")
    p.add_argument("--adapter", default=None, help="PEFT LoRA adapter for the refiner (e.g. from diffpo train)")
    p.add_argument("--block-size", default="auto", help="'auto' (adaptive) or an integer")
    p.add_argument("--max-iterations", type=int, default=None, help="cap on passes per block (speed over exactness)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (default: torch's choice; 1 is faster on a machine busy with other work)")
    p.add_argument("--width", type=int, default=0, help="output width (default: the terminal's, at most 140)")
    return p


def run(args: argparse.Namespace) -> list[Row]:
    """Draft, refine and compare; prints as it goes and returns the rows."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no cost-map fetch at import
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    width = args.width or min(140, max(80, shutil.get_terminal_size((100, 24)).columns))
    block_size = parse_block_size(args.block_size)

    prompts, source = load_prompts(args.num_prompts)
    print(f"diffpo demo: {len(prompts)} prompts from {source}")
    print(f"  drafts:  {args.drafter} via LiteLLM, temperature {args.temperature}, max {args.max_new_tokens} tokens")
    print(f"  refiner: {args.model} ({args.device}, {args.dtype}), block size {block_size}, "
          f"iteration cap {args.max_iterations}, through DiffPORefiner (in-process)")
    print("  baseline: the refiner's plain greedy decoding (transformers generate, KV cache, 1 pass per token)\n")

    t0 = time.perf_counter()
    _status("loading the refiner")
    from langchain_core.messages import AIMessage
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    from ..client import InProcessClient
    from ..adapters.runnable import DiffPORefiner
    from ..settings import DiffPOSettings

    settings = DiffPOSettings(model=args.model, adapter=args.adapter, device=args.device, dtype=args.dtype,
                              backend="in_process", fail_open=False)
    engine = InProcessClient(settings=settings).engine  # the very engine DiffPORefiner's backend uses
    refiner = DiffPORefiner(settings=settings, block_size=block_size, max_new_tokens=args.max_new_tokens,
                            max_iterations=args.max_iterations)

    _status("loading LiteLLM and the drafter")
    import litellm

    if args.drafter.startswith("local/"):
        from .local_llm import register

        register("local", device=args.device, dtype=args.dtype)
    load_s = time.perf_counter() - t0

    conversations = [[{"role": "user", "content": p}] for p in prompts]
    drafts: list[tuple[str, float]] = []
    for i, conv in enumerate(conversations):
        _status(f"drafting {i + 1}/{len(prompts)} with {args.drafter}")
        t = time.perf_counter()
        extra: dict[str, Any] = {"seed": args.seed + i} if args.drafter.startswith("local/") else {}
        resp = litellm.completion(model=args.drafter, messages=conv, temperature=args.temperature,
                                  max_tokens=args.max_new_tokens, **extra)
        drafts.append((resp.choices[0].message.content or "", time.perf_counter() - t))

    engine.generate({"prompt": "Hi", "draft": ""}, max_new_tokens=4)  # warm-up, so neither side pays it

    rows: list[Row] = []
    for i, (conv, (draft, draft_s)) in enumerate(zip(conversations, drafts)):
        _status(f"refining {i + 1}/{len(prompts)}, then greedy decoding for comparison")
        t = time.perf_counter()
        out = refiner.invoke({"messages": conv, "draft": AIMessage(content=draft)})
        refine_s = time.perf_counter() - t
        info = out.response_metadata["diffpo"]
        greedy = engine.generate({"messages": conv, "draft": ""}, max_new_tokens=args.max_new_tokens)
        row = Row(prompt=conv[-1]["content"], draft=draft, draft_s=draft_s, refined=str(out.content),
                  passes=info["iterations"], new_tokens=info["new_tokens"], converged=info["converged"],
                  refine_s=refine_s, greedy=greedy.text, greedy_passes=greedy.iterations,
                  greedy_s=greedy.timing["batch_s"])
        rows.append(row)
        print(f"[{i + 1}/{len(prompts)}] {row.prompt}")
        print(side_by_side(row.draft, row.refined, width,
                           (f"draft ({args.drafter}, {draft_s:.1f} s)", "refined by DiffPO")))
        same = "yes" if row.refined == row.greedy else "no"
        print(f"  refiner: {row.passes} passes for {row.new_tokens} tokens ({row.tokens_per_pass:.2f} tokens/pass), "
              f"{row.refine_s:.2f} s | greedy: {row.greedy_passes} passes, {row.greedy_s:.2f} s | "
              f"{row.speedup:.2f}x | same answer as greedy: {same}\n")

    print(summary_table(rows))
    # The other end of the range: the refiner's own greedy answers as drafts. They go in as
    # text, like every draft, and re-tokenizing decoded text does not always give the same
    # tokens back, so a draft can fall out of step part-way; the line reports what happened.
    _status("refining the refiner's own answers, for contrast")
    t = time.perf_counter()
    ideal = engine.refine([{"messages": c, "draft": r.greedy} for c, r in zip(conversations, rows)],
                          block_size=block_size, max_new_tokens=args.max_new_tokens,
                          max_iterations=args.max_iterations)
    ideal_s = time.perf_counter() - t
    ip, it = sum(r.iterations for r in ideal), sum(r.new_tokens for r in ideal)
    gs = sum(r.greedy_s for r in rows)
    print(f"\nFor contrast, the refiner's own greedy answers (as text) as drafts, all {len(rows)} in one "
          f"batch: {ip} passes for {it} tokens ({it / max(ip, 1):.2f} tokens/pass), {ideal_s:.2f} s against "
          f"{gs:.2f} s of greedy decoding one by one ({gs / max(ideal_s, 1e-9):.1f}x).")
    print("Drafts from another model (here: sampled) mostly disagree with a refiner that was not trained long on\n"
          "such drafts (the built-in: briefly, on CPU), so it falls back to about one token per pass;\n"
          "training on such drafts (diffpo train) is how a refiner learns to accept more per pass.")
    print(f"\nTotal {time.perf_counter() - t0:.0f} s (loading {load_s:.0f} s) on {_device_line(args.device)}.")
    return rows


def _device_line(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(0)
    return f"{os.cpu_count()} CPU cores (torch threads: {_threads()})"


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.num_prompts < 1 or args.max_new_tokens < 1:
        print("diffpo demo: --num-prompts and --max-new-tokens must be at least 1", file=sys.stderr)
        return 2
    try:
        run(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # a first-run tool: say what failed and where to look, not a bare traceback
        print(f"\ndiffpo demo failed: {type(e).__name__}: {e}\nSee docs/troubleshooting.md.", file=sys.stderr)
        if os.environ.get("DIFFPO_DEBUG"):
            raise
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
