"""``/v1/chat/completions``: the refining proxy, against a local OpenAI-compatible upstream stub
and LiteLLM's ``mock_response``, non-streaming, streaming, and through the OpenAI SDK."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from test_server_support import HoldAtFirstJoin, WrappedEngine, metric_value, serve

pytest_plugins = ["test_server_support"]  # fixtures: tiny_engine, start_server

pytestmark = pytest.mark.timeout(120)

ANSWER = "Paris is the capital of France. It is known for the Eiffel Tower."
USAGE = {"prompt_tokens": 11, "completion_tokens": 15, "total_tokens": 26}
MESSAGES = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "What is the capital of France?"}]
OPTS = {"block_size": 4, "max_new_tokens": 16}


@pytest.fixture(scope="module")
def upstream():
    """A stand-in for the upstream LLM (outside our system): canned OpenAI chat completions."""
    app = FastAPI()
    app.state.seen = []

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        app.state.seen.append({"body": body, "auth": request.headers.get("authorization")})
        if body["model"] == "stub-error":
            return JSONResponse({"error": {"message": "upstream exploded", "type": "server_error"}}, status_code=500)
        message = {"role": "assistant", "content": ANSWER}
        finish = "stop"
        if body.get("tools"):
            message = {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}
            finish = "tool_calls"
        return {"id": "chatcmpl-stub", "object": "chat.completion", "created": int(time.time()), "model": body["model"],
                "choices": [{"index": 0, "message": message, "finish_reason": finish}], "usage": USAGE}

    with serve(app) as url:
        app.state.url = url
        yield app.state


@pytest.fixture
def proxy(tiny_engine, start_server, upstream, monkeypatch):
    """Start a refiner whose default upstream is the stub; the upstream key comes from the env."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-upstream-from-env")
    upstream.seen.clear()

    def start(engine=None, **fields):
        fields = {"upstream_model": "openai/stub-model", "upstream_api_base": f"{upstream.url}/v1",
                  "upstream_extra": {"max_retries": 0}, **fields}
        return start_server(engine or tiny_engine, **fields)[0]

    return start


def refined(engine, messages, draft, **opts):
    return engine.refine([{"messages": messages, "draft": draft}], **{**OPTS, **opts})[0]


def test_refines_the_upstream_answer(proxy, upstream, tiny_engine):
    url = proxy()
    r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
        "messages": MESSAGES, "temperature": 0.2, "max_tokens": 50, "diffpo": OPTS,
        # a client must not be able to send the server's key elsewhere
        "api_base": "http://attacker.invalid", "api_key": "stolen", "base_url": "http://attacker.invalid",
    })
    assert r.status_code == 200, r.text
    out = r.json()
    expected = refined(tiny_engine, MESSAGES, ANSWER)
    assert out["object"] == "chat.completion" and out["choices"][0]["message"]["role"] == "assistant"
    assert out["choices"][0]["message"]["content"] == expected.text != ANSWER
    assert out["usage"]["prompt_tokens"] == 11 and out["usage"]["completion_tokens"] == 15
    d = out["diffpo"]
    assert d["refined"] is True and d["refiner"] == tiny_engine.model_name
    assert d["items"][0]["iterations"] == expected.iterations and d["items"][0]["new_tokens"] == expected.new_tokens
    (seen,) = upstream.seen
    assert seen["auth"] == "Bearer sk-upstream-from-env"
    assert seen["body"]["model"] == "stub-model" and seen["body"]["temperature"] == 0.2
    assert seen["body"]["max_tokens"] == 50 and seen["body"]["messages"] == MESSAGES
    assert not {"api_base", "api_key", "base_url", "diffpo"} & set(seen["body"])


