"""Streaming end to end over HTTP: ``POST /v1/refine`` with ``"stream": true`` and the client core's
``stream`` (HTTP and in-process, sync and async), on real models and a real server on 127.0.0.1.

What streams out adds up to the non-streamed answer byte for byte (block sizes 1, 16, auto;
batched rows; rows joining a running batch; multi-byte text); a client that hangs up frees its
row while the others go on; a refiner that dies mid-stream still leaves the user a whole answer.
"""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest

from diffpo_sdk.client import AsyncDiffPOClient, AsyncInProcessClient, DiffPOClient, InProcessClient, draft_rest
from diffpo_sdk.engine import RefinerEngine
from diffpo_sdk.testing import serve_engine

N = 24
ITEMS = [
    # SmolLM2 answers this in Japanese: most characters span two or three byte-level tokens
    {"prompt": "Write 'thank you' in Japanese, Chinese and Korean, in their own scripts.", "draft": ""},
    {"prompt": "Translate 'good morning, how are you?' into French, Spanish and Japanese.",
     "draft": "French: Bonjour, comment ça va ?"},
    {"prompt": "Reply with three emoji that describe summer.", "draft": "☀️🏖️🍦"},
]
LONG = 160  # block 1 on the tiny model: a row is still decoding when the next request arrives
COUNTING = [{"prompt": f"Count from {k} to 500, one number per line.", "draft": f"{k}\n{k + 1}\n"} for k in (1, 7)]


@pytest.fixture(scope="module")
def smol(smollm2_path: str) -> RefinerEngine:
    return RefinerEngine.from_pretrained(smollm2_path, device="cpu", dtype="float32", calibrate=False)


@pytest.fixture(scope="module")
def smol_server(smol):
    server = serve_engine(smol, max_wait_ms=0)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir: str) -> RefinerEngine:
    return RefinerEngine.from_pretrained(tiny_llama_dir, device="cpu", dtype="float32", calibrate=False)


