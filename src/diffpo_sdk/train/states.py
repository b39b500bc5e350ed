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

import json
import os
import random
from pathlib import Path
from typing import Any

import torch

from .loss import pad_answer, position_ids


def _left_pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
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
        ids, mask = _left_pad(prompts[i:i + batch_size], pad)
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=n,
                             do_sample=False, pad_token_id=pad, eos_token_id=sorted(stop_ids))
        for row in gen[:, ids.shape[1]:].tolist():
            ans = []
            for t in row:
                ans.append(int(t))
                if t in stop_ids:
                    break
            out.append(ans)
    return out


@torch.no_grad()
def one_pass(model: Any, prompts: list[list[int]], answers: list[list[int]], pad: int) -> list[list[int]]:
    """One Jacobi pass: argmax p(. | x, y_<i) at every answer position i, all at once."""
    device = next(model.parameters()).device
    n = len(answers[0])
    ids, mask = _left_pad([p + a for p, a in zip(prompts, answers)], pad)
    ids, mask = ids.to(device), mask.to(device)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), logits_to_keep=n + 1,
                   use_cache=False).logits[:, :-1]
    return logits.argmax(-1).tolist()


def build_states(model: Any, tokenizer: Any, prompts: list[list[int]], drafts: list[list[int]], n: int,
                 eot: int, stop_ids: set[int], states_per_prompt: int = 2, batch_size: int = 8, seed: int = 0,
                 progress: bool = True) -> list[dict[str, Any]]:
    """For each prompt: ``{"fixed_point": y* ids, "states": [N ids, ...]}`` (see module doc)."""
    from tqdm.auto import tqdm

    rng = random.Random(seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eot
    was_training = model.training
    model.eval()
    fixed = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="fixed points", disable=not progress):
        fixed += greedy_answers(model, prompts[i:i + batch_size], n, stop_ids, pad, batch_size)
    jobs = []  # (prompt index, start state)
    for k, (y, d) in enumerate(zip(fixed, drafts)):
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


def load_or_build(path: Path, key: str, build: Any) -> list[dict[str, Any]]:
    """Reuse states saved under ``path`` for the same ``key`` (model + data + N); else build and save."""
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return saved["items"]
    items = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")  # several ranks may write the same states
    tmp.write_text(json.dumps({"key": key, "items": items}))
    tmp.replace(path)
    return items
