"""serving/batching.py: one batch at a time, formed when the previous one has returned (plain asyncio, no Ray)."""

from __future__ import annotations

import asyncio
import time

import pytest

from serving.batching import DynamicBatcher


class Recorder:
    """A batch function that takes `seconds` per call and records the batches it was given."""

    def __init__(self, seconds: float, fail_on: object = None):
        self.seconds, self.fail_on, self.batches, self.running = seconds, fail_on, [], 0

    async def __call__(self, items: list) -> list:
        self.running += 1
        assert self.running == 1, "two batches at once"
        try:
            self.batches.append(list(items))
            await asyncio.sleep(self.seconds)
            if self.fail_on in items:
                raise ValueError(f"bad item {self.fail_on}")
            return [i * 10 for i in items]
        finally:
            self.running -= 1


def test_arrivals_during_a_batch_go_in_together():
    """Items that arrive one by one while a batch runs (each further apart than the wait) form full batches
    after it, not one small batch each (what @serve.batch does in Ray 2.60)."""
    async def main():
        fn = Recorder(1.0)  # long enough for all arrivals below to come while it runs, even on a loaded machine
        b = DynamicBatcher(fn, max_batch_size=4, wait_s=0.01)
        first = asyncio.create_task(b.submit(0))
        await asyncio.sleep(0.05)  # the first batch [0] runs
        later = []
        for i in range(1, 7):
            later.append(asyncio.create_task(b.submit(i)))
            await asyncio.sleep(0.02)
        return fn.batches, await first, await asyncio.gather(*later)

    batches, first, later = asyncio.run(main())
    assert batches == [[0], [1, 2, 3, 4], [5, 6]]
    assert first == 0 and later == [10, 20, 30, 40, 50, 60]


def test_an_idle_batcher_waits_for_more_then_runs_what_it_has():
    async def main():
        fn = Recorder(0.01)
        b = DynamicBatcher(fn, max_batch_size=8, wait_s=0.5)
        t0 = time.monotonic()
        a = asyncio.create_task(b.submit(1))
        await asyncio.sleep(0.05)
        c = asyncio.create_task(b.submit(2))  # within the first item's wait: same batch
        out = await asyncio.gather(a, c)
        waited = time.monotonic() - t0
        full = await asyncio.gather(*[b.submit(i) for i in range(8)])  # a full batch does not wait
        return fn.batches, out, waited, full

    batches, out, waited, full = asyncio.run(main())
    assert batches == [[1, 2], list(range(8))] and out == [10, 20] and full == [i * 10 for i in range(8)]
    assert waited >= 0.5


def test_errors_reach_every_submitter_of_the_batch_and_the_next_batch_runs():
    async def main():
        b = DynamicBatcher(Recorder(0.01, fail_on=3), max_batch_size=4, wait_s=0.05)
        bad = await asyncio.gather(*[b.submit(i) for i in (1, 2, 3)], return_exceptions=True)
        return bad, await b.submit(5)

    bad, good = asyncio.run(main())
    assert all(isinstance(e, ValueError) and "bad item 3" in str(e) for e in bad)
    assert good == 50


def test_a_cancelled_item_is_left_out_and_result_counts_are_checked():
    async def main():
        fn = Recorder(1.0)
        b = DynamicBatcher(fn, max_batch_size=4, wait_s=0.0)
        first = asyncio.create_task(b.submit(0))
        await asyncio.sleep(0.05)
        gone = asyncio.create_task(b.submit(1))  # waits behind batch [0]; its request times out
        kept = asyncio.create_task(b.submit(2))
        await asyncio.sleep(0.05)
        gone.cancel()
        await first
        short = DynamicBatcher(lambda items: asyncio.sleep(0, result=[]), max_batch_size=2, wait_s=0.0)
        with pytest.raises(RuntimeError, match="returned 0 results for 1 items"):
            await short.submit(1)
        return fn.batches, await kept

    batches, kept = asyncio.run(main())
    assert batches == [[0], [2]] and kept == 20


def test_bad_settings():
    with pytest.raises(ValueError, match="max_batch_size 0"):
        DynamicBatcher(Recorder(0), max_batch_size=0, wait_s=0.1)
    with pytest.raises(ValueError, match="hold_s -1"):
        DynamicBatcher(Recorder(0), max_batch_size=2, wait_s=0.1, hold_s=-1)


class Starter:
    """A batch function whose batch takes `seconds`, calling the batcher's started() after `start_s` of it (None:
    never), and recording what happened in order."""

    def __init__(self, start_s: float | None, seconds: float):
        self.start_s, self.seconds, self.events, self.batcher = start_s, seconds, [], None

    async def __call__(self, items: list) -> list:
        self.events.append(("run", items))
        if self.start_s is not None:
            await asyncio.sleep(self.start_s)
            self.events.append(("started", items))
            self.batcher.started()
        await asyncio.sleep(self.seconds - (self.start_s or 0))
        self.events.append(("done", items))
        return [i * 10 for i in items]

    async def client(self, i: int) -> int:
        out = await self.batcher.submit(i)
        self.events.append(("answer", i))
        return out


def _two_batches(fn: Starter, hold_s: float) -> tuple[list, float]:
    async def main():
        fn.batcher = DynamicBatcher(fn, max_batch_size=2, wait_s=0.0, hold_s=hold_s)
        t0 = time.monotonic()
        first = [asyncio.create_task(fn.client(i)) for i in (0, 1)]
        await asyncio.sleep(0.05)
        second = [asyncio.create_task(fn.client(i)) for i in (2, 3)]  # queued while [0, 1] runs
        return await asyncio.gather(*first, *second), time.monotonic() - t0

    out, took = asyncio.run(main())
    assert out == [0, 10, 20, 30]
    return fn.events, took


def test_held_answers_go_out_once_the_next_batch_has_started():
    """hold_s: [0, 1]'s answers wait until [2, 3] has called started(), not for it to end; [2, 3]'s go out as soon
    as it ends (nothing is queued behind it), not after hold_s."""
    events, took = _two_batches(Starter(start_s=0.2, seconds=0.5), hold_s=30.0)
    assert events == [("run", [0, 1]), ("started", [0, 1]), ("done", [0, 1]), ("run", [2, 3]),
                      ("started", [2, 3]), ("answer", 0), ("answer", 1), ("done", [2, 3]),
                      ("answer", 2), ("answer", 3)]
    assert took < 30


def test_without_started_answers_are_held_for_hold_s_at_most():
    """A batch function that never calls started(): the previous answers go out hold_s into the next batch (here
    well before it ends); without hold_s they go out as their batch ends."""
    held, _ = _two_batches(Starter(start_s=None, seconds=1.5), hold_s=0.2)
    assert held == [("run", [0, 1]), ("done", [0, 1]), ("run", [2, 3]), ("answer", 0), ("answer", 1),
                    ("done", [2, 3]), ("answer", 2), ("answer", 3)]
    at_once, _ = _two_batches(Starter(start_s=None, seconds=0.3), hold_s=0.0)
    assert at_once == [("run", [0, 1]), ("done", [0, 1]), ("answer", 0), ("answer", 1), ("run", [2, 3]),
                       ("done", [2, 3]), ("answer", 2), ("answer", 3)]
