"""``POST /v1/chat/completions``: an OpenAI-compatible refining proxy.

The request goes to the upstream LLM through LiteLLM (any provider; keys come from the
server's environment), the upstream answer becomes the draft, the loaded refiner rewrites
it, and the client gets an OpenAI ``chat.completion`` back: upstream ``usage`` kept, the
refinement's stats in an extra ``diffpo`` field. Which answers are refined is the rule
every surface shares (:mod:`diffpo_sdk.adapters.answers`): tool calls, structured output and empty
answers pass through untouched; an answer after tool results is refined, with the tool
traffic as text turns of its prompt. If the refiner cannot help (queue full, deadline, a conversation its template
cannot take), the upstream answer is returned as is, marked ``"diffpo": {"refined": false}``:
the user's answer is never lost because refinement failed.

``stream: true``: the upstream answer is drafted whole, then the refined text goes out as
``chat.completion.chunk`` events as the passes verify it (:meth:`Batcher.stream`). A
replaced text has ``logprobs: null`` (the upstream's no longer describe it); the usage
chunk (``choices: []``) comes only with ``stream_options.include_usage``; a refiner failure
mid-stream goes on with the rest of the draft (fail-open), anything else ends the stream
with an error event and ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from opentelemetry.trace import SpanKind
from pydantic import BaseModel, ConfigDict, Field

from .. import tracing
from ..adapters.convert import conversation as to_conversation
from ..adapters.answers import openai_pass_through_reason, refined_finish_reason
from ..client.core import draft_rest
from ..errors import InvalidRequestError
from ..protocol import RefineItem, RefineOptions
from .batcher import (
    DeadlineExceededError,
    OptionsKey,
    OutOfMemoryError,
    QueueFullError,
    ShuttingDownError,
)
from .responses import EventStream, error_response, sse, stream_error
from .state import ServerState, until_disconnect

log = logging.getLogger("diffpo_sdk.server")

#: OpenAI parameters forwarded upstream. Anything else (api_base, api_key, ...) is ignored:
#: a client must not redirect the server's keys to a host of its choosing.
FORWARDED_PARAMS = frozenset({
    "temperature", "top_p", "n", "stop", "max_tokens", "max_completion_tokens", "presence_penalty",
    "frequency_penalty", "logit_bias", "seed", "user", "tools", "tool_choice", "parallel_tool_calls",
    "response_format", "logprobs", "top_logprobs", "reasoning_effort", "metadata",
})
#: Refiner-side failures that fall back to the upstream answer instead of failing the call.
FAIL_OPEN = (QueueFullError, DeadlineExceededError, OutOfMemoryError, ShuttingDownError, InvalidRequestError)


class ChatMessage(BaseModel):
    """An OpenAI chat message; extra keys (name, tool_calls, tool_call_id...) pass through."""

    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(BaseModel):
    """OpenAI chat completion request, plus optional refiner options under ``diffpo``."""

    model_config = ConfigDict(extra="allow")

    model: str | None = Field(None, description="upstream LiteLLM model id; the server's --upstream-model if absent")
    messages: list[ChatMessage] = Field(..., min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    diffpo: RefineOptions | None = Field(None, description="refiner options (block_size, max_new_tokens, ...)")


class StreamOptions(BaseModel):
    """OpenAI ``stream_options``: ``include_usage`` asks for a last chunk with ``usage`` and ``choices: []``."""

    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class ChatChoice(BaseModel):
    """One answer of a ``chat.completion``; a refined one has ``logprobs: null``."""

    model_config = ConfigDict(extra="allow")

    index: int
    message: dict[str, Any]
    finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None


class ChatCompletion(BaseModel):
    """The OpenAI ``chat.completion`` the proxy answers, with the refinement's stats under ``diffpo``."""

    model_config = ConfigDict(extra="allow")

    id: str
    object: str = "chat.completion"
    created: int
    model: str | None = None
    choices: list[ChatChoice]
    usage: dict[str, Any] | None = None
    diffpo: dict[str, Any] = Field(description="refined (bool); refiner, items (per choice stats), timing; or reason")


class UpstreamError(Exception):
    def __init__(self, status: int, message: str, retry_after: str | None = None):
        super().__init__(message)
        self.status, self.retry_after = status, retry_after


