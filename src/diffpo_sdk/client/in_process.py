"""The refiner engine in this process, behind the same clients as a server.

The engine (torch, transformers) is imported and loaded on first use, once per (model,
device, dtype, adapter) in the process. ``InProcessClient`` / ``AsyncInProcessClient``
are the clients with this transport built; the async one runs the engine in a worker
thread.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator

from opentelemetry.trace import Span

from ..engine_protocol import RefinerEngineProtocol
from ..errors import DiffPOError, RefinerUnavailableError
from ..protocol import RefineItem, RefineOptions, RefineResponse, StreamDelta, StreamItem
from ..settings import DiffPOSettings
from .core import AsyncRefinerClient, RefinerClient, StreamEvent

__all__ = ["AsyncEngineTransport", "AsyncInProcessClient", "EngineTransport", "InProcessClient"]

_ENGINES: dict[tuple[str, str, str, str | None], RefinerEngineProtocol] = {}
_ENGINES_LOCK = threading.Lock()


def _load_engine(settings: DiffPOSettings) -> RefinerEngineProtocol:
    """One engine per (model, device, dtype, adapter) in this process, loaded on first use."""
    key = (settings.model, settings.device, settings.dtype, settings.adapter)
    with _ENGINES_LOCK:
        if key not in _ENGINES:
            try:
                from ..engine import RefinerEngine
            except ImportError as e:
                raise RefinerUnavailableError(
                    "no refiner endpoint is configured and the in-process engine is not installed: "
                    "set DIFFPO_ENDPOINT, or pip install 'diffpo-sdk[engine]'"
                ) from e
            _ENGINES[key] = RefinerEngine.from_pretrained(
                settings.model, device=settings.device, dtype=settings.dtype, adapter=settings.adapter
            )
        return _ENGINES[key]


class EngineTransport:
    """The refiner engine in this process, loaded on first use (or the one passed in).

    The engine cannot be interrupted and its first call loads the model (minutes on a busy
    CPU), so the call's deadline, which bounds waiting on a server, does not apply here.
    """

    backend = "in_process"
    max_items: int | None = None

    def __init__(self, settings: DiffPOSettings, engine: RefinerEngineProtocol | None = None) -> None:
        self.settings = settings
        self._engine = engine
        self.model: str | None = getattr(engine, "model_name", None) or settings.model

    @property
    def engine(self) -> RefinerEngineProtocol:
        if self._engine is None:
            self._engine = _load_engine(self.settings)
        return self._engine

    def send(self, items: list[RefineItem], opts: RefineOptions, deadline: float, span: Span) -> RefineResponse:
        engine = self.engine
        started = time.perf_counter()
        try:
            results = engine.refine(items, **opts.model_dump())
        except DiffPOError:
            raise
        except Exception as e:  # a crash in the engine (out of memory, ...) is an outage, not bad input
            raise RefinerUnavailableError(f"in-process refiner failed: {type(e).__name__}: {e}") from e
        total_ms = (time.perf_counter() - started) * 1000
        return RefineResponse(items=[r.to_wire() for r in results], model=engine.model_name,
                              timing={"total_ms": round(total_ms, 3)})

    def stream(self, items: list[RefineItem], opts: RefineOptions, deadline: float,
               span: Span) -> Iterator[StreamEvent]:
        """``engine.refine_stream`` as wire events; closing this stream cancels the engine's rows."""
        engine = self.engine  # like send: not bound by the call's deadline (see the class docstring)
        deltas = engine.refine_stream(items, **opts.model_dump())
        try:
            for d in deltas:
                if d.token_ids or d.text:
                    yield StreamDelta(index=d.index, text=d.text, token_ids=list(d.token_ids))
                result = getattr(d, "result", None)
                if result is not None:
                    yield StreamItem(index=d.index, item=result.to_wire(), model=engine.model_name)
        except DiffPOError:
            raise
        except Exception as e:  # a crash in the engine is an outage, not bad input
            raise RefinerUnavailableError(f"in-process refiner failed: {type(e).__name__}: {e}") from e
        finally:
            deltas.close()  # type: ignore[attr-defined]

    def close(self) -> None:
        """Nothing to release: the engine stays loaded for the process."""


class AsyncEngineTransport:
    """:class:`EngineTransport` for asyncio: the engine runs in a worker thread."""

    backend = "in_process"
    max_items: int | None = None

    def __init__(self, settings: DiffPOSettings, engine: RefinerEngineProtocol | None = None) -> None:
        self.sync = EngineTransport(settings, engine)
        self.model = self.sync.model

    @property
    def engine(self) -> RefinerEngineProtocol:
        return self.sync.engine

    async def send(self, items: list[RefineItem], opts: RefineOptions, deadline: float,
                   span: Span) -> RefineResponse:
        return await asyncio.to_thread(self.sync.send, items, opts, deadline, span)

    async def stream(self, items: list[RefineItem], opts: RefineOptions, deadline: float,
                     span: Span) -> AsyncIterator[StreamEvent]:
        """:meth:`EngineTransport.stream` stepped in a worker thread, so the event loop stays free."""
        events = self.sync.stream(items, opts, deadline, span)
        try:
            while (event := await asyncio.to_thread(next, events, None)) is not None:
                yield event
        finally:
            await asyncio.to_thread(events.close)

    async def aclose(self) -> None:
        """Nothing to release: the engine stays loaded for the process."""


def _engine_settings(model: str | None, settings: DiffPOSettings | None, device: str | None, dtype: str | None,
                     adapter: str | None) -> DiffPOSettings:
    return (settings or DiffPOSettings()).merged(model=model, device=device, dtype=dtype, adapter=adapter)


class InProcessClient(RefinerClient):
    """The refiner engine in this process, behind the same interface as :class:`DiffPOClient`.

    The engine (torch, transformers) is imported and loaded on the first call, once per
    process and model. Pass ``engine=`` to reuse one you already hold.
    """

    transport: EngineTransport

    def __init__(self, model: str | None = None, *, settings: DiffPOSettings | None = None,
                 engine: RefinerEngineProtocol | None = None, device: str | None = None, dtype: str | None = None,
                 adapter: str | None = None) -> None:
        s = _engine_settings(model, settings, device, dtype, adapter)
        super().__init__(EngineTransport(s, engine), s)

    @property
    def engine(self) -> RefinerEngineProtocol:
        return self.transport.engine


class AsyncInProcessClient(AsyncRefinerClient):
    """The asyncio form of :class:`InProcessClient`: the engine runs in a worker thread."""

    transport: AsyncEngineTransport

    def __init__(self, model: str | None = None, *, settings: DiffPOSettings | None = None,
                 engine: RefinerEngineProtocol | None = None, device: str | None = None, dtype: str | None = None,
                 adapter: str | None = None) -> None:
        s = _engine_settings(model, settings, device, dtype, adapter)
        super().__init__(AsyncEngineTransport(s, engine), s)

    @property
    def engine(self) -> RefinerEngineProtocol:
        return self.transport.engine
