"""``diffpo bench serve``: the refiner server's requests/s and latency under concurrent clients.

Starts ``python -m diffpo_sdk.server`` in its own process (or uses ``--endpoint``), then, in
one run against the same server, model and drafts: one client sending requests one by one,
then 8 and 32 concurrent clients, then a bounded soak of 64 clients. Every figure that
compares is a ratio to the one-by-one run measured minutes earlier on the same machine.
The soak must end with zero errors and the server's resident memory roughly flat.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from ..protocol import parse_block_size
from ..shared_data import ALPACA_PREFERENCES, shared_file
from ..testing import free_port

#: Used when the shared AlpacaEval drafts are not around (a checkout without ../shared).
FALLBACK_ITEMS = [
    {"prompt": "Name three primary colors.", "draft": "The three primary colors are red, blue and yellow."},
    {"prompt": "What is the capital of France?", "draft": "The capital of France is Paris."},
    {"prompt": "Give me one tip for sleeping better.", "draft": "Keep a regular schedule and avoid screens before bed."},
    {"prompt": "Write a haiku about the sea.", "draft": "Waves fold into foam / the tide keeps its old promise / salt on the cold wind"},
    {"prompt": "Explain what a CPU does in one sentence.", "draft": "A CPU executes the instructions of programs."},
    {"prompt": "How many legs does a spider have?", "draft": "A spider has eight legs."},
    {"prompt": "Suggest a name for a pet goldfish.", "draft": "You could call your goldfish Bubbles."},
    {"prompt": "What is 12 times 12?", "draft": "12 times 12 is 144."},
]


def load_items(path: str | None, n: int, draft_chars: int) -> tuple[list[dict[str, str]], str]:
    """Prompts with a real base model's answer as the draft: AlpacaEval if found, else a built-in set."""
    candidates = [Path(path)] if path else [shared_file(ALPACA_PREFERENCES)]
    for p in candidates:
        if p is not None and p.is_file():
            items = []
            opener = gzip.open if p.suffix == ".gz" else open
            with opener(p, "rt", encoding="utf-8") as f:
                for line in f:
                    row = json.loads(line)
                    if "instruction" in row:
                        resp = min(row["responses"], key=lambda r: len(r["output"]))  # short answers
                        items.append({"prompt": row["instruction"][:600], "draft": resp["output"][:draft_chars]})
                    else:
                        items.append({"prompt": row["prompt"], "draft": row["draft"][:draft_chars]})
                    if len(items) >= n:
                        break
            return items, str(p.resolve())
    return FALLBACK_ITEMS, "built-in"


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


