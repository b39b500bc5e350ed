"""Streaming a refinement: each pass's newly verified tokens, as tokens and as text.

A verified prefix never changes again, so it can go to the user as soon as a pass proves
it. Text is decoded incrementally over a short window of recent tokens (the method of
``tokenizers``' ``DecodeStream``, written over the tokenizer's own ``decode`` so any
tokenizer works and the streamed text is what the non-streamed answer decodes to): text
that ends in a half-written multi-byte character is held back until the character is whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

REPLACEMENT = "\ufffd"  # what decode writes for an incomplete UTF-8 sequence


@dataclass
class StreamDelta:
    """Item ``index``'s newly verified ``token_ids`` and their ``text``. The last delta of an
    item carries its ``result`` (the same as ``refine`` returns); concatenated, the deltas'
    token ids and texts equal the result's, byte for byte."""

    index: int
    token_ids: list[int]
    text: str
    result: Any = None  # RefineResult on an item's last delta

    @property
    def done(self) -> bool:
        return self.result is not None


class IncrementalDecoder:
    """Turns token ids arriving in pieces into text pieces whose concatenation is the decode of all."""

    def __init__(self, tokenizer: Any, skip_ids: set[int] | None = None) -> None:
        self.tokenizer = tokenizer
        self.skip_ids = skip_ids or set()
        self.ids: list[int] = []
        self.prefix = 0  # window start: tokens before it are spelled out and never re-decoded
        self.read = 0  # tokens whose text has been emitted
        self.emitted = 0  # characters emitted

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def step(self, ids: Sequence[int]) -> str:
        """The new text that ``ids`` (appended to the ones before) completes; may be empty."""
        self.ids.extend(t for t in ids if t not in self.skip_ids)
        if len(self.ids) == self.read:
            return ""
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) <= len(before) or after.endswith(REPLACEMENT) or not after.startswith(before):
            return ""  # a character still incomplete, or the window must grow to settle
        text = after[len(before) :]
        self.prefix, self.read = self.read, len(self.ids)
        self.emitted += len(text)
        return text

    def finish(self, full_text: str) -> str:
        """The rest of ``full_text`` (the decode of every token) once no token will come."""
        return full_text[self.emitted :]
