"""What the routes share: the loaded engine, its batcher, settings, metrics and the errors they map."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from opentelemetry import trace
from starlette.requests import Request

from ..engine_protocol import RefinerEngineProtocol
from ..errors import InvalidRequestError
from ..protocol import RefineOptions
from .batcher import Batcher, OptionsKey
from .config import ServerConfig
from .metrics import Metrics

T = TypeVar("T")


class NotReadyError(Exception):
    """The model is still loading (or failed to load)."""


class ClientDisconnectedError(Exception):
    """The client closed the connection; its work was dropped."""


@dataclass
class ServerState:
    config: ServerConfig
    metrics: Metrics
    tracer: trace.Tracer
    engine: RefinerEngineProtocol | None = None
    batcher: Batcher | None = None
    load_error: str | None = None
    started: float = field(default_factory=time.time)

    def ready_batcher(self) -> Batcher:
        if self.batcher is None:
            if self.load_error:
                raise NotReadyError(f"the refiner failed to load: {self.load_error}")
            raise NotReadyError("the refiner model is still loading")
        return self.batcher

    def resolve_options(self, opts: RefineOptions) -> OptionsKey:
        """Apply the server's defaults to options the client left out, and its caps."""
        cfg = self.config
        given = opts.model_fields_set
        max_new = opts.max_new_tokens if "max_new_tokens" in given else cfg.default_max_new_tokens
        if max_new > cfg.max_new_tokens_limit:
            raise InvalidRequestError(
                f"max_new_tokens={max_new} exceeds this server's limit of {cfg.max_new_tokens_limit}"
            )
        block = opts.block_size if "block_size" in given else cfg.default_block_size
        if block != "auto":
            block = min(int(block), max_new)  # a block longer than the answer budget is the budget
        return (block, max_new, opts.max_iterations, opts.keep_draft_prefix)

    async def check_items(self, items: list[Any], key: OptionsKey) -> None:
        """Tokenize-only checks (roles, context length), off the event loop."""
        await asyncio.to_thread(self.engine.check_items, items, max_new_tokens=key[1], keep_draft_prefix=key[3])


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` but cancel it as soon as the client hangs up, so it stops costing compute."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()  # the batcher unqueues the job (or flags its rows) as the cancellation lands
        raise ClientDisconnectedError("the client closed the connection")
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


async def _wait_disconnect(request: Request) -> None:
    # The body has been read already, so the next ASGI message can only be the disconnect.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
