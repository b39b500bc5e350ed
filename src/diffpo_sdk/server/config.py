"""Server settings: one plain dataclass shared by the CLI, the app factory and the tests."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from ..protocol import MAX_NEW_TOKENS_LIMIT, BlockSize

LOOPBACK_NAMES = {"localhost", "ip6-localhost"}


@dataclass
class ServerConfig:
    """What an operator can tune. Defaults are safe for a single GPU or a laptop CPU."""

    host: str = "127.0.0.1"
    port: int = 8000
    #: Bearer token clients must send; required when ``host`` is not loopback.
    api_key: str | None = None
    #: Most items decoding at once in the engine batch, joiners included (a single larger
    #: request still runs, alone).
    max_batch_items: int = 16
    #: How long the first request of a batch may wait for others to join.
    max_wait_ms: float = 10.0
    #: Requests waiting for the engine beyond which new ones get 429 at once.
    max_queue: int = 256
    #: Seconds a request may take (queue + engine) before it is dropped with 503.
    request_timeout: float = 120.0
    default_block_size: BlockSize = "auto"
    default_max_new_tokens: int = 256
    #: Operator cap on ``max_new_tokens`` (at most the protocol's own limit).
    max_new_tokens_limit: int = MAX_NEW_TOKENS_LIMIT
    #: Request bodies larger than this get 413 before they are read in full.
    max_body_bytes: int = 4 * 1024 * 1024
    #: Upstream LLM for ``/v1/chat/completions`` when the request names none (LiteLLM id).
    upstream_model: str | None = None
    upstream_api_base: str | None = None
    #: Extra keyword arguments for every ``litellm.acompletion`` call (timeouts, ``mock_response``...).
    upstream_extra: dict[str, Any] = field(default_factory=dict)
    upstream_timeout: float = 120.0
    #: Put prompts and answers in logs (off: only sizes, timings and ids are logged).
    log_content: bool = False


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(config: ServerConfig) -> None:
    """Refuse to listen beyond loopback without an API key: a refiner is an open GPU otherwise."""
    if not is_loopback(config.host) and not config.api_key:
        raise ValueError(
            f"refusing to bind {config.host!r} without an API key: anyone who can reach it could use "
            "the refiner. Pass --api-key (or set DIFFPO_API_KEY), or bind 127.0.0.1"
        )
