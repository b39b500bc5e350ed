"""LiteLLM drop-ins and the proxy hook, against a local OpenAI-compatible upstream and a real refiner server."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import litellm
import pytest
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from litellm.types.utils import ModelResponse

import diffpo_sdk
from diffpo_sdk.testing import EchoEngine, ServerThread, free_port, serve_engine
from diffpo_sdk.settings import DiffPOSettings

ROOT = Path(__file__).resolve().parents[1]
MSGS = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]


def upstream_app(seen: list[dict]) -> FastAPI:
    """An OpenAI-compatible chat endpoint: answers ``draft(<last user text>)``, or a tool call when given tools."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        seen.append(body)
        base = {"id": "chatcmpl-up", "created": 1, "model": body["model"]}
        text = f"draft({body['messages'][-1]['content']})"
        call = {"id": "call-1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
        tools = bool(body.get("tools"))
        if not body.get("stream"):
            message = {"role": "assistant", "content": None, "tool_calls": [call]} if tools else \
                {"role": "assistant", "content": text}
            return {**base, "object": "chat.completion", "usage": {"prompt_tokens": 5, "completion_tokens": 3,
                                                                    "total_tokens": 8},
                    "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls" if tools else "stop"}]}

        def events():
            chunk = {**base, "object": "chat.completion.chunk"}
            if tools:
                deltas = [{"role": "assistant", "tool_calls": [{"index": 0, **call}]}]
            else:
                pieces = [{"content": text[i:i + 3]} for i in range(0, len(text), 3)]
                deltas = [{"role": "assistant", "content": ""}, *pieces]
            for d in deltas:
                yield f"data: {json.dumps({**chunk, 'choices': [{'index': 0, 'delta': d}]})}\n\n"
            done = {"index": 0, "delta": {}, "finish_reason": "tool_calls" if tools else "stop"}
            yield f"data: {json.dumps({**chunk, 'choices': [done]})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def refiner():
    engine = EchoEngine(lambda it: f"R[{it.conversation()[-1]['content']}]<{it.draft}>")
    server = serve_engine(engine, max_wait_ms=0.0)
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def upstream():
    seen: list[dict] = []
    server = ServerThread(upstream_app(seen)).start()
    yield {"model": "openai/fake", "api_base": server.url + "/v1", "api_key": "sk-test", "seen": seen}
    server.stop()


def llm_args(upstream: dict) -> dict:
    return {k: upstream[k] for k in ("model", "api_base", "api_key")}


def test_completion_returns_a_refined_model_response(refiner, upstream, recording_tracer):
    _, spans = recording_tracer
    spans.clear()
    resp = diffpo_sdk.completion(messages=MSGS, refiner_endpoint=refiner, block_size=8, **llm_args(upstream))
    assert isinstance(resp, ModelResponse)
    assert resp.choices[0].message.content == "R[hello]<draft(hello)>"
    stats = resp.choices[0].message.provider_specific_fields["diffpo"]
    assert stats["refined"] is True and stats["block_size"] == 8 and stats["prompt"] == "explicit"
    assert resp.usage.prompt_tokens == 5  # the base call's usage, untouched
    # the root span recorded, and was handed to LiteLLM, yet never reached the upstream provider
    assert [s.name for s in spans.get_finished_spans() if s.name == "diffpo.completion"] == ["diffpo.completion"]
    assert "litellm_parent_otel_span" not in json.dumps(upstream["seen"][-1], default=str)


def test_mock_response_and_opt_out(refiner):
    resp = diffpo_sdk.completion(model="openai/gpt-4o-mini", messages=MSGS, mock_response="hi!",
                                 refiner_endpoint=refiner)
    assert resp.choices[0].message.content == "R[hello]<hi!>"
    plain = diffpo_sdk.completion(model="openai/gpt-4o-mini", messages=MSGS, mock_response="hi!", refine=False,
                                  refiner_endpoint=refiner)
    assert plain.choices[0].message.content == "hi!"


