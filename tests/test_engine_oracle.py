"""Exactness: refined answers equal the refiner's own greedy ``generate``, token for token,
for every block size, batch size, prompt mix and draft length, on a real model and on tiny
random models of the published DiffPO checkpoints' architectures."""

from __future__ import annotations

import pytest
import torch

from diffpo_sdk.engine import RefinerEngine

from engine_oracle import ORACLE_ITEMS, greedy_reference

from diffpo_sdk.bench.speed import bundled_drafts

N = 40  # answer budget for the real-model sweep; block sizes below include N itself


@pytest.fixture(scope="module")
def smol(smollm2_path: str) -> RefinerEngine:
    torch.manual_seed(0)
    return RefinerEngine.from_pretrained(smollm2_path, device="cpu", dtype="float32", calibrate=False)


@pytest.fixture(scope="module")
def real_items() -> list[dict]:
    """20 items written for these tests (no shared data needed): the package's bundled drafts,
    drafts that disagree with the refiner in wording, order and length, multi-byte text,
    multi-turn, empty and very long drafts, in a mix of prompt lengths."""
    return [*bundled_drafts(), *ORACLE_ITEMS]


@pytest.fixture(scope="module")
def references(smol: RefinerEngine, real_items: list[dict]) -> list[list[int]]:
    return [greedy_reference(smol, item, N) for item in real_items]


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("block_size", [1, 7, 32, N])
@pytest.mark.parametrize("batch", [1, 4])
def test_real_model_equals_greedy(smol, real_items, references, block_size, batch):
    results = []
    for start in range(0, len(real_items), batch):
        results += smol.refine(real_items[start : start + batch], block_size=block_size, max_new_tokens=N)
    for n, (res, ref) in enumerate(zip(results, references)):
        assert res.token_ids == ref, f"item {n}, block {block_size}, batch {batch}"
        assert res.converged
        assert res.text == smol.tokenizer.decode(ref, skip_special_tokens=True)
        assert 1 <= res.iterations <= res.new_tokens


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the first test to use `references` pays for 20 greedy runs
def test_adaptive_mode_equals_greedy_in_one_mixed_batch(smol, real_items, references):
    results = smol.refine(real_items, max_new_tokens=N)  # block_size="auto", all 20 in one batch
    assert [r.token_ids for r in results] == references


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_adaptive_mode_with_rows_joining_mid_batch_equals_greedy(smol, real_items, references):
    """Continuous batching on the real model: 16 items join a running batch two at a time."""
    waiting = list(real_items[4:])
    got = {}
    smol.refine(real_items[:4], max_new_tokens=N, on_result=got.__setitem__,
                more=lambda n: [waiting.pop(0) for _ in range(min(n, 2, len(waiting)))])
    assert not waiting
    assert [got[i].token_ids for i in range(len(real_items))] == references


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_fixed_point_drafts_are_verified_in_a_few_passes(smol, real_items, references):
    """The refiner's own answer as a draft is verified at once when its text tokenizes back to
    the same ids; where it does not (decode/encode is not a round trip), the first miss
    teaches the row the refiner's tokenization and re-aligns the rest of the draft."""
    from diffpo_sdk.engine.templating import draft_ids

    drafts = [{"prompt": it.get("prompt"), "messages": it.get("messages"), "draft": smol.tokenizer.decode(ref)}
              for it, ref in zip(real_items, references)]
    drafts = [{k: v for k, v in d.items() if v is not None} for d in drafts]
    results = smol.refine(drafts, block_size=N, max_new_tokens=N)
    assert [r.token_ids for r in results] == references
    round_trips = [draft_ids(smol.tokenizer, d["draft"]) == ref for d, ref in zip(drafts, references)]
    assert any(round_trips)
    for res, exact in zip(results, round_trips):
        assert res.iterations <= (1 if exact else 3)
    assert sum(r.iterations for r in results) <= 0.25 * sum(r.new_tokens for r in results)


@pytest.mark.slow
def test_kept_draft_prefix_is_fixed_and_rest_is_greedy(smol, real_items):
    from diffpo_sdk.engine.templating import draft_ids

    item = real_items[10]
    ref = greedy_reference(smol, item, N, keep_draft_prefix=5)
    (res,) = smol.refine([item], block_size=8, max_new_tokens=N, keep_draft_prefix=5)
    assert res.token_ids == ref
    kept = draft_ids(smol.tokenizer, item["draft"])[:5]
    assert len(kept) == 5 and res.token_ids[:5] == kept  # the kept tokens open the answer unchanged
    assert res.new_tokens == len(ref) - 5 + int(res.finish_reason == "stop")  # only the rest is decoded


