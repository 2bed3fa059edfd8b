"""Database reads that a burst of API requests shares: one query, however many requests ask at once.

Each request's ORM call runs in a thread of its own (Django gives every request a
`ThreadSensitiveContext`) over a connection of its own, opened and closed around it: a burst of 16
chat requests spent about 40 ms of its first 120 on 16 identical registry lookups before the first
prompt could be prefilled (docs/benchmarks.md). Here the requests that ask the same question while
it is being answered await one query. Nothing is cached: a request arriving after the answer runs a
new query, so a change to a model or a key is seen by every request that starts after it.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable, Hashable
from typing import Any

from channels.db import database_sync_to_async

_in_flight: dict[tuple[asyncio.AbstractEventLoop, Hashable], asyncio.Task] = {}


async def shared_query(key: Hashable, query: Callable[[], Any]) -> Any:
    """`query()` (synchronous ORM code) run once for every caller asking `key` while it runs.

    It runs outside any request's context (so one caller leaving early cannot take it down with
    it), in the event loop's thread pool, so different questions still run side by side, with the
    connection closed around it as `database_sync_to_async` does.
    """
    loop = asyncio.get_running_loop()
    slot = (loop, key)
    task = _in_flight.get(slot)
    if task is None:
        task = loop.create_task(
            database_sync_to_async(query, thread_sensitive=False)(), context=contextvars.Context()
        )
        _in_flight[slot] = task
        task.add_done_callback(lambda _: _in_flight.pop(slot, None))
    return await asyncio.shield(task)
