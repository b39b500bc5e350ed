"""The server's continuous batcher streams: each job gets its rows' verified increments pass by
pass, jobs join a running batch, and a job that stops listening leaves the batch alone."""

from __future__ import annotations

import asyncio

import pytest
from opentelemetry import trace

from diffpo_sdk.engine import RefinerEngine
from diffpo_sdk.protocol import RefineItem
from diffpo_sdk.server.batcher import Batcher
from diffpo_sdk.server.config import ServerConfig
from diffpo_sdk.server.metrics import Metrics

N = 160
KEY = (1, N, None, 0)  # block 1: one token per pass, so a job is still running when the next one arrives


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir: str) -> RefinerEngine:
    return RefinerEngine.from_pretrained(tiny_llama_dir, device="cpu", dtype="float32", calibrate=False)


ITEMS = [RefineItem(prompt=f"Tell me about the number {k}.", draft=f"The number {k} is") for k in range(3)]


async def _collect(stream, deltas: list, first: asyncio.Event | None = None) -> None:
    async for d in stream:
        deltas.append(d)
        if first is not None:
            first.set()


def _texts(deltas: list, n: int) -> list[tuple[str, list[int]]]:
    return [("".join(d.text for d in deltas if d.index == k), [t for d in deltas if d.index == k for t in d.token_ids])
            for k in range(n)]


@pytest.mark.timeout(600)
def test_jobs_join_a_running_batch_and_each_stream_adds_up(tiny):
    expected = tiny.refine(ITEMS, block_size=1, max_new_tokens=N)
    assert all(r.new_tokens > 40 for r in expected)  # long enough for a second job to join mid-way

    async def main() -> Metrics:
        metrics = Metrics()
        batcher = Batcher(tiny, ServerConfig(max_wait_ms=0), metrics, trace.get_tracer("test"))
        batcher.start()
        try:
            a, b, started = [], [], asyncio.Event()
            first = asyncio.create_task(_collect(batcher.stream(ITEMS[:1], KEY), a, started))
            await started.wait()  # job A is decoding: job B joins its batch
            await _collect(batcher.stream(ITEMS[1:], KEY), b)
            await first
            while (metrics.registry.get_sample_value("diffpo_batch_items_sum", {"model": ""}) or 0) < 3:
                await asyncio.sleep(0.01)  # the batch's own bookkeeping ends just after its last answer
        finally:
            await batcher.stop()
        assert _texts(a, 1) == [(r.text, r.token_ids) for r in expected[:1]]
        assert _texts(b, 2) == [(r.text, r.token_ids) for r in expected[1:]]
        assert [d.result.token_ids for d in a + b if d.done] == [r.token_ids for r in expected]
        assert len([d for d in a if not d.done]) > 10  # A's answer came pass by pass
        return metrics

    metrics = asyncio.run(main())
    assert metrics.registry.get_sample_value("diffpo_batch_items_count", {"model": ""}) == 1  # one batch served all three


@pytest.mark.timeout(600)
def test_a_job_that_stops_listening_leaves_the_batch_and_others_finish(tiny):
    expected = tiny.refine(ITEMS[:2], block_size=1, max_new_tokens=N)

    async def main() -> Metrics:
        metrics = Metrics()
        batcher = Batcher(tiny, ServerConfig(max_wait_ms=50), metrics, trace.get_tracer("test"))
        batcher.start()
        try:
            kept: list = []
            gone = batcher.stream(ITEMS[1:2], KEY)
            stay = asyncio.create_task(_collect(batcher.stream(ITEMS[:1], KEY), kept))
            await anext(gone)  # both rows are decoding in one batch now
            await gone.aclose()  # the listener leaves after its first increment
            await stay
        finally:
            await batcher.stop()
        assert _texts(kept, 1) == [(expected[0].text, expected[0].token_ids)]
        return metrics

    metrics = asyncio.run(main())
    decided = metrics.registry.get_sample_value("diffpo_generation_tokens_total", {"model": ""})
    # the dropped row stopped at once: far fewer tokens than its whole answer were decided for it
    assert expected[0].new_tokens <= decided < expected[0].new_tokens + expected[1].new_tokens // 2
