"""OpenTelemetry: GenAI-semconv spans, diffpo.* attributes, no content by default, nesting across HTTP and LiteLLM."""

from __future__ import annotations

import logging
import time

import httpx
import litellm
import pytest
from langchain_core.messages import AIMessage
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import diffpo_sdk
from diffpo_sdk import DiffPORefiner
from diffpo_sdk.testing import EchoEngine, free_port, serve_engine

SECRET_PROMPT = "my-secret-question"
SECRET_DRAFT = "my-secret-draft"


@pytest.fixture(scope="module")
def echo(recording_tracer):
    server = serve_engine(EchoEngine(lambda it: f"refined {it.draft}"), max_wait_ms=0.0)
    yield server.url
    server.stop()


def by_name(exporter: InMemorySpanExporter, prefix: str) -> list:
    return [s for s in exporter.get_finished_spans() if s.name.startswith(prefix)]


def all_attribute_text(exporter: InMemorySpanExporter) -> str:
    """Every attribute of every finished span and of its events, as one string."""
    parts = []
    for s in exporter.get_finished_spans():
        parts += [f"{k}={v}" for k, v in (s.attributes or {}).items()]
        parts += [f"{e.name}:{k}={v}" for e in s.events for k, v in (e.attributes or {}).items()]
    return " ".join(parts)


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
    assert a["gen_ai.usage.input_tokens"] == 1  # the echo engine counts the prompt's words
    assert a["gen_ai.response.id"].startswith("refine-") and len(a["gen_ai.response.id"]) > len("refine-")
    assert a["diffpo.block_size"] == "4" and a["diffpo.passes"] == 1 and a["diffpo.passes_per_token"] == 0.5
    assert a["diffpo.refined"] is True and a["diffpo.backend"] == "http" and a["diffpo.batch_size"] == 1
    assert a["server.address"] == "127.0.0.1" and a["server.port"] == int(echo.rsplit(":", 1)[1])
    assert a["diffpo.attempts"] == 1 and "diffpo.fail_open_reason" not in a
    # no content unless opted in, on any span (the server's included)
    text = all_attribute_text(spans)
    assert SECRET_PROMPT not in text and SECRET_DRAFT not in text
    assert "gen_ai.input.messages" not in a and "gen_ai.output.messages" not in a


def test_content_only_when_opted_in(echo, spans):
    DiffPORefiner(endpoint=echo, capture_content=True).invoke({"prompt": SECRET_PROMPT, "draft": SECRET_DRAFT})
    [span] = by_name(spans, "chat ")
    assert SECRET_PROMPT in span.attributes["gen_ai.input.messages"]
    assert SECRET_DRAFT in span.attributes["gen_ai.input.messages"]
    assert f"refined {SECRET_DRAFT}" in span.attributes["gen_ai.output.messages"]


def test_content_opt_in_follows_the_otel_variable(echo, spans, monkeypatch):
    monkeypatch.setenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "true")
    monkeypatch.delenv("DIFFPO_CAPTURE_CONTENT", raising=False)
    DiffPORefiner(endpoint=echo).invoke({"prompt": SECRET_PROMPT, "draft": SECRET_DRAFT})
    [span] = by_name(spans, "chat ")
    assert SECRET_PROMPT in span.attributes["gen_ai.input.messages"]
    assert f"refined {SECRET_DRAFT}" in span.attributes["gen_ai.output.messages"]
    spans.clear()
    monkeypatch.setenv("DIFFPO_CAPTURE_CONTENT", "false")  # the DiffPO switch wins over OTel's
    DiffPORefiner(endpoint=echo).invoke({"prompt": SECRET_PROMPT, "draft": SECRET_DRAFT})
    [span] = by_name(spans, "chat ")
    assert "gen_ai.input.messages" not in span.attributes


