"""Operator-facing telemetry over real HTTP: the server's HTTP spans (OpenTelemetry's FastAPI
instrumentation) nest under the client's span, and the proxy's upstream call is a GenAI span."""

from __future__ import annotations

import time

import httpx
import pytest
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind

from diffpo_sdk import DiffPORefiner
from diffpo_sdk.testing import EchoEngine, serve_engine

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def spans(recording_tracer):
    _, exporter = recording_tracer
    exporter.clear()
    return exporter


@pytest.fixture(scope="module")
def echo(recording_tracer):
    server = serve_engine(EchoEngine(lambda it: f"refined {it.draft}"), max_wait_ms=0.0,
                          upstream_model="openai/gpt-4o-mini", upstream_extra={"mock_response": "base answer"})
    yield server.url
    server.stop()


def trace_of(exporter, trace_id: int, names: set[str], timeout: float = 15.0) -> dict[str, object]:
    """The finished spans of one trace by name, once every name in ``names`` is there (the server's
    span ends after its response is sent, so it may finish after the client returns)."""
    deadline = time.monotonic() + timeout
    while True:
        found = {s.name: s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id}
        if names <= found.keys() or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


def test_server_http_span_nests_under_the_client_span(echo, spans):
    out = DiffPORefiner(endpoint=echo).invoke({"prompt": "q", "draft": "x"})
    assert out == "refined x"
    [client] = [s for s in spans.get_finished_spans() if s.name == "chat echo"]
    want = {"chat echo", "POST /v1/refine", "diffpo.server.queue", "diffpo.engine.batch"}
    tree = trace_of(spans, client.context.trace_id, want)
    assert set(tree) == want  # one span per step: no "http send"/"http receive" spans, no duplicate server span
    server = tree["POST /v1/refine"]
    assert server.kind == SpanKind.SERVER and server.parent.span_id == client.context.span_id
    assert server.attributes["http.route"] == "/v1/refine"
    # the stable HTTP names under OTEL_SEMCONV_STABILITY_OPT_IN=http (diffpo serve's default), else the old ones
    a = server.attributes
    assert a.get("http.request.method", a.get("http.method")) == "POST"
    assert a.get("http.response.status_code", a.get("http.status_code")) == 200
    for step in ("diffpo.server.queue", "diffpo.engine.batch"):
        assert tree[step].parent.span_id == server.context.span_id
    assert tree["diffpo.engine.batch"].attributes["diffpo.passes"] == 1


def test_probes_and_scrapes_get_no_span(echo, spans):
    assert httpx.get(f"{echo}/health").status_code == 200 and httpx.get(f"{echo}/metrics").status_code == 200
    r = httpx.get(f"{echo}/v1/models")  # a traced route, so the check below can fail
    assert r.status_code == 200
    deadline = time.monotonic() + 15
    while not any(s.name == "GET /v1/models" for s in spans.get_finished_spans()) and time.monotonic() < deadline:
        time.sleep(0.02)
    names = {s.name for s in spans.get_finished_spans()}
    assert "GET /v1/models" in names and not any("/health" in n or "/metrics" in n for n in names)


def test_proxy_spans_follow_genai_semconv(echo, spans):
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("caller") as caller:
        headers: dict[str, str] = {}
        propagate.inject(headers)
        r = httpx.post(f"{echo}/v1/chat/completions", headers=headers, timeout=60,
                       json={"messages": [{"role": "user", "content": "q"}], "diffpo": {"block_size": 4}})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "refined base answer"
    want = {"caller", "POST /v1/chat/completions", "chat openai/gpt-4o-mini", "diffpo.server.queue",
            "diffpo.engine.batch"}
    tree = trace_of(spans, caller.get_span_context().trace_id, want)
    assert want <= set(tree)
    server = tree["POST /v1/chat/completions"]
    assert server.parent.span_id == caller.get_span_context().span_id
    assert server.attributes["http.route"] == "/v1/chat/completions"
    upstream = tree["chat openai/gpt-4o-mini"]
    assert upstream.kind == SpanKind.CLIENT and upstream.parent.span_id == server.context.span_id
    a = upstream.attributes
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.provider.name"] == "openai"
    assert a["gen_ai.request.model"] == "openai/gpt-4o-mini" and tuple(a["gen_ai.response.finish_reasons"]) == ("stop",)
    usage = r.json()["usage"]
    assert a["gen_ai.usage.input_tokens"] == usage["prompt_tokens"] and a["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    assert a["gen_ai.response.id"] == r.json()["id"]
    assert tree["diffpo.engine.batch"].parent.span_id == server.context.span_id
