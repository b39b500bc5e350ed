"""The OpenTelemetry GenAI client metrics of refinement calls, through the metrics API only.

``gen_ai.client.operation.duration`` (seconds, failed calls included with ``error.type``) and
``gen_ai.client.token.usage`` (``{token}``, one record per token type) as the GenAI semantic
conventions define them, with their advised bucket boundaries. Without a configured SDK
``MeterProvider`` the API's no-op meter makes them free; the application (or
``opentelemetry-instrument``) chooses the exporter.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import metrics

from .. import tracing
from ..protocol import RefineResponse

#: advised by the GenAI conventions
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
TOKEN_TYPE = "gen_ai.token.type"

_meter = metrics.get_meter(tracing.TRACER_NAME)
_duration = _meter.create_histogram(
    "gen_ai.client.operation.duration", unit="s", description="GenAI operation duration",
    explicit_bucket_boundaries_advisory=list(DURATION_BUCKETS),
)
_tokens = _meter.create_histogram(
    "gen_ai.client.token.usage", unit="{token}", description="Number of input and output tokens used",
    explicit_bucket_boundaries_advisory=list(TOKEN_BUCKETS),
)


def record_call(seconds: float, *, model: str | None, response: RefineResponse | None = None,
                error: BaseException | None = None) -> None:
    """One refinement call: its duration, and (answered) its input and output tokens."""
    attrs: dict[str, Any] = {tracing.GEN_AI_OPERATION_NAME: tracing.OPERATION,
                             tracing.GEN_AI_PROVIDER_NAME: tracing.PROVIDER}
    if model:
        attrs[tracing.GEN_AI_REQUEST_MODEL] = model
    if response is not None and response.model:
        attrs[tracing.GEN_AI_RESPONSE_MODEL] = response.model
    if error is not None:
        attrs[tracing.ERROR_TYPE] = type(error).__name__
    _duration.record(seconds, attrs)
    if response is None:
        return
    _tokens.record(sum(i.new_tokens for i in response.items), {**attrs, TOKEN_TYPE: "output"})
    prompt = [i.prompt_tokens for i in response.items]
    if all(n is not None for n in prompt):
        _tokens.record(sum(n for n in prompt if n is not None), {**attrs, TOKEN_TYPE: "input"})
