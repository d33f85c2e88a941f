"""Token-budget dynamic batching of inputs from concurrent requests (asyncio, no Ray).

Requests hand their inputs (texts, or token ids) with token counts to
:meth:`TokenBudgetBatcher.embed`; one worker task pools the inputs of all waiting requests and
flushes a batch as soon as it holds ``max_batch_size`` inputs or ``max_batch_tokens`` tokens, or
the oldest input has waited ``batch_wait_timeout_s``. Inside a batch, inputs are sorted by length
and cut into forward passes whose padded size (rows x longest row) stays within
``max_batch_tokens``, so one long text never pads hundreds of short ones. The encode function
runs in a worker thread, so the event loop (health checks, parsing of new requests) stays
responsive while a batch computes; results are routed back to each request in its own order::

    >>> import asyncio, numpy as np
    >>> def encode(texts):                       # runs in the batcher's thread
    ...     return np.array([[len(t)] for t in texts], dtype=np.float32)
    >>> async def main():
    ...     batcher = TokenBudgetBatcher(encode, BatchLimits(max_batch_size=8, max_batch_tokens=64,
    ...                                                      wait_timeout_s=0.01))
    ...     a, b = await asyncio.gather(batcher.embed(["a", "bbb"], [1, 3]), batcher.embed(["cc"], [2]))
    ...     batcher.close()
    ...     return a.ravel().tolist(), b.ravel().tolist(), batcher.stats.max_requests_per_batch
    >>> asyncio.run(main())
    ([1.0, 3.0], [2.0], 2)
"""

from __future__ import annotations

import asyncio
import collections
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Generic, Sequence, TypeVar

import numpy as np

__all__ = ["BatchLimits", "BatchReport", "BatchStats", "TokenBudgetBatcher", "plan_forward_passes"]

InputT = TypeVar("InputT")


@dataclass(frozen=True)
class BatchLimits:
    max_batch_size: int
    max_batch_tokens: int
    wait_timeout_s: float


@dataclass(frozen=True)
class BatchReport:
    """One executed batch, for metrics (``inputs`` = texts)."""

    inputs: int
    tokens: int
    requests: int
    seconds: float


@dataclass
class BatchStats:
    """Running totals over all batches of a batcher."""

    batches: int = 0
    inputs: int = 0
    tokens: int = 0
    max_requests_per_batch: int = 0
    max_inputs_per_batch: int = 0

    def add(self, report: BatchReport) -> None:
        self.batches += 1
        self.inputs += report.inputs
        self.tokens += report.tokens
        self.max_requests_per_batch = max(self.max_requests_per_batch, report.requests)
        self.max_inputs_per_batch = max(self.max_inputs_per_batch, report.inputs)


def plan_forward_passes(token_counts: Sequence[int], max_padded_tokens: int, max_rows: int) -> list[list[int]]:
    """Group indices into forward passes: longest first, each pass within rows x longest <= budget.

    >>> plan_forward_passes([3, 10, 2, 9], max_padded_tokens=20, max_rows=8)
    [[1, 3], [0, 2]]
    """
    order = sorted(range(len(token_counts)), key=lambda i: -token_counts[i])
    passes: list[list[int]] = []
    for i in order:
        current = passes[-1] if passes else None
        # Sorted longest first, so the first row of a pass sets its padded length.
        if current and len(current) < max_rows and (len(current) + 1) * token_counts[current[0]] <= max_padded_tokens:
            current.append(i)
        else:
            passes.append([i])
    return passes


@dataclass
class _PendingRequest:
    future: asyncio.Future[np.ndarray]
    vectors: list[np.ndarray | None]
    remaining: int

    def deliver(self, position: int, vector: np.ndarray) -> None:
        if self.future.done():  # cancelled by a disconnected client, or failed in another batch
            return
        self.vectors[position] = vector
        self.remaining -= 1
        if self.remaining == 0:
            self.future.set_result(np.stack(self.vectors))  # type: ignore[arg-type]

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)


@dataclass
class _PendingInput(Generic[InputT]):
    request: _PendingRequest
    position: int
    value: InputT
    tokens: int
    enqueued_at: float = field(default_factory=time.monotonic)


