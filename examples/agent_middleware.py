"""Wrap an existing LangChain agent with ``DiffPOMiddleware``: only final answers are refined.

Tool-calling turns pass through untouched; a turn without tool calls (the answer to the
user) is refined with the system prompt and the whole history, tool results included,
as its prompt.

SmolLM2-135M cannot call tools reliably, so this example's model calls the clock tool
itself on the first turn (``ToolFirst``) and lets the real local LLM write the answer from
the tool's result. With your own tool-calling model, pass it to ``create_agent`` directly.

    python examples/agent_middleware.py [--max-new-tokens 96]
"""

from __future__ import annotations

import argparse
import datetime as dt
from typing import Any

from _local import LOCAL_MODEL, register_local_llm
from langchain.agents import create_agent
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.tools import tool

from diffpo_sdk import ChatDiffPO
from diffpo_sdk.agents import DiffPOMiddleware


@tool
def today() -> str:
    """Today's date."""
    return dt.date.today().strftime("%A %d %B %Y")


class ToolFirst(BaseChatModel):
    """Calls ``today`` first, then hands the conversation to a real chat model."""

    llm: BaseChatModel

    @property
    def _llm_type(self) -> str:
        return "tool-first"

    def bind_tools(self, tools: Any, **kwargs: Any) -> ToolFirst:
        return self

    def _generate(self, messages: list, stop: Any = None, run_manager: Any = None, **kwargs: Any) -> ChatResult:
        if not any(isinstance(m, ToolMessage) for m in messages):
            call = {"name": "today", "args": {}, "id": "call-1"}
            return ChatResult(generations=[ChatGeneration(message=AIMessage(content="", tool_calls=[call]))])
        # the small model reads the tool result as plain text
        fact = next(m.content for m in messages if isinstance(m, ToolMessage))
        question = next(m.content for m in messages if isinstance(m, HumanMessage))
        answer = self.llm.invoke([("system", f"Today is {fact}."), ("user", question)])
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content=answer.content))])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--max-new-tokens", type=int, default=96)
    args = p.parse_args()

    register_local_llm()
    llm = ChatDiffPO(model=LOCAL_MODEL, refine=False, temperature=0.7, max_tokens=args.max_new_tokens)
    agent = create_agent(
        ToolFirst(llm=llm), [today], system_prompt="You are a helpful assistant.",
        middleware=[DiffPOMiddleware(block_size="auto", max_new_tokens=args.max_new_tokens)],
    )
    state = agent.invoke({"messages": [HumanMessage("What day of the week is it today?")]})
    for msg in state["messages"]:
        info = msg.response_metadata.get("diffpo") if isinstance(msg, AIMessage) else None
        kind = type(msg).__name__
        if isinstance(msg, AIMessage) and msg.tool_calls:
            print(f"{kind}: tool call {msg.tool_calls[0]['name']} (not refined: {info is None})")
        elif info:
            print(f"{kind} (refined={info['refined']}, {info['iterations']} passes for {info['new_tokens']} tokens):")
            print("  ", str(msg.content)[:300].replace("\n", "\n   "))
        else:
            print(f"{kind}: {str(msg.content)[:120]}")


if __name__ == "__main__":
    main()
