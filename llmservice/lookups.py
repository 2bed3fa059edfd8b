"""Database reads that a burst of API requests shares: one query, however many requests ask at once.

A burst of 16 chat requests took a third longer to reach the engine when each ran its own registry
lookup (docs/benchmarks.md). Here the requests that ask the same question while it is being
answered await one query. Nothing is cached: a request arriving after the answer runs a new query,
so a change to a model or a key is seen by every request that starts after it.

The queries run on two reader threads of their own, each keeping its database connection open from
one query to the next. Opening a connection (for SQLite, the file and its WAL pragmas) was most of
a lookup's time, and every API request makes one or two lookups before its first token. Every
other thread keeps Django's setting (`CONN_MAX_AGE` 0: a connection per request), which under
ASGI is what keeps connections from piling up in short-lived threads; these two live as long as
the process. A read that finds its kept connection dropped by the database (PostgreSQL restarted)
runs again on a new one, as a connection per query would have.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from django.db import DEFAULT_DB_ALIAS, OperationalError, connections

_in_flight: dict[tuple[asyncio.AbstractEventLoop, Hashable], asyncio.Future] = {}
# Two, so that a request's key and model lookups (different questions) run side by side.
_readers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="shared-query")


async def shared_query(key: Hashable, query: Callable[[], Any]) -> Any:
    """`query()` (synchronous ORM code) run once for every caller asking `key` while it runs.

    It runs outside any request (so one caller leaving early cannot take it down with it), on a
    reader thread whose connection stays open between queries.
    """
    loop = asyncio.get_running_loop()
    slot = (loop, key)
    future = _in_flight.get(slot)
    if future is None:
        future = loop.run_in_executor(_readers, _read, query)
        _in_flight[slot] = future
        future.add_done_callback(lambda _: _in_flight.pop(slot, None))
    return await asyncio.shield(future)


def _read(query: Callable[[], Any]) -> Any:
    connection = connections[DEFAULT_DB_ALIAS]
    kept = connection.connection is not None
    if kept and connection.errors_occurred:  # the last query failed: do not trust its connection
        connection.close()
        kept = False
    try:
        return query()
    except OperationalError:
        if not kept or connection.is_usable():
            raise
        # The database dropped the kept connection (PostgreSQL restarted, say): a read is safe
        # to run again, on a new one.
        connection.close()
        return query()
