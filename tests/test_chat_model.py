"""ChatDiffPO: langchain-tests' standard unit suite (offline) plus behaviour against a local upstream and refiner."""

from __future__ import annotations

import pytest
from langchain_core.output_parsers import StrOutputParser
from langchain_core.tools import tool
from langchain_tests.unit_tests import ChatModelUnitTests
from test_litellm import upstream_app  # the local OpenAI-compatible upstream

from diffpo_sdk.testing import EchoEngine, ServerThread, free_port, serve_engine
from diffpo_sdk.adapters.chat_model import ChatDiffPO


class TestChatDiffPOStandard(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatDiffPO]:
        return ChatDiffPO

    @property
    def chat_model_params(self) -> dict:
        return {"model": "openai/gpt-4o-mini"}


@pytest.fixture(scope="module")
def setup():
    refiner = serve_engine(EchoEngine(lambda it: f"R[{it.conversation()[-1]['content']}]<{it.draft}>"), max_wait_ms=0)
    upstream = ServerThread(upstream_app([])).start()
    yield {"model": "openai/fake", "api_base": upstream.url + "/v1", "api_key": "sk-test",
           "refiner_endpoint": refiner.url}
    refiner.stop()
    upstream.stop()


@tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    return "sunny"


def test_invoke_refines(setup):
    llm = ChatDiffPO(**setup, temperature=0, max_tokens=50, block_size=8)
    out = llm.invoke("hello")
    assert out.content == "R[hello]<draft(hello)>"
    assert out.response_metadata["diffpo"]["refined"] is True and out.response_metadata["diffpo"]["block_size"] == 8
    assert out.usage_metadata["input_tokens"] == 5
    assert (llm | StrOutputParser()).invoke("x") == "R[x]<draft(x)>"


def test_stream_yields_the_refined_answer(setup):
    llm = ChatDiffPO(**setup)
    chunks = list(llm.stream("hello"))
    assert "".join(c.content for c in chunks) == "R[hello]<draft(hello)>"
    merged = chunks[0]
    for c in chunks[1:]:
        merged += c
    assert merged.response_metadata["diffpo"]["refined"] is True and merged.response_metadata["finish_reason"] == "stop"


async def test_async(setup):
    llm = ChatDiffPO(**setup)
    assert (await llm.ainvoke("a")).content == "R[a]<draft(a)>"
    assert "".join([c.content async for c in llm.astream("b")]) == "R[b]<draft(b)>"


def test_tool_calls_are_not_refined(setup):
    llm = ChatDiffPO(**setup).bind_tools([get_weather], tool_choice="any")
    out = llm.invoke("weather?")
    assert out.tool_calls[0]["name"] == "lookup" and out.content == ""
    assert "diffpo" not in out.response_metadata
    streamed = None
    for c in llm.stream("weather?"):
        streamed = c if streamed is None else streamed + c
    assert streamed.tool_calls[0]["name"] == "lookup"


def test_mock_response_and_refiner_down():
    dead = f"http://127.0.0.1:{free_port()}"
    llm = ChatDiffPO(model="openai/gpt-4o-mini", model_kwargs={"mock_response": "the draft"}, refiner_endpoint=dead,
                     refiner_timeout=0.5)
    out = llm.invoke("q")
    assert out.content == "the draft" and out.response_metadata["diffpo"]["refined"] is False
