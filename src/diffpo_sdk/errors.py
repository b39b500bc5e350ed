"""Typed errors, one family for every layer, so callers can catch what they can handle."""

from __future__ import annotations


class DiffPOError(Exception):
    """Base class of every error diffpo-sdk raises on purpose."""


class InvalidRequestError(DiffPOError, ValueError):
    """The input cannot be refined as given (bad option, role, empty conversation...)."""


class ContextLengthError(InvalidRequestError):
    """The prompt (plus the answer budget) does not fit in the refiner's context window."""


class ModelNotFoundError(DiffPOError, FileNotFoundError):
    """The refiner model could not be found or loaded; the message says how to get it."""


class RefinerUnavailableError(DiffPOError):
    """The refiner could not answer (connection, timeout, overload) after bounded retries.

    Raised only in strict mode (``fail_open=False``); by default the draft is returned
    instead, marked unrefined.
    """

    def __init__(self, message: str, *, status_code: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.retry_after = retry_after