def add_chat_routes(app: FastAPI, state: ServerState) -> None:
    errors = state.metrics.error

    @app.exception_handler(UpstreamError)
    async def _upstream(request: Request, exc: UpstreamError) -> JSONResponse:
        errors("upstream")
        headers = {"Retry-After": exc.retry_after} if exc.retry_after else None
        return error_response(exc.status, "upstream_error", str(exc), headers)

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses={
        200: {"content": {"text/event-stream": {}},
              "description": "with stream: true, chat.completion.chunk Server-Sent Events (see docs/serving.md)"}})
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        """OpenAI-compatible: upstream answer, refined. ``stream: true`` gives Server-Sent Events."""
        batcher = state.ready_batcher()
        model = body.model or state.config.upstream_model
        if not model:
            raise InvalidRequestError("no upstream model: name one in 'model' or start the server with --upstream-model")
        key = state.resolve_options(body.diffpo or RefineOptions())
        params = {k: v for k, v in (body.model_extra or {}).items() if k in FORWARDED_PARAMS}
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        upstream = await until_disconnect(request, _call_upstream(state, model, messages, params))

        turns = to_conversation(messages)
        choices = upstream.get("choices") or []
        structured = params.get("response_format") is not None
        skipped = [openai_pass_through_reason(ch.get("message") if isinstance(ch, dict) else None,
                                              structured=structured) for ch in choices]
        targets = [i for i, why in enumerate(skipped) if why is None]
        reason = ""
        if turns is None:
            reason = "no_prompt: the conversation has no user turn to answer; passed through untouched"
        elif not targets:
            reason = f"{skipped[0] if skipped else 'no choices'}: passed through untouched"
        items = [] if reason else [RefineItem(messages=turns, draft=choices[i]["message"]["content"]) for i in targets]
        if items:
            try:
                await state.check_items(items, key)
            except InvalidRequestError as e:
                reason = str(e)
                items = []
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return EventStream(_stream(state, upstream, items, targets, key, reason, usage))
        if not items:
            upstream["diffpo"] = {"refined": False, "reason": reason}
            return upstream
        try:
            results, stats = await until_disconnect(request, batcher.refine(items, key))
        except FAIL_OPEN as e:
            errors("refine_failed_open")
            upstream["diffpo"] = {"refined": False, "reason": str(e)}
            return upstream
        for i, res in zip(targets, results):
            upstream["choices"][i]["message"]["content"] = res.text
            upstream["choices"][i]["finish_reason"] = refined_finish_reason(res.finish_reason)
            upstream["choices"][i]["logprobs"] = None  # the upstream's describe a text no longer there
        upstream["diffpo"] = _stats(state, results, stats)
        _log_content(state, messages, items, results)
        return upstream


async def _call_upstream(state: ServerState, model: str, messages: list[dict], params: dict[str, Any]) -> dict[str, Any]:
    cfg = state.config
    litellm = await asyncio.to_thread(importlib.import_module, "litellm")  # slow first import, off the loop
    litellm.suppress_debug_info = True
    kwargs: dict[str, Any] = {"model": model, "messages": messages, "timeout": cfg.upstream_timeout, **params}
    if cfg.upstream_api_base:
        kwargs["api_base"] = cfg.upstream_api_base
    kwargs.update(cfg.upstream_extra)
    provider = _provider(litellm, model)
    with state.tracer.start_as_current_span(f"{tracing.OPERATION} {model}", kind=SpanKind.CLIENT,
                                            attributes=tracing.upstream_attributes(model, provider)) as span:
        try:
            resp = await litellm.acompletion(**kwargs)
        except Exception as e:
            status = getattr(e, "status_code", None)
            span.set_attribute(tracing.ERROR_TYPE, type(e).__name__)
            if status in (400, 404, 422):
                raise UpstreamError(400, f"the upstream LLM rejected the request: {e}") from e
            if status == 429:
                raise UpstreamError(429, f"the upstream LLM is rate limiting: {e}", retry_after="5") from e
            if status == 408 or "timeout" in type(e).__name__.lower():
                raise UpstreamError(504, f"the upstream LLM timed out: {e}") from e
            raise UpstreamError(502, f"the upstream LLM call failed ({type(e).__name__}): {e}") from e
        out = resp.model_dump() if hasattr(resp, "model_dump") else dict(resp)
        out.pop("_hidden_params", None)
        if isinstance(out.get("usage"), dict):  # LiteLLM fills absent details with nulls
            out["usage"] = {k: v for k, v in out["usage"].items() if v is not None}
        tracing.record_upstream(span, out)
    return out


