"""The coalescer behind the job API's batched INSERTs, SELECTs and publishes: what arrives together
goes out together, and every call still gets its own result or error."""

from __future__ import annotations

import asyncio

import pytest

from app.jobs.coalesce import Coalescer


class Stopped(Exception):
    pass


def make(max_batch: int = 100, fail_on: set[int] | None = None, delay: float = 0.0):
    """A coalescer that doubles numbers, recording its batches; `fail_on` items get a ValueError."""
    batches: list[list[int]] = []

    async def flush(items: list[int]) -> list[int | Exception]:
        batches.append(list(items))
        if delay:
            await asyncio.sleep(delay)
        return [ValueError(f"bad {i}") if fail_on and i in fail_on else i * 2 for i in items]

    return Coalescer(flush, max_batch, Stopped), batches


def test_calls_of_one_tick_share_a_flush_and_get_their_own_results():
    async def scenario():
        coalescer, batches = make(fail_on={3})
        results = await asyncio.gather(*(coalescer.submit(i) for i in range(6)), return_exceptions=True)
        assert batches == [[0, 1, 2, 3, 4, 5]]
        assert results[:3] == [0, 2, 4] and results[4:] == [8, 10]
        assert isinstance(results[3], ValueError) and str(results[3]) == "bad 3"
        assert await coalescer.submit(7) == 14  # a lone call goes out on its own, at once
        assert batches[-1] == [7]

    asyncio.run(scenario())


def test_calls_arriving_during_a_flush_form_the_next_batch_and_max_batch_splits():
    async def scenario():
        coalescer, batches = make(max_batch=3, delay=0.05)
        first = asyncio.ensure_future(coalescer.submit(0))
        await asyncio.sleep(0.01)  # the first batch is in flight now
        later = [asyncio.ensure_future(coalescer.submit(i)) for i in range(1, 6)]
        assert await asyncio.gather(first, *later) == [0, 2, 4, 6, 8, 10]
        assert batches == [[0], [1, 2, 3], [4, 5]]

    asyncio.run(scenario())


def test_a_failing_flush_fails_every_call_of_its_batch_only():
    calls = {"n": 0}

    async def flush(items):
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionError("database down")
        return items

    async def scenario():
        coalescer = Coalescer(flush, 10, Stopped)
        results = await asyncio.gather(*(coalescer.submit(i) for i in range(4)), return_exceptions=True)
        assert all(isinstance(r, ConnectionError) for r in results)
        assert await coalescer.submit(9) == 9

    asyncio.run(scenario())


def test_a_flush_with_the_wrong_number_of_results_is_an_error_not_a_mismatch():
    async def flush(items):
        return items[:-1]

    async def scenario():
        coalescer = Coalescer(flush, 10, Stopped)
        results = await asyncio.gather(*(coalescer.submit(i) for i in range(3)), return_exceptions=True)
        assert all(isinstance(r, RuntimeError) and "gave 2 results" in str(r) for r in results)

    asyncio.run(scenario())


def test_a_caller_gone_before_its_batch_is_taken_is_not_flushed():
    async def scenario():
        coalescer, batches = make(delay=0.05)
        first = asyncio.ensure_future(coalescer.submit(1))
        await asyncio.sleep(0.01)
        gone = asyncio.ensure_future(coalescer.submit(2))
        stays = asyncio.ensure_future(coalescer.submit(3))
        await asyncio.sleep(0)
        gone.cancel()
        assert await first == 2 and await stays == 6
        assert batches == [[1], [3]]

    asyncio.run(scenario())


def test_close_lets_the_batch_in_flight_finish_then_refuses():
    async def scenario():
        coalescer, batches = make(delay=0.05)
        pending = asyncio.ensure_future(coalescer.submit(4))
        await asyncio.sleep(0.01)
        await coalescer.close()
        assert pending.done() and pending.result() == 8
        with pytest.raises(Stopped):
            await coalescer.submit(5)
        assert batches == [[4]]

    asyncio.run(scenario())