def test_openai_sdk_works_by_changing_base_url(proxy, tiny_engine):
    openai = pytest.importorskip("openai")
    url = proxy(api_key="proxy-key")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="proxy-key", max_retries=0)
    expected = refined(tiny_engine, MESSAGES, ANSWER)
    resp = client.chat.completions.create(model="openai/stub-model", messages=MESSAGES, extra_body={"diffpo": OPTS})
    assert resp.choices[0].message.content == expected.text
    assert resp.usage.total_tokens == 26 and resp.model_extra["diffpo"]["refined"] is True
    stream = client.chat.completions.create(model="openai/stub-model", messages=MESSAGES, stream=True,
                                            extra_body={"diffpo": OPTS})
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces) == expected.text
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).chat.completions.create(
            model="openai/stub-model", messages=MESSAGES)


def read_sse(response: httpx.Response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_streaming_sends_the_refined_answer_as_it_is_decided(proxy, tiny_engine):
    url = proxy()
    opts = {"block_size": 4, "max_new_tokens": 24}
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60,
                      json={"messages": MESSAGES, "stream": True, "diffpo": opts,
                            "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-accel-buffering"] == "no"
        events = read_sse(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == "chatcmpl-stub" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    contents = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    contents = [c for c in contents if c]
    expected = refined(tiny_engine, MESSAGES, ANSWER, **opts)
    assert "".join(contents) == expected.text
    assert len(contents) >= 3  # streamed piece by piece, not in one lump at the end
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finish == ["stop" if expected.finish_reason == "stop" else "length"]
    assert all(c["choices"][0]["logprobs"] is None for c in chunks if c["choices"])  # replaced text: explicit null
    ended = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]][-1]
    assert ended["diffpo"]["refined"] is True
    last = chunks[-1]
    assert last["choices"] == [] and last["usage"] == USAGE  # asked for with stream_options.include_usage


async def test_a_stream_that_joins_a_running_batch_streams_its_own_answer(proxy, tiny_engine):
    """Continuous batching under streaming: a streamed request that joins another request's
    running batch gets exactly its own tokens, piece by piece."""
    engine = HoldAtFirstJoin(tiny_engine)
    url = proxy(engine, max_wait_ms=0)
    opts = {"block_size": 4, "max_new_tokens": 24}
    other = {"prompt": "Name three primary colors.", "draft": "Red, blue and yellow."}
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        running = asyncio.create_task(c.post("/v1/refine", json={"items": [other], **opts}))
        assert await asyncio.to_thread(engine.asking.wait, 10)  # its batch has run a pass

        async def stream() -> list:
            async with c.stream("POST", "/v1/chat/completions",
                                json={"messages": MESSAGES, "stream": True, "diffpo": opts}) as r:
                assert r.status_code == 200
                return [json.loads(line[6:]) for line in [x async for x in r.aiter_lines()]
                        if line.startswith("data: ") and line != "data: [DONE]"]

        streamed = asyncio.create_task(stream())
        for _ in range(200):  # the upstream answered and the stream's refinement is queued
            if (await c.get("/health")).json()["queue_depth"]:
                break
            await asyncio.sleep(0.05)
        engine.gate.set()
        chunks, first = await streamed, await running
    assert first.status_code == 200
    assert engine.calls == [[other["draft"]]]  # one engine batch: the stream's item joined it
    contents = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    contents = [c for c in contents if c]
    assert "".join(contents) == refined(tiny_engine, MESSAGES, ANSWER, **opts).text
    assert len(contents) >= 3
    assert first.json()["items"][0]["text"] == tiny_engine.refine([other], **opts)[0].text


def test_tool_calls_pass_through_untouched(proxy, tiny_engine):
    engine = WrappedEngine(tiny_engine)
    url = proxy(engine)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}]
    r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={"messages": MESSAGES, "tools": tools})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert choice["message"]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert r.json()["diffpo"]["refined"] is False
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60,
                      json={"messages": MESSAGES, "tools": tools, "stream": True}) as s:
        events = read_sse(s)
    deltas = [e["choices"][0]["delta"] for e in events[:-1] if e["choices"]]
    assert any(d.get("tool_calls", [{}])[0].get("function", {}).get("name") == "get_weather" for d in deltas)
    assert engine.calls == []  # the refiner never saw it


