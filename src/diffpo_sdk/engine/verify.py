"""Verification and commit: the exact core of Jacobi decoding, one row at a time.

A pass feeds a row's committed tokens and its guesses ``guess[c:]`` (``c = len(answer)``)
and returns ``pred[t] = argmax p(. | prompt, answer, guess[c : c + t])``, the prediction for
answer position ``c + t``. If the guesses before position ``c + t`` all equal their
predictions, that prefix is exactly what greedy decoding writes, so ``pred[t]`` is greedy's
token too. Hence: the leading guesses that match are verified, and so is the prediction
right after them; everything committed equals greedy ``generate`` token for token.
"""

from __future__ import annotations

from collections.abc import Sequence

from .row import Row


def matched(row: Row, pred: Sequence[int], end: int) -> int:
    """How many leading guesses equal their prediction (the last prediction has no guess fed)."""
    c, m = len(row.answer), 0
    while m < len(pred) - 1 and c + m < end and row.guess[c + m] == pred[m]:
        m += 1
    return m


def step(row: Row, pred: Sequence[int], m: int, end: int, stop_ids: set[int], limit: int) -> list[int]:
    """The Jacobi update of the guesses before ``end``, then commit of the verified ``m + 1``."""
    c = len(row.answer)
    k = min(len(pred), end - c)
    row.guess[c : c + k] = pred[:k]
    return commit(row, list(pred[: min(m + 1, k)]), stop_ids, limit)


def commit(row: Row, tokens: Sequence[int], stop_ids: set[int], limit: int) -> list[int]:
    """Append tokens to the answer, stopping at a stop token or at ``limit`` tokens."""
    out = []
    for t in tokens:
        row.answer.append(t)
        out.append(t)
        if t in stop_ids:
            row.finish_reason = "stop"
            break
        if len(row.answer) >= limit:
            row.finish_reason = "length"
            break
    return out