def read_events(lines) -> list[tuple[str, dict]]:
    """Parse an SSE body into (event, data) pairs (the schema of docs/serving.md)."""
    events, name, data = [], "message", []
    for line in lines:
        if line.startswith("event:"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            data.append(line.split(":", 1)[1].strip())
        elif not line and data:
            events.append((name, json.loads("\n".join(data))))
            name, data = "message", []
    return events


def joined(events: list[tuple[str, dict]], n: int) -> list[str]:
    return ["".join(d["text"] for e, d in events if e == "delta" and d["index"] == k) for k in range(n)]


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.timeout(900)
@pytest.mark.parametrize("block", [1, 16, "auto"])
def test_sse_stream_equals_the_refined_answer_byte_for_byte(smol, smol_server, block):
    body = {"items": ITEMS, "block_size": block, "max_new_tokens": N}
    plain = httpx.post(smol_server.url + "/v1/refine", json=body, timeout=600).json()["items"]
    with httpx.stream("POST", smol_server.url + "/v1/refine", json={**body, "stream": True}, timeout=600) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-accel-buffering"] == "no"
        events = read_events(r.iter_lines())
    assert [e for e, _ in events][-1] == "done" and events[-1][1]["ok"] is True
    assert joined(events, 3) == [it["text"] for it in plain]
    assert any(ord(c) > 0x2FFF for c in plain[0]["text"])  # multi-byte characters did stream
    for k in range(3):  # never half a character; only an item's last delta may end in one (the budget cut it)
        mine = [d["text"] for e, d in events if e == "delta" and d["index"] == k]
        assert all("\ufffd" not in text for text in mine[:-1])
    items = {d["index"]: d["item"] for e, d in events if e == "item"}
    # the same answer, stats and finish reasons ("auto" adapts its block widths as it measures, so
    # two runs of one request can take a different number of passes to the same answer)
    varies = {"iterations"} if block == "auto" else set()
    assert [{k: v for k, v in items[i].items() if k not in varies} for i in range(3)] == \
        [{k: v for k, v in it.items() if k not in varies} for it in plain]
    if block == 1:
        assert sum(e == "delta" for e, _ in events) > 10  # pass by pass, not at the end


@pytest.mark.timeout(900)
def test_the_client_core_streams_the_same_over_both_transports_sync_and_async(smol, smol_server):
    opts = {"block_size": 16, "max_new_tokens": N}
    expected = [r.text for r in smol.refine(ITEMS, **opts)]
    with DiffPOClient(smol_server.url, timeout=600) as client:
        assert pieces_text(client.stream(ITEMS, **opts), 3) == expected
    assert pieces_text(InProcessClient(engine=smol).stream(ITEMS, **opts), 3) == expected

    async def both() -> list[list[str]]:
        async with AsyncDiffPOClient(smol_server.url, timeout=600) as c:
            http = [p async for p in c.stream(ITEMS, **opts)]
        local = [p async for p in AsyncInProcessClient(engine=smol).stream(ITEMS, **opts)]
        return [pieces_text(http, 3), pieces_text(local, 3)]

    assert asyncio.run(both()) == [expected, expected]


def pieces_text(pieces, n: int) -> list[str]:
    pieces = list(pieces)
    texts = ["".join(p.text for p in pieces if p.index == k) for k in range(n)]
    outcomes = {p.index: p.outcome for p in pieces if p.outcome is not None}
    assert [outcomes[k].text for k in range(n)] == texts  # the outcome is exactly what streamed
    assert all(outcomes[k].refined for k in range(n))
    return texts


@pytest.mark.timeout(900)
def test_a_row_joining_a_running_batch_streams_its_own_answer(tiny):
    expected = [r.text for r in tiny.refine(COUNTING, block_size=1, max_new_tokens=LONG)]
    server = serve_engine(tiny, max_wait_ms=0)
    try:
        body = {"block_size": 1, "max_new_tokens": LONG, "stream": True}
        out: dict[int, list] = {}
        first = threading.Event()

        def run(k: int) -> None:
            with httpx.stream("POST", server.url + "/v1/refine", json={**body, "items": [COUNTING[k]]},
                              timeout=600) as r:
                lines = []
                for line in r.iter_lines():
                    lines.append(line)
                    first.set()
                out[k] = read_events(lines)

        a = threading.Thread(target=run, args=(0,))
        a.start()
        assert first.wait(300)  # A is decoding: B arrives and joins its batch
        run(1)
        a.join()
        assert [joined(out[k], 1)[0] for k in (0, 1)] == expected
        while metric(server.url, "diffpo_batch_items_count") < 1:
            threading.Event().wait(0.01)  # the batch's bookkeeping ends just after its last answer
        assert metric(server.url, "diffpo_batch_requests_sum") == 2  # one batch served both requests
        assert metric(server.url, "diffpo_batch_items_count") == 1
    finally:
        server.stop()


@pytest.mark.timeout(900)
def test_a_client_that_hangs_up_frees_its_row_and_the_others_go_on(tiny):
    expected = tiny.refine(COUNTING, block_size=1, max_new_tokens=LONG)
    server = serve_engine(tiny, max_wait_ms=200)
    try:
        body = {"block_size": 1, "max_new_tokens": LONG, "stream": True}
        started, kept = threading.Event(), []

        def stay() -> None:
            with httpx.stream("POST", server.url + "/v1/refine", json={**body, "items": [COUNTING[0]]},
                              timeout=600) as r:
                lines = []
                for line in r.iter_lines():
                    lines.append(line)
                    started.set()
                kept.extend(read_events(lines))

        staying = threading.Thread(target=stay)
        staying.start()
        with httpx.stream("POST", server.url + "/v1/refine", json={**body, "items": [COUNTING[1]]},
                          timeout=600) as gone:
            assert next(gone.iter_lines()).startswith("event: delta")
            assert started.wait(300)  # both rows are decoding in one batch
        # the connection is closed here, mid-answer
        staying.join()
        assert joined(kept, 1) == [expected[0].text]
        assert kept[-1] == ("done", kept[-1][1]) and kept[-1][1]["ok"]
        while metric(server.url, "diffpo_batch_items_count") < 1:
            threading.Event().wait(0.01)
        decided = metric(server.url, "diffpo_generation_tokens_total")
        # the dropped row stopped soon after the hang-up: far fewer tokens than its whole answer
        assert expected[0].new_tokens <= decided < expected[0].new_tokens + expected[1].new_tokens // 2
        assert metric(server.url, "diffpo_batch_requests_sum") == 2
    finally:
        server.stop()


def test_draft_rest_continues_the_draft_without_cutting_words():
    assert draft_rest("The sky is", "The sky is blue today.") == " blue today."
    assert draft_rest("A sky", "The sky is blue.") == " is blue."  # offset 5 is inside "sky": next space
    assert draft_rest("", "whole draft") == "whole draft"
    assert draft_rest("longer than the draft", "short") == ""


class HoldAfterFirstPass:
    """The real engine, held after its first verified tokens went out until ``gate`` is set."""

    def __init__(self, engine: RefinerEngine) -> None:
        self.engine, self.gate = engine, threading.Event()

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    def refine(self, items, on_tokens=None, **kw):
        def tokens(i, ids):
            on_tokens(i, ids)
            self.gate.wait(120)

        return self.engine.refine(items, on_tokens=None if on_tokens is None else tokens, **kw)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_refiner_killed_mid_stream_still_leaves_a_whole_answer(tiny, flavour):
    draft = " ".join(f"Sentence number {k} of a long draft answer." for k in range(40))
    item = {"prompt": "Write a long answer.", "draft": draft}
    held = HoldAfterFirstPass(tiny)  # the answer cannot finish before the server is gone
    server = serve_engine(held)
    stopping: list[threading.Thread] = []

    def kill() -> None:  # stop the server (its port closes) while the stream is open
        stopping.append(threading.Thread(target=server.stop))
        stopping[0].start()

    opts = {"block_size": 1, "max_new_tokens": LONG}
    try:
        if flavour == "sync":
            pieces = []
            with DiffPOClient(server.url, timeout=600, retries=0) as client:
                for piece in client.stream([item], **opts):
                    pieces.append(piece)
                    if len(pieces) == 1:
                        kill()
        else:
            async def run() -> list:
                out = []
                async with AsyncDiffPOClient(server.url, timeout=600, retries=0) as client:
                    async for piece in client.stream([item], **opts):
                        out.append(piece)
                        if len(out) == 1:
                            kill()
                return out

            pieces = asyncio.run(run())
    finally:
        for t in stopping:
            t.join()
        held.gate.set()
        server.stop()
    outcome = pieces[-1].outcome
    assert outcome is not None and not outcome.refined and outcome.info["reason"] == "refiner_failed"
    streamed = "".join(p.text for p in pieces[:-1])
    assert streamed and outcome.info["streamed_chars"] == len(streamed)  # refined text did stream first
    assert outcome.text == streamed + pieces[-1].text == streamed + draft_rest(streamed, draft)
    assert pieces[-1].text and draft.endswith(pieces[-1].text)  # the answer goes on to the draft's end
