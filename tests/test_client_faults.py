"""Fault tests: real HTTP servers on 127.0.0.1 that refuse, stall, 503 or die mid-request.

The property under test is the design's promise: the user's draft is never lost. Each
call returns either its own refined answer or its own draft marked unrefined.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from langchain_core.messages import AIMessage

from diffpo_sdk.testing import ServerThread, free_port
from diffpo_sdk.client import AsyncDiffPOClient, DiffPOClient
from diffpo_sdk.errors import InvalidRequestError, RefinerUnavailableError
from diffpo_sdk.adapters.runnable import DiffPORefiner


@dataclass
class Faults:
    p_503: float = 0.0
    retry_after: str | None = None
    p_slow: float = 0.0
    slow_s: float = 0.0
    status: int = 200  # forced status for every request when not 200
    fail_first: int = 0  # this many requests get 503 before any succeeds
    hits: int = 0
    slow_hits: int = 0
    answered: int = 0


def fault_app(f: Faults) -> FastAPI:
    """Speaks the refiner protocol (answer = the draft upper-cased) and misbehaves on demand."""
    app = FastAPI()
    rng = random.Random(0)

    @app.post("/v1/refine")
    async def refine(request: Request):
        f.hits += 1
        body = await request.json()
        headers = {"Retry-After": f.retry_after} if f.retry_after is not None else None
        if f.status != 200:
            return JSONResponse({"error": {"type": "bad", "message": "no"}}, status_code=f.status, headers=headers)
        if f.hits <= f.fail_first or rng.random() < f.p_503:
            return JSONResponse({"error": {"type": "overloaded", "message": "busy"}}, status_code=503, headers=headers)
        if rng.random() < f.p_slow:
            f.slow_hits += 1
            await asyncio.sleep(f.slow_s)
        f.answered += 1
        items = [{"text": it["draft"].upper(), "iterations": 1, "new_tokens": 1, "converged": True}
                 for it in body["items"]]
        return {"items": items, "model": "fault", "timing": {"total_ms": 0.1}}

    return app


@pytest.fixture
def faults():
    f = Faults()
    server = ServerThread(fault_app(f)).start()
    yield f, server.url
    server.stop()


def ask(draft: str) -> dict:
    """A draft with its prompt (a draft without one is never sent to the refiner)."""
    return {"prompt": "Say something.", "draft": AIMessage(content=draft)}


def _check_none_lost(drafts: list[str], outputs: list[AIMessage]) -> tuple[int, int]:
    """Every output is its own draft, refined or kept and marked. Returns (refined, kept)."""
    refined = kept = 0
    for draft, out in zip(drafts, outputs, strict=True):
        meta = out.response_metadata["diffpo"]
        if meta["refined"]:
            assert out.content == draft.upper()
            refined += 1
        else:
            assert out.content == draft and meta["error"]
            kept += 1
    return refined, kept


# -- retry policy ----------------------------------------------------------------------------


def test_retry_after_is_honoured(faults):
    f, url = faults
    f.fail_first, f.retry_after = 1, "0.3"
    t0 = time.monotonic()
    with DiffPOClient(url, timeout=5) as client:
        assert client.refine([{"prompt": "p", "draft": "x"}]).items[0].text == "X"
    assert time.monotonic() - t0 >= 0.3 and f.hits == 2


def test_retry_after_beyond_the_deadline_gives_up_at_once(faults, recording_tracer):
    f, url = faults
    f.p_503, f.retry_after = 1.0, "30"
    _, spans = recording_tracer
    spans.clear()
    with DiffPOClient(url, timeout=2) as client, pytest.raises(RefinerUnavailableError) as e:
        client.refine([{"prompt": "p", "draft": "x"}])
    [span] = [s for s in spans.get_finished_spans() if s.name.startswith("chat ")]
    # no retry was scheduled (a retry event comes before every wait): it gave up without waiting
    assert [ev.name for ev in span.events if ev.name == "diffpo.retry"] == [] and f.hits == 1
    assert e.value.status_code == 503 and e.value.retry_after == pytest.approx(30)


def test_only_transient_errors_are_retried(faults):
    f, url = faults
    f.status = 400
    with DiffPOClient(url) as client, pytest.raises(InvalidRequestError):
        client.refine([{"prompt": "p", "draft": "x"}])
    assert f.hits == 1
    f.status, f.hits = 503, 0
    with DiffPOClient(url, retries=2, timeout=10) as client, pytest.raises(RefinerUnavailableError, match="3 attempt"):
        client.refine([{"prompt": "p", "draft": "x"}])
    assert f.hits == 3
    f.status, f.hits = 408, 0
    with DiffPOClient(url, retries=1, timeout=10) as client, pytest.raises(RefinerUnavailableError):
        client.refine([{"prompt": "p", "draft": "x"}])
    assert f.hits == 2


def test_overall_deadline_bounds_a_stalled_server(faults):
    f, url = faults
    f.p_slow, f.slow_s = 1.0, 60.0
    with DiffPOClient(url, timeout=0.5) as client, pytest.raises(RefinerUnavailableError, match="timed out"):
        client.refine([{"prompt": "p", "draft": "x"}])
    assert f.hits >= 1 and f.answered == 0  # the call ended while the server still stalled


# -- 0 drafts lost -----------------------------------------------------------------------------


async def test_503_storm_loses_no_draft(faults):
    f, url = faults
    f.p_503, f.retry_after = 0.5, "0"
    refiner = DiffPORefiner(endpoint=url, timeout=5, retries=3)
    drafts = [f"draft {i}" for i in range(300)]
    sem = asyncio.Semaphore(30)  # a storm of errors, not a load test of two shared CPU cores

    async def one(d: str) -> AIMessage:
        async with sem:
            return await refiner.ainvoke(ask(d))

    outputs = await asyncio.gather(*(one(d) for d in drafts))
    refined, kept = _check_none_lost(drafts, outputs)
    assert refined + kept == 300 and refined > 250, (refined, kept)  # P(4 x 503) = 1/16


async def test_slow_responses_lose_no_draft(faults):
    f, url = faults
    f.p_slow, f.slow_s = 0.2, 60.0  # a fifth of the requests stall past any deadline
    refiner = DiffPORefiner(endpoint=url, timeout=5)
    drafts = [f"draft {i}" for i in range(200)]
    sem = asyncio.Semaphore(50)

    async def one(d: str) -> AIMessage:
        async with sem:
            return await refiner.ainvoke(ask(d))

    outputs = await asyncio.gather(*(one(d) for d in drafts))
    refined, kept = _check_none_lost(drafts, outputs)
    assert kept == f.slow_hits > 0 and refined == 200 - kept, (refined, kept, f.slow_hits)
    assert all("timed out" in o.response_metadata["diffpo"]["error"] for o in outputs
               if not o.response_metadata["diffpo"]["refined"])


def test_refused_connections_lose_no_draft():
    dead = f"http://127.0.0.1:{free_port()}"
    refiner = DiffPORefiner(endpoint=dead, timeout=0.5)
    drafts = [f"draft {i}" for i in range(200)]
    outputs = refiner.batch([ask(d) for d in drafts[:100]])
    outputs += [refiner.invoke(ask(d)) for d in drafts[100:]]
    assert _check_none_lost(drafts, outputs) == (0, 200)
    assert "ConnectError" in outputs[0].response_metadata["diffpo"]["error"]
    assert refiner.invoke({"prompt": "q", "draft": "plain text"}) == "plain text"
    with pytest.raises(RefinerUnavailableError):
        DiffPORefiner(endpoint=dead, timeout=0.5, fail_open=False).invoke({"prompt": "q", "draft": "plain text"})


SERVER_SCRIPT = textwrap.dedent("""
    import asyncio, sys
    import uvicorn
    from fastapi import FastAPI, Request

    app = FastAPI()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.post("/v1/refine")
    async def refine(request: Request):
        body = await request.json()
        print("in flight", flush=True)  # the test waits for this line, not for a guessed time
        await asyncio.sleep(float(sys.argv[2]))
        items = [{"text": it["draft"].upper(), "iterations": 1, "new_tokens": 1, "converged": True}
                 for it in body["items"]]
        return {"items": items, "model": "doomed", "timing": {}}

    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
