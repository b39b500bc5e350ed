"""Shared pieces of the server tests: a real uvicorn server on a free loopback port, engine wrappers.

No tests here; ``test_server*.py`` modules import what they need.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

PROMPTS = [
    "Name three primary colors.",
    "What is the capital of France?",
    "Give me a tip for sleeping better.",
    "Write a haiku about the sea.",
    "Explain what a CPU does in one sentence.",
    "How many legs does a spider have?",
    "Suggest a name for a pet goldfish.",
    "What is 12 times 12?",
]


def alpaca_items(rows: list[dict], n: int) -> list[dict[str, str]]:
    """Real prompts with a real model's answer as the draft (cut short: the tiny model is random)."""
    items = []
    for row in rows[:n]:
        items.append({"prompt": row["instruction"][:300], "draft": row["responses"][0]["output"][:200]})
    return items


@contextlib.contextmanager
def serve(app: Any) -> Iterator[str]:
    """Run ``app`` with uvicorn on 127.0.0.1 in a background thread; yield its base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


@pytest.fixture(scope="session")
def tiny_engine(tiny_llama_dir: str, tmp_path_factory: pytest.TempPathFactory):
    """The shared tiny Llama re-initialised with larger weights: at the default scale its greedy
    answer is newlines whatever the prompt, which would make output comparisons toothless."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    from diffpo_sdk.engine import RefinerEngine

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("sharp-tiny-llama")
    config = AutoConfig.from_pretrained(tiny_llama_dir)
    config.initializer_range = 0.3
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(out)
    return RefinerEngine.from_pretrained(str(out), device="cpu", dtype="float32", calibrate=False)


@pytest.fixture
def start_server():
    """``start_server(engine_or_loader, **config_fields) -> (base_url, app)``; stopped after the test."""
    from diffpo_sdk.server import ServerConfig, create_app

    stack = contextlib.ExitStack()

    def start(engine: Any, tracer_provider: Any = None, **fields: Any) -> tuple[str, Any]:
        app = create_app(engine, ServerConfig(**fields), tracer_provider=tracer_provider)
        return stack.enter_context(serve(app)), app

    with stack:
        yield start


class WrappedEngine:
    """Delegates to a real engine; subclasses change ``refine`` to script a situation."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.calls: list[list[str]] = []  # drafts of each refine() call

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def refine(self, items: list[Any], **kw: Any) -> Any:
        self.calls.append([i.draft for i in items])
        return self.engine.refine(items, **kw)


class GatedEngine(WrappedEngine):
    """Blocks every batch until ``gate`` is set, so a test controls what is queued and running."""

    def __init__(self, engine: Any) -> None:
        super().__init__(engine)
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.held: list[int] = []  # items of each refine() call, counted as it enters

    def enter(self, items: list[Any]) -> None:
        self.held.append(len(items))
        self.entered.set()

    def refine(self, items: list[Any], **kw: Any) -> Any:
        self.enter(items)
        if not self.gate.wait(30):
            raise RuntimeError("gate never opened")
        return super().refine(items, **kw)


class HoldAtFirstJoin(WrappedEngine):
    """Holds the engine thread the first time a running batch asks for more work."""

    def __init__(self, engine):
        super().__init__(engine)
        self.asking, self.gate = threading.Event(), threading.Event()

    def refine(self, items, more=None, **kw):
        def held(n):
            if not self.asking.is_set():
                self.asking.set()
                self.gate.wait(30)
            return more(n)

        return super().refine(items, more=None if more is None else held, **kw)


def metric_value(text: str, name: str, labels: str = "") -> float:
    """The sum of the samples ``name`` whose labels include ``labels`` (``'kind="x",...'``) in a
    Prometheus text exposition, parsed by prometheus_client (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    want = dict(re.findall(r'(\w+)="([^"]*)"', labels))
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == name and want.items() <= s.labels.items())


async def wait_queued(client: Any, n: int, gated: GatedEngine | None = None) -> None:
    """Wait until ``n`` requests are in the server: in its queue, plus those ``gated`` holds.

    Polls the server's own state (``/health`` queue depth), so a test never guesses with a
    fixed sleep how long queueing takes on a loaded machine.
    """
    got = -1
    for _ in range(1000):
        got = (await client.get("/health")).json()["queue_depth"] + (sum(gated.held) if gated else 0)
        if got >= n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{got} of {n} requests reached the server")
