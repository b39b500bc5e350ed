"""Merging concurrent requests into engine batches, with backpressure, deadlines and cancellation.

Requests wait in a bounded FIFO. One asyncio task starts engine batches: the oldest waiting
request fixes the options (items with different options cannot share one ``refine`` call),
then every waiting request with the same options joins, up to ``max_batch_items``, waiting
at most ``max_wait_ms`` for company. The batch runs on a single worker thread, so the event
loop keeps accepting, validating and refusing requests while the engine computes.

Streaming: ``Batcher.stream`` yields each request's newly verified tokens and text per item
after every pass, from the same running batch as every other request.

Batching is continuous: between two forward passes the engine asks for more work, and
waiting requests with the same options join the running batch, while others leave it as
soon as their answers are done. No request waits for the slowest row of a batch it is not
in, and the engine does not run half-empty while requests queue. A request with other
options at the head of the queue stops further joins, so the batch drains and it runs next.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
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
    # tokens already delivered per item, so a retried (split) batch does not stream twice,
    # and tokens seen per item in the current engine attempt
    sent: list[int] = field(default_factory=list)
    seen: list[int] = field(default_factory=list)
    queue_span: Any = None
    # set on the engine thread when the job joins a batch
    joined: float = 0.0
    batch_span: Any = None
    batch_size: int = 0  # items decoding in the batch just after it joined
    batch_requests: int = 0
    first_token: float = 0.0  # when its first answer token was verified (engine thread)


Row = tuple[Job, int]  # (job, item index within the job)


@dataclass(eq=False)
class Run:
    """One engine batch as it runs. Only unfinished jobs are held: a batch that never drains
    under steady traffic must not keep every request it ever served."""

    key: OptionsKey
    rows: dict[int, Row] = field(default_factory=dict)  # engine row index -> (job, item), until done
    jobs: list[Job] = field(default_factory=list)  # unfinished jobs, in joining order
    results: dict[int, Any] = field(default_factory=dict)  # engine row index -> result, until its job is done
    engine_rows: dict[int, list[int]] = field(default_factory=dict)  # id(job) -> its engine row indices
    served_items: int = 0
    served_jobs: int = 0

    @property
    def live(self) -> int:
        return len(self.rows) - len(self.results)


class Batcher:
    def __init__(self, engine: Any, config: ServerConfig, metrics: Metrics, tracer: trace.Tracer) -> None:
        self.engine = engine
        self.config = config
        self.metrics = metrics
        self.tracer = tracer
        self._pending: deque[Job] = deque()
        self._mutex = threading.Lock()  # the queue is read by the engine thread too (joins)
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="diffpo-engine")
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._job_s_ema = 1.0  # seconds a request spends in the engine, for Retry-After hints

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
        with self._mutex:
            left = list(self._pending)
            self._pending.clear()
        for job in left:
            if not job.future.done():
                job.future.set_exception(ShuttingDownError("the server is shutting down"))
        self.metrics.waiting.set(0)
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- admission ---------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        return len(self._pending)

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained enough to take one more request."""
        rounds = len(self._pending) / max(self.config.max_batch_items, 1) + 1
        return max(1, math.ceil(self._job_s_ema * rounds))

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

    async def stream(self, items: list[RefineItem], key: OptionsKey, *, timeout: float | None = None) -> AsyncIterator[Any]:
        """Queue the items and yield ``StreamDelta``s as passes verify their tokens.

        Per item the deltas' texts add up to its refined text byte for byte (a kept draft
        prefix first); each item's last delta carries its result, once the whole request is
        done. The job joins a running batch like any other; leaving the loop early (or the
        caller being cancelled) drops its rows from the batch without touching the others.
        """
        from ..engine.streaming import IncrementalDecoder, StreamDelta

        timeout = self.config.request_timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        increments: asyncio.Queue[tuple[int, list[int]] | None] = asyncio.Queue()
        job = Job(
            items=items,
            key=key,
            deadline=time.monotonic() + timeout,
            future=loop.create_future(),
            on_tokens=lambda k, ids: increments.put_nowait((k, ids)),
            parent=otel_context.get_current(),
            sent=[0] * len(items),
        )
        # resolving the future is queued after every increment the engine sent before it
        job.future.add_done_callback(lambda _: increments.put_nowait(None))
        stop_ids = set(getattr(self.engine, "stop_ids", ()))
        keep = key[3]
        prefixes = [self.engine.encode(item, keep)[1] if keep else [] for item in items]
        decoders = [IncrementalDecoder(self.engine.tokenizer, stop_ids) for _ in items]

        def delta(k: int, ids: list[int], result: Any = None) -> Any:
            ids = prefixes[k] + [t for t in ids if t not in stop_ids]
            prefixes[k] = []
            text = decoders[k].step(ids)
            if result is not None:
                text += decoders[k].finish(result.text)
            return StreamDelta(k, ids, text, result)

        self.submit(job)
        try:
            while True:
                try:
                    got = await asyncio.wait_for(increments.get(), max(job.deadline - time.monotonic(), 0))
                except TimeoutError:
                    raise DeadlineExceededError(
                        f"the request did not finish within the server's {timeout:g} s deadline"
                    ) from None
                if got is None:
                    break
                d = delta(*got)
                if d.token_ids or d.text:
                    yield d
            results = job.future.result()
            for k, result in enumerate(results):
                if isinstance(result, BaseException):
                    raise result
                yield delta(k, [], result)
        finally:
            if not job.future.done():
                self.cancel(job)

    def submit(self, job: Job) -> None:
        with self._mutex:
            if len(self._pending) >= self.config.max_queue:
                raise QueueFullError(self.retry_after())
            job.queue_span = self.tracer.start_span("diffpo.server.queue", context=job.parent)
            job.queue_span.set_attribute("diffpo.items", len(job.items))
            self._pending.append(job)
            self.metrics.waiting.set(len(self._pending))
        self._arrived.set()

    def cancel(self, job: Job) -> None:
        """Stop spending compute on a job: unqueue it, or make the engine drop its rows."""
        job.cancelled = True
        with self._mutex:
            try:
                self._pending.remove(job)
            except ValueError:
                queued = False  # already running (the engine polls ``cancelled``) or finished
            else:
                queued = True
            self.metrics.waiting.set(len(self._pending))
        if queued:
            self._end_queue_span(job, cancelled=True)
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
            with self._mutex:
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
        with self._mutex:
            batch = [job for job in batch if job in self._pending]  # cancelled meanwhile: gone
            for job in batch:
                self._pending.remove(job)
            self.metrics.waiting.set(len(self._pending))
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

    def _take_joiners(self, run: Run, room: int) -> list[Job]:
        """Jobs that join the running batch now: the oldest waiting ones with its options, while
        they fit. The first with other options ends the search, so it is not starved."""
        taken: list[Job] = []
        with self._mutex:
            for job in self._pending:
                if job.key != run.key or len(job.items) > room:
                    break
                taken.append(job)
                room -= len(job.items)
            for job in taken:
                self._pending.remove(job)
            self.metrics.waiting.set(len(self._pending))
        return taken

    async def _run_batch(self, batch: list[Job]) -> None:
        jobs = [j for j in batch if not j.future.done()]
        for job in batch:
            if job not in jobs:
                self._end_queue_span(job, cancelled=True)
        if not jobs:
            return
        run = Run(key=jobs[0].key)
        start = time.monotonic()
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._run_engine, run, jobs)
        finally:
            self.metrics.items_running.set(0)
            self.metrics.running.set(0)
        m = self.metrics
        m.batch_duration.observe(time.monotonic() - start)
        m.batch_items.observe(run.served_items)
        m.batch_requests.observe(run.served_jobs)

    def _end_queue_span(self, job: Job, *, cancelled: bool) -> None:
        if job.queue_span is not None:
            job.queue_span.set_attribute("diffpo.cancelled", cancelled)
            job.queue_span.end()
            job.queue_span = None

    # -- the worker thread ---------------------------------------------------------------------

    def _join(self, run: Run, jobs: list[Job]) -> list[RefineItem]:
        """Jobs enter the engine batch: their queue time ends, their batch span starts."""
        now = time.monotonic()
        for job in jobs:
            run.jobs.append(job)
            first = run.served_items
            run.engine_rows[id(job)] = list(range(first, first + len(job.items)))
            run.rows.update((first + k, (job, k)) for k in range(len(job.items)))
            run.served_items += len(job.items)
            run.served_jobs += 1
        for job in jobs:
            job.joined, job.seen = now, [0] * len(job.items)
            job.batch_size, job.batch_requests = run.live, len(run.jobs)
            self._end_queue_span(job, cancelled=False)
            self.metrics.queue_time.observe(now - job.enqueued)
            job.batch_span = self.tracer.start_span("diffpo.engine.batch", context=job.parent)
        self.metrics.items_running.set(run.live)
        self.metrics.running.set(len(run.jobs))
        return [job.items[k] for job in jobs for k in range(len(job.items))]

    def _run_engine(self, run: Run, jobs: list[Job]) -> None:
        """Decode the batch, letting waiting jobs join it between passes; each job's answer goes
        out as soon as its items are done."""

        def more(free: int) -> list[RefineItem]:
            room = min(free, self.config.max_batch_items - run.live)
            joiners = self._take_joiners(run, room) if room > 0 else []
            return self._join(run, joiners) if joiners else []

        def on_result(i: int, result: Any) -> None:
            run.results[i] = result
            job = run.rows[i][0]
            if all(k in run.results for k in run.engine_rows[id(job)]):
                self._finish(run, job)

        items = self._join(run, jobs)
        try:
            returned = self._engine_refine(run.rows, run.key, items, more=more, on_result=on_result)
        except Exception as e:  # noqa: BLE001 (whatever it is, it goes back to its own requests)
            log.warning("an engine batch of %d requests failed (%s): retrying the unfinished ones apart",
                        len(run.jobs), type(e).__name__)
            left = list(run.jobs)
            rows = [(job, k) for job in left for k in range(len(job.items))]
            for (job, k), outcome in zip(rows, self._refine_rows(rows, run.key, e)):
                run.results[run.engine_rows[id(job)][k]] = outcome
            for job in left:
                self._finish(run, job)
            return
        for i, result in enumerate(returned):  # an engine that did not report each result as it went
            if i in run.rows:
                run.results.setdefault(i, result)
        for job in list(run.jobs):
            self._finish(run, job)

    def _finish(self, run: Run, job: Job) -> None:
        """All of a job's items are done: close its span, count it, hand its results back."""
        run.jobs.remove(job)
        indices = run.engine_rows.pop(id(job))
        results = [run.results.pop(i) for i in indices]
        for i in indices:
            del run.rows[i]
        engine_s = time.monotonic() - job.joined
        self._job_s_ema = 0.8 * self._job_s_ema + 0.2 * engine_s
        done = [r for r in results if not isinstance(r, BaseException)]
        passes = max((r.iterations for r in done), default=0)
        tokens = sum(r.new_tokens for r in done)
        m = self.metrics
        for r in done:
            m.item_done(getattr(r, "finish_reason", "stop"), getattr(r, "prompt_tokens", 0), r.new_tokens, r.iterations)
        now = time.monotonic()
        if not any(isinstance(r, BaseException) for r in results):
            m.e2e.observe(now - job.enqueued)
            if tokens:  # an engine that reports no tokens as it goes hands them all over now
                m.ttft.observe((job.first_token or now) - job.enqueued)
        m.items_running.set(run.live)
        m.running.set(len(run.jobs))
        job.stats.update(
            queue_ms=1000 * (job.joined - job.enqueued), engine_ms=1000 * engine_s,
            batch_items=job.batch_size, batch_requests=job.batch_requests, batch_passes=passes,
        )
        span = job.batch_span
        span.set_attributes({
            "diffpo.batch_size": job.batch_size,
            "diffpo.batch_requests": job.batch_requests,
            "diffpo.passes": passes,
            "diffpo.passes_per_token": passes / tokens if tokens else 0.0,
        })
        error = next((r for r in results if isinstance(r, BaseException)), None)
        if error is not None:
            span.record_exception(error)
            span.set_status(trace.StatusCode.ERROR, type(error).__name__)
        span.end()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(_resolve, job.future, results, error)

    def _engine_refine(self, rows: Mapping[int, Row] | list[Row], key: OptionsKey, items: list[RefineItem], **kw: Any) -> list[Any]:
        """``engine.refine`` over ``rows`` with streaming and cancellation wired to their jobs."""
        block_size, max_new_tokens, max_iterations, keep_draft_prefix = key
        loop = self._loop
        lock = threading.Lock()

        def on_tokens(i: int, ids: list[int]) -> None:
            job, k = rows[i]
            if ids and not job.first_token:
                job.first_token = time.monotonic()
            if job.on_tokens is None or loop is None:
                return
            with lock:
                skip = max(0, job.sent[k] - job.seen[k])  # already streamed by an earlier attempt
                job.seen[k] += len(ids)
                fresh = list(ids[skip:])
                job.sent[k] += len(fresh)
            if fresh:
                loop.call_soon_threadsafe(job.on_tokens, k, fresh)

        def is_cancelled(i: int) -> bool:
            job = rows[i][0]
            return job.cancelled or time.monotonic() > job.deadline

        return self.engine.refine(
            items,
            block_size=block_size,
            max_new_tokens=max_new_tokens,
            max_iterations=max_iterations,
            keep_draft_prefix=keep_draft_prefix,
            on_tokens=on_tokens,
            is_cancelled=is_cancelled,
            **kw,
        )

    def _refine_rows(self, rows: list[Row], key: OptionsKey, error: BaseException | None = None) -> list[Any]:
        """Fallback after a failed batch: a result or the exception for each row, in order.

        Out of memory: split the batch in halves and retry each. Any other failure with
        several requests in the batch: retry each request alone, so one bad input fails
        only its own request.
        """
        try:
            if error is not None:
                raise error
            for job, _ in rows:
                job.seen = [0] * len(job.items)
            return list(self._engine_refine(rows, key, [job.items[k] for job, k in rows]))
        except Exception as e:  # noqa: BLE001
            if is_oom(e):
                self.metrics.error("oom")
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


def _resolve(future: asyncio.Future, results: list[Any], error: BaseException | None) -> None:
    if future.done():  # the client went away or its deadline passed
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(results)


def _empty_cache() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
