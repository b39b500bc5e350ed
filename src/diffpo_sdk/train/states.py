"""The second trajectory source: the refiner's own Jacobi states toward its fixed point.

The fixed point y* of Jacobi decoding is the refiner's greedy answer (``model.generate``).
A state the decoder meets mid-way has a converged prefix y*_<c followed by guesses that
were predicted under a wrong prefix. We build such states with one batched pass each:
feed ``[x, y*_<c, draft_>=c]`` and take the greedy prediction at every position, for a few
random c per prompt (c = 0 is the first Jacobi iterate from the draft). Training the
student on these states toward the teacher p(. | x, y*_<i) teaches exactly what makes
Jacobi accept more tokens per pass (the consistency-LLM recipe), without asking the model
to turn a different model's answer into the target.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Sampler

from ..generation import generate_cut
from .loss import pad_answer, position_ids

log = logging.getLogger(__name__)


def left_pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, width - len(s):] = torch.tensor(s)
        mask[r, width - len(s):] = 1
    return ids, mask


@torch.no_grad()
def greedy_answers(model: Any, prompts: list[list[int]], n: int, stop_ids: set[int], pad: int,
                   batch_size: int = 8) -> list[list[int]]:
    """The refiner's greedy answer (the Jacobi fixed point), up to and including its stop token."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(prompts), batch_size):
        ids, mask = left_pad(prompts[i:i + batch_size], pad)
        rows = generate_cut(model, ids.to(device), mask.to(device), max_new_tokens=n, stop_ids=stop_ids,
                            pad_id=pad, keep_stop=True)
        out += [ans for ans, _ in rows]
    return out


@torch.no_grad()
def one_pass(model: Any, prompts: list[list[int]], answers: list[list[int]], pad: int) -> list[list[int]]:
    """One Jacobi pass: argmax p(. | x, y_<i) at every answer position i, all at once."""
    device = next(model.parameters()).device
    n = len(answers[0])
    ids, mask = left_pad([p + a for p, a in zip(prompts, answers)], pad)
    ids, mask = ids.to(device), mask.to(device)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), logits_to_keep=n + 1,
                   use_cache=False).logits[:, :-1]
    return logits.argmax(-1).tolist()


def build_states(model: Any, tokenizer: Any, prompts: list[list[int]], drafts: list[list[int]], n: int,
                 eot: int, stop_ids: set[int], states_per_prompt: int = 2, batch_size: int = 8, seed: int = 0,
                 progress: bool = True) -> list[dict[str, Any]]:
    """For each prompt: ``{"fixed_point": y* ids, "states": [N ids, ...]}`` (see module doc).

    The start position of each state is drawn from a generator seeded by ``seed`` and the
    prompt's own tokens, so a prompt gets the same states in whatever chunk it is built.
    """
    from tqdm.auto import tqdm

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eot
    was_training = model.training
    model.eval()
    fixed = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="fixed points", disable=not progress):
        fixed += greedy_answers(model, prompts[i:i + batch_size], n, stop_ids, pad, batch_size)
    jobs = []  # (prompt index, start state)
    for k, (y, d) in enumerate(zip(fixed, drafts)):
        rng = random.Random(f"{seed}:{content_key([prompts[k], d])}")
        y_pad, d_pad = pad_answer(y, n, eot), pad_answer(d, n, eot)
        for _ in range(states_per_prompt):
            c = rng.randrange(0, max(1, len(y) - 1))
            jobs.append((k, y_pad[:c] + d_pad[c:], c))
    states: list[list[list[int]]] = [[] for _ in prompts]
    for i in tqdm(range(0, len(jobs), batch_size), desc="jacobi states", disable=not progress):
        part = jobs[i:i + batch_size]
        preds = one_pass(model, [prompts[k] for k, _, _ in part], [s for _, s, _ in part], pad)
        for (k, start, c), pred in zip(part, preds):
            states[k].append(start[:c] + pred[c:])
    model.train(was_training)
    return [{"fixed_point": y, "states": s} for y, s in zip(fixed, states)]


def content_key(parts: Any) -> str:
    """A short, stable hash of JSON-able content (cache keys)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def model_fingerprint(model: Any) -> str:
    """A cheap hash of a model's weights (a few values of every tensor): part of the cache key,
    so states of one checkpoint are never served for another saved under the same name."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            h.update(name.encode())
            h.update(p.detach().flatten()[:64].float().cpu().numpy().tobytes())
    return h.hexdigest()[:24]


