"""Choosing a backend from the settings, and one shared client per settings in a process."""

from __future__ import annotations

import asyncio
import threading
import weakref

from ..settings import DiffPOSettings
from .core import AsyncRefinerClient, RefinerClient
from .http import AsyncDiffPOClient, DiffPOClient
from .in_process import AsyncInProcessClient, InProcessClient

__all__ = ["async_client_from_settings", "client_from_settings", "settings_key", "shared_async_client",
           "shared_client", "use_shared_client"]



def client_from_settings(settings: DiffPOSettings) -> RefinerClient:
    """The HTTP client when an endpoint is set, else the in-process engine."""
    if settings.resolved_backend() == "http":
        return DiffPOClient(settings=settings)
    return InProcessClient(settings=settings)


def async_client_from_settings(settings: DiffPOSettings) -> AsyncRefinerClient:
    """The asyncio form of :func:`client_from_settings`."""
    if settings.resolved_backend() == "http":
        return AsyncDiffPOClient(settings=settings)
    return AsyncInProcessClient(settings=settings)


_shared: dict[tuple, RefinerClient] = {}
_shared_async: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple, AsyncRefinerClient]] = (
    weakref.WeakKeyDictionary()
)
_shared_lock = threading.Lock()


def settings_key(settings: DiffPOSettings) -> tuple:
    """A hashable identity of the settings: equal settings share one client."""
    return tuple(
        (k, v.get_secret_value() if hasattr(v, "get_secret_value") else tuple(v) if isinstance(v, list) else v)
        for k, v in settings
    )


def shared_client(settings: DiffPOSettings, key: tuple | None = None) -> RefinerClient:
    """One client per distinct settings in this process, so every refiner shares its pool.

    ``key`` is ``settings_key(settings)`` when the caller already holds it (a hot path).
    """
    key = key or settings_key(settings)
    client = _shared.get(key)
    if client is not None:
        return client
    with _shared_lock:
        if key not in _shared:
            _shared[key] = client_from_settings(settings)
        return _shared[key]


def shared_async_client(settings: DiffPOSettings, key: tuple | None = None) -> AsyncRefinerClient:
    """:func:`shared_client` for asyncio: httpx's async pool belongs to one event loop, so one per loop."""
    loop = asyncio.get_running_loop()
    key = key or settings_key(settings)
    with _shared_lock:
        per_loop = _shared_async.setdefault(loop, {})
        if key not in per_loop:
            per_loop[key] = async_client_from_settings(settings)
        return per_loop[key]


def use_shared_client(settings: DiffPOSettings, client: RefinerClient) -> None:
    """Make ``client`` the one every refiner with these settings uses (benchmarks, tests)."""
    with _shared_lock:
        _shared[settings_key(settings)] = client
