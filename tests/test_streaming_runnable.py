"""``DiffPORefiner.stream`` / ``astream`` / ``astream_events`` stream the refined answer as the refiner
verifies it (a real tiny model behind a real server): the chunks add up to what ``invoke`` returns,
with ``response_metadata["diffpo"]`` on the last chunk, and a streamed chain still finds its prompt."""

from __future__ import annotations

import asyncio

import pytest
from langchain_core.language_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_core.prompts import ChatPromptTemplate

from diffpo_sdk import DiffPORefiner
from diffpo_sdk.engine import RefinerEngine
from diffpo_sdk.testing import serve_engine

PROMPT = [{"role": "user", "content": "Tell me about the number 7."}]
TIMING = ("latency_ms", "server_ms")


@pytest.fixture(scope="module")
def server(tiny_llama_dir: str):
    engine = RefinerEngine.from_pretrained(tiny_llama_dir, device="cpu", dtype="float32", calibrate=False)
    srv = serve_engine(engine)
    yield srv
    srv.stop()


@pytest.fixture
def refiner(server) -> DiffPORefiner:
    return DiffPORefiner(endpoint=server.url, block_size=1, max_new_tokens=40, timeout=300)


def _stable(meta: dict) -> dict:
    return {**meta, "diffpo": {k: v for k, v in meta["diffpo"].items() if k not in TIMING}}


def _check_sum(chunks: list, expected: AIMessage) -> None:
    assert len([c for c in chunks if c.content]) > 1  # the text came in pieces, pass by pass
    assert all(isinstance(c, AIMessageChunk) for c in chunks)
    assert all("diffpo" not in c.response_metadata for c in chunks[:-1])
    total = chunks[0]
    for c in chunks[1:]:
        total = total + c
    assert total.content == expected.content and total.id == expected.id
    assert _stable(total.response_metadata) == _stable(expected.response_metadata)
    assert total.response_metadata["diffpo"]["refined"] is True


@pytest.mark.timeout(600)
def test_stream_and_astream_chunks_add_up_to_invoke(refiner):
    draft = AIMessage("The number seven is a prime.", id="draft-1", response_metadata={"model_name": "base"})
    value = {"messages": PROMPT, "draft": draft}
    expected = refiner.invoke(value)
    _check_sum(list(refiner.stream(value)), expected)

    async def collect() -> list:
        return [c async for c in refiner.astream(value)]

    _check_sum(asyncio.run(collect()), expected)
    text = {"messages": PROMPT, "draft": "The number seven is a prime."}
    pieces = list(refiner.stream(text))
    assert len(pieces) > 1 and "".join(pieces) == refiner.invoke(text) == expected.content


@pytest.mark.timeout(600)
def test_astream_events_show_each_verified_piece(refiner):
    value = {"messages": PROMPT, "draft": AIMessage("Seven.", id="draft-2")}
    expected = refiner.invoke(value)

    async def events() -> list:
        return [e async for e in refiner.astream_events(value, version="v2")]

    streamed = [e["data"]["chunk"] for e in asyncio.run(events()) if e["event"] == "on_chain_stream"]
    _check_sum(streamed, expected)


@pytest.mark.timeout(600)
def test_a_streamed_chain_captures_the_prompt_and_streams_the_refined_answer(refiner):
    llm = GenericFakeChatModel(messages=iter([AIMessage("Seven is a lucky number.")] * 2))
    chain = ChatPromptTemplate.from_messages([("user", "{q}")]) | llm | refiner
    chunks = list(chain.stream({"q": "Tell me about the number 7."}))
    last = chunks[-1].response_metadata["diffpo"]
    assert last["refined"] is True and last["prompt"] == "captured"
    explicit = refiner.invoke({"messages": PROMPT, "draft": "Seven is a lucky number."})
    assert "".join(c.content for c in chunks) == explicit  # refined against the captured prompt
