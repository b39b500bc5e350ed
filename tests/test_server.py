"""The refiner server, started for real with uvicorn on 127.0.0.1, driven over HTTP."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
from test_server_support import (
    PROMPTS,
    GatedEngine,
    HoldAtFirstJoin,
    WrappedEngine,
    alpaca_items,
    metric_value,
    wait_queued,
)

pytest_plugins = ["test_server_support"]  # fixtures: tiny_engine, start_server

pytestmark = pytest.mark.timeout(120)


def body(items, **options):
    return {"items": items, **options}


def test_health_models_openapi(tiny_engine, start_server):
    url, _ = start_server(tiny_engine)
    with httpx.Client(base_url=url, timeout=30) as c:
        health = c.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        assert health.json()["model"] == tiny_engine.model_name
        models = c.get("/v1/models").json()
        assert [m["id"] for m in models["data"]] == [tiny_engine.model_name]
        schema = c.get("/openapi.json").json()
        assert {"/v1/refine", "/v1/chat/completions", "/health", "/v1/models"} <= set(schema["paths"])
        r = c.post("/v1/refine", json=body([{"prompt": "Hi", "draft": "Hello!"}], block_size=4, max_new_tokens=8))
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["model"] == tiny_engine.model_name and len(out["items"]) == 1
        item = out["items"][0]
        assert 1 <= item["new_tokens"] <= 8 and item["iterations"] >= 1
        assert {"queue_ms", "engine_ms", "total_ms"} <= set(out["timing"])


async def test_concurrent_requests_batch_and_match_engine_alone(tiny_engine, start_server, alpaca_rows):
    """16 concurrent clients, two option groups: merged into batches, each answer exactly as alone."""
    gated = GatedEngine(tiny_engine)
    url, _ = start_server(gated, max_batch_items=8, max_wait_ms=20)
    items = alpaca_items(alpaca_rows, 16)
    options = [{"block_size": 4, "max_new_tokens": 12} if n % 2 else {"block_size": 8, "max_new_tokens": 16} for n in range(16)]
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        tasks = [asyncio.create_task(c.post("/v1/refine", json=body([it], **opt))) for it, opt in zip(items, options)]
        await wait_queued(c, 16, gated)  # every request queues behind the gated first batch
        gated.gate.set()
        responses = await asyncio.gather(*tasks)
        metrics = (await c.get("/metrics")).text
    assert [r.status_code for r in responses] == [200] * 16, [r.text for r in responses if r.status_code != 200]
    # batching really happened: fewer engine calls than requests, and some with several requests
    assert len(gated.calls) < 16 and max(len(call) for call in gated.calls) > 1
    assert metric_value(metrics, "diffpo_batch_requests_sum") > metric_value(metrics, "diffpo_batch_requests_count")
    texts = []
    for it, opt, r in zip(items, options, responses):
        alone = tiny_engine.refine([it], **opt)[0]
        got = r.json()["items"][0]
        assert (got["text"], got["new_tokens"]) == (alone.text, alone.new_tokens)
        texts.append(got["text"])
    assert len(set(texts)) > 4  # different prompts give different answers: the check has teeth


async def test_requests_join_a_running_batch_in_queue_order(tiny_engine, start_server):
    """Continuous batching: B joins A's running batch between two passes; C, with other options,
    waits for its own batch, and D (A's options, queued after C) does not jump ahead of C."""
    engine = HoldAtFirstJoin(tiny_engine)
    url, _ = start_server(engine, max_batch_items=8, max_wait_ms=0)
    a_opts, c_opts = {"block_size": 1, "max_new_tokens": 12}, {"block_size": 3, "max_new_tokens": 10}
    reqs = {"A": ({"prompt": PROMPTS[0], "draft": "A"}, a_opts), "B": ({"prompt": PROMPTS[1], "draft": "B"}, a_opts),
            "C": ({"prompt": PROMPTS[2], "draft": "C"}, c_opts), "D": ({"prompt": PROMPTS[3], "draft": "D"}, a_opts)}
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        def send(name):
            item, opts = reqs[name]
            return asyncio.create_task(c.post("/v1/refine", json=body([item], **opts)))

        tasks = {"A": send("A")}
        assert await asyncio.to_thread(engine.asking.wait, 10)  # A has run a pass and asks for company
        for depth, name in enumerate("BCD", 1):
            tasks[name] = send(name)
            for _ in range(200):  # queued before the next is sent: the order is B, C, D
                if (await c.get("/health")).json()["queue_depth"] == depth:
                    break
                await asyncio.sleep(0.02)
        engine.gate.set()
        out = {name: await t for name, t in tasks.items()}
    assert {n: r.status_code for n, r in out.items()} == dict.fromkeys("ABCD", 200)
    assert engine.calls == [["A"], ["C"], ["D"]]  # B rode along in A's batch
    assert out["B"].json()["timing"]["batch_requests"] == 2 and out["D"].json()["timing"]["batch_requests"] == 1
    for name, r in out.items():
        item, opts = reqs[name]
        assert r.json()["items"][0]["text"] == tiny_engine.refine([item], **opts)[0].text


async def test_queue_full_gets_429_with_retry_after_at_once(tiny_engine, start_server):
    gated = GatedEngine(tiny_engine)
    url, _ = start_server(gated, max_queue=1, max_batch_items=1, max_wait_ms=0)
    req = body([{"prompt": "Hi", "draft": "Hello"}], block_size=2, max_new_tokens=4)
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        running = asyncio.create_task(c.post("/v1/refine", json=req))
        await asyncio.to_thread(gated.entered.wait, 10)  # first request is in the engine
        queued = asyncio.create_task(c.post("/v1/refine", json=req))
        await wait_queued(c, 1)  # the second request sits in the queue
        refused = await c.post("/v1/refine", json=req)
        assert not running.done() and not queued.done()  # refused at once: nothing ahead of it moved
        assert refused.status_code == 429
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["type"] == "queue_full"
        gated.gate.set()
        assert (await running).status_code == 200 and (await queued).status_code == 200
        metrics = (await c.get("/metrics")).text
    assert metric_value(metrics, "diffpo_errors_total", 'kind="queue_full"') == 1


async def test_deadline_gives_503_and_drops_the_work(tiny_engine, start_server):
    gated = GatedEngine(tiny_engine)
    url, _ = start_server(gated, request_timeout=0.5, max_batch_items=1)
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
        first = asyncio.create_task(c.post("/v1/refine", json=body([{"prompt": "A", "draft": "first"}], max_new_tokens=4)))
        assert await asyncio.to_thread(gated.entered.wait, 10)  # the second queues behind it, never races it
        second = asyncio.create_task(c.post("/v1/refine", json=body([{"prompt": "B", "draft": "second"}], max_new_tokens=4)))
        r1, r2 = await asyncio.gather(first, second)
        gated.gate.set()
        for r in (r1, r2):
            assert r.status_code == 503 and r.json()["error"]["type"] == "timeout" and "retry-after" in r.headers
        # the engine is free again: the next request is served
        assert (await c.post("/v1/refine", json=body([{"prompt": "C", "draft": "third"}], max_new_tokens=4))).status_code == 200
    # the queued request expired while waiting: the engine never ran it
    assert all("second" not in call for call in gated.calls)


class SpinUntilCancelled(WrappedEngine):
    """Pretends to decode forever, until the server says the row is cancelled."""

    def __init__(self, engine):
        super().__init__(engine)
        self.entered, self.saw_cancel = threading.Event(), threading.Event()

    def refine(self, items, is_cancelled=None, **kw):
        self.calls.append([i.draft for i in items])
        self.entered.set()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if is_cancelled is not None and is_cancelled(0):
                self.saw_cancel.set()
                break
            time.sleep(0.01)
        return self.engine.refine(items, max_new_tokens=2, block_size=1)


async def test_client_disconnect_stops_the_work(tiny_engine, start_server):
    spin = SpinUntilCancelled(tiny_engine)
    url, _ = start_server(spin, max_batch_items=1)
    req = body([{"prompt": "Hi", "draft": "running"}], max_new_tokens=4)
    async with httpx.AsyncClient(base_url=url, timeout=0.8) as c, httpx.AsyncClient(base_url=url, timeout=0.4) as q:
        running = asyncio.create_task(c.post("/v1/refine", json=req))
        # the second request only once the first holds the engine (two connections race otherwise),
        # and it gives up first, while the first still holds it
        assert await asyncio.to_thread(spin.entered.wait, 10)
        queued = asyncio.create_task(q.post("/v1/refine", json=body([{"prompt": "Hi", "draft": "queued"}], max_new_tokens=4)))
        for t in (running, queued):
            with pytest.raises(httpx.ReadTimeout):  # the clients give up and close their connections
                await t
    # the running row is cancelled (the engine's is_cancelled turns true) well before its 20 s
    assert await asyncio.to_thread(spin.saw_cancel.wait, 10)
    async with httpx.AsyncClient(base_url=url, timeout=10) as c:
        for _ in range(1000):  # until the server has seen both disconnects and emptied its queue
            metrics = (await c.get("/metrics")).text
            if (metric_value(metrics, "diffpo_errors_total", 'kind="client_disconnected"') >= 2
                    and metric_value(metrics, "diffpo_num_requests_waiting") == 0):
                break
            await asyncio.sleep(0.01)
    assert spin.calls == [["running"]]  # the queued request never reached the engine
    assert metric_value(metrics, "diffpo_errors_total", 'kind="client_disconnected"') == 2
    assert metric_value(metrics, "diffpo_num_requests_waiting") == 0


BAD_INPUTS = [
    # (name, request kwargs, status, words the message must contain)
    ("malformed JSON", {"content": b'{"items": [', "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
    ("invalid UTF-8", {"content": b'{"items": [{"prompt": "\xff\xfe", "draft": "x"}]}',
                           "headers": {"content-type": "application/json"}}, 400, "UTF-8"),
    ("wrong type", {"json": {"items": [{"prompt": 3, "draft": "x"}]}}, 422, "items.0.prompt"),
    ("items not a list", {"json": {"items": "hello"}}, 422, "items"),
    ("unknown field", {"json": {"items": [{"prompt": "Hi", "draft": "x"}], "temperature": 0.5}}, 422, "temperature"),
    ("unknown item field", {"json": {"items": [{"prompt": "Hi", "draft": "x", "foo": 1}]}}, 422, "items.0.foo"),
    ("missing draft", {"json": {"items": [{"prompt": "Hi"}]}}, 422, "items.0.draft"),
    ("prompt and messages", {"json": {"items": [{"prompt": "Hi", "messages": [{"role": "user", "content": "x"}],
                                                  "draft": "x"}]}}, 422, "exactly one"),
    ("last turn not user", {"json": {"items": [{"messages": [{"role": "assistant", "content": "x"}], "draft": "x"}]}},
     422, "user turn"),
    ("bad role", {"json": {"items": [{"messages": [{"role": "wizard", "content": "x"}], "draft": "x"}]}}, 422, "role"),
    ("no items", {"json": {"items": []}}, 422, "items"),
    ("too many items", {"json": {"items": [{"prompt": "Hi", "draft": "x"}] * 65}}, 422, "at most 64"),
    ("negative block", {"json": {"items": [{"prompt": "Hi", "draft": "x"}], "block_size": -3}}, 422, "block_size"),
    ("zero block", {"json": {"items": [{"prompt": "Hi", "draft": "x"}], "block_size": 0}}, 422, "block_size"),
    ("block not a number", {"json": {"items": [{"prompt": "Hi", "draft": "x"}], "block_size": "fast"}}, 422, "block_size"),
    ("huge max_new_tokens", {"json": {"items": [{"prompt": "Hi", "draft": "x"}], "max_new_tokens": 10**6}}, 422,
     "max_new_tokens"),
    ("over server cap", {"json": {"items": [{"prompt": "Hi", "draft": "x"}], "max_new_tokens": 600}}, 400,
     "server's limit"),
    ("zero iterations", {"json": {"items": [{"prompt": "Hi", "draft": "x"}], "max_iterations": 0}}, 422, "max_iterations"),
    ("prompt too long", {"json": {"items": [{"prompt": "word " * 3000, "draft": "x"}], "max_new_tokens": 8}}, 400,
     "context"),
    ("body too large", {"json": {"items": [{"prompt": "x" * 300_000, "draft": "x"}]}}, 413, "limit"),
    ("not JSON at all", {"content": b"items=1", "headers": {"content-type": "text/plain"}}, 422, ""),
    ("array body", {"json": [1, 2, 3]}, 422, ""),
]


async def test_bad_input_gets_4xx_while_others_are_served(tiny_engine, start_server):
    url, _ = start_server(tiny_engine, max_body_bytes=200_000, max_new_tokens_limit=512, max_batch_items=4)
    good = body([{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                  "draft": "Hello there"}], block_size=4, max_new_tokens=8)
    expected = tiny_engine.refine([good["items"][0]], block_size=4, max_new_tokens=8)[0].text
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        bad = [c.post("/v1/refine", **kw) for _, kw, _, _ in BAD_INPUTS]
        goods = [c.post("/v1/refine", json=good) for _ in range(4)]
        responses = await asyncio.gather(*bad, *goods)
        for (name, _, status, words), r in zip(BAD_INPUTS, responses):
            assert r.status_code == status, (name, r.status_code, r.text)
            err = r.json()["error"]
            assert err["code"] == status and words in err["message"], (name, err)
        for r in responses[len(BAD_INPUTS):]:
            assert r.status_code == 200 and r.json()["items"][0]["text"] == expected
        assert (await c.get("/health")).status_code == 200


async def test_a_block_wider_than_the_answer_is_clamped(tiny_engine, start_server):
    url, _ = start_server(tiny_engine)
    item = {"prompt": "Hi", "draft": "Hello there"}
    expected = tiny_engine.refine([item], block_size=8, max_new_tokens=8)[0].text
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        r = await c.post("/v1/refine", json=body([item], block_size=10**12, max_new_tokens=8))
    assert r.status_code == 200, r.text
    assert r.json()["items"][0]["text"] == expected


async def test_oom_splits_the_batch_and_retries(tiny_engine, start_server):
    import torch

    class OomAboveTwo(GatedEngine):
        def refine(self, items, **kw):
            self.enter(items)
            self.gate.wait(30)
            self.calls.append([i.draft for i in items])
            if len(items) > 2 or any(i.draft == "too big" for i in items):
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return self.engine.refine(items, **kw)

    engine = OomAboveTwo(tiny_engine)
    url, _ = start_server(engine, max_batch_items=8, max_wait_ms=50)
    drafts = [f"draft number {n}" for n in range(7)] + ["too big"]
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        tasks = [asyncio.create_task(c.post("/v1/refine", json=body([{"prompt": PROMPTS[n], "draft": d}],
                                                                      block_size=2, max_new_tokens=6)))
                 for n, d in enumerate(drafts)]
        await wait_queued(c, 8, engine)
        engine.gate.set()
        responses = await asyncio.gather(*tasks)
        metrics = (await c.get("/metrics")).text
    for n, r in enumerate(responses[:7]):
        assert r.status_code == 200, r.text
        alone = tiny_engine.refine([{"prompt": PROMPTS[n], "draft": drafts[n]}], block_size=2, max_new_tokens=6)[0]
        assert r.json()["items"][0]["text"] == alone.text
    assert responses[7].status_code == 503 and responses[7].json()["error"]["type"] == "out_of_memory"
    assert max(len(call) for call in engine.calls) > 2  # it did try a big batch first
    assert metric_value(metrics, "diffpo_oom_splits_total") >= 2


async def test_one_failing_request_does_not_fail_its_batch(tiny_engine, start_server):
    class Poisoned(GatedEngine):
        def refine(self, items, **kw):
            self.enter(items)
            self.gate.wait(30)
            if any(i.draft == "poison" for i in items):
                raise RuntimeError("engine bug triggered by this input")
            return self.engine.refine(items, **kw)

    engine = Poisoned(tiny_engine)
    url, _ = start_server(engine, max_batch_items=8, max_wait_ms=50)
    drafts = ["fine one", "poison", "fine two", "fine three"]
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        tasks = [asyncio.create_task(c.post("/v1/refine", json=body([{"prompt": "Hi", "draft": d}], max_new_tokens=4,
                                                                      block_size=2))) for d in drafts]
        await wait_queued(c, 4, engine)
        engine.gate.set()
        responses = await asyncio.gather(*tasks)
    assert [r.status_code for r in responses] == [200, 500, 200, 200]
    assert "RuntimeError" in responses[1].json()["error"]["message"]
    assert "engine bug" not in responses[1].json()["error"]["message"]  # internals stay in the log


def test_api_key_auth(tiny_engine, start_server):
    url, _ = start_server(tiny_engine, api_key="s3cret-key")
    req = body([{"prompt": "Hi", "draft": "Hello"}], block_size=2, max_new_tokens=4)
    with httpx.Client(base_url=url, timeout=30) as c:
        assert c.get("/health").status_code == 200  # probes stay open
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-key"},
                        {"Authorization": "Bearer s3cret-key2"}, {"Authorization": "Basic s3cret-key"}):
            r = c.post("/v1/refine", json=req, headers=headers)
            assert r.status_code == 401, headers
            assert r.headers["www-authenticate"] == "Bearer" and r.json()["error"]["type"] == "unauthorized"
        assert c.get("/metrics").status_code == 401
        assert c.get("/v1/models").status_code == 401
        for sneaky in ("/v1/refine/", "//v1/refine", "/V1/refine", "/nothing-here"):  # closed by default
            assert c.post(sneaky, json=req).status_code == 401, sneaky
        assert c.get("/openapi.json").status_code == 200
        # a 401 comes before the body is even parsed
        assert c.post("/v1/refine", content=b"{not json", headers={"content-type": "application/json"}).status_code == 401
        ok = {"Authorization": "Bearer s3cret-key"}
        assert c.post("/v1/refine", json=req, headers=ok).status_code == 200
        assert c.get("/metrics", headers=ok).status_code == 200


def test_refuses_to_bind_beyond_loopback_without_key(capsys, monkeypatch):
    from diffpo_sdk.server import ServerConfig, check_bind, is_loopback
    from diffpo_sdk.server.__main__ import build_parser, main

    monkeypatch.delenv("DIFFPO_API_KEY", raising=False)
    assert main(["--host", "0.0.0.0", "--model", "/nonexistent"]) == 2
    assert "refusing to bind '0.0.0.0'" in capsys.readouterr().err
    assert main(["--host", "::", "--model", "/nonexistent"]) == 2
    for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1"):
        assert is_loopback(host)
        check_bind(ServerConfig(host=host))
    for host in ("0.0.0.0", "::", "10.1.2.3", "example.com"):
        assert not is_loopback(host)
        with pytest.raises(ValueError):
            check_bind(ServerConfig(host=host))
        check_bind(ServerConfig(host=host, api_key="k"))
    assert build_parser().parse_args([]).host == "127.0.0.1"
    monkeypatch.setenv("DIFFPO_API_KEY", "from-env")
    assert build_parser().parse_args([]).api_key == "from-env"


def test_traceparent_makes_server_spans_children_of_the_client(tiny_engine, start_server):
    from opentelemetry import propagate
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
        InMemorySpanExporter,
    )

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    url, _ = start_server(tiny_engine, tracer_provider=provider)
    client_tracer = provider.get_tracer("test-client")
    with client_tracer.start_as_current_span("client call") as client_span:
        headers: dict[str, str] = {}
        propagate.inject(headers)
        assert "traceparent" in headers
        r = httpx.post(f"{url}/v1/refine", headers=headers, timeout=30,
                       json=body([{"prompt": "Hi", "draft": "Hello"}, {"prompt": "Yo", "draft": "Hey"}],
                                 block_size=4, max_new_tokens=8))
    assert r.status_code == 200
    spans = {s.name: s for s in exporter.get_finished_spans()}
    server = spans["POST /v1/refine"]  # OpenTelemetry's FastAPI instrumentation, on the app's provider
    ctx = client_span.get_span_context()
    assert server.parent.span_id == ctx.span_id and server.context.trace_id == ctx.trace_id
    assert server.attributes["http.route"] == "/v1/refine"
    queue, batch = spans["diffpo.server.queue"], spans["diffpo.engine.batch"]
    assert queue.context.trace_id == batch.context.trace_id == ctx.trace_id
    assert queue.parent.span_id == batch.parent.span_id == server.context.span_id
    items = r.json()["items"]
    assert batch.attributes["diffpo.batch_size"] == 2
    assert batch.attributes["diffpo.passes"] == max(i["iterations"] for i in items)
    tokens = sum(i["new_tokens"] for i in items)
    assert batch.attributes["diffpo.passes_per_token"] == pytest.approx(batch.attributes["diffpo.passes"] / tokens)
    # no prompt or answer text in any span
    for s in exporter.get_finished_spans():
        assert not any(isinstance(v, str) and ("Hello" in v or "Hey" in v) for v in s.attributes.values())


def test_metrics_are_exposed(tiny_engine, start_server):
    url, _ = start_server(tiny_engine)
    with httpx.Client(base_url=url, timeout=30) as c:
        for _ in range(2):
            assert c.post("/v1/refine", json=body([{"prompt": "Hi", "draft": "Hello"}], block_size=4,
                                                   max_new_tokens=8)).status_code == 200
        assert c.post("/v1/refine", json={"items": []}).status_code == 422
        text = c.get("/metrics").text
    assert metric_value(text, "diffpo_requests_total", 'endpoint="/v1/refine",status="200"') == 2
    assert metric_value(text, "diffpo_requests_total", 'endpoint="/v1/refine",status="422"') == 1
    assert metric_value(text, "diffpo_errors_total", 'kind="validation"') == 1
    assert metric_value(text, "diffpo_batch_items_count") == 2
    assert metric_value(text, "diffpo_http_request_duration_seconds_count", 'endpoint="/v1/refine"') == 3
    assert metric_value(text, "diffpo_generation_tokens_total") > 0
    assert metric_value(text, "diffpo_forward_passes_total") > 0
    assert metric_value(text, "diffpo_request_queue_time_seconds_count") == 2
    assert metric_value(text, "diffpo_num_requests_waiting") == 0 and "process_resident_memory_bytes" in text


def test_health_is_503_until_the_model_loads(tiny_engine, start_server):
    loaded = threading.Event()

    def loader():
        loaded.wait(20)
        return tiny_engine

    url, _ = start_server(loader)
    req = body([{"prompt": "Hi", "draft": "Hello"}], block_size=2, max_new_tokens=4)
    with httpx.Client(base_url=url, timeout=30) as c:
        h = c.get("/health")
        assert h.status_code == 503 and h.json()["status"] == "loading" and h.headers["retry-after"]
        r = c.post("/v1/refine", json=req)
        assert r.status_code == 503 and r.json()["error"]["type"] == "not_ready"
        loaded.set()
        deadline = time.monotonic() + 10
        while c.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert c.post("/v1/refine", json=req).status_code == 200


def test_failed_load_is_reported_by_health(start_server):
    def loader():
        raise FileNotFoundError("no such model: /nowhere")

    url, _ = start_server(loader)
    deadline = time.monotonic() + 10
    while (h := httpx.get(f"{url}/health")).json()["status"] == "loading":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert h.status_code == 503 and "no such model" in h.json()["error"]


@pytest.mark.timeout(180)
def test_cli_serves_a_model_end_to_end(tiny_llama_dir, tmp_path):
    """``python -m diffpo_sdk.server`` in its own process: binds loopback, loads, serves, logs no content."""
    import os
    import subprocess
    import sys

    from diffpo_sdk.testing import free_port

    port = free_port()
    env = {**os.environ, "DIFFPO_API_KEY": "cli-key", "OMP_NUM_THREADS": "1"}
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "diffpo_sdk.server", "--model", tiny_llama_dir, "--device", "cpu",
             "--port", str(port), "--default-block-size", "4", "--default-max-new-tokens", "8"],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 150
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)
        r = httpx.post(f"{url}/v1/refine", headers={"Authorization": "Bearer cli-key"}, timeout=30,
                       json={"items": [{"prompt": "Secret prompt text", "draft": "Secret draft text"}]})
        assert r.status_code == 200, r.text
        assert r.json()["items"][0]["new_tokens"] <= 8  # the server default applied
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    text = log.read_text()
    assert "Secret" not in text and "ready" in text


