"""Refiner clients: one sync and one async client, each over a transport.

In the manner of httpx: :class:`RefinerClient` and :class:`AsyncRefinerClient` hold what
every call shares (options from the settings, the prompt guard, one overall deadline,
the OpenTelemetry span, fail-open), written once; a *transport* only sends a batch of
items and returns the answer. Two transports exist: HTTP (one pooled ``httpx`` client,
failover between endpoints, tenacity retries of connection errors, timeouts, 408, 429
and 5xx honouring ``Retry-After``) and the engine in this process. A streaming call goes
on the transports as ``stream(items, opts, deadline, span)`` beside ``send``.

``refine(items, ...)`` returns a :class:`~diffpo_sdk.protocol.RefineResponse` or raises a
typed error; ``refine_or_keep(items, ...)`` never loses a draft: when the refiner cannot
answer it returns the draft marked ``{"refined": False, "reason": ..., "error": ...}``
(fail-open), or raises in strict mode. ``DiffPOClient``/``AsyncDiffPOClient`` (HTTP) and
``InProcessClient``/``AsyncInProcessClient`` are these clients with their transport built.
"""

from __future__ import annotations

import asyncio
import email.utils
import itertools
import logging
import threading
import time
import weakref
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
from opentelemetry import propagate, trace
from opentelemetry.trace import Span
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from . import tracing
from .engine_protocol import RefinerEngineProtocol
from .errors import ContextLengthError, DiffPOError, InvalidRequestError, ModelNotFoundError, RefinerUnavailableError
from .protocol import MAX_ITEMS_PER_REQUEST, RefineItem, RefineOptions, RefineRequest, RefineResponse, coerce_items
from .settings import DiffPOSettings

log = logging.getLogger(__name__)

REFINE_PATH = "/v1/refine"
RETRY_STATUSES = frozenset({408, 429})
#: seconds an endpoint that refused a connection is skipped while others are available
REFUSED_COOLDOWN = 1.0

#: ``info["reason"]`` of a draft returned unrefined
NO_PROMPT = "no_prompt"
REFINER_FAILED = "refiner_failed"

NO_PROMPT_HELP = (
    "a draft came with no prompt (none given, none captured), so it is returned unrefined "
    "(reason 'no_prompt'): refined against an empty prompt, the draft would be replaced by an unrelated "
    "answer. Supply the prompt in one of three ways: let DiffPORefiner capture it from the chat model in "
    "the same chain (prompt | llm | DiffPORefiner()), pass {'messages': ..., 'draft': ...}, or use "
    "DiffPORefiner.wrap(llm). This warning is logged once per process."
)

__all__ = [
    "NO_PROMPT",
    "REFINER_FAILED",
    "AsyncDiffPOClient",
    "AsyncEngineTransport",
    "AsyncHTTPTransport",
    "AsyncInProcessClient",
    "AsyncRefinerClient",
    "AsyncTransport",
    "DiffPOClient",
    "EngineTransport",
    "HTTPTransport",
    "InProcessClient",
    "Outcome",
    "RefinerClient",
    "Transport",
    "async_client_from_settings",
    "client_from_settings",
    "has_prompt",
    "shared_async_client",
    "shared_client",
    "use_shared_client",
]


@dataclass
class Outcome:
    """What a caller gets for one draft: the refined text, or the draft itself."""

    text: str
    refined: bool
    #: the ``diffpo`` metadata: stats when refined, ``reason`` (and ``error``) when not
    info: dict[str, Any] = field(default_factory=dict)


_warned: set[str] = set()
_warned_lock = threading.Lock()


def warn_once(key: str, message: str) -> None:
    """Log ``message`` as a warning the first time ``key`` comes up in this process, then at debug."""
    with _warned_lock:
        first = key not in _warned
        _warned.add(key)
    log.log(logging.WARNING if first else logging.DEBUG, message)


def has_prompt(item: RefineItem) -> bool:
    """Whether the item carries a conversation to refine against (an empty one has nothing)."""
    return any(turn["content"].strip() for turn in item.conversation())


