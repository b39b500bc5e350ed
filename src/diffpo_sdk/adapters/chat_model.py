"""``ChatDiffPO``: a LangChain chat model that calls any LLM through LiteLLM and refines its answers.

    llm = ChatDiffPO(model="openai/gpt-4o-mini", block_size=32)
    llm.invoke("Explain TCP slow start.")      # AIMessage, refined; stats in response_metadata["diffpo"]

For code that wants one object instead of ``llm | DiffPORefiner()``. It takes the usual
chat-model parameters (temperature, max_tokens, timeout, stop, max_retries, api_key) and
LiteLLM's model ids; tool calling and structured output work as with any chat model
(tool-calling turns and structured answers are not refined). Streams yield the refined
answer as the refiner verifies it, once the upstream draft is complete (the refiner needs all
of it); the stats come on the last text chunk.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    convert_to_messages,
    convert_to_openai_messages,
)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import Field, SecretStr

from ..protocol import BlockSize
from ..settings import DiffPOSettings

__all__ = ["ChatDiffPO"]


class ChatDiffPO(BaseChatModel):
    """Any LiteLLM model, its answers refined by a DiffPO refiner."""

    model: str = Field(description="LiteLLM model id, e.g. 'openai/gpt-4o-mini' or 'ollama/llama3'")
    temperature: float | None = None
    max_tokens: int | None = None
    timeout: float | None = Field(None, description="the LLM call's timeout (the refiner's is refiner_timeout)")
    stop: list[str] | None = None
    max_retries: int = Field(0, description="LiteLLM retries of the LLM call (the only retry layer for it)")
    api_key: SecretStr | None = None
    api_base: str | None = None
    streaming: bool = False
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="extra litellm.completion arguments")

    refine: bool = True
    block_size: BlockSize | None = None
    max_iterations: int | None = None
    refiner_endpoint: str | list[str] | None = None
    refiner_timeout: float | None = None
    fail_open: bool | None = None
    refiner_settings: DiffPOSettings | None = None

    @property
    def _llm_type(self) -> str:
        return "diffpo-litellm"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self.model, "temperature": self.temperature, "max_tokens": self.max_tokens,
                "block_size": self.block_size, "refine": self.refine}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(ls_provider="litellm", ls_model_name=kwargs.get("model", self.model),
                                 ls_model_type="chat")
        if self.temperature is not None:
            params["ls_temperature"] = self.temperature
        if self.max_tokens is not None:
            params["ls_max_tokens"] = self.max_tokens
        if stop or self.stop:
            params["ls_stop"] = stop or self.stop
        return params

    def bind_tools(self, tools: Sequence[Any], *, tool_choice: Any = None, **kwargs: Any) -> Any:
        """OpenAI-format tools (LiteLLM translates them for each provider)."""
        formatted = [convert_to_openai_tool(t) for t in tools]
        if tool_choice is not None:
            if tool_choice == "any":
                tool_choice = "required"
            elif isinstance(tool_choice, str) and tool_choice not in ("auto", "none", "required"):
                tool_choice = {"type": "function", "function": {"name": tool_choice}}
            kwargs["tool_choice"] = tool_choice
        return super().bind(tools=formatted, **kwargs)

    # -- calls -------------------------------------------------------------------------------

    def _params(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        settings = (self.refiner_settings or DiffPOSettings()).merged(timeout=self.refiner_timeout)
        params: dict[str, Any] = {
            "model": self.model,
            "messages": convert_to_openai_messages(messages),
            "refine": self.refine,
            "block_size": self.block_size,
            "max_iterations": self.max_iterations,
            "fail_open": self.fail_open,
            "refiner_endpoint": self.refiner_endpoint,
            "refiner_settings": settings,
            "num_retries": self.max_retries,
            **self.model_kwargs,
        }
        optional = {"temperature": self.temperature, "max_tokens": self.max_tokens, "timeout": self.timeout,
                    "api_base": self.api_base, "stop": stop or self.stop,
                    "api_key": self.api_key.get_secret_value() if self.api_key else None}
        params.update({k: v for k, v in optional.items() if v is not None})
        params.update(kwargs)
        return params

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        from .litellm import completion

        return _result(completion(**self._params(messages, stop, kwargs)))

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        from .litellm import acompletion

        return _result(await acompletion(**self._params(messages, stop, kwargs)))

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        from .litellm import completion

        for chunk in completion(**self._params(messages, stop, {**kwargs, "stream": True})):
            gen = _chunk(chunk)
            if run_manager and gen.text:
                run_manager.on_llm_new_token(gen.text, chunk=gen)
            yield gen

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        from .litellm import acompletion

        async for chunk in await acompletion(**self._params(messages, stop, {**kwargs, "stream": True})):
            gen = _chunk(chunk)
            if run_manager and gen.text:
                await run_manager.on_llm_new_token(gen.text, chunk=gen)
            yield gen


# -- LiteLLM objects to LangChain messages ---------------------------------------------------------


def _usage(usage: Any) -> UsageMetadata | None:
    if usage is None or getattr(usage, "prompt_tokens", None) is None:
        return None
    return UsageMetadata(input_tokens=usage.prompt_tokens or 0, output_tokens=usage.completion_tokens or 0,
                         total_tokens=usage.total_tokens or 0)


def _result(response: Any) -> ChatResult:
    generations = []
    for choice in response.choices:
        raw = choice.message.model_dump(exclude_none=True)
        stats = (raw.pop("provider_specific_fields", None) or {}).get("diffpo")
        raw = {k: v for k, v in raw.items() if k in ("role", "content", "tool_calls", "function_call")}
        raw.setdefault("content", "")
        [msg] = convert_to_messages([raw])  # parses tool calls (invalid JSON -> invalid_tool_calls)
        meta = {"model_name": response.model, "finish_reason": choice.finish_reason, "model_provider": "litellm"}
        if stats is not None:
            meta["diffpo"] = stats
        msg = AIMessage(content=msg.content, tool_calls=getattr(msg, "tool_calls", []),
                        invalid_tool_calls=getattr(msg, "invalid_tool_calls", []), id=response.id,
                        response_metadata=meta, usage_metadata=_usage(getattr(response, "usage", None)))
        generations.append(ChatGeneration(message=msg, generation_info={"finish_reason": choice.finish_reason}))
    return ChatResult(generations=generations, llm_output={"model_name": response.model})


def _chunk(chunk: Any) -> ChatGenerationChunk:
    choice = chunk.choices[0] if chunk.choices else None
    delta = getattr(choice, "delta", None)
    content = (getattr(delta, "content", None) or "") if delta is not None else ""
    tool_chunks = [
        {"name": tc.function.name if tc.function else None, "args": tc.function.arguments if tc.function else None,
         "id": tc.id, "index": getattr(tc, "index", i)}
        for i, tc in enumerate(getattr(delta, "tool_calls", None) or [])
    ]
    meta: dict[str, Any] = {}
    stats = (getattr(delta, "provider_specific_fields", None) or {}).get("diffpo")
    if stats is not None:
        meta["diffpo"] = stats
    if choice is not None and choice.finish_reason:
        meta.update({"finish_reason": choice.finish_reason, "model_name": chunk.model, "model_provider": "litellm"})
    msg = AIMessageChunk(content=content, tool_call_chunks=tool_chunks, response_metadata=meta, id=chunk.id,
                         usage_metadata=_usage(getattr(chunk, "usage", None)))
    return ChatGenerationChunk(message=msg)
