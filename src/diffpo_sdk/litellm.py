"""LiteLLM drop-ins: ``completion`` / ``acompletion`` call the LLM, then refine its answer.

They take LiteLLM's arguments unchanged plus a few refinement options, and return
LiteLLM's own types: a ``ModelResponse`` whose choices hold the refined text, or, with
``stream=True``, an iterator of ``ModelResponseStream`` chunks. Streams are collected
(the refiner needs the whole draft), refined, and re-emitted; the chunks rebuild with
``litellm.stream_chunk_builder``. Stats per choice are in
``choice.message.provider_specific_fields["diffpo"]`` (for streams, in the first
re-emitted chunk's ``delta.provider_specific_fields["diffpo"]``).

Only text answers are refined: choices with tool calls, and structured output
(``response_format``), are returned untouched. LiteLLM is imported on first call.

Tracing: one ``diffpo.completion`` root span holds the LLM call and the refinement as
siblings. LiteLLM's "otel" callback writes onto the *current* span instead of opening
its own when one is active, so the root is passed as ``litellm_parent_otel_span`` and
LiteLLM's ``litellm_request`` span nests under it.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

from opentelemetry import trace

from . import tracing
from ._convert import conversation
from .client import Outcome, shared_async_client, shared_client
from .protocol import RefineItem
from .settings import DiffPOSettings

__all__ = ["acompletion", "completion", "arefine_response", "refine_response"]

_OPTION_NAMES = ("block_size", "max_iterations", "max_new_tokens")


def _settings(settings: DiffPOSettings | None, refiner_endpoint: Any, fail_open: bool | None,
              options: dict[str, Any]) -> DiffPOSettings:
    return (settings or DiffPOSettings()).merged(endpoint=refiner_endpoint, fail_open=fail_open, **options)


def _options(settings: DiffPOSettings) -> dict[str, Any]:
    return {"block_size": settings.block_size, "max_new_tokens": settings.max_new_tokens,
            "max_iterations": settings.max_iterations}


# -- what to refine in a response -------------------------------------------------------------


def _targets(response: Any, messages: Any, request: dict[str, Any]) -> tuple[list[Any], list[RefineItem], str]:
    """The choices with a text answer, their refine items, and where the prompt came from."""
    if request.get("response_format") is not None:  # structured output: refining would break the JSON
        return [], [], "none"
    turns = conversation(messages)
    source = "explicit" if turns else "none"
    choices, items = [], []
    for choice in getattr(response, "choices", None) or []:
        msg = getattr(choice, "message", None)
        if msg is None or getattr(msg, "tool_calls", None) or getattr(msg, "function_call", None):
            continue
        if not isinstance(msg.content, str):
            continue
        choices.append(choice)
        draft = msg.content
        items.append(RefineItem(messages=turns, draft=draft) if turns else RefineItem(prompt="", draft=draft))
    return choices, items, source


def _apply(choices: list[Any], outcomes: list[Outcome]) -> None:
    for choice, outcome in zip(choices, outcomes):
        msg = choice.message
        if outcome.refined:
            msg.content = outcome.text
        msg.provider_specific_fields = {**(msg.provider_specific_fields or {}), "diffpo": outcome.info}


def _mark_root(root: Any, outcomes: list[Outcome]) -> None:
    if outcomes and root.is_recording():
        root.set_attribute(tracing.DIFFPO_REFINED, all(o.refined for o in outcomes))
        errors = [o.info["error"] for o in outcomes if not o.refined]
        if errors:
            root.set_attribute(tracing.DIFFPO_FALLBACK_REASON, errors[0][:500])


def refine_response(response: Any, messages: Any, *, settings: DiffPOSettings | None = None,
                    request: dict[str, Any] | None = None) -> Any:
    """Refine a LiteLLM ``ModelResponse`` in place (text choices only) and return it."""
    s = settings or DiffPOSettings()
    choices, items, source = _targets(response, messages, request or {})
    if items:
        outcomes = shared_client(s).refine_or_keep(items, fail_open=s.fail_open, prompt_sources=[source] * len(items),
                                                   **_options(s))
        _apply(choices, outcomes)
        _mark_root(trace.get_current_span(), outcomes)
    return response


async def arefine_response(response: Any, messages: Any, *, settings: DiffPOSettings | None = None,
                           request: dict[str, Any] | None = None) -> Any:
    """Async twin of :func:`refine_response`."""
    s = settings or DiffPOSettings()
    choices, items, source = _targets(response, messages, request or {})
    if items:
        outcomes = await shared_async_client(s).refine_or_keep(
            items, fail_open=s.fail_open, prompt_sources=[source] * len(items), **_options(s)
        )
        _apply(choices, outcomes)
        _mark_root(trace.get_current_span(), outcomes)
    return response


# -- streams ------------------------------------------------------------------------------------


def _reemit(built: Any, first: Any, last: Any) -> list[Any]:
    """Chunks that carry the (refined) response: its text, then each choice's finish reason."""
    from litellm.types.utils import Delta, ModelResponseStream, StreamingChoices

    meta = {"id": built.id, "created": built.created, "model": getattr(first, "model", None) or built.model}
    out = []
    for choice in built.choices:
        msg = choice.message
        delta = Delta(role="assistant", content=msg.content, tool_calls=msg.tool_calls,
                      provider_specific_fields=msg.provider_specific_fields)
        out.append(ModelResponseStream(**meta, choices=[StreamingChoices(index=choice.index, delta=delta)]))
    ends = [StreamingChoices(index=c.index, delta=Delta(), finish_reason=c.finish_reason) for c in built.choices]
    end = ModelResponseStream(**meta, choices=ends)
    usage = getattr(last, "usage", None)
    if usage is not None:
        end.usage = usage  # type: ignore[attr-defined]
    out.append(end)
    return out


