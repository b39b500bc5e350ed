"""``RefinerEngine``: the refiner model plus the Jacobi decoder behind one ``refine`` call."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ContextLengthError, InvalidRequestError
from ..protocol import BlockSize, RefinedItem, RefineItem, RefineOptions, coerce_items
from . import templating
from .alignment import Draft, Spelling
from .jacobi import jacobi_decode
from .loading import load_model_and_tokenizer, resolve_device, resolve_dtype
from .policy import BlockPolicy
from .row import Row
from .streaming import IncrementalDecoder, StreamDelta


@dataclass
class RefineResult:
    """One refined answer. ``token_ids`` and ``text`` hold the whole answer (any kept draft
    prefix first), without the stop token; ``iterations`` counts forward passes."""

    text: str
    token_ids: list[int]
    iterations: int
    new_tokens: int
    converged: bool
    finish_reason: str
    timing: dict[str, float] = field(default_factory=dict)
    prompt_tokens: int = 0

    @property
    def passes_per_token(self) -> float:
        return self.iterations / max(self.new_tokens, 1)

    def to_wire(self, with_token_ids: bool = False) -> RefinedItem:
        return RefinedItem(
            text=self.text,
            token_ids=self.token_ids if with_token_ids else None,
            iterations=self.iterations,
            new_tokens=self.new_tokens,
            converged=self.converged,
            finish_reason="stop" if self.finish_reason == "stop" else "length",
            prompt_tokens=self.prompt_tokens,
        )


def clamp_block(block_size: BlockSize, max_new_tokens: int) -> BlockSize:
    """A block wider than the whole answer decodes the whole answer: clamp it to
    ``max_new_tokens``, so a client set up once with ``block_size=64`` also works on short answers."""
    if isinstance(block_size, int) and not isinstance(block_size, bool) and max_new_tokens >= 1:
        return min(block_size, max_new_tokens)
    return block_size


class RefinerEngine:
    """A loaded refiner. Thread-safe: concurrent ``refine`` calls run one batch at a time."""

    def __init__(self, model: Any, tokenizer: Any, *, name: str | None = None, max_batch_size: int = 32) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_name = name or getattr(model.config, "_name_or_path", None) or "refiner"
        self.max_batch_size = max_batch_size
        self.device = next(model.parameters()).device
        self.pad_id = templating.ensure_pad_token(tokenizer)
        self.stop_ids = templating.stop_token_ids(tokenizer, model.config, getattr(model, "generation_config", None))
        # what follows a draft in the initial guess: the end-of-turn/EOS token
        self.eot = self.pad_id if self.pad_id in self.stop_ids else min(self.stop_ids)
        self.max_context = int(getattr(model.config, "max_position_embeddings", 0) or 0) or 1 << 20
        self.spelling = Spelling.of(tokenizer)
        self.policy = BlockPolicy()
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        device: str = "auto",
        dtype: str | torch.dtype = "auto",
        adapter: str | None = None,
        gguf_file: str | None = None,
        max_batch_size: int = 32,
        calibrate: bool = True,
    ) -> RefinerEngine:
        """Load a refiner: hub id, local folder, ``.gguf`` file or a built-in name.

        The built-in names are ``smollm2-135m-instruct`` (untrained) and ``smollm2-135m-diffpo``
        (a trained LoRA adapter on it, merged at load). ``adapter`` puts a PEFT LoRA adapter on
        top (merged for speed). ``calibrate`` times a few passes so the adaptive block size knows
        this device from the first request.
        """
        dev = resolve_device(device)
        model, tokenizer, name = load_model_and_tokenizer(
            name_or_path, device=dev, dtype=resolve_dtype(dtype, dev), adapter=adapter, gguf_file=gguf_file
        )
        engine = cls(model, tokenizer, name=name, max_batch_size=max_batch_size)
        if calibrate:
            engine.policy.calibrate(engine.model, engine.device)
        return engine

    # -- input -----------------------------------------------------------------------------

    def encode(self, item: RefineItem, keep_draft_prefix: int = 0) -> tuple[list[int], list[int], list[int]]:
        """(prompt ids, kept draft prefix ids, remaining draft ids) for one item."""
        prompt = templating.prompt_ids(self.tokenizer, item.conversation())
        draft = templating.draft_ids(self.tokenizer, item.draft)
        return prompt, draft[:keep_draft_prefix], draft[keep_draft_prefix:]

    def check_items(
        self, items: Sequence[RefineItem | dict[str, Any]], *, max_new_tokens: int = 256, keep_draft_prefix: int = 0
    ) -> list[RefineItem]:
        """Validate items cheaply (tokenizing only): roles, turn order, context length."""
        parsed = self._parse(items)
        for n, item in enumerate(parsed):
            prompt, kept, _ = self.encode(item, keep_draft_prefix)
            self._check_length(n, len(prompt) + len(kept), max_new_tokens)
        return parsed

    def _parse(self, items: Sequence[RefineItem | dict[str, Any]]) -> list[RefineItem]:
        try:
            return coerce_items(list(items))
        except ValueError as e:  # pydantic.ValidationError is a ValueError
            raise InvalidRequestError(str(e)) from e

    def _check_length(self, n: int, prompt_len: int, max_new_tokens: int) -> None:
        if prompt_len + max_new_tokens > self.max_context:
            raise ContextLengthError(
                f"item {n}: prompt of {prompt_len} tokens plus max_new_tokens={max_new_tokens} exceeds "
                f"the refiner's context of {self.max_context} tokens; shorten the conversation or lower max_new_tokens"
            )

    # -- refinement ------------------------------------------------------------------------

    def refine(
        self,
        items: Sequence[RefineItem | dict[str, Any]],
        *,
        block_size: BlockSize = "auto",
        max_new_tokens: int = 256,
        max_iterations: int | None = None,
        keep_draft_prefix: int = 0,
        on_tokens: Callable[[int, list[int]], None] | None = None,
        is_cancelled: Callable[[int], bool] | None = None,
        more: Callable[[int], Sequence[RefineItem | dict[str, Any]]] | None = None,
        on_result: Callable[[int, RefineResult], None] | None = None,
    ) -> list[RefineResult]:
        """Refine each item's draft for its conversation; one result per item, in order.

        Run to convergence (``max_iterations=None``) the answer equals the refiner's greedy
        decoding of the prompt, whatever the block size, the batch or the draft. Items are
        decoded together in batches of up to ``max_batch_size`` rows.

        ``on_result(i, result)`` hands over each result as soon as its item is done.
        Continuous batching, for servers: ``more(n)`` is asked between passes for up to n
        items that join the running batch with the same options. They are numbered after the
        items before them in the callbacks, and their results go out through ``on_result``
        only (the returned list holds the items passed in), so a batch that never drains
        keeps nothing of the items it finished.
        """
        block_size = clamp_block(block_size, max_new_tokens)
        try:
            opts = RefineOptions(
                block_size=block_size,
                max_new_tokens=max_new_tokens,
                max_iterations=max_iterations,
                keep_draft_prefix=keep_draft_prefix,
            )
        except ValueError as e:
            raise InvalidRequestError(str(e)) from e
        if more is not None and on_result is None:
            raise InvalidRequestError("more= needs on_result=: items that join are handed over only through it")
        # Items not yet done, by index: (row, kept draft prefix, start). Only the results of the
        # items passed in are kept for the return value, so a batch that never drains stays small.
        pending: dict[int, tuple[Row, list[int], float]] = {}
        results: dict[int, RefineResult] = {}
        count = 0

        def add(items: Sequence[RefineItem | dict[str, Any]]) -> list[int]:
            nonlocal count
            first = count
            for n, item in enumerate(self._parse(items), first):
                prompt, prefix, draft = self.encode(item, opts.keep_draft_prefix)
                self._check_length(n, len(prompt) + len(prefix), opts.max_new_tokens)
                guess = self.initial_guess(draft, opts.max_new_tokens)
                row = Row(prompt=prompt + prefix, guess=guess, draft=Draft(draft, self.spelling))
                pending[n] = (row, prefix, time.perf_counter())
                count = n + 1
            return list(range(first, count))

        def finish(i: int) -> None:
            row, prefix, t0 = pending.pop(i)
            result = self.result_of(row, prefix, time.perf_counter() - t0)
            if i < n_items:
                results[i] = result
            if on_result is not None:
                on_result(i, result)

        block = None if opts.block_size == "auto" else int(opts.block_size)
        n_items = len(add(items))
        with self._lock:
            for start in range(0, n_items, self.max_batch_size):
                size = min(self.max_batch_size, n_items - start)
                # the decoder numbers rows 0..size-1, then joiners on; items that join are
                # numbered from `count` on, in the same order
                index = (lambda j, start=start, size=size, base=count: start + j if j < size else base + j - size)

                def admit(live: int) -> list[Row]:
                    if live >= self.max_batch_size:
                        return []
                    return [pending[i][0] for i in add(more(self.max_batch_size - live))]

                for i in range(start, start + size):
                    row, prefix, _ = pending[i]
                    pending[i] = (row, prefix, time.perf_counter())
                jacobi_decode(
                    self.model,
                    [pending[i][0] for i in range(start, start + size)],
                    stop_ids=self.stop_ids,
                    pad_id=self.pad_id,
                    max_new_tokens=opts.max_new_tokens,
                    block_size=block,
                    max_iterations=opts.max_iterations,
                    policy=self.policy if block is None else None,
                    on_tokens=None if on_tokens is None else (lambda j, t, f=index: on_tokens(f(j), t)),
                    is_cancelled=None if is_cancelled is None else (lambda j, f=index: is_cancelled(f(j))),
                    admit=None if more is None else admit,
                    on_finish=lambda j, f=index: finish(f(j)),
                )
        return [results[i] for i in range(n_items)]

    def refine_stream(
        self,
        items: Sequence[RefineItem | dict[str, Any]],
        *,
        block_size: BlockSize = "auto",
        max_new_tokens: int = 256,
        max_iterations: int | None = None,
        keep_draft_prefix: int = 0,
    ) -> Iterator[StreamDelta]:
        """``refine`` as a stream: after each pass, a ``StreamDelta`` per item that verified
        tokens, and one last delta per item carrying its ``RefineResult``.

        Per item the deltas' texts add up to ``result.text`` byte for byte, and their token
        ids to ``result.token_ids`` (a kept draft prefix comes first). Decoding runs on a
        worker thread; closing the generator early cancels the items not yet done.
        """
        parsed = self.check_items(items, max_new_tokens=max_new_tokens, keep_draft_prefix=keep_draft_prefix)
        events: queue.Queue[tuple[str, Any, Any]] = queue.Queue()
        closed = threading.Event()
        options = dict(block_size=block_size, max_new_tokens=max_new_tokens, max_iterations=max_iterations,
                       keep_draft_prefix=keep_draft_prefix)

        def run() -> None:
            try:
                self.refine(parsed, **options, on_tokens=lambda i, t: events.put(("tokens", i, t)),
                            on_result=lambda i, r: events.put(("result", i, r)), is_cancelled=lambda i: closed.is_set())
            except BaseException as e:  # noqa: BLE001 (re-raised in the caller's thread)
                events.put(("error", e, None))
            else:
                events.put(("end", None, None))

        worker = threading.Thread(target=run, name="diffpo-refine-stream", daemon=True)
        worker.start()
        decoders = [IncrementalDecoder(self.tokenizer, self.stop_ids) for _ in parsed]
        prefixes = [self.encode(item, keep_draft_prefix)[1] for item in parsed]
        try:
            while True:
                kind, i, payload = events.get()
                if kind == "end":
                    return
                if kind == "error":
                    raise i
                ids = [t for t in payload if t not in self.stop_ids] if kind == "tokens" else []
                if prefixes[i] is not None:  # the kept draft prefix opens the answer
                    ids, prefixes[i] = prefixes[i] + ids, None
                text = decoders[i].step(ids)
                if kind == "result":
                    yield StreamDelta(i, ids, text + decoders[i].finish(payload.text), result=payload)
                elif ids or text:
                    yield StreamDelta(i, ids, text)
        finally:
            closed.set()
            worker.join()

    def generate(self, item: RefineItem | dict[str, Any], *, max_new_tokens: int = 256) -> RefineResult:
        """The baseline every speed figure is measured against: transformers' greedy
        ``generate`` with its KV cache, ignoring the draft (one pass per token)."""
        (parsed,) = self._parse([item])
        prompt, _, _ = self.encode(parsed)
        ids = torch.tensor([prompt], device=self.device)
        t0 = time.perf_counter()
        with self._lock, torch.inference_mode():
            out = self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                eos_token_id=sorted(self.stop_ids),
                pad_token_id=self.pad_id,
            )[0, len(prompt) :].tolist()
        row = Row(prompt=prompt, guess=[])
        for t in out:
            row.answer.append(t)
            if t in self.stop_ids:
                row.finish_reason = "stop"
                break
        row.iterations = len(row.answer)
        return self.result_of(row, [], time.perf_counter() - t0)

    def initial_guess(self, draft: list[int], n: int) -> list[int]:
        """The draft cut or padded to N positions; the stop token right after it lets a
        refiner that agrees with the draft verify the end in the same pass."""
        return draft[:n] + [self.eot] * max(0, n - len(draft))

    def result_of(self, row: Row, prefix: list[int], seconds: float) -> RefineResult:
        """A decoded row as a result: the kept prefix first, the stop token cut, the text decoded."""
        answer = row.answer[:-1] if row.answer and row.answer[-1] in self.stop_ids else row.answer
        ids = prefix + answer
        return RefineResult(
            text=self.tokenizer.decode(ids, skip_special_tokens=True),
            token_ids=ids,
            iterations=row.iterations,
            new_tokens=len(row.answer),
            converged=row.converged,
            finish_reason=row.finish_reason or "length",
            timing={"batch_s": seconds},  # from joining the batch to done
            prompt_tokens=len(row.prompt),
        )
