"""The refiner's HTTP API: ``create_app(engine_or_loader, config)`` returns a FastAPI app.

Routes: ``POST /v1/refine``, ``POST /v1/chat/completions`` (see ``proxy.py``), ``GET /health``,
``GET /v1/models``, ``GET /metrics``; the OpenAPI schema at ``/openapi.json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from opentelemetry import trace
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..engine_protocol import RefinerEngineProtocol
from ..errors import ContextLengthError, InvalidRequestError
from ..protocol import ErrorBody, RefineRequest, RefineResponse, StreamDelta, StreamDone, StreamItem
from .batcher import (
    Batcher,
    DeadlineExceededError,
    OutOfMemoryError,
    QueueFullError,
    ShuttingDownError,
)
from .config import ServerConfig
from .metrics import Metrics
from .proxy import add_chat_routes
from .responses import EventStream, error_response, sse, stream_error
from .state import ClientDisconnectedError, NotReadyError, ServerState, until_disconnect

log = logging.getLogger("diffpo_sdk.server")

#: The only paths open without the API key (when one is set): probes and the schema.
OPEN_PATHS = frozenset({"/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
#: Route labels for metrics (anything else is "other", so label cardinality stays bounded).
KNOWN_PATHS = ("/v1/refine", "/v1/chat/completions", "/v1/models", "/health", "/metrics")

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": why}
    for code, why in {
        400: "malformed JSON, invalid UTF-8, or input the refiner cannot take (context length, roles)",
        401: "missing or wrong API key",
        413: "request body too large",
        422: "the body does not match the schema",
        429: "queue full: retry after the Retry-After header",
        503: "model loading, deadline exceeded, or out of GPU memory: retry after Retry-After",
    }.items()
}


def create_app(
    engine_or_loader: RefinerEngineProtocol | Callable[[], RefinerEngineProtocol],
    config: ServerConfig | None = None,
    *,
    tracer_provider: trace.TracerProvider | None = None,
) -> FastAPI:
    """Build the app around a loaded ``RefinerEngine`` or a zero-argument loader returning one.

    With a loader, the port opens at once and the model loads in the background; ``/health``
    answers 503 until it is ready, so orchestrators route traffic only to warm replicas.
    """
    config = config or ServerConfig()
    metrics = Metrics()
    tracer = (tracer_provider or trace.get_tracer_provider()).get_tracer("diffpo_sdk.server", __version__)
    state = ServerState(config=config, metrics=metrics, tracer=tracer)
    is_loader = callable(engine_or_loader) and not hasattr(engine_or_loader, "refine")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        loading: asyncio.Task | None = None
        if is_loader:
            loading = asyncio.create_task(_load(state, engine_or_loader))
        else:
            _ready(state, engine_or_loader)
        try:
            yield
        finally:
            if loading is not None and not loading.done():
                loading.cancel()
            if state.batcher is not None:
                await state.batcher.stop()

    app = FastAPI(
        title="diffpo refiner",
        version=__version__,
        description="Refines a base LLM's draft answers with a DiffPO refiner (block-parallel Jacobi decoding).",
        lifespan=lifespan,
    )
    app.state.diffpo = state
    _add_error_handlers(app, state)

    @app.post("/v1/refine", response_model=RefineResponse, responses={
        **ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}},
                                 "description": "with stream: true, Server-Sent Events (see docs/serving.md)"}})
    async def refine(body: RefineRequest, request: Request) -> Any:
        """Refine each item's draft; items come back in request order. ``stream: true``: Server-Sent Events."""
        t0 = time.monotonic()
        batcher = state.ready_batcher()
        key = state.resolve_options(body)
        await state.check_items(body.items, key)
        if body.stream:
            deltas = batcher.stream(body.items, key)
            # the first increment is awaited here, so a full queue or a deadline is still a plain 429/503
            first = await until_disconnect(request, _next(deltas))
            return EventStream(_refine_events(state, body, deltas, first, t0))
        results, stats = await until_disconnect(request, batcher.refine(body.items, key))
        if config.log_content:
            for item, res in zip(body.items, results):
                log.info("refined item: prompt=%r draft=%r answer=%r", item.conversation(), item.draft, res.text)
        timing = {k: float(v) for k, v in stats.items()}
        timing["total_ms"] = 1000 * (time.monotonic() - t0)
        return RefineResponse(
            items=[r.to_wire() for r in results], model=state.engine.model_name, timing=timing,
            id=f"refine-{uuid.uuid4().hex}",
        )

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 once the model is loaded and the batcher runs; 503 before (or if loading failed)."""
        if state.batcher is None:
            status = "failed" if state.load_error else "loading"
            body = {"status": status, "error": state.load_error} if state.load_error else {"status": status}
            return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})
        return JSONResponse({"status": "ok", "model": state.engine.model_name, "queue_depth": state.batcher.depth})

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        """OpenAI-style model list: the loaded refiner."""
        state.ready_batcher()
        return {
            "object": "list",
            "data": [{"id": state.engine.model_name, "object": "model", "created": int(state.started), "owned_by": "diffpo-sdk"}],
        }

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    add_chat_routes(app, state)

    # Outermost first at request time: observe -> authenticate -> guard the body -> route.
    app.add_middleware(BodyGuard, state=state)
    app.add_middleware(ApiKeyAuth, state=state)
    app.add_middleware(Observe, state=state)
    instrument_http(app, tracer_provider)
    return app


def instrument_http(app: FastAPI, tracer_provider: trace.TracerProvider | None) -> None:
    """HTTP server spans (``POST /v1/refine``, with ``http.route``) from OpenTelemetry's FastAPI
    instrumentation, children of the caller's ``traceparent``. Probes and scrapes get none, nor do
    the per-message ``http send`` / ``http receive`` spans (one per streamed event)."""
    try:
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
    except ImportError:  # the server extra installs it; without it the server serves, untraced
        log.warning("opentelemetry-instrumentation-fastapi is not installed: no HTTP server spans "
                    "(pip install 'diffpo-sdk[server]')")
        return
    if getattr(app, "_is_instrumented_by_opentelemetry", False):
        return  # opentelemetry-instrument got there first (its OTEL_PYTHON_FASTAPI_* settings apply)
    FastAPIInstrumentor.instrument_app(app, tracer_provider=tracer_provider, excluded_urls="/health,/metrics",
                                       exclude_spans=["receive", "send"])


async def _next(deltas: AsyncIterator[Any]) -> Any:
    return await deltas.__anext__()


async def _refine_events(state: ServerState, body: RefineRequest, deltas: AsyncIterator[Any], first: Any,
                         t0: float) -> AsyncIterator[str]:
    """``delta`` events as the batcher verifies text, ``item`` per finished item, then ``done``;
    a failure on the way is an ``error`` event before ``done``, never a cut stream."""
    model = state.engine.model_name
    try:
        d = first
        while True:
            if d.token_ids or d.text:
                yield sse(StreamDelta(index=d.index, text=d.text, token_ids=list(d.token_ids)), "delta")
            if d.result is not None:
                yield sse(StreamItem(index=d.index, item=d.result.to_wire(), model=model), "item")
                if state.config.log_content:
                    item = body.items[d.index]
                    log.info("refined item: prompt=%r draft=%r answer=%r", item.conversation(), item.draft,
                             d.result.text)
            try:
                d = await deltas.__anext__()
            except StopAsyncIteration:
                break
    except Exception as e:  # noqa: BLE001 (the 200 is out: the failure goes into the stream)
        state.metrics.error("stream_failed")
        log.warning("a streamed refinement failed mid-stream: %s", type(e).__name__)
        yield sse(stream_error(e), "error")
        yield sse(StreamDone(ok=False, model=model), "done")
        return
    finally:
        await deltas.aclose()  # type: ignore[attr-defined]  (a hang-up drops this request's rows now)
    yield sse(StreamDone(model=model, timing={"total_ms": 1000 * (time.monotonic() - t0)}), "done")


async def _load(state: ServerState, loader: Callable[[], RefinerEngineProtocol]) -> None:
    try:
        engine = await asyncio.to_thread(loader)
    except Exception as e:  # keep serving /health with the reason
        log.exception("loading the refiner failed")
        state.load_error = f"{type(e).__name__}: {e}"
        return
    _ready(state, engine)


def _ready(state: ServerState, engine: RefinerEngineProtocol) -> None:
    state.engine = engine
    state.metrics.bind(getattr(engine, "model_name", ""))
    batcher = Batcher(engine, state.config, state.metrics, state.tracer)
    batcher.start()
    state.batcher = batcher
    log.info("refiner %s ready", getattr(engine, "model_name", "?"))


# -- errors ------------------------------------------------------------------------------------


def _add_error_handlers(app: FastAPI, state: ServerState) -> None:
    errors = state.metrics.error

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = exc.errors()
        if any(p.get("type") == "json_invalid" for p in problems):
            errors("malformed_json")
            ctx = next(p.get("ctx", {}) for p in problems if p.get("type") == "json_invalid")
            return error_response(400, "malformed_json", f"the body is not valid JSON: {ctx.get('error', 'parse error')}")
        errors("validation")
        return error_response(422, "invalid_request", describe_validation(problems))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        errors(kind)
        return error_response(exc.status_code, kind, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(ContextLengthError)
    async def _context(request: Request, exc: ContextLengthError) -> JSONResponse:
        errors("context_length")
        return error_response(400, "context_length_exceeded", str(exc))

    @app.exception_handler(InvalidRequestError)
    async def _invalid(request: Request, exc: InvalidRequestError) -> JSONResponse:
        errors("invalid_request")
        return error_response(400, "invalid_request", str(exc))

    @app.exception_handler(QueueFullError)
    async def _full(request: Request, exc: QueueFullError) -> JSONResponse:
        errors("queue_full")
        return error_response(429, "queue_full", str(exc), {"Retry-After": str(exc.retry_after)})

    @app.exception_handler(DeadlineExceededError)
    async def _deadline(request: Request, exc: DeadlineExceededError) -> JSONResponse:
        errors("timeout")
        retry = str(state.batcher.retry_after() if state.batcher else 1)
        return error_response(503, "timeout", str(exc), {"Retry-After": retry})

    @app.exception_handler(NotReadyError)
    async def _not_ready(request: Request, exc: NotReadyError) -> JSONResponse:
        errors("not_ready")
        return error_response(503, "not_ready", str(exc), {"Retry-After": "5"})

    @app.exception_handler(ShuttingDownError)
    async def _stopping(request: Request, exc: ShuttingDownError) -> JSONResponse:
        errors("shutting_down")
        return error_response(503, "shutting_down", str(exc), {"Retry-After": "5"})

    @app.exception_handler(ClientDisconnectedError)
    async def _gone(request: Request, exc: ClientDisconnectedError) -> Response:
        errors("client_disconnected")
        return Response(status_code=499)  # nobody reads it; nginx's "client closed request"

    @app.exception_handler(OutOfMemoryError)
    async def _oom(request: Request, exc: OutOfMemoryError) -> JSONResponse:
        return error_response(503, "out_of_memory", str(exc), {"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        errors("internal")
        log.error("internal error on %s: %s", request.url.path, type(exc).__name__, exc_info=exc)
        return error_response(500, "internal_error", f"internal error ({type(exc).__name__}); see the server log")


def describe_validation(problems: list[dict[str, Any]], limit: int = 8) -> str:
    """Pydantic errors as one readable line: ``items.0.draft: Field required; ...`` (inputs not echoed)."""
    parts = []
    for p in problems[:limit]:
        loc = [str(x) for x in p.get("loc", ()) if x != "body"]
        msg = str(p.get("msg", "invalid"))
        parts.append(f"{'.'.join(loc)}: {msg}" if loc else msg)
    more = len(problems) - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


# -- ASGI middleware -------------------------------------------------------------------------------


async def _send_error(send: Send, status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"error": {"type": kind, "message": message, "code": status}}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class Observe:
    """Latency and status metrics of every request (its span comes from the FastAPI instrumentation)."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in KNOWN_PATHS else "other"
        status = {"code": 500}

        async def send_observed(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        t0 = time.monotonic()
        try:
            await self.app(scope, receive, send_observed)
        finally:
            seconds = None if endpoint == "/metrics" else time.monotonic() - t0
            self.state.metrics.request(endpoint, status["code"], seconds)


class ApiKeyAuth:
    """``Authorization: Bearer <key>`` on every path but probes and docs, compared in constant time."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app, self.state = app, state
        key = state.config.api_key
        self.expected = f"Bearer {key}".encode() if key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.expected is None or scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        if not hmac.compare_digest(given, self.expected):
            self.state.metrics.error("unauthorized")
            return await _send_error(
                send, 401, "unauthorized", "missing or wrong API key: send 'Authorization: Bearer <key>'",
                {"WWW-Authenticate": "Bearer"},
            )
        await self.app(scope, receive, send)


class BodyGuard:
    """Bounded body size (413 before reading it all) and strict UTF-8, ahead of JSON parsing."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        limit = self.state.config.max_body_bytes
        errors = self.state.metrics.error
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > limit:
            errors("too_large")
            return await _send_error(send, 413, "too_large", f"request body of {int(declared)} bytes exceeds the {limit}-byte limit")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                errors("too_large")
                return await _send_error(send, 413, "too_large", f"request body exceeds the {limit}-byte limit")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as e:
            errors("invalid_utf8")
            return await _send_error(send, 400, "invalid_utf8", f"the body is not valid UTF-8 (byte {e.start}: {e.reason})")

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        await self.app(scope, replay, send)
