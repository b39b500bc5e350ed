"""The engine contract the client, the server and the test doubles rely on, declared once.

``diffpo_sdk.engine.RefinerEngine`` is the real implementation; ``diffpo_sdk.testing.EchoEngine``
a model-free stand-in. Both satisfy :class:`RefinerEngineProtocol` structurally. Declared
here, torch-free, so code that only talks to an engine never imports the engine.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

from .protocol import RefinedItem, RefineItem

__all__ = ["RefineResult", "RefineStreamEvent", "RefinerEngineProtocol"]


class RefineResult(Protocol):
    """One refined answer as the engine returns it; ``to_wire`` gives the wire type."""

    text: str
    iterations: int
    new_tokens: int

    def to_wire(self, with_token_ids: bool = False) -> RefinedItem: ...


class RefineStreamEvent(Protocol):
    """What ``refine_stream`` yields after a pass: one item's newly verified tokens and text."""

    index: int
    token_ids: Sequence[int]
    text: str


@runtime_checkable
class RefinerEngineProtocol(Protocol):
    """A refiner: drafts in, refined answers out (greedy-exact at the fixed point)."""

    @property
    def model_name(self) -> str: ...

    @property
    def tokenizer(self) -> Any: ...

    def check_items(self, items: Sequence[RefineItem | dict[str, Any]], *, max_new_tokens: int = 256,
                    keep_draft_prefix: int = 0) -> list[RefineItem]:
        """Validate items up front (context length, roles); raises ``InvalidRequestError``."""
        ...

    def refine(self, items: Sequence[RefineItem | dict[str, Any]], **options: Any) -> Sequence[RefineResult]:
        """Refine a batch; options are those of :class:`~diffpo_sdk.protocol.RefineOptions`."""
        ...

    def refine_stream(self, items: Sequence[RefineItem | dict[str, Any]],
                      **options: Any) -> Iterator[RefineStreamEvent]:
        """Like ``refine``, but yields each item's newly verified tokens and text after every pass."""
        ...
