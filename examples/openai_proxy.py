"""Any OpenAI SDK against the refining proxy: change ``base_url``, get refined answers.

``diffpo serve`` exposes ``POST /v1/chat/completions``: it forwards the request to the
upstream LLM through LiteLLM, refines the answer with the loaded refiner, and returns an
OpenAI chat completion with the refinement's stats in an extra ``diffpo`` field.

With ``--base-url`` this talks to a proxy you run; without it, it starts everything on
127.0.0.1 itself, offline: the local SmolLM2 as an OpenAI-compatible upstream
(``python -m diffpo_sdk.apps.local_llm``) and the refining proxy in front of it:

    python -m diffpo_sdk.apps.local_llm --port 8001 &
    OPENAI_API_KEY=unused diffpo serve --port 8000 \\
        --upstream-model openai/smollm2-135m-instruct --upstream-api-base http://127.0.0.1:8001/v1

    python examples/openai_proxy.py [--base-url http://127.0.0.1:8000/v1] [--max-new-tokens 96]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
from openai import OpenAI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Poll ``url`` until it answers 200 (the server loads its model in the background)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:4]} exited with {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout:.0f} s")


@contextlib.contextmanager
def local_stack() -> Iterator[str]:
    """The local LLM and the refining proxy as child processes; yields the proxy's /v1 URL."""
    env = {**os.environ, "OPENAI_API_KEY": "unused-local", "LITELLM_LOCAL_MODEL_COST_MAP": "True",
           "TOKENIZERS_PARALLELISM": "false"}
    llm_port, proxy_port = free_port(), free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "diffpo_sdk.apps.local_llm", "--port", str(llm_port)], env=env)]
    try:
        wait_ready(f"http://127.0.0.1:{llm_port}/v1/models", procs[0])
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "diffpo_sdk.server", "--port", str(proxy_port), "--device", "cpu",
             "--dtype", "float32", "--log-level", "warning",
             "--upstream-model", "openai/smollm2-135m-instruct",
             "--upstream-api-base", f"http://127.0.0.1:{llm_port}/v1"], env=env))
        wait_ready(f"http://127.0.0.1:{proxy_port}/health", procs[1])
        yield f"http://127.0.0.1:{proxy_port}/v1"
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            p.wait(timeout=30)


def ask(base_url: str, max_new_tokens: int) -> None:
    # the proxy holds the upstream key; this key is the proxy's own (--api-key), if it has one
    client = OpenAI(base_url=base_url, api_key=os.environ.get("DIFFPO_API_KEY", "unused"), max_retries=0)
    resp = client.chat.completions.create(
        model="openai/smollm2-135m-instruct",  # the upstream LiteLLM model id (or the server's default)
        messages=[{"role": "user", "content": "Explain what a hash table is in two sentences."}],
        temperature=0.7, max_tokens=max_new_tokens,
        extra_body={"diffpo": {"block_size": "auto", "max_new_tokens": max_new_tokens}},
    )
    print("refined:", resp.choices[0].message.content)
    print("diffpo:", (resp.model_extra or {}).get("diffpo"))
    print("usage (upstream):", resp.usage)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--base-url", default=None, help="a running refining proxy, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--max-new-tokens", type=int, default=96)
    args = p.parse_args()
    if args.base_url:
        ask(args.base_url, args.max_new_tokens)
        return
    with local_stack() as base_url:
        ask(base_url, args.max_new_tokens)


if __name__ == "__main__":
    main()