class TokenBudgetBatcher(Generic[InputT]):
    """Pools inputs of concurrent requests into batches bounded by count and by tokens.

    ``encode`` maps a list of inputs to a ``[n, dim]`` array; it is called once per forward pass,
    always from the same worker thread.
    """

    def __init__(self, encode: Callable[[list[InputT]], np.ndarray], limits: BatchLimits,
                 on_batch: Callable[[BatchReport], None] | None = None) -> None:
        self._encode = encode
        self._limits = limits
        self._on_batch = on_batch
        self._queue: collections.deque[_PendingInput[InputT]] = collections.deque()
        self._queued_tokens = 0
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed-batch")
        self.stats = BatchStats()

    async def embed(self, inputs: Sequence[InputT], token_counts: Sequence[int]) -> np.ndarray:
        """Embed ``inputs`` (with their token counts) as part of whatever batches form."""
        if len(inputs) != len(token_counts):
            raise ValueError(f"{len(inputs)} inputs but {len(token_counts)} token counts")
        if not inputs:
            raise ValueError("no inputs to embed")
        self._ensure_worker()
        loop = asyncio.get_running_loop()
        request = _PendingRequest(future=loop.create_future(), vectors=[None] * len(inputs), remaining=len(inputs))
        for position, (value, tokens) in enumerate(zip(inputs, token_counts)):
            self._queue.append(_PendingInput(request, position, value, int(tokens)))
            self._queued_tokens += int(tokens)
        assert self._wakeup is not None
        self._wakeup.set()
        return await request.future

    def close(self) -> None:
        """Stop the worker; pending requests fail with ``CancelledError``."""
        if self._worker is not None:
            self._worker.cancel()
        for item in self._queue:
            item.request.future.cancel()
        self._queue.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ worker
    def _ensure_worker(self) -> None:
        if self._worker is None or self._worker.done():
            self._wakeup = asyncio.Event()
            self._worker = asyncio.get_running_loop().create_task(self._run(), name="embed-batcher")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wait_for_batch()
            batch = self._take_batch()
            if not batch:
                continue
            started = time.perf_counter()
            values = [item.value for item in batch]
            tokens = [item.tokens for item in batch]
            try:
                vectors = await loop.run_in_executor(self._executor, self._encode_batch, values, tokens)
            except Exception as err:  # the model failed (e.g. out of memory): fail these requests, keep serving
                for item in batch:
                    item.request.fail(err)
                continue
            for item, vector in zip(batch, vectors):
                item.request.deliver(item.position, vector)
            report = BatchReport(inputs=len(batch), tokens=sum(tokens), requests=len({id(i.request) for i in batch}),
                                 seconds=time.perf_counter() - started)
            self.stats.add(report)
            if self._on_batch is not None:
                self._on_batch(report)

    async def _wait_for_batch(self) -> None:
        """Return when the queue holds a full batch or its oldest input has waited long enough."""
        assert self._wakeup is not None
        while not self._queue:
            self._wakeup.clear()
            await self._wakeup.wait()
        deadline = self._queue[0].enqueued_at + self._limits.wait_timeout_s
        while not self._budget_reached():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                return

    def _budget_reached(self) -> bool:
        return (len(self._queue) >= self._limits.max_batch_size
                or self._queued_tokens >= self._limits.max_batch_tokens)

    def _take_batch(self) -> list[_PendingInput[InputT]]:
        """Oldest inputs first, up to the count and token budgets (always at least one input)."""
        batch: list[_PendingInput[InputT]] = []
        tokens = 0
        while self._queue and len(batch) < self._limits.max_batch_size:
            item = self._queue[0]
            if batch and tokens + item.tokens > self._limits.max_batch_tokens:
                break
            self._queue.popleft()
            self._queued_tokens -= item.tokens
            if item.request.future.done():  # its client went away; skip the work
                continue
            batch.append(item)
            tokens += item.tokens
        return batch

    def _encode_batch(self, values: list[InputT], tokens: list[int]) -> np.ndarray:
        passes = plan_forward_passes(tokens, self._limits.max_batch_tokens, self._limits.max_batch_size)
        out: np.ndarray | None = None
        for indices in passes:
            vectors = self._encode([values[i] for i in indices])
            if out is None:
                out = np.empty((len(values), vectors.shape[1]), dtype=np.float32)
            out[indices] = vectors
        assert out is not None
        return out
