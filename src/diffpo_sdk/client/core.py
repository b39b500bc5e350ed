"""The client core: one sync and one async refiner client, each over a transport.

In the manner of httpx, :class:`RefinerClient` and :class:`AsyncRefinerClient` do what
every call shares, once: options from the settings, the prompt guard (a draft without a
prompt is never refined), one overall deadline for the whole call (a batch larger than
a transport takes goes out in parts under that one deadline), the OpenTelemetry span and
fail-open. A :class:`Transport` only sends one batch (``send``), or streams it
(``stream``: the wire's :class:`~diffpo_sdk.protocol.StreamDelta` and
:class:`~diffpo_sdk.protocol.StreamItem` events as the refiner verifies text).

Streaming (:meth:`RefinerClient.stream`) yields :class:`StreamPiece`s; per item their
texts add up to the item's final :class:`Outcome` text, whatever happens. When the
refiner fails mid-stream, fail-open goes on with the rest of the draft (see
:func:`draft_rest`), so the user still gets a whole answer, marked unrefined.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from opentelemetry.trace import Span

from .. import tracing
from .genai_metrics import record_call
from ..errors import InvalidRequestError
from ..protocol import RefinedItem, RefineItem, RefineOptions, RefineResponse, StreamDelta, StreamItem, coerce_items
from ..settings import DiffPOSettings

log = logging.getLogger("diffpo_sdk.client")

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

__all__ = ["NO_PROMPT", "REFINER_FAILED", "AsyncRefinerClient", "AsyncTransport", "Outcome", "RefinerClient",
           "StreamPiece", "Transport", "draft_rest", "has_prompt", "warn_once"]


@dataclass
class Outcome:
    """What a caller gets for one draft: the refined text, or the draft itself."""

    text: str
    refined: bool
    #: the ``diffpo`` metadata: stats when refined, ``reason`` (and ``error``) when not
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class StreamPiece:
    """Newly verified ``text`` of input ``index``; an item's last piece carries its ``outcome``.

    Per item, the pieces' texts concatenated equal ``outcome.text``, refined or not.
    """

    index: int
    text: str
    outcome: Outcome | None = None


def draft_rest(streamed: str, draft: str) -> str:
    """What follows ``streamed`` (verified refined text) when the refiner stops mid-answer: the
    draft from the same point on. Where the refined text left the draft's wording, the draft
    goes on from the same character offset, moved forward to a word boundary so no word is cut."""
    if draft.startswith(streamed):
        return draft[len(streamed):]
    cut = len(streamed)
    if cut >= len(draft):
        return ""
    if streamed and not streamed[-1].isspace() and not draft[cut].isspace() and not draft[cut - 1].isspace():
        boundary = next((k for k in range(cut, len(draft)) if draft[k].isspace()), len(draft))
        cut = boundary
    return draft[cut:]


StreamEvent = StreamDelta | StreamItem

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

    def stream(self, items: list[RefineItem], opts: RefineOptions, deadline: float,
               span: Span) -> Iterator[StreamEvent]: ...

    def close(self) -> None: ...


class AsyncTransport(Protocol):
    """The asyncio form of :class:`Transport`."""

    backend: str
    model: str | None
    max_items: int | None

    async def send(self, items: list[RefineItem], opts: RefineOptions, deadline: float,
                   span: Span) -> RefineResponse: ...

    def stream(self, items: list[RefineItem], opts: RefineOptions, deadline: float,
               span: Span) -> AsyncIterator[StreamEvent]: ...

    async def aclose(self) -> None: ...


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

    def offsets(self, max_items: int | None) -> list[tuple[int, list[RefineItem]]]:
        """The batches with the position in ``todo`` of each one's first item."""
        out, first = [], 0
        for batch in self.batches(max_items):
            out.append((first, batch))
            first += len(batch)
        return out


def _merge(parts: Sequence[RefineResponse]) -> RefineResponse:
    if len(parts) == 1:
        return parts[0]
    return RefineResponse(items=[x for p in parts for x in p.items], model=parts[0].model, timing=parts[-1].timing)


@dataclass
class _Result:
    """What a guarded call ends with: the answer, or (fail-open) the error that stopped it."""

    span: Span
    value: RefineResponse | BaseException | None = None


