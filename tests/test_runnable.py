"""DiffPORefiner in LCEL chains: prompt capture without cross-talk, Runnable conventions, backends."""

from __future__ import annotations

import asyncio
import random
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, SystemMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import ConfigurableField, RunnableLambda
from langchain_core.tools import tool

from diffpo_sdk import DiffPORefiner
from diffpo_sdk.client import DiffPOClient, InProcessClient
from diffpo_sdk.errors import InvalidRequestError, RefinerUnavailableError
from diffpo_sdk.protocol import RefineItem
from diffpo_sdk.adapters.runnable import prompt_capture
from diffpo_sdk.testing import EchoEngine, free_port, serve_engine


class EchoChat(BaseChatModel):
    """A chat model whose answer names its input: ``draft(<last user text>)``; jitters to interleave runs."""

    fail: bool = False

    @property
    def _llm_type(self) -> str:
        return "echo-chat"

    def _answer(self, messages: list) -> str:
        if self.fail:
            raise RuntimeError("upstream down")
        time.sleep(random.random() * 0.005)
        return f"draft({messages[-1].text})"

    def _generate(self, messages, stop=None, run_manager=None, **kwargs) -> ChatResult:
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content=self._answer(messages)))])

    def _stream(self, messages, stop=None, run_manager=None, **kwargs) -> Iterator[ChatGenerationChunk]:
        text = self._answer(messages)
        for i in range(0, len(text), 4):
            yield ChatGenerationChunk(message=AIMessageChunk(content=text[i : i + 4]))


def seen_by_refiner(item: RefineItem) -> str:
    """The echo refiner's answer says which prompt it was given: ``R[system|user]<draft>``."""
    turns = item.conversation()
    system = next((t["content"] for t in turns if t["role"] == "system"), "")
    return f"R[{system}|{turns[-1]['content']}]<{item.draft}>"


@pytest.fixture(scope="module")
def echo():
    engine = EchoEngine(seen_by_refiner)
    server = serve_engine(engine, max_wait_ms=0.0)
    yield server.url
    server.stop()


PROMPT = ChatPromptTemplate.from_messages([("system", "be brief"), ("human", "{q}")])


def expected(q: str) -> str:
    return f"R[be brief|{q}]<draft({q})>"


def refine_requests(url: str) -> float:
    text = httpx.get(url + "/metrics").text
    m = re.search(r'diffpo_requests_total\{endpoint="/v1/refine",[^}]*status="200"\} ([0-9.e+]+)', text)
    return float(m.group(1)) if m else 0.0


# -- types in, types out ------------------------------------------------------------------------


def test_types_mirror_input(echo):
    r = DiffPORefiner(endpoint=echo)
    draft = AIMessage(content="hi", id="m1", response_metadata={"model_name": "base"})
    out = r.invoke({"prompt": "q", "draft": draft})
    assert isinstance(out, AIMessage) and out.content == "R[|q]<hi>" and out.id == "m1"
    assert out.response_metadata["model_name"] == "base"
    meta = out.response_metadata["diffpo"]
    assert meta["refined"] is True and meta["prompt"] == "explicit" and meta["model"] == "echo"
    assert r.invoke({"prompt": "q", "draft": "hi"}) == "R[|q]<hi>"
    chunk = r.invoke({"prompt": "q", "draft": AIMessageChunk(content="hi")})
    assert isinstance(chunk, AIMessageChunk) and chunk.content == "R[|q]<hi>"


