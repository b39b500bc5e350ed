"""The batch's KV cache: which slot of which row holds what, and how rows leave and join.

Every row has the same number of cache slots; row r holds ``[pads][prompt]`` (left-padded)
and then its answer. After a pass the cache keeps the fed slots up to the row that verified
most; in rows that verified fewer, the rest of that span becomes holes, masked in attention
and skipped by position ids, so no row ever feeds a token twice and a fast row never makes
the others pay for its lead. Models with sliding-window layers (Gemma-2), where a hole would
widen the window, keep only the span every row verified (a plain crop); rows that ran ahead
feed their few extra tokens again next pass.

Rows can join between passes: their prompts are prefilled apart, and their cache rows are
stacked under the others' (right-aligned, masked slots in front). Slots no live row uses any
more are cut from the front, so a batch that never drains does not grow for ever.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch


def cache_kwarg(model: torch.nn.Module) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` in 5.x. A peft wrapper passes
    ``**kwargs`` through, so the model it wraps is the one asked."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(inner.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def new_cache(model: torch.nn.Module) -> Any:
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    # Sliding-window layers must keep their past until we crop rejected guesses away.
    cache.activate_past_recording()
    return cache


def has_sliding_window(config: Any) -> bool:
    """Whether any attention layer sees only a window of recent cache slots (Gemma-2, Mistral)."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return any("sliding" in str(t) for t in layer_types)
    return bool(getattr(config, "sliding_window", None)) and bool(getattr(config, "use_sliding_window", True))


class BatchCache:
    """The KV cache of a batch of rows, its slot mask and each row's next position id."""

    def __init__(self, model: torch.nn.Module, prompt_lens: Sequence[int]) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.kw = cache_kwarg(model)
        self.cache = new_cache(model)
        width = max(prompt_lens)
        # row j's next position id; negative for the left pads its first pass feeds
        self.pos = [n - width for n in prompt_lens]
        self.slot_mask = torch.zeros((len(prompt_lens), 0), dtype=torch.long, device=self.device)  # 0: pad or hole
        self.holes = not has_sliding_window(model.config)
        self.reshapable: bool | None = None  # whether slots may be cut and rows stacked (known after a pass)
        self._fed_mask: torch.Tensor | None = None

    @property
    def empty(self) -> bool:
        return self.slot_mask.shape[1] == 0

    def uncached(self, seq_len: int, j: int) -> int:
        """Committed tokens of row j (``seq_len`` of prompt plus answer, pads counted) not yet cached."""
        return seq_len - self.pos[j]

    def feed(self, prompt: Sequence[int], answer: Sequence[int], j: int, pad_id: int) -> list[int]:
        """Row j's committed tokens that are not cached yet (left pads first on its first pass)."""
        p = self.pos[j]
        if p >= len(prompt):
            return list(answer[p - len(prompt) :])
        return [pad_id] * max(0, -p) + list(prompt[max(p, 0) :]) + list(answer)

    def forward(self, rows: list[list[int]], keep: int) -> list[list[int]]:
        """One pass over the fed tokens (all rows the same width); argmax of the last ``keep`` logits."""
        width = len(rows[0])
        fed = torch.tensor(rows, dtype=torch.long).to(self.device, non_blocking=True)
        steps = torch.arange(width, device=self.device)
        position_ids = torch.tensor(self.pos, device=self.device)[:, None] + steps[None, :]
        self._fed_mask = (position_ids >= 0).long()  # left pads of the first pass
        out = self.model(
            input_ids=fed,
            attention_mask=torch.cat([self.slot_mask, self._fed_mask], dim=1),
            position_ids=position_ids.clamp_min(0),
            use_cache=True,
            logits_to_keep=keep,
            **{self.kw: self.cache},
        )
        return out.logits.argmax(dim=-1).tolist()  # the one host sync per pass

    def keep(self, verified: Sequence[int], alive: Sequence[bool]) -> None:
        """Keep each row's first ``verified[j]`` fed slots (the right tokens), drop the rest."""
        assert self._fed_mask is not None
        width = self._fed_mask.shape[1]
        valid = [v for v, a in zip(verified, alive) if a]
        k = max(valid) if self.holes else min(valid)
        if width > k:
            self.cache.crop(-(width - k))
        took = [min(v, k) for v in verified]
        kept = torch.arange(k, device=self.device)[None, :] < torch.tensor(took, device=self.device)[:, None]
        self.slot_mask = torch.cat([self.slot_mask, self._fed_mask[:, :k] * kept], dim=1)
        self.pos = [p + t for p, t in zip(self.pos, took)]
        if self.reshapable is None:
            self.reshapable = self.holes and _plain_layers(self.cache)

    def select(self, rows: Sequence[int]) -> None:
        """Only these batch rows stay; front slots that no row uses any more are cut."""
        idx = torch.tensor(list(rows), device=self.device)
        self.cache.batch_select_indices(idx)
        self.slot_mask = self.slot_mask[idx]
        self.pos = [self.pos[j] for j in rows]
        if self.reshapable:
            used = self.slot_mask.any(dim=0).nonzero()
            lo = int(used[0]) if len(used) else 0
            if lo >= 32:
                self.cut_front(lo)

    def cut_front(self, lo: int) -> None:
        """Drop the first ``lo`` slots of every row (all masked)."""
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[:, :, lo:], layer.values[:, :, lo:]
        self.slot_mask = self.slot_mask[:, lo:]

    def join(self, prompts: Sequence[Sequence[int]], pad_id: int) -> float:
        """Stack new rows under the others with all but the last token of each prompt cached
        (they feed it with guesses next pass, like every row). Returns the prefill's seconds."""
        import time

        heads = [list(p[:-1]) for p in prompts]
        width = max(len(p) for p in heads)
        pads = torch.tensor([width - len(p) for p in heads], device=self.device)
        mask = (torch.arange(width, device=self.device)[None, :] >= pads[:, None]).long()
        t0 = time.perf_counter()
        fresh = None
        if width:
            ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in heads], device=self.device)
            fresh = new_cache(self.model)
            self.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp_min(0),
                       use_cache=True, logits_to_keep=1, **{self.kw: fresh})
        seconds = time.perf_counter() - t0
        _append_rows(self.cache, fresh, len(heads))
        slots = max(self.slot_mask.shape[1], mask.shape[1])
        self.slot_mask = torch.cat([_pad_left(self.slot_mask, slots), _pad_left(mask, slots)])
        self.pos += [len(p) for p in heads]
        return seconds


def _pad_left(t: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (width - t.shape[-1], 0))


def _plain_layers(cache: Any) -> bool:
    """Whether every layer keeps plain (batch, heads, slots, dim) keys and values we may reshape."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers)


def _append_rows(cache: Any, new: Any, n: int) -> None:
    """Stack the ``n`` rows of cache ``new`` (None: rows with no slots) under ``cache``, right-aligned."""
    for i, layer in enumerate(cache.layers):
        k, v = layer.keys, layer.values
        if new is None:
            nk, nv = (t.new_zeros((n, t.shape[1], 0, t.shape[3])) for t in (k, v))
        else:
            nk, nv = new.layers[i].keys, new.layers[i].values
        width = max(k.shape[2], nk.shape[2])
        layer.keys = torch.cat([_pad_slots(k, width), _pad_slots(nk, width)])
        layer.values = torch.cat([_pad_slots(v, width), _pad_slots(nv, width)])


def _pad_slots(t: torch.Tensor, width: int) -> torch.Tensor:
    """Masked (zero) slots in front of (batch, heads, slots, dim) keys or values."""
    return torch.nn.functional.pad(t, (0, 0, width - t.shape[2], 0))
