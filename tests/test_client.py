"""The clients against the real refiner server on 127.0.0.1 (and the in-process engine)."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys

import httpx
import pytest

from diffpo_sdk.testing import EchoEngine, free_port, serve_engine
from diffpo_sdk.client import (
    AsyncDiffPOClient,
    AsyncInProcessClient,
    DiffPOClient,
    InProcessClient,
    async_client_from_settings,
    client_from_settings,
)
from diffpo_sdk.errors import ContextLengthError, InvalidRequestError, RefinerUnavailableError
from diffpo_sdk.protocol import RefineResponse
from diffpo_sdk.settings import DiffPOSettings

ITEM = {"messages": [{"role": "user", "content": "Name a colour."}], "draft": "Blue is a colour."}


@pytest.fixture(scope="module")
def tiny_engine(tiny_llama_dir):
    from diffpo_sdk.engine import RefinerEngine

    return RefinerEngine.from_pretrained(tiny_llama_dir, device="cpu", calibrate=False)


@pytest.fixture(scope="module")
def tiny_server(tiny_engine):
    server = serve_engine(tiny_engine, max_wait_ms=1.0)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def echo_servers():
    engines = [EchoEngine(lambda it: it.draft.upper()), EchoEngine(lambda it: it.draft.upper())]
    servers = [serve_engine(e, max_wait_ms=0.0) for e in engines]
    yield servers, engines
    for s in servers:
        s.stop()


# -- settings -------------------------------------------------------------------------------


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("DIFFPO_ENDPOINT", "http://a:1/, http://b:2")
    monkeypatch.setenv("DIFFPO_BLOCK_SIZE", "32")
    monkeypatch.setenv("DIFFPO_MAX_ITERATIONS", "")
    monkeypatch.setenv("DIFFPO_API_KEY", "sekret")
    monkeypatch.setenv("DIFFPO_FAIL_OPEN", "false")
    s = DiffPOSettings()
    assert s.endpoint == ["http://a:1", "http://b:2"]
    assert s.block_size == 32 and s.max_iterations is None and s.fail_open is False
    assert s.api_key is not None and s.api_key.get_secret_value() == "sekret"
    assert "sekret" not in repr(s)
    assert s.resolved_backend() == "http"
    assert s.merged(endpoint="http://c:3", block_size="auto").endpoint == ["http://c:3"]
    assert DiffPOSettings(endpoint=[]).resolved_backend() == "in_process"
    assert isinstance(client_from_settings(DiffPOSettings(endpoint=[])), InProcessClient)


def test_block_sizes_parse_in_one_place(monkeypatch):
    from diffpo_sdk.protocol import parse_block_size

    assert [parse_block_size(v) for v in ("auto", "AUTO", " 32", "1", 16)] == ["auto", "auto", 32, 1, 16]
    for bad in ("fast", "0", "-3", "1.5"):
        with pytest.raises(ValueError, match="'auto' or an integer"):
            parse_block_size(bad)
    monkeypatch.setenv("DIFFPO_BLOCK_SIZE", "auto")
    assert DiffPOSettings().block_size == "auto"
    monkeypatch.setenv("DIFFPO_BLOCK_SIZE", "0")
    with pytest.raises(ValueError, match="block size"):
        DiffPOSettings()


def test_shared_data_is_found_in_one_place(monkeypatch, tmp_path):
    from diffpo_sdk.shared_data import ALPACA_PREFERENCES, shared_data_dir, shared_file

    monkeypatch.setenv("DIFFPO_SHARED_DATA", str(tmp_path))
    assert shared_data_dir() == tmp_path and shared_file() is None  # the folder, but not the file
    (tmp_path / ALPACA_PREFERENCES).parent.mkdir(parents=True)
    (tmp_path / ALPACA_PREFERENCES).write_bytes(b"")
    assert shared_file() == tmp_path / ALPACA_PREFERENCES


def test_generation_cuts_at_the_first_stop():
    from diffpo_sdk.generation import cut_at_stop

    assert cut_at_stop([5, 6, 2, 7, 2], {2}, keep_stop=True) == ([5, 6, 2], True)
    assert cut_at_stop([5, 6, 2, 7], {2, 9}, keep_stop=False) == ([5, 6], True)
    assert cut_at_stop([5, 6], {2}, keep_stop=False) == ([5, 6], False)


def test_no_endpoint_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("DIFFPO_ENDPOINT", raising=False)
    with pytest.raises(InvalidRequestError, match="DIFFPO_ENDPOINT"):
        DiffPOClient()


def test_import_stays_light():
    code = ("import sys, diffpo_sdk, diffpo_sdk.client, diffpo_sdk.runnable, diffpo_sdk.litellm, diffpo_sdk.agents, "
            "diffpo_sdk.chat_model, diffpo_sdk.tracing, diffpo_sdk.adapters.runnable, diffpo_sdk.apps.cli; "
            "diffpo_sdk.DiffPORefiner; "
            "bad = [m for m in ('torch', 'transformers', 'litellm') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def _package_imports() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its body (lazy imports included)."""
    import ast
    from pathlib import Path

    import diffpo_sdk

    root = Path(diffpo_sdk.__file__).parent
    graph: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(max(node.level - 1, 0)):
                    base = base.rpartition(".")[0]
                target = f"{base}.{node.module}" if node.level and node.module else (node.module or base)
                deps.add(target)
                deps.update(f"{target}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[name] = {d for d in deps if d.startswith("diffpo_sdk")}
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def test_no_import_cycles_in_the_client_and_server_layers():
    graph = _package_imports()
    mine = [m for m in graph if not m.startswith(("diffpo_sdk.engine", "diffpo_sdk.train"))
            and m != "diffpo_sdk"]  # the root re-exports lazily, by name

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [d for d in graph[start] if d != "diffpo_sdk"]
        while todo:
            m = todo.pop()
            if m == goal:
                return True
            if m not in seen:
                seen.add(m)
                todo.extend(d for d in graph.get(m, ()) if d != "diffpo_sdk")
        return False

    assert "diffpo_sdk.server.proxy" in graph["diffpo_sdk.server.app"]  # the graph sees relative imports
    assert "diffpo_sdk.adapters.runnable" in graph["diffpo_sdk.adapters.agents"]
    assert "diffpo_sdk.adapters.runnable" in graph["diffpo_sdk.apps.demo"]
    assert {"diffpo_sdk.adapters.litellm", "diffpo_sdk.apps.cli"} <= set(mine)
    cycles = [m for m in mine if reaches(m, m)]
    assert cycles == [], cycles


#: documented old import path -> the module's home now (the package is arranged by role)
MOVED = {
    "diffpo_sdk.runnable": "diffpo_sdk.adapters.runnable",
    "diffpo_sdk.chat_model": "diffpo_sdk.adapters.chat_model",
    "diffpo_sdk.agents": "diffpo_sdk.adapters.agents",
    "diffpo_sdk.litellm": "diffpo_sdk.adapters.litellm",
    "diffpo_sdk.litellm_hook": "diffpo_sdk.adapters.litellm_hook",
    "diffpo_sdk.cli": "diffpo_sdk.apps.cli",
    "diffpo_sdk.demo": "diffpo_sdk.apps.demo",
    "diffpo_sdk.local_llm": "diffpo_sdk.apps.local_llm",
}


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_import_paths_are_the_same_module(old, monkeypatch):
    import importlib

    if old == "diffpo_sdk.litellm_hook":
        pytest.importorskip("litellm")
    was, now = importlib.import_module(old), importlib.import_module(MOVED[old])
    assert was is now
    monkeypatch.setattr(was, "_patched_through_the_old_path", True, raising=False)
    assert now._patched_through_the_old_path is True


@pytest.mark.parametrize("module", ["diffpo_sdk.cli", "diffpo_sdk.apps.cli"])
def test_the_command_runs_from_the_old_and_the_new_path(module):
    out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: diffpo <command>") and "demo" in out.stdout


def test_echo_engine_meets_the_engine_contract():
    from diffpo_sdk.engine_protocol import RefinerEngineProtocol

    assert isinstance(EchoEngine(), RefinerEngineProtocol)
    events = list(EchoEngine(lambda it: it.draft.upper()).refine_stream([{"prompt": "p", "draft": "ab"}]))
    assert [(e.index, e.text) for e in events] == [(0, "AB")]


# -- against the real server ------------------------------------------------------------------


def test_refine_over_http_matches_in_process(tiny_server, tiny_engine):
    with DiffPOClient(tiny_server.url) as client:
        resp = client.refine([ITEM, {"prompt": "Say hi.", "draft": "hi"}], block_size=4, max_new_tokens=16)
    assert isinstance(resp, RefineResponse) and len(resp.items) == 2
    assert resp.timing["total_ms"] > 0
    local = InProcessClient(engine=tiny_engine).refine([ITEM, {"prompt": "Say hi.", "draft": "hi"}],
                                                        block_size=4, max_new_tokens=16)
    # same engine, same greedy fixed point: HTTP adds nothing but transport
    assert [i.text for i in resp.items] == [i.text for i in local.items]
    assert all(i.iterations >= 1 and i.new_tokens >= 1 for i in resp.items)


async def test_async_client_and_concurrency(tiny_server, tiny_engine):
    items = [{"prompt": f"question {i}", "draft": f"answer number {i}"} for i in range(6)]
    async with AsyncDiffPOClient(tiny_server.url) as client:
        resps = await asyncio.gather(*(client.refine([item], block_size=8, max_new_tokens=8) for item in items))
    # each concurrent answer is its own item's greedy answer, not a neighbour's
    want = tiny_engine.refine(items, block_size=8, max_new_tokens=8)
    assert [r.items[0].text for r in resps] == [w.text for w in want]
    assert len({w.text for w in want}) > 1  # the items are told apart


def test_in_process_backend_from_settings(tiny_llama_dir):
    settings = DiffPOSettings(endpoint=[], model=tiny_llama_dir, device="cpu")
    client = client_from_settings(settings)
    assert isinstance(client, InProcessClient)
    [out] = client.refine_or_keep([ITEM], block_size=4, max_new_tokens=8)
    assert out.refined and out.info["backend"] == "in_process" and out.info["iterations"] >= 1


async def test_async_in_process_backend(tiny_llama_dir):
    client = async_client_from_settings(DiffPOSettings(endpoint=[], model=tiny_llama_dir, device="cpu"))
    assert isinstance(client, AsyncInProcessClient)
    outs = await asyncio.gather(*(client.refine_or_keep([ITEM], max_new_tokens=8) for _ in range(3)))
    assert all(o[0].refined for o in outs)


def test_bad_input_gets_a_typed_error_and_fail_open_keeps_the_draft(tiny_server):
    long_prompt = "word " * 3000  # beyond the tiny model's 2048-token context
    item = {"prompt": long_prompt, "draft": "my draft"}
    with DiffPOClient(tiny_server.url) as client:
        with pytest.raises(ContextLengthError, match="400"):
            client.refine([item], max_new_tokens=16)
        [out] = client.refine_or_keep([item], max_new_tokens=16, fail_open=True)
        assert out.text == "my draft" and not out.refined
        assert out.info["error"].startswith("ContextLengthError")
        with pytest.raises(InvalidRequestError, match="block_size"):
            client.refine([item], block_size=0, max_new_tokens=16)  # caught before any request


def test_api_key_is_sent(tiny_engine):
    server = serve_engine(tiny_engine, api_key="k-123")
    try:
        with DiffPOClient(server.url, api_key="wrong", retries=0) as bad:
            with pytest.raises(RefinerUnavailableError, match="401") as e:
                bad.refine([ITEM], max_new_tokens=4)
            assert e.value.status_code == 401
        with DiffPOClient(server.url, api_key="k-123") as good:
            assert good.refine([ITEM], max_new_tokens=4).items
    finally:
        server.stop()


def test_spreads_over_endpoints_and_fails_over(echo_servers):
    servers, engines = echo_servers
    dead = f"http://127.0.0.1:{free_port()}"
    with DiffPOClient([dead, servers[0].url, servers[1].url], timeout=5) as client:
        before = [e.calls for e in engines]
        for i in range(20):
            [out] = client.refine_or_keep([{"prompt": "p", "draft": f"d{i}"}], fail_open=False)
            assert out.text == f"D{i}"
        spread = [e.calls - b for e, b in zip(engines, before)]
    assert sum(spread) == 20 and min(spread) >= 5, spread


def test_more_items_than_one_request_holds(echo_servers):
    servers, _ = echo_servers
    items = [{"prompt": "p", "draft": f"d{i}"} for i in range(70)]
    with DiffPOClient(servers[0].url) as client:
        resp = client.refine(items)
    assert [i.text for i in resp.items] == [f"D{i}" for i in range(70)]


def test_more_items_than_one_request_share_one_deadline():
    engine = EchoEngine(lambda it: it.draft.upper(), delay_s=0.3)
    server = serve_engine(engine, max_wait_ms=0.0)
    items = [{"prompt": "p", "draft": f"d{i}"} for i in range(130)]  # three requests, one after another
    try:
        with DiffPOClient(server.url, timeout=0.5) as client:  # one request fits, three do not
            with pytest.raises(RefinerUnavailableError):
                client.refine(items)
        with DiffPOClient(server.url, timeout=60) as client:
            assert [i.text for i in client.refine(items).items] == [f"D{i}" for i in range(130)]
    finally:
        server.stop()


def test_deadline_rule(monkeypatch):
    monkeypatch.delenv("DIFFPO_TIMEOUT", raising=False)
    s = DiffPOSettings()
    assert s.timeout is None
    # unset, the deadline grows with the answer budget: 256 tokens take ~20 s on a 2-core CPU unloaded
    assert s.call_timeout(256) >= 5 * 20 and s.call_timeout(1024) > s.call_timeout(256)
    assert s.call_timeout() == s.call_timeout(s.max_new_tokens)
    assert DiffPOSettings(timeout=7).call_timeout(4096) == 7  # set, it is the deadline
    monkeypatch.setenv("DIFFPO_TIMEOUT", "")
    assert DiffPOSettings().timeout is None


def test_traceparent_reaches_the_server(echo_servers):
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    seen: list[str] = []

    def hook(request: httpx.Request) -> None:
        seen.append(request.headers.get("traceparent", ""))

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    servers, _ = echo_servers
    with DiffPOClient(servers[0].url, http_client=httpx.Client(event_hooks={"request": [hook]})) as client:
        with tracer.start_as_current_span("caller") as span:
            client.refine([ITEM])
            trace_id = format(span.get_span_context().trace_id, "032x")
    assert re.fullmatch(rf"00-{trace_id}-[0-9a-f]{{16}}-[0-9a-f]{{2}}", seen[-1])


def test_bench_client_smoke(tmp_path, capsys):
    import json

    from diffpo_sdk.bench.client import main

    out = tmp_path / "client.json"
    assert main(["--calls", "5", "--warmup", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["layers"]) >= {"httpx POST (transport floor)", "DiffPORefiner.invoke over HTTP"}
    assert all(layer["wall"]["p50_ms"] > 0 for layer in report["layers"].values())
    assert "client CPU p50" in capsys.readouterr().out