def test_tool_calls_and_structured_output_pass_through(refiner, upstream):
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}]
    resp = diffpo_sdk.completion(messages=MSGS, tools=tools, refiner_endpoint=refiner, **llm_args(upstream))
    assert resp.choices[0].message.tool_calls[0].function.name == "lookup"
    assert not (resp.choices[0].message.provider_specific_fields or {}).get("diffpo")
    chunks = list(diffpo_sdk.completion(messages=MSGS, tools=tools, stream=True, refiner_endpoint=refiner,
                                        **llm_args(upstream)))
    rebuilt = litellm.stream_chunk_builder(chunks, messages=MSGS)
    assert rebuilt.choices[0].message.tool_calls[0].function.name == "lookup"
    structured = diffpo_sdk.completion(model="openai/gpt-4o-mini", messages=MSGS, mock_response='{"a": 1}',
                                       response_format={"type": "json_object"}, refiner_endpoint=refiner)
    assert structured.choices[0].message.content == '{"a": 1}'


def test_stream_is_collected_refined_and_reemitted(refiner, upstream):
    chunks = list(diffpo_sdk.completion(messages=MSGS, stream=True, refiner_endpoint=refiner, **llm_args(upstream)))
    rebuilt = litellm.stream_chunk_builder(chunks, messages=MSGS)
    assert rebuilt.choices[0].message.content == "R[hello]<draft(hello)>"
    assert rebuilt.choices[0].finish_reason == "stop"
    stats = [c.choices[0].delta.provider_specific_fields["diffpo"] for c in chunks
             if c.choices and (c.choices[0].delta.provider_specific_fields or {}).get("diffpo")]
    assert [s["refined"] for s in stats] == [True]  # once, on the choice's last text chunk


async def test_acompletion_and_async_stream(refiner, upstream):
    resp = await diffpo_sdk.acompletion(messages=MSGS, refiner_endpoint=refiner, **llm_args(upstream))
    assert resp.choices[0].message.content == "R[hello]<draft(hello)>"
    stream = await diffpo_sdk.acompletion(messages=MSGS, stream=True, refiner_endpoint=refiner, **llm_args(upstream))
    chunks = [c async for c in stream]
    assert litellm.stream_chunk_builder(chunks, messages=MSGS).choices[0].message.content == "R[hello]<draft(hello)>"
    many = await asyncio.gather(*(
        diffpo_sdk.acompletion(model="openai/x", messages=[{"role": "user", "content": f"q{i}"}],
                               mock_response=f"a{i}", refiner_endpoint=refiner) for i in range(20)
    ))
    assert [r.choices[0].message.content for r in many] == [f"R[q{i}]<a{i}>" for i in range(20)]


def test_refiner_down_keeps_the_draft(upstream):
    dead = f"http://127.0.0.1:{free_port()}"
    resp = diffpo_sdk.completion(messages=MSGS, refiner_endpoint=dead, refiner_settings=DiffPOSettings(timeout=0.5),
                                 **llm_args(upstream))
    assert resp.choices[0].message.content == "draft(hello)"
    stats = resp.choices[0].message.provider_specific_fields["diffpo"]
    assert stats["refined"] is False and "ConnectError" in stats["error"]
    chunks = list(diffpo_sdk.completion(messages=MSGS, stream=True, refiner_endpoint=dead,
                                        refiner_settings=DiffPOSettings(timeout=0.5), **llm_args(upstream)))
    assert litellm.stream_chunk_builder(chunks, messages=MSGS).choices[0].message.content == "draft(hello)"


# -- the proxy hook ---------------------------------------------------------------------------------