class _ClientCore:
    """Everything a call does around the transport's send, for both client flavours."""

    def __init__(self, transport: Transport | AsyncTransport, settings: DiffPOSettings | None = None) -> None:
        self.transport = transport
        self.settings = settings or DiffPOSettings()
        self.backend = transport.backend
        self.model = transport.model

    @contextmanager
    def _guard(self, call: _Call, fail_open: bool) -> Iterator[_Result]:
        """The call's span around the send; an error is recorded, then raised or (fail-open) kept."""
        with self._span(call) as span:
            result = _Result(span)
            try:
                yield result
            except Exception as e:
                self._failed(span, e, fail_open, call)
                if not fail_open:
                    raise
                result.value = e
            else:
                assert isinstance(result.value, RefineResponse)
                self._succeeded(span, result.value, call)

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

    def _failed(self, span: Span, error: BaseException, fail_open: bool, call: _Call) -> None:
        tracing.record_fallback(span, error, fail_open=fail_open)
        record_call(time.perf_counter() - call.started, model=self.model, error=error)
        if fail_open:
            warn_once(REFINER_FAILED, f"the refiner could not answer, so drafts come back unrefined (marked "
                                      f"refined=False, reason 'refiner_failed'); first cause: "
                                      f"{type(error).__name__}: {error}. Later ones are logged at debug level.")

    def _succeeded(self, span: Span, resp: RefineResponse, call: _Call) -> None:
        tracing.record_response(span, resp, capture_content=self.settings.capture_content)
        record_call(time.perf_counter() - call.started, model=self.model, response=resp)

    def _outcomes(self, call: _Call, result: RefineResponse | BaseException | None) -> list[Outcome]:
        """One outcome per item, in order: refined, failed open, or held back for want of a prompt."""
        base = {"backend": self.backend}
        out = [Outcome(item.draft, False, {"refined": False, "reason": NO_PROMPT, "prompt": src, **base})
               for item, src in zip(call.items, call.sources)]
        if isinstance(result, BaseException):
            for i in call.todo:
                out[i] = self._failed_outcome(call, i, result, call.items[i].draft)
            return out
        if result is None:
            return out
        server_ms = result.timing.get("total_ms") if result.timing else None
        for i, item in zip(call.todo, result.items):
            out[i] = self._refined_outcome(call, i, item, result.model, server_ms)
        return out

    def _failed_outcome(self, call: _Call, i: int, error: BaseException, text: str) -> Outcome:
        return Outcome(text, False, {"refined": False, "reason": REFINER_FAILED, "error": f"{type(error).__name__}: "
                                     f"{error}", "prompt": call.sources[i], "backend": self.backend})

    def _refined_outcome(self, call: _Call, i: int, item: RefinedItem, model: str | None,
                         server_ms: float | None) -> Outcome:
        return Outcome(item.text, True, {
            "refined": True,
            "model": model,
            "block_size": call.opts.block_size,
            "iterations": item.iterations,
            "new_tokens": item.new_tokens,
            "passes_per_token": round(item.passes_per_token, 4),
            "converged": item.converged,
            "finish_reason": item.finish_reason,
            "prompt": call.sources[i],
            "backend": self.backend,
            "latency_ms": round((time.perf_counter() - call.started) * 1000, 3),
            "server_ms": None if server_ms is None else round(float(server_ms), 3),
        })

    def _open_stream(self, items: Sequence[RefineItem | dict[str, Any]], options: dict[str, Any],
                     fail_open: bool | None, prompt_sources: Sequence[str] | None) -> _Streaming:
        fail_open = self.settings.fail_open if fail_open is None else fail_open
        return _Streaming(self, self._begin(items, options, prompt_sources, strict=not fail_open), fail_open)


class _Streaming:
    """One streaming call, written once for both clients: wire events in, :class:`StreamPiece`s out.

    The call's span is current only while the call's own code runs (in a context of its
    own, entered around each transport step), never in the caller's code between pieces.
    """

    def __init__(self, core: _ClientCore, call: _Call, fail_open: bool) -> None:
        self.core, self.call, self.fail_open = core, call, fail_open
        self.context = contextvars.copy_context()
        self.streamed: dict[int, str] = {i: "" for i in call.todo}
        self.items: dict[int, RefinedItem] = {}
        self.model: str | None = core.model
        self.offset = 0
        self.span_cm = core._span(call) if call.todo else None
        self.span: Span | None = self.context.run(self.span_cm.__enter__) if self.span_cm else None
        self.closed = False

    def opening(self) -> list[StreamPiece]:
        """Items held back for want of a prompt: their draft, whole, at once."""
        held = self.core._outcomes(self.call, None)
        return [StreamPiece(i, o.text, o) for i, o in enumerate(held) if i not in self.streamed]

    def on_event(self, event: StreamEvent) -> list[StreamPiece]:
        i = self.call.todo[self.offset + event.index]
        if isinstance(event, StreamDelta):
            self.streamed[i] += event.text
            return [StreamPiece(i, event.text)] if event.text else []
        self.items[i] = event.item
        self.model = event.model or self.model
        rest = event.item.text[len(self.streamed[i]):] if event.item.text.startswith(self.streamed[i]) else ""
        self.streamed[i] += rest
        outcome = self.core._refined_outcome(self.call, i, event.item, self.model, None)
        outcome.text = self.streamed[i]  # exactly what went out
        return [StreamPiece(i, rest, outcome)]

    def failed(self, error: BaseException) -> list[StreamPiece]:
        """Fail-open: every unfinished item goes on with the rest of its draft (strict: raise)."""
        assert self.span is not None
        self.core._failed(self.span, error, self.fail_open, self.call)
        self.end(error)
        if not self.fail_open:
            raise error
        pieces = []
        for i, text in self.streamed.items():
            if i in self.items:
                continue
            rest = draft_rest(text, self.call.items[i].draft)
            outcome = self.core._failed_outcome(self.call, i, error, text + rest)
            outcome.info["streamed_chars"] = len(text)
            pieces.append(StreamPiece(i, rest, outcome))
        return pieces

    def end(self, error: BaseException | None = None) -> None:
        """Close the call's span (once), recording the answer when every item came back."""
        if self.closed or self.span_cm is None:
            return
        self.closed = True
        if error is None and len(self.items) == len(self.call.todo) and self.span is not None:
            resp = RefineResponse(items=[self.items[i] for i in self.call.todo], model=self.model or "")
            self.context.run(self.core._succeeded, self.span, resp, self.call)
        self.context.run(self.span_cm.__exit__, None, None, None)


