"""Wire types shared by the engine, the server and every client.

Defined once, as pydantic models, so a request the client builds is exactly the request
the server validates, and the engine accepts the same items in-process.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Role = Literal["system", "user", "assistant"]
BlockSize = int | Literal["auto"]

#: Upper bounds that keep one request from monopolising a refiner.
MAX_NEW_TOKENS_LIMIT = 4096
MAX_ITEMS_PER_REQUEST = 64


class Message(BaseModel):
    """One chat turn, OpenAI style."""

    model_config = ConfigDict(extra="forbid")

    role: Role
    content: str


class RefineItem(BaseModel):
    """A draft answer to refine, with the conversation it answers.

    Give either ``messages`` (the last turn must be a user turn) or ``prompt`` (one user
    message). ``draft`` is the base model's answer; it may be empty.
    """

    model_config = ConfigDict(extra="forbid")

    messages: list[Message] | None = None
    prompt: str | None = None
    draft: str

    @model_validator(mode="after")
    def _one_prompt_form(self) -> RefineItem:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of 'messages' or 'prompt'")
        if self.messages is not None:
            if not self.messages:
                raise ValueError("'messages' is empty: the conversation needs at least one user turn")
            if self.messages[-1].role != "user":
                raise ValueError(
                    f"the last turn must be a user turn (got {self.messages[-1].role!r}): "
                    "the draft is the answer to it"
                )
        return self

    def conversation(self) -> list[dict[str, str]]:
        """The conversation as plain dicts, ready for a chat template."""
        if self.messages is not None:
            return [m.model_dump() for m in self.messages]
        return [{"role": "user", "content": self.prompt or ""}]


class RefineOptions(BaseModel):
    """The speed/quality knobs of one refinement call.

    ``block_size`` is the number of answer positions decoded in parallel per forward pass
    (1 = plain autoregressive decoding); ``"auto"`` adapts it to the measured acceptance
    and the device's cost per pass. ``max_iterations`` caps passes per block (``None`` runs
    every block to its fixed point, which equals greedy decoding).
    """

    model_config = ConfigDict(extra="forbid")

    block_size: BlockSize = "auto"
    max_new_tokens: int = Field(256, ge=1, le=MAX_NEW_TOKENS_LIMIT)
    max_iterations: int | None = Field(None, ge=1)
    keep_draft_prefix: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _check_block(self) -> RefineOptions:
        if self.block_size != "auto":
            if not isinstance(self.block_size, int) or self.block_size < 1:
                raise ValueError(f"block_size must be 'auto' or an integer >= 1, got {self.block_size!r}")
            # a block wider than the answer is the whole answer: clamp it, so a client configured
            # once with a wide block still refines short answers
            self.block_size = min(self.block_size, self.max_new_tokens)
        return self


class RefineRequest(RefineOptions):
    """``POST /v1/refine`` body: items plus options that apply to all of them."""

    items: list[RefineItem] = Field(..., min_length=1, max_length=MAX_ITEMS_PER_REQUEST)
    stream: bool = Field(False, description="answer with Server-Sent Events as passes verify the text")


class RefinedItem(BaseModel):
    """One refined answer and what it cost."""

    text: str
    token_ids: list[int] | None = None
    iterations: int = Field(description="forward passes spent on this item's answer")
    new_tokens: int = Field(description="answer tokens decided, the stop token included")
    converged: bool = Field(description="false only when an iteration cap cut a block short")
    finish_reason: Literal["stop", "length"] = "stop"
    prompt_tokens: int | None = Field(None, description="tokens of the templated prompt the refiner read")

    @property
    def passes_per_token(self) -> float:
        return self.iterations / max(self.new_tokens, 1)


class RefineResponse(BaseModel):
    """``POST /v1/refine`` answer: one item per request item, in order."""

    items: list[RefinedItem]
    model: str
    timing: dict[str, float] = Field(default_factory=dict)
    id: str | None = Field(None, description="the server's id of this response (``gen_ai.response.id`` on spans)")


#: ``POST /v1/refine`` with ``"stream": true``: the Server-Sent Event names, in the order they come.
#: ``delta`` (:class:`StreamDelta`) any number of times per item, then ``item`` (:class:`StreamItem`)
#: once per item; ``error`` (:class:`ErrorBody`) if the refinement failed mid-stream; ``done``
#: (:class:`StreamDone`) always last.
STREAM_EVENTS = ("delta", "item", "error", "done")


class StreamDelta(BaseModel):
    """Newly verified text of item ``index``: its deltas, concatenated, are the refined text."""

    index: int
    text: str
    token_ids: list[int] = Field(default_factory=list)


class StreamItem(BaseModel):
    """Item ``index`` is done: its whole answer and stats, as the non-streamed response has them."""

    index: int
    item: RefinedItem
    model: str | None = Field(None, description="the refiner that answered")


class StreamDone(BaseModel):
    """The stream's last event; ``ok`` is false when an ``error`` event came before it."""

    ok: bool = True
    model: str | None = None
    timing: dict[str, float] = Field(default_factory=dict)


class ErrorBody(BaseModel):
    """The JSON body of every 4xx/5xx the server returns."""

    error: dict[str, Any]


def parse_block_size(value: str | int) -> BlockSize:
    """``"auto"`` or an integer >= 1, from a command line, an environment variable or JSON."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"block size must be 'auto' or an integer >= 1, got {value!r}") from None
    if n < 1:
        raise ValueError(f"block size must be 'auto' or an integer >= 1, got {value!r}")
    return n


def coerce_items(items: list[RefineItem | dict[str, Any]]) -> list[RefineItem]:
    """Accept plain dicts or ``RefineItem`` objects; validate once."""
    return [i if isinstance(i, RefineItem) else RefineItem.model_validate(i) for i in items]
