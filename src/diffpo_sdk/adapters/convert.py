"""From LangChain / OpenAI messages to the refiner's conversation.

The refiner's chat template knows three roles (system, user, assistant) and the draft
answers the last user turn. Agent histories also hold tool calls and tool results; the
refiner still needs them as context, so they become text turns: a tool call is written
into the assistant turn that made it, a tool result into a user turn. Consecutive turns
of one role are merged (some templates, Gemma's, insist on alternation).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
    convert_to_messages,
)
from langchain_core.prompt_values import PromptValue

from ..protocol import Message

_ROLES = {"human": "user", "user": "user", "ai": "assistant", "assistant": "assistant", "system": "system",
          "developer": "system"}


def text_of(message: BaseMessage) -> str:
    """The message's text, whatever content blocks it holds."""
    return str(message.text)


def has_tool_calls(message: Any) -> bool:
    """Tool-calling turns are the agent's plumbing, not an answer: they pass through untouched."""
    if not isinstance(message, BaseMessage):
        return False
    if getattr(message, "tool_calls", None) or getattr(message, "tool_call_chunks", None):
        return True
    if getattr(message, "invalid_tool_calls", None):
        return True
    extra = message.additional_kwargs or {}
    return bool(extra.get("tool_calls") or extra.get("function_call"))


def to_messages(prompt: Any) -> list[BaseMessage] | None:
    """A str, a PromptValue, or a list of messages (LangChain, OpenAI dicts, tuples) as messages."""
    if prompt is None:
        return None
    if isinstance(prompt, str):
        return [HumanMessage(content=prompt)]
    if isinstance(prompt, PromptValue):
        return prompt.to_messages()
    if isinstance(prompt, BaseMessage):
        return [prompt]
    if isinstance(prompt, Sequence):
        # OpenAI turns that only call tools may leave out "content" (or send null)
        turns = [{**m, "content": m.get("content") or ""} if isinstance(m, dict) and "role" in m else m
                 for m in prompt]
        try:
            return convert_to_messages(turns)
        except (ValueError, TypeError, NotImplementedError):
            return None
    return None


def conversation(prompt: Any) -> list[Message] | None:
    """The refiner turns for a prompt, or ``None`` when it has no user turn to answer."""
    messages = to_messages(prompt)
    if not messages:
        return None
    turns: list[tuple[str, str]] = []
    for msg in messages:
        role, text = _turn(msg)
        if role == "system" and turns:  # a late system turn is an instruction to the user's side
            role = "user"
        if not text:
            continue
        if turns and turns[-1][0] == role:
            turns[-1] = (role, f"{turns[-1][1]}\n\n{text}")
        else:
            turns.append((role, text))
    while turns and turns[-1][0] != "user":  # the draft answers the last user turn
        turns.pop()
    if not any(role == "user" for role, _ in turns):
        return None
    return [Message(role=role, content=text) for role, text in turns]  # type: ignore[arg-type]


def _turn(msg: BaseMessage) -> tuple[str, str]:
    text = text_of(msg)
    if isinstance(msg, ToolMessage):
        name = f" {msg.name}" if msg.name else ""
        return "user", f"[tool result{name}]\n{text}"
    if isinstance(msg, AIMessage):
        calls = [f"[tool call] {c['name']}({json.dumps(c.get('args', {}), ensure_ascii=False)})"
                 for c in (msg.tool_calls or [])]
        return "assistant", "\n".join([text, *calls] if text else calls)
    if isinstance(msg, SystemMessage):
        return "system", text
    if isinstance(msg, ChatMessage):
        return _ROLES.get(msg.role, "user"), text
    return _ROLES.get(msg.type, "user"), text