async def test_chunked_oversized_body_gets_413(tiny_engine, start_server):
    """No Content-Length to check up front: the guard counts bytes as they stream in."""
    url, _ = start_server(tiny_engine, max_body_bytes=10_000)

    async def body_chunks():
        yield b'{"items": [{"prompt": "'
        for _ in range(100):
            yield b"x" * 1000

    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
        r = await c.post("/v1/refine", content=body_chunks(), headers={"content-type": "application/json"})
        assert "content-length" not in r.request.headers
        assert r.status_code == 413 and r.json()["error"]["type"] == "too_large"
        ok = await c.post("/v1/refine", json={"items": [{"prompt": "Hi", "draft": "x"}], "max_new_tokens": 4})
        assert ok.status_code == 200


def test_bench_serve_smoke(tiny_engine, start_server, tmp_path):
    """``diffpo bench serve --endpoint``: the levels, the soak and the JSON it writes (tiny model, seconds)."""
    import json

    from diffpo_sdk.bench.serve import main

    url, _ = start_server(tiny_engine, max_batch_items=8)
    out = tmp_path / "serve.json"
    rc = main(["--endpoint", url, "--concurrency", "1,4", "--requests", "4", "--rounds", "1", "--soak-clients", "6",
               "--soak-seconds", "1", "--max-new-tokens", "6", "--block-size", "2", "--items", "8", "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert [lv["clients"] for lv in result["levels"]] == [1, 4]
    assert all(lv["requests"] >= 4 and lv["errors"] == {} and lv["requests_per_s"] > 0 for lv in result["levels"])
    assert result["levels"][0]["speedup_vs_one_by_one"] == 1.0
    assert result["soak"]["requests"] > 0 and result["soak"]["errors"] == {} and result["soak"]["rss_after_mb"] > 0
    assert len(result["soak"]["rss_samples_mb"]) >= 2 and min(result["soak"]["rss_samples_mb"]) > 0
    assert result["queue_depth_after"] == 0
