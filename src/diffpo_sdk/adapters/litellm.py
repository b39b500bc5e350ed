"""LiteLLM drop-ins: ``completion`` / ``acompletion`` call the LLM, then refine its answer.

They take LiteLLM's arguments unchanged plus a few refinement options, and return
LiteLLM's own types: a ``ModelResponse`` whose choices hold the refined text, or, with
``stream=True``, an iterator of ``ModelResponseStream`` chunks. The upstream stream is
collected (the refiner needs the whole draft), then the refined answer streams out as the
refiner verifies it; the chunks rebuild with ``litellm.stream_chunk_builder``. Stats per
choice are in ``choice.message.provider_specific_fields["diffpo"]`` (for streams, in the
``delta.provider_specific_fields["diffpo"]`` of each choice's last text chunk). If the
refiner fails mid-stream, the rest of the draft follows (fail-open), marked unrefined.

Only text answers are refined: choices with tool calls, structured output
(``response_format``) and empty answers are returned untouched (the rule, shared by every
surface, is :mod:`diffpo_sdk.adapters.answers`); a refined choice's ``finish_reason`` is the
refiner's (``"length"`` when it ran out of tokens, else ``"stop"``). LiteLLM is imported
on first call.

Tracing: one ``diffpo.completion`` root span holds the LLM call and the refinement as
siblings. LiteLLM's "otel" callback writes onto the *current* span instead of opening
its own when one is active, so the root is passed as ``litellm_parent_otel_span`` and
LiteLLM's ``litellm_request`` span nests under it.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace

from .. import tracing
from ..client import Outcome, StreamPiece, shared_async_client, shared_client
from ..protocol import RefineItem
from ..settings import DiffPOSettings
from .answers import openai_pass_through_reason, refined_finish_reason
from .convert import conversation

__all__ = ["acompletion", "aiter_in_span", "arefine_response", "arefine_stream", "completion", "refine_response",
           "refine_stream"]

def _settings(settings: DiffPOSettings | None, refiner_endpoint: Any, fail_open: bool | None,
              options: dict[str, Any]) -> DiffPOSettings:
    return (settings or DiffPOSettings()).merged(endpoint=refiner_endpoint, fail_open=fail_open, **options)


# -- what to refine in a response -------------------------------------------------------------


@dataclass
class _Plan:
    """The choices of a response that get refined, and the call that refines them."""

    choices: list[Any]
    call: dict[str, Any]


def _plan(response: Any, messages: Any, settings: DiffPOSettings, request: dict[str, Any]) -> _Plan | None:
    """The text choices to refine (the rule is :mod:`diffpo_sdk.adapters.answers`), or None when there are none."""
    structured = request.get("response_format") is not None
    turns = conversation(messages)
    choices = [c for c in getattr(response, "choices", None) or []
               if openai_pass_through_reason(getattr(c, "message", None), structured=structured) is None]
    if not choices:
        return None
    items = [RefineItem(messages=turns, draft=c.message.content) if turns
             else RefineItem(prompt="", draft=c.message.content) for c in choices]
    call = {"items": items, "fail_open": settings.fail_open,
            "prompt_sources": ["explicit" if turns else "none"] * len(items), "block_size": settings.block_size,
            "max_new_tokens": settings.max_new_tokens, "max_iterations": settings.max_iterations}
    return _Plan(choices, call)


def _apply(plan: _Plan, outcomes: list[Outcome]) -> None:
    for choice, outcome in zip(plan.choices, outcomes):
        msg = choice.message
        if outcome.refined:
            msg.content = outcome.text
            choice.finish_reason = refined_finish_reason(outcome.info["finish_reason"])
        msg.provider_specific_fields = {**(msg.provider_specific_fields or {}), "diffpo": outcome.info}
    _mark_root(outcomes)


def _mark_root(outcomes: list[Outcome]) -> None:
    """The call's root span says whether every choice was refined, and why not."""
    root = trace.get_current_span()
    if outcomes and root.is_recording():
        root.set_attribute(tracing.DIFFPO_REFINED, all(o.refined for o in outcomes))
        errors = [o.info.get("error") or o.info.get("reason", "") for o in outcomes if not o.refined]
        if errors:
            root.set_attribute(tracing.DIFFPO_FAIL_OPEN_REASON, errors[0][:500])