# -- transports ------------------------------------------------------------------------------


class Transport(Protocol):
    """Sends one batch of items (at most ``max_items``) and returns the refiner's answer.

    ``deadline`` is a ``time.monotonic()`` instant shared by every batch of one call;
    ``span`` is the call's span, for transport attributes (server address, attempts).
    """

    backend: str
    model: str | None
    max_items: int | None

    def send(self, items: list[RefineItem], opts: RefineOptions, deadline: float, span: Span) -> RefineResponse: ...

    def close(self) -> None: ...


class AsyncTransport(Protocol):
    """The asyncio form of :class:`Transport`."""

    backend: str
    model: str | None
    max_items: int | None

    async def send(self, items: list[RefineItem], opts: RefineOptions, deadline: float,
                   span: Span) -> RefineResponse: ...

    async def aclose(self) -> None: ...


class _RetryableError(Exception):
    def __init__(self, message: str, *, endpoint: str, status_code: int | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.endpoint = endpoint
        self.status_code = status_code
        self.retry_after = retry_after


def _parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds, from either of its forms (delta seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _error_from(resp: httpx.Response, endpoint: str) -> Exception:
    """Map a non-200 answer to a retryable marker or a typed, final error."""
    retry_after = _parse_retry_after(resp.headers.get("retry-after"))
    try:
        body = resp.json().get("error", {})
        body = body if isinstance(body, dict) else {"message": str(body)}
    except Exception:  # not JSON: a proxy's HTML page, a truncated body
        body = {"message": resp.text[:200]}
    message = str(body.get("message") or body.get("detail") or resp.reason_phrase)
    kind = str(body.get("type") or body.get("code") or "")
    status = resp.status_code
    text = f"HTTP {status} from {endpoint}: {message}"
    if status in RETRY_STATUSES or status >= 500:
        return _RetryableError(text, endpoint=endpoint, status_code=status, retry_after=retry_after)
    if "context" in kind:
        return ContextLengthError(text)
    if status == 404 and "model" in kind:
        return ModelNotFoundError(text)
    if status in (400, 413, 422):
        return InvalidRequestError(text)
    if status in (401, 403):
        return RefinerUnavailableError(f"{text} (set the API key: DIFFPO_API_KEY or api_key=...)", status_code=status)
    return RefinerUnavailableError(text, status_code=status)


class _Endpoints:
    """Round-robin over endpoints, skipping those cooling down after a refusal or Retry-After."""

    def __init__(self, urls: Sequence[str]) -> None:
        self.urls = list(urls)
        self._turn = itertools.count()
        self._cool_until: dict[str, float] = {}

    def pick(self, avoid: str | None) -> str:
        now = time.monotonic()
        start = next(self._turn)
        n = len(self.urls)
        for k in range(n):
            url = self.urls[(start + k) % n]
            if url != avoid and self._cool_until.get(url, 0.0) <= now:
                return url
        return min(self.urls, key=lambda u: self._cool_until.get(u, 0.0))

    def cool(self, url: str, seconds: float) -> None:
        self._cool_until[url] = max(self._cool_until.get(url, 0.0), time.monotonic() + seconds)

    def delay_after(self, failed: str) -> float | None:
        """0 when another endpoint can take the retry now; else seconds until one can (None: any time)."""
        now = time.monotonic()
        if any(u != failed and self._cool_until.get(u, 0.0) <= now for u in self.urls):
            return 0.0
        soonest = min(self._cool_until.get(u, 0.0) for u in self.urls)
        return max(0.0, soonest - now) if soonest > now else None


def _note_retry(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome else None
    trace.get_current_span().add_event(tracing.RETRY_EVENT, {
        "diffpo.attempt": state.attempt_number,
        "diffpo.retry_reason": str(error)[:300],
        "diffpo.wait_s": round(state.upcoming_sleep, 4),
    })


def _mark_server(span: Span, url: str, attempts: int) -> None:
    if span.is_recording():
        u = httpx.URL(url)
        port = u.port or (443 if u.scheme == "https" else 80)
        span.set_attributes({tracing.SERVER_ADDRESS: u.host, tracing.SERVER_PORT: port,
                             tracing.DIFFPO_ATTEMPTS: attempts})


class _HTTPAttempts:
    """What one HTTP attempt needs before and after the send, shared by both HTTP transports."""

    backend = "http"
    max_items: int | None = MAX_ITEMS_PER_REQUEST
    model: str | None = None

    def __init__(self, settings: DiffPOSettings) -> None:
        if not settings.endpoint:
            raise InvalidRequestError(
                "no refiner endpoint: pass endpoint='http://host:8000' or set DIFFPO_ENDPOINT "
                "(or use InProcessClient to run the refiner in this process)"
            )
        self.settings = settings
        self.endpoints = _Endpoints(settings.endpoint)
        self._headers = {"content-type": "application/json", "accept": "application/json"}
        if settings.api_key is not None:
            self._headers["authorization"] = f"Bearer {settings.api_key.get_secret_value()}"
        self._wait_backoff = wait_exponential_jitter(initial=0.05, max=2.0, jitter=0.05)

    def policy(self, deadline: float) -> dict[str, Any]:
        """tenacity's arguments: retry transient errors until ``retries`` or the deadline runs out."""

        def past_deadline(state: RetryCallState) -> bool:
            return time.monotonic() + (state.upcoming_sleep or 0.0) >= deadline

        return {
            "retry": retry_if_exception_type(_RetryableError),
            "stop": stop_after_attempt(self.settings.retries + 1) | past_deadline,
            "wait": self._wait,
            "before_sleep": _note_retry,
            "reraise": True,
        }

    def _wait(self, state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome else None
        failed = getattr(error, "endpoint", None)
        delay = self.endpoints.delay_after(failed) if failed else None
        if delay == 0.0:
            return 0.0  # fail over to another endpoint at once
        return max(self._wait_backoff(state), delay or 0.0)

    def body(self, items: list[RefineItem], opts: RefineOptions) -> bytes:
        req = RefineRequest.model_construct(items=items, **opts.model_dump())
        return req.model_dump_json(exclude_none=True).encode()

    def begin(self, avoid: str | None, deadline: float) -> tuple[str, dict[str, str], httpx.Timeout]:
        url = self.endpoints.pick(avoid)
        headers = dict(self._headers)
        propagate.inject(headers)  # W3C traceparent: the server's spans nest under ours
        remaining = max(0.001, deadline - time.monotonic())
        timeout = httpx.Timeout(remaining, connect=min(self.settings.connect_timeout, remaining))
        return url, headers, timeout

    def transport_error(self, url: str, e: httpx.HTTPError) -> _RetryableError:
        if isinstance(e, httpx.ConnectError):
            self.endpoints.cool(url, REFUSED_COOLDOWN)
        kind = "timed out" if isinstance(e, httpx.TimeoutException) else "failed"
        return _RetryableError(f"request to {url} {kind}: {type(e).__name__}: {e}", endpoint=url)

    def finish(self, url: str, resp: httpx.Response) -> RefineResponse:
        if resp.status_code == 200:
            try:
                return RefineResponse.model_validate_json(resp.content)
            except ValueError as e:
                raise RefinerUnavailableError(f"unreadable answer from {url}: {e}") from e
        error = _error_from(resp, url)
        if isinstance(error, _RetryableError) and error.retry_after:
            self.endpoints.cool(url, error.retry_after)
        raise error

    def gave_up(self, e: _RetryableError, attempts: int) -> RefinerUnavailableError:
        return RefinerUnavailableError(
            f"refiner unavailable after {attempts} attempt(s) within the call's deadline: {e}",
            status_code=e.status_code,
            retry_after=e.retry_after,
        )


def _pool_limits() -> httpx.Limits:
    return httpx.Limits(max_connections=100, max_keepalive_connections=32)


class HTTPTransport(_HTTPAttempts):
    """Refiner servers over HTTP, with failover and retries (thread-safe)."""

    def __init__(self, settings: DiffPOSettings, http_client: httpx.Client | None = None) -> None:
        super().__init__(settings)
        self._http = http_client or httpx.Client(limits=_pool_limits(), trust_env=False)

    def send(self, items: list[RefineItem], opts: RefineOptions, deadline: float, span: Span) -> RefineResponse:
        body = self.body(items, opts)
        url: str | None = None
        attempts = 0
        try:
            for attempt in Retrying(**self.policy(deadline)):
                with attempt:
                    attempts += 1
                    url, headers, timeout = self.begin(url, deadline)
                    try:
                        resp = self._http.post(url + REFINE_PATH, content=body, headers=headers, timeout=timeout)
                    except httpx.HTTPError as e:
                        raise self.transport_error(url, e) from e
                    out = self.finish(url, resp)
        except _RetryableError as e:
            raise self.gave_up(e, attempts) from e
        finally:
            if url is not None:
                _mark_server(span, url, attempts)
        return out

    def close(self) -> None:
        self._http.close()


class AsyncHTTPTransport(_HTTPAttempts):
    """The asyncio form of :class:`HTTPTransport` (its pool belongs to one event loop)."""

    def __init__(self, settings: DiffPOSettings, http_client: httpx.AsyncClient | None = None) -> None:
        super().__init__(settings)
        self._http = http_client or httpx.AsyncClient(limits=_pool_limits(), trust_env=False)

    async def send(self, items: list[RefineItem], opts: RefineOptions, deadline: float,
                   span: Span) -> RefineResponse:
        body = self.body(items, opts)
        url: str | None = None
        attempts = 0
        try:
            async for attempt in AsyncRetrying(**self.policy(deadline)):
                with attempt:
                    attempts += 1
                    url, headers, timeout = self.begin(url, deadline)
                    try:
                        resp = await self._http.post(url + REFINE_PATH, content=body, headers=headers, timeout=timeout)
                    except httpx.HTTPError as e:
                        raise self.transport_error(url, e) from e
                    out = self.finish(url, resp)
        except _RetryableError as e:
            raise self.gave_up(e, attempts) from e
        finally:
            if url is not None:
                _mark_server(span, url, attempts)
        return out

    async def aclose(self) -> None:
        await self._http.aclose()


_ENGINES: dict[tuple[str, str, str, str | None], RefinerEngineProtocol] = {}
_ENGINES_LOCK = threading.Lock()


def _load_engine(settings: DiffPOSettings) -> RefinerEngineProtocol:
    """One engine per (model, device, dtype, adapter) in this process, loaded on first use."""
    key = (settings.model, settings.device, settings.dtype, settings.adapter)
    with _ENGINES_LOCK:
        if key not in _ENGINES:
            try:
                from .engine import RefinerEngine
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

    The engine cannot be interrupted, so the deadline is checked before the batch starts.
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
        if time.monotonic() >= deadline:
            raise RefinerUnavailableError("the call's deadline passed before the in-process refiner could start")
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

    async def aclose(self) -> None:
        """Nothing to release: the engine stays loaded for the process."""


# -- the client core -----------------------------------------------------------------------------


@dataclass
class _Call:
    """One refinement call taken apart: what goes to the refiner, and what cannot."""

    items: list[RefineItem]
    opts: RefineOptions
    sources: list[str]
    #: positions of the items that go to the refiner (the others have no prompt)
    todo: list[int]
    deadline: float
    started: float = field(default_factory=time.perf_counter)

    def batches(self, max_items: int | None) -> list[list[RefineItem]]:
        sent = [self.items[i] for i in self.todo]
        step = max_items or len(sent)
        return [sent[i : i + step] for i in range(0, len(sent), step)]


def _merge(parts: Sequence[RefineResponse]) -> RefineResponse:
    if len(parts) == 1:
        return parts[0]
    return RefineResponse(items=[x for p in parts for x in p.items], model=parts[0].model, timing=parts[-1].timing)


class _ClientCore:
    """Everything a call does around the transport's send, for both client flavours."""

    settings: DiffPOSettings
    backend: str
    model: str | None

    def _begin(self, items: Sequence[RefineItem | dict[str, Any]], options: dict[str, Any],
               prompt_sources: Sequence[str] | None, *, strict: bool) -> _Call:
        try:
            parsed = coerce_items(list(items))
        except ValueError as e:
            raise InvalidRequestError(str(e)) from e
        if not parsed:
            raise InvalidRequestError("nothing to refine: 'items' is empty")
        opts = {"block_size": self.settings.block_size, "max_new_tokens": self.settings.max_new_tokens,
                "max_iterations": self.settings.max_iterations}
        opts.update({k: v for k, v in options.items() if v is not None})
        try:
            ropts = RefineOptions(**opts)
        except ValueError as e:
            raise InvalidRequestError(str(e)) from e
        todo = [i for i, item in enumerate(parsed) if has_prompt(item)]
        if len(todo) < len(parsed):
            if strict:
                raise InvalidRequestError(NO_PROMPT_HELP.replace("it is returned unrefined (reason 'no_prompt')",
                                                                 "it cannot be refined"))
            warn_once(NO_PROMPT, NO_PROMPT_HELP)
        sources = list(prompt_sources) if prompt_sources else ["explicit"] * len(parsed)
        deadline = time.monotonic() + self.settings.call_timeout(ropts.max_new_tokens)
        return _Call(parsed, ropts, sources, todo, deadline)

    def _span(self, call: _Call) -> AbstractContextManager[Span]:
        return tracing.refine_span(
            [call.items[i] for i in call.todo],
            backend=self.backend,
            block_size=call.opts.block_size,
            max_iterations=call.opts.max_iterations,
            max_new_tokens=call.opts.max_new_tokens,
            model=self.model,
            prompt_sources=[call.sources[i] for i in call.todo],
            capture_content=self.settings.capture_content,
        )

    def _failed(self, span: Span, error: BaseException, fail_open: bool) -> None:
        tracing.record_fallback(span, error, fail_open=fail_open)
        if fail_open:
            warn_once(REFINER_FAILED, f"the refiner could not answer, so drafts come back unrefined (marked "
                                      f"refined=False, reason 'refiner_failed'); first cause: "
                                      f"{type(error).__name__}: {error}. Later ones are logged at debug level.")

    def _succeeded(self, span: Span, resp: RefineResponse) -> None:
        tracing.record_response(span, resp, capture_content=self.settings.capture_content)

    def _outcomes(self, call: _Call, result: RefineResponse | BaseException | None) -> list[Outcome]:
        """One outcome per item, in order: refined, failed open, or held back for want of a prompt."""
        base = {"backend": self.backend}
        out = [Outcome(item.draft, False, {"refined": False, "reason": NO_PROMPT, "prompt": src, **base})
               for item, src in zip(call.items, call.sources)]
        if isinstance(result, BaseException):
            error = f"{type(result).__name__}: {result}"
            for i in call.todo:
                out[i] = Outcome(call.items[i].draft, False, {"refined": False, "reason": REFINER_FAILED,
                                                              "error": error, "prompt": call.sources[i], **base})
            return out
        if result is None:
            return out
        latency_ms = round((time.perf_counter() - call.started) * 1000, 3)
        server_ms = result.timing.get("total_ms") if result.timing else None
        for i, item in zip(call.todo, result.items):
            out[i] = Outcome(item.text, True, {
                "refined": True,
                "model": result.model,
                "block_size": call.opts.block_size,
                "iterations": item.iterations,
                "new_tokens": item.new_tokens,
                "passes_per_token": round(item.passes_per_token, 4),
                "converged": item.converged,
                "finish_reason": item.finish_reason,
                "prompt": call.sources[i],
                **base,
                "latency_ms": latency_ms,
                "server_ms": None if server_ms is None else round(float(server_ms), 3),
            })
        return out


class RefinerClient(_ClientCore):
    """A synchronous refiner client over a :class:`Transport` (thread-safe; reuse one)."""

    def __init__(self, transport: Transport, settings: DiffPOSettings | None = None) -> None:
        self.transport = transport
        self.settings = settings or DiffPOSettings()
        self.backend = transport.backend
        self.model = transport.model

    def refine(self, items: Sequence[RefineItem | dict[str, Any]], **options: Any) -> RefineResponse:
        """Refine the drafts; raises a :class:`~diffpo_sdk.errors.DiffPOError` on failure.

        Options (``block_size``, ``max_new_tokens``, ``max_iterations``,
        ``keep_draft_prefix``) default to the settings.
        """
        result = self._run(self._begin(items, options, None, strict=True), fail_open=False)
        assert isinstance(result, RefineResponse)
        return result

    def refine_or_keep(self, items: Sequence[RefineItem | dict[str, Any]], *, fail_open: bool | None = None,
                       prompt_sources: Sequence[str] | None = None, **options: Any) -> list[Outcome]:
        """Like :meth:`refine`, but each draft comes back (marked) when it cannot be refined."""
        fail_open = self.settings.fail_open if fail_open is None else fail_open
        call = self._begin(items, options, prompt_sources, strict=not fail_open)
        return self._outcomes(call, self._run(call, fail_open) if call.todo else None)

    def _run(self, call: _Call, fail_open: bool) -> RefineResponse | BaseException:
        with self._span(call) as span:
            try:
                resp = _merge([self.transport.send(batch, call.opts, call.deadline, span)
                               for batch in call.batches(self.transport.max_items)])
            except Exception as e:
                self._failed(span, e, fail_open)
                if not fail_open:
                    raise
                return e
            self._succeeded(span, resp)
            return resp

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> RefinerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncRefinerClient(_ClientCore):
    """The asyncio form of :class:`RefinerClient` (use one per event loop)."""

    def __init__(self, transport: AsyncTransport, settings: DiffPOSettings | None = None) -> None:
        self.transport = transport
        self.settings = settings or DiffPOSettings()
        self.backend = transport.backend
        self.model = transport.model

    async def refine(self, items: Sequence[RefineItem | dict[str, Any]], **options: Any) -> RefineResponse:
        """See :meth:`RefinerClient.refine`."""
        result = await self._run(self._begin(items, options, None, strict=True), fail_open=False)
        assert isinstance(result, RefineResponse)
        return result

    async def refine_or_keep(self, items: Sequence[RefineItem | dict[str, Any]], *, fail_open: bool | None = None,
                             prompt_sources: Sequence[str] | None = None, **options: Any) -> list[Outcome]:
        """See :meth:`RefinerClient.refine_or_keep`."""
        fail_open = self.settings.fail_open if fail_open is None else fail_open
        call = self._begin(items, options, prompt_sources, strict=not fail_open)
        return self._outcomes(call, await self._run(call, fail_open) if call.todo else None)

    async def _run(self, call: _Call, fail_open: bool) -> RefineResponse | BaseException:
        with self._span(call) as span:
            try:
                parts = await asyncio.gather(*(self.transport.send(batch, call.opts, call.deadline, span)
                                               for batch in call.batches(self.transport.max_items)))
                resp = _merge(parts)
            except Exception as e:
                self._failed(span, e, fail_open)
                if not fail_open:
                    raise
                return e
            self._succeeded(span, resp)
            return resp

    async def aclose(self) -> None:
        await self.transport.aclose()

    async def __aenter__(self) -> AsyncRefinerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


# -- the documented constructors -------------------------------------------------------------------


def _http_settings(endpoint: str | Sequence[str] | None, api_key: str | None, timeout: float | None,
                   retries: int | None, settings: DiffPOSettings | None) -> DiffPOSettings:
    return (settings or DiffPOSettings()).merged(endpoint=endpoint, api_key=api_key, timeout=timeout, retries=retries)


class DiffPOClient(RefinerClient):
    """Synchronous HTTP client of one or several refiner servers.

    ``DiffPOClient("http://127.0.0.1:8000").refine([{"prompt": "Hi", "draft": "hello"}])``.
    Thread-safe; reuse one instance (it holds the connection pool). Arguments left out
    come from ``settings`` or the ``DIFFPO_*`` environment.
    """

    transport: HTTPTransport

    def __init__(self, endpoint: str | Sequence[str] | None = None, *, api_key: str | None = None,
                 timeout: float | None = None, retries: int | None = None, settings: DiffPOSettings | None = None,
                 http_client: httpx.Client | None = None) -> None:
        s = _http_settings(endpoint, api_key, timeout, retries, settings)
        super().__init__(HTTPTransport(s, http_client), s)

    @property
    def endpoints(self) -> list[str]:
        return self.transport.endpoints.urls


class AsyncDiffPOClient(AsyncRefinerClient):
    """The asyncio form of :class:`DiffPOClient` (use one per event loop)."""

    transport: AsyncHTTPTransport

    def __init__(self, endpoint: str | Sequence[str] | None = None, *, api_key: str | None = None,
                 timeout: float | None = None, retries: int | None = None, settings: DiffPOSettings | None = None,
                 http_client: httpx.AsyncClient | None = None) -> None:
        s = _http_settings(endpoint, api_key, timeout, retries, settings)
        super().__init__(AsyncHTTPTransport(s, http_client), s)


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


# -- choosing a backend, sharing clients -------------------------------------------------------------


def client_from_settings(settings: DiffPOSettings) -> RefinerClient:
    """The HTTP client when an endpoint is set, else the in-process engine."""
    if settings.resolved_backend() == "http":
        return DiffPOClient(settings=settings)
    return InProcessClient(settings=settings)


def async_client_from_settings(settings: DiffPOSettings) -> AsyncRefinerClient:
    """The asyncio form of :func:`client_from_settings`."""
    if settings.resolved_backend() == "http":
        return AsyncDiffPOClient(settings=settings)
    return AsyncInProcessClient(settings=settings)


_shared: dict[tuple, RefinerClient] = {}
_shared_async: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple, AsyncRefinerClient]] = (
    weakref.WeakKeyDictionary()
)
_shared_lock = threading.Lock()


def settings_key(settings: DiffPOSettings) -> tuple:
    """A hashable identity of the settings: equal settings share one client."""
    return tuple(
        (k, v.get_secret_value() if hasattr(v, "get_secret_value") else tuple(v) if isinstance(v, list) else v)
        for k, v in settings
    )


def shared_client(settings: DiffPOSettings, key: tuple | None = None) -> RefinerClient:
    """One client per distinct settings in this process, so every refiner shares its pool.

    ``key`` is ``settings_key(settings)`` when the caller already holds it (a hot path).
    """
    key = key or settings_key(settings)
    client = _shared.get(key)
    if client is not None:
        return client
    with _shared_lock:
        if key not in _shared:
            _shared[key] = client_from_settings(settings)
        return _shared[key]


def shared_async_client(settings: DiffPOSettings, key: tuple | None = None) -> AsyncRefinerClient:
    """:func:`shared_client` for asyncio: httpx's async pool belongs to one event loop, so one per loop."""
    loop = asyncio.get_running_loop()
    key = key or settings_key(settings)
    with _shared_lock:
        per_loop = _shared_async.setdefault(loop, {})
        if key not in per_loop:
            per_loop[key] = async_client_from_settings(settings)
        return per_loop[key]


def use_shared_client(settings: DiffPOSettings, client: RefinerClient) -> None:
    """Make ``client`` the one every refiner with these settings uses (benchmarks, tests)."""
    with _shared_lock:
        _shared[settings_key(settings)] = client