def test_an_answer_after_tool_results_is_refined_like_everywhere_else(proxy, tiny_engine):
    """The proxy and the LiteLLM wrapper share one rule: the tool traffic becomes text turns."""
    from diffpo_sdk.adapters.convert import conversation

    engine = WrappedEngine(tiny_engine)
    url = proxy(engine)
    messages = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={"messages": messages, "diffpo": OPTS})
    assert r.status_code == 200 and r.json()["diffpo"]["refined"] is True
    turns = [t.model_dump() for t in conversation(messages)]
    assert turns[-1] == {"role": "user", "content": "[tool result]\nsunny"}
    want = refined(tiny_engine, turns, ANSWER)
    assert r.json()["choices"][0]["message"]["content"] == want.text
    assert r.json()["choices"][0]["finish_reason"] == want.finish_reason == "length"  # 16 tokens cut it short


def test_litellm_mock_response_upstream(tiny_engine, start_server):
    url, _ = start_server(tiny_engine, upstream_extra={"mock_response": "It is Paris, of course."})
    r = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                   json={"model": "gpt-4o-mini", "messages": MESSAGES, "diffpo": OPTS})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["model"] == "gpt-4o-mini" and out["usage"]["total_tokens"] > 0
    assert out["choices"][0]["message"]["content"] == refined(tiny_engine, MESSAGES, "It is Paris, of course.").text


def test_fails_open_to_the_upstream_answer_when_the_refiner_is_full(proxy):
    url = proxy(max_queue=0)
    r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={"messages": MESSAGES})
    assert r.status_code == 200
    out = r.json()
    assert out["choices"][0]["message"]["content"] == ANSWER
    assert out["diffpo"]["refined"] is False and "queue is full" in out["diffpo"]["reason"]
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60, json={"messages": MESSAGES, "stream": True}) as s:
        events = read_sse(s)
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"])
    assert text == ANSWER and events[-2]["diffpo"]["refined"] is False


def test_upstream_and_request_errors(proxy, tiny_engine, start_server):
    url = proxy()
    r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={"model": "openai/stub-error", "messages": MESSAGES})
    assert r.status_code == 502 and r.json()["error"]["type"] == "upstream_error"
    r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={"model": "no-such-provider-model", "messages": MESSAGES})
    assert r.status_code == 400 and r.json()["error"]["type"] == "upstream_error"
    r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={"messages": []})
    assert r.status_code == 422 and "messages" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={"messages": MESSAGES, "diffpo": {"block_size": 0}})
    assert r.status_code == 422 and "block_size" in r.json()["error"]["message"]
    bare, _ = start_server(tiny_engine)  # no --upstream-model
    r = httpx.post(f"{bare}/v1/chat/completions", timeout=60, json={"messages": MESSAGES})
    assert r.status_code == 400 and "--upstream-model" in r.json()["error"]["message"]
    metrics = httpx.get(f"{url}/metrics").text
    assert metric_value(metrics, "diffpo_errors_total", 'kind="upstream"') == 2


def test_a_stream_closed_by_the_client_stops_the_refinement(proxy, tiny_engine):
    import threading

    class Slow(WrappedEngine):
        """Emits a token per 50 ms until cancelled (or 20 s)."""

        def __init__(self, engine):
            super().__init__(engine)
            self.cancelled = threading.Event()

        def refine(self, items, on_tokens=None, is_cancelled=None, **kw):
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                if is_cancelled(0):
                    self.cancelled.set()
                    break
                on_tokens(0, [28])
                time.sleep(0.05)
            return self.engine.refine(items, max_new_tokens=2, block_size=1)

    engine = Slow(tiny_engine)
    url = proxy(engine)
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=30, json={"messages": MESSAGES, "stream": True}) as r:
        got = 0
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content"' in line:
                got += 1
                if got == 3:
                    break  # hang up mid-answer
    assert engine.cancelled.wait(10)
