"""``diffpo_sdk.completion(stream=True)`` and ``ChatDiffPO.stream`` stream the refined answer as the
refiner verifies it (a real tiny model behind a real server, a local OpenAI-compatible upstream):
several text chunks, adding up to the non-streamed answer, the stats once on the last."""

from __future__ import annotations

import asyncio

import litellm
import pytest
from test_litellm import MSGS, upstream_app

import diffpo_sdk
from diffpo_sdk.adapters.chat_model import ChatDiffPO
from diffpo_sdk.engine import RefinerEngine
from diffpo_sdk.settings import DiffPOSettings
from diffpo_sdk.testing import ServerThread, serve_engine

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def setup(tiny_llama_dir: str):
    engine = RefinerEngine.from_pretrained(tiny_llama_dir, device="cpu", dtype="float32", calibrate=False)
    refiner = serve_engine(engine)
    upstream = ServerThread(upstream_app([])).start()
    yield {"model": "openai/fake", "api_base": upstream.url + "/v1", "api_key": "sk-test",
           "refiner_endpoint": refiner.url, "block_size": 1,
           "refiner_settings": DiffPOSettings(max_new_tokens=40, timeout=300)}
    refiner.stop()
    upstream.stop()


def _texts(chunks) -> list[str]:
    return [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]


def test_completion_streams_refined_chunks_as_they_are_verified(setup):
    whole = diffpo_sdk.completion(messages=MSGS, **setup).choices[0].message.content
    chunks = list(diffpo_sdk.completion(messages=MSGS, stream=True, **setup))
    assert len(_texts(chunks)) > 1 and "".join(_texts(chunks)) == whole
    rebuilt = litellm.stream_chunk_builder(chunks, messages=MSGS)
    assert rebuilt.choices[0].message.content == whole

    async def astream() -> list:
        return [c async for c in await diffpo_sdk.acompletion(messages=MSGS, stream=True, **setup)]

    assert "".join(_texts(asyncio.run(astream()))) == whole


def test_chat_diffpo_streams_pass_by_pass_and_adds_up_to_invoke(setup):
    llm = ChatDiffPO(**setup)
    expected = llm.invoke(MSGS)
    chunks = list(llm.stream(MSGS))
    assert len([c for c in chunks if c.content]) > 1
    total = chunks[0]
    for c in chunks[1:]:
        total += c
    assert total.content == expected.content
    meta = total.response_metadata
    assert meta["diffpo"]["refined"] is True and meta["finish_reason"] == expected.response_metadata["finish_reason"]
    with_stats = [k for k, c in enumerate(chunks) if "diffpo" in c.response_metadata]
    last_text = max(k for k, c in enumerate(chunks) if c.content)
    assert len(with_stats) == 1 and with_stats[0] >= last_text  # once, after all the text