def _provider(litellm: Any, model: str) -> str:
    """LiteLLM's name for the model's provider (``openai``, ``anthropic``, ...), for ``gen_ai.provider.name``."""
    try:
        return str(litellm.get_llm_provider(model)[1])
    except Exception:  # noqa: BLE001 (an unknown model still gets its call traced)
        return "litellm"


def _stats(state: ServerState, results: list[Any], stats: dict[str, float]) -> dict[str, Any]:
    return {
        "refined": True,
        "refiner": state.engine.model_name,
        "items": [
            {
                "iterations": r.iterations,
                "new_tokens": r.new_tokens,
                "converged": r.converged,
                "finish_reason": refined_finish_reason(r.finish_reason),
                "passes_per_token": r.iterations / max(r.new_tokens, 1),
            }
            for r in results
        ],
        "timing": {k: float(v) for k, v in stats.items()},
    }


def _log_content(state: ServerState, messages: list[dict], items: list[RefineItem], results: list[Any]) -> None:
    if state.config.log_content:
        for item, res in zip(items, results):
            log.info("proxy refined: messages=%r draft=%r answer=%r", messages, item.draft, res.text)


# -- streaming ---------------------------------------------------------------------------------


async def _stream(
    state: ServerState,
    upstream: dict[str, Any],
    items: list[RefineItem],
    targets: list[int],
    key: OptionsKey,
    reason: str,
    include_usage: bool,
) -> AsyncIterator[str]:
    """The refined answer as the passes verify it, as OpenAI ``chat.completion.chunk`` events."""
    base = {
        "id": upstream.get("id") or f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion.chunk",
        "created": upstream.get("created") or int(time.time()),
        "model": upstream.get("model"),
    }
    choices = upstream.get("choices") or []
    index = {i: ch.get("index", i) for i, ch in enumerate(choices)}

    def chunk(i: int, delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        choice = {"index": index[i], "delta": delta, "finish_reason": finish, "logprobs": None}
        return sse({**base, "choices": [choice], **extra})

    for i in range(len(choices)):
        yield chunk(i, {"role": "assistant"})
    finish = {i: ch.get("finish_reason") or "stop" for i, ch in enumerate(choices)}
    diffpo: dict[str, Any] = {"refined": False, "reason": reason}

    if items:
        streamed = ["" for _ in items]
        results: dict[int, Any] = {}
        deltas = state.ready_batcher().stream(items, key)
        try:
            async for d in deltas:
                if d.text:
                    streamed[d.index] += d.text
                    yield chunk(targets[d.index], {"content": d.text})
                if d.result is not None:
                    results[d.index] = d.result
        except FAIL_OPEN as e:  # the refiner gave up: the rest of each draft follows, marked unrefined
            state.metrics.error("refine_failed_open")
            diffpo = {"refined": False, "reason": str(e), "partial": any(streamed)}
            for k, item in enumerate(items):
                if k not in results and (rest := draft_rest(streamed[k], item.draft)):
                    yield chunk(targets[k], {"content": rest})
        except Exception as e:  # noqa: BLE001 (the 200 is out: say so in the stream, never just stop)
            state.metrics.error("stream_failed")
            log.warning("a streamed chat completion failed mid-stream: %s", type(e).__name__)
            yield sse(stream_error(e))
            yield "data: [DONE]\n\n"
            return
        else:
            ordered = [results[k] for k in range(len(items))]
            for k, res in enumerate(ordered):
                finish[targets[k]] = refined_finish_reason(res.finish_reason)
            diffpo = _stats(state, ordered, {})
            _log_content(state, [], items, ordered)
        finally:
            await deltas.aclose()  # type: ignore[attr-defined]  (a hang-up drops this request's rows now)

    untouched = sorted(set(range(len(choices))) - (set(targets) if items else set()))
    for i in untouched:
        msg = choices[i].get("message") or {}
        delta = {k: msg[k] for k in ("content", "function_call") if msg.get(k)}
        if msg.get("tool_calls"):  # streamed tool calls carry their position
            delta["tool_calls"] = [{**tc, "index": n} for n, tc in enumerate(msg["tool_calls"])]
        if delta:
            yield sse({**base, "choices": [{"index": index[i], "delta": delta, "finish_reason": None,
                                            "logprobs": choices[i].get("logprobs")}]})
    for i in range(len(choices)):
        last = i == len(choices) - 1
        yield chunk(i, {}, finish[i], **({"diffpo": diffpo} if last else {}))
    if include_usage:
        yield sse({**base, "choices": [], "usage": upstream.get("usage")})
    yield "data: [DONE]\n\n"
