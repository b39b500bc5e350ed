"""The DiffPO loss against an independent, unpadded, unchunked reference on a tiny model."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from diffpo_sdk.train.loss import consistency_mask, diffpo_loss, pad_answer  # noqa: E402
from diffpo_sdk.train.trainer import DiffPOCollator, TrajectoryDataset  # noqa: E402

RECORDS = [
    {"messages": [{"role": "user", "content": "Name a colour."}], "target": "Blue is a colour.",
     "others": ["Red.", "I like trains and many other things"]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is two plus two, exactly?"}],
     "target": "Four.", "others": ["Two plus two is four, which is the answer."]},
]


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    return model, tok


def reference(model, feats, weight: float, mask_mode: str, normalize: str):
    """Row by row, no padding, full softmax: eq. 4-6 written out directly."""
    ar_num = ar_den = 0.0
    kl_rows, kl_counts = [], []
    guesses = right = 0
    for f in feats:
        p = torch.tensor([f["prompt"]])
        def logits_of(ans):
            full = model(input_ids=torch.cat([p, torch.tensor([ans])], 1)).logits[0]
            return full[len(f["prompt"]) - 1: len(f["prompt"]) - 1 + len(ans)]
        lt = logits_of(f["target"])
        tm = torch.tensor(f["target_mask"], dtype=torch.float)
        nll = torch.nn.functional.cross_entropy(lt, torch.tensor(f["target"]), reduction="none")
        ar_num = ar_num + (nll * tm).sum()
        ar_den += float(tm.sum())
        teacher = (lt if f["teacher_is_target"] else logits_of(f["teacher"])).detach()
        ls = logits_of(f["student"])
        tp, sp = teacher.log_softmax(-1), ls.log_softmax(-1)
        kl = (tp.exp() * (tp - sp)).sum(-1)
        m = torch.tensor(f["teacher_mask"], dtype=torch.float)
        for i in range(len(kl)):  # guesses: positions after a differing prefix
            if m[i] and f["student"][:i] != f["teacher"][:i]:
                guesses += 1
                right += int(teacher[i].argmax() == ls[i].argmax())
        if mask_mode != "none":
            for i in range(len(kl)):
                if f["student"][:i] == f["teacher"][:i]:
                    m[i] = 0
        if mask_mode == "argmax":
            m = m * (teacher.argmax(-1) != ls.argmax(-1)).float()
        kl_rows.append((kl * m).sum())
        kl_counts.append(float(m.sum()))
    ar = ar_num / ar_den if normalize == "token" else ar_num / len(feats)
    total = sum(kl_rows)
    con = total / max(sum(kl_counts), 1) if normalize == "token" else total / len(feats)
    return ar + weight * con, ar, con, guesses, right


@pytest.mark.parametrize("mask_mode,normalize", [("prefix", "token"), ("none", "sum"), ("argmax", "token")])
def test_loss_matches_reference(tiny, mask_mode: str, normalize: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import diffpo_sdk.train.loss as loss_mod

    monkeypatch.setattr(loss_mod, "SMALL", 0)  # force the chunked, checkpointed path
    model, tok = tiny
    ds = TrajectoryDataset(RECORDS, tok, n=12, source="answers")
    feats = [ds.get(i, deterministic=True) for i in range(len(ds))]
    # one row whose teacher is not the target (a Jacobi-state row): needs its own teacher forward
    feats.append({**feats[0], "teacher": ds.padded(ds.items[1]["target"]),
                  "teacher_mask": ds.answer_mask(ds.items[1]["target"]), "teacher_is_target": False})
    batch = DiffPOCollator(ds.pad)(feats)
    out = diffpo_loss(model, batch, 3.0, mask=mask_mode, normalize=normalize, chunk=5, kind="kl", fixed_point_weight=0.0)
    ref_loss, ref_ar, ref_con, guesses, right = reference(model, feats, 3.0, mask_mode, normalize)
    assert float(ref_con.detach()) > 0
    assert (out.guesses, out.guesses_right) == (guesses, right) and guesses > 0
    torch.testing.assert_close(out.ar_loss, ref_ar.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.con_loss, ref_con.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("small", [0, 1 << 25])
def test_consistency_gradient_flows_only_through_student(tiny, small: int, monkeypatch: pytest.MonkeyPatch) -> None:
    import diffpo_sdk.train.loss as loss_mod

    monkeypatch.setattr(loss_mod, "SMALL", small)  # chunked + checkpointed, and in one piece
    model, tok = tiny
    ds = TrajectoryDataset(RECORDS, tok, n=10, source="answers")
    batch = DiffPOCollator(ds.pad)([ds.get(i, deterministic=True) for i in range(len(ds))])
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in params]

    g_full = grads(diffpo_loss(model, batch, 1.0, mask="none", chunk=3, kind="kl", fixed_point_weight=0.0).loss)
    g_ar = grads(diffpo_loss(model, batch, 0.0, mask="none", kind="kl", fixed_point_weight=0.0).loss)
    # reference: the teacher from a separate no-grad forward, the KL backpropagated into the student only
    from diffpo_sdk.train.loss import answer_logits, token_kl

    with torch.no_grad():
        teacher = answer_logits(model, batch["target_ids"], batch["target_attention_mask"], 10)
    student = answer_logits(model, batch["student_ids"], batch["student_attention_mask"], 10)
    m = batch["teacher_mask"].float()
    g_con = grads((token_kl(teacher, student) * m).sum() / m.sum())
    for full, ar, con in zip(g_full, g_ar, g_con):
        torch.testing.assert_close(full - ar, con, rtol=1e-3, atol=1e-6)
    assert any(float(g.abs().sum()) > 0 for g in g_con)


def test_answers_padded_like_engine_drafts(tiny) -> None:
    from diffpo_sdk.engine import RefinerEngine

    model, tok = tiny
    engine = RefinerEngine(model, tok)
    ds = TrajectoryDataset(RECORDS, tok, n=8)
    ids = tok("Blue is a colour.", add_special_tokens=False)["input_ids"]
    assert ds.padded(ds._answer(tok, "Blue is a colour.")) == engine.initial_guess(ids, 8)
    long = ids * 5
    assert ds.padded(ds._answer(tok, tok.decode(long))) == engine.initial_guess(long, 8)
    assert pad_answer([5, 6], 4, 2) == [5, 6, 2, 2]


def test_prefix_mask() -> None:
    s = torch.tensor([[1, 2, 9, 4]])
    t = torch.tensor([[1, 2, 3, 4]])
    m = consistency_mask(s, t, torch.ones(1, 4), "prefix")
    assert m.tolist() == [[0, 0, 0, 1]]  # only position 3 sees a differing prefix


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_frontier_branches_equal_plain_forwards(tiny_llama_dir: str, attn: str) -> None:
    """A packed branch's logit is p(. | x, y*_<d, w), its teacher p(. | x, y*_<=d) and a
    packed target's logit p(. | x, y^(T)_<i), each checked against an ordinary forward of
    that unpadded sequence."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from diffpo_sdk.train.loss import frontier_logits, frontier_rows

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32, attn_implementation=attn)
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    n = 6
    ds = TrajectoryDataset(RECORDS, tok, n=n)
    prompts = [ds.items[0]["prompt"], ds.items[1]["prompt"]]
    fixed = [ds.padded(ds.items[0]["target"]), ds.padded(ds.items[1]["others"][0])]
    # rows with different numbers of branches; one token each, or a run of wrong guesses
    branches = [[(0, 7), (2, [11, 12, 14]), (4, 13)], [(1, 5)]]
    targets = [ds.padded(ds.items[0]["others"][0]), ds.padded(ds.items[1]["target"])]
    batch = frontier_rows(prompts, fixed, branches, ds.pad, targets)
    with torch.no_grad():
        fixed_logits, teacher, student, target = frontier_logits(model, batch, n)
        assert frontier_logits(model, frontier_rows(prompts, fixed, branches, ds.pad), n).target is None

        def last_logit(seq: list[int]) -> torch.Tensor:
            return model(input_ids=torch.tensor([seq])).logits[0, -1]

        for r, (p, y, br) in enumerate(zip(prompts, fixed, branches)):
            k = 0
            for d, ws in br:
                ws = [ws] if isinstance(ws, int) else ws
                for i in range(len(ws)):
                    got = student[r, k]
                    torch.testing.assert_close(got, last_logit(p + y[:d] + ws[: i + 1]), rtol=1e-4, atol=1e-4)
                    torch.testing.assert_close(teacher[r, k], last_logit(p + y[: d + i + 1]), rtol=1e-4, atol=1e-4)
                    k += 1
            for i in range(n):  # the clean path predicts y*_i from [x, y*_<i], the target's y^(T)_i from [x, y^(T)_<i]
                torch.testing.assert_close(fixed_logits[r, i], last_logit(p + y[:i]), rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(target[r, i], last_logit(p + targets[r][:i]), rtol=1e-4, atol=1e-4)
    assert batch["frontier_valid"].tolist() == [[1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert batch["frontier_pos"][0].tolist() == [0, 2, 3, 4, 4]


def test_frontier_loss_counts_valid_branches_and_trains_only_the_student(tiny) -> None:
    """L_Con over frontier rows is the mean KL (or CE to the teacher's argmax) over the real
    branches, and its gradient equals that of the same term with a separately computed, detached teacher."""
    from diffpo_sdk.train.loss import frontier_logits, token_kl

    model, tok = tiny
    n = 8
    recs = [dict(r) for r in RECORDS]
    y = tok("Blue is a colour.", add_special_tokens=False)["input_ids"][: n - 2] + [2]
    states = [{"fixed_point": y, "states": [[5] * n, [6] * n]} for _ in recs]
    ds = TrajectoryDataset(recs, tok, n=n, source="frontier", states=states, branches=3)
    feats = [ds.get(i, deterministic=True) for i in range(len(ds))]
    assert all(0 < len(f["branches"]) <= 3 for f in feats)
    batch = DiffPOCollator(ds.pad)(feats)
    for kind in ("kl", "ce"):
        out = diffpo_loss(model, batch, 2.0, mask="none", kind=kind, fixed_point_weight=0.0)
        with torch.no_grad():
            _, teacher, student, _ = frontier_logits(model, batch, n)
            per = (token_kl(teacher, student) if kind == "kl" else
                   torch.nn.functional.cross_entropy(student.transpose(1, 2), teacher.argmax(-1), reduction="none"))
            v = batch["frontier_valid"].float()
            ref = (per * v).sum() / v.sum()
        torch.testing.assert_close(out.con_loss, ref, rtol=1e-4, atol=1e-5)
        assert out.con_positions == out.guesses == int(v.sum())
        assert out.guesses_right == int(((teacher.argmax(-1) == student.argmax(-1)).float() * v).sum())
    params = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    diffpo_loss(model, batch, 1.0, mask="none", kind="kl", fixed_point_weight=0.0).loss.backward()
    g_full = [p.grad.clone() for p in params]
    model.zero_grad()
    diffpo_loss(model, batch, 0.0, mask="none", kind="kl", fixed_point_weight=0.0).loss.backward()
    g_ar = [p.grad.clone() for p in params]
    model.zero_grad()
    with torch.no_grad():
        teacher = frontier_logits(model, batch, n).teacher
    student = frontier_logits(model, batch, n).student
    v = batch["frontier_valid"].float()
    ((token_kl(teacher, student) * v).sum() / v.sum()).backward()
    for full, ar, p in zip(g_full, g_ar, params):
        torch.testing.assert_close(full - ar, p.grad, rtol=1e-3, atol=1e-6)


def fixed_point_batch(tok, n: int):
    """A frontier batch whose fixed point y* is a short known answer (5 tokens and its stop)."""
    y = tok("Blue is a colour.", add_special_tokens=False)["input_ids"][: n - 3] + [2]
    states = [{"fixed_point": y, "states": [[5] * n, [6] * n]} for _ in RECORDS]
    ds = TrajectoryDataset([dict(r) for r in RECORDS], tok, n=n, source="frontier", states=states, branches=3)
    return y, ds, DiffPOCollator(ds.pad)([ds.get(i, deterministic=True) for i in range(len(ds))])


def test_fixed_point_term_is_the_refiners_own_greedy_answer_loss(tiny) -> None:
    """``fixed_point_weight`` adds L_AR on y* (its answer tokens and stop, not the filler), as
    an ordinary forward of ``[x, y*]`` computes it, and nothing else."""
    model, tok = tiny
    n = 8
    y, ds, batch = fixed_point_batch(tok, n)
    assert batch["frontier_fixed_mask"][0].tolist() == [1] * len(y) + [0] * (n - len(y))
    with torch.no_grad():
        plain = diffpo_loss(model, batch, 1.0, mask="none", kind="kl", fixed_point_weight=0.0)
        anchored = diffpo_loss(model, batch, 1.0, mask="none", fixed_point_weight=0.5, kind="kl")
        nll = []
        for i in range(len(ds)):
            seq = torch.tensor([ds.items[i]["prompt"] + ds.padded(y)])
            logits = model(input_ids=seq).logits[0, -n - 1:-1]
            nll.append(torch.nn.functional.cross_entropy(logits[: len(y)], torch.tensor(y), reduction="sum"))
        ref = sum(nll) / (len(y) * len(ds))
    assert plain.fixed_loss is None
    torch.testing.assert_close(anchored.fixed_loss, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(anchored.loss, plain.loss + 0.5 * ref, rtol=1e-4, atol=1e-5)
    # with w = 0 (the warm-up's first step) the fixed-point term still counts
    early = diffpo_loss(model, batch, 0.0, mask="none", fixed_point_weight=0.5, kind="kl")
    torch.testing.assert_close(early.loss, plain.ar_loss + 0.5 * ref, rtol=1e-4, atol=1e-5)


def test_kl_anchor_is_kl_from_the_reference_on_y_star(tiny) -> None:
    """With a ``reference`` the fixed-point term is KL(p_ref || p) over y*'s answer positions
    (plain forwards of ``[x, y*]``), zero against an identical copy, and its gradient reaches
    only the trained model."""
    import copy

    model, tok = tiny
    n = 8
    y, ds, batch = fixed_point_batch(tok, n)
    same = copy.deepcopy(model).requires_grad_(False)
    other = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
        zero = diffpo_loss(model, batch, 1.0, mask="none", fixed_point_weight=0.5, reference=same, kind="kl",
                           target_hold_weight=0.0)
        anchored = diffpo_loss(model, batch, 1.0, mask="none", fixed_point_weight=0.5, reference=other, kind="kl",
                               target_hold_weight=0.0)
        plain = diffpo_loss(model, batch, 1.0, mask="none", kind="kl", fixed_point_weight=0.0)
        kl = []
        for i in range(len(ds)):
            seq = torch.tensor([ds.items[i]["prompt"] + ds.padded(y)])
            logp = model(input_ids=seq).logits[0, -n - 1:-1][: len(y)].log_softmax(-1)
            logq = other(input_ids=seq).logits[0, -n - 1:-1][: len(y)].log_softmax(-1)
            kl.append((logq.exp() * (logq - logp)).sum())
        ref = sum(kl) / (len(y) * len(ds))
    assert float(zero.fixed_loss) < 1e-6
    assert float(ref) > 1e-3
    torch.testing.assert_close(anchored.fixed_loss, ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(anchored.loss, plain.loss + 0.5 * ref, rtol=1e-4, atol=1e-5)
    out = diffpo_loss(model, batch, 0.0, mask="none", fixed_point_weight=0.5, reference=other, kind="kl",
                      target_hold_weight=0.0)
    out.loss.backward()
    assert all(p.grad is None for p in other.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    model.zero_grad()


def test_target_hold_is_kl_from_the_reference_on_the_target(tiny) -> None:
    """``target_hold_weight`` adds KL(p_ref || p) on the preferred target's answer positions
    (its tokens and stop, not the filler), a token mean from plain forwards of ``[x, y^(T)]``;
    zero against an identical copy, skipped without a reference, trained only through the model."""
    import copy

    model, tok = tiny
    n = 10
    ds = TrajectoryDataset(RECORDS, tok, n=n, source="answers")
    feats = [ds.get(i, deterministic=True) for i in range(len(ds))]
    batch = DiffPOCollator(ds.pad)(feats)
    same = copy.deepcopy(model).requires_grad_(False)
    other = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
        plain = diffpo_loss(model, batch, 1.0, mask="none", kind="kl", fixed_point_weight=0.0)
        zero = diffpo_loss(model, batch, 1.0, mask="none", kind="kl", fixed_point_weight=0.0,
                           reference=same, target_hold_weight=2.0)
        held = diffpo_loss(model, batch, 1.0, mask="none", kind="kl", fixed_point_weight=0.0,
                           reference=other, target_hold_weight=2.0)
        unheld = diffpo_loss(model, batch, 1.0, mask="none", kind="kl", fixed_point_weight=0.0,
                             target_hold_weight=2.0)
        total, count = 0.0, 0.0
        for f in feats:
            seq = torch.tensor([f["prompt"] + f["target"]])
            logp = model(input_ids=seq).logits[0, -n - 1:-1].log_softmax(-1)
            logq = other(input_ids=seq).logits[0, -n - 1:-1].log_softmax(-1)
            m = torch.tensor(f["target_mask"], dtype=torch.float)
            total = total + ((logq.exp() * (logq - logp)).sum(-1) * m).sum()
            count += float(m.sum())
        ref = total / count
    assert 0 < count < n * len(feats)  # the filler after a short answer's stop is left out
    assert float(zero.target_hold_loss) < 1e-6 and unheld.target_hold_loss is None
    assert float(ref) > 1e-3
    torch.testing.assert_close(held.target_hold_loss, ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(held.loss, plain.loss + 2.0 * ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(held.ar_loss, plain.ar_loss)  # L_AR itself is reported unchanged
    out = diffpo_loss(model, batch, 0.0, mask="none", kind="kl", fixed_point_weight=0.0, reference=other,
                      target_hold_weight=2.0)
    out.loss.backward()
    assert all(p.grad is None for p in other.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    model.zero_grad()


def test_packed_target_gives_the_loss_of_separate_target_rows_in_one_forward(tiny) -> None:
    """The collator packs the preferred target into the frontier rows: the default recipe's
    whole loss (L_AR, L_Con, both KL holds) and its gradient equal those computed with the
    target in rows of its own, and the model and the reference each run one forward, not two."""
    import copy

    from diffpo_sdk.train.loss import frontier_rows

    model, tok = tiny
    n = 8
    _, ds, packed = fixed_point_batch(tok, n)
    feats = [ds.get(i, deterministic=True) for i in range(len(ds))]
    assert "target_ids" not in packed and int(packed["frontier_target_slots"]) == n - 1
    separate = dict(frontier_rows([f["prompt"] for f in feats], [f["fixed"] for f in feats],
                                  [f["branches"] for f in feats], ds.pad))
    separate["target_ids"], separate["target_attention_mask"] = DiffPOCollator(ds.pad)._rows(
        [f["prompt"] for f in feats], [f["target"] for f in feats])
    for key in ("target_answer", "target_mask", "frontier_fixed_mask"):
        separate[key] = packed[key]
    other = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    calls = {"model": 0, "reference": 0}
    hooks = [m.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
             for name, m in (("model", model), ("reference", other))]
    options = dict(mask="none", kind="ce", fixed_point_weight=3.0, target_hold_weight=2.0, reference=other)
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    try:
        for batch in (packed, separate):
            model.zero_grad()
            calls.update(model=0, reference=0)
            out = diffpo_loss(model, batch, 1.5, **options)
            out.loss.backward()
            results.append((out, dict(calls), [p.grad.clone() for p in params]))
    finally:
        for h in hooks:
            h.remove()
        model.zero_grad()
    (one, one_calls, one_grads), (two, two_calls, two_grads) = results
    assert one_calls == {"model": 1, "reference": 1} and two_calls == {"model": 2, "reference": 2}
    assert float(two.target_hold_loss) > 1e-4 and float(two.fixed_loss) > 1e-4
    for name in ("loss", "ar_loss", "con_loss", "fixed_loss", "target_hold_loss"):
        torch.testing.assert_close(getattr(one, name), getattr(two, name), rtol=1e-4, atol=1e-5)
    for a, b in zip(one_grads, two_grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
