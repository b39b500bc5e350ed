"""``DiffPORefiner``: a LangChain Runnable that refines the answer flowing through it.

``chain = prompt | llm | DiffPORefiner()``. LCEL hands the refiner only the AIMessage,
but DiffPO refines a draft *for a prompt*, so the refiner recovers the conversation the
chat model actually received: a callback handler installed for every LangChain run
(``register_configure_hook``) records each chat model's input under its enclosing runs,
and the refiner looks it up by the draft message's id or by its own parent run (the
sequence both share). Entries go when their run ends or errors, so prompts live in
memory only for the run. Explicit input (``{"messages": ..., "draft": ...}``) and
``DiffPORefiner.wrap(llm)`` need no capture at all.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessageChunk, BaseMessage
from langchain_core.runnables import (
    Runnable,
    RunnableConfig,
    RunnableParallel,
    RunnablePassthrough,
    RunnableSerializable,
)
from langchain_core.tracers.context import register_configure_hook
from pydantic import ConfigDict, PrivateAttr, SecretStr, model_validator

from ..client import Outcome, StreamPiece, settings_key, shared_async_client, shared_client
from ..errors import InvalidRequestError
from ..protocol import BlockSize, RefineItem, RefineOptions
from ..settings import Backend, DiffPOSettings
from .answers import pass_through_reason, refined_finish_reason
from .convert import conversation, has_tool_calls, text_of, to_messages

__all__ = ["DiffPORefiner", "PromptCapture", "prompt_capture"]


# -- prompt capture ------------------------------------------------------------------------


class PromptCapture(BaseCallbackHandler):
    """Remembers, for each open run, the conversation last sent to a model inside it.

    A chat model's input is stored under every enclosing run up to the nearest tool
    (a model called *inside a tool* must not stand in for the agent's prompt), and under
    the id of each message it returns. All of it is dropped when the run that holds it
    ends or errors.
    """

    run_inline = True  # a few dict operations: no thread hop for async runs
    raise_error = False

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._parents: dict[UUID, UUID | None] = {}
        self._tools: set[UUID] = set()
        self._latest: dict[UUID, Any] = {}
        self._pending: dict[UUID, tuple[Any, UUID]] = {}
        self._by_message: dict[str, Any] = {}
        self._owned: dict[UUID, list[str]] = {}

    # runs that can enclose a model
    def on_chain_start(self, serialized: Any, inputs: Any, *, run_id: UUID, parent_run_id: UUID | None = None,
                       **kwargs: Any) -> None:
        with self._lock:
            self._parents[run_id] = parent_run_id

    def on_tool_start(self, serialized: Any, input_str: str, *, run_id: UUID, parent_run_id: UUID | None = None,
                      **kwargs: Any) -> None:
        with self._lock:
            self._parents[run_id] = parent_run_id
            self._tools.add(run_id)

    def on_chain_end(self, outputs: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self._close(run_id)

    def on_chain_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._close(run_id)

    def on_tool_end(self, output: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self._close(run_id)

    def on_tool_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._close(run_id)

    # models
    def on_chat_model_start(self, serialized: Any, messages: list[list[BaseMessage]], *, run_id: UUID,
                            parent_run_id: UUID | None = None, **kwargs: Any) -> None:
        if messages:
            self._record(run_id, parent_run_id, messages[0])

    def on_llm_start(self, serialized: Any, prompts: list[str], *, run_id: UUID, parent_run_id: UUID | None = None,
                     **kwargs: Any) -> None:
        if prompts:
            self._record(run_id, parent_run_id, prompts[0])

    def on_llm_end(self, response: Any, *, run_id: UUID, **kwargs: Any) -> None:
        with self._lock:
            entry = self._pending.pop(run_id, None)
            if entry is None:
                return
            conv, owner = entry
            if owner not in self._parents:  # the holder already ended
                return
            for generations in getattr(response, "generations", []):
                for gen in generations:
                    msg_id = getattr(getattr(gen, "message", None), "id", None)
                    if msg_id:
                        self._by_message[msg_id] = conv
                        self._owned.setdefault(owner, []).append(msg_id)

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        with self._lock:
            self._pending.pop(run_id, None)

    # bookkeeping
    def _record(self, run_id: UUID, parent: UUID | None, conv: Any) -> None:
        if parent is None:  # a model called on its own: no enclosing run can ask for its prompt
            return
        with self._lock:
            owner = parent
            node: UUID | None = parent
            while node is not None and node in self._parents:
                self._latest[node] = conv
                owner = node
                if node in self._tools:
                    break
                node = self._parents[node]
            if owner in self._parents:
                self._pending[run_id] = (conv, owner)

    def _close(self, run_id: UUID) -> None:
        with self._lock:
            self._parents.pop(run_id, None)
            self._tools.discard(run_id)
            self._latest.pop(run_id, None)
            for msg_id in self._owned.pop(run_id, ()):
                self._by_message.pop(msg_id, None)

    def lookup(self, message_id: str | None, parent_run_id: UUID | None) -> Any | None:
        """The conversation behind a draft: by its message id, else by the caller's parent run."""
        with self._lock:
            if message_id and message_id in self._by_message:
                return self._by_message[message_id]
            if parent_run_id is not None:
                return self._latest.get(parent_run_id)
        return None

    def size(self) -> int:
        """Entries held (for leak tests)."""
        with self._lock:
            return len(self._parents) + len(self._latest) + len(self._pending) + len(self._by_message)


#: the process-wide handler; the ContextVar's default makes plain threads see it too
prompt_capture = PromptCapture()
_capture_var: ContextVar[PromptCapture | None] = ContextVar("diffpo_prompt_capture", default=prompt_capture)
register_configure_hook(_capture_var, inheritable=True)


# -- the runnable --------------------------------------------------------------------------


@dataclass
class _Job:
    """One input, taken apart: what to refine, and how to put the answer back."""

    item: RefineItem | None
    source: str
    build: Callable[[Outcome], Any]
    passthrough: Any = None
    #: for a stream: one output chunk per piece of verified text (the outcome on the last);
    #: None where the output is not a text (graph state, message lists): it comes whole at the end
    chunk: Callable[[str, Outcome | None], Any] | None = None


class DiffPORefiner(RunnableSerializable[Any, Any]):
    """Refine the answer flowing through a chain with a DiffPO refiner.

    Input → output: ``str`` → ``str``; ``AIMessage`` → ``AIMessage`` with stats in
    ``response_metadata["diffpo"]``; ``{"messages" | "prompt": ..., "draft": str |
    AIMessage}`` → the draft's type; graph state ``{"messages": [..., AIMessage]}`` →
    ``{"messages": [refined AIMessage]}`` (same id, so ``add_messages`` replaces it).
    AIMessages with tool calls, and empty answers, pass through untouched (the rule is
    :mod:`diffpo_sdk.adapters.answers`). When the refiner cannot answer,
    the draft comes back marked ``{"refined": False, "reason": "refiner_failed", "error": ...}``;
    a draft with no prompt (none given, none captured) comes back marked ``"reason":
    "no_prompt"``, never refined against an empty conversation. ``fail_open=False`` raises
    instead (:class:`~diffpo_sdk.errors.RefinerUnavailableError`, resp.
    :class:`~diffpo_sdk.errors.InvalidRequestError`).

    Fields left ``None`` come from ``settings`` or the ``DIFFPO_*`` environment.
    """

    endpoint: str | list[str] | None = None
    api_key: SecretStr | None = None
    backend: Backend | None = None
    model: str | None = None
    block_size: BlockSize | None = None
    max_iterations: int | None = None
    max_new_tokens: int | None = None
    keep_draft_prefix: int = 0
    timeout: float | None = None
    retries: int | None = None
    fail_open: bool | None = None
    capture_content: bool | None = None
    settings: DiffPOSettings | None = None

    model_config = ConfigDict(arbitrary_types_allowed=True)

    _resolved: DiffPOSettings = PrivateAttr()
    _options: dict[str, Any] = PrivateAttr()
    _client_key: tuple = PrivateAttr()

    @model_validator(mode="after")
    def _resolve(self) -> DiffPORefiner:
        """Settle settings and options once, so a bad block size fails here, not per call."""
        self._resolved = (self.settings or DiffPOSettings()).merged(
            endpoint=self.endpoint, api_key=self.api_key, backend=self.backend, model=self.model,
            block_size=self.block_size, max_iterations=self.max_iterations, max_new_tokens=self.max_new_tokens,
            timeout=self.timeout, retries=self.retries, fail_open=self.fail_open,
            capture_content=self.capture_content,
        )
        s = self._resolved
        try:
            opts = RefineOptions(block_size=s.block_size, max_new_tokens=s.max_new_tokens,
                                 max_iterations=s.max_iterations, keep_draft_prefix=self.keep_draft_prefix)
        except ValueError as e:
            raise InvalidRequestError(str(e)) from e
        self._options = opts.model_dump()
        self._client_key = settings_key(s)
        return self

    @property
    def resolved_settings(self) -> DiffPOSettings:
        """The settings every call uses: fields, then ``settings``, then ``DIFFPO_*``."""
        return self._resolved

    @classmethod
    def is_lc_serializable(cls) -> bool:
        return False

    @classmethod
    def wrap(cls, llm: Runnable, **kwargs: Any) -> Runnable:
        """``llm`` followed by a refiner that gets ``llm``'s own input as the prompt.

        For code that prefers explicit wiring to prompt capture. ``llm`` takes what a
        chat model takes (str, messages, PromptValue); its AIMessage comes back refined.
        """
        refiner = cls(**kwargs)
        return (RunnableParallel(messages=RunnablePassthrough(), draft=llm) | refiner).with_config(
            run_name=f"{refiner.get_name()}.wrap"
        )

    # invoke / batch, sync and async ------------------------------------------------------

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        return self._call_with_config(self._invoke, input, config, **kwargs)

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        return await self._acall_with_config(self._ainvoke, input, config, **kwargs)

    def batch(self, inputs: list[Any], config: RunnableConfig | list[RunnableConfig] | None = None, *,
              return_exceptions: bool = False, **kwargs: Any) -> list[Any]:
        """All drafts in one refinement call (one network round trip)."""
        if not inputs:
            return []
        return self._batch_with_config(self._batch, inputs, config, return_exceptions=return_exceptions, **kwargs)

    async def abatch(self, inputs: list[Any], config: RunnableConfig | list[RunnableConfig] | None = None, *,
                     return_exceptions: bool = False, **kwargs: Any) -> list[Any]:
        if not inputs:
            return []
        return await self._abatch_with_config(self._abatch, inputs, config, return_exceptions=return_exceptions,
                                              **kwargs)

    def _invoke(self, input: Any, run_manager: Any) -> Any:
        return self._batch([input], [run_manager], _raise=True)[0]

    async def _ainvoke(self, input: Any, run_manager: Any) -> Any:
        return (await self._abatch([input], [run_manager], _raise=True))[0]

    def _batch(self, inputs: list[Any], run_manager: list[Any], _raise: bool = False) -> list[Any]:
        jobs = self._jobs(inputs, run_manager)
        if not any(j.item is not None for j in jobs):
            return self._assemble(jobs, [])
        try:
            outcomes = shared_client(self._resolved, self._client_key).refine_or_keep(**self._call(jobs))
        except Exception as e:
            return self._failed(jobs, e, _raise)
        return self._assemble(jobs, outcomes)

    async def _abatch(self, inputs: list[Any], run_manager: list[Any], _raise: bool = False) -> list[Any]:
        jobs = self._jobs(inputs, run_manager)
        if not any(j.item is not None for j in jobs):
            return self._assemble(jobs, [])
        try:
            outcomes = await shared_async_client(self._resolved, self._client_key).refine_or_keep(**self._call(jobs))
        except Exception as e:
            return self._failed(jobs, e, _raise)
        return self._assemble(jobs, outcomes)

    # streams, sync and async -------------------------------------------------------------

    def stream(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Iterator[Any]:
        """The refined answer as the refiner verifies it: ``str`` pieces, or ``AIMessageChunk``s whose
        sum is what ``invoke`` returns (``response_metadata["diffpo"]`` on the last chunk)."""
        yield from self.transform(iter([input]), config, **kwargs)

    async def astream(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> AsyncIterator[Any]:
        async for chunk in self.atransform(_one(input), config, **kwargs):
            yield chunk

    def transform(self, input: Iterator[Any], config: RunnableConfig | None = None, **kwargs: Any) -> Iterator[Any]:
        """In a streamed chain: the draft is gathered whole (the refiner needs all of it), then streamed refined."""
        yield from self._transform_stream_with_config(input, self._transform, config, **kwargs)

    async def atransform(self, input: AsyncIterator[Any], config: RunnableConfig | None = None,
                         **kwargs: Any) -> AsyncIterator[Any]:
        async for chunk in self._atransform_stream_with_config(input, self._atransform, config, **kwargs):
            yield chunk

    def _transform(self, chunks: Iterator[Any], run_manager: Any) -> Iterator[Any]:
        job = self._job(_gathered(chunks), run_manager.parent_run_id)
        if job.item is None:
            yield job.passthrough
            return
        for piece in shared_client(self._resolved, self._client_key).stream(**self._call([job])):
            if (out := _emit(job, piece)) is not None:
                yield out

    async def _atransform(self, chunks: AsyncIterator[Any], run_manager: Any) -> AsyncIterator[Any]:
        gathered = None
        async for c in chunks:
            gathered = _added(gathered, c)
        job = self._job(gathered, run_manager.parent_run_id)
        if job.item is None:
            yield job.passthrough
            return
        async for piece in shared_async_client(self._resolved, self._client_key).stream(**self._call([job])):
            if (out := _emit(job, piece)) is not None:
                yield out

    # the logic both forms share ---------------------------------------------------------

    def _jobs(self, inputs: list[Any], run_manager: list[Any]) -> list[_Job]:
        return [self._job(x, rm.parent_run_id) for x, rm in zip(inputs, run_manager)]

    def _call(self, jobs: list[_Job]) -> dict[str, Any]:
        todo = [j for j in jobs if j.item is not None]
        return {"items": [j.item for j in todo], "prompt_sources": [j.source for j in todo],
                "fail_open": self._resolved.fail_open, **self._options}

    @staticmethod
    def _failed(jobs: list[_Job], error: Exception, raise_: bool) -> list[Any]:
        if raise_:
            raise error
        return [error if j.item is not None else j.passthrough for j in jobs]

    @staticmethod
    def _assemble(jobs: list[_Job], outcomes: list[Outcome]) -> list[Any]:
        it = iter(outcomes)
        return [j.build(next(it)) if j.item is not None else j.passthrough for j in jobs]

    # taking inputs apart -----------------------------------------------------------------

    def _job(self, value: Any, parent_run_id: UUID | None) -> _Job:
        if isinstance(value, str):
            return self._draft_job(value, None, parent_run_id, explicit=None)
        if isinstance(value, BaseMessage):
            return self._draft_job(value, None, parent_run_id, explicit=None)
        if isinstance(value, dict) and "draft" in value:
            prompt = value.get("messages", value.get("prompt"))
            return self._draft_job(value["draft"], prompt, parent_run_id, explicit=prompt is not None)
        if isinstance(value, dict) and isinstance(value.get("messages"), Sequence) and value["messages"]:
            *history, last = to_messages(value["messages"]) or [None]
            job = self._draft_job(last, history, parent_run_id, explicit=True)
            if job.item is None:
                return _Job(None, "none", _unused, passthrough={"messages": []})
            return _Job(job.item, job.source, lambda o, b=job.build: {"messages": [b(o)]})
        if isinstance(value, list) and value and isinstance(value[-1], BaseMessage):
            *history, last = value
            job = self._draft_job(last, history, parent_run_id, explicit=True)
            if job.item is None:
                return _Job(None, "none", _unused, passthrough=value)
            return _Job(job.item, job.source, lambda o, b=job.build, h=history: [*h, b(o)])
        raise InvalidRequestError(
            f"DiffPORefiner cannot refine a {type(value).__name__}: give a str, an AIMessage, "
            "{'messages' | 'prompt': ..., 'draft': ...} or graph state {'messages': [..., AIMessage]}"
        )

    def _draft_job(self, draft: Any, prompt: Any, parent_run_id: UUID | None, explicit: bool | None) -> _Job:
        chunk: Callable[[str, Outcome | None], Any]
        if isinstance(draft, BaseMessage):
            text, build, chunk = text_of(draft), _message_builder(draft), _chunk_builder(draft)
            tool_calls = has_tool_calls(draft)
        elif isinstance(draft, str):
            text, build, chunk, tool_calls = draft, _text_builder, _text_chunk, False
        else:
            raise InvalidRequestError(f"the draft must be a str or an AIMessage, not {type(draft).__name__}")
        if pass_through_reason(text, tool_calls=tool_calls) is not None:
            return _Job(None, "none", _unused, passthrough=draft)

        turns = conversation(prompt) if explicit else None
        source = "explicit" if turns else "none"
        if turns is None:
            msg_id = draft.id if isinstance(draft, BaseMessage) else None
            captured = prompt_capture.lookup(msg_id, parent_run_id)
            turns = conversation(captured) if captured is not None else None
            source = "captured" if turns else "none"
        item = RefineItem(messages=turns, draft=text) if turns else RefineItem(prompt="", draft=text)
        return _Job(item, source, build, chunk=chunk)


async def _one(value: Any) -> AsyncIterator[Any]:
    yield value


def _added(total: Any, chunk: Any) -> Any:
    """Input chunks gathered as LangChain does: added up where they add (str, message chunks)."""
    if total is None:
        return chunk
    try:
        return total + chunk
    except TypeError:
        return chunk


def _gathered(chunks: Iterator[Any]) -> Any:
    total = None
    for c in chunks:
        total = _added(total, c)
    return total


def _emit(job: _Job, piece: StreamPiece) -> Any | None:
    """What a piece becomes in the output stream (None: nothing to send yet)."""
    if job.chunk is None:
        return job.build(piece.outcome) if piece.outcome is not None else None
    if piece.text or piece.outcome is not None:
        return job.chunk(piece.text, piece.outcome)
    return None


def _unused(_: Outcome) -> Any:  # pragma: no cover - jobs without an item are never built
    raise AssertionError


def _text_builder(outcome: Outcome) -> str:
    return outcome.text


def _text_chunk(text: str, outcome: Outcome | None) -> str:
    return text


def _metadata(draft: BaseMessage, outcome: Outcome) -> dict[str, Any]:
    meta = {**draft.response_metadata, "diffpo": outcome.info}
    if outcome.refined:
        meta["finish_reason"] = refined_finish_reason(outcome.info["finish_reason"])
    return meta


def _chunk_builder(draft: BaseMessage) -> Callable[[str, Outcome | None], AIMessageChunk]:
    """Chunks of the refined message: text as it is verified, the draft's metadata once, on the last."""

    def chunk(text: str, outcome: Outcome | None) -> AIMessageChunk:
        if outcome is None:
            return AIMessageChunk(content=text, id=draft.id)
        return AIMessageChunk(content=text, id=draft.id, name=draft.name, response_metadata=_metadata(draft, outcome),
                              additional_kwargs=draft.additional_kwargs,
                              usage_metadata=getattr(draft, "usage_metadata", None))

    return chunk


def _message_builder(draft: BaseMessage) -> Callable[[Outcome], BaseMessage]:
    def build(outcome: Outcome) -> BaseMessage:
        meta = _metadata(draft, outcome)
        if not outcome.refined:  # the draft exactly as it came, blocks and all
            return draft.model_copy(update={"response_metadata": meta})
        return draft.model_copy(update={"content": outcome.text, "response_metadata": meta})

    return build