class RefinerClient(_ClientCore):
    """A synchronous refiner client over a :class:`Transport` (thread-safe; reuse one)."""

    transport: Transport

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

    def _run(self, call: _Call, fail_open: bool) -> RefineResponse | BaseException | None:
        with self._guard(call, fail_open) as result:
            result.value = _merge([self.transport.send(batch, call.opts, call.deadline, result.span)
                                   for batch in call.batches(self.transport.max_items)])
        return result.value

    def stream(self, items: Sequence[RefineItem | dict[str, Any]], *, fail_open: bool | None = None,
               prompt_sources: Sequence[str] | None = None, **options: Any) -> Iterator[StreamPiece]:
        """The refined text as the refiner verifies it, one :class:`StreamPiece` at a time.

        Fail-open (the default from the settings) never loses a draft: one without a prompt
        comes back whole, and a refiner failing mid-stream is followed by the rest of the
        draft; each item's last piece carries its :class:`Outcome`. ``fail_open=False`` raises.
        """
        s = self._open_stream(items, options, fail_open, prompt_sources)
        yield from s.opening()
        if not s.call.todo:
            return
        events: Iterator[StreamEvent] | None = None
        try:
            for s.offset, batch in s.call.offsets(self.transport.max_items):
                events = s.context.run(self.transport.stream, batch, s.call.opts, s.call.deadline, s.span)
                while (event := s.context.run(next, events, None)) is not None:
                    yield from s.on_event(event)
                s.context.run(events.close)  # type: ignore[attr-defined]
        except Exception as e:
            yield from s.failed(e)
        finally:
            if events is not None:
                s.context.run(events.close)  # type: ignore[attr-defined]
            s.end()

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> RefinerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncRefinerClient(_ClientCore):
    """The asyncio form of :class:`RefinerClient` (use one per event loop)."""

    transport: AsyncTransport

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

    async def _run(self, call: _Call, fail_open: bool) -> RefineResponse | BaseException | None:
        with self._guard(call, fail_open) as result:
            sends = [self.transport.send(batch, call.opts, call.deadline, result.span)
                     for batch in call.batches(self.transport.max_items)]
            result.value = _merge(await asyncio.gather(*sends))
        return result.value

    async def stream(self, items: Sequence[RefineItem | dict[str, Any]], *, fail_open: bool | None = None,
                     prompt_sources: Sequence[str] | None = None, **options: Any) -> AsyncIterator[StreamPiece]:
        """See :meth:`RefinerClient.stream`."""
        s = self._open_stream(items, options, fail_open, prompt_sources)
        for piece in s.opening():
            yield piece
        if not s.call.todo:
            return
        events: AsyncIterator[StreamEvent] | None = None
        try:
            for s.offset, batch in s.call.offsets(self.transport.max_items):
                events = s.context.run(self.transport.stream, batch, s.call.opts, s.call.deadline, s.span)
                while (event := await _step(s.context, events)) is not None:
                    for piece in s.on_event(event):
                        yield piece
        except Exception as e:
            for piece in s.failed(e):
                yield piece
        finally:
            if events is not None:
                await asyncio.create_task(_aclose(events), context=s.context)
            s.end()

    async def aclose(self) -> None:
        await self.transport.aclose()

    async def __aenter__(self) -> AsyncRefinerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def _step(context: contextvars.Context, events: AsyncIterator[StreamEvent]) -> StreamEvent | None:
    """The next event, computed in the call's own context (its span current); None at the end."""
    return await asyncio.create_task(_anext(events), context=context)


async def _aclose(events: AsyncIterator[StreamEvent]) -> None:
    await events.aclose()  # type: ignore[attr-defined]


async def _anext(events: AsyncIterator[StreamEvent]) -> StreamEvent | None:
    try:
        return await events.__anext__()
    except StopAsyncIteration:
        return None
