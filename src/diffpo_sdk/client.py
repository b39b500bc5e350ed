"""Refiner clients with one interface: HTTP (sync and async) and in-process.

``refine(items, ...)`` returns a :class:`~diffpo_sdk.protocol.RefineResponse` or raises a
typed error; ``refine_or_keep(items, ...)`` never loses a draft: when the refiner cannot
answer it returns the draft marked ``{"refined": False, "error": ...}`` (fail-open), or
raises in strict mode. Every call is one OpenTelemetry span.

The HTTP clients keep one pooled ``httpx`` client, spread calls over several endpoints
and fail over between them. Retries are the only retry layer of a refinement call:
tenacity retries connection errors, timeouts, 408, 429 and 5xx, honours ``Retry-After``
and backs off exponentially with jitter, all under one overall deadline.
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
from dataclasses import dataclass, field
from typing import Any

import httpx
from opentelemetry import propagate, trace
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_before_delay,
    wait_exponential_jitter,
)

from . import tracing
from .errors import ContextLengthError, DiffPOError, InvalidRequestError, ModelNotFoundError, RefinerUnavailableError
from .protocol import MAX_ITEMS_PER_REQUEST, RefineItem, RefineOptions, RefineRequest, RefineResponse, coerce_items
from .settings import DiffPOSettings

log = logging.getLogger(__name__)

REFINE_PATH = "/v1/refine"
RETRY_STATUSES = frozenset({408, 429})
#: seconds an endpoint that refused a connection is skipped while others are available
REFUSED_COOLDOWN = 1.0

__all__ = [
    "AsyncDiffPOClient",
    "AsyncInProcessClient",
    "DiffPOClient",
    "InProcessClient",
    "Outcome",
    "async_client_from_settings",
    "client_from_settings",
    "shared_async_client",
    "shared_client",
]


@dataclass
class Outcome:
    """What a caller gets for one draft: the refined text, or the draft itself."""

    text: str
    refined: bool
    #: the ``diffpo`` metadata: stats when refined, ``error`` when not
    info: dict[str, Any] = field(default_factory=dict)


# -- options and outcomes, shared by every backend ---------------------------------------


def _options(settings: DiffPOSettings, overrides: dict[str, Any]) -> RefineOptions:
    opts = {
        "block_size": settings.block_size,
        "max_new_tokens": settings.max_new_tokens,
        "max_iterations": settings.max_iterations,
    }
    opts.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return RefineOptions(**opts)
    except ValueError as e:
        raise InvalidRequestError(str(e)) from e


def _items(items: Sequence[RefineItem | dict[str, Any]]) -> list[RefineItem]:
    try:
        return coerce_items(list(items))
    except ValueError as e:
        raise InvalidRequestError(str(e)) from e


def _outcomes(
    items: list[RefineItem],
    result: RefineResponse | BaseException,
    opts: RefineOptions,
    sources: Sequence[str],
    backend: str,
    started: float,
) -> list[Outcome]:
    if isinstance(result, BaseException):
        error = f"{type(result).__name__}: {result}"
        return [
            Outcome(item.draft, False, {"refined": False, "error": error, "prompt": src, "backend": backend})
            for item, src in zip(items, sources)
        ]
    latency_ms = round((time.perf_counter() - started) * 1000, 3)
    server_ms = result.timing.get("total_ms") if result.timing else None
    return [
        Outcome(
            out.text,
            True,
            {
                "refined": True,
                "model": result.model,
                "block_size": opts.block_size,
                "iterations": out.iterations,
                "new_tokens": out.new_tokens,
                "passes_per_token": round(out.passes_per_token, 4),
                "converged": out.converged,
                "finish_reason": out.finish_reason,
                "prompt": src,
                "backend": backend,
                "latency_ms": latency_ms,
                "server_ms": None if server_ms is None else round(float(server_ms), 3),
            },
        )
        for out, src in zip(result.items, sources)
    ]


class _Traced:
    """The span and fail-open logic both client flavours share."""

    settings: DiffPOSettings
    backend: str
    model: str | None = None

    def _span(self, items: list[RefineItem], opts: RefineOptions, sources: Sequence[str]) -> Any:
        return tracing.refine_span(
            items,
            backend=self.backend,
            block_size=opts.block_size,
            max_iterations=opts.max_iterations,
            max_new_tokens=opts.max_new_tokens,
            model=self.model,
            prompt_sources=sources,
            capture_content=self.settings.capture_content,
        )

    def _prepare(self, items: Sequence[RefineItem | dict[str, Any]], options: dict[str, Any],
                 prompt_sources: Sequence[str] | None) -> tuple[list[RefineItem], RefineOptions, Sequence[str]]:
        parsed = _items(items)
        if len(parsed) == 0:
            raise InvalidRequestError("nothing to refine: 'items' is empty")
        return parsed, _options(self.settings, options), prompt_sources or ["explicit"] * len(parsed)

    def _failed(self, span: Any, error: BaseException, fail_open: bool) -> None:
        tracing.record_fallback(span, error, fail_open=fail_open)
        if fail_open:
            log.warning("refiner could not answer, returning the draft(s) unrefined: %s: %s",
                        type(error).__name__, error)


# -- HTTP --------------------------------------------------------------------------------


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


class _HTTPBase(_Traced):
    backend = "http"

    def __init__(self, endpoint: str | Sequence[str] | None, api_key: str | None, timeout: float | None,
                 retries: int | None, settings: DiffPOSettings | None) -> None:
        self.settings = (settings or DiffPOSettings()).merged(
            endpoint=endpoint, api_key=api_key, timeout=timeout, retries=retries
        )
        if not self.settings.endpoint:
            raise InvalidRequestError(
                "no refiner endpoint: pass endpoint='http://host:8000' or set DIFFPO_ENDPOINT "
                "(or use InProcessClient to run the refiner in this process)"
            )
        self.endpoints = _Endpoints(self.settings.endpoint)
        self._headers = {"content-type": "application/json", "accept": "application/json"}
        if self.settings.api_key is not None:
            self._headers["authorization"] = f"Bearer {self.settings.api_key.get_secret_value()}"
        self._wait_backoff = wait_exponential_jitter(initial=0.05, max=2.0, jitter=0.05)

    # tenacity policy -----------------------------------------------------------------

    def _policy(self) -> dict[str, Any]:
        return {
            "retry": retry_if_exception_type(_RetryableError),
            "stop": stop_after_attempt(self.settings.retries + 1) | stop_before_delay(self.settings.timeout),
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

    # one attempt, split around the actual send ----------------------------------------

    def _body(self, items: list[RefineItem], opts: RefineOptions) -> bytes:
        req = RefineRequest.model_construct(items=items, **opts.model_dump())
        return req.model_dump_json(exclude_none=True).encode()

    def _begin(self, avoid: str | None, deadline: float) -> tuple[str, dict[str, str], httpx.Timeout]:
        url = self.endpoints.pick(avoid)
        headers = dict(self._headers)
        propagate.inject(headers)  # W3C traceparent: the server's spans nest under ours
        remaining = max(0.001, deadline - time.monotonic())
        timeout = httpx.Timeout(remaining, connect=min(self.settings.connect_timeout, remaining))
        return url, headers, timeout

    def _transport_error(self, url: str, e: httpx.HTTPError) -> _RetryableError:
        if isinstance(e, httpx.ConnectError):
            self.endpoints.cool(url, REFUSED_COOLDOWN)
        kind = "timed out" if isinstance(e, httpx.TimeoutException) else "failed"
        return _RetryableError(f"request to {url} {kind}: {type(e).__name__}: {e}", endpoint=url)

    def _finish(self, url: str, resp: httpx.Response) -> RefineResponse:
        if resp.status_code == 200:
            try:
                return RefineResponse.model_validate_json(resp.content)
            except ValueError as e:
                raise RefinerUnavailableError(f"unreadable answer from {url}: {e}") from e
        error = _error_from(resp, url)
        if isinstance(error, _RetryableError) and error.retry_after:
            self.endpoints.cool(url, error.retry_after)
        raise error

    def _gave_up(self, e: _RetryableError, attempts: int) -> RefinerUnavailableError:
        return RefinerUnavailableError(
            f"refiner unavailable after {attempts} attempt(s) within {self.settings.timeout:g}s: {e}",
            status_code=e.status_code,
            retry_after=e.retry_after,
        )


def _note_retry(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome else None
    trace.get_current_span().add_event(tracing.RETRY_EVENT, {
        "diffpo.attempt": state.attempt_number,
        "diffpo.retry_reason": str(error)[:300],
        "diffpo.wait_s": round(state.upcoming_sleep, 4),
    })


def _mark_server(span: Any, url: str, attempts: int) -> None:
    if span.is_recording():
        u = httpx.URL(url)
        port = u.port or (443 if u.scheme == "https" else 80)
        span.set_attributes({tracing.SERVER_ADDRESS: u.host, tracing.SERVER_PORT: port,
                             tracing.DIFFPO_ATTEMPTS: attempts})


class DiffPOClient(_HTTPBase):
    """Synchronous HTTP client of one or several refiner servers.

    ``DiffPOClient("http://127.0.0.1:8000").refine([{"prompt": "Hi", "draft": "hello"}])``.
    Thread-safe; reuse one instance (it holds the connection pool). Arguments left out
    come from ``settings`` or the ``DIFFPO_*`` environment.
    """

    def __init__(
        self,
        endpoint: str | Sequence[str] | None = None,
        *,
        api_key: str | None = None,
        timeout: float | None = None,
        retries: int | None = None,
        settings: DiffPOSettings | None = None,
        http_client: httpx.Client | None = None,
    ) -> None:
        super().__init__(endpoint, api_key, timeout, retries, settings)
        self._http = http_client or httpx.Client(
            limits=httpx.Limits(max_connections=100, max_keepalive_connections=32), trust_env=False
        )

    def refine(self, items: Sequence[RefineItem | dict[str, Any]], **options: Any) -> RefineResponse:
        """Refine the drafts; raises a :class:`~diffpo_sdk.errors.DiffPOError` on failure.

        Options (``block_size``, ``max_new_tokens``, ``max_iterations``,
        ``keep_draft_prefix``) default to the settings.
        """
        parsed, opts, sources = self._prepare(items, options, None)
        with self._span(parsed, opts, sources) as span:
            try:
                resp = self._send(parsed, opts, span)
            except Exception as e:
                self._failed(span, e, fail_open=False)
                raise
            tracing.record_response(span, resp, capture_content=self.settings.capture_content)
            return resp

    def refine_or_keep(self, items: Sequence[RefineItem | dict[str, Any]], *, fail_open: bool | None = None,
                       prompt_sources: Sequence[str] | None = None, **options: Any) -> list[Outcome]:
        """Like :meth:`refine`, but each draft comes back (marked) when the refiner fails."""
        started = time.perf_counter()
        fail_open = self.settings.fail_open if fail_open is None else fail_open
        parsed, opts, sources = self._prepare(items, options, prompt_sources)
        with self._span(parsed, opts, sources) as span:
            try:
                result: RefineResponse | BaseException = self._send(parsed, opts, span)
            except Exception as e:
                self._failed(span, e, fail_open)
                if not fail_open:
                    raise
                result = e
            else:
                tracing.record_response(span, result, capture_content=self.settings.capture_content)
        return _outcomes(parsed, result, opts, sources, self.backend, started)

    def _send(self, items: list[RefineItem], opts: RefineOptions, span: Any) -> RefineResponse:
        if len(items) <= MAX_ITEMS_PER_REQUEST:
            return self._post(items, opts, span)
        parts = [self._post(items[i : i + MAX_ITEMS_PER_REQUEST], opts, span)
                 for i in range(0, len(items), MAX_ITEMS_PER_REQUEST)]
        return RefineResponse(items=[x for p in parts for x in p.items], model=parts[0].model, timing=parts[-1].timing)

    def _post(self, items: list[RefineItem], opts: RefineOptions, span: Any) -> RefineResponse:
        body = self._body(items, opts)
        deadline = time.monotonic() + self.settings.timeout
        url: str | None = None
        attempts = 0
        try:
            for attempt in Retrying(**self._policy()):
                with attempt:
                    attempts += 1
                    url, headers, timeout = self._begin(url, deadline)
                    try:
                        resp = self._http.post(url + REFINE_PATH, content=body, headers=headers, timeout=timeout)
                    except httpx.HTTPError as e:
                        raise self._transport_error(url, e) from e
                    out = self._finish(url, resp)
        except _RetryableError as e:
            raise self._gave_up(e, attempts) from e
        finally:
            if url is not None:
                _mark_server(span, url, attempts)
        return out

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> DiffPOClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncDiffPOClient(_HTTPBase):
    """The asyncio twin of :class:`DiffPOClient` (use one per event loop)."""

    def __init__(
        self,
        endpoint: str | Sequence[str] | None = None,
        *,
        api_key: str | None = None,
        timeout: float | None = None,
        retries: int | None = None,
        settings: DiffPOSettings | None = None,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        super().__init__(endpoint, api_key, timeout, retries, settings)
        self._http = http_client or httpx.AsyncClient(
            limits=httpx.Limits(max_connections=100, max_keepalive_connections=32), trust_env=False
        )

    async def refine(self, items: Sequence[RefineItem | dict[str, Any]], **options: Any) -> RefineResponse:
        """See :meth:`DiffPOClient.refine`."""
        parsed, opts, sources = self._prepare(items, options, None)
        with self._span(parsed, opts, sources) as span:
            try:
                resp = await self._send(parsed, opts, span)
            except Exception as e:
                self._failed(span, e, fail_open=False)
                raise
            tracing.record_response(span, resp, capture_content=self.settings.capture_content)
            return resp

    async def refine_or_keep(self, items: Sequence[RefineItem | dict[str, Any]], *, fail_open: bool | None = None,
                             prompt_sources: Sequence[str] | None = None, **options: Any) -> list[Outcome]:
        """See :meth:`DiffPOClient.refine_or_keep`."""
        started = time.perf_counter()
        fail_open = self.settings.fail_open if fail_open is None else fail_open
        parsed, opts, sources = self._prepare(items, options, prompt_sources)
        with self._span(parsed, opts, sources) as span:
            try:
                result: RefineResponse | BaseException = await self._send(parsed, opts, span)
            except Exception as e:
                self._failed(span, e, fail_open)
                if not fail_open:
                    raise
                result = e
            else:
                tracing.record_response(span, result, capture_content=self.settings.capture_content)
        return _outcomes(parsed, result, opts, sources, self.backend, started)

    async def _send(self, items: list[RefineItem], opts: RefineOptions, span: Any) -> RefineResponse:
        if len(items) <= MAX_ITEMS_PER_REQUEST:
            return await self._post(items, opts, span)
        parts = await asyncio.gather(*(self._post(items[i : i + MAX_ITEMS_PER_REQUEST], opts, span)
                                       for i in range(0, len(items), MAX_ITEMS_PER_REQUEST)))
        return RefineResponse(items=[x for p in parts for x in p.items], model=parts[0].model, timing=parts[-1].timing)

    async def _post(self, items: list[RefineItem], opts: RefineOptions, span: Any) -> RefineResponse:
        body = self._body(items, opts)
        deadline = time.monotonic() + self.settings.timeout
        url: str | None = None
        attempts = 0
        try:
            async for attempt in AsyncRetrying(**self._policy()):
                with attempt:
                    attempts += 1
                    url, headers, timeout = self._begin(url, deadline)
                    try:
                        resp = await self._http.post(url + REFINE_PATH, content=body, headers=headers, timeout=timeout)
                    except httpx.HTTPError as e:
                        raise self._transport_error(url, e) from e
                    out = self._finish(url, resp)
        except _RetryableError as e:
            raise self._gave_up(e, attempts) from e
        finally:
            if url is not None:
                _mark_server(span, url, attempts)
        return out

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncDiffPOClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


# -- in-process --------------------------------------------------------------------------

_ENGINES: dict[tuple[str, str, str, str | None], Any] = {}
_ENGINES_LOCK = threading.Lock()


def _load_engine(settings: DiffPOSettings) -> Any:
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


class InProcessClient(_Traced):
    """The refiner engine in this process, behind the same interface as :class:`DiffPOClient`.

    The engine (torch, transformers) is imported and loaded on the first call, once per
    process and model. Pass ``engine=`` to reuse one you already hold.
    """

    backend = "in_process"

    def __init__(self, model: str | None = None, *, settings: DiffPOSettings | None = None, engine: Any = None,
                 device: str | None = None, dtype: str | None = None, adapter: str | None = None) -> None:
        self.settings = (settings or DiffPOSettings()).merged(model=model, device=device, dtype=dtype, adapter=adapter)
        self._engine = engine
        self.model = getattr(engine, "model_name", None) or self.settings.model

    @property
    def engine(self) -> Any:
        if self._engine is None:
            self._engine = _load_engine(self.settings)
        return self._engine

    def refine(self, items: Sequence[RefineItem | dict[str, Any]], **options: Any) -> RefineResponse:
        """See :meth:`DiffPOClient.refine`."""
        parsed, opts, sources = self._prepare(items, options, None)
        with self._span(parsed, opts, sources) as span:
            try:
                resp = self._run(parsed, opts)
            except Exception as e:
                self._failed(span, e, fail_open=False)
                raise
            tracing.record_response(span, resp, capture_content=self.settings.capture_content)
            return resp

    def refine_or_keep(self, items: Sequence[RefineItem | dict[str, Any]], *, fail_open: bool | None = None,
                       prompt_sources: Sequence[str] | None = None, **options: Any) -> list[Outcome]:
        """See :meth:`DiffPOClient.refine_or_keep`."""
        started = time.perf_counter()
        fail_open = self.settings.fail_open if fail_open is None else fail_open
        parsed, opts, sources = self._prepare(items, options, prompt_sources)
        with self._span(parsed, opts, sources) as span:
            try:
                result: RefineResponse | BaseException = self._run(parsed, opts)
            except Exception as e:
                self._failed(span, e, fail_open)
                if not fail_open:
                    raise
                result = e
            else:
                tracing.record_response(span, result, capture_content=self.settings.capture_content)
        return _outcomes(parsed, result, opts, sources, self.backend, started)

    def _run(self, items: list[RefineItem], opts: RefineOptions) -> RefineResponse:
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

    def close(self) -> None:
        """Nothing to release: the engine stays loaded for the process."""

    def __enter__(self) -> InProcessClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncInProcessClient(_Traced):
    """The asyncio twin of :class:`InProcessClient`: the engine runs in a worker thread."""

    backend = "in_process"

    def __init__(self, model: str | None = None, *, settings: DiffPOSettings | None = None, engine: Any = None,
                 device: str | None = None, dtype: str | None = None, adapter: str | None = None) -> None:
        self._sync = InProcessClient(model, settings=settings, engine=engine, device=device, dtype=dtype,
                                     adapter=adapter)
        self.settings = self._sync.settings
        self.model = self._sync.model

    async def refine(self, items: Sequence[RefineItem | dict[str, Any]], **options: Any) -> RefineResponse:
        """See :meth:`DiffPOClient.refine`."""
        parsed, opts, sources = self._prepare(items, options, None)
        with self._span(parsed, opts, sources) as span:
            try:
                resp = await asyncio.to_thread(self._sync._run, parsed, opts)
            except Exception as e:
                self._failed(span, e, fail_open=False)
                raise
            tracing.record_response(span, resp, capture_content=self.settings.capture_content)
            return resp

    async def refine_or_keep(self, items: Sequence[RefineItem | dict[str, Any]], *, fail_open: bool | None = None,
                             prompt_sources: Sequence[str] | None = None, **options: Any) -> list[Outcome]:
        """See :meth:`DiffPOClient.refine_or_keep`."""
        started = time.perf_counter()
        fail_open = self.settings.fail_open if fail_open is None else fail_open
        parsed, opts, sources = self._prepare(items, options, prompt_sources)
        with self._span(parsed, opts, sources) as span:
            try:
                result: RefineResponse | BaseException = await asyncio.to_thread(self._sync._run, parsed, opts)
            except Exception as e:
                self._failed(span, e, fail_open)
                if not fail_open:
                    raise
                result = e
            else:
                tracing.record_response(span, result, capture_content=self.settings.capture_content)
        return _outcomes(parsed, result, opts, sources, self.backend, started)

    async def aclose(self) -> None:
        """Nothing to release: the engine stays loaded for the process."""


# -- choosing a backend ------------------------------------------------------------------


def client_from_settings(settings: DiffPOSettings) -> DiffPOClient | InProcessClient:
    """The HTTP client when an endpoint is set, else the in-process engine."""
    if settings.resolved_backend() == "http":
        return DiffPOClient(settings=settings)
    return InProcessClient(settings=settings)


def async_client_from_settings(settings: DiffPOSettings) -> AsyncDiffPOClient | AsyncInProcessClient:
    """Async twin of :func:`client_from_settings`."""
    if settings.resolved_backend() == "http":
        return AsyncDiffPOClient(settings=settings)
    return AsyncInProcessClient(settings=settings)


_shared: dict[tuple, DiffPOClient | InProcessClient] = {}
_shared_async: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple, Any]] = weakref.WeakKeyDictionary()
_shared_lock = threading.Lock()


def _settings_key(settings: DiffPOSettings) -> tuple:
    return tuple(
        (k, v.get_secret_value() if hasattr(v, "get_secret_value") else tuple(v) if isinstance(v, list) else v)
        for k, v in settings
    )


def shared_client(settings: DiffPOSettings, key: tuple | None = None) -> DiffPOClient | InProcessClient:
    """One client per distinct settings in this process, so every refiner shares its pool.

    ``key`` is ``_settings_key(settings)`` when the caller already holds it (a hot path).
    """
    key = key or _settings_key(settings)
    client = _shared.get(key)
    if client is not None:
        return client
    with _shared_lock:
        if key not in _shared:
            _shared[key] = client_from_settings(settings)
        return _shared[key]


def shared_async_client(settings: DiffPOSettings, key: tuple | None = None) -> AsyncDiffPOClient | AsyncInProcessClient:
    """Async twin of :func:`shared_client`; httpx's async pool belongs to one event loop, so one per loop."""
    loop = asyncio.get_running_loop()
    key = key or _settings_key(settings)
    with _shared_lock:
        per_loop = _shared_async.setdefault(loop, {})
        if key not in per_loop:
            per_loop[key] = async_client_from_settings(settings)
        return per_loop[key]
