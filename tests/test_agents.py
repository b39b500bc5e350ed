"""DiffPOMiddleware in langchain's create_agent: only final answers are refined, with the full history as prompt."""

from __future__ import annotations

from typing import Any

import pytest
from langchain.agents import create_agent
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.tools import tool

from diffpo_sdk.agents import DiffPOMiddleware
from diffpo_sdk.testing import EchoEngine, free_port, serve_engine
from diffpo_sdk.protocol import RefineItem


class WeatherModel(BaseChatModel):
    """Calls the weather tool for a question, answers from the tool's result."""

    @property
    def _llm_type(self) -> str:
        return "weather-fake"

    def bind_tools(self, tools: Any, **kwargs: Any) -> WeatherModel:
        return self

    def _generate(self, messages, stop=None, run_manager=None, **kwargs) -> ChatResult:
        last = messages[-1]
        if isinstance(last, ToolMessage):
            msg = AIMessage(content=f"It is {last.text} there.")
        else:
            msg = AIMessage(content="", tool_calls=[{"name": "get_weather", "args": {"city": "Paris"}, "id": "c1"}])
        return ChatResult(generations=[ChatGeneration(message=msg)])


@tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    return "sunny"


def describe(item: RefineItem) -> str:
    """The echo refiner's answer lists the turns it was given: role initials plus the draft."""
    turns = item.conversation()
    return "".join(t["role"][0] for t in turns) + f"|{turns[0]['content']}|{item.draft.upper()}"


@pytest.fixture(scope="module")
def echo():
    server = serve_engine(EchoEngine(describe), max_wait_ms=0.0)
    yield server.url
    server.stop()


def make_agent(endpoint: str, **kwargs: Any):
    return create_agent(WeatherModel(), [get_weather], system_prompt="You are a weather bot.",
                        middleware=[DiffPOMiddleware(endpoint=endpoint, **kwargs)])


def check(messages: list) -> None:
    human, call, result, final = messages
    assert isinstance(human, HumanMessage) and isinstance(result, ToolMessage)
    assert call.tool_calls and call.content == ""  # the tool-calling turn passed through untouched
    assert "diffpo" not in call.response_metadata
    # system, user (+ tool call folded into an assistant turn), tool result as a user turn
    assert final.content == "suau|You are a weather bot.|IT IS SUNNY THERE."
    assert final.response_metadata["diffpo"]["refined"] is True
    assert final.response_metadata["diffpo"]["prompt"] == "explicit"


def test_only_the_final_answer_is_refined(echo):
    out = make_agent(echo).invoke({"messages": [HumanMessage("Weather in Paris?")]})
    check(out["messages"])


async def test_async_agent(echo):
    out = await make_agent(echo).ainvoke({"messages": [HumanMessage("Weather in Paris?")]})
    check(out["messages"])


def test_messages_stream_shows_the_draft_state_holds_the_refined(echo):
    agent = make_agent(echo)
    streamed = [m for m, _ in agent.stream({"messages": [HumanMessage("Weather in Paris?")]}, stream_mode="messages")]
    assert any(isinstance(m, AIMessage) and m.content == "It is sunny there." for m in streamed)
    final = list(agent.stream({"messages": [HumanMessage("Weather in Paris?")]}, stream_mode="values"))[-1]
    check(final["messages"])


def test_refiner_down_keeps_the_agents_answer():
    dead = f"http://127.0.0.1:{free_port()}"
    out = make_agent(dead, timeout=0.5).invoke({"messages": [HumanMessage("Weather in Paris?")]})
    final = out["messages"][-1]
    assert final.content == "It is sunny there." and final.response_metadata["diffpo"]["refined"] is False


def test_structured_output_is_left_alone(echo):
    from langchain.agents.middleware import ModelResponse

    mw = DiffPOMiddleware(endpoint=echo)
    response = ModelResponse(result=[AIMessage(content='{"a": 1}')], structured_response={"a": 1})

    class Req:
        system_message = None
        messages = [HumanMessage("q")]

    assert mw.wrap_model_call(Req(), lambda r: response) is response
    plain = mw.wrap_model_call(Req(), lambda r: AIMessage(content="draft"))
    assert plain.content == "u|q|DRAFT"
