"""Lazy fixed points and Jacobi states: the same batches as building them all first, from the
model as training started, cached by content."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from diffpo_sdk.train.reference import reference_model  # noqa: E402
from diffpo_sdk.train.states import LazyStates, model_fingerprint  # noqa: E402
from diffpo_sdk.train.trainer import DiffPOCollator, TrajectoryDataset  # noqa: E402

RECORDS = [
    {"messages": [{"role": "user", "content": f"Question {i}: name a {thing}."}],
     "target": f"A {thing} I like is number {i}.", "others": [f"{thing} {i}? {thing}!", "I do not know."]}
    for i, thing in enumerate(["colour", "fruit", "city", "river", "tree", "bird", "song", "book", "game"])
]
N = 10


@pytest.fixture()
def tiny(tiny_llama_dir: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    return (AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32),
            AutoTokenizer.from_pretrained(tiny_llama_dir))


def states(model, tok, ds: TrajectoryDataset, records: list[dict], **kw) -> LazyStates:
    prompts = [it["prompt"] for it in ds.items]
    drafts = [it["others"][0] for it in ds.items][: len(records)]
    return LazyStates(model, tok, prompts[: len(records)], drafts, N, ds.eot, ds.stop_ids, states_per_prompt=2,
                      batch_size=3, seed=0, progress=False, **kw)


def test_lazy_states_give_the_eager_batches(tiny, tmp_path: Path) -> None:
    model, tok = tiny
    plain = TrajectoryDataset(RECORDS, tok, N)
    eager = states(model, tok, plain, RECORDS, chunk=0).materialize()
    lazy = states(reference_model(model), tok, plain, RECORDS, chunk=3, cache_dir=tmp_path, model_id="m")
    with torch.no_grad():  # training moves the model; the lazy states must still be the starting model's
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    assert not lazy.built
    collate = DiffPOCollator(plain.pad)
    ds_eager = TrajectoryDataset(RECORDS, tok, N, source="frontier", states=eager)
    ds_lazy = TrajectoryDataset(RECORDS, tok, N, source="frontier", states=lazy)
    order = list(range(len(RECORDS)))
    random.Random(1).shuffle(order)
    lazy.follow(order)  # what the training sampler tells it at the start of an epoch
    first = [ds_lazy.get(i, deterministic=True) for i in order[:2]]
    # only what the run consumes next was built: the first 3 prompts of its order, in one group
    assert lazy.groups == [order[:3]] and set(lazy.built) == set(order[:3])
    for k in range(0, len(order), 2):
        idx = order[k:k + 2]
        a = collate([ds_eager.get(i, deterministic=True) for i in idx])
        b = collate(first if k == 0 else [ds_lazy.get(i, deterministic=True) for i in idx])
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    assert sum(any(f["branches"]) for f in (ds_lazy.get(i, deterministic=True) for i in order)) > 0
    assert lazy.groups == [order[k:k + 3] for k in range(0, len(order), 3)]  # each prompt built once
    # the moved model would have given other fixed points: the comparison can fail
    moved = states(model, tok, plain, RECORDS, chunk=0).materialize()
    assert [s["fixed_point"] for s in moved] != [s["fixed_point"] for s in eager]


def test_states_cache_is_keyed_by_content(tiny, tmp_path: Path) -> None:
    model, tok = tiny
    plain = TrajectoryDataset(RECORDS, tok, N)
    built = states(model, tok, plain, RECORDS, chunk=3, cache_dir=tmp_path, model_id="m").materialize()
    assert len(list(tmp_path.glob("states-*.json"))) == 3
    again = states(None, tok, plain, RECORDS, chunk=3, cache_dir=tmp_path, model_id="m")  # None: cannot build
    assert again.materialize() == built
    for other in (dict(model_id="another model"), dict(records=RECORDS[1:])):  # another model, another split
        recs = other.pop("records", RECORDS)
        sub = TrajectoryDataset(recs, tok, N)
        fresh = states(None, tok, sub, recs, chunk=3, cache_dir=tmp_path, **{"model_id": "m", **other})
        with pytest.raises(AttributeError):  # a cache miss: it tries to build (with no model)
            fresh[0]
    before = model_fingerprint(model)
    assert model_fingerprint(reference_model(model)) == before  # a frozen copy: the same weights
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert model_fingerprint(model) != before  # a changed checkpoint gets another key
