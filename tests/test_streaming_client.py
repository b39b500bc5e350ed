"""The client core's ``stream`` around the transport (a real server on 127.0.0.1 with the model-free
``EchoEngine``): one span per call that records the answer and never becomes the caller's current
span between pieces; more than 64 items in parts under one call; drafts with no prompt come back
whole; strict mode raises where fail-open keeps the draft."""

from __future__ import annotations

import asyncio

import pytest
from opentelemetry import trace

from diffpo_sdk.client import AsyncDiffPOClient, DiffPOClient
from diffpo_sdk.errors import RefinerUnavailableError
from diffpo_sdk.testing import EchoEngine, free_port, serve_engine


@pytest.fixture(scope="module")
def echo():
    server = serve_engine(EchoEngine(lambda it: f"<{it.draft.upper()}>"), max_wait_ms=0)
    yield server.url
    server.stop()


def _by_item(pieces, n):
    return ["".join(p.text for p in pieces if p.index == k) for k in range(n)]


def test_one_span_per_call_never_current_between_pieces(echo, recording_tracer):
    _, spans = recording_tracer
    spans.clear()
    seen = []
    with DiffPOClient(echo) as client:
        for piece in client.stream([{"prompt": "p", "draft": "a"}, {"prompt": "p", "draft": "b"}]):
            seen.append((piece, trace.get_current_span().get_span_context().span_id))

    async def run() -> list:
        out = []
        async with AsyncDiffPOClient(echo) as client:
            async for piece in client.stream([{"prompt": "p", "draft": "c"}]):
                out.append((piece, trace.get_current_span().get_span_context().span_id))
        return out

    seen += asyncio.run(run())
    calls = [s for s in spans.get_finished_spans() if s.name.startswith("chat ")]
    assert len(calls) == 2 and all(s.attributes["diffpo.refined"] for s in calls)
    assert {sid for _, sid in seen} == {0}  # the caller's code never ran inside the call's span
    assert _by_item([p for p, _ in seen][:-2], 2) == ["<A>", "<B>"]


def test_more_than_64_items_stream_in_parts_under_one_call(echo):
    items = [{"prompt": "p", "draft": f"d{k}"} for k in range(70)] + [{"prompt": "", "draft": "no prompt"}]
    with DiffPOClient(echo) as client:
        pieces = list(client.stream(items))
    assert _by_item(pieces, 71) == [f"<D{k}>" for k in range(70)] + ["no prompt"]
    outcomes = {p.index: p.outcome for p in pieces if p.outcome is not None}
    assert sorted(outcomes) == list(range(71)) and outcomes[70].info["reason"] == "no_prompt"
    assert all(outcomes[k].refined for k in range(70))


def test_strict_mode_raises_where_fail_open_keeps_the_draft():
    dead = f"http://127.0.0.1:{free_port()}"
    with DiffPOClient(dead, timeout=0.5) as client:
        kept = list(client.stream([{"prompt": "p", "draft": "the draft"}]))
        assert [p.text for p in kept] == ["the draft"] and kept[-1].outcome.info["reason"] == "refiner_failed"
        with pytest.raises(RefinerUnavailableError):
            list(client.stream([{"prompt": "p", "draft": "the draft"}], fail_open=False))
