"""Database reads shared by a burst of requests (llmservice/lookups.py): one query while it runs,
never a cached answer afterwards."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from llmservice.lookups import shared_query


def counting(result=None, error=None, seconds=0.05):
    calls = []

    def query():
        calls.append(threading.current_thread().name)
        time.sleep(seconds)
        if error is not None:
            raise error
        return result

    return query, calls


def test_callers_asking_together_share_one_query_and_later_ones_run_their_own():
    query, calls = counting(result={"row": 1})

    async def main():
        together = await asyncio.gather(*(shared_query("k", query) for _ in range(16)))
        later = await shared_query("k", query)
        return together, later

    together, later = asyncio.run(main())
    assert len(calls) == 2  # one for the sixteen, one for the caller that came after
    assert all(r is together[0] for r in together) and later == {"row": 1}


def test_different_questions_are_not_shared():
    query_a, calls_a = counting(result="a")
    query_b, calls_b = counting(result="b")

    async def main():
        return await asyncio.gather(shared_query("a", query_a), shared_query("b", query_b))

    assert asyncio.run(main()) == ["a", "b"]
    assert len(calls_a) == len(calls_b) == 1


def test_an_error_reaches_every_caller_and_is_not_remembered():
    failing, calls = counting(error=RuntimeError("database is locked"))

    async def main():
        results = await asyncio.gather(
            *(shared_query("k", failing) for _ in range(3)), return_exceptions=True
        )
        ok, _ = counting(result="fine")
        return results, await shared_query("k", ok)

    results, after = asyncio.run(main())
    assert len(calls) == 1
    assert all(isinstance(r, RuntimeError) for r in results)
    assert after == "fine"


def test_a_caller_that_leaves_early_does_not_cancel_the_query_for_the_others():
    query, calls = counting(result="row", seconds=0.1)

    async def main():
        first = asyncio.ensure_future(shared_query("k", query))
        await asyncio.sleep(0)  # the query has started on first's behalf
        second = asyncio.ensure_future(shared_query("k", query))
        await asyncio.sleep(0.02)
        first.cancel()  # a client disconnecting
        with pytest.raises(asyncio.CancelledError):
            await first
        return await second

    assert asyncio.run(main()) == "row"
    assert len(calls) == 1