def _rebuild(chunks: list[Any], messages: Any) -> Any:
    import litellm

    return litellm.stream_chunk_builder(chunks, messages=messages) if chunks else None


def refine_stream(chunks: Iterator[Any], messages: Any, *, settings: DiffPOSettings | None = None,
                  request: dict[str, Any] | None = None) -> Iterator[Any]:
    """Collect a LiteLLM stream, refine its answer, and yield it again as chunks.

    Streams whose answer has tool calls (or any choice the refiner must not touch)
    are passed through chunk for chunk.
    """
    collected = list(chunks)
    built = _rebuild(collected, messages)
    choices, items, _ = _targets(built, messages, request or {})
    if built is None or not items or len(items) != len(built.choices):
        yield from collected
        return
    refine_response(built, messages, settings=settings, request=request)
    yield from _reemit(built, collected[0], collected[-1])


async def arefine_stream(chunks: AsyncIterator[Any], messages: Any, *, settings: DiffPOSettings | None = None,
                         request: dict[str, Any] | None = None) -> AsyncIterator[Any]:
    """Async twin of :func:`refine_stream`."""
    collected = [c async for c in chunks]
    built = _rebuild(collected, messages)
    choices, items, _ = _targets(built, messages, request or {})
    if built is None or not items or len(items) != len(built.choices):
        for c in collected:
            yield c
        return
    await arefine_response(built, messages, settings=settings, request=request)
    for c in _reemit(built, collected[0], collected[-1]):
        yield c


# -- the drop-ins -----------------------------------------------------------------------------


def _root(model: Any) -> Any:
    return tracing.tracer().start_span(tracing.COMPLETION_SPAN, attributes={tracing.DIFFPO_BASE_MODEL: str(model)})


def _with_parent(kwargs: dict[str, Any], root: Any) -> dict[str, Any]:
    """Hand the root span to LiteLLM so its own span nests under it (not on it)."""
    if not root.is_recording():
        return kwargs
    metadata = dict(kwargs.get("metadata") or {})
    metadata.setdefault("litellm_parent_otel_span", root)
    return {**kwargs, "metadata": metadata}


def completion(
    model: str,
    messages: list[dict[str, Any]],
    *,
    refine: bool = True,
    block_size: int | str | None = None,
    max_iterations: int | None = None,
    max_new_tokens: int | None = None,
    fail_open: bool | None = None,
    refiner_endpoint: str | list[str] | None = None,
    refiner_settings: DiffPOSettings | None = None,
    **kwargs: Any,
) -> Any:
    """``litellm.completion(model, messages, **kwargs)``, then the answer refined.

    Refinement options default to the ``DIFFPO_*`` settings; ``refine=False`` is plain
    LiteLLM. Returns a ``ModelResponse``, or an iterator of chunks with ``stream=True``.
    """
    import litellm

    s = _settings(refiner_settings, refiner_endpoint, fail_open,
                  {"block_size": block_size, "max_iterations": max_iterations, "max_new_tokens": max_new_tokens})
    root = _root(model)
    request = {"response_format": kwargs.get("response_format")}
    stream = bool(kwargs.get("stream"))
    try:
        with trace.use_span(root, end_on_exit=False):
            response = litellm.completion(model=model, messages=messages, **_with_parent(kwargs, root))
            if not refine:
                root.end()
                return response
            if not stream:
                refine_response(response, messages, settings=s, request=request)
                root.end()
                return response
    except BaseException:
        root.end()
        raise
    return _traced_stream(refine_stream(response, messages, settings=s, request=request), root)


def _traced_stream(chunks: Iterator[Any], root: Any) -> Iterator[Any]:
    try:
        while True:
            with trace.use_span(root, end_on_exit=False):  # never across a yield
                try:
                    chunk = next(chunks)
                except StopIteration:
                    return
            yield chunk
    finally:
        root.end()


async def acompletion(
    model: str,
    messages: list[dict[str, Any]],
    *,
    refine: bool = True,
    block_size: int | str | None = None,
    max_iterations: int | None = None,
    max_new_tokens: int | None = None,
    fail_open: bool | None = None,
    refiner_endpoint: str | list[str] | None = None,
    refiner_settings: DiffPOSettings | None = None,
    **kwargs: Any,
) -> Any:
    """Async twin of :func:`completion`: ``await`` it; with ``stream=True`` iterate with ``async for``."""
    import litellm

    s = _settings(refiner_settings, refiner_endpoint, fail_open,
                  {"block_size": block_size, "max_iterations": max_iterations, "max_new_tokens": max_new_tokens})
    root = _root(model)
    request = {"response_format": kwargs.get("response_format")}
    stream = bool(kwargs.get("stream"))
    try:
        with trace.use_span(root, end_on_exit=False):
            response = await litellm.acompletion(model=model, messages=messages, **_with_parent(kwargs, root))
            if not refine:
                root.end()
                return response
            if not stream:
                await arefine_response(response, messages, settings=s, request=request)
                root.end()
                return response
    except BaseException:
        root.end()
        raise
    return _atraced_stream(arefine_stream(response, messages, settings=s, request=request), root)


async def _atraced_stream(chunks: AsyncIterator[Any], root: Any) -> AsyncIterator[Any]:
    try:
        while True:
            with trace.use_span(root, end_on_exit=False):
                try:
                    chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    return
            yield chunk
    finally:
        with contextlib.suppress(Exception):
            await chunks.aclose()  # type: ignore[attr-defined]
        root.end()
