"""Merging concurrent requests into engine batches, with backpressure, deadlines and cancellation.

Requests wait in a bounded FIFO. One asyncio task forms batches: the oldest waiting request
fixes the options (items with different options cannot share one ``refine`` call), then
every waiting request with the same options joins, up to ``max_batch_items``, waiting at
most ``max_wait_ms`` for company. The batch runs on a single worker thread, so the event
loop keeps accepting, validating and refusing requests while the engine computes.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace

from ..protocol import BlockSize, RefineItem
from .config import ServerConfig
from .metrics import Metrics

log = logging.getLogger(__name__)

#: (block_size, max_new_tokens, max_iterations, keep_draft_prefix): what one ``refine`` call shares.
OptionsKey = tuple[BlockSize, int, int | None, int]


class QueueFullError(Exception):
    """The queue is at capacity: answer 429 now rather than let the client hang."""

    def __init__(self, retry_after: int):
        super().__init__(f"the refiner queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


class DeadlineExceededError(Exception):
    """The request ran past the server's per-request deadline and was dropped."""


class ShuttingDownError(Exception):
    """The server stopped before the request ran."""


class OutOfMemoryError(Exception):
    """One item alone did not fit in accelerator memory, even after splitting its batch."""


def is_oom(exc: BaseException) -> bool:
    """CUDA (or other accelerator) out-of-memory, whichever way torch reports it."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


@dataclass(eq=False)
class Job:
    """One request's items on their way through the queue and the engine."""

    items: list[RefineItem]
    key: OptionsKey
    deadline: float  # time.monotonic()
    future: asyncio.Future
    #: Called on the event loop as (item index, newly decided token ids); for streaming.
    on_tokens: Callable[[int, list[int]], None] | None = None
    parent: otel_context.Context | None = None
    enqueued: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    #: Filled when the batch runs: queue_ms, engine_ms, batch_items, batch_requests, batch_passes.
    stats: dict[str, float] = field(default_factory=dict)
    # tokens already delivered per item, so a retried (split) batch does not stream twice
    sent: list[int] = field(default_factory=list)
    queue_span: Any = None


Row = tuple[Job, int]  # (job, item index within the job)


