"""What the backends whose engine runs outside our step loop (vLLM, llama.cpp) share: a model's
requests in flight with their admission, a loop thread, and the stream that carries one request's
deltas from that loop to the consumer's. No Django here."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections import deque
from typing import Any

from inference.backends.base import QueueFull
from inference.types import TokenDelta


class Inflight:
    """One model's requests in flight by id (each with a `started` flag): admission against its
    max batch size plus the backend's queue, lookups from any thread, and the counts."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[str, Any] = {}
        self.closed = False

    def admit(self, request_id: str, req: Any, name: str, max_batch: int, max_queue: int) -> None:
        """Raises QueueFull, admitting nothing, past max_batch + max_queue."""
        with self._lock:
            if self.closed:
                raise RuntimeError(f"model {name!r} is closed")
            if request_id in self._requests:
                raise ValueError(f"request id {request_id!r} is already in flight")
            if len(self._requests) >= max_batch + max_queue:
                raise QueueFull(
                    f"{len(self._requests)} requests in flight for {name!r} "
                    f"(max_batch_size {max_batch} + queue {max_queue})"
                )
            self._requests[request_id] = req

    def get(self, request_id: str) -> Any:
        with self._lock:
            return self._requests.get(request_id)

    def remove(self, request_id: str, req: Any) -> None:
        with self._lock:
            if self._requests.get(request_id) is req:
                del self._requests[request_id]

    def count(self, started: bool) -> int:
        with self._lock:
            return sum(1 for r in self._requests.values() if r.started == started)

    def close(self) -> list | None:
        """Refuse new requests; the ones in flight, or None when it was closed already."""
        with self._lock:
            if self.closed:
                return None
            self.closed = True
            return list(self._requests.values())


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
