"""The OpenAI-compatible proxy streams with OpenAI's own client: sync and async, streamed and not;
the usage chunk only when asked for; ``logprobs: null`` once the text is replaced; a failure
mid-stream ends with an error event and ``[DONE]``; the route's schema describes its answer;
and ``POST /v1/refine`` ends a failed stream with ``error`` then ``done``."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
from test_server_proxy import ANSWER, MESSAGES, OPTS, proxy, read_sse, refined, upstream  # noqa: F401 (fixtures)
from test_server_support import WrappedEngine

from diffpo_sdk.testing import EchoEngine

pytest_plugins = ["test_server_support"]  # fixtures: tiny_engine, start_server

pytestmark = pytest.mark.timeout(300)


def test_openai_async_client_streamed_and_not_and_usage_only_when_asked(proxy, tiny_engine):
    url = proxy()
    expected = refined(tiny_engine, MESSAGES, ANSWER)

    async def run() -> tuple:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        plain = await client.chat.completions.create(model="openai/stub-model", messages=MESSAGES,
                                                     extra_body={"diffpo": OPTS}, logprobs=True)
        bare = [c async for c in await client.chat.completions.create(
            model="openai/stub-model", messages=MESSAGES, stream=True, extra_body={"diffpo": OPTS})]
        counted = [c async for c in await client.chat.completions.create(
            model="openai/stub-model", messages=MESSAGES, stream=True, extra_body={"diffpo": OPTS},
            stream_options={"include_usage": True})]
        await client.close()
        return plain, bare, counted

    plain, bare, counted = asyncio.run(run())
    assert plain.choices[0].message.content == expected.text and plain.choices[0].logprobs is None
    for chunks in (bare, counted):
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
        assert all(c.choices[0].logprobs is None for c in chunks if c.choices)
        assert [c.model_extra["diffpo"]["refined"] for c in chunks if "diffpo" in (c.model_extra or {})] == [True]
    assert all(c.choices and c.usage is None for c in bare)  # not asked: no usage chunk
    assert counted[-1].choices == [] and counted[-1].usage.total_tokens == 26
    assert all(c.choices for c in counted[:-1])


class BreaksAfterFirstPass(WrappedEngine):
    """The real engine, failing on every attempt right after its first verified tokens went out."""

    error = "the refiner broke mid-answer"

    def refine(self, items, on_tokens=None, **kw):
        passes = []

        def tokens(i, ids):
            if passes:
                raise RuntimeError(self.error)
            passes.append(i)
            on_tokens(i, ids)

        return super().refine(items, on_tokens=None if on_tokens is None else tokens, **kw)


def test_a_failure_mid_stream_ends_with_an_error_event_and_done(proxy, tiny_engine):
    def explode(item):
        raise RuntimeError("the refiner broke")

    url = proxy(EchoEngine(explode))
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60,
                      json={"messages": MESSAGES, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["x-accel-buffering"] == "no"
        events = read_sse(r)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant"}  # the stream had begun
    assert events[-1] == "[DONE]" and events[-2]["error"]["type"] == "internal_error"
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.APIError):
        for _ in client.chat.completions.create(model="openai/stub-model", messages=MESSAGES, stream=True):
            pass

    url = proxy(BreaksAfterFirstPass(tiny_engine))
    with httpx.stream("POST", f"{url}/v1/refine", timeout=60,
                      json={"items": [{"prompt": "p", "draft": "d"}], "stream": True, "block_size": 1}) as r:
        events = [line for line in r.iter_lines() if line.startswith("event: ")]
    assert events[0] == "event: delta" and events[-2:] == ["event: error", "event: done"]


class OutOfMemoryAfterFirstPass(BreaksAfterFirstPass):
    error = "CUDA out of memory (stand-in)"  # what the batcher treats as out of memory: fail-open


def test_a_refiner_giving_up_mid_stream_goes_on_with_the_rest_of_the_draft(proxy, tiny_engine):
    from diffpo_sdk.client import draft_rest

    url = proxy(OutOfMemoryAfterFirstPass(tiny_engine))
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60,
                      json={"messages": MESSAGES, "stream": True, "diffpo": {"block_size": 1, "max_new_tokens": 32}}) as r:
        events = read_sse(r)
    assert events[-1] == "[DONE]" and all("error" not in e for e in events[:-1])
    texts = [e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"]]
    texts = [t for t in texts if t]
    refined_part = "".join(texts[:-1])
    assert refined_part  # verified text went out before the refiner gave up
    assert texts[-1] == draft_rest(refined_part, ANSWER) and ANSWER.endswith(texts[-1])  # a whole answer
    stats = events[-2]["diffpo"]
    assert stats["refined"] is False and stats["partial"] is True and "memory" in stats["reason"]


def test_the_chat_route_schema_describes_its_answer(proxy):
    url = proxy()
    schema = httpx.get(f"{url}/openapi.json").json()
    ok = schema["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert ok["application/json"]["schema"] == {"$ref": "#/components/schemas/ChatCompletion"}
    assert "text/event-stream" in ok
    fields = schema["components"]["schemas"]["ChatCompletion"]["properties"]
    assert {"id", "choices", "usage", "diffpo"} <= set(fields)
