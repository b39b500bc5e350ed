"""OpenTelemetry span names and attributes for refinement calls.

GenAI semantic-convention keys are written as plain strings: the Python semconv
constants for ``gen_ai.*`` are deprecated and keep moving. A refinement is a chat
generation by the refiner model, so its span is ``chat {model}`` with provider
``diffpo``; what is specific to DiffPO goes under ``diffpo.*``. Prompt and answer text
is recorded only when ``capture_content`` is on, which by default follows OpenTelemetry's
``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT`` (``DIFFPO_CAPTURE_CONTENT`` overrides it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

if TYPE_CHECKING:
    from .protocol import RefineItem, RefineResponse

TRACER_NAME = "diffpo_sdk"
PROVIDER = "diffpo"

# GenAI semantic conventions (https://opentelemetry.io/docs/specs/semconv/gen-ai/)
GEN_AI_OPERATION_NAME = "gen_ai.operation.name"
GEN_AI_PROVIDER_NAME = "gen_ai.provider.name"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
GEN_AI_RESPONSE_MODEL = "gen_ai.response.model"
GEN_AI_RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
GEN_AI_RESPONSE_ID = "gen_ai.response.id"
GEN_AI_USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
GEN_AI_INPUT_MESSAGES = "gen_ai.input.messages"
GEN_AI_OUTPUT_MESSAGES = "gen_ai.output.messages"
SERVER_ADDRESS = "server.address"
SERVER_PORT = "server.port"
ERROR_TYPE = "error.type"

# DiffPO-specific
DIFFPO_BACKEND = "diffpo.backend"
DIFFPO_BATCH_SIZE = "diffpo.batch_size"
DIFFPO_BLOCK_SIZE = "diffpo.block_size"
DIFFPO_MAX_ITERATIONS = "diffpo.max_iterations"
DIFFPO_PASSES = "diffpo.passes"
DIFFPO_PASSES_PER_TOKEN = "diffpo.passes_per_token"
DIFFPO_CONVERGED = "diffpo.converged"
DIFFPO_REFINED = "diffpo.refined"
DIFFPO_FAIL_OPEN_REASON = "diffpo.fail_open_reason"
DIFFPO_PROMPT_SOURCE = "diffpo.prompt_source"
DIFFPO_ATTEMPTS = "diffpo.attempts"
DIFFPO_SERVER_MS = "diffpo.server_ms"
DIFFPO_BASE_MODEL = "diffpo.base_model"
#: span event added before each retry
RETRY_EVENT = "diffpo.retry"
#: the root span opened around a LiteLLM call plus its refinement
COMPLETION_SPAN = "diffpo.completion"

OPERATION = "chat"

#: OpenTelemetry's switch for GenAI message content; ``true`` or a value naming spans turns it on
CAPTURE_CONTENT_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
_CAPTURE_ON = frozenset({"true", "1", "yes", "on", "span_only", "span_and_event"})

_tracer = trace.get_tracer(TRACER_NAME)


def capture_content_default() -> bool:
    """Whether ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT`` asks for content on spans (off unless set)."""
    return os.environ.get(CAPTURE_CONTENT_ENV, "").strip().lower() in _CAPTURE_ON


def tracer() -> trace.Tracer:
    return _tracer


@contextmanager
def refine_span(
    items: Sequence[RefineItem],
    *,
    backend: str,
    block_size: int | str,
    max_iterations: int | None,
    max_new_tokens: int,
    model: str | None,
    prompt_sources: Sequence[str],
    capture_content: bool,
) -> Iterator[Span]:
    """The span of one refinement call (one network call, any batch size)."""
    attrs: dict[str, Any] = {
        GEN_AI_OPERATION_NAME: OPERATION,
        GEN_AI_PROVIDER_NAME: PROVIDER,
        GEN_AI_REQUEST_MAX_TOKENS: max_new_tokens,
        DIFFPO_BACKEND: backend,
        DIFFPO_BATCH_SIZE: len(items),
        DIFFPO_BLOCK_SIZE: str(block_size),
        DIFFPO_PROMPT_SOURCE: _one_or_many(prompt_sources),
    }
    if model:
        attrs[GEN_AI_REQUEST_MODEL] = model
    if max_iterations is not None:
        attrs[DIFFPO_MAX_ITERATIONS] = max_iterations
    if capture_content:
        attrs[GEN_AI_INPUT_MESSAGES] = _one_or_many([_input_messages(i) for i in items])
    name = f"{OPERATION} {model or PROVIDER}"
    with _tracer.start_as_current_span(name, kind=SpanKind.CLIENT, attributes=attrs, record_exception=False,
                                       set_status_on_exception=False) as span:
        yield span


def record_response(span: Span, response: RefineResponse, *, capture_content: bool) -> None:
    """Usage and DiffPO stats of a successful call."""
    if not span.is_recording():
        return
    passes = sum(i.iterations for i in response.items)
    tokens = sum(i.new_tokens for i in response.items)
    span.update_name(f"{OPERATION} {response.model}")
    span.set_attributes({
        GEN_AI_RESPONSE_MODEL: response.model,
        GEN_AI_USAGE_OUTPUT_TOKENS: tokens,
        GEN_AI_RESPONSE_FINISH_REASONS: [i.finish_reason for i in response.items],
        DIFFPO_PASSES: passes,
        DIFFPO_PASSES_PER_TOKEN: round(passes / max(tokens, 1), 4),
        DIFFPO_CONVERGED: all(i.converged for i in response.items),
        DIFFPO_REFINED: True,
    })
    prompt_tokens = [i.prompt_tokens for i in response.items]
    if all(n is not None for n in prompt_tokens):
        span.set_attribute(GEN_AI_USAGE_INPUT_TOKENS, sum(n for n in prompt_tokens if n is not None))
    if response.id:
        span.set_attribute(GEN_AI_RESPONSE_ID, response.id)
    server_ms = response.timing.get("total_ms") if response.timing else None
    if isinstance(server_ms, (int, float)):
        span.set_attribute(DIFFPO_SERVER_MS, float(server_ms))
    if capture_content:
        out = [[{"role": "assistant", "parts": [{"type": "text", "content": i.text}], "finish_reason": i.finish_reason}]
               for i in response.items]
        span.set_attribute(GEN_AI_OUTPUT_MESSAGES, _one_or_many(out))


def record_fallback(span: Span, error: BaseException, *, fail_open: bool) -> None:
    """Mark the call unrefined: the caller got the draft (fail-open) or an error (strict)."""
    if not span.is_recording():
        return
    span.set_attributes({
        DIFFPO_REFINED: False,
        DIFFPO_FAIL_OPEN_REASON: f"{type(error).__name__}: {error}"[:500],
        ERROR_TYPE: type(error).__name__,
    })
    span.record_exception(error)
    span.set_status(Status(StatusCode.ERROR, str(error)[:200]))
    if fail_open:
        span.add_event("diffpo.fail_open", {"diffpo.returned": "draft"})


def upstream_attributes(model: str, provider: str) -> dict[str, Any]:
    """The proxy's call to its upstream LLM is a GenAI chat call of its own: ``chat {model}``."""
    return {GEN_AI_OPERATION_NAME: OPERATION, GEN_AI_PROVIDER_NAME: provider, GEN_AI_REQUEST_MODEL: model}


