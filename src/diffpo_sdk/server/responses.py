"""The JSON error body every route answers with, in one place for the API and the proxy."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from ..protocol import ErrorBody


def error_response(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """``{"error": {"type", "message", "code"}}`` with the given status and headers."""
    body = ErrorBody(error={"type": kind, "message": message, "code": status})
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)