def test_no_content_reaches_spans_or_logs_by_default(echo, spans, caplog, monkeypatch):
    """Every client surface and the server, with every logger at DEBUG: the prompt, the draft and
    the refined answer appear in no span attribute, no span event and no log record. LiteLLM's own
    DEBUG log prints its call's messages; that is LiteLLM's switch (``litellm.set_verbose``), not ours."""
    monkeypatch.delenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", raising=False)
    monkeypatch.delenv("DIFFPO_CAPTURE_CONTENT", raising=False)
    caplog.set_level(logging.DEBUG)
    chain = ChatPromptTemplate.from_messages([("human", "{q}")]) | DiffPORefiner.wrap(
        RunnableLambda(lambda _: AIMessage(content=SECRET_DRAFT)), endpoint=echo)
    assert chain.invoke({"q": SECRET_PROMPT}).content == f"refined {SECRET_DRAFT}"
    resp = diffpo_sdk.completion(model="openai/gpt-4o-mini", messages=[{"role": "user", "content": SECRET_PROMPT}],
                                 mock_response=SECRET_DRAFT, refiner_endpoint=echo)
    assert resp.choices[0].message.content == f"refined {SECRET_DRAFT}"
    r = httpx.post(f"{echo}/v1/refine", json={"items": [{"prompt": SECRET_PROMPT, "draft": SECRET_DRAFT}]})
    assert r.status_code == 200
    # a failing call too: the error path must not echo the input either
    dead = f"http://127.0.0.1:{free_port()}"
    DiffPORefiner(endpoint=dead, timeout=1, retries=0).invoke({"prompt": SECRET_PROMPT, "draft": SECRET_DRAFT})
    assert len(by_name(spans, "chat ")) >= 3 and caplog.records  # it did record, and log
    text = all_attribute_text(spans) + " ".join(
        f"{s.name} {e.name}" for s in spans.get_finished_spans() for e in s.events)
    logged = " ".join(f"{r.name}: {r.getMessage()}" for r in caplog.records if not r.name.startswith("LiteLLM"))
    for secret in (SECRET_PROMPT, SECRET_DRAFT):
        assert secret not in text, f"{secret!r} reached a span"
        assert secret not in logged, f"{secret!r} reached a log record"


def test_litellm_drop_in_span_follows_genai_semconv(echo, spans):
    resp = diffpo_sdk.completion(model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "two words"}],
                                 mock_response="base answer", refiner_endpoint=echo, block_size=8)
    assert resp.choices[0].message.content == "refined base answer"
    [root] = by_name(spans, "diffpo.completion")
    [refine] = by_name(spans, "chat ")
    assert refine.parent.span_id == root.context.span_id and refine.kind == SpanKind.CLIENT
    a = refine.attributes
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.provider.name"] == "diffpo"
    assert a["gen_ai.usage.input_tokens"] == 2 and a["gen_ai.usage.output_tokens"] == 3
    assert a["gen_ai.response.id"].startswith("refine-") and a["diffpo.block_size"] == "8"
    assert a["diffpo.refined"] is True and a["diffpo.passes_per_token"] == pytest.approx(1 / 3, abs=1e-3)
    assert root.attributes["diffpo.refined"] is True and "diffpo.fail_open_reason" not in root.attributes


async def test_litellm_proxy_hook_span_nests_under_the_proxy_request(echo, spans):
    from diffpo_sdk.adapters.litellm_hook import DiffPOProxyHook
    from diffpo_sdk.settings import DiffPOSettings

    hook = DiffPOProxyHook(settings=DiffPOSettings(endpoint=echo))
    request_span = trace.get_tracer("test-proxy").start_span("litellm_proxy_request")  # the proxy's, not current
    messages = [{"role": "user", "content": "one two"}]
    data = {"model": "m", "messages": messages, "metadata": {"litellm_parent_otel_span": request_span}}
    resp = await litellm.acompletion(model="openai/m", messages=messages, mock_response="drafted answer")
    out = await hook.async_post_call_success_hook(data, None, resp)
    request_span.end()
    assert out.choices[0].message.content == "refined drafted answer"
    [refine] = by_name(spans, "chat ")
    assert refine.parent.span_id == request_span.get_span_context().span_id and refine.kind == SpanKind.CLIENT
    a = refine.attributes
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.provider.name"] == "diffpo"
    assert a["gen_ai.usage.input_tokens"] == 2 and a["gen_ai.usage.output_tokens"] == 3
    assert a["gen_ai.response.id"].startswith("refine-") and a["diffpo.refined"] is True
    assert "drafted" not in all_attribute_text(spans)


def test_fail_open_is_marked_on_the_span(spans):
    dead = [f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"]
    out = DiffPORefiner(endpoint=dead, timeout=1).invoke({"prompt": "q", "draft": AIMessage(content="d")})
    assert out.response_metadata["diffpo"]["refined"] is False
    [span] = by_name(spans, "chat ")
    assert span.attributes["diffpo.refined"] is False
    assert span.attributes["error.type"] == "RefinerUnavailableError"
    assert "ConnectError" in span.attributes["diffpo.fail_open_reason"]
    assert span.status.status_code == StatusCode.ERROR
    events = [e.name for e in span.events]
    assert "diffpo.retry" in events and "diffpo.fail_open" in events


def test_litellm_span_nests_beside_the_refinement(recording_tracer, echo, spans):
    from litellm.integrations.opentelemetry import OpenTelemetry, OpenTelemetryConfig

    provider, exporter = recording_tracer
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
