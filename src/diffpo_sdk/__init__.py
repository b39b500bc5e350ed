"""diffpo-sdk: align any LLM's answer after the fact with a DiffPO refiner.

``import diffpo_sdk`` stays light (no torch, no transformers): the client pieces load on
first use, and the engine, server and trainer live behind extras.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    ContextLengthError,
    DiffPOError,
    InvalidRequestError,
    ModelNotFoundError,
    RefinerUnavailableError,
)
from .protocol import Message, RefinedItem, RefineItem, RefineOptions, RefineRequest, RefineResponse

__version__ = "0.1.0"

#: public name -> module that defines it, imported on first access
_LAZY = {
    "DiffPORefiner": "diffpo_sdk.adapters.runnable",
    "DiffPOClient": "diffpo_sdk.client",
    "AsyncDiffPOClient": "diffpo_sdk.client",
    "completion": "diffpo_sdk.adapters.litellm",
    "acompletion": "diffpo_sdk.adapters.litellm",
    "DiffPOSettings": "diffpo_sdk.settings",
    "InProcessClient": "diffpo_sdk.client",
    "AsyncInProcessClient": "diffpo_sdk.client",
    "ChatDiffPO": "diffpo_sdk.adapters.chat_model",
    "DiffPOMiddleware": "diffpo_sdk.adapters.agents",
}

if TYPE_CHECKING:  # pragma: no cover
    from .adapters.agents import DiffPOMiddleware
    from .adapters.chat_model import ChatDiffPO
    from .adapters.litellm import acompletion, completion
    from .adapters.runnable import DiffPORefiner
    from .client import AsyncDiffPOClient, AsyncInProcessClient, DiffPOClient, InProcessClient
    from .settings import DiffPOSettings


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'diffpo_sdk' has no attribute {name!r}")


__all__ = [
    "AsyncDiffPOClient",
    "AsyncInProcessClient",
    "ChatDiffPO",
    "DiffPOMiddleware",
    "InProcessClient",
    "ContextLengthError",
    "DiffPOClient",
    "DiffPOError",
    "DiffPORefiner",
    "DiffPOSettings",
    "InvalidRequestError",
    "Message",
    "ModelNotFoundError",
    "RefineItem",
    "RefineOptions",
    "RefineRequest",
    "RefineResponse",
    "RefinedItem",
    "RefinerUnavailableError",
    "__version__",
    "acompletion",
    "completion",
]
