"""Operator-facing telemetry over real HTTP: the server's HTTP spans (OpenTelemetry's FastAPI
instrumentation) nest under the client's span, the proxy's upstream call is a GenAI span, the
Prometheus names and labels after real traffic, and the GenAI client metrics."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import pytest
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind
from prometheus_client.parser import text_string_to_metric_families

from diffpo_sdk import DiffPORefiner
from diffpo_sdk.testing import EchoEngine, free_port, serve_engine

pytestmark = pytest.mark.timeout(120)


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


#: every series of the server's registry (bar process_*), with the labels each must carry
SERVER_SERIES = {
    "diffpo_num_requests_waiting": set(), "diffpo_num_requests_running": set(), "diffpo_num_items_running": set(),
    "diffpo_requests_total": {"endpoint", "status"}, "diffpo_errors_total": {"kind"},
    "diffpo_http_request_duration_seconds_bucket": {"endpoint", "le"},
    "diffpo_e2e_request_latency_seconds_bucket": {"le"}, "diffpo_request_queue_time_seconds_bucket": {"le"},
    "diffpo_time_to_first_token_seconds_bucket": {"le"}, "diffpo_batch_duration_seconds_bucket": {"le"},
    "diffpo_batch_items_bucket": {"le"}, "diffpo_batch_requests_bucket": {"le"},
    "diffpo_prompt_tokens_total": set(), "diffpo_generation_tokens_total": set(),
    "diffpo_forward_passes_total": set(), "diffpo_request_success_total": {"finished_reason"},
    "diffpo_oom_splits_total": set(),
}


def scrape(url: str) -> dict[str, list]:
    """``/metrics`` parsed by prometheus_client: sample name -> its samples."""
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def real_traffic(url: str) -> list[dict]:
    """Refinements plain and streamed, a proxied chat completion and a refused request."""
    answers = []
    with httpx.Client(base_url=url, timeout=60) as c:
        for k in range(2):
            r = c.post("/v1/refine", json={"items": [{"prompt": f"question {k} here", "draft": "a b c"}]})
            assert r.status_code == 200
            answers += r.json()["items"]
        with c.stream("POST", "/v1/refine", json={"stream": True, "items": [{"prompt": "q", "draft": "x y"}]}) as r:
            assert r.status_code == 200 and "event: done" in r.read().decode()
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "q"}]})
        assert r.status_code == 200
        assert c.post("/v1/refine", json={"items": []}).status_code == 422
    return answers


@pytest.fixture(scope="module")
def scraped() -> tuple[list[dict], dict[str, list]]:
    """A fresh echo server after :func:`real_traffic`: the plain answers and ``/metrics`` parsed."""
    server = serve_engine(EchoEngine(lambda it: f"refined {it.draft}", model_name="echo-model"), max_wait_ms=0.0,
                          upstream_model="openai/gpt-4o-mini", upstream_extra={"mock_response": "base answer"})
    try:
        answers = real_traffic(server.url)
        deadline = time.monotonic() + 15  # the batch's bookkeeping ends just after its last answer
        while (sum(s.value for s in scrape(server.url).get("diffpo_batch_duration_seconds_count", [])) < 4
               and time.monotonic() < deadline):
            time.sleep(0.02)
        return answers, scrape(server.url)
    finally:
        server.stop()


def test_prometheus_names_and_labels_after_real_traffic(scraped):
    answers, samples = scraped
    for name, labels in SERVER_SERIES.items():
        assert name in samples, f"{name} missing from /metrics"
        for s in samples[name]:
            assert set(s.labels) == labels | {"model"}, (name, s.labels)
            assert s.labels["model"] == "echo-model", (name, s.labels)
    leftovers = {n for n in samples if n.startswith("diffpo_")} - set(SERVER_SERIES)
    assert all(n.rsplit("_", 1)[0] + "_bucket" in SERVER_SERIES or n.endswith("_created") for n in leftovers), leftovers

    def value(name: str, **labels: str) -> float:
        return sum(s.value for s in samples[name] if labels.items() <= s.labels.items())

    # four refinements (two plain, one streamed, one behind the proxy) and their counts
    assert value("diffpo_e2e_request_latency_seconds_count") == 4
    assert value("diffpo_time_to_first_token_seconds_count") == 4
    assert value("diffpo_request_queue_time_seconds_count") == 4
    assert value("diffpo_request_success_total", finished_reason="stop") == 4
    plain = answers  # the two plain answers' own accounting is part of the totals
    assert value("diffpo_generation_tokens_total") >= sum(a["new_tokens"] for a in plain) + 2
    assert value("diffpo_prompt_tokens_total") >= sum(a["prompt_tokens"] for a in plain) == 6
    assert value("diffpo_forward_passes_total") == 4  # the echo engine answers in one pass
    assert value("diffpo_requests_total", endpoint="/v1/refine", status="200") == 3
    assert value("diffpo_requests_total", endpoint="/v1/refine", status="422") == 1
    assert value("diffpo_errors_total", kind="validation") == 1
    assert value("diffpo_num_requests_waiting") == value("diffpo_num_requests_running") == 0


def test_genai_client_metrics(echo, recording_meter):
    DiffPORefiner(endpoint=echo).invoke({"prompt": "three word prompt", "draft": "x"})
    dead = f"http://127.0.0.1:{free_port()}"
    DiffPORefiner(endpoint=dead, timeout=1, retries=0).invoke({"prompt": "q", "draft": "x"})
    points: dict[str, list] = {}
    data = recording_meter.get_metrics_data()
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                points.setdefault(m.name, []).extend((m.unit, p) for p in m.data.data_points)
    durations = points["gen_ai.client.operation.duration"]
    assert {unit for unit, _ in durations} == {"s"}
    ok = [p for _, p in durations if "error.type" not in p.attributes]
    failed = [p for _, p in durations if p.attributes.get("error.type") == "RefinerUnavailableError"]
    assert ok and failed and all(p.count >= 1 for p in ok + failed)
    for _, p in durations:
        assert p.attributes["gen_ai.operation.name"] == "chat" and p.attributes["gen_ai.provider.name"] == "diffpo"
    assert list(ok[0].explicit_bounds)[:3] == [0.01, 0.02, 0.04]
    tokens = {p.attributes["gen_ai.token.type"]: p for unit, p in points["gen_ai.client.token.usage"] if unit == "{token}"}
    assert tokens["input"].sum >= 3 and tokens["output"].sum >= 2  # echo counts words: "three word prompt", "refined x"
    assert tokens["output"].attributes["gen_ai.response.model"] == "echo"


def test_diffpo_serve_exports_where_the_otel_variables_say(tmp_path):
    """``python -m diffpo_sdk.server`` (what ``diffpo serve`` runs) with console exporters named in
    ``OTEL_*``: the HTTP span of a traced request, under the caller's traceparent, and the HTTP
    metrics come out at exit with the resource's service name. The model path does not exist,
    so the server answers 503 at once and loads nothing."""
    import os
    import signal
    import subprocess
    import sys

    port = free_port()
    env = {**os.environ, "OTEL_TRACES_EXPORTER": "console", "OTEL_METRICS_EXPORTER": "console",
           "OTEL_SERVICE_NAME": "refiner-under-test", "OTEL_METRIC_EXPORT_INTERVAL": "200"}
    env.pop("OTEL_SEMCONV_STABILITY_OPT_IN", None)
    proc = subprocess.Popen([sys.executable, "-m", "diffpo_sdk.server", "--model", str(tmp_path / "no-model"),
                             "--port", str(port), "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
                time.sleep(0.1)
        trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
        r = httpx.get(f"http://127.0.0.1:{port}/v1/models",
                      headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})
        assert r.status_code == 503  # not loaded (and never will be)
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert '"name": "GET /v1/models"' in out, out[-3000:]
    assert f'"trace_id": "0x{trace_id}"' in out and '"parent_id": "0x00f067aa0ba902b7"' in out
    assert '"http.route": "/v1/models"' in out and '"http.response.status_code": 503' in out  # stable names
    assert '"service.name": "refiner-under-test"' in out
    assert "http.server.request.duration" in out  # the instrumentation's metrics, through the meter provider
    assert '"name": "GET /health"' not in out  # probes are not traced


DASHBOARD = Path(__file__).resolve().parents[1] / "integrations" / "grafana" / "dashboard.json"


def dashboard_queries() -> list[str]:
    """Every PromQL expression in the dashboard: panel targets and template variable queries."""
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    exprs = [t["expr"] for panel in dash["panels"] for t in panel.get("targets", [])]
    for var in dash["templating"]["list"]:
        if var.get("type") == "query":
            exprs.append(var["definition"])
    return exprs


def test_every_metric_the_dashboard_queries_exists_after_real_traffic(scraped):
    _, samples = scraped
    exprs = dashboard_queries()
    titles = {p["title"] for p in json.loads(DASHBOARD.read_text(encoding="utf-8"))["panels"]}
    assert {"Request rate", "Latency p50 / p99", "Time to first token p50 / p99", "Forward passes per token",
            "Queue depth and running requests", "429 rate", "Fail-open rate"} <= titles
    # a metric name is an identifier followed by a selector, a range, or a closing bracket/comma
    # (functions are followed by "(", keywords like "by"/"le" are not metric-shaped here)
    referenced = set()
    for expr in exprs:
        referenced |= set(re.findall(r"\b(diffpo_[a-z0-9_]+)\b", expr))
        selectors = re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{", expr)
        assert all(name.startswith("diffpo_") for name in selectors), selectors
    assert len(referenced) >= 10
    missing = sorted(name for name in referenced if name not in samples)
    assert missing == [], f"the dashboard queries metrics /metrics does not have: {missing}"
    for name in referenced:
        assert all(s.labels.get("model") == "echo-model" for s in samples[name]), name  # $model resolves
    for expr in exprs:  # every label a selector matches on is one the series carry
        for name, matchers in re.findall(r"(diffpo_[a-z0-9_]+)\{([^}]*)\}", expr):
            labels = set(re.findall(r"(\w+)\s*=~?", matchers))
            assert labels <= set(samples[name][0].labels), (name, labels)