def test_explicit_inputs(echo):
    r = DiffPORefiner(endpoint=echo)
    assert r.invoke({"prompt": "q1", "draft": "d"}) == "R[|q1]<d>"
    out = r.invoke({"messages": [("system", "s"), ("human", "q2")], "draft": AIMessage(content="d")})
    assert out.content == "R[s|q2]<d>" and out.response_metadata["diffpo"]["prompt"] == "explicit"
    openai_style = [{"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "text", "text": "q3"}]}]
    assert r.invoke({"messages": openai_style, "draft": "d"}) == "R[s|q3]<d>"
    # graph state: the last AIMessage is the draft, the rest its prompt; same id so add_messages replaces it
    state = {"messages": [HumanMessage("q4"), AIMessage(content="d", id="a1")]}
    update = r.invoke(state)
    assert [m.content for m in update["messages"]] == ["R[|q4]<d>"] and update["messages"][0].id == "a1"
    openai_state = {"messages": [{"role": "user", "content": "q6"}, {"role": "assistant", "content": "d"}]}
    assert r.invoke(openai_state)["messages"][0].content == "R[|q6]<d>"
    listed = r.invoke([HumanMessage("q5"), AIMessage(content="d")])
    assert listed[0].content == "q5" and listed[-1].content == "R[|q5]<d>"
    with pytest.raises(InvalidRequestError, match="cannot refine"):
        r.invoke(42)


def test_tool_calls_pass_through_untouched(echo):
    r = DiffPORefiner(endpoint=echo)
    msg = AIMessage(content="", tool_calls=[{"name": "search", "args": {"q": "x"}, "id": "t1"}])
    assert r.invoke(msg) is msg
    assert r.invoke({"messages": [HumanMessage("q"), msg]}) == {"messages": []}
    assert r.batch([msg, {"prompt": "q", "draft": "plain"}]) == [msg, "R[|q]<plain>"]


def test_empty_answers_pass_through_untouched(echo):
    r = DiffPORefiner(endpoint=echo)
    before = refine_requests(echo)
    empty = AIMessage(content="")
    assert r.invoke({"prompt": "q", "draft": empty}) is empty
    assert r.invoke({"prompt": "q", "draft": "  "}) == "  "
    assert refine_requests(echo) == before


def test_agent_history_becomes_text_turns(echo):
    r = DiffPORefiner(endpoint=echo)
    history = [
        SystemMessage("s"), HumanMessage("weather?"),
        AIMessage(content="", tool_calls=[{"name": "weather", "args": {"city": "Paris"}, "id": "t1"}]),
        {"role": "tool", "tool_call_id": "t1", "name": "weather", "content": "sunny"},
    ]
    out = r.invoke({"messages": history, "draft": "It is sunny."})
    assert out == "R[s|[tool result weather]\nsunny]<It is sunny.>"


def test_bad_options_fail_at_construction():
    with pytest.raises(ValueError, match="block_size"):  # pydantic's ValidationError
        DiffPORefiner(endpoint="http://127.0.0.1:1", block_size=0, max_new_tokens=32)


def test_block_wider_than_the_answer_is_clamped(echo):
    out = DiffPORefiner(endpoint=echo, block_size=64, max_new_tokens=32).invoke(
        {"prompt": "q", "draft": AIMessage(content="x")})
    assert out.response_metadata["diffpo"]["refined"] is True
    assert out.response_metadata["diffpo"]["block_size"] == 32


def test_configurable_fields(echo):
    r = DiffPORefiner(endpoint=echo).configurable_fields(
        block_size=ConfigurableField(id="block_size"), timeout=ConfigurableField(id="refiner_timeout"),
    )
    out = r.invoke({"prompt": "q", "draft": AIMessage(content="x")},
                   config={"configurable": {"block_size": 8, "refiner_timeout": 3.0}})
    assert out.response_metadata["diffpo"]["block_size"] == 8


# -- prompt capture -------------------------------------------------------------------------------


def test_capture_through_chain_shapes(echo):
    r = DiffPORefiner(endpoint=echo)
    llm = EchoChat()
    chains = {
        "plain": PROMPT | llm | r,
        "bind": PROMPT | llm.bind(stop=["never"]) | r,
        "retry": PROMPT | llm.with_retry(stop_after_attempt=2) | r,
        "fallbacks": PROMPT | EchoChat(fail=True).with_fallbacks([llm]) | r,
        "parser": PROMPT | llm | StrOutputParser() | r,
    }
    for name, chain in chains.items():
        out = chain.invoke({"q": name})
        text = out if isinstance(out, str) else out.content
        assert text == expected(name), name
        if not isinstance(out, str):
            assert out.response_metadata["diffpo"]["prompt"] == "captured"
    assert "".join(c.content for c in chains["plain"].stream({"q": "s"})) == expected("s")
    assert "".join(chains["parser"].stream({"q": "p"})) == expected("p")


async def test_capture_async_stream_and_events(echo):
    r = DiffPORefiner(endpoint=echo)
    chain = PROMPT | EchoChat() | r
    assert (await chain.ainvoke({"q": "a"})).content == expected("a")
    chunks = [c async for c in chain.astream({"q": "b"})]
    assert "".join(c.content for c in chunks) == expected("b")
    ends = [e["data"]["output"] async for e in chain.astream_events({"q": "c"}, version="v2")
            if e["event"] == "on_chain_end" and e["name"] == "DiffPORefiner"]
    assert [m.content for m in ends] == [expected("c")]
    parsed = PROMPT | EchoChat() | StrOutputParser() | r
    assert await parsed.ainvoke({"q": "d"}) == expected("d")


def test_forty_concurrent_runs_no_cross_talk(echo):
    r = DiffPORefiner(endpoint=echo)
    chain = PROMPT | EchoChat() | StrOutputParser() | r
    questions = [f"question-{i}" for i in range(40)]
    # batch with concurrency
    outs = chain.batch([{"q": q} for q in questions], config={"max_concurrency": 40})
    assert outs == [expected(q) for q in questions]
    # plain threads
    with ThreadPoolExecutor(max_workers=40) as pool:
        outs = list(pool.map(lambda q: chain.invoke({"q": q}), questions))
    assert outs == [expected(q) for q in questions]


async def test_forty_concurrent_async_runs_no_cross_talk(echo):
    r = DiffPORefiner(endpoint=echo)
    chains = [PROMPT | EchoChat() | r, PROMPT | EchoChat() | StrOutputParser() | r]
    questions = [f"q{i}" for i in range(40)]
    outs = await asyncio.gather(*(chains[i % 2].ainvoke({"q": q}) for i, q in enumerate(questions)))
    texts = [o if isinstance(o, str) else o.content for o in outs]
    assert texts == [expected(q) for q in questions]
    outs = await (PROMPT | EchoChat() | r).abatch([{"q": q} for q in questions], config={"max_concurrency": 40})
    assert [o.content for o in outs] == [expected(q) for q in questions]


def test_model_inside_a_tool_does_not_stand_in_for_the_prompt(echo):
    inner = EchoChat()

    @tool
    def lookup(query: str) -> str:
        """Asks another model."""
        return inner.invoke("inner secret prompt").content

    def call_tool(text: str) -> str:
        lookup.invoke({"query": "x"})
        return text

    chain = PROMPT | EchoChat() | StrOutputParser() | RunnableLambda(call_tool) | DiffPORefiner(endpoint=echo)
    assert chain.invoke({"q": "outer"}) == expected("outer")


def test_captured_prompts_are_dropped_when_runs_end(echo):
    r = DiffPORefiner(endpoint=echo)
    before = prompt_capture.size()
    (PROMPT | EchoChat() | r).batch([{"q": str(i)} for i in range(10)])
    with pytest.raises(RuntimeError):
        (PROMPT | EchoChat(fail=True) | r).invoke({"q": "boom"})
    list((PROMPT | EchoChat() | StrOutputParser() | r).stream({"q": "s"}))
    assert prompt_capture.size() == before == 0


def test_wrap(echo):
    wrapped = DiffPORefiner.wrap(EchoChat(), endpoint=echo)
    out = wrapped.invoke([SystemMessage("be brief"), HumanMessage("w")])
    assert out.content == expected("w") and out.response_metadata["diffpo"]["prompt"] == "explicit"
    assert [o.content for o in wrapped.batch(["a", "b"])] == ["R[|a]<draft(a)>", "R[|b]<draft(b)>"]


def test_batch_is_one_network_call(echo):
    r = DiffPORefiner(endpoint=echo)
    before = refine_requests(echo)
    outs = r.batch([{"prompt": "q", "draft": AIMessage(content=f"d{i}")} for i in range(12)])
    assert [o.content for o in outs] == [f"R[|q]<d{i}>" for i in range(12)]
    assert refine_requests(echo) - before == 1
    before = refine_requests(echo)
    (PROMPT | EchoChat() | r).batch([{"q": str(i)} for i in range(8)])
    assert refine_requests(echo) - before == 1


async def test_abatch_is_one_network_call(echo):
    r = DiffPORefiner(endpoint=echo)
    before = refine_requests(echo)
    outs = await r.abatch([{"prompt": "q", "draft": f"d{i}"} for i in range(12)])
    assert outs == [f"R[|q]<d{i}>" for i in range(12)]
    assert refine_requests(echo) - before == 1


# -- never refined against an empty prompt ---------------------------------------------------------

USER_TEXT = "The capital of Australia is Sydney, a city on the east coast."


def _kept(out: object, draft: str) -> None:
    """The draft came back as it was, marked: no prompt, so it was not sent to the refiner."""
    if isinstance(out, str):
        assert out == draft
        return
    assert isinstance(out, AIMessage) and out.content == draft
    meta = out.response_metadata["diffpo"]
    assert meta["refined"] is False and meta["reason"] == "no_prompt" and meta["prompt"] == "none"


def test_no_prompt_keeps_the_draft_on_every_path(echo):
    r = DiffPORefiner(endpoint=echo)
    before = refine_requests(echo)
    _kept(r.invoke(USER_TEXT), USER_TEXT)  # a str
    _kept(r.invoke(AIMessage(content=USER_TEXT)), USER_TEXT)
    # a parser between a model called on its own and the refiner: nothing to capture
    drafted = EchoChat().invoke("q")
    _kept((StrOutputParser() | r).invoke(drafted), "draft(q)")
    # RunnableLambdas that make the draft without a model
    _kept((RunnableLambda(lambda q: f"lambda({q})") | RunnableLambda(str.upper) | r).invoke("x"), "LAMBDA(X)")
    _kept(list(r.stream(AIMessage(content=USER_TEXT)))[-1], USER_TEXT)  # streaming
    assert "".join(r.stream(USER_TEXT)) == USER_TEXT
    assert refine_requests(echo) == before  # none of them reached the refiner
    # a batch: the drafts with a prompt are refined, in one call; the others kept
    outs = r.batch([USER_TEXT, {"prompt": "q", "draft": "d"}, AIMessage(content="m")])
    assert outs[0] == USER_TEXT and outs[1] == "R[|q]<d>"
    _kept(outs[2], "m")
    assert refine_requests(echo) - before == 1


async def test_no_prompt_keeps_the_draft_async(echo):
    r = DiffPORefiner(endpoint=echo)
    before = refine_requests(echo)
    assert await r.ainvoke(USER_TEXT) == USER_TEXT
    _kept(await (RunnableLambda(lambda q: AIMessage(content=q)) | r).ainvoke("y"), "y")
    _kept((await r.abatch([AIMessage(content="a"), "b"]))[0], "a")
    chunks = [c async for c in r.astream(AIMessage(content=USER_TEXT))]
    _kept(chunks[-1], USER_TEXT)
    assert refine_requests(echo) == before


def test_no_prompt_strict_raises_a_clear_error(echo):
    strict = DiffPORefiner(endpoint=echo, fail_open=False)
    with pytest.raises(InvalidRequestError, match="no prompt"):
        strict.invoke(USER_TEXT)
    with pytest.raises(InvalidRequestError, match="no prompt"):
        DiffPOClient(echo).refine([{"prompt": "", "draft": USER_TEXT}])


def test_no_prompt_warns_once_per_process_naming_the_ways():
    code = (
        "import logging; logging.basicConfig(level=logging.WARNING)\n"
        "from diffpo_sdk import DiffPORefiner\n"
        f"r = DiffPORefiner(endpoint='http://127.0.0.1:{free_port()}')\n"
        "outs = [r.invoke('draft one'), r.invoke('draft two'), r.batch(['a', 'b'])]\n"
        "print(outs)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['draft one', 'draft two', ['a', 'b']]"
    warnings = [line for line in out.stderr.splitlines() if "no prompt" in line]
    assert len(warnings) == 1, out.stderr
    for way in ("capture", "{'messages': ..., 'draft': ...}", "DiffPORefiner.wrap(llm)"):
        assert way in warnings[0]


def test_fail_open_and_strict():
    dead = f"http://127.0.0.1:{free_port()}"
    draft = AIMessage(content=[{"type": "text", "text": "keep me"}])
    out = DiffPORefiner(endpoint=dead, timeout=0.5).invoke({"prompt": "q", "draft": draft})
    assert out.content == [{"type": "text", "text": "keep me"}]  # the draft exactly as it came
    meta = out.response_metadata["diffpo"]
    assert meta["refined"] is False and meta["reason"] == "refiner_failed"
    assert "RefinerUnavailableError" in meta["error"]
    strict = DiffPORefiner(endpoint=dead, timeout=0.5, fail_open=False)
    with pytest.raises(RefinerUnavailableError):
        strict.invoke({"prompt": "q", "draft": "x"})
    outs = strict.batch([{"prompt": "q", "draft": "x"}, {"prompt": "q", "draft": "y"}], return_exceptions=True)
    assert all(isinstance(o, RefinerUnavailableError) for o in outs)


def test_langgraph_node(echo):
    from langgraph.graph import START, MessagesState, StateGraph

    llm = EchoChat()
    graph = StateGraph(MessagesState)
    graph.add_node("model", lambda state: {"messages": [llm.invoke(state["messages"])]})
    graph.add_node("refine", DiffPORefiner(endpoint=echo))
    graph.add_edge(START, "model")
    graph.add_edge("model", "refine")
    app = graph.compile()
    result = app.invoke({"messages": [SystemMessage("be brief"), HumanMessage("g")]})
    assert [m.content for m in result["messages"]] == ["be brief", "g", expected("g")]  # replaced, not appended


# -- a real refiner ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_engine(tiny_llama_dir):
    from diffpo_sdk.engine import RefinerEngine

    return RefinerEngine.from_pretrained(tiny_llama_dir, device="cpu", calibrate=False)


def test_real_refiner_sees_the_captured_prompt(tiny_engine):
    server = serve_engine(tiny_engine, max_wait_ms=1.0)
    try:
        chain = PROMPT | EchoChat() | DiffPORefiner(endpoint=server.url, block_size=4, max_new_tokens=12)
        outs = chain.batch([{"q": "first"}, {"q": "second"}])
    finally:
        server.stop()
    # the same refiner in-process, given the prompt explicitly: identical greedy answers
    want = tiny_engine.refine(
        [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": q}],
          "draft": f"draft({q})"} for q in ("first", "second")],
        block_size=4, max_new_tokens=12,
    )
    assert [o.content for o in outs] == [w.text for w in want]
    assert all(o.response_metadata["diffpo"]["prompt"] == "captured" for o in outs)


async def test_in_process_backend(tiny_llama_dir, monkeypatch):
    monkeypatch.setenv("DIFFPO_DEVICE", "cpu")
    r = DiffPORefiner(backend="in_process", model=tiny_llama_dir, max_new_tokens=8)
    chain = PROMPT | EchoChat() | r
    out = await chain.ainvoke({"q": "x"})
    assert out.response_metadata["diffpo"]["backend"] == "in_process"
    assert out.response_metadata["diffpo"]["refined"] is True
    # the very engine the backend loaded, given the prompt explicitly: the same greedy answer
    engine = InProcessClient(settings=r.resolved_settings).engine
    [want] = engine.refine([{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "y"}],
                             "draft": "draft(y)"}], max_new_tokens=8)
    assert chain.invoke({"q": "y"}).content == want.text
