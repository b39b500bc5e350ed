"""A real LLM on this machine, reachable the way users reach theirs: through LiteLLM.

The demo, the examples and the tests need a base model that writes drafts without a
network or an API key. This module runs a small instruct model (by default the built-in
SmolLM2-135M-Instruct) with transformers, *sampling* (temperature 0.7 by default), so its
drafts differ from the refiner's greedy answer the way another model's would, and offers
it two ways:

- a LiteLLM custom provider: ``register()`` then
  ``litellm.completion(model="local/smollm2-135m-instruct", messages=...)``;
- an OpenAI-compatible HTTP endpoint on loopback:
  ``python -m diffpo_sdk.apps.local_llm --port 8001`` (``POST /v1/chat/completions``), usable as
  the refining proxy's upstream (``diffpo serve --upstream-api-base http://127.0.0.1:8001/v1``).

Needs the ``engine`` extra (torch, transformers); ``import diffpo_sdk`` never imports it.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

from ..generation import generate_cut

__all__ = ["Completion", "LocalChatModel", "create_app", "main", "register"]

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass
class Completion:
    """One sampled answer and what it cost."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" or "length"
    seconds: float


def _text(content: Any) -> str:
    """OpenAI content may be a string or a list of parts; keep the text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type", "text") == "text")


class LocalChatModel:
    """A chat model generating with transformers, loaded on first use, one call at a time."""

    def __init__(self, model: str = DEFAULT_MODEL, *, device: str = "cpu", dtype: str = "float32") -> None:
        self.name, self.device, self.dtype = model, device, dtype
        self._model: Any = None
        self._tokenizer: Any = None
        self._stop: list[int] = []
        self._lock = threading.Lock()

    def load(self) -> LocalChatModel:
        """Load the weights now (otherwise the first call does)."""
        with self._lock:
            if self._model is None:
                from ..engine import templating
                from ..engine.loading import (
                    load_model_and_tokenizer,
                    resolve_device,
                    resolve_dtype,
                )

                dev = resolve_device(self.device)
                model, tok, _ = load_model_and_tokenizer(self.name, device=dev, dtype=resolve_dtype(self.dtype, dev))
                templating.ensure_pad_token(tok)
                self._stop = sorted(templating.stop_token_ids(tok, model.config, model.generation_config))
                self._model, self._tokenizer = model.eval(), tok
        return self

    def chat(self, messages: list[dict[str, Any]], *, max_tokens: int = 256, temperature: float = 0.7,
             top_p: float = 0.95, seed: int | None = None) -> Completion:
        """Answer the conversation. ``temperature=0`` is greedy; ``seed`` makes sampling repeatable."""
        import torch

        self.load()
        conv = [{"role": m["role"], "content": _text(m.get("content"))} for m in messages
                if m.get("role") in ("system", "user", "assistant")]
        if not conv or conv[-1]["role"] != "user":
            raise ValueError("the last message must be a user message")
        from ..engine import templating

        prompt = templating.prompt_ids(self._tokenizer, conv)
        ids = torch.tensor([prompt], device=self._model.device)
        sample = temperature > 0
        kwargs: dict[str, Any] = {"do_sample": sample}
        if sample:
            kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
        t0 = time.perf_counter()
        with self._lock, torch.inference_mode():
            if seed is not None:
                torch.manual_seed(seed)
            [(answer, stopped)] = generate_cut(self._model, ids, torch.ones_like(ids), max_new_tokens=max_tokens,
                                               stop_ids=self._stop, pad_id=self._tokenizer.pad_token_id,
                                               keep_stop=False, **kwargs)
        finish = "stop" if stopped else "length"
        text = self._tokenizer.decode(answer, skip_special_tokens=True)
        return Completion(text, len(prompt), len(answer), finish, time.perf_counter() - t0)


# -- LiteLLM custom provider ----------------------------------------------------------------


def _params(optional_params: dict[str, Any] | None) -> dict[str, Any]:
    p = optional_params or {}
    out: dict[str, Any] = {}
    if p.get("max_tokens") or p.get("max_completion_tokens"):
        out["max_tokens"] = int(p.get("max_tokens") or p.get("max_completion_tokens"))
    for key in ("temperature", "top_p"):
        if p.get(key) is not None:
            out[key] = float(p[key])
    if p.get("seed") is not None:
        out["seed"] = int(p["seed"])
    return out


def _make_provider(device: str, dtype: str) -> Any:
    """Build the handler; the class is defined here so importing this module skips LiteLLM."""
    from litellm import CustomLLM

    class LocalLLMProvider(CustomLLM):
        """A ``litellm.CustomLLM`` answering ``<provider>/<model>`` with :class:`LocalChatModel` s."""

        def __init__(self) -> None:
            super().__init__()
            self.models: dict[str, LocalChatModel] = {}
            self._lock = threading.Lock()

        def model(self, name: str) -> LocalChatModel:
            with self._lock:
                if name not in self.models:
                    self.models[name] = LocalChatModel(name, device=device, dtype=dtype)
                return self.models[name]

        def _answer(self, model: str, messages: list, optional_params: dict, model_response: Any) -> Any:
            from litellm.types.utils import Usage

            done = self.model(model).chat(messages, **_params(optional_params))
            model_response.choices[0].message.content = done.text
            model_response.choices[0].finish_reason = done.finish_reason
            model_response.model = model
            model_response.usage = Usage(prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens,
                                         total_tokens=done.prompt_tokens + done.completion_tokens)
            return model_response

        def completion(self, model: str, messages: list, api_base: str, custom_prompt_dict: dict,
                       model_response: Any, print_verbose: Any, encoding: Any, api_key: Any, logging_obj: Any,
                       optional_params: dict, *args: Any, **kwargs: Any) -> Any:
            return self._answer(model, messages, optional_params, model_response)

        async def acompletion(self, model: str, messages: list, api_base: str, custom_prompt_dict: dict,
                              model_response: Any, print_verbose: Any, encoding: Any, api_key: Any,
                              logging_obj: Any, optional_params: dict, *args: Any, **kwargs: Any) -> Any:
            import asyncio

            return await asyncio.to_thread(self._answer, model, messages, optional_params, model_response)

        def _chunks(self, model: str, messages: list, optional_params: dict) -> Iterator[dict[str, Any]]:
            # the whole answer as one chunk: the model generates it before anything is sent
            done = self.model(model).chat(messages, **_params(optional_params))
            yield {"text": done.text, "is_finished": True, "finish_reason": done.finish_reason, "index": 0,
                   "tool_use": None,
                   "usage": {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                             "total_tokens": done.prompt_tokens + done.completion_tokens}}

        def streaming(self, model: str, messages: list, api_base: str, custom_prompt_dict: dict,
                      model_response: Any, print_verbose: Any, encoding: Any, api_key: Any, logging_obj: Any,
                      optional_params: dict, *args: Any, **kwargs: Any) -> Iterator[dict[str, Any]]:
            yield from self._chunks(model, messages, optional_params)

        async def astreaming(self, model: str, messages: list, api_base: str, custom_prompt_dict: dict,
                             model_response: Any, print_verbose: Any, encoding: Any, api_key: Any,
                             logging_obj: Any, optional_params: dict, *args: Any,
                             **kwargs: Any) -> AsyncIterator[dict[str, Any]]:
            import asyncio

            for chunk in await asyncio.to_thread(lambda: list(self._chunks(model, messages, optional_params))):
                yield chunk

    return LocalLLMProvider()


def register(provider: str = "local", *, device: str = "cpu", dtype: str = "float32") -> Any:
    """Make ``litellm.completion(model=f"{provider}/<model>")`` answer with a local model.

    ``<model>`` is anything :class:`LocalChatModel` loads (the built-in
    ``smollm2-135m-instruct``, a local folder). Registering again replaces the handler.
    Returns the provider (its ``models`` hold the loaded :class:`LocalChatModel` s).
    """
    import litellm

    handler = _make_provider(device, dtype)
    litellm.custom_provider_map = [m for m in litellm.custom_provider_map if m.get("provider") != provider]
    litellm.custom_provider_map.append({"provider": provider, "custom_handler": handler})
    return handler


# -- OpenAI-compatible endpoint -------------------------------------------------------------


def create_app(model: LocalChatModel) -> Any:
    """A FastAPI app with ``POST /v1/chat/completions`` (no streaming) and ``GET /v1/models``."""
    import asyncio

    from fastapi import FastAPI, HTTPException

    app = FastAPI(title="diffpo-sdk local LLM")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model.name, "object": "model", "owned_by": "local"}]}

    @app.post("/v1/chat/completions")
    async def chat(body: dict[str, Any]) -> dict[str, Any]:
        if body.get("stream"):
            raise HTTPException(400, "this local endpoint does not stream; send stream=false")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise HTTPException(400, "messages must be a non-empty list")
        try:
            done = await asyncio.to_thread(model.chat, messages, **_params(body))
        except ValueError as e:
            raise HTTPException(400, str(e)) from e
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model") or model.name,
            "choices": [{"index": 0, "finish_reason": done.finish_reason,
                         "message": {"role": "assistant", "content": done.text}}],
            "usage": {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                      "total_tokens": done.prompt_tokens + done.completion_tokens},
        }

    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m diffpo_sdk.apps.local_llm",
                                description="Serve a local LLM as an OpenAI-compatible endpoint on loopback.")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--host", default="127.0.0.1", help="loopback by default: this endpoint has no auth")
    p.add_argument("--port", type=int, default=8001)
    args = p.parse_args(argv)
    import uvicorn

    model = LocalChatModel(args.model, device=args.device, dtype=args.dtype).load()
    uvicorn.run(create_app(model), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