def refine_response(response: Any, messages: Any, *, settings: DiffPOSettings | None = None,
                    request: dict[str, Any] | None = None) -> Any:
    """Refine a LiteLLM ``ModelResponse`` in place (text choices only) and return it."""
    s = settings or DiffPOSettings()
    if plan := _plan(response, messages, s, request or {}):
        _apply(plan, shared_client(s).refine_or_keep(**plan.call))
    return response


async def arefine_response(response: Any, messages: Any, *, settings: DiffPOSettings | None = None,
                           request: dict[str, Any] | None = None) -> Any:
    """:func:`refine_response` for asyncio."""
    s = settings or DiffPOSettings()
    if plan := _plan(response, messages, s, request or {}):
        _apply(plan, await shared_async_client(s).refine_or_keep(**plan.call))
    return response


# -- streams ------------------------------------------------------------------------------------


class _Reemitter:
    """Refined pieces as LiteLLM stream chunks: each choice's text as it is verified (its role on
    the first, its stats on the last), then one chunk with every finish reason and the usage."""

    def __init__(self, built: Any, plan: _Plan, first: Any, last: Any) -> None:
        self.meta = {"id": built.id, "created": built.created,
                     "model": getattr(first, "model", None) or built.model}
        self.plan, self.built, self.usage = plan, built, getattr(last, "usage", None)
        self.finish = {c.index: c.finish_reason for c in built.choices}
        self.opened: set[int] = set()
        self.outcomes: dict[int, Outcome] = {}

    def chunks(self, piece: StreamPiece) -> list[Any]:
        from litellm.types.utils import Delta, ModelResponseStream, StreamingChoices

        index = self.plan.choices[piece.index].index
        if not piece.text and piece.outcome is None:
            return []
        delta = Delta(content=piece.text, role=None if index in self.opened else "assistant")
        self.opened.add(index)
        if piece.outcome is not None:
            self.outcomes[piece.index] = piece.outcome
            delta.provider_specific_fields = {"diffpo": piece.outcome.info}
            if piece.outcome.refined:
                self.finish[index] = refined_finish_reason(piece.outcome.info["finish_reason"])
        return [ModelResponseStream(**self.meta, choices=[StreamingChoices(index=index, delta=delta)])]

    def end(self) -> Any:
        from litellm.types.utils import Delta, ModelResponseStream, StreamingChoices

        _mark_root([self.outcomes[k] for k in sorted(self.outcomes)])
        ends = [StreamingChoices(index=i, delta=Delta(), finish_reason=f) for i, f in self.finish.items()]
        end = ModelResponseStream(**self.meta, choices=ends)
        if self.usage is not None:
            end.usage = self.usage  # type: ignore[attr-defined]
        return end


def _rebuild(chunks: list[Any], messages: Any) -> Any:
    import litellm

    return litellm.stream_chunk_builder(chunks, messages=messages) if chunks else None


def _refinable_stream(collected: list[Any], messages: Any, settings: DiffPOSettings,
                      request: dict[str, Any] | None) -> _Reemitter | None:
    """The stream's refined re-emission when every choice gets refined, else None (pass it through)."""
    built = _rebuild(collected, messages)
    plan = None if built is None else _plan(built, messages, settings, request or {})
    if plan is None or len(plan.choices) != len(built.choices):
        return None
    return _Reemitter(built, plan, collected[0], collected[-1])


