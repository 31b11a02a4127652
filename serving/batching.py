"""Dynamic batching for the replica (serve.batcher "replica"): single items in, one batch function call per
batch, one batch at a time.

The alternative to `@serve.batch` (serve.batcher "serve", the default): in Ray 2.60 its loop forms the next
batch while the current one runs (a formed batch then waits on a semaphore), and each batch closes
`batch_wait_timeout_s` after its first item. Under load, the clients a batch answers come back one by one while
the next batch runs, so their requests can split into several smaller batches, each a full pipeline call. Here
a batch is formed only when the previous one has returned: what arrived meanwhile goes in together, up to
`max_batch_size`, and the wait applies from the first item's arrival (an item that already waited that long is
not held back). bench/serve_latency.py `--batchers replica,serve` compares the two in one run.

With `hold_s` > 0, a batch's results are handed out only once the next batch has started its main work (`fn`
calls `started()`), or after `hold_s`, or at once when nothing is queued: what the submitters do with their
results (a replica encodes and sends its answers, and their clients' next requests come in) then overlaps the
next batch's GPU-bound part instead of its CPU-bound start, which it would slow (serve.hold_answers_s).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any


class DynamicBatcher:
    """`await submit(item)` returns `fn(batch)[i]` for the item's place i in its batch. `fn` is awaited for one
    batch at a time; an exception from it is raised to every submitter of that batch; an item whose submitter
    was cancelled while it waited (a request timeout) is left out of its batch."""

    def __init__(self, fn: Callable[[list[Any]], Awaitable[list[Any]]], max_batch_size: int, wait_s: float,
                 hold_s: float = 0.0):
        if max_batch_size < 1 or wait_s < 0 or hold_s < 0:
            raise ValueError(f"max_batch_size {max_batch_size} (>= 1), wait_s {wait_s} and hold_s {hold_s} (>= 0)")
        self.fn, self.max_batch_size, self.wait_s, self.hold_s = fn, max_batch_size, wait_s, hold_s
        self._queue: deque[tuple[Any, asyncio.Future, float]] = deque()  # (item, its future, arrival time)
        self._arrived: asyncio.Event | None = None
        self._started: asyncio.Event | None = None  # the running batch's started()
        self._task: asyncio.Task | None = None

    def started(self) -> None:
        """Called by `fn`, on the loop's thread, once its batch has passed its CPU-bound start (with hold_s: the
        previous batch's results go out now)."""
        if self._started is not None:
            self._started.set()

    async def submit(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._arrived = asyncio.Event()
            self._task = loop.create_task(self._run())
        fut = loop.create_future()
        self._queue.append((item, fut, time.monotonic()))
        self._arrived.set()
        return await fut

    def _drop_cancelled(self) -> None:
        self._queue = deque(q for q in self._queue if not q[1].done())

    async def _next_batch(self) -> list[tuple[Any, asyncio.Future]]:
        while True:
            self._drop_cancelled()
            if self._queue:
                break
            self._arrived.clear()
            await self._arrived.wait()
        deadline = self._queue[0][2] + self.wait_s
        while len(self._queue) < self.max_batch_size and (left := deadline - time.monotonic()) > 0:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except TimeoutError:
                break
            self._drop_cancelled()
        batch = []
        while self._queue and len(batch) < self.max_batch_size:
            item, fut, _ = self._queue.popleft()
            if not fut.done():
                batch.append((item, fut))
        return batch

    async def _outcome(self, batch: list[tuple[Any, asyncio.Future]]) -> list[Any] | Exception:
        try:
            results = await self.fn([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"the batch function returned {len(results)} results for {len(batch)} items")
            return results
        except Exception as err:  # to the submitters; the loop goes on with the next batch
            return err

    @staticmethod
    def _hand_out(batch: list[tuple[Any, asyncio.Future]], outcome: list[Any] | Exception) -> None:
        for i, (_, fut) in enumerate(batch):
            if fut.done():  # its submitter was cancelled
                continue
            if isinstance(outcome, Exception):
                fut.set_exception(outcome)
            else:
                fut.set_result(outcome[i])

    async def _run(self) -> None:
        held: tuple[list, list[Any] | Exception] | None = None  # (batch, outcome) not handed out yet (hold_s)
        while True:
            if held is not None:
                self._drop_cancelled()
                if not self._queue:  # no next batch to wait for
                    self._hand_out(*held)
                    held = None
            batch = await self._next_batch()
            if not batch:
                continue
            self._started = asyncio.Event()
            running = asyncio.ensure_future(self._outcome(batch))
            if held is not None:
                started = asyncio.ensure_future(self._started.wait())
                await asyncio.wait([started, running], timeout=self.hold_s, return_when=asyncio.FIRST_COMPLETED)
                started.cancel()
                self._hand_out(*held)
                held = None
            outcome = await running
            if self.hold_s > 0:
                held = (batch, outcome)
            else:
                self._hand_out(batch, outcome)
