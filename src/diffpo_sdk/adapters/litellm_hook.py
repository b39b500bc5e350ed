"""A LiteLLM proxy hook that refines every chat answer the proxy returns.

Non-streaming answers go through ``async_post_call_success_hook``; streams through
``async_post_call_streaming_iterator_hook`` (the proxy does not call the success hook
for streams), which collects the upstream stream (the draft), then streams the refined
answer as the refiner verifies it. A request opts out with ``"diffpo_refine": false`` in
its body: ``async_pre_call_hook`` takes that switch out of the request (so it never
reaches the upstream provider) and keeps it in the request's proxy metadata. Settings come from
``DIFFPO_*`` environment variables (the proxy config's ``environment_variables:``
section can set them). This module imports LiteLLM; ``diffpo_sdk.adapters.litellm`` does not.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping
from typing import Any

from litellm.integrations.custom_logger import CustomLogger
from opentelemetry import trace

from ..settings import DiffPOSettings
from .litellm import aiter_in_span, arefine_response, arefine_stream

__all__ = ["DiffPOProxyHook"]


#: the request body's opt-out switch, and where the pre-call hook keeps it for the post-call hooks
SWITCH = "diffpo_refine"


def _opted_out(data: Mapping[str, Any] | None) -> bool:
    data = data or {}
    metadata = data.get("metadata") or {}
    return data.get(SWITCH) is False or (isinstance(metadata, Mapping) and metadata.get(SWITCH) is False)


def _parent(data: dict[str, Any] | None) -> Any:
    """The proxy's request span, so the refinement span nests under it."""
    for key in ("metadata", "litellm_metadata"):
        span = ((data or {}).get(key) or {}).get("litellm_parent_otel_span")
        if span is not None and hasattr(span, "get_span_context"):
            return span
    return trace.get_current_span()


class DiffPOProxyHook(CustomLogger):
    """``litellm_settings: {callbacks: diffpo_hook.proxy_handler_instance}`` in the proxy config."""

    def __init__(self, settings: DiffPOSettings | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings = settings or DiffPOSettings()

    async def async_pre_call_hook(self, user_api_key_dict: Any, cache: Any, data: dict, call_type: Any) -> dict:
        """Take the per-request switch out of the body before the upstream call; keep it in the metadata."""
        if SWITCH in data:
            value = data.pop(SWITCH)
            data["metadata"] = {**(data.get("metadata") or {}), SWITCH: value}
        return data

    async def async_post_call_success_hook(self, data: dict, user_api_key_dict: Any, response: Any) -> Any:
        if getattr(response, "choices", None) is None or _opted_out(data):
            return response  # embeddings, images, ... or opted out per request
        with trace.use_span(_parent(data), end_on_exit=False):
            return await arefine_response(response, data.get("messages"), settings=self.settings, request=data)

    async def async_post_call_streaming_iterator_hook(
        self, user_api_key_dict: Any, response: Any, request_data: dict
    ) -> AsyncGenerator[Any, None]:
        if _opted_out(request_data) or not request_data.get("messages"):
            async for chunk in response:
                yield chunk
            return
        refined = arefine_stream(response, request_data.get("messages"), settings=self.settings, request=request_data)
        async for chunk in aiter_in_span(refined, _parent(request_data)):
            yield chunk
