"""Refiner servers over HTTP: failover between endpoints and one retry layer.

One pooled ``httpx`` client per transport. Calls rotate over the endpoints; one that
refused a connection or answered ``Retry-After`` is skipped while it cools down, and a
failed attempt moves to the next endpoint at once. tenacity retries connection errors,
timeouts, 408, 429 and 5xx, honours ``Retry-After`` and backs off exponentially with
jitter, all under the call's one deadline. ``DiffPOClient`` / ``AsyncDiffPOClient`` are
the clients with this transport built.
"""

from __future__ import annotations

import email.utils
import itertools
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

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

from .. import tracing
from ..errors import ContextLengthError, InvalidRequestError, ModelNotFoundError, RefinerUnavailableError
from ..protocol import (
    MAX_ITEMS_PER_REQUEST,
    ErrorBody,
    RefineItem,
    RefineOptions,
    RefineRequest,
    RefineResponse,
    StreamDelta,
    StreamItem,
)
from ..settings import DiffPOSettings
from .core import AsyncRefinerClient, RefinerClient, StreamEvent

__all__ = ["AsyncDiffPOClient", "AsyncHTTPTransport", "DiffPOClient", "HTTPTransport"]

REFINE_PATH = "/v1/refine"
RETRY_STATUSES = frozenset({408, 429})
#: seconds an endpoint that refused a connection is skipped while others are available
REFUSED_COOLDOWN = 1.0

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


class _SSEReader:
    """Server-Sent Event lines in, wire events out (the ``POST /v1/refine`` stream schema).

    An ``error`` event raises; ``done`` ends the stream; a stream that ends without
    ``done`` was cut, and raises too, so a caller never takes half an answer for a whole one.
    """

    def __init__(self, url: str, deadline: float) -> None:
        self.url, self.deadline = url, deadline
        self.event: str = "message"
        self.data: list[str] = []
        self.done = False

    def feed(self, line: str) -> StreamEvent | None:
        if time.monotonic() > self.deadline:
            raise RefinerUnavailableError(f"the call's deadline passed while {self.url} was streaming")
        if line:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                self.event = value
            elif name == "data":
                self.data.append(value)
            return None
        event, data = self.event, "\n".join(self.data)
        self.event, self.data = "message", []
        if not data:
            return None
        if event == "delta":
            return StreamDelta.model_validate_json(data)
        if event == "item":
            return StreamItem.model_validate_json(data)
        if event == "error":
            error = ErrorBody.model_validate_json(data).error
            raise RefinerUnavailableError(f"{self.url} failed mid-stream: {error.get('message', error)}",
                                          status_code=error.get("code"))
        if event == "done":
            self.done = True
        return None

    def end(self) -> None:
        if not self.done:
            raise RefinerUnavailableError(f"the stream from {self.url} was cut before its end")


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


@dataclass
class _Sent:
    """How far one send got: the endpoint last tried and the attempts made."""

    url: str | None = None
    attempts: int = 0


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

    def body(self, items: list[RefineItem], opts: RefineOptions, stream: bool = False) -> bytes:
        req = RefineRequest.model_construct(items=items, stream=stream, **opts.model_dump())
        return req.model_dump_json(exclude_none=True, exclude=None if stream else {"stream"}).encode()

    def request(self, client: httpx.Client | httpx.AsyncClient, url: str, body: bytes, headers: dict[str, str],
                timeout: httpx.Timeout) -> httpx.Request:
        """A streamed ``POST /v1/refine``."""
        return client.build_request("POST", url + REFINE_PATH, content=body, timeout=timeout,
                                    headers={**headers, "accept": "text/event-stream"})

    @contextmanager
    def sending(self, span: Span) -> Iterator[_Sent]:
        """Around all attempts of one send: give up with a typed error, note the server on the span."""
        sent = _Sent()
        try:
            yield sent
        except _RetryableError as e:
            raise self.gave_up(e, sent.attempts) from e
        finally:
            if sent.url is not None:
                _mark_server(span, sent.url, sent.attempts)

    @contextmanager
    def attempt(self, sent: _Sent, deadline: float) -> Iterator[tuple[str, dict[str, str], httpx.Timeout]]:
        """One attempt: the next endpoint, headers and the time left; transport errors become retryable."""
        sent.attempts += 1
        url = sent.url = self.endpoints.pick(sent.url)
        headers = dict(self._headers)
        propagate.inject(headers)  # W3C traceparent: the server's spans nest under ours
        remaining = max(0.001, deadline - time.monotonic())
        try:
            yield url, headers, httpx.Timeout(remaining, connect=min(self.settings.connect_timeout, remaining))
        except httpx.HTTPError as e:
            raise self.transport_error(url, e) from e

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
        with self.sending(span) as sent:
            for attempt in Retrying(**self.policy(deadline)):
                with attempt, self.attempt(sent, deadline) as (url, headers, timeout):
                    out = self.finish(url, self._http.post(url + REFINE_PATH, content=body, headers=headers,
                                                           timeout=timeout))
        return out

    def stream(self, items: list[RefineItem], opts: RefineOptions, deadline: float,
               span: Span) -> Iterator[StreamEvent]:
        """Events as the server verifies text; retried (like ``send``) only until the stream opens."""
        body = self.body(items, opts, stream=True)
        with self.sending(span) as sent:
            for attempt in Retrying(**self.policy(deadline)):
                with attempt, self.attempt(sent, deadline) as (url, headers, timeout):
                    resp = self._http.send(self.request(self._http, url, body, headers, timeout), stream=True)
                    if resp.status_code != 200:
                        resp.read()
                        resp.close()
                        self.finish(url, resp)
        reader = _SSEReader(url, deadline)
        try:
            for line in resp.iter_lines():
                if (event := reader.feed(line)) is not None:
                    yield event
            reader.end()
        except httpx.HTTPError as e:
            raise RefinerUnavailableError(f"the stream from {url} broke: {type(e).__name__}: {e}") from e
        finally:
            resp.close()

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
        with self.sending(span) as sent:
            async for attempt in AsyncRetrying(**self.policy(deadline)):
                with attempt, self.attempt(sent, deadline) as (url, headers, timeout):
                    out = self.finish(url, await self._http.post(url + REFINE_PATH, content=body, headers=headers,
                                                                 timeout=timeout))
        return out

    async def stream(self, items: list[RefineItem], opts: RefineOptions, deadline: float,
                     span: Span) -> AsyncIterator[StreamEvent]:
        """See :meth:`HTTPTransport.stream`."""
        body = self.body(items, opts, stream=True)
        with self.sending(span) as sent:
            async for attempt in AsyncRetrying(**self.policy(deadline)):
                with attempt, self.attempt(sent, deadline) as (url, headers, timeout):
                    resp = await self._http.send(self.request(self._http, url, body, headers, timeout), stream=True)
                    if resp.status_code != 200:
                        await resp.aread()
                        await resp.aclose()
                        self.finish(url, resp)
        reader = _SSEReader(url, deadline)
        try:
            async for line in resp.aiter_lines():
                if (event := reader.feed(line)) is not None:
                    yield event
            reader.end()
        except httpx.HTTPError as e:
            raise RefinerUnavailableError(f"the stream from {url} broke: {type(e).__name__}: {e}") from e
        finally:
            await resp.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()


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
