"""Batched, KV-cached Jacobi decoding that starts from drafts: the decoding loop.

Each pass feeds, for every row, the tokens it has committed but not yet cached followed by
guesses for the next answer positions; ``verify`` commits what the predictions prove
right (1 to ``block`` tokens per row), and the guesses take the predictions (the Jacobi
update). ``kvcache`` keeps the cache in step, ``alignment`` repairs drafts after a miss and
``policy`` picks each pass's width in adaptive mode. Rows can join between passes
(continuous batching) and leave as soon as they are done.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from .kvcache import BatchCache
from .policy import BlockPolicy
from .row import Row
from .verify import commit, matched, step


@torch.inference_mode()
def jacobi_decode(
    model: torch.nn.Module,
    rows: Sequence[Row],
    *,
    stop_ids: set[int],
    pad_id: int,
    max_new_tokens: int,
    block_size: int | None,
    max_iterations: int | None = None,
    policy: BlockPolicy | None = None,
    on_tokens: Callable[[int, list[int]], None] | None = None,
    is_cancelled: Callable[[int], bool] | None = None,
    admit: Callable[[int], Sequence[Row]] | None = None,
    on_finish: Callable[[int], None] | None = None,
) -> None:
    """Decode ``rows`` in place until each stops, hits ``max_new_tokens`` or is cancelled.

    ``block_size`` None means adaptive: ``policy`` picks the width of every pass.
    ``max_iterations`` caps the passes spent on each block of ``block_size`` positions (32 in
    adaptive mode), with the paper's semantics: every pass is one Jacobi iteration over the
    rest of the current block, and a block cut short commits its latest iterate.
    ``admit(n)``, called between passes with the number of rows decoding, returns rows that
    join the batch; they are numbered after the ones before them in the callbacks.
    ``on_finish(i)`` is called as soon as row i is done.
    """
    if not rows:
        return
    # Rows by id (their index in ``rows``, then in order of joining), dropped once done, so
    # a batch that never drains holds only its live rows. ``live[j]`` is batch row j's id.
    rows = dict(enumerate(rows))
    next_id = len(rows)
    live = list(rows)
    N = max_new_tokens
    capped = max_iterations is not None
    cap_block = block_size or 32
    batch = BatchCache(model, [len(r.prompt) for r in rows.values()])

    while live:
        uncached = [batch.uncached(len(rows[i].prompt) + len(rows[i].answer), j) for j, i in enumerate(live)]
        # where each row's pass stops: the budget, or under a cap the end of its current block
        ends = [min((len(rows[i].answer) // cap_block + 1) * cap_block, N) if capped else N for i in live]
        room = max(e - len(rows[i].answer) for e, i in zip(ends, live))
        if block_size is not None:
            block = min(block_size, room)
        elif capped:
            block = room  # one Jacobi iteration updates the whole rest of the block
        else:
            assert policy is not None
            block = policy.choose([rows[i] for i in live], uncached, room, first=batch.empty)
        W = max(uncached) + block - 1

        fed = []
        for j, i in enumerate(live):
            r, u = rows[i], uncached[j]
            c = len(r.answer)
            g = r.guess[c : c + W - u]
            fed.append(batch.feed(r.prompt, r.answer, j, pad_id) + g + [pad_id] * (W - u - len(g)))
        keep = W - min(uncached) + 1  # logits from the last committed token of the row with most
        t0 = time.perf_counter()
        preds = batch.forward(fed, keep)
        if policy is not None:
            policy.record(len(live), W, time.perf_counter() - t0)

        verified = []  # per batch row: fed slots holding right tokens
        for j, i in enumerate(live):
            r, u, end = rows[i], uncached[j], ends[j]
            c = len(r.answer)
            pred = preds[j][u - 1 - (W - keep) :]  # pred[t]: the prediction for answer position c + t
            m = matched(r, pred, end)
            span = min(len(pred), end - c)  # positions judged, the one past the guesses included
            run = m + int(m == len(pred) - 1 < span and r.guess[c + m] == pred[m])
            missed = r.guess[c + m : c + m + 4] if run < span else []  # from the wrong guess on
            if c // cap_block != r.block_index:
                r.block_index, r.block_passes = c // cap_block, 0
            r.iterations += 1
            r.block_passes += 1
            new = step(r, pred, m, end, stop_ids, N)
            r.draft.advance(len(new))
            forgiven = False
            if missed and not r.done and r.draft and not capped:  # under a cap guesses stay iterates
                forgiven = r.draft.retokenize(pred[m], missed)
                r.draft.realign(r.answer, r.guess, N)
            # For the policy, P(guess right | prefix right): the run of right guesses and the
            # miss that ends it (guesses past a miss sat on a wrong prefix and say nothing);
            # a miss that only differed in tokenization is forgiven, the draft is fixed now.
            r.observe(run, min(run + 1, span) - int(forgiven))
            if capped and not r.done and r.block_passes >= max_iterations and len(r.answer) < end:
                r.converged = False  # the block is cut short: its latest iterate is the output
                new += commit(r, r.guess[len(r.answer) : end], stop_ids, N)
            if new and on_tokens is not None:
                on_tokens(i, new)
            if not r.done and is_cancelled is not None and is_cancelled(i):
                r.finish_reason = "cancelled"
            if r.done and on_finish is not None:
                on_finish(i)
            verified.append(u + m)

        alive = [not rows[i].done for i in live]
        if not any(alive):
            break
        batch.keep(verified, alive)
        if not all(alive):
            stay = [j for j, a in enumerate(alive) if a]
            batch.select(stay)
            for i in live:
                if rows[i].done:
                    del rows[i]
            live = [live[j] for j in stay]

        joining = list(admit(len(live))) if batch.reshapable and admit is not None else []
        if joining:
            # Prefilled apart: feeding whole prompts in the shared pass would make every
            # row's pass as wide as the longest prompt.
            seconds = batch.join([r.prompt for r in joining], pad_id)
            if policy is not None and max(len(r.prompt) for r in joining) > 1:
                policy.record(len(joining), max(len(r.prompt) for r in joining) - 1, seconds)
            for r in joining:
                live.append(next_id)
                rows[next_id] = r
                next_id += 1
