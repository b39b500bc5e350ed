"""Client settings from arguments or ``DIFFPO_*`` environment variables.

One object holds every knob the client layers share (runnable, LiteLLM wrappers, agent
middleware), so a deployment configures the refiner once, in the environment, and code
stays free of endpoints and keys.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .builtin_refiners import BUILTIN_REFINER
from .protocol import MAX_NEW_TOKENS_LIMIT, BlockSize, parse_block_size
from .tracing import capture_content_default

Backend = Literal["auto", "http", "in_process"]

#: The default deadline of a call: a floor for the round trips and queueing, plus a budget
#: per answer token. A 256-token refinement takes about 20 s on a 2-core CPU unloaded
#: (0.08 s/token); 0.3 s/token leaves room for a loaded server and the retries.
DEADLINE_FLOOR_S = 30.0
DEADLINE_PER_TOKEN_S = 0.3


class DiffPOSettings(BaseSettings):
    """Where the refiner is and how to call it.

    ``endpoint`` takes one URL or several (a list, or a comma-separated string in
    ``DIFFPO_ENDPOINT``): calls spread over them and fail over to the next. With no
    endpoint, the ``auto`` backend runs the engine in-process (needs the ``engine`` extra).
    ``timeout`` is the overall deadline of one refinement call, retries included; left
    unset, it scales with the answer budget (:meth:`call_timeout`).
    """

    model_config = SettingsConfigDict(env_prefix="DIFFPO_", extra="ignore", validate_default=True)

    endpoint: Annotated[list[str], NoDecode] = Field(default_factory=list)
    api_key: SecretStr | None = None
    backend: Backend = "auto"
    #: in-process refiner: a built-in name, a local folder or a hub id
    model: str = BUILTIN_REFINER
    device: str = "auto"
    dtype: str = "auto"
    adapter: str | None = None

    block_size: BlockSize = "auto"
    max_iterations: int | None = Field(None, ge=1)
    max_new_tokens: int = Field(256, ge=1, le=MAX_NEW_TOKENS_LIMIT)

    timeout: float | None = Field(
        None, gt=0, description="overall deadline per call, retries included (s); none: scaled to the answer budget"
    )
    connect_timeout: float = Field(3.0, gt=0, description="per attempt; short so dead endpoints fail over fast")
    retries: int = Field(3, ge=0, description="extra attempts after the first, across all endpoints")
    fail_open: bool = True
    #: prompt and answer text on spans; unset, OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT decides
    capture_content: bool = Field(default_factory=capture_content_default)

    @field_validator("endpoint", mode="before")
    @classmethod
    def _split_endpoints(cls, v: Any) -> Any:
        if v is None:
            return []
        if isinstance(v, str):
            v = v.split(",")
        return [str(e).strip().rstrip("/") for e in v if str(e).strip()]

    @field_validator("block_size", mode="before")
    @classmethod
    def _block_from_env(cls, v: Any) -> Any:
        return parse_block_size(v) if isinstance(v, str) else v

    @field_validator("max_iterations", "adapter", "timeout", mode="before")
    @classmethod
    def _empty_is_none(cls, v: Any) -> Any:
        return None if isinstance(v, str) and v.strip().lower() in ("", "none") else v

    def merged(self, **overrides: Any) -> DiffPOSettings:
        """A copy with the given non-``None`` values replaced, validated like the environment."""
        given = {k: v for k, v in overrides.items() if v is not None}
        if not given:
            return self
        return type(self)(**{**dict(self), **given})

    def call_timeout(self, max_new_tokens: int | None = None) -> float:
        """The overall deadline of one call (s): ``timeout`` when set, else scaled to the answer budget."""
        if self.timeout is not None:
            return self.timeout
        return DEADLINE_FLOOR_S + DEADLINE_PER_TOKEN_S * (max_new_tokens or self.max_new_tokens)

    def resolved_backend(self) -> Literal["http", "in_process"]:
        """``http`` when an endpoint is set, else ``in_process`` (for ``auto``)."""
        if self.backend == "auto":
            return "http" if self.endpoint else "in_process"
        return self.backend
