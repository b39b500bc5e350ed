"""``diffpo bench client``: the SDK's own overhead per call, with the model's time taken out.

A real refiner server (the project's FastAPI app under uvicorn, on 127.0.0.1) serves an
``EchoEngine`` whose compute is ~0; the server's own handler time (``timing.total_ms``)
is subtracted too, so what remains is what the SDK adds: the Runnable, the client,
JSON both ways, and the loopback HTTP round trip. Layers are measured side by side in
one run, each against the raw-httpx floor.

    diffpo bench client [--calls 500] [--out client.json] [--endpoint URL]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from ..testing import EchoEngine, free_port

# -- the benchmark -------------------------------------------------------------------------


def _stats(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {
        "p50_ms": round(statistics.median(xs), 4),
        "p95_ms": round(xs[int(0.95 * (len(xs) - 1))], 4),
        "mean_ms": round(statistics.fmean(xs), 4),
    }


def _measure(layers: dict[str, Callable[[], float | None]], calls: int, warmup: int) -> dict[str, Any]:
    """Wall time per call and, where a call reports it, the server's handler time.

    Layers take turns call by call, in a shuffled order each round, so load from elsewhere
    on the machine (and the server's after-work) hits all alike.
    """
    import random

    rng = random.Random(0)
    order = list(layers)
    for _ in range(warmup):
        for call in layers.values():
            call()
    wall: dict[str, list[float]] = {name: [] for name in layers}
    cpu: dict[str, list[float]] = {name: [] for name in layers}
    server: dict[str, list[float]] = {name: [] for name in layers}
    for _ in range(calls):
        rng.shuffle(order)
        for name in order:
            call = layers[name]
            c0, t0 = time.thread_time(), time.perf_counter()
            server_ms = call()
            wall[name].append((time.perf_counter() - t0) * 1000)
            cpu[name].append((time.thread_time() - c0) * 1000)
            server[name].append(server_ms or 0.0)
    out = {}
    for name in layers:
        overhead = [w - s for w, s in zip(wall[name], server[name])]
        out[name] = {"wall": _stats(wall[name]), "server": _stats(server[name]), "overhead": _stats(overhead),
                     "client_cpu": _stats(cpu[name]), "calls": calls}
    return out


def run(calls: int = 500, warmup: int = 50, endpoint: str | None = None) -> dict[str, Any]:
    import httpx
    from langchain_core.messages import AIMessage

    from ..client import DiffPOClient, InProcessClient, use_shared_client
    from ..adapters.runnable import DiffPORefiner
    from ..settings import DiffPOSettings

    server = None
    if endpoint is None:  # its own process: a server thread here would contend for our GIL
        server, endpoint = _spawn_echo_server()
    item = {"messages": [{"role": "user", "content": "Name three primary colours."}],
            "draft": "Red, yellow and blue are the three traditional primary colours."}
    body = json.dumps({"items": [item], "block_size": 32, "max_new_tokens": 64}).encode()
    results: dict[str, Any] = {}
    try:
        raw = httpx.Client(trust_env=False)
        url = endpoint + "/v1/refine"

        def raw_post() -> float:
            r = raw.post(url, content=body, headers={"content-type": "application/json"})
            return float(r.json()["timing"]["total_ms"])

        client = DiffPOClient(endpoint, retries=0)

        def client_refine() -> float:
            return float(client.refine([item], block_size=32, max_new_tokens=64).timing["total_ms"])

        refiner = DiffPORefiner(endpoint=endpoint, block_size=32, max_new_tokens=64)
        draft = AIMessage(content=item["draft"])
        explicit = {"messages": item["messages"], "draft": draft}

        def runnable_invoke() -> float:
            return float(refiner.invoke(explicit).response_metadata["diffpo"]["server_ms"])

        local = DiffPORefiner(settings=DiffPOSettings(backend="in_process"), block_size=32, max_new_tokens=64)
        use_shared_client(local.resolved_settings, InProcessClient(settings=local.resolved_settings, engine=EchoEngine()))

        def runnable_in_process() -> None:
            local.invoke(explicit)

        layers = {
            FLOOR: raw_post,
            "DiffPOClient.refine": client_refine,
            "DiffPORefiner.invoke over HTTP": runnable_invoke,
            "DiffPORefiner.invoke in-process (echo engine)": runnable_in_process,
        }
        results = _measure(layers, calls, warmup)
        raw.close()
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=10)
    return {
        "machine": {"python": sys.version.split()[0], "platform": platform.platform(), "processor": platform.processor()
                    or platform.machine(), "cpus": _cpus()},
        "endpoint": "echo engine in the project's server, own process (uvicorn, 127.0.0.1)"
        if server is not None else endpoint,
        "calls": calls,
        "layers": results,
    }


def _spawn_echo_server() -> tuple[Any, str]:
    import subprocess

    import httpx

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "diffpo_sdk.bench.client", "--serve-echo", str(port)])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the echo server did not start")


def _serve_echo(port: int) -> None:
    import uvicorn

    from ..server.app import create_app
    from ..server.config import ServerConfig

    uvicorn.run(create_app(EchoEngine(), ServerConfig(max_wait_ms=0.0)), host="127.0.0.1", port=port,
                log_level="warning", access_log=False)


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 0)


FLOOR = "httpx POST (transport floor)"


def table(report: dict[str, Any]) -> str:
    layers = report["layers"]
    floor = layers[FLOOR]["wall"]["p50_ms"] if FLOOR in layers else None
    head = ("layer", "wall p50", "wall p95", "server p50", "overhead p50", "overhead p95", "above floor p50",
            "client CPU p50")
    rows = [head]
    for name, r in layers.items():
        http = floor is not None and "in-process" not in name
        above = f"{r['wall']['p50_ms'] - floor:+.3f}" if http else "-"
        rows.append((name, f"{r['wall']['p50_ms']:.3f}", f"{r['wall']['p95_ms']:.3f}", f"{r['server']['p50_ms']:.3f}",
                     f"{r['overhead']['p50_ms']:.3f}", f"{r['overhead']['p95_ms']:.3f}", above,
                     f"{r['client_cpu']['p50_ms']:.3f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + (
        "\n(ms; overhead = wall - server handler time, per call; above floor = wall p50 minus the raw httpx POST's,"
        "\n i.e. what the SDK's code adds on top of one loopback HTTP round trip; client CPU = this thread's CPU"
        "\n time per call, which waiting for the server or for a busy machine's scheduler does not inflate)"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="diffpo bench client", description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=500)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--endpoint", default=None, help="measure against this server instead of a local echo server")
    p.add_argument("--out", default=None, help="write the report as JSON here")
    p.add_argument("--serve-echo", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_echo is not None:
        _serve_echo(args.serve_echo)
        return 0
    report = run(calls=args.calls, warmup=args.warmup, endpoint=args.endpoint)
    print(f"machine: {report['machine']}")
    print(table(report))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