class Batcher:
    def __init__(self, engine: Any, config: ServerConfig, metrics: Metrics, tracer: trace.Tracer) -> None:
        self.engine = engine
        self.config = config
        self.metrics = metrics
        self.tracer = tracer
        self._pending: deque[Job] = deque()
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="diffpo-engine")
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._batch_s_ema = 1.0  # seconds per batch, for Retry-After hints

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._worker(), name="diffpo-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        while self._pending:
            job = self._pending.popleft()
            if not job.future.done():
                job.future.set_exception(ShuttingDownError("the server is shutting down"))
        self.metrics.queue_depth.set(0)
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- admission ---------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        return len(self._pending)

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained enough to take one more request."""
        batches = len(self._pending) / max(self.config.max_batch_items, 1) + 1
        return max(1, math.ceil(self._batch_s_ema * batches))

    async def refine(
        self,
        items: list[RefineItem],
        key: OptionsKey,
        *,
        timeout: float | None = None,
        on_tokens: Callable[[int, list[int]], None] | None = None,
    ) -> tuple[list[Any], dict[str, float]]:
        """Queue the items, wait for their results; cancelling the caller drops them."""
        timeout = self.config.request_timeout if timeout is None else timeout
        job = Job(
            items=items,
            key=key,
            deadline=time.monotonic() + timeout,
            future=asyncio.get_running_loop().create_future(),
            on_tokens=on_tokens,
            parent=otel_context.get_current(),
            sent=[0] * len(items),
        )
        self.submit(job)
        try:
            results = await asyncio.wait_for(asyncio.shield(job.future), max(job.deadline - time.monotonic(), 0))
        except TimeoutError:
            self.cancel(job)
            raise DeadlineExceededError(
                f"the request did not finish within the server's {timeout:g} s deadline"
            ) from None
        except asyncio.CancelledError:  # client went away
            self.cancel(job)
            raise
        return results, job.stats

    def submit(self, job: Job) -> None:
        if len(self._pending) >= self.config.max_queue:
            raise QueueFullError(self.retry_after())
        job.queue_span = self.tracer.start_span("diffpo.server.queue", context=job.parent)
        job.queue_span.set_attribute("diffpo.items", len(job.items))
        self._pending.append(job)
        self.metrics.queue_depth.set(len(self._pending))
        self._arrived.set()

    def cancel(self, job: Job) -> None:
        """Stop spending compute on a job: unqueue it, or make the engine drop its rows."""
        job.cancelled = True
        try:
            self._pending.remove(job)
        except ValueError:
            pass  # already running (the engine polls ``cancelled``) or finished
        else:
            self._end_queue_span(job, cancelled=True)
        self.metrics.queue_depth.set(len(self._pending))
        if not job.future.done():
            job.future.cancel()

    # -- batching ----------------------------------------------------------------------------

    async def _worker(self) -> None:
        while True:
            batch = await self._next_batch()
            try:
                await self._run_batch(batch)
            except Exception:  # never let one batch kill the worker
                log.exception("engine batch failed outside the engine")
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(RuntimeError("internal error while running the batch"))

    async def _next_batch(self) -> list[Job]:
        max_wait = self.config.max_wait_ms / 1000
        while True:
            while not self._pending:
                self._arrived.clear()
                await self._arrived.wait()
            first = self._pending[0]
            batch = self._collect(first.key)
            remaining = first.enqueued + max_wait - time.monotonic()
            if sum(len(j.items) for j in batch) >= self.config.max_batch_items or remaining <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                pass
        for job in batch:
            self._pending.remove(job)
        self.metrics.queue_depth.set(len(self._pending))
        return batch

    def _collect(self, key: OptionsKey) -> list[Job]:
        """Waiting jobs with these options, oldest first, up to the batch size (the first always fits)."""
        batch: list[Job] = []
        total = 0
        for job in self._pending:
            if job.key != key:
                continue
            if batch and total + len(job.items) > self.config.max_batch_items:
                continue
            batch.append(job)
            total += len(job.items)
            if total >= self.config.max_batch_items:
                break
        return batch

    async def _run_batch(self, batch: list[Job]) -> None:
        start = time.monotonic()
        jobs = [j for j in batch if not j.future.done()]
        for job in batch:
            self._end_queue_span(job, cancelled=job not in jobs)
        if not jobs:
            return
        rows: list[Row] = [(job, k) for job in jobs for k in range(len(job.items))]
        m = self.metrics
        for job in jobs:
            m.queue_wait.observe(start - job.enqueued)
        m.batch_items.observe(len(rows))
        m.batch_requests.observe(len(jobs))
        m.inflight_items.set(len(rows))
        spans = [self.tracer.start_span("diffpo.engine.batch", context=job.parent) for job in jobs]
        try:
            outcomes = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._refine_rows, rows, jobs[0].key
            )
        finally:
            m.inflight_items.set(0)
        engine_s = time.monotonic() - start
        m.batch_seconds.observe(engine_s)
        self._batch_s_ema = 0.8 * self._batch_s_ema + 0.2 * engine_s

        done = [o for o in outcomes if not isinstance(o, BaseException)]
        passes = max((o.iterations for o in done), default=0)
        tokens = sum(o.new_tokens for o in done)
        for o in done:
            m.tokens.inc(o.new_tokens)
            if o.iterations:
                m.passes_per_token.observe(o.iterations / max(o.new_tokens, 1))
                m.tokens_per_pass.observe(o.new_tokens / o.iterations)
        batch_attrs = {
            "diffpo.batch_size": len(rows),
            "diffpo.batch_requests": len(jobs),
            "diffpo.passes": passes,
            "diffpo.tokens_per_pass": tokens / passes if passes else 0.0,
        }
        by_job: dict[int, list[Any]] = {}
        for (job, _), outcome in zip(rows, outcomes):
            by_job.setdefault(id(job), []).append(outcome)
        for job, span in zip(jobs, spans):
            results = by_job[id(job)]
            job.stats.update(
                queue_ms=1000 * (start - job.enqueued), engine_ms=1000 * engine_s,
                batch_items=len(rows), batch_requests=len(jobs), batch_passes=passes,
            )
            span.set_attributes(batch_attrs)
            error = next((r for r in results if isinstance(r, BaseException)), None)
            if error is not None:
                span.record_exception(error)
                span.set_status(trace.StatusCode.ERROR, type(error).__name__)
            span.end()
            if job.future.done():
                continue
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(results)

    def _end_queue_span(self, job: Job, *, cancelled: bool) -> None:
        if job.queue_span is not None:
            job.queue_span.set_attribute("diffpo.cancelled", cancelled)
            job.queue_span.end()
            job.queue_span = None

    # -- the worker thread ---------------------------------------------------------------------

    def _refine_rows(self, rows: list[Row], key: OptionsKey) -> list[Any]:
        """Run rows through the engine; a result or the exception for each row, in order.

        Out of memory: split the batch in halves and retry each. Any other failure with
        several requests in the batch: retry each request alone, so one bad input fails
        only its own request.
        """
        try:
            return list(self._call_engine(rows, key))
        except Exception as e:  # noqa: BLE001 (whatever it is, it goes back to its own request)
            if is_oom(e):
                self.metrics.errors.labels("oom").inc()
                _empty_cache()
                if len(rows) > 1:
                    self.metrics.oom_splits.inc()
                    mid = len(rows) // 2
                    log.warning("out of memory on a batch of %d items: splitting it in two", len(rows))
                    return self._refine_rows(rows[:mid], key) + self._refine_rows(rows[mid:], key)
                return [OutOfMemoryError("the refiner ran out of accelerator memory on this item alone; retry later")]
            jobs = list(dict.fromkeys(job for job, _ in rows))
            if len(jobs) > 1:
                log.warning("a batch of %d requests failed (%s): retrying each alone", len(jobs), type(e).__name__)
                out: list[Any] = []
                for job in jobs:
                    out += self._refine_rows([r for r in rows if r[0] is job], key)
                return out
            return [e] * len(rows)

    def _call_engine(self, rows: list[Row], key: OptionsKey) -> list[Any]:
        block_size, max_new_tokens, max_iterations, keep_draft_prefix = key
        seen = [0] * len(rows)  # tokens seen per row in this attempt
        loop = self._loop
        lock = threading.Lock()

        def on_tokens(i: int, ids: list[int]) -> None:
            job, k = rows[i]
            if job.on_tokens is None or loop is None:
                return
            with lock:
                skip = max(0, job.sent[k] - seen[i])  # already streamed by an earlier attempt
                seen[i] += len(ids)
                fresh = list(ids[skip:])
                job.sent[k] += len(fresh)
            if fresh:
                loop.call_soon_threadsafe(job.on_tokens, k, fresh)

        def is_cancelled(i: int) -> bool:
            job = rows[i][0]
            return job.cancelled or time.monotonic() > job.deadline

        return self.engine.refine(
            [job.items[k] for job, k in rows],
            block_size=block_size,
            max_new_tokens=max_new_tokens,
            max_iterations=max_iterations,
            keep_draft_prefix=keep_draft_prefix,
            on_tokens=on_tokens if any(job.on_tokens for job, _ in rows) else None,
            is_cancelled=is_cancelled,
        )


def _empty_cache() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
