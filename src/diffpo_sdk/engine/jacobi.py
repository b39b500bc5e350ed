"""Batched, KV-cached Jacobi decoding that starts from drafts.

One forward pass feeds, for every row, the tokens it has committed but not yet cached
followed by guesses for the next answer positions. The logit at each fed position gives
argmax p(. | prompt, answer_<i) for the next position at once (Jacobi). Guesses that equal
their prediction are verified; the first prediction after them is verified too. So each
pass commits between 1 and ``block`` tokens per row, and the committed answer equals
greedy autoregressive decoding token for token (the fixed point).

Cache layout: every row has the same number of cache slots; row r holds ``[pads][prompt]``
(left-padded) and then its answer. After a pass the cache keeps the fed slots up to the
row that verified most; in rows that verified fewer, the rest of that span becomes holes,
masked in attention and skipped by position ids, so no row ever feeds a token twice and a
fast row never makes the others pay for its lead. Models with sliding-window layers
(Gemma-2), where a hole would widen the window, keep only the span every row verified
(a plain crop); rows that ran ahead feed their few extra tokens again next pass.

Rows can join a running batch between passes (continuous batching): newcomers' prompts are
prefilled in a pass of their own, their cache rows are stacked under the others' (right
aligned, masked slots in front), and from the next pass on they decode like every row.
Slots that no live row uses any more are cut from the front, and finished rows are
forgotten, so a batch that never drains does not grow for ever.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .policy import BlockPolicy


class Spelling:
    """Each token's text as its tokenizer writes it, and back; shared by every row."""

    def __init__(self, tokens: Sequence[str]) -> None:
        self.tokens = list(tokens)
        self.ids = {t: i for i, t in reversed(list(enumerate(self.tokens)))}

    @classmethod
    def of(cls, tokenizer: Any) -> Spelling:
        return cls(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass
class Row:
    """One item being decoded. ``guess[i]`` is the current guess for answer position i."""

    prompt: list[int]
    guess: list[int]
    draft: list[int] = field(default_factory=list)
    answer: list[int] = field(default_factory=list)
    iterations: int = 0
    converged: bool = True
    finish_reason: str | None = None
    # passes spent in the current capped block, and which block that is
    block_index: int = 0
    block_passes: int = 0
    # running estimate of P(guess is right | prefix is right), for the adaptive policy
    hits: float = 1.0
    trials: float = 2.0
    # draft index believed to line up with the next answer position
    cursor: int = 0
    # each token's text as the tokenizer spells it (shared by all rows), to spot a refiner
    # that tokenizes the same text differently from the draft
    spelling: Spelling | None = None
    rewrites: int = 0
    _ngrams: dict[tuple[int, ...], list[int]] | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def acceptance(self) -> float:
        return self.hits / self.trials

    def realign(self, limit: int) -> None:
        """After a miss, line the rest of the draft up with the answer again.

        A refiner that inserts, drops or re-tokenizes a few draft tokens shifts every later
        draft token by as many positions, and positional guesses would all miss. So the
        last committed tokens are looked up in the draft (trigram, else bigram, the match
        nearest the cursor) and the draft tokens after the match become the guesses. Guesses
        are only ever checked, so this changes speed, never the answer.
        """
        if self._ngrams is None:
            self._ngrams = {}
            for k in (2, 3):
                for q in range(k, len(self.draft) + 1):
                    self._ngrams.setdefault(tuple(self.draft[q - k : q]), []).append(q)
        c = len(self.answer)
        for k in (3, 2):
            hits = self._ngrams.get(tuple(self.answer[-k:])) if c >= k else None
            if hits:
                q = min(hits, key=lambda h: abs(h - self.cursor))
                tail = self.draft[q : q + limit - c]
                self.guess[c : c + len(tail)] = tail
                self.cursor = q
                return

    def retokenize(self, token: int, missed: Sequence[int], max_rewrites: int = 8) -> bool:
        """Learn from a miss that only differs in tokenization, and fix the rest of the draft.

        Decoded text re-tokenizes differently from what a model emits: a byte-level BPE
        tokenizer splits "\\n\\n" before a word into two "\\n" tokens while models write one
        "\\n\\n" token. When the refiner's token spells exactly the next few draft tokens
        (a merge), or the start of the next draft token whose rest is a token itself (a
        split), every later occurrence in the draft is rewritten the refiner's way, so one
        pass pays for the lesson instead of one pass per occurrence. Speed only: guesses are
        always checked. Returns whether the miss was such a difference.
        """
        if self.spelling is None or not missed or self.rewrites >= max_rewrites:
            return False
        spell, vocab = self.spelling.tokens, len(self.spelling)
        if not 0 <= token < vocab or any(not 0 <= t < vocab for t in missed):
            return False
        text, old, new = spell[token], None, None
        joined = ""
        for k, t in enumerate(missed, 1):
            joined += spell[t]
            if len(joined) >= len(text):
                if k > 1 and joined == text:
                    old, new = tuple(missed[:k]), (token,)
                break
        first = spell[missed[0]]
        if old is None and len(first) > len(text) and first.startswith(text):
            rest = self.spelling.ids.get(first[len(text) :])
            if rest is not None:
                old, new = (missed[0],), (token, rest)
        if old is None:
            return False
        out, q, shift, k = [], 0, 0, len(old)
        while q < len(self.draft):
            if tuple(self.draft[q : q + k]) == old:
                out.extend(new)
                if q < self.cursor:
                    shift += len(new) - k
                q += k
            else:
                out.append(self.draft[q])
                q += 1
        self.draft, self.cursor, self._ngrams = out, max(0, self.cursor + shift), None
        self.rewrites += 1
        return True

    def observe(self, hits: int, trials: int, decay: float = 0.85) -> None:
        """Recent passes weigh more: a refiner can stop and start copying its draft."""
        if trials:
            self.hits = self.hits * decay**trials + hits
            self.trials = self.trials * decay**trials + trials


def _cache_kwarg(model: torch.nn.Module) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` in 5.x."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _new_cache(model: torch.nn.Module):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    # Sliding-window layers must keep their past until we crop rejected guesses away.
    cache.activate_past_recording()
    return cache


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
    ``max_iterations`` caps the passes spent on each block of ``block_size`` positions
    (32 in adaptive mode); a capped block keeps its current guess, unverified.
    ``admit(n)``, called between passes with the number of rows decoding, returns rows that
    join the batch; they are numbered after the ones before them in the callbacks.
    ``on_finish(i)`` is called as soon as row i is done.
    """
    if not rows:
        return
    # Rows by id (their index in ``rows``, then in order of joining), dropped once done, so
    # a batch that never drains holds only its live rows.
    rows = dict(enumerate(rows))
    next_id = len(rows)
    device = next(model.parameters()).device
    N = max_new_tokens
    cap_block = block_size or 32
    cache_kw = _cache_kwarg(model)
    cache = _new_cache(model)

    # Batch bookkeeping: `live[j]` is the id of batch row j.
    live = list(rows)
    p_max = max(len(r.prompt) for r in rows.values())
    # Per batch row, on the host: left pads, and how many committed tokens (pads + prompt +
    # answer) are cached; row j's next position id is cached[j] - offsets[j].
    offsets = [p_max - len(r.prompt) for r in rows.values()]
    cached = [0] * len(rows)
    committed = {i: [pad_id] * (p_max - len(r.prompt)) + list(r.prompt) for i, r in rows.items()}
    slot_mask = torch.zeros((len(rows), 0), dtype=torch.long, device=device)  # 0: pad or hole
    holes = not _has_sliding_window(model.config)
    reshapable: bool | None = None  # whether we may cut slots and stack rows (known after a pass)

    while live:
        uncached = [len(committed[i]) - n for i, n in zip(live, cached)]
        u_max = max(uncached)
        room = max(N - len(rows[i].answer) for i in live)
        if block_size is not None:
            block = min(block_size, room)
        else:
            assert policy is not None
            block = policy.choose([rows[i] for i in live], uncached, room, first=slot_mask.shape[1] == 0)
        W = u_max + block - 1

        fed_rows = []
        for j, i in enumerate(live):
            c, u = len(rows[i].answer), uncached[j]
            g = rows[i].guess[c : c + W - u]
            fed_rows.append(committed[i][cached[j] :] + g + [pad_id] * (W - u - len(g)))
        fed = torch.tensor(fed_rows, dtype=torch.long).to(device, non_blocking=True)

        steps = torch.arange(W, device=device)
        start = torch.tensor([c - o for c, o in zip(cached, offsets)], device=device)
        position_ids = start[:, None] + steps[None, :]
        fed_mask = (position_ids >= 0).long()  # left pads of the first pass
        attention_mask = torch.cat([slot_mask, fed_mask], dim=1)
        position_ids = position_ids.clamp_min(0)
        keep = W - min(uncached) + 1  # logits from the last committed token of the row with most
        t0 = time.perf_counter()
        out = model(
            input_ids=fed,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=keep,
            **{cache_kw: cache},
        )
        preds = out.logits.argmax(dim=-1).tolist()  # the one host sync per pass
        if policy is not None:
            policy.record(len(live), W, time.perf_counter() - t0)
        del out

        verified = []  # per batch row: fed slots holding right tokens
        for j, i in enumerate(live):
            r, u = rows[i], uncached[j]
            c = len(r.answer)
            base = W - keep  # logits index of fed position 0
            pred = preds[j][u - 1 - base :]  # pred[t] is the prediction for answer position c + t
            n_guess = W - u
            m = 0  # guesses verified in this pass: leading guesses equal to their prediction
            while m < n_guess and c + m < N and r.guess[c + m] == pred[m]:
                m += 1
            span = min(n_guess + 1, N - c)  # positions judged, the one past the guesses included
            run = m + int(m == n_guess < span and r.guess[c + m] == pred[m])
            r.iterations += 1
            if c // cap_block != r.block_index:
                r.block_index, r.block_passes = c // cap_block, 0
            r.block_passes += 1
            missed = r.guess[c + m : c + m + 4] if run < span else []  # from the wrong guess on
            # Jacobi update of every guessed position, then commit the verified prefix.
            for t in range(min(len(pred), N - c)):
                r.guess[c + t] = pred[t]
            new = _commit(r, pred[: m + 1], stop_ids, N)
            r.cursor += len(new)
            forgiven = False
            if missed and not r.done and r.draft:
                forgiven = r.retokenize(pred[m], missed)
                r.realign(N)
            # For the policy, P(guess right | prefix right): the run of right guesses and the
            # miss that ends it (guesses past a miss sat on a wrong prefix and say nothing);
            # a miss that only differed in tokenization is forgiven, the draft is fixed now.
            r.observe(run, min(run + 1, span) - int(forgiven))
            if not r.done and max_iterations is not None and r.block_passes >= max_iterations:
                end = min((len(r.answer) // cap_block + 1) * cap_block, N)
                if len(r.answer) % cap_block:  # the block is not finished: keep its guess as is
                    r.converged = False
                    new += _commit(r, r.guess[len(r.answer) : end], stop_ids, N)
            committed[i].extend(new)
            if new and on_tokens is not None:
                on_tokens(i, new)
            if not r.done and is_cancelled is not None and is_cancelled(i):
                r.finish_reason = "cancelled"
            if r.done and on_finish is not None:
                on_finish(i)
            verified.append(u + m)

        valid = [v for v, i in zip(verified, live) if not rows[i].done]
        if not valid:
            break
        # Keep the fed slots that hold right tokens. Rows that verified fewer than the row that
        # verified most get holes (masked slots, skipped by position ids) in the kept span; on
        # sliding-window models, where a hole would widen the window, the span is cut to the
        # slowest row instead and faster rows feed their extra tokens again next pass.
        k = max(valid) if holes else min(valid)
        if W > k:
            cache.crop(-(W - k))
        took = [min(v, k) for v in verified]
        kept = steps[None, :k] < torch.tensor(took, device=device)[:, None]
        slot_mask = torch.cat([slot_mask, fed_mask[:, :k] * kept], dim=1)
        cached = [c + t for c, t in zip(cached, took)]
        if reshapable is None:
            reshapable = holes and _plain_layers(cache)

        keep_rows = [j for j, i in enumerate(live) if not rows[i].done]
        if len(keep_rows) < len(live):
            if keep_rows:
                idx = torch.tensor(keep_rows, device=device)
                cache.batch_select_indices(idx)
                slot_mask = slot_mask[idx]
                offsets, cached = [offsets[j] for j in keep_rows], [cached[j] for j in keep_rows]
            for i in live:
                if rows[i].done:
                    del rows[i], committed[i]
            live = [live[j] for j in keep_rows]
            if reshapable:
                # Rows left: cut the front slots no live row uses (their pads, spans from before
                # a join). Only a row leaving can free a slot, so this runs only then.
                used = slot_mask.any(dim=0).nonzero()
                lo = int(used[0]) if len(used) else 0
                if lo >= 32:
                    _slice_slots(cache, lo)
                    slot_mask = slot_mask[:, lo:]

        joining = list(admit(len(live))) if reshapable and admit is not None else []
        if joining:
            # Prefill the newcomers apart (all but their last prompt token, which they feed
            # with guesses next pass like every other row): feeding whole prompts in the
            # shared pass would make every row's pass as wide as the longest prompt.
            lens = [len(r.prompt) - 1 for r in joining]
            new_mask, new_cache = _prefill(model, [r.prompt[:-1] for r in joining], pad_id, cache_kw, policy)
            _append_rows(cache, new_cache, len(joining))
            width = max(slot_mask.shape[1], new_mask.shape[1])
            slot_mask = torch.cat([_pad_left(slot_mask, width), _pad_left(new_mask, width)])
            for r in joining:
                live.append(next_id)
                rows[next_id], committed[next_id] = r, list(r.prompt)
                next_id += 1
            offsets += [0] * len(joining)
            cached += lens


def _prefill(model: torch.nn.Module, prompts: list[list[int]], pad_id: int, cache_kw: str,
             policy: BlockPolicy | None) -> tuple[torch.Tensor, Any]:
    """A fresh cache holding ``prompts`` (left-padded), and its slot mask; no cache for empty prompts."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    pads = torch.tensor([width - len(p) for p in prompts], device=device)
    mask = (torch.arange(width, device=device)[None, :] >= pads[:, None]).long()
    if width == 0:
        return mask, None
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    cache = _new_cache(model)
    t0 = time.perf_counter()
    model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp_min(0), use_cache=True,
          logits_to_keep=1, **{cache_kw: cache})
    if policy is not None:
        policy.record(len(prompts), width, time.perf_counter() - t0)
    return mask, cache


def _pad_left(t: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (width - t.shape[-1], 0))


def _plain_layers(cache: Any) -> bool:
    """Whether every layer keeps plain (batch, heads, slots, dim) keys and values we may reshape."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers)


def _slice_slots(cache: Any, lo: int) -> None:
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[:, :, lo:], layer.values[:, :, lo:]


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


def _has_sliding_window(config: Any) -> bool:
    """Whether any attention layer sees only a window of recent cache slots (Gemma-2, Mistral)."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return any("sliding" in str(t) for t in layer_types)
    return bool(getattr(config, "sliding_window", None)) and bool(getattr(config, "use_sliding_window", True))


def _commit(row: Row, tokens: list[int], stop_ids: set[int], limit: int) -> list[int]:
    """Append verified tokens, stopping at a stop token or the length limit."""
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