@pytest.mark.slow
def test_iteration_cap_marks_unconverged_and_streaming_sees_every_token(smol, real_items):
    streamed: dict[int, list[int]] = {}
    results = smol.refine(
        real_items[:2], block_size=16, max_new_tokens=N, max_iterations=1,
        on_tokens=lambda i, toks: streamed.setdefault(i, []).extend(toks),
    )
    for i, res in enumerate(results):
        assert res.iterations <= -(-N // 16) + 1  # one pass per block, plus at most the stop
        stop_trimmed = [t for t in streamed[i] if t not in smol.stop_ids]
        assert stop_trimmed == res.token_ids
    assert not all(r.converged for r in results)  # real drafts from other models are not fixed points


# -- tiny random models of the published checkpoints' architectures ---------------------------


def _tiny(arch: str, tokenizer_dir: str, tmp_path) -> RefinerEngine:
    from transformers import AutoTokenizer, Gemma2Config, LlamaConfig, Qwen2Config

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    common = dict(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        initializer_range=0.3,
    )
    if arch == "gemma2":  # DiffPO-2B/9B: alternating sliding-window layers, logit soft-capping
        cfg = Gemma2Config(**common, head_dim=16, sliding_window=12, query_pre_attn_scalar=16,
                           attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    elif arch == "llama3":  # DiffPO-8B: Llama-3 rope scaling, GQA, untied head
        cfg = LlamaConfig(**common, rope_theta=500000.0, tie_word_embeddings=False,
                          rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 256})
    else:
        cfg = Qwen2Config(**common)
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(cfg)
    out = tmp_path / arch
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return RefinerEngine.from_pretrained(str(out), device="cpu", dtype="float32", calibrate=False)


@pytest.mark.parametrize("arch", ["gemma2", "llama3", "qwen2"])
def test_tiny_architectures_equal_greedy(arch, smollm2_path, tmp_path):
    engine = _tiny(arch, smollm2_path, tmp_path)
    n = 48  # with ~40 prompt tokens this runs well past Gemma-2's 12-token sliding window
    items = [
        ORACLE_ITEMS[0],
        {"prompt": "Hi", "draft": ""},
        {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
                      {"role": "user", "content": ORACLE_ITEMS[1]["prompt"]}],
         "draft": ORACLE_ITEMS[1]["draft"][:80]},
    ]
    refs = [greedy_reference(engine, it, n) for it in items]
    assert len(set(map(tuple, refs))) == 3  # the random model does not collapse to one output
    for block in (1, 5, 16, n, "auto"):
        got = [r.token_ids for r in engine.refine(items, block_size=block, max_new_tokens=n)]
        assert got == refs, f"{arch}: block {block}"


# -- an iteration cap means what the paper means ------------------------------------------------


def plain_capped_jacobi(engine: RefinerEngine, item: dict, n: int, block: int, cap: int) -> list[int]:
    """The paper's blockwise Jacobi written from its definition: no cache, the whole sequence
    re-run every iteration, every position of the block replaced at once, at most ``cap``
    iterations per block, and a block cut short outputs its latest iterate."""
    from diffpo_sdk.protocol import RefineItem

    prompt, _, draft = engine.encode(RefineItem.model_validate(item))
    init = engine.initial_guess(draft, n)  # the draft cut or padded to n (stop token after it)
    out: list[int] = []
    for s in range(0, n, block):
        y = init[s : min(s + block, n)]
        for _ in range(cap):
            ctx = prompt + out
            logits = engine.model(input_ids=torch.tensor([ctx + y])).logits[0]
            new = logits[len(ctx) - 1 : len(ctx) - 1 + len(y)].argmax(-1).tolist()
            if new == y:
                break
            y = new
        out += y
        stops = [k for k, t in enumerate(out) if t in engine.stop_ids]
        if stops:
            return out[: stops[0]]
    return out


@torch.inference_mode()
@pytest.mark.parametrize("block, cap", [(4, 1), (8, 2), (16, 3)])
def test_capped_blocks_output_the_latest_jacobi_iterate(tiny_llama_dir, block, cap):
    engine = RefinerEngine.from_pretrained(tiny_llama_dir, device="cpu", dtype="float32", calibrate=False)
    n = 24
    items = [ORACLE_ITEMS[0], ORACLE_ITEMS[2], {"prompt": "Hi", "draft": ""}]
    refs = [plain_capped_jacobi(engine, it, n, block, cap) for it in items]
    assert refs != [greedy_reference(engine, it, n) for it in items]  # the cap does cut blocks short here
    got = engine.refine(items, block_size=block, max_new_tokens=n, max_iterations=cap)  # batched
    assert [r.token_ids for r in got] == refs
    alone = [engine.refine([it], block_size=block, max_new_tokens=n, max_iterations=cap)[0] for it in items]
    assert [r.token_ids for r in alone] == refs
    assert any(not r.converged for r in got)


@torch.inference_mode()
@pytest.mark.slow
def test_capped_blocks_output_the_latest_jacobi_iterate_on_smollm2(smol):
    items = [ORACLE_ITEMS[4], ORACLE_ITEMS[5]]
    for block, cap in [(8, 1), (16, 2)]:
        refs = [plain_capped_jacobi(smol, it, 32, block, cap) for it in items]
        assert [r.token_ids for r in smol.refine(items, block_size=block, max_new_tokens=32, max_iterations=cap)] == refs
    # adaptive mode under a cap iterates blocks of 32, as block_size=32 does
    refs = [plain_capped_jacobi(smol, it, 32, 32, 2) for it in items]
    assert [r.token_ids for r in smol.refine(items, max_new_tokens=32, max_iterations=2)] == refs
