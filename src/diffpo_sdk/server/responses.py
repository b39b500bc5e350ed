"""Response shapes every route shares: the JSON error body, and Server-Sent Event streams."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from starlette.types import Receive, Scope, Send

from ..errors import InvalidRequestError
from ..protocol import ErrorBody
from .batcher import DeadlineExceededError, OutOfMemoryError, QueueFullError, ShuttingDownError

#: no caching, and no buffering by nginx-style proxies (a buffered stream arrives all at once)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def error_body(status: int, kind: str, message: str) -> ErrorBody:
    """``{"error": {"type", "message", "code"}}``."""
    return ErrorBody(error={"type": kind, "message": message, "code": status})


def error_response(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The error body with the given status and headers."""
    return JSONResponse(error_body(status, kind, message).model_dump(), status_code=status, headers=headers)


#: what a failure that ends a stream is called in its ``error`` event (anything else: 500 internal_error)
STREAM_ERRORS: dict[type[BaseException], tuple[int, str]] = {
    DeadlineExceededError: (503, "timeout"),
    OutOfMemoryError: (503, "out_of_memory"),
    ShuttingDownError: (503, "shutting_down"),
    QueueFullError: (429, "queue_full"),
    InvalidRequestError: (400, "invalid_request"),
}


def stream_error(exc: BaseException) -> ErrorBody:
    """The error event's body for a failure once the stream's 200 has gone out."""
    for kind, (status, name) in STREAM_ERRORS.items():
        if isinstance(exc, kind):
            return error_body(status, name, str(exc))
    return error_body(500, "internal_error", f"internal error ({type(exc).__name__}); see the server log")


def sse(data: BaseModel | dict[str, Any] | str, event: str | None = None) -> str:
    """One Server-Sent Event: an optional ``event:`` name and one ``data:`` line of JSON (or text)."""
    if isinstance(data, BaseModel):
        data = data.model_dump_json()
    elif not isinstance(data, str):
        data = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return (f"event: {event}\n" if event else "") + f"data: {data}\n\n"


class EventStream(StreamingResponse):
    """``text/event-stream`` that is never buffered, and whose generator is closed however the
    response ends (a client that hangs up included), so the work behind it stops at once."""

    def __init__(self, events: AsyncIterator[str]) -> None:
        super().__init__(events, media_type="text/event-stream", headers=SSE_HEADERS)
        self.events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.events.aclose()  # type: ignore[attr-defined]
