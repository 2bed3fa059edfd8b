"""What the backends that run their engine on a loop of their own share: that loop's thread, and
the stream that carries one request's deltas from it to the consumer's loop. No Django here."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections import deque

from inference.types import TokenDelta


class LoopThread:
    """A daemon thread running an asyncio loop: a backend's engine clients and their output
    handlers (vLLM's AsyncLLMs, the HTTP streams to llama-server)."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            pending = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.close()

    def submit(self, coro) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self.loop.is_closed()

    def stop(self, timeout: float = 10.0) -> None:
        if self.alive:
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self.loop.stop)
            if threading.current_thread() is not self._thread:
                self._thread.join(timeout)


class DeltaStream:
    """Deltas from the backend loop to whichever loop iterates: a deque under a lock, and a
    future on the consumer's loop resolved through call_soon_threadsafe when it waits."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: deque[TokenDelta] = deque()
        self._waiter: asyncio.Future | None = None
        self._waiter_loop: asyncio.AbstractEventLoop | None = None
        self.closed = False  # a final delta has been put

    def put(self, deltas: list[TokenDelta]) -> None:
        with self._lock:
            if self.closed:
                return
            self._items.extend(deltas)
            if any(d.finish_reason is not None for d in deltas):
                self.closed = True
            waiter, loop = self._waiter, self._waiter_loop
            self._waiter = self._waiter_loop = None
        if waiter is not None:
            with contextlib.suppress(RuntimeError):  # the consumer's loop is gone
                loop.call_soon_threadsafe(_wake, waiter)

    async def get(self) -> TokenDelta:
        loop = asyncio.get_running_loop()
        while True:
            with self._lock:
                if self._items:
                    return self._items.popleft()
                waiter = loop.create_future()
                self._waiter, self._waiter_loop = waiter, loop
            await waiter


def _wake(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)
