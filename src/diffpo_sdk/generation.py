"""Plain decoding with ``transformers``' ``generate``, cut at the first stop token.

``generate`` keeps decoding rows that already stopped (padding them) and, for some
models, past a stop token it was not told about; what an answer is ends at the first
stop token. One home for that cut, used by every caller that decodes token by token.
Torch-free itself: it only calls the model it is given.
"""

from __future__ import annotations

from collections.abc import Container, Iterable
from typing import Any

__all__ = ["cut_at_stop", "generate_cut"]


def cut_at_stop(ids: Iterable[int], stop_ids: Container[int], *, keep_stop: bool) -> tuple[list[int], bool]:
    """The tokens up to the first stop token (included with ``keep_stop``), and whether one came."""
    out: list[int] = []
    for t in ids:
        if t in stop_ids:
            if keep_stop:
                out.append(int(t))
            return out, True
        out.append(int(t))
    return out, False


def generate_cut(model: Any, input_ids: Any, attention_mask: Any, *, max_new_tokens: int, stop_ids: Iterable[int],
                 pad_id: int | None, keep_stop: bool, **sampling: Any) -> list[tuple[list[int], bool]]:
    """``model.generate`` (greedy unless ``sampling`` says otherwise), each row's new tokens cut at its stop."""
    stops = sorted(set(stop_ids))
    sampling.setdefault("do_sample", False)
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                         eos_token_id=stops, pad_token_id=pad_id, **sampling)
    return [cut_at_stop(row, set(stops), keep_stop=keep_stop) for row in out[:, input_ids.shape[1]:].tolist()]