def record_upstream(span: Span, completion: dict[str, Any]) -> None:
    """Response id, model, finish reasons and token usage of an OpenAI-style chat completion."""
    if not span.is_recording():
        return
    usage = completion.get("usage") or {}
    attrs = {
        GEN_AI_RESPONSE_ID: completion.get("id"),
        GEN_AI_RESPONSE_MODEL: completion.get("model"),
        GEN_AI_RESPONSE_FINISH_REASONS: [str(c.get("finish_reason")) for c in completion.get("choices") or []],
        GEN_AI_USAGE_INPUT_TOKENS: usage.get("prompt_tokens"),
        GEN_AI_USAGE_OUTPUT_TOKENS: usage.get("completion_tokens"),
    }
    span.set_attributes({k: v for k, v in attrs.items() if v is not None})


def _input_messages(item: RefineItem) -> list[dict[str, Any]]:
    turns = [{"role": m["role"], "parts": [{"type": "text", "content": m["content"]}]} for m in item.conversation()]
    turns.append({"role": "assistant", "parts": [{"type": "text", "content": item.draft}]})
    return turns


def _one_or_many(values: Sequence[Any]) -> Any:
    """One item: the value itself; a batch: the list (JSON for structured values)."""
    if values and isinstance(values[0], str):
        return values[0] if len(set(values)) == 1 else list(values)
    return json.dumps(values[0] if len(values) == 1 else list(values), ensure_ascii=False)
