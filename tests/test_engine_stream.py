"""``RefinerEngine.refine_stream`` on the real SmolLM2: what streams out adds up to what
``refine`` returns, byte for byte, and no delta ever holds half a character."""

from __future__ import annotations

import pytest

from diffpo_sdk.engine import RefinerEngine
from diffpo_sdk.engine.streaming import IncrementalDecoder

N = 24
ITEMS = [
    # SmolLM2 answers this in Japanese: most characters span two or three byte-level tokens
    {"prompt": "Write 'thank you' in Japanese, Chinese and Korean, in their own scripts.", "draft": ""},
    {"prompt": "Translate 'good morning, how are you?' into French, Spanish and Japanese.",
     "draft": "French: Bonjour, comment ça va ?"},
    {"prompt": "Reply with three emoji that describe summer.", "draft": "☀️🏖️🍦"},
]


@pytest.fixture(scope="module")
def smol(smollm2_path: str) -> RefinerEngine:
    return RefinerEngine.from_pretrained(smollm2_path, device="cpu", dtype="float32", calibrate=False)


def _joined(deltas, i):
    mine = [d for d in deltas if d.index == i]
    return mine, "".join(d.text for d in mine), [t for d in mine for t in d.token_ids]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("block", [1, 16, "auto"])
def test_stream_adds_up_to_the_refined_answer_byte_for_byte(smol, block):
    expected = smol.refine(ITEMS, block_size=block, max_new_tokens=N)  # the three rows batched
    deltas = list(smol.refine_stream(ITEMS, block_size=block, max_new_tokens=N))
    split_chars = 0
    for i, res in enumerate(expected):
        mine, text, ids = _joined(deltas, i)
        assert text.encode() == res.text.encode() and ids == res.token_ids
        assert mine[-1].done and mine[-1].result.token_ids == res.token_ids and not any(d.done for d in mine[:-1])
        # never half a character; only the last delta may hold one, where the budget cut the answer mid-character
        assert all("\ufffd" not in d.text for d in mine[:-1])
        split_chars += sum("\ufffd" in smol.tokenizer.decode([t]) for t in ids)
    assert split_chars > 0  # characters did span several tokens, so a split one was held back
    if block == 1:  # one token per pass: the answer really came out in pieces
        assert len(_joined(deltas, 0)[0]) > N // 2


@pytest.mark.timeout(600)
def test_kept_prefix_streams_first_and_closing_early_cancels(smol):
    item = ITEMS[1]
    (res,) = smol.refine([item], block_size=4, max_new_tokens=N, keep_draft_prefix=3)
    deltas = list(smol.refine_stream([item], block_size=4, max_new_tokens=N, keep_draft_prefix=3))
    assert deltas[0].token_ids[:3] == res.token_ids[:3]
    assert "".join(d.text for d in deltas) == res.text
    stream = smol.refine_stream([item], block_size=1, max_new_tokens=N)
    first = next(stream)
    assert first.token_ids and not first.done
    stream.close()  # cancels the row and joins the worker: the engine is free again at once
    assert smol._lock.acquire(timeout=0)
    smol._lock.release()


def test_incremental_decoder_holds_back_half_characters(smollm2_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    text = "Grüße, 東京 🍦 and ça va"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    dec = IncrementalDecoder(tok)
    pieces = [dec.step([t]) for t in ids]
    assert "".join(pieces) + dec.finish(text) == text and dec.finish(text) == ""
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces  # some token ended mid-character and its text waited for the next one
