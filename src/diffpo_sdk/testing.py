"""Test doubles: an engine with no model and a real server in a thread.

``EchoEngine`` satisfies :class:`~diffpo_sdk.engine_protocol.RefinerEngineProtocol` with
~0 compute, so the server, the clients and every integration run for real in tests and
in the SDK-overhead benchmark. ``ServerThread`` runs any ASGI app under uvicorn on
127.0.0.1. Importing this module needs neither torch nor a model; ``ServerThread`` and
``serve_engine`` need the ``server`` extra.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from .protocol import RefinedItem, RefineItem, coerce_items

__all__ = ["EchoEngine", "EchoResult", "EchoStreamEvent", "ServerThread", "free_port", "serve_engine"]


@dataclass
class EchoResult:
    """What :class:`EchoEngine` returns per item: the transformed draft, one pass."""

    text: str
    iterations: int
    new_tokens: int
    prompt_tokens: int = 0
    finish_reason: str = "stop"
    converged: bool = True

    def to_wire(self, with_token_ids: bool = False) -> RefinedItem:
        return RefinedItem(text=self.text, iterations=self.iterations, new_tokens=self.new_tokens, converged=self.converged,
                           prompt_tokens=self.prompt_tokens)


@dataclass
class EchoStreamEvent:
    """One item's verified text after a pass (the echo engine verifies it all in one pass)."""

    index: int
    token_ids: Sequence[int]
    text: str
    result: EchoResult | None = None  # the item's answer, on its last event


class EchoEngine:
    """Stands in for ``RefinerEngine`` with no model: the refined answer is ``transform(item)``.

    ``calls`` counts ``refine`` calls; ``delay_s`` makes each call take that long, and
    ``entered`` is set once a call has started (so tests wait on it, not on the clock).
    """

    tokenizer: Any = None

    def __init__(self, transform: Callable[[RefineItem], str] | None = None, *, delay_s: float = 0.0,
                 model_name: str = "echo") -> None:
        self.transform = transform or (lambda item: item.draft)
        self.delay_s = delay_s
        self.model_name = model_name
        self.calls = 0
        self.entered = threading.Event()
        self._lock = threading.Lock()

    def check_items(self, items: Sequence[RefineItem | dict[str, Any]], *, max_new_tokens: int = 256,
                    keep_draft_prefix: int = 0) -> list[RefineItem]:
        return coerce_items(list(items))

    def refine(self, items: Sequence[RefineItem | dict[str, Any]], **options: Any) -> list[EchoResult]:
        with self._lock:
            self.calls += 1
        self.entered.set()
        if self.delay_s:
            time.sleep(self.delay_s)  # stands in for compute
        out = []
        for item in coerce_items(list(items)):
            text = self.transform(item)
            words = sum(len(turn["content"].split()) for turn in item.conversation())
            out.append(EchoResult(text=text, iterations=1, new_tokens=max(1, len(text.split())), prompt_tokens=words))
        return out

    def refine_stream(self, items: Sequence[RefineItem | dict[str, Any]], **options: Any) -> Iterator[EchoStreamEvent]:
        for k, res in enumerate(self.refine(items, **options)):
            yield EchoStreamEvent(index=k, token_ids=[], text=res.text, result=res)


class ServerThread:
    """A uvicorn server on 127.0.0.1 in a daemon thread; ``url`` once started, ``stop()`` to end it."""

    def __init__(self, app: Any, port: int | None = None) -> None:
        import uvicorn

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False,
                                lifespan="on", timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name=f"uvicorn-{self.port}", daemon=True)

    def start(self, timeout: float = 30.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:  # uvicorn offers no event to wait on
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server on port {self.port} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def free_port() -> int:
    """A loopback port free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_engine(engine: Any, **config: Any) -> ServerThread:
    """The project's refiner server around ``engine``, started on a free loopback port."""
    from .server.app import create_app
    from .server.config import ServerConfig

    return ServerThread(create_app(engine, ServerConfig(**config))).start()