async def run_level(
    client: httpx.AsyncClient, items: list[dict], options: dict, clients: int, *, requests: int | None = None,
    seconds: float | None = None,
) -> dict[str, Any]:
    """``clients`` loops, each sending one-item requests back to back, until ``requests`` are
    sent in all or ``seconds`` have passed."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    tokens = 0
    counter = iter(range(10**9))
    t_end = None if seconds is None else time.perf_counter() + seconds

    async def one_client() -> None:
        nonlocal tokens
        while True:
            n = next(counter)
            if (requests is not None and n >= requests) or (t_end is not None and time.perf_counter() >= t_end):
                return
            body = {"items": [items[n % len(items)]], **options}
            t0 = time.perf_counter()
            try:
                r = await client.post("/v1/refine", json=body)
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t0)
                    tokens += r.json()["items"][0]["new_tokens"]
                else:
                    errors[str(r.status_code)] = errors.get(str(r.status_code), 0) + 1
            except httpx.HTTPError as e:
                errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1

    t0 = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(clients)))
    wall = time.perf_counter() - t0
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": errors,
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(latencies) / wall, 3),
        "tokens_per_s": round(tokens / wall, 2),
        "p50_s": round(percentile(latencies, 50), 3),
        "p99_s": round(percentile(latencies, 99), 3),
    }


async def server_metric(client: httpx.AsyncClient, name: str) -> float | None:
    text = (await client.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.split()[-1])
    return None


def start_server(args: argparse.Namespace, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [
        sys.executable, "-m", "diffpo_sdk.server", "--model", args.model, "--device", args.device,
        "--port", str(port), "--max-batch-items", str(args.max_batch_items), "--max-wait-ms", str(args.max_wait_ms),
        "--max-queue", "1024", "--request-timeout", str(args.request_timeout), "--log-level", "warning",
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    with open(log_path, "wb") as log:  # the child keeps its own handle
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.load_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError(f"the server was not ready after {args.load_timeout} s:\n{log_path.read_text()[-3000:]}")


async def bench(args: argparse.Namespace, url: str) -> dict[str, Any]:
    items, source = load_items(args.data, args.items, args.draft_chars)
    options = {"max_new_tokens": args.max_new_tokens, "block_size": args.block_size}
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600, limits=limits) as client:
        await run_level(client, items, options, 1, requests=2)  # warm-up: first-call costs out of the figures
        levels = []
        for clients in args.concurrency:
            requests = max(args.requests, clients * args.rounds)
            level = await run_level(client, items, options, clients, requests=requests)
            levels.append(level)
            print(f"  {clients:>3} clients: {level['requests_per_s']:.2f} req/s, p50 {level['p50_s']:.2f} s", flush=True)
        base = levels[0]["requests_per_s"] or float("nan")
        for level in levels:
            level["speedup_vs_one_by_one"] = round(level["requests_per_s"] / base, 2)
        soak: dict[str, Any] = {}
        if args.soak_seconds > 0:
            # RSS every few seconds, not just before and after: "flat" is a trend, and a first
            # big batch allocates once what every later one reuses
            samples: list[float] = []

            async def sample_rss() -> None:
                samples.append(round((await server_metric(client, "process_resident_memory_bytes") or 0) / 2**20, 1))

            async def sample_every(seconds: float) -> None:
                while True:
                    await sample_rss()
                    await asyncio.sleep(seconds)

            sampler = asyncio.create_task(sample_every(args.soak_seconds / 6))
            soak = await run_level(client, items, options, args.soak_clients, seconds=args.soak_seconds)
            sampler.cancel()
            await sample_rss()
            soak.update(rss_before_mb=samples[0], rss_after_mb=samples[-1], rss_samples_mb=samples)
        queue_after = await server_metric(client, "diffpo_num_requests_waiting")
    return {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "model": args.model,
        "device": args.device,
        "data": source,
        "options": options,
        "server": {"max_batch_items": args.max_batch_items, "max_wait_ms": args.max_wait_ms, "threads": args.threads},
        "levels": levels,
        "soak": soak,
        "queue_depth_after": queue_after,
    }


def print_table(result: dict[str, Any]) -> None:
    print(f"\nmodel {result['model']} on {result['device']}, {result['machine']['cpus']} CPUs, "
          f"options {result['options']}")
    print(f"{'clients':>8} {'requests':>9} {'req/s':>8} {'tok/s':>8} {'p50 s':>7} {'p99 s':>7} {'speed-up':>9} errors")
    for lv in result["levels"]:
        print(f"{lv['clients']:>8} {lv['requests']:>9} {lv['requests_per_s']:>8.2f} {lv['tokens_per_s']:>8.1f} "
              f"{lv['p50_s']:>7.2f} {lv['p99_s']:>7.2f} {lv['speedup_vs_one_by_one']:>8.2f}x {lv['errors'] or 0}")
    if s := result["soak"]:
        print(f"soak: {s['clients']} clients for {s['wall_s']:.0f} s: {s['requests']} requests, "
              f"{s['requests_per_s']:.2f} req/s, p99 {s['p99_s']:.2f} s, errors {s['errors'] or 0}, "
              f"RSS {' -> '.join(str(x) for x in s['rss_samples_mb'])} MiB")


def add_server_arguments(p: argparse.ArgumentParser) -> None:
    """The options of every benchmark that runs against a server: which one, or which to start."""
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--device", default="auto")
    p.add_argument("--endpoint", default=None, help="bench a running server instead of starting one")
    p.add_argument("--api-key", default=os.environ.get("DIFFPO_API_KEY"))
    p.add_argument("--data", default=None, help="AlpacaEval .jsonl.gz or JSONL of {prompt, draft}; default: ../shared data")
    p.add_argument("--threads", type=int, default=None, help="the server's torch CPU threads")
    p.add_argument("--request-timeout", type=float, default=900.0,
                   help="the server's per-request deadline: many clients on a CPU wait minutes in the queue")
    p.add_argument("--load-timeout", type=float, default=300.0)
    p.add_argument("--out", default=None, help="write the results as JSON here")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffpo bench serve", description=__doc__.split("\n\n")[0])
    add_server_arguments(p)
    p.add_argument("--items", type=int, default=64, help="distinct prompts to cycle through")
    p.add_argument("--draft-chars", type=int, default=300)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--block-size", default="auto", type=parse_block_size)
    p.add_argument("--concurrency", default="1,8,32", type=lambda v: [int(x) for x in v.split(",")],
                   help="client counts; the first is the baseline (1 = one by one)")
    p.add_argument("--requests", type=int, default=8, help="requests per level at least")
    p.add_argument("--rounds", type=int, default=2, help="requests per client per level at least")
    p.add_argument("--soak-clients", type=int, default=64)
    p.add_argument("--soak-seconds", type=float, default=20.0, help="0 skips the soak")
    p.add_argument("--max-batch-items", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    return p


@contextlib.contextmanager
def served(args: argparse.Namespace, name: str) -> Iterator[str]:
    """The URL of ``--endpoint``, or of a server started for this benchmark and stopped after it."""
    if args.endpoint:
        yield args.endpoint.rstrip("/")
        return
    log_path = Path(tempfile.mkdtemp(prefix=f"diffpo-bench-{name}-")) / "server.log"
    print(f"starting the server ({args.model}); its log: {log_path}", flush=True)
    proc, url = start_server(args, log_path)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def write_result(result: dict[str, Any], out: str | None) -> None:
    """The result as JSON at ``--out``, if given."""
    if out:
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with served(args, "serve") as url:
        result = asyncio.run(bench(args, url))
    print_table(result)
    write_result(result, args.out)
    errors = sum(sum(lv["errors"].values()) for lv in result["levels"]) + sum((result["soak"] or {}).get("errors", {}).values())
    return 1 if errors else 0

if __name__ == "__main__":
    sys.exit(main())
