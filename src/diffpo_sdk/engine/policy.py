"""The adaptive block size: decide as many tokens per second as the draft allows.

A wider pass only pays when enough guesses are right. Two things are measured as decoding
goes, so the choice fits the draft *and* the device it runs on:

- per row, p = P(the guess for the next position is right | the prefix is right), a
  recency-weighted rate; a pass of width B then decides E(B) = 1 + p + ... + p^(B-1) tokens;
- per engine, the seconds a pass costs as a function of the tokens it feeds, measured per
  power-of-two bucket and interpolated between them. The curve is not a line: on a CPU a
  1-token pass is a matrix-vector product and a 2-token pass a matrix-matrix one, 1.4x
  dearer, yet a 16-token pass costs about what a 2-token pass does; on a GPU it is nearly
  flat until the device saturates.

Each pass takes the width with the most expected tokens per second. When drafts are poor
(p ~ 0.07) that is width 1, plain autoregressive decoding, so refinement never costs
meaningfully more than generating; when the draft is already the refiner's own answer
(p ~ 1) it is the widest block.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Sequence
from statistics import median
from typing import Any

WIDTHS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class BlockPolicy:
    """Chooses the width of every pass from measured acceptance and measured pass cost."""

    def __init__(self, max_block: int = 256, window: int = 5, refresh_every: int = 32) -> None:
        self.max_block = max_block
        self.window = window
        self.refresh_every = refresh_every
        # power-of-two bucket of tokens fed -> its latest passes as (tokens, seconds); the
        # median of a few recent ones follows a device whose load changes and shrugs off spikes
        self._points: dict[int, deque[tuple[float, float]]] = {}
        self._passes = 0
        self._seen: dict[int, int] = {}  # bucket -> pass count when last measured
        self._lock = threading.Lock()

    def record(self, rows: int, width: int, seconds: float) -> None:
        """Add one measured pass of ``rows`` x ``width`` fed tokens (a prefill pass counts too)."""
        x = float(rows * width)
        bucket = _bucket(x)
        with self._lock:
            self._passes += 1
            self._seen[bucket] = self._passes
            self._points.setdefault(bucket, deque(maxlen=self.window)).append((x, seconds))

    def cost(self, tokens: float) -> float:
        """Predicted seconds for a pass feeding ``tokens`` tokens (relative scale is what matters)."""
        return _interpolate(self._curve(), tokens)

    def _curve(self) -> list[tuple[float, float]]:
        """(tokens, seconds) per measured bucket, the median of its latest passes, by tokens."""
        with self._lock:
            return sorted((median(x for x, _ in d), median(y for _, y in d)) for d in self._points.values())

    def choose(self, rows: Sequence[Any], uncached: Sequence[int], room: int, first: bool = False) -> int:
        """Width B (answer positions decided per pass) for the next pass of these rows.

        The first pass also prefills the prompt, and it is blind: nothing is known of the
        draft yet. It takes the widest block whose guesses add at most one plain one-token
        pass to the prefill's cost, so a bad draft wastes at most one pass whatever the
        prompt's length (a bound relative to the prefill instead cost a long two-turn prompt
        a quarter of its prefill), while where wide passes are nearly free (a GPU) a draft
        at the fixed point is verified at once.
        """
        u_max = max(uncached)
        limit = max(1, min(room, self.max_block))
        candidates = [b for b in WIDTHS if b < limit] + [limit]  # the whole remaining budget too
        curve = self._curve()  # once per choice: this runs before every pass
        if first:
            prefill = _interpolate(curve, len(rows) * u_max)
            budget = prefill + _interpolate(curve, len(rows))
            fits = [b for b in candidates if _interpolate(curve, len(rows) * (u_max + b - 1)) <= budget]
            return max(fits, default=1)
        best, best_rate = 1, -1.0
        for block in candidates:
            width = u_max + block - 1
            tokens = sum(_expected(r.acceptance, width - u + 1) for r, u in zip(rows, uncached))
            rate = tokens / _interpolate(curve, len(rows) * width)
            if rate > best_rate * 1.02:  # a wider pass must clearly pay
                best, best_rate = block, rate
        # The narrowest pass is only measured when chosen: one measured during a load spike
        # would look dear for ever. So it is re-measured now and then (it is plain AR, the
        # safe choice), which keeps "never slower than AR" true on a device whose load moves.
        with self._lock:
            stale = self._passes - self._seen.get(_bucket(len(rows) * u_max), -(1 << 30)) > self.refresh_every
        return 1 if best > 1 and stale else best

    def calibrate(self, model: Any, device: Any, widths: Sequence[int] = (1, 2, 8, 16, 64, 1, 2, 8, 16, 64)) -> None:
        """Time a few passes on a short dummy context so the first real choice is informed."""
        import time

        import torch

        from .kvcache import cache_kwarg, new_cache

        kw = cache_kwarg(model)
        with torch.inference_mode():
            model(input_ids=torch.zeros((1, 8), dtype=torch.long, device=device))  # first-call costs
            for w in widths:
                cache = new_cache(model)
                model(input_ids=torch.zeros((1, 32), dtype=torch.long, device=device), use_cache=True, **{kw: cache})
                ids = torch.zeros((1, w), dtype=torch.long, device=device)
                t0 = time.perf_counter()
                out = model(input_ids=ids, use_cache=True, logits_to_keep=w, **{kw: cache})
                out.logits.argmax(-1).tolist()
                self.record(1, w, time.perf_counter() - t0)


def _interpolate(points: list[tuple[float, float]], tokens: float) -> float:
    """Piecewise-linear seconds between measured points; flat below the first, proportional above the last."""
    if not points:
        return 1.0 + tokens / 16.0  # prior: a CPU-like device until measured
    below = [p for p in points if p[0] <= tokens]
    above = [p for p in points if p[0] >= tokens]
    if below and above:
        (x0, y0), (x1, y1) = below[-1], above[0]
        return y0 if x1 <= x0 else y0 + (y1 - y0) * (tokens - x0) / (x1 - x0)
    if above:  # fewer tokens than any pass measured: no cheaper than the smallest
        return above[0][1]
    x0, y0 = below[-1]  # more than any measured: at most proportional growth
    return y0 * tokens / x0


def _bucket(tokens: float) -> int:
    return 1 << max(0, round(math.log2(max(tokens, 1.0))))


def _expected(p: float, block: int) -> float:
    """E[tokens decided by a pass of `block` positions] when each guess is right with prob p."""
    if block <= 1:
        return 1.0
    if p >= 0.999:
        return float(block)
    return (1.0 - p**block) / (1.0 - p)
