"""Which answers get refined, and how a refined answer's finish reason reads: decided once.

Every surface (the LangChain runnable, the agent middleware, the LiteLLM wrapper and
hook, the OpenAI-compatible proxy) asks here, so they agree:

- an answer that calls tools is the agent's plumbing: passed through untouched;
- structured output (``response_format``, an agent's structured response) would break
  if rewritten: passed through untouched;
- an empty answer has no draft to refine (the refiner would write its own answer in its
  place): passed through untouched;
- an answer that follows tool results is an answer to the user: refined, with the tool
  calls and results as text turns of its prompt (see ``convert.conversation``).

A refined answer ends for the refiner's reason: ``"length"`` when it ran out of
``max_new_tokens``, else ``"stop"`` (whatever cut the draft short no longer applies).
"""

from __future__ import annotations

from typing import Any, Literal

__all__ = ["EMPTY", "STRUCTURED", "TOOL_CALLS", "pass_through_reason", "openai_pass_through_reason",
           "refined_finish_reason"]

TOOL_CALLS = "tool_calls"
STRUCTURED = "structured_output"
EMPTY = "empty_answer"


def pass_through_reason(text: Any, *, tool_calls: bool, structured: bool = False) -> str | None:
    """Why this answer is passed through untouched, or ``None`` when it is refined."""
    if tool_calls:
        return TOOL_CALLS
    if structured:
        return STRUCTURED
    if not isinstance(text, str) or not text.strip():
        return EMPTY
    return None


def _get(obj: Any, key: str) -> Any:
    return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)


def openai_pass_through_reason(message: Any, *, structured: bool = False) -> str | None:
    """:func:`pass_through_reason` for an OpenAI-shaped message (a dict or LiteLLM's ``Message``)."""
    if message is None:
        return EMPTY
    calls = bool(_get(message, "tool_calls") or _get(message, "function_call"))
    return pass_through_reason(_get(message, "content"), tool_calls=calls, structured=structured)


def refined_finish_reason(refiner_reason: str) -> Literal["stop", "length"]:
    """The finish reason a refined answer reports, on every surface."""
    return "length" if refiner_reason == "length" else "stop"
