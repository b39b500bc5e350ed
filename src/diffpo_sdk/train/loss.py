"""The DiffPO loss (paper eq. 4-6): L = L_AR + w * L_Con, with the guards against collapse.

Batches are left-padded so every answer occupies the last N positions of its row; the
model then only projects those N positions onto the vocabulary (``logits_to_keep``), and
the vocabulary-sized softmaxes are taken a few positions at a time under activation
checkpointing, so the loss never holds more than ``chunk x V`` floats beyond the logits.

Normalisation (``normalize``), applied to both terms alike so w means the same for both:

- ``"sum"`` (the paper, eq. 4-5): L_AR and L_Con are each a sum over the N answer positions
  of a sequence, averaged over the batch;
- ``"token"``: each is a mean over its counted positions (w then does not grow with N).

Anti-collapse measures (see docs/training.md for the measurements behind them):

- ``mask``: positions whose student prefix equals the teacher's prefix have KL = 0 by
  construction; ``"prefix"`` leaves them out of the mean, ``"argmax"`` also leaves out
  positions where the student's greedy token already equals the teacher's (nothing left
  to teach for Jacobi there, and pushing further mostly teaches to ignore the prefix);
- the weight warm-up lives in the trainer (``consistency_weight_at``).

The ``frontier`` rows (see :func:`frontier_rows`) pack, into one forward, the refiner's
fixed point y* and many one-token branches: a branch is a wrong guess w at answer position
d that sees only ``[x, y*_<d]`` and itself (a 4D attention mask), so its logit is
p(. | x, y*_<d, w), exactly what the engine computes for the position right after a missed
guess; the teacher p(. | x, y*_<=d) is the clean logit at d in the same forward.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .recipes import check_choice, loss_default


@dataclass
class LossOutput:
    loss: torch.Tensor
    ar_loss: torch.Tensor
    con_loss: torch.Tensor
    weight: float
    con_positions: int
    fixed_loss: torch.Tensor | None = None
    #: student positions whose prefix differs from the teacher's, and how many of them already
    #: have the teacher's greedy token: what Jacobi acceptance checks (a steadier speed signal
    #: than counting the engine's passes on a few prompts)
    guesses: int = 0
    guesses_right: int = 0
    target_hold_loss: torch.Tensor | None = None


def pad_answer(ids: list[int], n: int, eot: int) -> list[int]:
    """Cut or pad an answer to N positions exactly as the engine pads a draft: the answer
    tokens, then the end-of-turn token repeated (the first one is the answer's stop)."""
    return list(ids[:n]) + [eot] * max(0, n - len(ids))


def answer_mask(n_tokens: int, n: int) -> list[int]:
    """Positions that carry the answer or its stop token (the rest is filler)."""
    return [1 if i <= n_tokens else 0 for i in range(n)]


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions for left-padded rows: 0 at each row's first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def answer_logits(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, n: int) -> torch.Tensor:
    """Logits predicting the N answer tokens of left-padded ``[prompt, answer]`` rows: (B, N, V)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                logits_to_keep=n + 1, use_cache=False)
    return out.logits[:, :-1]


def frontier_rows(prompts: list[list[int]], fixed: list[list[int]], branches: list[list[tuple[int, Any]]],
                  pad: int, targets: list[list[int]] | None = None) -> dict[str, torch.Tensor]:
    """Pack ``[x, y*, branches, y^(T)]`` rows for the ``frontier`` consistency term.

    ``fixed`` holds y* cut or padded to N; ``branches`` per row (answer position d, wrong
    guesses) pairs, the guesses one token w or a run [w_d, w_d+1, ...]. Rows are left-padded
    so the N answer slots, the branch slots and the target slots end every row. A branch token
    for answer position j = d + i sits at position ``len(x) + j`` and attends to ``x``,
    ``y*_<d`` and the run up to itself: its logit predicts position j + 1 after i + 1 wrong
    guesses, and its teacher is the clean logit at j. ``targets`` (the preferred answers, N
    tokens) add their first N - 1 tokens, attending to ``x`` and the target before them, so
    L_AR and the target hold read the same forward instead of one of their own (the logit
    predicting a target's first token is the clean path's first: both follow ``x``).
    Padding slots attend to themselves only.
    """
    n = len(fixed[0])
    runs = [[(d, [w] if isinstance(w, int) else list(w)) for d, w in br] for br in branches]
    k = max(1, max(sum(len(ws) for _, ws in br) for br in runs))
    t = n - 1 if targets is not None else 0  # target slots
    width = max(len(p) for p in prompts) + n + k + t
    rows = len(prompts)
    ids = torch.full((rows, width), pad, dtype=torch.long)
    pos = torch.zeros((rows, width), dtype=torch.long)
    allow = torch.eye(width, dtype=torch.bool).repeat(rows, 1, 1)
    bpos = torch.zeros((rows, k), dtype=torch.long)
    valid = torch.zeros((rows, k), dtype=torch.long)
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    for r, (p, y, br) in enumerate(zip(prompts, fixed, runs)):
        start = width - t - k - n - len(p)  # first real slot of this row
        end = width - t - k  # end of the y* slots
        ids[r, start:end] = torch.tensor(list(p) + list(y), dtype=torch.long)
        pos[r, start:end] = torch.arange(end - start)
        allow[r, start:end, start:end] = causal[: end - start, : end - start]
        j = 0  # branch tokens placed so far in this row
        for d, ws in br:
            first = end + j
            for i, w in enumerate(ws):
                slot = first + i
                ids[r, slot], pos[r, slot] = w, len(p) + d + i
                allow[r, slot, start:start + len(p) + d] = True
                allow[r, slot, first:slot + 1] = True
                bpos[r, j + i], valid[r, j + i] = d + i, 1
            j += len(ws)
        if t:
            ids[r, width - t:] = torch.tensor(targets[r][:t], dtype=torch.long)
            pos[r, width - t:] = len(p) + torch.arange(t)
            allow[r, width - t:, start:start + len(p)] = True
            allow[r, width - t:, width - t:] = causal[:t, :t]
    out = {"frontier_ids": ids, "frontier_position_ids": pos, "frontier_allow": allow[:, None],
           "frontier_pos": bpos, "frontier_valid": valid, "frontier_fixed": torch.tensor(fixed, dtype=torch.long)}
    if t:
        out["frontier_target_slots"] = torch.tensor(t)
    return out


class FrontierLogits(NamedTuple):
    """The logits of one packed forward of :func:`frontier_rows`."""

    #: (B, N, V): predicts y*_0..y*_N-1 on the clean path (with gradient: the fixed-point hold trains it)
    fixed: torch.Tensor
    #: (B, K, V), detached: the clean logit at each branch's position
    teacher: torch.Tensor
    #: (B, K, V): the branches' own logits
    student: torch.Tensor
    #: (B, N, V): predicts the target's N tokens, when the rows carry it (else None)
    target: torch.Tensor | None


def frontier_logits(model: Any, batch: dict[str, torch.Tensor], n: int) -> FrontierLogits:
    """Logits of the packed rows of :func:`frontier_rows`."""
    allow = batch["frontier_allow"]
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", "sdpa") != "sdpa":  # eager & co. add the mask
        dtype = next(model.parameters()).dtype
        allow = torch.zeros(allow.shape, dtype=dtype, device=allow.device).masked_fill(~allow, torch.finfo(dtype).min)
    k = batch["frontier_pos"].shape[1]
    t = int(batch["frontier_target_slots"]) if "frontier_target_slots" in batch else 0
    logits = model(input_ids=batch["frontier_ids"], attention_mask=allow,
                   position_ids=batch["frontier_position_ids"], logits_to_keep=n + k + t + 1, use_cache=False).logits
    fixed, clean, student = logits[:, :n], logits[:, 1:n + 1], logits[:, n + 1:n + 1 + k]
    target = torch.cat([logits[:, :1], logits[:, n + 1 + k:]], dim=1) if t else None
    index = batch["frontier_pos"][..., None].expand(-1, -1, clean.shape[-1])
    return FrontierLogits(fixed, clean.gather(1, index).detach(), student, target)


def _kl_chunk(t_logits: torch.Tensor, s_logits: torch.Tensor) -> torch.Tensor:
    t = F.log_softmax(t_logits.float(), dim=-1)
    s = F.log_softmax(s_logits.float(), dim=-1)
    return (t.exp() * (t - s)).sum(-1)


def _nll_chunk(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().transpose(1, 2), labels, reduction="none")


#: below this many logits (B x N x V) the softmaxes run in one piece: recomputing them costs time
SMALL = 1 << 25


def _chunked(fn: Any, chunk: int, *tensors: torch.Tensor) -> torch.Tensor:
    """Apply ``fn`` over position chunks (dim 1); checkpointed so V-sized temporaries are freed.

    Small inputs skip the chunking: the memory is trivial and recomputation would only cost time.
    """
    if tensors[0].numel() <= SMALL:
        return fn(*tensors)
    outs = []
    for i in range(0, tensors[0].shape[1], chunk):
        part = [t[:, i:i + chunk] for t in tensors]
        if torch.is_grad_enabled() and any(t.requires_grad for t in part):
            outs.append(checkpoint(fn, *part, use_reentrant=False))
        else:
            outs.append(fn(*part))
    return torch.cat(outs, dim=1)


def token_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    """KL(softmax(teacher) || softmax(student)) per position, (B, N); the teacher is detached."""
    return _chunked(_kl_chunk, chunk, teacher_logits.detach(), student_logits)


def token_ce_argmax(teacher_logits: torch.Tensor, student_logits: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    """Cross-entropy of the student toward the teacher's greedy token per position, (B, N):
    what a Jacobi guess needs is the same argmax, not the same distribution."""
    return token_nll(student_logits, teacher_logits.detach().argmax(-1), chunk)


def token_nll(logits: torch.Tensor, labels: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    """Cross-entropy per position, (B, N)."""
    return _chunked(_nll_chunk, chunk, logits, labels)


def consistency_mask(student_ans: torch.Tensor, teacher_ans: torch.Tensor, base: torch.Tensor, mode: str,
                     teacher_logits: torch.Tensor | None = None,
                     student_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Which answer positions L_Con counts (float, (B, N))."""
    check_choice("consistency_mask", mode)
    mask = base.float()
    if mode == "none":
        return mask
    # position i sees the prefix y_<i: it differs once any earlier token differs
    neq = (student_ans != teacher_ans).long()
    prefix_differs = (neq.cumsum(-1) - neq) > 0
    mask = mask * prefix_differs.float()
    if mode == "argmax" and teacher_logits is not None and student_logits is not None:
        with torch.no_grad():
            already = teacher_logits.argmax(-1) == student_logits.argmax(-1)
        mask = mask * (~already).float()
    return mask


def diffpo_loss(model: Any, batch: dict[str, torch.Tensor], weight: float, *, mask: str | None = None,
                normalize: str | None = None, chunk: int = 16, kind: str | None = None,
                fixed_point_weight: float | None = None, reference: Any = None,
                target_hold_weight: float | None = None, count_guesses: bool = True) -> LossOutput:
    """L_AR on the target + ``weight`` x L_Con of the student sequence toward the teacher.

    ``batch`` (from :class:`~diffpo_sdk.train.trainer.DiffPOCollator`): ``target_ids``,
    ``target_attention_mask``, ``target_answer`` (B, N), ``target_mask`` (B, N) for L_AR;
    ``student_ids``/``student_attention_mask``/``student_answer`` for y^(t); and the
    teacher answer ``teacher_answer``/``teacher_mask`` with a per-row flag
    ``teacher_is_target``. Where the teacher is the target (the paper's source), its
    distribution is the detached logits of the L_AR forward; other rows (Jacobi states,
    whose teacher is the refiner's own fixed point) get one extra no-grad forward. A batch
    from the ``frontier`` source (``frontier_ids`` & co., see :func:`frontier_rows`) has
    instead one packed forward whose branches are the students and whose clean y* logits
    are the teachers; the collator packs the target into the same rows, so L_AR (and the
    reference's holds) cost no forward of their own.

    ``kind``: ``"kl"`` (the paper) or ``"ce"``, cross-entropy toward the teacher's argmax.
    Options left ``None`` take the default recipe's value (:mod:`~diffpo_sdk.train.recipes`).

    ``fixed_point_weight`` (frontier rows only) adds that times L_AR on the refiner's own
    fixed point y*, read off the clean path of the same packed forward: it holds the greedy
    answer in place while the branches learn to shrug off a wrong token. With a ``reference``
    (the model before training) the term is instead KL(p_ref || p) on y*'s path: it holds the
    whole distribution there, not only the greedy token, so the model does not grow peaky on
    its own answers (which raises L_AR on anything else).

    ``target_hold_weight`` (with a ``reference``) adds that times KL(p_ref || p) on the
    preferred target's path, token mean: the hold where L_AR is measured, so the branches'
    lesson (look past a wrong last token) is kept off text that legitimately departs from y*.

    ``count_guesses`` fills ``guesses``/``guesses_right`` (an argmax over the vocabulary and
    a host sync): evaluation wants them, a training step does not.
    """
    mask = loss_default("consistency_mask") if mask is None else mask
    normalize = loss_default("consistency_normalize") if normalize is None else normalize
    kind = loss_default("consistency_loss") if kind is None else kind
    fixed_point_weight = loss_default("fixed_point_weight") if fixed_point_weight is None else fixed_point_weight
    target_hold_weight = loss_default("target_hold_weight") if target_hold_weight is None else target_hold_weight
    for option, value in (("consistency_mask", mask), ("consistency_normalize", normalize),
                          ("consistency_loss", kind)):
        check_choice(option, value)
    divergence = token_kl if kind == "kl" else token_ce_argmax
    n = batch["target_answer"].shape[1]
    packed = frontier_logits(model, batch, n) if "frontier_ids" in batch else None
    if "target_ids" in batch:
        t_logits = answer_logits(model, batch["target_ids"], batch["target_attention_mask"], n)
    else:  # the packed rows carry the target, or their clean path is the target (``target-branches``)
        assert packed is not None, "a batch needs target_ids, or frontier rows on the target"
        t_logits = packed.fixed if packed.target is None else packed.target

    @functools.cache
    def reference_packed() -> FrontierLogits:
        """The reference's packed forward: one, whichever holds read it."""
        with torch.no_grad():
            return frontier_logits(reference, batch, n)

    tmask = batch["target_mask"].float()
    nll = token_nll(t_logits, batch["target_answer"], chunk)
    ar_total = (nll * tmask).sum()
    # the paper: a sum over the N positions per sequence, mean over the batch; else a token mean
    ar = ar_total / tmask.shape[0] if normalize == "sum" else ar_total / tmask.sum().clamp(min=1)

    # the loss so far: L_AR, plus the target hold when there is one (reported detached)
    loss = ar
    target_hold = None
    if target_hold_weight and reference is not None and ("target_ids" in batch or packed.target is not None):
        if "target_ids" in batch:
            with torch.no_grad():
                ref_t = answer_logits(reference, batch["target_ids"], batch["target_attention_mask"], n)
        else:
            ref_t = reference_packed().target
        target_hold = (token_kl(ref_t, t_logits, chunk) * tmask).sum() / tmask.sum().clamp(min=1)
        loss = loss + target_hold_weight * target_hold
        target_hold = target_hold.detach()

    zero = ar.new_zeros(())
    anchored = bool(fixed_point_weight) and "frontier_ids" in batch
    if (weight == 0 and not anchored) or (packed is None and "student_ids" not in batch):
        return LossOutput(loss, ar.detach(), zero, weight, 0, target_hold_loss=target_hold)

    fixed_loss = None
    if "frontier_ids" in batch:
        f_logits, teacher, s_logits = packed.fixed, packed.teacher, packed.student
        cmask = batch["frontier_valid"].float()
        if fixed_point_weight:
            fmask = batch.get("frontier_fixed_mask", torch.ones_like(batch["frontier_fixed"])).float()
            if reference is None:
                f_div = token_nll(f_logits, batch["frontier_fixed"], chunk)
            else:
                f_div = token_kl(reference_packed().fixed, f_logits, chunk)
            fixed_loss = (f_div * fmask).sum() / fmask.sum().clamp(min=1)
        base = cmask
        if mask == "argmax":
            with torch.no_grad():
                cmask = cmask * (teacher.argmax(-1) != s_logits.argmax(-1)).float()
    else:
        teacher = t_logits.detach()
        is_target = batch["teacher_is_target"].bool()
        if not bool(is_target.all()):
            with torch.no_grad():
                other = answer_logits(model, batch["teacher_ids"], batch["teacher_attention_mask"], n)
            teacher = torch.where(is_target[:, None, None], teacher, other)
        s_logits = answer_logits(model, batch["student_ids"], batch["student_attention_mask"], n)
        cmask = consistency_mask(batch["student_answer"], batch["teacher_answer"], batch["teacher_mask"], mask,
                                 teacher, s_logits)
        base = consistency_mask(batch["student_answer"], batch["teacher_answer"], batch["teacher_mask"], "prefix")
    guesses = right = 0
    if count_guesses:
        with torch.no_grad():
            guesses = int(base.sum())
            right = int(((teacher.argmax(-1) == s_logits.argmax(-1)).float() * base).sum())
    div = divergence(teacher, s_logits, chunk)
    total = (div * cmask).sum()
    if normalize == "token":
        con = total / cmask.sum().clamp(min=1)
    else:  # the paper's sum over N positions, averaged over the batch
        con = total / div.shape[0]
    loss = loss + weight * con
    if fixed_loss is not None:
        loss = loss + fixed_point_weight * fixed_loss
        fixed_loss = fixed_loss.detach()
    return LossOutput(loss, ar.detach(), con.detach(), weight, int(cmask.sum()), fixed_loss, guesses, right,
                      target_hold)
