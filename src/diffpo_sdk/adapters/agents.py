"""``DiffPOMiddleware``: refine an agent's final answers (``langchain.agents.create_agent``).

    agent = create_agent(model, tools, middleware=[DiffPOMiddleware(block_size=32)])

The middleware wraps each model call. Turns that call tools are the agent's plumbing
and pass through untouched; a turn without tool calls is an answer to the user, and is
refined with the system prompt and the whole message history (tool calls and results
included) as its prompt. Structured output is left alone (refining would break it).

With ``agent.stream(..., stream_mode="messages")`` the tokens streamed are the model's
draft: the refined answer replaces it (same message id) in the agent's state, which is
what ``invoke`` returns and what ``stream_mode="values"`` / ``"updates"`` show.

Needs the ``agents`` extra (``langchain>=1.0``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

from langchain.agents.middleware import AgentMiddleware, ModelRequest, ModelResponse
from langchain_core.messages import AIMessage, BaseMessage

from .answers import pass_through_reason
from .convert import has_tool_calls, text_of
from .runnable import DiffPORefiner

__all__ = ["DiffPOMiddleware"]


class DiffPOMiddleware(AgentMiddleware):
    """Refine the agent's final answers with a DiffPO refiner.

    Takes a ready :class:`~diffpo_sdk.adapters.runnable.DiffPORefiner`, or its keyword
    arguments (``endpoint``, ``block_size``, ``fail_open`` ...; the rest from ``DIFFPO_*``).
    """

    def __init__(self, refiner: DiffPORefiner | None = None, **refiner_kwargs: Any) -> None:
        super().__init__()
        if refiner is not None and refiner_kwargs:
            raise TypeError("give either a refiner or its keyword arguments, not both")
        self.refiner = refiner or DiffPORefiner(**refiner_kwargs)

    def wrap_model_call(self, request: ModelRequest, handler: Callable[[ModelRequest], Any]) -> Any:
        response = handler(request)
        found = _answer(response)
        if found is None:
            return response
        refined = self.refiner.invoke({"messages": _prompt(request), "draft": found})
        return _replace(response, found, refined)

    async def awrap_model_call(self, request: ModelRequest,
                               handler: Callable[[ModelRequest], Awaitable[Any]]) -> Any:
        response = await handler(request)
        found = _answer(response)
        if found is None:
            return response
        refined = await self.refiner.ainvoke({"messages": _prompt(request), "draft": found})
        return _replace(response, found, refined)


def _model_response(response: Any) -> ModelResponse | None:
    if isinstance(response, ModelResponse):
        return response
    inner = getattr(response, "model_response", None)  # ExtendedModelResponse
    return inner if isinstance(inner, ModelResponse) else None


def _answer(response: Any) -> AIMessage | None:
    """The final answer in a model call's result, or None when there is nothing to refine."""
    structured = False
    if isinstance(response, AIMessage):
        candidates: list[BaseMessage] = [response]
    else:
        mr = _model_response(response)
        if mr is None:
            return None
        candidates, structured = mr.result, mr.structured_response is not None
    ai = next((m for m in reversed(candidates) if isinstance(m, AIMessage)), None)
    if ai is None or pass_through_reason(text_of(ai), tool_calls=has_tool_calls(ai), structured=structured):
        return None
    return ai


def _prompt(request: ModelRequest) -> list[BaseMessage]:
    system = [request.system_message] if request.system_message is not None else []
    return [*system, *request.messages]


def _replace(response: Any, old: AIMessage, new: AIMessage) -> Any:
    if isinstance(response, AIMessage):
        return new
    if isinstance(response, ModelResponse):
        return dataclasses.replace(response, result=[new if m is old else m for m in response.result])
    return dataclasses.replace(response, model_response=_replace(response.model_response, old, new))
