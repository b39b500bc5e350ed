"""``diffpo bench stream``: time to the first refined token, streamed against not streamed.

Starts ``python -m diffpo_sdk.server`` in its own process (or uses ``--endpoint``), then sends
each prompt one at a time, alternating ``POST /v1/refine`` without and with ``"stream": true``
(so a machine's drift hits both alike), for two kinds of drafts:

- fixed-point drafts: the refiner's own answer to the prompt (what the draft becomes when it is
  already right): each block is verified in one pass, so text streams out block by block;
- real drafts: another model's answer (AlpacaEval when ``../shared`` data is found).

It reports, per kind, the median over prompts of first-token time / non-streamed total time,
and the sum of streamed total times / the sum of non-streamed ones; and checks that every
streamed answer equals the non-streamed one, byte for byte.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from ..protocol import parse_block_size
from .serve import add_server_arguments, load_items, served, write_result


def timed_plain(client: httpx.Client, body: dict[str, Any]) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = client.post("/v1/refine", json=body)
    r.raise_for_status()
    return time.perf_counter() - t0, r.json()["items"][0]["text"]


def timed_stream(client: httpx.Client, body: dict[str, Any]) -> tuple[float, float, str]:
    """(seconds to the first non-empty delta, seconds to ``done``, the streamed text)."""
    t0 = time.perf_counter()
    first, text, event = float("nan"), "", ""
    with client.stream("POST", "/v1/refine", json={**body, "stream": True}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "delta":
                piece = json.loads(line[6:])["text"]
                if piece and text == "":
                    first = time.perf_counter() - t0
                text += piece
            elif line.startswith("data: ") and event == "error":
                raise RuntimeError(f"the stream failed: {line[6:]}")
    return first, time.perf_counter() - t0, text


def measure(client: httpx.Client, items: list[dict[str, str]], options: dict[str, Any]) -> dict[str, Any]:
    rows = []
    for k, item in enumerate(items):
        body = {"items": [item], **options}
        if k % 2:  # alternate which goes first
            first, streamed_s, streamed = timed_stream(client, body)
            plain_s, plain = timed_plain(client, body)
        else:
            plain_s, plain = timed_plain(client, body)
            first, streamed_s, streamed = timed_stream(client, body)
        rows.append({"plain_s": round(plain_s, 4), "first_token_s": round(first, 4), "stream_total_s": round(streamed_s, 4),
                     "same_text": streamed == plain})
    plain_sum = sum(r["plain_s"] for r in rows)
    return {
        "prompts": len(rows),
        "first_token_over_plain_median": round(statistics.median(r["first_token_s"] / r["plain_s"] for r in rows), 3),
        "stream_total_over_plain": round(sum(r["stream_total_s"] for r in rows) / plain_sum, 3),
        "plain_s_median": round(statistics.median(r["plain_s"] for r in rows), 3),
        "first_token_s_median": round(statistics.median(r["first_token_s"] for r in rows), 3),
        "all_same_text": all(r["same_text"] for r in rows),
        "rows": rows,
    }


def bench(args: argparse.Namespace, url: str) -> dict[str, Any]:
    real, source = load_items(args.data, args.items, args.draft_chars)
    real = real[: args.items]
    options = {"max_new_tokens": args.max_new_tokens, "block_size": args.block_size}
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    with httpx.Client(base_url=url, headers=headers, timeout=900) as client:
        timed_plain(client, {"items": [real[0]], **options})  # warm-up: first-call costs out of the figures
        # the refiner's own answer as the draft: the fixed point it converges to
        fixed = [{"prompt": it["prompt"], "draft": timed_plain(client, {"items": [{**it, "draft": ""}], **options})[1]}
                 for it in real]
        print("  fixed-point drafts ...", flush=True)
        fixed_point = measure(client, fixed, options)
        print("  real drafts ...", flush=True)
        real_drafts = measure(client, real, options)
    return {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "model": args.model,
        "device": args.device,
        "data": source,
        "options": options,
        "fixed_point": fixed_point,
        "real": real_drafts,
    }


def print_table(result: dict[str, Any]) -> None:
    print(f"\nmodel {result['model']} on {result['device']}, {result['options']}, drafts from {result['data']}")
    print(f"{'drafts':<12} {'prompts':>7} {'plain p50 s':>11} {'1st tok p50 s':>13} {'1st tok / plain':>15} "
          f"{'stream / plain total':>20} {'same text':>9}")
    for name in ("fixed_point", "real"):
        r = result[name]
        print(f"{name:<12} {r['prompts']:>7} {r['plain_s_median']:>11.3f} {r['first_token_s_median']:>13.3f} "
              f"{r['first_token_over_plain_median']:>15.3f} {r['stream_total_over_plain']:>20.3f} {str(r['all_same_text']):>9}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffpo bench stream", description=__doc__.split("\n")[0])
    add_server_arguments(p)
    p.add_argument("--items", type=int, default=8, help="prompts, each measured streamed and not, per kind of draft")
    p.add_argument("--draft-chars", type=int, default=600)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--block-size", default=16, type=parse_block_size)
    p.add_argument("--max-batch-items", type=int, default=8)
    p.add_argument("--max-wait-ms", type=float, default=0.0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with served(args, "stream") as url:
        result = bench(args, url)
    print_table(result)
    write_result(result, args.out)
    return 0 if result["fixed_point"]["all_same_text"] and result["real"]["all_same_text"] else 1

if __name__ == "__main__":
    sys.exit(main())