class LazyStates:
    """Fixed points and Jacobi states, built ``chunk`` prompts at a time when first asked for.

    ``states[k]`` builds (or loads from ``cache_dir``) prompt ``k`` together with the next
    prompts not yet built in the order the run consumes them (:meth:`follow`; by default the
    index order), so a run builds states for what it trains on, in batches. ``model`` must
    stay the model as training started (a frozen copy, or a LoRA model with its adapter off).
    A group's cache file is named by a key over its prompt and draft tokens, ``model_id``, N,
    the states per prompt and the seed, so a different split, model or N never reuses stale
    states. ``chunk=0`` means one group of everything.
    """

    def __init__(self, model: Any, tokenizer: Any, prompts: list[list[int]], drafts: list[list[int]], n: int,
                 eot: int, stop_ids: set[int], *, states_per_prompt: int = 2, batch_size: int = 8, seed: int = 0,
                 chunk: int = 32, cache_dir: str | Path | None = None, model_id: str = "", progress: bool = True,
                 desc: str = "fixed points + jacobi states"):
        self.model, self.tokenizer, self.prompts, self.drafts = model, tokenizer, prompts, drafts
        self.n, self.eot, self.stop_ids = n, eot, stop_ids
        self.per_prompt, self.batch_size, self.seed = states_per_prompt, batch_size, seed
        self.chunk = chunk if chunk > 0 else max(1, len(prompts))
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.model_id = model_id
        #: built states by prompt index, and the groups they were built in (cache keys)
        self.built: dict[int, dict[str, Any]] = {}
        self.groups: list[list[int]] = []
        self.follow(range(len(prompts)))
        self.bar = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=len(prompts), desc=desc, unit="prompt", leave=False)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, k: int) -> dict[str, Any]:
        if k not in self.built:
            self._load_or_build(self._group_from(k))
        return self.built[k]

    def follow(self, order: Any) -> None:
        """The order in which prompts will be asked for (a sampler's epoch): a miss builds the
        prompts that come next in it. Prompts not in ``order`` are built after it, in index order."""
        order = list(order)
        seen = set(order)
        self.followed = len(order)
        self.order = order + [k for k in range(len(self.prompts)) if k not in seen]
        self.position = {k: i for i, k in enumerate(self.order)}

    def rebase(self, model: Any, model_id: str) -> None:
        """Build what is asked from now on with ``model`` (frozen), keyed by ``model_id``;
        states built by the previous model are dropped."""
        self.model, self.model_id, self.built, self.groups = model, model_id, {}, []

    def materialize(self) -> list[dict[str, Any]]:
        """Every prompt's states, in order (builds what is missing)."""
        return [self[k] for k in range(len(self))]

    def _group_from(self, k: int) -> list[int]:
        """``k`` and the prompts not yet built that follow it in the order (in the part followed,
        when ``k`` is in it), ``chunk`` at most."""
        start = self.position[k]
        group = []
        for j in self.order[start:self.followed if start < self.followed else None]:
            if j not in self.built:
                group.append(j)
                if len(group) == self.chunk:
                    break
        return group

    def key(self, group: list[int]) -> str:
        return content_key([self.model_id, self.n, self.per_prompt, self.seed, [self.prompts[k] for k in group],
                            [self.drafts[k] for k in group]])

    def _load_or_build(self, group: list[int]) -> None:
        key = self.key(group)
        path = self.cache_dir / f"states-{key}.json" if self.cache_dir is not None else None
        items = None
        if path is not None and path.is_file():
            try:
                saved = json.loads(path.read_text())
                items = saved["items"] if saved.get("key") == key else None
            except (json.JSONDecodeError, KeyError):
                items = None  # a file cut by a crash: build again
        if items is not None:
            log.info("states %s of %d prompts loaded from %s", key, len(group), path)
        else:
            t0 = time.time()
            items = build_states(self.model, self.tokenizer, [self.prompts[k] for k in group],
                                 [self.drafts[k] for k in group], self.n, self.eot, self.stop_ids, self.per_prompt,
                                 self.batch_size, self.seed, progress=False)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")  # several ranks may write the same group
                tmp.write_text(json.dumps({"key": key, "items": items}))
                tmp.replace(path)
            log.info("states %s of %d prompts built in %.1f s", key, len(group), time.time() - t0)
        self.built.update(zip(group, items))
        self.groups.append(group)
        if self.bar is not None:
            self.bar.update(len(group))
            if len(self.built) >= len(self.prompts):
                self.bar.close()


class EpochOrder(Sampler[int]):
    """A random order of the training prompts per epoch (seeded by ``seed`` and the epoch) that
    tells ``on_order`` before the epoch runs, so lazy states are built for the prompts the run
    is about to consume (:meth:`LazyStates.follow`), not for their neighbours by index.

    Every process draws the same order, and accelerate deals its batches of ``batch_size`` out
    round-robin, so process ``rank`` of ``world`` is told only the prompts it will consume."""

    def __init__(self, size: int, seed: int, on_order: Callable[[list[int]], None] | None = None, *,
                 batch_size: int = 1, rank: int = 0, world: int = 1):
        self.size, self.seed, self.on_order, self.epoch = size, seed, on_order, 0
        self.batch_size, self.rank, self.world = batch_size, rank, world

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.size

    def order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.size, generator=generator).tolist()

    def share(self, order: list[int]) -> list[int]:
        """The prompts of ``order`` this process consumes: batches ``rank``, ``rank + world``, ..."""
        b, step = self.batch_size, self.batch_size * self.world
        return [k for i in range(self.rank * b, len(order), step) for k in order[i:i + b]]

    def __iter__(self) -> Iterator[int]:
        order = self.order(self.epoch)
        if self.on_order is not None:
            self.on_order(self.share(order))
        return iter(order)