async def test_proxy_hook_refines_responses_and_streams(refiner):
    from diffpo_sdk.adapters.litellm_hook import DiffPOProxyHook

    hook = DiffPOProxyHook(settings=DiffPOSettings(endpoint=refiner))
    data = {"model": "m", "messages": MSGS}
    resp = await litellm.acompletion(model="openai/m", messages=MSGS, mock_response="drafted")
    out = await hook.async_post_call_success_hook(data, None, resp)
    assert out.choices[0].message.content == "R[hello]<drafted>"
    stream = await litellm.acompletion(model="openai/m", messages=MSGS, mock_response="streamed", stream=True)
    chunks = [c async for c in hook.async_post_call_streaming_iterator_hook(None, stream, data)]
    assert litellm.stream_chunk_builder(chunks, messages=MSGS).choices[0].message.content == "R[hello]<streamed>"
    skipped = await hook.async_post_call_success_hook({**data, "diffpo_refine": False}, None,
                                                      await litellm.acompletion(model="openai/m", messages=MSGS,
                                                                                mock_response="raw"))
    assert skipped.choices[0].message.content == "raw"


def test_integration_config_points_at_the_hook(monkeypatch):
    config = yaml.safe_load((ROOT / "integrations/litellm_proxy/config.yaml").read_text())
    module, attr = config["litellm_settings"]["callbacks"].split(".")
    spec = importlib.util.spec_from_file_location(module, ROOT / "integrations/litellm_proxy" / f"{module}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from litellm.integrations.custom_logger import CustomLogger

    assert isinstance(getattr(mod, attr), CustomLogger)
    assert config["environment_variables"]["DIFFPO_ENDPOINT"].startswith("http")


PROXY_DEPS = ("backoff", "apscheduler", "jwt", "multipart", "semver", "fastapi_sso", "mcp", "expression")


@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in PROXY_DEPS),
                    reason="the LiteLLM proxy's dependencies are not installed")
def test_real_litellm_proxy_with_the_hook(tmp_path, refiner, upstream):
    """The shipped hook inside a real ``litellm --config`` proxy: plain and streamed answers come back refined."""
    config = yaml.safe_load((ROOT / "integrations/litellm_proxy/config.yaml").read_text())
    config["model_list"] = [{"model_name": "fake", "litellm_params": {**llm_args(upstream), "max_retries": 0}}]
    config.pop("environment_variables")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    shutil.copy(ROOT / "integrations/litellm_proxy/diffpo_hook.py", tmp_path / "diffpo_hook.py")
    port, key = free_port(), "sk-master-0123456789abcdef"
    env = {**os.environ, "LITELLM_MASTER_KEY": key, "DIFFPO_ENDPOINT": refiner, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    litellm_cli = Path(sys.executable).parent / "litellm"
    proc = subprocess.Popen([str(litellm_cli), "--config", "config.yaml", "--port", str(port)], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url, headers = f"http://127.0.0.1:{port}", {"authorization": f"Bearer {key}"}
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health/liveliness", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
                time.sleep(0.5)
        body = {"model": "fake", "messages": MSGS}
        r = httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=30)
        msg = r.json()["choices"][0]["message"]
        assert msg["content"] == "R[hello]<draft(hello)>" and msg["provider_specific_fields"]["diffpo"]["refined"]
        text = ""
        with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, headers=headers,
                          timeout=30) as s:
            for line in s.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    for choice in json.loads(line[6:])["choices"]:
                        text += choice["delta"].get("content") or ""
        assert text == "R[hello]<draft(hello)>"
        # the per-request switch: honoured, and taken out before the upstream call (async_pre_call_hook)
        upstream["seen"].clear()
        r = httpx.post(url + "/v1/chat/completions", json={**body, "diffpo_refine": False}, headers=headers,
                       timeout=30)
        assert r.json()["choices"][0]["message"]["content"] == "draft(hello)"
        with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True, "diffpo_refine": False},
                          headers=headers, timeout=30) as s:
            plain = "".join(choice["delta"].get("content") or "" for line in s.iter_lines()
                            if line.startswith("data: ") and line != "data: [DONE]"
                            for choice in json.loads(line[6:])["choices"])
        assert plain == "draft(hello)"
        assert len(upstream["seen"]) == 2 and all("diffpo_refine" not in json.dumps(b) for b in upstream["seen"])
    finally:
        proc.terminate()
        proc.wait(timeout=20)
