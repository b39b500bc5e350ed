"""OpenTelemetry: GenAI-semconv spans, diffpo.* attributes, no content by default, nesting across HTTP and LiteLLM."""

from __future__ import annotations

import time

import litellm
import pytest
from langchain_core.messages import AIMessage
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import diffpo_sdk
from diffpo_sdk import DiffPORefiner
from diffpo_sdk.testing import EchoEngine, free_port, serve_engine

SECRET_PROMPT = "my-secret-question"
SECRET_DRAFT = "my-secret-draft"


@pytest.fixture(scope="module")
def otel():
    """The process's SDK tracer provider (set here if none is) with an in-memory exporter on it."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider), "another test set a non-SDK global tracer provider"
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


@pytest.fixture
def spans(otel):
    _, exporter = otel
    exporter.clear()
    return exporter


@pytest.fixture(scope="module")
def echo(otel):
    server = serve_engine(EchoEngine(lambda it: f"refined {it.draft}"), max_wait_ms=0.0)
    yield server.url
    server.stop()


def by_name(exporter: InMemorySpanExporter, prefix: str) -> list:
    return [s for s in exporter.get_finished_spans() if s.name.startswith(prefix)]


def all_attribute_text(exporter: InMemorySpanExporter) -> str:
    return " ".join(f"{k}={v}" for s in exporter.get_finished_spans() for k, v in (s.attributes or {}).items())


def test_refine_span_follows_genai_semconv(echo, spans):
    llm = RunnableLambda(lambda _: AIMessage(content=SECRET_DRAFT))
    refined = DiffPORefiner.wrap(llm, endpoint=echo, block_size=4, max_new_tokens=16)
    out = (ChatPromptTemplate.from_messages([("human", "{q}")]) | refined).invoke({"q": SECRET_PROMPT})
    assert out.content == f"refined {SECRET_DRAFT}"
    [span] = by_name(spans, "chat ")
    assert span.name == "chat echo" and span.kind == SpanKind.CLIENT
    a = span.attributes
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.provider.name"] == "diffpo"
    assert a["gen_ai.response.model"] == "echo" and a["gen_ai.request.max_tokens"] == 16
    assert a["gen_ai.usage.output_tokens"] == 2 and tuple(a["gen_ai.response.finish_reasons"]) == ("stop",)
    assert a["diffpo.block_size"] == "4" and a["diffpo.passes"] == 1 and a["diffpo.tokens_per_pass"] == 2.0
    assert a["diffpo.refined"] is True and a["diffpo.backend"] == "http" and a["diffpo.batch_size"] == 1
    assert a["server.address"] == "127.0.0.1" and a["diffpo.attempts"] == 1
    # no content unless opted in, on any span (the server's included)
    text = all_attribute_text(spans)
    assert SECRET_PROMPT not in text and SECRET_DRAFT not in text
    assert "gen_ai.input.messages" not in a and "gen_ai.output.messages" not in a


def spans_in_trace(exporter: InMemorySpanExporter, prefix: str, trace_id: int, timeout: float = 15.0) -> list:
    """The finished spans of one trace; waits for them, since a server span ends after its response
    is sent (so it may finish after the client returns, or land after an earlier test's clear())."""
    deadline = time.monotonic() + timeout
    while True:
        found = [s for s in by_name(exporter, prefix) if s.context.trace_id == trace_id]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


def test_server_span_nests_under_the_client_span(echo, spans):
    DiffPORefiner(endpoint=echo).invoke({"prompt": "q", "draft": "x"})
    [client] = by_name(spans, "chat ")
    [server] = spans_in_trace(spans, "diffpo.server POST /v1/refine", client.context.trace_id)
    assert server.parent.span_id == client.context.span_id


def test_content_only_when_opted_in(echo, spans):
    DiffPORefiner(endpoint=echo, capture_content=True).invoke({"prompt": SECRET_PROMPT, "draft": SECRET_DRAFT})
    [span] = by_name(spans, "chat ")
    assert SECRET_PROMPT in span.attributes["gen_ai.input.messages"]
    assert SECRET_DRAFT in span.attributes["gen_ai.input.messages"]
    assert f"refined {SECRET_DRAFT}" in span.attributes["gen_ai.output.messages"]


def test_fail_open_is_marked_on_the_span(spans):
    dead = [f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"]
    out = DiffPORefiner(endpoint=dead, timeout=1).invoke({"prompt": "q", "draft": AIMessage(content="d")})
    assert out.response_metadata["diffpo"]["refined"] is False
    [span] = by_name(spans, "chat ")
    assert span.attributes["diffpo.refined"] is False
    assert span.attributes["error.type"] == "RefinerUnavailableError"
    assert "ConnectError" in span.attributes["diffpo.fallback_reason"]
    assert span.status.status_code == StatusCode.ERROR
    events = [e.name for e in span.events]
    assert "diffpo.retry" in events and "diffpo.fail_open" in events


def test_litellm_span_nests_beside_the_refinement(otel, echo, spans):
    from litellm.integrations.opentelemetry import OpenTelemetry, OpenTelemetryConfig

    provider, exporter = otel
    logger = OpenTelemetry(config=OpenTelemetryConfig(exporter=exporter), tracer_provider=provider)
    saved = litellm.callbacks
    litellm.callbacks = [logger]
    try:
        resp = diffpo_sdk.completion(model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "q"}],
                                     mock_response="base answer", refiner_endpoint=echo)
        assert resp.choices[0].message.content == "refined base answer"
        deadline = time.monotonic() + 15
        while not by_name(spans, "litellm_request") and time.monotonic() < deadline:
            time.sleep(0.05)  # LiteLLM logs success in the background
    finally:
        litellm.callbacks = saved
    [root] = by_name(spans, "diffpo.completion")
    [llm] = by_name(spans, "litellm_request")
    [refine] = by_name(spans, "chat ")
    assert llm.parent.span_id == root.context.span_id
    assert refine.parent.span_id == root.context.span_id  # siblings under one root
    assert root.attributes["diffpo.refined"] is True and root.attributes["diffpo.base_model"] == "openai/gpt-4o-mini"
    assert "gen_ai.request.model" not in root.attributes  # LiteLLM wrote onto its own span, not ours
