"""Scale out without a cluster manager: several refiner servers, one client list.

``DiffPORefiner(endpoint=[a, b, ...])`` (or ``DIFFPO_ENDPOINT=http://a:8000,http://b:8000``)
spreads calls over the servers and fails over when one is down. Run one ``diffpo serve``
per GPU (or put the Ray Serve deployment in ``integrations/ray_serve`` behind one URL).

This example starts two refiner servers on 127.0.0.1 in this process (sharing one
loaded model, to spare memory), refines a batch across both, stops one, and shows that
calls still succeed on the other.

    python examples/multi_endpoint.py [--max-new-tokens 48]
"""

from __future__ import annotations

import argparse
import re

import httpx

from diffpo_sdk import DiffPORefiner
from diffpo_sdk.testing import serve_engine
from diffpo_sdk.engine import RefinerEngine


def refine_requests(url: str) -> int:
    """How many /v1/refine requests this server answered (from its Prometheus metrics)."""
    text = httpx.get(url + "/metrics", timeout=5).text
    return int(sum(float(v) for v in re.findall(r'diffpo_requests_total\{[^}]*refine[^}]*\} ([\d.e+]+)', text)))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--max-new-tokens", type=int, default=48)
    args = p.parse_args()

    engine = RefinerEngine.from_pretrained("smollm2-135m-instruct", device="cpu", dtype="float32")
    servers = [serve_engine(engine), serve_engine(engine)]
    urls = [s.url for s in servers]
    refiner = DiffPORefiner(endpoint=urls, max_new_tokens=args.max_new_tokens, timeout=120)
    items = [{"prompt": "What is the capital of Australia?", "draft": "its sydney i think"},
             {"prompt": "How do I reverse a list in Python?", "draft": "use reverse"}]
    try:
        for item in items:  # one call each: calls alternate between the endpoints
            print("refined:", refiner.invoke(item)[:120].replace("\n", " "))
        print("requests per server:", {u: refine_requests(u) for u in urls})

        servers[0].stop()
        print(f"stopped {urls[0]}")
        out = refiner.invoke({"prompt": "Name a primary colour.", "draft": "red"})
        print("after failover, refined:", out[:120].replace("\n", " "))
        print("requests on the survivor:", refine_requests(urls[1]))
    finally:
        for s in servers:
            s.stop()


if __name__ == "__main__":
    main()
