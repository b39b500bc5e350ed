"""``diffpo refine``: refine a JSONL file of drafts with a local refiner, no server needed."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..builtin_refiners import BUILTIN_REFINER
from ..errors import DiffPOError
from ..protocol import RefineItem


def read_items(path: Path) -> list[RefineItem]:
    """One RefineItem per line; a bad line is an error naming the file and line."""
    items = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                items.append(RefineItem.model_validate_json(line))
            except ValueError as e:
                raise DiffPOError(f"{path}:{n}: not a valid item ({e.__class__.__name__}): {e}") from None
    return items


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="diffpo refine", description=__doc__)
    p.add_argument("--model", default=BUILTIN_REFINER, help=f"hub id, folder, .gguf file or built-in name (default {BUILTIN_REFINER})")
    p.add_argument("--adapter", default=None, help="PEFT LoRA adapter folder to put on the model")
    p.add_argument("--input", required=True, type=Path, help="JSONL: {messages|prompt, draft} per line")
    p.add_argument("--output", type=Path, default=None, help="JSONL to write (default: stdout)")
    p.add_argument("--block-size", default="auto", help="'auto' or an integer >= 1")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--max-iterations", type=int, default=None)
    p.add_argument("--keep-draft-prefix", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    args = p.parse_args(argv)
    block = args.block_size if args.block_size == "auto" else int(args.block_size)

    try:
        items = read_items(args.input)
        from tqdm.auto import tqdm

        from .engine import RefinerEngine

        engine = RefinerEngine.from_pretrained(args.model, device=args.device, dtype=args.dtype, adapter=args.adapter)
        engine.check_items(items, max_new_tokens=args.max_new_tokens, keep_draft_prefix=args.keep_draft_prefix)
        out = args.output.open("w", encoding="utf-8") if args.output else sys.stdout
        passes = tokens = 0
        with tqdm(total=len(items), desc="refining", unit="item", file=sys.stderr) as bar:
            for start in range(0, len(items), args.batch_size):
                batch = items[start : start + args.batch_size]
                results = engine.refine(
                    batch, block_size=block, max_new_tokens=args.max_new_tokens,
                    max_iterations=args.max_iterations, keep_draft_prefix=args.keep_draft_prefix,
                )
                for item, res in zip(batch, results):
                    record = item.model_dump(exclude_none=True) | {"refined": res.text} | res.to_wire().model_dump(
                        exclude={"text", "token_ids"}
                    )
                    out.write(json.dumps(record, ensure_ascii=False) + "\n")
                    passes, tokens = passes + res.iterations, tokens + res.new_tokens
                bar.update(len(batch))
        if args.output:
            out.close()
        print(f"refined {len(items)} items: {tokens} tokens in {passes} passes "
              f"({passes / max(tokens, 1):.3f} passes per token)", file=sys.stderr)
    except DiffPOError as e:
        print(f"diffpo refine: error: {e}", file=sys.stderr)
        return 1
    return 0