def refine_stream(chunks: Iterator[Any], messages: Any, *, settings: DiffPOSettings | None = None,
                  request: dict[str, Any] | None = None) -> Iterator[Any]:
    """Collect a LiteLLM stream (the draft), then yield its refined answer as the refiner verifies it.

    Streams whose answer has tool calls (or any choice the refiner must not touch)
    are passed through chunk for chunk.
    """
    s = settings or DiffPOSettings()
    collected = list(chunks)
    out = _refinable_stream(collected, messages, s, request)
    if out is None:
        yield from collected
        return
    for piece in shared_client(s).stream(**out.plan.call):
        yield from out.chunks(piece)
    yield out.end()


async def arefine_stream(chunks: AsyncIterator[Any], messages: Any, *, settings: DiffPOSettings | None = None,
                         request: dict[str, Any] | None = None) -> AsyncIterator[Any]:
    """:func:`refine_stream` for asyncio."""
    s = settings or DiffPOSettings()
    collected = [c async for c in chunks]
    out = _refinable_stream(collected, messages, s, request)
    if out is None:
        for c in collected:
            yield c
        return
    async for piece in shared_async_client(s).stream(**out.plan.call):
        for c in out.chunks(piece):
            yield c
    yield out.end()


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


@dataclass
class _Completion:
    """One drop-in call: its settings, its root span, and LiteLLM's arguments."""

    settings: DiffPOSettings
    root: Any
    request: dict[str, Any]
    kwargs: dict[str, Any]
    refine: bool
    stream: bool

    def done(self) -> bool:
        """Whether the call returns LiteLLM's answer now (and so ends its span): not a refined stream."""
        if self.refine and self.stream:
            return False
        self.root.end()
        return True


def _begin(model: str, refine: bool, block_size: int | str | None, max_iterations: int | None,
           max_new_tokens: int | None, fail_open: bool | None, refiner_endpoint: Any,
           refiner_settings: DiffPOSettings | None, kwargs: dict[str, Any]) -> _Completion:
    s = _settings(refiner_settings, refiner_endpoint, fail_open,
                  {"block_size": block_size, "max_iterations": max_iterations, "max_new_tokens": max_new_tokens})
    root = _root(model)
    return _Completion(s, root, {"response_format": kwargs.get("response_format")}, _with_parent(kwargs, root),
                       refine, bool(kwargs.get("stream")))


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

    c = _begin(model, refine, block_size, max_iterations, max_new_tokens, fail_open, refiner_endpoint,
               refiner_settings, kwargs)
    try:
        with trace.use_span(c.root, end_on_exit=False):
            response = litellm.completion(model=model, messages=messages, **c.kwargs)
            if c.refine and not c.stream:
                refine_response(response, messages, settings=c.settings, request=c.request)
    except BaseException:
        c.root.end()
        raise
    if c.done():
        return response
    return _traced_stream(refine_stream(response, messages, settings=c.settings, request=c.request), c.root)


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
    """:func:`completion` for asyncio: ``await`` it; with ``stream=True`` iterate with ``async for``."""
    import litellm

    c = _begin(model, refine, block_size, max_iterations, max_new_tokens, fail_open, refiner_endpoint,
               refiner_settings, kwargs)
    try:
        with trace.use_span(c.root, end_on_exit=False):
            response = await litellm.acompletion(model=model, messages=messages, **c.kwargs)
            if c.refine and not c.stream:
                await arefine_response(response, messages, settings=c.settings, request=c.request)
    except BaseException:
        c.root.end()
        raise
    if c.done():
        return response
    return aiter_in_span(arefine_stream(response, messages, settings=c.settings, request=c.request), c.root,
                         end=True)


async def aiter_in_span(chunks: AsyncIterator[Any], span: Any, *, end: bool = False) -> AsyncIterator[Any]:
    """``chunks``, each one produced with ``span`` current (never across a yield); ``end`` ends the span after."""
    try:
        while True:
            with trace.use_span(span, end_on_exit=False):
                try:
                    chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    return
            yield chunk
    finally:
        with contextlib.suppress(Exception):
            await chunks.aclose()  # type: ignore[attr-defined]
        if end:
            span.end()
