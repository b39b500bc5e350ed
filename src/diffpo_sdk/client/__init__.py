"""Refiner clients: one sync and one async client, each over a transport.

``stream(items, ...)`` yields the refined text as it is verified (:class:`StreamPiece`).
``refine(items, ...)`` returns a :class:`~diffpo_sdk.protocol.RefineResponse` or raises a
typed error; ``refine_or_keep(items, ...)`` never loses a draft: when the refiner cannot
answer it returns the draft marked ``{"refined": False, "reason": ..., "error": ...}``
(fail-open), or raises in strict mode. Every call is one OpenTelemetry span.

- :mod:`.core`: :class:`RefinerClient` / :class:`AsyncRefinerClient`, what every call
  shares (options, the prompt guard, one deadline, spans, fail-open), and the
  :class:`Transport` protocol;
- :mod:`.http`: HTTP transports with failover and retries, and ``DiffPOClient`` /
  ``AsyncDiffPOClient``;
- :mod:`.in_process`: the engine in this process, and ``InProcessClient`` /
  ``AsyncInProcessClient``;
- :mod:`.shared`: a backend from the settings, one shared client per settings;
- :mod:`.genai_metrics`: the GenAI client metrics every call records (OpenTelemetry metrics API).
"""

from .core import (
    NO_PROMPT,
    REFINER_FAILED,
    AsyncRefinerClient,
    AsyncTransport,
    Outcome,
    RefinerClient,
    StreamPiece,
    Transport,
    draft_rest,
    has_prompt,
    warn_once,
)
from .http import AsyncDiffPOClient, AsyncHTTPTransport, DiffPOClient, HTTPTransport
from .in_process import AsyncEngineTransport, AsyncInProcessClient, EngineTransport, InProcessClient
from .shared import (
    async_client_from_settings,
    client_from_settings,
    settings_key,
    shared_async_client,
    shared_client,
    use_shared_client,
)

__all__ = [
    "NO_PROMPT",
    "REFINER_FAILED",
    "AsyncDiffPOClient",
    "AsyncEngineTransport",
    "AsyncHTTPTransport",
    "AsyncInProcessClient",
    "AsyncRefinerClient",
    "AsyncTransport",
    "DiffPOClient",
    "EngineTransport",
    "HTTPTransport",
    "InProcessClient",
    "Outcome",
    "RefinerClient",
    "StreamPiece",
    "Transport",
    "async_client_from_settings",
    "client_from_settings",
    "draft_rest",
    "has_prompt",
    "settings_key",
    "shared_async_client",
    "shared_client",
    "use_shared_client",
    "warn_once",
]