""")


def _start_doomed(tmp_path, delay_s: float) -> tuple[subprocess.Popen, str]:
    script = tmp_path / "doomed_server.py"
    script.write_text(SERVER_SCRIPT)
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(script), str(port), str(delay_s)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=0.5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the doomed server did not start")


async def test_server_killed_mid_request_loses_no_draft(tmp_path, faults):
    _, backup = faults
    proc, doomed = _start_doomed(tmp_path, delay_s=0.5)
    try:
        drafts = [f"draft {i}" for i in range(120)]
        alone = DiffPORefiner(endpoint=doomed, timeout=3)
        paired = DiffPORefiner(endpoint=[doomed, backup], timeout=5)
        tasks = [asyncio.create_task(alone.ainvoke(ask(d))) for d in drafts[:60]]
        tasks += [asyncio.create_task(paired.ainvoke(ask(d))) for d in drafts[60:]]
        assert (await asyncio.to_thread(proc.stdout.readline)).strip() == "in flight"
        os.kill(proc.pid, signal.SIGKILL)
        outputs = await asyncio.gather(*tasks)
    finally:
        proc.kill()
        proc.wait()
    refined_alone, kept_alone = _check_none_lost(drafts[:60], outputs[:60])
    refined_paired, kept_paired = _check_none_lost(drafts[60:], outputs[60:])
    assert kept_alone > 0  # in flight when it died, nowhere else to go
    assert kept_paired == 0 and refined_paired == 60  # failed over to the backup


async def test_async_client_failover_after_refusal(faults):
    _, url = faults
    dead = f"http://127.0.0.1:{free_port()}"
    async with AsyncDiffPOClient([dead, url], timeout=5) as client:
        for i in range(10):
            resp = await client.refine([{"prompt": "p", "draft": f"d{i}"}])
            assert resp.items[0].text == f"D{i}"
